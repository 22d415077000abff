"""--timeout is the whole study's budget: the search leaves time for the finalists and the final fit."""

from __future__ import annotations

import datetime as dt
import math

import optuna
import pytest

from emnist_hpo.search.budget import FinalistPacer, TimeBudget, TrialCost, cost_of, costs_of
from emnist_hpo.options import StudyOptions
from emnist_hpo.errors import ConfigError


def budget(timeout=1000.0, finalists=3, folds=2, final_fit=True):
    return TimeBudget.start(timeout, finalists=finalists, folds=folds, final_fit=final_fit, val_fraction=0.2, now=0.0)


def test_no_timeout_never_stops_the_search():
    assert budget(timeout=None).stop_search([TrialCost(0.9, 1e9, True)], now=1e12) is None


def test_reserve_counts_each_finalist_on_every_fold_and_the_final_fit_on_the_larger_pool():
    costs = [TrialCost(0.80, 60, True), TrialCost(0.85, 100, True), TrialCost(0.70, 30, True),
             TrialCost(0.60, 10, True), TrialCost(0.0, 5, False)]
    # finalists: the 3 best complete trials (100 + 60 + 30 s) x 2 folds; final fit: the best trial x 1/(1-0.2)
    assert budget(timeout=1e5).reserve(costs) == pytest.approx((100 + 60 + 30) * 2 + 100 * 1.25)
    assert budget(finalists=0, final_fit=False).reserve(costs) == 0
    assert budget().reserve([TrialCost(0.0, 5, False)]) == 0  # nothing complete: no finalist to pay for
    # the re-evaluation's share is capped at 20% of the budget (200 s of 1000): 2 folds fit only one
    # finalist, so all three get one fold each (190 s)
    assert budget(timeout=1000.0).plan(costs) == (3, 1)
    assert budget(timeout=1000.0).reserve(costs) == pytest.approx(190 + 100 * 1.25)


def test_plan_prefers_fewer_folds_to_fewer_finalists_and_never_re_evaluates_a_lone_one():
    costs = [TrialCost(0.9, 100, True), TrialCost(0.8, 100, True), TrialCost(0.7, 100, True)]
    b = budget(timeout=1e5, finalists=3, folds=3)
    assert b.plan(costs) == (3, 3)
    assert b.plan(costs, room=650) == (2, 3)  # 2 x 300 s
    assert b.plan(costs, room=450) == (2, 2)  # 3 folds fit one finalist only; 2 folds fit two
    assert b.plan(costs, room=250) == (2, 1)
    assert b.plan(costs, room=150) == (0, 0)  # one run would re-evaluate one finalist: nothing to compare it with
    assert b.plan(costs, room=50) == (0, 0)
    assert budget(finalists=0).plan(costs) == (0, 0)
    assert b.plan(costs[:1]) == (0, 0)  # one complete trial: its budget goes to the search


def test_search_stops_while_the_next_trial_and_the_reserve_still_fit():
    # reserve: 2 finalists x 1 fold x 100 s (2 folds exceed the re-evaluation's 200 s share) + 1.25 x 100 s
    costs = [TrialCost(0.8, 100, True), TrialCost(0.7, 100, True)]
    b = budget(timeout=1000.0)
    assert b.reserve(costs[:1]) == pytest.approx(125)  # one complete trial: only its final fit is kept back
    assert b.stop_search(costs, now=0.0) is None  # 1000 s left >= 100 + 325
    assert b.stop_search(costs, now=570.0) is None  # 430 s left
    reason = b.stop_search(costs, now=580.0)  # 420 s left < 425
    assert reason and "finalists" in reason and "420 s left" in reason
    assert b.stop_search([], now=999.0) is None  # no trial finished yet: nothing to judge by
    assert b.stop_search([], now=1000.0) == "the time budget is spent"


def test_the_search_stops_in_time_for_its_closing_run():
    """With the closing run due (the last rung holds one run), the search stops while the next trial, the closing
    run's last rung and the reserve still fit, and says what it keeps the time for."""
    costs = [TrialCost(0.8, 100, True), TrialCost(0.7, 100, True)]
    b = budget(timeout=1000.0)
    assert b.stop_search(costs, now=420.0, closing=150.0) is None  # 580 s left >= 100 + 150 + 325
    reason = b.stop_search(costs, now=430.0, closing=150.0)  # 570 s left < 575
    assert reason and "570 s left" in reason and "closing full-length run (~150 s)" in reason
    assert b.stop_search(costs, now=430.0) is None  # none due: the search goes on to 425 s before the end


def test_a_paused_trials_last_rungs_are_priced_at_the_slower_of_the_study_and_its_own_speed():
    """The closing run's time: the rungs above the one the trial paused at, its FLOPs and batch-norm work on the
    ladder's images at each (the last rung's validation each epoch), at its own rungs' speed where that is slower
    than the study's, and never under its largest rung's seconds scaled by work (the fit's per-rung overhead
    priced a byclass closing run 18% short)."""
    from emnist_hpo.search.budget import Throughput, climb_seconds, rung_norm, rung_work
    from emnist_hpo.train.fidelity import make_ladder

    ladder = make_ladder("data", 15, 14_435, 26)
    n, nv = 14_435, 3_609
    images, vals = ladder.images(n), ladder.scored(n, nv)
    assert vals[2] == 15 * ladder.val_sizes(nv)[2]  # the last rung scores the validation set each epoch
    flops, per_image = 20e6, 5_000
    study = Throughput(overhead=2.0, rate=100e9, measured=30, norm_cost=1e-9)

    def paused(seconds_scale: float, at: int = 1) -> optuna.trial.FrozenTrial:
        rungs = [{"rung": r, "images": images[r], "work": rung_work(images[r], flops, vals[r]),
                  "norm": rung_norm(images[r], per_image),
                  "seconds": seconds_scale * study.seconds(rung_work(images[r], flops, vals[r]),
                                                           rung_norm(images[r], per_image))}
                 for r in range(at + 1)]
        return optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED,
                                         user_attrs={"flops": flops, "rungs": rungs, "paused_at": at})

    last = study.seconds(rung_work(images[2], flops, vals[2]), rung_norm(images[2], per_image))
    rung_1 = study.seconds(rung_work(images[1], flops, vals[1]), rung_norm(images[1], per_image))
    work_1, work_2 = rung_work(images[1], flops, vals[1]), rung_work(images[2], flops, vals[2])
    scaled = rung_1 * work_2 / work_1  # its rung 1's seconds per FLOP, the fit's overhead included
    assert scaled > last
    assert climb_seconds(paused(1.0), ladder, n, nv, study) == pytest.approx(scaled)  # never under its rung scaled
    assert climb_seconds(paused(0.5), ladder, n, nv, study) == pytest.approx(last)  # faster: the study's speed
    slow = climb_seconds(paused(3.0), ladder, n, nv, study)
    assert slow >= 3 * scaled and slow == pytest.approx(3 * scaled, rel=0.01)  # three times slower on its own rungs
    two = climb_seconds(paused(1.0, at=0), ladder, n, nv, study)  # paused at rung 0: rungs 1 and 2 ahead
    rung_0, work_0 = study.seconds(rung_work(images[0], flops, vals[0]), rung_norm(images[0], per_image)), \
        rung_work(images[0], flops, vals[0])
    assert two == pytest.approx(max(rung_1, rung_0 * work_1 / work_0) + max(last, rung_0 * work_2 / work_0))


def test_a_re_evaluation_that_no_longer_fits_does_not_stop_the_search_while_the_final_fit_fits():
    """A long trial joined the top late: the planned re-evaluation (300 + 100 s, within its 400 s share) and the
    final fit (1.25 x 300 s) no longer fit in what is left, so the study would re-evaluate nothing after the
    search. The search goes on while a trial and the final fit fit (letters: it stopped with 550 s left,
    kept for ~618, then re-evaluated nothing and ended 12.8% under budget)."""
    costs = [TrialCost(0.9, 300, True), TrialCost(0.8, 100, True), TrialCost(0.7, 100, True)]
    b = budget(timeout=2000.0)
    assert b.plan(costs) == (2, 1) and b.final_fit_cost(costs) == pytest.approx(375)
    assert b.reserve(costs) == pytest.approx(400 + 375)  # no time given: the planned re-evaluation
    assert b.reserve(costs, left=1000.0) == pytest.approx(400 + 375)  # it fits: kept
    assert b.reserve(costs, left=500.0) == pytest.approx(375)  # it does not: only the final fit is kept
    assert b.stop_search(costs, now=1000.0) is None  # 1000 s left >= 100 + 775
    assert b.stop_search(costs, now=1130.0)  # 870 s left < 875: the re-evaluation still fits; the search stops
    assert b.stop_search(costs, now=1500.0) is None  # 500 s left: no re-evaluation fits; 100 + 375 still does
    reason = b.stop_search(costs, now=1530.0)  # 470 s left < 475
    assert reason and "470 s left" in reason and "~375 s" in reason


def test_costs_of_reads_trial_durations():
    study = optuna.create_study(direction="maximize")
    t0 = dt.datetime(2026, 1, 1, 12, 0, 0)
    for value, secs, state in [(0.8, 30, optuna.trial.TrialState.COMPLETE), (None, 5, optuna.trial.TrialState.PRUNED)]:
        study.add_trial(optuna.trial.FrozenTrial(
            number=0, state=state, value=value, values=None, datetime_start=t0,
            datetime_complete=t0 + dt.timedelta(seconds=secs), params={}, distributions={}, user_attrs={},
            system_attrs={}, intermediate_values={0: 0.1} if value is None else {}, trial_id=0))
    costs = costs_of(study)
    assert [(c.seconds, c.complete) for c in costs] == [(30.0, True), (5.0, False)]


