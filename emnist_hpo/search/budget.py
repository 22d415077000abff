"""The study's wall-clock budget: ``--timeout`` covers the search *and* what follows it.

A study does more than its trials: the finalists are re-trained on other folds
and the champion is fitted again on train+validation. A budget that only stops
*starting* trials lets those steps run past it (a 20-minute study that takes
35). :class:`TimeBudget` instead stops the search while there is still time for
them, estimated from the trials themselves: each finalist costs ``folds`` runs of
every epoch of the ladder at its own run's pace (a paused trial's continuation: with
the rungs it trained before; an early-stopped trial's re-run may not stop early), the
final fit one more on a pool 1/(1 - val_fraction) times the training set. The
re-evaluation gets at most ``REEVAL_SHARE`` of the budget (fewer folds, then fewer
finalists, when that is not enough): a search cut short to re-train finalists of a
poor search gains nothing. While it runs, :class:`FinalistPacer` re-prices what is
left at the pace the finalists actually ran, and stops it before it would crowd out
the final fit.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import optuna
from optuna.trial import TrialState

from emnist_hpo.model.cost import run_flops
from emnist_hpo.search.optuna.promotions import PAUSED_ATTR, records_of
from emnist_hpo.search.noise import standard_error
from emnist_hpo.search.optuna.repeats import REPEAT_ATTR

if TYPE_CHECKING:
    from emnist_hpo.train.fidelity import Ladder

#: The largest share of a time budget kept back from the search for the re-evaluation (the final fit comes on top):
#: with a short budget the search itself matters more than a second opinion on its few finalists.
REEVAL_SHARE = 0.2
#: The largest share of a time budget one configuration may need to be crowned (every rung of the ladder, then the
#: final fit): a heavier one is refused before it trains, as ``--max-flops`` would refuse it. Crowning it would
#: leave the search less than the rest: a balanced study spent 1,183 s of 1,800 on one 80M-FLOP model (443 s up
#: the ladder, ~740 s final fit) and screened 12 configurations where its seed-0 twin screened 24.
CROWN_SHARE = 0.5
#: Rungs the study must have measured before it refuses a configuration for time: the default speed guess was
#: 2-4x off on the AVX-512 machine, and would refuse what fits.
CROWN_MEASURED = 3
#: How a refusal for time begins (``fail_reason`` of a configuration over :data:`CROWN_SHARE` of the budget).
TIME_REFUSAL = "model would take"
#: Draws in a row refused for time after which the search stops: the budget is too small for what the sampler
#: draws from this space. A 120 s letters study on the AVX2 machine drew 15 in a row (each ~0.5 s, an MLflow run
#: apiece); the 30-minute studies' refusals came singly or in short runs among trained draws.
REFUSED_RUN = 25


@dataclass(frozen=True)
class TrialCost:
    value: float  # the trial's first objective (validation accuracy)
    seconds: float  # its wall time, tracking included
    complete: bool  # COMPLETE (a finalist candidate) rather than PRUNED
    full: float = 1.0  # the ladder's epochs over the epochs it ran (> 1 when early stopping ended it): a final fit runs all
    trained: bool = True  # it ran at least one rung (False: refused for its size, or its first rung did not fit the time)
    out_of_time: bool = False  # stopped because its next rung would not fit in the time budget
    ended: float = 0.0  # when it finished (seconds since the epoch)
    before: float = 0.0  # seconds its rungs took in the paused trials it continues (0 unless a continuation)
    too_long: bool = False  # refused before training: crowning it would take more than CROWN_SHARE of the budget

    @property
    def run_seconds(self) -> float:
        """What training it from scratch costs: a continuation's run began in the trials it continues."""
        return self.seconds + self.before

    @property
    def full_seconds(self) -> float:
        """What a run of every epoch of the ladder costs: a re-evaluation or final fit is not cut short where early
        stopping ended the trial (letters: two finalists priced at their trials' times ran longer, and the final
        fit no longer fitted)."""
        return self.run_seconds * self.full


