"""The GPU check (``make gpu-check``): every CUDA path of the framework, run once, in one report.

Sections, in order (``--sections`` picks some):

- ``tests``: the suite's ``gpu`` tests (``pytest -m gpu``), one row per test;
- ``methods``: every method on the backbone (random weights, synthetic inputs, single-layer at
  ``--keep-rate``) on the device in fp32, bf16 and fp16: it runs, its GFLOPs counted on the device
  equal the CPU count, its fp32 logits agree with the CPU run within :data:`TOLERANCES` and its kept
  sets (the source pattern of every reduction step) equal the CPU run's where the method draws no
  random numbers on the device's generator; the SDPA kernels the FLOP counter saw are listed;
- ``throughput``: the paper's protocol at each ``--batches``, the same-process speedup of every
  method over the unpruned model (interleaved pairs, ``measure/speedup.py``) in each ``--dtypes``,
  with the GFLOPs ratio beside it;
- ``training``: ``--train-steps`` steps of every learned method through Lightning with
  ``trainer=gpu`` under AMP (``16-mixed``; ``bf16-mixed`` on the CPU) on one repeated synthetic
  batch: the loss is finite and falls, and, on CUDA, no operation of one watched step synchronises
  the host with the device (``torch.cuda.set_sync_debug_mode``);
- ``memory``: peak GPU memory of an inference forward per method at ``--memory-batch``;
- ``compiled``: every method of ``--compile-methods`` under ``torch.compile`` (inductor): its
  logits agree with the eager model's on the same device, and the graphs it compiled.

One failing row never stops the check: it is a row marked failed, with its error, and the
script's exit status is 1 if any row failed. ``--time-limit-s`` marks the rows left when it runs
out as skipped. Writes ``gpu_check.md`` and ``gpu_check.json`` to ``--out``.

``--device cpu`` runs the same code as a smoke test (``--smoke`` is then the default: DeiT-T, small
batches, two training steps, one pass per timing, bf16 in place of fp16 for timings, one compiled
method), so that the script is known to work before a GPU minute is spent.

    python -m tnt_lightning.tasks.gpu_check                      # on a GPU machine
    python -m tnt_lightning.tasks.gpu_check --device cpu         # the CPU smoke run (CI)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config import register_configs, source_root
from ..measure.flops import _EXTRA_FORMULAS
from ..measure.speedup import base_key, same_process_speedup, unpruned
from ..measure.throughput import DTYPES, TimedModel, device_name
from .quiet import quiet

ROOT = source_root()
SECTIONS = ("tests", "methods", "throughput", "training", "memory", "compiled")
# What "agree" means, stated in every report.
TOLERANCES = {
    # fp32 logits on the device against the CPU run (TF32 off for this comparison), and compiled
    # against eager on the device: max |a - b| <= rtol * max |CPU logits|
    "logits_rtol": 1e-3,
    # GFLOPs counted on the device against the CPU count: relative difference
    "gflops_rtol": 1e-6,
    # training: the mean loss of the last quarter of the steps is below that of the first quarter
    "loss_falls": "mean(last quarter) < mean(first quarter)",
}
# Methods whose kept tokens depend on draws from the device's own generator: a CUDA generator draws
# other numbers than the CPU's, so their kept sets are not compared (their logits are, loosely:
# they are reported, not checked).
DEVICE_DRAWS = frozenset({"random", "tnt", "dpcknn"})
STATUSES = ("ok", "failed", "skipped")


@dataclasses.dataclass
class Row:
    section: str
    name: str
    status: str = "ok"
    error: str | None = None
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


class Report:
    """The rows of every section, printed one line each as they come."""

    def __init__(self, deadline: float | None = None) -> None:
        self.rows: list[Row] = []
        self.deadline = deadline
        self.section_seconds: dict[str, float] = {}

    def run(self, section: str, name: str, check: Callable[[], dict[str, Any]]) -> Row:
        """``check()`` as one row: its values, or the error that failed it (a ``CheckFailed``
        keeps the values it measured), or skipped past the deadline."""
        row = Row(section, name)
        start = time.perf_counter()
        if self.deadline is not None and time.time() > self.deadline:
            row.status, row.error = "skipped", "time limit (--time-limit-s) reached"
        else:
            try:
                row.values = check() or {}
            except Skipped as e:
                row.status, row.error = "skipped", str(e)
            except CheckFailed as e:
                row.status, row.error, row.values = "failed", str(e), e.values
            except Exception as e:  # noqa: BLE001 - one failing method is a failed row
                row.status, row.error = "failed", f"{type(e).__name__}: {first_line(str(e))}"
                row.values = {"traceback": traceback.format_exc(limit=-4)}
                free_device_memory()
        row.seconds = time.perf_counter() - start
        self.rows.append(row)
        shown = f": {row.error}" if row.error else ""
        print(f"[gpu-check] {section} {name}: {row.status} ({row.seconds:.1f} s){shown}", flush=True)
        return row

    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status == "failed"]


class CheckFailed(Exception):
    """A check that ran and measured, but whose values are out of bounds."""

    def __init__(self, reasons: list[str], values: dict[str, Any]) -> None:
        super().__init__("; ".join(reasons))
        self.values = values


class Skipped(Exception):
    """A row that does not apply here (no CUDA for a CUDA-only measurement, no tests folder)."""


def first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


def free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check(values: dict[str, Any], failures: list[str]) -> dict[str, Any]:
    """``values``, or a :class:`CheckFailed` carrying them when any check failed."""
    if failures:
        raise CheckFailed(failures, values)
    return values


@contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 matmuls and convolutions without TF32, for comparisons with the CPU."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# -- settings ----------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    from ..measure.bench import METHODS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", type=Path, default=Path("reports/gpu"))
    parser.add_argument("--model", help="the backbone (deit_small; smoke deit_tiny: the same code, faster)")
    parser.add_argument("--keep-rate", type=float, default=0.5)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"some of {','.join(SECTIONS)}")
    parser.add_argument(
        "--smoke",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="small sizes for a CPU smoke run (default: on with --device cpu)",
    )
    parser.add_argument("--batch-size", type=int, help="inputs of the methods section (8; smoke 2)")
    parser.add_argument("--batches", help="throughput batch sizes (32,256; smoke 2,4)")
    parser.add_argument("--dtypes", help="throughput precisions (fp32,fp16; smoke fp32,bf16)")
    parser.add_argument("--warmup", type=int, help="untimed passes per model (20; smoke 1)")
    parser.add_argument("--iters", type=int, help="timed passes per model per pair (30; smoke 1)")
    parser.add_argument("--pairs", type=int, help="base/method pairs (2; smoke 1)")
    parser.add_argument("--train-steps", type=int, help="training steps per learned method (30; smoke 2)")
    parser.add_argument("--train-batch", type=int, help="training batch size (32; smoke 2)")
    parser.add_argument("--memory-batch", type=int, help="batch of the peak-memory forward (256; smoke 4)")
    parser.add_argument(
        "--compile-methods", help="methods run compiled, comma-separated, or 'all' (all; smoke topk)"
    )
    parser.add_argument(
        "--time-limit-s",
        type=float,
        help="rows not started by then are skipped (480 on CUDA; none in a smoke run)",
    )
    args = parser.parse_args(argv)
    if args.smoke is None:
        args.smoke = args.device == "cpu"
    smoke = args.smoke
    defaults = {
        "model": "deit_tiny" if smoke else "deit_small",
        "batch_size": 2 if smoke else 8,
        "batches": "2,4" if smoke else "32,256",
        "dtypes": "fp32,bf16" if smoke else "fp32,fp16",
        "warmup": 1 if smoke else 20,
        "iters": 1 if smoke else 30,
        "pairs": 1 if smoke else 2,
        "train_steps": 2 if smoke else 30,
        "train_batch": 2 if smoke else 32,
        "memory_batch": 4 if smoke else 256,
        "compile_methods": "topk" if smoke else "all",
        "time_limit_s": None if smoke else 480.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: {unknown} not among {METHODS}")
    args.sections = [s for s in args.sections.split(",") if s]
    if set(args.sections) - set(SECTIONS):
        parser.error(f"--sections: {sorted(set(args.sections) - set(SECTIONS))} not among {SECTIONS}")
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.dtypes = str(args.dtypes).split(",")
    if set(args.dtypes) - set(DTYPES):
        parser.error(f"--dtypes: {args.dtypes} not among {list(DTYPES)}")
    args.compile_methods = (
        list(args.methods)
        if args.compile_methods == "all"
        else [m for m in args.compile_methods.split(",") if m]
    )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device (use --device cpu for the smoke run)")
    return args


# -- sections ----------------------------------------------------------------------------------------


class Context:
    """What the sections share: the settings, the device, and every method's CPU GFLOPs."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.common = [f"model={args.model}", f"keep_rate={args.keep_rate}", "data=synthetic"]
        self.gflops: dict[str, float] = {}

    def build(self, method: str | None) -> tuple[torch.nn.Module, Any]:
        from ..measure.bench import build

        return build(self.common + ([f"method={method}"] if method else []))

    def cpu_gflops(self, method: str | None) -> float:
        key = method or "none"
        if key not in self.gflops:
            model, spec = self.build(method)
            self.gflops[key] = count(model, spec.input_size, torch.device("cpu"))[0]
        return self.gflops[key]


