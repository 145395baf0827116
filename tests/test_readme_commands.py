"""Every command the README and the documentation site show runs as written, in a cost-only form.

Each ``python run.py ...`` line of README.md and of the pages under docs/ (their bash blocks, with
their shell variables, and the commands quoted in their prose) is expanded into the jobs Hydra
would launch (``-m`` sweeps and ``+sweep=`` files included) and each job goes as far as it can
without weights or data: the config
composes, passes the range checks and the ``+key`` check, and the method is built on the model the
job names (keep counts, locations, rates checked against its depth and tokens). Every ``make``
target the README names exists. Running the commands for real is what the demo, the own-dataset
and the default-run tests do.
"""

from __future__ import annotations

import itertools
import re
import shlex
from functools import cache

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate

from helpers import CONF, ROOT, compose_config
from tnt_lightning.config import check_added_keys, validate
from tnt_lightning.engine import backbone_info
from tnt_lightning.methods import build_reducer
from tnt_lightning.models import create_model

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# Methods of the out-of-tree example (examples/), declared by an environment variable in the docs.
EXAMPLE_METHODS = {p.stem for p in ROOT.glob("examples/*/*/conf/method/*.yaml")}
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.")


def readme_commands(program: str) -> list[tuple[str, list[str]]]:
    """(``file:line``, argv after ``program``) of every command of the README and the docs that
    starts with it."""
    commands = []
    for document in DOCUMENTS:
        variables, in_bash = {}, False
        name = document.relative_to(ROOT)
        # a shell line continued with a trailing backslash is one command
        text = re.sub(r"\\\n\s*", " ", document.read_text())
        for number, line in enumerate(text.splitlines(), 1):
            if line.startswith("```"):
                in_bash, variables = line.strip() == "```bash", {}
                continue
            if in_bash:
                line = line.split(" #", 1)[0].strip()
                if assignment := re.fullmatch(r'(\w+)="([^"]*)"', line):
                    variables[assignment[1]] = assignment[2]
                    continue
                candidates = [re.sub(r"\$(\w+)", lambda m, known=variables: known.get(m[1], m[0]), line)]
            else:
                candidates = re.findall(r"`([^`]+)`", line)
            for text in candidates:
                if (text.startswith(program + " ") or text == program) and not PLACEHOLDER.search(text):
                    commands.append((f"{name}:{number}", shlex.split(text)[len(program.split()) :]))
    return commands


def sweep_params(overrides: list[str]) -> dict[str, str]:
    """The ``hydra.sweeper.params`` a ``+sweep=`` file adds (the command line's values win)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    return {str(k): str(v) for k, v in (cfg.hydra.sweeper.params or {}).items()}


def jobs(argv: list[str]) -> list[list[str]]:
    """The override lists of the jobs ``python run.py argv`` launches."""
    overrides = [a for a in argv if a != "-m"]
    if "-m" not in argv:
        return [overrides]
    parser = OverridesParser.create()
    fixed = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    overrides += [f"{k}={v}" for k, v in sweep_params(fixed).items() if k not in given]
    axes = []
    for override in parser.parse_overrides(overrides):
        text = override.input_line
        if override.is_sweep_override():
            prefix = text.split("=", 1)[0]
            axes.append([f"{prefix}={v}" for v in override.sweep_string_iterator()])
        else:
            axes.append([text])
    return [list(job) for job in itertools.product(*axes)]


@cache
def backbone(model_cfg_yaml: str):
    """The model a job names, built once per distinct model config (random weights: counts only)."""
    from omegaconf import OmegaConf

    spec = instantiate(OmegaConf.create(model_cfg_yaml))
    return spec, backbone_info(create_model(spec))


RUN_COMMANDS = readme_commands("python run.py")


def test_the_readme_shows_the_commands_this_test_checks():
    shown = {" ".join(argv) for _, argv in RUN_COMMANDS}
    # the quick start, a sweep, a learned method, the token-map example, the own-dataset steps
    assert "" in shown and "method=topk keep_rate=0.5" in shown
    assert any(a.startswith("-m +sweep=mnist_all") for a in shown)
    assert any(a.startswith("task=visualize") for a in shown)
    assert any("model=vit_scratch" in a and "task=pretrain" in a for a in shown)
    assert len(RUN_COMMANDS) >= 15


@pytest.mark.parametrize(("line", "argv"), RUN_COMMANDS, ids=[where for where, _ in RUN_COMMANDS])
def test_readme_command_composes_validates_and_builds_its_method(line, argv, tmp_path):
    from omegaconf import OmegaConf

    if "--help" in argv:
        pytest.skip("--help is run by tasks/test_task_output.py")
    if any(
        EXAMPLE_METHODS.intersection(re.findall(r"^method=([\w,]+)", a)[0].split(","))
        for a in argv
        if a.startswith("method=")
    ):
        pytest.skip("the out-of-tree example's method: tests/test_out_of_tree.py runs it for real")
    for overrides in jobs(argv):
        cfg = compose_config(overrides, tmp_path)
        validate(cfg)
        check_added_keys(overrides, cfg, str(CONF))
        if cfg.task == "pretrain":
            continue
        spec, info = backbone(OmegaConf.to_yaml(cfg.model, resolve=True))
        reducer, _ = build_reducer(cfg.method, cfg.schedule, cfg.keep_rate, spec.pruning, info)
        if reducer is not None:
            reducer.bind(info)


def test_every_make_target_the_readme_names_exists():
    targets = set(re.findall(r"^([a-zA-Z_-]+):", (ROOT / "Makefile").read_text(), re.M))
    named = {argv[0] for _, argv in readme_commands("make") if argv}
    assert named and named <= targets, named - targets
