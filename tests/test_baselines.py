"""`python -m emnist_hpo run`: fixed experiments on the real EMNIST sample, checked through MLflow's client."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from emnist_hpo.cli import main
from emnist_hpo.search.space import SearchSpace
from emnist_hpo.config import DataConfig, load_experiment
from emnist_hpo.data.prepared import prepare
from emnist_hpo.model.build import build_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory, sample_dir, isolated_in):
    """A private working directory, MLflow store and parse cache for this module's runs."""
    root = tmp_path_factory.mktemp("baselines")
    with isolated_in(root):
        yield {"root": root, "tracking": f"sqlite:///{root}/mlflow.db", "data": str(sample_dir)}


def _run(env, *args: str) -> int:
    return main(["run", *args, "--data-dir", env["data"], "--tracking-uri", env["tracking"], "--no-progress"])


def _baseline(env, split: str, name: str):
    client = MlflowClient(env["tracking"])
    exp = client.get_experiment_by_name(f"emnist-{split}")
    assert exp is not None, f"no MLflow experiment emnist-{split}"
    runs = client.search_runs(
        [exp.experiment_id],
        f"tags.`emnist_hpo.kind` = 'baseline' and tags.`emnist_hpo.baselines.experiment` = '{name}'",
    )
    assert len(runs) == 1, f"expected one baseline run of {name}, found {len(runs)}"
    return client, runs[0]


def _artifact_csv(client, run, path: str, **kw) -> pd.DataFrame:
    local = client.download_artifacts(run.info.run_id, path)
    return pd.read_csv(local, **kw)


def _accuracy_from_confusion(client, run, prefix: str) -> float:
    cm = _artifact_csv(client, run, f"reports/{prefix}_confusion_matrix.csv", index_col=0).to_numpy()
    return float(cm.trace() / cm.sum())


@pytest.fixture(scope="module")
def lenet(env):
    assert _run(env, "experiments/lenet.yaml", "--split", "letters", "--epochs", "1", "--max-train-samples", "1500") == 0
    return _baseline(env, "letters", "lenet")


@pytest.fixture(scope="module")
def lstm(env):
    assert _run(env, "lstm", "--split", "digits", "--epochs", "1", "--max-train-samples", "1500") == 0
    return _baseline(env, "digits", "lstm")


@pytest.fixture(scope="module")
def knn(env):
    assert _run(env, "knn", "--split", "digits", "--max-train-samples", "3000") == 0
    return _baseline(env, "digits", "knn")


def test_cnn_baseline_is_tracked_like_a_trial_and_tested(env, lenet):
    client, run = lenet
    t, m, p = run.data.tags, run.data.metrics, run.data.params
    assert run.info.status == "FINISHED"
    assert t["emnist_hpo.split"] == "letters"
    # same data fingerprints the study writes, so compare can match it with a champion
    data = prepare("letters", env["data"], DataConfig(max_train_samples=1500), progress=False)
    assert t["emnist_hpo.data_fingerprint"] == data.fingerprint()
    assert t["emnist_hpo.test_fingerprint"] == data.test_fingerprint()
    # the experiment file's values, with the command line's overrides
    assert p["model.conv_blocks.0.filters"] == "6" and p["model.pool"] == "avg" and p["model.dense"] == "[188, 94]"
    assert p["train.epochs"] == "1" and p["data.max_train_samples"] == "1500" and p["train.schedule"] == "plateau"
    assert int(p["train_size"]) == len(data.x_train) and int(p["test_size"]) == len(data.x_test)
    cfg = load_experiment(REPO / "experiments" / "lenet.yaml")
    assert m["params"] == build_model(cfg.model, 26).count_params()
    assert m["model_size_bytes"] > 4 * m["params"] and m["train_seconds"] > 0 and m["epochs_run"] == 1
    # per-epoch metrics, as a trial logs them
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 1
    # validation and test reports; the logged accuracies are those of the confusion matrices
    files = {f.path for f in client.list_artifacts(run.info.run_id, "reports")}
    for prefix in ("validation", "test"):
        assert {f"reports/{prefix}_confusion_matrix.csv", f"reports/{prefix}_per_class.csv",
                f"reports/{prefix}_confused_pairs.csv", f"reports/{prefix}_confusion_matrix.png"} <= files
    assert "reports/training_curves.png" in files
    assert m["test_accuracy"] == pytest.approx(_accuracy_from_confusion(client, run, "test"))
    assert m["best_val_accuracy"] == pytest.approx(_accuracy_from_confusion(client, run, "validation"), abs=1e-6)
    per_class = _artifact_csv(client, run, "reports/test_per_class.csv")
    assert len(per_class) == 26 and per_class["support"].sum() == len(data.x_test)


def test_lstm_baseline_reads_rows_and_is_tracked(env, lstm):
    client, run = lstm
    t, m = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED"
    assert t["emnist_hpo.model.architecture"].startswith("lstm 128")
    cfg = load_experiment(REPO / "experiments" / "lstm.yaml")
    assert m["params"] == build_model(cfg.model, 10).count_params()
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 1
    assert m["test_accuracy"] == pytest.approx(_accuracy_from_confusion(client, run, "test"))


