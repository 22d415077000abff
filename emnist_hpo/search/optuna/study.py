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
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from emnist_hpo import runtime

runtime.configure()  # before Keras loads: its backend, TensorFlow's kernels and quiet start-up

import keras
import optuna
from optuna.trial import TrialState

from emnist_hpo.search.budget import Throughput, TimeBudget, costs_of, rung_work
from emnist_hpo.search.optuna.slots import (
    StudyLock,
    claim_finalize,
    claim_lease,
    close_orphan_runs,
    drop_claim,
    fail_dead_trials,
    finish_claim,
    run_trials,
)
from emnist_hpo.config import DataConfig, ExperimentConfig, TrainConfig, load_experiment, resolve_storage
from emnist_hpo.coordination import check_sqlite_location, signal_handlers, sqlite_file, sqlite_wal, store_lock
from emnist_hpo.model.cost import human, model_cost
from emnist_hpo.data.prepared import PreparedData, prepare
from emnist_hpo.errors import ConfigError, EmnistHpoError, StorageError
from emnist_hpo.train.fidelity import Ladder, make_ladder
from emnist_hpo.search.finalize import Champion, finalize_champion
from emnist_hpo.train.hooks import TrialHooks, TrialOutcome
from emnist_hpo.search.trial import RESUME_ATTR, SEED_ATTR, WARM_ATTR, Limits, Objective, directions, interrupt_reason, planned_cost
from emnist_hpo.options import SAMPLERS, StudyOptions, check_name  # noqa: F401 - re-exported
from emnist_hpo.paths import PROJECT_ROOT, find_experiment, find_search_space  # noqa: F401 - re-exported
from emnist_hpo.search.optuna.pruners import make_pruner, no_skill_accuracy
from emnist_hpo.tracking.registry import Registered
from emnist_hpo.search.space import SearchSpace
from emnist_hpo.search.selection import Finalist, candidates_of, choose, finalists_of, reevaluate
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
from emnist_hpo.train.trainer import runtime_settings

optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar and summary say it better
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: Optuna heartbeat of running trials: written every HEARTBEAT_S, stale (FAIL) after GRACE_S without one.
#: Dead processes on this host are noticed at once through the trial's owner (see concurrency.py).
HEARTBEAT_S, GRACE_S = 30, 120
#: Study user attribute counting the processes that opened the study (each one's sampler seed differs).
SESSIONS_ATTR = "sessions"
#: A seed experiment whose trial failed this many times (not interrupted) is not enqueued again.
SEED_RETRIES = 2


@dataclass
class Plan:
    """What a study expects to do, said before it starts: configurations per rung and the time it takes."""

    ladder: Ladder
    n_train: int
    n_val: int
    configs: int  # configurations the search will screen (trials still to run, or what the budget affords)
    per_rung: list[float]  # of which, expected to reach each rung
    seconds: float  # expected wall time of the search (what is left of it)
    finish_seconds: float  # expected re-evaluation + final fit
    throughput: Throughput
    median_flops: float  # forward FLOPs per image of a typical sampled model
    by_budget: bool = False  # the configuration count is what --timeout affords

    def lines(self) -> list[str]:
        out = [f"plan: {self.ladder.mode} fidelity, {len(self.ladder.rungs)} rung(s), the best 1/{self.ladder.eta} "
               f"of each rung go on"]
        out.append("  " + self.ladder.describe(self.n_train, self.n_val).replace("; ", "\n  "))
        reach = ", ".join(f"~{n:.0f} at rung {i}" for i, n in enumerate(self.per_rung))
        what = "the time budget affords" if self.by_budget else "to screen"
        out.append(f"  configurations {what}: {self.configs} ({reach})")
        rate = f"{self.throughput.rate / 1e9:.0f} GFLOP/s training, {self.throughput.overhead:.1f} s per rung" + (
            f", measured on {self.throughput.measured} rungs" if self.throughput.measured else " (default guess)")
        out.append(f"  a typical sampled model: {human(self.median_flops)} FLOPs per image; this machine: {rate}")
        out.append(f"  ETA: search ~{_duration(self.seconds)}, then finalists and final fit "
                   f"~{_duration(self.finish_seconds)}")
        return out


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


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

    @property
    def chosen(self) -> Finalist | None:
        return next((f for f in self.finalists if self.champion_trial and f.trial == self.champion_trial.number), None)


