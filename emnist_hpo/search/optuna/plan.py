"""A study's plan, said before it starts: the ladder, the configurations each rung will see, the ETA.

Everything is predicted from FLOPs known before training (:mod:`emnist_hpo.model.cost`) and the speed
this machine showed on the study's earlier rungs (:class:`~emnist_hpo.search.budget.Throughput`), or on
its storage's other studies before it has run any.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import optuna

from emnist_hpo.config import ExperimentConfig
from emnist_hpo.errors import ConfigError
from emnist_hpo.model.cost import ModelCost, human, model_cost
from emnist_hpo.search.budget import (CROWN_MEASURED, CROWN_SHARE, PROBE_ATTR, REEVAL_SHARE, Throughput, TimeBudget,
                                     costs_of)
from emnist_hpo.search.optuna.promotions import LAST_RUNG_RUNS, PROMOTE_ATTR
from emnist_hpo.search.optuna.repeats import REPEAT_ATTR
from emnist_hpo.search.optuna.storage import FINISHED, finished_count
from emnist_hpo.search.space import SearchSpace
from emnist_hpo.search.trial import SEED_ATTR, Limits, planned_cost
from emnist_hpo.train.fidelity import Ladder
from emnist_hpo.train.probe import probe_speed

if TYPE_CHECKING:
    from emnist_hpo.search.optuna.study import StudyContext

#: Sampled trials a study must have finished before its ETA is their mean duration times the trials left.
#: Until then the ETA is the plan's typical model at the speed the study's rungs measured: the research's
#: seeds, trained first and to the end, are far larger than a typical sampled model (the 2-conv recipe:
#: 929k parameters) and extrapolating from them overstated the README's main command by ~70%.
ETA_SAMPLED = 3
#: TPE's random start: a quarter of the configurations a study will screen, within these bounds. Optuna's
#: default (10) suits studies of a hundred trials; a 30-minute study on 2 cores screens 9-20, and with 8
#: random trials (this project's value before) TPE guided almost none of them: the search was random search,
#: and the seeds it was handed (trials like any other, counted in the start) never steered it.
STARTUP_SHARE, STARTUP_MIN, STARTUP_MAX = 0.25, 4, 8
#: A study without a time budget that nothing in its storage has measured probes this machine's speed (a few
#: seconds) when the default guess prices it over this many seconds: the guess is the slowest machine's (30
#: GFLOP/s) and the README's main command planned 7.6 h at it on a machine that trains at 300 (a smaller study
#: is not worth the probe's seconds; its ETA soon comes from its own trials).
PROBE_WORTH = 600.0


@dataclass
class Plan:
    """What a study expects to do, said before it starts: configurations per rung and the time it takes."""

    ladder: Ladder
    n_train: int
    n_val: int
    configs: int  # configurations the search will screen (trials still to run, or what the budget affords)
    per_rung: list[float]  # of which, expected to reach each rung
    seconds: float  # expected wall time of the search (what is left of it)
    finish_seconds: float  # expected re-evaluation + final fit
    throughput: Throughput
    mean_flops: float  # forward FLOPs per image of an average sampled model (the mean: what prices a budget)
    by_budget: bool = False  # the configuration count is what --timeout affords
    leader: bool = False  # only the best of the rung below goes on to the last (a time budget, one objective)
    crown_limit: float | None = None  # seconds a configuration may take up every rung and through its final fit
    mean_normalized: float = 0.0  # elements per image through batch-norm of an average sampled model
    enough: float | None = None  # a budget (s) that affords an average configuration and lets it be crowned, where
    # this one does not
    finalist_runs: float = 0.0  # re-evaluation runs up the whole ladder after the search: --finalists x --folds
    final_scale: float = 0.0  # the final fit in runs up the whole ladder (train+validation: 1 / (1 - val share)); 0: none
    reeval_cap: float = math.inf  # the most seconds the re-evaluation may take (a time budget's share)
    patience: int = 0  # --early-stopping at the last rung (0 = off: every epoch of it is trained)
    close: bool = False  # with leader: none goes on until the search stops, then its best LAST_RUNG_RUNS (--last-rung close)

    def per_config(self, throughput: Throughput) -> float:
        """Expected seconds of one screened configuration (its promotions included) of the average model."""
        return planned_cost(_typical(self.mean_flops, self.mean_normalized), self.ladder, self.n_train, self.n_val,
                            throughput)

    def finish_at(self, throughput: Throughput) -> float:
        """Expected seconds of the re-evaluation and the final fit of the average model at ``throughput``."""
        whole = planned_cost(_typical(self.mean_flops, self.mean_normalized), self.ladder, self.n_train, self.n_val,
                             throughput, reach=[1.0] * len(self.ladder.rungs))
        return finish_cost(whole, self.finalist_runs, self.final_scale, self.reeval_cap)

    def lines(self) -> list[str]:
        out = [f"plan: {self.ladder.mode} fidelity, {len(self.ladder.rungs)} rung(s), the best 1/{self.ladder.eta} "
               f"of each rung go on" + (f", to the last rung nobody until the search stops, then the best "
                                         f"{LAST_RUNG_RUNS} of the rung below (--last-rung close)" if self.close
                                         else ", to the last rung only the best (and, if it runs there alone, the best "
                                         "of the rest as the search closes)" if self.leader else "")]
        out.append("  " + self.ladder.describe(self.n_train, self.n_val, self.patience).replace("; ", "\n  "))
        reach = ", ".join(f"~{n:.0f} at rung {i}" for i, n in enumerate(self.per_rung))
        what = "the time budget affords" if self.by_budget else "to screen"
        out.append(f"  configurations {what}: {self.configs} ({reach})")
        rate = f"{self.throughput.rate / 1e9:.0f} GFLOP/s training, {self.throughput.overhead:.1f} s per rung" + (
            f", {self.throughput.norm_cost * 1e9:.0f} ns per image-element through batch-norm"
            if self.throughput.norm_cost else "") + (
            f", measured on {self.throughput.measured} rungs" + (f" of {self.throughput.source}" if self.throughput.source
                                                                  else "")
            if self.throughput.measured else f", measured by {self.throughput.source}" if self.throughput.source
            else " (default guess)")
        out.append(f"  an average sampled model: {human(self.mean_flops)} FLOPs per image; this machine: {rate}")
        finish = ("the final fit (the finalists re-evaluated in what is left)" if self.close
                  else "finalists and final fit")
        out.append(f"  ETA: search ~{duration(self.seconds)}, then {finish} ~{duration(self.finish_seconds)}")
        if self.enough is not None:
            out.append(f"  too small a budget for an average sampled model: a --timeout of ~{duration(self.enough)} "
                       "would let one train and be crowned; only smaller models will")
        if self.crown_limit is not None:
            out.append(f"  refused before training: a configuration that would take over {duration(self.crown_limit)} "
                       f"up every rung and through its final fit ({CROWN_SHARE:.0%} of the budget, once {CROWN_MEASURED} rungs "
                       "are measured)")
        return out


def leader_rung(ctx: "StudyContext") -> int | None:
    """The rung whose best alone goes on to the last: the one below it, in a one-objective study under a time
    budget (full-length runs are scarce there, and only the champion's counts); None otherwise."""
    if ctx.budget.deadline is None or ctx.multi or len(ctx.ladder.rungs) < 2:
        return None
    return len(ctx.ladder.rungs) - 2


def closes(ctx: "StudyContext") -> bool:
    """Whether the last rung waits for the search to stop (``--last-rung close``, where there is a leader rung)."""
    return leader_rung(ctx) is not None and ctx.opts.last_rung == "close"


def last_rung_runs(configs: float, ladder: Ladder, leader: bool, close: bool = False) -> float:
    """Expected runs of the last rung among ``configs`` screened configurations: ``1/eta**(rungs-1)`` of them;
    under the leader rule the successive bests of the rung below, ~``1 + ln(m/eta)`` of its ``m`` scores
    (the best of its first ``eta``, then each score better than all before it), and no fewer than
    :data:`~emnist_hpo.search.optuna.promotions.LAST_RUNG_RUNS` (the closing run) where the rung below has them;
    with ``close`` (the last rung waits for the search to stop) the closing runs alone, ``LAST_RUNG_RUNS``."""
    reach = ladder.reach()
    if not leader or len(reach) < 2:
        return configs * reach[-1]
    m = configs * reach[-2]
    if close:
        return min(m, float(LAST_RUNG_RUNS))
    return 0.0 if m <= 0 else min(m, max(float(LAST_RUNG_RUNS), 1.0 + max(0.0, math.log(m / ladder.eta))))


def sampler_startup(configs: int) -> int:
    """How many trials TPE draws at random before it models the results, for a study of ``configs``
    configurations (its seeds and what earlier sessions finished included)."""
    return max(STARTUP_MIN, min(STARTUP_MAX, math.ceil(STARTUP_SHARE * configs)))


def duration(seconds: float) -> str:
    """``42 s``, ``17 min``, ``2.5 h``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _typical(flops: float, normalized: float) -> ModelCost:
    return ModelCost(0, int(flops) if math.isfinite(flops) else 0, int(normalized) if math.isfinite(normalized) else 0)


def typical_cost(space: SearchSpace, base: ExperimentConfig, num_classes: int, limits: Limits, n: int = 200,
                 seed: int = 0) -> tuple[float, float]:
    """Mean forward FLOPs, and mean elements through batch-norm, of ``n`` random models of the space that
    ``limits`` let through (no training).

    The mean, not the median: a rung's time is linear in both, so what ``k`` configurations cost is ``k``
    times the mean's; the space's FLOPs are skewed (default space, byclass, under compact's parameters:
    median 13.4M, mean 25.8M), and a plan priced at the median promised 225 configurations to a 30-minute
    byclass study that screened 50 (and 58 to one on another machine that screened 41)."""
    sampler = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    flops, normalized = [], []
    for _ in range(n):
        try:
            cfg = space.sample(sampler.ask(), base)
        except ConfigError:
            continue
        cost = model_cost(cfg.model, num_classes)
        if limits.refuse(cost) is None:
            flops.append(cost.flops)
            normalized.append(cost.normalized)
    if not flops:
        return float("nan"), float("nan")
    return float(statistics.fmean(flops)), float(statistics.fmean(normalized))


def plan(ctx: "StudyContext", limits: Limits) -> Plan:
    """What the search will screen and how long it will take, from FLOPs and this machine's measured speed.

    The speed is the study's own rungs', or its storage's other studies'; with neither, a few seconds' probe
    (:func:`speed_probe`) under a time budget, or where the default guess prices the study over
    :data:`PROBE_WORTH` seconds (a smaller study is not worth the probe's seconds)."""
    opts, data = ctx.opts, ctx.data
    throughput = Throughput.of_study(ctx.study)
    if not throughput.measured:  # a new study: the speed this storage's other studies measured, if any
        throughput = Throughput.of_storage(ctx.storage, skip=ctx.study.study_name)
    # without the time limit: it would read the study's rungs once per priced model (200 of them)
    flops, normalized = typical_cost(ctx.space, ctx.base, data.num_classes, replace(limits, max_seconds=None),
                                     seed=opts.seed)
    the_plan = _priced(ctx, limits, flops, normalized, throughput)
    if not throughput.measured and not throughput.source and (
            ctx.budget.deadline is not None or the_plan.seconds + the_plan.finish_seconds > PROBE_WORTH):
        the_plan = _priced(ctx, limits, flops, normalized, speed_probe(ctx))
    return the_plan


def _priced(ctx: "StudyContext", limits: Limits, flops: float, normalized: float, throughput: Throughput) -> Plan:
    """:func:`plan` at ``throughput``, an average sampled model costing ``flops`` and ``normalized`` per image."""
    opts, data, ladder = ctx.opts, ctx.data, ctx.ladder
    n, nv = len(data.y_train), len(data.y_val)
    typical = _typical(flops, normalized)
    leader, close = leader_rung(ctx) is not None, closes(ctx)
    reach, last_i = ladder.reach(), len(ladder.rungs) - 1
    below = planned_cost(typical, ladder, n, nv, throughput, reach=[*reach[:-1], 0.0])  # the rungs below the last
    last = planned_cost(typical, ladder, n, nv, throughput, reach=[0.0] * last_i + [1.0])  # one last-rung run

    def search_cost(c: int) -> float:
        return c * below + last_rung_runs(c, ladder, leader, close) * last

    whole = planned_cost(typical, ladder, n, nv, throughput, reach=[1.0] * len(ladder.rungs))  # up the whole ladder
    # --last-rung close: no trial is complete until the closing runs end, so the search keeps time for the final
    # fit alone (TimeBudget.reserve, closing_fit) and the finalists are re-evaluated only in what it leaves over
    # (none, in the Zen 3 machine's letters study: "516 s left, enough to re-evaluate 0 finalist(s)"). Priced
    # as a re-evaluation, the plan said "search ~16 min, then finalists and final fit ~14 min" and 7
    # configurations; the search ran 22 min, screened 20, and the final fit took ~7.
    finalist_runs = 0.0 if close else float(opts.finalists * opts.folds)
    final_scale = 1 / (1 - opts.val_fraction) if opts.final_fit else 0.0
    reeval_cap = math.inf
    enough = None
    left = max(0, opts.trials - finished_count(ctx.study))
    configs, by_budget = left, False
    if ctx.budget.deadline is not None:
        time_left = ctx.budget.left()
        reeval_cap = REEVAL_SHARE * (opts.timeout or time_left)
        room = max(0.0, time_left - finish_cost(whole, finalist_runs, final_scale, reeval_cap))
        unit = below if leader else below + reach[-1] * last  # per configuration (leader: a bound)
        affordable = min(left, int(room / unit)) if unit > 0 else left
        while affordable > 0 and search_cost(affordable) > room:
            affordable -= 1
        if affordable < left:
            configs, by_budget = affordable, True
        if left > 0 and (affordable == 0 or (limits.max_seconds is not None
                                             and whole * (1 + final_scale) > limits.max_seconds)):
            # the budget in which it is not refused for time (it is then also screened with time to spare for
            # the capped re-evaluation and the final fit: a screen costs at most the whole climb)
            enough = whole * (1 + final_scale) / CROWN_SHARE
    per_rung = [configs * p for p in reach[:-1]] + [last_rung_runs(configs, ladder, leader, close)]
    return Plan(ladder, n, nv, configs, per_rung, search_cost(configs),
                finish_cost(whole, finalist_runs, final_scale, reeval_cap), throughput, flops, by_budget, leader,
                limits.max_seconds, normalized, enough, finalist_runs, final_scale, reeval_cap,
                patience=opts.early_stopping_patience, close=close)


def finish_cost(whole: float, finalist_runs: float, final_scale: float, reeval_cap: float = math.inf) -> float:
    """Seconds of the re-evaluation (``finalist_runs`` runs up the whole ladder, at most ``reeval_cap``) and the
    final fit (``final_scale`` runs), a run up the whole ladder taking ``whole`` seconds."""
    return min(whole * finalist_runs, reeval_cap) + whole * final_scale


def speed_probe(ctx: "StudyContext") -> Throughput:
    """This machine's speed, measured by a few seconds' training (:func:`~emnist_hpo.train.probe.probe_speed`) and
    kept on the study, for a study that nothing in its storage has measured: under a time budget the budget's
    count of configurations (and TPE's random start) and its first checks before a rung rest on it; without one,
    the plan's ETA (until the study's own trials replace it)."""
    data = ctx.data
    probe = probe_speed(ctx.base, data.x_train, data.y_train, data.x_val, data.y_val, data.num_classes).to_dict()
    ctx.study.set_user_attr(PROBE_ATTR, probe)
    return Throughput.of_probe(probe)


def pace(study: optuna.Study, the_plan: Plan) -> float:
    """Seconds one configuration takes to screen: the wall time the study's finished sampled trials took per
    configuration (a paused trial's continuations included; seeds and repeats left out) once there are
    :data:`ETA_SAMPLED` configurations; before that, the plan's average model at the throughput measured so
    far (the plan's own before any rung)."""
    sampled = [t for t in study.get_trials(deepcopy=False, states=FINISHED)
               if t.datetime_start is not None and t.datetime_complete is not None
               and SEED_ATTR not in t.user_attrs and REPEAT_ATTR not in t.user_attrs]
    configs = sum(PROMOTE_ATTR not in t.user_attrs for t in sampled)
    if configs >= ETA_SAMPLED:
        return sum((t.datetime_complete - t.datetime_start).total_seconds() for t in sampled) / configs
    own = Throughput.of_study(study)
    return the_plan.per_config(own if own.measured else the_plan.throughput)


def finish_eta(study: optuna.Study, the_plan: Plan, budget: TimeBudget, ladder: Ladder) -> float:
    """Seconds the re-evaluation of the finalists and the final fit will take, as the study prices them now: once
    it has as many complete trials as it will re-evaluate (two at least), at what its own top trials took
    (:meth:`~emnist_hpo.search.budget.TimeBudget.reserve`, as the study will run them); before, the plan's average
    model at the speed the study's rungs measured (the plan's own before any rung). The plan's figure alone
    stayed at the default guess's 5.0 h through a study whose rungs ran ten times faster."""
    costs = costs_of(study, ladder)
    if sum(c.complete for c in costs) >= max(2, budget.finalists):
        return budget.reserve(costs, None if budget.deadline is None else budget.left())
    own = Throughput.of_study(study)
    return the_plan.finish_at(own) if own.measured else the_plan.finish_seconds


def search_eta(study: optuna.Study, the_plan: Plan, left: int, workers: int = 1) -> float:
    """Seconds the ``left`` configurations still to screen take (``workers`` processes screen at once), at the
    study's :func:`pace`."""
    return pace(study, the_plan) * max(left, 0) / max(1, workers)


def affordable(study: optuna.Study, the_plan: Plan, room: float, workers: int = 1) -> int:
    """Configurations ``room`` seconds of search still afford at the study's :func:`pace`: what the progress
    bar of a study under a time budget counts up to, the plan's figure corrected as trials finish."""
    per = pace(study, the_plan)
    return int(max(room, 0.0) / per * max(1, workers)) if per > 0 and math.isfinite(per) else 0