def full_share(trial: optuna.trial.FrozenTrial, ladder: Ladder | None) -> float:
    """How much longer than ``trial`` a run of every epoch of ``ladder`` takes (1 when unknown)."""
    ran = trial.user_attrs.get("epochs_run")
    if ladder is None or not isinstance(ran, int) or ran <= 0:
        return 1.0
    return max(1.0, sum(r.epochs for r in ladder.rungs) / ran)


def cost_of(trial: optuna.trial.FrozenTrial, ladder: Ladder | None = None) -> TrialCost | None:
    """What a finished trial cost (with ``ladder``: and what a full run of it would); None without its times,
    and for a repeat (it took its twin's outcome without training: its time says nothing of a trial's)."""
    if trial.datetime_start is None or trial.datetime_complete is None or REPEAT_ATTR in trial.user_attrs:
        return None
    seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
    value = trial.values[0] if trial.values else float("-inf")
    reason = trial.user_attrs.get("fail_reason")
    rungs = [r for r in trial.user_attrs.get("rungs") or [] if isinstance(r, dict)]
    before = sum(float(r.get("seconds", 0.0)) for r in rungs if r.get("trial", trial.number) != trial.number)
    return TrialCost(value, seconds, trial.state == TrialState.COMPLETE, full_share(trial, ladder),
                     trained=bool(rungs) or trial.state == TrialState.COMPLETE,
                     out_of_time=isinstance(reason, str) and reason.startswith("time budget"),
                     ended=trial.datetime_complete.timestamp(), before=before,
                     too_long=isinstance(reason, str) and reason.startswith(TIME_REFUSAL))


