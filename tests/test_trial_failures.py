"""A trial that diverges (NaN loss) or runs out of memory ends with its reason recorded; the study goes on.

The trials are real: a learning rate of 1e30 really makes the loss NaN, and a
dense layer of 4e9 units really makes TensorFlow refuse the allocation
(ResourceExhaustedError, "OOM when allocating tensor"; the size is far beyond
any machine's memory, so nothing is actually allocated). The three trials are
enqueued in the study first, so which trial gets which parameters is known.
"""

from __future__ import annotations

import optuna
import pytest
from mlflow.tracking import MlflowClient

from emnist_hpo.search.optuna.study import StudyOptions, run_study

pytestmark = pytest.mark.slow  # end-to-end studies: the full suite (CI) runs them, `-m 'not slow'` skips them

SPACE = """\
conv_blocks: 1
filters: 4
kernel: 3
dense_layers: 1
dense_units: {choices: [16, 4000000000]}
batch_size: 128
learning_rate: {choices: [0.001, 1.0e+30]}
"""


def test_nan_and_out_of_memory_trials_do_not_end_the_study(tmp_path, sample_dir, monkeypatch):
    from emnist_hpo.config import LIMITS

    monkeypatch.setitem(LIMITS, "dense_units", 4_000_000_000)  # above the YAML ceiling on purpose: a real OOM
    monkeypatch.setenv("EMNIST_HPO_CACHE", str(tmp_path / "cache"))
    (tmp_path / "space.yaml").write_text(SPACE)
    storage, tracking = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    study = optuna.create_study(study_name="failures", storage=storage, direction="maximize")
    for units, lr in ((16, 1e30), (4_000_000_000, 1e-3), (16, 1e-3)):
        study.enqueue_trial({"dense_units_0": units, "learning_rate": lr})
    res = run_study(StudyOptions(
        split="digits", trials=2, epochs=2, max_train_samples=1000, data_dir=str(sample_dir),
        search_space=str(tmp_path / "space.yaml"), study_name="failures", storage=storage, tracking_uri=tracking,
        warm_start=False, progress=False, pruner="none", finalists=0, register=False,
        checkpoint_dir=str(tmp_path / "ckpt"),
    ), log=lambda m: None)

    trials = res.study.trials
    assert [t.state.name for t in trials] == ["PRUNED", "FAIL", "COMPLETE"]
    assert [t.params["learning_rate"] for t in trials] == [1e30, 1e-3, 1e-3]  # the enqueued order held
    assert trials[0].user_attrs["fail_reason"] == "loss became NaN or inf"
    assert trials[1].user_attrs["fail_reason"].startswith("ResourceExhaustedError")
    assert "OOM" in trials[1].user_attrs["fail_reason"]
    assert res.champion_trial.number == 2 and res.test_accuracy > 0.3

    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("emnist-digits")
    runs = {r.data.tags["optuna.trial_number"]: r for r in
            client.search_runs([exp.experiment_id], "tags.`emnist_hpo.kind` = 'trial'")}
    assert {k: r.info.status for k, r in runs.items()} == {"0": "KILLED", "1": "FAILED", "2": "FINISHED"}
    assert runs["0"].data.tags["emnist_hpo.fail_reason"] == "loss became NaN or inf"
    assert runs["1"].data.tags["emnist_hpo.fail_reason"].startswith("ResourceExhaustedError")
