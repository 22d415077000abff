"""The fused batch-norm layer computes what Keras' layer computes, and models are saved with Keras' layer."""

from __future__ import annotations

import subprocess
import sys

import keras
import numpy as np
import pytest

from emnist_hpo.config import AugmentConfig, ConvBlock, ExperimentConfig, ModelConfig, TrainConfig
from emnist_hpo.model.batch_norm import FastBatchNormalization, plain
from emnist_hpo.model.build import build_model
from emnist_hpo.train.trainer import train


def _pair(momentum: float = 0.9, channels: int = 5):
    """Keras' layer and the fused one, built alike with the same (non-trivial) weights."""
    rng = np.random.default_rng(0)
    a, b = keras.layers.BatchNormalization(momentum=momentum), FastBatchNormalization(momentum=momentum)
    for layer in (a, b):
        layer.build((None, 6, 6, channels))
    c = channels
    weights = [rng.normal(1.0, 0.3, c), rng.normal(0.0, 0.3, c), rng.normal(0.0, 1.0, c), rng.uniform(0.5, 2.0, c)]
    for layer in (a, b):
        layer.set_weights([w.astype("float32") for w in weights])
    return a, b


def test_the_fused_layer_trains_as_keras_layer_does_outputs_moving_statistics_and_gradients():
    a, b = _pair()
    x = np.random.default_rng(1).normal(2.0, 3.0, (8, 6, 6, 5)).astype("float32")
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        grads = []
        for layer in (a, b):
            xt = tf.constant(x)
            with tf.GradientTape() as tape:
                tape.watch(xt)
                y = layer(xt, training=True)
                loss = tf.reduce_sum(y * tf.sin(y))  # a loss whose gradient is not uniform
            grads.append([g.numpy() for g in tape.gradient(loss, [xt, layer.gamma, layer.beta])])
            layer.out = y.numpy()
        for ga, gb in zip(*grads):
            np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-4)
    else:  # elsewhere the fused layer is Keras' layer
        a.out, b.out = (keras.ops.convert_to_numpy(layer(x, training=True)) for layer in (a, b))
    np.testing.assert_allclose(a.out, b.out, rtol=1e-4, atol=1e-4)
    for wa, wb in zip(a.get_weights(), b.get_weights()):  # moving mean and the *biased* moving variance
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-5)
    assert not np.allclose(a.get_weights()[2], _pair()[0].get_weights()[2])  # the statistics did move
    np.testing.assert_allclose(keras.ops.convert_to_numpy(a(x, training=False)),
                               keras.ops.convert_to_numpy(b(x, training=False)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels", [16, 24])  # the fused kernel; Keras' path (24 is no multiple of 16)
def test_under_bf16_the_fused_layer_takes_the_activations_as_they_are_and_matches_keras_layer(channels):
    """Mixed bf16 (what ``precision: auto`` picks on a CPU with bf16 units): bf16 in, bf16 out, float32 statistics."""
    from emnist_hpo.train.trainer import dtype_policy

    with dtype_policy("mixed_bfloat16"):
        a, b = _pair(channels=channels)
    x = keras.ops.cast(np.random.default_rng(3).normal(2.0, 3.0, (8, 6, 6, channels)), "bfloat16")
    ya, yb = a(x, training=True), b(x, training=True)
    assert keras.backend.standardize_dtype(yb.dtype) == "bfloat16"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.cast(ya, "float32")),
                               keras.ops.convert_to_numpy(keras.ops.cast(yb, "float32")), rtol=2e-2, atol=2e-2)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        assert wb.dtype == np.float32
        np.testing.assert_allclose(wa, wb, rtol=1e-4, atol=1e-4)


def test_models_are_built_with_the_fused_layer_and_saved_with_keras_own(tmp_path):
    """The registry's model must load where this package is not installed: plain() swaps the layer, weights kept.
    The model is what a study registers: trained, so compiled, with this package's label-smoothing loss."""
    model_cfg = ModelConfig(conv_blocks=[ConvBlock(4, 3, convs=2)], batch_norm=True, dense=[8],
                            augment=AugmentConfig(rotation=9, shift=0.09, zoom=0.09))
    cfg = ExperimentConfig(model=model_cfg, train=TrainConfig(epochs=1, batch_size=16, label_smoothing=0.1)).validate()
    x = np.random.default_rng(0).integers(0, 256, (64, 28, 28)).astype("uint8")
    model = train(cfg, x, np.arange(64) % 10, None, None, 10).model  # moves the statistics off their start
    assert sum(isinstance(layer, FastBatchNormalization) for layer in model.layers) == 2 and model.compiled
    out = plain(model)
    assert not any(isinstance(layer, FastBatchNormalization) for layer in out.layers)
    assert sum(type(layer) is keras.layers.BatchNormalization for layer in out.layers) == 2
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out.predict(x, verbose=0)),
                               keras.ops.convert_to_numpy(model.predict(x, verbose=0)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(out.get_layer("bn_0_0").get_weights()[2], 0.0)
    no_bn = build_model(ModelConfig(conv_blocks=[ConvBlock(4, 3)], dense=[8]), 10)
    assert plain(no_bn) is no_bn

    path = tmp_path / "model.keras"
    out.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "want.npy", keras.ops.convert_to_numpy(model.predict(x, verbose=0)))
    code = (  # a fresh interpreter that never imports emnist_hpo
        "import sys, numpy as np, keras\n"
        f"m = keras.saving.load_model({str(path)!r}, compile=False, safe_mode=True)\n"
        f"got = m.predict(np.load({str(tmp_path / 'x.npy')!r}), verbose=0)\n"
        f"np.testing.assert_allclose(got, np.load({str(tmp_path / 'want.npy')!r}), rtol=1e-5, atol=1e-6)\n"
        "assert 'emnist_hpo' not in sys.modules\n"
        "print('loaded')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "loaded" in res.stdout, res.stderr[-2000:]


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_precise_statistics_recalibration_reaches_the_fused_layer(momentum):
    """The trainer recomputes batch-norm statistics by setting each layer's momentum per batch: the fused layer
    must read its momentum at call time, as Keras' layer does."""
    a, b = _pair(momentum)
    x = np.random.default_rng(2).normal(-1.0, 2.0, (8, 6, 6, 5)).astype("float32")
    for layer in (a, b):
        layer.momentum = momentum
        layer(x, training=True)
    np.testing.assert_allclose(a.get_weights()[2], b.get_weights()[2], rtol=1e-5, atol=1e-5)
    if momentum == 0.0:  # the moving mean is the batch's mean
        np.testing.assert_allclose(b.get_weights()[2], x.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-4)