def count(model: torch.nn.Module, input_shape, device: torch.device) -> tuple[float, list[str]]:
    """GFLOPs at batch 1 on ``device`` (``measure.flops``'s count) and the SDPA kernels it saw."""
    inputs = torch.randn(1, *input_shape, device=device)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        model.eval()(inputs)
    ops = counter.get_flop_counts().get("Global", {})
    kernels = sorted({str(op).split(".")[-1] for op in ops if "scaled_dot_product" in str(op)})
    return counter.get_total_flops() // 2 / 1e9, kernels


def traced_forward(model: torch.nn.Module, inputs: torch.Tensor, dtype: str = "fp32"):
    """Logits (fp32, on the CPU) and the kept pattern (source > 0) of every reduction step."""
    reducer = getattr(model, "reducer", None)
    if reducer is not None and hasattr(reducer, "reset_generators"):
        reducer.reset_generators()
    model.trace_sources = True
    try:
        with torch.no_grad():
            if DTYPES[dtype] is None:
                logits = model(inputs)
            else:
                with torch.autocast(inputs.device.type, dtype=DTYPES[dtype]):
                    logits = model(inputs)
        kept = [(source > 0).cpu() for _, source in model.last_trace]
    finally:
        model.trace_sources = False
    return logits.float().cpu(), kept


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def check_method(ctx: Context, method: str) -> dict[str, Any]:
    """The methods section's row of ``method``."""
    args, device = ctx.args, ctx.device
    model, spec = ctx.build(method)
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(args.batch_size, *spec.input_size, generator=g)
    ref_logits, ref_kept = traced_forward(model, inputs)
    cpu_gflops = ctx.cpu_gflops(method)
    model.to(device)
    x = inputs.to(device)
    with exact_fp32():
        logits, kept = traced_forward(model, x)
        gflops, kernels = count(model, spec.input_size, device)
    err = relative_error(logits, ref_logits)
    values: dict[str, Any] = {
        "gflops_cpu": cpu_gflops,
        "gflops_device": gflops,
        "logits_rel_err": err,
        "sdpa": kernels,
    }
    failures = []
    if abs(gflops - cpu_gflops) > TOLERANCES["gflops_rtol"] * cpu_gflops:
        failures.append(f"GFLOPs {gflops:.4f} on {device.type} != {cpu_gflops:.4f} on the CPU")
    if method in DEVICE_DRAWS and device.type != "cpu":
        values["kept"] = "not compared (device draws)"
    else:
        same = len(kept) == len(ref_kept) and all(
            torch.equal(a, b) for a, b in zip(kept, ref_kept, strict=True)
        )
        values["kept"] = "equal" if same else "differ"
        if not same:
            failures.append("kept sets differ from the CPU run")
        if err > TOLERANCES["logits_rtol"]:
            failures.append(
                f"fp32 logits differ from the CPU run by {err:.2e} (> {TOLERANCES['logits_rtol']})"
            )
    top1 = logits.argmax(-1)
    for dtype in ("bf16", "fp16"):
        half, _ = traced_forward(model, x, dtype)
        finite = bool(torch.isfinite(half).all())
        values[f"{dtype}_top1_agree"] = float((half.argmax(-1) == top1).float().mean())
        values[f"{dtype}_finite"] = finite
        if not finite:
            failures.append(f"{dtype} autocast gives non-finite logits")
    del model
    free_device_memory()
    return check(values, failures)


