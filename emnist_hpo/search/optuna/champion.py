"""The Optuna study's champion: claimed once, finalized (:mod:`emnist_hpo.search.finalize`), its finalists logged."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from emnist_hpo import runtime

runtime.configure()  # before Keras loads

import keras  # noqa: E402

from emnist_hpo.search.budget import cost_of, costs_of  # noqa: E402
from emnist_hpo.search.finalize import Champion, finalize_champion  # noqa: E402
from emnist_hpo.search.optuna.objective import Objective, config_of, kept_model  # noqa: E402
from emnist_hpo.search.optuna.slots import claim_finalize, claim_lease, drop_claim, finish_claim  # noqa: E402
from emnist_hpo.search.optuna.storage import finished_count  # noqa: E402
from emnist_hpo.search.selection import Finalist  # noqa: E402
from emnist_hpo.search.trial import rates_of  # noqa: E402
from emnist_hpo.tracking.registry import Registered  # noqa: E402

if TYPE_CHECKING:
    from emnist_hpo.search.optuna.study import StudyContext, StudyResult


def finalize_once(ctx: StudyContext, objective: Objective, parent: str, champion, front, result: StudyResult,
                   log) -> None:
    """:func:`_finalize` unless another process has done it (or is doing it) for the same champion."""
    opts, study = ctx.opts, ctx.study
    final_fit = opts.final_fit and _final_fit_fits(ctx, champion, log)
    key = {"trial": champion.number, "final_fit": final_fit, "register": opts.register}
    rec = claim_finalize(study, ctx.lock, key)
    if rec is not None:
        result.val_accuracy = float(champion.values[0])
        if rec.get("state") == "done":
            result.test_accuracy, result.params = rec.get("test_accuracy"), rec.get("params")
            reg = rec.get("registered")
            result.registered = Registered(**reg) if reg else None
            log(f"champion trial {champion.number} is already finalized"
                + (f" (registered as {reg['name']} v{reg['version']})" if reg else "") + "; nothing to redo")
        else:
            log(f"champion trial {champion.number} is being finalized by another process ({rec.get('owner')})")
        return
    try:
        with claim_lease(study, key):
            _finalize(ctx, objective, parent, champion, front, result, final_fit, log)
    except BaseException:
        drop_claim(study, key)
        raise
    reg = result.registered
    finish_claim(study, key, test_accuracy=result.test_accuracy, params=result.params,
                 registered=dataclasses.asdict(reg) if reg else None)


def _final_fit_fits(ctx: StudyContext, champion: optuna.trial.FrozenTrial, log) -> bool:
    """Within a time budget, a final fit that would overrun it by more than its grace is skipped: the trial's own
    model is registered."""
    if ctx.budget.deadline is None:
        return True
    own = cost_of(champion, ctx.ladder)
    need = ctx.budget.fit_cost(own) if own else ctx.budget.final_fit_cost(costs_of(ctx.study, ctx.ladder))
    if ctx.budget.final_fit_fits(need):
        return True
    log(f"time budget: {max(ctx.budget.left(), 0):.0f} s left, a final fit takes ~{need:.0f} s: the champion trial's "
        "own model is registered instead")
    return False


def _own_model(checkpoint: Path, number: int, log):
    """The champion trial's kept model, loaded in Keras' safe mode (no code from the file runs), or None."""
    def load():
        if not checkpoint.is_file():
            log(f"checkpoint {checkpoint} is missing; retraining trial {number}")
            return None
        try:
            return keras.saving.load_model(checkpoint, compile=False, safe_mode=True)
        except Exception as exc:  # noqa: BLE001 - any unloadable checkpoint (missing, tampered with): retrain instead
            log(f"checkpoint {checkpoint} not loaded ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); "
                f"retraining trial {number}")
            return None
    return load


def _finalize(ctx: StudyContext, objective: Objective, parent: str, champion, front, result: StudyResult,
              final_fit: bool, log) -> None:
    opts, study, tracker = ctx.opts, ctx.study, ctx.tracker
    val = float(champion.values[0])
    chosen = Champion(
        champion.number, config_of(objective, champion), val, "optuna",
        trial_run_id=champion.user_attrs.get("mlflow_run_id"),
        own_model=_own_model(kept_model(ctx.checkpoint_dir, champion.number), champion.number, log),
        rates=rates_of(champion.user_attrs),
    )
    final = finalize_champion(chosen, ctx.data, ctx.ladder, tracker=tracker, parent=parent, split=opts.split,
                              study_name=opts.name, final_fit=final_fit, register=opts.register,
                              trial_plots=opts.trial_plots, log=log)
    tracker.log_metrics(parent, {"finished_trials": finished_count(study)})
    if result.finalists:
        _log_finalists(tracker, parent, final.run_id, result.finalists, champion.number, final.test_accuracy)
    if front:
        import tempfile

        import pandas as pd

        rows = [{"trial": t.number, "val_accuracy": t.values[0], "params": t.user_attrs.get("params"),
                 "flops": t.user_attrs.get("flops")} for t in front]
        with tempfile.TemporaryDirectory() as tmp:
            pd.DataFrame(rows).to_csv(Path(tmp) / "pareto_front.csv", index=False)
            tracker.log_artifacts(parent, Path(tmp), "study")
    result.val_accuracy, result.test_accuracy, result.params = val, final.test_accuracy, final.params
    result.registered, result.final_fit = final.registered, final.final_fit
    study.set_user_attr("champion", {"trial": champion.number, "test_accuracy": final.test_accuracy,
                                     "params": final.params})
    from emnist_hpo.reporting.study_plots import log_study_plots  # Optuna's plots and the edge-of-space warning on the parent run

    log_study_plots(study, objective.space, champion, tracker, parent, log)


def _log_finalists(tracker, parent: str, final_run: str, finalists: list[Finalist], chosen: int, test: float) -> None:
    """Each finalist's re-evaluated mean and spread, the optimism of its single score, the final test accuracy."""
    import tempfile

    import pandas as pd

    metrics: dict[str, float] = {}
    for f in finalists:
        metrics.update({f"finalist_{f.trial}_mean": f.mean, f"finalist_{f.trial}_std": f.std,
                        f"finalist_{f.trial}_optimism": f.optimism})
    top = max(finalists, key=lambda f: f.original)  # the trial a single validation score would have crowned
    c = next(f for f in finalists if f.trial == chosen)
    metrics.update({"champion_reeval_mean": c.mean, "champion_reeval_std": c.std, "champion_optimism": c.optimism,
                    "best_single_score_optimism": top.optimism, "val_to_test_gap": c.mean - test})
    tracker.log_metrics(parent, metrics)
    tracker.log_metrics(final_run, {"reeval_mean": c.mean, "reeval_std": c.std, "val_to_test_gap": c.mean - test})
    tracker.set_tags(parent, {"emnist_hpo.single_score_pick": top.trial})
    with tempfile.TemporaryDirectory() as tmp:
        pd.DataFrame([f.row() for f in finalists]).to_csv(Path(tmp) / "finalists.csv", index=False, float_format="%.5f")
        tracker.log_artifacts(parent, Path(tmp), "study")
