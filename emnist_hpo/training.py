"""Training as a plain function that tests, studies and baselines call alike.

Nothing here knows about Optuna or MLflow: callers pass Keras callbacks (a
pruning callback, a tracking callback) and read the returned
:class:`TrainResult`.

Speed (``TrainConfig`` precision, jit_compile, steps_per_execution; measured in
benchmarks/README.md): bf16 mixed precision where the CPU computes bf16 natively,
8 batches per compiled call, XLA left to Keras ("auto": off for TensorFlow on CPU),
and batches sliced from the uint8 arrays (:class:`ArrayBatches`), never a copy of the
data set.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import keras
import numpy as np

from . import schedules
from .config import ExperimentConfig
from .models import build_model, count_params

# A study builds many models in one process: TensorFlow's "tf.function retracing" notices are expected noise.
logging.getLogger("tensorflow").setLevel(logging.ERROR)


def release_memory() -> None:
    """Give back what earlier models left: Keras' global state, Python garbage, and freed heap to the OS.

    A study trains hundreds of models in one process; without this each one left
    15-40 MB behind (measured on full-size bymerge; ~7 MB with it).
    """
    keras.backend.clear_session()
    gc.collect()
    with contextlib.suppress(Exception):  # glibc only; elsewhere the allocator keeps its own counsel
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class TrainResult:
    model: keras.Model  # the trained model (best weights when early stopping restored them)
    history: dict[str, list[float]]  # per-epoch loss, accuracy, val_loss, val_accuracy, learning_rate, epoch_time
    params: int  # parameter count of the model
    best_epoch: int  # 1-based epoch of the best val_accuracy
    best_val_accuracy: float  # the best epoch's validation accuracy
    train_seconds: float  # wall time of fit()
    stopped_reason: str | None = None  # "nan" when the loss diverged, "early_stopping", or None
    epoch_times: list[float] = field(default_factory=list)  # seconds per epoch
    precision: str = "float32"  # the dtype policy it trained under ("auto" resolved)

    @property
    def epochs_run(self) -> int:
        return len(self.epoch_times)


class EpochStats(keras.callbacks.Callback):
    """Adds ``learning_rate`` and ``epoch_time`` to each epoch's logs (place it first)."""

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs["epoch_time"] = time.perf_counter() - self._t0
        logs["learning_rate"] = current_learning_rate(self.model)


class NanGuard(keras.callbacks.Callback):
    """Stops training after the first epoch whose loss is not finite and remembers it (``hit``).

    It looks once per epoch, not per batch: a batch-level hook makes Keras wait for every
    step's loss, which stalls asynchronous backends (the running mean Keras reports as the
    epoch's loss is NaN or inf as soon as any batch's was).
    """

    hit = False

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.hit = True
            self.model.stop_training = True


