"""Out-of-tree methods: where they are declared, once, so that every command finds them.

A method defined in another package registers itself with ``@register_method`` when its module is
imported, and keeps its YAML in the ``conf/`` folder beside that module (``conf/method/<name>.yaml``).
Two declarations, each made once, name such modules:

- an installed package's entry point in the group :data:`ENTRY_POINT_GROUP`
  (``[project.entry-points."tnt_lightning.methods"] l2norm = "my_method"`` in its pyproject.toml);
- the environment variable :data:`ENV_VAR` for a package that is not installed: entries separated
  by ``os.pathsep``, each a package folder or a ``.py`` file (its parent folder is put on
  ``sys.path``) or an importable module name.

The registry imports these modules the first time it is asked for the methods; the Hydra plugin
``hydra_plugins.tnt_lightning_methods`` adds their ``conf/`` folders to the config search path, so
``method=<name>`` composes in a run, a sweep, the bench and the budget tool alike. This module
imports nothing heavy: Hydra asks it while composing a config, before torch is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

ENTRY_POINT_GROUP = "tnt_lightning.methods"
ENV_VAR = "TNT_LIGHTNING_METHODS"
# The folder beside a plugin module that holds its configs (``method/<name>.yaml``).
CONF = "conf"


class MethodPluginError(ImportError):
    """An out-of-tree method module named by :data:`ENV_VAR` or an entry point cannot be found or
    imported; the message names the module and where it was declared."""


@dataclass(frozen=True)
class Plugin:
    """One declared method module."""

    module: str
    source: str  # where it was declared, for error messages


def _from_env_entry(entry: str) -> Plugin:
    """A module name as given, or the module a folder or ``.py`` path is, its parent put on sys.path."""
    source = f"{ENV_VAR} entry {entry!r}"
    if os.sep not in entry and "/" not in entry and not entry.endswith(".py"):
        return Plugin(entry, source)
    path = Path(entry).expanduser().resolve()
    if path.is_dir() and not (path / "__init__.py").is_file():
        raise MethodPluginError(
            f"{source}: {path} is a folder without __init__.py; give the package folder inside it "
            f"(the one that holds the method module and {CONF}/), or a .py file"
        )
    if not (path.is_dir() or (path.is_file() and path.suffix == ".py")):
        raise MethodPluginError(f"{source}: {path} is neither a package folder nor a .py file")
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    return Plugin(path.stem, source)


def declared_plugins() -> list[Plugin]:
    """The method modules declared by :data:`ENV_VAR` (first) and by installed entry points.

    A path in :data:`ENV_VAR` puts its parent folder on ``sys.path``, so that a config's
    ``_target_`` in that module imports in every process that asks (runs, sweep jobs, DDP ranks).

    Returns:
        One :class:`Plugin` per module, the first declaration of each.

    Raises:
        MethodPluginError: an entry of :data:`ENV_VAR` is a path that is not a package or a .py file.
    """
    found = [_from_env_entry(e) for e in os.environ.get(ENV_VAR, "").split(os.pathsep) if e.strip()]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = f" of {ep.dist.name}" if ep.dist is not None else ""
        found.append(Plugin(ep.module, f"entry point {ep.name!r}{dist} (group {ENTRY_POINT_GROUP})"))
    unique: dict[str, Plugin] = {}
    for plugin in found:
        unique.setdefault(plugin.module, plugin)
    return list(unique.values())


def _origin(plugin: Plugin) -> Path:
    """The file of ``plugin``'s module, found without running it."""
    try:
        spec = importlib.util.find_spec(plugin.module)
    except (ImportError, ValueError) as e:
        raise MethodPluginError(f"{plugin.source}: cannot find module {plugin.module!r}: {e}") from e
    if spec is None or spec.origin is None:
        raise MethodPluginError(
            f"{plugin.source}: no module {plugin.module!r} on sys.path (install its package, or give "
            f"{ENV_VAR} the path of its folder)"
        )
    return Path(spec.origin)


def config_dirs() -> list[Path]:
    """The ``conf/`` folder beside each declared module that has one: Hydra's extra search path.

    Returns:
        The existing folders, in declaration order.

    Raises:
        MethodPluginError: a declared module cannot be found.
    """
    dirs = [_origin(p).parent / CONF for p in declared_plugins()]
    return [d for d in dirs if d.is_dir()]


def import_plugins() -> list[str]:
    """Import every declared module, which registers its methods.

    Returns:
        The module names imported.

    Raises:
        MethodPluginError: naming the module and its declaration, chained to the import's error.
    """
    plugins = declared_plugins()
    for plugin in plugins:
        try:
            importlib.import_module(plugin.module)
        except Exception as e:
            raise MethodPluginError(
                f"{plugin.source}: importing method module {plugin.module!r} failed: {type(e).__name__}: {e}"
            ) from e
    return [p.module for p in plugins]
