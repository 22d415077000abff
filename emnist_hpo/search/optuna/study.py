"""The study loop: an Optuna study per split, every trial an MLflow run, the champion registered.

:func:`run_study` is what ``python -m emnist_hpo study`` calls. Re-running the
same command resumes: the study ends with ``trials`` finished (complete or
pruned) trials, whatever earlier invocations left, and a trial that was
interrupted continues from its last finished epoch.

The pieces: :func:`open_study` makes a :class:`StudyContext` (options, space,
data, stores, the study, its fidelity ladder and time budget), failing on bad
input before any store is written; :func:`plan` says up front what the budget
buys; the trials run under :mod:`emnist_hpo.search.optuna.slots`'s slots; the champion
is re-evaluated (:mod:`emnist_hpo.search.selection`) and finalized once
(:mod:`emnist_hpo.search.finalize`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import optuna
from optuna.trial import TrialState

from emnist_hpo.config import ExperimentConfig, load_experiment, resolve_storage
from emnist_hpo.coordination import OWNER_ATTR, check_separate_stores, current_owner
from emnist_hpo.data.prepared import PreparedData, prepare
from emnist_hpo.errors import ConfigError, EmnistHpoError
from emnist_hpo.model.cost import human
from emnist_hpo.options import StudyOptions
from emnist_hpo.paths import find_experiment, find_search_space
from emnist_hpo.search.budget import (CROWN_SHARE, FinalistPacer, Throughput, TimeBudget, climb_seconds, cost_of,
                                      costs_of)
from emnist_hpo.search.optuna.champion import finalize_once
from emnist_hpo.search.optuna.objective import Objective, config_of
from emnist_hpo.search.optuna.plan import (Plan, affordable, closes, finish_eta, leader_rung, plan,
                                          sampler_startup, search_eta)
from emnist_hpo.search.optuna.progress import Progress
from emnist_hpo.search.optuna.pruners import make_pruner, no_skill_accuracy
from emnist_hpo.search.optuna.queue import (
    _resumable_reason,
    enqueue_resumes,
    enqueue_seeds,
    enqueue_warm_start,
    warm_start_sources,
)
from emnist_hpo.search.optuna.promotions import (CLOSING_ATTR, closers, closing_queued, drop_paused_checkpoints,
                                                enqueue_closers, enqueue_closing, enqueue_promotions,
                                                enqueue_runner_up, rung_table)
from emnist_hpo.search.optuna.repeats import is_repeat
from emnist_hpo.search.optuna.slots import StudyLock, close_orphan_runs, fail_dead_trials, run_trials
from emnist_hpo.search.optuna.storage import (DEFAULT_STARTUP, checkpoint_folder, finished_count, make_sampler,
                                              make_storage)
from emnist_hpo.search.optuna.workers import run_workers
from emnist_hpo.search.noise import no_larger, size_of, standard_error
from emnist_hpo.search.selection import Finalist, candidates_of, choose, finalists_of, reevaluate
from emnist_hpo.search.space import SearchSpace
from emnist_hpo.search.summary import format_summary, next_commands
from emnist_hpo.search.trial import SEED_ATTR, WARM_ATTR, Limits, crown_time, directions, interrupt_reason
from emnist_hpo.tracking.registry import Registered
from emnist_hpo.tracking.tracker import (
    TAG_ENGINE,
    TAG_KIND,
    TAG_SPLIT,
    TAG_STUDY,
    MlflowTrialHooks,
    Tracker,
    check_tracking_uri,
    redact,
    resolve_tracking_uri,
)
from emnist_hpo.train.fidelity import Ladder, make_ladder
from emnist_hpo.train.hooks import TrialHooks
from emnist_hpo.train.trainer import runtime_settings
optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar and summary say it better
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

#: Study user attribute counting the processes that opened the study (each one's sampler seed differs).
SESSIONS_ATTR = "sessions"


@dataclass
class StudyResult:
    study: optuna.Study
    champion_trial: optuna.trial.FrozenTrial | None  # the trial whose config was crowned
    val_accuracy: float | None  # the champion trial's best validation accuracy
    test_accuracy: float | None  # the final model's test accuracy
    params: int | None  # the final model's parameter count
    registered: Registered | None
    parent_run_id: str
    seconds: float
    pareto: list[optuna.trial.FrozenTrial] = field(default_factory=list)
    finalists: list[Finalist] = field(default_factory=list)  # re-evaluated top-k, when --finalists > 0
    plan: Plan | None = None  # what the study expected to do when it started
    final_fit: bool | None = None  # whether the champion was retrained on train+validation
    tracking_uri: str | None = None  # where its runs are
    finished_before: int = 0  # configurations the study had finished before this session

    @property
    def chosen(self) -> Finalist | None:
        return next((f for f in self.finalists if self.champion_trial and f.trial == self.champion_trial.number), None)


# --------------------------------------------------------------------------- opening a study


@dataclass
class StudyContext:
    """Everything one process of a study needs, made by :func:`open_study`."""

    opts: StudyOptions
    space: SearchSpace
    seeds: dict[str, ExperimentConfig]  # seed experiments by name (empty with --no-warm-start)
    base: ExperimentConfig
    data: PreparedData
    storage_url: str
    storage: optuna.storages.BaseStorage
    tracker: Tracker
    study: optuna.Study
    lock: StudyLock
    ladder: Ladder
    budget: TimeBudget
    no_skill: float  # accuracy of always answering the most frequent validation class
    sampler_seed: int = 0  # this process's sampler seed (--seed, offset per worker and per session)
    first_trial: int = 0  # the study's trial count when this process opened it (this session's trials come after)

    @functools.cached_property
    def checkpoint_dir(self) -> Path:
        return checkpoint_folder(self.opts.checkpoint_dir, self.study, self.storage_url)

    @property
    def multi(self) -> bool:
        return len(self.opts.objectives) > 1


def open_study(opts: StudyOptions, progress: bool) -> StudyContext:
    """Everything a study process needs, failing on bad input before any store is written."""
    opts.validate()
    space = SearchSpace.load(find_search_space(opts.search_space))
    seeds = {n: load_experiment(find_experiment(n)) for n in opts.seed_experiments} if opts.warm_start else {}
    base = opts.base_config()
    data = prepare(opts.split, opts.data_dir, base.data, progress=progress)  # bad data: no store touched yet
    storage_url = resolve_storage(opts.storage)
    check_separate_stores(storage_url, resolve_tracking_uri(opts.tracking_uri))  # not one store for both, nor crossed
    check_tracking_uri(resolve_tracking_uri(opts.tracking_uri))  # an unusable tracking store: fail before Optuna's
    storage = make_storage(storage_url)
    ladder = make_ladder(opts.fidelity, opts.epochs, len(data.y_train), data.num_classes, eta=opts.reduction_factor)
    no_skill = no_skill_accuracy(data.y_val)
    warm_start_sources(storage, opts)  # a source that does not exist: nothing written yet
    study = _load_or_create_study(opts, storage, ladder)  # before the tracker: a wrong split creates no experiment
    tracker = Tracker(opts.tracking_uri, f"emnist-{opts.split}")
    lock = StudyLock(storage_url, storage, opts.name)
    with lock.held():  # counted only once everything above was accepted
        session = int(study.user_attrs.get(SESSIONS_ATTR, 0))
        study.set_user_attr(SESSIONS_ATTR, session + 1)
    # Concurrent workers must not draw the same parameters, nor a resumed run replay the first run's draws:
    # the first process to open a study uses --seed itself, the n-th seed + 1000 * n.
    ctx = StudyContext(opts, space, seeds, base, data, storage_url, storage, tracker, study, lock, ladder,
                       _budget(opts), no_skill, sampler_seed=opts.seed + 1000 * (opts.worker + session),
                       first_trial=len(study.trials))
    # the final fit kept time for is the champion's: with the one-standard-error rule, maybe not the best score's
    ctx.budget.scored = 0 if ctx.multi else _scored(ctx)
    set_sampler(ctx, opts.startup_trials or DEFAULT_STARTUP)
    return ctx


def set_sampler(ctx: StudyContext, startup: int) -> None:
    """The study's sampler for this process, ``startup`` trials drawn quasi-randomly before TPE models the results."""
    ctx.study.sampler = make_sampler(ctx.opts.sampler_used, ctx.sampler_seed, ctx.multi, startup,
                                     ctx.opts.random_fraction)