def test_the_next_trial_is_priced_as_a_typical_configuration_not_a_full_length_run():
    # two full-length runs (100 s) and six configurations stopped at their first rungs (20 s): the search goes
    # on while a typical configuration and the reserve (2 x 100 s + 125 s final fit) fit; the rung check stops
    # any rung that would not
    costs = [TrialCost(0.8, 100, True), TrialCost(0.7, 100, True)] + [TrialCost(0.3, 20, False)] * 6
    refused = TrialCost(0.0, 0.01, False, trained=False)  # refused for its size: trained nothing, costs nothing
    b = budget(timeout=1000.0)
    assert b.stop_search(costs + [refused] * 9, now=650.0) is None  # 350 s left >= 20 + 325
    reason = b.stop_search(costs + [refused] * 9, now=660.0)  # 340 s left < 345: refusals do not lower the guess
    assert reason and "a trial takes ~20 s" in reason


def test_a_first_rung_that_no_longer_fits_the_time_ends_the_search():
    costs = [TrialCost(0.8, 100, True), TrialCost(0.7, 100, True)] + [TrialCost(0.3, 20, False)] * 6
    b = budget(timeout=1000.0)  # began at 0
    late = TrialCost(float("-inf"), 0.2, False, trained=False, out_of_time=True, ended=400.0)
    reason = b.stop_search(costs + [late], now=400.0)  # typical trials would still fit: the refusal says not
    assert reason and "first rung no longer fits" in reason
    leader = TrialCost(0.6, 40, False, trained=True, out_of_time=True, ended=400.0)  # refused its *last* rung
    assert b.stop_search(costs + [leader], now=400.0) is None  # a new configuration's first rung may still fit
    earlier = TrialCost(float("-inf"), 0.2, False, trained=False, out_of_time=True, ended=-50.0)
    assert b.stop_search(costs + [earlier], now=400.0) is None  # a previous session's budget: not this one's


def test_costs_of_tells_trained_trials_from_refusals_and_time_stops():
    study = optuna.create_study(direction="maximize")
    t0 = dt.datetime(2026, 1, 1, 12, 0, 0)
    rows = [({"rungs": [{"rung": 0}]}, 20), ({"refused": True, "fail_reason": "params 9 > --max-params 1"}, 0),
            ({"fail_reason": "time budget: rung 0 would take ~30 s and 10 s are left"}, 0),
            ({"rungs": [{"rung": 0}], "fail_reason": "time budget: rung 2 would take ~90 s"}, 25)]
    for attrs, secs in rows:
        study.add_trial(optuna.trial.FrozenTrial(
            number=0, state=optuna.trial.TrialState.PRUNED, value=None, values=None, datetime_start=t0,
            datetime_complete=t0 + dt.timedelta(seconds=secs), params={}, distributions={}, user_attrs=attrs,
            system_attrs={}, intermediate_values={}, trial_id=0))
    costs = costs_of(study)
    assert [(c.trained, c.out_of_time) for c in costs] == [(True, False), (False, False), (False, True), (True, True)]
    assert costs[0].ended == pytest.approx((t0 + dt.timedelta(seconds=20)).timestamp())


def test_a_continuation_is_priced_with_the_rungs_it_trained_before_it_was_paused():
    # compact paused after rung 0 (34 s, trial 2) and rung 1 (78 s, trial 7), continued by trial 16 (171 s):
    # re-evaluating or refitting it trains all three rungs again (a balanced study reserved 171 s for it, spent
    # ~285 s re-evaluating it and then had no time left for the final fit)
    t0 = dt.datetime(2026, 1, 1, 12, 0, 0)
    rungs = [{"rung": 0, "seconds": 34.0, "trial": 2}, {"rung": 1, "seconds": 78.0, "trial": 7},
             {"rung": 2, "seconds": 168.0, "trial": 16}]
    cont, own = (cost_of(optuna.trial.FrozenTrial(
        number=number, state=optuna.trial.TrialState.COMPLETE, value=0.87 + number / 1000, values=None,
        datetime_start=t0, datetime_complete=t0 + dt.timedelta(seconds=secs), params={}, distributions={},
        user_attrs=attrs, system_attrs={}, intermediate_values={}, trial_id=number))
        for number, secs, attrs in [(16, 171, {"rungs": rungs, "promote_of": 7}),
                                    (28, 181, {"rungs": [{"rung": r, "seconds": 60.0, "trial": 28} for r in range(3)]})])
    assert cont.seconds == pytest.approx(171) and cont.run_seconds == pytest.approx(171 + 34 + 78)
    assert own.run_seconds == pytest.approx(181)  # every rung its own: nothing before it
    b = budget(timeout=10_000.0, finalists=2, folds=1)
    # both re-evaluated; either may win, and trial 16's final fit (all three rungs again) is the longer
    assert b.reserve([cont, own]) == pytest.approx(283 + 181 + 1.25 * 283)
    assert b.fit_cost(cont) == pytest.approx(283 * 1.25)


@pytest.mark.parametrize("bad", [0, -5, float("nan")])
def test_bad_timeout_is_refused(bad):
    with pytest.raises(ConfigError, match="--timeout must be > 0"):
        StudyOptions(split="balanced", timeout=bad).validate()


