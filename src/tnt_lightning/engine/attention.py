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


class PolicySoftmax(torch.autograd.Function):
    """DynamicViT's masked softmax with a hand-written backward.

    The forward is the official arithmetic, op for op. Autograd through it kept about ten
    [B, H, N, N] intermediates and ran twice as many passes over them; masked training spent 70 %
    of a step there (DynamicViT on ``vit_cmnist``, README "Embedded study"). The backward below is
    the exact derivative of the same forward, including the max shift's share (non-zero because of
    the ``eps`` terms), so the gradients equal autograd's (``tests/test_learned.py``).
    """

    @staticmethod
    def forward(ctx, scores: Tensor, policy: Tensor, eps: float) -> Tensor:
        n = scores.shape[-1]
        keys = policy.reshape(policy.shape[0], 1, 1, n)
        allowed = keys + (1.0 - keys) * torch.eye(n, dtype=keys.dtype, device=keys.device)
        peak = scores.amax(dim=-1, keepdim=True)
        weights = (scores - peak).exp_()
        kept = weights * allowed
        denom = kept.sum(dim=-1, keepdim=True).add_(eps)
        probs = (kept + eps / n).div_(denom)
        ctx.save_for_backward(scores, peak, weights, allowed, probs, denom)
        return probs

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None, None]:
        scores, peak, weights, allowed, probs, denom = ctx.saved_tensors
        grad_kept = (grad - (grad * probs).sum(dim=-1, keepdim=True)).div_(denom)
        grad_scores = grad_kept * weights * allowed
        ties = scores == peak  # the shift by the row's maximum, shared by its maxima as amax does
        share = grad_scores.sum(dim=-1, keepdim=True) / ties.sum(dim=-1, keepdim=True)
        grad_scores -= ties * share
        grad_policy = None
        if ctx.needs_input_grad[1]:
            n = scores.shape[-1]
            grad_allowed = (grad_kept * weights).sum(dim=1)  # [B, N, N]: the heads share the mask
            off_diagonal = 1.0 - torch.eye(n, dtype=grad_allowed.dtype, device=grad_allowed.device)
            grad_policy = (grad_allowed * off_diagonal).sum(dim=1).unsqueeze(-1)
        return grad_scores, grad_policy, None


def softmax_with_policy(scores: Tensor, policy: Tensor, eps: float = 1e-6) -> Tensor:
    """DynamicViT's masked softmax: query i attends to key t only if ``policy[t] == 1`` or ``t == i``.

    ``(exp(s - max) * g + eps / N) / (sum + eps)``, computed in fp32 for stable mixed-precision
    training as the official ``softmax_with_policy`` does; in float64 (our faithfulness checks) it
    stays float64, where the official code would round to fp32. ``policy``: [B, N, 1].
    """
    compute = torch.promote_types(scores.dtype, torch.float32)
    probs = PolicySoftmax.apply(scores.to(compute), policy.to(compute), eps)
    return probs.to(scores.dtype)


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
