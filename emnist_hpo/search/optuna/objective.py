"""The Optuna objective: sample a config, decide at every rung whether the trial climbs on, resume it if asked.

:class:`Objective` samples the trial's config (or takes its seed experiment's), and runs it through the
shared trial path (:func:`~emnist_hpo.search.trial.run_trial`) under :class:`OptunaRungs`: the time budget
before every rung; after it, the rung's record, the no-skill guard, then asynchronous successive halving
(:mod:`.promotions`: a trial outside the best 1/eta of its rung pauses, to be continued if it gets
there) or one of Optuna's own pruners. A trial enqueued with ``resume_of`` (interrupted) or
``promote_of`` (paused) takes that trial's checkpoint and rung records over and trains on.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import optuna

from emnist_hpo.config import ExperimentConfig
from emnist_hpo.data.prepared import PreparedData
from emnist_hpo.model.cost import ModelCost, model_cost
from emnist_hpo.search.budget import record_of, rung_norm, rung_work
from emnist_hpo.search.optuna.promotions import (CLOSING_ATTR, PAUSED_ATTR, PROMOTE_ATTR, continues, records_of,
                                                 rung_table, top)
from emnist_hpo.search.optuna.repeats import KEY_ATTR, REPEAT_ATTR, config_key, earlier_twin
from emnist_hpo.search.space import SearchSpace
from emnist_hpo.search.trial import (
    NO_SKILL_FACTOR,
    RESUME_ATTR,
    SEED_ATTR,
    SEED_OF_ATTR,
    Limits,
    end_trial,
    run_trial,
    seed_origin,
)
from emnist_hpo.train.fidelity import Ladder, Rung, promotable
from emnist_hpo.train.hooks import TrialHooks, TrialOutcome
from emnist_hpo.train.trainer import RungControl, RungResult, TrainResult, TrialCheckpoint


class OptunaRungs(RungControl):
    """The Optuna trial's rung decisions: the time budget before a rung; after it, the record, then the guard
    and the pruner.

    ``pruner``: ``successive-halving`` (asynchronous successive halving over the rungs, decided here
    from the rung scores the study's trials recorded, so it works for two objectives too),
    ``optuna`` (the study's own pruner decides on the reported rung values: hyperband, median),
    or ``none``. ``leader_rung``: the rung whose best alone goes on (the one below the last, under a time
    budget; None: the best ``1/eta`` of every rung go on); ``close``: none goes on from it while the search
    screens (``--last-rung close``: its best go on as closing runs when the search stops).
    """

    def __init__(self, trial: optuna.Trial, ladder: Ladder, cost: ModelCost, *, pruner: str, no_skill: float,
                 report: bool, data_sizes: tuple[int, int], time_left: Callable[[Ladder, int, float, float], str | None]
                 | None = None, resumed: Sequence[Mapping[str, Any]] = (), can_pause: bool = False,
                 promoted_through: int = -1, leader_rung: int | None = None, limits: Limits | None = None,
                 close: bool = False):
        self.trial, self.ladder, self.cost = trial, ladder, cost
        self.limits = limits  # the time to be crowned, judged again before every rung at the model's own speed
        self.pruner, self.no_skill, self.report = pruner, no_skill, report
        self.n_train, self.n_val = data_sizes
        self.time_left = time_left
        self.records: list[dict[str, Any]] = [dict(r) for r in resumed]
        self.can_pause = can_pause  # a checkpoint is kept: a trial not (yet) in the best 1/eta waits, paused
        self.promoted_through = promoted_through  # rungs already judged: the paused trial it continues earned them
        self.paused = False  # set when this trial pauses (the trial path keeps its checkpoint)
        self.leader_rung = leader_rung
        self.close = close

    def _work(self, index: int, images: int) -> float:
        return rung_work(images, self.cost.flops, self.ladder.scored_at(index, self.n_train, self.n_val, images))

    def before(self, index: int, rung: Rung, images: int) -> str | None:
        # a closing run goes to the end the search chose for it; whether it still fits is the budget's check alone
        # (the first one runs even past it): judged too slow to be crowned, a 480 s letters study's only closing
        # run (~252 s against a 240 s limit) stopped after 1 s, and the study ended at 205 s with nothing crowned
        if self.limits is not None and CLOSING_ATTR not in self.trial.user_attrs:
            slow = self.limits.too_slow(self.cost, [record_of(r) for r in self.records if "work" in r and "seconds" in r])
            if slow:
                return slow
        if self.time_left is None:
            return None
        return self.time_left(self.ladder, index, self._work(index, images), rung_norm(images, self.cost.normalized))

    def after(self, result: RungResult, final: bool) -> str | None:
        step = self.ladder.rungs[result.index].step
        decided = result.index <= self.promoted_through
        if not (decided and any(r.get("rung") == result.index for r in self.records)):
            self.records = [r for r in self.records if r.get("rung") != result.index]  # a resumed rung end: once
            self.records.append({"rung": result.index, "score": result.score, "images": result.images,
                                 "seconds": round(result.seconds, 3), "work": self._work(result.index, result.images),
                                 "norm": rung_norm(result.images, self.cost.normalized),
                                 "step": step, "trial": self.trial.number})
        self.trial.set_user_attr("rungs", self.records)  # peers in every process judge against it
        if self.report and math.isfinite(result.score) and not decided:  # a decided rung was reported on take-over
            self.trial.report(result.score, step)
        if final or self.pruner == "none" or decided:
            return None
        if not math.isfinite(result.score):
            return f"pruned at rung {result.index}: validation accuracy is not a number"
        if self.no_skill > 0 and result.score < NO_SKILL_FACTOR * self.no_skill:
            return (f"pruned at rung {result.index} (val_accuracy {result.score:.4f}): under "
                    f"{NO_SKILL_FACTOR:g}x the no-skill accuracy {self.no_skill:.4f}")
        if self.pruner == "successive-halving":
            table = rung_table(self.trial.study.get_trials(deepcopy=False), exclude=self.trial.number)
            scores = {**table.get(result.index, {}), self.trial.number: result.score}
            rank = 1 + sum(p > result.score for p in scores.values())
            where = f"rank {rank} of {len(scores)} at this rung"
            if self.can_pause:  # ASHA: the best 1/eta of the rung so far go on; the others wait, paused
                leader = result.index == self.leader_rung
                if self.trial.number in top(scores, self.ladder.eta, leader=leader, close=self.close):
                    return None
                self.paused = True
                self.trial.set_user_attr(PAUSED_ATTR, result.index)
                if leader and self.close:
                    rule = "the last rung waits for the search to stop, then its best go on (--last-rung close)"
                elif leader:
                    rule = "only its best goes on to the last rung (a time budget)"
                else:
                    rule = f"only the best 1/{self.ladder.eta} go on"
                return (f"paused at rung {result.index} (val_accuracy {result.score:.4f}): {where}, {rule}; "
                        "continues if it gets there")
            if not promotable(result.score, list(scores.values()), self.ladder.eta):
                return (f"pruned at rung {result.index} (val_accuracy {result.score:.4f}): {where}, only the best "
                        f"1/{self.ladder.eta} go on")
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
        budget_check: Callable[[Ladder, int, float, float], str | None] | None = None,
        leader_rung: int | None = None,
        close: bool = False,
    ):
        self.space, self.base, self.data, self.ladder = space, base, data, ladder
        self.objectives = tuple(objectives)
        self.hooks = list(hooks)
        self.seeds = dict(seeds or {})
        self.checkpoint_dir = checkpoint_dir
        self.limits = limits or Limits()
        self.pruner, self.no_skill, self.budget_check = pruner, no_skill, budget_check
        self.leader_rung = leader_rung  # the rung whose best alone goes on (see OptunaRungs)
        self.close = close  # --last-rung close: none goes on from the leader rung while the search screens

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
        # a trial that continues another keeps its seed: the same run, picked up where it stopped
        cfg.train.seed = self.base.train.seed + seed_origin(trial.number, attrs)
        return cfg

    def checkpoint_of(self, number: int) -> TrialCheckpoint | None:
        return None if self.checkpoint_dir is None else TrialCheckpoint(self.checkpoint_dir / f"running_{number}.npz")

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        try:
            cfg = self.config_for(trial)
        except Exception as exc:  # noqa: BLE001
            trial.set_user_attr("fail_reason", f"sampling failed: {exc}")
            end_trial(trial, self.hooks, TrialOutcome("FAIL", None, reason=f"sampling failed: {exc}"))
            raise
        if self.space.free:  # a trial that continues another is its twin's second half: it trains
            key = config_key(cfg)
            trial.set_user_attr(KEY_ATTR, key)
            twin = None if continues(trial.user_attrs) is not None else earlier_twin(trial, key)
            if twin is not None:
                return self._repeat(trial, cfg, twin)
        checkpoint = self.checkpoint_of(trial.number)
        of = continues(trial.user_attrs)
        previous = _trial(trial.study, of)  # the interrupted or paused trial it continues
        if of is None:
            self._clear(trial.number)
        resumed = self._take_over(trial, checkpoint, previous)
        control = OptunaRungs(
            trial, self.ladder, model_cost(cfg.model, self.data.num_classes), pruner=self._rule(trial),
            no_skill=self.no_skill, report=not self.multi, data_sizes=(len(self.data.y_train), len(self.data.y_val)),
            time_left=self.budget_check, resumed=resumed, can_pause=checkpoint is not None,
            promoted_through=self._promoted_through(trial, previous), leader_rung=self.leader_rung,
            limits=self.limits, close=self.close,
        )
        # a continuation's configuration was let through when it began: its time is not judged again
        limits = self.limits if previous is None else dataclasses.replace(self.limits, max_seconds=None)
        outcome = run_trial(trial, cfg, self.data, ladder=self.ladder, hooks=self.hooks, control=control,
                            limits=limits, checkpoint=checkpoint, keep_model=lambda r: self._keep(trial, r))
        if outcome.state == "FAIL":
            raise outcome.error if outcome.error is not None else RuntimeError(outcome.reason)
        if outcome.state == "PRUNED":
            raise optuna.TrialPruned(outcome.reason)
        values = tuple(self._value(o, outcome.result, trial) for o in self.objectives)
        return values if self.multi else values[0]

    def _repeat(self, trial: optuna.Trial, cfg: ExperimentConfig,
                twin: optuna.trial.FrozenTrial) -> float | tuple[float, ...]:
        """Take the outcome of ``twin``, an earlier trial of the same configuration, without training."""
        trial.set_user_attr(REPEAT_ATTR, twin.number)
        for attr in ("params", "flops"):
            if attr in twin.user_attrs:
                trial.set_user_attr(attr, twin.user_attrs[attr])
        pruned = twin.state == optuna.trial.TrialState.PRUNED
        reason = (f"the same configuration as trial {twin.number} ({'pruned' if pruned else 'complete'}): "
                  "its outcome taken, not trained again")
        trial.set_user_attr("fail_reason" if pruned else "repeat_reason", reason)
        end_trial(trial, self.hooks, TrialOutcome("PRUNED" if pruned else "COMPLETE", cfg, reason=reason), begin=True)
        if pruned:
            raise optuna.TrialPruned(reason)
        return tuple(twin.values) if self.multi else twin.values[0]

    def _rule(self, trial: optuna.Trial) -> str:
        if self.pruner in ("none", "successive-halving"):
            return self.pruner
        return "none" if self.multi else self.pruner  # Optuna's pruners take one objective

    @staticmethod
    def _promoted_through(trial: optuna.Trial, previous: optuna.trial.FrozenTrial | None) -> int:
        """The rung the paused trial this one continues was paused at (its promotion is decided); -1 otherwise."""
        if previous is None or PROMOTE_ATTR not in trial.user_attrs:
            return -1
        return int(previous.user_attrs.get(PAUSED_ATTR, -1))

    def _take_over(self, trial: optuna.Trial, checkpoint: TrialCheckpoint | None,
                   previous_trial: optuna.trial.FrozenTrial | None) -> list[dict]:
        """A trial enqueued to continue an interrupted or a paused one: take its checkpoint and finished rungs."""
        old = continues(trial.user_attrs)
        if old is None or checkpoint is None:
            return []
        previous = self.checkpoint_of(old)
        if previous is not None and previous.exists():
            previous.move_to(checkpoint)
        # each record keeps the trial that trained it: peers count it once
        done = [{**r, "trial": int(r.get("trial", old))} for r in records_of(previous_trial)] if previous_trial else []
        for r in done:
            if not self.multi and "step" in r and math.isfinite(float(r["score"])):
                trial.report(float(r["score"]), int(r["step"]))
        if done:
            trial.set_user_attr("rungs", done)
        return done

    def _clear(self, number: int) -> None:
        """A trial that continues no other starts from nothing: a checkpoint or model file under its number is
        another study's (one deleted and made again, whose id the storage gave this one), never its own."""
        checkpoint = self.checkpoint_of(number)
        if checkpoint is not None:
            checkpoint.remove()
            kept_model(self.checkpoint_dir, number).unlink(missing_ok=True)

    @staticmethod
    def _value(objective: str, result: TrainResult, trial) -> float:
        if objective == "params":
            return float(result.params)
        if objective == "flops":
            return float(trial.user_attrs["flops"])  # priced before training (run_trial)
        return result.val_score

    def _keep(self, trial: optuna.Trial, result: TrainResult) -> None:
        """Keep the model file of a trial that beats every finished one (only those can be champions)."""
        if self.checkpoint_dir is None or self.multi:
            return
        try:
            best = trial.study.best_value
        except ValueError:
            best = -math.inf
        if result.val_score > best:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.checkpoint_dir / f".trial_{trial.number}.keras"
            result.model.save(tmp)
            tmp.replace(kept_model(self.checkpoint_dir, trial.number))


def kept_model(checkpoint_dir: Path, number: int) -> Path:
    """The model file trial ``number`` keeps when it beats every finished trial (its own model, should it win)."""
    return checkpoint_dir / f"trial_{number}.keras"


def config_of(objective: Objective, trial: optuna.trial.FrozenTrial) -> ExperimentConfig:
    fixed = optuna.trial.FixedTrial(trial.params, number=trial.number)
    for attr in (SEED_ATTR, RESUME_ATTR, SEED_OF_ATTR):
        if attr in trial.user_attrs:
            fixed.set_user_attr(attr, trial.user_attrs[attr])
    return objective.config_for(fixed)


def _trial(study: optuna.Study, number: int | None) -> optuna.trial.FrozenTrial | None:
    """Trial ``number`` of ``study`` (None for None or an unknown number)."""
    if number is None:
        return None
    return next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
