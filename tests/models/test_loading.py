"""Loading weight files: nothing in a file ever runs, every bad file gets one clear error naming its
key and path, given files are checked before any pretraining, and cache files carry checksums."""

from __future__ import annotations

import argparse
import hashlib
import logging
import re

import pytest
import torch
from hydra.utils import instantiate

from helpers import compose_config
from tnt_lightning.engine import backbone_info
from tnt_lightning.methods import TNT, build_reducer
from tnt_lightning.models import (
    BackboneSpec,
    CheckpointError,
    create_model,
    ensure_pretrained,
    load_weight_file,
    load_weights,
    pretrained_path,
    save_artefact,
)
from tnt_lightning.models.artefact_io import checksum_path
from tnt_lightning.models.trained import Trained, TrainedParametersError, ensure_trained, load_trained
from tnt_lightning.tasks import train as train_module
from tnt_lightning.tasks.evaluate import build_pruned_model
from tnt_lightning.tasks.records import RunRecorder
from tnt_lightning.tasks.train import check_can_provide

TINY = dict(
    name="tiny",
    arch=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2),
    num_classes=5,
    input_size=(3, 32, 32),
)
PRETRAIN = dict(epochs=1, seed=0)


def _spec(**kw) -> BackboneSpec:
    return BackboneSpec(**{**TINY, **kw})


def _no_pretrain(model, spec, workdir=None):
    raise AssertionError("must not pretrain")


