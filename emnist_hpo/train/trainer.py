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
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from emnist_hpo import runtime

runtime.configure()  # before Keras loads: its backend, TensorFlow's kernels and quiet start-up

import keras
import numpy as np

from emnist_hpo.train import schedules
from emnist_hpo.config import ExperimentConfig
from emnist_hpo.data.prepared import Rows
from emnist_hpo.train.fidelity import Ladder, Rung
from emnist_hpo.model.build import build_model, count_params

# A study builds many models in one process: TensorFlow's "tf.function retracing" notices are expected noise.
logging.getLogger("tensorflow").setLevel(logging.ERROR)


def release_memory() -> None:
    """Give back what earlier models left: Keras' global state, Python garbage, and freed heap to the OS.

    A study trains hundreds of models in one process; without this each one left
    15-40 MB behind (measured on full-size bymerge; ~7 MB with it).

    The first call, before the process's first model, freezes what is alive then (TensorFlow, Keras, MLflow and
    Optuna's modules and the study's stores: ~650,000 objects in a study) out of the garbage collector's reach:
    every later collection scans only what came after. A trial paid three full collections before (Keras'
    ``clear_session``, a second here, Optuna's ``gc_after_trial``): 1.09 s a trial on the 2-core Intel machine, 0.16 s
    since; a study of 12 small trials went from 52.9 s to 42.5 s (benchmarks/bench_release.py).
    """
    keras.backend.clear_session()  # collects Python garbage itself (free_memory=True)
    if not gc.get_freeze_count():  # once per process: nothing else here freezes
        gc.freeze()
    with contextlib.suppress(Exception):  # glibc only; elsewhere the allocator keeps its own counsel
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class RungResult:
    index: int  # 0-based rung of the ladder
    score: float  # validation accuracy at the rung's end (the last rung: its best epoch)
    images: int  # training images seen at this rung (share x epochs trained)
    seconds: float  # wall time of the rung, validation included
    epochs: int  # epochs trained at this rung


def rung_score(scores: Sequence[float], final: bool, restores_best: bool) -> float:
    """A rung's score from its epochs' validation accuracies (finite, in order): that of the model the rung ends
    with. A screening rung validates once, at its end. The last rung validates every epoch, and its model is the
    last epoch's, which the final fit (the whole schedule on train+validation) delivers, unless early stopping
    restored the best epoch's weights (``restores_best``). Ranked by its best epoch, a run whose validation swings
    from epoch to epoch reads high: a letters champion at a constant learning rate peaked at 93.93% and ended at
    93.43% (tested 92.54%), compact at a cosine schedule peaked at 93.88% and ended at 93.82% (tested 93.24%).
    """
    if not scores:
        return float("nan")
    return float(max(scores)) if final and restores_best else float(scores[-1])


@dataclass
class TrainResult:
    model: keras.Model  # the trained model (best weights when early stopping restored them)
    history: dict[str, list[float]]  # per-epoch loss, accuracy, val_loss, val_accuracy, learning_rate, epoch_time, rung
    params: int  # parameter count of the model
    best_epoch: int  # 1-based epoch of the last rung at which val_accuracy peaked (what a final fit trains to)
    best_val_accuracy: float  # the best epoch's validation accuracy (the last rung reached, on its validation images)
    train_seconds: float  # wall time of training, validation included
    stopped_reason: str | None = None  # "nan", "early_stopping", "stopped" (a RungControl said so), or None
    epoch_times: list[float] = field(default_factory=list)  # seconds per epoch
    precision: str = "float32"  # the dtype policy it trained under ("auto" resolved)
    rungs: list[RungResult] = field(default_factory=list)  # one per rung trained
    stop_detail: str | None = None  # why a RungControl stopped training (pruned, out of time)
    images_seen: int = 0  # training images over all rungs
    val_score: float = float("nan")  # what a trial is ranked by: the validation accuracy of the model training ended
    # with, the last epoch's (the best epoch's where early stopping restored its weights; see ``rung_score``)

    @property
    def epochs_run(self) -> int:
        return len(self.epoch_times)

    @property
    def last_rung_rates(self) -> dict[int, float]:
        """The learning rate of each epoch of the last rung trained, by global epoch number (0-based, counted across
        the rungs as Keras counts them): what a ``plateau`` schedule's reductions were, for its final fit to replay."""
        rungs, rates = self.history.get("rung", []), self.history.get("learning_rate", [])
        if not rungs or len(rates) != len(rungs):
            return {}
        last = rungs[-1]
        return {i: float(rates[i]) for i, r in enumerate(rungs) if r == last and math.isfinite(rates[i])}

    @property
    def completed(self) -> bool:
        """Trained through the last rung of its ladder."""
        return self.stopped_reason in (None, "early_stopping")


