"""The Python API of docs/python_api.md, run exactly as it is shown there."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "python_api.md"


def shown_example() -> str:
    """The five lines of the doc's Python block (the package docstring shows the same)."""
    return re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)


def test_the_documented_example_runs_as_written(capsys):
    import tnt_lightning

    example = shown_example()
    assert len(example.strip().splitlines()) == 5
    assert example.strip() in tnt_lightning.__doc__.replace("\n    ", "\n")
    readme = (DOC.parents[1] / "README.md").read_text()
    assert re.search(r"```python\n(.*?)```", readme, re.S).group(1) == example  # the README shows the same
    exec(example, {})
    first, second = capsys.readouterr().out.splitlines()
    base, pruned = map(float, first.split())
    assert (round(base, 3), round(pruned, 3)) == (1.258, 0.737)  # the doc's comment
    assert second.startswith("(197, 99) ") and float(second.split()[-1]) > 0


def test_prune_takes_any_method_schedule_blocks_and_options():
    import timm

    import tnt_lightning as tl

    def deit():
        return timm.create_model("deit_tiny_patch16_224", pretrained=False)

    model = tl.prune(deit(), "tome", schedule="multi", r=8)
    assert [a for a, _ in tl.token_trace(model)] == [197 - 8 * i for i in range(12)]
    model = tl.prune(deit(), "random", keep_rate=0.25, schedule="multi", blocks=[0, 5])
    trace = tl.token_trace(model)
    assert trace[1] == (1 + 49, 50) and trace[6] == (1 + 12, 13)
    assert tl.prune(deit(), "none") is not None
    with pytest.raises(KeyError, match="no method 'nosuch'"):
        tl.prune(deit(), "nosuch")
    with pytest.raises(TypeError, match="no option"):
        tl.prune(deit(), "topk", nosuch=1)


def test_importing_the_package_pulls_neither_lightning_nor_hydra():
    code = "import sys, tnt_lightning; print('lightning' in sys.modules, 'hydra' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_a_configured_model_is_bound_once_on_the_backbone_it_runs_on(tmp_path, monkeypatch):
    """EViT's paper accounting runs on the CLS-only backbone: the method is bound once, to that."""
    from helpers import compose_config
    from tnt_lightning.engine import TokenReducer
    from tnt_lightning.methods.assembly import pruned_model

    bound = []
    bind = TokenReducer.bind
    monkeypatch.setattr(TokenReducer, "bind", lambda self, info: bind(self, info) or bound.append(info))
    cfg = compose_config(["model=deit_tiny_distilled", "method=evit", "paper_flops_compat=true"], tmp_path)
    model, record = pruned_model(cfg)
    assert [(info.num_prefix, info.distilled) for info in bound] == [(1, False)]
    assert model.num_prefix_tokens == 1 and record["blocks"] == [2]
