"""Methods that act at one kind of site in a list of blocks, with one keep rate per block."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from ...engine import AttentionInfo, Location, ReductionError, Site, TokenReducer, Tokens


class StagedReducer(TokenReducer):
    """Acts at ``site`` after or inside each of ``blocks``, keeping ``rates[i]`` of the tokens there.

    A rate of 1.0 skips its location entirely (as TNT's official code does), so one rate list can
    switch locations off.
    """

    site: ClassVar[Site]

    def __init__(self, blocks: Sequence[int], rates: Sequence[float], seed: int = 0) -> None:
        super().__init__(seed=seed)
        blocks, rates = [int(b) for b in blocks], [float(r) for r in rates]
        if len(blocks) != len(rates):
            raise ReductionError(
                f"method={self.name}: {len(rates)} rates {rates} for {len(blocks)} locations {blocks}; "
                f"give one rate per location (schedule.rates) or a scalar keep_rate"
            )
        if len(set(blocks)) != len(blocks) or blocks != sorted(blocks):
            raise ReductionError(
                f"method={self.name}: schedule.blocks={blocks} must be increasing, without repeats"
            )
        for rate in rates:
            if not 0.0 < rate <= 1.0:
                raise ReductionError(f"method={self.name}: keep rate {rate} is outside (0, 1]")
        self.blocks = blocks
        self.rates = dict(zip(blocks, rates, strict=True))

    @classmethod
    def from_schedule(cls, schedule: str, blocks: list[int], rates: list[float], info, **options):
        return cls(blocks=blocks, rates=rates, **options)

    def bind(self, info) -> None:
        super().bind(info)
        self.check_counts(info.num_patches)

    def locations(self) -> list[Location]:
        return [Location(self.site, b) for b in self.blocks if self.rates[b] < 1.0]

    def reduce(self, loc: Location, tokens: Tokens, attn: AttentionInfo | None) -> Tokens:
        return self.prune(tokens, self.rates[loc.block], attn)

    def prune(self, tokens: Tokens, rate: float, attn: AttentionInfo | None) -> Tokens:
        raise NotImplementedError

    def count_after(self, n: int, rate: float) -> int:
        raise NotImplementedError

    def expected_tokens(self) -> dict[Location, int]:
        """Patches left after each location (bound, eval mode): the conformance kit's keep rule."""
        n, out = self.info.num_patches, {}
        for loc in self.locations():
            n = out[loc] = self.count_after(n, self.rates[loc.block])
        return out

    def check_counts(self, n0: int) -> None:
        n = n0
        for loc in self.locations():
            after = self.count_after(n, self.rates[loc.block])
            if after < 1:
                raise ReductionError(
                    f"method={self.name} at {loc} would keep {after} of {n} tokens (rate "
                    f"{self.rates[loc.block]}); raise keep_rate/schedule.rates so at least one token is kept"
                )
            n = after
