"""Asynchronous successive halving with paused trials: a trial climbs when it is in the best 1/eta of its rung,
not because it came early; a paused trial that gets there later is continued from its checkpoint."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import optuna
import pytest

from emnist_hpo.config import ExperimentConfig, TrainConfig
from emnist_hpo.search.noise import no_larger, size_of
from emnist_hpo.search.optuna.objective import Objective, config_of
from emnist_hpo.search.optuna.promotions import (
    CLOSING_ATTR,
    PAUSED_ATTR,
    PROMOTE_ATTR,
    closers,
    closing_queued,
    enqueue_closers,
    enqueue_promotions,
    enqueue_runner_up,
    promotions,
    rung_table,
    runner_up,
    top,
)
from emnist_hpo.search.space import SearchSpace
from emnist_hpo.search.trial import SEED_OF_ATTR
from emnist_hpo.train.fidelity import Ladder, Rung

PRUNED, COMPLETE = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE


def _add(study, state, rungs: list[tuple[int, float]], attrs: dict | None = None, value: float | None = None,
         trained_by: dict[int, int] | None = None) -> int:
    """A finished trial with rung records (``trained_by``: rung -> the trial that trained it, if not this one)."""
    t0 = dt.datetime(2026, 1, 1, 12, 0, 0)
    number = len(study.trials)
    records = [{"rung": r, "score": s, "trial": (trained_by or {}).get(r, number)} for r, s in rungs]
    study.add_trial(optuna.trial.FrozenTrial(
        number=number, state=state, value=value, values=None, datetime_start=t0,
        datetime_complete=t0 + dt.timedelta(seconds=10), params={"x": float(number)},
        distributions={"x": optuna.distributions.FloatDistribution(0, 100)},
        user_attrs={"rungs": records, **(attrs or {})}, system_attrs={},
        intermediate_values={r: s for r, s in rungs}, trial_id=number))
    return number


def _checkpoint(tmp_path: Path, *numbers: int) -> Path:
    for n in numbers:
        (tmp_path / f"running_{n}.npz").write_bytes(b"weights")
    return tmp_path


def test_none_of_a_rung_goes_on_before_it_has_eta_scores_then_its_best_third():
    assert top({0: 0.9}, 3) == set() and top({0: 0.9, 1: 0.5}, 3) == set()
    assert top({0: 0.5, 1: 0.9, 2: 0.7}, 3) == {1}
    assert top({n: s for n, s in enumerate([0.1, 0.6, 0.5, 0.9, 0.3, 0.8])}, 3) == {3, 5}


def test_into_the_last_rung_under_a_time_budget_only_the_best_of_the_rung_below_goes_on():
    scores = {n: s for n, s in enumerate([0.1, 0.6, 0.5, 0.9, 0.3, 0.8])}
    assert top(scores, 3, leader=True) == {3}  # not 5 as well: second of the rung below, its full run would not lead
    assert top({0: 0.9, 1: 0.5}, 3, leader=True) == set()  # still fewer than eta scores: nobody
    assert top({0: 0.5, 1: 0.9, 2: 0.7}, 3, leader=True) == {1}


def test_a_paused_trial_below_the_last_rung_is_continued_only_as_the_best_of_its_rung(tmp_path):
    """Under a time budget (``leader_rung``) the rung below the last lets its best alone go on; lower rungs and
    studies without a budget keep the best 1/eta."""
    study = optuna.create_study(direction="maximize")
    for score in (0.5, 0.8, 0.6, 0.3, 0.7, 0.2):  # six scores at rung 1: the best third is 0.8 and 0.7
        _add(study, PRUNED, [(0, 0.9), (1, score)], {PAUSED_ATTR: 1})
    ckpt = _checkpoint(tmp_path, *range(6))
    assert [t.number for t in promotions(study, 3, ckpt)] == [1, 4]  # no budget: the best third
    assert [t.number for t in promotions(study, 3, ckpt, leader_rung=1)] == [1]  # a budget: its best
    assert [t.number for t in promotions(study, 3, ckpt, leader_rung=2)] == [1, 4]  # another rung's rule


def test_a_rung_record_taken_over_by_a_continuation_counts_once():
    study = optuna.create_study(direction="maximize")
    _add(study, PRUNED, [(0, 0.7)], {PAUSED_ATTR: 0})
    n = _add(study, COMPLETE, [(0, 0.7), (1, 0.8)], {PROMOTE_ATTR: 0}, value=0.8, trained_by={0: 0})
    assert rung_table(study.trials) == {0: {0: 0.7}, 1: {n: 0.8}}


def test_a_paused_trial_is_continued_once_it_enters_the_best_third_of_its_rung(tmp_path):
    study = optuna.create_study(direction="maximize")
    for score in (0.5, 0.7):
        _add(study, PRUNED, [(0, score)], {PAUSED_ATTR: 0})
    ckpt = _checkpoint(tmp_path, 0, 1, 2)
    assert promotions(study, 3, ckpt) == []  # two scores at rung 0: nobody has earned rung 1 yet
    _add(study, PRUNED, [(0, 0.6)], {PAUSED_ATTR: 0})
    assert enqueue_promotions(study, 3, ckpt) == [1]  # 0.7 is the best third of three
    waiting = study.trials[-1]
    assert waiting.state == optuna.trial.TrialState.WAITING and waiting.system_attrs["fixed_params"] == {"x": 1.0}
    assert waiting.user_attrs[PROMOTE_ATTR] == 1 and waiting.user_attrs[SEED_OF_ATTR] == 1  # trial 1's seed
    assert enqueue_promotions(study, 3, ckpt) == []  # continued once


def test_a_paused_trial_without_its_checkpoint_is_not_continued(tmp_path):
    study = optuna.create_study(direction="maximize")
    for score in (0.5, 0.9, 0.6):
        _add(study, PRUNED, [(0, score)], {PAUSED_ATTR: 0})
    assert promotions(study, 3, _checkpoint(tmp_path, 0, 2)) == []


# --------------------------------------------------------------------------- real training, real checkpoints


@pytest.fixture(scope="module")
def digits(prepared_sample):
    return prepared_sample("digits", 900)


def test_paused_trials_are_continued_from_their_checkpoint_at_the_next_rung(digits, tmp_path):
    """Three trials pause at rung 0 (the first two: too few peers); the best of them is continued at rung 1
    from its checkpoint, with its seed and its rung-0 record, and completes without training rung 0 again."""
    space = SearchSpace.from_dict({"conv_blocks": 1, "filters": {"choices": [4, 8, 16]}, "kernel": 3,
                                   "dense_layers": 0, "dense_units": 32, "learning_rate": 3.0e-3,
                                   "batch_size": 64})
    ladder = Ladder((Rung(0.5, 2, 1), Rung(1.0, 1, 2, final=True)), 3, "data")
    objective = Objective(space, ExperimentConfig(train=TrainConfig(epochs=1)), digits, ladder=ladder,
                          checkpoint_dir=tmp_path)
    study = optuna.create_study(direction="maximize")
    for f in (16, 8, 4):  # the widest first: likely the best, paused for want of peers
        study.enqueue_trial({"filters_0": f})
    for _ in range(3):
        study.optimize(objective, n_trials=1, catch=())
    first = study.trials[:3]
    assert [t.user_attrs.get(PAUSED_ATTR) for t in first[:2]] == [0, 0]  # nobody goes on before 3 scores
    assert all((tmp_path / f"running_{t.number}.npz").is_file() for t in first if PAUSED_ATTR in t.user_attrs)
    best = max(first, key=lambda t: t.user_attrs["rungs"][0]["score"])
    if PAUSED_ATTR not in best.user_attrs:  # the third was the best: it went straight on
        assert best.number == 2 and best.state == COMPLETE
        return
    assert enqueue_promotions(study, 3, tmp_path) == [best.number]
    study.optimize(objective, n_trials=1, catch=())
    cont = study.trials[-1]
    assert cont.state == COMPLETE and cont.user_attrs[PROMOTE_ATTR] == best.number
    assert [(r["rung"], r["trial"]) for r in cont.user_attrs["rungs"]] == [(0, best.number), (1, cont.number)]
    assert cont.user_attrs["rungs"][0]["score"] == best.user_attrs["rungs"][0]["score"]
    assert cont.user_attrs["epochs_run"] == 3  # rung 0's two epochs (taken over) and rung 1's
    assert config_of(objective, cont).train.seed == config_of(objective, best).train.seed
    assert not (tmp_path / f"running_{best.number}.npz").exists()  # handed over, then removed on completion


@pytest.mark.slow
def test_a_study_of_fewer_trials_than_eta_still_crowns_the_best_paused_one(tmp_path, sample_dir):
    """--trials 2 on a two-rung ladder: both trials pause at rung 0 (two scores: nobody is in the best third),
    and when the search ends with no trial at the last rung the better one is continued and crowned.
    The continuation is not a configuration: the study has its 2."""
    from emnist_hpo.search.optuna.study import StudyOptions, run_study
    from emnist_hpo.search.optuna.storage import finished_count

    space = tmp_path / "space.yaml"  # models that learn in an epoch: what is under test is what follows the pauses
    space.write_text("conv_blocks: 1\nfilters: {choices: [8, 16]}\nkernel: 3\nbatch_norm: false\nglobal_pool: false\n"
                     "dense_layers: 0\ndense_units: 32\nlearning_rate: {low: 2.0e-3, high: 4.0e-3, log: true}\nbatch_size: 64\n"
                     "augment: 0.0\n")
    res = run_study(StudyOptions(
        split="digits", trials=2, epochs=3, fidelity="epochs", max_train_samples=3000, data_dir=str(sample_dir),
        storage=f"sqlite:///{tmp_path}/optuna.db", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", progress=False,
        checkpoint_dir=str(tmp_path / "ckpt"), finalists=0, warm_start=False, final_fit=False, register=False,
        search_space=str(space),
    ), log=lambda m: None)
    t0, t1, cont = res.study.trials
    # each pauses at rung 0 (or, one that learnt nothing in an epoch, is pruned by the no-skill guard)
    assert all(t.state == PRUNED for t in (t0, t1))
    paused = [t for t in (t0, t1) if t.user_attrs.get(PAUSED_ATTR) == 0]
    assert paused and all("paused at rung 0" in t.user_attrs["fail_reason"] for t in paused)
    better = max(paused, key=lambda t: t.user_attrs["rungs"][0]["score"])
    assert cont.user_attrs[PROMOTE_ATTR] == better.number and cont.state == COMPLETE
    assert res.champion_trial.number == cont.number
    assert finished_count(res.study) == 2
    assert list((tmp_path / "ckpt").rglob("running_*")) == []  # the search is over: no paused checkpoint is kept


def _timeout_study(tmp_path, sample_dir, trials: int, max_train_samples: int, **extra):
    """A real digits study under a 900 s --timeout (one process, two rungs: --fidelity epochs, --epochs 3) over
    one-block models; its result and its log."""
    from emnist_hpo.search.optuna.study import StudyOptions, run_study

    space = tmp_path / "space.yaml"
    space.write_text("conv_blocks: 1\nfilters: {choices: [2, 4, 8, 16]}\nkernel: 3\ndense_layers: 0\n"
                     "dense_units: 32\nlearning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}\nbatch_size: 64\n")
    lines: list[str] = []
    res = run_study(StudyOptions(
        split="digits", trials=trials, epochs=3, fidelity="epochs", max_train_samples=max_train_samples,
        data_dir=str(sample_dir), storage=f"sqlite:///{tmp_path}/optuna.db",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", progress=False, checkpoint_dir=str(tmp_path / "ckpt"),
        finalists=0, warm_start=False, final_fit=False, register=False, search_space=str(space), timeout=900,
        trial_plots=False, early_stopping_patience=0, **extra,
    ), log=lines.append)
    return res, lines


@pytest.mark.slow
def test_under_a_timeout_each_full_length_run_was_the_best_of_the_rung_below_when_it_went_on(tmp_path, sample_dir):
    """A real study with --timeout (one process: trials run in their numbers' order): whoever trained the last
    rung had, at the rung below, a score no trial numbered before the deciding one had beaten; the plan says so.
    But the closing run: where one leader ran the last rung alone, the best trial left waiting below it did too."""
    res, lines = _timeout_study(tmp_path, sample_dir, trials=9, max_train_samples=1500, last_rung="leaders")
    assert any("to the last rung only the best" in ln for ln in lines)
    # a new storage under a budget: the plan's speed is this machine's, measured by a probe, not a guess
    assert any("this machine" in ln and "probe before the first rung" in ln for ln in lines), lines
    assert res.study.user_attrs["speed_probe"]["rate"] > 0
    trials = res.study.trials
    table_before = lambda n: rung_table([t for t in trials if t.number < n])  # noqa: E731
    entrants = [(t.number, r) for t in trials for r in t.user_attrs.get("rungs", []) if r["rung"] == 1
                and r["trial"] == t.number]
    assert entrants and res.champion_trial is not None
    closing = [t for t in trials if CLOSING_ATTR in t.user_attrs]
    leaders = [d for d, _ in entrants if CLOSING_ATTR not in trials[d].user_attrs]
    for decider in leaders:
        below = next(r for r in trials[decider].user_attrs["rungs"] if r["rung"] == 0)
        earlier = table_before(decider).get(0, {})
        assert all(below["score"] >= s for n, s in earlier.items() if n != below["trial"]), (decider, earlier)
    continued = {t.user_attrs[PROMOTE_ATTR] for t in trials if PROMOTE_ATTR in t.user_attrs}
    scores = rung_table(trials).get(0, {})
    left_waiting = [t.number for t in trials if t.user_attrs.get(PAUSED_ATTR) == 0 and t.number not in continued]
    if len(leaders) == 1 and (left_waiting or closing):  # a leader ran the last rung alone
        assert len(closing) == 1 and closing[0].state == COMPLETE, [(t.number, t.state, t.user_attrs) for t in trials]
        assert any("the closing run" in ln for ln in lines)
        of = closing[0].user_attrs[CLOSING_ATTR]
        assert all(scores[of] >= scores[n] for n in left_waiting), (of, left_waiting, scores)


# --------------------------------------------------------------------------- the closing run


def test_the_closing_run_continues_the_best_waiting_trial_below_a_last_rung_that_holds_one_run(tmp_path):
    """Under a time budget (leader rung 1 of three) a leader that ran the last rung alone is not crowned
    unopposed: the best trial waiting at rung 1 with its checkpoint is the closing run's, once."""
    study = optuna.create_study(direction="maximize")
    for score in (0.80, 0.86, 0.84, 0.85):  # rung 1: trial 1 leads; 3 (0.85) has no checkpoint, 2 (0.84) waits
        _add(study, PRUNED, [(0, 0.7), (1, score)], {PAUSED_ATTR: 1})
    low = _add(study, PRUNED, [(0, 0.9)], {PAUSED_ATTR: 0})  # paused lower: not a candidate
    ckpt = _checkpoint(tmp_path, 0, 2, low)
    assert runner_up(study, ckpt, 1) is None  # nothing at the last rung yet: enqueue_closing's case
    _add(study, COMPLETE, [(0, 0.7), (1, 0.86), (2, 0.9)], {PROMOTE_ATTR: 1}, value=0.9,
                  trained_by={0: 1, 1: 1})
    assert runner_up(study, ckpt, None) is None  # no time budget: no leader rule, no closing run
    assert runner_up(study, ckpt, 1).number == 2
    assert enqueue_runner_up(study, ckpt, 1) == [2]
    queued = study.trials[-1]
    assert queued.state == optuna.trial.TrialState.WAITING
    assert queued.user_attrs[PROMOTE_ATTR] == 2 and queued.user_attrs[CLOSING_ATTR] == 2
    assert runner_up(study, ckpt, 1) is None and enqueue_runner_up(study, ckpt, 1) == []  # one per study


def test_no_closing_run_where_the_last_rung_holds_two_runs_or_a_second_is_on_its_way(tmp_path):
    study = optuna.create_study(direction="maximize")
    for score in (0.80, 0.86, 0.84):
        _add(study, PRUNED, [(0, 0.7), (1, score)], {PAUSED_ATTR: 1})
    ckpt = _checkpoint(tmp_path, 0, 1, 2)
    _add(study, COMPLETE, [(1, 0.86), (2, 0.9)], {PROMOTE_ATTR: 1}, value=0.9, trained_by={1: 1})
    assert runner_up(study, ckpt, 1).number == 2
    study.enqueue_trial({"x": 0.0}, user_attrs={PROMOTE_ATTR: 0})  # a continuation of a rung-1 trial, waiting
    assert runner_up(study, ckpt, 1) is None
    other = optuna.create_study(direction="maximize")
    for score in (0.80, 0.86, 0.84):
        _add(other, PRUNED, [(0, 0.7), (1, score)], {PAUSED_ATTR: 1})
    _add(other, COMPLETE, [(1, 0.86), (2, 0.9)], {PROMOTE_ATTR: 1}, value=0.9, trained_by={1: 1})
    _add(other, COMPLETE, [(1, 0.87), (2, 0.91)], value=0.91)  # a new leader ran the last rung too
    assert runner_up(other, ckpt, 1) is None


def test_when_the_search_stops_the_closing_run_is_queued_only_if_its_last_rung_fits_the_time_left(tmp_path):
    """The study's hook when the search stops: with the last rung's run of the best waiting trial priced at its
    own speed, it queues that run (and says so) while it fits before the final fit, and otherwise says there is
    no time for it and queues nothing (a run its rung check would stop at once). The search stops with a margin
    over that price kept."""
    import time
    from types import SimpleNamespace

    import numpy as np

    from emnist_hpo.search.budget import TimeBudget, rung_norm, rung_work
    from emnist_hpo.search.optuna.study import _promotions, closing_seconds, stop_search
    from emnist_hpo.train.fidelity import make_ladder

    n, nv = 14_435, 3_609
    ladder = make_ladder("data", 15, n, 26)
    images, vals = ladder.images(n), ladder.val_sizes(nv)
    study = optuna.create_study(direction="maximize")
    for score in (0.80, 0.86, 0.84):  # rung 1 of three: trial 1 led and was continued; 2 waits, then 0
        rungs = [{"rung": r, "score": s, "images": images[r], "work": rung_work(images[r], 5e6, vals[r]),
                  "norm": rung_norm(images[r], 1000), "seconds": 10.0 * (r + 1), "trial": len(study.trials)}
                 for r, s in ((0, 0.7), (1, score))]
        _add(study, PRUNED, [], {PAUSED_ATTR: 1, "flops": 5e6, "rungs": rungs})
    _add(study, COMPLETE, [(1, 0.86), (2, 0.9)], {PROMOTE_ATTR: 1}, value=0.9, trained_by={1: 1})
    ckpt = _checkpoint(tmp_path, 0, 2)

    def ctx(left: float):
        budget = TimeBudget.start(1800.0, finalists=0, folds=1, final_fit=False, val_fraction=0.2)
        budget.deadline = time.time() + left
        return SimpleNamespace(opts=SimpleNamespace(pruner="successive-halving", last_rung="leaders",
                                                    prefer_smaller=True), study=study,
                               checkpoint_dir=ckpt, first_trial=0,
                               ladder=ladder, budget=budget, multi=False,
                               data=SimpleNamespace(y_train=np.zeros(n), y_val=np.zeros(nv)))

    said: list[str] = []
    assert _promotions(ctx(5.0), said.append)["finish"]() == []  # its last rung takes far longer than 5 s
    assert len(said) == 1 and said[0].startswith("no time for the closing run")
    assert not any(CLOSING_ATTR in t.user_attrs for t in study.trials)
    need = closing_seconds(ctx(1500.0))
    assert 30 < need < 1500
    # with a typical trial (10 s) and a tenth more than its price left, the search has stopped (it keeps a margin
    # for the last trial's rungs running past their prices), and the closing run begins
    reason = stop_search(ctx(10 + 1.1 * need))
    assert reason and "the closing full-length run" in reason
    assert _promotions(ctx(10 + 1.1 * need), said.append)["finish"]() == [2]
    assert "trial 2, the best waiting at the rung below, continues to the end" in said[-1]
    assert study.trials[-1].user_attrs[CLOSING_ATTR] == 2


# --------------------------------------------------------------------------- --last-rung close


def test_with_last_rung_close_nobody_enters_the_last_rung_while_the_search_screens(tmp_path):
    """``--last-rung close``: the rung below the last lets nobody on, its best included (at the rung's end and as
    a promotion of a paused trial); the other rungs keep their best third."""
    assert top({0: 0.5, 1: 0.9, 2: 0.7}, 3, leader=True, close=True) == set()
    assert top({0: 0.5, 1: 0.9, 2: 0.7}, 3, close=True) == {1}  # not the leader rung: its best third
    study = optuna.create_study(direction="maximize")
    for score in (0.80, 0.86, 0.84):
        _add(study, PRUNED, [(0, 0.7), (1, score)], {PAUSED_ATTR: 1})
    ckpt = _checkpoint(tmp_path, 0, 1, 2)
    assert [t.number for t in promotions(study, 3, ckpt, leader_rung=1)] == [1]
    assert promotions(study, 3, ckpt, leader_rung=1, close=True) == []


def test_with_last_rung_close_the_closing_runs_are_the_best_two_waiting_below_the_last_rung(tmp_path):
    """When the search stops the last rung's runs are the best :data:`LAST_RUNG_RUNS` waiting at the rung below
    with their checkpoints, best first, queued once; one fewer where the last rung already holds a run."""
    study = optuna.create_study(direction="maximize")
    for score in (0.80, 0.86, 0.84, 0.85, 0.83):  # trial 3 (0.85) has no checkpoint
        _add(study, PRUNED, [(0, 0.7), (1, score)], {PAUSED_ATTR: 1})
    _add(study, PRUNED, [(0, 0.95)], {PAUSED_ATTR: 0})  # paused lower: not a candidate
    ckpt = _checkpoint(tmp_path, 0, 1, 2, 4, 5)
    assert closers(study, ckpt, 1) == []  # the leader rule: nothing at the last rung, enqueue_closing's case
    assert closers(study, ckpt, None, True) == []  # no time budget: no leader rung
    assert [t.number for t in closers(study, ckpt, 1, True)] == [1, 2]
    assert enqueue_closers(study, closers(study, ckpt, 1, True)) == [1, 2]
    queued = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert [(t.user_attrs[PROMOTE_ATTR], t.user_attrs[CLOSING_ATTR]) for t in queued] == [(1, 1), (2, 2)]
    assert closing_queued(study) == [q.number for q in queued]
    assert closers(study, ckpt, 1, True) == []  # once per study
    # a resumed study (its session's first trial after these): it screens and closes again
    for score in (0.88, 0.87):
        _add(study, PRUNED, [(0, 0.7), (1, score)], {PAUSED_ATTR: 1})
    since = len(study.trials) - 2
    _checkpoint(tmp_path, since, since + 1)
    assert [t.number for t in closers(study, ckpt, 1, True, since=since)] == [since, since + 1]
    one = optuna.create_study(direction="maximize")
    for score in (0.80, 0.86, 0.84):
        _add(one, PRUNED, [(0, 0.7), (1, score)], {PAUSED_ATTR: 1})
    _add(one, COMPLETE, [(1, 0.86), (2, 0.9)], {PROMOTE_ATTR: 1}, value=0.9, trained_by={1: 1})
    assert [t.number for t in closers(one, ckpt, 1, True)] == [2]  # the last rung holds one: one more


def test_the_second_closing_run_is_the_smallest_rival_within_one_standard_error_of_the_rungs_best(tmp_path):
    """With the rung's validation images the closing runs are its best and the smallest trial (parameters, then
    FLOPs) within one standard error of it and no larger on either measure: the champion is crowned among the last
    rung's runs by that rule, so a smaller model as good within the noise must have a run there. Without images
    (``--no-prefer-smaller``), or with no such rival, the next best by score."""
    study = optuna.create_study(direction="maximize")
    for score, params, flops in ((0.80, 30_000, 5e6),  # the smallest, far below
                                 (0.860, 150_000, 40e6),  # the best
                                 (0.858, 50_000, 60e6),  # tied, fewer parameters, more FLOPs: not smaller
                                 (0.855, 120_000, 30e6),  # tied and smaller
                                 (0.851, 90_000, 20e6),  # tied and smaller still
                                 (0.845, 60_000, 10e6)):  # more than one standard error below (0.011 on 1,000)
        _add(study, PRUNED, [(0, 0.7), (1, score)], {PAUSED_ATTR: 1, "params": params, "flops": flops})
    ckpt = _checkpoint(tmp_path, *range(6))
    assert [t.number for t in closers(study, ckpt, 1, True, images=1000)] == [1, 4]
    assert [t.number for t in closers(study, ckpt, 1, True)] == [1, 2]  # by score alone
    assert [t.number for t in closers(study, ckpt, 1, True, images=100_000)] == [1, 2]  # SE 0.001: nobody is tied
    equal = optuna.create_study(direction="maximize")
    for score in (0.86, 0.859, 0.858):  # tied but no smaller (the same size): the next best
        _add(equal, PRUNED, [(0, 0.7), (1, score)], {PAUSED_ATTR: 1, "params": 100, "flops": 1e6})
    assert [t.number for t in closers(equal, ckpt, 1, True, images=1000)] == [0, 1]


def _close_ctx(tmp_path, last_rung: str = "close"):
    """A study paused at rung 1 of three (trials 0-2, rung 1 scores 0.80, 0.86, 0.84), none complete, and a context
    for the study's hooks under a time budget with a final fit."""
    import time
    from types import SimpleNamespace

    import numpy as np

    from emnist_hpo.search.budget import TimeBudget, rung_norm, rung_work
    from emnist_hpo.train.fidelity import make_ladder

    n, nv = 14_435, 3_609
    ladder = make_ladder("data", 15, n, 26)
    images, vals = ladder.images(n), ladder.val_sizes(nv)
    study = optuna.create_study(direction="maximize")
    for score in (0.80, 0.86, 0.84):
        rungs = [{"rung": r, "score": s, "images": images[r], "work": rung_work(images[r], 5e6, vals[r]),
                  "norm": rung_norm(images[r], 1000), "seconds": 10.0 * (r + 1), "trial": len(study.trials)}
                 for r, s in ((0, 0.7), (1, score))]
        _add(study, PRUNED, [], {PAUSED_ATTR: 1, "flops": 5e6, "rungs": rungs})
    tmp_path.mkdir(parents=True, exist_ok=True)
    ckpt = _checkpoint(tmp_path, 0, 1, 2)

    def ctx(left: float):
        budget = TimeBudget.start(1800.0, finalists=0, folds=1, final_fit=True, val_fraction=0.2)
        budget.deadline = time.time() + left
        return SimpleNamespace(opts=SimpleNamespace(pruner="successive-halving", last_rung=last_rung,
                                                    prefer_smaller=True), study=study,
                               checkpoint_dir=ckpt, ladder=ladder, budget=budget, multi=False, first_trial=0,
                               data=SimpleNamespace(y_train=np.zeros(n), y_val=np.zeros(nv)))

    return study, ctx


def test_with_last_rung_close_the_search_keeps_time_for_both_closing_runs_and_the_final_fit(tmp_path):
    """While no trial is complete the budget's reserve has no final fit to price: the search keeps the closing runs'
    last rungs (with the margin) and the longest one's final fit from scratch, and stops where they no longer fit."""
    from emnist_hpo.search.budget import Throughput, climb_seconds
    from emnist_hpo.search.optuna.study import CLOSING_MARGIN, closing_fit, closing_seconds, search_room, stop_search

    study, ctx = _close_ctx(tmp_path)
    c = ctx(1500.0)
    speed = Throughput.of_study(study)
    n, nv = len(c.data.y_train), len(c.data.y_val)
    climbs = [climb_seconds(study.trials[i], c.ladder, n, nv, speed) for i in (1, 2)]
    assert closing_seconds(c) == pytest.approx(sum(climbs))
    assert closing_seconds(c, CLOSING_MARGIN) == pytest.approx(CLOSING_MARGIN * sum(climbs))
    fit = closing_fit(c)
    whole = climb_seconds(study.trials[1], c.ladder, n, nv, speed, start=0)
    assert whole > climbs[0] and fit == pytest.approx(c.budget.final_fit_scale * whole)
    assert search_room(c) == pytest.approx(1500.0 - fit, abs=1.0)  # the reserve alone would keep nothing
    _, leaders = _close_ctx(tmp_path / "l", "leaders")
    assert closing_fit(leaders(1500.0)) == 0.0  # the leader rule: its leaders' complete runs price the final fit
    keep = CLOSING_MARGIN * sum(climbs) + fit
    assert stop_search(ctx(10 + keep + 30)) is None  # a typical trial (10 s) still fits
    reason = stop_search(ctx(10 + keep - 30))
    assert reason and "the closing full-length run" in reason


def test_with_last_rung_close_the_hook_queues_the_closing_runs_that_fit_and_runs_them_all(tmp_path):
    """When the search stops the hook queues the best two of the rung below where both fit, only the best where the
    second does not (and says so), and on each later call hands back the closing runs still queued, so that the
    loop runs every one."""
    from emnist_hpo.search.budget import Throughput, climb_seconds
    from emnist_hpo.search.optuna.study import _promotions, closing_fit, stop_search

    study, ctx = _close_ctx(tmp_path)
    c = ctx(1500.0)
    n, nv = len(c.data.y_train), len(c.data.y_val)
    speed = Throughput.of_study(study)
    first, second = (climb_seconds(study.trials[i], c.ladder, n, nv, speed) for i in (1, 2))
    fit = closing_fit(c)
    said: list[str] = []
    assert _promotions(ctx(fit + first + second / 2), said.append)["finish"]() == [1]  # the second does not fit
    assert said[0].startswith("no time for trial 2's closing run")
    assert "go on to the end, 1 closing run(s): trial 1 (0.8600" in said[-1]
    queued = closing_queued(study)
    assert len(queued) == 1 and _promotions(ctx(1500.0), said.append)["finish"]() == queued  # still to run
    # and the search has stopped for good, however much time the closing runs leave
    assert stop_search(ctx(1500.0)).startswith("the search has stopped: its closing run(s)")

    study, ctx = _close_ctx(tmp_path / "both")
    said.clear()
    assert _promotions(ctx(1500.0), said.append)["finish"]() == [1, 2]
    assert "2 closing run(s): trial 1 (0.8600" in said[-1] and "trial 2 (0.8400" in said[-1]


@pytest.mark.slow
def test_a_real_study_with_last_rung_close_runs_the_last_rung_only_for_its_best_and_rival_after_the_search(
        tmp_path, sample_dir):
    """A real study with --timeout and --last-rung close (one process): no trial trains the last rung until every
    configuration is screened; then the best of the rung below and its rival (the next best, or a smaller trial
    within its standard error) do, as closing runs, and one of them is crowned."""
    res, lines = _timeout_study(tmp_path, sample_dir, trials=6, max_train_samples=1000, last_rung="close")
    assert any("to the last rung nobody until the search stops" in ln for ln in lines), lines
    trials = res.study.trials
    last = 1  # --fidelity epochs, --epochs 3, eta 3: rungs at epochs 1 and 3
    entrants = [t for t in trials if any(r["rung"] == last and r["trial"] == t.number
                                         for r in t.user_attrs.get("rungs", []))]
    assert entrants and all(CLOSING_ATTR in t.user_attrs for t in entrants), [(t.number, t.user_attrs) for t in trials]
    first_closing = min(t.number for t in entrants)
    assert all(PROMOTE_ATTR in t.user_attrs for t in trials if t.number >= first_closing)  # nothing sampled after
    scores = rung_table(trials).get(last - 1, {})
    picked = [t.user_attrs[CLOSING_ATTR] for t in entrants]
    order = sorted(scores, key=lambda n: (-scores[n], n))
    assert order[0] in picked and len(picked) == min(2, len(scores)), (picked, scores)
    size = {n: size_of(trials[n].user_attrs) for n in scores}
    rivals = [n for n in picked if n != order[0]]
    assert all(n == order[1] or (size[n] != size[order[0]] and no_larger(size[n], size[order[0]]))
               for n in rivals), (picked, scores, size)
    assert res.champion_trial is not None and CLOSING_ATTR in res.champion_trial.user_attrs
    assert any("go on to the end" in ln and "closing run(s): trial " in ln for ln in lines)


def test_with_last_rung_close_the_first_closing_run_is_not_refused_for_time(tmp_path):
    """The first closing run is the study's only way to a champion: its last rung starts however little time is
    left (a 150 s digits study refused it and ended with nothing to register); a rung below the last, or a last
    rung once a trial is complete, is refused as before."""
    from emnist_hpo.search.budget import rung_work
    from emnist_hpo.search.optuna.study import _rung_budget

    study, ctx = _close_ctx(tmp_path)
    c = ctx(5.0)
    check = _rung_budget(c)
    last = len(c.ladder.rungs) - 1
    work = rung_work(c.ladder.images(len(c.data.y_train))[last], 5e6, 3_609)
    assert check(c.ladder, last, work) is None
    assert check(c.ladder, last - 1, work).startswith("time budget: rung 1 would take")
    _add(study, COMPLETE, [(1, 0.86), (2, 0.9)], {PROMOTE_ATTR: 1, CLOSING_ATTR: 1}, value=0.9, trained_by={1: 1})
    assert check(c.ladder, last, work).startswith("time budget: rung 2 would take")
