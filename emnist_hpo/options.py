"""The options of a study (``python -m emnist_hpo study``), validated without Keras, Optuna or MLflow.

Everything a user can get wrong on the command line is checked here, before
any heavy import or any store is touched.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from emnist_hpo.config import LIMITS, MAX_SEED, DataConfig, ExperimentConfig, TrainConfig
from emnist_hpo.data.nist import check_split
from emnist_hpo.errors import ConfigError

#: ``--sampler`` names (Optuna samplers).
SAMPLERS = ("tpe", "random", "qmc", "cmaes", "nsga2")
#: ``--pruner`` names.
PRUNERS = ("successive-halving", "hyperband", "median", "none")
#: ``--fidelity`` names (emnist_hpo.train.fidelity).
FIDELITIES = ("data", "epochs", "none")
#: Who enters the last rung under a time budget (``--last-rung``): see :mod:`emnist_hpo.search.optuna.promotions`.
LAST_RUNG_RULES = ("leaders", "close")
#: Objective names for ``--objectives``: accuracy is maximised, the model's size (params) or cost (forward FLOPs
#: per image) minimised.
OBJECTIVES = {"accuracy": "maximize", "params": "minimize", "flops": "minimize"}
#: ``--workers``: worker processes on one machine. Each holds its own copy of the data and of TensorFlow
#: (~1 GB on full bymerge): more than this is a typo, not a machine. Scale out with more machines instead.
MAX_WORKERS = 64
#: ``--trials``: the study's target of finished trials; also the target under ``--timeout`` without ``--trials``
#: (the budget ends the search: refusals and rung-0 prunes count as finished, and a 30-minute study screens 30-60).
MAX_TRIALS = 100_000
#: ``--trials`` when it is not given and there is no ``--timeout``.
DEFAULT_TRIALS = 20
#: ``--folds``: re-evaluation folds per finalist (each a fold of train+validation of the validation's size).
MAX_FOLDS = 20
#: ``--finalists``: trials re-trained on every fold.
MAX_FINALISTS = 100


@dataclass
class StudyOptions:
    split: str  # EMNIST split
    trials: int = DEFAULT_TRIALS  # configurations (trials complete or pruned) the study should end with; promotions come on top
    epochs: int = 10  # max epochs per trial
    max_train_samples: int | None = None  # stratified training subset for quick runs
    val_fraction: float = 0.2  # validation share carved from train
    data_dir: str | None = None  # NIST files; None: EMNIST_DATA_DIR, the emnist cache, download
    storage: str | None = None  # Optuna storage URL (default sqlite:///mlruns/optuna.db)
    tracking_uri: str | None = None  # MLflow store (default MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)
    study_name: str | None = None  # default emnist-<split> (+ "-pareto" for multi-objective)
    search_space: str = "search_spaces/default.yaml"  # YAML search space
    sampler: str | None = None  # tpe | random | qmc | cmaes | nsga2 (default tpe, nsga2 for two objectives)
    pruner: str = "successive-halving"  # successive-halving | hyperband | median | none (over the fidelity rungs)
    fidelity: str = "data"  # data | epochs | none: what the rungs grow (emnist_hpo.train.fidelity)
    reduction_factor: int = 3  # eta: the best 1/eta of a rung go on; rung shares shrink by eta
    seed: int = 0  # seeds the sampler, the data split and trial training
    timeout: float | None = None  # wall-clock budget of the whole study: search, re-evaluation and final fit
    deadline: float | None = None  # internal: the budget's end as time.time(), handed from a study to its workers
    startup_trials: int | None = None  # internal: TPE's random trials before it models (from the study's plan), for workers
    random_fraction: float = 0.0  # TPE: share of its draws after the random start made at random (keeps exploring)
    # under --timeout, one objective: who enters the last rung. "close": nobody until the search stops, then the best
    # two of the rung below; "leaders": the best of the rung below as it leads (and a closing run where one led alone)
    last_rung: str = "close"
    objectives: tuple[str, ...] = ("accuracy",)  # accuracy, or accuracy,params / accuracy,flops (a Pareto front)
    warm_start: bool = True  # enqueue the seed experiments as the first trials
    seed_experiments: tuple[str, ...] = ("two_conv", "one_conv", "compact")  # experiments/<name>.yaml to enqueue
    # early stopping on val_accuracy at the last rung and in re-evaluations, in epochs (0 = off). Off by default: the
    # final fit trains every epoch, so a run stopped early is scored on a model the final fit never trains (byclass:
    # a plateau-schedule trial stopped at epoch 8 of 15 at 83.77%; its whole schedule reached 84.68%)
    early_stopping_patience: int = 0
    # every trial's, re-evaluation's and final fit's weights averaged over about this many epochs (train.average_epochs):
    # what is validated and delivered is the averaged model; 0 = off. A letters model at a constant learning rate
    # swung 92.1-94.0% on validation between epochs and ended on a 92.98%-test model; averaged, 94.57% and 93.51%
    average_epochs: float = 0.5
    final_fit: bool = True  # retrain the champion on train+validation before the test evaluation
    register: bool = True  # register the champion in the MLflow model registry
    tolerance: float = 0.005  # multi-objective: smallest model within this accuracy of the front's best
    prefer_smaller: bool = True  # single objective: the fewest parameters within one standard error of the best
    finalists: int = 3  # top-k trials re-trained on other folds before crowning (0 = trust the single score)
    folds: int = 1  # re-evaluation folds per finalist (fresh seed each): each costs one full-fidelity training
    max_params: int | None = None  # prune (before training) any sampled model with more parameters
    max_flops: int | None = None  # prune (before training) any sampled model needing more forward FLOPs per image
    warm_start_from: tuple[str, ...] = ()  # other studies (or splits) whose best trials are queued first
    warm_start_top: int = 5  # how many of each such study's best trials
    trial_plots: bool = True  # PNG confusion matrix and curves for every finished trial (False: the champion's only)
    progress: bool = True  # progress bar over trials
    checkpoint_dir: str = "mlruns/checkpoints"  # running trials' checkpoints, best-so-far trial models: <study>-<id>/ in it
    worker: int = 0  # worker index among processes sharing the study (offsets the sampler seed)
    workers: int = 1  # trials run at once on this machine, each in its own worker subprocess when > 1

    @property
    def by_budget(self) -> bool:
        """Whether the time budget alone ends the search (``--timeout`` without ``--trials``)."""
        return self.timeout is not None and self.trials >= MAX_TRIALS

    def finished(self, done: int) -> str:
        """``5 of 20 trials finished``, or under a budget alone ``5 trials finished; the time budget decides how
        many more``."""
        if self.by_budget:
            return f"{done} trials finished; the time budget decides how many more"
        return f"{done} of {self.trials} trials finished"

    def validate(self) -> "StudyOptions":
        check_split(self.split)
        _int_in("--trials", "trials", self.trials, 1, MAX_TRIALS)
        _int_in("--epochs", "epochs", self.epochs, 1, LIMITS["epochs"])
        _int_in("--finalists", "finalists", self.finalists, 0, MAX_FINALISTS)
        _int_in("--folds", "folds", self.folds, 1, MAX_FOLDS)
        if self.max_params is not None and self.max_params < 1:
            raise ConfigError(f"--max-params must be >= 1 (max_params={self.max_params})")
        if self.max_flops is not None and self.max_flops < 1:
            raise ConfigError(f"--max-flops must be >= 1 (max_flops={self.max_flops})")
        if self.fidelity not in FIDELITIES:
            raise ConfigError(f"--fidelity must be one of {', '.join(FIDELITIES)} (fidelity={self.fidelity!r})")
        if not 2 <= self.reduction_factor <= 10:
            raise ConfigError(f"--reduction-factor must be in 2..10 (reduction_factor={self.reduction_factor})")
        if self.warm_start_top < 1:
            raise ConfigError(f"--warm-start-top must be >= 1 (warm_start_top={self.warm_start_top})")
        for source in self.warm_start_from:
            check_name(source, "--warm-start-from")
        if self.max_train_samples is not None and self.max_train_samples < 10:
            raise ConfigError(f"--max-train-samples must be >= 10 (max_train_samples={self.max_train_samples})")
        if not 0 < self.val_fraction < 1:  # False for NaN too
            raise ConfigError(f"--val-fraction must be in (0, 1) (val_fraction={self.val_fraction})")
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or not self.objectives or len(set(self.objectives)) != len(self.objectives) or \
                self.objectives[0] != "accuracy" or len(self.objectives) > 2:
            raise ConfigError(
                f"--objectives must be 'accuracy', 'accuracy,params' or 'accuracy,flops' "
                f"(objectives={','.join(self.objectives)!r})"
            )
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler must be one of {', '.join(SAMPLERS)} (sampler={self.sampler!r})")
        if self.last_rung not in LAST_RUNG_RULES:
            raise ConfigError(f"--last-rung must be one of {', '.join(LAST_RUNG_RULES)} (last_rung={self.last_rung!r})")
        if not 0 <= self.random_fraction < 1:  # False for NaN too
            raise ConfigError(f"--random-fraction must be in [0, 1) (random_fraction={self.random_fraction})")
        if self.random_fraction and self.sampler_used != "tpe":
            raise ConfigError(f"--random-fraction is TPE's (sampler={self.sampler_used!r}): other samplers do not model "
                              "the results, or draw their own exploration")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)} (pruner={self.pruner!r})")
        if len(self.objectives) > 1 and self.pruner in ("hyperband", "median"):
            raise ConfigError(f"--pruner {self.pruner} takes one objective (Optuna's pruners are single-objective); "
                              f"use successive-halving or none with --objectives {','.join(self.objectives)}")
        if self.worker < 0:
            raise ConfigError(f"worker must be >= 0 (worker={self.worker})")
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1 (workers={self.workers})")
        if self.workers > MAX_WORKERS:
            raise ConfigError(
                f"--workers must be <= {MAX_WORKERS} worker processes on one machine (workers={self.workers}); "
                "to go wider, run the same study command on more machines sharing --storage and --tracking-uri"
            )
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0 (seed={self.seed})")
        if self.seed > MAX_SEED:
            raise ConfigError(
                f"--seed must be <= {MAX_SEED} = 2**31-1, so that every seed derived from it stays below 2**32 "
                f"(seed={self.seed})"
            )
        if self.early_stopping_patience < 0:
            raise ConfigError(
                f"--early-stopping must be >= 0 epochs, 0 = off (early_stopping={self.early_stopping_patience})"
            )
        _int_in("--early-stopping", "early_stopping", self.early_stopping_patience, 0,
                LIMITS["early_stopping_patience"])
        if not (0 <= self.average_epochs <= LIMITS["epochs"]):  # False for NaN
            raise ConfigError(f"--average-epochs must be in [0, {LIMITS['epochs']}] epochs, 0 = off "
                              f"(average_epochs={self.average_epochs})")
        if self.timeout is not None and not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ConfigError(f"--timeout must be > 0 seconds and finite (timeout={self.timeout})")
        if not (0 <= self.tolerance < 1):
            raise ConfigError(f"tolerance must be in [0, 1) (tolerance={self.tolerance})")
        if self.study_name is not None:
            check_name(self.study_name, "--study-name")
        return self

    def base_config(self) -> ExperimentConfig:
        """The experiment every trial of the study starts from (what the space samples then overrides)."""
        return ExperimentConfig(
            name=self.name,
            train=TrainConfig(epochs=self.epochs, seed=self.seed, early_stopping_patience=self.early_stopping_patience,
                              average_epochs=self.average_epochs),
            data=DataConfig(val_fraction=self.val_fraction, max_train_samples=self.max_train_samples, seed=self.seed),
        )

    @property
    def sampler_used(self) -> str:
        """``--sampler``, or its default: tpe; nsga2 for two objectives."""
        return self.sampler or ("nsga2" if len(self.objectives) > 1 else "tpe")

    @property
    def name(self) -> str:
        if self.study_name:
            return self.study_name
        if len(self.objectives) < 2:
            return f"emnist-{self.split}"
        return f"emnist-{self.split}-pareto" + ("" if self.objectives[1] == "params" else f"-{self.objectives[1]}")


def _int_in(option: str, field: str, value: int, low: int, high: int) -> None:
    if value < low:
        raise ConfigError(f"{option} must be >= {low} ({field}={value})")
    if value > high:
        raise ConfigError(f"{option} must be <= {high} ({field}={value})")


def check_name(name: str, option: str) -> str:
    """Names users give become run names and file names: letters, digits, '-', '_', '.' only."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name) or ".." in name:
        raise ConfigError(
            f"{option} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit ({option}={name!r})"
        )
    return name
