"""The top-level config schema and the range checks Hydra's types cannot express.

The schema is registered in Hydra's ConfigStore as ``config_schema`` and is the first entry of
``conf/config.yaml``'s defaults, so a wrong type or an unknown task or top-level key fails when
the config is composed. :func:`validate` then checks ranges, naming the key, the value and what is
allowed, before any data is read or any model is built.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .errors import ConfigError


class Task(Enum):
    eval = "eval"  # measure accuracy, GFLOPs and throughput of a (pruned) backbone
    pretrain = "pretrain"  # train a small backbone from scratch (vit_mnist) and cache it
    train = "train"  # train a learned method's parameters on a frozen backbone
    train_eval = "train_eval"  # train, then evaluate, in one run
    visualize = "visualize"  # token maps of a method


@dataclass
class RunConfig:
    task: Task = Task.eval
    keep_rate: float = 0.5
    seed: int = 0
    sweep_name: str | None = None
    tags: list[str] = field(default_factory=list)
    skip_recorded: bool = True
    paper_flops_compat: bool = False
    verbose: bool = False  # library banners and harmless warnings (tnt_lightning.tasks.quiet)
    model: Any = MISSING
    method: Any = MISSING
    schedule: Any = MISSING
    data: Any = MISSING
    trainer: Any = MISSING
    logger: Any = None
    measure: Any = MISSING
    paths: Any = MISSING
    train: Any = None
    visualize: Any = None
    extra: Any = field(default_factory=dict)


# conf/ of the repository, shipped inside the package (pyproject.toml): Hydra reads it as
# pkg://tnt_lightning.conf wherever the package is installed.
CONFIG_PACKAGE = "tnt_lightning.conf"


def config_dir() -> Path:
    """The config folder on disk, for what needs a path rather than Hydra's search path (key
    checks, sweeps, bench, budget): the clone's conf/ in an editable install, else the wheel's."""
    from importlib.resources import files

    return Path(str(files(CONFIG_PACKAGE)))


def source_root() -> Path | None:
    """The clone this package runs from (an editable install), or None for an installed wheel:
    what asks git or the test suite must not ask whichever folder happens to hold site-packages."""
    package = Path(__file__).resolve().parent
    root = package.parents[1]
    return root if package.parent.name == "src" and (root / "pyproject.toml").is_file() else None


def register_configs() -> None:
    ConfigStore.instance().store(name="config_schema", node=RunConfig)
    if not OmegaConf.has_resolver("cwd"):
        OmegaConf.register_new_resolver("cwd", os.getcwd)


def compose_config(overrides: Sequence[str] = (), conf_dir: Path | None = None) -> DictConfig:
    """The config ``run.py`` would compose for ``overrides`` (paths left unresolved: nothing is
    written): the one wrapper of Hydra's compose API, for whatever composes outside a run (bench,
    budget, sweeps' key checks, scripts, tests).

    Args:
        overrides: Hydra overrides, as on the command line.
        conf_dir: the config folder; :func:`config_dir` when None.

    Returns:
        The composed config.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()  # one left initialised by an earlier caller would refuse this one
    with initialize_config_dir(config_dir=str(conf_dir or config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> None:
    value = OmegaConf.select(cfg, key)
    if value is not None:
        _check(isinstance(value, int) and value >= minimum, key, value, f"an integer >= {minimum}")


# Lightning's trainer.precision values (lightning.fabric's _PRECISION_INPUT).
PRECISIONS = (
    "64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true",
    "transformer-engine", "transformer-engine-float16", "64", "32", "16", "bf16", 64, 32, 16,
)  # fmt: skip
# measure.dtype: the autocast precision of the timed forward passes (measure/throughput.py).
MEASURE_DTYPES = ("fp32", "bf16", "fp16")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
# Keys the framework reads when present but no config file sets: ``+key=value`` may add them.
OPTIONAL_KEYS = ("data.train_overrides",)


def _number(cfg: DictConfig, key: str, low: float, high: float | None = None, low_open: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    bounds = f"{low} {'<' if low_open else '<='} {key}" + (f" <= {high}" if high is not None else "")
    _check(ok, key, value, f"a number with {bounds}")


def _validate_trainer(cfg: DictConfig) -> None:
    _positive_int(cfg, "trainer.max_epochs")
    _positive_int(cfg, "trainer.num_nodes")
    _positive_int(cfg, "trainer.log_every_n_steps")
    _positive_int(cfg, "trainer.accumulate_grad_batches")
    precision = OmegaConf.select(cfg, "trainer.precision")
    _check(precision in PRECISIONS, "trainer.precision", precision, f"one of {list(PRECISIONS[:6])}")
    accelerator = OmegaConf.select(cfg, "trainer.accelerator")
    _check(accelerator in ACCELERATORS, "trainer.accelerator", accelerator, f"one of {list(ACCELERATORS)}")
    devices = OmegaConf.select(cfg, "trainer.devices")
    ok = devices == "auto" or (isinstance(devices, int) and (devices >= 1 or devices == -1))
    ok = ok or (OmegaConf.is_list(devices) and len(devices) > 0 and all(isinstance(d, int) for d in devices))
    ok = ok or (isinstance(devices, str) and devices.replace(",", "").isdigit())
    _check(ok, "trainer.devices", devices, "'auto', -1, an integer >= 1 or a list of device indices")


def _check_compile_isolation() -> None:
    """measure.compile needs ``torch.compile(isolate_recompiles=...)``: without it, a process's
    ninth compiled model would silently run eager (measure/throughput.py)."""
    import inspect

    import torch

    if "isolate_recompiles" not in inspect.signature(torch.compile).parameters:
        raise ConfigError(
            f"measure.compile=true needs a torch whose torch.compile has isolate_recompiles (torch "
            f"{torch.__version__} has not; requirements.txt pins one that has): without it the ninth model "
            f"compiled in a process is silently timed eager"
        )


def _validate_schedule(cfg: DictConfig) -> None:
    name = OmegaConf.select(cfg, "schedule.name")
    _check(name in ("single", "multi"), "schedule.name", name, "one of ['single', 'multi']")
    blocks = OmegaConf.select(cfg, "schedule.blocks")
    rates = OmegaConf.select(cfg, "schedule.rates")
    depth = OmegaConf.select(cfg, "model.arch.depth")
    if blocks is not None:
        values = list(blocks) if OmegaConf.is_list(blocks) else blocks
        ok = (
            isinstance(values, list)
            and len(values) > 0
            and all(isinstance(b, int) and b >= 0 for b in values)
        )
        ok = ok and values == sorted(set(values)) and (depth is None or values[-1] < depth)
        limit = f" < model.arch.depth={depth}" if depth is not None else ""
        _check(ok, "schedule.blocks", values, f"a non-empty increasing list of block indices >= 0{limit}")
        if name == "single":
            _check(len(values) == 1, "schedule.blocks", values, "one block with schedule=single")
    if rates is not None:
        values = list(rates) if OmegaConf.is_list(rates) else rates
        ok = isinstance(values, list) and len(values) > 0
        ok = ok and all(isinstance(r, int | float) and 0 < r <= 1 for r in values)
        _check(ok, "schedule.rates", values, "a non-empty list of keep rates, each 0 < rate <= 1")
        _check(name == "multi", "schedule.rates", values, "only with schedule=multi (single takes keep_rate)")
        if blocks is not None:
            _check(
                len(values) == len(blocks),
                "schedule.rates",
                values,
                f"one rate per block of schedule.blocks={list(blocks)}",
            )


def _validate_devices(cfg: DictConfig) -> None:
    """The device a run asks for exists (torch is imported only when a GPU is asked for)."""
    device = OmegaConf.select(cfg, "measure.device")
    asked = {"measure.device": device, "trainer.accelerator": OmegaConf.select(cfg, "trainer.accelerator")}
    wants_gpu = {k: str(v) for k, v in asked.items() if str(v).split(":")[0] in ("cuda", "gpu")}
    if not wants_gpu:
        return
    import torch

    count = torch.cuda.device_count()
    for key, value in wants_gpu.items():
        index = int(value.split(":")[1]) if ":" in str(value) else 0
        _check(index < count, key, value, f"a device this machine has ({count} CUDA device(s); use 'cpu')")


def epoch_budget(rec: DictConfig) -> tuple[int, float]:
    """``(max_epochs, fraction of each epoch's batches)`` of a recipe, whose ``epochs`` is a whole
    number of epochs or a fraction of one epoch (the embedded study's DynamicViT: 0.5)."""
    epochs = rec.epochs
    if isinstance(epochs, float) and epochs.is_integer():
        epochs = int(epochs)
    if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1:
        return epochs, 1.0
    if isinstance(epochs, float) and 0.0 < epochs < 1.0:
        return 1, epochs
    raise ConfigError(
        f"method.train.epochs={epochs!r} is not allowed: an integer >= 1, "
        f"or a fraction of one epoch in (0, 1)"
    )


def _validate_recipe(cfg: DictConfig) -> None:
    if OmegaConf.select(cfg, "method.train.epochs") is not None:
        epoch_budget(cfg.method.train)
    _positive_int(cfg, "method.train.batch_size")
    _positive_int(cfg, "method.train.warmup_epochs", minimum=0)
    _number(cfg, "method.train.base_lr", 0.0, low_open=True)


def _validate_loggers(cfg: DictConfig) -> None:
    """W&B online needs credentials: find out now, not after the run."""
    wandb = OmegaConf.select(cfg, "logger.wandb")
    if wandb is None or wandb.get("mode") != "online":
        return
    netrc = Path("~/.netrc").expanduser()
    has_key = os.environ.get("WANDB_API_KEY") or (
        netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    )
    _check(
        bool(has_key),
        "logger.wandb.mode",
        "online",
        "online only with W&B credentials (WANDB_API_KEY or `wandb login`); or 'offline' and "
        "`wandb sync` later",
    )


def validate(cfg: DictConfig) -> None:
    """Range checks on the composed config; raises :class:`ConfigError` naming the bad key."""
    _check(0.0 < cfg.keep_rate <= 1.0, "keep_rate", cfg.keep_rate, "0 < keep_rate <= 1")
    _check(cfg.seed >= 0, "seed", cfg.seed, "an integer >= 0")
    for key in (
        "data.batch_size",
        "data.eval_batch_size",
        "data.num_samples",
        "data.image_size",
        "measure.batch_size",
        "measure.iters",
        "measure.repeats",
        "measure.gflops_images",
    ):
        _positive_int(cfg, key)
    workers = OmegaConf.select(cfg, "data.num_workers")
    if workers != "auto":
        _positive_int(cfg, "data.num_workers", minimum=0)
    for key in (
        "data.split_seed",
        "data.max_shift",
        "measure.warmup",
        "measure.speedup_pairs",
    ):
        _positive_int(cfg, key, minimum=0)
    _number(cfg, "data.crop_pct", 0.0, 1.0, low_open=True)
    _number(cfg, "measure.speedup_bound", 0.0, 10.0, low_open=True)
    mode = OmegaConf.select(cfg, "measure.throughput_mode")
    _check(mode in ("paper", "robust"), "measure.throughput_mode", mode, "one of ['paper', 'robust']")
    dtype = OmegaConf.select(cfg, "measure.dtype")
    _check(dtype in MEASURE_DTYPES, "measure.dtype", dtype, f"one of {list(MEASURE_DTYPES)}")
    compile_ = OmegaConf.select(cfg, "measure.compile")
    _check(isinstance(compile_, bool), "measure.compile", compile_, "true or false")
    if compile_:
        _check_compile_isolation()
    device = OmegaConf.select(cfg, "measure.device")
    _check(
        device == "auto" or str(device).split(":")[0] in ("cpu", "cuda"),
        "measure.device",
        device,
        "'auto', 'cpu' or 'cuda[:N]'",
    )
    _validate_schedule(cfg)
    _validate_trainer(cfg)
    _validate_recipe(cfg)


def check_environment(cfg: DictConfig) -> None:
    """What the config asks of this machine is here: the devices, W&B credentials when online."""
    _validate_loggers(cfg)
    _validate_devices(cfg)


def _takes_argument(target: str, name: str) -> bool:
    """Whether the class or function a config node instantiates takes the argument ``name``."""
    import inspect

    from hydra.utils import get_object

    try:
        parameters = inspect.signature(get_object(target)).parameters
    except (ImportError, ValueError, TypeError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def check_added_keys(overrides: list[str], cfg: DictConfig, conf_dir: str) -> None:
    """``+key=value`` may add a config group option or a key the framework reads; anything else is
    a typo that would silently run another experiment. ``++key=value`` and ``extra.*`` always pass."""
    from difflib import get_close_matches

    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if not override.is_add() or override.is_force_add() or key.startswith(("extra.", "hydra")):
            continue
        if os.path.isdir(os.path.join(conf_dir, key.replace(".", os.sep))):
            continue  # a config group: +sweep=..., +experiment=...
        if any(key == k or key.startswith(k + ".") for k in OPTIONAL_KEYS):
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if OmegaConf.is_dict(node) and "_target_" in node and _takes_argument(node._target_, leaf):
            continue  # an argument of what the node builds: +trainer.limit_train_batches=10
        known = [k for k in node if k != leaf] if OmegaConf.is_dict(node) else []
        near = get_close_matches(leaf, known, n=1)
        hint = f" (did you mean {(parent + '.' if parent else '') + near[0]}?)" if near else ""
        raise ConfigError(
            f"+{key}: {key} is not a key the framework reads{hint}. Set an existing key without '+', "
            f"use extra.<name> for your own annotations, or '++{key}' to add it anyway"
        )
