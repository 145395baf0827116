"""Our ToMe, EViT (and Top-K: EViT without the fused token), DynamicViT and TNT against the official
code, timed in one process (docs/design-notes.md#official-speed). Opt-in: it imports the official
repositories from the paths given, which are never part of this repository.

For each method, both models get the same weights (a seeded random DeiT-S, the official model
loading ours), the same batch and threads; their logits are compared on a small batch, then they
are timed in turn, official, ours, official, ours, ... (``--pairs`` pairs of ``--iters`` passes;
the ratio is the median of the per-pair ratios, as ``make bench``).

    python scripts/compare_official.py --tome /tmp/official/ToMe --evit /tmp/official/evit \\
        --dynamicvit /tmp/official/DynamicViT --tnt /tmp/official/tnt --atc /tmp/official/ATC \\
        --diffrate /tmp/official/DiffRate --mctf /tmp/official/MCTF

The float64 comparisons of each method (token sets block by block) are on its method page.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import torch
from torch import nn

from tnt_lightning.config import register_configs
from tnt_lightning.measure import TimedModel, same_process_speedup
from tnt_lightning.measure.bench import build
from tnt_lightning.measure.memory import keep_freed_memory
from tnt_lightning.measure.throughput import device_name

DEPTH = 12


def official_file(root: Path, path: str, name: str) -> types.ModuleType:
    """Import the file ``path`` of an official checkout at ``root`` as module ``name``; its own
    sibling imports (``helpers``, ``utils``) resolve inside ``root``."""
    spec = importlib.util.spec_from_file_location(name, root / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # timm's @register_model looks its module up there
    sys.path.insert(0, str(root))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(root))
    return module


def load_ours(official: torch.nn.Module, ours: torch.nn.Module, rename: dict[str, str] | None = None) -> None:
    """Give ``official`` our weights (keys renamed by prefix); every key must match."""
    state = {}
    for key, value in ours.state_dict().items():
        for old, new in (rename or {}).items():
            if key.startswith(old):
                key = new + key[len(old) :]
        state[key] = value
    missing, unexpected = official.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights do not map: missing {missing}, unexpected {unexpected}")


def tome(root: Path, ours: torch.nn.Module, r: int) -> torch.nn.Module:
    official, _ = build(["model=deit_small_distilled"])
    official.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("reducer.")})
    sys.path.insert(0, str(root))
    try:
        importlib.import_module("tome").patch.timm(official)
    finally:
        sys.path.remove(str(root))
    official.r = r
    return official


def evit(root: Path, ours: torch.nn.Module, rate: float, fuse: bool) -> torch.nn.Module:
    # helpers.py imports torchprofile for its FLOP counting only, which the model never calls.
    sys.modules.setdefault("torchprofile", types.SimpleNamespace(profile_macs=None))
    module = official_file(root, "evit.py", "official_evit")
    keep = [rate if i in (3, 6, 9) else 1.0 for i in range(DEPTH)]
    official = module.EViT(
        patch_size=16, embed_dim=384, depth=12, num_heads=6, keep_rate=keep, fuse_token=fuse
    )
    load_ours(official, ours)
    return official


def dynamicvit(root: Path, ours: torch.nn.Module, rate: float) -> torch.nn.Module:
    # The official utils.py imports names that newer torch and a missing tensorboardX lack; the
    # model needs only its batch_index_select, so those two imports get empty stand-ins.
    sys.modules.setdefault("torch._six", types.SimpleNamespace(inf=math.inf))
    sys.modules.setdefault("tensorboardX", types.SimpleNamespace(SummaryWriter=None))
    module = official_file(root, "models/dyvit.py", "official_dyvit")
    official = module.VisionTransformerDiffPruning(
        patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, qkv_bias=True,
        pruning_loc=[3, 6, 9], token_ratio=[rate, rate**2, rate**3],
    )  # fmt: skip
    load_ours(official, ours, {"reducer.": ""})
    return official


def tnt(root: Path, ours: torch.nn.Module, rate: float) -> torch.nn.Module:
    official = official_file(root, "models.py", "official_tnt").deit_small_distilled_patch16_224()
    load_ours(official, ours, {"reducer.": ""})
    official.single_l = False
    official.pru_stat = {
        "sim_pru": 40,
        "after_sim_pru": 196 - 40,
        "info_pru": [rate if i in (2, 3, 4) else 1.0 for i in range(DEPTH)],
    }
    return official


def atc(root: Path, ours: torch.nn.Module, rate: float, linkage: str) -> torch.nn.Module:
    # It clusters with scikit-learn on the CPU, one image at a time, and allocates its merged tokens in
    # torch's default dtype: run it in float32.
    module = official_file(root, "ATC_setup/models/atc.py", "official_atc")
    args = argparse.Namespace(
        reduction_ratio=[rate], reduction_loc=[3, 6, 9], linkage=linkage, proportional_attn=True
    )
    official = module.AgglomerativeClusteringVisionTransformer(
        patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, qkv_bias=True,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), args=args,
    )  # fmt: skip
    load_ours(official, ours, {"reducer.": ""})
    return official


class LogitsOnly(nn.Module):
    """The official DiffRate model returns ``(logits, flops)``; the comparison wants the logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, return_flop=False)


