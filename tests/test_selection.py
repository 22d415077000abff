"""Scores closer than their noise do not rank models: the smallest model within one standard error of the best
is crowned (the project's aim is the best *and smallest* CNN); ``--no-prefer-smaller`` crowns the best score."""

from __future__ import annotations

import datetime as dt
import math

import optuna
import pytest

from emnist_hpo.cli import _study_options, build_parser
from emnist_hpo.search.optuna.repeats import REPEAT_ATTR
from emnist_hpo.search.optuna.study import pick_champion
from emnist_hpo.search.selection import Finalist, choose, standard_error


def _study(trials: list[tuple[float, int, dict]]) -> optuna.Study:
    """Complete trials of (validation accuracy, parameters, other user attributes)."""
    study = optuna.create_study(direction="maximize")
    t0 = dt.datetime(2026, 1, 1, 12, 0, 0)
    for n, (value, params, attrs) in enumerate(trials):
        study.add_trial(optuna.trial.FrozenTrial(
            number=n, state=optuna.trial.TrialState.COMPLETE, value=value, values=None, datetime_start=t0,
            datetime_complete=t0 + dt.timedelta(seconds=10), params={}, distributions={},
            user_attrs={"params": params, "flops": params * 100, **attrs}, system_attrs={},
            intermediate_values={}, trial_id=n))
    return study


def test_standard_error_is_the_binomial_one():
    assert standard_error(0.93, 3600) == pytest.approx(math.sqrt(0.93 * 0.07 / 3600))  # ~0.0043
    assert standard_error(0.93, 0) == 0.0 and standard_error(float("nan"), 100) == 0.0


def test_the_smallest_trial_within_one_standard_error_of_the_best_is_crowned():
    # 3,600 validation images at 93%: one standard error is 0.43 pt
    study = _study([(0.9300, 187_000, {}), (0.9270, 134_000, {}), (0.9240, 60_000, {}), (0.9285, 150_000, {})])
    champion, _ = pick_champion(study, 0.005, images=3600)
    assert champion.number == 1  # 0.30 pt behind at 72% of the parameters; trial 2 is 0.60 pt behind: out
    assert pick_champion(study, 0.005, images=0)[0].number == 0  # --no-prefer-smaller: the best score
    assert pick_champion(study, 0.005, images=10**9)[0].number == 0  # a margin of ~0: the best score


def test_equal_sizes_go_to_the_better_score_and_a_repeat_is_never_crowned():
    study = _study([(0.90, 50_000, {}), (0.92, 50_000, {}), (0.95, 10_000, {REPEAT_ATTR: 0})])
    assert pick_champion(study, 0.005, images=100)[0].number == 1


def test_finalists_are_chosen_by_the_same_rule_on_their_re_evaluated_means():
    big = Finalist(0, 0.93, 187_000, [0.931, 0.929])
    small = Finalist(1, 0.92, 134_000, [0.928, 0.926])
    assert choose([big, small], False, 0.005, images=2 * 3600).trial == 1  # 0.3 pt < one SE of a 7,200-image mean
    assert choose([big, small], False, 0.005, images=0).trial == 0  # no margin: the best mean
    assert choose([big, small], True, 0.001).trial == 0  # two objectives: their tolerance, as before


def test_the_cli_prefers_the_smaller_model_unless_told_not_to(tmp_path):
    stores = ["--storage", f"sqlite:///{tmp_path}/optuna.db", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]

    def options(*extra: str):
        return _study_options(build_parser().parse_args(["study", "--split", "letters", *stores, *extra])).options

    assert options().prefer_smaller is True
    assert options("--no-prefer-smaller").prefer_smaller is False
