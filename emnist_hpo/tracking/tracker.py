"""MLflow tracking: the store, runs, a Keras callback for per-epoch metrics, artifacts.

Training code never imports this module; the objective calls it through
:class:`TrialHooks` (lifecycle hooks, as in Keras Tuner) and it reaches Keras
only as a callback (:class:`MlflowMetricsCallback`), as in MLflow's examples.
All calls go through an explicit :class:`~mlflow.tracking.MlflowClient` (no
global "active run"), so several trials, threads or processes never mix runs.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlparse

from emnist_hpo import runtime

runtime.configure()  # before Keras loads: its backend, TensorFlow's kernels and quiet start-up

import keras
import numpy as np

from emnist_hpo.config import DEFAULT_ARTIFACT_ROOT, resolve_tracking_uri
from emnist_hpo.coordination import (
    OWNER_TAG,
    check_sqlite_location,
    current_owner,
    pause_point,
    redact_arg,
    redact_secrets,
    sqlite_file,
    sqlite_wal,
    store_lock,
)
from emnist_hpo.model.describe import experiment_note, note_with_study, study_line, trial_note, trial_run_name
from emnist_hpo.errors import StorageError
from emnist_hpo.train.hooks import TrialHooks, TrialOutcome
from emnist_hpo.reporting.evaluation import Evaluation, plot_confusion, plot_curves, write_evaluation

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

def quiet_loggers() -> None:
    """MLflow configures its loggers at INFO on import (schema creation notices): keep them at WARNING."""
    for name in ("alembic", "mlflow", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


quiet_loggers()

#: Tag keys used across the project.
TAG_KIND = "emnist_hpo.kind"  # "study" | "trial" | "baseline" | "final" | "compare"
TAG_SPLIT = "emnist_hpo.split"
TAG_STUDY = "optuna.study_name"
TAG_TRIAL = "optuna.trial_number"
TAG_STATE = "optuna.trial_state"  # COMPLETE | PRUNED | FAIL
TAG_REASON = "emnist_hpo.fail_reason"
TAG_PARENT = "mlflow.parentRunId"
TAG_ENGINE = "emnist_hpo.engine"  # "optuna" | "keras-tuner": the search engine of a study's runs
TAG_RUN_NAME = "mlflow.runName"
TAG_NOTE = "mlflow.note.content"  # a run's or experiment's Markdown description in the MLflow UI
#: MLflow 3's experiment type: "custom_model_development" ("Machine learning") marks a model-training
#: experiment, as MLflow's own demo marks its GenAI one. MLflow UIs that decide the view per experiment open
#: it on the runs table and never ask the user for its type; 3.17 decides by its view switch (:data:`UI_MODEL_TRAINING`).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"

_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


#: MLflow 3.17's UI opens an experiment in the view of its "GenAI / Model training" switch, which each
#: browser keeps (localStorage ``mlflow.workflowType_v1``) and which starts on GenAI: the overview of traces
#: and token usage. The experiment's ``mlflow.experimentKind`` tag does not override it; this URL parameter
#: does, so every link this project prints carries it.
UI_MODEL_TRAINING = "workflowType=machine_learning"


def ui_path(experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page (after the server's address) of an experiment's runs table, or of one run, in the
    "Model training" view."""
    page = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{page}?{UI_MODEL_TRAINING}"


