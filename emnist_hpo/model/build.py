"""Keras 3 model builders (backend-agnostic: only ``keras``, never ``tf.keras``).

Models take the dataset's uint8 images (N, 28, 28) as they are and rescale
inside the graph, so no float32 copy of the data set is ever made.
Augmentation layers sit inside the model and act in training only.
"""

from __future__ import annotations

from emnist_hpo import runtime

runtime.configure()  # before Keras loads: its backend, TensorFlow's kernels and quiet start-up

import keras
from keras import layers

from emnist_hpo.model.architecture import IMAGE_SIDE, check_fits
from emnist_hpo.model.batch_norm import FastBatchNormalization
from emnist_hpo.config import ModelConfig
from emnist_hpo.errors import ConfigError


#: The batch-norm layer models are built with: Keras' own, trained through TensorFlow's fused kernel
#: (:mod:`emnist_hpo.model.batch_norm`; benchmarks/bench_batch_norm.py swaps in Keras' layer to compare).
BATCH_NORM: type[layers.BatchNormalization] = FastBatchNormalization


def build_model(cfg: ModelConfig, num_classes: int, name: str = "emnist_cnn") -> keras.Model:
    """Build the (uncompiled) network described by ``cfg`` with a softmax over ``num_classes``."""
    if cfg.kind == "cnn":
        return _cnn(cfg, num_classes, name)
    if cfg.kind == "lstm":
        return _lstm(cfg, num_classes, name)
    raise ConfigError(f"model.kind {cfg.kind!r} is not a Keras model; allowed here: cnn, lstm")


def _inputs() -> tuple[keras.KerasTensor, keras.KerasTensor]:
    inp = keras.Input((IMAGE_SIDE, IMAGE_SIDE), dtype="uint8", name="image")
    return inp, layers.Rescaling(1.0 / 255, name="rescale")(inp)


def _augment(cfg: ModelConfig, h):
    a = cfg.augment
    if a.rotation > 0:
        h = _jittable(layers.RandomRotation(a.rotation / 360.0, fill_mode="constant", name="aug_rotate"))(h)
    if a.shift > 0:
        h = _jittable(layers.RandomTranslation(a.shift, a.shift, fill_mode="constant", name="aug_shift"))(h)
    if a.zoom > 0:
        h = _jittable(layers.RandomZoom(a.zoom, fill_mode="constant", name="aug_zoom"))(h)
    return h


def _jittable(layer: layers.Layer) -> layers.Layer:
    """``layer`` marked as compilable where the backend compiles it: JAX.

    Keras marks its random-transform layers ``supports_jit = False`` because TensorFlow's image-transform op
    has no XLA kernel, and one such layer makes Keras run *every* training step of the model eagerly. On JAX
    the transform is ``jax.scipy.ndimage.map_coordinates``, which compiles: eager, an augmented model trained
    at ~70 images/s on an H200 GPU (64 s per 4,596-image epoch; the same study's unaugmented models, compiled,
    ~4 s). TensorFlow and torch keep Keras' choice (TensorFlow runs them in a graph, not eagerly).
    """
    if keras.backend.backend() == "jax":
        layer.supports_jit = True
    return layer


def _head(cfg: ModelConfig, h, num_classes: int):
    for i, width in enumerate(cfg.dense):
        h = layers.Dense(width, activation="relu", name=f"dense_{i}")(h)
        if cfg.dense_dropout > 0:
            h = layers.Dropout(cfg.dense_dropout, name=f"dense_dropout_{i}")(h)
    return layers.Dense(num_classes, activation="softmax", name="probs", dtype="float32")(h)


def _cnn(cfg: ModelConfig, num_classes: int, name: str) -> keras.Model:
    check_fits(cfg)
    inp, h = _inputs()
    h = layers.Reshape((IMAGE_SIDE, IMAGE_SIDE, 1), name="channel")(h)
    h = _augment(cfg, h)
    pool = layers.MaxPooling2D if cfg.pool == "max" else layers.AveragePooling2D
    for b, block in enumerate(cfg.conv_blocks):
        for c in range(block.convs):
            h = layers.Conv2D(
                block.filters,
                block.kernel,
                padding=cfg.padding,
                use_bias=not cfg.batch_norm,
                name=f"conv_{b}_{c}",
            )(h)
            if cfg.batch_norm:
                h = BATCH_NORM(momentum=cfg.bn_momentum, name=f"bn_{b}_{c}")(h)
            h = layers.Activation("relu", name=f"relu_{b}_{c}")(h)
        h = pool(2, name=f"pool_{b}")(h)
        if cfg.conv_dropout > 0:
            h = layers.Dropout(cfg.conv_dropout, name=f"conv_dropout_{b}")(h)
    h = layers.GlobalAveragePooling2D(name="global_pool")(h) if cfg.global_pool else layers.Flatten(name="flatten")(h)
    return keras.Model(inp, _head(cfg, h, num_classes), name=name)


def _lstm(cfg: ModelConfig, num_classes: int, name: str) -> keras.Model:
    inp, h = _inputs()
    if cfg.augment.enabled:
        h = layers.Reshape((IMAGE_SIDE, IMAGE_SIDE, 1))(h)
        h = _augment(cfg, h)
        h = layers.Reshape((IMAGE_SIDE, IMAGE_SIDE))(h)
    h = layers.LSTM(cfg.lstm_units, name="lstm")(h)  # the 28 rows are the time steps
    return keras.Model(inp, _head(cfg, h, num_classes), name=name)


def count_params(model: keras.Model) -> int:
    """Trainable and non-trainable weights (what a deployment stores)."""
    return int(model.count_params())
