"""Fixtures and hooks only; the shared helpers they use are in ``helpers.py``."""

from __future__ import annotations

import os

import pytest

from helpers import HAS_CUDA, SHORT_PRETRAIN, compose_config, run_py, tiny_vit
from tnt_lightning.plugins import ENV_VAR

# A developer's own declared methods (tnt_lightning.plugins) stay out of the suite: the registry it
# checks is the project's; tests of the plugin route declare theirs themselves.
os.environ.pop(ENV_VAR, None)


@pytest.fixture
def compose_cfg(tmp_path):
    return lambda *overrides: compose_config(list(overrides), tmp_path)


@pytest.fixture
def make_vit():
    return tiny_vit


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` tests are skipped on a machine without CUDA (`make gpu-check` runs them).

    The tests of the session's ``default_run`` share one xdist worker (``make test`` runs two):
    its real pretraining then happens once, while the other worker runs the rest. The group marker
    is set first: xdist's own hook reads it to schedule by group, and ignores one set after it."""
    skip = pytest.mark.skip(reason="gpu: needs a CUDA device")
    for item in items:
        if "default_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("default_run"))
        if not HAS_CUDA and item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """``python run.py`` as the README says, on a fresh root, with a short pretraining
    (``SHORT_PRETRAIN``): trains vit_mnist once, evaluates it.

    Other tests reuse its cache (``paths.cache_dir``, with ``SHORT_PRETRAIN``) so the backbone is
    trained once per session.
    """
    root = tmp_path_factory.mktemp("default_run")
    proc = run_py(SHORT_PRETRAIN, root, timeout=900)
    return root, proc


@pytest.fixture(autouse=True)
def _no_slurm_interruption_left_over():
    """What tnt_lightning.results.slurm noted about a signal is per process: no test sees another's."""
    from tnt_lightning.results import slurm

    slurm._interruption = None
    yield
    slurm._interruption = None
