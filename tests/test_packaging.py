"""The package declares what it imports, and the lock file pins every declared dependency.

`make install` (and so CI) installs through ``[project] dependencies``: an import missing from
that list would work in a developer's venv and break a fresh `pip install`; this test catches it
in any venv. The built wheel carries every module, config and Hydra plugin of the clone (installing
and running it outside the clone is `make test-wheel`).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
LOCAL = {"tnt_lightning", "hydra_plugins"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared(extra: str | None = None) -> set[str]:
    """The declared dependencies, with those of the optional ``extra`` when one is named."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {}).get(extra, []) if extra else []
    return {_name(r) for r in [*project["dependencies"], *extras]}


def imported_modules(folder: Path | None = None, skip: Path | None = None) -> set[str]:
    """What the package's modules (those under ``folder``, none under ``skip``) import from outside it."""
    modules = set()
    paths = [*(folder or ROOT / "src").rglob("*.py")] + ([] if folder else [ROOT / "run.py"])
    for path in paths:
        if skip is not None and skip in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - LOCAL


KIT = ROOT / "src" / "tnt_lightning" / "testing"


@pytest.mark.parametrize(
    "folder,skip,extra",
    [(None, KIT, None), (KIT, None, "testing")],
    ids=["package", "conformance-kit"],
)
def test_every_imported_package_is_a_declared_dependency(folder, skip, extra):
    """The package's imports are dependencies; the conformance kit may also import its extra's
    (``pip install tnt-lightning[testing]``: pytest, for a user's own test file)."""
    distributions = packages_distributions()
    missing = {}
    for module in sorted(imported_modules(folder, skip)):
        names = {_name(d) for d in distributions.get(module, [module])}
        if not names & declared(extra):
            missing[module] = sorted(names)
    assert not missing, f"imported but not in pyproject [project] dependencies (or [{extra}]): {missing}"


def test_lock_pins_every_declared_dependency_exactly():
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[_name(name)] = version
    unpinned = sorted(d for d in declared() if not pins.get(d))
    assert not unpinned, f"requirements.txt pins no version of {unpinned} (run `make lock`)"


# What the wheel is built from: the files of a clone that pyproject.toml reads (as `make test-wheel`).
SOURCES = ("pyproject.toml", "README.md", "conf", "sweeps", "src")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel `pip install` would build, from a copy of the sources (a few seconds)."""
    tmp = tmp_path_factory.mktemp("wheel")
    (tmp / "src").mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp / "src" / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(source, tmp / "src" / name)
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp / "dist")]
    subprocess.run([*build, str(tmp / "src")], check=True, capture_output=True)
    (path,) = (tmp / "dist").glob("*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_carries_every_config_and_module_and_the_hydra_plugins(wheel):
    names = set(wheel.namelist())
    configs = {f"tnt_lightning/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in _files(ROOT / "conf")}
    assert {"tnt_lightning/conf/config.yaml", "tnt_lightning/conf/sweep/mnist_all.yaml"} <= configs
    assert not configs - names, f"configs missing from the wheel: {sorted(configs - names)}"
    modules = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src").rglob("*.py")}
    modules = {m for m in modules if ".egg-info" not in m}
    assert "hydra_plugins/tnt_lightning_slurm/__init__.py" in modules
    missing = sorted(modules - names)
    assert not missing, (
        f"modules missing from the wheel: {missing}: add their package to [tool.setuptools] packages "
        "in pyproject.toml"
    )
    # hydra_plugins is a namespace shared with hydra-submitit-launcher: an __init__ would hide it
    assert "hydra_plugins/__init__.py" not in names
    assert any(n.startswith("tnt_lightning/paper/") and n.endswith(".csv") for n in names)


def test_the_wheel_installs_the_tnt_lightning_command(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "tnt-lightning = tnt_lightning.run:cli" in wheel.read(entry_points).decode()


def test_the_configs_are_read_from_the_clone_in_an_editable_install():
    from tnt_lightning.config import config_dir, source_root

    assert source_root() == ROOT
    assert config_dir() == ROOT / "conf"


def _files(folder: Path) -> list[Path]:
    """The files under ``folder``, following symlinked folders (conf/sweep is sweeps/)."""
    walk = os.walk(folder, followlinks=True)
    return [Path(d) / f for d, _, files in walk for f in files if "__pycache__" not in d]
