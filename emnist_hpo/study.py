"""The study loop: an Optuna study per split, every trial an MLflow run, the champion registered.

:func:`run_study` is what ``python -m emnist_hpo study`` calls. Re-running the
same command resumes: the study ends with ``trials`` finished (complete or
pruned) trials, whatever earlier invocations left.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
from optuna.trial import TrialState

from .budget import TimeBudget, costs_of
from .config import (
    resolve_storage,
    DataConfig,
    ExperimentConfig,
    TrainConfig,
    load_experiment,
)
from .data import check_split
from .dataset import PreparedData, prepare
from .concurrency import (
    StudyLock,
    claim_finalize,
    claim_lease,
    close_orphan_runs,
    drop_claim,
    fail_dead_trials,
    finish_claim,
    run_trials,
)
from .coordination import check_sqlite_location, sqlite_file, sqlite_wal, store_lock
from .errors import ConfigError, EmnistHpoError, StorageError
from .objective import SEED_ATTR, Objective, directions, interrupt_reason
from .options import SAMPLERS, StudyOptions, check_name
from .registry import Registered, log_and_register
from .reports import evaluate
from .search_space import SearchSpace
from .selection import Finalist, choose, finalists_of, reevaluate
from .tracking import (
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
from .pruners import make_pruner, no_skill_accuracy
from .training import TrainResult, predict_proba, release_memory, runtime_settings, train

optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar and summary say it better
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: Optuna heartbeat of running trials: written every HEARTBEAT_S, stale (FAIL) after GRACE_S without one.
#: Dead processes on this host are noticed at once through the trial's owner (see concurrency.py).
HEARTBEAT_S, GRACE_S = 30, 120


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


def find_experiment(name: str) -> Path:
    """``name`` as a path, or ``experiments/<name>.yaml`` in the working directory or the project."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    for root in (Path.cwd(), PROJECT_ROOT):
        cand = root / "experiments" / f"{name}.yaml"
        if cand.is_file():
            return cand
    raise ConfigError(f"experiment {name!r} not found (looked for {name} and experiments/{name}.yaml)")


def find_search_space(path: str) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_absolute() and (PROJECT_ROOT / p).is_file():
        return PROJECT_ROOT / p
    named = PROJECT_ROOT / "search_spaces" / f"{path}.yaml"
    if named.is_file():
        return named
    raise ConfigError(f"search space file not found: {path!r} (give a YAML path or a name in search_spaces/)")


def base_config(opts: StudyOptions) -> ExperimentConfig:
    cfg = ExperimentConfig(
        name=opts.name,
        train=TrainConfig(epochs=opts.epochs, seed=opts.seed, early_stopping_patience=opts.early_stopping_patience),
        data=DataConfig(val_fraction=opts.val_fraction, max_train_samples=opts.max_train_samples, seed=opts.seed),
    )
    return cfg


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


#: Study user attribute counting the processes that opened the study (each one's sampler seed differs).
SESSIONS_ATTR = "sessions"


def _open_study(opts: StudyOptions, storage, storage_url: str, no_skill: float = 0.0) -> optuna.Study:
    """Load or create the study; give this process a sampler seeded apart from every other process's.

    ``no_skill``: the validation accuracy of always answering the most frequent class, below
    twice which the pruner ends a trial after 2 epochs (:mod:`emnist_hpo.pruners`).
    """
    study = _load_or_create_study(opts, storage, no_skill)
    with StudyLock(storage_url, storage, opts.name).held():
        session = int(study.user_attrs.get(SESSIONS_ATTR, 0))
        study.set_user_attr(SESSIONS_ATTR, session + 1)
    # Concurrent workers must not draw the same parameters, nor a resumed run replay the first run's draws:
    # the first process to open a study uses --seed itself, the n-th seed + 1000 * n.
    multi = len(opts.objectives) > 1
    study.sampler = make_sampler(opts.sampler or ("nsga2" if multi else "tpe"),
                                 opts.seed + 1000 * (opts.worker + session), multi)
    return study


def _load_or_create_study(opts: StudyOptions, storage, no_skill: float = 0.0) -> optuna.Study:
    multi = len(opts.objectives) > 1
    sampler = make_sampler(opts.sampler or ("nsga2" if multi else "tpe"), opts.seed + 1000 * opts.worker, multi)
    pruner = make_pruner(opts.pruner if not multi else "none", opts.epochs, no_skill)
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
        return existing
    study = optuna.create_study(
        study_name=opts.name, storage=storage, sampler=sampler, pruner=pruner,
        directions=directions(opts.objectives), load_if_exists=True,
    )
    study.set_user_attr("split", opts.split)
    study.set_user_attr("objectives", list(opts.objectives))
    return study


