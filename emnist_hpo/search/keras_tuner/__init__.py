"""The Keras Tuner engine over the same search space and trial path (:mod:`.engine`)."""

from __future__ import annotations

import importlib
from typing import Any

#: name -> module: imported on first use, so that importing this package loads nothing heavy
_EXPORTS = {
    'KtStudyResult': 'emnist_hpo.search.keras_tuner.engine',
    'run_kt_study': 'emnist_hpo.search.keras_tuner.engine',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
