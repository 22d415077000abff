"""Multi-fidelity training: a ladder of rungs over data and epochs, and the rule that promotes between them.

Most configurations a search samples are poor, and a poor one is recognised long
before it has trained on the whole training set for every epoch. A trial
therefore climbs a :class:`Ladder`: each rung trains on a larger, nested,
stratified share of the training set (continuing from the previous rung's
weights), and at the end of every rung but the last the trial's validation
accuracy is compared with the other trials' at the same rung. Only the best
``1/eta`` go on (asynchronous successive halving, Li et al. 2020: a trial is
promoted when it is in the top ``1/eta`` of the trials that reached that rung so
far, which needs no waiting for peers). The resource of rung ``r`` is reported
to the pruner as step ``eta**r``, so Optuna's own Hyperband and
successive-halving pruners see the same rungs.

Fidelities (``--fidelity``):

- ``data`` (default): Hyperband's geometric budgets in images seen. The last rung
  trains ``--epochs`` epochs on all ``N`` training images; screening rung ``r`` of
  ``R`` gets ``N * epochs / eta**(R-1-r)`` images, spent as two passes over a nested
  share of the training set (at least ``MIN_RUNG_IMAGES`` images and
  ``MIN_PER_CLASS`` per class; more passes where that floor is larger than half the
  budget). ``R`` is the most rungs (up to ``max_rungs``) whose smallest budget still
  holds ``MIN_RUNG_SEEN`` images: below that (~60 steps of 128) most models have
  not left chance level and the score ranks nothing (benchmarks/bench_fidelity.py).
- ``epochs``: every rung trains on all the data; rungs end after ``1, eta,
  eta**2 ...`` epochs (Hyperband over epochs, the project's behaviour before).
- ``none``: one rung, all the data, ``--epochs`` epochs.

Validation at a screening rung uses a nested stratified share of the validation
set too (``val_fraction_at``): the rung's score is compared only with other
trials' scores at the same rung, on the same images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

#: ``--fidelity`` names.
from emnist_hpo.options import FIDELITIES  # noqa: E402  (the names, validated with the options)
#: The smallest training share a screening rung may use, in images and in images per class.
MIN_RUNG_IMAGES = 2048
MIN_PER_CLASS = 40
#: The fewest training images a screening rung may see in all (epochs x share).
MIN_RUNG_SEEN = 8192
#: The smallest validation share a screening rung scores on (accuracy within ~1.5 points).
MIN_RUNG_VAL = 1000


@dataclass(frozen=True)
class Rung:
    fraction: float  # share of the training set (nested: each rung's images hold the previous rung's)
    epochs: int  # epochs trained at this rung, continuing from the previous rung's weights
    step: int  # the resource reported to the pruner at the rung's end (eta ** index)
    final: bool = False  # the last rung: per-epoch validation on the whole validation set (early stopping, if on)


@dataclass(frozen=True)
class Ladder:
    rungs: tuple[Rung, ...]
    eta: int  # promotion ratio: the best 1/eta of a rung go on
    mode: str  # data | epochs | none

    @property
    def final(self) -> Rung:
        return self.rungs[-1]

    @property
    def screening(self) -> tuple[Rung, ...]:
        return self.rungs[:-1]

    def sizes(self, n: int) -> list[int]:
        """Training images at each rung for a training set of ``n``."""
        return [n if r.final or r.fraction >= 1 else max(1, min(n, math.ceil(r.fraction * n))) for r in self.rungs]

    def val_sizes(self, n_val: int) -> list[int]:
        """Validation images each rung is scored on."""
        out = []
        for i, r in enumerate(self.rungs):
            if r.final or r.fraction >= 1:
                out.append(n_val)
            else:
                out.append(min(n_val, max(MIN_RUNG_VAL, math.ceil(r.fraction * self.eta * n_val))))
        return out

    def scored(self, n: int, n_val: int) -> list[int]:
        """Validation images scored over each rung's whole run (:meth:`scored_at`)."""
        return [self.scored_at(i, n, n_val) for i in range(len(self.rungs))]

    def scored_at(self, index: int, n: int, n_val: int, images: int | None = None) -> int:
        """Validation images rung ``index`` scores while it trains on ``images`` training images (its whole run by
        default): a screening rung validates once, at its end; the last rung every epoch, for its early stopping
        and its best epoch. Counted once at the last rung, a letters closing run of 15 epochs was priced ~8% short
        of its validation work alone."""
        rung, size, vs = self.rungs[index], self.sizes(n)[index], self.val_sizes(n_val)[index]
        if not rung.final:
            return vs
        return vs * (rung.epochs if images is None else max(1, round(images / max(size, 1))))

    def images(self, n: int) -> list[int]:
        """Training images seen at each rung (epochs x share)."""
        return [size * r.epochs for size, r in zip(self.sizes(n), self.rungs)]

    def rung_steps(self, n: int, batch_size: int) -> list[int]:
        """Optimizer steps of each rung (its images in batches, times its epochs)."""
        return [math.ceil(size / batch_size) * r.epochs for size, r in zip(self.sizes(n), self.rungs)]

    def total_steps(self, n: int, batch_size: int) -> int:
        """Optimizer steps over the whole ladder (the learning-rate schedule's horizon)."""
        return sum(self.rung_steps(n, batch_size))

    def reach(self, promoted: float | None = None) -> list[float]:
        """Expected share of the trials that reach each rung (1, 1/eta, 1/eta**2 ...)."""
        p = 1.0 / self.eta if promoted is None else promoted
        return [p**i for i in range(len(self.rungs))]

    def describe(self, n: int, n_val: int, patience: int = 0) -> str:
        """One line per rung: share, images, epochs, validation images (``patience``: the last rung's early stopping,
        0 = off)."""
        parts = []
        for i, (r, size, vs) in enumerate(zip(self.rungs, self.sizes(n), self.val_sizes(n_val))):
            share = "all" if size >= n else (f"1/{round(1 / r.fraction)}" if abs(1 / r.fraction - round(1 / r.fraction))
                                             < 0.05 else f"{r.fraction:.0%}")
            parts.append(f"rung {i}: {share} of the training set ({size:,} images) x {r.epochs} epoch"
                         f"{'s' if r.epochs != 1 else ''}, scored on {vs:,} validation images"
                         + ((" each epoch" + (f", early stopping after {patience} epochs without gain"
                                              if patience else "")) if r.final else ""))
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "eta": self.eta,
                "rungs": [{"fraction": r.fraction, "epochs": r.epochs, "step": r.step} for r in self.rungs]}


