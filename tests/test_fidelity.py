"""Multi-fidelity rules, tested directly: the ladder's rungs, nested shares, promotion, the rung decisions."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from emnist_hpo.model.cost import ModelCost
from emnist_hpo.train.fidelity import MIN_RUNG_SEEN, make_ladder, nested_order, promotable
from emnist_hpo.search.optuna.objective import OptunaRungs
from emnist_hpo.search.optuna.pruners import PRUNERS, make_pruner, no_skill_accuracy
from emnist_hpo.train.trainer import RungResult

NO_SKILL = 1 / 47  # the balanced split: 47 classes of equal size


def test_no_skill_accuracy_is_the_most_frequent_class_share():
    assert no_skill_accuracy(np.array([0, 1, 2, 3])) == 0.25
    assert no_skill_accuracy(np.array([5, 5, 5, 1], dtype=np.uint8)) == 0.75
    assert no_skill_accuracy(np.array([], dtype=np.int64)) == 0.0


@pytest.mark.parametrize("n, classes", [(13_385, 47), (74_446, 47), (558_345, 47), (10_545, 62)])
def test_data_ladder_budgets_grow_by_eta_and_end_on_all_the_data(n, classes):
    ladder = make_ladder("data", 10, n, classes, eta=3)
    seen = ladder.images(n)
    assert ladder.final.fraction == 1.0 and ladder.final.epochs == 10 and ladder.final.final
    assert seen[-1] == n * 10
    assert all(s >= MIN_RUNG_SEEN for s in seen)  # no rung too small to rank anything
    for a, b in zip(seen, seen[1:]):  # each rung about eta times the one before
        assert 2.0 <= b / a <= 4.5
    fractions = [r.fraction for r in ladder.rungs]
    assert fractions == sorted(fractions)  # nested: shares only grow
    assert [r.step for r in ladder.rungs] == [3**i for i in range(len(ladder.rungs))]
    # as many rungs (up to 5) as keep the smallest budget at MIN_RUNG_SEEN images or more
    assert len(ladder.rungs) == min(5, 1 + int(np.floor(np.log(n * 10 / MIN_RUNG_SEEN) / np.log(3))))


def test_small_runs_get_one_rung_and_epochs_ladder_ends_where_hyperband_did():
    assert len(make_ladder("data", 1, 800, 10).rungs) == 1
    epochs = make_ladder("epochs", 10, 13_385, 47)
    assert [r.epochs for r in epochs.rungs] == [1, 2, 6, 1]  # rungs end after 1, 3, 9 and 10 epochs
    assert all(r.fraction == 1.0 for r in epochs.rungs)
    assert len(make_ladder("none", 10, 13_385, 47).rungs) == 1
    with pytest.raises(ValueError, match="fidelity must be one of data, epochs, none"):
        make_ladder("bogus", 10, 100, 10)


def test_the_plan_says_early_stopping_at_the_last_rung_only_when_it_is_on():
    """The plan a study prints names the last rung's early stopping only where --early-stopping turned it on (it is
    off by default: every epoch of the last rung is trained, as the final fit trains them)."""
    ladder = make_ladder("data", 15, 13_385, 47)
    lines = ladder.describe(13_385, 3_346).split("; ")
    assert len(lines) == len(ladder.rungs) and lines[-1].endswith("validation images each epoch")
    assert "early stopping" not in "; ".join(lines)
    assert ladder.describe(13_385, 3_346, patience=3).endswith("each epoch, early stopping after 3 epochs without gain")


def test_the_last_rung_is_priced_and_recorded_with_a_validation_each_epoch():
    """A screening rung scores its validation images once, at its end; the last rung scores the whole validation
    set after every epoch (its best epoch, early stopping). The work a rung records, which the study's speed is
    fitted to and a closing run is priced by, counts what it scored: a resumed last rung only its epochs left."""
    n, nv = 13_385, 3_347
    ladder = make_ladder("data", 10, n, 47)
    last = len(ladder.rungs) - 1
    vals = ladder.val_sizes(nv)
    assert ladder.scored(n, nv) == vals[:-1] + [10 * nv]
    assert ladder.scored_at(last, n, nv, images=4 * n) == 4 * nv  # 4 of its 10 epochs left
    assert ladder.scored_at(0, n, nv, images=ladder.images(n)[0]) == vals[0]
    study = optuna.create_study(direction="maximize")
    control = OptunaRungs(_trial(study), ladder, ModelCost(1000, 10**6), pruner="successive-halving",
                          no_skill=NO_SKILL, report=True, data_sizes=(n, nv))
    control.after(RungResult(last, 0.9, 10 * n, 100.0, 10), final=True)
    work = control.trial.user_attrs["rungs"][-1]["work"]
    assert work == 10 * n * 3 * 10**6 + 10 * nv * 10**6  # training forward and backward, and 10 validations


def test_a_closing_run_is_not_stopped_as_too_slow_to_be_crowned_only_a_screened_trial_is():
    """A closing run continues the trial the search chose to crown from; whether it still fits is the time
    budget's check. Judged again as "too slow to be crowned" (its own rungs' speed against CROWN_SHARE of the
    budget), a 480 s letters study's only closing run (~252 s against 240 s) stopped after 1 s and the study
    ended at 205 s with nothing crowned. A trial still being screened is stopped as before."""
    from emnist_hpo.search.optuna.promotions import CLOSING_ATTR
    from emnist_hpo.search.trial import Limits

    n, nv = 14_435, 3_609
    ladder = make_ladder("data", 10, n, 26)
    last = len(ladder.rungs) - 1
    limits = Limits(max_seconds=240.0, seconds=lambda cost, measured=None: 252.0)
    ran = [{"rung": 0, "score": 0.69, "images": 16_040, "seconds": 13.2, "work": 4.7e11, "norm": 0.0}]
    study = optuna.create_study(direction="maximize")
    fits = lambda *a: None  # noqa: E731 - the time budget: the rung fits

    def control(closing: bool):
        trial = _trial(study)
        if closing:
            trial.set_user_attr(CLOSING_ATTR, 12)
        return OptunaRungs(trial, ladder, ModelCost(47_018, 9_077_888), pruner="successive-halving",
                           no_skill=NO_SKILL, report=True, data_sizes=(n, nv), time_left=fits, resumed=ran,
                           limits=limits)

    screened = control(closing=False).before(1, ladder.rungs[1], n)
    assert screened is not None and screened.startswith("too slow to be crowned") and "252 s" in screened
    assert control(closing=True).before(last, ladder.rungs[last], n) is None
    refused = lambda *a: "time budget: rung 2 would take ~300 s"  # noqa: E731 - the budget still decides
    closing = control(closing=True)
    closing.time_left = refused
    assert closing.before(last, ladder.rungs[last], n) == "time budget: rung 2 would take ~300 s"


def test_every_prefix_of_the_nested_order_is_stratified():
    labels = np.repeat(np.arange(10), [500, 300, 200, 100, 100, 100, 100, 100, 50, 450])
    order = nested_order(labels, seed=1)
    assert sorted(order) == list(range(len(labels)))
    for m in (200, 500, 1000):
        counts = np.bincount(labels[order[:m]], minlength=10)
        expected = np.bincount(labels) * m / len(labels)
        assert np.all(np.abs(counts - expected) <= 1.0 + 1e-9)


def test_promotion_keeps_the_best_third_and_only_the_best_while_peers_are_few():
    assert promotable(0.5, [0.5], 3)  # the first trial of a rung goes on
    assert not promotable(0.4, [0.5, 0.4], 3)  # fewer than eta peers: only the best so far
    peers = [0.1 * i for i in range(1, 10)]
    assert [promotable(v, peers, 3) for v in peers] == [False] * 6 + [True] * 3


def _trial(study, rungs=None):
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    if rungs is not None:
        trial.set_user_attr("rungs", [{"rung": i, "score": s} for i, s in enumerate(rungs)])
    return trial


def _control(trial, ladder, pruner="successive-halving", report=True):
    return OptunaRungs(trial, ladder, ModelCost(1000, 10**6), pruner=pruner, no_skill=NO_SKILL, report=report,
                       data_sizes=(13_385, 3_347))


LADDER = make_ladder("data", 10, 13_385, 47)


def _end(control, index, score):
    return control.after(RungResult(index, score, 1000, 1.0, 2), final=index == len(LADDER.rungs) - 1)


def test_the_first_trial_at_chance_is_pruned_at_its_first_rung():
    study = optuna.create_study(direction="maximize")
    why = _end(_control(_trial(study), LADDER), 0, NO_SKILL)
    assert why and "no-skill" in why


def test_a_slow_learner_above_twice_chance_climbs_when_it_is_the_best_so_far():
    study = optuna.create_study(direction="maximize")
    assert _end(_control(_trial(study), LADDER), 0, 0.13) is None


def test_successive_halving_prunes_all_but_the_best_third_of_a_rung():
    study = optuna.create_study(direction="maximize")
    for score in (0.30, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75):
        t = _trial(study, [score])
        study.tell(t, state=optuna.trial.TrialState.PRUNED)
    control = _control(_trial(study), LADDER)
    assert "rank 6 of 9" in _end(control, 0, 0.52)
    control = _control(_trial(study), LADDER)
    assert _end(control, 0, 0.68) is None  # third of 10
    assert control.trial.user_attrs["rungs"][0]["score"] == 0.68  # recorded for the peers that come later


def test_under_a_time_budget_only_the_best_of_the_rung_below_the_last_runs_to_the_end():
    """A full-length run costs several lower rungs: under a budget (``leader_rung``) the second of the rung
    below the last waits, paused, where the best 1/eta rule alone would have let it go on."""
    below = len(LADDER.rungs) - 2
    study = optuna.create_study(direction="maximize")
    for score in (0.30, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.80):
        t = _trial(study, [0.5] * below + [score])
        study.tell(t, state=optuna.trial.TrialState.PRUNED)

    def control(leader: int | None, close: bool = False):
        return OptunaRungs(_trial(study), LADDER, ModelCost(1000, 10**6), pruner="successive-halving",
                           no_skill=NO_SKILL, report=True, data_sizes=(13_385, 3_347), can_pause=True,
                           leader_rung=leader, close=close)

    assert _end(control(None), below, 0.75) is None  # second of 9: in the best third, it goes on
    c = control(below)
    why = _end(c, below, 0.75)
    assert why and "paused" in why and "only its best goes on to the last rung" in why and c.paused
    assert _end(control(below), below, 0.85) is None  # the new best of the rung goes on
    assert _end(control(below), 0, 0.75) is None  # lower rungs keep the best third
    # --last-rung close: the new best waits too, for the search to stop; lower rungs are as before
    c = control(below, close=True)
    why = _end(c, below, 0.95)
    assert why and "paused" in why and "the last rung waits for the search to stop" in why and c.paused
    assert _end(control(below, close=True), 0, 0.75) is None


def test_two_objective_studies_are_pruned_on_accuracy_without_optuna_reports():
    study = optuna.create_study(directions=["maximize", "minimize"])
    for score in (0.6, 0.7, 0.8):
        t = _trial(study, [score])
        study.tell(t, state=optuna.trial.TrialState.PRUNED)
    control = _control(_trial(study), LADDER, report=False)
    assert "rank 4 of 4" in _end(control, 0, 0.5)
    assert control.trial.storage.get_trial(control.trial._trial_id).intermediate_values == {}  # noqa: SLF001


def test_optunas_hyperband_decides_on_the_rung_steps_and_keeps_its_brackets():
    pruner = make_pruner("hyperband", LADDER)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)  # TPE learns per bracket, recognising the class
    study = optuna.create_study(direction="maximize", pruner=pruner)
    control = _control(_trial(study), LADDER, pruner="hyperband")
    assert _end(control, 0, 0.5) is None
    assert control.trial.storage.get_trial(control.trial._trial_id).intermediate_values == {1: 0.5}  # noqa: SLF001


def test_none_prunes_nothing_not_even_at_chance_and_the_last_rung_is_never_pruned():
    study = optuna.create_study(direction="maximize")
    assert _end(_control(_trial(study), LADDER, pruner="none"), 0, NO_SKILL) is None
    assert _end(_control(_trial(study), LADDER), len(LADDER.rungs) - 1, NO_SKILL) is None


def test_unknown_pruner_names_the_allowed_ones():
    assert PRUNERS == ("successive-halving", "hyperband", "median", "none")
    with pytest.raises(ValueError, match=r"pruner must be one of successive-halving, hyperband, median, none "
                                         r"\(pruner='asha'\)"):
        make_pruner("asha", LADDER)
