"""The Keras Tuner engine: the same search space, logged and registered as an Optuna study is."""

from __future__ import annotations

import json
from pathlib import Path

import keras_tuner as kt
import pytest
from mlflow.tracking import MlflowClient

from emnist_hpo.cli import main
from emnist_hpo.config import ExperimentConfig
from emnist_hpo.errors import ConfigError
from emnist_hpo.search.keras_tuner import engine
from emnist_hpo.search.keras_tuner.engine import SpaceHyperModel, run_kt_study
from emnist_hpo.search.space import SearchSpace
from emnist_hpo.options import StudyOptions
from emnist_hpo.paths import PROJECT_ROOT

pytestmark = pytest.mark.slow  # end-to-end studies: the full suite (CI) runs them, `-m 'not slow'` skips them


def test_search_space_becomes_keras_tuner_hyperparameters():
    space = SearchSpace.load(PROJECT_ROOT / "search_spaces" / "default.yaml")
    model = SpaceHyperModel(space, ExperimentConfig(), num_classes=10)
    hp = kt.HyperParameters()
    for blocks in (1, 2, 3, 4):  # every depth registers its per-block parameters
        hp.values["conv_blocks"], hp.values["dense_layers"], hp.values["optimizer"] = blocks, 2, "adamw"
        model.config(hp)
    kinds = {p.name: type(p).__name__ for p in hp.space}
    assert kinds["conv_blocks"] == "Int" and kinds["learning_rate"] == "Float" and kinds["optimizer"] == "Choice"
    assert {f"filters_{i}" for i in range(4)} <= set(kinds) and {"dense_units_0", "dense_units_1"} <= set(kinds)
    lr = hp._hps["learning_rate"][0]
    want = space.params["learning_rate"]  # the YAML's range and scale, whatever the default space holds
    assert (lr.min_value, lr.max_value, lr.sampling) == (want.low, want.high, "log" if want.log else "linear")
    assert list(hp._hps["filters_0"][0].values) == list(space.params["filters"].choices)
    # Keras Tuner's own random draws give configs inside the YAML's ranges
    for seed in range(25):
        draw = kt.HyperParameters()
        draw.values = {p.name: p.random_sample(seed * 100 + i) for i, p in enumerate(hp.space)}
        cfg, used = model.config(draw, number=seed)
        assert cfg.train.seed == seed
        for name, value in used.items():
            base = name.rsplit("_", 1)[0] if name[-1].isdigit() else name
            assert space.params[base].contains(value), (name, value)
        assert len(cfg.model.conv_blocks) == used["conv_blocks"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, sample_dir):
    root = tmp_path_factory.mktemp("kt")
    return {"root": root, "tracking": f"sqlite:///{root}/mlflow.db", "data": str(sample_dir), "kt": str(root / "kt")}


def _opts(store, **kw) -> StudyOptions:
    base = dict(split="digits", trials=2, epochs=1, max_train_samples=3000, data_dir=store["data"],
                tracking_uri=store["tracking"], progress=False)
    base.update(kw)
    return StudyOptions(**base)