def _load_or_create_study(opts: StudyOptions, storage, ladder: Ladder) -> optuna.Study:
    multi = len(opts.objectives) > 1
    sampler = make_sampler(opts.sampler_used, opts.seed + 1000 * opts.worker, multi)
    pruner = make_pruner(opts.pruner if not multi else "none", ladder)
    try:
        existing = optuna.load_study(study_name=opts.name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        existing = None
    if existing is not None:
        want = [optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE
                for d in directions(opts.objectives)]
        if list(existing.directions) != want:
            raise ConfigError(
                f"study {opts.name!r} exists with {len(existing.directions)} objective(s); --objectives "
                f"{','.join(opts.objectives)!r} does not match (use another --study-name)"
            )
        split = existing.user_attrs.get("split")
        if split is not None and split != opts.split:
            raise ConfigError(f"study {opts.name!r} was created for split {split!r}, not {opts.split!r}")
        made = existing.user_attrs.get("objectives")
        if made is not None and list(made) != list(opts.objectives):
            raise ConfigError(f"study {opts.name!r} was created for --objectives {','.join(made)!r}, not "
                              f"{','.join(opts.objectives)!r} (use another --study-name)")
        return existing
    study = optuna.create_study(
        study_name=opts.name, storage=storage, sampler=sampler, pruner=pruner,
        directions=directions(opts.objectives), load_if_exists=True,
    )
    study.set_user_attr("split", opts.split)
    study.set_user_attr("objectives", list(opts.objectives))
    study.set_metric_names(["val_accuracy", *opts.objectives[1:]])
    return study


# --------------------------------------------------------------------------- planning


def _rung_budget(ctx: StudyContext) -> Callable[[Ladder, int, float, float], str | None] | None:
    """The check before every rung: would it end past the time the search may use?"""
    if ctx.budget.deadline is None:
        return None

    def check(ladder: Ladder, index: int, work: float, norm: float = 0.0) -> str | None:
        if index == len(ladder.rungs) - 1 and closes(ctx) and not ctx.study.get_trials(
                deepcopy=False, states=(TrialState.COMPLETE,)):
            # --last-rung close: the first closing run is the study's only way to a champion; refused for time, a
            # 150 s digits study ended with no trial complete and nothing to register. It runs; the final fit
            # that no longer fits is then the trial's own model (the final fit's grace)
            return None
        throughput = Throughput.of_study(ctx.study)
        need = throughput.seconds(work, norm)
        # a rung below the last leaves the closing run its time; the last rung is the closing run's, or a new
        # leader's, whose run gives the last rung its second run as well
        closing = closing_seconds(ctx, CLOSING_MARGIN, throughput) if index < len(ladder.rungs) - 1 else 0.0
        room = search_room(ctx, throughput) - closing
        if need > room:
            kept = "the closing full-length run, " if closing > 0 else ""
            return (f"time budget: rung {index} would take ~{need:.0f} s and {max(room, 0):.0f} s are left for the "
                    f"search (the rest is kept for {kept}the finalists and the final fit)")
        return None

    return check


def search_room(ctx: StudyContext, throughput: Throughput | None = None) -> float:
    """Seconds of the time budget left before the finalists and the final fit (:meth:`TimeBudget.reserve`, and
    :func:`closing_fit` while no trial is complete, at ``throughput``: the study's speed, fitted if not given)."""
    left = ctx.budget.left()
    costs = costs_of(ctx.study, ctx.ladder)
    return left - ctx.budget.reserve(costs, left) - closing_fit(ctx, costs, throughput)


def _since(ctx: StudyContext) -> int:
    """The first trial of this session, for ``--last-rung close`` (:func:`~emnist_hpo.search.optuna.promotions.closers`:
    a resumed study closes again); 0 under the leader rule (one closing run per study)."""
    return ctx.first_trial if closes(ctx) else 0


def _closers(ctx: StudyContext, close: bool = True) -> list[optuna.trial.FrozenTrial]:
    """The trials this study's closing runs continue (:func:`~emnist_hpo.search.optuna.promotions.closers`): the
    best waiting at the leader rung and, by the one-standard-error rule on that rung's validation images
    (``--no-prefer-smaller``: by score alone), its smallest rival."""
    rung = leader_rung(ctx)
    images = ctx.ladder.val_sizes(len(ctx.data.y_val))[rung] if rung is not None and ctx.opts.prefer_smaller else 0
    return closers(ctx.study, ctx.checkpoint_dir, rung, close, _since(ctx), images)


def _climb(ctx: StudyContext, trial: optuna.trial.FrozenTrial, speed: Throughput, start: int | None = None) -> float:
    """:func:`~emnist_hpo.search.budget.climb_seconds` of ``trial`` on this study's ladder and data."""
    return climb_seconds(trial, ctx.ladder, len(ctx.data.y_train), len(ctx.data.y_val), speed, start=start)


def closing_fit(ctx: StudyContext, costs: Sequence | None = None, throughput: Throughput | None = None) -> float:
    """Seconds kept for the final fit of a closing run while no trial is complete (``--last-rung close``: the
    budget's reserve prices the final fit from the complete trials, and there are none until the closing runs end):
    the longest of the closing runs' (queued, running, or due: :func:`closers`), every rung from scratch on
    train+validation, at the slower of the study's speed and the trial's own; 0 otherwise."""
    if not closes(ctx) or not ctx.budget.final_fit_scale:
        return 0.0
    costs = costs_of(ctx.study, ctx.ladder) if costs is None else costs
    if any(c.complete for c in costs):
        return 0.0
    trials = ([t for t in ctx.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
               if CLOSING_ATTR in t.user_attrs]
              or _closers(ctx))
    if not trials:
        return 0.0
    speed = Throughput.of_study(ctx.study) if throughput is None else throughput
    return ctx.budget.final_fit_scale * max(_climb(ctx, t, speed, start=0) for t in trials)


#: What the search keeps for its closing run, in multiples of its price: the last trial's rungs run past their own
#: prices by seconds, and a closing run priced at 163 s found 160 s left (balanced seed 1, Intel machine).
CLOSING_MARGIN = 1.25


def closing_seconds(ctx: StudyContext, margin: float = 1.0, throughput: Throughput | None = None) -> float:
    """Seconds of the closing runs (times ``margin``: what the search keeps for them): the last rungs of the trials
    they would continue (:func:`~emnist_hpo.search.optuna.promotions.closers`), at the slower of the study's speed
    (``throughput``, when the caller has fitted it) and each trial's own; 0 when none is due (no time budget, whose
    leader rung they need, another pruner; the leader rule: the last rung empty or holding two runs)."""
    if ctx.opts.pruner != "successive-halving":
        return 0.0
    picks = _closers(ctx, closes(ctx))
    if not picks:
        return 0.0
    speed = Throughput.of_study(ctx.study) if throughput is None else throughput
    return margin * sum(_climb(ctx, t, speed) for t in picks)


def stop_search(ctx: StudyContext) -> str | None:
    """Why the search must start no more trials (:meth:`TimeBudget.stop_search`, the closing runs' time kept, and
    their final fit's while no trial is complete: :func:`closing_fit`). Once this session's closing runs are queued
    the search has stopped for good: the first closing run ran past its price, the second no longer fitted, and
    the time the budget then kept for the final fit let a new trial start after them (a letters study)."""
    closing = [t.number for t in ctx.study.get_trials(deepcopy=False)
               if CLOSING_ATTR in t.user_attrs and t.number >= ctx.first_trial]
    if closing:
        return f"the search has stopped: its closing run(s) (trial(s) {', '.join(map(str, closing))}) are queued or done"
    costs, speed = costs_of(ctx.study, ctx.ladder), Throughput.of_study(ctx.study)
    return ctx.budget.stop_search(costs, closing=closing_seconds(ctx, CLOSING_MARGIN, speed)
                                  + closing_fit(ctx, costs, speed))


# --------------------------------------------------------------------------- champion selection


def pick_champion(study: optuna.Study, tolerance: float, images: int = 0) -> tuple[optuna.trial.FrozenTrial | None, list]:
    """Single objective: the fewest parameters among the trials whose validation accuracy is within one standard
    error (on ``images`` validation images; 0: none) of the best and that are no larger than the best in
    parameters or FLOPs (:func:`~emnist_hpo.search.selection.no_larger`). Two: the smallest Pareto model within
    ``tolerance`` of the best accuracy. Equals go to the fewer FLOPs, then the earlier trial.

    Repeats (trials that took an earlier twin's outcome) are skipped: the twin trained the model.
    """
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if not is_repeat(t)]
    if not complete:
        return None, []
    if len(study.directions) == 1:
        sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
        best = max(complete, key=lambda t: sign * t.values[0])
        margin = standard_error(best.values[0], images) if sign > 0 else 0.0
        ok = [t for t in complete if sign * t.values[0] >= sign * best.values[0] - margin
              and no_larger(_size(t), _size(best))]
        return min(ok, key=lambda t: (_size(t), -sign * t.values[0], t.number)), []
    front = sorted((t for t in study.best_trials if not is_repeat(t)), key=lambda t: (-t.values[0], t.values[1]))
    top = front[0].values[0]
    ok = [t for t in front if t.values[0] >= top - tolerance]
    return min(ok, key=lambda t: (t.values[1], -t.values[0])), front


