"""One study, several processes: trial slots, recovery from dead processes, a single finalizer.

Any number of processes may run the same study at once (``study --workers N``
on one machine, or the same ``study`` command on several machines sharing a
PostgreSQL storage and an MLflow server), and any of them may die at any
moment. Three rules keep the stores exact:

* **Trial slots.** A process starts a trial only while holding the study lock
  (:class:`StudyLock`, see :mod:`emnist_hpo.coordination`) and only when the
  finished plus running trials are fewer than the target; the lock is released
  as soon as the new trial exists (RUNNING) in the storage. So the study ends
  with exactly the requested number of finished trials, however many processes
  share it. A process with no free slot waits while other processes' trials run
  (one of them may still fail and free a slot).
* **Recovery.** A RUNNING trial whose owner process is dead on this host
  (:func:`~emnist_hpo.coordination.owner_alive`) is failed at once with the
  reason recorded; one owned by another host fails through Optuna's heartbeat
  once it is ``grace_period`` seconds stale. MLflow runs left RUNNING are
  closed to match: a trial's run takes its trial's final state (FAILED for a
  failed trial), any other run of a dead process ends FAILED.
* **One finalizer.** Picking, retraining, testing and registering the champion
  happens once per champion: the process that first records a claim in the
  study (user attribute ``finalized``, written under the study lock) does it and
  marks the claim ``done``; the others skip. A claim whose owner died on this
  host, or whose lease (refreshed every minute by the claimant) is older than
  :data:`FINALIZE_LEASE_S`, can be taken over.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Callable, Iterator

import optuna
from optuna.trial import TrialState

from emnist_hpo.coordination import OWNER_ATTR, OWNER_TAG, current_owner, owner_alive, store_lock
from emnist_hpo.search.optuna.promotions import PROMOTE_ATTR
from emnist_hpo.search.trial import interrupt_reason
from emnist_hpo.tracking.tracker import TAG_KIND, TAG_REASON, TAG_STATE, TAG_STUDY, TAG_TRIAL, Tracker, trial_status

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: Study user attribute holding the finalize claim.
FINALIZE_ATTR = "finalized"
#: Seconds after which a claim that was not refreshed may be taken over.
FINALIZE_LEASE_S = 300.0
#: Seconds between looks at the study while waiting for other processes' trials.
POLL_S = 1.0


class _QuietTrialLog(logging.Filter):
    """Optuna's "Trial N failed" warning on one line: no traceback (the trial keeps it), nothing for Ctrl-C."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.endswith("failed with value None."):
            return False  # the line before said why
        if "failed with parameters" in msg:
            if "KeyboardInterrupt" in msg or "Terminated(" in msg:
                return False
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("optuna.study._optimize").addFilter(_QuietTrialLog())


class StudyLock:
    """The lock serialising trial starts, seed enqueueing and the finalize claim of one study."""

    def __init__(self, storage_url: str, storage: optuna.storages.BaseStorage, study_name: str):
        self.url, self.name = storage_url, f"study:{study_name}"
        self.engine = getattr(storage, "engine", None)

    @contextlib.contextmanager
    def held(self) -> Iterator["_Release"]:
        """Hold the lock; the yielded object's ``release()`` lets go early (once)."""
        cm = store_lock(self.url, self.name, engine=self.engine)
        cm.__enter__()
        handle = _Release(cm)
        try:
            yield handle
        finally:
            handle.release()


class _Release:
    def __init__(self, cm):
        self._cm = cm

    def release(self) -> None:
        cm, self._cm = self._cm, None
        if cm is not None:
            cm.__exit__(None, None, None)


