"""The package declares what it imports, and the lock file pins every declared dependency.

`make install` (and so CI) installs through ``[project] dependencies``: an import missing from
that list would work in a developer's venv and break a fresh `pip install`; this test catches it
in any venv.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
LOCAL = {"tnt_lightning", "hydra_plugins"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {_name(r) for r in project["dependencies"]}


def imported_modules() -> set[str]:
    modules = set()
    for path in [*(ROOT / "src").rglob("*.py"), ROOT / "run.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - LOCAL


def test_every_imported_package_is_a_declared_dependency():
    distributions = packages_distributions()
    missing = {}
    for module in sorted(imported_modules()):
        names = {_name(d) for d in distributions.get(module, [module])}
        if not names & declared():
            missing[module] = sorted(names)
    assert not missing, f"imported but not in pyproject [project] dependencies: {missing}"


def test_lock_pins_every_declared_dependency_exactly():
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[_name(name)] = version
    unpinned = sorted(d for d in declared() if not pins.get(d))
    assert not unpinned, f"requirements.txt pins no version of {unpinned} (run `make lock`)"