def costs_of(study: optuna.Study, ladder: Ladder | None = None) -> list[TrialCost]:
    """What the study's finished trials cost (with ``ladder``: and what a full run of each would)."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return [c for c in (cost_of(t, ladder) for t in trials) if c is not None]


#: The share of the budget a final fit may overrun it by: the champion refitted on train+validation is worth a
#: few seconds more than the budget, not its own model trained on 80% of the data.
FINAL_FIT_GRACE = 0.05


@dataclass
class TimeBudget:
    deadline: float | None  # time.time() by which the whole study should be done; None: no budget
    finalists: int = 0  # finalists re-evaluated after the search
    folds: int = 1  # re-evaluation runs per finalist
    final_fit_scale: float = 0.0  # the final fit's cost in trial durations of the champion (0: no final fit)
    timeout: float | None = None  # the budget in seconds
    scored: int = 0  # validation images behind a score: the champion is the smallest trial within one standard
    # error of the best (the study's one-standard-error rule); 0: the best score is crowned

    @classmethod
    def start(cls, timeout: float | None, *, finalists: int, folds: int, final_fit: bool,
              val_fraction: float, now: float | None = None) -> "TimeBudget":
        now = time.time() if now is None else now
        return cls(None if timeout is None else now + timeout, finalists, folds,
                   1.0 / (1.0 - val_fraction) if final_fit else 0.0, timeout)

    def left(self, now: float | None = None) -> float:
        if self.deadline is None:
            return float("inf")
        return self.deadline - (time.time() if now is None else now)

    def final_fit_fits(self, need: float, now: float | None = None) -> bool:
        """Whether a final fit of ``need`` seconds may start: it ends within the budget or overruns it by at most
        :data:`FINAL_FIT_GRACE` of it (the budget's promise is 10%). Without the grace a letters study skipped a
        221 s final fit with 215 s left, ended 10.5% under its budget, and its champion tested 0.8 pt under
        compact alone on 80% of the data."""
        slack = FINAL_FIT_GRACE * self.timeout if self.timeout else 0.0
        return need <= self.left(now) + slack

    def plan(self, costs: Sequence[TrialCost], room: float | None = None) -> tuple[int, int]:
        """``(finalists, folds)`` the re-evaluation can afford: within its share of the budget (and
        ``room`` seconds, when given), each finalist costing ``folds`` runs of every epoch of the ladder
        (:attr:`TrialCost.full_seconds`: a re-evaluation trains from scratch what a continuation picked up, and
        is not cut short where early stopping ended the trial).

        Fewer folds are preferred to fewer finalists; ``(0, 0)`` when two finalists do not fit even with one
        fold, or the study has one complete trial: one finalist cannot be compared with anything.
        """
        top = sorted((c for c in costs if c.complete), key=lambda c: -c.value)[: self.finalists]
        if len(top) < 2 or self.folds < 1:
            return 0, 0  # one finalist cannot be compared with anything: not worth the budget
        share = float("inf") if self.timeout is None else REEVAL_SHARE * self.timeout
        room = share if room is None else min(room, share)
        for folds in range(self.folds, 0, -1):
            n, spent = 0, 0.0
            for c in top:
                if spent + c.full_seconds * folds > room:
                    break
                n, spent = n + 1, spent + c.full_seconds * folds
            if n >= 2:
                return n, folds
        return 0, 0

    def fit_cost(self, champion: TrialCost) -> float:
        """Seconds the final fit of ``champion`` takes: every epoch of the ladder on train+validation."""
        return champion.full_seconds * self.final_fit_scale

    def final_fit_cost(self, costs: Sequence[TrialCost]) -> float:
        """Seconds the champion's final fit may take: the longest of those that may be crowned. With a
        re-evaluation (:meth:`plan`), the finalists, any of which its means may crown; without one, the trials
        within one standard error of the best (the smallest of them is crowned, not the best)."""
        top = sorted((c for c in costs if c.complete), key=lambda c: -c.value)
        if not top:
            return 0.0
        finalists, _ = self.plan(costs)
        if finalists:
            may_win = top[:finalists]
        else:
            margin = standard_error(top[0].value, self.scored)
            may_win = [c for c in top if c.value >= top[0].value - margin]
        return max(self.fit_cost(c) for c in may_win)

    def reserve(self, costs: Sequence[TrialCost], left: float | None = None) -> float:
        """Seconds the re-evaluation (as :meth:`plan` would run it) and the final fit are expected to take; with
        ``left`` (seconds left), the re-evaluation that still fits in them after the final fit, as the study will
        run it. A finalist that joins the top late can make the planned re-evaluation too long for what is
        left; the search then goes on while the final fit fits, rather than stopping for a re-evaluation that
        will not run (letters: stopped with 550 s left for ~618, re-evaluated nothing, 12.8% under budget)."""
        fit = self.final_fit_cost(costs)
        n, folds = self.plan(costs, room=None if left is None else left - fit)
        top = sorted((c for c in costs if c.complete), key=lambda c: -c.value)
        return sum(c.full_seconds for c in top[:n]) * folds + fit

    def stop_search(self, costs: Sequence[TrialCost], now: float | None = None, closing: float = 0.0) -> str | None:
        """Why the search must start no more trials, or None while the next trial still fits.

        ``closing``: seconds kept for the search's closing run, which follows it
        (:func:`~emnist_hpo.search.optuna.promotions.runner_up`; 0: none due)."""
        left = self.left(now)
        if left == float("inf"):
            return None
        if left <= 0:
            return "the time budget is spent"
        if not costs:
            return None
        began = self.deadline - (self.timeout if self.timeout is not None else left)
        if any(c.out_of_time and not c.trained and c.ended >= began for c in costs):
            return (f"time budget: {left:.0f} s left, and a configuration's first rung no longer fits before the "
                    f"time kept for re-evaluating the finalists and the final fit")
        latest = sorted(costs, key=lambda c: c.ended)[-REFUSED_RUN:]
        if len(latest) == REFUSED_RUN and all(c.too_long for c in latest):
            return (f"time budget: the last {REFUSED_RUN} configurations drawn would each take more than "
                    f"{CROWN_SHARE:.0%} of it to be crowned, too small a budget for what this space holds (a larger "
                    "--timeout, fewer --epochs, --max-train-samples or a space of smaller models)")
        # what the next configuration typically costs: most stop at a low rung, and the check before every rung
        # stops one whose next rung would not fit, so a full-length trial is not the guess (it left ~10% unused)
        trained = [c.seconds for c in costs if c.trained]
        next_trial = statistics.median(trained or [c.seconds for c in costs])
        reserve = self.reserve(costs, left)
        if next_trial + reserve + closing > left:
            run = f"the closing full-length run (~{closing:.0f} s), " if closing > 0 else ""
            return (f"time budget: {left:.0f} s left, kept for {run}re-evaluating the finalists and the final fit "
                    f"(~{reserve:.0f} s, judging by the trials' durations; a trial takes ~{next_trial:.0f} s)")
        return None


@dataclass
class FinalistPacer:
    """Before each finalist's re-evaluation: does it still fit before the final fit? Both are priced as
    :meth:`TimeBudget.plan` and :meth:`TimeBudget.final_fit_cost` price them, times how much slower than priced the
    finalists before it ran, and a finalist starts only where the final fit after it may still start
    (:meth:`TimeBudget.final_fit_fits`, its grace included). So a re-evaluation running long stops itself rather
    than leave the champion unfitted (letters: the finalists ran longer than priced and the 265 s final fit no
    longer fitted in the 198 s left; the trial's own model tested 0.6 pt lower than the fitted one)."""

    budget: TimeBudget
    prices: dict[int, float]  # trial number -> seconds priced for its re-evaluation (every fold)
    keep: float  # seconds priced for the final fit
    began: float | None = None  # when the first finalist began (they run back to back)
    priced: float = 0.0  # seconds the finalists begun so far were priced at
    slower: float = 1.0  # how much longer than priced they ran, as of the last check (never below 1)

    def __call__(self, trial: int, now: float | None = None) -> str | None:
        """Why finalist ``trial`` must not be re-evaluated, or None (its re-evaluation starts now)."""
        now = time.time() if now is None else now
        if self.began is not None and self.priced > 0:
            self.slower = max(1.0, (now - self.began) / self.priced)
        price, keep, left = self.prices.get(trial, 0.0) * self.slower, self.keep * self.slower, self.budget.left(now)
        if not self.budget.final_fit_fits(keep, now + price):  # the final fit after it, by the final fit's own rule
            return (f"time budget: {left:.0f} s left; re-evaluating trial {trial} takes ~{price:.0f} s and the "
                    f"final fit ~{keep:.0f} s")
        self.began = now if self.began is None else self.began
        self.priced += self.prices.get(trial, 0.0)
        return None


# --------------------------------------------------------------------------- what a rung costs on this machine


#: Before a study has measured anything: seconds of fixed cost per rung (model build, graph tracing, tracking)
#: and training FLOP/s, as measured on the 2-core AVX2 CI machine (benchmarks/bench_fidelity.py).
DEFAULT_OVERHEAD_S = 3.0
DEFAULT_RATE = 30e9
#: The most a fit of a study's rungs with the batch-norm term may put the training rate above its speed probe's
#: before FLOPs alone is fitted instead (:meth:`Throughput.fit`): the probe's model has no batch-norm, so its rate
#: is the machine's for plain FLOPs, and larger convolutions run faster per FLOP than its small model: on the Zen 3
#: machine sound fits over 5-71 rungs came to 1.2-2.6x its rate; the failures seen were 7-20x.
PROBE_CEILING = 4.0
#: The least a fit of a study's rungs may put the training rate at, as a share of its speed probe's (whose model is
#: a small CNN without batch-norm: larger convolutions run at least as fast per FLOP). Rungs of small models, whose
#: time is mostly overhead and batch-norm, leave the rate unknown: a letters study that had trained models of at most
#: 13M FLOPs fitted 69-103 GFLOP/s against its probe's 173, priced 40-117M-FLOP models at 979-3,230 s to be crowned
#: and refused them for time (900 s); the next study on the same machine, whose rungs included 30-117M-FLOP models,
#: priced them at 180-450 s, and the first study's own fit rose to 340 GFLOP/s once 13-18M-FLOP models ran.
PROBE_FLOOR = 1.0
#: Study user attribute: the speed :func:`~emnist_hpo.train.probe.probe_speed` measured before the study's first
#: rung (``rate``, ``overhead``, ``seconds``), its speed until its rungs say otherwise.
PROBE_ATTR = "speed_probe"


@dataclass(frozen=True)
class RungRecord:
    work: float  # FLOPs of the rung: training images x 3 x forward FLOPs + validation images x forward FLOPs
    seconds: float  # its wall time
    norm: float | None = None  # training images x elements through batch-norm (None: not recorded)


def usable(records: Sequence[RungRecord]) -> list[RungRecord]:
    """The records a speed can be fitted to: some work, a finite positive time."""
    return [r for r in records if r.work > 0 and r.seconds > 0 and math.isfinite(r.seconds)]


def rung_work(images: int, flops: int, val_images: int = 0) -> float:
    """FLOPs a rung spends: training (forward and backward) and its validation passes."""
    return run_flops(images, flops, val_images)


def rung_norm(images: int, normalized: int) -> float:
    """Batch-norm work of a rung: training images x elements per image through batch-norm
    (:attr:`~emnist_hpo.model.cost.ModelCost.normalized`)."""
    return float(images) * normalized


@dataclass
class Throughput:
    """``seconds = overhead + work / rate + norm * norm_cost``, fitted to the rungs a study has run (defaults
    until it has run some).

    Predicts what a rung, a trial or a final fit will take from costs known before training
    (:mod:`emnist_hpo.model.cost`): the study's plan and ETA, and the budget's check before every rung.
    ``norm`` is the rung's batch-norm work (:func:`rung_norm`): at equal FLOPs batch-norm doubled compact's
    training time on a 2-core CPU, and a fit on FLOPs alone predicted batch-norm rungs 26% short and the others
    18% long (two letters studies, 48 rungs; with the batch-norm term: 2% short and 13% long).
    """

    overhead: float = DEFAULT_OVERHEAD_S  # seconds per rung whatever its size
    rate: float = DEFAULT_RATE  # training FLOP/s
    measured: int = 0  # rungs the fit is based on
    source: str = ""  # whose rungs, when not the study's own ("other studies in this storage")
    norm_cost: float = 0.0  # seconds per image-element through batch-norm (0: not fitted)

    def seconds(self, work: float, norm: float = 0.0) -> float:
        return self.overhead + work / self.rate + norm * self.norm_cost

    def own(self, records: Sequence[RungRecord]) -> "Throughput | None":
        """The speed one model's own ``records`` ran at (this overhead, their rate); None without records.

        The fit averages over every model a study trained, and models of equal cost run at different rates
        (one letters study's rungs ran at 18-100 GFLOP/s), so once a model has run a rung its own speed is the
        better guess of its next ones.
        """
        pts = usable(records)
        if not pts:
            return None
        busy = sum(max(r.seconds - self.overhead - (r.norm or 0.0) * self.norm_cost, 0.25 * r.seconds) for r in pts)
        return replace(self, rate=sum(r.work for r in pts) / busy, measured=len(pts), source="its own rungs")

    @classmethod
    def fit(cls, records: Sequence[RungRecord], ceiling: float | None = None, floor: float | None = None) -> "Throughput":
        """Least squares over ``records`` (intercept >= 0); the defaults where there are too few or too alike.
        With the batch-norm work of every record known, and rungs with and without it, that term too
        (:meth:`_fit_norm`); else FLOPs alone. So too where that term's fit puts the rate above ``ceiling``
        (FLOP/s; :meth:`of_study` passes :data:`PROBE_CEILING` times its speed probe's): it has given the time of
        the FLOPs to batch-norm, which grows with them over a study's first rungs. A letters study's first 6-12
        rungs fitted 1,300-3,800 GFLOP/s and 8-9 ns per element where its probe measured 186; it priced an
        8.5M-FLOP batch-norm model at ~420 s, and its 120 s budget trained nothing.

        A rate under ``floor`` (FLOP/s; :meth:`of_study` passes its probe's) is raised to it and the other terms
        fitted again at that rate (:meth:`_at_rate`): rungs of small models, whose time is mostly overhead and
        batch-norm, leave the rate unknown, and a low one prices larger models far too long (:data:`PROBE_FLOOR`)."""
        good = usable(records)
        fitted = cls._fit(good, ceiling)
        if floor is not None and fitted.measured and fitted.rate < floor:
            return cls._at_rate(good, floor)
        return fitted

    @classmethod
    def _fit(cls, good: Sequence[RungRecord], ceiling: float | None) -> "Throughput":
        with_norm = cls._fit_norm(good)
        if with_norm is not None and (ceiling is None or with_norm.rate <= ceiling):
            return with_norm
        pts = [(r.work, r.seconds) for r in good]
        if not pts:
            return cls()
        if len(pts) >= 3:
            n = len(pts)
            mx = sum(w for w, _ in pts) / n
            my = sum(s for _, s in pts) / n
            var = sum((w - mx) ** 2 for w, _ in pts)
            if var > 0:
                slope = sum((w - mx) * (s - my) for w, s in pts) / var
                intercept = my - slope * mx
                if slope > 0 and intercept >= 0:
                    return cls(intercept, 1.0 / slope, n)
        # few or degenerate points: keep the default overhead, fit the rate alone (median of the points)
        rates = sorted(w / max(s - DEFAULT_OVERHEAD_S, 0.25 * s) for w, s in pts)
        return cls(DEFAULT_OVERHEAD_S, rates[len(rates) // 2], len(pts))

    @classmethod
    def _at_rate(cls, records: Sequence[RungRecord], rate: float) -> "Throughput":
        """The overhead and batch-norm cost that fit ``records`` best (least squares, neither negative: SciPy's
        ``nnls``) with the training rate fixed at ``rate``: what is left of each rung's time once its FLOPs are
        paid at that rate. Where the best unconstrained overhead is negative the batch-norm term carries the time
        alone: a letters study on the Zen 3 machine (33 rungs, probe 74 GFLOP/s) fell back to a flat 17 s per
        rung and priced its 267 s closing run at 174 s (rms error 18 s); fitted under the constraint, 245 s (8 s)."""
        import numpy as np
        from scipy.optimize import nnls

        rest = np.array([r.seconds - r.work / rate for r in records])
        if len(records) >= 3 and _norm_varies(records):
            norm = np.array([float(r.norm) for r in records])
            scale = float(norm.max())  # elements run to ~1e10: the solver works on a unit column
            (overhead, norm_cost), _ = nnls(np.c_[np.ones(len(records)), norm / scale], rest)
            return cls(float(overhead), rate, len(records), norm_cost=float(norm_cost) / scale)
        return cls(max(float(rest.mean()), 0.0), rate, len(records))

    @classmethod
    def _fit_norm(cls, records: Sequence[RungRecord]) -> "Throughput | None":
        """``seconds = overhead + work / rate + norm * norm_cost`` by least squares, or None: a record without
        its batch-norm work, fewer than 4 records, no rung with batch-norm or none without, or a fit that is not
        physical (a negative overhead or cost)."""
        if len(records) < 4 or not _norm_varies(records):
            return None
        import numpy as np

        x = np.array([[1.0, r.work, r.norm] for r in records])
        y = np.array([r.seconds for r in records])
        if np.linalg.matrix_rank(x) < 3:
            return None
        (overhead, slope, norm_cost), *_ = np.linalg.lstsq(x, y, rcond=None)
        if slope <= 0 or overhead < 0 or norm_cost < 0:
            return None
        return cls(float(overhead), float(1.0 / slope), len(records), norm_cost=float(norm_cost))

    @classmethod
    def of_study(cls, study: optuna.Study) -> "Throughput":
        """Fitted to every rung the study's trials recorded (user attribute ``rungs``); before it has any, its
        speed probe's (:data:`PROBE_ATTR`), if it ran one, which also bounds the fit's rate (:meth:`fit`)."""
        probe = study.user_attrs.get(PROBE_ATTR)
        probed = cls.of_probe(probe) if isinstance(probe, dict) else None
        fitted = cls.fit(rung_records(study), ceiling=None if probed is None else PROBE_CEILING * probed.rate,
                         floor=None if probed is None else PROBE_FLOOR * probed.rate)
        return fitted if fitted.measured or probed is None else probed

    @classmethod
    def of_probe(cls, probe: dict) -> "Throughput":
        """The speed a probe measured (:meth:`emnist_hpo.train.probe.Probe.to_dict`)."""
        return cls(float(probe["overhead"]), float(probe["rate"]), 0,
                   source=f"a {float(probe['seconds']):.0f} s probe before the first rung")

    @classmethod
    def of_storage(cls, storage: str | optuna.storages.BaseStorage, skip: str | None = None) -> "Throughput":
        """Fitted to the rungs of every study in ``storage`` but ``skip``: before a study has run a rung, the
        speed its storage's other studies measured (this machine, for a local store) rather than the default
        guess, which was 2-4x off on a machine with AVX-512 and bfloat16 units."""
        records = []
        for name in optuna.study.get_all_study_names(storage):
            if name != skip:
                records.extend(rung_records(optuna.load_study(study_name=name, storage=storage)))
        fitted = cls.fit(records)
        return replace(fitted, source="other studies in this storage") if fitted.measured else fitted


def climb_seconds(trial: optuna.trial.FrozenTrial, ladder: Ladder, n_train: int, n_val: int,
                  throughput: Throughput, start: int | None = None) -> float:
    """Seconds the rungs above the one paused ``trial`` stopped at take (``paused_at``; none: every rung; ``start``:
    from that rung on, 0 for a run from scratch), at the slower of ``throughput`` and the speed its own rungs ran at
    (:meth:`Throughput.own`): its FLOPs per image (``flops``) and its batch-norm elements per image (a rung
    record's ``norm`` over its ``images``); and never less than its largest rung's seconds scaled by work.

    The scaled price is the closer: a byclass closing run of 15 epochs took 114 s, 0.72 ms per image as its
    5-epoch rung had; the fit, which gives each rung a fixed overhead, priced it at 94 s from that rung, the
    second closing run no longer fitted, and the champion was chosen among one full-length run."""
    records = records_of(trial)
    own = usable([record_of(r) for r in records if "work" in r and "seconds" in r])
    mine = throughput.own(own)
    speed = mine if mine is not None and mine.rate < throughput.rate else throughput
    largest = max(own, key=lambda r: r.work, default=None)
    flops = float(trial.user_attrs.get("flops") or 0)
    per_image = next((float(r["norm"]) / float(r["images"]) for r in records
                      if r.get("norm") is not None and r.get("images")), 0.0)
    if start is None:
        start = int(trial.user_attrs.get(PAUSED_ATTR, -1)) + 1
    total = 0.0
    for images, scored in list(zip(ladder.images(n_train), ladder.scored(n_train, n_val)))[start:]:
        work = rung_work(images, flops, scored)
        scaled = largest.seconds * work / largest.work if largest is not None else 0.0
        total += max(speed.seconds(work, images * per_image), scaled)
    return total


def _norm_varies(records: Sequence[RungRecord]) -> bool:
    """Whether a batch-norm term can be fitted to ``records``: every one's batch-norm work known, and rungs with
    it and without it."""
    return all(r.norm is not None for r in records) and any(r.norm for r in records) and not all(r.norm for r in records)


def rung_records(study: optuna.Study) -> list[RungRecord]:
    """Every rung ``study``'s trials recorded (user attribute ``rungs``: work and seconds)."""
    records = []
    for t in study.get_trials(deepcopy=False):
        for r in t.user_attrs.get("rungs", []) or []:
            if isinstance(r, dict) and "work" in r and "seconds" in r:
                records.append(record_of(r))
    return records


def record_of(rung: dict) -> RungRecord:
    """A :class:`RungRecord` from a trial's ``rungs`` entry (``norm`` absent in studies made before it was recorded)."""
    norm = rung.get("norm")
    return RungRecord(float(rung["work"]), float(rung["seconds"]), None if norm is None else float(norm))
