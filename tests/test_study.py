"""End-to-end studies on the real EMNIST sample, checked through Optuna's storage and MLflow's client."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from emnist_hpo.data.nist import load_split
from emnist_hpo.search.optuna.study import StudyOptions, run_study

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory, sample_dir):
    """A private working directory, stores and parse cache for one module's studies."""
    root = tmp_path_factory.mktemp("study")
    old = {k: os.environ.get(k) for k in ("EMNIST_HPO_CACHE", "MLFLOW_TRACKING_URI", "EMNIST_DATA_DIR")}
    os.environ["EMNIST_HPO_CACHE"] = str(root / "cache")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("EMNIST_DATA_DIR", None)
    yield {
        "root": root,
        "storage": f"sqlite:///{root}/optuna.db",
        "tracking": f"sqlite:///{root}/mlflow.db",
        "data": str(sample_dir),
        "ckpt": str(root / "ckpt"),
    }
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _opts(env, **kw) -> StudyOptions:
    base = dict(
        trials=2, epochs=1, max_train_samples=2000, data_dir=env["data"], storage=env["storage"],
        tracking_uri=env["tracking"], progress=False, checkpoint_dir=env["ckpt"], finalists=0,
    )
    base.update(kw)
    return StudyOptions(**base)


@pytest.fixture(scope="module")
def letters(env):
    """A 2-trial letters study (the two seed experiments, warm-started)."""
    return run_study(_opts(env, split="letters"), log=lambda m: None)


def _runs(env, split: str, kind: str):
    client = MlflowClient(env["tracking"])
    exp = client.get_experiment_by_name(f"emnist-{split}")
    assert exp is not None, f"no MLflow experiment emnist-{split}"
    return client, client.search_runs([exp.experiment_id], f"tags.`emnist_hpo.kind` = '{kind}'", max_results=1000)


@pytest.mark.slow
def test_letters_study_records_every_trial_in_optuna(env, letters):
    study = optuna.load_study(study_name="emnist-letters", storage=env["storage"])
    finished = [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]
    assert len(finished) == 2
    # warm start: the research's seed architectures run first, exactly as their experiment files say
    # (the compact seed, third in line, waits for a third trial)
    assert [t.user_attrs.get("seed_experiment") for t in finished] == ["two_conv", "one_conv"]
    waiting = [t for t in study.trials if t.state.name == "WAITING"]
    assert [t.user_attrs.get("seed_experiment") for t in waiting] == ["compact"]
    two_conv = next(t for t in study.trials if t.user_attrs.get("seed_experiment") == "two_conv")
    assert two_conv.user_attrs["params"] == 926_298  # conv64-3x3/pool/conv64-3x3/pool/512/128 on 26 classes
    for t in finished:
        assert t.user_attrs["epoch_time"] > 0 and t.user_attrs["mlflow_run_id"]
        # every rung a trial finished is recorded for its peers: score, images seen, seconds, FLOPs of the work
        rungs = t.user_attrs["rungs"]
        assert len(rungs) == t.user_attrs["rung_reached"] + 1 and rungs[-1]["score"] == t.values[0]
        assert rungs[-1]["images"] == t.user_attrs["images_seen"] > 0 and rungs[-1]["work"] > 0
        assert t.user_attrs["flops"] > 0
    # what the plan said is on the parent run: the ladder of 1,600 images x 1 epoch is a single rung
    assert letters.plan is not None and len(letters.plan.ladder.rungs) == 1 and letters.plan.configs == 2


@pytest.mark.slow
def test_every_trial_is_a_nested_mlflow_run_with_metrics_and_reports(env, letters):
    client, parents = _runs(env, "letters", "study")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    _, trials = _runs(env, "letters", "trial")
    assert len(trials) == 2
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED" and run.data.tags["optuna.trial_state"] == "COMPLETE"
        assert run.data.params["train.epochs"] == "1" and "trial.learning_rate" in run.data.params
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
            history = client.get_metric_history(run.info.run_id, key)
            assert [m.step for m in history] == [1], key
        files = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
        assert {
            "reports/validation_confusion_matrix.csv", "reports/validation_per_class.csv",
            "reports/validation_confused_pairs.csv", "reports/validation_confusion_matrix.png",
            "reports/training_curves.png",
        } <= files
        local = Path(client.download_artifacts(run.info.run_id, "reports/validation_per_class.csv", str(env["root"])))
        per_class = local.read_text().splitlines()
        assert per_class[0].startswith("class,precision,recall,f1,support")
        assert len(per_class) == 27 and per_class[1].startswith("A/a,")  # classes named by character


