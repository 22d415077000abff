"""The Optuna objective: sample a config, train it, report each epoch, return the score.

Tracking is not done here: :class:`TrialHooks` objects (the MLflow one lives in
:mod:`emnist_hpo.tracking`) are told when a trial begins and ends, and
hand back Keras callbacks for per-epoch logging.
"""

from __future__ import annotations

import math
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence

import keras
import optuna

from .config import ExperimentConfig
from .dataset import PreparedData
from .hooks import TrialHooks, TrialOutcome
from .reports import evaluate
from .search_space import SearchSpace
from .models import build_model, count_params
from .pruners import NoSkillGuard
from .training import TrainResult, predict_proba, train

#: Objective names for ``--objectives``: accuracy is maximised, params minimised.
from .options import OBJECTIVES  # noqa: E402  (re-exported)
#: Trial user attribute naming the seed experiment an enqueued trial reproduces.
SEED_ATTR = "seed_experiment"


class PruningCallback(keras.callbacks.Callback):
    """Reports ``val_accuracy`` to the trial each epoch and stops training once it should be pruned."""

    def __init__(self, trial: optuna.Trial, monitor: str = "val_accuracy"):
        super().__init__()
        self.trial, self.monitor = trial, monitor
        self.pruned_at: int | None = None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not math.isfinite(float(value)):
            return
        self.trial.report(float(value), step=epoch + 1)
        if self.trial.should_prune():
            self.pruned_at = epoch + 1
            self.model.stop_training = True


