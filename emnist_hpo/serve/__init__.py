"""What users run on the results: the UIs (:mod:`.ui`), predictions on their own images (:mod:`.predict`), TFLite export (:mod:`.export`)."""

from __future__ import annotations

import importlib
from typing import Any

#: name -> module: imported on first use, so that importing this package loads nothing heavy
_EXPORTS = {
    'export_tflite': 'emnist_hpo.serve.export',
    'predict_images': 'emnist_hpo.serve.predict',
    'serve': 'emnist_hpo.serve.ui',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