def test_the_final_fit_is_priced_for_every_epoch_of_the_ladder_not_the_early_stopped_trial():
    """A champion that early-stopped after 5 of 10 epochs took 100 s; its final fit runs all 10 epochs on
    1.25x the images: 250 s, and that is what the budget keeps back (and whether the final fit is skipped)."""
    from emnist_hpo.train.fidelity import make_ladder

    ladder = make_ladder("epochs", 10, 10_000, 10)
    study = optuna.create_study(direction="maximize")
    t0 = dt.datetime(2026, 1, 1)
    for ran, value in ((sum(r.epochs for r in ladder.rungs) // 2, 0.9), (None, 0.8)):
        attrs = {"epochs_run": ran} if ran else {}
        study.add_trial(optuna.trial.FrozenTrial(
            number=0, state=optuna.trial.TrialState.COMPLETE, value=value, values=None, datetime_start=t0,
            datetime_complete=t0 + dt.timedelta(seconds=100), params={}, distributions={}, user_attrs=attrs,
            system_attrs={}, intermediate_values={}, trial_id=0))
    costs = costs_of(study, ladder)
    assert [c.full for c in costs] == [2.0, 1.0]  # unknown epochs: priced as the trial itself
    assert budget().final_fit_cost(costs) == pytest.approx(100 * 2.0 * 1.25)
    assert costs_of(study)[0].full == 1.0


def test_a_finalist_is_priced_for_every_epoch_of_the_ladder_not_the_early_stopped_trial():
    """An early-stopped finalist (5 of 10 epochs in 100 s) is re-trained up the whole ladder: its re-evaluation
    is priced at 200 s per fold, not 100 (letters: finalists priced at their trials' times ran longer)."""
    stopped, other = TrialCost(0.9, 100, True, full=2.0), TrialCost(0.8, 100, True)
    assert stopped.full_seconds == 200 and other.full_seconds == 100
    b = budget(timeout=1e5, finalists=2, folds=1)
    assert b.plan([stopped, other], room=299) == (0, 0)  # 200 + 100 do not fit
    assert b.plan([stopped, other], room=300) == (2, 1)
    assert b.reserve([stopped, other]) == pytest.approx(300 + 1.25 * 200)


def test_a_re_evaluation_running_longer_than_priced_stops_before_it_crowds_out_the_final_fit():
    """Three finalists priced at 100 s each, the final fit at 250 s, 700 s left. The first takes 200 s (twice its
    price), so the second is priced at 200 s and the final fit at 500 s: 500 s left cannot hold both, and the
    re-evaluation stops there rather than leave the champion unfitted."""
    b = budget(timeout=1000.0)  # deadline at t=1000
    pacer = FinalistPacer(b, {1: 100.0, 2: 100.0, 3: 100.0}, keep=250.0)
    assert pacer(1, now=300.0) is None  # 700 s left >= 100 + 250
    reason = pacer(2, now=500.0)  # trial 1 took 200 s
    assert pacer.slower == pytest.approx(2.0)
    assert reason and "500 s left" in reason and "trial 2" in reason and "~200 s" in reason and "~500 s" in reason
    on_time = FinalistPacer(b, {1: 100.0, 2: 100.0}, keep=250.0)
    assert on_time(1, now=300.0) is None and on_time(2, now=390.0) is None  # faster than priced: never below 1
    assert on_time.slower == 1.0
    grace = 0.05 * 1000.0  # the final fit's own rule: it may overrun the budget by 5% of it
    assert FinalistPacer(b, {}, keep=250.0)(3, now=1000.0 + grace - 250.0 + 1.0)  # it needs the final fit's time
    assert FinalistPacer(b, {}, keep=250.0)(3, now=1000.0 + grace - 250.0 - 1.0) is None  # with its grace


def _finished(study, seconds: float, value: float = 0.8, **attrs) -> None:
    t0 = dt.datetime(2026, 1, 1, 12, 0, 0)
    study.add_trial(optuna.trial.FrozenTrial(
        number=0, state=optuna.trial.TrialState.COMPLETE, value=value, values=None, datetime_start=t0,
        datetime_complete=t0 + dt.timedelta(seconds=seconds), params={}, distributions={}, user_attrs=attrs,
        system_attrs={}, intermediate_values={}, trial_id=0))


def _speed_of(tmp_path, name: str, rungs, probe: dict | None):
    """The speed (Throughput.of_study) of a new study that ran ``rungs`` (work, seconds, batch-norm elements),
    after a speed probe of ``probe`` (None: no probe)."""
    from emnist_hpo.search.budget import PROBE_ATTR, Throughput

    study = optuna.create_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db", direction="maximize")
    if probe is not None:
        study.set_user_attr(PROBE_ATTR, probe)
    _finished(study, 60.0, rungs=[{"rung": 0, "work": w, "seconds": t, "norm": n, "trial": 0} for w, t, n in rungs])
    return Throughput.of_study(study)


def test_the_eta_is_not_extrapolated_from_the_big_seeds_trained_first():
    """The research's seeds (the 2-conv recipe: 929k parameters) train first and to the end; the ETA of the
    configurations still to screen comes from the plan until sampled trials have finished, then from them."""
    from emnist_hpo.search.budget import Throughput
    from emnist_hpo.search.optuna.plan import ETA_SAMPLED, Plan, search_eta
    from emnist_hpo.train.fidelity import make_ladder

    ladder = make_ladder("data", 15, 13_385, 47)
    the_plan = Plan(ladder, 13_385, 3_346, 50, [], 0.0, 0.0, Throughput(), 13.5e6)
    study = optuna.create_study(direction="maximize")
    _finished(study, 900.0, seed_experiment="two_conv")
    _finished(study, 60.0)
    _finished(study, 0.2, repeat_of=1)  # took trial 1's outcome without training
    planned = the_plan.per_config(Throughput())
    assert 0 < planned < 900
    assert search_eta(study, the_plan, 10) == pytest.approx(10 * planned)  # one sampled trial: the plan
    for _ in range(ETA_SAMPLED - 1):
        _finished(study, 120.0)
    _finished(study, 30.0, promote_of=1)  # a paused trial's continuation: more time for the same configuration
    mean = (60.0 + 120.0 * (ETA_SAMPLED - 1) + 30.0) / ETA_SAMPLED
    assert search_eta(study, the_plan, 10) == pytest.approx(10 * mean)  # sampled trials: their mean
    assert search_eta(study, the_plan, 10, workers=2) == pytest.approx(5 * mean)


def test_the_progress_bar_of_a_budgeted_study_ends_where_its_measured_pace_says():
    """A 30-minute byclass study (AMX machine) planned 225 configurations and screened 50: its bar read 50/225
    at the end. Once sampled trials have finished, the bar's end is what is finished plus what the search's
    time left affords at their pace; before that, the plan's."""
    from emnist_hpo.search.budget import Throughput
    from emnist_hpo.search.optuna.plan import ETA_SAMPLED, Plan, affordable
    from emnist_hpo.search.optuna.progress import Progress
    from emnist_hpo.train.fidelity import make_ladder

    ladder = make_ladder("data", 15, 10_545, 62)
    the_plan = Plan(ladder, 10_545, 2_637, 225, [], 0.0, 0.0, Throughput(), 13.5e6, by_budget=True)
    study = optuna.create_study(direction="maximize")
    early = affordable(study, the_plan, 1000.0)
    assert early == int(1000.0 / the_plan.per_config(Throughput()))  # nothing finished: the plan's pace
    for _ in range(ETA_SAMPLED):
        _finished(study, 25.0)
    _finished(study, 50.0, seed_experiment="compact")  # seeds are not the sampled pace
    assert affordable(study, the_plan, 1000.0) == 40  # 1000 s at 25 s a configuration
    assert affordable(study, the_plan, 1000.0, workers=2) == 80
    assert affordable(study, the_plan, -5.0) == 0  # no time left: nothing more

    shown = Progress(225, 0, True, ladder, None, total_now=lambda: len(study.trials) + affordable(study, the_plan, 1000.0))
    try:
        shown(study, study.trials[-1])
        assert shown.bar.total == len(study.trials) + 40 and shown.bar.n == 1
        shown.total_now = lambda: 0  # never below what is done
        shown(study, study.trials[-1])
        assert shown.bar.total == shown.bar.n == 2
    finally:
        shown.close()


def test_the_plan_prices_a_configuration_at_the_space_s_mean_cost_not_its_median():
    """A rung's time is linear in FLOPs, so what k configurations cost is k times the mean model's; the default
    space's FLOPs are skewed (median 13M, mean 26M under compact's size), and a plan priced at the median
    promised about twice the configurations a budget affords."""
    import statistics
    from types import SimpleNamespace

    from emnist_hpo.config import ExperimentConfig
    from emnist_hpo.errors import ConfigError
    from emnist_hpo.model.cost import model_cost
    from emnist_hpo.paths import find_search_space
    from emnist_hpo.search.budget import Throughput
    from emnist_hpo.search.optuna.plan import plan
    from emnist_hpo.search.space import SearchSpace
    from emnist_hpo.search.trial import Limits, planned_cost
    from emnist_hpo.train.fidelity import make_ladder

    ladder = make_ladder("data", 15, 10_545, 62)
    space, base = SearchSpace.load(find_search_space("default")), ExperimentConfig()
    limits = Limits(max_params=191_582)
    ctx = SimpleNamespace(
        opts=StudyOptions(split="byclass", trials=100_000, timeout=1800.0), study=optuna.create_study(), storage=None,
        ladder=ladder, multi=False, space=space, base=base, data=SimpleNamespace(y_train=range(10_545),
                                                                                   y_val=range(2_637), num_classes=62),
        budget=TimeBudget.start(1800.0, finalists=3, folds=1, final_fit=True, val_fraction=0.2))
    _finished(ctx.study, 60.0, rungs=[{"rung": 0, "work": w, "seconds": 1.0 + w / 100e9, "trial": 0}
                                      for w in (3e11, 6e11, 1.8e12)])  # this machine: 100 GFLOP/s
    the_plan = plan(ctx, limits)
    speed = the_plan.throughput
    # other draws of the space than the plan's: what a configuration really costs on average
    draws = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=12345))
    costs = []
    while len(costs) < 400:
        try:
            cost = model_cost(space.sample(draws.ask(), base).model, 62)
        except ConfigError:
            continue
        if limits.refuse(cost) is None:
            costs.append(planned_cost(cost, ladder, 10_545, 2_637, speed))
    assert the_plan.per_config(speed) == pytest.approx(statistics.fmean(costs), rel=0.2)
    assert statistics.median(costs) < 0.8 * statistics.fmean(costs)  # the median would have priced it too low


@pytest.mark.parametrize("configs, startup", [(1, 4), (12, 4), (13, 4), (17, 5), (24, 6), (50, 8), (10_000, 8)])
def test_tpe_draws_a_quarter_of_the_planned_configurations_at_random_within_4_to_8(configs, startup):
    """A 30-minute study on 2 cores screens ~12 configurations: with Optuna's fixed start (8 then) TPE would
    guide almost none of them, and the seeds it was handed would never steer it."""
    from emnist_hpo.search.optuna.plan import sampler_startup
    from emnist_hpo.search.optuna.storage import make_sampler

    assert sampler_startup(configs) == startup
    sampler = make_sampler("tpe", 0, False, startup)
    study = optuna.create_study(direction="maximize", sampler=sampler)

    def guided() -> bool:  # TPE's multivariate draw, not the start's
        trial = study.ask()
        frozen = study._storage.get_trial(trial._trial_id)
        drawn = sampler.sample_relative(study, frozen, sampler.infer_relative_search_space(study, frozen))
        study.tell(trial, trial.suggest_float("x", 0, 1) + trial.suggest_int("k", 1, 5))
        return bool(drawn) and not sampler.drawn_at_random(study, frozen)

    assert [guided() for _ in range(startup + 2)] == [False] * startup + [True, True]


def test_tpe_start_counts_configurations_that_trained_not_refused_draws_or_continuations():
    """With a tight --max-params many random draws are refused before training: they stay in TPE's model
    (it learns the limit from them) but do not use up the random start the plan promised."""
    from emnist_hpo.search.optuna.promotions import PROMOTE_ATTR
    from emnist_hpo.search.optuna.storage import make_sampler
    from emnist_hpo.search.trial import REFUSED_ATTR

    sampler = make_sampler("tpe", 0, False, 3)
    study = optuna.create_study(direction="maximize", sampler=sampler)

    def guided(attr: str | None = None) -> bool:
        trial = study.ask()
        frozen = study._storage.get_trial(trial._trial_id)
        drawn = sampler.sample_relative(study, frozen, sampler.infer_relative_search_space(study, frozen))
        value = trial.suggest_float("x", 0, 1) + trial.suggest_int("k", 1, 5)
        if attr is not None:
            trial.set_user_attr(attr, True)
        study.tell(trial, value if attr != REFUSED_ATTR else None,
                   state=optuna.trial.TrialState.PRUNED if attr == REFUSED_ATTR else None)
        return bool(drawn) and not sampler.drawn_at_random(study, frozen)

    for _ in range(2):
        guided()  # trained: 2 of 3
    assert [guided(REFUSED_ATTR) for _ in range(4)] == [False] * 4  # refused: the start is not used up
    assert guided(PROMOTE_ATTR) is False  # a continuation of a paused trial is not another configuration
    assert guided() is False  # the third trained configuration, still drawn at random
    assert guided() is True  # then TPE models all eight, the refused among them
    assert len(study.trials) == 9


