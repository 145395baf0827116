"""`make test` runs two xdist workers with ``--dist loadgroup``: the tests that share an expensive
session fixture (the default run's real pretraining) are grouped onto one worker, so it happens once.
xdist groups by a suffix it adds to the node ID; when that stops working (pytest 9.2 with xdist 3.8)
nothing fails, the fixture just runs once per worker."""

from __future__ import annotations

import pytest


@pytest.mark.xdist_group("default_run")
def test_a_grouped_test_carries_its_group_under_loadgroup(request):
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run by xdist with --dist loadgroup")
    assert request.node.nodeid.endswith("@default_run"), request.node.nodeid