def _enqueue_seeds(study: optuna.Study, space: SearchSpace, seeds: dict[str, ExperimentConfig]) -> list[str]:
    done = []
    for name, cfg in seeds.items():
        params = space.params_for(cfg)
        if params is None:
            continue  # the seed lies outside this search space
        study.enqueue_trial(params, user_attrs={SEED_ATTR: name}, skip_if_exists=True)
        done.append(name)
    return done


class _Progress:
    """tqdm bar over finished trials with the best value so far."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=min(initial, total), desc="trials", unit="trial", file=sys.stderr)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.bar is None or trial.state not in FINISHED:
            return
        self.bar.update(1)
        try:
            if len(study.directions) == 1:
                self.bar.set_postfix(best=f"{study.best_value:.4f}", last=trial.state.name.lower())
            else:
                self.bar.set_postfix(pareto=len(study.best_trials), last=trial.state.name.lower())
        except ValueError:
            pass

    def set(self, finished: int) -> None:
        """Show ``finished`` trials (the count other processes reached)."""
        if self.bar is not None and finished != self.bar.n:
            self.bar.n = min(finished, self.bar.total)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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


def _reevaluate(opts: StudyOptions, study: optuna.Study, objective: Objective, data: PreparedData,
                budget: TimeBudget, log):
    """Re-train the top ``opts.finalists`` trials on ``opts.folds`` folds; crown the best mean.

    Within a time budget, only the finalists and folds that fit in what is left
    (after the final fit) are re-trained; with none, the best single score stands.
    """
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
    finalists = reevaluate(objective, candidates, data, folds, opts.seed, config_of, log)
    if not finalists:
        return candidates[0], []
    chosen = choose(finalists, len(study.directions) > 1, opts.tolerance)
    return next(t for t in candidates if t.number == chosen.trial), finalists


def config_of(objective: Objective, trial: optuna.trial.FrozenTrial) -> ExperimentConfig:
    fixed = optuna.trial.FixedTrial(trial.params, number=trial.number)
    if SEED_ATTR in trial.user_attrs:
        fixed.set_user_attr(SEED_ATTR, trial.user_attrs[SEED_ATTR])
    return objective.config_for(fixed)


def final_model(
    objective: Objective, trial: optuna.trial.FrozenTrial, data: PreparedData, final_fit: bool, checkpoint: Path,
    log: Callable[[str], None] = print,
) -> tuple[Any, ExperimentConfig, TrainResult | None]:
    """The champion's model: retrained on train+validation (``final_fit``) or its trial's checkpoint.

    A checkpoint is loaded in Keras' safe mode (no code from the file runs); one that
    cannot be (missing, unreadable, tampered with) is replaced by retraining the trial.
    """
    cfg = config_of(objective, trial)
    if final_fit:
        cfg = copy.deepcopy(cfg)
        cfg.train.epochs = int(trial.user_attrs.get("best_epoch") or cfg.train.epochs)
        if cfg.train.schedule == "plateau":
            cfg.train.schedule = "constant"  # no validation set to watch in a final fit
        x, y = data.train_and_val()
        result = train(cfg, x, y, None, None, data.num_classes)
        return result.model, cfg, result
    if checkpoint.is_file():
        import keras

        try:
            return keras.saving.load_model(checkpoint, compile=False, safe_mode=True), cfg, None
        except Exception as exc:  # noqa: BLE001 - any unloadable checkpoint: retrain instead
            log(f"checkpoint {checkpoint} not loaded ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); "
                f"retraining trial {trial.number}")
    result = train(cfg, data.x_train, data.y_train, data.x_val, data.y_val, data.num_classes)
    return result.model, cfg, result


# --------------------------------------------------------------------------- the loop


def _open(opts: StudyOptions, progress: bool):
    """Everything a study process needs, failing on bad input before any store is written."""
    space = SearchSpace.load(find_search_space(opts.search_space))
    seeds = {n: load_experiment(find_experiment(n)) for n in opts.seed_experiments} if opts.warm_start else {}
    base = base_config(opts)
    data = prepare(opts.split, opts.data_dir, base.data, progress=progress)  # bad data: no store touched yet
    storage_url = resolve_storage(opts.storage)
    check_tracking_uri(resolve_tracking_uri(opts.tracking_uri))  # an unusable tracking store: fail before Optuna's
    storage = make_storage(storage_url)
    # before the tracker: a wrong split creates no experiment
    study = _open_study(opts, storage, storage_url, no_skill_accuracy(data.y_val))
    tracker = Tracker(opts.tracking_uri, f"emnist-{opts.split}")
    return space, seeds, base, data, storage_url, storage, tracker, study


def _objective(opts, space, base, data, seeds, tracker, parent: str, checkpoint_dir: Path) -> Objective:
    return Objective(
        space, base, data, objectives=opts.objectives,
        hooks=[MlflowTrialHooks(tracker, parent, opts.split, opts.name, plots=opts.trial_plots)],
        seeds=seeds, checkpoint_dir=checkpoint_dir, max_params=opts.max_params,
    )


def _recover(study: optuna.Study, tracker: Tracker, log: Callable[[str], None]) -> None:
    """Fail the trials of processes that died, close the MLflow runs they left RUNNING."""
    failed = fail_dead_trials(study)
    if failed:
        log(f"trial(s) {', '.join(map(str, failed))} of a process that died are marked FAIL")
    close_orphan_runs(study, tracker)


def _after_interrupt(study: optuna.Study, tracker: Tracker, exc: BaseException) -> None:
    """Ctrl-C or SIGTERM: this process's running trial FAIL ("interrupted"), its runs KILLED."""
    try:
        fail_dead_trials(study, mine=True, reason=interrupt_reason(exc))
        close_orphan_runs(study, tracker, mine=True, status="KILLED", reason=interrupt_reason(exc))
        close_orphan_runs(study, tracker)  # workers that had to be killed
    except Exception:  # noqa: BLE001 - best effort: the next run recovers whatever is left
        pass


