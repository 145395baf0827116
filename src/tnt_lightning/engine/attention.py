"""timm's attention, run so that it can also return what a method needs.

Only layers whose method needs the full attention probabilities (or masked training) leave the
fused kernel; keys alone and additive biases (proportional attention) keep
``scaled_dot_product_attention``. A method that reads only the CLS query's row of the
probabilities (``AttentionNeeds.cls_probs``: Top-K, EViT, eTPS, ATS) gets that row computed
explicitly and the other queries' attention fused, which is the same arithmetic.
The arithmetic follows timm's ``Attention.forward`` (q is scaled before ``q @ k^T``), so an
untouched layer gives timm's numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import Tensor

from .reducer import AttentionInfo, AttentionNeeds


def softmax_with_policy(scores: Tensor, policy: Tensor, eps: float = 1e-6) -> Tensor:
    """DynamicViT's masked softmax: query i attends to key t only if ``policy[t] == 1`` or ``t == i``.

    ``(exp(s - max) * g + eps / N) / (sum + eps)``, computed in fp32 for stable mixed-precision
    training (DynamicViT's ``softmax_with_policy``). ``policy``: [B, N, 1].
    """
    n = scores.shape[-1]
    allowed = policy.reshape(policy.shape[0], 1, 1, n)
    eye = torch.eye(n, dtype=allowed.dtype, device=allowed.device).view(1, 1, n, n)
    allowed = allowed + (1.0 - allowed) * eye
    weights = (scores - scores.amax(dim=-1, keepdim=True)).float().exp() * allowed.float()
    return ((weights + eps / n) / (weights.sum(dim=-1, keepdim=True) + eps)).type_as(scores)


def attend(
    attn: Attention,
    x: Tensor,
    needs: AttentionNeeds | None = None,
    bias: Tensor | None = None,
    policy: Tensor | None = None,
) -> tuple[Tensor, AttentionInfo]:
    """``attn(x)`` plus the probabilities/keys in ``needs``; ``bias`` is added to the logits."""
    if getattr(attn, "gate", None) is not None:
        raise NotImplementedError("gated attention is not supported by the token-reduction engine")
    needs = needs or AttentionNeeds()
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = cls_probs = None
    dropout = attn.attn_drop.p if attn.training else 0.0
    if needs.probs or policy is not None or not attn.fused_attn:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        probs = softmax_with_policy(scores, policy) if policy is not None else scores.softmax(dim=-1)
        out = attn.attn_drop(probs) @ v
        cls_probs = probs[:, :, :1] if needs.cls_probs else None
    elif needs.cls_probs:
        # The CLS query's row explicitly, the other queries fused: the same multiply-adds as one
        # attention, none of them twice.
        scores = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)
        cls_probs = (scores if bias is None else scores + bias).softmax(dim=-1)
        rest = F.scaled_dot_product_attention(q[:, :, 1:], k, v, attn_mask=bias, dropout_p=dropout)
        out = torch.cat([attn.attn_drop(cls_probs) @ v, rest], dim=2)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.attn_dim))
    out = attn.proj_drop(attn.proj(out))
    return out, AttentionInfo(
        probs=probs if needs.probs else None,
        keys=k if needs.keys else None,
        values=v if needs.values else None,
        cls_probs=cls_probs,
    )