# --------------------------------------------------------------------------- building blocks


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna RDB storage on ``url``, failing within seconds with a clear message.

    An SQLite file is shared by several processes: its connections wait up to
    60 s for a lock, it is switched to write-ahead logging, and one process at a
    time creates its schema.
    """
    check_sqlite_location(url, "Optuna storage", "--storage")
    engine_kwargs: dict[str, Any] = {}
    if url.startswith(("postgresql", "mysql")):
        engine_kwargs["connect_args"] = {"connect_timeout": 5}
    elif url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}
    db = sqlite_file(url)
    try:
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        with store_lock(url, "init"):
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                                                 grace_period=GRACE_S)
            if db is not None:
                sqlite_wal(db)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001
        text = " ".join(str(exc).split())[:300]
        raise StorageError(
            f"Optuna storage {redact(url)!r} cannot be used: {text} (give --storage sqlite:///PATH.db or a database "
            "URL such as postgresql://USER@HOST/DB)"
        ) from None
    return storage


def make_sampler(name: str, seed: int, multi: bool) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=8,
                                          constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.NSGAIISampler(seed=seed)



def base_config(opts: StudyOptions) -> ExperimentConfig:
    return ExperimentConfig(
        name=opts.name,
        train=TrainConfig(epochs=opts.epochs, seed=opts.seed, early_stopping_patience=opts.early_stopping_patience),
        data=DataConfig(val_fraction=opts.val_fraction, max_train_samples=opts.max_train_samples, seed=opts.seed),
    )


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


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

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.opts.checkpoint_dir) / self.opts.name

    @property
    def multi(self) -> bool:
        return len(self.opts.objectives) > 1


def open_study(opts: StudyOptions, progress: bool) -> StudyContext:
    """Everything a study process needs, failing on bad input before any store is written."""
    opts.validate()
    space = SearchSpace.load(find_search_space(opts.search_space))
    seeds = {n: load_experiment(find_experiment(n)) for n in opts.seed_experiments} if opts.warm_start else {}
    base = base_config(opts)
    data = prepare(opts.split, opts.data_dir, base.data, progress=progress)  # bad data: no store touched yet
    storage_url = resolve_storage(opts.storage)
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
    study.sampler = make_sampler(opts.sampler or ("nsga2" if len(opts.objectives) > 1 else "tpe"),
                                 opts.seed + 1000 * (opts.worker + session), len(opts.objectives) > 1)
    budget = _budget(opts)
    return StudyContext(opts, space, seeds, base, data, storage_url, storage, tracker, study, lock, ladder, budget,
                        no_skill)


def _load_or_create_study(opts: StudyOptions, storage, ladder: Ladder) -> optuna.Study:
    multi = len(opts.objectives) > 1
    sampler = make_sampler(opts.sampler or ("nsga2" if multi else "tpe"), opts.seed + 1000 * opts.worker, multi)
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


# --------------------------------------------------------------------------- the queue: seeds, warm starts, resumes


def _queued(study: optuna.Study, attr: str) -> dict[Any, list[optuna.trial.FrozenTrial]]:
    out: dict[Any, list[optuna.trial.FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False):
        if attr in t.user_attrs:
            out.setdefault(t.user_attrs[attr], []).append(t)
    return out


def enqueue_seeds(study: optuna.Study, space: SearchSpace, seeds: dict[str, ExperimentConfig]) -> list[str]:
    """Enqueue every seed experiment that has no finished, running or waiting trial yet.

    A seed trial that was interrupted, or whose process died, is queued again (it continues from
    its checkpoint, :func:`enqueue_resumes`); one that failed by itself :data:`SEED_RETRIES` times
    is not. Seeds outside the search space are skipped.
    """
    have = _queued(study, SEED_ATTR)
    resumed = _resumed(study)
    done = []
    for name, cfg in seeds.items():
        params = space.params_for(cfg)
        if params is None:
            continue  # the seed lies outside this search space
        trials = have.get(name, [])
        live = [t for t in trials if t.state in (*FINISHED, TrialState.RUNNING, TrialState.WAITING)]
        failed = [t for t in trials if t.state == TrialState.FAIL
                  and not _resumable_reason(t.user_attrs.get("fail_reason"))]
        if live or len(failed) >= SEED_RETRIES:
            continue
        if any(t.state == TrialState.FAIL and _resumable_reason(t.user_attrs.get("fail_reason"))
               and t.number not in resumed for t in trials):
            continue  # enqueue_resumes continues it
        study.enqueue_trial(params, user_attrs={SEED_ATTR: name})
        done.append(name)
    return done


#: Study user attribute listing the interrupted trials a new trial already continues (a finished trial is read-only).
RESUMED_ATTR = "resumed_trials"


def _resumed(study: optuna.Study) -> set[int]:
    attrs = study._storage.get_study_user_attrs(study._study_id)  # noqa: SLF001 - fresh, never cached
    return {int(n) for n in attrs.get(RESUMED_ATTR, [])}


def _resumable_reason(reason: str | None) -> bool:
    return bool(reason) and (reason.startswith("interrupted") or "died" in reason)


def enqueue_resumes(study: optuna.Study, checkpoint_dir: Path) -> list[int]:
    """Queue a continuation of every trial that was interrupted (or whose process died) mid-training.

    The new trial has the same parameters and attributes, and ``resume_of`` naming the old one:
    it takes over the old trial's checkpoint and rung records and trains on from its last epoch.
    A trial stopped before its first epoch ended (no checkpoint) simply runs again.
    """
    out = []
    resumed = _resumed(study)
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if t.number in resumed or not _resumable_reason(t.user_attrs.get("fail_reason")):
            continue
        if t.user_attrs.get("params") is None and not t.params:
            continue  # failed before it was sampled: nothing to continue
        attrs = {k: v for k, v in t.user_attrs.items() if k in (SEED_ATTR, WARM_ATTR)}
        if (checkpoint_dir / f"running_{t.number}.npz").is_file():
            attrs[RESUME_ATTR] = t.number
        study.enqueue_trial(dict(t.params), user_attrs=attrs)
        out.append(t.number)
    if out:
        study.set_user_attr(RESUMED_ATTR, sorted(resumed | set(out)))
    return out


def warm_start_sources(storage, opts: StudyOptions) -> list[str]:
    """The study names ``--warm-start-from`` means (a study name, or a split for its ``emnist-<split>`` study),
    each checked to exist in ``storage`` and to be another study."""
    if not opts.warm_start_from:
        return []
    names = {s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)}
    out = []
    for source in opts.warm_start_from:
        name = source if source in names else f"emnist-{source}"
        if name == opts.name:
            raise ConfigError(f"--warm-start-from names this study itself ({source!r}); name another study or split")
        if name not in names:
            raise ConfigError(f"--warm-start-from {source!r}: no study {name!r} in this storage (studies: "
                              f"{', '.join(sorted(names)) or 'none'})")
        out.append(name)
    return out


def enqueue_warm_start(study: optuna.Study, space: SearchSpace, storage, sources: Sequence[str], top: int,
                       log: Callable[[str], None]) -> list[str]:
    """Enqueue the best ``top`` complete trials of each other study in ``sources`` (a study name, or a split
    whose ``emnist-<split>`` study is meant) that fit this study's space, once per source."""
    have = {v.split("#")[0] for v in _queued(study, WARM_ATTR)}
    out = []
    for name in sources:
        if name in have:
            continue
        other = optuna.load_study(study_name=name, storage=storage)
        ranked = [t for t in other.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
        ranked.sort(key=lambda t: -t.values[0])
        taken = 0
        for t in ranked:
            params = {k: v for k, v in t.params.items()}
            if not space.accepts(params):
                continue
            study.enqueue_trial(params, user_attrs={WARM_ATTR: f"{name}#{t.number}"})
            out.append(f"{name}#{t.number}")
            taken += 1
            if taken >= top:
                break
        log(f"warm start from study {name!r}: {taken} of its best trials queued first"
            + ("" if taken else " (none fits this search space)"))
    return out


# --------------------------------------------------------------------------- progress


class _Progress(TrialHooks):
    """A tqdm bar over finished trials that also shows the running trial: its rung, epoch, score and ETAs.

    It is a study callback (a finished trial moves the bar) and trial hooks (a Keras callback
    updates it every epoch); a small thread refreshes it every second so the elapsed time ticks.
    """

    def __init__(self, total: int, initial: int, enabled: bool, ladder: Ladder, eta: Callable[[], float] | None = None):
        self.bar = None
        self.ladder, self.eta = ladder, eta
        self.best: float | None = None
        self._stop = threading.Event()
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=min(initial, total), desc="trials", unit="trial", file=sys.stderr,
                            bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")
            threading.Thread(target=self._tick, name="progress", daemon=True).start()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            if self.bar is not None:
                self.bar.refresh()

    def on_trial_begin(self, trial, config):
        if self.bar is None:
            return []
        who = f"trial {trial.number}"
        seed = (getattr(trial, "user_attrs", {}) or {}).get(SEED_ATTR)
        if seed:
            who += f" ({seed})"
        if RESUME_ATTR in (getattr(trial, "user_attrs", {}) or {}):
            who += f" resuming trial {trial.user_attrs[RESUME_ATTR]}"
        self._set(f"{who}: starting")
        return [_EpochProgress(self, who)]

    def on_trial_end(self, trial, outcome: TrialOutcome):
        return None

    def _set(self, text: str) -> None:
        if self.bar is None:
            return
        best = f" | best {self.best:.4f}" if self.best is not None else ""
        eta = self.eta() if self.eta is not None else float("nan")
        tail = f" | study ETA ~{_duration(eta)}" if math.isfinite(eta) else ""
        self.bar.set_postfix_str(text + best + tail, refresh=True)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.bar is None or trial.state not in FINISHED:
            return
        self.bar.update(1)
        try:
            if len(study.directions) == 1:
                self.best = study.best_value
        except ValueError:
            pass
        self._set(f"last: trial {trial.number} {trial.state.name.lower()}")

    def set(self, finished: int) -> None:
        """Show ``finished`` trials (the count other processes reached)."""
        if self.bar is not None and finished != self.bar.n:
            self.bar.n = min(finished, self.bar.total)
            self.bar.refresh()

    def close(self) -> None:
        self._stop.set()
        if self.bar is not None:
            self.bar.close()


class _EpochProgress(keras.callbacks.Callback):
    def __init__(self, progress: _Progress, who: str):
        super().__init__()
        self.progress, self.who = progress, who
        self.epochs_before = [sum(r.epochs for r in progress.ladder.rungs[:i]) for i in range(len(progress.ladder.rungs))]

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        r = int(logs.get("rung", 0))
        rungs = self.progress.ladder.rungs
        r = min(r, len(rungs) - 1)
        k = epoch + 1 - self.epochs_before[r]
        val = logs.get("val_accuracy")
        score = f" val {val:.4f}" if isinstance(val, float) and math.isfinite(val) else ""
        self.progress._set(f"{self.who}: rung {r + 1}/{len(rungs)} epoch {k}/{rungs[r].epochs}{score} "
                           f"({logs.get('epoch_time', 0):.0f} s/epoch)")


# --------------------------------------------------------------------------- planning


def typical_flops(space: SearchSpace, base: ExperimentConfig, num_classes: int, limits: Limits, n: int = 200,
                  seed: int = 0) -> float:
    """Median forward FLOPs of ``n`` random models of the space that ``limits`` let through (no training)."""
    sampler = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    flops = []
    for _ in range(n):
        try:
            cfg = space.sample(sampler.ask(), base)
        except ConfigError:
            continue
        cost = model_cost(cfg.model, num_classes)
        if limits.refuse(cost) is None:
            flops.append(cost.flops)
    return float(statistics.median(flops)) if flops else float("nan")


def plan(ctx: StudyContext, limits: Limits) -> Plan:
    """What the search will screen and how long it will take, from FLOPs and this machine's measured speed."""
    from emnist_hpo.search.budget import REEVAL_SHARE
    from emnist_hpo.model.cost import ModelCost

    opts, data, ladder = ctx.opts, ctx.data, ctx.ladder
    n, nv = len(data.y_train), len(data.y_val)
    throughput = Throughput.of_study(ctx.study)
    flops = typical_flops(ctx.space, ctx.base, data.num_classes, limits, seed=opts.seed)
    typical = ModelCost(0, int(flops) if math.isfinite(flops) else 0)
    per_config = planned_cost(typical, ladder, n, nv, throughput)  # a screened configuration, promotions included
    whole = planned_cost(typical, ladder, n, nv, throughput, reach=[1.0] * len(ladder.rungs))  # up the whole ladder
    reeval = whole * opts.finalists * opts.folds
    final = whole / (1 - opts.val_fraction) if opts.final_fit else 0.0
    left = max(0, opts.trials - finished_count(ctx.study))
    configs, by_budget = left, False
    if ctx.budget.deadline is not None:
        time_left = ctx.budget.left()
        reeval = min(reeval, REEVAL_SHARE * (opts.timeout or time_left))
        room = max(0.0, time_left - reeval - final)
        affordable = int(room / per_config) if per_config > 0 else left
        if affordable < left:
            configs, by_budget = affordable, True
    return Plan(ladder, n, nv, configs, [configs * p for p in ladder.reach()], configs * per_config, reeval + final,
                throughput, flops, by_budget)


def _rung_budget(ctx: StudyContext) -> Callable[[Ladder, int, float], str | None] | None:
    """The check before every rung: would it end past the time the search may use?"""
    if ctx.budget.deadline is None:
        return None

    def check(ladder: Ladder, index: int, work: float) -> str | None:
        throughput = Throughput.of_study(ctx.study)
        need = throughput.seconds(work)
        room = ctx.budget.left() - ctx.budget.reserve(costs_of(ctx.study))
        if need > room:
            return (f"time budget: rung {index} would take ~{need:.0f} s and {max(room, 0):.0f} s are left for the "
                    f"search (the rest is kept for the finalists and the final fit)")
        return None

    return check


# --------------------------------------------------------------------------- champion selection


def pick_champion(study: optuna.Study, tolerance: float) -> tuple[optuna.trial.FrozenTrial | None, list]:
    """Single objective: the best trial. Two: the smallest Pareto model within ``tolerance`` of the best accuracy."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None, []
    if len(study.directions) == 1:
        return study.best_trial, []
    front = sorted(study.best_trials, key=lambda t: (-t.values[0], t.values[1]))
    top = front[0].values[0]
    ok = [t for t in front if t.values[0] >= top - tolerance]
    return min(ok, key=lambda t: (t.values[1], -t.values[0])), front


def _budget(opts: StudyOptions) -> TimeBudget:
    budget = TimeBudget.start(opts.timeout, finalists=opts.finalists, folds=opts.folds, final_fit=opts.final_fit,
                              val_fraction=opts.val_fraction)
    if opts.deadline is not None:
        budget.deadline = opts.deadline
    return budget


def config_of(objective: Objective, trial: optuna.trial.FrozenTrial) -> ExperimentConfig:
    fixed = optuna.trial.FixedTrial(trial.params, number=trial.number)
    for attr in (SEED_ATTR, RESUME_ATTR):
        if attr in trial.user_attrs:
            fixed.set_user_attr(attr, trial.user_attrs[attr])
    return objective.config_for(fixed)


def _reevaluate(ctx: StudyContext, objective: Objective, log):
    """Re-train the top ``--finalists`` trials on ``--folds`` folds; crown the best mean.

    Within a time budget, only the finalists and folds that fit in what is left
    (after the final fit) are re-trained; with none, the best single score stands.
    """
    opts, study, budget = ctx.opts, ctx.study, ctx.budget
    candidates = finalists_of(study, opts.finalists)
    folds = opts.folds
    if budget.deadline is not None and candidates:
        costs = costs_of(study)
        n, folds = budget.plan(costs, room=budget.left() - budget.final_fit_cost(costs))
        if (n, folds) != (len(candidates), opts.folds):
            log(f"time budget: {budget.left():.0f} s left, enough to re-evaluate {n} finalist(s) on {folds} fold(s) "
                "and fit the champion")
        candidates = candidates[:n]
        if not candidates:
            return finalists_of(study, 1)[0], []
    log(f"re-evaluating {len(candidates)} finalist(s) on {folds} fold(s) each...")
    finalists = reevaluate(candidates_of(candidates, lambda t: config_of(objective, t)), ctx.data, folds, opts.seed,
                           ctx.ladder, log)
    if not finalists:
        return candidates[0], []
    chosen = choose(finalists, len(study.directions) > 1, opts.tolerance)
    return next(t for t in candidates if t.number == chosen.trial), finalists


# --------------------------------------------------------------------------- the loop


def make_objective(ctx: StudyContext, parent: str, extra_hooks: Sequence[TrialHooks] = ()) -> Objective:
    opts = ctx.opts
    hooks: list[TrialHooks] = [MlflowTrialHooks(ctx.tracker, parent, opts.split, opts.name, plots=opts.trial_plots)]
    hooks += list(extra_hooks)
    return Objective(
        ctx.space, ctx.base, ctx.data, ladder=ctx.ladder, objectives=opts.objectives, hooks=hooks, seeds=ctx.seeds,
        checkpoint_dir=ctx.checkpoint_dir, limits=Limits(opts.max_params, opts.max_flops), pruner=opts.pruner,
        no_skill=ctx.no_skill, budget_check=_rung_budget(ctx),
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
    from emnist_hpo.coordination import OWNER_ATTR, current_owner

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
    multi = ctx.multi
    tracker.log_params(parent, {
        "split": opts.split, "trials": opts.trials, "epochs": opts.epochs,
        "sampler": opts.sampler or ("nsga2" if multi else "tpe"), "pruner": opts.pruner,
        "objectives": ",".join(opts.objectives), "search_space": opts.search_space,
        "max_train_samples": opts.max_train_samples, "val_fraction": opts.val_fraction, "seed": opts.seed,
        "train_size": len(data.x_train), "val_size": len(data.x_val), "test_size": len(data.x_test),
        "data_source": data.source, "final_fit": opts.final_fit, "workers": opts.workers, "engine": "optuna",
        "timeout": opts.timeout, "finalists": opts.finalists, "folds": opts.folds, "max_params": opts.max_params,
        "max_flops": opts.max_flops, "fidelity": opts.fidelity, "reduction_factor": opts.reduction_factor,
        "warm_start_from": ",".join(opts.warm_start_from), "ladder": json.dumps(ctx.ladder.to_dict()),
    })
    status = "FAILED"
    limits = Limits(opts.max_params, opts.max_flops)
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
            log(f"resuming study {opts.name!r}: {done} of {opts.trials} trials finished")
        started, at_start = time.monotonic(), done

        def eta() -> float:
            n = finished_count(study) - at_start
            left = opts.trials - at_start - n
            if n <= 0:
                return the_plan.seconds + the_plan.finish_seconds
            spent = time.monotonic() - started
            search = spent / n * max(left, 0)
            if ctx.budget.deadline is not None:
                search = min(search, max(0.0, ctx.budget.left() - the_plan.finish_seconds))
            return search + the_plan.finish_seconds

        total = min(opts.trials, done + the_plan.configs) if the_plan.by_budget else opts.trials  # what the bar can fill
        progress = _Progress(total, done, opts.progress, ctx.ladder, eta)
        objective = make_objective(ctx, parent, [progress])
        try:
            if opts.workers > 1 and done < opts.trials:
                _run_workers(dataclasses.replace(opts, deadline=ctx.budget.deadline), parent, study, progress, log)
            run_trials(study, objective, target=opts.trials, lock=ctx.lock, callbacks=[progress],
                       stop=lambda: ctx.budget.stop_search(costs_of(study)), max_failures=max(3, opts.trials), log=log)
        finally:
            progress.close()
        _recover(study, tracker, log)

        champion, front = pick_champion(study, opts.tolerance)
        finalists: list[Finalist] = []
        if champion is not None and opts.finalists > 0:
            champion, finalists = _reevaluate(ctx, objective, log)
        result = StudyResult(study, champion, None, None, None, None, parent, 0.0, front, finalists, the_plan,
                             tracking_uri=tracker.tracking_uri)
        if champion is not None:
            _finalize_once(ctx, objective, parent, champion, front, result, log)
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

# The payload (options, store URLs with any password) comes on stdin: a command line is visible to every user (ps).
_WORKER_CODE = (
    "import sys; import emnist_hpo.cli as cli; getattr(cli, 'import_keras_quietly', lambda: None)(); "
    "from emnist_hpo.search.optuna.study import worker_main; sys.exit(worker_main(sys.stdin.read()))"
)


def _run_workers(opts: StudyOptions, parent: str, study: optuna.Study, progress: _Progress,
                 log: Callable[[str], None]) -> None:
    """Run the study's trials in ``opts.workers`` subprocesses (this process only watches) and wait for them.

    Each worker is ``python -c`` of :func:`worker_main`: it opens the same
    stores, nests its trial runs under this process's parent run, and never
    finalizes. Every process that opens the study gets its own sampler seed
    (see :func:`_open_study`). On Ctrl-C or
    SIGTERM the workers get SIGTERM (each closes its trial as interrupted), and
    SIGKILL if they are not gone within a minute.
    """
    env = dict(os.environ)
    env.pop("PYTEST_CURRENT_TEST", None)  # MLflow adds test-only checks under pytest
    env.setdefault("TF_NUM_INTRAOP_THREADS", str(max(1, (os.cpu_count() or 1) // opts.workers)))
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(opts.workers):
            spec = {**dataclasses.asdict(opts), "workers": 1, "progress": False}
            payload = json.dumps({"options": spec, "parent_run_id": parent})
            proc = subprocess.Popen([sys.executable, "-c", _WORKER_CODE], env=env, stdin=subprocess.PIPE, text=True)
            procs.append(proc)
            proc.stdin.write(payload)
            proc.stdin.close()
        log(f"{opts.workers} worker processes on study {opts.name!r} (pids {', '.join(str(p.pid) for p in procs)})")
        while any(p.poll() is None for p in procs):
            progress.set(finished_count(study))
            time.sleep(1.0)
    except BaseException:
        _stop_workers(procs)
        raise
    progress.set(finished_count(study))
    for i, p in enumerate(procs, 1):
        if p.returncode != 0:
            log(f"worker {i} (pid {p.pid}) exited with code {p.returncode}; any trials left run here")


def _stop_workers(procs: Sequence[subprocess.Popen], grace: float = 60.0) -> None:
    """SIGTERM every worker, then SIGKILL what is left after ``grace``; a second Ctrl-C cannot cut this short."""
    with signal_handlers(signal.SIG_IGN, (signal.SIGINT, signal.SIGTERM)):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


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
                          stop=lambda: ctx.budget.stop_search(costs_of(ctx.study)),
                          max_failures=max(3, opts.trials), log=log)
    except KeyboardInterrupt as exc:
        _after_interrupt(ctx.study, ctx.tracker, exc, log, ctx.checkpoint_dir)
        raise


# --------------------------------------------------------------------------- the champion


def _finalize_once(ctx: StudyContext, objective: Objective, parent: str, champion, front, result: StudyResult,
                   log) -> None:
    """:func:`_finalize` unless another process has done it (or is doing it) for the same champion."""
    opts, study = ctx.opts, ctx.study
    final_fit = opts.final_fit and _final_fit_fits(ctx, champion, log)
    key = {"trial": champion.number, "final_fit": final_fit, "register": opts.register}
    rec = claim_finalize(study, ctx.lock, key)
    if rec is not None:
        result.val_accuracy = float(champion.values[0])
        if rec.get("state") == "done":
            result.test_accuracy, result.params = rec.get("test_accuracy"), rec.get("params")
            reg = rec.get("registered")
            result.registered = Registered(**reg) if reg else None
            log(f"champion trial {champion.number} is already finalized"
                + (f" (registered as {reg['name']} v{reg['version']})" if reg else "") + "; nothing to redo")
        else:
            log(f"champion trial {champion.number} is being finalized by another process ({rec.get('owner')})")
        return
    try:
        with claim_lease(study, key):
            _finalize(ctx, objective, parent, champion, front, result, final_fit, log)
    except BaseException:
        drop_claim(study, key)
        raise
    reg = result.registered
    finish_claim(study, key, test_accuracy=result.test_accuracy, params=result.params,
                 registered=dataclasses.asdict(reg) if reg else None)


def _final_fit_fits(ctx: StudyContext, champion: optuna.trial.FrozenTrial, log) -> bool:
    """Within a time budget, a final fit that would overrun it is skipped: the trial's own model is registered."""
    if ctx.budget.deadline is None:
        return True
    need = ctx.budget.final_fit_cost(costs_of(ctx.study))
    if champion.datetime_start and champion.datetime_complete:
        need = (champion.datetime_complete - champion.datetime_start).total_seconds() * ctx.budget.final_fit_scale
    if need <= ctx.budget.left():
        return True
    log(f"time budget: {max(ctx.budget.left(), 0):.0f} s left, a final fit takes ~{need:.0f} s: the champion trial's "
        "own model is registered instead")
    return False


def _own_model(checkpoint: Path, number: int, log):
    """The champion trial's kept model, loaded in Keras' safe mode (no code from the file runs), or None."""
    def load():
        if not checkpoint.is_file():
            log(f"checkpoint {checkpoint} is missing; retraining trial {number}")
            return None
        try:
            return keras.saving.load_model(checkpoint, compile=False, safe_mode=True)
        except Exception as exc:  # noqa: BLE001 - any unloadable checkpoint (missing, tampered with): retrain instead
            log(f"checkpoint {checkpoint} not loaded ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); "
                f"retraining trial {number}")
            return None
    return load


def _finalize(ctx: StudyContext, objective: Objective, parent: str, champion, front, result: StudyResult,
              final_fit: bool, log) -> None:
    opts, study, tracker = ctx.opts, ctx.study, ctx.tracker
    val = float(champion.values[0])
    chosen = Champion(
        champion.number, config_of(objective, champion), val, champion.user_attrs.get("best_epoch"), "optuna",
        trial_run_id=champion.user_attrs.get("mlflow_run_id"),
        own_model=_own_model(ctx.checkpoint_dir / f"trial_{champion.number}.keras", champion.number, log),
    )
    final = finalize_champion(chosen, ctx.data, ctx.ladder, tracker=tracker, parent=parent, split=opts.split,
                              study_name=opts.name, final_fit=final_fit, register=opts.register,
                              trial_plots=opts.trial_plots, log=log)
    tracker.log_metrics(parent, {"finished_trials": finished_count(study)})
    if result.finalists:
        _log_finalists(tracker, parent, final.run_id, result.finalists, champion.number, final.test_accuracy)
    if front:
        import tempfile

        import pandas as pd

        rows = [{"trial": t.number, "val_accuracy": t.values[0], "params": t.user_attrs.get("params"),
                 "flops": t.user_attrs.get("flops")} for t in front]
        with tempfile.TemporaryDirectory() as tmp:
            pd.DataFrame(rows).to_csv(Path(tmp) / "pareto_front.csv", index=False)
            tracker.log_artifacts(parent, Path(tmp), "study")
    result.val_accuracy, result.test_accuracy, result.params = val, final.test_accuracy, final.params
    result.registered, result.final_fit = final.registered, final.final_fit
    study.set_user_attr("champion", {"trial": champion.number, "test_accuracy": final.test_accuracy,
                                     "params": final.params})
    from emnist_hpo.reporting.study_plots import log_study_plots  # Optuna's plots and the edge-of-space warning on the parent run

    log_study_plots(study, objective.space, champion, tracker, parent, log)


def _log_finalists(tracker, parent: str, final_run: str, finalists: list[Finalist], chosen: int, test: float) -> None:
    """Each finalist's re-evaluated mean and spread, the optimism of its single score, the final test accuracy."""
    import tempfile

    import pandas as pd

    metrics: dict[str, float] = {}
    for f in finalists:
        metrics.update({f"finalist_{f.trial}_mean": f.mean, f"finalist_{f.trial}_std": f.std,
                        f"finalist_{f.trial}_optimism": f.optimism})
    top = max(finalists, key=lambda f: f.original)  # the trial a single validation score would have crowned
    c = next(f for f in finalists if f.trial == chosen)
    metrics.update({"champion_reeval_mean": c.mean, "champion_reeval_std": c.std, "champion_optimism": c.optimism,
                    "best_single_score_optimism": top.optimism, "val_to_test_gap": c.mean - test})
    tracker.log_metrics(parent, metrics)
    tracker.log_metrics(final_run, {"reeval_mean": c.mean, "reeval_std": c.std, "val_to_test_gap": c.mean - test})
    tracker.set_tags(parent, {"emnist_hpo.single_score_pick": top.trial})
    with tempfile.TemporaryDirectory() as tmp:
        pd.DataFrame([f.row() for f in finalists]).to_csv(Path(tmp) / "finalists.csv", index=False, float_format="%.5f")
        tracker.log_artifacts(parent, Path(tmp), "study")


# --------------------------------------------------------------------------- the summary


def format_summary(title: str, states: dict[str, int], rows: list[tuple[str, str]], params: dict[str, Any],
                   next_steps: list[str]) -> str:
    """The end-of-study summary both engines print: states, a table of what was found, its parameters, what next."""
    lines = [title, "  states: " + ", ".join(f"{k.lower()} {v}" for k, v in sorted(states.items()))]
    if rows:
        w = max(len(k) for k, _ in rows)
        lines += [f"  {k:<{w}}  {v}" for k, v in rows]
    if params:
        lines.append("  best params:")
        lines += [f"    {k} = {v}" for k, v in sorted(params.items())]
    if next_steps:
        lines.append("  next:")
        lines += [f"    {s}" for s in next_steps]
    return "\n".join(lines)


def next_commands(split: str, parent_run_id: str | None, tracking_uri: str | None, registered: bool) -> list[str]:
    """What a user runs after a study: the UIs, the leaderboard, the champion on their own images."""
    exe = "python -m emnist_hpo"
    uri = f" --tracking-uri {redact(tracking_uri)}" if tracking_uri and "mlruns/mlflow.db" not in tracking_uri else ""
    out = [f"{exe} ui{uri}" + (f"      # the study's runs (parent run {parent_run_id})" if parent_run_id else "")]
    out.append(f"{exe} compare{uri}      # the leaderboard across splits")
    if registered:
        out.append(f"{exe} predict --split {split}{uri} IMAGE.png      # the champion on your own images")
    return out


def summary_table(res: StudyResult) -> str:
    """The end-of-study summary: best params, validation and test accuracy, parameters, time, the next commands."""
    states: dict[str, int] = {}
    for t in res.study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
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