@pytest.mark.slow
def test_champion_is_registered_and_predicts_real_images(env, letters, sample_dir):
    assert letters.registered is not None and letters.registered.champion
    _, finals = _runs(env, "letters", "final")
    assert len(finals) == 1
    assert abs(finals[0].data.metrics["test_accuracy"] - letters.test_accuracy) < 1e-9
    mlflow.set_tracking_uri(env["tracking"])
    model = mlflow.pyfunc.load_model("models:/emnist-letters@champion")
    test = load_split("letters", sample_dir)
    x, y = test.x_test[:600], test.y_test[:600]
    proba = model.predict(x)
    assert list(proba.columns) == list(test.classes)
    assert np.allclose(proba.to_numpy().sum(axis=1), 1.0, atol=1e-4)
    accuracy = float((proba.to_numpy().argmax(axis=1) == y).mean())
    assert accuracy > 4 / 26, f"champion barely beats chance: {accuracy:.3f}"


@pytest.mark.slow
def test_a_worse_model_does_not_take_the_champion_alias(env, letters):
    client = MlflowClient(env["tracking"])
    before = client.get_model_version_by_alias("emnist-letters", "champion").version
    # one epoch on 200 images: registered as a new version, champion only if it really tests better
    res = run_study(_opts(env, split="letters", study_name="letters-tiny", trials=1, max_train_samples=200,
                          warm_start=False, seed=3), log=lambda m: None)
    assert res.registered is not None and res.registered.version != before
    if res.test_accuracy < letters.test_accuracy:
        assert not res.registered.champion
        assert client.get_model_version_by_alias("emnist-letters", "champion").version == before


@pytest.mark.slow
def test_byclass_multi_objective_reports_a_pareto_front(env):
    res = run_study(
        _opts(env, split="byclass", objectives=("accuracy", "params"), warm_start=False, sampler="random",
              search_space="small", max_train_samples=3000),
        log=lambda m: None,
    )
    assert res.study.study_name == "emnist-byclass-pareto"
    assert len(res.study.directions) == 2 and 1 <= len(res.pareto) <= 2
    assert res.champion_trial.number in {t.number for t in res.pareto}
    client, parents = _runs(env, "byclass", "study")
    files = {a.path for a in client.list_artifacts(parents[0].info.run_id, "study")}
    assert "study/pareto_front.csv" in files
    assert client.get_model_version_by_alias("emnist-byclass", "champion") is not None


@pytest.mark.slow
def test_finalists_are_reevaluated_and_the_best_mean_is_crowned(env):
    """Issue 7: the top-k trials are re-trained on other folds; the champion is the best mean, with its spread."""
    res = run_study(_opts(env, split="digits", study_name="digits-finalists", trials=3, warm_start=False,
                          search_space="small", max_train_samples=1500, finalists=2, folds=2, seed=5, pruner="none",
                          prefer_smaller=False),  # the best mean (the one-standard-error rule: test_selection.py)
                    log=lambda m: None)
    assert len(res.finalists) == 2
    for f in res.finalists:
        assert len(f.scores) == 2 and all(0 < s <= 1 for s in f.scores)
    assert res.chosen is not None and res.chosen.mean == max(f.mean for f in res.finalists)
    client, parents = _runs(env, "digits", "study")
    parent = next(p for p in parents if p.data.tags["optuna.study_name"] == "digits-finalists")
    m = parent.data.metrics
    assert m["champion_reeval_mean"] == pytest.approx(res.chosen.mean)
    assert m["champion_optimism"] == pytest.approx(res.chosen.original - res.chosen.mean)
    assert m["test_accuracy"] == pytest.approx(res.test_accuracy)
    assert {f"finalist_{f.trial}_std" for f in res.finalists} <= set(m)
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert "study/finalists.csv" in files


