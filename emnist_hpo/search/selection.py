"""Champion selection that does not crown one lucky validation score.

With one small validation split and dozens of trials, the maximum validation
score is mostly luck. The top-k finalists are therefore re-trained with fresh
seeds on other folds of the training pool (train + validation), and the
champion is the best *mean*; each finalist's spread and the optimism of its
original score (original minus re-evaluated mean) are recorded.

Scores closer than their noise do not rank models: within one standard error of
the best, the model with the fewest parameters is crowned (the one-standard-error
rule of Breiman et al., glmnet's ``lambda.1se``), the project's aim being the
best *and smallest* CNN. Only a model no larger than the best on *both* measures
may displace it (:func:`no_larger`): fewer parameters bought with more FLOPs is
not a smaller model, and trading accuracy for it gained nothing (letters: the
rule crowned 5% fewer parameters at 68% more FLOPs, 1.4 pt under compact on test).
Two objectives use their ``tolerance`` the same way.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import optuna
from sklearn.model_selection import StratifiedKFold

from emnist_hpo.config import ExperimentConfig
from emnist_hpo.data.prepared import PreparedData, Rows
from emnist_hpo.model.cost import model_cost
from emnist_hpo.search.noise import no_larger, standard_error
from emnist_hpo.search.optuna.repeats import REPEAT_ATTR
from emnist_hpo.train.fidelity import Ladder
from emnist_hpo.train.trainer import train


@dataclass
class Finalist:
    trial: int  # Optuna trial number
    original: float  # the trial's single validation score
    params: int  # parameter count
    scores: list[float] = field(default_factory=list)  # val accuracy on each re-evaluation fold (trainer.rung_score)
    flops: float = float("inf")  # forward FLOPs per image (unknown: inf)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores) if self.scores else float("nan")

    @property
    def std(self) -> float:
        return statistics.stdev(self.scores) if len(self.scores) > 1 else 0.0

    @property
    def optimism(self) -> float:
        """How much the original score overstated the re-evaluated mean."""
        return self.original - self.mean

    def row(self) -> dict:
        return {"trial": self.trial, "original_val_accuracy": self.original, "reeval_mean": self.mean,
                "reeval_std": self.std, "optimism": self.optimism, "params": self.params,
                "scores": " ".join(f"{s:.4f}" for s in self.scores)}


def folds(data: PreparedData, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_folds`` disjoint validation folds of the train+validation pool, each the study's validation share."""
    x, y = data.train_and_val()
    splits = max(n_folds, round(1 / max(len(data.x_val) / len(x), 1e-6)), 2)
    skf = StratifiedKFold(n_splits=splits, shuffle=True, random_state=seed)
    return list(skf.split(np.zeros(len(y)), y))[:n_folds]


def finalists_of(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """The top-k complete trials: by validation accuracy, or the Pareto front's most accurate for two objectives.

    A repeat (a trial that took an earlier twin's outcome, :mod:`~emnist_hpo.search.optuna.repeats`) is
    never a finalist: its twin stands for it.
    """
    if len(study.directions) > 1:
        pool = study.best_trials
    else:
        pool = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return sorted((t for t in pool if REPEAT_ATTR not in t.user_attrs), key=lambda t: -t.values[0])[:k]


@dataclass
class Candidate:
    """A trial to re-evaluate, in either engine's terms."""

    number: int  # trial number
    original: float  # its single validation score
    params: int  # parameter count
    config: ExperimentConfig  # what it trained


def candidates_of(trials: Sequence[optuna.trial.FrozenTrial], config_of: Callable) -> list[Candidate]:
    return [Candidate(t.number, float(t.values[0]), int(t.user_attrs.get("params") or 0), config_of(t))
            for t in trials]


def reevaluate(
    candidates: Sequence[Candidate],
    data: PreparedData,
    n_folds: int,
    seed: int,
    ladder: Ladder | None = None,
    log: Callable[[str], None] = print,
    check: Callable[[int], str | None] | None = None,
) -> list[Finalist]:
    """Re-train every candidate up the whole ``ladder`` on each fold with a fresh seed; return them with their scores.

    ``check(trial)``, when given, is asked before each candidate: a reason ends the re-evaluation there (the
    time budget's :class:`~emnist_hpo.search.budget.FinalistPacer`), and the candidates done so far are returned.
    """
    x_pool, y_pool = data.train_and_val()
    fold_idx = folds(data, n_folds, seed + 7919)
    out = []
    for rank, c in enumerate(candidates):
        reason = check(c.number) if check is not None else None
        if reason:
            log(f"{reason}: the re-evaluation stops after {rank} of {len(candidates)} finalist(s)")
            break
        f = Finalist(c.number, c.original, c.params, flops=model_cost(c.config.model, data.num_classes).flops)
        for i, (tr, va) in enumerate(fold_idx):
            cfg = copy.deepcopy(c.config)
            cfg.train.seed = seed + 100_003 * (i + 1) + c.number
            r = train(cfg, Rows(x_pool, tr), y_pool[tr], Rows(x_pool, va), y_pool[va], data.num_classes,  # no copies
                      ladder=ladder)
            f.scores.append(r.val_score)
            f.params = r.params
        log(f"finalist {rank + 1}/{len(candidates)}: trial {c.number} original {f.original:.4f} -> "
            f"re-evaluated {f.mean:.4f} +/- {f.std:.4f} over {len(f.scores)} folds")
        out.append(f)
    return out


def choose(finalists: Sequence[Finalist], multi: bool, tolerance: float, images: int = 0) -> Finalist:
    """The finalist with the fewest parameters among those whose re-evaluated mean is within a margin of the
    best and that are no larger than the best in parameters or FLOPs (:func:`no_larger`): one standard error
    of a mean over ``images`` validation images (0: none, i.e. the best mean, fewer parameters on ties); with
    two objectives, ``tolerance`` (their second objective is the size measure: FLOPs are not compared)."""
    best = max(finalists, key=lambda f: (f.mean, -f.params))
    margin = tolerance if multi else standard_error(best.mean, images)
    ok = [f for f in finalists if f.mean >= best.mean - margin
          and (multi or no_larger((f.params, f.flops), (best.params, best.flops)))]
    return min(ok, key=lambda f: (f.params, f.flops, -f.mean))