def slot(study: optuna.Study, target: int) -> str:
    """``"run"`` if a trial may start, ``"wait"`` while running trials may still fill the target, else ``"done"``.

    ``target`` counts configurations: the continuation of a paused trial is not one, and one that waits
    in the queue always runs (a promotion the search earned, even at its end).
    """
    trials = study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING, TrialState.WAITING))
    if any(t.state == TrialState.WAITING and PROMOTE_ATTR in t.user_attrs for t in trials):
        return "run"
    counted = [t for t in trials if PROMOTE_ATTR not in t.user_attrs and t.state != TrialState.WAITING]
    finished = sum(t.state in FINISHED for t in counted)
    if finished >= target:
        return "done"
    if len(counted) >= target:
        return "wait"
    return "run"


def fail_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str) -> bool:
    """Mark a RUNNING trial FAIL with ``fail_reason``; False if another process finished it first."""
    storage = study._storage  # noqa: SLF001 - Optuna has no public setter for another trial's attributes
    try:
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)  # noqa: SLF001
        return bool(storage.set_trial_state_values(trial._trial_id, TrialState.FAIL))  # noqa: SLF001
    except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
        return False


def fail_dead_trials(study: optuna.Study, *, mine: bool = False, reason: str | None = None) -> list[int]:
    """Fail the RUNNING trials whose owner died on this host (``mine``: this process's own), and stale ones."""
    me = current_owner()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(OWNER_ATTR)
        dead = owner == me if mine else owner_alive(owner) is False
        if dead and fail_trial(study, t, reason or f"its process {owner} died (killed or crashed) during the trial"):
            failed.append(t.number)
    if not mine:
        optuna.storages.fail_stale_trials(study)  # owners on other hosts: Optuna's heartbeat
    return failed


def close_orphan_runs(study: optuna.Study, tracker: Tracker, *, mine: bool = False, status: str = "FAILED",
                      reason: str = "its process ended before the run closed") -> int:
    """Close the study's MLflow runs left RUNNING by dead processes (``mine``: by this process); return how many.

    A trial's run takes the final state of its trial once that trial is no
    longer RUNNING; any other run (the study's parent, a final run) is closed
    with ``status`` when its owner is dead (or is this process, with ``mine``).
    """
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.`{TAG_STUDY}` = '{study.study_name}' and attributes.status = 'RUNNING'",
        max_results=5000,
    )
    if not runs:
        return 0
    me = current_owner()
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    closed = 0
    for run in runs:
        tags = run.data.tags
        owner = tags.get(OWNER_TAG)
        dead = owner == me if mine else owner_alive(owner) is False
        new_tags: dict[str, Any] = {}
        if tags.get(TAG_KIND) == "trial":
            trial = trials.get(int(tags.get(TAG_TRIAL, "-1")))
            if trial is not None and trial.state != TrialState.RUNNING:
                why = trial.user_attrs.get("fail_reason")
                new_status = trial_status(trial.state.name, why)
                new_tags = {TAG_STATE: trial.state.name, TAG_REASON: why or reason}
            elif dead:
                new_status, new_tags = status, {TAG_REASON: reason}
            else:
                continue
        elif dead:
            new_status, new_tags = status, {TAG_REASON: reason}
        else:
            continue
        tracker.set_tags(run.info.run_id, new_tags)
        tracker.end_run(run.info.run_id, new_status)
        closed += 1
    return closed


class _Owned:
    """The objective, run by a trial that records its owner and frees the study lock once it exists."""

    def __init__(self, objective: Callable, release: Callable[[], None]):
        self.objective, self.release = objective, release

    def __call__(self, trial: optuna.Trial):
        try:
            trial.set_user_attr(OWNER_ATTR, current_owner())
        finally:
            self.release()
        try:
            return self.objective(trial)
        except KeyboardInterrupt as exc:
            if "fail_reason" not in trial.user_attrs:
                trial.set_user_attr("fail_reason", interrupt_reason(exc))
            raise


class _Last:
    def __init__(self):
        self.trial: optuna.trial.FrozenTrial | None = None

    def __call__(self, study, trial):
        self.trial = trial


