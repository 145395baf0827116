"""Out-of-tree methods' configs on Hydra's search path: ``method=<name>`` composes from their package.

Each module declared by an entry point or ``TNT_LIGHTNING_METHODS`` (src/tnt_lightning/plugins.py)
may keep a ``conf/`` folder beside it; this plugin appends those folders to the search path of
every composition (``run.py``, ``-m`` sweeps, the bench, the budget tool, the tests), so that a user
declares their package once instead of passing ``hydra.searchpath`` on every command. Appended,
not prepended: a built-in config keeps its name.
"""

from __future__ import annotations

import sys

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

PROVIDER = "tnt-lightning-methods"


class MethodConfigSearchPath(SearchPathPlugin):
    """Adds the declared method packages' ``conf/`` folders to the config search path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        """Append each declared module's ``conf/`` folder.

        Args:
            search_path: the search path Hydra is composing with.
        """
        if "tnt_lightning" not in sys.modules:  # another Hydra app in this environment
            return
        from tnt_lightning.plugins import config_dirs

        for folder in config_dirs():
            search_path.append(provider=PROVIDER, path=f"file://{folder}")
