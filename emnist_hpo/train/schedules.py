"""Learning-rate schedules by name, as Keras 3 schedule objects or callbacks."""

from __future__ import annotations

from typing import Mapping

from emnist_hpo import runtime

runtime.configure()  # before Keras loads: its backend, TensorFlow's kernels and quiet start-up

import keras

from emnist_hpo.config import TrainConfig


def learning_rate(cfg: TrainConfig, steps_per_epoch: int,
                  total_steps: int | None = None) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The optimizer's learning rate for ``cfg.schedule`` over ``total_steps`` (default ``cfg.epochs`` epochs).

    constant/plateau: a float (plateau adds :func:`callbacks`); step: halve at 1/3 and 2/3 of
    training; exponential: decay to 1/10 by the last step; cosine: to 1/100; warmup_cosine:
    linear warmup from 1/10 over ``warmup_epochs`` full epochs (at most a third of training), then cosine.
    A multi-fidelity trial passes the steps of its whole ladder: a trial stopped at an early rung
    has trained at the start of the same schedule as one that climbs to the end.
    """
    lr, steps = cfg.learning_rate, max(1, steps_per_epoch)
    total = max(1, int(total_steps)) if total_steps else cfg.epochs * steps
    s = cfg.schedule
    if s in ("constant", "plateau") or total <= steps and s in ("step", "exponential"):
        return lr
    if s == "step":
        bounds = sorted({max(1, int(total * f)) for f in (1 / 3, 2 / 3)})
        return keras.optimizers.schedules.PiecewiseConstantDecay(bounds, [lr * 0.5**i for i in range(len(bounds) + 1)])
    if s == "exponential":
        return keras.optimizers.schedules.ExponentialDecay(lr, decay_steps=total, decay_rate=0.1)
    if s == "cosine":
        return keras.optimizers.schedules.CosineDecay(lr, decay_steps=total, alpha=0.01)
    if s == "warmup_cosine":
        warm = min(cfg.warmup_epochs * steps, total // 3)
        return keras.optimizers.schedules.CosineDecay(
            lr * 0.1, decay_steps=max(total - warm, 1), alpha=0.01, warmup_target=lr, warmup_steps=warm
        )
    raise ValueError(f"unknown schedule {s!r}")  # validated earlier by ExperimentConfig.validate


def callbacks(cfg: TrainConfig) -> list[keras.callbacks.Callback]:
    """Callbacks a schedule needs (ReduceLROnPlateau for ``plateau``)."""
    if cfg.schedule == "plateau":
        return [keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, min_lr=1e-6)]
    return []


class ReplayLearningRate(keras.callbacks.Callback):
    """Sets the optimizer's learning rate at the start of each listed epoch (global epoch numbers across a ladder's
    rungs, as Keras counts them with ``initial_epoch``): a ``plateau`` schedule's final fit, which has no validation
    to watch, replays the reductions its trial made instead of holding the rate constant (byclass: a champion whose
    trial halved its rate three times tested 84.16% at the constant rate)."""

    def __init__(self, rates: Mapping[int, float]):
        super().__init__()
        self.rates = {int(k): float(v) for k, v in rates.items()}

    def on_epoch_begin(self, epoch, logs=None):
        if epoch in self.rates:
            self.model.optimizer.learning_rate = self.rates[epoch]


#: The average spans at most this share of the first rung's steps: a window longer than a short rung holds mostly
#: the rung's early weights (bymerge sample, a first rung of 64 steps averaged over 78: validation 0.15 where the
#: raw weights scored 0.63).
AVERAGE_SHARE_OF_FIRST_RUNG = 0.125


def averaging_momentum(cfg: TrainConfig, steps_per_epoch: int, first_rung_steps: int | None = None) -> float | None:
    """The per-step momentum of the weights' moving average over about ``cfg.average_epochs`` epochs, at most
    :data:`AVERAGE_SHARE_OF_FIRST_RUNG` of ``first_rung_steps`` (``1 - 1 / steps``), or None where the run does not
    average (off, or early stopping restores raw weights)."""
    if cfg.average_epochs <= 0 or cfg.early_stopping_patience > 0:
        return None
    window = cfg.average_epochs * max(1, steps_per_epoch)
    if first_rung_steps:
        window = min(window, AVERAGE_SHARE_OF_FIRST_RUNG * first_rung_steps)
    return 1.0 - 1.0 / max(1.0, window)


def optimizer(cfg: TrainConfig, steps_per_epoch: int, total_steps: int | None = None,
              first_rung_steps: int | None = None) -> keras.optimizers.Optimizer:
    """The optimizer of ``cfg``; with weight averaging (:func:`averaging_momentum`) it keeps the moving average
    (Keras' ``use_ema``), which :class:`~emnist_hpo.train.trainer.Validation` scores and ``fit`` ends on."""
    lr = learning_rate(cfg, steps_per_epoch, total_steps)
    momentum = averaging_momentum(cfg, steps_per_epoch, first_rung_steps)
    ema = {"use_ema": True, "ema_momentum": momentum} if momentum is not None else {}
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(lr, **ema)
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay, **ema)
    return keras.optimizers.SGD(lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay or None, **ema)
