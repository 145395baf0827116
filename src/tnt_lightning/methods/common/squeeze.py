"""TPS's squeeze (Wei et al., CVPR 2023): fold each pruned token into its most similar kept token.

Every kept ("host") token becomes a softmax-weighted mean of itself (weight e) and the pruned
tokens whose best match it is (weight exp(cos)). The official code keeps the host's weight at e
whatever the temperature; so does this.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _unit(x: Tensor, eps: float = 1e-6) -> Tensor:
    return x / (x.norm(dim=-1, keepdim=True) + eps)


def squeeze(reserved: Tensor, pruned: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Hosts updated with their matched pruned tokens; also the [B, n_pruned, n_kept] match mask.

    ``reserved``: [B, n_k, D] kept tokens; ``pruned``: [B, n_p, D]. Exact ties give several hosts.
    """
    cos = (_unit(pruned) @ _unit(reserved).transpose(1, 2)) / temperature
    match = (cos == cos.amax(dim=2, keepdim=True)).to(cos.dtype)
    weight = (torch.exp(match * cos) * match).transpose(1, 2)  # [B, n_k, n_p]
    denominator = math.e + weight.sum(dim=-1, keepdim=True)
    return reserved * (math.e / denominator) + (weight / denominator) @ pruned, match


def squeeze_masked(x: Tensor, keep: Tensor, pruned_now: Tensor, temperature: float = 1.0) -> Tensor:
    """dTPS's training form, without removing tokens: ``keep``/``pruned_now`` are [B, N, 1] 0/1 masks.

    Hosts are the tokens kept at this stage; sources are the tokens pruned at this stage. Tokens
    pruned earlier are neither. Returns all N tokens, hosts updated.
    """
    n = x.shape[1]
    cos = _unit(x) @ _unit(x).transpose(1, 2)
    cos = cos.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), -100.0) / temperature
    cos = cos.masked_fill(~keep.bool().reshape(x.shape[0], 1, n), -100.0)
    match = (cos == cos.amax(dim=2, keepdim=True)).to(x.dtype) * pruned_now
    weight = (torch.exp(match * cos) * match).transpose(1, 2)
    denominator = math.e + weight.sum(dim=-1, keepdim=True)
    return x * (math.e / denominator) + (weight / denominator) @ x
