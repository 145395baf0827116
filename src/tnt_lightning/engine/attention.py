"""timm's attention, run so that it can also return what a method needs.

Only layers whose method needs the full attention probabilities (or masked training, which runs
:class:`MaskedAttention`) leave the fused kernel; keys alone and additive biases (proportional
attention) keep ``scaled_dot_product_attention``. A method that reads only the CLS query's row of the
probabilities (``AttentionNeeds.cls_probs``: Top-K, EViT, eTPS, ATS) gets that row computed
explicitly and the other queries' attention fused, which is the same arithmetic.
The arithmetic follows timm's ``Attention.forward`` (q is scaled before ``q @ k^T``), so an
untouched layer gives timm's numbers.

DynamicViT's masked softmax rounds, by default, less than the official ``softmax_with_policy``:
in float64 it stays float64 (the official code rounds the shifted scores to float32), and under
half-precision autocast the max is subtracted in float32 (the official code subtracts it in half
precision). :func:`official_rounding` (or ``method.official_rounding=true`` for DynamicViT and
dTPS) rounds where the official code rounds instead, for float64 comparisons with it; in float32
the two modes compute the same forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import Tensor

from .reducer import AttentionInfo, AttentionNeeds


def masked_softmax_parts(
    scores: Tensor, policy: Tensor, eps: float, locate_peaks: bool = True
) -> tuple[Tensor | None, ...]:
    """DynamicViT's masked softmax, op for op as the official ``softmax_with_policy``, with what its
    derivative needs: where each row's maximum is (``locate_peaks``), ``exp(s - max)``, its
    allowed part, the probabilities and their normaliser. ``policy``: [B, N, 1]; ``scores``:
    [B, H, N, N]."""
    n = scores.shape[-1]
    keys = policy.reshape(policy.shape[0], 1, 1, n)
    allowed = keys + (1.0 - keys) * torch.eye(n, dtype=keys.dtype, device=keys.device)
    if locate_peaks:
        peak, where = scores.max(dim=-1, keepdim=True)
    else:  # a forward without backward: amax is the cheaper pass
        peak, where = scores.amax(dim=-1, keepdim=True), None
    weights = (scores - peak).exp_()
    kept = weights * allowed
    denom = kept.sum(dim=-1, keepdim=True).add_(eps)
    return where, weights, kept, (kept + eps / n).div_(denom), denom


def masked_softmax_backward(
    grad: Tensor, parts: tuple[Tensor, ...], need_policy: bool
) -> tuple[Tensor, Tensor | None]:
    """The exact derivative of :func:`masked_softmax_parts`, the max shift's share included (it is
    not zero because of the ``eps`` terms; it goes to the one maximum ``torch.max`` picked, as in
    the official code's autograd)."""
    where, weights, kept, probs, denom = parts
    grad_kept = (grad - (grad * probs).sum(dim=-1, keepdim=True)).div_(denom)
    grad_scores = grad_kept * kept
    grad_scores.scatter_add_(-1, where, -grad_scores.sum(dim=-1, keepdim=True))
    if not need_policy:
        return grad_scores, None
    n = kept.shape[-1]
    grad_allowed = (grad_kept * weights).sum(dim=1)  # [B, N, N]: the heads share the mask
    off_diagonal = 1.0 - torch.eye(n, dtype=grad_allowed.dtype, device=grad_allowed.device)
    return grad_scores, (grad_allowed * off_diagonal).sum(dim=1).unsqueeze(-1)


class PolicySoftmax(torch.autograd.Function):
    """The masked softmax with a hand-written backward: autograd through its ops kept about ten
    [B, H, N, N] intermediates and ran twice as many passes over them."""

    @staticmethod
    def forward(ctx, scores: Tensor, policy: Tensor, eps: float) -> Tensor:
        parts = masked_softmax_parts(scores, policy, eps)
        ctx.save_for_backward(*parts)
        return parts[3]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None, None]:
        return (*masked_softmax_backward(grad, ctx.saved_tensors, ctx.needs_input_grad[1]), None)


_OFFICIAL_ROUNDING: ContextVar[bool] = ContextVar("official_rounding", default=False)


@contextlib.contextmanager
def official_rounding(enabled: bool = True) -> Iterator[None]:
    """Within this context the masked softmax rounds exactly where the official DynamicViT code
    rounds (:func:`softmax_as_official`) and its gradients are autograd's of that op sequence;
    masked attention then never runs :class:`MaskedAttention`. Outside it (the default), the
    masked softmax keeps the scores' precision when it is float32 or more, and float32 for half
    precision."""
    token = _OFFICIAL_ROUNDING.set(enabled)
    try:
        yield
    finally:
        _OFFICIAL_ROUNDING.reset(token)


def official_rounding_enabled() -> bool:
    """Whether :func:`official_rounding` is in force here."""
    return _OFFICIAL_ROUNDING.get()


