"""Scores closer than their noise do not rank models; of two such, the one no larger on every measure is preferred.

The one-standard-error rule (Breiman et al., glmnet's ``lambda.1se``) in its two parts, shared by the rules that
apply it: the crowning of the champion (:mod:`~emnist_hpo.search.selection`,
:func:`~emnist_hpo.search.optuna.study.pick_champion`), the final fit's price
(:class:`~emnist_hpo.search.budget.TimeBudget`) and the choice of the last rung's closing runs
(:func:`~emnist_hpo.search.optuna.promotions.closers`). No Keras, no Optuna: the light modules import it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence


def standard_error(accuracy: float, n: int) -> float:
    """One standard error of an accuracy measured on ``n`` images, ``sqrt(p (1 - p) / n)``; 0 without images."""
    if n < 1 or not math.isfinite(accuracy):
        return 0.0
    p = min(max(accuracy, 0.0), 1.0)
    return math.sqrt(p * (1.0 - p) / n)


def no_larger(size: Sequence[float], than: Sequence[float]) -> bool:
    """Whether a model of ``size`` (parameters, FLOPs) is no larger than one of ``than`` on every measure."""
    return all(a <= b for a, b in zip(size, than))


def size_of(attrs: Mapping[str, Any]) -> tuple[float, float]:
    """A trial's size from its attributes (priced before training): parameters, then FLOPs; unknown: infinite."""
    def num(key: str) -> float:
        v = attrs.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("inf")
    return num("params"), num("flops")
