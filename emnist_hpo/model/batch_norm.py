"""Batch-norm that trains at TensorFlow's fused speed on a CPU, and is saved as Keras' own layer.

Keras 3's :class:`keras.layers.BatchNormalization` is written in backend ops: under TensorFlow a training
step runs ``tf.nn.moments`` and ``tf.nn.batch_normalization`` as a dozen separate element-wise kernels, each
a pass over the activations, forward and backward. TensorFlow's ``FusedBatchNormV3`` does the same in one
pass, and takes bf16 activations as they are where Keras casts them to float32 and back. On this project's
2-core CPUs batch-norm made the compact seed's epochs 2-5x as long as without it at equal FLOPs, which kept
batch-norm models (the accurate ones) out of reach of a 30-minute search (benchmarks/bench_batch_norm.py).

:class:`FastBatchNormalization` computes what Keras' layer computes (the same normalisation, the same
moving statistics, its biased batch variance; tests/test_batch_norm.py compares outputs, statistics and
gradients) through the fused kernel where it applies: TensorFlow, training, channels-last 4-D input, no
mask, renorm or synchronisation, and under bf16 a multiple of 16 channels (:data:`HALF_CHANNELS`).
Elsewhere (JAX, torch, inference) it *is* Keras' layer. Its weights are Keras' (gamma, beta, moving mean and
variance), so :func:`plain` turns a model into the same model with Keras' own layers, for artefacts loaded
where this package is not installed (the registry's model).
"""

from __future__ import annotations

import keras

#: Registered so that a checkpoint saved mid-study loads wherever this module is imported.
PACKAGE = "emnist_hpo"

#: Half-precision activations take the fused kernel only with a multiple of this many channels. With others
#: (8, 24, 40: the search space's 24 among them) its bf16 kernel is 10-40x slower per element (72 ns for 8
#: channels, 32 for 24, 22 for 40, against 1.2-1.7 for 16-64, a training step's forward and backward on this
#: project's Intel CPU), slower than Keras' layer (4.5-6 ns), which those layers use instead. Padding the
#: channels up to 16 cost 4-13 ns: the copies eat the gain. Float32's cliff is milder (4.1-4.4 ns for 24 and 40
#: channels against 1.3-1.6), about Keras' layer's time (3.6-4.0), so float32 keeps the fused kernel.
HALF_CHANNELS = 16


@keras.saving.register_keras_serializable(package=PACKAGE)
class FastBatchNormalization(keras.layers.BatchNormalization):
    """:class:`keras.layers.BatchNormalization` whose training step under TensorFlow is one fused kernel."""

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable and self._fusable(inputs, mask)):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf  # only reached on the TensorFlow backend

        # half-precision activations go in as they are (the kernel computes in float32 inside): casting them up
        # and back, as Keras' layer does, is two more passes each way, and doubled the kernel's time under bf16
        x = inputs if inputs.dtype in (tf.bfloat16, tf.float16) else tf.cast(inputs, "float32")
        channels = x.shape[-1]
        gamma = tf.cast(self.gamma, "float32") if self.scale else tf.ones((channels,), "float32")
        beta = tf.cast(self.beta, "float32") if self.center else tf.zeros((channels,), "float32")
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, gamma, beta, epsilon=self.epsilon, data_format="NHWC", is_training=True)
        # the kernel returns the batch variance with Bessel's correction; Keras' layer keeps the biased one
        n = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), "float32")
        variance = variance * (n - 1.0) / tf.maximum(n, 2.0)
        m = self.momentum
        self.moving_mean.assign(tf.cast(self.moving_mean, "float32") * m + tf.stop_gradient(mean) * (1.0 - m))
        self.moving_variance.assign(
            tf.cast(self.moving_variance, "float32") * m + tf.stop_gradient(variance) * (1.0 - m))
        return tf.cast(y, self.compute_dtype)

    def _fusable(self, inputs, mask) -> bool:
        return (keras.backend.backend() == "tensorflow" and mask is None and len(inputs.shape) == 4
                and self.axis in (-1, 3) and not self.renorm and not self.synchronized
                and not (keras.backend.standardize_dtype(inputs.dtype) in ("bfloat16", "float16")
                         and inputs.shape[-1] % HALF_CHANNELS))


def plain(model: keras.Model) -> keras.Model:
    """``model`` with Keras' own :class:`~keras.layers.BatchNormalization` in place of every
    :class:`FastBatchNormalization`, the same weights, uncompiled (``model`` itself when it has none).

    Rebuilt from the model's config, not :func:`keras.models.clone_model`: that compiles the copy again from
    the original's compile config, and a study's loss is this package's class (a registry save then failed)."""
    if not any(isinstance(layer, FastBatchNormalization) for layer in model.layers):
        return model
    config = model.get_config()
    fast = keras.saving.get_registered_name(FastBatchNormalization)
    for entry in config["layers"]:
        if entry.get("registered_name") == fast:
            entry.update(module="keras.layers", class_name="BatchNormalization", registered_name=None)
    out = model.__class__.from_config(config)
    out.set_weights(model.get_weights())
    return out
