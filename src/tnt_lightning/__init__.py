"""tnt-lightning: faithful, comparable token reduction for vision transformers.

The Python API, on any timm ViT (``docs/python_api.md``; ``tests/test_python_api.py`` runs it)::

    import timm, tnt_lightning as tl
    base = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    model = tl.prune(timm.create_model("deit_tiny_patch16_224", pretrained=False), "topk", keep_rate=0.5)
    print(tl.gflops(base), tl.gflops(model))  # 1.258 0.737: Top-K keeps 98 of 196 patches in block 2
    print(tl.token_trace(model)[2], tl.speedup(model, base))  # (197, 99): attention, MLP tokens

``tl.prune`` takes any registered method by name (``tl.method_table()`` lists them; a method's
options as keyword arguments, ``schedule="multi"`` and ``blocks=[...]`` for other locations).
The names load on first use, so that ``import tnt_lightning`` stays light (no Lightning, no Hydra).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# The public API: name -> the module that defines it (imported on first use).
_API = {
    "prune": "tnt_lightning.methods.assembly",
    "gflops": "tnt_lightning.measure.flops",
    "token_trace": "tnt_lightning.measure.flops",
    "speedup": "tnt_lightning.measure.speedup",
    "method_table": "tnt_lightning.engine.registry",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'tnt_lightning' has no attribute {name!r}")
    return getattr(import_module(_API[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
