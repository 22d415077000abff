"""A second search engine: Keras Tuner (Hyperband or Bayesian optimisation) over the same search space.

``python -m emnist_hpo study --engine keras-tuner --tuner hyperband|bayesian`` runs here.
The search-space YAML stays the single source of truth: :class:`HpTrial` exposes
Optuna's ``suggest_int/suggest_float/suggest_categorical`` over a
``kt.HyperParameters``, so :meth:`SearchSpace.sample` (inside
:meth:`SpaceHyperModel.build`) defines the same parameters for both engines.

Everything else is the Optuna engine's: :func:`~emnist_hpo.train.trainer.train` trains
every trial, :class:`~emnist_hpo.tracking.tracker.MlflowTrialHooks` makes each trial a
nested MLflow run of the study's parent run (same tags, per-epoch metrics,
validation reports) plus the tag ``emnist_hpo.engine=keras-tuner``, and the
champion is evaluated on test, analysed and registered exactly as a study's.
``--trials`` and ``--epochs`` mean the same in both engines (trials the search
ends with; epochs per training run), so equal budgets compare the engines.

Keras Tuner specifics:

- Hyperband (``max_epochs`` = ``--epochs``, factor 3) runs brackets until
  ``--trials`` trials exist. A trial promoted to a later round continues from
  the weights its earlier round saved, as Keras Tuner's own Hyperband does
  (the optimiser and the learning-rate schedule start afresh). Each completed
  trial keeps its learning rate at every epoch from scratch (``learning_rates.json``
  in its trial folder, its earlier rounds' epochs included), which a ``plateau``
  champion's final fit replays.
- Bayesian optimisation (a Gaussian process) starts from random points
  (3 per searched dimension) and models the rest.
- The seed experiments (``--seed-experiments``) are tried first, as in a study.
- State lives in ``mlruns/keras_tuner/<study-name>`` (Keras Tuner's project
  folder); running the same command again resumes. Optuna-only options
  (``--sampler``, ``--storage``, ``--objectives accuracy,params``) are refused;
  ``--pruner`` does not apply (Hyperband is its own early stopping).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from emnist_hpo import runtime

runtime.configure()  # before Keras loads: its backend, TensorFlow's kernels and quiet start-up

import keras
import keras_tuner as kt

from emnist_hpo.search.budget import RungRecord, Throughput, rung_norm, rung_work
from emnist_hpo.config import ExperimentConfig, load_experiment
from emnist_hpo.model.cost import model_cost
from emnist_hpo.data.prepared import PreparedData, prepare
from emnist_hpo.errors import ConfigError
from emnist_hpo.train.fidelity import single
from emnist_hpo.search.finalize import Champion, finalize_champion
from emnist_hpo.train.hooks import TrialHooks
from emnist_hpo.search.trial import Limits, run_trial
from emnist_hpo.options import StudyOptions
from emnist_hpo.paths import find_experiment, find_search_space
from emnist_hpo.tracking.registry import Registered
from emnist_hpo.search.space import SearchSpace
from emnist_hpo.search.selection import Candidate, choose, reevaluate
from emnist_hpo.search.summary import format_summary, next_commands
from emnist_hpo.tracking.tracker import TAG_ENGINE, TAG_KIND, TAG_SPLIT, TAG_STUDY, MlflowTrialHooks, Tracker, redact
from emnist_hpo.train.trainer import RungControl, compile_model, dtype_policy, resolve_precision

ENGINE = "keras-tuner"
TUNERS = ("hyperband", "bayesian")
#: Where Keras Tuner keeps its projects (relative to the working directory), one folder per study.
DEFAULT_KT_DIR = "mlruns/keras_tuner"
#: Hyperband's reduction factor (Keras Tuner's default).
HYPERBAND_FACTOR = 3
_META = "emnist_hpo.json"
#: Beside each trial's checkpoint: its learning rate at every epoch, for a ``plateau`` champion's final fit to replay.
RATES_FILE = "learning_rates.json"


# --------------------------------------------------------------------------- search space -> kt.HyperParameters


class HpTrial:
    """Optuna's ``suggest_*`` over a ``kt.HyperParameters``: lets :meth:`SearchSpace.sample` define a Keras Tuner space.

    ``params`` collects the values this trial actually used (as Optuna's ``trial.params`` does).
    """

    def __init__(self, hp: kt.HyperParameters, number: int | None = None):
        self.hp = hp
        self.number = number
        self.params: dict[str, Any] = {}

    def _keep(self, name: str, value: Any) -> Any:
        self.params[name] = value
        return value

    def suggest_categorical(self, name: str, choices) -> Any:
        value = self.hp.Choice(name, list(choices))
        # Keras Tuner may hand back True as 1: return the YAML's own value
        return self._keep(name, next((c for c in choices if c == value and type(c) is type(value)),
                                     next((c for c in choices if c == value), value)))

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        # Keras Tuner reads a step of a log range as a factor; the search space never combines them
        return self._keep(name, int(self.hp.Int(name, int(low), int(high), step=None if log else int(step or 1),
                                                sampling="log" if log else "linear")))

    def suggest_float(self, name: str, low: float, high: float, step: float | None = None, log: bool = False) -> float:
        if low == high:
            return self._keep(name, float(self.hp.Fixed(name, float(low))))
        return self._keep(name, float(self.hp.Float(name, float(low), float(high), step=None if log else step,
                                                    sampling="log" if log else "linear")))


class SpaceHyperModel(kt.HyperModel):
    """A Keras Tuner hypermodel whose space is a :class:`SearchSpace` (the YAML file)."""

    def __init__(self, space: SearchSpace, base: ExperimentConfig, num_classes: int, steps_per_epoch: int = 100):
        super().__init__(name="emnist_cnn")
        self.space, self.base = space, base
        self.num_classes, self.steps_per_epoch = num_classes, steps_per_epoch

    def config(self, hp: kt.HyperParameters, number: int | None = None) -> tuple[ExperimentConfig, dict[str, Any]]:
        """The trial's config (seeded as a study's trial ``number``) and the parameters it used."""
        view = HpTrial(hp, number)
        cfg = self.space.sample(view, self.base)
        if number is not None:
            cfg.train.seed = self.base.train.seed + number
        return cfg, view.params

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        from emnist_hpo.model.build import build_model

        cfg, _ = self.config(hp)
        with dtype_policy(resolve_precision(cfg.train.precision)):  # as train() builds it
            model = build_model(cfg.model, self.num_classes)
        compile_model(model, cfg, self.num_classes, self.steps_per_epoch)
        return model


# --------------------------------------------------------------------------- oracles that try the seeds first


def _matches(values: Mapping[str, Any], params: Mapping[str, Any]) -> bool:
    return all(values.get(k) == v for k, v in params.items())


class _SeedsFirst:
    """Oracle mixin: the seed experiments' parameters come before random points (a study's warm start)."""

    seeds: dict[str, dict[str, Any]] = {}

    def _random_values(self):
        for params in self.seeds.values():
            if not any(_matches(t.hyperparameters.values, params) for t in self.trials.values()):
                return dict(params)
        return super()._random_values()


class HyperbandOracle(_SeedsFirst, kt.oracles.HyperbandOracle):
    pass


class BayesianOracle(_SeedsFirst, kt.oracles.BayesianOptimizationOracle):
    pass


# --------------------------------------------------------------------------- the tuner


@dataclass
class _TrialView:
    """What :class:`MlflowTrialHooks` reads of a trial (an Optuna trial's ``number``, ``params``, ``user_attrs``)."""

    number: int
    params: dict[str, Any]
    user_attrs: dict[str, Any]

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value


class _LoadWeights(keras.callbacks.Callback):
    """Starts training from a saved weights file (a Hyperband trial promoted to a later round)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def on_train_begin(self, logs=None):
        with warnings.catch_warnings():  # the saved optimizer state is not restored: the optimizer starts afresh
            warnings.filterwarnings("ignore", message=".*Skipping variable loading for optimizer.*")
            self.model.load_weights(self.path)


class _Continue(TrialHooks):
    """Starts a trial from saved weights (a Hyperband trial promoted to a later round), and tags its run."""

    def __init__(self, tracker: Tracker, tags: dict[str, Any], weights: Path | None):
        self.tracker, self.tags, self.weights = tracker, tags, weights

    def on_trial_begin(self, trial, config):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            self.tracker.set_tags(run_id, self.tags)
        return [_LoadWeights(str(self.weights))] if self.weights is not None else []


class _Deadline(RungControl):
    """``--timeout``: a trial whose training would end past the deadline is not started (predicted from FLOPs)."""

    def __init__(self, deadline: float | None, flops: int, n_val: int, throughput: Throughput, normalized: int = 0):
        self.deadline, self.flops, self.n_val, self.throughput = deadline, flops, n_val, throughput
        self.normalized = normalized  # elements per image through batch-norm

    def before(self, index, rung, images):
        if self.deadline is None:
            return None
        need = self.throughput.seconds(rung_work(images, self.flops, self.n_val * rung.epochs),
                                       rung_norm(images, self.normalized))
        left = self.deadline - time.monotonic()
        if need > left:
            return f"time budget: the trial would take ~{need:.0f} s and {max(left, 0):.0f} s are left"
        return None


class SpaceTuner(kt.Tuner):
    """Runs every Keras Tuner trial through the shared trial path (:func:`~emnist_hpo.search.trial.run_trial`)."""

    def __init__(self, oracle, hypermodel: SpaceHyperModel, *, data: PreparedData, hooks, tracker: Tracker,
                 tuner_name: str, seeds: Mapping[str, dict[str, Any]], directory: str, project_name: str,
                 deadline: float | None = None, progress=None, limits: Limits | None = None):
        self.data, self.hooks, self.tracker = data, list(hooks), tracker
        self.tuner_name, self.seeds = tuner_name, dict(seeds)
        self.deadline, self.progress = deadline, progress
        self.limits = limits or Limits()
        self.records: list[RungRecord] = []  # what each trial's training cost (the time model's points)
        self.throughput = Throughput()
        super().__init__(oracle=oracle, hypermodel=hypermodel, directory=directory, project_name=project_name,
                         overwrite=False)

    def _rates_file(self, trial_id: str) -> Path:
        return Path(self.get_trial_dir(trial_id)) / RATES_FILE

    def trial_rates(self, trial_id: str | None) -> dict[int, float]:
        """The learning rate a completed trial trained each epoch at, counted from scratch through the rounds it
        continued (what a ``plateau`` champion's final fit replays); {} when not recorded."""
        path = self._rates_file(trial_id) if trial_id is not None else None
        if path is None or not path.is_file():
            return {}
        return {int(epoch): float(rate) for epoch, rate in json.loads(path.read_text())}

    def pre_create_trial(self):
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.oracle.max_trials = len(self.oracle.trials)  # --timeout: start no more trials

    def run_trial(self, trial, *args, **kwargs):
        hp = trial.hyperparameters
        number = int(trial.trial_id)
        values = dict(hp.values)
        try:
            cfg, params = self.hypermodel.config(hp, number)
        except Exception as exc:  # noqa: BLE001 - a space that cannot be sampled is the trial's failure
            raise kt.errors.FailedTrialError(f"sampling failed: {exc}") from exc
        initial = int(values.get("tuner/initial_epoch", 0) or 0)
        if "tuner/epochs" in values:
            cfg.train.epochs = int(values["tuner/epochs"])
        past = values.get("tuner/trial_id")
        weights = Path(self._get_checkpoint_fname(past)) if past is not None else None
        if weights is not None and weights.is_file() and initial > 0:
            cfg.train.epochs = max(1, cfg.train.epochs - initial)
        else:
            initial, weights = 0, None
        seed = next((name for name, p in self.seeds.items() if _matches(values, p)), None)
        view = _TrialView(number, params, {"seed_experiment": seed} if seed else {})
        tags = {TAG_ENGINE: ENGINE, "keras_tuner.tuner": self.tuner_name, "keras_tuner.trial_id": trial.trial_id}
        if "tuner/bracket" in values:
            tags.update({"keras_tuner.bracket": values["tuner/bracket"], "keras_tuner.round": values["tuner/round"],
                         "keras_tuner.epochs": values["tuner/epochs"]})
        if initial:
            tags.update({"keras_tuner.continues_trial": past, "keras_tuner.initial_epoch": initial})
        cost = model_cost(cfg.model, self.data.num_classes)
        control = _Deadline(self.deadline, cost.flops, len(self.data.y_val), self.throughput, cost.normalized)

        def keep(result) -> None:
            Path(self._get_checkpoint_fname(trial.trial_id)).parent.mkdir(parents=True, exist_ok=True)
            result.model.save_weights(self._get_checkpoint_fname(trial.trial_id))

        try:
            outcome = run_trial(view, cfg, self.data, ladder=single(cfg.train.epochs),
                                hooks=[*self.hooks, _Continue(self.tracker, tags, weights)], control=control,
                                limits=self.limits, keep_model=keep)
        finally:
            if self.progress is not None:
                self.progress.update(1)
        result = outcome.result
        if result is not None and result.rungs:
            self.records += [RungRecord(rung_work(r.images, cost.flops, len(self.data.y_val) * r.epochs), r.seconds,
                                        rung_norm(r.images, cost.normalized)) for r in result.rungs]
            self.throughput = Throughput.fit(self.records)
        if outcome.state != "COMPLETE":  # pruned or failed: Keras Tuner marks the trial FAILED
            raise kt.errors.FailedTrialError(outcome.reason or outcome.state) from outcome.error
        # the learning rate of every epoch from scratch: a continued trial's own epochs follow its earlier round's
        rates = {e: r for e, r in self.trial_rates(past).items() if e < initial} if initial else {}
        rates.update({initial + e: r for e, r in result.last_rung_rates.items()})
        self._rates_file(trial.trial_id).write_text(json.dumps(sorted(rates.items())))
        return {
            "val_accuracy": result.val_score,  # the model the trial ends with (trainer.rung_score)
            "best_epoch": float(initial + result.best_epoch),  # epochs from scratch to the best one
            "params": float(result.params),
            "train_seconds": result.train_seconds,
        }


# --------------------------------------------------------------------------- the study


@dataclass
class KtStudyResult:
    name: str  # the study (Keras Tuner project) name
    tuner: str  # hyperband | bayesian
    project_dir: str  # Keras Tuner's project folder
    states: dict[str, int]  # Keras Tuner trial states and their counts
    champion_trial: int | None  # the crowned trial's number
    champion_params: dict[str, Any]  # its searched parameters
    val_accuracy: float | None
    test_accuracy: float | None
    params: int | None  # the final model's parameter count
    registered: Registered | None
    parent_run_id: str
    seconds: float

    @property
    def finished(self) -> int:
        return self.states.get("COMPLETED", 0) + self.states.get("FAILED", 0)


def _check_options(opts: StudyOptions, tuner: str) -> None:
    if tuner not in TUNERS:
        raise ConfigError(f"--tuner must be one of {', '.join(TUNERS)} (tuner={tuner!r})")
    if opts.sampler is not None:
        raise ConfigError(f"--sampler is an Optuna option; with --engine {ENGINE} choose --tuner (sampler={opts.sampler!r})")
    if opts.storage is not None:
        raise ConfigError(f"--storage is Optuna's; --engine {ENGINE} keeps its state in {DEFAULT_KT_DIR}/<study-name> "
                          f"(storage={redact(opts.storage)!r})")
    if getattr(opts, "workers", 1) > 1:
        raise ConfigError(f"--workers applies to --engine optuna; Keras Tuner runs one trial at a time here "
                          f"(workers={opts.workers})")
    if tuple(opts.objectives) != ("accuracy",):
        raise ConfigError(f"--engine {ENGINE} searches one objective: --objectives must be 'accuracy' "
                          f"(objectives={','.join(opts.objectives)!r})")


def _check_project(project: Path, meta: dict[str, Any]) -> None:
    """Refuse to resume a project made for another split, tuner or (Hyperband) epoch budget."""
    path = project / _META
    if not path.is_file():
        project.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meta, indent=1), encoding="utf-8")
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    keys = ("split", "tuner") + (("epochs",) if meta["tuner"] == "hyperband" else ())
    for key in keys:
        if old.get(key) != meta[key]:
            raise ConfigError(
                f"Keras Tuner study {project.name!r} was created with {key} {old.get(key)!r}, not {meta[key]!r} "
                f"(use the same value or another --study-name; its state is in {project})"
            )