def local_artifact_root(tracking_uri: str) -> str | None:
    """Artifact root for a local SQLite store: ``artifacts/`` beside the database file."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///"):])
    if str(db) == "mlruns/mlflow.db":
        return Path(DEFAULT_ARTIFACT_ROOT).resolve().as_uri()
    return (db.parent / "artifacts").resolve().as_uri()


def make_client(tracking_uri: str) -> "MlflowClient":
    """An MLflow client on ``tracking_uri`` (tracking and registry), checked to answer within seconds."""
    from mlflow.tracking import MlflowClient

    quiet_loggers()
    check_tracking_uri(tracking_uri)
    db = sqlite_file(tracking_uri)
    try:
        if db is not None:
            # One process creates the schema (MLflow's migrations race otherwise); WAL lets readers and the
            # writer of several processes work at once (MLflow's sessions already wait 20 s for a lock).
            db.parent.mkdir(parents=True, exist_ok=True)
            with store_lock(tracking_uri, "init"):
                client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
                client.search_experiments(max_results=1)
                sqlite_wal(db)
        else:
            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            client.search_experiments(max_results=1)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here means the store is unusable
        raise StorageError(
            f"MLflow tracking store {redact(tracking_uri)!r} cannot be used: {redact_secrets(_one_line(exc))} (give --tracking-uri "
            "sqlite:///PATH.db, a database URL such as postgresql://HOST/DB, or http://HOST:PORT of an MLflow server)"
        ) from None
    return client


_TRACKING_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks",
                     "databricks-uc", "uc")


def check_tracking_uri(tracking_uri: str) -> None:
    """Fail fast, writing nothing, when ``tracking_uri`` is a server that does not answer or an unwritable file."""
    scheme = urlparse(tracking_uri).scheme
    dialect = scheme.split("+", 1)[0]
    if dialect not in _TRACKING_SCHEMES:
        raise StorageError(
            f"--tracking-uri {redact(tracking_uri)!r} has an unsupported scheme {scheme!r}; allowed: "
            "sqlite:///PATH.db, "
            "postgresql://, mysql://, mssql:// database URLs, http(s)://HOST:PORT of an MLflow server, or file:PATH"
        )
    if scheme in ("http", "https"):
        _check_http(tracking_uri)
    elif dialect in ("postgresql", "mysql"):
        import sqlalchemy

        try:
            engine = sqlalchemy.create_engine(tracking_uri, poolclass=sqlalchemy.pool.NullPool,
                                              connect_args={"connect_timeout": 5})
            with engine.connect():
                pass
            engine.dispose()
        except Exception as exc:  # noqa: BLE001
            raise StorageError(
                f"MLflow tracking store {redact(tracking_uri)!r} is unreachable: {redact_secrets(_one_line(exc))}"
            ) from None
    check_sqlite_location(tracking_uri, "MLflow tracking store", "--tracking-uri")


def _check_http(uri: str, timeout: float = 5.0) -> None:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return  # an MLflow server behind authentication
        raise StorageError(
            f"{redact(uri)!r} answered HTTP {exc.code} to GET /health: not an MLflow tracking server; start one "
            f"(mlflow server) or pass another --tracking-uri"
        ) from None
    except Exception as exc:  # noqa: BLE001
        raise StorageError(
            f"MLflow tracking server {redact(uri)!r} is unreachable ({redact_secrets(_one_line(exc))}); start it or pass another "
            f"--tracking-uri"
        ) from None


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (also one percent-encoded or holding ``/``)."""
    return redact_arg(url)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else text