class RungControl:
    """Asked before and after every rung of a ladder: the seam between training and a pruner or a time budget.

    Training never imports Optuna; the objective passes a subclass.
    """

    def before(self, index: int, rung: Rung, images: int) -> str | None:
        """A reason not to train rung ``index`` (``images`` training images), or None to go on."""
        return None

    def after(self, result: RungResult, final: bool) -> str | None:
        """A reason to stop after ``result`` (pruned), or None to climb on."""
        return None


class EpochStats(keras.callbacks.Callback):
    """Adds ``learning_rate``, ``epoch_time`` (validation included) and the ladder's ``rung`` to each epoch's logs
    (place it first)."""

    def __init__(self, rung: int = 0):
        super().__init__()
        self.rung = rung

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs["epoch_time"] = time.perf_counter() - self._t0
        logs["learning_rate"] = current_learning_rate(self.model)
        logs["rung"] = float(self.rung)


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


def compile_model(model: keras.Model, cfg: ExperimentConfig, num_classes: int, steps_per_epoch: int,
                  total_steps: int | None = None, first_rung_steps: int | None = None) -> None:
    t = cfg.train
    loss = (
        SparseSmoothedCrossEntropy(num_classes, t.label_smoothing)
        if t.label_smoothing > 0
        else keras.losses.SparseCategoricalCrossentropy()
    )
    model.compile(
        optimizer=schedules.optimizer(t, steps_per_epoch, total_steps, first_rung_steps),
        loss=loss,
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile="auto" if t.jit_compile is None else t.jit_compile,
        # the torch backend runs one batch per call only
        steps_per_execution=1 if keras.backend.backend() == "torch" else t.steps_per_execution,
    )


# --------------------------------------------------------------------------- batch-norm statistics

#: Training images whose batch statistics make a batch-norm layer's moving statistics before a validation.
PRECISE_BN_IMAGES = 1024


def batch_norm_layers(model: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def recalibrate_batch_norm(model: keras.Model, x, batch_size: int = 256, images: int = PRECISE_BN_IMAGES) -> None:
    """Set every batch-norm layer's moving mean and variance to the average over ``images`` training images
    of its batch statistics under the current weights ("precise BN", Wu & Johnson 2021).

    With Keras' momentum 0.99 the moving statistics of a short run still hold mostly their
    initial values: a model that trains well scores at chance on validation for several
    epochs (3 epochs on 6,000 balanced images: validation 0.021 against 0.355 once
    recalibrated; benchmarks/bench_fidelity.py). Low-fidelity rungs are judged on such
    scores, so every validation is preceded by this. The layers' momentum is set to
    ``k / (k + 1)`` for the k-th batch: the moving statistics become the plain mean of the
    batches' statistics, whatever they held before.
    """
    bns = batch_norm_layers(model)
    if not bns or len(x) == 0:
        return
    momenta = [bn.momentum for bn in bns]
    try:
        n = min(len(x), images)
        for k, lo in enumerate(range(0, n, batch_size)):
            for bn in bns:
                bn.momentum = k / (k + 1)
            model(x[lo:min(lo + batch_size, n)], training=True)
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m


class Validation(keras.callbacks.Callback):
    """Scores the model on validation images at the end of the epochs asked for, writing ``val_loss`` and
    ``val_accuracy`` into the epoch's logs (so it must come before every callback that reads them).

    Batch-norm statistics are recomputed on ``x_stats`` first (:func:`recalibrate_batch_norm`). A
    screening rung validates at its last epoch only (``every_epoch`` False): the scores in between
    are never used, and on small rungs validation costs as much as training.
    """

    def __init__(self, x_val, y_val, x_stats, *, every_epoch: bool, last_epoch: int):
        super().__init__()
        self.x_val, self.y_val, self.x_stats = x_val, y_val, x_stats
        self.every_epoch, self.last_epoch = every_epoch, last_epoch

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        logs["val_loss"], logs["val_accuracy"] = float("nan"), float("nan")  # not scored: NaN keeps histories aligned
        if not (self.every_epoch or epoch + 1 >= self.last_epoch):
            return
        loss = logs.get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            logs["val_loss"], logs["val_accuracy"] = float("nan"), 0.0
            return
        with averaged_weights(self.model):
            recalibrate_batch_norm(self.model, self.x_stats)
            batches = ArrayBatches(self.x_val, self.y_val, EVAL_BATCH)
            try:
                scores = self.model.evaluate(batches, verbose=0, return_dict=True)
            finally:
                batches.release()
        logs["val_loss"], logs["val_accuracy"] = float(scores["loss"]), float(scores["accuracy"])


@contextlib.contextmanager
def averaged_weights(model: keras.Model) -> Iterator[None]:
    """Within the block ``model`` holds its optimizer's moving average of the weights (where it keeps one), and
    its raw weights after: what is validated is the model training ends on, and training goes on unchanged."""
    opt = model.optimizer
    if not (getattr(opt, "use_ema", False) and getattr(opt, "built", False)):  # train.average_epochs
        yield
        return
    raw = _trainable_values(model)
    opt.finalize_variable_values(model.trainable_variables)  # Keras' own: the averages into the model
    try:
        yield
    finally:
        _set_trainable(model, raw)


def _trainable_values(model: keras.Model) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]


