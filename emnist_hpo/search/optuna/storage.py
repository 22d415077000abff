"""The study's Optuna storage and samplers: an RDB storage that fails within seconds, one sampler per name."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from emnist_hpo.coordination import check_sqlite_location, sqlite_file, sqlite_wal, store_lock
from emnist_hpo.errors import StorageError
from emnist_hpo.search.optuna.promotions import PROMOTE_ATTR
from emnist_hpo.search.optuna.repeats import KEY_ATTR, REPEAT_ATTR
from emnist_hpo.search.trial import REFUSED_ATTR
from emnist_hpo.tracking.tracker import redact

#: Trial states that count towards ``--trials``.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
#: Optuna heartbeat of running trials: written every HEARTBEAT_S, stale (FAIL) after GRACE_S without one.
#: Dead processes on this host are noticed at once through the trial's owner (see slots.py).
HEARTBEAT_S, GRACE_S = 30, 120
#: TPE's random trials before it models the results, when no plan says otherwise (see ``plan.sampler_startup``).
DEFAULT_STARTUP = 8


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna RDB storage on ``url``, failing within seconds with a clear message.

    An SQLite file is shared by several processes: its connections wait up to
    60 s for a lock, it is switched to write-ahead logging, and one process at a
    time creates its schema.
    """
    check_sqlite_location(url, "Optuna storage", "--storage")
    engine_kwargs: dict[str, Any] = {}
    if url.startswith(("postgresql", "mysql")):
        engine_kwargs["connect_args"] = {"connect_timeout": 5}
    elif url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}
    db = sqlite_file(url)
    try:
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        with store_lock(url, "init"):
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                                                 grace_period=GRACE_S)
            if db is not None:
                sqlite_wal(db)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001
        text = " ".join(str(exc).split())[:300]
        raise StorageError(
            f"Optuna storage {redact(url)!r} cannot be used: {text} (give --storage sqlite:///PATH.db or a database "
            "URL such as postgresql://USER@HOST/DB)"
        ) from None
    return storage


def checkpoint_folder(root: str | Path, study: optuna.Study, storage_url: str) -> Path:
    """Where this study keeps its running trials' checkpoints and its best trials' models:
    ``<root>/<study name>-<8 hex digits>``, the digits a hash of the storage and the study's id in it.

    Trial numbers restart in every study, so a folder named after the study alone was shared by every study of
    that name: one in another ``--storage``, a benchmark's earlier run, a study deleted and made again. Its
    trial 1 then continued the other study's trial 1 from its checkpoint (a balanced study's first rung took
    1 s instead of 38), and a champion's own model could be another study's ``trial_<n>.keras``.
    """
    db = sqlite_file(storage_url)
    where = f"sqlite:{db.resolve()}" if db is not None else redact(storage_url)
    digest = hashlib.sha256(f"{where}\n{study._study_id}".encode()).hexdigest()[:8]
    return Path(root) / f"{study.study_name}-{digest}"


def make_sampler(name: str, seed: int, multi: bool, startup: int = DEFAULT_STARTUP,
                 random_fraction: float = 0.0) -> optuna.samplers.BaseSampler:
    """The sampler called ``name``; ``startup``: TPE's trials drawn (quasi-)randomly before it models the results;
    ``random_fraction``: the share of TPE's later draws made at random (:class:`TrainedStartTPE`)."""
    if name == "tpe":
        return TrainedStartTPE(seed=seed, multivariate=True, group=True, n_startup_trials=startup,
                               constant_liar=True, random_fraction=random_fraction)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.NSGAIISampler(seed=seed)


