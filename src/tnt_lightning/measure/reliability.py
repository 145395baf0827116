"""How much to trust a same-process speedup: the spread of its timed pairs and the FLOP limit.

A speedup is the median of per-pair ratios (base, method, base, method, ...). On a machine shared
with other jobs the pairs can disagree, and a ratio above what the FLOPs allow (the unpruned
model's GFLOPs over the method's) is load, not the method. Either beyond ``bound`` marks the
speedup unreliable, in the record, the summary line and the report.
"""

from __future__ import annotations

import statistics
from typing import Any


def judge_speedup(pairs: list[list[float]], flops_ratio: float | None, bound: float) -> dict[str, Any]:
    """The spread of the per-pair ratios and whether the speedup can be trusted.

    Args:
        pairs: ``[base img/s, method img/s]`` per timed pair.
        flops_ratio: the unpruned model's GFLOPs over the method's (None: not counted).
        bound: the largest relative spread, and the largest excess over the FLOP limit, accepted.

    Returns:
        ``spread`` ((max - min) / median of the ratios), ``reliable``, and ``why`` when it is not.
    """
    ratios = [m / b for b, m in pairs]
    median = statistics.median(ratios)
    spread = (max(ratios) - min(ratios)) / median
    why = []
    if spread > bound:
        why.append(f"its {len(ratios)} timed pairs disagree by {spread:.0%} (> {bound:.0%})")
    if flops_ratio and median > flops_ratio * (1 + bound):
        why.append(f"{median:.2f}x exceeds the FLOP limit {flops_ratio:.2f}x by more than {bound:.0%}")
    return {"spread": round(spread, 4), "reliable": not why, **({"why": "; ".join(why)} if why else {})}
