"""Repeated configurations: a configuration the study already trained is not trained again.

TPE proposes the very same configuration twice in a row now and then (seen twice in one 30-minute
benchmark study: two of its five full-length trials). Retraining it only changes the seed, and a
budget of a few dozen trials cannot spare that. So a trial whose configuration (everything but the
seed and the run's name) matches an earlier finished trial's takes that trial's outcome instead
(Optuna's FAQ advice for duplicate suggestions): the value of a complete twin, or pruned like a pruned
twin. TPE models the configuration once, at its twin (``storage.one_per_configuration``): a repeat counted
again would make one model a larger share of its good set, and the next draw likelier to repeat it. It
records ``repeat_of`` and costs no training; champion selection skips it (its twin stands for it).

A space with no free parameter is left alone: every trial of it is the same configuration on purpose
(seed repeats).
"""

from __future__ import annotations

import hashlib
import json

import optuna

from emnist_hpo.config import ExperimentConfig

#: Trial user attribute: the fingerprint of the configuration a trial trains.
KEY_ATTR = "config_key"
#: Trial user attribute of a trial that took an earlier trial's outcome (its number).
REPEAT_ATTR = "repeat_of"

_TWIN_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def config_key(cfg: ExperimentConfig) -> str:
    """A fingerprint of what ``cfg`` trains: model, training and data settings, not its seed or name."""
    d = cfg.to_dict()
    d.pop("name", None)
    d.pop("description", None)
    d["train"].pop("seed", None)
    text = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def earlier_twin(trial: optuna.Trial, key: str) -> optuna.trial.FrozenTrial | None:
    """The first earlier finished (complete or pruned) trial of the study that trained the configuration ``key``."""
    for t in trial.study.get_trials(deepcopy=False, states=_TWIN_STATES):
        if t.number < trial.number and t.user_attrs.get(KEY_ATTR) == key:
            return t
    return None


def is_repeat(trial: optuna.trial.FrozenTrial) -> bool:
    return REPEAT_ATTR in trial.user_attrs
