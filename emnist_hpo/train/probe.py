"""This machine's training speed, measured in seconds before a study has measured a rung of its own.

A study under a time budget prices every configuration from its FLOPs at a speed: how many configurations the
budget affords (the plan, and from it TPE's random start) and whether a rung still fits. Before any rung has run
in its storage that speed was a fixed guess, measured on the 2-core AVX2 machine (30 GFLOP/s); a 2-core AMD EPYC
with bf16 units trained at ~235, and a letters plan said 9 configurations where the study screened 27.

:func:`probe_speed` trains a small fixed CNN (:data:`PROBE_MODEL`) for a few epochs on the study's own images,
through the same :func:`~emnist_hpo.train.trainer.train` as every trial (its precision, batch size, validation
and batch-norm passes): the fastest epoch after the first gives the rate, what the run took beyond its epochs at
that rate the fixed cost per rung.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from emnist_hpo.config import ConvBlock, ExperimentConfig, ModelConfig
from emnist_hpo.model.cost import model_cost, run_flops
from emnist_hpo.train.fidelity import single
from emnist_hpo.train.trainer import release_memory, train

#: The probe's network: two conv blocks and a dense layer, ~8.5M FLOPs per image (the default space's models: median
#: 10-15M, mean ~26M).
PROBE_MODEL = ModelConfig(conv_blocks=[ConvBlock(32, 3), ConvBlock(64, 3)], dense=[128])
#: Training and validation images it trains and scores each epoch (fewer where the study has fewer).
PROBE_IMAGES, PROBE_VAL_IMAGES = 4096, 1024
#: Epochs it trains: the first traces the graph (and the second ran slow too); the fastest of the others is the rate.
PROBE_EPOCHS = 4


@dataclass(frozen=True)
class Probe:
    rate: float  # training FLOP/s: images x 3 x forward FLOPs (+ validation images x forward FLOPs) per second
    overhead: float  # seconds per run beyond its epochs at that rate (building, tracing, batch-norm passes)
    seconds: float  # what the probe took

    def to_dict(self) -> dict[str, float]:
        return {"rate": self.rate, "overhead": self.overhead, "seconds": self.seconds}


def probe_speed(base: ExperimentConfig, x_train, y_train, x_val, y_val, num_classes: int) -> Probe:
    """Train :data:`PROBE_MODEL` under ``base``'s training settings for :data:`PROBE_EPOCHS` epochs on the first
    :data:`PROBE_IMAGES` images of ``x_train`` (scored on :data:`PROBE_VAL_IMAGES` of ``x_val``); its speed."""
    n, nv = min(PROBE_IMAGES, len(y_train)), min(PROBE_VAL_IMAGES, len(y_val))
    cfg = replace(base, model=PROBE_MODEL,
                  train=replace(base.train, epochs=PROBE_EPOCHS, early_stopping_patience=0, schedule="constant"))
    flops = model_cost(PROBE_MODEL, num_classes).flops
    epoch_work = run_flops(n, flops, nv)  # what a rung of one epoch is priced at
    result = train(cfg, np.asarray(x_train[:n]), np.asarray(y_train[:n]), np.asarray(x_val[:nv]),
                   np.asarray(y_val[:nv]), num_classes, ladder=single(PROBE_EPOCHS))
    release_memory()
    steady = min(result.epoch_times[1:] or result.epoch_times)
    rate = epoch_work / max(steady, 1e-6)
    overhead = max(0.0, result.train_seconds - len(result.epoch_times) * steady)
    return Probe(rate, overhead, result.train_seconds)
