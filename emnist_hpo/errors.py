"""The project's exceptions.

Every error a user can cause is an :class:`EmnistHpoError`: the CLI prints its
message on one line and exits with code 2, having written nothing new.
Messages state the rule and the bad value, as Optuna's do:
``"epochs must be >= 1 (epochs=0)"``.
"""

from __future__ import annotations


class EmnistHpoError(Exception):
    """Base class of the errors a user can cause and fix (exit code 2)."""

    exit_code = 2


class ConfigError(EmnistHpoError, ValueError):
    """A bad option, experiment YAML or search-space YAML."""


class DataError(EmnistHpoError):
    """EMNIST files that are missing, truncated, malformed or inconsistent."""


class StorageError(EmnistHpoError):
    """An Optuna storage or MLflow tracking store that cannot be used."""


class RegistryError(EmnistHpoError):
    """A missing or unusable registered model."""
