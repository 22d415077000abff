"""What a model costs, known before it is built: parameters and forward FLOPs per image.

Computed from the :class:`~emnist_hpo.config.ModelConfig` by shape arithmetic
alone (no Keras, no memory), so a study can refuse a model that is too large
(``--max-params``, ``--max-flops``) before it spends anything on it, predict how
long training it takes, and show cost beside accuracy.

Conventions:

- ``params``: every stored number, trainable or not, exactly as
  ``keras.Model.count_params()`` counts it (batch-norm keeps 4 per channel: scale,
  offset, moving mean and variance); checked against Keras in the tests.
- ``flops``: forward floating-point operations per image of the conv, dense and LSTM
  layers, a multiply-add counted as 2. Batch-norm, activations, pooling, dropout and
  augmentation are left out (each is under ~2% of a conv layer's cost here).
  Training costs about 3x the forward pass (forward, and two matrix products back).
- ``normalized``: elements per image that pass through batch-norm (0 without it), those of a
  layer whose channels are not a multiple of :data:`NORM_FAST_CHANNELS` counted
  :data:`NORM_SLOW_WEIGHT` times. Few FLOPs, but not little time: memory-bound on a CPU,
  batch-norm doubled compact's training time at equal FLOPs, so time predictions count it
  beside the FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from emnist_hpo.model.architecture import IMAGE_SIDE

if TYPE_CHECKING:
    from emnist_hpo.config import ModelConfig

#: Training FLOPs per image as a multiple of the forward FLOPs (forward + input and weight gradients).
TRAIN_FLOPS_FACTOR = 3
#: Batch-norm's time per element, TensorFlow on a CPU: with a multiple of this many channels the fused kernel runs
#: (1.2-1.7 ns per element, a training step's forward and backward); with others (the space's 24) it takes
#: :data:`NORM_SLOW_WEIGHT` times as long: the fused kernel's float32 path 4.1-4.4 ns, Keras' layer under bf16
#: 4.5-7 ns (emnist_hpo/model/batch_norm.py). Refitting a letters study's 49 rungs with those elements counted
#: 3 times cut the error of its 12 such rungs' predicted times from 11.4% to 9.0% (mean |log|; bias -8.5% to
#: -5.5%), and of the others' a little (AMD, bf16; 2x and 4x did about as well).
NORM_FAST_CHANNELS = 16
NORM_SLOW_WEIGHT = 3


@dataclass(frozen=True)
class ModelCost:
    params: int  # stored numbers (as keras.Model.count_params())
    flops: int  # forward FLOPs per image (multiply-add = 2) of conv, dense and LSTM layers
    normalized: int = 0  # elements per image through batch-norm layers, weighted by their speed (time FLOPs don't count)

    @property
    def train_flops(self) -> int:
        """FLOPs to train on one image (forward and backward)."""
        return TRAIN_FLOPS_FACTOR * self.flops

    def row(self) -> dict[str, int]:
        return {"params": self.params, "flops": self.flops}


def run_flops(images: float, flops: float, val_images: float = 0) -> float:
    """FLOPs a training run spends: ``images`` trained on (forward and backward) and ``val_images`` scored, of a
    model of ``flops`` forward FLOPs per image."""
    return float(images) * TRAIN_FLOPS_FACTOR * flops + float(val_images) * flops


def model_cost(cfg: "ModelConfig", num_classes: int) -> ModelCost:
    """Parameters and forward FLOPs of the Keras model :func:`~emnist_hpo.model.build.build_model` would build."""
    if cfg.kind == "cnn":
        return _cnn(cfg, num_classes)
    if cfg.kind == "lstm":
        return _lstm(cfg, num_classes)
    return ModelCost(0, 0)  # classical baselines: no network (their size is measured after fitting)


def _head(width: int, dense: list[int], num_classes: int) -> tuple[int, int]:
    params = flops = 0
    for units in [*dense, num_classes]:
        params += width * units + units
        flops += 2 * width * units
        width = units
    return params, flops


def _cnn(cfg: "ModelConfig", num_classes: int) -> ModelCost:
    side, channels = IMAGE_SIDE, 1
    params = flops = normalized = 0
    for block in cfg.conv_blocks:
        for _ in range(block.convs):
            if cfg.padding == "valid":
                side = side - block.kernel + 1
            weights = block.kernel * block.kernel * channels * block.filters
            params += weights + (4 * block.filters if cfg.batch_norm else block.filters)
            flops += 2 * weights * max(side, 0) ** 2
            if cfg.batch_norm:
                weight = 1 if block.filters % NORM_FAST_CHANNELS == 0 else NORM_SLOW_WEIGHT
                normalized += weight * max(side, 0) ** 2 * block.filters
            channels = block.filters
        side //= 2
    width = channels if cfg.global_pool else max(side, 0) ** 2 * channels
    p, f = _head(width, list(cfg.dense), num_classes)
    return ModelCost(params + p, flops + f, normalized)


def _lstm(cfg: "ModelConfig", num_classes: int) -> ModelCost:
    units, steps, features = cfg.lstm_units, IMAGE_SIDE, IMAGE_SIDE
    params = 4 * (units * (features + units) + units)
    flops = steps * 2 * 4 * units * (features + units)
    p, f = _head(units, list(cfg.dense), num_classes)
    return ModelCost(params + p, flops + f)


def human(n: float) -> str:
    """``1234567`` -> ``1.23M``; ``45000`` -> ``45.0k`` (for logs and tables)."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"
