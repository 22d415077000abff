"""The pruners of a study over the rungs of its fidelity ladder.

A trial reports its validation accuracy at the end of each rung as step
``eta**rung`` (:mod:`emnist_hpo.train.fidelity`); what decides whether it climbs on:

- ``successive-halving`` (default): asynchronous successive halving, decided in
  :class:`~emnist_hpo.search.trial.OptunaRungs` from the rung scores every trial
  records, so it also prunes two-objective studies (on accuracy), where Optuna's
  own pruners cannot run (``Trial.report`` is single-objective only).
- ``hyperband``: Optuna's HyperbandPruner over the same rungs (brackets that
  start judging at later rungs hedge against misleading early rungs).
- ``median``: Optuna's MedianPruner at every rung.
- ``none``: every trial climbs to the last rung.

Every pruner but ``none`` also ends a trial whose rung score is under twice the
no-skill accuracy (always answering the most frequent class): in a 10-epoch study
on the balanced sample 6 of the first 10 sampled trials sat at ~1/47, and
successive halving cannot prune the first trials of a rung, having nothing to
compare them with.
"""

from __future__ import annotations

import numpy as np
import optuna

from emnist_hpo.train.fidelity import Ladder
from emnist_hpo.options import PRUNERS  # the names (validated with the other options)


def no_skill_accuracy(labels: np.ndarray) -> float:
    """Accuracy of always answering the most frequent class of ``labels`` (0.0 for no labels)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return 0.0
    return float(np.bincount(labels.astype(np.int64).ravel()).max() / labels.size)


def make_pruner(name: str, ladder: Ladder) -> optuna.pruners.BasePruner:
    """The Optuna pruner that decides for ``name`` (one of :data:`PRUNERS`) on ``ladder``'s rungs.

    ``successive-halving`` and ``none`` decide outside Optuna's pruner (a NopPruner is set).
    """
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, ladder.final.step),
                                              reduction_factor=ladder.eta)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0)
    if name in ("successive-halving", "none"):
        return optuna.pruners.NopPruner()
    raise ValueError(f"pruner must be one of {', '.join(PRUNERS)} (pruner={name!r})")