def test_tpe_keeps_exploring_with_every_third_configuration_after_its_start_at_random():
    """--random-fraction 1/3 (BOHB's): TPE's good set is two or three trials in a 30-minute study and its draws
    settle on their categorical choices; evenly spaced random draws keep the rest of the space in view."""
    from emnist_hpo.search.optuna.storage import TrainedStartTPE, make_sampler

    sampler = make_sampler("tpe", 0, False, 2, random_fraction=1 / 3)
    assert [sampler.at_random(n) for n in range(11)] == [True, True] + [False, False, True] * 3
    assert [make_sampler("tpe", 0, False, 2).at_random(n) for n in range(6)] == [True, True] + [False] * 4
    assert sum(make_sampler("tpe", 0, False, 0, 0.25).at_random(n) for n in range(100)) == 25
    study = optuna.create_study(direction="maximize", sampler=sampler)

    def guided() -> bool:
        trial = study.ask()
        frozen = study._storage.get_trial(trial._trial_id)
        drawn = sampler.sample_relative(study, frozen, sampler.infer_relative_search_space(study, frozen))
        study.tell(trial, trial.suggest_float("x", 0, 1) + trial.suggest_categorical("bn", [0, 1]))
        return bool(drawn) and not sampler.drawn_at_random(study, frozen)

    assert [guided() for _ in range(8)] == [False, False, True, True, False, True, True, False]
    with pytest.raises(ValueError, match=r"random_fraction must be in \[0, 1\) \(random_fraction=1\)"):
        TrainedStartTPE(random_fraction=1)


def test_tpe_starts_from_every_kind_of_model_the_space_holds():
    """TPE guides from the kinds its start scored: eight independent draws gave one batch-normed configuration
    in eight (a balanced study), and the study trained none after it. Its start is a scrambled Sobol sequence:
    each choice of each parameter comes about as often as the others, and every depth comes."""
    from emnist_hpo.config import ExperimentConfig
    from emnist_hpo.paths import find_search_space
    from emnist_hpo.search.optuna.storage import make_sampler
    from emnist_hpo.search.space import SearchSpace

    space, base = SearchSpace.load(find_search_space("default")), ExperimentConfig()
    for seed in range(10):
        study = optuna.create_study(direction="maximize", sampler=make_sampler("tpe", seed, False, 8))
        start = []
        for _ in range(8):
            trial = study.ask()
            space.sample(trial, base)
            start.append(trial.params)
            study.tell(trial, 0.0)
        for name, choice in (("batch_norm", True), ("convs_per_block", 2), ("global_pool", True),
                             ("optimizer", "adam"), ("pool", "max")):
            assert 3 <= sum(p[name] == choice for p in start) <= 5, (seed, name, [p[name] for p in start])
        assert {p["conv_blocks"] for p in start} == {1, 2, 3, 4}, seed


def test_tpe_models_each_configuration_once_however_many_trials_it_took():
    """A leader promoted twice is three trials (paused at rung 0, paused at rung 1, complete), and a repeat of it a
    fourth: TPE counted its paused copies among its bad trials and its other copies in its good set. It sees
    each configuration once, at the trial that got furthest; a trial with no configuration key (nothing free in
    the space) stands for itself."""
    import datetime as dt

    from emnist_hpo.search.optuna.promotions import PROMOTE_ATTR
    from emnist_hpo.search.optuna.repeats import KEY_ATTR, REPEAT_ATTR
    from emnist_hpo.search.optuna.storage import OnePerConfiguration, make_sampler, one_per_configuration
    from emnist_hpo.search.trial import REFUSED_ATTR

    study = optuna.create_study(direction="maximize")
    t0 = dt.datetime(2026, 1, 1)

    def add(key, state, steps, value=None, **attrs):
        study.add_trial(optuna.trial.create_trial(
            state=state, value=value, params={"x": 0.5}, distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
            user_attrs={**({KEY_ATTR: key} if key else {}), **attrs}, intermediate_values=steps))

    P, C = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE
    add("a", P, {1: 0.80})  # 0: the leader, paused at rung 0
    add("b", P, {1: 0.83})  # 1: better at rung 0, never promoted
    add("a", P, {1: 0.80, 3: 0.85}, **{PROMOTE_ATTR: 0})  # 2: its continuation, paused at rung 1
    add("a", C, {1: 0.80, 3: 0.85, 9: 0.90}, value=0.90, **{PROMOTE_ATTR: 2})  # 3: complete
    add("a", C, {}, value=0.90, **{REPEAT_ATTR: 3})  # 4: TPE drew it again: its twin's outcome
    add("c", P, {}, **{REFUSED_ATTR: True})  # 5: refused for its size
    add("b", P, {}, **{REPEAT_ATTR: 1})  # 6: a repeat of a pruned one
    add(None, C, {}, value=0.7)  # 7, 8: a space with nothing free: every trial on purpose the same
    add(None, C, {}, value=0.6)
    assert [t.number for t in one_per_configuration(study.trials)] == [1, 3, 5, 7, 8]
    losses = [optuna.trial.create_trial(state=P, intermediate_values={1: v}, user_attrs={KEY_ATTR: "m"}) for v in (0.3, 0.2)]
    for number, t in enumerate(losses):
        t.number = number
    assert [t.number for t in one_per_configuration(losses, sign=-1.0)] == [1]  # minimizing: the lower loss
    view = OnePerConfiguration(study)
    assert [t.number for t in view._get_trials(deepcopy=False, states=(C,))] == [3, 7, 8]
    assert view.directions == study.directions  # the rest is the study's own

    # and TPE guides through it: keyed trials, one configuration drawn again, a study that goes on
    sampler = make_sampler("tpe", 0, False, 3)
    guided = optuna.create_study(direction="maximize", sampler=sampler)
    for i in range(8):
        trial = guided.ask()
        x, bn = trial.suggest_float("x", 0, 1), trial.suggest_categorical("bn", [0, 1])
        trial.set_user_attr(KEY_ATTR, "same" if i in (3, 4) else f"k{i}")
        guided.tell(trial, x + bn)
    frozen = guided._storage.get_trial(guided.ask()._trial_id)
    drawn = sampler.sample_relative(guided, frozen, sampler.infer_relative_search_space(guided, frozen))
    assert set(drawn) == {"x", "bn"}


def test_the_plan_counts_full_length_runs_as_the_leaders_of_the_rung_below_under_a_budget():
    """The plan's arithmetic for the leader rule: ~1 + ln(m/eta) successive bests among m scores at the rung
    below, and two at least where it has two (the closing run; never more than m, none without scores); without
    it, 1/eta of the rung below."""
    from emnist_hpo.search.optuna.plan import last_rung_runs
    from emnist_hpo.train.fidelity import make_ladder

    ladder = make_ladder("data", 15, 14_435, 26)
    assert len(ladder.rungs) == 3 and ladder.eta == 3
    assert last_rung_runs(27, ladder, False) == pytest.approx(3.0)  # 27 / 3**2
    assert last_rung_runs(27, ladder, True) == pytest.approx(1 + math.log(3))  # 9 scores at rung 1
    assert last_rung_runs(12, ladder, True) == pytest.approx(2.0)  # 4 scores at rung 1: a leader, the closing run
    assert last_rung_runs(6, ladder, True) == pytest.approx(2.0)  # 2 scores below eta: the best continued, the other
    assert last_rung_runs(4.5, ladder, True) == pytest.approx(1.5)  # never more runs than scores below
    assert last_rung_runs(0, ladder, True) == 0.0
    assert last_rung_runs(1, ladder, True) == pytest.approx(1 / 3)  # never more runs than scores below
    runs = [last_rung_runs(c, ladder, True) for c in (30, 60, 120, 240)]
    assert runs == sorted(runs) and runs[-1] - runs[0] == pytest.approx(math.log(8))  # grows like a log
    # --last-rung close: the closing runs alone, two however many screened (never more than the scores below)
    assert [last_rung_runs(c, ladder, True, close=True) for c in (3, 27, 240)] == [1.0, 2.0, 2.0]


def test_a_new_study_plans_with_the_speed_its_storages_other_studies_measured(tmp_path):
    """Before its first rung a study's plan uses the rungs of the other studies in its storage (this machine,
    for a local store), not the default guess; its own rungs, once it has some, win."""
    from emnist_hpo.search.budget import DEFAULT_RATE, Throughput
    from emnist_hpo.search.optuna.plan import Plan
    from emnist_hpo.train.fidelity import make_ladder

    storage = f"sqlite:///{tmp_path}/optuna.db"
    done = optuna.create_study(study_name="emnist-letters", storage=storage, direction="maximize")
    rungs = [{"rung": 0, "work": w, "seconds": 8.0 + w / 120e9, "trial": 0} for w in (5e11, 1e12, 3e12, 9e12)]
    _finished(done, 100.0, rungs=rungs)
    new = optuna.create_study(study_name="emnist-balanced", storage=storage, direction="maximize")
    assert Throughput.of_study(new).measured == 0
    prior = Throughput.of_storage(storage, skip="emnist-balanced")
    assert prior.measured == 4 and prior.rate == pytest.approx(120e9, rel=1e-6) and prior.overhead == pytest.approx(8.0)
    assert prior.rate != DEFAULT_RATE and prior.source == "other studies in this storage"
    assert Throughput.of_storage(storage, skip="emnist-letters").measured == 0  # nothing but the skipped one
    assert Throughput.of_storage(storage, skip="emnist-letters").source == ""
    ladder = make_ladder("data", 15, 13_385, 47)
    line = next(ln for ln in Plan(ladder, 13_385, 3_346, 20, [20.0], 0.0, 0.0, prior, 13.5e6).lines()
                if "this machine" in ln)
    assert "120 GFLOP/s training, 8.0 s per rung, measured on 4 rungs of other studies in this storage" in line
    assert "(default guess)" in next(ln for ln in Plan(ladder, 13_385, 3_346, 20, [20.0], 0.0, 0.0, Throughput(),
                                                       13.5e6).lines() if "this machine" in ln)


