"""The residual stream between blocks, with what reducers track about each token.

Prefix tokens (CLS, DIST) are the first ``num_prefix`` rows and are never pruned or merged: every
operation here selects or combines only the non-prefix rows ("patches", which include an EViT
fused token once there is one) and keeps the prefix first, in its original order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """``x[b, idx[b, i]]`` for ``x`` of shape [B, N, ...] and ``idx`` of shape [B, k].

    One ``index_select`` of whole rows from the flattened batch: the same copy as ``torch.gather``
    with an expanded index, which on a CPU is 5-10x slower (it reads an index per element).

    Args:
        x: [B, N, ...] rows per image (tokens, sizes, sources).
        idx: [B, k] row indices per image, any order (the output keeps it).

    Returns:
        [B, k, ...]: image b's rows ``idx[b]``.
    """
    batch, n = x.shape[:2]
    offsets = torch.arange(batch, device=idx.device).view(batch, *([1] * (idx.dim() - 1))) * n
    rows = x.reshape(batch * n, *x.shape[2:]).index_select(0, (idx + offsets).reshape(-1))
    return rows.view(*idx.shape, *x.shape[2:])


def complement(idx: Tensor, n: int) -> Tensor:
    """[B, n - k] indices in 0..n-1 not in ``idx`` ([B, k]), ascending.

    A stable sort of the taken-mask rather than boolean indexing: the result's shape is known
    without looking at the data, so ``torch.compile`` traces it without a graph break.

    Args:
        idx: [B, k] distinct indices per image (the tokens taken).
        n: how many indices there are (0..n-1).

    Returns:
        [B, n - k] the indices not taken, ascending: the tokens a method leaves over.
    """
    taken = torch.zeros(idx.shape[0], n, dtype=torch.uint8, device=idx.device).scatter_(1, idx, 1)
    return taken.sort(dim=1, stable=True).indices[:, : n - idx.shape[1]]


@dataclass
class Tokens:
    """Token state passed from hook to hook.

    ``x``: [B, P + n, D]. ``size``: [B, P + n, 1] number of original tokens each token stands for
    (merging methods; None means all 1). ``source``: [B, P + n, N0] which of the N0 input tokens
    each token stands for (only when tracing). ``policy``: [B, P + n, 1] keep decisions of masked
    training (DynamicViT, dTPS): 1 kept, 0 masked out; None outside masked training.
    """

    x: Tensor
    num_prefix: int
    size: Tensor | None = None
    source: Tensor | None = None
    policy: Tensor | None = None

    @classmethod
    def start(cls, x: Tensor, num_prefix: int, trace: bool = False) -> Tokens:
        source = None
        if trace:
            eye = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
            source = eye.expand(x.shape[0], -1, -1)
        return cls(x=x, num_prefix=num_prefix, source=source)

    @property
    def n(self) -> int:
        """Number of non-prefix tokens."""
        return self.x.shape[1] - self.num_prefix

    @property
    def patches(self) -> Tensor:
        return self.x[:, self.num_prefix :]

    @property
    def prefix(self) -> Tensor:
        return self.x[:, : self.num_prefix]

    def with_x(self, x: Tensor) -> Tokens:
        """The same state with new features ``x`` (same tokens, same order): what a method returns
        after changing the features but not which tokens there are."""
        return replace(self, x=x)

    def keep(self, idx: Tensor) -> Tokens:
        """Keep the non-prefix tokens ``idx`` ([B, k] indices into the patches), in that order.

        Args:
            idx: [B, k] indices into the non-prefix tokens, per image.

        Returns:
            New token state: the prefix, then the kept tokens, with their sizes, sources and
            policy selected alike (so what the other methods track stays aligned).
        """
        p = self.num_prefix

        def select(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return torch.cat([t[:, :p], gather_rows(t[:, p:], idx)], dim=1)

        return Tokens(select(self.x), p, select(self.size), select(self.source), select(self.policy))

    def patch_sizes(self) -> Tensor:
        """[B, n, 1] sizes of the non-prefix tokens (ones when no method tracks sizes)."""
        if self.size is None:
            return self.x.new_ones(self.x.shape[0], self.n, 1)
        return self.size[:, self.num_prefix :]
