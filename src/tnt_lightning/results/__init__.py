"""Where every run's record lives (:mod:`.store`) and which runs are the same experiment (:mod:`.keys`)."""

from .keys import CONFIG_KEY_VERSION, comparable_config, config_key
from .store import (
    RESULTS_FILE,
    Admission,
    Claim,
    ResultsStore,
    StoreError,
    append_record,
    read_records,
    results_path,
)

__all__ = [
    "CONFIG_KEY_VERSION",
    "RESULTS_FILE",
    "Admission",
    "Claim",
    "ResultsStore",
    "StoreError",
    "append_record",
    "comparable_config",
    "config_key",
    "read_records",
    "results_path",
]