def softmax_as_official(scores: Tensor, policy: Tensor, eps: float = 1e-6) -> Tensor:
    """The masked softmax in the official op order and rounding, left to autograd: the mask in
    the policy's dtype, the row maximum (``torch.max``: its gradient goes to one index) and its
    subtraction in the scores' dtype, then ``exp``, the mask, the ``eps`` terms and the
    normalisation in float32, the result in the scores' dtype. ``policy``: [B, N, 1]."""
    n = scores.shape[-1]
    keys = policy.reshape(policy.shape[0], 1, 1, n)
    allowed = keys + (1.0 - keys) * torch.eye(n, dtype=keys.dtype, device=keys.device)
    shifted = scores - torch.max(scores, dim=-1, keepdim=True)[0]
    weights = shifted.to(torch.float32).exp_() * allowed.to(torch.float32)
    probs = (weights + eps / n) / (weights.sum(dim=-1, keepdim=True) + eps)
    return probs.to(scores.dtype)


def softmax_with_policy(
    scores: Tensor, policy: Tensor, eps: float = 1e-6, official: bool | None = None
) -> Tensor:
    """DynamicViT's masked softmax: query i attends to key t only if ``policy[t] == 1`` or ``t == i``.

    ``(exp(s - max) * g + eps / N) / (sum + eps)``. By default computed in the scores' dtype
    promoted to at least float32 (half-precision scores are cast to float32 before the max is
    subtracted; float64 stays float64), with :class:`PolicySoftmax`'s hand-written backward.
    ``official`` (default: whether :func:`official_rounding` is in force) runs
    :func:`softmax_as_official` instead.

    Args:
        scores: [B, H, N, N] attention logits.
        policy: [B, N, 1] keep decisions (1 kept, 0 masked out).
        eps: keeps a row with every key masked finite (the official value).
        official: force (or forbid) the official code's rounding; None: as set globally.

    Returns:
        The probabilities, [B, H, N, N], in the dtype of ``scores``.
    """
    if official_rounding_enabled() if official is None else official:
        return softmax_as_official(scores, policy, eps)
    compute = torch.promote_types(scores.dtype, torch.float32)
    probs = PolicySoftmax.apply(scores.to(compute), policy.to(compute), eps)
    return probs.to(scores.dtype)


CHUNK_BYTES = 1 << 21


def chunks(q: Tensor) -> list[slice]:
    """The images of each chunk of :class:`MaskedAttention`, so that chunking never changes the
    result against the whole batch's products.

    float64 (the precision of faithfulness checks) runs the whole batch as one chunk: its
    batched products round differently for a chunk of one image (whose batch folds into a
    strided view) and, with an odd number of heads, for a chunk that starts on an odd image.
    Other dtypes take about 2 MiB of [b, H, N, N] scores per chunk, at least 2 images, and the
    last chunk is never a single image of a larger batch (it joins the chunk before).
    """
    batch, heads, n, _ = q.shape
    if q.dtype == torch.float64:
        return [slice(0, batch)]
    step = max(2, CHUNK_BYTES // (heads * n * n * q.element_size()))
    starts = list(range(0, batch, step))
    if len(starts) > 1 and batch - starts[-1] == 1:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, [*starts[1:], batch], strict=True)]


def transposed_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a^T @ b`` over the last two dims of [..., N, M] tensors as one batched GEMM that reads the
    transpose in place (a 4-D ``matmul`` of a transposed operand copies it first)."""
    lead = a.shape[:-2]
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]).transpose(1, 2), b.reshape(-1, *b.shape[-2:]))
    return out.reshape(*lead, *out.shape[-2:])


class MaskedAttention(torch.autograd.Function):
    """``softmax_with_policy(q @ k^T) @ v`` (q already scaled) a few images at a time
    (:func:`chunks`; float64 the whole batch at once), recomputed in backward.

    The same arithmetic as the unfused path, but no [B, H, N, N] tensor is kept for backward and
    each chunk's [b, H, N, N] stays in cache. A DynamicViT training step on ``vit_cmnist`` (batch
    64, 2 CPU threads, each in a process of its own) took 1.14 s with autograd through the masked
    softmax, 1.02 s with :class:`PolicySoftmax` and 0.81 s with this (the whole batch as one chunk:
    1.03 s); ``scripts/time_masked_training.py`` times them in one process. The gradients equal
    autograd's of the unfused path (``tests/methods/test_learned.py``).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, policy: Tensor, eps: float) -> Tensor:
        out = v.new_empty(*q.shape[:-1], v.shape[-1])
        for rows in chunks(q):
            scores = q[rows] @ k[rows].transpose(-2, -1)
            probs = masked_softmax_parts(scores, policy[rows], eps, locate_peaks=False)[3]
            out[rows] = probs @ v[rows]
        ctx.save_for_backward(q, k, v, policy)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, policy = ctx.saved_tensors
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        grad_policy = torch.empty_like(policy) if ctx.needs_input_grad[3] else None
        for rows in chunks(q):
            parts = masked_softmax_parts(q[rows] @ k[rows].transpose(-2, -1), policy[rows], ctx.eps)
            grad_v[rows] = transposed_matmul(parts[3], grad_out[rows])
            grad_probs = grad_out[rows] @ v[rows].transpose(-2, -1)
            grad_scores, grad_keys = masked_softmax_backward(grad_probs, parts, grad_policy is not None)
            grad_q[rows] = grad_scores @ k[rows]
            grad_k[rows] = transposed_matmul(grad_scores, q[rows])
            if grad_policy is not None:
                grad_policy[rows] = grad_keys
        return grad_q, grad_k, grad_v, grad_policy, None


