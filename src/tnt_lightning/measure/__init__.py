"""What every run measures: GFLOPs (fvcore convention), throughput, parameters."""

from .flops import count_gflops, count_macs, mean_gflops
from .throughput import measure_throughput

__all__ = ["count_gflops", "count_macs", "mean_gflops", "measure_throughput"]