def single(epochs: int) -> Ladder:
    """One rung: all the data for ``epochs`` epochs (plain training)."""
    return Ladder((Rung(1.0, max(1, int(epochs)), 1, final=True),), 3, "none")


def make_ladder(mode: str, epochs: int, n_train: int, num_classes: int, *, eta: int = 3, max_rungs: int = 5,
                screen_epochs: int = 2) -> Ladder:
    """The ladder of ``mode`` (one of :data:`FIDELITIES`) for ``epochs`` epochs at full fidelity."""
    if mode not in FIDELITIES:
        raise ValueError(f"fidelity must be one of {', '.join(FIDELITIES)} (fidelity={mode!r})")
    epochs = max(1, int(epochs))
    if mode == "none" or max_rungs < 2:
        return replace(single(epochs), eta=eta, mode=mode)
    if mode == "epochs":
        ends = []  # cumulative epochs at the end of each screening rung: 1, eta, eta**2 ... below epochs
        while len(ends) < max_rungs - 1 and eta ** len(ends) < epochs:
            ends.append(eta ** len(ends))
        rungs, done = [], 0
        for i, end in enumerate(ends):
            rungs.append(Rung(1.0, end - done, eta**i))
            done = end
        rungs.append(Rung(1.0, epochs - done, eta ** len(ends), final=True))
        return Ladder(tuple(rungs), eta, mode)
    total = n_train * epochs  # images the last rung sees
    count = 1
    while count < max_rungs and total / eta**count >= MIN_RUNG_SEEN:
        count += 1
    floor = min(n_train, max(MIN_RUNG_IMAGES, MIN_PER_CLASS * num_classes))
    rungs = []
    for i in range(count - 1):
        budget = total / eta ** (count - 1 - i)
        share = min(n_train, max(floor, math.ceil(budget / screen_epochs)))
        passes = max(1, round(budget / share))
        rungs.append(Rung(share / n_train, passes, eta**i))
    rungs.append(Rung(1.0, epochs, eta ** (count - 1), final=True))
    return Ladder(tuple(rungs), eta, mode)


def nested_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A permutation of ``range(len(labels))`` whose every prefix is stratified by class.

    Each class is shuffled, and its k-th image is placed at position ``(k + u) / n_class``
    (``u`` a random offset per class): classes interleave in proportion, so the first
    ``m`` indices hold about ``m * n_class / n`` images of each class, for every ``m``.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keys = np.empty(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        keys[idx] = (np.arange(len(idx)) + rng.random()) / len(idx)
    return np.argsort(keys, kind="stable")


def promotable(value: float, peers: Sequence[float], eta: int) -> bool:
    """Asynchronous successive halving: ``value`` is in the top ``1/eta`` of ``peers`` (which include it).

    With fewer than ``eta`` peers only the best so far goes on (the rule of Optuna's
    SuccessiveHalvingPruner): early trials are not all promoted by default. A study that keeps
    checkpoints pauses such a trial instead (:mod:`emnist_hpo.search.optuna.promotions`); this rule is
    for trials that cannot wait (no checkpoint directory).
    """
    ranked = sorted(peers, reverse=True)
    k = max(1, len(ranked) // eta)
    return value >= ranked[k - 1]
