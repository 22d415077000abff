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
from emnist_hpo.config import ConvBlock, ExperimentConfig, ModelConfig, TrainConfig
from emnist_hpo.model.cost import model_cost
from emnist_hpo.search.selection import Candidate, Finalist, choose, reevaluate, standard_error


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


def test_fewer_parameters_bought_with_more_flops_do_not_displace_the_best():
    # letters seed 1: compact re-evaluated 0.39 pt above a sampled trial with 5% fewer parameters but 68% more
    # FLOPs, inside one standard error; the rule crowned the sampled trial, 1.4 pt under compact on test
    compact = Finalist(0, 0.9430, 186_938, [0.9424], flops=34.9e6)
    costlier = Finalist(1, 0.9400, 177_914, [0.9390], flops=58.8e6)
    smaller = Finalist(2, 0.9390, 120_022, [0.9390], flops=31.1e6)
    assert choose([compact, costlier], False, 0.005, images=3609).trial == 0
    assert choose([compact, costlier, smaller], False, 0.005, images=3609).trial == 2  # smaller on both: crowned
    assert choose([compact, costlier], True, 0.005).trial == 1  # two objectives: their own size measure decides
    study = _study([(0.9424, 186_938, {"flops": 34_900_000}), (0.9390, 177_914, {"flops": 58_800_000})])
    assert pick_champion(study, 0.005, images=3609)[0].number == 0  # the trials' own scores: the same rule
    study = _study([(0.9424, 186_938, {"flops": 34_900_000}), (0.9390, 177_914, {"flops": 30_000_000})])
    assert pick_champion(study, 0.005, images=3609)[0].number == 1


def test_re_evaluated_finalists_carry_their_flops_so_the_rule_can_compare_them(prepared_sample):
    """Real training on a fold of the digits sample: each finalist's FLOPs are its model's, and a narrower model
    within one standard error and smaller on both measures is the one crowned."""
    data = prepared_sample("digits", 600)

    def cfg(filters: int) -> ExperimentConfig:
        model = ModelConfig(conv_blocks=[ConvBlock(filters, 3)], dense=[16])
        return ExperimentConfig(model=model, train=TrainConfig(epochs=1, batch_size=64)).validate()

    wide, narrow = cfg(16), cfg(4)
    out = reevaluate([Candidate(0, 0.9, 0, wide), Candidate(1, 0.9, 0, narrow)], data, 1, seed=0, log=lambda m: None)
    assert [f.flops for f in out] == [model_cost(c.model, 10).flops for c in (wide, narrow)]
    assert [f.params for f in out] == [model_cost(c.model, 10).params for c in (wide, narrow)]
    assert out[0].flops > out[1].flops and all(len(f.scores) == 1 for f in out)
    assert choose(out, False, 0.005, images=10**9).trial == max(out, key=lambda f: (f.mean, -f.params)).trial
    assert choose(out, False, 0.005, images=1).trial == 1  # a margin of 50 pt: the smaller on both measures


def test_a_re_evaluation_told_to_stop_returns_the_finalists_done_and_says_why(prepared_sample):
    """The time budget's check before each finalist ends the re-evaluation there (real training on digits)."""
    data = prepared_sample("digits", 600)
    cfg = ExperimentConfig(model=ModelConfig(conv_blocks=[ConvBlock(4, 3)], dense=[16]),
                           train=TrainConfig(epochs=1, batch_size=64)).validate()
    asked, said = [], []

    def check(trial: int) -> str | None:
        asked.append(trial)
        return "time budget: 10 s left" if trial == 1 else None

    out = reevaluate([Candidate(0, 0.9, 0, cfg), Candidate(1, 0.9, 0, cfg), Candidate(2, 0.9, 0, cfg)], data, 1,
                     seed=0, log=said.append, check=check)
    assert [f.trial for f in out] == [0] and len(out[0].scores) == 1
    assert asked == [0, 1]  # not asked again once stopped
    assert any("time budget: 10 s left: the re-evaluation stops after 1 of 3" in m for m in said)


def test_the_cli_prefers_the_smaller_model_unless_told_not_to(tmp_path):
    stores = ["--storage", f"sqlite:///{tmp_path}/optuna.db", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]

    def options(*extra: str):
        return _study_options(build_parser().parse_args(["study", "--split", "letters", *stores, *extra])).options

    assert options().prefer_smaller is True
    assert options("--no-prefer-smaller").prefer_smaller is False