def _say_smaller(study: optuna.Study, champion: optuna.trial.FrozenTrial | None, images: int, log) -> None:
    """Say so when the one-standard-error rule crowned a smaller trial than the best single score."""
    if champion is None or len(study.directions) > 1:
        return
    best, _ = pick_champion(study, 0.0, images=0)  # no margin: the best score
    if best.number != champion.number:
        log(f"trial {champion.number} ({champion.values[0]:.4f}, {champion.user_attrs.get('params')} params) is "
            f"within one standard error ({standard_error(best.values[0], images):.4f} on {images} validation images) "
            f"of trial {best.number}'s best score ({best.values[0]:.4f}, {best.user_attrs.get('params')} params): "
            "the smaller one leads (--no-prefer-smaller: the best score)")


def _size(t: optuna.trial.FrozenTrial) -> tuple[float, float]:
    """Parameters, then FLOPs (unknown: last)."""
    return size_of(t.user_attrs)


def _promotions(ctx: StudyContext, log) -> dict[str, Callable[[], list[int]]]:
    """``run_trials``' hooks: before every trial, queue the continuation of each paused trial now in the best
    1/eta of its rung; when the search ends with no trial at the last rung, continue the best paused one."""
    eta = ctx.ladder.eta

    def prepare() -> list[int]:
        if ctx.opts.pruner != "successive-halving":
            return []
        numbers = enqueue_promotions(ctx.study, eta, ctx.checkpoint_dir, leader_rung(ctx), closes(ctx))
        for n in numbers:
            log(f"trial {n}, paused, is now in the best 1/{eta} of its rung: queued to continue")
        return numbers

    def finish() -> list[int]:
        if ctx.opts.pruner != "successive-halving":
            return []
        queued = closing_queued(ctx.study)
        if queued:  # closing runs queued when the search stopped, one still to run
            return queued
        if closes(ctx):
            numbers = close_last_rung()
            if numbers:
                return numbers
        numbers = enqueue_closing(ctx.study, ctx.checkpoint_dir)
        for n in numbers:
            log(f"no trial has reached the last rung: trial {n}, the best paused one, continues")
        if numbers:
            return numbers
        need = closing_seconds(ctx)
        if need <= 0:
            return []
        room = search_room(ctx)
        if need > room:  # a run its rung check would stop at once: not begun
            log(f"no time for the closing run: the last rung holds one run, and a second would take ~{need:.0f} s "
                f"of the {max(room, 0):.0f} s left before the finalists and the final fit")
            return []
        numbers = enqueue_runner_up(ctx.study, ctx.checkpoint_dir, leader_rung(ctx))
        for n in numbers:
            log(f"the last rung holds one run: trial {n}, the best waiting at the rung below, continues to the end "
                f"(~{need:.0f} s; the closing run), so that no leader is crowned unopposed")
        return numbers

    def close_last_rung() -> list[int]:
        """``--last-rung close``: the search has stopped; the rung below's best and its smallest rival go on to the
        end (:func:`_closers`), those whose last rungs fit before the finalists and the final fit (the best at least,
        while no trial is complete: its rung check decides)."""
        picks = _closers(ctx)
        if not picks:
            return []
        speed = Throughput.of_study(ctx.study)
        room, spent, chosen = search_room(ctx, speed), 0.0, []
        for t in picks:
            need = _climb(ctx, t, speed)
            if spent + need > room and chosen:
                log(f"no time for trial {t.number}'s closing run: ~{need:.0f} s, and {max(room - spent, 0):.0f} s are "
                    "left before the finalists and the final fit")
                break
            chosen.append(t)
            spent += need
        numbers = enqueue_closers(ctx.study, chosen)
        scores = rung_table(ctx.study.get_trials(deepcopy=False)).get(leader_rung(ctx), {})
        runs = ", ".join(f"trial {t.number} ({scores.get(t.number, float('nan')):.4f}, {human(params)} params, "
                         f"{human(flops)} FLOPs)" for t in chosen for params, flops in [_size(t)])
        log(f"the search has stopped: rung {leader_rung(ctx)}'s best and, within one standard error of it, its "
            f"smallest rival (else its next best) go on to the end, {len(numbers)} closing run(s): {runs} "
            f"(~{spent:.0f} s)")
        return numbers

    return {"prepare": prepare, "finish": finish}