def check_throughput(ctx: Context, method: str, batch: int, dtype: str) -> dict[str, Any]:
    """Same-process speedup of ``method`` over the unpruned model, the paper's protocol."""
    from ..measure.bench import build

    args, device = ctx.args, ctx.device
    model, spec = ctx.build(method)
    key = base_key(args.model, device, batch, dtype, False)
    base, _ = unpruned(key, lambda: build(ctx.common)[0], spec.input_size, device, dtype, False)
    timed = TimedModel(model, device, dtype)
    timed.warm_up(torch.randn(batch, *spec.input_size, device=device), args.warmup)
    sp = same_process_speedup(timed, base, spec.input_size, batch, args.iters, args.pairs, args.warmup)
    ratio = ctx.cpu_gflops(None) / ctx.cpu_gflops(method)
    del timed, model
    free_device_memory()
    return {
        "batch": batch,
        "dtype": dtype,
        "gflops_ratio": ratio,
        "img_s": sp["method_img_s"],
        "base_img_s": sp["base_img_s"],
        "speedup": sp["speedup"],
        "speedup_over_ratio": sp["speedup"] / ratio,
        "pairs": sp["pairs"],
    }


def check_memory(ctx: Context, method: str | None) -> dict[str, Any]:
    """Peak memory of one inference forward at ``--memory-batch``, fp32 and fp16 autocast: the
    model's weights, its input and its activations (what other models of the check hold, the
    throughput section's unpruned ones, is subtracted)."""
    args, device = ctx.args, ctx.device
    cuda = device.type == "cuda"
    model, spec = ctx.build(method)
    if cuda:
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device)
    model.to(device)
    values: dict[str, Any] = {"batch": args.memory_batch}
    for dtype in ("fp32", "fp16" if cuda else "bf16"):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        x = torch.randn(args.memory_batch, *spec.input_size, device=device)
        TimedModel(model, device, dtype)(x)
        if cuda:
            torch.cuda.synchronize(device)
            values[f"{dtype}_peak_mib"] = (torch.cuda.max_memory_allocated(device) - held) / 2**20
        else:
            values[f"{dtype}_peak_mib"] = None  # the CPU has no peak-memory counter: the forward ran
        del x
    del model
    free_device_memory()
    return values


