"""The errors a user can fix: the command line prints their message alone, in one line.

Every layer raises them (the engine included, which knows nothing of Hydra), so they live apart
from the config code.
"""


class UserError(Exception):
    """Something the user asked for cannot be done; run.py prints its message alone, in one line
    (``HYDRA_FULL_ERROR=1`` shows the traceback)."""


class ConfigError(UserError, ValueError):
    """A config value is out of its allowed range."""
