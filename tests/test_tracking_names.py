"""What the MLflow UI shows of our runs: model-training experiments with notes, trial runs named by outcome.

A real (SQLite) MLflow store; trials and their outcomes are made by hand, so no
training runs here (``test_browser.py`` checks a real study in the UI itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from emnist_hpo.config import ExperimentConfig
from emnist_hpo.train.hooks import TrialOutcome
from emnist_hpo.tracking.tracker import MODEL_TRAINING_KIND, TAG_EXPERIMENT_KIND, TAG_NOTE, MlflowTrialHooks, Tracker
from emnist_hpo.train.trainer import RungResult, TrainResult

STORAGE = "postgresql+psycopg2://emnist:s3cret-pw@db:5432/optuna"


@dataclass
class FakeTrial:
    """What the hooks read of an Optuna trial."""

    number: int
    params: dict[str, Any] = field(default_factory=dict)
    user_attrs: dict[str, Any] = field(default_factory=dict)

    def set_user_attr(self, key: str, value: Any) -> None:
        self.user_attrs[key] = value


def _result(val_history: list[float], rungs: int = 0) -> TrainResult:
    return TrainResult(model=None, history={"val_accuracy": val_history, "loss": [1.0] * len(val_history)},
                       params=12_345, best_epoch=1 + val_history.index(max(val_history)),
                       best_val_accuracy=max(val_history), val_score=val_history[-1], train_seconds=1.0,
                       epoch_times=[0.5] * len(val_history),
                       rungs=[RungResult(i, val_history[-1], 100, 1.0, 1) for i in range(rungs)])


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "emnist-letters")
    parent = tracker.start_run("study-emnist-letters", {"emnist_hpo.kind": "study", "optuna.study_name": "emnist-letters",
                                                        "optuna.storage": STORAGE, "emnist_hpo.engine": "optuna"})
    return tracker, parent, MlflowClient(uri)


def test_experiments_are_model_training_experiments_with_a_description(store):
    tracker, _, client = store
    exp = client.get_experiment(tracker.experiment_id)
    assert exp.tags[TAG_EXPERIMENT_KIND] == MODEL_TRAINING_KIND == "custom_model_development"
    note = exp.tags[TAG_NOTE]
    assert "EMNIST **letters** (26 classes" in note and "emnist-letters" in note and "study-<study>" in note
    compare = client.get_experiment(Tracker(tracker.tracking_uri, "emnist-compare").experiment_id)
    assert compare.tags[TAG_EXPERIMENT_KIND] == MODEL_TRAINING_KIND and "leaderboard" in compare.tags[TAG_NOTE]


def test_existing_experiments_get_the_tags_they_lack_and_keep_what_a_person_set(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    bare = client.create_experiment("emnist-digits")  # made before the tags existed
    chosen = client.create_experiment("emnist-mnist", tags={TAG_EXPERIMENT_KIND: "genai_development",
                                                            TAG_NOTE: "my own notes"})
    assert Tracker(uri, "emnist-digits").experiment_id == bare
    assert client.get_experiment(bare).tags[TAG_EXPERIMENT_KIND] == MODEL_TRAINING_KIND
    assert "EMNIST **digits**" in client.get_experiment(bare).tags[TAG_NOTE]
    Tracker(uri, "emnist-mnist")
    assert client.get_experiment(chosen).tags == {TAG_EXPERIMENT_KIND: "genai_development", TAG_NOTE: "my own notes"}


@pytest.mark.parametrize("state, attrs, outcome, name", [
    ("COMPLETE", {}, dict(result=[0.5, 0.81234, 0.8]), "trial-12 val=0.8000"),  # its score: the model it ended with
    ("COMPLETE", {"seed_experiment": "two_conv"}, dict(result=[0.80111]), "trial-12 seed=two_conv val=0.8011"),
    ("PRUNED", {}, dict(result=[0.3, 0.41], reason="pruned at epoch 2 (val_accuracy 0.4100)"),
     "trial-12 pruned@epoch2 val=0.4100"),
    ("PRUNED", {}, dict(result=[0.3, 0.41], rungs=2, reason="pruned at rung 1 (val_accuracy 0.4100): rank 5 of 9"),
     "trial-12 pruned@rung1 val=0.4100"),
    ("PRUNED", {}, dict(reason="model needs 35M FLOPs per image > --max-flops 10M"), "trial-12 pruned >max-flops"),
    ("PRUNED", {}, dict(result=[0.3], rungs=1, reason="time budget: rung 1 would take ~90 s and 20 s are left"),
     "trial-12 pruned time-budget"),
    ("PRUNED", {"params": 928_947}, dict(reason="model has 928,947 parameters > --max-params 232,000"),
     "trial-12 pruned params=929k>max-params"),
    ("PRUNED", {}, dict(result=[0.1], reason="loss became NaN or inf"), "trial-12 pruned nan-loss"),
    ("FAIL", {}, dict(reason="ResourceExhaustedError: OOM"), "trial-12 failed"),
    ("FAIL", {}, dict(reason="interrupted"), "trial-12 interrupted"),
])
def test_trial_runs_are_renamed_with_their_outcome(store, state, attrs, outcome, name):
    tracker, parent, client = store
    hooks = MlflowTrialHooks(tracker, parent, "letters", "emnist-letters", plots=False)
    trial = FakeTrial(12, {"learning_rate": 1e-3}, dict(attrs))
    hooks.on_trial_begin(trial, ExperimentConfig())
    run_id = trial.user_attrs["mlflow_run_id"]
    result = _result(outcome["result"], outcome.get("rungs", 0)) if "result" in outcome else None
    hooks.on_trial_end(trial, TrialOutcome(state, ExperimentConfig(), result, None, outcome.get("reason")))
    run = client.get_run(run_id)
    assert run.info.run_name == name and run.data.tags["mlflow.runName"] == name
    assert run.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "KILLED" if "interrupt" in name
                                                                              else "FAILED")


def test_each_trial_run_has_a_note_naming_its_optuna_trial_without_the_password(store):
    tracker, parent, client = store
    hooks = MlflowTrialHooks(tracker, parent, "letters", "emnist-letters")
    trial = FakeTrial(7, user_attrs={"seed_experiment": "compact"})
    hooks.on_trial_begin(trial, ExperimentConfig())
    run_id = trial.user_attrs["mlflow_run_id"]
    assert trial.user_attrs["mlflow_run"] == tracker.run_link(run_id)  # the Optuna trial points at its run
    note = client.get_run(run_id).data.tags[TAG_NOTE]
    assert "Optuna trial **7** of study `emnist-letters`" in note
    assert "postgresql+psycopg2://emnist:***@db:5432/optuna" in note and "s3cret" not in note
    assert "compact" in note
    hooks.on_trial_end(trial, TrialOutcome("PRUNED", ExperimentConfig(), _result([0.05]), None,
                                           "pruned at epoch 1 (val_accuracy 0.0500)"))
    note = client.get_run(run_id).data.tags[TAG_NOTE]
    assert "Optuna trial **7**" in note and "Outcome: PRUNED (pruned at epoch 1" in note
    # the study is listed once in the experiment's note, however many hooks (processes) open it
    MlflowTrialHooks(tracker, parent, "letters", "emnist-letters")
    exp_note = client.get_experiment(tracker.experiment_id).tags[TAG_NOTE]
    assert exp_note.count("- `emnist-letters` (optuna, postgresql+psycopg2://emnist:***@db:5432/optuna)") == 1
    assert "s3cret" not in exp_note


def test_links_open_the_runs_table_in_the_model_training_view(store):
    tracker, parent, _ = store
    exp = tracker.experiment_id
    assert tracker.experiment_link() == f"#/experiments/{exp}/runs?workflowType=machine_learning"
    assert tracker.run_link(parent) == f"#/experiments/{exp}/runs/{parent}?workflowType=machine_learning"
    server = Tracker.__new__(Tracker)  # the same links on a tracking server: full URLs, password redacted
    server.tracking_uri, server.experiment_id = "http://user:pw@mlflow:5000/", "7"
    assert server.experiment_link() == "http://user:***@mlflow:5000/#/experiments/7/runs?workflowType=machine_learning"


def test_registered_model_and_version_descriptions(tmp_path):
    """The registry says what the model is, what it takes and how to load it; each version where it came from."""
    from emnist_hpo.tracking.registry import _describe

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "emnist-digits")
    run = tracker.start_run("champion-trial-4")
    client = tracker.client
    client.create_registered_model("emnist-digits")
    mv = client.create_model_version("emnist-digits", source=f"{tmp_path.as_uri()}/model", run_id=run)
    tags = {"study": "emnist-digits", "trial": 4, "val_accuracy": "0.812300", "params": 190_000, "final_fit": True,
            "engine": "optuna"}
    _describe(tracker, "emnist-digits", mv.version, "digits", tags, 0.8011)
    model = client.get_registered_model("emnist-digits").description
    assert "EMNIST **digits** (10 classes)" in model
    assert "uint8 images of shape (N, 28, 28)" in model and 'load_model("models:/emnist-digits@champion")' in model
    assert "python -m emnist_hpo predict --split digits" in model
    version = client.get_model_version("emnist-digits", mv.version).description
    assert version.startswith("Champion of study `emnist-digits` (trial 4, optuna).")
    assert "test accuracy 0.8011, validation accuracy 0.8123, 190,000 parameters" in version.lower()
    # a description someone wrote in the registry stays; the version's is the project's own
    client.update_registered_model("emnist-digits", description="ours, by hand")
    _describe(tracker, "emnist-digits", mv.version, "digits", tags, 0.8011)
    assert client.get_registered_model("emnist-digits").description == "ours, by hand"
