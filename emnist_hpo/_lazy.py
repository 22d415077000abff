"""Lazy re-exports for the subpackages: ``from emnist_hpo.train import train`` imports the trainer (and Keras)
only when the name is first asked for, so importing a light module never loads the heavy ones."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def exports(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """A module ``__getattr__`` serving ``names`` (name -> module) for ``package``, and its ``__all__``."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__, sorted(names)
