"""What a study runs first: the seed experiments, interrupted trials to continue, other studies' best trials.

Everything here is called under the study lock, by one process at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
from optuna.trial import TrialState

from emnist_hpo.config import ExperimentConfig
from emnist_hpo.errors import ConfigError
from emnist_hpo.options import StudyOptions
from emnist_hpo.search.optuna.storage import FINISHED
from emnist_hpo.search.space import SearchSpace
from emnist_hpo.search.trial import RESUME_ATTR, SEED_ATTR, SEED_OF_ATTR, WARM_ATTR, seed_origin

#: A seed experiment whose trial failed this many times (not interrupted) is not enqueued again.
SEED_RETRIES = 2


def _queued(study: optuna.Study, attr: str) -> dict[Any, list[optuna.trial.FrozenTrial]]:
    out: dict[Any, list[optuna.trial.FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False):
        if attr in t.user_attrs:
            out.setdefault(t.user_attrs[attr], []).append(t)
    return out


def enqueue_seeds(study: optuna.Study, space: SearchSpace, seeds: dict[str, ExperimentConfig]) -> list[str]:
    """Enqueue every seed experiment that has no finished, running or waiting trial yet.

    A seed trial that was interrupted, or whose process died, is queued again (it continues from
    its checkpoint, :func:`enqueue_resumes`); one that failed by itself :data:`SEED_RETRIES` times
    is not. Seeds outside the search space are skipped.
    """
    have = _queued(study, SEED_ATTR)
    resumed = _resumed(study)
    done = []
    for name, cfg in seeds.items():
        params = space.params_for(cfg)
        if params is None:
            continue  # the seed lies outside this search space
        trials = have.get(name, [])
        live = [t for t in trials if t.state in (*FINISHED, TrialState.RUNNING, TrialState.WAITING)]
        failed = [t for t in trials if t.state == TrialState.FAIL
                  and not _resumable_reason(t.user_attrs.get("fail_reason"))]
        if live or len(failed) >= SEED_RETRIES:
            continue
        if any(t.state == TrialState.FAIL and _resumable_reason(t.user_attrs.get("fail_reason"))
               and t.number not in resumed for t in trials):
            continue  # enqueue_resumes continues it
        study.enqueue_trial(params, user_attrs={SEED_ATTR: name})
        done.append(name)
    return done


#: Study user attribute listing the interrupted trials a new trial already continues (a finished trial is read-only).
RESUMED_ATTR = "resumed_trials"


def _resumed(study: optuna.Study) -> set[int]:
    attrs = study._storage.get_study_user_attrs(study._study_id)  # noqa: SLF001 - fresh, never cached
    return {int(n) for n in attrs.get(RESUMED_ATTR, [])}


def _resumable_reason(reason: str | None) -> bool:
    return bool(reason) and (reason.startswith("interrupted") or "died" in reason)


def enqueue_resumes(study: optuna.Study, checkpoint_dir: Path) -> list[int]:
    """Queue a continuation of every trial that was interrupted (or whose process died) mid-training.

    The new trial has the same parameters and attributes, and ``resume_of`` naming the old one:
    it takes over the old trial's checkpoint and rung records and trains on from its last epoch.
    A trial stopped before its first epoch ended (no checkpoint) simply runs again.
    """
    out = []
    resumed = _resumed(study)
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if t.number in resumed or not _resumable_reason(t.user_attrs.get("fail_reason")):
            continue
        if t.user_attrs.get("params") is None and not t.params:
            continue  # failed before it was sampled: nothing to continue
        attrs = {k: v for k, v in t.user_attrs.items() if k in (SEED_ATTR, WARM_ATTR)}
        attrs[SEED_OF_ATTR] = seed_origin(t.number, t.user_attrs)
        if (checkpoint_dir / f"running_{t.number}.npz").is_file():
            attrs[RESUME_ATTR] = t.number
        study.enqueue_trial(dict(t.params), user_attrs=attrs)
        out.append(t.number)
    if out:
        study.set_user_attr(RESUMED_ATTR, sorted(resumed | set(out)))
    return out


def warm_start_sources(storage, opts: StudyOptions) -> list[str]:
    """The study names ``--warm-start-from`` means (a study name, or a split for its ``emnist-<split>`` study),
    each checked to exist in ``storage`` and to be another study."""
    if not opts.warm_start_from:
        return []
    names = {s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)}
    out = []
    for source in opts.warm_start_from:
        name = source if source in names else f"emnist-{source}"
        if name == opts.name:
            raise ConfigError(f"--warm-start-from names this study itself ({source!r}); name another study or split")
        if name not in names:
            raise ConfigError(f"--warm-start-from {source!r}: no study {name!r} in this storage (studies: "
                              f"{', '.join(sorted(names)) or 'none'})")
        out.append(name)
    return out


def enqueue_warm_start(study: optuna.Study, space: SearchSpace, storage, sources: Sequence[str], top: int,
                       log: Callable[[str], None]) -> list[str]:
    """Enqueue the best ``top`` complete trials of each other study in ``sources`` (a study name, or a split
    whose ``emnist-<split>`` study is meant) that fit this study's space, once per source."""
    have = {v.split("#")[0] for v in _queued(study, WARM_ATTR)}
    out = []
    for name in sources:
        if name in have:
            continue
        other = optuna.load_study(study_name=name, storage=storage)
        ranked = [t for t in other.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
        ranked.sort(key=lambda t: -t.values[0])
        taken = 0
        for t in ranked:
            params = {k: v for k, v in t.params.items()}
            if not space.accepts(params):
                continue
            study.enqueue_trial(params, user_attrs={WARM_ATTR: f"{name}#{t.number}"})
            out.append(f"{name}#{t.number}")
            taken += 1
            if taken >= top:
                break
        log(f"warm start from study {name!r}: {taken} of its best trials queued first"
            + ("" if taken else " (none fits this search space)"))
    return out
