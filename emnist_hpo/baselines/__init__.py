"""The research's fixed systems: one experiment trained, tested and tracked (:mod:`.experiment`), and the classical scikit-learn baselines (:mod:`.classical`)."""

from __future__ import annotations

import importlib
from typing import Any

#: name -> module: imported on first use, so that importing this package loads nothing heavy
_EXPORTS = {
    'ExperimentResult': 'emnist_hpo.baselines.experiment',
    'is_classical': 'emnist_hpo.baselines.classical',
    'make_estimator': 'emnist_hpo.baselines.classical',
    'run_experiment': 'emnist_hpo.baselines.experiment',
    'train_classical': 'emnist_hpo.baselines.classical',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