def diffrate(root: Path, ours: torch.nn.Module, released: str) -> torch.nn.Module:
    # The packages' __init__ import the visualisation and the CAFormer patch (written for timm 0.4.5):
    # both packages are stubbed so that only its merge, utils and DeiT patch load, unmodified. timm
    # 1.0's Block has drop_path1/2 where the official block calls drop_path.
    for name, path in (("DiffRate", root / "DiffRate"), ("DiffRate.patch", root / "DiffRate" / "patch")):
        stub = types.ModuleType(name)
        stub.__path__ = [str(path)]
        sys.modules.setdefault(name, stub)
    sys.path.insert(0, str(root))
    try:
        patch = importlib.import_module("DiffRate.patch.deit")
    finally:
        sys.path.remove(str(root))
    official, _ = build(["model=deit_small"])
    official.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("reducer.")})
    patch.apply_patch(official)
    for block in official.blocks:
        block.drop_path = nn.Identity()
    kept = json.loads((root / "compression_rate.json").read_text())["ViT-S-DeiT"][
        released.split("_")[-1][:-1]
    ]
    numbers = {
        key: [int(v) for v in kept[key].strip("[]").split(",")]
        for key in ("prune_kept_num", "merge_kept_num")
    }
    official.set_kept_num(numbers["prune_kept_num"], numbers["merge_kept_num"])
    return LogitsOnly(official)


def mctf(root: Path, ours: torch.nn.Module, r: int) -> torch.nn.Module:
    # Its packages models/ and utils/ share their names with other checkouts' modules (DynamicViT's
    # utils.py): those are set aside while it loads, then put back.
    def clashing() -> dict[str, types.ModuleType]:
        return {
            k: sys.modules.pop(k) for k in [k for k in sys.modules if k.split(".")[0] in ("models", "utils")]
        }

    others = clashing()
    try:
        module = official_file(root, "models/deit.py", "official_mctf")
    finally:
        clashing()
        sys.modules.update(others)
    # mctf_type as the README's DeiT-S evaluation: r, r_teacher_max, trace_source, prop_attn,
    # one_step_ahead, tau_sim, tau_info, tau_size, bidirection, pooling_type, (unused)
    official = module.VisionTransformer(
        patch_size=16, embed_dim=384, depth=12, num_heads=6, qkv_bias=True,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), use_mctf=True,
        mctf_type=[r, 0, 0, 1, 1, 1, 20, 40, 1, 1, 0], task_type=[1, 0, 0],
        activate_layer=list(range(1, DEPTH)),
    )  # fmt: skip
    load_ours(official, ours)
    return official


