"""One trial, whichever engine asks for it: cost check, multi-fidelity training, the outcome.

:func:`run_trial` is the single trial path of both search engines (Optuna here,
Keras Tuner in :mod:`emnist_hpo.search.keras_tuner.engine`): it prices the model before building
it (``--max-params``, ``--max-flops``), trains it up the fidelity ladder
(:mod:`emnist_hpo.train.fidelity`) under a :class:`~emnist_hpo.train.trainer.RungControl`
that may stop it, evaluates it, and tells the lifecycle hooks
(:class:`~emnist_hpo.train.hooks.TrialHooks`: tracking, progress) how it went. It
returns a :class:`~emnist_hpo.train.hooks.TrialOutcome`; each engine turns that into
its own language (a value, ``TrialPruned``, Keras Tuner's ``FailedTrialError``).

The Optuna side (sampling, the rung decisions, resuming) is
:mod:`emnist_hpo.search.optuna.objective`; Keras Tuner's is
:mod:`emnist_hpo.search.keras_tuner.engine`.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from emnist_hpo.config import ExperimentConfig
from emnist_hpo.data.prepared import PreparedData
from emnist_hpo.model.cost import ModelCost, human, model_cost
from emnist_hpo.options import OBJECTIVES
from emnist_hpo.reporting.evaluation import evaluate
from emnist_hpo.search.budget import CROWN_MEASURED, TIME_REFUSAL, RungRecord, Throughput, rung_norm, rung_work
from emnist_hpo.train.fidelity import Ladder
from emnist_hpo.train.hooks import TrialHooks, TrialOutcome
from emnist_hpo.train.trainer import RungControl, TrainResult, TrialCheckpoint, predict_proba, train

#: Trial user attribute naming the seed experiment an enqueued trial reproduces.
SEED_ATTR = "seed_experiment"
#: Trial user attribute of a trial that continues an interrupted one (its number).
RESUME_ATTR = "resume_of"
#: Trial user attribute of a trial enqueued from another study's results ("<study>#<trial>").
WARM_ATTR = "warm_start_from"
#: Trial user attribute of a trial that continues another's training: the trial whose training seed it keeps.
SEED_OF_ATTR = "seed_of"
#: Trial user attribute of a configuration refused for its size before training (``--max-params``, ``--max-flops``).
REFUSED_ATTR = "refused"
#: How many times the no-skill accuracy a screening rung must reach (the guard of every pruner but none).
NO_SKILL_FACTOR = 2.0


@dataclass
class Limits:
    """What a trial may cost, known before it trains (``--max-params``, ``--max-flops``; under ``--timeout``, the
    time it would take to be crowned)."""

    max_params: int | None = None
    max_flops: int | None = None
    max_seconds: float | None = None  # the most its climb of every rung and its final fit may take (None: no limit)
    seconds: Callable[..., float | None] | None = None  # (cost, measured rungs) -> that time (None: speed unknown)

    def refuse(self, cost: ModelCost) -> str | None:
        if self.max_params is not None and cost.params > self.max_params:
            return f"model has {cost.params:,} parameters > --max-params {self.max_params:,}"
        if self.max_flops is not None and cost.flops > self.max_flops:
            return f"model needs {human(cost.flops)} FLOPs per image > --max-flops {human(self.max_flops)}"
        if self.max_seconds is not None and self.seconds is not None:
            need = self.seconds(cost)
            if need is not None and need > self.max_seconds:
                return (f"{TIME_REFUSAL} ~{need:,.0f} s up every rung and through its final fit > {self.max_seconds:,.0f}"
                        f" s, the most one configuration may take of the time budget ({human(cost.flops)} FLOPs per "
                        "image at the speed this study measured)")
        return None

    def too_slow(self, cost: ModelCost, measured: Sequence[RungRecord]) -> str | None:
        """Why a model that has run the rungs ``measured`` must stop: at the speed they ran, climbing every rung
        and its final fit would take more than ``max_seconds``. The check before training (:meth:`refuse`) has
        only the study's average speed: under a 900 s limit it let through an 80M-FLOP model that took 1,183 s,
        and compact, whose batch-norm made it twice as slow as its FLOPs said, took 1,334 s."""
        if self.max_seconds is None or self.seconds is None or not measured:
            return None
        need = self.seconds(cost, measured)
        if need is not None and need > self.max_seconds:
            return (f"too slow to be crowned: at the speed its own rungs ran, it would take ~{need:,.0f} s up every "
                    f"rung and through its final fit > {self.max_seconds:,.0f} s, the most one configuration may "
                    f"take of the time budget ({human(cost.flops)} FLOPs per image)")
        return None


#: Trial attribute: ``[[epoch, learning rate], ...]`` of the last rung the trial trained (global epoch numbers), which
#: a ``plateau`` champion's final fit replays (:class:`~emnist_hpo.train.schedules.ReplayLearningRate`).
RATES_ATTR = "last_rung_rates"


def run_trial(
    trial: Any,
    cfg: ExperimentConfig,
    data: PreparedData,
    *,
    ladder: Ladder,
    hooks: Sequence[TrialHooks] = (),
    control: RungControl | None = None,
    limits: Limits | None = None,
    checkpoint: TrialCheckpoint | None = None,
    keep_model: Callable[[TrainResult], None] | None = None,
) -> TrialOutcome:
    """Train ``cfg`` for ``trial`` and return its outcome (COMPLETE, PRUNED or FAIL); hooks are told both ends.

    ``trial`` is anything with ``number``, ``params``, ``user_attrs`` and ``set_user_attr`` (an Optuna
    trial, or Keras Tuner's adapted one). Ctrl-C / SIGTERM (``KeyboardInterrupt``) closes the trial as
    FAIL ("interrupted"), tells the hooks, and is raised again.
    """
    cost = model_cost(cfg.model, data.num_classes)
    trial.set_user_attr("params", cost.params)
    trial.set_user_attr("flops", cost.flops)
    refused = (limits or Limits()).refuse(cost)
    if refused:  # priced, never built: "filters: 1e9" costs microseconds
        trial.set_user_attr("fail_reason", refused)
        trial.set_user_attr(REFUSED_ATTR, True)
        return end_trial(trial, hooks, TrialOutcome("PRUNED", cfg, reason=refused), begin=True)
    callbacks = []
    for h in hooks:
        callbacks.extend(h.on_trial_begin(trial, cfg))
    try:
        result = train(cfg, data.x_train, data.y_train, data.x_val, data.y_val, data.num_classes,
                       callbacks=callbacks, ladder=ladder, control=control, checkpoint=checkpoint)
    except Exception as exc:  # noqa: BLE001 - record why; the engine marks the trial failed
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
        trial.set_user_attr("fail_reason", reason)
        trial.set_user_attr("traceback", traceback.format_exc()[-2000:])
        outcome = end_trial(trial, hooks, TrialOutcome("FAIL", cfg, reason=reason))
        outcome.error = exc
        return outcome
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: close the run (KILLED); the engine marks it FAIL
        reason = interrupt_reason(exc)
        trial.set_user_attr("fail_reason", reason)
        end_trial(trial, hooks, TrialOutcome("FAIL", cfg, reason=reason))
        raise
    record(trial, result)
    if result.stopped_reason == "nan":
        reason = "loss became NaN or inf"
        trial.set_user_attr("fail_reason", reason)
        _remove(checkpoint)
        return end_trial(trial, hooks, TrialOutcome("PRUNED", cfg, result, reason=reason))
    if result.stopped_reason == "stopped":
        reason = result.stop_detail or "stopped"
        trial.set_user_attr("fail_reason", reason)
        if not getattr(control, "paused", False):  # a paused trial keeps its checkpoint: it may be continued
            _remove(checkpoint)
        return end_trial(trial, hooks, TrialOutcome("PRUNED", cfg, result, reason=reason))
    ev = evaluate(data.y_val, predict_proba(result.model, data.x_val), data.classes)
    if keep_model is not None:
        keep_model(result)
    _remove(checkpoint)
    return end_trial(trial, hooks, TrialOutcome("COMPLETE", cfg, result, ev))


def _remove(checkpoint: TrialCheckpoint | None) -> None:
    if checkpoint is not None:
        checkpoint.remove()


def end_trial(trial, hooks: Sequence[TrialHooks], outcome: TrialOutcome, begin: bool = False) -> TrialOutcome:
    """Tell every hook how ``trial`` ended (``begin``: a trial refused before it began is begun first)."""
    for h in hooks:
        if begin:
            h.on_trial_begin(trial, outcome.config)
        h.on_trial_end(trial, outcome)
    return outcome


def record(trial, result: TrainResult) -> None:
    """What a trial's training did, as trial attributes (engines, budgets and reports read them)."""
    trial.set_user_attr("params", result.params)
    trial.set_user_attr("best_epoch", result.best_epoch)
    trial.set_user_attr("epochs_run", result.epochs_run)
    trial.set_user_attr("train_seconds", round(result.train_seconds, 3))
    trial.set_user_attr("images_seen", int(result.images_seen))
    trial.set_user_attr("rung_reached", result.rungs[-1].index if result.rungs else 0)
    if result.epoch_times:
        trial.set_user_attr("epoch_time", round(sum(result.epoch_times) / len(result.epoch_times), 3))
    if math.isfinite(result.best_val_accuracy):
        trial.set_user_attr("best_val_accuracy", result.best_val_accuracy)
    if result.last_rung_rates:
        trial.set_user_attr(RATES_ATTR, [[epoch, rate] for epoch, rate in sorted(result.last_rung_rates.items())])


def rates_of(attrs: Mapping[str, Any]) -> dict[int, float]:
    """The learning rates a trial trained its last rung at, by global epoch (:data:`RATES_ATTR`); {} when not
    recorded (a trial from before they were)."""
    return {int(epoch): float(rate) for epoch, rate in attrs.get(RATES_ATTR) or []}


def seed_origin(number: int, attrs: Mapping[str, Any]) -> int:
    """The trial whose training seed trial ``number`` trains with: its own, or the first of the chain it continues."""
    return int(attrs.get(SEED_OF_ATTR, attrs.get(RESUME_ATTR, number)))


def interrupt_reason(exc: BaseException) -> str:
    """``fail_reason`` of a trial stopped by Ctrl-C ("interrupted") or SIGTERM ("interrupted (terminated)")."""
    return "interrupted (terminated)" if type(exc).__name__ == "Terminated" else "interrupted"


def directions(objectives: Sequence[str]) -> list[str]:
    return [OBJECTIVES[o] for o in objectives]


def crown_time(throughput: Callable[[], Throughput], ladder: Ladder, n_train: int, n_val: int,
               final_fit_scale: float, min_measured: int = CROWN_MEASURED) -> Callable[..., float | None]:
    """Predicts what crowning a model of a given cost takes: every rung of ``ladder``, then the final fit
    (``final_fit_scale`` times that run; 0: none), at ``throughput()``'s speed; None until it is measured on
    ``min_measured`` rungs. Given the rungs the model itself has run (``measured``), at the slower of that speed
    and theirs (:meth:`~emnist_hpo.search.budget.Throughput.own`; theirs alone before the study has measured
    enough)."""

    def seconds(cost: ModelCost, measured: Sequence[RungRecord] = ()) -> float | None:
        speed = throughput()
        mine = speed.own(measured)
        if speed.measured < min_measured:
            if mine is None:
                return None
            speed = mine
        elif mine is not None and mine.rate < speed.rate:
            speed = mine
        whole = planned_cost(cost, ladder, n_train, n_val, speed, reach=[1.0] * len(ladder.rungs))
        return whole * (1.0 + final_fit_scale)

    return seconds


def planned_cost(cost: ModelCost, ladder: Ladder, n_train: int, n_val: int, throughput: Throughput,
                 reach: Sequence[float] | None = None) -> float:
    """Expected seconds of a trial of ``cost`` on ``ladder`` (each rung weighted by the share of trials reaching it)."""
    reach = ladder.reach() if reach is None else reach
    total = 0.0
    for i, (images, vs) in enumerate(zip(ladder.images(n_train), ladder.scored(n_train, n_val))):
        total += reach[i] * throughput.seconds(rung_work(images, cost.flops, vs), rung_norm(images, cost.normalized))
    return total