class Tracker:
    """One MLflow experiment on one store: runs, params, metrics, artifacts."""

    def __init__(self, tracking_uri: str | None, experiment_name: str):
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.client = make_client(self.tracking_uri)
        self.experiment_name = experiment_name
        self.experiment_id = self._experiment(experiment_name)

    def _experiment(self, name: str) -> str:
        """The experiment's id; created as a model-training experiment with a description, or given them."""
        tags = {TAG_EXPERIMENT_KIND: MODEL_TRAINING_KIND, TAG_NOTE: experiment_note(name)}
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self.client.create_experiment(name, artifact_location=local_artifact_root(self.tracking_uri),
                                                     tags=tags)
            except Exception:  # noqa: BLE001 - another worker created it first
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        # An experiment made before these tags existed (or by hand): add what it lacks, never overwrite a
        # kind or a note someone chose in the UI.
        for key, value in tags.items():
            if key not in exp.tags:
                self._set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id

    def _set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        try:
            self.client.set_experiment_tag(experiment_id, key, value)
        except Exception as exc:  # noqa: BLE001 - a description is not worth failing a study (a read-only user)
            logging.getLogger(__name__).debug("experiment tag %s not set: %s", key, exc)

    def note_study(self, study: str, engine: str, where: str | None) -> None:
        """Add ``study`` to the study list of the experiment's note (only a note this project wrote has one)."""
        try:
            note = self.client.get_experiment(self.experiment_id).tags.get(TAG_NOTE, "")
        except Exception:  # noqa: BLE001
            return
        new = note_with_study(note, study_line(study, engine, where))
        if new is not None:
            self._set_experiment_tag(self.experiment_id, TAG_NOTE, new)

    def experiment_link(self) -> str:
        """The experiment's runs table in the MLflow UI (see :func:`ui_path`): a URL for a server, else the path."""
        return self._link(ui_path(self.experiment_id))

    def run_link(self, run_id: str) -> str:
        """Where the MLflow UI shows ``run_id``: a full URL for a tracking server, else the UI's page path."""
        return self._link(ui_path(self.experiment_id, run_id))

    def _link(self, path: str) -> str:
        if urlparse(self.tracking_uri).scheme in ("http", "https"):
            return f"{redact(self.tracking_uri).rstrip('/')}/{path}"
        return path

    # ------------------------------------------------------------------ runs
    def start_run(self, name: str, tags: Mapping[str, Any] | None = None, parent_run_id: str | None = None) -> str:
        tags = {k: str(v) for k, v in (tags or {}).items()}
        tags.setdefault(OWNER_TAG, current_owner())  # lets a later run close this one should this process die
        if parent_run_id:
            tags[TAG_PARENT] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def set_tags(self, run_id: str, tags: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> None:
        """Set ``tags`` (and log step-0 ``metrics``) in one call to the store."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()
                 if isinstance(v, (int, float)) and math.isfinite(float(v))]
        self.client.log_batch(run_id, metrics=items, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_evaluation(
        self, run_id: str, ev: Evaluation, prefix: str, history: Mapping[str, list[float]] | None = None,
        plots: bool = True,
    ) -> None:
        """Log an evaluation's files (and training curves) as artifacts under ``reports/``; ``plots=False``: CSVs only."""
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            for i, path in enumerate(write_evaluation(ev, out, prefix, plots=plots)):
                self.client.log_artifact(run_id, str(path), "reports")
                if i == 0:
                    pause_point("artifacts")  # test hook: a kill here leaves the reports half logged
            if history and plots:
                curves = out / "curves"
                curves.mkdir()
                plot_curves(history, curves / "training_curves.png")
                self.log_artifacts(run_id, curves, "reports")


    def log_report_plots(self, run_id: str, prefix: str = "validation") -> list[str]:
        """Render the PNGs of a run whose reports were logged as CSV only: its confusion matrix and training curves.

        Trial runs skip the plots (about a second of matplotlib each, most of a short trial's tracking
        time); the study draws them for its champion trial alone, from what the run holds.
        """
        import pandas as pd

        done: list[str] = []
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "png"
            out.mkdir()
            try:
                local = self.client.download_artifacts(run_id, f"reports/{prefix}_confusion_matrix.csv", tmp)
            except Exception:  # noqa: BLE001 - no report (a pruned trial): no plot
                local = None
            if local:
                cm = pd.read_csv(local, index_col=0)
                accuracy = float(np.trace(cm.to_numpy())) / max(1.0, float(cm.to_numpy().sum()))
                plot_confusion(cm, out / f"{prefix}_confusion_matrix.png",
                               title=f"{prefix} confusion matrix (accuracy {accuracy:.2%})")
                done.append(f"{prefix}_confusion_matrix.png")
            history = {}
            for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
                points = sorted(self.client.get_metric_history(run_id, key), key=lambda m: m.step)
                if points:
                    history[key] = [m.value for m in points]
            if history.get("loss"):
                plot_curves(history, out / "training_curves.png")
                done.append("training_curves.png")
            if done:
                self.log_artifacts(run_id, out, "reports")
        return done


def _param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


def trial_status(state: str, reason: str | None = None) -> str:
    """MLflow run status for an Optuna trial state (PRUNED runs end KILLED, FAIL runs FAILED, interrupted KILLED)."""
    if reason and reason.startswith("interrupted"):
        return "KILLED"
    return _STATUS.get(state, "FAILED")


class MlflowMetricsCallback(keras.callbacks.Callback):
    """Logs every epoch's metrics (loss, accuracy, val_*, learning_rate, epoch_time) to one run."""

    def __init__(self, tracker: Tracker, run_id: str):
        super().__init__()
        self.tracker, self.run_id = tracker, run_id
        self.seconds = 0.0  # time spent logging, for overhead accounting

    def on_epoch_end(self, epoch, logs=None):
        t0 = time.perf_counter()
        self.tracker.log_metrics(self.run_id, logs or {}, step=epoch + 1)
        self.seconds += time.perf_counter() - t0
        pause_point("training")


def _shown_val(outcome: TrialOutcome) -> float | None:
    """The validation accuracy a trial's name shows: its score when complete (``val_score``), the one it was pruned
    on otherwise."""
    r = outcome.result
    if r is None:
        return None
    if outcome.state == "PRUNED":
        values = [v for v in r.history.get("val_accuracy", []) if math.isfinite(v)]
        return values[-1] if values else None
    return r.val_score if math.isfinite(r.val_score) else None


class MlflowTrialHooks(TrialHooks):
    """Makes every trial a nested MLflow run of the study's parent run.

    Params and per-epoch metrics always; for finished trials the validation
    confusion matrix (CSV + PNG), per-class report, most-confused pairs and
    training curves (with ``plots=False``, CSVs only, and the PNGs are drawn for
    the champion only: :meth:`Tracker.log_report_plots`); pruned
    and failed trials end with their state as a tag and the run's status
    (KILLED, FAILED). ``tracking_seconds`` (metric and trial attribute) is the
    time all of this took.

    What a person reads in the UI: each run is renamed at the trial's end with its
    outcome (:func:`~emnist_hpo.model.describe.trial_run_name`: ``trial-12 val=0.8123``,
    ``trial-7 pruned@epoch2 val=0.4100``, ``trial-3 failed``) and carries a note
    naming its Optuna trial (study, number, redacted storage URL); the study is
    added to the experiment's note.
    """

    def __init__(self, tracker: Tracker, parent_run_id: str, split: str, study_name: str, plots: bool = True):
        self.plots = plots  # draw each finished trial's PNGs (~0.6 s of matplotlib per trial)
        self.tracker, self.parent_run_id = tracker, parent_run_id
        self.split, self.study_name = split, study_name
        self._runs: dict[int, tuple[str, float, MlflowMetricsCallback]] = {}
        # Where the study lives, for each trial's note: the parent run says (storage already redacted).
        parent = tracker.client.get_run(parent_run_id).data.tags
        self.engine = parent.get(TAG_ENGINE, "optuna")
        where = parent.get("optuna.storage") or parent.get("keras_tuner.project")
        self.where = redact(where) if where else None
        tracker.note_study(study_name, self.engine, self.where)

    def _note(self, trial, state: str | None = None, reason: str | None = None) -> str:
        return trial_note(trial.number, self.study_name, self.engine, storage=self.where,
                          seed=trial.user_attrs.get("seed_experiment"), state=state, reason=reason)

    def on_trial_begin(self, trial, config):
        t0 = time.perf_counter()
        tags = {
            TAG_KIND: "trial",
            TAG_SPLIT: self.split,
            TAG_STUDY: self.study_name,
            TAG_TRIAL: trial.number,
            TAG_NOTE: self._note(trial),
        }
        seed = trial.user_attrs.get("seed_experiment")
        if seed:
            tags["emnist_hpo.seed_experiment"] = seed
        name = f"trial-{trial.number}" + (f" seed={seed}" if seed else "")  # renamed with its outcome at the end
        run_id = self.tracker.start_run(name, tags, parent_run_id=self.parent_run_id)
        trial.set_user_attr("mlflow_run_id", run_id)
        # The run's page, for the Optuna dashboard's trial table: a URL on a tracking server, else the path
        # after the MLflow UI's address (`python -m emnist_hpo ui`).
        trial.set_user_attr("mlflow_run", self.tracker.run_link(run_id))
        params = {f"trial.{k}": v for k, v in trial.params.items()}
        params.update(config.flat_params())
        self.tracker.log_params(run_id, params)
        cost = {k: trial.user_attrs[k] for k in ("params", "flops") if trial.user_attrs.get(k) is not None}
        if cost:  # known before training: a trial refused for its size still shows what it would have cost
            self.tracker.log_metrics(run_id, cost)
        cb = MlflowMetricsCallback(self.tracker, run_id)
        self._runs[trial.number] = (run_id, time.perf_counter() - t0, cb)
        return [cb]

    def on_trial_end(self, trial, outcome: TrialOutcome):
        if trial.number not in self._runs:
            return
        run_id, spent, cb = self._runs.pop(trial.number)
        t0 = time.perf_counter()
        r = outcome.result
        tags: dict[str, Any] = {
            TAG_STATE: outcome.state,
            TAG_RUN_NAME: trial_run_name(
                trial.number, outcome.state, seed=trial.user_attrs.get("seed_experiment"), reason=outcome.reason,
                val=_shown_val(outcome), epoch=len(r.history.get("val_accuracy", [])) if r is not None else None,
                params=trial.user_attrs.get("params"), rung=r.rungs[-1].index if r is not None and r.rungs else None),
            TAG_NOTE: self._note(trial, outcome.state, (outcome.reason or "")[:300] or None),
        }
        if outcome.reason:
            tags[TAG_REASON] = outcome.reason[:5000]
        summary: dict[str, float] = {}
        if r is not None:
            summary = {
                "best_val_accuracy": r.best_val_accuracy,
                "val_score": r.val_score,
                "params": r.params,
                "best_epoch": r.best_epoch,
                "train_seconds": r.train_seconds,
                "images_seen": r.images_seen,
                "rung_reached": r.rungs[-1].index if r.rungs else 0,
            }
            if outcome.evaluation is not None:
                summary["val_macro_f1"] = outcome.evaluation.macro_f1
        self.tracker.set_tags(run_id, tags, summary)
        if r is not None and outcome.evaluation is not None:
            self.tracker.log_evaluation(run_id, outcome.evaluation, "validation", r.history if self.plots else None,
                                        plots=self.plots)
        overhead = spent + cb.seconds + (time.perf_counter() - t0)
        self.tracker.log_metrics(run_id, {"tracking_seconds": overhead})
        trial.set_user_attr("tracking_seconds", round(overhead, 3))
        self.tracker.end_run(run_id, trial_status(outcome.state, outcome.reason))
