"""The method registry is the single source of what a method is: it and ``conf/method`` agree."""

from __future__ import annotations

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from helpers import CONF, ROOT, tiny_vit
from tnt_lightning.engine import ReductionError, backbone_info
from tnt_lightning.engine.registry import (
    BASELINE,
    NEEDS,
    get_method,
    learned_methods,
    method_names,
    method_table,
    methods,
    register_method,
)
from tnt_lightning.methods import LearnedReducer, TopK

YAMLS = {p.stem: OmegaConf.load(p) for p in sorted((CONF / "method").glob("*.yaml"))}
# Methods an "all methods" sweep leaves out, and why (the sweep's own comment says so where it can).
SWEEP_EXCEPTIONS = {
    "mnist_all": {
        BASELINE: "the unpruned baseline runs first, outside the grid (make demo)",
        "tome": "single-layer ToMe merges at most half of the 49 patches: make demo runs it at K = 0.7",
        "patchmerger": "Haurum's learned merging methods joined after the demo grid was set",
        "sinkhorn": "Haurum's learned merging methods joined after the demo grid was set",
        "sit": "Haurum's learned merging methods joined after the demo grid was set",
        "ppt": "PPT, as single-layer ToMe, removes at most half of the tokens per block: K = 0.3 is refused",
        "pitome": "PiToMe merges at most half of the tokens per block (it pairs 2r): K = 0.3 is refused",
        "mctf": "MCTF, as single-layer ToMe, fuses at most half of the tokens per block: K = 0.3 is refused",
        "diffrate": "DiffRate's released schedules are for 12-, 24- and 32-block ViTs: on the 6-block "
        "vit_mnist it runs only a searched (method.released=search) or given schedule",
    },
    "cmnist_study": {
        BASELINE: "the unpruned baseline runs first, outside the grid (make study)",
        "tome": "single-layer ToMe merges at most half of the tokens: make study runs it at K = 0.7, 0.5",
        **{
            m: "the study covers the TNT paper's methods; Haurum et al.'s baselines are not in it"
            for m in ("spatial", "kmedoids", "dpcknn", "ats", "patchmerger", "sinkhorn", "sit")
        },
        **{
            m: "the field's methods run on the study's backbones in make study-field, outside make study's "
            "30 minutes (ATC at every K; the others merge at most half of a block's tokens: K = 0.7, 0.5)"
            for m in ("ppt", "pitome", "atc", "mctf", "diffrate")
        },
    },
}


def test_registry_and_method_configs_name_the_same_methods():
    assert set(YAMLS) == {*method_names(), BASELINE}
    assert all(YAMLS[name].name == name for name in YAMLS)


@pytest.mark.parametrize("name", [m.name for m in methods()])
def test_a_method_config_targets_its_registered_class_in_its_defining_module(name):
    info = get_method(name)
    assert YAMLS[name]._target_ == info.target
    assert get_class(YAMLS[name]._target_) is info.cls
    assert info.cls.name == name


@pytest.mark.parametrize("name", [m.name for m in methods()])
def test_a_learned_method_is_a_learned_reducer_with_a_training_recipe(name):
    learned = name in learned_methods()
    assert issubclass(get_method(name).cls, LearnedReducer) == learned
    assert ("train" in YAMLS[name]) == learned


@pytest.mark.parametrize("name", [m.name for m in methods()])
def test_declared_needs_are_what_the_method_asks_of_the_backbone(name):
    """Built on a DeiT-like ViT (12 blocks, CLS), single- and multi-layer, a method asks exactly
    the attention its registration declares (the CLS token is checked by binding)."""
    import tnt_lightning as tl

    asked = set()
    for schedule in ("single", "multi"):
        options = {"r": 8} if (name, schedule) == ("tome", "multi") else {}
        model = tl.prune(tiny_vit(depth=12, img=112), name, keep_rate=0.7, schedule=schedule, **options)
        for block in range(12):
            needs = model.reducer.needs(block)
            asked |= {field for field in ("probs", "keys", "values", "cls_probs") if getattr(needs, field)}
    declared = {"attention_probs": "probs", "cls_attention": "cls_probs", "keys": "keys", "values": "values"}
    assert asked == {declared[n] for n in get_method(name).needs if n != "cls_token"}
    assert get_method(name).cls.requires_class_token == ("cls_token" in get_method(name).needs)


def test_every_method_draws_in_its_own_colour_at_its_own_place():
    infos = methods()
    assert len({m.colour for m in infos}) == len(infos)
    assert len({m.order for m in infos}) == len(infos)
    assert all(set(m.needs) <= set(NEEDS) for m in infos)
    assert [row["method"] for row in method_table()] == method_names()


def test_a_taken_name_or_an_unknown_need_is_refused():
    with pytest.raises(ValueError, match="taken"):
        register_method("topk", kind="training-free", operation="pruning", keep_rule="", paper="",
                        reference="", order=99, colour="k")(type("Other", (TopK,), {}))  # fmt: skip
    with pytest.raises(ValueError, match="unknown needs"):
        register_method("other", kind="training-free", operation="pruning", needs=("cls",), keep_rule="",
                        paper="", reference="", order=99, colour="k")  # fmt: skip


def test_the_missing_cls_token_error_names_the_registered_methods_that_need_none():
    with pytest.raises(ReductionError) as err:
        TopK(blocks=[1], rates=[0.5]).bind(backbone_info(tiny_vit(prefix=0)))
    named = str(err.value).rsplit("(", 1)[1].rstrip(")").split(", ")
    assert named == [m.name for m in methods() if "cls_token" not in m.needs]


@pytest.mark.parametrize("sweep", sorted(SWEEP_EXCEPTIONS))
def test_an_all_methods_sweep_lists_every_method_but_its_documented_exceptions(sweep):
    listed = str(OmegaConf.load(CONF.parent / "sweeps" / f"{sweep}.yaml").hydra.sweeper.params.method).split(
        ","
    )
    assert sorted(listed) == sorted(set(YAMLS) - set(SWEEP_EXCEPTIONS[sweep]))


def test_the_bench_report_and_budget_take_their_methods_from_the_registry():
    from tnt_lightning.measure import bench
    from tnt_lightning.report import budget, plots, tables

    names = method_names()
    assert bench.parse(["--methods", ",".join(names)]).methods.split(",") == names
    assert sorted(reversed(names), key=tables.method_order) == names
    assert tables.method_order(BASELINE) < tables.method_order(names[0])
    assert budget.available_methods() == names
    colours = [plots._color(name) for name in [BASELINE, *names]]
    assert len(set(colours)) == len(colours)  # no two methods share a colour
    assert plots._color("tnt_mlp") == plots._color("tnt")
    assert plots._color("someone_elses") not in colours


def test_the_readme_method_table_is_the_registrys():
    """README's table between its markers is `python -m tnt_lightning.methods`'s output."""
    from tnt_lightning.engine.registry import markdown_table

    readme = (ROOT / "README.md").read_text()
    shown = readme.split("<!-- methods:start -->\n", 1)[1].split("\n<!-- methods:end -->", 1)[0]
    assert shown == markdown_table(), "regenerate it: python -m tnt_lightning.methods"
