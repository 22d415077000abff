"""What runs are turned into: evaluations (:mod:`.evaluation`), a champion's analysis (:mod:`.analysis`), Optuna's plots (:mod:`.study_plots`), the cross-split leaderboard (:mod:`.compare`) and the published figures it compares with (:mod:`.published`)."""

from __future__ import annotations

import importlib
from typing import Any

#: name -> module: imported on first use, so that importing this package loads nothing heavy
_EXPORTS = {
    'Evaluation': 'emnist_hpo.reporting.evaluation',
    'evaluate': 'emnist_hpo.reporting.evaluation',
    'run_compare': 'emnist_hpo.reporting.compare',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
