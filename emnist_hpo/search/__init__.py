"""The search: its space (:mod:`.space`), one trial for either engine (:mod:`.trial`), the time budget (:mod:`.budget`), finalists (:mod:`.selection`), the champion (:mod:`.finalize`); the engines in :mod:`.optuna` and :mod:`.keras_tuner`."""

from __future__ import annotations

import importlib
from typing import Any

#: name -> module: imported on first use, so that importing this package loads nothing heavy
_EXPORTS = {
    'Champion': 'emnist_hpo.search.finalize',
    'Finalist': 'emnist_hpo.search.selection',
    'Limits': 'emnist_hpo.search.trial',
    'SearchSpace': 'emnist_hpo.search.space',
    'Throughput': 'emnist_hpo.search.budget',
    'TimeBudget': 'emnist_hpo.search.budget',
    'choose': 'emnist_hpo.search.selection',
    'finalize_champion': 'emnist_hpo.search.finalize',
    'reevaluate': 'emnist_hpo.search.selection',
    'run_trial': 'emnist_hpo.search.trial',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
