"""The TNT paper's tables as data (copied from the paper's appendix; docs/methods/flops.md#anchors).

``tnt_paper_results.csv``: one row per printed cell group (table, base_model, schedule, regime,
setting, method, acc_top1, gflops, throughput_img_s, params), numbers as printed.
:func:`overrides_for` turns a row into the run.py overrides that reproduce its setting; the
GFLOPs anchors test and the paper sweeps both use it. ``anchor_exceptions.csv`` lists the printed
GFLOPs that are known misprints or not reproducible, with the reason
(docs/methods/flops.md#paper-misprints, docs/methods/flops.md#not-anchors).
"""

from __future__ import annotations

import csv
import re
from importlib.resources import files
from typing import Any

METHOD_NAMES = {"base": "none", "tnt_mlp": "tnt"}


def _read(name: str) -> list[dict[str, str]]:
    with files(__name__).joinpath(name).open() as f:
        return list(csv.DictReader(f))


def load_results() -> list[dict[str, str]]:
    return _read("tnt_paper_results.csv")


def anchor_exception(row: dict[str, str]) -> dict[str, str] | None:
    """Why ``row``'s printed GFLOPs is not an anchor (a known misprint, or not reproducible), or None.

    Entries of ``anchor_exceptions.csv`` match a row field by field; ``*`` matches anything and a
    trailing ``*`` matches a prefix. ``exact`` is "yes" for single misprinted cells (their computed
    value must differ from the print), "no" for whole groups that are not anchors at all.
    """
    keys = ("table", "base_model", "method", "setting", "params")
    for entry in _read("anchor_exceptions.csv"):
        if all(_matches(entry[k], row[k]) for k in keys):
            return {
                "reason": entry["reason"],
                "exact": "no" if "*" in "".join(entry[k] for k in keys) else "yes",
            }
    return None


def _matches(pattern: str, value: str) -> bool:
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return pattern == value


def _floats(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"\d*\.\d+|\d+\.?", text)]


def keep_rate_for_tokens(tokens: int, n: int = 196) -> float:
    """A keep rate K with ``int(n * K) == tokens`` (the ViT/16 tables give token counts)."""
    return (tokens + 0.5) / n


def overrides_for(row: dict[str, str]) -> list[str] | None:
    """run.py overrides reproducing ``row``'s setting, or None if the row names no runnable setting."""
    method = METHOD_NAMES.get(row["method"], row["method"])
    out = [f"model={row['base_model']}", f"method={method}", f"schedule={row['schedule']}"]
    if row["method"] == "tnt_mlp":
        out.append("method.allocator=mlp")
    if method in ("evit", "dynamicvit"):
        out.append("method.paper_flops_compat=true")
    if method == "tome" and row["base_model"] == "vit_b16_meanpool":
        # the paper's ViT/16 ToMe matches on all D key channels (docs/methods/tome.md#flops)
        out.append("method.metric=keys")
    setting, params = row["setting"], row["params"]
    if method == "none":
        return out
    if row["schedule"] == "single":
        if setting.startswith("K="):
            out.append(f"keep_rate={float(setting[2:])}")
        elif setting.startswith("#tokens="):
            out.append(f"keep_rate={keep_rate_for_tokens(int(setting[8:]))}")
        else:
            return None
        if method == "evit" and row["base_model"] == "deit_base_distilled":
            # the paper's DeiT-B EViT GFLOPs fit block 3 (docs/methods/evit.md#single-layer-location)
            out.append("method.single_block=3")
        return out
    if params.startswith("Rate="):
        rates = _floats(params)
        out.append("schedule.rates=[" + ",".join(str(r) for r in rates) + "]")
    elif params.startswith("r="):
        out.append(f"method.r={int(_floats(params)[0])}")
    elif params.startswith("rho="):
        out.append(f"keep_rate={_floats(params)[0]}")
    else:
        return None
    return out


def describe_row(row: dict[str, Any]) -> str:
    return f"T{row['table']} {row['base_model']} {row['method']} {row['setting']} {row['params']}".strip()
