"""The study's pruners: Optuna's own, plus a guard that ends trials still at no-skill accuracy after 2 epochs."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from emnist_hpo.pruners import PRUNERS, GuardedHyperband, make_pruner, no_skill_accuracy

NO_SKILL = 1 / 47  # the balanced split: 47 classes of equal size


def _run(pruner, curves: list[list[float]]) -> list[tuple[str, int]]:
    """Run one trial per curve (validation accuracy per epoch); return each trial's state and epochs reported."""
    study = optuna.create_study(direction="maximize", pruner=pruner, sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        trial.suggest_float("x", 0, 1)
        for epoch, value in enumerate(curves[trial.number], start=1):
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return curves[trial.number][-1]

    study.optimize(objective, n_trials=len(curves))
    return [(t.state.name, len(t.intermediate_values)) for t in study.trials]


def test_no_skill_accuracy_is_the_most_frequent_class_share():
    assert no_skill_accuracy(np.array([0, 1, 2, 3])) == 0.25
    assert no_skill_accuracy(np.array([5, 5, 5, 1], dtype=np.uint8)) == 0.75
    assert no_skill_accuracy(np.array([], dtype=np.int64)) == 0.0


def test_the_first_trial_at_chance_is_pruned_after_two_epochs():
    # Hyperband alone keeps the first trial of a bracket (nothing to compare with): 10 epochs at chance
    at_chance = [NO_SKILL] * 10
    assert _run(make_pruner("hyperband", 10), [at_chance]) == [("COMPLETE", 10)]
    assert _run(make_pruner("hyperband", 10, NO_SKILL), [at_chance]) == [("PRUNED", 2)]


@pytest.mark.parametrize("name", ["hyperband", "median", "successive-halving"])
def test_a_slow_learner_is_left_to_the_pruner_proper(name):
    # the 10-epoch balanced study's best trial started like this: above 2x chance, far below the others
    slow = [0.13, 0.099, 0.10, 0.14, 0.13, 0.171, 0.354, 0.514, 0.663, 0.754]
    assert _run(make_pruner(name, 10, NO_SKILL), [slow]) == [("COMPLETE", 10)]
    assert _run(make_pruner(name, 10, NO_SKILL), [[0.03, 0.04] + [0.5] * 8]) == [("PRUNED", 2)]


def test_none_prunes_nothing_not_even_at_chance():
    assert _run(make_pruner("none", 10, NO_SKILL), [[NO_SKILL] * 10]) == [("COMPLETE", 10)]


def test_guarded_hyperband_keeps_optunas_brackets():
    # TPE learns from a Hyperband trial's own bracket only: Optuna recognises the pruner by its class
    pruner = make_pruner("hyperband", 10, NO_SKILL)
    assert isinstance(pruner, GuardedHyperband) and isinstance(pruner, optuna.pruners.HyperbandPruner)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    bracket_study = optuna.pruners._filter_study(study, study.trials[0])  # noqa: SLF001
    assert type(bracket_study).__name__ == "_BracketStudy"


def test_unknown_pruner_names_the_allowed_ones():
    assert PRUNERS == ("hyperband", "median", "successive-halving", "none")
    with pytest.raises(ValueError, match=r"pruner must be one of hyperband, median, successive-halving, none "
                                         r"\(pruner='asha'\)"):
        make_pruner("asha", 10)