def _make_oracle(tuner: str, opts: StudyOptions):
    objective = kt.Objective("val_accuracy", direction="max")
    if tuner == "hyperband":
        oracle = HyperbandOracle(objective=objective, max_epochs=opts.epochs, factor=HYPERBAND_FACTOR,
                                 hyperband_iterations=None, seed=opts.seed + 1000 * opts.worker)
    else:
        oracle = BayesianOracle(objective=objective, max_trials=opts.trials, seed=opts.seed + 1000 * opts.worker)
    oracle.max_trials = opts.trials  # the study ends with this many trials, whatever the algorithm would do next
    # a trial refused by --max-params is a failed trial to Keras Tuner: many in a row must not end the search
    oracle.max_consecutive_failed_trials = max(3, opts.trials)
    oracle.verbose = 0
    return oracle


def run_kt_study(opts: StudyOptions, tuner: str = "hyperband", log: Callable[[str], None] = print,
                 kt_dir: str = DEFAULT_KT_DIR) -> KtStudyResult:
    """Search ``opts``'s space with Keras Tuner; finish with the champion evaluated on test and registered."""
    t_start = time.perf_counter()
    opts.validate()
    _check_options(opts, tuner)
    opts = dataclasses.replace(opts, study_name=opts.study_name or f"emnist-{opts.split}-kt-{tuner}")
    name = opts.name
    space = SearchSpace.load(find_search_space(opts.search_space))
    seed_cfgs = {n: load_experiment(find_experiment(n)) for n in opts.seed_experiments} if opts.warm_start else {}
    seeds = {n: p for n, cfg in seed_cfgs.items() if (p := space.params_for(cfg)) is not None}
    base = opts.base_config()
    data = prepare(opts.split, opts.data_dir, base.data, progress=opts.progress)
    tracker = Tracker(opts.tracking_uri, f"emnist-{opts.split}")
    project = Path(kt_dir) / name
    _check_project(project, {"split": opts.split, "tuner": tuner, "epochs": opts.epochs,
                             "search_space": opts.search_space})

    parent = tracker.start_run(
        f"study-{name}",
        {TAG_KIND: "study", TAG_SPLIT: opts.split, TAG_STUDY: name, TAG_ENGINE: ENGINE,
         "keras_tuner.tuner": tuner, "keras_tuner.project": str(project.resolve()),
         "emnist_hpo.data_fingerprint": data.fingerprint()},
    )
    tracker.log_params(parent, {
        "split": opts.split, "trials": opts.trials, "epochs": opts.epochs, "engine": ENGINE, "tuner": tuner,
        "search_space": opts.search_space, "max_train_samples": opts.max_train_samples,
        "val_fraction": opts.val_fraction, "seed": opts.seed, "train_size": len(data.x_train),
        "val_size": len(data.x_val), "test_size": len(data.x_test), "data_source": data.source,
        "final_fit": opts.final_fit, "max_params": opts.max_params, "max_flops": opts.max_flops,
        "timeout": opts.timeout, "finalists": opts.finalists, "folds": opts.folds,
    })
    status = "FAILED"
    progress = None
    deadline = None if opts.timeout is None else time.monotonic() + opts.timeout
    try:
        hypermodel = SpaceHyperModel(space, base, data.num_classes,
                                     steps_per_epoch=max(1, math.ceil(len(data.x_train) / base.train.batch_size)))
        oracle = _make_oracle(tuner, opts)
        oracle.seeds = seeds
        hooks = [MlflowTrialHooks(tracker, parent, opts.split, name, plots=opts.trial_plots)]
        with contextlib.redirect_stdout(io.StringIO()):  # Keras Tuner's "Reloading Tuner from ..." banner
            search = SpaceTuner(
                oracle, hypermodel, data=data, hooks=hooks, tracker=tracker, tuner_name=tuner, seeds=seeds,
                directory=str(kt_dir), project_name=name, deadline=deadline,
                limits=Limits(opts.max_params, opts.max_flops),
            )
        oracle.max_trials = opts.trials  # a reloaded oracle keeps its old budget otherwise
        done = sum(1 for t in search.oracle.trials.values() if t.status in ("COMPLETED", "FAILED"))
        if done >= opts.trials:
            log(f"Keras Tuner study {name!r} already has {done} finished trials (>= {opts.trials}); nothing to run")
        elif done:
            log(f"resuming Keras Tuner study {name!r}: {opts.finished(done)}")
        if opts.progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=None if opts.by_budget else opts.trials, initial=min(done, opts.trials),
                            desc=f"trials ({tuner})",
                            unit="trial", file=sys.stderr)
            search.progress = progress
        try:
            with contextlib.redirect_stdout(sys.stderr):
                search.search(verbose=0)
        except RuntimeError as exc:
            if "consecutive failures" not in str(exc):
                raise
            log(f"stopping: {' '.join(str(exc).split()[:12])} (see the trials' fail_reason in MLflow)")
        finally:
            if progress is not None:
                progress.close()
        states: dict[str, int] = {}
        for t in search.oracle.trials.values():
            states[t.status] = states.get(t.status, 0) + 1
        result = KtStudyResult(name, tuner, str(project), states, None, {}, None, None, None, None, parent, 0.0)
        best = [t for t in search.oracle.get_best_trials(max(1, opts.finalists)) if t.score is not None]
        if best:
            chosen = _choose(opts, search, best, data, deadline, tracker, parent, log)
            _finalize(opts, tuner, search, chosen, tracker, parent, data, result, deadline, log)
        else:
            log("no trial completed: nothing to register")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end_run(parent, status)
    result.seconds = time.perf_counter() - t_start
    return result


