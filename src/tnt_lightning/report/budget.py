"""Matching a compute budget: for each method, the keep rate whose GFLOPs just fit a target.

The paper tunes keep rates by hand to land near a GFLOPs level ("GFLOPs ~ 13"); here the rate is
found by bisection so that methods are compared at equal cost. GFLOPs are counted exactly, as the
GFLOPs anchors test does: the composed config's backbone with random weights, batch 1, the
method plugged in by the engine, :func:`tnt_lightning.measure.count_macs`. Single-layer methods
(and multi-layer ones at a uniform rate) search ``keep_rate`` on a grid of 1/``resolution``; ToMe
multi-layer has no keep rate and searches ``method.r`` (tokens merged per block) instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ..config import compose_config, config_dir
from ..engine import ReductionError, backbone_info, remove_reducer
from ..engine.registry import method_names
from ..measure import count_macs
from ..methods.assembly import attach, reducer_for
from ..models import create_model

CONF = config_dir()


def available_methods() -> list[str]:
    """Every registered method (``none`` has no budget to match), in display order: what a budget
    is matched for by default."""
    return method_names()


class GflopsCounter:
    """Exact GFLOPs of a run.py setting; backbones are built once per model and reused.

    Weights do not change the count, so the backbone keeps its random initialisation.
    """

    def __init__(self) -> None:
        self._models: dict[tuple[str, bool], torch.nn.Module] = {}

    def num_patches(self, model: str) -> int:
        """Patch tokens of ``model`` (the count keep rates are fractions of)."""
        spec = instantiate(compose_config([f"model={model}"]).model)
        return backbone_info(self._model(spec, False)).num_patches

    def _model(self, spec, cls_only: bool) -> torch.nn.Module:
        """The backbone of ``spec``; a second one for methods that drop its DIST token (in place)."""
        key = (spec.name, cls_only)
        if key not in self._models:
            self._models[key] = create_model(spec).eval()
        return self._models[key]

    def __call__(self, cfg: DictConfig) -> float:
        """GFLOPs of a composed config at batch 1; ReductionError if the method cannot run so."""
        spec = instantiate(cfg.model)
        probe = self._model(spec, False)
        reducer, _ = reducer_for(probe, cfg.method, cfg.schedule, cfg.keep_rate, spec.pruning)
        inputs = torch.randn(1, *spec.input_size)
        if reducer is None:
            return count_macs(probe, inputs) / 1e9
        model = attach(self._model(spec, reducer.cls_only_backbone), reducer)
        try:
            return count_macs(model, inputs) / 1e9
        finally:
            remove_reducer(model)


@dataclass
class BudgetMatch:
    """One method's costliest setting within the budget (largest K, smallest r), or why none fits."""

    method: str
    schedule: str
    knob: str  # "keep_rate" or "method.r"
    value: float | int | None  # None: no value of the knob fits the budget
    gflops: float | None  # at ``value``; when nothing fits, of the cheapest setting found over budget
    next_value: float | int | None  # one grid step more expensive (K + 1/resolution, or r - 1)
    next_gflops: float | None  # its GFLOPs: above the target, which shows ``value`` is the largest fit
    overrides: list[str] = field(default_factory=list)
    note: str = ""

    def command(self) -> str:
        """The run.py command line that evaluates the method at the matched setting."""
        return "python run.py " + " ".join(self.overrides) if self.value is not None else ""


def _knob(method: str, schedule: str, resolution: int, num_patches: int):
    """(name, grid size, index -> value): GFLOPs grow with the index on every knob."""
    if method == "tome" and schedule == "multi":
        r_max = num_patches // 2  # ToMe merges at most half of the tokens per block
        return "method.r", r_max + 1, lambda i: r_max - i
    return "keep_rate", resolution, lambda i: (i + 1) / resolution