def check_compiled(ctx: Context, method: str) -> dict[str, Any]:
    """``method`` under ``torch.compile``: its fp32 logits against eager on the same device."""
    args, device = ctx.args, ctx.device
    model, spec = ctx.build(method)
    inputs = torch.randn(args.batch_size, *spec.input_size, generator=torch.Generator().manual_seed(0))
    x = inputs.to(device)
    with exact_fp32():
        eager, _ = traced_forward(model.to(device), x)
        timed = TimedModel(model, device, "fp32", compile=True)
        reducer = getattr(model, "reducer", None)
        if reducer is not None and hasattr(reducer, "reset_generators"):
            reducer.reset_generators()
        timed.warm_up(x, 1)
        if reducer is not None and hasattr(reducer, "reset_generators"):
            reducer.reset_generators()
        compiled = timed(x).float().cpu()
    err = relative_error(compiled, eager)
    values = {"compile_s": timed.compile_s, "graphs": timed.graphs, "logits_rel_err": err}
    values["graph_breaks"] = timed.graph_breaks
    failures = []
    if not bool(torch.isfinite(compiled).all()):
        failures.append("compiled logits are not finite")
    if err > TOLERANCES["logits_rtol"] and method not in DEVICE_DRAWS:
        failures.append(f"compiled logits differ from eager by {err:.2e} (> {TOLERANCES['logits_rtol']})")
    del timed, model
    free_device_memory()
    return check(values, failures)


def learned_methods(methods: list[str]) -> list[str]:
    """The methods of ``methods`` that train parameters (registered as learned)."""
    from ..engine.registry import learned_methods as registered

    learned = set(registered())
    return [m for m in methods if m in learned]


