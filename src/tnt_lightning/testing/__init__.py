"""The conformance kit every method, built in or out of tree, must pass (``python -m tnt_lightning.testing``).

    from tnt_lightning.testing import check_method, CHECKS
    results = check_method("topk")  # {"keep-counts": CheckResult("pass"), ...}

In a method's own test file, one test per check::

    @pytest.mark.parametrize("method,check", conformance_cases(["mine"]))
    def test_conforms(method, check): assert_conforms(method, check)

The checks and the tiny backbone they run on: :mod:`.conformance`.
"""

from .conformance import (
    CHECKS,
    CheckFailed,
    CheckResult,
    assert_conforms,
    check_method,
    conformance_cases,
    markdown_table,
    run_check,
)

__all__ = [
    "CHECKS",
    "CheckFailed",
    "CheckResult",
    "assert_conforms",
    "check_method",
    "conformance_cases",
    "markdown_table",
    "run_check",
]
