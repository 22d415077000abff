"""One fixed experiment (a YAML of experiments/) trained, tested and tracked like a trial.

:func:`run_experiment` is what ``python -m emnist_hpo run experiments/<name>.yaml
--split <split>`` calls. The run lands in MLflow experiment ``emnist-<split>``
beside the study's trials, tagged ``emnist_hpo.kind=baseline`` and
``emnist_hpo.baselines.experiment=<name>``, with the data fingerprints of
:class:`~emnist_hpo.data.prepared.PreparedData` (the same the study writes), so
``compare`` can put it next to the champion trained on the same data. Keras
models (cnn, lstm) go through :func:`training.train`; classical ones (random
forest, SVM, KNN) through :func:`baselines.train_classical`.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from emnist_hpo.baselines import classical as baselines
from emnist_hpo.config import LIMITS, MAX_SEED, ExperimentConfig, load_experiment
from emnist_hpo.data.nist import check_split
from emnist_hpo.data.prepared import PreparedData, prepare
from emnist_hpo.model.cost import model_cost
from emnist_hpo.model.describe import describe_model
from emnist_hpo.errors import ConfigError
from emnist_hpo.reporting.evaluation import evaluate
from emnist_hpo.paths import find_experiment
from emnist_hpo.tracking.tracker import TAG_KIND, TAG_REASON, TAG_SPLIT, MlflowMetricsCallback, Tracker
from emnist_hpo.train.trainer import TrainResult, predict_proba, train

TAG_EXPERIMENT = "emnist_hpo.baselines.experiment"
TAG_DATA_FINGERPRINT = "emnist_hpo.data_fingerprint"  # as on the study's parent run
TAG_TEST_FINGERPRINT = "emnist_hpo.test_fingerprint"
TAG_ARCHITECTURE = "emnist_hpo.model.architecture"


@dataclass
class ExperimentResult:
    name: str  # the experiment (YAML file stem)
    split: str
    run_id: str  # the MLflow run
    config: ExperimentConfig  # what was trained, CLI overrides applied
    architecture: str  # the model in one line
    val_accuracy: float  # best validation accuracy
    test_accuracy: float
    params: int  # parameters (classical models: stored numbers, see baselines)
    model_bytes: int  # size of the saved model on disk
    train_seconds: float
    epochs_run: int  # 0 for classical models
    seconds: float  # the whole command


def overrides(
    *, epochs: int | None = None, max_train_samples: int | None = None, val_fraction: float | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Command-line options as an override tree for :func:`load_experiment` (None: keep the YAML's)."""
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs must be >= 1 (epochs={epochs})")
    if epochs is not None and epochs > LIMITS["epochs"]:
        raise ConfigError(f"--epochs must be <= {LIMITS['epochs']} (epochs={epochs})")
    if max_train_samples is not None and max_train_samples < 10:
        raise ConfigError(f"--max-train-samples must be >= 10 (max_train_samples={max_train_samples})")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in (0, 1) (val_fraction={val_fraction})")
    if seed is not None and seed < 0:
        raise ConfigError(f"--seed must be >= 0 (seed={seed})")
    if seed is not None and seed > MAX_SEED:
        raise ConfigError(
            f"--seed must be <= {MAX_SEED} = 2**31-1, so that every seed derived from it stays below 2**32 "
            f"(seed={seed})"
        )
    out: dict[str, Any] = {"train": {}, "data": {}}
    if epochs is not None:
        out["train"]["epochs"] = epochs
    if max_train_samples is not None:
        out["data"]["max_train_samples"] = max_train_samples
    if val_fraction is not None:
        out["data"]["val_fraction"] = val_fraction
    if seed is not None:
        out["train"]["seed"] = out["data"]["seed"] = seed
    return {k: v for k, v in out.items() if v}


def find_experiment_file(path: str) -> Path:
    """``path`` as given, or ``experiments/<path>.yaml`` (the working directory first, then the shipped ones)."""
    return find_experiment(path)