def _budget(opts: StudyOptions) -> TimeBudget:
    budget = TimeBudget.start(opts.timeout, finalists=opts.finalists, folds=opts.folds, final_fit=opts.final_fit,
                              val_fraction=opts.val_fraction)
    if opts.deadline is not None:
        budget.deadline = opts.deadline
    return budget


def _reevaluate(ctx: StudyContext, objective: Objective, picked: optuna.trial.FrozenTrial, log):
    """Re-train the top ``--finalists`` trials on ``--folds`` folds; crown by their means.

    Within a time budget, only the finalists and folds that fit in what is left
    (after the final fit) are re-trained; with none, ``picked`` (by the single scores) stands.
    """
    opts, study, budget = ctx.opts, ctx.study, ctx.budget
    candidates = finalists_of(study, opts.finalists)
    folds = opts.folds
    pacer = None
    if budget.deadline is not None and candidates:
        costs = costs_of(study, ctx.ladder)
        keep = budget.final_fit_cost(costs)
        n, folds = budget.plan(costs, room=budget.left() - keep)
        if (n, folds) != (len(candidates), opts.folds):
            log(f"time budget: {budget.left():.0f} s left, enough to re-evaluate {n} finalist(s) on {folds} fold(s) "
                "and fit the champion")
        candidates = candidates[:n]
        if not candidates:
            return picked, []
        prices = {t.number: c.full_seconds * folds for t in candidates if (c := cost_of(t, ctx.ladder)) is not None}
        pacer = FinalistPacer(budget, prices, keep)
    log(f"re-evaluating {len(candidates)} finalist(s) on {folds} fold(s) each...")
    finalists = reevaluate(candidates_of(candidates, lambda t: config_of(objective, t)), ctx.data, folds, opts.seed,
                           ctx.ladder, log, check=pacer)
    if pacer is not None and len(finalists) < 2:  # stopped for time: one finalist is compared with nothing, and
        return picked, []  # the single scores' pick stands
    if not finalists:
        return candidates[0], []
    chosen = choose(finalists, len(study.directions) > 1, opts.tolerance, _scored(ctx) * folds)
    return next(t for t in candidates if t.number == chosen.trial), finalists


