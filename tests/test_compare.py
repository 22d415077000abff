"""`python -m emnist_hpo compare` on a store filled by real quick runs, and the study's Optuna plots."""

from __future__ import annotations

from pathlib import Path

import keras
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from emnist_hpo.cli import main
from emnist_hpo.reporting.compare import FILES, collect, log_ticks, pareto_mask, sampler_name
from emnist_hpo.reporting.published import PUBLISHED, for_split
from emnist_hpo.search.space import SearchSpace
from emnist_hpo.reporting.study_plots import edge_params, edge_warning

pytestmark = pytest.mark.slow  # end-to-end studies: the full suite (CI) runs them, `-m 'not slow'` skips them

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory, sample_dir, isolated_in):
    """A letters study (2 trials) by each engine, baselines on letters and digits, then ``compare --output``."""
    root = tmp_path_factory.mktemp("compare")
    env = {"root": root, "tracking": f"sqlite:///{root}/mlflow.db", "storage": f"sqlite:///{root}/optuna.db",
           "data": str(sample_dir), "out": root / "report"}
    common = ["--data-dir", env["data"], "--tracking-uri", env["tracking"], "--no-progress"]
    with isolated_in(root):
        assert main(["study", "--split", "letters", "--trials", "2", "--epochs", "1", "--max-train-samples", "1500",
                     "--storage", env["storage"], *common]) == 0
        # the same budget with the other engine (not registered: the Optuna study's champion stays)
        assert main(["study", "--split", "letters", "--engine", "keras-tuner", "--tuner", "bayesian",
                     "--study-name", "letters-kt", "--trials", "2", "--epochs", "1", "--max-train-samples", "1500",
                     "--no-register", *common]) == 0
        # same data as the study
        assert main(["run", "lenet", "--split", "letters", "--epochs", "1", "--max-train-samples", "1500", *common]) == 0
        # same test set, other training data
        assert main(["run", "knn", "--split", "letters", "--max-train-samples", "2000", *common]) == 0
        # a split without a champion
        assert main(["run", "knn", "--split", "digits", "--max-train-samples", "1500", *common]) == 0
        assert main(["compare", "--output", str(env["out"]), "--tracking-uri", env["tracking"]]) == 0
        yield env


def _client(store) -> MlflowClient:
    return MlflowClient(store["tracking"], registry_uri=store["tracking"])


def _runs(client, split: str, query: str):
    exp = client.get_experiment_by_name(f"emnist-{split}")
    return client.search_runs([exp.experiment_id], query, max_results=1000)


def _baseline(client, split: str, name: str):
    (run,) = _runs(client, split, f"tags.`emnist_hpo.kind` = 'baseline' and tags.`emnist_hpo.baselines.experiment` = '{name}'")
    return run


@pytest.fixture(scope="module")
def board(store) -> pd.DataFrame:
    return pd.read_csv(store["out"] / "leaderboard.csv")


def test_report_files_are_written_only_into_the_output_folder(store):
    assert sorted(p.name for p in store["out"].iterdir()) == sorted(FILES)
    assert not (store["root"] / "mlruns" / "compare").exists()  # the default folder was not used


def test_leaderboard_rows_per_split(board):
    assert set(board["split"]) == {"letters", "digits"}
    letters = board[board["split"] == "letters"]
    assert list(letters["role"]) == ["champion", "baseline", "baseline"]
    assert set(letters[letters["role"] == "baseline"]["name"]) == {"lenet", "knn"}
    digits = board[board["split"] == "digits"]
    assert list(digits["role"]) == ["baseline"] and list(digits["name"]) == ["knn"]
    for col in ("test_accuracy", "val_accuracy", "params", "model_size_bytes", "train_seconds", "architecture",
                "delta_vs_research_pp", "same_data", "run_id"):
        assert col in board.columns


