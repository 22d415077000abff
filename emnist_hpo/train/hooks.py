"""Lifecycle hooks around a trial: the seam between the objective and tracking."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from emnist_hpo import runtime

runtime.configure()  # before Keras loads: its backend, TensorFlow's kernels and quiet start-up

import keras

from emnist_hpo.config import ExperimentConfig
from emnist_hpo.reporting.evaluation import Evaluation
from emnist_hpo.train.trainer import TrainResult


@dataclass
class TrialOutcome:
    state: str  # "COMPLETE" | "PRUNED" | "FAIL"
    config: ExperimentConfig | None  # None when sampling itself failed
    result: TrainResult | None = None  # None when training never finished
    evaluation: Evaluation | None = None  # validation evaluation of a COMPLETE trial
    reason: str | None = None  # why a trial was pruned or failed
    error: BaseException | None = None  # the exception a FAIL came from (the engine raises it in its own terms)


class TrialHooks:
    """Lifecycle hooks around one trial (override what you need).

    ``trial`` is an Optuna trial, or anything with its ``number``, ``params``, ``user_attrs`` and
    ``set_user_attr`` (Keras Tuner's trials are adapted to that).
    """

    def on_trial_begin(self, trial: Any, config: ExperimentConfig) -> Sequence[keras.callbacks.Callback]:
        """Called before training; returns extra Keras callbacks for this trial."""
        return ()

    def on_trial_end(self, trial: Any, outcome: TrialOutcome) -> None:
        """Called once the trial's outcome is known (before the engine records it)."""


