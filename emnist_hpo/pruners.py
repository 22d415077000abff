"""Optuna pruners of a study, each with a guard against trials that learn nothing.

A broad search space samples many trials that never leave chance level (a learning rate far
too high or too low, plain SGD on a deep stack): in a 10-epoch study on the balanced sample
6 of the first 10 sampled trials sat at ~1/47 validation accuracy. Hyperband cannot prune the first
trials of a bracket (there is nothing to compare them with yet), and early stopping waits for
its patience, so such a trial ran 5-10 epochs. :class:`NoSkillGuard` ends it after
``after`` epochs when its validation accuracy is still below ``factor`` x the no-skill
accuracy (always answering the most frequent class). A trial that learns slowly but learns
(0.13, 0.10, 0.10, 0.14, ... 0.75 in the same study) is left to the pruner proper.

``--pruner none`` prunes nothing, not even at chance level.
"""

from __future__ import annotations

import numpy as np
import optuna

from .options import PRUNERS  # the names (validated with the other options)


class NoSkillGuard:
    """Mixin for an Optuna pruner: also prune a trial whose accuracy after ``after`` epochs is below
    ``factor`` x ``no_skill``; otherwise the pruner decides. ``no_skill`` 0 turns the guard off."""

    no_skill: float = 0.0  # accuracy of always answering the most frequent validation class
    after: int = 2  # epochs a trial gets before the guard looks (steps are 1-based epochs)
    factor: float = 2.0  # below factor x no_skill after that counts as having learnt nothing

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is not None and self.learnt_nothing(step, trial.intermediate_values[step]):
            return True
        return super().prune(study, trial)  # type: ignore[misc]

    def learnt_nothing(self, epoch: int, accuracy: float) -> bool:
        """True when ``accuracy`` after ``epoch`` (1-based) epochs is what the guard prunes."""
        return self.no_skill > 0 and epoch >= self.after and accuracy < self.factor * self.no_skill


# Subclasses, not wrappers: Optuna's TPE sampler recognises a HyperbandPruner by its class and
# then learns from the trials of the same bracket only, as Hyperband intends.
class GuardedHyperband(NoSkillGuard, optuna.pruners.HyperbandPruner):
    """Optuna's Hyperband, plus the no-skill guard."""


class GuardedMedian(NoSkillGuard, optuna.pruners.MedianPruner):
    """Optuna's median rule, plus the no-skill guard."""


class GuardedSuccessiveHalving(NoSkillGuard, optuna.pruners.SuccessiveHalvingPruner):
    """Optuna's asynchronous successive halving, plus the no-skill guard."""


def no_skill_accuracy(labels: np.ndarray) -> float:
    """Accuracy of always answering the most frequent class of ``labels`` (0.0 for no labels)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return 0.0
    return float(np.bincount(labels.astype(np.int64).ravel()).max() / labels.size)


def make_pruner(name: str, epochs: int, no_skill: float = 0.0) -> optuna.pruners.BasePruner:
    """The pruner ``name`` (one of :data:`PRUNERS`) for trials of up to ``epochs`` epochs.

    ``no_skill`` (see :func:`no_skill_accuracy`) arms the guard of every pruner but ``none``.
    """
    pruner: optuna.pruners.BasePruner
    if name == "hyperband":
        pruner = GuardedHyperband(min_resource=1, max_resource=max(epochs, 1), reduction_factor=3)
    elif name == "median":
        pruner = GuardedMedian(n_startup_trials=4, n_warmup_steps=1)
    elif name == "successive-halving":
        pruner = GuardedSuccessiveHalving(min_resource=1, reduction_factor=3)
    elif name == "none":
        return optuna.pruners.NopPruner()
    else:
        raise ValueError(f"pruner must be one of {', '.join(PRUNERS)} (pruner={name!r})")
    pruner.no_skill = float(no_skill)
    return pruner