def check_training(ctx: Context, method: str) -> dict[str, Any]:
    """``--train-steps`` steps of ``method``'s training recipe through Lightning (``trainer=gpu``
    under AMP, ``trainer=cpu`` under bf16 autocast in the smoke run), on one repeated batch: no
    mixup, cutmix, label smoothing or warm-up, so that the loss can fall in a few steps."""
    import lightning as L
    from hydra.utils import instantiate

    from ..config import compose_config
    from ..engine import apply_reducer
    from ..engine.registry import get_method
    from ..lit import OptimConfig, TokenReductionModule
    from ..methods.assembly import reducer_for
    from ..models import create_model
    from ..models.trained import recipe
    from .common import make_trainer
    from .train import backbone_lr_scale, training_config

    args, device = ctx.args, ctx.device
    steps, batch = args.train_steps, args.train_batch
    cuda = device.type == "cuda"
    workdir = tempfile.TemporaryDirectory()
    cfg = compose_config(
        ctx.common
        + [
            f"paths.root_dir={workdir.name}",
            f"paths.output_dir={workdir.name}",
            f"method={method}",
            *get_method(method).train_overrides,
            "model.weights=random",
            f"trainer={'gpu' if cuda else 'cpu'}",
            f"trainer.precision={'16-mixed' if cuda else 'bf16-mixed'}",
            "+trainer.enable_progress_bar=false",
            "logger=csv",
            f"data.num_samples={batch}",
            "method.train.mixup=0",
            "method.train.cutmix=0",
            "method.train.label_smoothing=0",
            "method.train.warmup_epochs=0",
        ]
    )
    rec = recipe(cfg)
    # A frozen backbone of random weights gives the loss nothing to fall with (the method's
    # parameters alone barely move it): the backbone trains too, at the method's lr.
    scale = backbone_lr_scale(rec) or 1.0
    L.seed_everything(0, workers=True, verbose=False)
    spec = dataclasses.replace(instantiate(cfg.model), drop_path_rate=float(rec.drop_path))
    model = create_model(spec)
    tcfg = training_config(cfg)
    reducer, _ = reducer_for(model, tcfg.method, tcfg.schedule, tcfg.keep_rate, spec.pruning)
    apply_reducer(model, reducer)  # as tasks/train.py's fit: training keeps the DIST token
    datamodule = instantiate(cfg.data)
    datamodule.batch_size = batch
    watcher = StepWatcher(watch_step=max(0, steps - 2) if cuda else None)
    with workdir:
        trainer = make_trainer(
            cfg,
            False,
            max_epochs=steps,  # one batch per epoch: the same batch every step
            max_steps=steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            callbacks=[watcher],
            default_root_dir=workdir.name,
        )
        module = TokenReductionModule(
            model,
            datamodule.num_classes,
            OptimConfig(
                lr=float(rec.base_lr),
                weight_decay=rec.weight_decay,
                warmup_epochs=0,
                warmup_lr=rec.warmup_lr,
                min_lr=rec.min_lr,
                schedule=rec.schedule,
            ),
            label_smoothing=0.0,
            backbone_lr_scale=scale,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, datamodule=datamodule)
    losses = watcher.losses
    quarter = max(1, len(losses) // 4)
    first, last = sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter
    values: dict[str, Any] = {
        "accelerator": str(cfg.trainer.accelerator),
        "precision": str(cfg.trainer.precision),
        "backbone_lr_scale": scale,
        "steps": len(losses),
        "loss_first": first,
        "loss_last": last,
        "losses": losses,
        "syncs": None if watcher.syncs is None else len(watcher.syncs),
        "sync_sites": watcher.syncs or [],
    }
    failures = []
    if len(losses) != steps:
        failures.append(f"{len(losses)} steps ran of {steps}")
    if not all(math.isfinite(v) for v in losses):
        failures.append("the loss is not finite")
    elif not last < first:
        failures.append(f"the loss did not fall ({first:.4f} -> {last:.4f})")
    if watcher.syncs:
        failures.append(f"{len(watcher.syncs)} host-device synchronisation(s) in step {watcher.watch_step}")
    del module, model, trainer
    free_device_memory()
    return check(values, failures)


try:
    from lightning.pytorch.callbacks import Callback as _Callback
except ImportError:  # pragma: no cover - lightning is a dependency
    _Callback = object


class StepWatcher(_Callback):
    """Every step's loss; on CUDA, the synchronising operations of step ``watch_step``
    (``torch.cuda.set_sync_debug_mode('warn')``: each one warns, with where it ran)."""

    def __init__(self, watch_step: int | None) -> None:
        self.watch_step = watch_step
        self.losses: list[float] = []
        self.syncs: list[str] | None = None
        self._caught: list | None = None
        self._context = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.watch_step is not None and trainer.global_step == self.watch_step:
            self._context = warnings.catch_warnings(record=True)
            self._caught = self._context.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._context is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._context.__exit__(None, None, None)
            self.syncs = sorted(
                {
                    f"{Path(w.filename).name}:{w.lineno}: {first_line(str(w.message))}"
                    for w in self._caught
                    if "synchroniz" in str(w.message)
                }
            )
            self._context = None
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))


