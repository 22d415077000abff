"""The rules a study relies on, tested directly (no training): the champion alias, the finalize claim,
trial slots, the time model, and the plan's arithmetic."""

from __future__ import annotations

import os
import socket

import optuna
import pytest

from emnist_hpo.coordination import _start_time, current_owner
from emnist_hpo.search.budget import RungRecord, Throughput, TimeBudget, TrialCost
from emnist_hpo.search.optuna.slots import FINALIZE_ATTR, StudyLock, claim_finalize, drop_claim, finish_claim, slot
from emnist_hpo.search.optuna.storage import make_storage
from emnist_hpo.tracking.registry import beats_champion


@pytest.mark.parametrize("new, current, promoted", [
    (0.90, None, True),  # the first version becomes the champion
    (0.91, "0.900000", True),
    (0.90, "0.900000", False),  # a tie keeps the champion: only a better model moves the alias
    (0.85, "0.900000", False),
    (0.50, "not a number", True),  # a champion without a readable score cannot be defended
    (0.50, "nan", True),
])
def test_the_champion_alias_moves_only_to_a_strictly_better_model(new, current, promoted):
    assert beats_champion(new, current) is promoted


@pytest.fixture
def study(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    storage = make_storage(url)
    s = optuna.create_study(study_name="rules", storage=storage, direction="maximize")
    return s, StudyLock(url, storage, "rules")


KEY = {"trial": 3, "final_fit": True, "register": True}


def test_one_process_claims_the_finalize_and_a_done_claim_is_never_redone(study):
    s, lock = study
    assert claim_finalize(s, lock, KEY) is None  # ours
    assert claim_finalize(s, lock, KEY) is None  # still ours (the same process asks again after a failure)
    finish_claim(s, KEY, test_accuracy=0.9)
    rec = claim_finalize(s, lock, KEY)
    assert rec["state"] == "done" and rec["test_accuracy"] == 0.9
    assert claim_finalize(s, lock, {**KEY, "trial": 4}) is None  # another champion: finalize it


def test_a_live_claimant_is_waited_for_and_a_dead_ones_claim_is_taken_over(study):
    s, lock = study
    parent = os.getppid()
    live = f"{socket.gethostname()}:{parent}:{_start_time(parent) or 0}"
    s.set_user_attr(FINALIZE_ATTR, {**KEY, "state": "claimed", "owner": live, "at": 1e12})
    assert claim_finalize(s, lock, KEY)["owner"] == live
    dead = f"{socket.gethostname()}:999999:1"
    s.set_user_attr(FINALIZE_ATTR, {**KEY, "state": "claimed", "owner": dead, "at": 1e12})
    assert claim_finalize(s, lock, KEY) is None
    assert s._storage.get_study_user_attrs(s._study_id)[FINALIZE_ATTR]["owner"] == current_owner()  # noqa: SLF001
    drop_claim(s, KEY)  # a failed finalize gives the claim up
    assert s._storage.get_study_user_attrs(s._study_id)[FINALIZE_ATTR]["state"] == "failed"  # noqa: SLF001
    assert claim_finalize(s, lock, KEY) is None


def test_trial_slots_end_the_study_at_exactly_the_target(study):
    s, _ = study
    assert slot(s, 2) == "run"
    t = s.ask()
    assert slot(s, 2) == "run"  # one running, one slot left
    u = s.ask()
    assert slot(s, 2) == "wait"  # both slots taken by running trials, which may still fail
    s.tell(t, 0.5)
    s.tell(u, state=optuna.trial.TrialState.FAIL)
    assert slot(s, 2) == "run"  # the failed one freed its slot
    s.tell(s.ask(), state=optuna.trial.TrialState.PRUNED)
    assert slot(s, 2) == "done"


def test_throughput_is_fitted_from_measured_rungs_and_predicts_bigger_work():
    default = Throughput()
    assert default.measured == 0 and default.seconds(0) == default.overhead
    points = [RungRecord(work, 2.0 + work / 40e9) for work in (1e11, 4e11, 9e11, 2e12)]
    fitted = Throughput.fit(points)
    assert fitted.measured == 4
    assert fitted.overhead == pytest.approx(2.0, abs=1e-6) and fitted.rate == pytest.approx(40e9, rel=1e-6)
    assert fitted.seconds(4e12) == pytest.approx(102.0)
    one = Throughput.fit([RungRecord(1e12, 28.0)])  # one point: the default overhead, the rate from it
    assert one.rate == pytest.approx(1e12 / 25.0)


def test_throughput_counts_batch_norm_work_when_every_rung_recorded_it():
    """At equal FLOPs batch-norm doubled compact's training time: with rungs with and without it, the fit
    learns its cost per element and predicts both kinds; without that information, FLOPs alone as before."""
    def secs(work, norm):
        return 2.0 + work / 40e9 + norm * 1e-8

    plain = [RungRecord(w, secs(w, 0.0), 0.0) for w in (1e11, 9e11, 2e12)]
    bn = [RungRecord(w, secs(w, n), n) for w, n in ((4e11, 3e8), (1e12, 9e8), (3e12, 1.5e9))]
    fitted = Throughput.fit(plain + bn)
    assert fitted.measured == 6 and fitted.norm_cost == pytest.approx(1e-8, rel=1e-6)
    assert fitted.rate == pytest.approx(40e9, rel=1e-6) and fitted.overhead == pytest.approx(2.0, abs=1e-6)
    assert fitted.seconds(2e12, 1e9) == pytest.approx(secs(2e12, 1e9))
    assert fitted.seconds(2e12, 1e9) > fitted.seconds(2e12) + 9
    # a study recorded before batch-norm work was (no norm), or only batch-norm rungs: FLOPs alone
    old = Throughput.fit(plain + [RungRecord(r.work, r.seconds) for r in bn])
    assert old.norm_cost == 0.0 and old.seconds(2e12, 1e9) == old.seconds(2e12)
    assert Throughput.fit(bn).norm_cost == 0.0
    # a model's own speed is net of its batch-norm time: a BN rung at the study's speed is not "slower"
    assert fitted.own([bn[1]]).rate == pytest.approx(40e9, rel=1e-6)


def test_the_search_stops_while_the_finalists_and_the_final_fit_still_fit():
    budget = TimeBudget.start(1000, finalists=2, folds=1, final_fit=True, val_fraction=0.2, now=0.0)
    costs = [TrialCost(0.8, 100.0, True), TrialCost(0.7, 100.0, True), TrialCost(0.3, 20.0, False)]
    assert budget.stop_search(costs, now=0.0) is None
    # reserve: 2 finalists x 1 fold x 100 s + a final fit of 125 s = 325 s; the next trial ~100 s
    assert budget.stop_search(costs, now=570.0) is None  # 430 s left >= 100 + 325
    why = budget.stop_search(costs, now=580.0)  # 420 s left: the next trial would eat the reserve
    assert why and "time budget" in why


def test_a_pareto_study_on_flops_is_its_own_study():
    from emnist_hpo.options import StudyOptions

    assert StudyOptions("digits").name == "emnist-digits"
    assert StudyOptions("digits", objectives=("accuracy", "params")).name == "emnist-digits-pareto"
    assert StudyOptions("digits", objectives=("accuracy", "flops")).validate().name == "emnist-digits-pareto-flops"
    with pytest.raises(Exception, match="'accuracy,params' or 'accuracy,flops'"):
        StudyOptions("digits", objectives=("accuracy", "params", "flops")).validate()
