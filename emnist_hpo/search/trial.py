"""One trial, whichever engine asks for it: cost check, multi-fidelity training, the outcome.

:func:`run_trial` is the single trial path of both search engines (Optuna here,
Keras Tuner in :mod:`emnist_hpo.search.keras_tuner.engine`): it prices the model before building
it (``--max-params``, ``--max-flops``), trains it up the fidelity ladder
(:mod:`emnist_hpo.train.fidelity`) under a :class:`~emnist_hpo.train.trainer.RungControl`
that may stop it, evaluates it, and tells the lifecycle hooks
(:class:`~emnist_hpo.train.hooks.TrialHooks`: tracking, progress) how it went. It
returns a :class:`~emnist_hpo.train.hooks.TrialOutcome`; each engine turns that into
its own language (a value, ``TrialPruned``, Keras Tuner's ``FailedTrialError``).

:class:`Objective` is the Optuna side: it samples the trial's config, decides at
every rung whether the trial climbs on (the no-skill guard, then asynchronous
successive halving, or one of Optuna's own pruners), stops a rung that would not
fit the time budget, and resumes an interrupted trial from its checkpoint.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import optuna

from emnist_hpo.search.budget import Throughput, rung_work
from emnist_hpo.config import ExperimentConfig
from emnist_hpo.model.cost import ModelCost, human, model_cost
from emnist_hpo.data.prepared import PreparedData
from emnist_hpo.train.fidelity import Ladder, Rung, promotable
from emnist_hpo.train.hooks import TrialHooks, TrialOutcome
from emnist_hpo.options import OBJECTIVES
from emnist_hpo.reporting.evaluation import evaluate
from emnist_hpo.search.space import SearchSpace
from emnist_hpo.train.trainer import RungControl, RungResult, TrainResult, TrialCheckpoint, predict_proba, train

#: Trial user attribute naming the seed experiment an enqueued trial reproduces.
SEED_ATTR = "seed_experiment"
#: Trial user attribute of a trial that continues an interrupted one (its number).
RESUME_ATTR = "resume_of"
#: Trial user attribute of a trial enqueued from another study's results ("<study>#<trial>").
WARM_ATTR = "warm_start_from"
#: How many times the no-skill accuracy a screening rung must reach (the guard of every pruner but none).
NO_SKILL_FACTOR = 2.0


@dataclass
class Limits:
    """What a trial may cost, known before it trains (``--max-params``, ``--max-flops``)."""

    max_params: int | None = None
    max_flops: int | None = None

    def refuse(self, cost: ModelCost) -> str | None:
        if self.max_params is not None and cost.params > self.max_params:
            return f"model has {cost.params:,} parameters > --max-params {self.max_params:,}"
        if self.max_flops is not None and cost.flops > self.max_flops:
            return f"model needs {human(cost.flops)} FLOPs per image > --max-flops {human(self.max_flops)}"
        return None


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
        return _end(trial, hooks, TrialOutcome("PRUNED", cfg, reason=refused), begin=True)
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
        outcome = _end(trial, hooks, TrialOutcome("FAIL", cfg, reason=reason))
        outcome.error = exc
        return outcome
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: close the run (KILLED); the engine marks it FAIL
        reason = interrupt_reason(exc)
        trial.set_user_attr("fail_reason", reason)
        _end(trial, hooks, TrialOutcome("FAIL", cfg, reason=reason))
        raise
    record(trial, result)
    if result.stopped_reason == "nan":
        reason = "loss became NaN or inf"
        trial.set_user_attr("fail_reason", reason)
        _remove(checkpoint)
        return _end(trial, hooks, TrialOutcome("PRUNED", cfg, result, reason=reason))
    if result.stopped_reason == "stopped":
        reason = result.stop_detail or "stopped"
        trial.set_user_attr("fail_reason", reason)
        _remove(checkpoint)
        return _end(trial, hooks, TrialOutcome("PRUNED", cfg, result, reason=reason))
    ev = evaluate(data.y_val, predict_proba(result.model, data.x_val), data.classes)
    if keep_model is not None:
        keep_model(result)
    _remove(checkpoint)
    return _end(trial, hooks, TrialOutcome("COMPLETE", cfg, result, ev))


def _remove(checkpoint: TrialCheckpoint | None) -> None:
    if checkpoint is not None:
        checkpoint.remove()


def _end(trial, hooks: Sequence[TrialHooks], outcome: TrialOutcome, begin: bool = False) -> TrialOutcome:
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


def interrupt_reason(exc: BaseException) -> str:
    """``fail_reason`` of a trial stopped by Ctrl-C ("interrupted") or SIGTERM ("interrupted (terminated)")."""
    return "interrupted (terminated)" if type(exc).__name__ == "Terminated" else "interrupted"


def directions(objectives: Sequence[str]) -> list[str]:
    return [OBJECTIVES[o] for o in objectives]


# --------------------------------------------------------------------------- Optuna


def rung_scores(trial: optuna.trial.FrozenTrial) -> dict[int, float]:
    """The validation accuracy a trial recorded at the end of each rung it finished, by rung."""
    return {int(r.get("rung", i)): float(r["score"])
            for i, r in enumerate(trial.user_attrs.get("rungs", []) or []) if isinstance(r, dict)}


class OptunaRungs(RungControl):
    """The Optuna trial's rung decisions: the time budget before a rung; after it, the record, then the guard
    and the pruner.

    ``pruner``: ``successive-halving`` (asynchronous successive halving over the rungs, decided here
    from the rung scores the study's trials recorded, so it works for two objectives too),
    ``optuna`` (the study's own pruner decides on the reported rung values: hyperband, median),
    or ``none``.
    """

    def __init__(self, trial: optuna.Trial, ladder: Ladder, cost: ModelCost, *, pruner: str, no_skill: float,
                 report: bool, data_sizes: tuple[int, int], time_left: Callable[[Ladder, int, float], str | None]
                 | None = None, resumed: Sequence[Mapping[str, Any]] = ()):
        self.trial, self.ladder, self.cost = trial, ladder, cost
        self.pruner, self.no_skill, self.report = pruner, no_skill, report
        self.n_train, self.n_val = data_sizes
        self.time_left = time_left
        self.records: list[dict[str, Any]] = [dict(r) for r in resumed]

    def _work(self, index: int, images: int) -> float:
        return rung_work(images, self.cost.flops, self.ladder.val_sizes(self.n_val)[index])

    def before(self, index: int, rung: Rung, images: int) -> str | None:
        if self.time_left is None:
            return None
        return self.time_left(self.ladder, index, self._work(index, images))

    def after(self, result: RungResult, final: bool) -> str | None:
        step = self.ladder.rungs[result.index].step
        self.records = [r for r in self.records if r.get("rung") != result.index]  # a resumed rung end: once
        self.records.append({"rung": result.index, "score": result.score, "images": result.images,
                             "seconds": round(result.seconds, 3), "work": self._work(result.index, result.images),
                             "step": step})
        self.trial.set_user_attr("rungs", self.records)  # peers in every process judge against it
        if self.report and math.isfinite(result.score):
            self.trial.report(result.score, step)
        if final or self.pruner == "none":
            return None
        if not math.isfinite(result.score):
            return f"pruned at rung {result.index}: validation accuracy is not a number"
        if self.no_skill > 0 and result.score < NO_SKILL_FACTOR * self.no_skill:
            return (f"pruned at rung {result.index} (val_accuracy {result.score:.4f}): under "
                    f"{NO_SKILL_FACTOR:g}x the no-skill accuracy {self.no_skill:.4f}")
        if self.pruner == "successive-halving":
            peers = [s[result.index] for t in self.trial.study.get_trials(deepcopy=False)
                     if t.number != self.trial.number and result.index in (s := rung_scores(t))]
            if not promotable(result.score, [*peers, result.score], self.ladder.eta):
                rank = 1 + sum(p > result.score for p in peers)
                return (f"pruned at rung {result.index} (val_accuracy {result.score:.4f}): rank {rank} of "
                        f"{len(peers) + 1} at this rung, only the best 1/{self.ladder.eta} go on")
            return None
        if self.trial.should_prune():
            return f"pruned at rung {result.index} (val_accuracy {result.score:.4f}) by the {self.pruner} pruner"
        return None


class Objective:
    """Callable objective for ``study.optimize``; data is prepared once and shared by all trials."""

    def __init__(
        self,
        space: SearchSpace,
        base: ExperimentConfig,
        data: PreparedData,
        *,
        ladder: Ladder,
        objectives: Sequence[str] = ("accuracy",),
        hooks: Sequence[TrialHooks] = (),
        seeds: Mapping[str, ExperimentConfig] | None = None,
        checkpoint_dir: Path | None = None,
        limits: Limits | None = None,
        pruner: str = "successive-halving",
        no_skill: float = 0.0,
        budget_check: Callable[[Ladder, int, float], str | None] | None = None,
    ):
        self.space, self.base, self.data, self.ladder = space, base, data, ladder
        self.objectives = tuple(objectives)
        self.hooks = list(hooks)
        self.seeds = dict(seeds or {})
        self.checkpoint_dir = checkpoint_dir
        self.limits = limits or Limits()
        self.pruner, self.no_skill, self.budget_check = pruner, no_skill, budget_check

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1

    def config_for(self, trial) -> ExperimentConfig:
        """The trial's config: sampled from the space, or the seed experiment it was enqueued for."""
        cfg = self.space.sample(trial, self.base)
        attrs = getattr(trial, "user_attrs", {}) or {}
        seed = attrs.get(SEED_ATTR)
        if seed in self.seeds:
            s = self.seeds[seed]
            cfg.model = s.model
            cfg.train.batch_size, cfg.train.optimizer = s.train.batch_size, s.train.optimizer
            cfg.train.learning_rate, cfg.train.schedule = s.train.learning_rate, s.train.schedule
            cfg.name = seed
        # a resumed trial keeps the seed of the trial it continues: the same run, picked up where it stopped
        cfg.train.seed = self.base.train.seed + int(attrs.get(RESUME_ATTR, trial.number))
        return cfg

    def checkpoint_of(self, number: int) -> TrialCheckpoint | None:
        return None if self.checkpoint_dir is None else TrialCheckpoint(self.checkpoint_dir / f"running_{number}.npz")

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        try:
            cfg = self.config_for(trial)
        except Exception as exc:  # noqa: BLE001
            trial.set_user_attr("fail_reason", f"sampling failed: {exc}")
            _end(trial, self.hooks, TrialOutcome("FAIL", None, reason=f"sampling failed: {exc}"))
            raise
        checkpoint = self.checkpoint_of(trial.number)
        resumed = self._take_over(trial, checkpoint)
        control = OptunaRungs(
            trial, self.ladder, model_cost(cfg.model, self.data.num_classes), pruner=self._rule(trial),
            no_skill=self.no_skill, report=not self.multi, data_sizes=(len(self.data.y_train), len(self.data.y_val)),
            time_left=self.budget_check, resumed=resumed,
        )
        outcome = run_trial(trial, cfg, self.data, ladder=self.ladder, hooks=self.hooks, control=control,
                            limits=self.limits, checkpoint=checkpoint, keep_model=lambda r: self._keep(trial, r))
        if outcome.state == "FAIL":
            raise outcome.error if outcome.error is not None else RuntimeError(outcome.reason)
        if outcome.state == "PRUNED":
            raise optuna.TrialPruned(outcome.reason)
        values = tuple(self._value(o, outcome.result, trial) for o in self.objectives)
        return values if self.multi else values[0]

    def _rule(self, trial: optuna.Trial) -> str:
        if self.pruner in ("none", "successive-halving"):
            return self.pruner
        return "none" if self.multi else self.pruner  # Optuna's pruners take one objective

    def _take_over(self, trial: optuna.Trial, checkpoint: TrialCheckpoint | None) -> list[dict]:
        """A trial enqueued to continue an interrupted one: take its checkpoint and the rungs it had finished."""
        old = trial.user_attrs.get(RESUME_ATTR)
        if old is None or checkpoint is None:
            return []
        previous = self.checkpoint_of(int(old))
        if previous is not None and previous.exists():
            previous.move_to(checkpoint)
        done = []
        for t in trial.study.get_trials(deepcopy=False):
            if t.number == int(old):
                done = [r for r in t.user_attrs.get("rungs", []) or [] if isinstance(r, dict)]
        for r in done:
            if not self.multi and "step" in r and math.isfinite(float(r["score"])):
                trial.report(float(r["score"]), int(r["step"]))
        if done:
            trial.set_user_attr("rungs", done)
        return done

    @staticmethod
    def _value(objective: str, result: TrainResult, trial) -> float:
        if objective == "params":
            return float(result.params)
        if objective == "flops":
            return float(trial.user_attrs["flops"])  # priced before training (run_trial)
        return result.best_val_accuracy

    def _keep(self, trial: optuna.Trial, result: TrainResult) -> None:
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


def trial_summary(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return {
        "number": trial.number,
        "state": trial.state.name,
        "values": trial.values,
        "params": trial.user_attrs.get("params"),
        "best_epoch": trial.user_attrs.get("best_epoch"),
    }


def planned_cost(cost: ModelCost, ladder: Ladder, n_train: int, n_val: int, throughput: Throughput,
                 reach: Sequence[float] | None = None) -> float:
    """Expected seconds of a trial of ``cost`` on ``ladder`` (each rung weighted by the share of trials reaching it)."""
    reach = ladder.reach() if reach is None else reach
    total = 0.0
    for i, (images, vs) in enumerate(zip(ladder.images(n_train), ladder.val_sizes(n_val))):
        total += reach[i] * throughput.seconds(rung_work(images, cost.flops, vs))
    return total
