"""A configuration the study already trained is not trained again: it takes its twin's outcome."""

from __future__ import annotations

import optuna
import pytest

from emnist_hpo.config import ExperimentConfig, TrainConfig
from emnist_hpo.search.budget import costs_of
from emnist_hpo.search.optuna.objective import Objective
from emnist_hpo.search.optuna.repeats import KEY_ATTR, REPEAT_ATTR, config_key
from emnist_hpo.search.optuna.study import pick_champion
from emnist_hpo.search.selection import finalists_of
from emnist_hpo.search.space import SearchSpace
from emnist_hpo.search.trial import Limits
from emnist_hpo.train.fidelity import single
from emnist_hpo.train.hooks import TrialHooks

SPACE = {"conv_blocks": 1, "filters": {"choices": [8, 16]}, "kernel": 3, "dense_layers": 0, "dense_units": 32,
         "learning_rate": 3.0e-3, "batch_size": 64}


class Outcomes(TrialHooks):
    """Records how every trial ended, as MLflow's hooks are told."""

    def __init__(self):
        self.ended: dict[int, tuple[str, str | None]] = {}

    def on_trial_end(self, trial, outcome):
        self.ended[trial.number] = (outcome.state, outcome.reason)


@pytest.fixture(scope="module")
def digits(prepared_sample):
    return prepared_sample("digits", 600)


def _study(digits, space: dict, params: list[dict], limits: Limits | None = None):
    hooks = Outcomes()
    objective = Objective(SearchSpace.from_dict(space), ExperimentConfig(train=TrainConfig(epochs=1)), digits,
                          ladder=single(1), hooks=[hooks], limits=limits)
    study = optuna.create_study(direction="maximize")
    for p in params:
        study.enqueue_trial(p)
    study.optimize(objective, n_trials=len(params), catch=())
    return study, hooks


def test_the_fingerprint_ignores_seed_and_name_but_not_a_hyperparameter():
    a = ExperimentConfig(name="a", train=TrainConfig(seed=1))
    b = ExperimentConfig(name="b", train=TrainConfig(seed=2))
    c = ExperimentConfig(name="a", train=TrainConfig(seed=1, learning_rate=a.train.learning_rate * 2))
    assert config_key(a) == config_key(b)
    assert config_key(a) != config_key(c)


def test_a_repeat_of_a_complete_trial_takes_its_value_without_training(digits):
    study, hooks = _study(digits, SPACE, [{"filters_0": 8}, {"filters_0": 16}, {"filters_0": 8}])
    first, other, again = study.trials
    assert first.state == again.state == optuna.trial.TrialState.COMPLETE
    assert again.value == first.value and again.user_attrs[REPEAT_ATTR] == 0
    assert "train_seconds" in first.user_attrs and "train_seconds" not in again.user_attrs  # never trained
    assert REPEAT_ATTR not in other.user_attrs and other.user_attrs[KEY_ATTR] != first.user_attrs[KEY_ATTR]
    state, reason = hooks.ended[2]
    assert state == "COMPLETE" and "same configuration as trial 0" in reason  # its MLflow run says why
    # the twin, not the repeat, is the one a champion or finalist can be
    assert 2 not in [t.number for t in finalists_of(study, 3)]
    champion, _ = pick_champion(study, 0.0)
    assert champion.number in (0, 1)
    # nor does its near-zero time tell the budget what a trial costs
    assert len(costs_of(study)) == 2 and min(c.seconds for c in costs_of(study)) > 0.5


def test_a_repeat_of_a_pruned_trial_is_pruned_and_names_it(digits):
    study, hooks = _study(digits, SPACE, [{"filters_0": 16}, {"filters_0": 16}], limits=Limits(max_params=2000))
    first, again = study.trials
    assert first.state == again.state == optuna.trial.TrialState.PRUNED
    assert again.user_attrs[REPEAT_ATTR] == 0
    assert "parameters > --max-params" in first.user_attrs["fail_reason"]
    assert "same configuration as trial 0 (pruned)" in again.user_attrs["fail_reason"]
    assert hooks.ended[1][0] == "PRUNED"


def test_a_space_with_nothing_free_trains_every_trial(digits):
    """No free parameter: every trial is the same configuration on purpose (a seed repeat), so each trains."""
    fixed = {**SPACE, "filters": {"choices": [8]}}
    study, _ = _study(digits, fixed, [{}, {}])
    assert all("train_seconds" in t.user_attrs and REPEAT_ATTR not in t.user_attrs for t in study.trials)
