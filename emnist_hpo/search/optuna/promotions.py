"""Asynchronous successive halving with paused trials: a trial is promoted when it earns it, not when it is early.

At the end of a rung a trial goes on only if it is in the best ``1/eta`` of every score the rung has
seen (Li et al. 2020, ASHA). With fewer than ``eta`` scores, none is: the trial is *paused*, i.e.
pruned with its checkpoint kept and ``paused_at`` recorded. Before every new trial the study
looks, top rung first, for a paused trial that has since entered the best ``1/eta`` of its rung and
enqueues its continuation (``promote_of``): the same configuration and seed, which takes the
checkpoint and rung records over and trains on from the next rung.

Under a time budget (one objective) the last rung is for leaders: a trial enters it only as the best
of the rung below (and in its best ``1/eta``). A full-length run costs several times the rungs below it,
and only the champion's counts: with the plain ``1/eta`` rule a 30-minute letters study ran 5 of its
17 configurations to the end; with this rule the same study ran 3 of 23.

The leader rule alone lets an early leader decide alone: a letters study's rung-1 leader of its first minutes
went to the end as the last rung's only run, and tested 1.2 pt under the hand-written compact seed. So under a
time budget the search ends with a *closing run* (:func:`runner_up`): while the last rung holds one full-length
run, the study keeps time for a second (the full-length run of the best trial waiting at the rung below), and
when the search stops it continues that trial to the end, so that the champion is chosen among two.

With ``--last-rung close`` (the default since 2026-12-07; ``leaders`` is the rule above) nobody enters the last
rung while the search screens (:func:`top`'s ``close``): every trial waits, paused, at the rung below, and when
the search stops :data:`LAST_RUNG_RUNS` of them go on to the end (:func:`closers`), all of them closing runs: the
best, and its smallest rival within one standard error (:func:`contenders`). The leader rule sends each new leader
of the rung below to the end as it arrives: a 30-minute letters study on the 2-core Zen 3 machine ran three
successive leaders' last rungs (1,032 s of its 1,269 s of search) and screened 9 configurations; with ``close`` the
same study screened 20 and its champion tested 1.2 pt higher.

Without pausing (the rule before), the first trials of a study went up every rung whatever their
score, being "the best so far" of one or two: in a 30-minute study the first trained trial, 58% on
letters where the best reached 93%, took 289 s of the budget to its last rung.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import optuna
from optuna.trial import TrialState

from emnist_hpo.search.noise import no_larger, size_of, standard_error

#: Trial user attribute of a trial paused at the end of a rung (its index), its checkpoint kept.
PAUSED_ATTR = "paused_at"
#: Trial user attribute of a trial that continues a paused one (its number) from the next rung.
PROMOTE_ATTR = "promote_of"
#: Trial user attribute of the search's closing run (:func:`runner_up`): the trial it continues (its number).
CLOSING_ATTR = "closing_of"
#: Full-length runs the last rung should hold when a search under a time budget ends (:func:`runner_up`).
LAST_RUNG_RUNS = 2


def records_of(trial: optuna.trial.FrozenTrial) -> list[dict[str, Any]]:
    """The rung records a trial holds (its own, and those it took over from the trial it continues)."""
    return [r for r in trial.user_attrs.get("rungs", []) or [] if isinstance(r, dict)]


def rung_table(trials: Iterable[optuna.trial.FrozenTrial], exclude: int | None = None,
               field: str = "score") -> dict[int, dict[int, float]]:
    """Every rung's scores by the trial that trained them (``rung -> {trial: score}``); ``field``: another figure of
    the rung records (``"seconds"``: what each rung took), records without it left out.

    A record taken over by a continuation counts once, for the trial that trained it.
    """
    table: dict[int, dict[int, float]] = {}
    for t in trials:
        if t.number == exclude:
            continue
        for i, r in enumerate(records_of(t)):
            if field in r:
                table.setdefault(int(r.get("rung", i)), {})[int(r.get("trial", t.number))] = float(r[field])
    return table


def top(scores: Mapping[int, float], eta: int, leader: bool = False, close: bool = False) -> set[int]:
    """The trials in the best ``1/eta`` of a rung's ``scores`` (none while it has fewer than ``eta``);
    ``leader``: only the best of them (the rule into the last rung under a time budget); with ``close`` as well,
    none (``--last-rung close``: the last rung waits for the search to stop, :func:`closers`)."""
    k = len(scores) // eta
    if leader:
        k = 0 if close else min(k, 1)
    ranked = sorted(scores, key=lambda n: (-scores[n], n))  # NaN never ranks: scores are finite here
    return set(ranked[:k])


def _continued(trials: Iterable[optuna.trial.FrozenTrial]) -> set[int]:
    """The trials some other trial continues (whatever state that continuation is in)."""
    return {int(t.user_attrs[PROMOTE_ATTR]) for t in trials if PROMOTE_ATTR in t.user_attrs}


def _waiting(trials: list[optuna.trial.FrozenTrial], checkpoint_dir: Path | None) -> list[optuna.trial.FrozenTrial]:
    """Paused trials nobody continues yet (with ``checkpoint_dir``: only those whose checkpoint is at hand)."""
    continued = _continued(trials)
    return [t for t in trials if t.state == TrialState.PRUNED and PAUSED_ATTR in t.user_attrs
            and t.number not in continued
            and (checkpoint_dir is None or (checkpoint_dir / f"running_{t.number}.npz").is_file())]


def promotions(study: optuna.Study, eta: int, checkpoint_dir: Path,
               leader_rung: int | None = None, close: bool = False) -> list[optuna.trial.FrozenTrial]:
    """Paused trials now in the best ``1/eta`` of their rung, not yet continued, checkpoint at hand; top rung first.

    ``leader_rung``: the rung below the last under a time budget, whose paused trials go on only as its best
    (with ``close``: not before the search stops, :func:`closers`).
    """
    trials = study.get_trials(deepcopy=False)
    table = rung_table(trials)
    waiting = sorted(_waiting(trials, checkpoint_dir), key=lambda t: (-int(t.user_attrs[PAUSED_ATTR]), t.number))
    return [t for t in waiting
            if t.number in top(table.get(int(t.user_attrs[PAUSED_ATTR]), {}), eta,
                               leader=int(t.user_attrs[PAUSED_ATTR]) == leader_rung, close=close)]


def enqueue_promotions(study: optuna.Study, eta: int, checkpoint_dir: Path, leader_rung: int | None = None,
                       close: bool = False) -> list[int]:
    """Enqueue the continuation of every paused trial that has earned its next rung (called under the study lock)."""
    return [_enqueue(study, t) for t in promotions(study, eta, checkpoint_dir, leader_rung, close)]


def enqueue_closing(study: optuna.Study, checkpoint_dir: Path) -> list[int]:
    """When the search ends and no trial has reached the last rung: continue the best paused trial of the
    highest rung reached (a study of fewer trials than ``eta`` still crowns a champion). Under the study lock."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.COMPLETE for t in trials):
        return []
    if any(t.state in (TrialState.RUNNING, TrialState.WAITING) and PROMOTE_ATTR in t.user_attrs for t in trials):
        return []  # one is on its way
    if any(PROMOTE_ATTR in t.user_attrs and t.state in (TrialState.PRUNED, TrialState.FAIL)
           and PAUSED_ATTR not in t.user_attrs for t in trials):
        return []  # a continuation was stopped for good (the time budget, a guard): no second try
    paused = _waiting(trials, checkpoint_dir)
    if not paused:
        return []
    table = rung_table(trials)

    def rank(t: optuna.trial.FrozenTrial) -> tuple[int, float]:
        rung = int(t.user_attrs[PAUSED_ATTR])
        return rung, table.get(rung, {}).get(t.number, float("-inf"))

    return [_enqueue(study, max(paused, key=rank))]