def test_a_model_that_would_take_more_than_half_the_budget_to_be_crowned_is_refused_before_training():
    """A balanced study spent 1,183 s of its 1,800 on one 80M-FLOP model (443 s up the ladder, ~740 s final fit)
    and screened 12 configurations. Under --timeout a configuration whose climb of every rung and final fit would
    take more than half the budget, at the speed the study measured, is refused untrained, like --max-flops."""
    from types import SimpleNamespace

    from emnist_hpo.model.cost import ModelCost
    from emnist_hpo.search.budget import CROWN_SHARE, Throughput
    from emnist_hpo.search.optuna.study import study_limits
    from emnist_hpo.search.trial import Limits, crown_time, planned_cost
    from emnist_hpo.train.fidelity import make_ladder

    ladder = make_ladder("data", 15, 13_385, 47)
    speed = Throughput(overhead=5.0, rate=120e9, measured=3)
    seconds = crown_time(lambda: speed, ladder, 13_385, 3_346, final_fit_scale=1.25)
    compact, heavy = ModelCost(189_647, 34_900_000), ModelCost(103_647, 80_000_000)
    up = planned_cost(heavy, ladder, 13_385, 3_346, speed, reach=[1.0] * len(ladder.rungs))
    assert seconds(heavy) == pytest.approx(up * (1 + 1.25))  # every rung, then the final fit on 1.25x the images
    assert seconds(compact) < CROWN_SHARE * 1800 < seconds(heavy)
    limits = Limits(max_seconds=CROWN_SHARE * 1800, seconds=seconds)
    assert limits.refuse(compact) is None
    why = limits.refuse(heavy)
    assert why.startswith(f"model would take ~{seconds(heavy):,.0f} s") and "> 900 s" in why and "80M FLOPs" in why
    # a refusal, not a time stop: it trained nothing and costs nothing, and the search goes on
    t0 = dt.datetime(2026, 1, 1, 12, 0, 0)
    refused = cost_of(optuna.trial.FrozenTrial(
        number=5, state=optuna.trial.TrialState.PRUNED, value=None, values=None, datetime_start=t0,
        datetime_complete=t0, params={}, distributions={}, user_attrs={"refused": True, "fail_reason": why},
        system_attrs={}, intermediate_values={}, trial_id=5))
    assert not refused.trained and not refused.out_of_time
    assert budget(timeout=1000.0).stop_search([TrialCost(0.8, 20.0, True), refused], now=100.0) is None
    # before the study has measured its speed (the default guess was 2-4x off) nothing is refused for time
    unmeasured = crown_time(lambda: Throughput(), ladder, 13_385, 3_346, final_fit_scale=1.25)
    assert Limits(max_seconds=1.0, seconds=unmeasured).refuse(heavy) is None
    # a study's limits: the time limit only under --timeout, at CROWN_SHARE of it; the final fit only if it runs
    study = optuna.create_study()
    ctx = lambda timeout, final_fit: SimpleNamespace(  # noqa: E731
        opts=SimpleNamespace(max_params=200_000, max_flops=None), study=study, ladder=ladder,
        data=SimpleNamespace(y_train=range(13_385), y_val=range(3_346)),
        budget=TimeBudget.start(timeout, finalists=0, folds=1, final_fit=final_fit, val_fraction=0.2))
    assert study_limits(ctx(None, True)) == Limits(200_000, None)
    timed = study_limits(ctx(1800.0, True))
    assert (timed.max_params, timed.max_seconds) == (200_000, CROWN_SHARE * 1800)
    assert timed.seconds(heavy) is None  # this study has measured nothing yet
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, user_attrs={"rungs": [
        {"rung": 0, "work": w, "seconds": 5.0 + w / 120e9} for w in (1e11, 5e11, 2e12)]}))
    assert timed.seconds(heavy) == pytest.approx(seconds(heavy), rel=1e-6)
    assert study_limits(ctx(1800.0, False)).seconds(heavy) == pytest.approx(up, rel=1e-6)
    # the plan says so up front
    from emnist_hpo.search.optuna.plan import Plan

    said = Plan(ladder, 13_385, 3_346, 20, [20.0], 0.0, 0.0, speed, 13.5e6, crown_limit=900.0).lines()
    assert any(ln.startswith("  refused before training: a configuration that would take over 15 min up every rung")
               for ln in said)
    assert not any("refused before training" in ln for ln in Plan(ladder, 13_385, 3_346, 20, [20.0], 0.0, 0.0,
                                                                   speed, 13.5e6).lines())


def test_a_model_slower_than_the_study_average_is_judged_again_at_its_own_speed():
    """The check before training has the study's average speed only; rates of one letters study's rungs spread
    18-100 GFLOP/s at equal FLOPs (augmentation, batch size). After a rung, the model's own speed, if slower,
    prices its climb and final fit; a faster one does not lift the study's guess."""
    from emnist_hpo.model.cost import ModelCost
    from emnist_hpo.search.budget import CROWN_SHARE, RungRecord, Throughput
    from emnist_hpo.search.trial import Limits, crown_time
    from emnist_hpo.train.fidelity import make_ladder

    ladder = make_ladder("data", 15, 13_385, 47)
    speed = Throughput(overhead=5.0, rate=120e9, measured=3)
    seconds = crown_time(lambda: speed, ladder, 13_385, 3_346, final_fit_scale=1.25)
    model = ModelCost(103_647, 40_000_000)
    work = 2e12
    slow, fast = [RungRecord(work, 5.0 + work / 40e9)], [RungRecord(work, 5.0 + work / 300e9)]
    assert seconds(model, fast) == pytest.approx(seconds(model))  # no faster than the study measured
    assert seconds(model, slow) == pytest.approx(5.0 * len(ladder.rungs) * 2.25 + (seconds(model) - 5.0 * len(
        ladder.rungs) * 2.25) * 3)  # every rung's work at a third of the rate (40 of 120 GFLOP/s)
    limits = Limits(max_seconds=CROWN_SHARE * 1800, seconds=seconds)
    assert seconds(model) < 900 < seconds(model, slow)
    assert limits.refuse(model) is None and limits.too_slow(model, fast) is None and limits.too_slow(model, []) is None
    why = limits.too_slow(model, slow)
    assert why.startswith(f"too slow to be crowned: at the speed its own rungs ran, it would take ~{seconds(model, slow):,.0f} s")
    assert "> 900 s" in why and "40M FLOPs" in why
    # before the study has measured enough rungs, the model's own rungs alone price it
    unmeasured = crown_time(lambda: Throughput(), ladder, 13_385, 3_346, final_fit_scale=1.25)
    assert unmeasured(model) is None
    assert unmeasured(model, slow) > 900 > unmeasured(model, fast)


def test_a_trial_that_runs_too_slow_to_be_crowned_stops_before_its_next_rung(prepared_sample, tmp_path):
    """Real training: a limit no model meets, the study's speed not yet measured (nothing is refused before
    training); after its first rung the trial's own speed stops it, with the reason, before it spends more."""
    from emnist_hpo.config import ExperimentConfig, TrainConfig
    from emnist_hpo.search.budget import Throughput
    from emnist_hpo.search.optuna.objective import Objective
    from emnist_hpo.search.space import SearchSpace
    from emnist_hpo.search.trial import Limits, crown_time
    from emnist_hpo.train.fidelity import Ladder, Rung

    data = prepared_sample("digits", 900)
    space = SearchSpace.from_dict({"conv_blocks": 1, "filters": 8, "kernel": 3, "dense_layers": 0, "batch_norm": True,
                                   "dense_units": 32, "learning_rate": 3.0e-3, "batch_size": 64})
    ladder = Ladder((Rung(0.5, 1, 1), Rung(1.0, 1, 2, final=True)), 3, "data")

    def study_with(max_seconds: float) -> optuna.Study:
        seconds = crown_time(lambda: Throughput(), ladder, len(data.y_train), len(data.y_val), final_fit_scale=1.25)
        objective = Objective(space, ExperimentConfig(train=TrainConfig(epochs=1)), data, ladder=ladder,
                              limits=Limits(max_seconds=max_seconds, seconds=seconds), pruner="none")
        study = optuna.create_study(direction="maximize")
        study.optimize(objective, n_trials=1, catch=())
        return study

    stopped = study_with(0.01).trials[0]
    assert stopped.state == optuna.trial.TrialState.PRUNED
    assert stopped.user_attrs["fail_reason"].startswith("too slow to be crowned")
    assert [r["rung"] for r in stopped.user_attrs["rungs"]] == [0]  # stopped before rung 1, after rung 0
    # its batch-norm work is recorded for the speed fit: 28 x 28 x 8 per image, x 3 (8 channels: the slow kernel)
    rung = stopped.user_attrs["rungs"][0]
    assert rung["norm"] == rung["images"] * 3 * 28 * 28 * 8 > 0
    assert study_with(1e6).trials[0].state == optuna.trial.TrialState.COMPLETE