def chunked_masked_attention(q: Tensor, needs: AttentionNeeds, dropout: float, bias: Tensor | None) -> bool:
    """Whether masked training can run :class:`MaskedAttention`: nobody reads the probabilities,
    no dropout or bias, fp32/fp64 outside autocast (mixed precision keeps the official path:
    scores in half precision, the masked softmax in fp32), and not under :func:`official_rounding`
    (whose gradients are autograd's of the official op sequence)."""
    if official_rounding_enabled():
        return False
    plain = not (needs.probs or needs.cls_probs or dropout or bias is not None)
    autocast = torch.is_autocast_enabled(q.device.type)
    return plain and q.dtype in (torch.float32, torch.float64) and not autocast


def attend(
    attn: Attention,
    x: Tensor,
    needs: AttentionNeeds | None = None,
    bias: Tensor | None = None,
    policy: Tensor | None = None,
) -> tuple[Tensor, AttentionInfo]:
    """``attn(x)`` plus the probabilities/keys in ``needs``; ``bias`` is added to the logits.

    The fused kernel runs whenever nothing asks for the probabilities, so that a method pays for
    an explicit attention map only where it reads one.

    Args:
        attn: a timm ``Attention`` module (its weights, heads and norms are used as they are).
        x: [B, N, D] the block's normalised input.
        needs: what to return besides the output; None: nothing.
        bias: added to the attention logits (ToMe's ``log(size)``); broadcast to [B, H, N, N].
        policy: [B, N, 1] DynamicViT's keep decisions during masked training, or None.

    Returns:
        The attention's output [B, N, D] (before the residual add) and what ``needs`` asked for.
    """
    if getattr(attn, "gate", None) is not None:
        raise NotImplementedError("gated attention is not supported by the token-reduction engine")
    needs = needs or AttentionNeeds()
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = cls_probs = None
    dropout = attn.attn_drop.p if attn.training else 0.0
    if policy is not None and chunked_masked_attention(q, needs, dropout, bias):
        out = MaskedAttention.apply(q * attn.scale, k, v, policy.to(q.dtype), 1e-6)
    elif needs.probs or policy is not None or not attn.fused_attn:
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


def attention_probs(attn: Attention, x: Tensor, bias: Tensor | None = None) -> Tensor:
    """The attention probabilities of ``attn`` on ``x``, from queries and keys only (no values, no
    output): what a one-step-ahead method (MCTF) reads before it reduces the block's input.

    Args:
        attn: a timm ``Attention`` module.
        x: [B, N, D] the block's normalised input.
        bias: added to the logits (``log(size)``), broadcast to [B, H, N, N]; None: nothing.

    Returns:
        [B, H, N, N] probabilities.
    """
    B, N, _ = x.shape
    width = attn.qkv.out_features // 3
    qkv_bias = None if attn.qkv.bias is None else attn.qkv.bias[: 2 * width]
    qk = F.linear(x, attn.qkv.weight[: 2 * width], qkv_bias)
    q, k = qk.reshape(B, N, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    scores = (q * attn.scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1)


def attend_with_probs(attn: Attention, x: Tensor, probs: Tensor) -> Tensor:
    """The output of ``attn`` on ``x`` with the probabilities given (values and output projection
    only): a one-step-ahead method hands the reduced tokens' attention over.

    Args:
        attn: a timm ``Attention`` module.
        x: [B, N, D] the block's normalised input.
        probs: [B, H, N, N] the attention to apply.

    Returns:
        [B, N, D] the attention's output, before the residual add.
    """
    B, N, _ = x.shape
    width = attn.qkv.out_features // 3
    qkv_bias = None if attn.qkv.bias is None else attn.qkv.bias[2 * width :]
    v = F.linear(x, attn.qkv.weight[2 * width :], qkv_bias)
    v = v.reshape(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
    out = attn.attn_drop(probs) @ v
    out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.attn_dim))
    return attn.proj_drop(attn.proj(out))