def raising(error: Exception) -> Callable[[], dict[str, Any]]:
    """A check that raises ``error`` (a row for something found before any check ran)."""

    def check() -> dict[str, Any]:
        raise error

    return check


def run_gpu_tests(report: Report) -> None:
    """The suite's ``gpu`` tests in a subprocess, one row per test (JUnit XML)."""
    tests = ROOT / "tests" if ROOT else None
    if tests is None or not tests.is_dir():
        report.run("tests", "pytest -m gpu", raising(Skipped("no tests/ (not a source checkout)")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "gpu.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
        cmd += [f"--junitxml={xml}"]
        start = time.perf_counter()
        proc = subprocess.run([*cmd, str(tests)], cwd=ROOT, capture_output=True, text=True, timeout=600)
        report.section_seconds["tests"] = time.perf_counter() - start
        cases = list(ET.parse(xml).getroot().iter("testcase")) if xml.exists() else []
    rows = []
    for case in cases:
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            rows.append(report.run("tests", name, lambda case=case: {"seconds": float(case.get("time", 0))}))
            continue
        message = first_line(outcome.get("message") or outcome.text or "") or outcome.tag
        error = Skipped(message) if outcome.tag == "skipped" else RuntimeError(message)
        rows.append(report.run("tests", name, raising(error)))
    # 5: no test collected; any other failure of pytest itself (not of a test) is a row of its own
    if proc.returncode not in (0, 5) and not any(r.status == "failed" for r in rows):
        tail = first_line("\n".join((proc.stdout + proc.stderr).strip().splitlines()[-1:]))
        report.run(
            "tests", "pytest -m gpu", raising(RuntimeError(f"pytest exited {proc.returncode}: {tail}"))
        )


def run_sections(args: argparse.Namespace) -> Report:
    deadline = None if args.time_limit_s is None else time.time() + args.time_limit_s
    report = Report(deadline)
    ctx = Context(args)
    plan: dict[str, Callable[[], None]] = {
        "tests": lambda: run_gpu_tests(report),
        "methods": lambda: [report.run("methods", m, lambda m=m: check_method(ctx, m)) for m in args.methods],
        "throughput": lambda: [
            report.run(
                "throughput",
                f"{m} b{b} {d}",
                lambda m=m, b=b, d=d: check_throughput(ctx, m, b, d),
            )
            for b in args.batches
            for d in args.dtypes
            for m in args.methods
        ],
        "training": lambda: [
            report.run("training", m, lambda m=m: check_training(ctx, m))
            for m in learned_methods(args.methods)
        ],
        "memory": lambda: [
            report.run("memory", m, lambda m=m: check_memory(ctx, None if m == "none" else m))
            for m in ["none", *args.methods]
        ],
        "compiled": lambda: [
            report.run("compiled", m, lambda m=m: check_compiled(ctx, m)) for m in args.compile_methods
        ],
    }
    for section in SECTIONS:
        if section not in args.sections:
            continue
        print(f"[gpu-check] == {section} ==", flush=True)
        start = time.perf_counter()
        plan[section]()
        report.section_seconds.setdefault(section, time.perf_counter() - start)
    return report


# -- the report --------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.3f}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    return str(value)


# The columns of each section's table: (header, value key).
COLUMNS = {
    "tests": [],
    "methods": [
        ("GFLOPs CPU", "gflops_cpu"),
        ("GFLOPs device", "gflops_device"),
        ("fp32 rel. err", "logits_rel_err"),
        ("kept sets", "kept"),
        ("bf16 top-1 agree", "bf16_top1_agree"),
        ("fp16 top-1 agree", "fp16_top1_agree"),
        ("SDPA kernels", "sdpa"),
    ],
    "throughput": [
        ("GFLOPs ratio", "gflops_ratio"),
        ("img/s", "img_s"),
        ("base img/s", "base_img_s"),
        ("speedup", "speedup"),
        ("speedup / ratio", "speedup_over_ratio"),
    ],
    "training": [
        ("precision", "precision"),
        ("backbone lr x", "backbone_lr_scale"),
        ("steps", "steps"),
        ("loss first", "loss_first"),
        ("loss last", "loss_last"),
        ("syncs", "syncs"),
    ],
    "memory": [("batch", "batch"), ("fp32 MiB", "fp32_peak_mib"), ("half MiB", "fp16_peak_mib")],
    "compiled": [("compile s", "compile_s"), ("graphs", "graphs"), ("rel. err vs eager", "logits_rel_err")],
}


def section_table(report: Report, section: str) -> str:
    rows = [r for r in report.rows if r.section == section]
    columns = COLUMNS[section]
    header = ["check", "status", *(h for h, _ in columns), "error"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        values = dict(r.values)
        if section == "memory" and values.get("fp16_peak_mib") is None:
            values["fp16_peak_mib"] = values.get("bf16_peak_mib")
        cells = [
            r.name,
            r.status,
            *(_fmt(values.get(k)) for _, k in columns),
            (r.error or "").replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(report: Report, section: str) -> str:
    rows = [r for r in report.rows if r.section == section]
    counts = ", ".join(f"{sum(r.status == s for r in rows)} {s}" for s in STATUSES)
    return f"{counts}; {report.section_seconds.get(section, 0.0):.0f} s"


def protocol(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    return {
        "device": device_name(device),
        "device_type": device.type,
        "smoke": args.smoke,
        "model": args.model,
        "keep_rate": args.keep_rate,
        "methods": args.methods,
        "sections": args.sections,
        "batch_size": args.batch_size,
        "throughput_batches": args.batches,
        "throughput_dtypes": args.dtypes,
        "warmup": args.warmup,
        "iters": args.iters,
        "pairs": args.pairs,
        "train_steps": args.train_steps,
        "train_batch": args.train_batch,
        "memory_batch": args.memory_batch,
        "compile_methods": args.compile_methods,
        "time_limit_s": args.time_limit_s,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }


def write(report: Report, args: argparse.Namespace, wall_s: float) -> dict[str, Any]:
    proto = protocol(args)
    failed = report.failed()
    data = {
        "protocol": proto,
        "tolerances": TOLERANCES,
        "wall_s": wall_s,
        "failed": len(failed),
        "sections": {
            s: {
                "seconds": report.section_seconds.get(s),
                "rows": [dataclasses.asdict(r) for r in report.rows if r.section == s],
            }
            for s in SECTIONS
            if s in args.sections
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    title = "CPU smoke run" if args.smoke else "GPU check"
    parts = [
        f"# {title}: {proto['device']} ({proto['device_type']}), {args.model}, K = {args.keep_rate}",
        "",
        f"torch {proto['torch']} (built for CUDA {proto['cuda']}), {wall_s:.0f} s, "
        f"{len(failed)} failed of {len(report.rows)} rows.",
        "",
        "Tolerances: fp32 logits on the device against the CPU, and compiled against eager: "
        f"max |difference| <= {TOLERANCES['logits_rtol']} x max |logit| (TF32 off); GFLOPs on the device "
        f"equal the CPU count (relative {TOLERANCES['gflops_rtol']}); kept sets equal the CPU run's, "
        f"except for methods drawing on the device's generator ({', '.join(sorted(DEVICE_DRAWS))}); "
        f"training: finite loss, {TOLERANCES['loss_falls']}, no host-device synchronisation in a "
        "watched step (CUDA only); bf16/fp16: finite logits (top-1 agreement with fp32 reported).",
        "",
        f"Throughput: batches {args.batches}, {args.dtypes}, {args.warmup} warm-up passes, "
        f"{args.pairs} interleaved pairs of {args.iters} timed passes (base, method).",
    ]
    for section in data["sections"]:
        parts += ["", f"## {section} ({summary(report, section)})", "", section_table(report, section)]
    (args.out / "gpu_check.md").write_text("\n".join(parts) + "\n")
    return data


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 if no row failed, 1 otherwise."""
    args = parse(argv)
    register_configs()
    quiet()
    start = time.perf_counter()
    p = protocol(args)
    print(
        f"[gpu-check] {p['device']} ({p['device_type']}{', smoke' if args.smoke else ''}), {args.model}, "
        f"K={args.keep_rate}, {len(args.methods)} methods, sections {','.join(args.sections)}",
        flush=True,
    )
    report = run_sections(args)
    data = write(report, args, time.perf_counter() - start)
    print((args.out / "gpu_check.md").read_text())
    print(f"[gpu-check] {args.out / 'gpu_check.md'}, {args.out / 'gpu_check.json'}: {data['failed']} failed")
    return 1 if data["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
