"""The conformance kit: what every method must do on any timm ViT, checked on a tiny random one.

Each check builds a DeiT-shaped model (CLS and DIST tokens, 64 patches of 8 x 8 pixels, 12 blocks
of width 48) with random weights, prunes it with the method as ``tl.prune`` does (single-layer at
keep rate 0.5 and multi-layer at 0.7; learned methods untrained) and runs it on CPU:

* ``keep-counts``: after every location the method keeps the count its own ``expected_tokens()``
  says (``{Location: patches left}``, bound, eval mode): at most that many when its cost depends on
  the image (``image_dependent_cost``).
* ``prefix-kept``: every step returns the prefix tokens (CLS, DIST) first, unchanged.
* ``gflops``: the counted GFLOPs, less what the method's own steps compute, equal the closed form
  (``engine/analytic.py``) for the token counts each block's attention and MLP really ran on.
* ``batch-independent``: an image's logits in a batch of three equal its logits alone.
* ``seeded``: two fresh builds with the same seed give the same logits.
* ``float64-fused``: float64 agrees with float32, and timm's unfused attention with the fused one.
* ``compile-bf16``: ``torch.compile`` (``backend="eager"``: Dynamo's tracing and graph breaks, not
  inductor's code generation, which would take minutes on 2 cores) gives the eager logits on the
  multi-layer model, and a bf16 autocast forward on CPU gives finite logits.

A method that cannot meet a check says why in its class's ``conformance_exceptions`` (check name ->
reason); the check then reports ``exempt`` with that reason instead of running.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from timm.models.deit import VisionTransformerDistilled
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..engine import Location, TokenReducer, Tokens, analytic, apply_reducer, backbone_info
from ..engine.registry import get_method, method_names
from ..measure.flops import _EXTRA_FORMULAS
from ..models.backbones import set_fused_attn

Status = Literal["pass", "exempt", "fail"]

# The tiny backbone: DeiT-shaped (CLS + DIST), 12 blocks so every paper schedule fits unscaled.
IMAGE, PATCH, DEPTH, DIM, HEADS, CLASSES = 64, 8, 12, 48, 4, 10
ARCH = {
    "img_size": IMAGE,
    "patch_size": PATCH,
    "depth": DEPTH,
    "embed_dim": DIM,
    "num_heads": HEADS,
    "mlp_ratio": 2.0,
    "num_classes": CLASSES,
    "qkv_bias": True,
}
# Keep rate per schedule: single-layer 0.5 (ToMe's lowest), multi-layer 0.7 at every location.
KEEP_RATES = {"single": 0.5, "multi": 0.7}
# Options a multi-layer run needs beyond the keep rate (ToMe merges r tokens per block, not a rate).
MULTI_OPTIONS = {"tome": {"r": 4}}
BATCH = 3
# torch.compile is checked on the multi-layer model only (the one with the most steps to trace).
COMPILE_SCHEDULE = "multi"
TOLERANCE = {"batch-independent": 1e-5, "float64-fused": 1e-4, "compile-bf16": 1e-5}


@dataclass(frozen=True)
class CheckResult:
    """One check's verdict on one method: ``pass``, ``exempt`` (``message`` says why) or ``fail``
    (``message`` says what differed, at which schedule)."""

    status: Status
    message: str = ""

    def __str__(self) -> str:
        return self.status if not self.message else f"{self.status}: {self.message}"


class CheckFailed(AssertionError):
    """A check found a method not doing what it must (the message says what and where)."""


Method = str | type[TokenReducer]
# Where a method given as a class (not yet registered, no YAML) acts: the paper's DeiT blocks.
CLASS_BLOCKS = {"single": [2], "multi": [2, 5, 8]}


def build(method: Method, schedule: str, seed: int = 0, **options: Any) -> nn.Module:
    """The tiny random DeiT-shaped ViT with ``method`` plugged in, in eval mode.

    Args:
        method: a registered method name (built as ``tl.prune`` builds it, from its YAML), or a
            :class:`TokenReducer` subclass (``from_schedule`` at :data:`CLASS_BLOCKS`).
        schedule: ``single`` or ``multi``.
        seed: seeds the backbone's and the method's random initialisation and the method's draws.
        **options: the method's options, over :data:`MULTI_OPTIONS`'s for a multi-layer run.

    Returns:
        The pruned model.
    """
    from ..methods.assembly import prune

    torch.manual_seed(seed)
    model = VisionTransformerDistilled(**ARCH)
    rate = KEEP_RATES[schedule]
    if not isinstance(method, str):
        blocks = CLASS_BLOCKS[schedule]
        info = backbone_info(model)
        reducer = method.from_schedule(schedule, blocks, [rate] * len(blocks), info, seed=seed, **options)
        return apply_reducer(model, reducer).eval()
    if schedule == "multi":
        options = {**MULTI_OPTIONS.get(method, {}), **options}
    return prune(model, method, keep_rate=rate, schedule=schedule, seed=seed, **options).eval()


def images(batch: int = BATCH, seed: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    """A fixed batch of random images of the tiny backbone's size."""
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@torch.no_grad()
def logits(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` with the method's random draws restarted, so that two calls are comparable."""
    model.reducer.reset_generators()
    return model(x)


@dataclass
class Step:
    """What one reduction step did: where, and how many tokens it received and returned."""

    location: Location
    before: Tokens
    after: Tokens


@contextlib.contextmanager
def recorded_steps(reducer: TokenReducer, on_step: Callable[[], None] | None = None) -> Iterator[list[Step]]:
    """Record every ``reduce`` call of ``reducer`` inside the block (``on_step`` runs before and
    after each, for the FLOP bookkeeping)."""
    steps: list[Step] = []
    reduce = reducer.reduce

    def recording(loc: Location, tokens: Tokens, attn: Any) -> Tokens:
        if on_step is not None:
            on_step()
        out = reduce(loc, tokens, attn)
        if on_step is not None:
            on_step()
        steps.append(Step(loc, tokens, out))
        return out

    reducer.reduce = recording
    try:
        yield steps
    finally:
        del reducer.reduce


def _label(method: Method) -> str:
    return method if isinstance(method, str) else method.__name__


def _close(a: Tensor, b: Tensor, tol: float) -> str:
    """Empty when ``a`` and ``b`` agree to ``tol`` relative to ``b``'s scale; else the difference."""
    scale = float(b.abs().max()) or 1.0
    diff = float((a.double() - b.double()).abs().max())
    return "" if diff <= tol * scale else f"max difference {diff:.3g} (logits up to {scale:.3g})"


def check_keep_counts(method: Method, schedule: str) -> str:
    """Kept patches after every location against the method's ``expected_tokens()``."""
    model = build(method, schedule)
    reducer = model.reducer
    if not hasattr(reducer, "expected_tokens"):
        return "the method has no expected_tokens() saying how many patches each location keeps"
    expected: dict[Location, int] = reducer.expected_tokens()
    at_most = type(reducer).image_dependent_cost
    with recorded_steps(reducer) as steps:
        logits(model, images(1))  # batch 1: no padding of image-dependent counts
    ran = {str(s.location): s.after.n for s in steps}
    want = {str(loc): n for loc, n in expected.items()}
    if set(ran) != set(want):
        return f"acted at {sorted(ran)}, expected_tokens() names {sorted(want)}"
    wrong = [
        f"{loc}: {ran[loc]} patches, rule {'<= ' if at_most else ''}{want[loc]}"
        for loc in want
        if (ran[loc] > want[loc] if at_most else ran[loc] != want[loc])
    ]
    return "; ".join(wrong)


def check_prefix_kept(method: Method, schedule: str) -> str:
    """Every step returns the same number of prefix tokens, first and unchanged."""
    model = build(method, schedule)
    prefix = model.num_prefix_tokens
    with recorded_steps(model.reducer) as steps:
        logits(model, images())
    for step in steps:
        if step.after.num_prefix != prefix or step.after.x.shape[1] < prefix:
            return f"{step.location}: {step.after.num_prefix} prefix tokens returned of {prefix}"
        if not torch.equal(step.after.prefix, step.before.prefix):
            return f"{step.location}: the prefix tokens (CLS, DIST) were changed or reordered"
    return "" if steps else "the method never acted"


def analytic_macs(model: nn.Module, attention: list[int], mlp: list[int], final: int) -> int:
    """The closed form for a ViT whose block l's attention ran on ``attention[l]`` tokens and its
    MLP on ``mlp[l]``, the final LayerNorm on ``final`` (prefix included), with its heads."""
    patch_embed = model.patch_embed.num_patches * DIM * 3 * PATCH * PATCH
    blocks = sum(
        analytic.attn_part(a, DIM) + analytic.mlp_part(m, DIM, 2 * DIM)
        for a, m in zip(attention, mlp, strict=True)
    )
    heads = 2 if isinstance(model, VisionTransformerDistilled) else 1
    return patch_embed + blocks + 5 * final * DIM + heads * DIM * CLASSES


def check_gflops(method: Method, schedule: str) -> str:
    """Counted multiply-adds, less the method's own steps', against :func:`analytic_macs`."""
    model = build(method, schedule)
    seen: dict[tuple[int, str], int] = {}
    handles = [
        norm.register_forward_pre_hook(
            lambda _m, args, key=(i, part): seen.__setitem__(key, args[0].shape[1])
        )
        for i, block in enumerate(model.blocks)
        for part, norm in (("attn", block.norm1), ("mlp", block.norm2))
    ]
    own = [0]
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        marks: list[int] = []

        def mark() -> None:  # the method's own share: counted between entering and leaving a step
            marks.append(counter.get_total_flops())
            if len(marks) % 2 == 0:
                own[0] += marks[-1] - marks[-2]

        with recorded_steps(model.reducer, mark):
            logits(model, images(1))
    for handle in handles:
        handle.remove()
    attention = [seen[(i, "attn")] for i in range(DEPTH)]
    mlp = [seen[(i, "mlp")] for i in range(DEPTH)]
    counted = (counter.get_total_flops() - own[0]) // 2
    expected = analytic_macs(model, attention, mlp, model.last_tokens.x.shape[1])
    if counted != expected:
        return (
            f"{counted} multiply-adds outside the method's steps, closed form {expected} for "
            f"attention tokens {attention}, MLP tokens {mlp}"
        )
    return ""


def check_batch_independent(method: Method, schedule: str) -> str:
    """Logits of each image in a batch against its logits alone."""
    model = build(method, schedule)
    x = images()
    batched = logits(model, x)
    alone = torch.cat([logits(model, x[i : i + 1]) for i in range(len(x))])
    return _close(batched, alone, TOLERANCE["batch-independent"])


def check_seeded(method: Method, schedule: str) -> str:
    """Two fresh builds with one seed, one batch: bit-identical logits, whatever torch's global
    generator holds when each runs (a method draws from its own seeded generator)."""
    x = images()
    outs = []
    for global_seed in (11, 12):
        model = build(method, schedule, seed=3)
        torch.manual_seed(global_seed)
        outs.append(logits(model, x))
    first, second = outs
    return (
        ""
        if torch.equal(first, second)
        else "two builds with seed 3 " + (_close(first, second, 0.0) or "differ")
    )


def check_float64_fused(method: Method, schedule: str) -> str:
    """float64 against float32, and unfused attention against fused, in float32."""
    model = build(method, schedule)
    x = images()
    fused = logits(model, x)
    set_fused_attn(model, False)
    unfused = logits(model, x)
    problem = _close(unfused, fused, TOLERANCE["float64-fused"])
    if problem:
        return f"unfused vs fused attention: {problem}"
    set_fused_attn(model, True)
    double = logits(model.double(), x.double())
    problem = _close(fused, double, TOLERANCE["float64-fused"])
    return f"float32 vs float64: {problem}" if problem else ""


@contextlib.contextmanager
def _quiet_dynamo() -> Iterator[None]:
    """Dynamo's graph-break warnings off (a graph break is allowed here; only errors count)."""
    logger = logging.getLogger("torch._dynamo")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_compile_bf16(method: Method, schedule: str) -> str:
    """``torch.compile(backend="eager")`` against eager (at :data:`COMPILE_SCHEDULE` only: tracing
    takes about 5 s a model), and a finite bf16 autocast forward."""
    model = build(method, schedule)
    x = images()
    eager = logits(model, x)
    if schedule == COMPILE_SCHEDULE:
        torch._dynamo.reset()  # a fresh cache: models of earlier checks would use up the recompiles
        compiled = torch.compile(model, backend="eager")
        model.reducer.reset_generators()
        # A method that breaks the graph recompiles the block loop once per block: past torch's
        # limit (8) the rest would run eager without a word.
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=4 * DEPTH), _quiet_dynamo():
            out = compiled(x)
        problem = _close(out, eager, TOLERANCE["compile-bf16"])
        if problem:
            return f"torch.compile: {problem}"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = logits(model, x)
    if half.shape != eager.shape or not torch.isfinite(half).all():
        return (
            f"bf16 autocast: logits of shape {tuple(half.shape)}, finite: {bool(torch.isfinite(half).all())}"
        )
    return ""


# Every check, in table order: name -> (what it asks, the function running it at one schedule).
_CHECKS: dict[str, tuple[str, Callable[[Method, str], str]]] = {
    "keep-counts": ("kept counts follow the method's rule at every location", check_keep_counts),
    "prefix-kept": ("prefix tokens (CLS, DIST) are never dropped or changed", check_prefix_kept),
    "gflops": ("counted GFLOPs equal the closed form for the tokens that ran", check_gflops),
    "batch-independent": ("an image's logits do not depend on its batch", check_batch_independent),
    "seeded": ("same seed, same output", check_seeded),
    "float64-fused": ("float64 and unfused attention agree with float32 fused", check_float64_fused),
    "compile-bf16": ("torch.compile (eager backend) and bf16 autocast run", check_compile_bf16),
}
CHECKS: dict[str, str] = {name: what for name, (what, _) in _CHECKS.items()}
SCHEDULES = ("single", "multi")


def run_check(method: Method, check: str) -> CheckResult:
    """One check of one method at both schedules.

    Args:
        method: a registered method name, or a :class:`TokenReducer` subclass (see :func:`build`).
        check: a key of :data:`CHECKS`.

    Returns:
        ``exempt`` when the method's class declares the check in ``conformance_exceptions``, else
        ``fail`` with the first schedule's problem (an exception counts as one), else ``pass``.
    """
    if check not in _CHECKS:
        raise KeyError(f"no check {check!r}; checks: {', '.join(CHECKS)}")
    cls = get_method(method).cls if isinstance(method, str) else method
    exempt = cls.conformance_exceptions.get(check)
    if exempt is not None:
        return CheckResult("exempt", exempt)
    run = _CHECKS[check][1]
    for schedule in SCHEDULES:
        try:
            problem = run(method, schedule)
        except Exception as err:  # noqa: BLE001 - any error is this check's failure, reported by name
            problem = f"{type(err).__name__}: {err}"
        if problem:
            return CheckResult("fail", f"{schedule}-layer: {problem}")
    return CheckResult("pass")


def check_method(method: Method, checks: Iterable[str] | None = None) -> dict[str, CheckResult]:
    """Run the kit on one method.

    Args:
        method: a registered method name (an out-of-tree one once registered), or a
            :class:`TokenReducer` subclass (see :func:`build`).
        checks: names from :data:`CHECKS`; None runs all of them.

    Returns:
        Check name -> :class:`CheckResult`, in :data:`CHECKS` order.
    """
    return {check: run_check(method, check) for check in (CHECKS if checks is None else checks)}


def assert_conforms(method: Method, check: str) -> None:
    """A pytest body: raises :class:`CheckFailed` on ``fail``, skips with the reason on ``exempt``.

    Args:
        method: a registered method name, or a :class:`TokenReducer` subclass.
        check: a key of :data:`CHECKS`.

    Raises:
        CheckFailed: the method fails the check (the message says what and where).
    """
    result = run_check(method, check)
    if result.status == "exempt":
        import pytest

        pytest.skip(f"{_label(method)} is exempt from {check}: {result.message}")
    if result.status == "fail":
        raise CheckFailed(f"{_label(method)} fails {check}: {result.message}")


def conformance_cases(methods: Iterable[str] | None = None) -> list[Any]:
    """``(method, check)`` pytest parameters with ids ``method-check``, for a user's own test file::

        @pytest.mark.parametrize("method,check", conformance_cases(["mine"]))
        def test_conforms(method, check): assert_conforms(method, check)

    Args:
        methods: registered names; None: every registered method.

    Returns:
        One ``pytest.param`` per method and check.
    """
    import pytest

    names = method_names() if methods is None else list(methods)
    return [pytest.param(m, c, id=f"{m}-{c}") for m in names for c in CHECKS]


def markdown_table(results: dict[str, dict[str, CheckResult]]) -> str:
    """The kit's table: one row per method, one column per check (``pass``, ``exempt``, ``FAIL``),
    then the exemptions' and failures' reasons as a list.

    Args:
        results: method -> :func:`check_method`'s result.

    Returns:
        The table and its legend in Markdown.
    """
    checks = list(CHECKS)
    lines = ["| method | " + " | ".join(checks) + " |", "|---|" + "---|" * len(checks)]
    notes = []
    for method, row in results.items():
        cells = []
        for check in checks:
            result = row[check]
            cells.append({"pass": "pass", "exempt": "exempt", "fail": "**FAIL**"}[result.status])
            if result.status != "pass":
                notes.append(f"- {method} / {check}: {result}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    legend = [f"- `{name}`: {what}" for name, what in CHECKS.items()]
    return "\n".join([*lines, "", *legend, *([""] + notes if notes else [])])