def _choose(opts: StudyOptions, search: SpaceTuner, best: list, data: PreparedData, deadline: float | None,
            tracker: Tracker, parent: str, log: Callable[[str], None]):
    """``--finalists``: the top trials re-trained on other folds, the smallest within one standard error of the best
    mean crowned (as a study does)."""
    if opts.finalists <= 1 or len(best) < 2:
        return best[0]
    seconds = [float(t.metrics.get_last_value("train_seconds") or 0) for t in best if t.metrics.exists("train_seconds")]
    need = sum(seconds) * opts.folds * (1 + (1 / (1 - opts.val_fraction) if opts.final_fit else 0) / len(best))
    if deadline is not None and need > deadline - time.monotonic():
        log(f"time budget: re-evaluating {len(best)} finalists would take ~{need:.0f} s; the best single score stands")
        return best[0]
    candidates = []
    for t in best:
        cfg, _ = search.hypermodel.config(t.hyperparameters.copy(), int(t.trial_id))
        candidates.append(Candidate(int(t.trial_id), float(t.score),
                                    int(t.metrics.get_last_value("params") or 0), cfg))
    log(f"re-evaluating {len(candidates)} finalist(s) on {opts.folds} fold(s) each...")
    finalists = reevaluate(candidates, data, opts.folds, opts.seed, single(opts.epochs), log)
    pick = choose(finalists, False, opts.tolerance, len(data.y_val) * opts.folds if opts.prefer_smaller else 0)
    tracker.log_metrics(parent, {f"finalist_{f.trial}_mean": f.mean for f in finalists})
    return next(t for t in best if int(t.trial_id) == pick.trial)


