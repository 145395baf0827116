"""Every config composes; a bad value fails early, naming the key, the value and what is allowed."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from helpers import all_options, compose_config, run_py, tiny_vit
from tnt_lightning.config import validate
from tnt_lightning.engine import backbone_info
from tnt_lightning.errors import ConfigError
from tnt_lightning.methods import build_reducer
from tnt_lightning.models import BackboneSpec
from tnt_lightning.tasks.inputs import resolve_inputs

EXTRA = {
    "imagenet": ["data.root=/nonexistent"],
    "imagefolder": ["data.root=/nonexistent"],
    "tome": ["keep_rate=0.5"],
}


@pytest.mark.parametrize(
    "group,option",
    [
        (g, o)
        for g in ("model", "method", "schedule", "data", "trainer", "logger", "measure", "experiment")
        for o in all_options(g)
    ],
)
def test_every_config_file_composes_and_resolves(group, option, tmp_path):
    cfg = compose_config([f"{group}={option}", *EXTRA.get(option, [])], tmp_path)
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container[group if group != "experiment" else "model"] is not None
    validate(cfg)
    if group == "model":
        spec = instantiate(cfg.model)
        assert isinstance(spec, BackboneSpec) and spec.name == (
            spec.timm_name if option == "timm" else option
        )
    if group == "data":
        resolve_inputs(cfg)
        assert instantiate(cfg.data).name == option


@pytest.mark.parametrize("method", [m for m in all_options("method") if m != "none"])
@pytest.mark.parametrize("schedule", ["single", "multi"])
def test_every_method_config_builds_a_reducer(method, schedule, tmp_path):
    overrides = [f"method={method}", f"schedule={schedule}", "keep_rate=0.7"]
    if method == "tome" and schedule == "multi":
        overrides.append("method.r=2")
    cfg = compose_config(overrides, tmp_path)
    model = tiny_vit(prefix=2, depth=12, img=224, patch=16)
    reducer, record = build_reducer(
        cfg.method, cfg.schedule, cfg.keep_rate, instantiate(cfg.model).pruning, backbone_info(model)
    )
    reducer.bind(backbone_info(model))
    assert reducer.name == method and record["name"] == schedule


def test_hydra_launchers_compose(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from helpers import CONF

    for launcher in ("slurm", "local"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
        assert cfg.hydra.launcher._target_.startswith("hydra_plugins.")


@pytest.mark.parametrize(
    "override,key,allowed",
    [
        ("keep_rate=1.5", "keep_rate", "0 < keep_rate <= 1"),
        ("keep_rate=0", "keep_rate", "0 < keep_rate <= 1"),
        ("data.batch_size=-4", "data.batch_size", "integer >= 1"),
        ("measure.iters=0", "measure.iters", "integer >= 1"),
        ("measure.throughput_mode=fast", "measure.throughput_mode", "'paper', 'robust'"),
        ("seed=-1", "seed", "integer >= 0"),
    ],
)
def test_out_of_range_values_fail_validation_naming_the_key(override, key, allowed, tmp_path):
    cfg = compose_config([override], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert key in str(err.value) and allowed in str(err.value)


@pytest.mark.parametrize(
    "override,expected",
    [("task=fly", "fly"), ("keep_rate=half", "half"), ("seed=abc", "abc"), ("kep_rate=0.5", "kep_rate")],
)
def test_wrong_types_and_unknown_keys_fail_at_composition(override, expected, tmp_path):
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose_config([override], tmp_path)
    message = str(err.value) + str(err.value.__cause__)
    assert expected in message


def test_unknown_task_lists_the_allowed_ones(tmp_path):
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose_config(["task=fly"], tmp_path)
    message = str(err.value) + str(err.value.__cause__)
    for task in ("eval", "pretrain", "train"):
        assert task in message


def test_run_py_rejects_bad_value_before_building_anything(tmp_path):
    proc = run_py(["keep_rate=1.5", "data=synthetic"], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "keep_rate=1.5 is not allowed" in proc.stderr
    assert not (tmp_path / "cache").exists()


def test_help_and_cfg_job_show_the_composed_config(tmp_path):
    help_text = run_py(["--help"], tmp_path, timeout=60)
    assert help_text.returncode == 0
    for group in ("model:", "method:", "data:", "trainer:", "logger:", "experiment:"):
        assert group in help_text.stdout
    job = run_py(["--cfg", "job", "model=deit_small_distilled"], tmp_path, timeout=60)
    assert job.returncode == 0 and "timm_name: deit_small_distilled_patch16_224" in job.stdout
