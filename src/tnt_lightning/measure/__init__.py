"""What every run measures: GFLOPs (fvcore convention), throughput, same-process speedup, parameters."""

from .flops import count_gflops, count_macs, mean_gflops
from .speedup import base_key, same_process_speedup, unpruned
from .throughput import DTYPES, TimedModel, measure_throughput

__all__ = [
    "DTYPES",
    "TimedModel",
    "base_key",
    "count_gflops",
    "count_macs",
    "mean_gflops",
    "measure_throughput",
    "same_process_speedup",
    "unpruned",
]
