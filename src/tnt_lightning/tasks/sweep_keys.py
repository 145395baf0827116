"""A sweep's key override on a config group it also sweeps: ``-m method=topk,random method.single_block=6``.

Hydra composes a sweep's first config with the swept group at its default option (``method=none``),
and sets the key there: an override every swept method takes fails with "Key 'single_block' is not
in struct" before any job. :func:`check_sweep_overrides`, run before Hydra, looks at each swept
option of the group:

* every one has the key: the override is passed on as ``++group.key=value`` (set where it is, so
  every job gets it, as the researcher asked);
* some lack it: the sweep stops before any job runs, naming the key, the options lacking it, those
  having it, and how to go on. Applying it to some methods only would compare methods that differ
  in more than the method.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError


class SweepOverrideError(UserError):
    """A key override that some of the swept options of its config group lack."""


def _options(override, group_dir: Path) -> list[str]:
    """The options a group override sweeps (``a,b``, ``choice(a,b)``, ``glob(*)``)."""
    from hydra.core.override_parser.types import Glob

    value = override.value()
    if isinstance(value, Glob):
        return value.filter(sorted(p.stem for p in group_dir.glob("*.yaml")))
    return [str(v) for v in override.sweep_string_iterator()]


def _lacking(conf_dir: Path, group: str, options: list[str], key: str) -> list[str]:
    """The options of ``group`` whose composed config has no ``key``."""
    from omegaconf import OmegaConf

    from ..config import compose_config

    absent = object()
    return [
        option
        for option in options
        if OmegaConf.select(compose_config([f"{group}={option}"], conf_dir), key, default=absent) is absent
    ]


def check_sweep_overrides(argv: list[str], conf_dir: Path) -> list[str]:
    """``argv`` for Hydra, with each key override on a swept group made to reach every job, or
    :class:`SweepOverrideError` when some swept options lack the key (module docstring)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    try:
        args, _ = get_args_parser().parse_known_args(argv)
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except (HydraException, SystemExit):
        return argv  # Hydra itself says what is wrong
    if not args.multirun:
        return argv
    swept = {
        o.key_or_group: _options(o, conf_dir / o.key_or_group)
        for o in overrides
        if o.is_sweep_override() and (conf_dir / o.key_or_group).is_dir()
    }
    out = list(argv)
    for o in overrides:
        group = o.key_or_group.split(".", 1)[0]
        if group not in swept or "." not in o.key_or_group or o.type is not OverrideType.CHANGE:
            continue
        lacking = _lacking(conf_dir, group, swept[group], o.key_or_group)
        if not lacking:
            if o.input_line in out:
                out[out.index(o.input_line)] = "++" + o.input_line
            continue
        having = ",".join(x for x in swept[group] if x not in lacking) or "(none of them)"
        raise SweepOverrideError(
            f"{o.input_line}: {o.key_or_group} is a key of {group}={having} but not of "
            f"{group}={','.join(lacking)}, and a sweep's override applies to all its jobs: nothing was "
            f"run. Sweep {group}={','.join(lacking)} on its own, without {o.input_line}, or write "
            f"++{o.input_line} to add the key there too" + _hint(o.key_or_group)
        )
    return out


def _hint(key: str) -> str:
    if key in ("method.single_block", "method.multi_blocks"):
        return " (schedule.blocks=[...] sets every method's location, in this backbone's blocks)"
    return ""
