"""``python -m tnt_lightning.testing [method ...]``: the conformance table as Markdown (every
registered method when none is named); exits 1 when a check fails."""

from __future__ import annotations

import sys
import time

from ..engine.registry import method_names
from .conformance import check_method, markdown_table


def main(argv: list[str]) -> int:
    """Print the table for the named methods (all when none); 1 if any check failed, else 0."""
    start = time.perf_counter()
    results = {method: check_method(method) for method in (argv or method_names())}
    print(markdown_table(results))
    print(f"\n{len(results)} methods in {time.perf_counter() - start:.0f} s")
    return int(any(r.status == "fail" for row in results.values() for r in row.values()))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