def _set_trainable(model: keras.Model, values: Sequence[np.ndarray]) -> None:
    for var, value in zip(model.trainable_variables, values):
        var.assign(value)


class _RawWeights(keras.callbacks.Callback):
    """The raw weights at each epoch's end: ``fit`` ends by putting the moving average into the model, and a rung
    that is not the last continues from the raw weights (as a run that never stopped between rungs would)."""

    def __init__(self):
        super().__init__()
        self.weights: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch, logs=None):
        self.weights = _trainable_values(self.model)

    def restore(self) -> None:
        if self.weights is not None:
            _set_trainable(self.model, self.weights)


# --------------------------------------------------------------------------- checkpoints of a running trial


class TrialCheckpoint:
    """A running trial's state after its last finished epoch: weights, optimizer state, where it stood.

    Written after every epoch (to a temporary file, then renamed: a kill leaves the previous one
    whole) so an interrupted trial continues from its last epoch instead of starting again.
    Plain arrays (``numpy.savez``) and JSON: nothing in it is ever executed or unpickled.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def _state(self) -> Path:
        return self.path.with_suffix(".json")

    def exists(self) -> bool:
        return self.path.is_file() and self._state.is_file()

    def save(self, model: keras.Model, position: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"w{i}": np.asarray(w) for i, w in enumerate(model.get_weights())}
        if model.optimizer is not None and model.optimizer.built:
            arrays.update({f"o{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.optimizer.variables)})
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(self.path)
        state_tmp = self._state.with_name(self._state.name + ".tmp")
        state_tmp.write_text(json.dumps(position), encoding="utf-8")
        state_tmp.replace(self._state)

    def load(self) -> tuple[list[np.ndarray], list[np.ndarray], dict] | None:
        """``(weights, optimizer variables, position)``, or None when there is no whole checkpoint."""
        if not self.exists():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as z:
                weights = [z[f"w{i}"] for i in range(sum(k.startswith("w") for k in z.files))]
                opt = [z[f"o{i}"] for i in range(sum(k.startswith("o") for k in z.files))]
            position = json.loads(self._state.read_text(encoding="utf-8"))
        except Exception:  # noqa: BLE001 - a damaged checkpoint: the trial starts afresh
            return None
        return weights, opt, position

    def restore(self, model: keras.Model, weights: list[np.ndarray], opt: list[np.ndarray]) -> bool:
        """Load ``weights`` and the optimizer state into a freshly compiled ``model``; False if they do not fit."""
        try:
            model.set_weights(weights)
            if opt:
                model.optimizer.build(model.trainable_variables)
                if len(opt) != len(model.optimizer.variables):
                    return False
                for var, value in zip(model.optimizer.variables, opt):
                    var.assign(value)
        except Exception:  # noqa: BLE001 - another architecture (a changed config): start afresh
            return False
        return True

    def remove(self) -> None:
        for p in (self.path, self._state):
            with contextlib.suppress(OSError):
                p.unlink()

    def move_to(self, other: "TrialCheckpoint") -> None:
        """Hand this checkpoint to another trial (the one that resumes this trial's training)."""
        other.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.replace(other.path)
        self._state.replace(other._state)


class _SaveEachEpoch(keras.callbacks.Callback):
    def __init__(self, checkpoint: TrialCheckpoint, position: Callable[[int, dict], dict]):
        super().__init__()
        self.checkpoint, self.position = checkpoint, position

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and math.isfinite(float(loss)):
            self.checkpoint.save(self.model, self.position(epoch, dict(logs or {})))


class _ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' early stopping (best weights restored), able to start from a resumed trial's state."""

    def __init__(self, *args, start: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = start or {}

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.start.get("best") is not None:
            self.best, self.wait = float(self.start["best"]), int(self.start.get("wait", 0))
            self.best_epoch = int(self.start.get("best_epoch", 0))


# --------------------------------------------------------------------------- training


def train(
    cfg: ExperimentConfig,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    num_classes: int,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int = 0,
    *,
    ladder: Ladder | None = None,
    control: RungControl | None = None,
    checkpoint: TrialCheckpoint | None = None,
) -> TrainResult:
    """Build, compile and fit the model of ``cfg`` on uint8 images; return what happened.

    ``ladder`` (default: one rung, all the data, ``cfg.train.epochs`` epochs) makes it a
    multi-fidelity run (:mod:`emnist_hpo.train.fidelity`): each rung continues from the previous
    one's weights on a larger nested stratified share of the training set, and ``control``
    may stop it before or after any rung. With ``x_val`` None (a final fit on
    train+validation) it trains every rung to its end and reports training accuracy in
    place of validation. Images are uint8 arrays (N, 28, 28) or
    :class:`~emnist_hpo.data.prepared.Rows` of one (rows of a pool, not copied); they are read one
    batch at a time. ``checkpoint`` saves the state after every epoch, and a run given a
    checkpoint that exists continues from it.
    """
    from emnist_hpo.train.fidelity import nested_order, single

    release_memory()
    ladder = ladder or single(cfg.train.epochs)
    control = control or RungControl()
    keras.utils.set_random_seed(cfg.train.seed)
    precision = resolve_precision(cfg.train.precision)
    with dtype_policy(precision):
        model = build_model(cfg.model, num_classes)
    batch = cfg.train.batch_size
    n = len(x_train)
    has_val = x_val is not None
    order = nested_order(y_train, cfg.train.seed)  # every prefix stratified: the rungs' shares and BN statistics
    multi = len(ladder.rungs) > 1
    val_order = nested_order(y_val, cfg.train.seed + 1) if has_val and multi else None
    sizes, val_sizes = ladder.sizes(n), ladder.val_sizes(len(y_val) if has_val else 0)
    offsets = [sum(r.epochs for r in ladder.rungs[:i]) for i in range(len(ladder.rungs))]  # global epoch numbers
    steps = ladder.rung_steps(n, batch)  # the first rung's bound the weights' averaging window
    compile_model(model, cfg, num_classes, math.ceil(n / batch), sum(steps), steps[0])

    history: dict[str, list[float]] = {}
    rungs: list[RungResult] = []
    start_rung, start_epoch = 0, 0  # where a resumed run picks up (epochs done within that rung)
    early_state: dict | None = None
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None and checkpoint.restore(model, saved[0], saved[1]):
        position = saved[2]
        history = {k: list(v) for k, v in position.get("history", {}).items()}
        rungs = [RungResult(**r) for r in position.get("rungs", [])]
        start_rung, start_epoch = int(position["rung"]), int(position["epoch"])
        early_state = position.get("early_stopping")
    nan_guard = NanGuard()
    reason = detail = None
    t0 = time.perf_counter()
    for index in range(start_rung, len(ladder.rungs)):
        rung, offset = ladder.rungs[index], offsets[index]
        first = start_epoch if index == start_rung else 0
        rows = np.sort(order[: sizes[index]]) if sizes[index] < n else None
        stats = Rows(x_train, order[: min(sizes[index], PRECISE_BN_IMAGES)])
        r0 = time.perf_counter()
        if first < rung.epochs:
            why = control.before(index, rung, sizes[index] * (rung.epochs - first))
            if why:
                reason, detail = "stopped", why
                break
            xr = x_train if rows is None else Rows(x_train, rows)
            yr = y_train if rows is None else y_train[rows]
            cbs: list[keras.callbacks.Callback] = [EpochStats(index), nan_guard]
            if has_val:  # first: every later callback (and epoch_time) sees the validation scores
                vsize = val_sizes[index]
                vrows = np.sort(val_order[:vsize]) if val_order is not None and vsize < len(y_val) else None
                xv = x_val if vrows is None else Rows(x_val, vrows)
                yv = y_val if vrows is None else y_val[vrows]
                cbs.insert(0, Validation(xv, yv, stats, every_epoch=rung.final, last_epoch=offset + rung.epochs))
                if rung.final:
                    cbs += schedules.callbacks(cfg.train)
                    if cfg.train.early_stopping_patience > 0:
                        cbs.append(_ResumableEarlyStopping(
                            monitor="val_accuracy", mode="max", patience=cfg.train.early_stopping_patience,
                            restore_best_weights=True, start=early_state if index == start_rung else None))
            if checkpoint is not None:
                cbs.append(_SaveEachEpoch(checkpoint, _Position(history, rungs, index, offset, cbs)))
            cbs += list(callbacks)
            raw = _RawWeights() if getattr(model.optimizer, "use_ema", False) and not rung.final else None
            if raw is not None:
                cbs.append(raw)
            batches = ArrayBatches(xr, yr, batch, shuffle=True, seed=cfg.train.seed + 7919 * index + first)
            try:
                hist = model.fit(batches, epochs=offset + rung.epochs, initial_epoch=offset + first, callbacks=cbs,
                                 verbose=verbose)
            finally:
                batches.release()
            if raw is not None:
                raw.restore()  # fit ended on the averaged weights; the next rung trains on from the raw ones
            for k, vals in hist.history.items():
                history.setdefault(k, []).extend(float(v) for v in vals)
            if nan_guard.hit:
                reason = "nan"
                break
            if has_val and rung.final and cfg.train.early_stopping_patience > 0 \
                    and len(hist.history.get("loss", [])) < rung.epochs - first:
                reason = "early_stopping"
            if not has_val and rung.final:
                recalibrate_batch_norm(model, stats)  # the final model keeps precise statistics
        in_rung = [i for i, r in enumerate(history.get("rung", [])) if int(r) == index]
        score_key = "val_accuracy" if has_val else "accuracy"
        scores = [history[score_key][i] for i in in_rung if i < len(history.get(score_key, []))]
        finite = [v for v in scores if math.isfinite(v)]
        score = rung_score(finite, rung.final, cfg.train.early_stopping_patience > 0)
        seconds = time.perf_counter() - r0 + (sum(history["epoch_time"][i] for i in in_rung[:first])
                                              if first and "epoch_time" in history else 0.0)
        result = RungResult(index, float(score), sizes[index] * len(in_rung), seconds, len(in_rung))
        rungs.append(result)
        why = control.after(result, rung.final)
        if why and not rung.final:
            reason, detail = "stopped", why
            break
    seconds = time.perf_counter() - t0
    # predict() would unroll steps_per_execution copies of the network into one graph (~70 MB at 8): one batch a call
    model.steps_per_execution = 1
    losses = history.get("loss", [])
    if nan_guard.hit or not all(math.isfinite(v) for v in losses):
        reason = "nan"
    last = rungs[-1].index if rungs else 0
    in_last = [i for i, r in enumerate(history.get("rung", [])) if int(r) == last]
    score_key = "val_accuracy" if has_val else "accuracy"
    values = history.get(score_key, [])
    finite = [(values[i], i) for i in in_last if i < len(values) and math.isfinite(values[i])]
    best_i = max(finite)[1] if finite else None
    return TrainResult(
        model=model,
        history=history,
        params=count_params(model),
        best_epoch=in_last.index(best_i) + 1 if best_i is not None else 0,
        best_val_accuracy=float(values[best_i]) if best_i is not None else float("nan"),
        val_score=rungs[-1].score if rungs else float("nan"),
        train_seconds=seconds,
        stopped_reason=reason,
        epoch_times=history.get("epoch_time", []),
        precision=precision,
        rungs=rungs,
        stop_detail=detail,
        images_seen=sum(r.images for r in rungs),
    )


class _Position:
    """Where a run stands after an epoch (saved with the checkpoint): rung, epoch within it, history, rung results."""

    def __init__(self, history, rungs, index, offset, cbs):
        self.history, self.rungs, self.index, self.offset, self.cbs = history, rungs, index, offset, cbs
        self.logs: list[dict] = []  # this fit's epochs so far (Keras fills its history in only when the fit ends)

    def __call__(self, epoch: int, logs: dict) -> dict:
        self.logs.append(logs)
        merged = {k: list(v) for k, v in self.history.items()}
        for epoch_logs in self.logs:
            for k, v in epoch_logs.items():
                if isinstance(v, (int, float)):
                    merged.setdefault(k, []).append(float(v))
        state = {"rung": self.index, "epoch": epoch + 1 - self.offset, "history": merged,
                 "rungs": [dict(r.__dict__) for r in self.rungs]}
        es = next((c for c in self.cbs if isinstance(c, keras.callbacks.EarlyStopping)), None)
        if es is not None and es.best is not None and math.isfinite(float(es.best)):
            state["early_stopping"] = {"best": float(es.best), "wait": int(es.wait), "best_epoch": int(es.best_epoch)}
        return state


def predict_proba(model: keras.Model, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Class probabilities (N, C) for uint8 images (N, 28, 28), fed batch by batch (no copy of ``x``)."""
    batches = ArrayBatches(x, None, batch_size)
    try:
        return np.asarray(model.predict(batches, verbose=0), dtype=np.float32)
    finally:
        batches.release()