def test_champion_row_matches_the_registry_and_its_runs(store, board):
    client = _client(store)
    mv = client.get_model_version_by_alias("emnist-letters", "champion")
    final = client.get_run(mv.run_id)
    row = board[(board["split"] == "letters") & (board["role"] == "champion")].iloc[0]
    assert row["run_id"] == mv.run_id
    assert row["test_accuracy"] == pytest.approx(final.data.metrics["test_accuracy"])
    assert row["val_accuracy"] == pytest.approx(final.data.metrics["val_accuracy"])
    assert row["params"] == int(final.data.metrics["params"])
    assert row["epochs"] == int(final.data.params["train.epochs"])
    assert row["architecture"].startswith("conv ") and "dense" in row["architecture"]
    trial = optuna.load_study(study_name="emnist-letters", storage=store["storage"]).trials[int(mv.tags["trial"])]
    assert row["train_seconds"] == pytest.approx(trial.user_attrs["train_seconds"], abs=1e-3)
    assert row["model_size_bytes"] > 4 * row["params"]  # the .keras file holds float32 weights
    research = for_split("letters", "research")[0].accuracy
    assert row["delta_vs_research_pp"] == pytest.approx(100 * row["test_accuracy"] - research, abs=1e-3)
    # the study's training-set size: 80% of the 1,500-image subset (the rest is validation)
    (parent,) = _runs(client, "letters", "tags.`emnist_hpo.kind` = 'study' and tags.`emnist_hpo.engine` = 'optuna'")
    assert row["train_size"] == int(parent.data.params["train_size"]) == 1200