def test_the_final_fit_kept_time_for_is_the_one_the_champion_needs_not_the_best_scores():
    """A byclass study kept ~369 s for its best score's final fit (compact) and stopped its search with 424 s
    left; the one-standard-error rule then crowned a smaller trial whose final fit needed ~451 s, so the
    champion's own model (trained on 80% of the data) was tested. The reserve now prices every trial that may
    be crowned: the finalists when they are re-evaluated, else those within one standard error of the best."""
    best, smaller, far = TrialCost(0.8403, 210.0, True), TrialCost(0.8335, 360.0, True), TrialCost(0.70, 900.0, True)
    b = budget(timeout=10_000.0, finalists=0, folds=1)
    assert b.final_fit_cost([best, smaller, far]) == pytest.approx(1.25 * 210)  # the best score is crowned
    b.scored = 2637  # validation images: one standard error of 0.8403 is 0.0071
    assert b.final_fit_cost([best, smaller, far]) == pytest.approx(1.25 * 360)
    assert b.reserve([best, smaller, far]) == pytest.approx(1.25 * 360)
    finalists = budget(timeout=10_000.0, finalists=3, folds=1)  # a finalist far below may win on re-evaluation
    assert finalists.final_fit_cost([best, smaller, far]) == pytest.approx(1.25 * 900)
    # with a re-evaluation only its finalists can be crowned: a trial within one standard error but outside the
    # planned finalists is not priced (a balanced study kept ~495 s where its champion's fit took ~210)
    two = budget(timeout=10_000.0, finalists=2, folds=1)
    two.scored = 2637
    third = TrialCost(0.8334, 2000.0, True)  # within one standard error of the best (0.8332), not a finalist
    assert two.plan([best, smaller, third, far]) == (2, 1)
    assert two.final_fit_cost([best, smaller, third, far]) == pytest.approx(1.25 * 360)


def test_a_final_fit_may_overrun_the_budget_by_its_grace_and_no_more():
    """A letters study had 215 s left for a 221 s final fit, skipped it, tested the champion trial's own model
    (80% of the data, 0.8 pt under compact alone) and ended 10.5% under budget. The budget's promise is 10%:
    the final fit may overrun it by 5% of it (90 s of 1,800)."""
    b = budget(timeout=1800.0)
    assert b.final_fit_fits(221.0, now=b.deadline - 215.0)  # 6 s over
    assert b.final_fit_fits(305.0, now=b.deadline - 215.0)  # 90 s over: the grace
    assert not b.final_fit_fits(306.0, now=b.deadline - 215.0)
    assert not b.final_fit_fits(100.0, now=b.deadline + 1.0)  # the budget spent: 101 s over
    assert b.final_fit_fits(80.0, now=b.deadline + 1.0)  # 81 s over
    assert TimeBudget(None).final_fit_fits(1e9)  # no budget: always


def test_before_its_first_rung_a_study_runs_at_the_speed_its_probe_measured_then_at_its_own(tmp_path):
    """A study under a budget in a new storage probes this machine before its plan; until its own rungs say
    otherwise its speed (the plan's, and the check before every rung) is the probe's, not the default guess
    (30 GFLOP/s, 8x slow on a machine with bf16 units: a letters plan said 9 configurations, the study screened 27)."""
    from emnist_hpo.search.budget import DEFAULT_RATE, PROBE_ATTR, Throughput
    from emnist_hpo.search.optuna.plan import Plan
    from emnist_hpo.train.fidelity import make_ladder

    study = optuna.create_study(study_name="emnist-letters", storage=f"sqlite:///{tmp_path}/optuna.db",
                                direction="maximize")
    assert Throughput.of_study(study).rate == DEFAULT_RATE and Throughput.of_study(study).source == ""
    study.set_user_attr(PROBE_ATTR, {"rate": 200e9, "overhead": 2.5, "seconds": 6.2})
    probed = Throughput.of_study(study)
    assert (probed.rate, probed.overhead, probed.measured) == (200e9, 2.5, 0)  # measured: no rung yet
    ladder = make_ladder("data", 15, 13_385, 47)
    line = next(ln for ln in Plan(ladder, 13_385, 3_346, 20, [20.0], 0.0, 0.0, probed, 13.5e6).lines()
                if "this machine" in ln)
    assert "200 GFLOP/s training, 2.5 s per rung, measured by a 6 s probe before the first rung" in line
    rungs = [{"rung": 0, "work": w, "seconds": 8.0 + w / 320e9, "trial": 0} for w in (5e11, 1e12, 3e12, 9e12)]
    _finished(study, 100.0, rungs=rungs)
    own = Throughput.of_study(study)
    assert own.measured == 4 and own.rate == pytest.approx(320e9, rel=1e-6)  # its rungs win over the probe


def test_rungs_of_small_models_do_not_price_larger_ones_slower_than_the_probe_measured(tmp_path):
    """Rungs of small models are mostly overhead and batch-norm, and leave the training rate unknown: a letters
    study whose first 9 rungs were of models of at most 13M FLOPs fitted 90 GFLOP/s against its probe's 173,
    priced a 40M-FLOP batch-norm model at ~979 s to be crowned, over its 900 s limit, and refused it with every
    model of compact's size (compact: 35M); the next study on that machine priced it at ~450 s from rungs of
    30-117M-FLOP models. The fit's rate is held at the probe's at least (PROBE_FLOOR), its overhead and
    batch-norm cost fitted again at it."""
    from emnist_hpo.model.cost import ModelCost
    from emnist_hpo.search.budget import PROBE_FLOOR
    from emnist_hpo.search.trial import crown_time
    from emnist_hpo.train.fidelity import make_ladder

    # that study's rungs before the refusal (work, seconds, batch-norm elements); the first, its process's first
    # rung, ran slow
    measured = [(1.02e12, 18.2, 0.0), (1.24e11, 5.1, 0.0), (4.2e11, 6.5, 0.0), (1.24e11, 5.1, 0.0),
                (3.61e11, 9.5, 0.0), (2.66e10, 5.3, 0.0), (5.3e11, 7.6, 0.0), (5.39e11, 12.0, 5.66e8),
                (1.56e12, 20.2, 1.7e9)]
    probe = {"rate": 172.6e9, "overhead": 2.2, "seconds": 4.8}

    free = _speed_of(tmp_path, "unprobed", measured, None)
    held = _speed_of(tmp_path, "probed", measured, probe)
    assert free.rate == pytest.approx(90.4e9, rel=0.01)  # no probe, no floor: the fit as it comes
    assert held.rate == PROBE_FLOOR * probe["rate"] and held.overhead >= 0 and held.norm_cost >= 0
    # the floored fit still fits the rungs it came from: within 35% of each
    assert all(0.65 < held.seconds(w, n) / t < 1.35 for w, t, n in measured)
    ladder = make_ladder("data", 15, 14_435, 26)
    limit = 900.0  # half of a 30-minute budget
    refused = ModelCost(121_202, 40_251_392, 136_704)  # 4 blocks of two convs, batch norm: 40M FLOPs

    def crown(th, cost):
        return crown_time(lambda: th, ladder, 14_435, 3_609, 1.25)(cost)

    assert crown(free, refused) > limit  # the refusal
    assert crown(held, refused) < limit
    huge = ModelCost(150_000, 400_000_000, 0)  # 400M FLOPs is too slow even at the probe's rate
    assert crown(held, huge) > limit


def test_a_fit_held_at_the_probes_rate_gives_batch_norm_its_time_rather_than_a_flat_overhead(tmp_path):
    """Held at its probe's rate (PROBE_FLOOR), a letters study on the Zen 3 machine found the best overhead
    negative with the batch-norm term, fell back to a flat 17 s per rung and priced its 267 s closing run at 174 s.
    The overhead and the batch-norm cost are now fitted under the constraint that neither is negative: the
    closing run within 10%, the rungs' rms error under half the flat fit's."""
    # that study's 33 rungs in order (work, seconds, batch-norm elements); its probe
    measured = [(1.02e12, 23.4, 0.0), (6.18e11, 13.0, 0.0), (2.92e11, 12.1, 1.51e9), (8.48e11, 21.2, 4.53e9),
                (1.26e12, 26.0, 1.14e9), (3.66e12, 62.1, 3.43e9), (1.35e12, 23.9, 1.16e9), (3.93e12, 88.0, 3.47e9),
                (1.26e12, 24.2, 1.16e9), (3.67e12, 62.8, 3.47e9), (1.26e12, 21.1, 1.16e9), (9.46e11, 25.1, 1.24e9),
                (3.28e11, 21.3, 1.07e9), (1.38e12, 33.9, 1.15e9), (4.01e12, 69.8, 3.44e9), (5.67e11, 22.4, 1.33e9),
                (1.65e12, 49.4, 3.99e9), (5.15e11, 24.6, 1.31e9), (1.5e12, 48.3, 3.94e9), (5.16e11, 21.2, 1.31e9),
                (1.5e12, 46.1, 3.94e9), (4.38e11, 14.4, 1.3e9), (2.77e11, 12.9, 7.08e8), (4.69e11, 20.7, 1.32e9),
                (4.39e11, 15.3, 1.3e9), (5.21e11, 24.1, 1.29e9), (1.51e12, 40.5, 3.88e9), (5.16e11, 14.8, 1.31e9),
                (1.25e12, 22.9, 1.29e9), (3.64e12, 76.3, 3.88e9), (1.25e12, 22.9, 1.29e9), (3.64e12, 76.3, 3.88e9),
                (1.16e13, 266.8, 1.16e10)]
    probe = {"rate": 74.1e9, "overhead": 3.7, "seconds": 9.8}
    held = _speed_of(tmp_path, "zen3", measured, probe)
    assert held.rate == pytest.approx(probe["rate"]) and held.overhead >= 0 and held.norm_cost > 0
    closing = measured[-1]
    assert held.seconds(closing[0], closing[2]) == pytest.approx(closing[1], rel=0.10)
    flat = sum(t - w / probe["rate"] for w, t, _ in measured) / len(measured)  # the fallback before
    squares = sum((held.seconds(w, n) - t) ** 2 for w, t, n in measured)
    assert squares < sum((flat + w / probe["rate"] - t) ** 2 for w, t, _ in measured) / 4  # rms under half (8 s, 18)


