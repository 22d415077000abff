"""The champion, whichever engine found it: final fit, one test evaluation, analysis, registration.

Both search engines end the same way: :func:`finalize_champion` retrains the
crowned configuration on train+validation up the same fidelity ladder (every
epoch of it; a ``plateau`` schedule replays its trial's learning rates), or
takes the trial's own model, evaluates it once on the test set, logs the
champion run (reports, analysis gallery, activation maps) and registers it,
moving the ``champion`` alias only to a better model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

from emnist_hpo.config import ExperimentConfig
from emnist_hpo.data.prepared import PreparedData
from emnist_hpo.model.cost import model_cost
from emnist_hpo.train.fidelity import Ladder
from emnist_hpo.tracking.registry import Registered, log_and_register
from emnist_hpo.reporting.evaluation import Evaluation, evaluate
from emnist_hpo.tracking.tracker import TAG_ENGINE, TAG_KIND, TAG_SPLIT, TAG_STUDY, Tracker
from emnist_hpo.train.schedules import ReplayLearningRate
from emnist_hpo.train.trainer import TrainResult, predict_proba, release_memory, train


@dataclass
class Champion:
    number: int  # the trial's number in its engine
    config: ExperimentConfig  # what the trial trained
    val_accuracy: float  # its validation score (the re-evaluated mean when finalists were re-evaluated: see caller)
    engine: str  # optuna | keras-tuner
    run_tags: dict[str, Any] = field(default_factory=dict)  # extra tags of the champion run
    trial_run_id: str | None = None  # the trial's MLflow run
    own_model: Callable[[], Any] | None = None  # the trial's own trained model, or None (used without a final fit)
    rates: dict[int, float] = field(default_factory=dict)  # learning rate by global epoch at its trial's last rung
    # (a plateau schedule's reductions, replayed by the final fit; {}: held constant)


@dataclass
class FinalResult:
    run_id: str  # the champion run
    test_accuracy: float
    params: int
    evaluation: Evaluation
    registered: Registered | None
    final_fit: bool  # retrained on train+validation (False: the trial's own model)


def final_model(champion: Champion, data: PreparedData, ladder: Ladder, final_fit: bool,
                log: Callable[[str], None] = print) -> tuple[Any, ExperimentConfig, TrainResult | None]:
    """The champion's model: retrained on train+validation (``final_fit``) or the trial's own model.

    Without a final fit the trial's model is used when the engine kept it, else the trial is
    trained again exactly as it was (same seed, same ladder).
    """
    cfg = copy.deepcopy(champion.config)
    if final_fit:
        replay = []
        if cfg.train.schedule == "plateau":  # no validation set to watch in a final fit: the trial's reductions are
            cfg.train.schedule = "constant"  # replayed, epoch by epoch (without them, held constant)
            replay = [ReplayLearningRate(champion.rates)] if champion.rates else []
        # the whole last rung, not the epoch the trial's validation peaked at: with early stopping that peak is
        # noisy and early (balanced sample: epoch 4 of 15), and a schedule squeezed into 4 epochs is another run
        # (the search's champion tested 84.8% fitted to its peak, 86.8% fitted for the full 15 epochs)
        x, y = data.train_and_val()
        result = train(cfg, x, y, None, None, data.num_classes, callbacks=replay, ladder=ladder)
        return result.model, cfg, result
    model = champion.own_model() if champion.own_model is not None else None
    if model is not None:
        return model, cfg, None
    if champion.own_model is None:
        log(f"the trial's own model is not kept; training trial {champion.number} again")
    result = train(cfg, data.x_train, data.y_train, data.x_val, data.y_val, data.num_classes, ladder=ladder)
    return result.model, cfg, result


def finalize_champion(
    champion: Champion,
    data: PreparedData,
    ladder: Ladder,
    *,
    tracker: Tracker,
    parent: str,
    split: str,
    study_name: str,
    final_fit: bool,
    register: bool,
    trial_plots: bool = True,
    log: Callable[[str], None] = print,
) -> FinalResult:
    """Fit (or take) the champion's model, test it once, log the champion run under ``parent``, register it."""
    log(f"champion: trial {champion.number} (val_accuracy {champion.val_accuracy:.4f}); "
        + ("final fit on train+validation..." if final_fit else "evaluating on test..."))
    model, cfg, fit = final_model(champion, data, ladder, final_fit, log)
    data_fingerprint, test_fingerprint = data.fingerprint(), data.test_fingerprint()
    data.release_training_images()  # only the test set from here on (full bymerge: 0.55 GB less at the peak)
    release_memory()
    proba = predict_proba(model, data.x_test)
    ev = evaluate(data.y_test, proba, data.classes)
    params = int(model.count_params())
    run = tracker.start_run(
        f"champion-trial-{champion.number}",
        {TAG_KIND: "final", TAG_SPLIT: split, TAG_STUDY: study_name, "optuna.trial_number": champion.number,
         TAG_ENGINE: champion.engine, **champion.run_tags},
        parent_run_id=parent,
    )
    tracker.log_params(run, cfg.flat_params())
    flops = model_cost(cfg.model, data.num_classes).flops
    tracker.log_metrics(run, {"test_accuracy": ev.accuracy, "test_macro_f1": ev.macro_f1,
                              "val_accuracy": champion.val_accuracy, "params": params, "flops": flops})
    tracker.log_evaluation(run, ev, "test", fit.history if fit else None)
    if not trial_plots and champion.trial_run_id:  # CSV-only trial runs: PNGs for the champion's trial
        tracker.log_report_plots(champion.trial_run_id)
    from emnist_hpo.reporting.analysis import log_champion_analysis  # misclassified gallery, confused pairs, activation maps

    log_champion_analysis(tracker, run, model, data.x_test, data.y_test, proba, data.classes, ev, log)
    tags = {"split": split, "study": study_name, "trial": champion.number,
            "val_accuracy": f"{champion.val_accuracy:.6f}", "params": params, "data_fingerprint": data_fingerprint,
            "test_fingerprint": test_fingerprint, "final_fit": final_fit, "engine": champion.engine,
            **{k.split(".")[-1]: v for k, v in champion.run_tags.items() if k.startswith("keras_tuner.tuner")}}
    reg = log_and_register(tracker, run, model, data.classes, split=split, test_accuracy=ev.accuracy, tags=tags,
                           register=register)
    tracker.end_run(run, "FINISHED")
    tracker.log_metrics(parent, {"best_val_accuracy": champion.val_accuracy, "test_accuracy": ev.accuracy,
                                 "champion_params": params, "champion_flops": flops})
    tracker.set_tags(parent, {"emnist_hpo.champion_trial": champion.number, "emnist_hpo.champion_run": run})
    return FinalResult(run, ev.accuracy, params, ev, reg, final_fit)