def test_baseline_rows_match_their_runs_and_say_which_saw_the_same_data(store, board):
    client = _client(store)
    letters = board[board["split"] == "letters"].set_index("name")
    champion = letters[letters["role"] == "champion"].iloc[0]
    for name, same in (("lenet", True), ("knn", False)):
        run = _baseline(client, "letters", name)
        row = letters.loc[name]
        assert row["run_id"] == run.info.run_id
        assert row["test_accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])
        assert row["val_accuracy"] == pytest.approx(run.data.metrics["best_val_accuracy"])
        assert row["params"] == int(run.data.metrics["params"])
        assert row["model_size_bytes"] == int(run.data.metrics["model_size_bytes"])
        assert row["train_size"] == int(run.data.params["train_size"]) == (1200 if name == "lenet" else 1600)
        assert bool(row["same_data"]) is same
        assert row["delta_vs_champion_pp"] == pytest.approx(100 * (row["test_accuracy"] - champion["test_accuracy"]),
                                                            abs=1e-3)
    digits_run = _baseline(client, "digits", "knn")
    row = board[board["split"] == "digits"].iloc[0]
    assert row["test_accuracy"] == pytest.approx(digits_run.data.metrics["test_accuracy"])
    assert pd.isna(row["delta_vs_champion_pp"])  # no champion on digits


def test_published_figures_have_sources_and_deltas(store, board):
    pub = pd.read_csv(store["out"] / "published.csv")
    assert len(pub) == len(PUBLISHED) and pub["source"].notna().all() and (pub["source"].str.len() > 10).all()
    assert set(pub[pub["kind"] == "research"]["split"]) == {"balanced", "bymerge", "byclass", "letters", "digits",
                                                            "mnist"}
    champ = board[(board["split"] == "letters") & (board["role"] == "champion")].iloc[0]
    for _, r in pub[pub["split"] == "letters"].iterrows():
        assert r["champion_delta_pp"] == pytest.approx(100 * champ["test_accuracy"] - r["published_accuracy_pct"],
                                                       abs=1e-3)
    assert pub[pub["split"] == "balanced"]["champion_delta_pp"].isna().all()  # nothing ran on balanced
    md = (store["out"] / "leaderboard.md").read_text()
    assert "## letters" in md and "## digits" in md and "## balanced" not in md
    assert md.count("| baseline |") == 3 and md.count("| champion |") == 1
    assert "WaveMix" in md and "SpinalNet" in md


def _letters_no_skill(store) -> float:
    """The no-skill accuracy of the letters studies' validation set, from the data itself."""
    from emnist_hpo.config import DataConfig
    from emnist_hpo.data.prepared import prepare
    from emnist_hpo.search.optuna.pruners import no_skill_accuracy

    data = prepare("letters", store["data"], DataConfig(val_fraction=0.2, max_train_samples=1500, seed=0),
                   progress=False)
    return no_skill_accuracy(data.y_val)


def test_html_report_has_the_pareto_plot_of_the_complete_trials_that_learnt(store):
    client = _client(store)
    trials = [r for r in _runs(client, "letters", "tags.`emnist_hpo.kind` = 'trial'")
              if "best_val_accuracy" in r.data.metrics and "params" in r.data.metrics]
    assert len(trials) == 4  # both engines' trials, on the same data
    no_skill = _letters_no_skill(store)
    shown = [r for r in trials if r.data.tags["optuna.trial_state"] == "COMPLETE"
             and r.data.metrics["best_val_accuracy"] >= 2 * no_skill]
    page = (store["out"] / "compare.html").read_text()
    assert (f"letters: validation accuracy against parameters ({len(shown)} complete trials at or above 2x the "
            f"no-skill accuracy {no_skill:.3f}") in page
    assert f"{len(trials) - len(shown)} pruned, failed or chance-level left out" in page
    assert "digits: validation accuracy" not in page  # no trials on digits
    assert page.count("Plotly.newPlot") == 2 + bool(shown)  # overview, the Pareto plot, the engines
    assert "test accuracy per split" in page
    if shown:  # the parameter axis reads 10k, 100k, 1M
        assert '"ticktext":["' in page.replace(", ", ",") and ('"100k"' in page or '"10k"' in page)


def _fake_study(client, exp_id: str, fp: str, params: dict, trials: list[tuple]) -> list[str]:
    """A study parent run and its trial runs ``(state, best_val_accuracy, params)``, as the study logs them."""
    parent = client.create_run(exp_id, run_name="study-x", tags={
        "emnist_hpo.kind": "study", "optuna.study_name": "x", "emnist_hpo.data_fingerprint": fp}).info.run_id
    for k, v in params.items():
        client.log_param(parent, k, v)
    ids = []
    for i, (state, acc, size) in enumerate(trials):
        run = client.create_run(exp_id, run_name=f"trial-{i}", tags={
            "emnist_hpo.kind": "trial", "optuna.study_name": "x", "optuna.trial_number": str(i),
            "optuna.trial_state": state, "mlflow.parentRunId": parent}).info.run_id
        client.log_metric(run, "best_val_accuracy", acc)
        client.log_metric(run, "params", size)
        ids.append(run)
    return ids


def test_pareto_front_leaves_out_pruned_failed_and_chance_level_trials(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("emnist-digits", artifact_location=(tmp_path / "art").as_uri())
    # no-skill 0.1 logged by the study: chance-level (< 0.2) and pruned trials, though smallest, are off the front
    _fake_study(client, exp, "fp1", {"no_skill_accuracy": "0.1"}, [
        ("COMPLETE", 0.80, 100_000), ("COMPLETE", 0.15, 5_000), ("PRUNED", 0.12, 2_000), ("FAIL", 0.05, 1_000),
        ("COMPLETE", 0.70, 50_000), ("COMPLETE", 0.75, 200_000)])
    pts = collect(client, ["digits"]).trials["digits"].sort_values("params")
    assert list(pts["params"]) == [1_000, 2_000, 5_000, 50_000, 100_000, 200_000]
    assert list(pts["eligible"]) == [False, False, False, True, True, True]
    assert list(pts["pareto"]) == [False, False, False, True, True, False]


def test_no_skill_accuracy_comes_from_the_validation_counts_when_not_logged(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("emnist-digits", artifact_location=(tmp_path / "art").as_uri())
    ids = _fake_study(client, exp, "fp2", {}, [("COMPLETE", 0.55, 10_000), ("COMPLETE", 0.65, 20_000)])
    # validation classes of 30, 25, 25 and 20 images (rows of the confusion matrix): no-skill 0.3
    counts = pd.DataFrame([[20, 5, 5, 0], [0, 25, 0, 0], [5, 0, 20, 0], [0, 0, 0, 20]], index=list("abcd"),
                          columns=list("abcd"))
    (tmp_path / "reports").mkdir()
    counts.to_csv(tmp_path / "reports" / "validation_confusion_matrix.csv")
    client.log_artifact(ids[1], str(tmp_path / "reports" / "validation_confusion_matrix.csv"), "reports")
    pts = collect(client, ["digits"]).trials["digits"].sort_values("params")
    assert list(pts["no_skill"]) == [pytest.approx(0.3), pytest.approx(0.3)]
    assert list(pts["eligible"]) == [False, True]  # 0.55 is under twice 0.3
    assert list(pts["pareto"]) == [False, True]


def test_log_axis_ticks_read_as_thousands_and_millions():
    assert log_ticks([5_000, 900_000]) == ([1e3, 1e4, 1e5, 1e6], ["1k", "10k", "100k", "1M"])
    vals, text = log_ticks([20_000, 300_000])
    assert text == ["10k", "20k", "50k", "100k", "200k", "500k", "1M"] and vals[0] == 1e4 and vals[-1] == 1e6
    assert log_ticks([]) == ([], [])


def test_sampler_name_resolves_the_default():
    assert sampler_name({"sampler": "default", "objectives": "accuracy"}) == "tpe"
    assert sampler_name({"sampler": "default", "objectives": "accuracy,params"}) == "nsga2"
    assert sampler_name({"sampler": "random", "objectives": "accuracy"}) == "random"
    assert sampler_name({}) == "tpe"


def test_comparison_is_logged_to_its_own_run(store):
    client = _client(store)
    exp = client.get_experiment_by_name("emnist-compare")
    (run,) = client.search_runs([exp.experiment_id], "tags.`emnist_hpo.kind` = 'compare'")
    assert run.info.status == "FINISHED"
    assert {f.path for f in client.list_artifacts(run.info.run_id, "compare")} == {f"compare/{n}" for n in FILES}
    champion = client.get_run(client.get_model_version_by_alias("emnist-letters", "champion").run_id)
    assert run.data.metrics["letters.champion_test_accuracy"] == pytest.approx(champion.data.metrics["test_accuracy"])


def test_study_parent_run_has_optuna_plots_and_the_edge_warning(store):
    client = _client(store)
    (parent,) = _runs(client, "letters", "tags.`emnist_hpo.kind` = 'study' and tags.`emnist_hpo.engine` = 'optuna'")
    files = {f.path for f in client.list_artifacts(parent.info.run_id, "study")}
    assert "study/optuna_plots.html" in files
    page = Path(client.download_artifacts(parent.info.run_id, "study/optuna_plots.html")).read_text()
    for title in ("optimization history", "parameter importances", "parallel coordinates", "slice",
                  "intermediate values"):
        assert f"<h2>{title}</h2>" in page
    assert page.count("Plotly.newPlot") >= 4
    # what decided the trials' speed and rounding beyond their config, for reproducing them
    from emnist_hpo.train.trainer import onednn_enabled

    assert parent.data.tags["emnist_hpo.keras_backend"] == keras.backend.backend()
    assert parent.data.tags["emnist_hpo.onednn"] == str(onednn_enabled()).lower()
    assert parent.data.tags["emnist_hpo.auto_precision"] in ("float32", "mixed_bfloat16")
    study = optuna.load_study(study_name="emnist-letters", storage=store["storage"])
    space = SearchSpace.load(REPO / "search_spaces" / "default.yaml")
    expected = edge_warning(space, study.best_trial)
    assert parent.data.tags.get("emnist_hpo.edge_warning") == expected
    if expected:
        assert expected in page.replace("&#x27;", "'")


def test_engines_are_compared_side_by_side_on_their_budgets(store):
    client = _client(store)
    eng = pd.read_csv(store["out"] / "engines.csv")
    assert sorted(eng["engine"]) == ["keras-tuner", "optuna"] and set(eng["split"]) == {"letters"}
    parents = {r.data.tags["emnist_hpo.engine"]: r
               for r in _runs(client, "letters", "tags.`emnist_hpo.kind` = 'study'")}
    for _, row in eng.iterrows():
        parent = parents[row["engine"]]
        assert row["run_id"] == parent.info.run_id
        assert row["study"] == ("emnist-letters" if row["engine"] == "optuna" else "letters-kt")
        assert row["test_accuracy"] == pytest.approx(parent.data.metrics["test_accuracy"])
        assert row["best_val_accuracy"] == pytest.approx(parent.data.metrics["best_val_accuracy"])
        assert row["champion_params"] == int(parent.data.metrics["champion_params"])
        assert (row["trials"], row["epochs"]) == (2, 1)
        wall = (parent.info.end_time - parent.info.start_time) / 1000
        assert row["wall_seconds"] == pytest.approx(wall, abs=0.1) and wall > 0
        assert bool(row["same_budget"]) is True  # 2 trials x 1 epoch each, on the same data
    assert eng.set_index("engine").loc["keras-tuner", "algorithm"] == "keras-tuner bayesian"
    assert eng.set_index("engine").loc["optuna", "algorithm"] == "tpe sampler, successive-halving pruner"  # the default
    md = (store["out"] / "leaderboard.md").read_text()
    assert "## Search engines" in md and "| letters | keras-tuner | keras-tuner bayesian | letters-kt | 2 | 1 |" in md
    assert "search engines: champion test accuracy against study wall time" in (store["out"] / "compare.html").read_text()


def test_edge_warning_skips_limits_of_the_parameter_itself():
    space = SearchSpace.load(REPO / "search_spaces" / "default.yaml")
    params = {"conv_blocks": 1, "conv_dropout": 0.0, "dense_layers": 2, "learning_rate": 1e-2, "filters_0": 64,
              "augment": 0.0}
    assert set(space.edges(params)) >= {"conv_blocks", "conv_dropout", "dense_layers", "learning_rate"}
    # no dropout and one block cannot be widened past; two dense layers and lr 1e-2 can
    assert edge_params(space, params) == ["dense_layers", "learning_rate"]
    trial = optuna.trial.create_trial(params={"conv_dropout": 0.1, "learning_rate": 1e-3}, distributions={
        "conv_dropout": optuna.distributions.FloatDistribution(0, 0.4),
        "learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}, value=0.5)
    assert edge_warning(space, trial) is None


def test_edge_warning_skips_the_deepest_stack_the_image_holds(tmp_path):
    default = SearchSpace.load(REPO / "search_spaces" / "default.yaml")  # conv_blocks 1..4, padding same
    four = {"conv_blocks": 4, "kernel_0": 3, "kernel_1": 5, "kernel_2": 3, "kernel_3": 3, "convs_per_block": 2}
    assert "conv_blocks" in default.edges(four)
    assert "conv_blocks" not in edge_params(default, four)  # 28 -> 14 -> 7 -> 3 -> 1: a fifth block is 0x0
    rest = "filters: 16\ndense_layers: 0\ndense_units: 64\nlearning_rate: 1.0e-3\n"
    shallow = tmp_path / "shallow.yaml"  # three blocks of a space that could hold four
    shallow.write_text("conv_blocks: {low: 1, high: 3}\nkernel: {choices: [3, 5]}\npadding: same\n" + rest)
    assert edge_params(SearchSpace.load(shallow), {"conv_blocks": 3, "kernel_0": 3}) == ["conv_blocks"]
    valid = tmp_path / "valid.yaml"  # padding valid with 5x5 kernels: 28 -> 12 -> 4 -> 0 holds two blocks
    valid.write_text("conv_blocks: {low: 1, high: 2}\nkernel: {choices: [3, 5]}\npadding: valid\n" + rest)
    assert edge_params(SearchSpace.load(valid), {"conv_blocks": 2, "kernel_0": 5, "kernel_1": 5}) == []
    assert edge_params(SearchSpace.load(valid), {"conv_blocks": 2, "kernel_0": 3, "kernel_1": 3}) == ["conv_blocks"]


def test_pareto_mask_keeps_only_undominated_points():
    params = [100, 200, 300, 150, 300]
    acc = [0.5, 0.7, 0.6, 0.5, 0.9]
    assert pareto_mask(params, acc) == [True, True, False, False, True]


def test_compare_on_an_empty_store_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", "--output", str(out), "--tracking-uri", f"sqlite:///{tmp_path}/empty.db"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("emnist-hpo: error: nothing to compare")
    assert not out.exists()
    assert MlflowClient(f"sqlite:///{tmp_path}/empty.db").get_experiment_by_name("emnist-compare") is None


def test_multi_objective_study_plots_show_the_pareto_front():
    from emnist_hpo.reporting.study_plots import plots_html

    study = optuna.create_study(study_name="two-objectives", directions=["maximize", "minimize"])
    dists = {"learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
             "filters_0": optuna.distributions.CategoricalDistribution([8, 16, 32])}
    for i, (lr, f, acc, n) in enumerate([(1e-3, 8, 0.80, 5e4), (3e-3, 16, 0.85, 1e5), (1e-4, 32, 0.70, 3e5),
                                         (5e-3, 32, 0.88, 3e5)]):
        study.add_trial(optuna.trial.create_trial(params={"learning_rate": lr, "filters_0": f},
                                                  distributions=dists, values=[acc, n]))
    page = plots_html(study)
    assert "<h2>Pareto front</h2>" in page and "<h2>intermediate values</h2>" not in page
    assert page.count("Plotly.newPlot") == 5  # history, importances, parallel coordinates, slice, Pareto front
    # the parameter axis of the Pareto front: log scale, read as 50k, 100k, 200k
    compact = page.replace(" ", "")
    assert '"ticktext":["10k","20k","50k","100k","200k","500k","1M"]' in compact and '"type":"log"' in compact


def test_printed_summary_lists_the_engines(store):
    from emnist_hpo.reporting.compare import collect, summary
    from emnist_hpo.tracking.tracker import make_client

    text = summary(collect(make_client(store["tracking"]), ["letters"]))
    lines = [ln for ln in text.splitlines() if "letters-kt" in ln or "emnist-letters" in ln and "sampler" in ln]
    assert len(lines) == 2 and any("keras-tuner bayesian" in ln for ln in lines)
    assert all(" 2 x 1 " in ln for ln in lines)