class RunsCode:
    """A pickle payload: unpickling it writes ``marker`` (what an attacker's file would do)."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _tnt(model) -> TNT:
    return TNT(backbone_info(model), "single", [0], [0.5], noise_blocks=2)


def _official_tnt_state(model, dim: int) -> dict[str, torch.Tensor]:
    state = dict(model.state_dict())
    for b in range(2):
        state[f"alpha_heads.{b}.weight"] = torch.full((1, dim), float(b + 1))
        state[f"alpha_heads.{b}.bias"] = torch.zeros(1)
    return state


# -- no code from a file runs ------------------------------------------------------------------


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy_format"])
def test_a_pickle_payload_in_model_checkpoint_never_runs_and_names_the_opt_in(zipped, tmp_path):
    marker, path = tmp_path / "marker", tmp_path / "shared.pth"
    payload = {"model": create_model(_spec()).state_dict(), "hook": RunsCode(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=zipped)
    spec = _spec(checkpoint=str(path))
    with pytest.raises(CheckpointError) as err:
        load_weights(create_model(spec), spec, tmp_path, True, _no_pretrain)
    assert not marker.exists()
    message = str(err.value)
    assert f"model.checkpoint={path} pickles Python objects" in message and "exec" in message
    assert "model.trust_pickle=true" in message and ".safetensors" in message
    trusted = _spec(checkpoint=str(path), trust_pickle=True)
    load_weights(create_model(trusted), trusted, tmp_path, True, _no_pretrain)
    assert marker.exists()  # the opt-in works for either format


def test_a_pickle_payload_in_method_checkpoint_never_runs_and_names_the_opt_in(tmp_path):
    marker, path = tmp_path / "marker", tmp_path / "tnt.pth"
    model = create_model(_spec())
    torch.save({"model": _official_tnt_state(model, 32), "args": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match=rf"method.checkpoint={path}.*method.trust_pickle=true"):
        load_trained(_tnt(model), path)
    assert not marker.exists()


def test_the_opt_in_fully_unpickles_that_one_trusted_file(tmp_path):
    marker, path = tmp_path / "marker", tmp_path / "trusted.pth"
    state = create_model(_spec()).state_dict()
    torch.save({"model": state, "hook": RunsCode(marker)}, path)
    spec = _spec(checkpoint=str(path), trust_pickle=True)
    model = create_model(spec)
    load_weights(model, spec, tmp_path, True, _no_pretrain)
    assert marker.read_text() == "ran"  # proof that the opt-in really unpickles (this test's own file)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    tnt_path = tmp_path / "tnt.pth"
    torch.save({"model": _official_tnt_state(model, 32), "args": RunsCode(tmp_path / "m2")}, tnt_path)
    tnt = _tnt(model)
    load_trained(tnt, tnt_path, trust_pickle=True)
    assert torch.equal(tnt.alpha_heads[1].weight, torch.full((1, 32), 2.0))


def test_an_official_training_checkpoint_with_its_argparse_namespace_needs_no_opt_in(tmp_path):
    """The Namespace is allowed (it holds plain values); a payload inside it is still refused."""
    model = create_model(_spec())
    path = tmp_path / "official.pth"
    args = argparse.Namespace(lr=5e-4, model="deit_small", pruning_loc=[3, 6, 9])
    torch.save({"model": _official_tnt_state(model, 32), "epoch": 29, "args": args}, path)
    tnt = _tnt(model)
    assert load_trained(tnt, path)["source"] == f"official:{path}"
    assert torch.equal(tnt.alpha_heads[0].weight, torch.ones(1, 32))
    marker = tmp_path / "marker"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(hook=RunsCode(marker))}, path)
    with pytest.raises(CheckpointError, match="builtins.exec"):
        load_trained(_tnt(model), path)
    assert not marker.exists()


def test_cache_files_offer_no_opt_in(tmp_path):
    marker, path = tmp_path / "marker", tmp_path / "cached.pth"
    torch.save({"model": {}, "hook": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="never writes such a file"):
        load_weight_file(path, f"cached backbone {path}", trust_key=None, trust_pickle=True)
    assert not marker.exists()


# -- every bad file: one clear error naming the key, the path and what was expected ------------


def _write_bad(kind: str, tmp_path):
    path = tmp_path / ("w.safetensors" if kind == "garbage_safetensors" else "w.pth")
    good = tmp_path / "good.pth"
    torch.save(create_model(_spec()).state_dict(), good)
    if kind == "text":
        path.write_text("these are not the weights you are looking for\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated_zip":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "list":
        torch.save([torch.ones(2)], path)
    elif kind == "dict_of_strings":
        torch.save({"model": {"blocks.0.weight": "not a tensor"}}, path)
    elif kind == "empty_dict":
        torch.save({}, path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "garbage_safetensors":
        path.write_text("garbage")
    elif kind == "missing":
        pass
    return path


BAD_FILES = {
    "text": "is neither a torch.save zip archive nor a pickle",
    "empty": "is empty",
    "truncated_zip": "is a zip archive that torch cannot read: truncated or damaged",
    "list": "holds a list, not a state dict",
    "dict_of_strings": r"values are \['str'\], not only tensors",
    "empty_dict": "holds an empty dict, not a state dict",
    "directory": "is not a file",
    "garbage_safetensors": "is not a readable .safetensors file",
    "missing": "no such file",
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_a_bad_model_checkpoint_gets_one_clear_error(kind, tmp_path):
    path = _write_bad(kind, tmp_path)
    spec = _spec(checkpoint=str(path))
    with pytest.raises(CheckpointError) as err:
        load_weights(create_model(spec), spec, tmp_path, True, _no_pretrain)
    message = str(err.value)
    assert message.startswith(f"model.checkpoint={path}")
    assert re.search(BAD_FILES[kind], message), message
    assert "expected a PyTorch checkpoint" in message
    # torch's own error, which advises weights_only=False, is not chained into what the user reads
    assert err.value.__cause__ is None and (err.value.__context__ is None or err.value.__suppress_context__)


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_a_bad_method_checkpoint_gets_one_clear_error(kind, tmp_path):
    path = _write_bad(kind, tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_trained(_tnt(create_model(_spec())), path)
    message = str(err.value)
    assert message.startswith(f"method.checkpoint={path}")
    assert re.search(BAD_FILES[kind], message), message


# -- given files are checked before any pretraining -------------------------------------------


def _bad_method_file(kind: str, tmp_path):
    path = tmp_path / f"{kind}.pth"
    if kind == "missing":
        return path, "no such file"
    if kind == "text":
        path.write_text("hello")
        return path, "neither a torch.save zip archive"
    if kind == "payload":
        torch.save({"args": RunsCode(tmp_path / "marker")}, path)
        return path, "method.trust_pickle=true"
    if kind == "wrong_method":
        torch.save({"method": "dynamicvit", "model": "vit_mnist", "identity": {}, "state_dict": {}}, path)
        return path, "method=dynamicvit, not tnt"
    state = {}
    for b in range(5):  # heads for D=32; vit_mnist has D=64
        state[f"alpha_heads.{b}.weight"], state[f"alpha_heads.{b}.bias"] = torch.ones(1, 32), torch.zeros(1)
    torch.save({"model": state}, path)
    return path, r"alpha_heads.0.weight has shape \(1, 32\).*\(1, 64\)"


@pytest.mark.parametrize("kind", ["missing", "text", "payload", "wrong_method", "wrong_shapes"])
def test_an_unusable_method_checkpoint_fails_before_the_backbone_is_pretrained(kind, tmp_path):
    path, expected = _bad_method_file(kind, tmp_path)
    # If the check came late, this would pretrain (one batch, so that even a broken build fails fast).
    cfg = compose_config(
        [
            "method=tnt",
            f"method.checkpoint={path}",
            "model.pretrain.epochs=1",
            "+trainer.limit_train_batches=1",
            "+trainer.limit_val_batches=1",
        ],
        tmp_path,
    )
    spec = instantiate(cfg.model)
    with pytest.raises((CheckpointError, TrainedParametersError), match=expected) as err:
        build_pruned_model(cfg, spec, True, [], RunRecorder(cfg))
    assert str(path) in str(err.value)
    assert not (tmp_path / "cache" / "backbones").exists()
    assert not (tmp_path / "marker").exists()


def test_task_train_checks_model_checkpoint_before_any_training_work(tmp_path):
    bad = tmp_path / "backbone.pth"
    bad.write_text("not weights")
    cfg = compose_config(["task=train", "method=tnt", f"model.checkpoint={bad}"], tmp_path)
    with pytest.raises(CheckpointError, match=rf"model.checkpoint={bad} is neither"):
        train_module.train(cfg)
    assert not (tmp_path / "cache").exists()


# -- cache files carry checksums ---------------------------------------------------------------


def test_cache_files_are_written_with_a_sha256sum_checksum(tmp_path):
    path = tmp_path / "a.pth"
    save_artefact({"model": {"w": torch.arange(4.0)}}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert checksum_path(path).read_text() == f"{digest}  a.pth\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth", "a.pth.sha256"]  # no temporary file


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
        return
    data[len(data) // 2] ^= 0x01  # a flipped bit in the tensor data: torch itself cannot tell
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)


class CountingPretrain:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model, spec, workdir):
        self.calls += 1
        return {"val_acc1": 0.0}


@pytest.mark.parametrize("how", ["truncated", "bitflip"])
def test_a_damaged_cached_backbone_is_reported_and_rebuilt(how, tmp_path, caplog):
    spec, pretrain = _spec(weights="pretrain", pretrain=PRETRAIN), CountingPretrain()
    path = ensure_pretrained(spec, tmp_path, pretrain)
    assert pretrain.calls == 1 and checksum_path(path).is_file()
    _damage(path, how)
    with caplog.at_level(logging.WARNING):
        assert ensure_pretrained(spec, tmp_path, pretrain) == path
    assert pretrain.calls == 2
    assert any(str(path) in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    load_weights(create_model(spec), spec, tmp_path, True, pretrain)  # the rebuilt file verifies
    assert pretrain.calls == 2


def test_an_old_cached_backbone_without_checksum_is_checked_then_kept(tmp_path):
    spec, pretrain = _spec(weights="pretrain", pretrain=PRETRAIN), CountingPretrain()
    path = pretrained_path(spec, tmp_path)
    path.parent.mkdir(parents=True)
    torch.save({"model": create_model(spec).state_dict(), "metrics": {}}, path)  # as older versions did
    assert ensure_pretrained(spec, tmp_path, pretrain) == path
    assert pretrain.calls == 0 and checksum_path(path).is_file()
    checksum_path(path).unlink()
    _damage(path, "truncated")
    ensure_pretrained(spec, tmp_path, pretrain)
    assert pretrain.calls == 1


def test_a_damaged_user_file_with_a_checksum_beside_it_is_refused(tmp_path):
    path = tmp_path / "backbone.pth"
    save_artefact({"model": create_model(_spec()).state_dict()}, path)
    _damage(path, "bitflip")
    spec = _spec(checkpoint=str(path))
    with pytest.raises(CheckpointError, match=rf"model.checkpoint={path} is damaged.*sha256"):
        load_weights(create_model(spec), spec, tmp_path, True, _no_pretrain)


@pytest.fixture
def tnt_setup(tmp_path):
    """A tnt config on vit_mnist whose training is replaced by a counter (no data, no Lightning)."""
    cfg = compose_config(["method=tnt"], tmp_path)
    spec = instantiate(cfg.model)
    model = create_model(spec)
    reducer, _ = build_reducer(cfg.method, cfg.schedule, cfg.keep_rate, spec.pruning, backbone_info(model))
    reducer.bind(backbone_info(model))
    fits = []

    def fake_train(workdir):
        fits.append(workdir)
        state = {n: p.detach() for n, p in reducer.trainable_parameters()}
        return Trained(state, None, {"val_acc1": 1.0, "val_acc1_full": 2.0})

    return cfg, spec, reducer, fits, fake_train


@pytest.mark.parametrize("how", ["truncated", "bitflip"])
def test_damaged_trained_parameters_are_reported_and_retrained(how, tnt_setup, caplog):
    cfg, spec, reducer, fits, train = tnt_setup
    path, trained = ensure_trained(cfg, spec, reducer, train)
    assert trained and len(fits) == 1 and checksum_path(path).is_file()
    _damage(path, how)
    cfg.method.train.auto = False
    with pytest.raises(TrainedParametersError, match="which is damaged.*method.train.auto=false"):
        check_can_provide(cfg, spec, reducer)
    with pytest.raises(TrainedParametersError, match="which is damaged"):
        ensure_trained(cfg, spec, reducer)
    assert path.exists() and len(fits) == 1  # refused, not retrained, and left for inspection
    with caplog.at_level(logging.WARNING):
        assert ensure_trained(cfg, spec, reducer, train) == (path, True)
    assert len(fits) == 2
    assert any(str(path) in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    info = load_trained(reducer, path, spec, source=f"cached trained parameters {path}")
    assert info["source"] == str(path)