class ArrayBatches(keras.utils.PyDataset):
    """Batches sliced from in-memory arrays (uint8 images, int labels), reshuffled every epoch with a seed.

    Keras' own NumPy path hands the whole array to ``tf.data``, which copies it: a second
    copy of the data set per fit, and measured to outlive the trial (two ~0.5 GB copies
    after two trials on full bymerge). Slicing one batch at a time copies only the batch, on
    every backend. ``y`` None gives image-only batches (for ``predict``).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray | None = None, batch_size: int = 128,
                 shuffle: bool = False, seed: int = 0):
        super().__init__(workers=1, use_multiprocessing=False)
        self.x, self.y, self.batch_size, self.shuffle = x, y, int(batch_size), shuffle
        self._rng = np.random.default_rng(seed)
        self._order = self._rng.permutation(len(x)) if shuffle else None

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, i: int):
        lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, len(self.x))
        if self._order is None:
            index: slice | np.ndarray = slice(lo, hi)
        else:
            index = np.sort(self._order[lo:hi])  # ascending rows: one pass over memory
        xb = self.x[index]
        return xb if self.y is None else (xb, self.y[index])

    def on_epoch_end(self) -> None:
        if self.shuffle and self.x is not None:
            self._order = self._rng.permutation(len(self.x))

    def release(self) -> None:
        """Let go of the arrays. Keras' data adapters (on TensorFlow, a ``tf.data`` generator)
        outlive the fit and keep their dataset; without this they would keep the training
        images alive after the trial, and the final phase could not free them."""
        self.x = self.y = self._order = None


def current_learning_rate(model: keras.Model) -> float:
    opt = model.optimizer
    lr = opt.learning_rate
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        lr = lr(opt.iterations)
    return float(keras.ops.convert_to_numpy(lr))


class SparseSmoothedCrossEntropy(keras.losses.Loss):
    """Cross-entropy on integer labels with label smoothing (no one-hot copy of the labels)."""

    def __init__(self, num_classes: int, label_smoothing: float = 0.0, name: str = "smoothed_ce", **kw):
        super().__init__(name=name, **kw)
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        y = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), self.num_classes)
        return keras.losses.categorical_crossentropy(y, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "label_smoothing": self.label_smoothing}


#: CPU flags of native bf16 dot products: AVX512-BF16 (AMD Zen 4+, Intel Cooper Lake+), AMX-BF16 (Intel Sapphire Rapids+).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS or Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def onednn_enabled() -> bool:
    """True where TensorFlow runs its oneDNN CPU kernels (``emnist_hpo`` turns them on for x86-64 before TF loads).

    False on other backends, and where TensorFlow was imported before ``emnist_hpo`` on a CPU it does not turn
    them on for by itself (without AVX512-VNNI or newer units), or with ``TF_ENABLE_ONEDNN_OPTS=0``.
    """
    if keras.backend.backend() != "tensorflow":
        return False
    try:
        from tensorflow.python.util import _pywrap_util_port  # TensorFlow's own switch, read at its start
    except ImportError:  # pragma: no cover - a TensorFlow build without it
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "1"
    return bool(_pywrap_util_port.IsMklEnabled())


@functools.cache
def native_bf16() -> bool:
    """True where mixed_bfloat16 was measured faster than float32: TensorFlow's oneDNN on a CPU with bf16 units.

    Elsewhere (JAX or torch backends, a GPU, oneDNN turned off, a CPU without AVX512-BF16/AMX) bf16 is
    emulated or not measured, so ``precision: auto`` keeps float32 there.
    """
    if not onednn_enabled() or os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0":
        return False
    import tensorflow as tf  # the backend is tensorflow: already imported by Keras

    if tf.config.list_physical_devices("GPU"):
        return False
    return bool(cpu_flags() & set(BF16_CPU_FLAGS))


def resolve_precision(precision: str) -> str:
    """The Keras dtype policy of ``TrainConfig.precision``: ``auto`` is mixed_bfloat16 where :func:`native_bf16`."""
    if precision != "auto":
        return precision
    return "mixed_bfloat16" if native_bf16() else "float32"


def runtime_settings() -> dict[str, str]:
    """What decides a run's speed and rounding beyond its config: Keras backend and version, oneDNN, ``auto`` precision."""
    return {"keras_backend": keras.backend.backend(), "keras_version": keras.__version__,
            "onednn": str(onednn_enabled()).lower(), "auto_precision": resolve_precision("auto")}


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Build layers under the Keras dtype policy ``name`` (a layer keeps the policy it was built with)."""
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(old)


#: Batch size of validation and prediction passes (no gradients: larger batches run faster).
EVAL_BATCH = 1024


def compile_model(model: keras.Model, cfg: ExperimentConfig, num_classes: int, steps_per_epoch: int) -> None:
    t = cfg.train
    loss = (
        SparseSmoothedCrossEntropy(num_classes, t.label_smoothing)
        if t.label_smoothing > 0
        else keras.losses.SparseCategoricalCrossentropy()
    )
    model.compile(
        optimizer=schedules.optimizer(t, steps_per_epoch),
        loss=loss,
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile="auto" if t.jit_compile is None else t.jit_compile,
        # the torch backend runs one batch per call only
        steps_per_execution=1 if keras.backend.backend() == "torch" else t.steps_per_execution,
    )


def train(
    cfg: ExperimentConfig,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    num_classes: int,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int = 0,
) -> TrainResult:
    """Build, compile and fit the model of ``cfg`` on uint8 images; return what happened.

    With ``x_val`` None (a final fit on train+validation) it trains exactly
    ``cfg.train.epochs`` epochs and reports training accuracy in place of validation.
    Images are uint8 arrays (N, 28, 28) or :class:`~emnist_hpo.dataset.Rows` of one (rows
    of a pool, not copied); they are read one batch at a time.
    """
    release_memory()
    keras.utils.set_random_seed(cfg.train.seed)
    precision = resolve_precision(cfg.train.precision)
    with dtype_policy(precision):
        model = build_model(cfg.model, num_classes)
    steps = math.ceil(len(x_train) / cfg.train.batch_size)
    compile_model(model, cfg, num_classes, steps)
    has_val = x_val is not None
    nan_guard = NanGuard()
    cbs: list[keras.callbacks.Callback] = [EpochStats(), nan_guard]
    if has_val:
        cbs += schedules.callbacks(cfg.train)
        if cfg.train.early_stopping_patience > 0:
            cbs.append(
                keras.callbacks.EarlyStopping(
                    monitor="val_accuracy", mode="max", patience=cfg.train.early_stopping_patience,
                    restore_best_weights=True,
                )
            )
    cbs += list(callbacks)
    t0 = time.perf_counter()
    batches = ArrayBatches(x_train, y_train, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed)
    val_batches = ArrayBatches(x_val, y_val, EVAL_BATCH) if has_val else None
    try:
        hist = model.fit(batches, epochs=cfg.train.epochs, validation_data=val_batches, callbacks=cbs,
                         verbose=verbose)
    finally:
        for b in (batches, val_batches):
            if b is not None:
                b.release()
    seconds = time.perf_counter() - t0
    # predict() would unroll steps_per_execution copies of the network into one graph (~70 MB at 8): one batch a call
    model.steps_per_execution = 1
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    score = history.get("val_accuracy" if has_val else "accuracy", [float("nan")])
    finite = [s if math.isfinite(s) else -1.0 for s in score]
    best = int(np.argmax(finite)) if finite else 0
    losses = history.get("loss", [])
    reason = None
    if nan_guard.hit or not all(math.isfinite(v) for v in losses):
        reason = "nan"
    elif has_val and len(losses) < cfg.train.epochs and cfg.train.early_stopping_patience > 0:
        reason = "early_stopping"
    return TrainResult(
        model=model,
        history=history,
        params=count_params(model),
        best_epoch=best + 1,
        best_val_accuracy=float(score[best]) if score else float("nan"),
        train_seconds=seconds,
        stopped_reason=reason,
        epoch_times=history.get("epoch_time", []),
        precision=precision,
    )


def predict_proba(model: keras.Model, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Class probabilities (N, C) for uint8 images (N, 28, 28), fed batch by batch (no copy of ``x``)."""
    batches = ArrayBatches(x, None, batch_size)
    try:
        return np.asarray(model.predict(batches, verbose=0), dtype=np.float32)
    finally:
        batches.release()