def test_hyperband_study_is_logged_and_registered_like_optuna(store, monkeypatch):
    monkeypatch.setenv("EMNIST_HPO_CACHE", str(store["root"] / "cache"))
    # --no-prefer-smaller: the best score is crowned (the one-standard-error rule is tested in test_selection.py)
    res = run_kt_study(_opts(store, prefer_smaller=False), tuner="hyperband", log=lambda m: None, kt_dir=store["kt"])
    assert res.finished == 2 and res.champion_trial is not None and res.registered is not None
    assert res.registered.champion and 0.5 < res.test_accuracy <= 1.0

    client = MlflowClient(store["tracking"], registry_uri=store["tracking"])
    exp = client.get_experiment_by_name("emnist-digits")
    runs = client.search_runs([exp.experiment_id], "tags.`emnist_hpo.engine` = 'keras-tuner'")
    by_kind = {}
    for r in runs:
        by_kind.setdefault(r.data.tags["emnist_hpo.kind"], []).append(r)
    (parent,) = by_kind["study"]
    assert parent.info.status == "FINISHED" and parent.data.tags["keras_tuner.tuner"] == "hyperband"
    assert parent.data.params["trials"] == "2" and parent.data.params["engine"] == "keras-tuner"
    trials = sorted(by_kind["trial"], key=lambda r: int(r.data.tags["optuna.trial_number"]))
    assert len(trials) == 2
    # the seed experiments come first, as in a warm-started study
    assert [t.data.tags.get("emnist_hpo.seed_experiment") for t in trials] == ["two_conv", "one_conv"]
    for t in trials:
        assert t.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert t.data.tags["optuna.trial_state"] == "COMPLETE" and t.info.status == "FINISHED"
        assert t.data.tags["optuna.study_name"] == "emnist-digits-kt-hyperband"
        assert "trial.conv_blocks" in t.data.params and "train.learning_rate" in t.data.params
        history = client.get_metric_history(t.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [1]  # per-epoch metrics
        reports = {a.path for a in client.list_artifacts(t.info.run_id, "reports")}
        assert "reports/validation_confusion_matrix.csv" in reports
    (final,) = by_kind["final"]
    assert final.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert final.data.metrics["test_accuracy"] == pytest.approx(res.test_accuracy)
    assert {"analysis/misclassified.png", "analysis/confused_pairs.csv"} <= {
        a.path for a in client.list_artifacts(final.info.run_id, "analysis")}
    mv = client.get_model_version_by_alias("emnist-digits", "champion")
    assert mv.tags["engine"] == "keras-tuner" and mv.tags["tuner"] == "hyperband"
    assert mv.run_id == final.info.run_id
    # the finalists were re-trained on another fold, and the best mean was crowned (--no-prefer-smaller)
    means = {int(k.split("_")[1]): v for k, v in parent.data.metrics.items()
             if k.startswith("finalist_") and k.endswith("_mean")}
    assert len(means) == 2 and means.get(res.champion_trial) == max(means.values()), (means, res.champion_trial)
    scored = {int(t.data.tags["optuna.trial_number"]): t.data.metrics["val_score"] for t in trials}
    assert res.val_accuracy == pytest.approx(scored[res.champion_trial])  # its own trial's score, as reported

    # resuming: the same command with a larger budget adds trials to the same Keras Tuner project
    messages = []
    more = run_kt_study(_opts(store, trials=3, register=False), tuner="hyperband", log=messages.append,
                        kt_dir=store["kt"])
    assert more.finished == 3 and any("resuming" in m for m in messages)
    trial_runs = client.search_runs([exp.experiment_id], "tags.`emnist_hpo.kind` = 'trial' and "
                                    "tags.`emnist_hpo.engine` = 'keras-tuner'")
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in trial_runs) == [0, 1, 2]

    # a project is tied to its tuner
    with pytest.raises(ConfigError, match="created with tuner 'hyperband'"):
        run_kt_study(_opts(store, study_name="emnist-digits-kt-hyperband"), tuner="bayesian", log=lambda m: None,
                     kt_dir=store["kt"])