def model_bytes(model: Any) -> int:
    """Size on disk: the ``.keras`` file of a Keras model, the pickle of an estimator."""
    if not hasattr(model, "save"):  # a scikit-learn estimator
        return baselines.serialized_bytes(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        model.save(path)
        return path.stat().st_size


def run_experiment(
    path: str,
    split: str,
    *,
    epochs: int | None = None,
    max_train_samples: int | None = None,
    val_fraction: float | None = None,
    data_dir: str | None = None,
    tracking_uri: str | None = None,
    seed: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ExperimentResult:
    """Train experiment ``path`` (a YAML path or a name in experiments/) on ``split``; test and track it."""
    t_start = time.perf_counter()
    check_split(split)
    file = find_experiment_file(path)
    name = file.stem
    cfg = load_experiment(
        file, overrides(epochs=epochs, max_train_samples=max_train_samples, val_fraction=val_fraction, seed=seed)
    )
    classical = baselines.is_classical(cfg)
    if classical:
        baselines.make_estimator(cfg, where=str(file))  # bad options fail before any data is read
        if epochs is not None:
            log(f"note: --epochs does not apply to a {cfg.model.kind} model; ignored")
    tracker = Tracker(tracking_uri, f"emnist-{split}")
    data = prepare(split, data_dir, cfg.data, progress=progress)
    architecture = describe_model(cfg.model)
    run = tracker.start_run(
        f"baseline-{name}",
        {
            TAG_KIND: "baseline", TAG_SPLIT: split, TAG_EXPERIMENT: name, TAG_ARCHITECTURE: architecture,
            TAG_DATA_FINGERPRINT: data.fingerprint(), TAG_TEST_FINGERPRINT: data.test_fingerprint(),
            "mlflow.note.content": cfg.description,
        },
    )
    status = "FAILED"
    try:
        tracker.log_params(run, {
            **cfg.flat_params(), "split": split, "experiment_file": str(file), "train_size": len(data.x_train),
            "val_size": len(data.x_val), "test_size": len(data.x_test), "data_source": data.source,
        })
        log(f"{name} on {split}: {architecture} ({len(data.x_train):,} train / {len(data.x_val):,} validation images)")
        result = _fit(cfg, data, tracker, run, classical, progress, log)
        out = _evaluate(cfg, name, split, data, tracker, run, result, classical, architecture, log)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as exc:
        tracker.set_tags(run, {TAG_REASON: f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"})
        raise
    finally:
        tracker.end_run(run, status)
    out.seconds = time.perf_counter() - t_start
    return out


def _fit(cfg: ExperimentConfig, data: PreparedData, tracker: Tracker, run: str, classical: bool, progress: bool,
         log: Callable[[str], None]) -> TrainResult:
    if classical:
        return baselines.train_classical(cfg, data.x_train, data.y_train, data.x_val, data.y_val, data.num_classes,
                                         log=log if progress else None)
    cb = MlflowMetricsCallback(tracker, run)
    return train(cfg, data.x_train, data.y_train, data.x_val, data.y_val, data.num_classes, callbacks=[cb],
                 verbose=2 if progress else 0)


def _evaluate(cfg, name, split, data: PreparedData, tracker: Tracker, run: str, result: TrainResult,
              classical: bool, architecture: str, log) -> ExperimentResult:
    t0 = time.perf_counter()
    if classical:
        val_proba = result.val_proba
        test_proba = baselines.predict_proba(result.model, data.x_test, data.num_classes)
    else:
        val_proba = predict_proba(result.model, data.x_val)
        test_proba = predict_proba(result.model, data.x_test)
    predict_seconds = time.perf_counter() - t0
    ev_val = evaluate(data.y_val, val_proba, data.classes)
    ev_test = evaluate(data.y_test, test_proba, data.classes)
    size = model_bytes(result.model)
    metrics = {
        "best_val_accuracy": result.best_val_accuracy,
        "val_macro_f1": ev_val.macro_f1,
        "params": result.params,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "train_seconds": result.train_seconds,
        "predict_seconds": predict_seconds,
        "test_accuracy": ev_test.accuracy,
        "test_macro_f1": ev_test.macro_f1,
        "model_size_bytes": size,
    }
    flops = model_cost(cfg.model, data.num_classes).flops
    if flops:  # a network (classical baselines have none)
        metrics["flops"] = flops
    tracker.log_metrics(run, metrics)
    tracker.log_evaluation(run, ev_val, "validation", result.history or None)
    tracker.log_evaluation(run, ev_test, "test")
    log(f"{name}: validation {result.best_val_accuracy:.4f}, test {ev_test.accuracy:.4f}")
    return ExperimentResult(
        name=name, split=split, run_id=run, config=cfg, architecture=architecture,
        val_accuracy=result.best_val_accuracy, test_accuracy=ev_test.accuracy, params=result.params,
        model_bytes=size, train_seconds=result.train_seconds, epochs_run=result.epochs_run, seconds=0.0,
    )


def summary_table(res: ExperimentResult) -> str:
    """The end-of-run summary printed by ``python -m emnist_hpo run``."""
    rows = [
        ("architecture", res.architecture),
        ("validation accuracy", f"{res.val_accuracy:.4f}"),
        ("test accuracy", f"{res.test_accuracy:.4f}"),
        ("parameters", f"{res.params:,}"),
        ("model size", f"{res.model_bytes / 1e6:.2f} MB"),
        ("train time", f"{res.train_seconds:.1f} s" + (f" ({res.epochs_run} epochs)" if res.epochs_run else "")),
        ("wall time", f"{res.seconds:.1f} s"),
        ("mlflow run", f"{res.run_id} (experiment emnist-{res.split})"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join([f"experiment {res.name!r} on {res.split}:"] + [f"  {k:<{w}}  {v}" for k, v in rows])