def _scored(ctx: StudyContext) -> int:
    """Validation images behind a trial's score, for the one-standard-error margin (0: ``--no-prefer-smaller``)."""
    return len(ctx.data.y_val) if ctx.opts.prefer_smaller else 0


# --------------------------------------------------------------------------- the loop


def study_limits(ctx: StudyContext) -> Limits:
    """What a trial of this study may cost: ``--max-params``, ``--max-flops`` and, under ``--timeout``, at most
    ``CROWN_SHARE`` of the budget to climb every rung and be fitted finally (at the speed the study measured)."""
    opts = ctx.opts
    if ctx.budget.timeout is None:
        return Limits(opts.max_params, opts.max_flops)
    seconds = crown_time(lambda: Throughput.of_study(ctx.study), ctx.ladder, len(ctx.data.y_train),
                         len(ctx.data.y_val), ctx.budget.final_fit_scale)
    return Limits(opts.max_params, opts.max_flops, CROWN_SHARE * ctx.budget.timeout, seconds)


def make_objective(ctx: StudyContext, parent: str, extra_hooks: Sequence[TrialHooks] = ()) -> Objective:
    opts = ctx.opts
    hooks: list[TrialHooks] = [MlflowTrialHooks(ctx.tracker, parent, opts.split, opts.name, plots=opts.trial_plots)]
    hooks += list(extra_hooks)
    return Objective(
        ctx.space, ctx.base, ctx.data, ladder=ctx.ladder, objectives=opts.objectives, hooks=hooks, seeds=ctx.seeds,
        checkpoint_dir=ctx.checkpoint_dir, limits=study_limits(ctx), pruner=opts.pruner,
        no_skill=ctx.no_skill, budget_check=_rung_budget(ctx), leader_rung=leader_rung(ctx), close=closes(ctx),
    )


