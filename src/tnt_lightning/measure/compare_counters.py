"""Why GFLOPs are counted by our counter, not ptflops.

Run ``python -m tnt_lightning.measure.compare_counters``.
Prints, for the paper's four backbones, the exact closed-form count (docs/methods/flops.md), our count with
fused attention on and off, and ptflops' two backends.
"""

from __future__ import annotations

import contextlib
import io

import torch
from omegaconf import OmegaConf

from ..config import compose_config
from ..engine import backbone_info
from ..engine.analytic import vit_macs
from ..models import BackboneSpec, create_model
from .flops import count_macs

BACKBONES = ("deit_tiny_distilled", "deit_small_distilled", "deit_base_distilled", "vit_b16_meanpool")


def load_spec(name: str, fused_attn: bool) -> BackboneSpec:
    """The backbone as ``conf/model/<name>.yaml`` defines it (composed: a config may extend another)."""
    cfg = OmegaConf.to_container(compose_config([f"model={name}"]).model, resolve=True)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return BackboneSpec(**{**cfg, "fused_attn": fused_attn})


def ptflops_gmacs(model: torch.nn.Module, backend: str) -> float:
    from ptflops import get_model_complexity_info

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        macs, _ = get_model_complexity_info(
            model, (3, 224, 224), as_strings=False, print_per_layer_stat=False, backend=backend
        )
    return macs / 1e9


def main() -> None:
    columns = ["exact", "ours", "ours-unf", "ptflops", "pt-aten"]
    print(f"{'backbone (GMACs)':22} " + " ".join(f"{c:>8}" for c in columns) + f" {'pt-aten-unf':>11}")
    x = torch.randn(1, 3, 224, 224)
    for name in BACKBONES:
        fused_model = create_model(load_spec(name, fused_attn=True)).eval()
        unfused_model = create_model(load_spec(name, fused_attn=False)).eval()
        info = backbone_info(fused_model)
        n = info.num_patches + info.num_prefix
        exact = vit_macs(
            [n] * info.depth,
            info.embed_dim,
            info.mlp_hidden,
            info.num_patches,
            16,
            3,
            1000,
            num_heads_out=2 if info.distilled else 1,
        )
        row = [exact / 1e9] + [count_macs(m, x) / 1e9 for m in (fused_model, unfused_model)]
        row += [
            ptflops_gmacs(fused_model, "pytorch"),
            ptflops_gmacs(fused_model, "aten"),
            ptflops_gmacs(unfused_model, "aten"),
        ]
        print(f"{name:22} " + " ".join(f"{v:8.3f}" if i < 5 else f"{v:11.3f}" for i, v in enumerate(row)))


if __name__ == "__main__":
    main()