def _finalize(opts: StudyOptions, tuner: str, search: SpaceTuner, trial, tracker: Tracker, parent: str,
              data: PreparedData, result: KtStudyResult, deadline: float | None, log: Callable[[str], None]) -> None:
    """The champion trial's model retrained on train+validation (or its own weights), tested and registered."""
    number = int(trial.trial_id)
    cfg, params_used = search.hypermodel.config(trial.hyperparameters.copy(), number)
    final_fit = opts.final_fit
    if final_fit and deadline is not None:
        took = trial.metrics.get_last_value("train_seconds") if trial.metrics.exists("train_seconds") else 0.0
        need = float(took or 0.0) / (1 - opts.val_fraction)
        if need > deadline - time.monotonic():
            log(f"time budget: a final fit takes ~{need:.0f} s: the champion trial's own model is registered instead")
            final_fit = False

    def own_model():
        with warnings.catch_warnings():  # the checkpoint's optimizer state is not needed to predict
            warnings.filterwarnings("ignore", message=".*Skipping variable loading for optimizer.*")
            return search.load_model(trial)

    champion = Champion(number, cfg, float(trial.score), ENGINE,
                        run_tags={"keras_tuner.tuner": tuner, "keras_tuner.trial_id": trial.trial_id},
                        own_model=own_model, rates=search.trial_rates(trial.trial_id))
    final = finalize_champion(champion, data, single(opts.epochs), tracker=tracker, parent=parent, split=opts.split,
                              study_name=opts.name, final_fit=final_fit, register=opts.register,
                              trial_plots=opts.trial_plots, log=log)
    tracker.log_metrics(parent, {"finished_trials": result.finished})
    result.champion_trial, result.champion_params = number, params_used
    result.val_accuracy, result.test_accuracy = float(trial.score), final.test_accuracy
    result.params, result.registered = final.params, final.registered


def summary_table(res: KtStudyResult) -> str:
    """The end-of-search summary, as a study's."""
    title = f"Keras Tuner study {res.name!r} ({res.tuner}): {res.finished} finished trials"
    if res.champion_trial is None:
        return format_summary(title + "\n  no trial completed: nothing to register", res.states, [], {}, [])
    rows = [
        ("champion trial", str(res.champion_trial)),
        ("validation accuracy", f"{res.val_accuracy:.4f}"),
        ("test accuracy", f"{res.test_accuracy:.4f}" if res.test_accuracy is not None else "-"),
        ("parameters", f"{res.params:,}" if res.params else "-"),
        ("study wall time", f"{res.seconds:.1f} s"),
        ("keras tuner project", res.project_dir),
    ]
    if res.registered:
        r = res.registered
        rows.append(("registered", f"{r.name} v{r.version}" + (" -> @champion" if r.champion else
                                                                " (champion kept: v" + str(r.previous_champion) + ")")))
    rows.append(("parent run", res.parent_run_id))
    split = res.name.split("-")[1] if res.name.startswith("emnist-") else ""
    return format_summary(title, res.states, rows, res.champion_params,
                          next_commands(split, res.parent_run_id, None, bool(res.registered)))
