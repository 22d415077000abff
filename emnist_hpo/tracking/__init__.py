"""MLflow: the store and runs (:mod:`.tracker`), the model registry (:mod:`.registry`) and the registered model's own code (:mod:`.pyfunc_model`)."""

from __future__ import annotations

import importlib
from typing import Any

#: name -> module: imported on first use, so that importing this package loads nothing heavy
_EXPORTS = {
    'MlflowMetricsCallback': 'emnist_hpo.tracking.tracker',
    'MlflowTrialHooks': 'emnist_hpo.tracking.tracker',
    'Registered': 'emnist_hpo.tracking.registry',
    'Tracker': 'emnist_hpo.tracking.tracker',
    'load_champion': 'emnist_hpo.tracking.registry',
    'log_and_register': 'emnist_hpo.tracking.registry',
    'make_client': 'emnist_hpo.tracking.tracker',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