def run_study(opts: StudyOptions, log: Callable[[str], None] = print) -> StudyResult:
    """Run (or resume) the study of ``opts``; finish with the champion evaluated on test and registered.

    Several processes may run the same study at once (``workers`` > 1 starts
    them here; independent processes may share a PostgreSQL storage): the study
    still ends with exactly ``trials`` finished trials, and only one process
    finalizes the champion (see :mod:`emnist_hpo.concurrency`).
    """
    t_start = time.perf_counter()
    opts.validate()
    budget = _budget(opts)
    space, seeds, base, data, storage_url, storage, tracker, study = _open(opts, opts.progress)
    lock = StudyLock(storage_url, storage, opts.name)

    parent = tracker.start_run(
        f"study-{opts.name}",
        {TAG_KIND: "study", TAG_SPLIT: opts.split, TAG_STUDY: opts.name, TAG_ENGINE: "optuna",
         "optuna.storage": redact(storage_url),
         "emnist_hpo.data_fingerprint": data.fingerprint(),
         **{f"emnist_hpo.{k}": v for k, v in runtime_settings().items()}},
    )
    tracker.log_params(parent, {
        "split": opts.split, "trials": opts.trials, "epochs": opts.epochs, "sampler": opts.sampler or "default",
        "pruner": opts.pruner, "objectives": ",".join(opts.objectives), "search_space": opts.search_space,
        "max_train_samples": opts.max_train_samples, "val_fraction": opts.val_fraction, "seed": opts.seed,
        "train_size": len(data.x_train), "val_size": len(data.x_val), "test_size": len(data.x_test),
        "data_source": data.source, "final_fit": opts.final_fit, "workers": opts.workers, "engine": "optuna",
        "timeout": opts.timeout, "finalists": opts.finalists, "folds": opts.folds, "max_params": opts.max_params,
    })
    status = "FAILED"
    try:
        _recover(study, tracker, log)
        if opts.warm_start:
            with lock.held():  # one process enqueues the seeds
                if not study.user_attrs.get("seeds_enqueued"):
                    names = _enqueue_seeds(study, space, seeds)
                    study.set_user_attr("seeds_enqueued", names)
        checkpoint_dir = Path(opts.checkpoint_dir) / opts.name
        objective = _objective(opts, space, base, data, seeds, tracker, parent, checkpoint_dir)
        done = finished_count(study)
        if done >= opts.trials:
            log(f"study {opts.name!r} already has {done} finished trials (>= {opts.trials}); nothing to run")
        elif done:
            log(f"resuming study {opts.name!r}: {done} of {opts.trials} trials finished")
        progress = _Progress(opts.trials, done, opts.progress)
        try:
            if opts.workers > 1 and done < opts.trials:
                _run_workers(dataclasses.replace(opts, deadline=budget.deadline), parent, study, progress, log)
            run_trials(study, objective, target=opts.trials, lock=lock, callbacks=[progress],
                       stop=lambda: budget.stop_search(costs_of(study)), max_failures=max(3, opts.trials), log=log)
        finally:
            progress.close()
        _recover(study, tracker, log)

        champion, front = pick_champion(study, opts.tolerance)
        finalists: list[Finalist] = []
        if champion is not None and opts.finalists > 0:
            champion, finalists = _reevaluate(opts, study, objective, data, budget, log)
        result = StudyResult(study, champion, None, None, None, None, parent, 0.0, front, finalists)
        if champion is not None:
            _finalize_once(opts, objective, tracker, parent, data, champion, front, result, checkpoint_dir, lock, log)
        status = "FINISHED"
    except KeyboardInterrupt as exc:
        status = "KILLED"
        _after_interrupt(study, tracker, exc)
        raise
    finally:
        tracker.end_run(parent, status)
    result.seconds = time.perf_counter() - t_start
    return result