def closers(study: optuna.Study, checkpoint_dir: Path | None, leader_rung: int | None,
            close: bool = False, since: int = 0, images: int = 0) -> list[optuna.trial.FrozenTrial]:
    """The trials the search's closing runs continue to the end, best first; none when none is due.

    Under a time budget (``leader_rung``: the rung below the last), until the last rung holds
    :data:`LAST_RUNG_RUNS` full-length runs (those on their way counted) and while no closing run was made: the
    paused trials at ``leader_rung`` that nobody continues (checkpoint at hand, when ``checkpoint_dir`` is
    given), as many as the last rung lacks: the best, then its smallest rival (:func:`contenders`; ``images``:
    the validation images of a score at ``leader_rung``, 0: by score alone). The leader rule (``close`` False) owes
    one only where the last rung holds a run (a leader ran it alone; with none there :func:`enqueue_closing`
    continues the best paused trial);
    ``close`` owes them all. The study keeps their time while the search runs (``TimeBudget.stop_search``'s
    ``closing``) and :func:`enqueue_closers` queues them when the search stops. ``since``: the first trial of this
    session (a resumed study screens again and closes again; runs and closing runs before it do not count).
    """
    if leader_rung is None:
        return []
    trials = study.get_trials(deepcopy=False)
    recent = [t for t in trials if t.number >= since]
    if any(CLOSING_ATTR in t.user_attrs for t in recent):
        return []  # one closing per study (per session), whatever became of it
    paused_at = {t.number: t.user_attrs.get(PAUSED_ATTR) for t in trials}
    on_way = [t for t in recent if t.state in (TrialState.RUNNING, TrialState.WAITING) and PROMOTE_ATTR in t.user_attrs
              and paused_at.get(int(t.user_attrs[PROMOTE_ATTR])) == leader_rung]
    table = rung_table(trials)
    done = sum(n >= since for n in table.get(leader_rung + 1, {}))  # full-length runs made (by the trial that ran them)
    runs = done + len(on_way)
    if (done == 0 and not close) or runs >= LAST_RUNG_RUNS:
        return []
    scores = table.get(leader_rung, {})
    waiting = [t for t in _waiting(trials, checkpoint_dir)
               if t.user_attrs.get(PAUSED_ATTR) == leader_rung and t.number in scores]
    ranked = sorted(waiting, key=lambda t: (-scores[t.number], t.number))
    return contenders(ranked, scores, LAST_RUNG_RUNS - runs, images)