def _recover(study: optuna.Study, tracker: Tracker, log: Callable[[str], None]) -> None:
    """Fail the trials of processes that died, close the MLflow runs they left RUNNING."""
    failed = fail_dead_trials(study)
    if failed:
        log(f"trial(s) {', '.join(map(str, failed))} of a process that died are marked FAIL")
    close_orphan_runs(study, tracker)


def _after_interrupt(study: optuna.Study, tracker: Tracker, exc: BaseException, log: Callable[[str], None],
                     checkpoint_dir: Path | None = None) -> None:
    """Ctrl-C or SIGTERM: this process's running trial FAIL ("interrupted"), its runs KILLED; say what is kept."""
    try:
        fail_dead_trials(study, mine=True, reason=interrupt_reason(exc))
        close_orphan_runs(study, tracker, mine=True, status="KILLED", reason=interrupt_reason(exc))
        close_orphan_runs(study, tracker)  # workers that had to be killed
        me = current_owner()
        stopped = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                   if t.user_attrs.get(OWNER_ATTR) == me and _resumable_reason(t.user_attrs.get("fail_reason"))]
        done = finished_count(study)
        what = f"{done} finished trial{'s' if done != 1 else ''} saved"
        for t in stopped:
            kept = checkpoint_dir is not None and (checkpoint_dir / f"running_{t.number}.npz").is_file()
            what += (f"; trial {t.number} stopped mid-training and "
                     + ("continues from its last finished epoch on resume" if kept else "starts again on resume"))
        log(what)
    except Exception:  # noqa: BLE001 - best effort: the next run recovers whatever is left
        pass


def _prepare_queue(ctx: StudyContext, log: Callable[[str], None]) -> None:
    opts, study = ctx.opts, ctx.study
    with ctx.lock.held():  # one process at a time decides what is queued
        resumed = enqueue_resumes(study, ctx.checkpoint_dir)
        if resumed:
            log(f"trial(s) {', '.join(map(str, resumed))} were interrupted: queued to continue from their last epoch")
        if opts.warm_start_from:
            enqueue_warm_start(study, ctx.space, ctx.storage, warm_start_sources(ctx.storage, opts),
                               opts.warm_start_top, log)
        if opts.warm_start:
            names = enqueue_seeds(study, ctx.space, ctx.seeds)
            if names:
                study.set_user_attr("seeds_enqueued", sorted(set(study.user_attrs.get("seeds_enqueued", [])) | set(names)))


