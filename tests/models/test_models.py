"""Backbones and weights: checkpoint formats, clear errors offline, the train-once cache and its key."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from tnt_lightning.models import (
    BackboneSpec,
    CheckpointError,
    WeightsUnavailableError,
    create_model,
    load_weights,
    pretrained_path,
)
from tnt_lightning.models import backbones as backbones_module

TINY = dict(
    name="tiny",
    arch=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2),
    num_classes=5,
    input_size=(3, 32, 32),
)


def _spec(**kw) -> BackboneSpec:
    return BackboneSpec(**{**TINY, **kw})


def _no_pretrain(model, spec, workdir):
    raise AssertionError("must not train")


@pytest.mark.parametrize("fmt", ["deit_release", "timm_pth", "ddp_prefixed", "safetensors"])
def test_checkpoint_formats_load_unchanged(fmt, tmp_path):
    source = create_model(_spec())
    state = source.state_dict()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    if fmt == "deit_release":
        torch.save({"model": state, "epoch": 3}, path)
    elif fmt == "timm_pth":
        torch.save(state, path)
    elif fmt == "ddp_prefixed":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = create_model(_spec(checkpoint=str(path)))
    where, extra = load_weights(model, _spec(checkpoint=str(path)), tmp_path, True, _no_pretrain)
    assert where == f"checkpoint:{path}" and extra == {}
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_method_tensors_of_a_checkpoint_are_returned_not_loaded(tmp_path):
    state = create_model(_spec()).state_dict()
    state["alpha_heads.0.weight"] = torch.ones(1, 32)
    torch.save({"model": state}, tmp_path / "tnt.pth")
    spec = _spec(checkpoint=str(tmp_path / "tnt.pth"))
    _, extra = load_weights(create_model(spec), spec, tmp_path, True, _no_pretrain)
    assert list(extra) == ["alpha_heads.0.weight"]


def test_checkpoint_of_another_head_size_is_explained(tmp_path):
    torch.save(create_model(_spec(num_classes=7)).state_dict(), tmp_path / "w.pth")
    spec = _spec(checkpoint=str(tmp_path / "w.pth"))
    with pytest.raises(ValueError, match=r"head.weight has shape \(7, 32\).*\(5, 32\).*model.num_classes"):
        load_weights(create_model(spec), spec, tmp_path, True, _no_pretrain)


def test_checkpoint_of_another_architecture_is_explained(tmp_path):
    torch.save(
        create_model(_spec(arch=dict(patch_size=8, embed_dim=32, depth=1, num_heads=2))).state_dict(),
        tmp_path / "w.pth",
    )
    spec = _spec(checkpoint=str(tmp_path / "w.pth"))
    with pytest.raises(ValueError, match="tensors are missing.*blocks.1"):
        load_weights(create_model(spec), spec, tmp_path, True, _no_pretrain)


def test_missing_checkpoint_file_is_named(tmp_path):
    spec = _spec(checkpoint=str(tmp_path / "absent.pth"))
    with pytest.raises(CheckpointError, match="model.checkpoint=.*absent.pth: no such file"):
        load_weights(create_model(spec), spec, tmp_path, True, _no_pretrain)


def test_offline_hub_fails_fast_saying_how_to_provide_weights(monkeypatch, tmp_path):
    monkeypatch.setattr(backbones_module, "_reachable", lambda *a, **k: False)
    monkeypatch.setattr(backbones_module, "_hub_cached", lambda name: False)
    spec = BackboneSpec(
        name="deit_tiny_distilled",
        timm_name="deit_tiny_distilled_patch16_224",
        release_url="https://dl.fbaipublicfiles.com/deit/deit_tiny_distilled_patch16_224-b40b3cf7.pth",
    )
    with pytest.raises(WeightsUnavailableError) as err:
        load_weights(create_model(spec), spec, tmp_path, True, _no_pretrain)
    message = str(err.value)
    assert "model.checkpoint=" in message and "b40b3cf7.pth" in message and "data=synthetic" in message


def test_cost_only_runs_need_no_weights(tmp_path):
    spec = BackboneSpec(name="deit_tiny_distilled", timm_name="deit_tiny_distilled_patch16_224")
    where, _ = load_weights(create_model(spec), spec, tmp_path, False, _no_pretrain)
    assert where.startswith("random")


def test_a_model_without_public_weights_asks_for_a_checkpoint(tmp_path):
    spec = _spec(weights="checkpoint")
    with pytest.raises(WeightsUnavailableError, match="no public weights.*model.checkpoint=PATH"):
        load_weights(create_model(spec), spec, tmp_path, True, _no_pretrain)


def test_bad_spec_values_are_named():
    with pytest.raises(ValueError, match="model.weights='cloud'"):
        _spec(weights="cloud")
    with pytest.raises(ValueError, match="exactly one of model.timm_name or model.arch"):
        BackboneSpec(name="x")


def test_pretrain_cache_is_keyed_by_what_determines_the_weights(tmp_path):
    recipe = dict(epochs=2, optim=dict(lr=1e-3), seed=0, data=dict(split_seed=0))
    base = pretrained_path(_spec(weights="pretrain", pretrain=recipe), tmp_path)
    assert base == pretrained_path(_spec(weights="pretrain", pretrain=dict(recipe)), tmp_path)
    for changed in (
        _spec(weights="pretrain", pretrain={**recipe, "epochs": 3}),
        _spec(weights="pretrain", pretrain={**recipe, "data": dict(split_seed=1)}),
        _spec(weights="pretrain", pretrain=recipe, num_classes=6),
        _spec(
            weights="pretrain", pretrain=recipe, arch=dict(patch_size=8, embed_dim=32, depth=3, num_heads=2)
        ),
    ):
        assert pretrained_path(changed, tmp_path) != base


WORKER = textwrap.dedent(
    """
    import sys, time
    from tnt_lightning.models import BackboneSpec, ensure_pretrained
    arch = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)
    spec = BackboneSpec(name="tiny", arch=arch, num_classes=5, input_size=(3, 32, 32), weights="pretrain",
                        pretrain=dict(epochs=1, seed=0))
    def pretrain(model, spec, workdir):
        with open(sys.argv[2], "a") as f:
            f.write("trained\\n")
        time.sleep(3)
        return {"val_acc1": 0.0}
    print(ensure_pretrained(spec, sys.argv[1], pretrain))
    """
)


def test_concurrent_jobs_train_a_missing_backbone_once(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    log = tmp_path / "trainings.log"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "cache"), str(log)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outputs[0] == outputs[1] and outputs[0].endswith(".pth")
    assert log.read_text().count("trained") == 1
    state = torch.load(outputs[0], weights_only=True)
    assert "model" in state and "blocks.1.mlp.fc2.weight" in state["model"]


def test_pretraining_gives_the_same_weights_whatever_the_models_initial_draw(tmp_path):
    """The cached backbone must not depend on the RNG state before training (it did: 87.9 to 88.4%)."""
    from hydra.utils import instantiate

    from helpers import compose_config
    from tnt_lightning.tasks.common import pretrain_fn

    cfg = compose_config(["model.pretrain.epochs=1", "+trainer.limit_train_batches=3"], tmp_path)
    spec = instantiate(cfg.model)
    weights = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = create_model(spec)
        pretrain_fn(cfg)(model, spec)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_offline_hub_error_names_both_ways_to_run_without_weights(compose_cfg, monkeypatch):
    import pytest
    from hydra.utils import instantiate

    from tnt_lightning.models import backbones, create_model
    from tnt_lightning.models.backbones import WeightsUnavailableError, load_hub_weights

    monkeypatch.setattr(backbones, "_hub_cached", lambda name: False)
    monkeypatch.setattr(backbones, "_reachable", lambda *a: False)
    spec = instantiate(compose_cfg("model=deit_tiny_distilled").model)
    with pytest.raises(WeightsUnavailableError) as info:
        load_hub_weights(create_model(spec), spec)
    assert "data=synthetic" in str(info.value) and "model.weights=random" in str(info.value)


def _scratch_key(compose_cfg, *overrides: str) -> str:
    from hydra.utils import instantiate

    from tnt_lightning.models.provider import pretrain_key

    cfg = compose_cfg(
        "model=vit_scratch", "model.num_classes=3", "data=imagefolder", "data.root=/d", *overrides
    )
    return pretrain_key(instantiate(cfg.model))


def test_scratch_backbone_follows_the_data_and_its_key_only_what_sets_the_weights(compose_cfg):
    cfg = compose_cfg(
        "model=vit_scratch",
        "model.num_classes=3",
        "data=imagefolder",
        "data.root=/d",
        "data.image_size=48",
        "data.channels=1",
    )
    assert list(cfg.model.input_size) == [1, 48, 48] and cfg.model.pretrain.data.root == "/d"
    assert list(compose_cfg("model=vit_scratch", "model.num_classes=10").model.input_size) == [1, 28, 28]
    base = _scratch_key(compose_cfg)
    for harmless in ("data.num_workers=1", "data.eval_batch_size=7", "data.root=/e"):
        assert _scratch_key(compose_cfg, harmless) == base, harmless
    relevant_overrides = (
        "data.augment=light",
        "data.image_size=32",
        "data.batch_size=32",
        "data.on_bad_image=skip",
    )
    for relevant in relevant_overrides:
        assert _scratch_key(compose_cfg, relevant) != base, relevant


def test_vit_mnist_key_is_unchanged(compose_cfg):
    """The MNIST backbone's cache (and the README's numbers) survive the data-aware key."""
    from hydra.utils import instantiate

    from tnt_lightning.models.provider import pretrain_key

    assert pretrain_key(instantiate(compose_cfg().model)) == "9ff979e15012"