def contenders(ranked: list[optuna.trial.FrozenTrial], scores: Mapping[int, float], k: int,
               images: int = 0) -> list[optuna.trial.FrozenTrial]:
    """``k`` of ``ranked`` (trials, best score first) to run the last rung: the best, then each time the smallest
    of the others (parameters, then FLOPs: :func:`~emnist_hpo.search.noise.size_of`) whose score is within one
    standard error of the best's on ``images`` validation images and that is smaller than the best on one measure
    and larger on none; where none is, the next best. ``images`` 0: the first ``k`` by score.

    The champion is crowned among the last rung's runs by the same one-standard-error rule; picked by score alone,
    the runs were the rung's two highest scores, and a model as accurate within the rung's noise and smaller never
    had the full-length run in which to be crowned (letters seed 1, seeds first: both closing runs cost ~53M FLOPs,
    and the champion tied compact on test at 151% of its FLOPs).
    """
    if k <= 0 or not ranked:
        return []
    if images <= 0:
        return list(ranked[:k])
    best, rest = ranked[0], list(ranked[1:])
    floor = scores[best.number] - standard_error(scores[best.number], images)
    size = {t.number: size_of(t.user_attrs) for t in ranked}
    top = size[best.number]
    picks = [best]
    while len(picks) < k and rest:
        rivals = [t for t in rest if scores[t.number] >= floor and size[t.number] != top
                  and no_larger(size[t.number], top)]
        pick = min(rivals, key=lambda t: (size[t.number], -scores[t.number], t.number)) if rivals else rest[0]
        picks.append(pick)
        rest.remove(pick)
    return picks


def runner_up(study: optuna.Study, checkpoint_dir: Path | None,
              leader_rung: int | None) -> optuna.trial.FrozenTrial | None:
    """The leader rule's closing run (:func:`closers`): the best trial waiting at ``leader_rung`` while one leader
    ran the last rung alone, or None."""
    picks = closers(study, checkpoint_dir, leader_rung)
    return picks[0] if picks else None


def enqueue_closers(study: optuna.Study, picks: Iterable[optuna.trial.FrozenTrial]) -> list[int]:
    """When the search stops: queue the closing runs of ``picks`` (:func:`closers`). Under the study lock."""
    return [_enqueue(study, t, closing=True) for t in picks]


def enqueue_runner_up(study: optuna.Study, checkpoint_dir: Path, leader_rung: int | None) -> list[int]:
    """When the search stops: queue the leader rule's closing run (:func:`runner_up`), if one is due."""
    t = runner_up(study, checkpoint_dir, leader_rung)
    return [] if t is None else enqueue_closers(study, [t])


def closing_queued(study: optuna.Study) -> list[int]:
    """The closing runs queued and not begun (the search has stopped; each is still run)."""
    return [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if CLOSING_ATTR in t.user_attrs]


def _enqueue(study: optuna.Study, t: optuna.trial.FrozenTrial, closing: bool = False) -> int:
    from emnist_hpo.search.trial import SEED_ATTR, SEED_OF_ATTR, WARM_ATTR, seed_origin  # the trial path loads Keras

    attrs = {k: v for k, v in t.user_attrs.items() if k in (SEED_ATTR, WARM_ATTR)}
    attrs[PROMOTE_ATTR] = t.number
    if closing:
        attrs[CLOSING_ATTR] = t.number
    attrs[SEED_OF_ATTR] = seed_origin(t.number, t.user_attrs)
    study.enqueue_trial(dict(t.params), user_attrs=attrs, skip_if_exists=False)
    return t.number


def continues(attrs: Mapping[str, Any]) -> int | None:
    """The trial a trial takes the checkpoint and rung records of: the interrupted or paused one it continues."""
    old = attrs.get("resume_of", attrs.get(PROMOTE_ATTR))  # search.trial.RESUME_ATTR (that module loads Keras)
    return None if old is None else int(old)


def drop_paused_checkpoints(study: optuna.Study, checkpoint_dir: Path) -> int:
    """Once the search is over, the checkpoints of the paused trials that were never continued (how many)."""
    dropped = 0
    for t in _waiting(study.get_trials(deepcopy=False), None):
        for path in checkpoint_dir.glob(f"running_{t.number}.*"):
            path.unlink(missing_ok=True)
            dropped += 1
    return dropped
