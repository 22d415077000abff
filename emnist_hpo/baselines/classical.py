"""Classical baselines (random forest, SVM, KNN) as plain functions beside :func:`training.train`.

scikit-learn estimators see the 784 pixels of each image scaled to [0, 1] as
float32. The training set needs one float32 copy (the estimators store or index
it); it is filled batch by batch from the uint8 images, never through a float64
intermediate. Validation and test images are scored batch by batch, so no float
copy of them is ever made whole.

"Parameters" of a classical model are what it stores, counted as numbers:

* ``random_forest``: tree nodes over all trees (each a split or a leaf);
* ``svm``: support vectors x 784 + dual coefficients + intercepts;
* ``knn``: stored training images x 784.

Like :mod:`emnist_hpo.train.trainer`, nothing here knows about MLflow or Optuna.
"""

from __future__ import annotations

import io
import pickle
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from emnist_hpo import config
from emnist_hpo.config import ExperimentConfig
from emnist_hpo.train.trainer import TrainResult

#: ``model.kind`` values trained here.
CLASSICAL_KINDS = config.CLASSICAL_KINDS
#: Images scaled and scored per batch.
BATCH = 4096


def is_classical(cfg: ExperimentConfig) -> bool:
    return cfg.model.kind in CLASSICAL_KINDS


def make_estimator(cfg: ExperimentConfig, where: str = "config") -> Any:
    """The unfitted estimator of ``cfg``: ``model.options`` are its keyword arguments.

    An option the estimator does not take is a :class:`ConfigError` naming it and the
    allowed ones, a bad value one naming it with scikit-learn's rule (checked when the
    experiment is loaded, :func:`config.classical_estimator`); ``random_state``
    defaults to ``train.seed`` where the estimator has one.
    """
    return config.classical_estimator(cfg.model.kind, cfg.model.options, cfg.train.seed, where)


def features(x: np.ndarray) -> np.ndarray:
    """uint8 images (N, 28, 28) as float32 rows (N, 784) in [0, 1], filled batch by batch."""
    flat = x.reshape(len(x), -1)
    out = np.empty(flat.shape, dtype=np.float32)
    for i in range(0, len(flat), BATCH):
        np.multiply(flat[i : i + BATCH], np.float32(1 / 255), out=out[i : i + BATCH])
    return out


def predict_proba(model: Any, x: np.ndarray, num_classes: int, batch_size: int = BATCH) -> np.ndarray:
    """Class scores (N, num_classes) for uint8 images, computed batch by batch.

    Estimators with ``predict_proba`` (forest, KNN) give probabilities; the SVM (no
    Platt scaling) gives one-hot votes of its prediction. Classes the model never saw
    get zero.
    """
    out = np.zeros((len(x), num_classes), dtype=np.float32)
    seen = np.asarray(model.classes_, dtype=np.int64)
    has_proba = hasattr(model, "predict_proba") and getattr(model, "probability", True)
    for i in range(0, len(x), batch_size):
        batch = features(x[i : i + batch_size])
        if has_proba:
            out[i : i + len(batch), seen] = model.predict_proba(batch)
        else:
            out[np.arange(i, i + len(batch)), model.predict(batch).astype(np.int64)] = 1.0
    return out


def count_params(model: Any) -> int:
    """Numbers the fitted model stores (see the module docstring for each kind's definition)."""
    if hasattr(model, "estimators_"):  # random forest
        return int(sum(t.tree_.node_count for t in model.estimators_))
    if hasattr(model, "support_vectors_"):  # svm
        return int(model.support_vectors_.size + model.dual_coef_.size + model.intercept_.size)
    if hasattr(model, "n_samples_fit_"):  # knn
        return int(model.n_samples_fit_ * model.n_features_in_)
    raise TypeError(f"cannot count the parameters of {type(model).__name__}")


class _Counter(io.RawIOBase):
    """A write-only file that only counts bytes."""

    def __init__(self):
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        size = memoryview(b).nbytes
        self.n += size
        return size


def serialized_bytes(model: Any) -> int:
    """Bytes the fitted estimator takes on disk when pickled (counted, nothing is written)."""
    counter = _Counter()
    pickle.dump(model, counter, protocol=pickle.HIGHEST_PROTOCOL)
    return counter.n


@dataclass
class ClassicalResult(TrainResult):
    val_proba: np.ndarray | None = None  # validation class scores, computed once while measuring accuracy


def train_classical(
    cfg: ExperimentConfig,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    num_classes: int,
    log: Callable[[str], None] | None = None,
) -> ClassicalResult:
    """Fit the classical estimator of ``cfg`` on uint8 images; score it on validation when given.

    Returns a :class:`TrainResult` whose ``model`` is the fitted estimator, ``params``
    follows the module docstring, ``best_epoch`` is 1 and ``history`` is empty.
    """
    est = make_estimator(cfg)
    x = features(x_train)
    if log:
        log(f"fitting {type(est).__name__} on {len(x):,} images...")
    t0 = time.perf_counter()
    est.fit(x, np.asarray(y_train))
    seconds = time.perf_counter() - t0
    del x
    val_proba = None
    acc = float("nan")
    if x_val is not None and y_val is not None:
        if log:
            log(f"scoring {len(x_val):,} validation images...")
        val_proba = predict_proba(est, x_val, num_classes)
        acc = float((val_proba.argmax(axis=1) == np.asarray(y_val)).mean()) if len(y_val) else float("nan")
    return ClassicalResult(
        model=est,
        history={},
        params=count_params(est),
        best_epoch=1,
        best_val_accuracy=acc,
        train_seconds=seconds,
        val_proba=val_proba,
    )
