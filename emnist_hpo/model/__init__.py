"""The CNN family: shape arithmetic (:mod:`.architecture`), cost before building (:mod:`.cost`), Keras builders (:mod:`.build`), one-line descriptions (:mod:`.describe`)."""

from __future__ import annotations

import importlib
from typing import Any

#: name -> module: imported on first use, so that importing this package loads nothing heavy
_EXPORTS = {
    'IMAGE_SIDE': 'emnist_hpo.model.architecture',
    'ModelCost': 'emnist_hpo.model.cost',
    'build_model': 'emnist_hpo.model.build',
    'check_fits': 'emnist_hpo.model.architecture',
    'count_params': 'emnist_hpo.model.build',
    'describe_model': 'emnist_hpo.model.describe',
    'feature_sides': 'emnist_hpo.model.architecture',
    'human': 'emnist_hpo.model.cost',
    'max_blocks': 'emnist_hpo.model.architecture',
    'model_cost': 'emnist_hpo.model.cost',
    'model_from_params': 'emnist_hpo.model.describe',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