def test_a_batch_norm_fit_faster_than_the_probe_allows_gives_way_to_flops_alone(tmp_path):
    """Over a study's first rungs FLOPs and batch-norm work grow together, and the three-term fit can give the
    time of the FLOPs to batch-norm: a letters study fitted 1,300-3,800 GFLOP/s where its probe measured 186,
    priced an 8.5M-FLOP batch-norm model at ~420 s and refused everything its 120 s budget drew. A fit whose
    rate is over PROBE_CEILING times the probe's is dropped for FLOPs alone; a plausible one is kept."""
    from emnist_hpo.search.budget import PROBE_CEILING, RungRecord, Throughput

    # the rungs of a letters study on the AVX2 machine (probe: 91 GFLOP/s): two models without batch-norm
    # (one run twice), a 35M-FLOP and a 340k-FLOP one with it; work, seconds, batch-norm elements
    measured = [(5.94e11, 9.0, 0.0), (3.14e11, 6.0, 0.0), (1.81e12, 21.8, 1.21e9), (5.94e11, 9.0, 0.0),
                (1.76e10, 5.1, 9.05e8)]
    # the same, but the big batch-norm model ran 15 s and the tiny one 10 s: the fit puts ~all time on batch-norm
    skewed = [*measured[:2], (1.81e12, 15.0, 1.21e9), measured[3], (1.76e10, 10.0, 9.05e8)]
    probe = {"rate": 91e9, "overhead": 2.5, "seconds": 7.5}
    bn_model = (204_000 * 3 * 8.5e6, 204_000 * 168_000)  # 8.5M FLOPs, 24-channel batch-norm, up every rung

    wild = _speed_of(tmp_path, "unprobed", skewed, None)  # no probe: no bound, the fit as it comes
    assert wild.norm_cost > 0 and wild.rate > PROBE_CEILING * probe["rate"]
    bounded = _speed_of(tmp_path, "skewed", skewed, probe)
    plain = Throughput.fit([RungRecord(w, s) for w, s, _ in skewed])
    assert bounded.norm_cost == 0.0 and bounded.rate == pytest.approx(plain.rate) and bounded.measured == 5
    assert bounded.seconds(*bn_model) < wild.seconds(*bn_model) / 3  # 28 s against 130 s
    kept = _speed_of(tmp_path, "measured", measured, probe)  # 110 GFLOP/s and 1.6 ns per element: within the bound
    assert kept.norm_cost > 0 and kept.rate <= PROBE_CEILING * probe["rate"]


def test_the_probe_predicts_what_a_run_of_another_model_takes(prepared_sample):
    """The probe's speed prices another model's run from its FLOPs (what a study's plan and budget do with it)
    within a factor of 2 of the time it took; the default guess was 2-8x off on machines with AVX-512."""
    from emnist_hpo.config import ConvBlock, ExperimentConfig, ModelConfig, TrainConfig
    from emnist_hpo.model.cost import model_cost
    from emnist_hpo.search.budget import Throughput, rung_work
    from emnist_hpo.train.fidelity import single
    from emnist_hpo.train.probe import probe_speed
    from emnist_hpo.train.trainer import train

    data = prepared_sample("letters", 6000)
    probe = probe_speed(ExperimentConfig(), data.x_train, data.y_train, data.x_val, data.y_val, data.num_classes)
    assert probe.rate > 0 and probe.overhead >= 0 and probe.seconds > 0
    other = ExperimentConfig(model=ModelConfig(conv_blocks=[ConvBlock(24, 5), ConvBlock(48, 3, 2)], dense=[]),
                             train=TrainConfig(epochs=2))
    run = train(other, data.x_train, data.y_train, data.x_val, data.y_val, data.num_classes, ladder=single(2))
    flops = model_cost(other.model, data.num_classes).flops
    work = rung_work(2 * len(data.y_train), flops, 2 * len(data.y_val))
    predicted = Throughput.of_probe(probe.to_dict()).seconds(work)
    assert 0.5 < predicted / run.train_seconds < 2.0, (predicted, run.train_seconds, probe)


def test_under_a_timeout_without_trials_the_budget_alone_ends_the_search(tmp_path):
    """`--timeout 1800` alone stopped at the default 20 finished trials, refusals and rung-0 prunes counted
    (a 120 s letters study ended at 77 s; the 30-minute proof runs screen 30-60 configurations). With a budget
    and no --trials the budget decides; --trials, given, still ends it; without a budget the default is 20."""
    from emnist_hpo.cli import _study_options, build_parser
    from emnist_hpo.options import MAX_TRIALS

    def opts(*extra):
        args = build_parser().parse_args(["study", "--split", "letters", "--storage",
                                          f"sqlite:///{tmp_path}/optuna.db", "--tracking-uri",
                                          f"sqlite:///{tmp_path}/mlflow.db", *extra])
        return _study_options(args).options

    budgeted = opts("--timeout", "1800")
    assert budgeted.trials == MAX_TRIALS and budgeted.by_budget
    assert budgeted.finished(7) == "7 trials finished; the time budget decides how many more"
    both = opts("--timeout", "1800", "--trials", "30")
    assert both.trials == 30 and not both.by_budget and both.finished(7) == "7 of 30 trials finished"
    assert opts().trials == 20 and not opts().by_budget


def test_a_search_whose_draws_are_all_too_slow_to_be_crowned_stops_instead_of_drawing_more():
    """A 120 s letters study refused 15 draws in a row for time, ~0.5 s and an MLflow run apiece: under a budget
    alone it would draw until the budget ended. After REFUSED_RUN refusals for time in a row the search stops and
    says why; a trained draw or a refusal for size among them resets the count."""
    from emnist_hpo.search.budget import REFUSED_RUN, TIME_REFUSAL

    def refusal(ended, reason=f"{TIME_REFUSAL} ~280 s up every rung and through its final fit > 60 s"):
        t0 = dt.datetime(2026, 1, 1, 12, 0, 0) + dt.timedelta(seconds=ended)
        return cost_of(optuna.trial.FrozenTrial(
            number=int(ended), state=optuna.trial.TrialState.PRUNED, value=None, values=None, datetime_start=t0,
            datetime_complete=t0, params={}, distributions={}, user_attrs={"refused": True, "fail_reason": reason},
            system_attrs={}, intermediate_values={}, trial_id=int(ended)))

    start = dt.datetime(2026, 1, 1, 12, 0, 0).timestamp()
    b = TimeBudget.start(10_000.0, finalists=0, folds=1, final_fit=False, val_fraction=0.2, now=start)
    trained = TrialCost(0.8, 20.0, False, ended=start + 1)
    refused = [refusal(10 + i) for i in range(REFUSED_RUN)]
    assert all(c.too_long and not c.trained for c in refused)
    why = b.stop_search([trained, *refused], now=start + 100)
    assert why is not None and f"the last {REFUSED_RUN} configurations drawn" in why and "--timeout" in why
    assert b.stop_search([trained, *refused[1:]], now=start + 100) is None  # one short of the run
    sized = refusal(10 + REFUSED_RUN, reason="model has 300,000 parameters > --max-params 200,000")
    assert not sized.too_long
    assert b.stop_search([trained, *refused[1:], sized], now=start + 100) is None  # the latest is a size refusal


def test_a_plan_whose_budget_is_too_small_for_an_average_model_says_what_budget_would_do():
    """A 120 s letters study planned "configurations the time budget affords: 0" and ended with nothing
    trained to the end; the plan now names the budget in which an average model is not refused for time (up
    every rung and through its final fit within CROWN_SHARE of it). Measured end to end on the AVX2 machine:
    "a --timeout of ~14 min would let one train and be crowned"."""
    from emnist_hpo.search.budget import Throughput
    from emnist_hpo.search.optuna.plan import Plan
    from emnist_hpo.train.fidelity import make_ladder

    ladder = make_ladder("data", 10, 14_435, 26)
    lines = Plan(ladder, 14_435, 3_609, 0, [0.0] * 3, 0.0, 240.0, Throughput(), 14.9e6, by_budget=True,
                 enough=500.0).lines()
    assert "  too small a budget for an average sampled model: a --timeout of ~8 min would let one train and be " \
           "crowned; only smaller models will" in lines
    assert not any("too small" in ln for ln in Plan(ladder, 14_435, 3_609, 12, [12.0] * 3, 600.0, 240.0,
                                                   Throughput(), 14.9e6, by_budget=True).lines())
    # a letters study's plan at 100 GFLOP/s: 120 s affords nothing and names a budget that does; that budget does
    from types import SimpleNamespace

    from emnist_hpo.config import ExperimentConfig
    from emnist_hpo.paths import find_search_space
    from emnist_hpo.search.budget import CROWN_SHARE
    from emnist_hpo.search.optuna.plan import plan
    from emnist_hpo.search.space import SearchSpace
    from emnist_hpo.search.trial import Limits
    from emnist_hpo.options import StudyOptions

    study = optuna.create_study(direction="maximize")
    _finished(study, 60.0, rungs=[{"rung": 0, "work": w, "seconds": 3.0 + w / 100e9, "trial": 0}
                                  for w in (3e11, 6e11, 1.8e12)])

    def planned(timeout):
        ctx = SimpleNamespace(
            opts=StudyOptions(split="letters", trials=100_000, timeout=timeout), study=study, storage=None,
            ladder=ladder, multi=False, space=SearchSpace.load(find_search_space("default")), base=ExperimentConfig(),
            data=SimpleNamespace(y_train=range(14_435), y_val=range(3_609), num_classes=26),
            budget=TimeBudget.start(timeout, finalists=3, folds=1, final_fit=True, val_fraction=0.2))
        return plan(ctx, Limits(max_seconds=CROWN_SHARE * timeout, seconds=lambda *a: None))

    small = planned(120.0)
    assert small.configs == 0 and small.enough is not None and small.enough > 240
    assert any(ln.startswith("  too small a budget") for ln in small.lines())
    enough = planned(small.enough * 1.01)
    assert enough.enough is None and enough.configs >= 1