def run_trials(
    study: optuna.Study,
    objective: Callable,
    *,
    target: int,
    lock: StudyLock,
    callbacks: list = (),
    stop: Callable[[], str | None] | None = None,
    max_failures: int | None = None,
    log: Callable[[str], None] = print,
    prepare: Callable[[], object] | None = None,
    finish: Callable[[], object] | None = None,
) -> int:
    """Run trials one at a time until the study has ``target`` finished trials; return how many this process ran.

    ``stop`` is asked before every trial: a reason (the time budget, say) ends the loop. ``prepare`` runs
    under the study lock before every trial (it enqueues the paused trials that earned promotion);
    ``finish`` when the search would end, under the lock: what it enqueues still runs (a closing promotion).
    """
    ran = failures = 0
    last = _Last()
    while True:
        reason = stop() if stop is not None else None
        with lock.held() as handle:
            fail_dead_trials(study)
            if prepare is not None and not reason:
                prepare()
            state = "done" if reason else slot(study, target)
            if state == "done" and finish is not None and finish():
                state = "run"
            if state == "run":
                last.trial = None
                study.optimize(_Owned(objective, handle.release), n_trials=1, callbacks=[*callbacks, last],
                               catch=(Exception,), gc_after_trial=True)
        if state == "done":
            if reason:
                log(reason)
            break
        if state == "wait":
            time.sleep(POLL_S)
            continue
        ran += 1
        if last.trial is not None and last.trial.state == TrialState.FAIL:
            failures += 1
            if max_failures is not None and failures > max_failures:
                log(f"stopping: {failures} trials failed (see their fail_reason in Optuna and MLflow)")
                break
    return ran


# --------------------------------------------------------------------------- the finalize claim


def _study_attrs(study: optuna.Study) -> dict[str, Any]:
    return study._storage.get_study_user_attrs(study._study_id)  # noqa: SLF001 - fresh, never cached


def claim_finalize(study: optuna.Study, lock: StudyLock, key: dict[str, Any]) -> dict[str, Any] | None:
    """Claim the champion's finalization; None if claimed, else the record that says someone else has it.

    ``key`` says what is finalized (champion trial, final fit, registration):
    a ``done`` record with the same key means there is nothing to redo.
    """
    me = current_owner()
    with lock.held():
        rec = _study_attrs(study).get(FINALIZE_ATTR)
        if rec and all(rec.get(k) == v for k, v in key.items()):
            if rec.get("state") == "done":
                return rec
            if rec.get("state") == "claimed" and rec.get("owner") != me and owner_alive(rec.get("owner")) is not False \
                    and time.time() - float(rec.get("at", 0)) < FINALIZE_LEASE_S:
                return rec
        study.set_user_attr(FINALIZE_ATTR, {**key, "state": "claimed", "owner": me, "at": time.time()})
    return None


def finish_claim(study: optuna.Study, key: dict[str, Any], **outcome: Any) -> None:
    study.set_user_attr(FINALIZE_ATTR, {**key, "state": "done", "owner": current_owner(), "at": time.time(), **outcome})


def drop_claim(study: optuna.Study, key: dict[str, Any]) -> None:
    """Give a claim up (the finalization failed): another process, or the next run, may take it."""
    with contextlib.suppress(Exception):
        study.set_user_attr(FINALIZE_ATTR, {**key, "state": "failed", "owner": current_owner(), "at": 0})


@contextlib.contextmanager
def claim_lease(study: optuna.Study, key: dict[str, Any], every: float = 60.0) -> Iterator[None]:
    """Refresh this process's claim every ``every`` seconds while the block runs."""
    stop = threading.Event()

    def refresh():
        while not stop.wait(every):
            with contextlib.suppress(Exception):
                study.set_user_attr(FINALIZE_ATTR, {**key, "state": "claimed", "owner": current_owner(),
                                                    "at": time.time()})

    thread = threading.Thread(target=refresh, name="finalize-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