def test_bayesian_from_the_command_line(store, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EMNIST_HPO_CACHE", str(store["root"] / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # MLflow exports the last store it was pointed at
    rc = main(["study", "--engine", "keras-tuner", "--tuner", "bayesian", "--split", "digits", "--trials", "1",
               "--epochs", "1", "--max-train-samples", "2000", "--data-dir", store["data"], "--no-progress",
               "--no-final-fit", "--no-register"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Keras Tuner study 'emnist-digits-kt-bayesian' (bayesian): 1 finished trials" in out
    project = tmp_path / "mlruns" / "keras_tuner" / "emnist-digits-kt-bayesian"
    assert (project / "oracle.json").is_file()
    assert len(list(project.glob("trial_*/checkpoint.weights.h5"))) == 1
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("emnist-digits")
    (final,) = client.search_runs([exp.experiment_id], "tags.`emnist_hpo.kind` = 'final'")
    assert final.data.tags["emnist_hpo.engine"] == "keras-tuner"
    # no final fit: the trial's own weights (its checkpoint) were tested
    assert final.data.metrics["test_accuracy"] > 0.5
    assert abs(final.data.metrics["test_accuracy"] - final.data.metrics["val_accuracy"]) < 0.1


@pytest.mark.parametrize("argv, message", [
    (["--engine", "keras-tuner", "--sampler", "tpe"], "--sampler is an Optuna option"),
    (["--engine", "keras-tuner", "--storage", "sqlite:///x.db"], "--storage is Optuna's"),
    (["--engine", "keras-tuner", "--objectives", "accuracy,params"], "searches one objective"),
    (["--tuner", "bayesian"], "--tuner applies to --engine keras-tuner"),
])
def test_options_that_do_not_apply_are_errors(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["study", "--split", "digits", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "mlruns").exists()  # refused before anything was written


def test_unknown_tuner_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["study", "--split", "digits", "--engine", "keras-tuner", "--tuner", "random"])
    assert exc.value.code == 2
    assert "invalid choice: 'random'" in capsys.readouterr().err


def test_a_plateau_champions_final_fit_replays_every_round_its_trial_trained(store, tmp_path, monkeypatch):
    """Hyperband continues a promoted trial from its earlier round's weights with a fresh optimizer and schedule; the
    rates a ``plateau`` champion's final fit replays are those of every epoch from scratch: its earlier round's, then
    its own (the Keras Tuner engine used to hold the first rate for the whole final fit)."""
    space = tmp_path / "plateau.yaml"
    space.write_text("conv_blocks: 1\nfilters: {choices: [4, 8, 12, 16, 20, 24]}\nkernel: 3\nbatch_norm: false\n"
                     "conv_dropout: 0.0\ndense_layers: 0\ndense_units: 32\nlearning_rate: 2.0e-3\nschedule: plateau\n"
                     "augment: 0.0\nbatch_size: 128\n")
    crowned = []
    real = engine.finalize_champion

    def spy(champion, *args, **kwargs):
        crowned.append(champion)
        return real(champion, *args, **kwargs)

    monkeypatch.setattr(engine, "finalize_champion", spy)
    res = run_kt_study(_opts(store, study_name="digits-kt-plateau", trials=6, epochs=5, max_train_samples=600,
                             search_space=str(space), warm_start=False, register=False, trial_plots=False,
                             prefer_smaller=False, finalists=1), tuner="hyperband", log=lambda m: None,
                       kt_dir=store["kt"])
    trials = {}
    for folder in Path(res.project_dir).glob("trial_*"):
        meta = json.loads((folder / "trial.json").read_text())
        if meta["status"] == "COMPLETED":
            rates = {int(e): r for e, r in json.loads((folder / engine.RATES_FILE).read_text())}
            trials[int(meta["trial_id"])] = (meta["hyperparameters"]["values"], rates)
    continued = [(values, rates) for values, rates in trials.values() if values.get("tuner/initial_epoch")]
    assert continued, "Hyperband promoted no trial: the test needs one"
    for values, rates in continued:
        initial, epochs = values["tuner/initial_epoch"], values["tuner/epochs"]
        assert sorted(rates) == list(range(epochs))  # every epoch from scratch
        _, earlier = trials[int(values["tuner/trial_id"])]
        assert {e: rates[e] for e in range(initial)} == {e: earlier[e] for e in range(initial)}
        assert rates[initial] == pytest.approx(2e-3)  # the optimizer and its schedule start afresh
    (champion,) = crowned
    assert champion.number == res.champion_trial and champion.config.train.schedule == "plateau"
    assert champion.rates == trials[res.champion_trial][1]