def test_a_plan_under_the_close_rule_keeps_time_for_the_final_fit_alone(tmp_path):
    """``--last-rung close`` (the default) completes no trial before its closing runs, so the search keeps time
    for the final fit alone and re-evaluates finalists only in what is left: the plan prices the same. Priced
    with a re-evaluation, a letters study on the Zen 3 machine planned "search ~16 min, then finalists and final
    fit ~14 min" and 7 configurations; it screened 20 and its final fit took ~6 min."""
    from dataclasses import replace as with_

    from emnist_hpo.search.budget import Throughput
    from emnist_hpo.search.optuna import plan as planning
    from emnist_hpo.search.trial import Limits

    speed = Throughput(overhead=4.0, rate=75e9, measured=0, source="a probe")
    priced = {}
    for rule in ("close", "leaders"):
        (tmp_path / rule).mkdir()
        ctx = _plan_context(tmp_path / rule, trials=100_000, epochs=15, n_train=14_435, n_val=3_609, timeout=1800.0,
                            name="emnist-letters")
        ctx.opts = with_(ctx.opts, last_rung=rule)
        priced[rule] = planning._priced(ctx, Limits(), 26.3e6, 0.0, speed)
    close, leaders = priced["close"], priced["leaders"]
    whole = close.finish_at(speed) / close.final_scale  # one run up the whole ladder
    assert close.finalist_runs == 0 and close.finish_seconds == pytest.approx(whole * close.final_scale)
    assert leaders.finish_seconds == pytest.approx(whole * leaders.final_scale + min(
        whole * leaders.finalist_runs, leaders.reeval_cap)) and leaders.finish_seconds > close.finish_seconds
    assert close.configs > leaders.configs >= 1  # the re-evaluation's time screens configurations instead
    assert close.seconds + close.finish_seconds <= 1800.0
    eta = [ln for ln in close.lines() if ln.startswith("  ETA")]
    assert eta == [f"  ETA: search ~{planning.duration(close.seconds)}, then the final fit (the finalists "
                   f"re-evaluated in what is left) ~{planning.duration(close.finish_seconds)}"]
    assert any("then finalists and final fit" in ln for ln in leaders.lines())


def _plan_context(tmp_path, *, trials: int, epochs: int, n_train: int, n_val: int, timeout: float | None = None,
                  name: str = "emnist-bymerge"):
    """What :func:`~emnist_hpo.search.optuna.plan.plan` reads of a study, without data or training."""
    import types

    import numpy as np

    from emnist_hpo.config import ExperimentConfig
    from emnist_hpo.paths import find_search_space
    from emnist_hpo.search.space import SearchSpace
    from emnist_hpo.train.fidelity import make_ladder

    opts = StudyOptions(split="bymerge", trials=trials, epochs=epochs, timeout=timeout)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db")
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    data = types.SimpleNamespace(y_train=np.zeros(n_train), y_val=np.zeros(n_val), num_classes=47)
    budget = TimeBudget.start(timeout, finalists=opts.finalists, folds=opts.folds, final_fit=opts.final_fit,
                              val_fraction=opts.val_fraction)
    return types.SimpleNamespace(opts=opts, space=SearchSpace.load(find_search_space("default")),
                                 base=ExperimentConfig(), data=data, storage=storage, study=study, budget=budget,
                                 ladder=make_ladder("data", epochs, n_train, 47), multi=False)


def test_a_study_without_a_budget_probes_this_machine_where_the_default_guess_prices_it_long(tmp_path, monkeypatch):
    """The README's main command (50 bymerge configurations) planned 7.6 h at the default guess (30 GFLOP/s) on
    a machine that trains at ~300: its first ETA was off tenfold until trials finished. A study that nothing in
    its storage has measured now probes this machine when the guess prices it over PROBE_WORTH, budget or not;
    a study the guess prices shorter starts at the guess, and one whose storage has measured speed uses that."""
    from emnist_hpo.search.budget import Throughput
    from emnist_hpo.search.optuna import plan as planning
    from emnist_hpo.search.trial import Limits

    probed: list[str] = []

    def probe(ctx):
        probed.append(ctx.study.study_name)
        return Throughput.of_probe({"rate": 300e9, "overhead": 1.4, "seconds": 3.2})

    monkeypatch.setattr(planning, "speed_probe", probe)
    main = _plan_context(tmp_path, trials=50, epochs=15, n_train=74_446, n_val=18_612)
    guessed = planning._priced(main, Limits(), *planning.typical_cost(main.space, main.base, 47, Limits()),
                               Throughput())
    assert guessed.seconds + guessed.finish_seconds > planning.PROBE_WORTH  # hours at the guess
    the_plan = planning.plan(main, Limits())
    assert probed == ["emnist-bymerge"]
    assert the_plan.throughput.rate == 300e9
    assert (the_plan.seconds + the_plan.finish_seconds) == pytest.approx(
        (guessed.seconds + guessed.finish_seconds) * 0.1, rel=0.25)  # ten times the speed: about a tenth
    assert "measured by a 3 s probe before the first rung" in "\n".join(the_plan.lines())

    (tmp_path / "small").mkdir()
    small = _plan_context(tmp_path / "small", trials=2, epochs=1, n_train=500, n_val=125)
    quick = planning.plan(small, Limits())
    assert probed == ["emnist-bymerge"]  # a study the guess prices under PROBE_WORTH: not worth a probe
    assert quick.seconds + quick.finish_seconds < planning.PROBE_WORTH
    assert "(default guess)" in "\n".join(quick.lines())

    # another study in the main study's storage: its rungs measured this machine, and no probe runs
    main.study.set_user_attr("speed_probe", {"rate": 300e9, "overhead": 1.4, "seconds": 3.2})
    rungs = [{"rung": 0, "work": w, "seconds": 1.5 + w / 250e9, "trial": 0} for w in (5e11, 1e12, 3e12, 9e12)]
    _finished(main.study, 100.0, rungs=rungs)
    other = _plan_context(tmp_path, trials=50, epochs=15, n_train=74_446, n_val=18_612, name="emnist-balanced")
    later = planning.plan(other, Limits())
    assert probed == ["emnist-bymerge"] and later.throughput.measured == 4
    assert later.throughput.rate == pytest.approx(250e9, rel=1e-6)


def test_the_eta_prices_the_finalists_and_final_fit_at_the_speed_and_trials_the_study_measured():
    """The ETA's finish (re-evaluating the finalists and the final fit) was the plan's figure to the end: at the
    default guess, 5.0 h through a study whose rungs ran ten times faster. It is priced at the speed the study's
    rungs measured, then, once the study has as many complete trials as it re-evaluates, at what they took."""
    from emnist_hpo.search.budget import Throughput
    from emnist_hpo.search.optuna.plan import Plan, finish_eta
    from emnist_hpo.train.fidelity import make_ladder

    ladder = make_ladder("data", 15, 74_446, 47)
    budget = TimeBudget.start(None, finalists=3, folds=1, final_fit=True, val_fraction=0.2)
    the_plan = Plan(ladder, 74_446, 18_612, 50, [], 0.0, 0.0, Throughput(), 37.7e6, finalist_runs=3.0,
                    final_scale=1.25)
    the_plan.finish_seconds = the_plan.finish_at(Throughput())
    study = optuna.create_study(direction="maximize")
    assert finish_eta(study, the_plan, budget, ladder) == the_plan.finish_seconds  # nothing measured: the plan's
    rungs = [{"rung": 0, "work": w, "seconds": 1.5 + w / 300e9, "trial": 0} for w in (5e11, 1e12, 3e12, 9e12)]
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, user_attrs={"rungs": rungs}))
    measured = finish_eta(study, the_plan, budget, ladder)
    assert measured == pytest.approx(the_plan.finish_at(Throughput.of_study(study)))
    assert measured < the_plan.finish_seconds / 5  # ten times the guessed speed
    full = sum(r.epochs for r in ladder.rungs)  # each trial ran every epoch of the ladder
    for value, seconds in ((0.86, 300.0), (0.88, 500.0)):
        _finished(study, seconds, value, epochs_run=full)
    assert finish_eta(study, the_plan, budget, ladder) == pytest.approx(measured)  # two: fewer than the finalists
    for value, seconds in ((0.87, 400.0), (0.80, 900.0)):
        _finished(study, seconds, value, epochs_run=full)
    # as many complete trials as finalists: the best three re-evaluated (300 + 500 + 400 s), and the final fit of
    # the longest of them on train+validation (500 s x 1.25); the 900 s trial is not a finalist
    assert finish_eta(study, the_plan, budget, ladder) == pytest.approx(1200.0 + 625.0)