def test_by_default_a_trial_trains_every_epoch_the_final_fit_will(env, tmp_path):
    """The final fit trains every epoch of the ladder, so a trial is scored on every epoch too: with validation that
    cannot improve (a learning rate of 1e-9) the default runs all 5 epochs, where the research's patience of 3 (the
    default before) stops after 4 (a plateau-schedule byclass trial stopped at epoch 8 of 15 scored 0.91 pt under its
    whole schedule)."""
    space = tmp_path / "flat.yaml"
    space.write_text("conv_blocks: 1\nfilters: 8\nkernel: 3\nbatch_norm: false\nconv_dropout: 0.0\n"
                     "dense_layers: 0\ndense_units: 32\nlearning_rate: 1.0e-9\nschedule: constant\naugment: 0.0\n"
                     "batch_size: 128\n")

    def epochs_run(name: str, **kw) -> int:
        res = run_study(_opts(env, split="digits", study_name=name, trials=1, epochs=5, fidelity="none",
                              pruner="none", max_train_samples=600, warm_start=False, final_fit=False,
                              register=False, trial_plots=False, search_space=str(space), **kw), log=lambda m: None)
        (trial,) = res.study.trials
        assert trial.state == optuna.trial.TrialState.COMPLETE
        return trial.user_attrs["epochs_run"]

    assert epochs_run("digits-every-epoch") == 5
    assert epochs_run("digits-patience-3", early_stopping_patience=3) == 4


def test_max_params_prunes_big_models_before_training(env):
    res = run_study(_opts(env, split="mnist", trials=2, max_params=50_000), log=lambda m: None)
    trials = [t for t in res.study.trials if t.state.is_finished()]  # the third seed (compact) still waits
    assert [t.state.name for t in trials] == ["PRUNED", "PRUNED"] and res.champion_trial is None
    assert all("parameters > --max-params 50,000" in t.user_attrs["fail_reason"] for t in trials)
    assert all("train_seconds" not in t.user_attrs for t in trials)  # never trained
    client, runs = _runs(env, "mnist", "trial")
    assert sorted(r.info.status for r in runs) == ["KILLED", "KILLED"]


def test_max_flops_prunes_before_training_and_every_trial_knows_its_cost(env):
    res = run_study(_opts(env, split="mnist", study_name="mnist-flops", trials=2, max_flops=1_000_000),
                    log=lambda m: None)
    trials = [t for t in res.study.trials if t.state.is_finished()]
    assert [t.state.name for t in trials] == ["PRUNED", "PRUNED"]  # the research's seeds need 11.5M and 6.1M
    assert all("FLOPs per image > --max-flops 1M" in t.user_attrs["fail_reason"] for t in trials)
    assert all(t.user_attrs["flops"] > 1_000_000 and t.user_attrs["params"] > 0 for t in trials)
    assert all("train_seconds" not in t.user_attrs for t in trials)


SPACE_10 = """conv_blocks: {low: 1, high: 2}
filters: {choices: [8, 16]}
kernel: 3
dense_layers: 0
dense_units: 16
learning_rate: {low: 1.0e-3, high: 1.0e-2, log: true}
"""


@pytest.mark.slow
def test_a_study_warm_starts_from_another_splits_study_and_says_its_plan(env, tmp_path, capsys):
    """digits and mnist share their classes: a mnist study queues the digits study's best trials first, and
    prints its plan (rungs, configurations, ETA) and per-epoch progress."""
    space = tmp_path / "space10.yaml"
    space.write_text(SPACE_10)
    common = dict(search_space=str(space), warm_start=False, trials=3, max_train_samples=1000, register=False,
                  final_fit=False)
    digits = run_study(_opts(env, split="digits", study_name="digits-10", **common), log=lambda m: None)
    best = sorted((t for t in digits.study.trials if t.state.name == "COMPLETE"), key=lambda t: -t.values[0])
    said: list[str] = []
    res = run_study(_opts(env, split="mnist", study_name="mnist-10", warm_start_from=("digits-10",),
                          warm_start_top=2, progress=True, **common), log=said.append)
    first = sorted(res.study.trials, key=lambda t: t.number)[:2]
    assert [t.user_attrs.get("warm_start_from") for t in first] == [f"digits-10#{t.number}" for t in best[:2]]
    assert [t.params for t in first] == [t.params for t in best[:2]]
    assert any("warm start from study 'digits-10': 2 of its best trials queued first" in m for m in said)
    plan = "\n".join(m for m in said if m.startswith(("plan:", "  ")))
    assert "rung 0: all of the training set (800 images) x 1 epoch" in plan and "ETA: search ~" in plan
    assert "configurations to screen: 3" in plan
    assert "sampler: TPE, its first 4 configurations drawn quasi-randomly" in plan  # 3 configurations: the floor
    assert res.study.sampler._n_startup_trials == 4  # what it said is what the sampler does
    err = capsys.readouterr().err
    assert "rung 1/1 epoch 1/1 val" in err and "study ETA ~" in err  # the running trial, every epoch
    with pytest.raises(Exception, match="no study 'emnist-nope'"):
        run_study(_opts(env, split="mnist", study_name="mnist-11", warm_start_from=("nope",), **common),
                  log=lambda m: None)
    assert "mnist-11" not in {s.study_name for s in optuna.get_all_study_summaries(env["storage"])}  # nothing written