def test_classical_baseline_counts_stored_numbers(env, knn):
    client, run = knn
    m, p = run.data.metrics, run.data.params
    assert run.info.status == "FINISHED"
    assert p["model.kind"] == "knn" and p["model.options.n_neighbors"] == "5"
    # KNN stores its training images: parameters = images x 784
    assert m["params"] == int(p["train_size"]) * 784
    assert int(p["train_size"]) + int(p["val_size"]) == 3000
    assert m["model_size_bytes"] >= 4 * m["params"]  # float32 pixels at least
    assert m["epochs_run"] == 0
    assert m["test_accuracy"] == pytest.approx(_accuracy_from_confusion(client, run, "test"))
    assert m["best_val_accuracy"] == pytest.approx(_accuracy_from_confusion(client, run, "validation"))
    assert m["test_accuracy"] > 0.5  # 10 digits: far above chance even on 2,400 images


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("emnist-hpo: error: ")
    return err[0]


def test_unknown_experiment_is_one_line_exit_2_and_writes_nothing(env, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/fresh.db"
    rc = main(["run", "no_such_experiment", "--split", "letters", "--data-dir", env["data"], "--tracking-uri", uri])
    assert rc == 2
    line = _error_line(capsys)
    assert "no_such_experiment" in line and "lenet" in line  # names the bad value and what exists
    rc = main(["run", str(tmp_path / "missing.yaml"), "--split", "letters", "--tracking-uri", uri])
    assert rc == 2 and "missing.yaml" in _error_line(capsys)
    assert not (tmp_path / "fresh.db").exists()


def test_unknown_key_in_experiment_yaml_is_one_line_exit_2(env, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  conv_blocks: [{filters: 8, kernal: 3}]\n")
    uri = f"sqlite:///{tmp_path}/fresh.db"
    assert main(["run", str(bad), "--split", "letters", "--tracking-uri", uri]) == 2
    line = _error_line(capsys)
    assert "unknown key 'model.conv_blocks[0].kernal'" in line and "bad.yaml" in line
    opts = tmp_path / "badopts.yaml"
    opts.write_text("model:\n  kind: knn\n  options: {n_neighbours: 3}\n")
    assert main(["run", str(opts), "--split", "letters", "--tracking-uri", uri]) == 2
    line = _error_line(capsys)
    assert "model.options.n_neighbours" in line and "n_neighbors" in line
    assert main(["run", "lenet", "--split", "letters", "--epochs", "0", "--tracking-uri", uri]) == 2
    assert "--epochs must be >= 1 (epochs=0)" in _error_line(capsys)
    assert not (tmp_path / "fresh.db").exists()


def test_every_experiment_file_loads_and_describes_its_model():
    from emnist_hpo.baselines.classical import make_estimator
    from emnist_hpo.model.describe import describe_model

    names = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))
    assert {"two_conv", "one_conv", "lenet", "wide_dropout", "four_conv", "four_conv_augment", "three_conv", "lstm",
            "random_forest", "svm", "knn"} <= set(names)
    for name in names:
        cfg = load_experiment(REPO / "experiments" / f"{name}.yaml")
        assert describe_model(cfg.model)
        if name == "compact":  # not the research's: the small seed that studies start from
            model = build_model(cfg.model, 47)
            assert model.count_params() <= 928_947 // 4  # fits --max-params of a quarter of the 2-conv recipe
            space = SearchSpace.load(REPO / "search_spaces" / "default.yaml")
            assert space.params_for(cfg) is not None  # inside the default space, so it can be enqueued
        elif cfg.model.kind in ("cnn", "lstm"):
            build_model(cfg.model, 47)  # buildable on the 47-class splits
            assert cfg.train.early_stopping_patience == 3 and cfg.train.schedule == "plateau"
        else:
            make_estimator(cfg)
    svm = load_experiment(REPO / "experiments" / "svm.yaml")
    assert svm.data.max_train_samples is not None  # kernel SVMs cap their training pool


def test_classical_options_are_checked_when_the_yaml_is_loaded(tmp_path):
    """scikit-learn's own parameter checks run on load, not minutes into a fit: a bad value names the option."""
    from emnist_hpo.errors import ConfigError

    for text, needle in (
        ("model: {kind: random_forest, options: {n_estimators: 0}}", "'n_estimators' parameter of RandomForestClassifier"),
        ("model: {kind: svm, options: {kernel: cubic}}", "'kernel' parameter of SVC"),
        ("model: {kind: knn, options: {n_neighbors: 2.5}}", "'n_neighbors' parameter of KNeighborsClassifier"),
        ("model: {kind: knn, options: {k: 3}}", "unknown key 'model.options.k' for KNeighborsClassifier; allowed: "),
    ):
        p = tmp_path / "classical.yaml"
        p.write_text(text + "\n")
        with pytest.raises(ConfigError) as err:
            load_experiment(p)
        assert needle in str(err.value) and "classical.yaml" in str(err.value)
    p.write_text("model: {kind: random_forest, options: {n_estimators: 3}}\ntrain: {seed: 7}\n")
    from emnist_hpo.baselines.classical import make_estimator

    est = make_estimator(load_experiment(p))
    assert est.n_estimators == 3 and est.random_state == 7  # random_state defaults to train.seed