# --------------------------------------------------------------------------- worker processes

_WORKER_CODE = (
    "import sys; import emnist_hpo.cli as cli; getattr(cli, 'import_keras_quietly', lambda: None)(); "
    "from emnist_hpo.study import worker_main; sys.exit(worker_main(sys.argv[1]))"
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
            procs.append(subprocess.Popen([sys.executable, "-c", _WORKER_CODE, payload], env=env,
                                          stdin=subprocess.DEVNULL))
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
    opts.validate()
    space, seeds, base, data, storage_url, storage, tracker, study = _open(opts, False)
    lock = StudyLock(storage_url, storage, opts.name)
    objective = _objective(opts, space, base, data, seeds, tracker, parent_run_id,
                           Path(opts.checkpoint_dir) / opts.name)
    try:
        budget = _budget(opts)
        return run_trials(study, objective, target=opts.trials, lock=lock,
                          stop=lambda: budget.stop_search(costs_of(study)),
                          max_failures=max(3, opts.trials), log=log)
    except KeyboardInterrupt as exc:
        _after_interrupt(study, tracker, exc)
        raise


# --------------------------------------------------------------------------- the champion


def _finalize_once(opts, objective, tracker, parent, data, champion, front, result, checkpoint_dir, lock, log) -> None:
    """:func:`_finalize` unless another process has done it (or is doing it) for the same champion."""
    study = result.study
    key = {"trial": champion.number, "final_fit": opts.final_fit, "register": opts.register}
    rec = claim_finalize(study, lock, key)
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
            _finalize(opts, objective, tracker, parent, data, champion, front, result, checkpoint_dir, log)
    except BaseException:
        drop_claim(study, key)
        raise
    reg = result.registered
    finish_claim(study, key, test_accuracy=result.test_accuracy, params=result.params,
                 registered=dataclasses.asdict(reg) if reg else None)


def _finalize(opts, objective, tracker, parent, data, champion, front, result, checkpoint_dir, log) -> None:
    study = result.study
    val = float(champion.values[0])
    log(f"champion: trial {champion.number} (val_accuracy {val:.4f}); "
        + ("final fit on train+validation..." if opts.final_fit else "evaluating on test..."))
    model, cfg, fit = final_model(objective, champion, data, opts.final_fit,
                                  checkpoint_dir / f"trial_{champion.number}.keras", log)
    data_fingerprint, test_fingerprint = data.fingerprint(), data.test_fingerprint()
    data.release_training_images()  # only the test set from here on (full bymerge: 0.55 GB less at the peak)
    release_memory()
    proba = predict_proba(model, data.x_test)
    ev = evaluate(data.y_test, proba, data.classes)
    params = int(model.count_params())
    run = tracker.start_run(
        f"champion-trial-{champion.number}",
        {TAG_KIND: "final", TAG_SPLIT: opts.split, TAG_STUDY: opts.name, "optuna.trial_number": champion.number,
         "emnist_hpo.engine": "optuna"},
        parent_run_id=parent,
    )
    tracker.log_params(run, cfg.flat_params())
    metrics = {"test_accuracy": ev.accuracy, "test_macro_f1": ev.macro_f1, "val_accuracy": val, "params": params}
    tracker.log_metrics(run, metrics)
    tracker.log_evaluation(run, ev, "test", fit.history if fit else None)
    if not opts.trial_plots and champion.user_attrs.get("mlflow_run_id"):  # CSV-only trial runs: PNGs for the champion
        tracker.log_report_plots(champion.user_attrs["mlflow_run_id"])
    from .analysis import log_champion_analysis  # misclassified gallery, confused pairs, activation maps

    log_champion_analysis(tracker, run, model, data.x_test, data.y_test, proba, data.classes, ev, log)
    tags = {"split": opts.split, "study": opts.name, "trial": champion.number, "val_accuracy": f"{val:.6f}",
            "params": params, "data_fingerprint": data_fingerprint, "test_fingerprint": test_fingerprint,
            "final_fit": opts.final_fit, "engine": "optuna"}
    reg = log_and_register(tracker, run, model, data.classes, split=opts.split, test_accuracy=ev.accuracy,
                           tags=tags, register=opts.register)
    tracker.end_run(run, "FINISHED")
    tracker.log_metrics(parent, {"best_val_accuracy": val, "test_accuracy": ev.accuracy, "champion_params": params,
                                 "finished_trials": finished_count(study)})
    tracker.set_tags(parent, {"emnist_hpo.champion_trial": champion.number, "emnist_hpo.champion_run": run})
    if result.finalists:
        _log_finalists(tracker, parent, run, result.finalists, champion.number, ev.accuracy)
    if front:
        import pandas as pd

        rows = [{"trial": t.number, "val_accuracy": t.values[0], "params": int(t.values[1])} for t in front]
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            pd.DataFrame(rows).to_csv(Path(tmp) / "pareto_front.csv", index=False)
            tracker.log_artifacts(parent, Path(tmp), "study")
    result.val_accuracy, result.test_accuracy, result.params, result.registered = val, ev.accuracy, params, reg
    study.set_user_attr("champion", {"trial": champion.number, "test_accuracy": ev.accuracy, "params": params})
    from .study_plots import log_study_plots  # Optuna's plots and the edge-of-space warning on the parent run

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


def summary_table(res: StudyResult) -> str:
    """The end-of-study summary: best params, validation and test accuracy, parameters, time."""
    lines = [f"study {res.study.study_name!r}: {finished_count(res.study)} finished trials"]
    states = {}
    for t in res.study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    lines.append("  states: " + ", ".join(f"{k.lower()} {v}" for k, v in sorted(states.items())))
    if res.champion_trial is None:
        lines.append("  no trial completed: nothing to register")
        return "\n".join(lines)
    t = res.champion_trial
    rows = [
        ("champion trial", str(t.number) + (f" (seed {t.user_attrs[SEED_ATTR]})" if SEED_ATTR in t.user_attrs else "")),
        ("validation accuracy", f"{res.val_accuracy:.4f}"),
        *([("re-evaluated val", f"{res.chosen.mean:.4f} +/- {res.chosen.std:.4f} over {len(res.chosen.scores)} folds "
            f"(optimism of its single score {res.chosen.optimism:+.4f})")] if res.chosen else []),
        ("test accuracy", f"{res.test_accuracy:.4f}" if res.test_accuracy is not None else "-"),
        ("parameters", f"{res.params:,}" if res.params else "-"),
        ("trial train time", f"{t.user_attrs.get('train_seconds', float('nan')):.1f} s"),
        ("study wall time", f"{res.seconds:.1f} s"),
    ]
    if res.registered:
        r = res.registered
        rows.append(("registered", f"{r.name} v{r.version}" + (" -> @champion" if r.champion else
                                                                " (champion kept: v" + str(r.previous_champion) + ")")))
    if res.pareto:
        rows.append(("pareto front", ", ".join(f"#{p.number}: {p.values[0]:.4f} / {int(p.values[1]):,}" for p in res.pareto[:8])))
    w = max(len(k) for k, _ in rows)
    lines += [f"  {k:<{w}}  {v}" for k, v in rows]
    lines.append("  best params:")
    lines += [f"    {k} = {v}" for k, v in sorted(t.params.items())]
    return "\n".join(lines)