def match_budget(
    model: str,
    target_gflops: float,
    methods: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    schedule: str = "single",
    overrides: Sequence[str] = (),
    resolution: int = 100,
    progress: bool = True,
) -> list[BudgetMatch]:
    """For each method, the largest keep rate (smallest ToMe ``r``) whose GFLOPs <= ``target_gflops``.

    ``methods`` names methods (default: all but ``none``) or maps each to extra run.py overrides of
    its own (e.g. ``{"evit": ["method.paper_flops_compat=true"]}``); ``overrides`` apply to all.
    Bisection assumes GFLOPs do not decrease as the keep rate grows. Settings a method cannot run
    (ToMe single-layer below K=0.5, Zero-TP at K=0.01) lie at the cheap end and count as fitting;
    if the answer is such a setting, nothing that runs fits and the note says why.
    """
    if schedule not in ("single", "multi"):
        raise ValueError(f"schedule={schedule!r}: use 'single' or 'multi'")
    if methods is None:
        methods = available_methods()
    per_method = dict(methods) if isinstance(methods, Mapping) else {m: [] for m in methods}
    unknown = sorted(set(per_method) - set(available_methods()))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {available_methods()}")
    counter = GflopsCounter()
    num_patches = counter.num_patches(model)
    steps = sum((_knob(m, schedule, resolution, num_patches)[1] + 1).bit_length() for m in per_method)
    bar = tqdm(total=steps, desc="budget", unit="step", disable=not progress)
    try:
        return [
            _match_one(
                model,
                method,
                schedule,
                [*overrides, *extra],
                target_gflops,
                _knob(method, schedule, resolution, num_patches),
                counter,
                bar,
            )
            for method, extra in per_method.items()
        ]
    finally:
        bar.close()


def _match_one(model, method, schedule, extra, target, knob, counter, bar) -> BudgetMatch:
    """Bisection for one method; every cost is computed once and the bar ticks per computation."""
    name, size, value_at = knob
    base = [f"model={model}", f"method={method}"] + (["schedule=multi"] if schedule == "multi" else [])
    cfg = compose_config([*base, *extra])  # once: each step only sets the knob
    costs: dict[int, float | Exception] = {}

    def cost(i: int) -> float | Exception:
        if i not in costs:
            bar.set_postfix_str(f"{method} {name}={value_at(i)}")
            OmegaConf.update(cfg, name, value_at(i))
            try:
                costs[i] = counter(cfg)
            except (ReductionError, RuntimeError) as e:  # refused up front, or failing in the forward
                costs[i] = e
            bar.update()
        return costs[i]

    def gflops(i: int) -> float | None:
        c = None if i >= size else cost(i)
        return c if isinstance(c, float) else None

    # Largest index that fits; -1 and size are virtual bounds (fits, does not fit), never evaluated.
    lo, hi = -1, size
    while hi - lo > 1:
        mid = (lo + hi) // 2
        c = cost(mid)
        lo, hi = (mid, hi) if isinstance(c, Exception) or c <= target else (lo, mid)
    over = BudgetMatch(method, schedule, name, None, gflops(hi), None, None)
    if lo == -1:
        over.note = "over budget at its cheapest setting"
        return over
    if isinstance(cost(lo), Exception):
        over.note = f"nothing that runs fits ({name}={value_at(lo)} cannot run: {cost(lo)})"
        return over
    top = hi == size
    return BudgetMatch(
        method=method,
        schedule=schedule,
        knob=name,
        value=value_at(lo),
        gflops=gflops(lo),
        next_value=None if top else value_at(hi),
        next_gflops=gflops(hi),
        overrides=[*base, f"{name}={value_at(lo)}", *extra],
        note="the least-pruned setting fits" if top else "",
    )


def format_matches(matches: Sequence[BudgetMatch], target_gflops: float) -> str:
    """A markdown table method -> knob value -> GFLOPs, then the run.py command for each match."""
    lines = [
        f"Budget: GFLOPs <= {target_gflops:g}",
        "",
        "| method | schedule | knob | value | GFLOPs | next step | its GFLOPs | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in matches:
        cells = [
            m.method,
            m.schedule,
            m.knob,
            _fmt(m.value),
            _fmt(m.gflops, ".5g"),
            _fmt(m.next_value),
            _fmt(m.next_gflops, ".5g"),
            m.note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    commands = [m.command() for m in matches if m.value is not None]
    if commands:
        lines += ["", "Evaluate at these settings (add data=... and the rest of your setup):", ""]
        lines += [f"    {c}" for c in commands]
    return "\n".join(lines)


def _fmt(value, spec: str = "g") -> str:
    return "" if value is None else format(value, spec)