def _cli(args, cwd, env_extra=None, timeout=600):
    env = {**os.environ, **(env_extra or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "emnist_hpo", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_default_stores_and_resume(tmp_path, sample_dir, env):
    """Defaults need nothing running; re-running the same command resumes and runs only the missing trials."""
    args = ["study", "--split", "digits", "--trials", "1", "--epochs", "1", "--max-train-samples", "1000",
            "--no-warm-start", "--no-progress", "--no-final-fit", "--finalists", "0"]
    first = _cli(args, tmp_path, {"EMNIST_DATA_DIR": str(sample_dir)})
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "mlruns" / "optuna.db").is_file() and (tmp_path / "mlruns" / "mlflow.db").is_file()
    assert "test accuracy" in first.stdout
    second = _cli([*args[:4], "2", *args[5:]], tmp_path, {"EMNIST_DATA_DIR": str(sample_dir)})
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming study 'emnist-digits': 1 of 2" in second.stderr
    # what the search did, this session's and the study's: one configuration, then a second
    assert "configurations       1 finished this session; trained at each rung: 1\n" in first.stdout
    assert "configurations       1 finished this session; trained at each rung: 2\n" in second.stdout
    study = optuna.load_study(study_name="emnist-digits", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert len(study.trials) == 2
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("emnist-digits")
    assert exp.artifact_location.startswith((tmp_path / "mlruns" / "artifacts").as_uri())
    trials = client.search_runs([exp.experiment_id], "tags.`emnist_hpo.kind` = 'trial'")
    assert sorted(r.data.tags["optuna.trial_number"] for r in trials) == ["0", "1"]
    third = _cli(args[:4] + ["2"] + args[5:], tmp_path, {"EMNIST_DATA_DIR": str(sample_dir)})
    assert third.returncode == 0 and "already has 2 finished trials" in third.stderr
    assert len(optuna.load_study(study_name="emnist-digits",
                                 storage=f"sqlite:///{tmp_path}/mlruns/optuna.db").trials) == 2


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--split", "klingon"], "unknown split 'klingon'; allowed: byclass, bymerge"),
        (["--split", "digits", "--trials", "0"], "--trials must be >= 1 (trials=0)"),
        (["--split", "digits", "--epochs", "0"], "--epochs must be >= 1 (epochs=0)"),
        (["--split", "digits", "--sampler", "grid"], "--sampler must be one of tpe, random, qmc, cmaes, nsga2"),
        (["--split", "digits", "--pruner", "always"], "--pruner must be one of successive-halving"),
        (["--split", "digits", "--objectives", "params"], "--objectives must be 'accuracy', 'accuracy,params' or 'accuracy,flops'"),
        (["--split", "digits", "--data-dir", "/nonexistent/emnist"], "/nonexistent/emnist"),
        (["--split", "digits", "--search-space", "nope.yaml"], "search space 'nope.yaml' not found"),
        (["--split", "digits", "--study-name", "../../etc"], "--study-name must be 1-128 letters"),
        (["--split", "digits", "--folds", "0"], "--folds must be >= 1 (folds=0)"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2_and_records_nothing(tmp_path, monkeypatch, capsys, args, needle):
    from emnist_hpo.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["study", *args, "--no-progress"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], lines
    assert lines[0].startswith("emnist-hpo: error: ")
    assert not (tmp_path / "mlruns").exists()
