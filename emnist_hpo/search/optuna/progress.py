"""The study's progress bar: finished trials, the running trial's rung and epoch, the best so far, the ETA."""

from __future__ import annotations

import math
import sys
import threading
from typing import Callable

import optuna

from emnist_hpo import runtime

runtime.configure()  # before Keras loads

import keras  # noqa: E402

from emnist_hpo.search.optuna.plan import duration  # noqa: E402
from emnist_hpo.search.optuna.promotions import PROMOTE_ATTR  # noqa: E402
from emnist_hpo.search.optuna.storage import FINISHED  # noqa: E402
from emnist_hpo.search.trial import RESUME_ATTR, SEED_ATTR  # noqa: E402
from emnist_hpo.train.fidelity import Ladder  # noqa: E402
from emnist_hpo.train.hooks import TrialHooks, TrialOutcome  # noqa: E402


class Progress(TrialHooks):
    """A tqdm bar over finished trials that also shows the running trial: its rung, epoch, score and ETAs.

    It is a study callback (a finished trial moves the bar) and trial hooks (a Keras callback
    updates it every epoch); a small thread refreshes it every second so the elapsed time ticks.
    """

    def __init__(self, total: int, initial: int, enabled: bool, ladder: Ladder, eta: Callable[[], float] | None = None,
                 total_now: Callable[[], int | None] | None = None):
        self.bar = None
        self.ladder, self.eta = ladder, eta
        self.total_now = total_now  # the bar's end as trials finish (a time budget: what its time left affords)
        self.best: float | None = None
        self._stop = threading.Event()
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=min(initial, total), desc="trials", unit="trial", file=sys.stderr,
                            bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")
            threading.Thread(target=self._tick, name="progress", daemon=True).start()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            if self.bar is not None:
                self.bar.refresh()

    def on_trial_begin(self, trial, config):
        if self.bar is None:
            return []
        who = f"trial {trial.number}"
        seed = (getattr(trial, "user_attrs", {}) or {}).get(SEED_ATTR)
        if seed:
            who += f" ({seed})"
        if RESUME_ATTR in (getattr(trial, "user_attrs", {}) or {}):
            who += f" resuming trial {trial.user_attrs[RESUME_ATTR]}"
        elif PROMOTE_ATTR in (getattr(trial, "user_attrs", {}) or {}):
            who += f" continuing paused trial {trial.user_attrs[PROMOTE_ATTR]}"
        self._set(f"{who}: starting")
        return [EpochProgress(self, who)]

    def on_trial_end(self, trial, outcome: TrialOutcome):
        return None

    def _set(self, text: str) -> None:
        if self.bar is None:
            return
        best = f" | best {self.best:.4f}" if self.best is not None else ""
        eta = self.eta() if self.eta is not None else float("nan")
        tail = f" | study ETA ~{duration(eta)}" if math.isfinite(eta) else ""
        self.bar.set_postfix_str(text + best + tail, refresh=True)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.bar is None or trial.state not in FINISHED:
            return
        if PROMOTE_ATTR not in trial.user_attrs:  # the bar counts configurations, as --trials does
            self.bar.update(1)
        self._retotal()
        try:
            if len(study.directions) == 1:
                self.best = study.best_value
        except ValueError:
            pass
        self._set(f"last: trial {trial.number} {trial.state.name.lower()}")

    def set(self, finished: int) -> None:
        """Show ``finished`` trials (the count other processes reached)."""
        if self.bar is not None and finished != self.bar.n:
            self._retotal()
            self.bar.n = min(finished, self.bar.total)
            self.bar.refresh()

    def _retotal(self) -> None:
        """Move the bar's end to ``total_now()`` (never below what is done)."""
        total = self.total_now() if self.total_now is not None and self.bar is not None else None
        if total is not None:
            self.bar.total = max(total, self.bar.n)

    def close(self) -> None:
        self._stop.set()
        if self.bar is not None:
            self.bar.close()


class EpochProgress(keras.callbacks.Callback):
    def __init__(self, progress: Progress, who: str):
        super().__init__()
        self.progress, self.who = progress, who
        self.epochs_before = [sum(r.epochs for r in progress.ladder.rungs[:i]) for i in range(len(progress.ladder.rungs))]

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        r = int(logs.get("rung", 0))
        rungs = self.progress.ladder.rungs
        r = min(r, len(rungs) - 1)
        k = epoch + 1 - self.epochs_before[r]
        val = logs.get("val_accuracy")
        score = f" val {val:.4f}" if isinstance(val, float) and math.isfinite(val) else ""
        self.progress._set(f"{self.who}: rung {r + 1}/{len(rungs)} epoch {k}/{rungs[r].epochs}{score} "
                           f"({logs.get('epoch_time', 0):.0f} s/epoch)")