class TrainedStartTPE(optuna.samplers.TPESampler):
    """TPE whose random start counts configurations that trained (what the plan's "first N" says).

    A draw refused for its size before training (``--max-params``, ``--max-flops``; microseconds) stays in
    TPE's model, among the bad trials, so TPE learns where the limit is; but it is not one of the start's
    configurations: with a tight limit, refusals would otherwise use up the random start (16 of a
    30-minute letters study's 36 draws were refused) and leave TPE guiding from one or two trained models.

    ``random_fraction`` (BOHB's, Falkner et al. 2018: a third there) keeps exploring after the start: of the
    configurations after it, every ``1/random_fraction``-th is drawn at random.

    "At random" is quasi-random: a scrambled Sobol sequence (Optuna's QMC sampler), so that the start tries each
    choice of a parameter about as often as the others. Eight independent draws gave one batch-normed
    configuration in eight in a balanced study (at most one: a 9-in-256 chance), and the rest of that study
    trained none: TPE guides from the kinds its start scored.

    TPE models one observation per configuration (:func:`one_per_configuration`): a paused trial, its
    continuations and its repeats are one configuration, not two to four observations.

    TPE's good set is its best ~10%,
    two or three trials in a 30-minute study, and its draws settle on their categorical choices: a balanced study
    trained 52 configurations after its second batch-normed one, none batch-normed; one with compact seeded first
    trained 25 after compact's full run, 24 of compact's kind (batch-norm, two convs a block, Adam).
    """

    def __init__(self, *, seed: int | None = None, n_startup_trials: int = DEFAULT_STARTUP,
                 random_fraction: float = 0.0, **kwargs: Any) -> None:
        if not 0 <= random_fraction < 1:  # False for NaN too
            raise ValueError(f"random_fraction must be in [0, 1) (random_fraction={random_fraction})")
        super().__init__(seed=seed, n_startup_trials=n_startup_trials, **kwargs)
        self.startup = n_startup_trials
        self.random_fraction = random_fraction
        self.random = optuna.samplers.RandomSampler(seed=seed)
        # the start's draws: a scrambled Sobol sequence over the first configuration's parameters (the rest, and
        # the first configuration itself, at random)
        self.sobol = optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed, independent_sampler=self.random,
                                                warn_asynchronous_seeding=False, warn_independent_sampling=False)
        self._at_random: dict[int, bool] = {}  # trial id -> drawn at random (decided once, at its relative draw)

    def reseed_rng(self) -> None:
        super().reseed_rng()
        self.random.reseed_rng()

    def trained(self, study: optuna.Study) -> int:
        """Configurations that trained: a refused draw never did; a paused trial's continuation is not another,
        nor a repeat (it took its twin's outcome)."""
        return sum(not (REFUSED_ATTR in t.user_attrs or PROMOTE_ATTR in t.user_attrs or REPEAT_ATTR in t.user_attrs)
                   for t in study.get_trials(deepcopy=False, states=FINISHED))

    def at_random(self, trained: int) -> bool:
        """Whether the configuration after ``trained`` trained ones is drawn at random: the start's, then every
        ``1/random_fraction``-th (evenly spaced, so that a study's explorations do not bunch up)."""
        if trained < self.startup:
            return True
        k = trained - self.startup
        return math.floor((k + 1) * self.random_fraction + 1e-9) > math.floor(k * self.random_fraction + 1e-9)

    def drawn_at_random(self, study: optuna.Study, trial) -> bool:
        """Whether ``trial`` is drawn (quasi-)randomly, not guided by TPE: read from the storage once per trial,
        not once per parameter."""
        if trial._trial_id not in self._at_random:
            self._at_random = {trial._trial_id: self.at_random(self.trained(study))}  # the trial before is done
        return self._at_random[trial._trial_id]

    def sample_relative(self, study, trial, search_space):
        if self.drawn_at_random(study, trial):
            drawn = self.sobol.sample_relative(study, trial, self.sobol.infer_relative_search_space(study, trial))
            return {name: value for name, value in drawn.items() if name in search_space}
        return super().sample_relative(OnePerConfiguration(study), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        if self.drawn_at_random(study, trial):
            return self.random.sample_independent(study, trial, param_name, param_distribution)
        return super().sample_independent(OnePerConfiguration(study), trial, param_name, param_distribution)


def _progress(t: optuna.trial.FrozenTrial, sign: float) -> tuple:
    """How far a trial of a configuration got, in TPE's order: finished before running, complete before pruned
    (then its value), a pruned one by its last reported rung (then its score there), on a tie the earlier (the
    trial that trained it, not its repeat); ``sign`` -1 minimizes."""
    if t.state == TrialState.COMPLETE:
        value = t.value if t.values is not None and len(t.values) == 1 else 0.0
        return 2, 0, sign * value, -t.number
    if t.state == TrialState.PRUNED and t.intermediate_values:
        step, value = max(t.intermediate_values.items())
        return 1, step, -math.inf if math.isnan(value) else sign * value, -t.number
    return int(t.state == TrialState.PRUNED), -1, -math.inf, -t.number


def one_per_configuration(trials: list[optuna.trial.FrozenTrial], sign: float = 1.0) -> list[optuna.trial.FrozenTrial]:
    """Each configuration once (trials of the same ``config_key``): the trial that got furthest with it.

    A configuration promoted twice is three trials (paused at rung 0, its continuation paused at rung 1, the
    continuation that completed), and a repeat is one more; TPE counted each. Read back from two 30-minute
    balanced studies: a leader's paused copies sat among TPE's bad trials at 41 of 50 guided draws, and with
    compact seeded, copies of it and its continuations were a quarter of the good set (30 of 37 draws held
    one). A trial with no key (a space with nothing free, whose trials repeat on purpose) stands for itself.
    Order: by trial number.
    """
    groups: dict[Any, list[optuna.trial.FrozenTrial]] = {}
    for t in trials:  # a trial with no key is a group of its own
        groups.setdefault(t.user_attrs.get(KEY_ATTR, ("trial", t.number)), []).append(t)
    return sorted((max(g, key=lambda t: _progress(t, sign)) for g in groups.values()), key=lambda t: t.number)


class OnePerConfiguration:
    """A study as TPE sees it: its trials through :func:`one_per_configuration` (``_get_trials``, what TPE reads
    them with), the rest the study's own."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study
        single = len(study.directions) == 1
        self._sign = -1.0 if single and study.direction == optuna.study.StudyDirection.MINIMIZE else 1.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False):
        return one_per_configuration(self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache),
                                     self._sign)


def finished_count(study: optuna.Study) -> int:
    """Finished configurations: what ``--trials`` counts (a paused trial's continuation is not another one)."""
    return sum(PROMOTE_ATTR not in t.user_attrs for t in study.get_trials(deepcopy=False, states=FINISHED))