# (option, label, our overrides, the official model given ours)
CASES = [
    ("tome", "ToMe, DeiT-S-distilled, multi-layer r=8",
     ["model=deit_small_distilled", "method=tome", "schedule=multi", "method.r=8"],
     lambda root, ours: tome(root, ours, 8)),
    ("evit", "EViT, DeiT-S, inside blocks 3, 6, 9, rho=0.7",
     ["model=deit_small", "method=evit", "schedule=multi", "keep_rate=0.7"],
     lambda root, ours: evit(root, ours, 0.7, True)),
    ("evit", "Top-K (EViT with fuse_token=False), DeiT-S, inside blocks 3, 6, 9, rho=0.7",
     ["model=deit_small", "method=evit", "schedule=multi", "keep_rate=0.7", "method.fuse_token=false"],
     lambda root, ours: evit(root, ours, 0.7, False)),
    ("dynamicvit", "DynamicViT, DeiT-S, before blocks 3, 6, 9, rho=0.7 (untrained predictors)",
     ["model=deit_small", "method=dynamicvit", "schedule=multi", "keep_rate=0.7"],
     lambda root, ours: dynamicvit(root, ours, 0.7)),
    ("tnt", "TNT, DeiT-S-distilled, after blocks 2, 3, 4, K=0.7 (untrained heads)",
     ["model=deit_small_distilled", "method=tnt", "schedule=multi", "keep_rate=0.7"],
     lambda root, ours: tnt(root, ours, 0.7)),
    ("atc", "ATC, DeiT-S, inside blocks 3, 6, 9, rho=0.7, average linkage",
     ["model=deit_small", "method=atc", "schedule=multi", "keep_rate=0.7", "method.linkage=average"],
     lambda root, ours: atc(root, ours, 0.7, "average")),
    ("atc", "ATC, DeiT-S, inside blocks 3, 6, 9, rho=0.7, complete linkage (official README)",
     ["model=deit_small", "method=atc", "schedule=multi", "keep_rate=0.7", "method.linkage=complete"],
     lambda root, ours: atc(root, ours, 0.7, "complete")),
    ("diffrate", "DiffRate, DeiT-S, the released 2.9 GFLOPs schedule",
     ["model=deit_small", "method=diffrate", "method.released=deit_s_2.9g"],
     lambda root, ours: diffrate(root, ours, "deit_s_2.9g")),
    ("mctf", "MCTF, DeiT-S, before the attention of blocks 1-11, r=16",
     ["model=deit_small", "method=mctf", "schedule=multi", "method.r=16"],
     lambda root, ours: mctf(root, ours, 16)),
]  # fmt: skip


@torch.no_grad()
def max_logit_diff(ours: torch.nn.Module, official: torch.nn.Module, seed: int = 0) -> float:
    """Largest |logit difference| on a batch of 4, both drawing the same random numbers."""
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    a = ours.eval()(x)
    torch.manual_seed(seed)
    b = official.eval()(x)
    return (a - b).abs().max().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in dict.fromkeys(option for option, *_ in CASES):
        parser.add_argument(f"--{name}", type=Path, help=f"the official {name} checkout")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args(argv)
    register_configs()
    keep_freed_memory()  # as make bench and every job: both models timed without page faults
    cases = [c for c in CASES if getattr(args, c[0])]
    # Ours first: the official files register timm model names (deit_small_patch16_224) of their own.
    torch.manual_seed(0)
    ours = [build(overrides)[0] for _, _, overrides, _ in cases]
    device = torch.device("cpu")
    print(
        f"batch {args.batch_size}, fp32, {device_name(device)}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; {args.warmup} warm-up, then {args.pairs} pairs of {args.iters} passes"
    )
    print("| method | max abs logit diff | ours img/s | official img/s | ours / official |")
    print("|---|---|---|---|---|")
    for (option, label, _, make), model in zip(cases, ours, strict=True):
        official = make(getattr(args, option), model)
        diff = max_logit_diff(model, official)
        a, b = TimedModel(model, device), TimedModel(official, device)
        inputs = torch.randn(args.batch_size, 3, 224, 224)
        a.warm_up(inputs, args.warmup)
        sp = same_process_speedup(a, b, (3, 224, 224), args.batch_size, args.iters, args.pairs, args.warmup)
        speeds = f"{sp['method_img_s']:.2f} | {sp['base_img_s']:.2f} | {sp['speedup']:.3f}"
        print(f"| {label} | {diff:.2e} | {speeds} |", flush=True)


if __name__ == "__main__":
    main()