class Objective:
    """Callable objective for ``study.optimize``; data is prepared once and shared by all trials."""

    def __init__(
        self,
        space: SearchSpace,
        base: ExperimentConfig,
        data: PreparedData,
        *,
        objectives: Sequence[str] = ("accuracy",),
        hooks: Sequence[TrialHooks] = (),
        seeds: Mapping[str, ExperimentConfig] | None = None,
        checkpoint_dir: Path | None = None,
        max_params: int | None = None,
    ):
        self.space, self.base, self.data = space, base, data
        self.objectives = tuple(objectives)
        self.hooks = list(hooks)
        self.seeds = dict(seeds or {})
        self.checkpoint_dir = checkpoint_dir
        self.max_params = max_params  # larger models are pruned before training (the research's "minimal CNN")

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1

    def config_for(self, trial: optuna.Trial) -> ExperimentConfig:
        """The trial's config: sampled from the space, or the seed experiment it was enqueued for."""
        cfg = self.space.sample(trial, self.base)
        seed = trial.user_attrs.get(SEED_ATTR) if hasattr(trial, "user_attrs") else None
        if seed in self.seeds:
            s = self.seeds[seed]
            cfg.model = s.model
            cfg.train.batch_size, cfg.train.optimizer = s.train.batch_size, s.train.optimizer
            cfg.train.learning_rate, cfg.train.schedule = s.train.learning_rate, s.train.schedule
            cfg.name = seed
        cfg.train.seed = self.base.train.seed + trial.number
        return cfg

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        try:
            cfg = self.config_for(trial)
        except Exception as exc:  # noqa: BLE001
            self._end(trial, TrialOutcome("FAIL", None, reason=f"sampling failed: {exc}"))
            raise
        if self.max_params is not None:
            size = count_params(build_model(cfg.model, self.data.num_classes))
            if size > self.max_params:
                reason = f"model has {size:,} parameters > --max-params {self.max_params:,}"
                trial.set_user_attr("params", size)
                trial.set_user_attr("fail_reason", reason)
                for h in self.hooks:
                    h.on_trial_begin(trial, cfg)
                self._end(trial, TrialOutcome("PRUNED", cfg, reason=reason))
                raise optuna.TrialPruned(reason)
        callbacks: list[keras.callbacks.Callback] = []
        pruner = None
        if not self.multi:
            pruner = PruningCallback(trial)
            callbacks.append(pruner)
        for h in self.hooks:
            callbacks.extend(h.on_trial_begin(trial, cfg))
        d = self.data
        try:
            result = train(cfg, d.x_train, d.y_train, d.x_val, d.y_val, d.num_classes, callbacks=callbacks)
        except Exception as exc:  # noqa: BLE001 - record why, then let Optuna mark it FAIL
            reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
            trial.set_user_attr("fail_reason", reason)
            trial.set_user_attr("traceback", traceback.format_exc()[-2000:])
            self._end(trial, TrialOutcome("FAIL", cfg, reason=reason))
            raise
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: close the run (KILLED), then let Optuna mark it FAIL
            reason = interrupt_reason(exc)
            trial.set_user_attr("fail_reason", reason)
            self._end(trial, TrialOutcome("FAIL", cfg, reason=reason))
            raise
        self._record(trial, result)
        if result.stopped_reason == "nan":
            reason = "loss became NaN or inf"
            trial.set_user_attr("fail_reason", reason)
            self._end(trial, TrialOutcome("PRUNED", cfg, result, reason=reason))
            raise optuna.TrialPruned(reason)
        if pruner is not None and pruner.pruned_at is not None:
            reason = f"pruned at epoch {pruner.pruned_at} (val_accuracy {result.history['val_accuracy'][-1]:.4f})"
            guard = trial.study.pruner
            if isinstance(guard, NoSkillGuard) and guard.learnt_nothing(pruner.pruned_at,
                                                                        result.history["val_accuracy"][-1]):
                reason += f": under {guard.factor:g}x the no-skill accuracy {guard.no_skill:.4f}"
            self._end(trial, TrialOutcome("PRUNED", cfg, result, reason=reason))
            raise optuna.TrialPruned(reason)
        ev = evaluate(d.y_val, predict_proba(result.model, d.x_val), d.classes)
        self._maybe_checkpoint(trial, result)
        self._end(trial, TrialOutcome("COMPLETE", cfg, result, ev))
        if self.multi:
            return tuple(self._value(o, result) for o in self.objectives)
        return self._value(self.objectives[0], result)

    @staticmethod
    def _value(objective: str, result: TrainResult) -> float:
        return float(result.params) if objective == "params" else result.best_val_accuracy

    @staticmethod
    def _record(trial: optuna.Trial, result: TrainResult) -> None:
        trial.set_user_attr("params", result.params)
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("epochs_run", result.epochs_run)
        trial.set_user_attr("train_seconds", round(result.train_seconds, 3))
        if result.epoch_times:
            trial.set_user_attr("epoch_time", round(sum(result.epoch_times) / len(result.epoch_times), 3))
        trial.set_user_attr("best_val_accuracy", result.best_val_accuracy)

    def _maybe_checkpoint(self, trial: optuna.Trial, result: TrainResult) -> None:
        """Keep the model file of a trial that beats every finished one (only those can be champions)."""
        if self.checkpoint_dir is None or self.multi:
            return
        try:
            best = trial.study.best_value
        except ValueError:
            best = -math.inf
        if result.best_val_accuracy > best:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.checkpoint_dir / f".trial_{trial.number}.keras"
            result.model.save(tmp)
            tmp.replace(self.checkpoint_dir / f"trial_{trial.number}.keras")

    def _end(self, trial: optuna.Trial, outcome: TrialOutcome) -> None:
        for h in self.hooks:
            h.on_trial_end(trial, outcome)


def interrupt_reason(exc: BaseException) -> str:
    """``fail_reason`` of a trial stopped by Ctrl-C ("interrupted") or SIGTERM ("interrupted (terminated)")."""
    return "interrupted (terminated)" if type(exc).__name__ == "Terminated" else "interrupted"


def directions(objectives: Sequence[str]) -> list[str]:
    return [OBJECTIVES[o] for o in objectives]


def trial_summary(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return {
        "number": trial.number,
        "state": trial.state.name,
        "values": trial.values,
        "params": trial.user_attrs.get("params"),
        "best_epoch": trial.user_attrs.get("best_epoch"),
    }