def run_study(opts: StudyOptions, log: Callable[[str], None] = print) -> StudyResult:
    """Run (or resume) the study of ``opts``; finish with the champion evaluated on test and registered.

    Several processes may run the same study at once (``workers`` > 1 starts
    them here; independent processes may share a PostgreSQL storage): the study
    still ends with exactly ``trials`` finished trials, and only one process
    finalizes the champion (see :mod:`emnist_hpo.search.optuna.slots`).
    """
    t_start = time.perf_counter()
    ctx = open_study(opts, opts.progress)
    opts, study, tracker, data = ctx.opts, ctx.study, ctx.tracker, ctx.data
    parent = tracker.start_run(
        f"study-{opts.name}",
        {TAG_KIND: "study", TAG_SPLIT: opts.split, TAG_STUDY: opts.name, TAG_ENGINE: "optuna",
         "optuna.storage": redact(ctx.storage_url),
         "emnist_hpo.data_fingerprint": data.fingerprint(),
         **{f"emnist_hpo.{k}": v for k, v in runtime_settings().items()}},
    )
    tracker.log_params(parent, {
        "split": opts.split, "trials": opts.trials, "epochs": opts.epochs,
        "sampler": opts.sampler_used, "random_fraction": opts.random_fraction, "pruner": opts.pruner,
        "objectives": ",".join(opts.objectives), "search_space": opts.search_space,
        "max_train_samples": opts.max_train_samples, "val_fraction": opts.val_fraction, "seed": opts.seed,
        "train_size": len(data.x_train), "val_size": len(data.x_val), "test_size": len(data.x_test),
        "data_source": data.source, "final_fit": opts.final_fit, "workers": opts.workers, "engine": "optuna",
        "timeout": opts.timeout, "finalists": opts.finalists, "folds": opts.folds, "max_params": opts.max_params,
        "max_flops": opts.max_flops, "fidelity": opts.fidelity, "reduction_factor": opts.reduction_factor,
        "warm_start_from": ",".join(opts.warm_start_from), "ladder": json.dumps(ctx.ladder.to_dict()),
    })
    status = "FAILED"
    limits = study_limits(ctx)
    result: StudyResult | None = None
    try:
        _recover(study, tracker, log)
        _prepare_queue(ctx, log)
        the_plan = plan(ctx, limits)
        for line in the_plan.lines():
            log(line)
        done = finished_count(study)
        if done >= opts.trials:
            log(f"study {opts.name!r} already has {done} finished trials (>= {opts.trials}); nothing to run")
        elif done:
            log(f"resuming study {opts.name!r}: {opts.finished(done)}")
        at_start = done

        def search_left(finish: float) -> float:
            """Seconds of the time budget left to the search: what is left but the ``finish`` (the closing run,
            the finalists and the final fit, which come after it)."""
            return max(0.0, ctx.budget.left() - finish)

        def eta() -> float:
            n = finished_count(study) - at_start
            left = opts.trials - at_start - n
            if n <= 0:
                return the_plan.seconds + the_plan.finish_seconds
            finish = finish_eta(study, the_plan, ctx.budget, ctx.ladder) + closing_seconds(ctx)  # what follows the search
            search = search_eta(study, the_plan, left, opts.workers)
            if ctx.budget.deadline is not None:
                search = min(search, search_left(finish))
            return search + finish

        total = min(opts.trials, done + the_plan.configs) if the_plan.by_budget else opts.trials  # what the bar can fill

        def total_now() -> int | None:
            """Under a time budget, the bar's end: what is finished and what the search's time left affords."""
            if not the_plan.by_budget:
                return None
            finish = finish_eta(study, the_plan, ctx.budget, ctx.ladder) + closing_seconds(ctx)  # what follows the search
            return min(opts.trials, finished_count(study) + affordable(study, the_plan, search_left(finish), opts.workers))

        startup = sampler_startup(total)
        if opts.sampler_used == "tpe":
            set_sampler(ctx, startup)
            log(f"  sampler: TPE, its first {startup} configurations drawn quasi-randomly (seeds included; Sobol), then guided"
                + (f", {opts.random_fraction:.0%} of them at random" if opts.random_fraction else ""))
        progress = Progress(total, done, opts.progress, ctx.ladder, eta, total_now)
        objective = make_objective(ctx, parent, [progress])
        try:
            if opts.workers > 1 and done < opts.trials:
                run_workers(dataclasses.replace(opts, deadline=ctx.budget.deadline, startup_trials=startup), parent, study, progress, log)
            run_trials(study, objective, target=opts.trials, lock=ctx.lock, callbacks=[progress],
                       stop=lambda: stop_search(ctx), max_failures=max(3, opts.trials), log=log,
                       **_promotions(ctx, log))
            drop_paused_checkpoints(study, ctx.checkpoint_dir)  # the search is over: none will be continued
        finally:
            progress.close()
        _recover(study, tracker, log)

        champion, front = pick_champion(study, opts.tolerance, _scored(ctx))
        _say_smaller(study, champion, _scored(ctx), log)
        finalists: list[Finalist] = []
        if champion is not None and opts.finalists > 0:
            champion, finalists = _reevaluate(ctx, objective, champion, log)
        result = StudyResult(study, champion, None, None, None, None, parent, 0.0, front, finalists, the_plan,
                             tracking_uri=tracker.tracking_uri, finished_before=at_start)
        if champion is not None:
            finalize_once(ctx, objective, parent, champion, front, result, log)
        status = "FINISHED"
    except KeyboardInterrupt as exc:
        status = "KILLED"
        _after_interrupt(study, tracker, exc, log, ctx.checkpoint_dir)
        raise
    finally:
        tracker.end_run(parent, status)
    result.seconds = time.perf_counter() - t_start
    return result


# --------------------------------------------------------------------------- worker processes

def worker_main(payload: str) -> int:
    """Entry point of one worker subprocess of ``study --workers N``; returns its exit code."""

    def interrupted(signum, frame):  # the first signal interrupts; later ones must not cut the clean-up short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    spec = json.loads(payload)
    opts = StudyOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["options"].items()})

    def log(message: str) -> None:
        print(f"emnist-hpo worker (pid {os.getpid()}): {message}", file=sys.stderr, flush=True)

    try:
        run_worker(opts, spec["parent_run_id"], log)
    except KeyboardInterrupt:
        return 130
    except EmnistHpoError as exc:
        log(f"error: {' '.join(str(exc).split())}")
        return exc.exit_code
    return 0


def run_worker(opts: StudyOptions, parent_run_id: str, log: Callable[[str], None] = print) -> int:
    """Run trials of an existing study until it has ``opts.trials`` finished ones; return how many ran here."""
    ctx = open_study(opts, False)
    objective = make_objective(ctx, parent_run_id)
    try:
        return run_trials(ctx.study, objective, target=opts.trials, lock=ctx.lock,
                          stop=lambda: stop_search(ctx),
                          max_failures=max(3, opts.trials), log=log, **_promotions(ctx, log))
    except KeyboardInterrupt as exc:
        _after_interrupt(ctx.study, ctx.tracker, exc, log, ctx.checkpoint_dir)
        raise


# --------------------------------------------------------------------------- the summary


def screened_row(res: StudyResult) -> str:
    """``51 finished this session (the plan: ~99 trained); trained at each rung: 34 / 19 / 4``: what the
    search did against what its plan said (it counts trained configurations; refusals finish untrained), so
    that a plan far off shows at the end of the study that made it. The rungs count the whole study's."""
    table = rung_table(res.study.get_trials(deepcopy=False))
    session = finished_count(res.study) - res.finished_before
    planned = f" (the plan: ~{res.plan.configs} trained)" if res.plan is not None and res.plan.by_budget else ""
    rungs = " / ".join(str(len(table.get(i, {}))) for i in range(max(table, default=-1) + 1))
    return f"{session} finished this session{planned}" + (f"; trained at each rung: {rungs}" if rungs else "")


def summary_table(res: StudyResult) -> str:
    """The end-of-study summary: best params, validation and test accuracy, parameters, time, the next commands."""
    states: dict[str, int] = {}
    for t in res.study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
        if is_repeat(t):  # "repeated (not retrained) 2": a configuration already trained, its twin's outcome taken
            states["REPEATED (NOT RETRAINED)"] = states.get("REPEATED (NOT RETRAINED)", 0) + 1
    title = f"study {res.study.study_name!r}: {finished_count(res.study)} finished trials"
    split = res.study.user_attrs.get("split", "")
    if res.champion_trial is None:
        return format_summary(title + "\n  no trial completed: nothing to register", states, [], {}, [])
    t = res.champion_trial
    who = str(t.number) + (f" (seed {t.user_attrs[SEED_ATTR]})" if SEED_ATTR in t.user_attrs else
                           f" (warm start from {t.user_attrs[WARM_ATTR]})" if WARM_ATTR in t.user_attrs else
                           " (sampled)")
    flops = t.user_attrs.get("flops")
    rows = [
        ("champion trial", who),
        ("validation accuracy", f"{res.val_accuracy:.4f}" if res.val_accuracy is not None else "-"),
        *([("re-evaluated val", f"{res.chosen.mean:.4f} +/- {res.chosen.std:.4f} over {len(res.chosen.scores)} folds "
            f"(optimism of its single score {res.chosen.optimism:+.4f})")] if res.chosen else []),
        ("test accuracy", f"{res.test_accuracy:.4f}" if res.test_accuracy is not None else "-"),
        ("parameters", f"{res.params:,}" if res.params else "-"),
        *([("FLOPs per image", human(flops))] if flops else []),
        ("trial train time", f"{t.user_attrs.get('train_seconds', float('nan')):.1f} s"),
        ("study wall time", f"{res.seconds:.1f} s"),
    ]
    rows.append(("configurations", screened_row(res)))
    if res.final_fit is False:
        rows.append(("final fit", "skipped: the trial's own model (time budget or --no-final-fit)"))
    if res.registered:
        r = res.registered
        rows.append(("registered", f"{r.name} v{r.version}" + (" -> @champion" if r.champion else
                                                                " (champion kept: v" + str(r.previous_champion) + ")")))
    if res.pareto:
        size = res.study.user_attrs.get("objectives", ["accuracy", "params"])[-1]
        rows.append((f"pareto front (accuracy / {size})", ", ".join(f"#{p.number}: {p.values[0]:.4f} / {human(p.values[1])}"
                                               for p in res.pareto[:8])))
    rows.append(("parent run", res.parent_run_id))
    return format_summary(title, states, rows, dict(t.params),
                          next_commands(split, res.parent_run_id, res.tracking_uri, bool(res.registered)))
