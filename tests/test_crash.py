"""Nothing lost: real ``python -m emnist_hpo study`` processes killed at known moments, then resumed.

The test hook ``EMNIST_HPO_TEST_PAUSE_AT=<phase>[#<n>]`` (see
:mod:`emnist_hpo.coordination`) makes the process print
``test pause at <phase>`` and sleep at the n-th time it reaches ``training``
(an epoch's end), ``artifacts`` (half of a run's report files logged) or
``register`` (a model version created, the alias not yet moved); the test
waits for that line, then sends SIGKILL, SIGINT or SIGTERM, and reads the stores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow  # end-to-end studies: the full suite (CI) runs them, `-m 'not slow'` skips them

SPACE = """\
conv_blocks: 1
filters: {choices: [4, 8]}
kernel: 3
dense_layers: 0
dense_units: 16
batch_size: 128
learning_rate: {low: 1.0e-3, high: 1.0e-2, log: true}
"""
ARGS = ["study", "--split", "digits", "--trials", "3", "--epochs", "2", "--max-train-samples", "1000",
        "--search-space", "space.yaml", "--no-warm-start", "--no-progress", "--sampler", "random", "--pruner", "none",
        "--finalists", "0"]


@pytest.fixture
def workdir(tmp_path, sample_dir):
    (tmp_path / "space.yaml").write_text(SPACE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST", "MLFLOW_TRACKING_URI")}
    env.update(EMNIST_DATA_DIR=str(sample_dir), EMNIST_HPO_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    return tmp_path, env


def _run(cwd: Path, env: dict, args=ARGS, timeout: float = 300) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "emnist_hpo", *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _run_until_pause(cwd: Path, env: dict, phase: str, args=ARGS, sig: int = signal.SIGKILL):
    """Start the study, wait until it pauses at ``phase``, send ``sig``; return (exit code, stderr)."""
    err = cwd / f"stderr-{phase.replace('#', '-')}-{sig}.txt"
    with open(err, "w") as f:
        # Ctrl-C as a terminal delivers it, even when these tests run from a background job (a shell without job
        # control starts those with SIGINT ignored, and a Python started so keeps ignoring it)
        proc = subprocess.Popen([sys.executable, "-m", "emnist_hpo", *args], cwd=cwd,
                                env={**env, "EMNIST_HPO_TEST_PAUSE_AT": phase}, stdout=subprocess.DEVNULL, stderr=f,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while "test pause at" not in err.read_text():
        assert proc.poll() is None, f"ended ({proc.returncode}) before pausing at {phase}:\n{err.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"never paused at {phase}"
        time.sleep(0.2)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    return code, err.read_text()


def _stores(cwd: Path):
    study = optuna.load_study(study_name="emnist-digits", storage=f"sqlite:///{cwd}/mlruns/optuna.db")
    client = MlflowClient(f"sqlite:///{cwd}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("emnist-digits")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return study, client, runs


def _trial_run(runs, number: int):
    found = [r for r in runs if r.data.tags.get("emnist_hpo.kind") == "trial"
             and r.data.tags["optuna.trial_number"] == str(number)]
    assert len(found) == 1, f"trial {number} has {len(found)} runs"
    return found[0]


def _artifacts(run) -> dict[str, int]:
    root = Path(unquote(urlparse(run.info.artifact_uri).path))
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def test_kill_9_while_training_logging_and_registering_loses_nothing(workdir):
    cwd, env = workdir

    # 1. killed in the second trial's first epoch: trial 0 is finished, trial 1 dies RUNNING
    code, _ = _run_until_pause(cwd, env, "training#3")
    assert code == -signal.SIGKILL
    study, _, runs = _stores(cwd)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]
    kept = {0: _artifacts(_trial_run(runs, 0))}
    assert {"reports/validation_confusion_matrix.csv", "reports/validation_per_class.csv"} <= set(kept[0])

    # 2. resumed: trial 1 is failed at once (its process is dead); killed while trial 2 logs its reports
    code, err = _run_until_pause(cwd, env, "artifacts")
    assert code == -signal.SIGKILL
    assert "trial(s) 1 of a process that died are marked FAIL" in err
    study, _, runs = _stores(cwd)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "RUNNING"]
    assert "died" in study.trials[1].user_attrs["fail_reason"]
    assert _trial_run(runs, 1).info.status == "FAILED"
    half = _artifacts(_trial_run(runs, 2))
    assert "reports/validation_confusion_matrix.csv" in half and "reports/validation_per_class.csv" not in half

    # 3. resumed: two more trials finish the study; killed after the model version is created, before the alias
    code, _ = _run_until_pause(cwd, env, "register")
    assert code == -signal.SIGKILL
    study, client, runs = _stores(cwd)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert _trial_run(runs, 2).info.status == "FAILED"
    kept.update({n: _artifacts(_trial_run(runs, n)) for n in (3, 4)})
    assert [str(v.version) for v in client.search_model_versions("name = 'emnist-digits'")] == ["1"]
    with pytest.raises(Exception):
        client.get_model_version_by_alias("emnist-digits", "champion")  # never set on the half-done version

    # 4. resumed: nothing left to train; the dead finalizer's claim is taken over and the champion registered
    res = _run(cwd, env)
    assert "already has 3 finished trials" in res.stderr
    study, client, runs = _stores(cwd)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    for n, files in kept.items():  # every finished trial's artifacts are intact (the champion's gains its plots)
        now = _artifacts(_trial_run(runs, n))
        assert {k: now.get(k) for k in files} == files
        assert _trial_run(runs, n).info.status == "FINISHED"
    finals = sorted((r for r in runs if r.data.tags["emnist_hpo.kind"] == "final"), key=lambda r: r.info.start_time)
    assert [r.info.status for r in finals] == ["FAILED", "FINISHED"]
    champion = client.get_model_version_by_alias("emnist-digits", "champion")
    assert str(champion.version) == "2" and champion.status == "READY"
    assert champion.tags["trial"] == str(study.user_attrs["champion"]["trial"])  # the trial the study crowned
    mlflow.set_tracking_uri(f"sqlite:///{cwd}/mlruns/mlflow.db")
    proba = mlflow.pyfunc.load_model("models:/emnist-digits@champion").predict(np.zeros((4, 28, 28), np.uint8))
    assert proba.shape == (4, 10) and np.allclose(proba.to_numpy().sum(axis=1), 1, atol=1e-4)


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_and_sigterm_close_the_trial_and_say_how_to_resume(workdir, sig, code, word):
    cwd, env = workdir
    got, err = _run_until_pause(cwd, env, "training#3", sig=sig)
    assert got == code, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    # what was kept, then how to go on, with the interpreter that ran it (a venv's need not be first on PATH)
    assert "1 finished trial saved; trial 1 stopped mid-training and continues from its last finished epoch" in err
    assert lines[-1].startswith(f"emnist-hpo: {word}. Resume with: {sys.executable} -m emnist_hpo study")
    assert "Traceback" not in err
    study, _, runs = _stores(cwd)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    assert study.trials[1].user_attrs["fail_reason"].startswith("interrupted")
    assert _trial_run(runs, 1).info.status == "KILLED"
    assert _trial_run(runs, 0).info.status == "FINISHED"
    parents = [r for r in runs if r.data.tags["emnist_hpo.kind"] == "study"]
    assert [r.info.status for r in parents] == ["KILLED"]
    assert all(r.info.status != "RUNNING" for r in runs)


TINY = """\
description: "a seed experiment inside space.yaml"
model:
  conv_blocks: [{filters: 8, kernel: 3}]
  dense: []
train:
  learning_rate: 0.003
"""


def test_an_interrupted_seed_trial_continues_from_its_last_epoch(workdir):
    """Ctrl-C in the second epoch of the seed trial; the same command again continues it from epoch 2."""
    cwd, env = workdir
    (cwd / "experiments").mkdir()
    (cwd / "experiments" / "tiny.yaml").write_text(TINY)
    args = [a for a in ARGS if a != "--no-warm-start"]
    args[args.index("--trials") + 1], args[args.index("--epochs") + 1] = "2", "3"
    args += ["--seed-experiments", "tiny"]
    code, err = _run_until_pause(cwd, env, "training#2", args=args, sig=signal.SIGINT)
    assert code == 130, err[-3000:]
    assert "0 finished trials saved; trial 0 stopped mid-training and continues from its last finished epoch" in err
    study, _, _ = _stores(cwd)
    assert [(t.state.name, t.user_attrs.get("seed_experiment")) for t in study.trials] == [("FAIL", "tiny")]
    kept = list((cwd / "mlruns" / "checkpoints").glob("emnist-digits-*/running_0.npz"))
    assert len(kept) == 1, kept

    # a study of the same name in another storage, same folder: its trial 0 is its own, trained from scratch, even
    # with the interrupted trial 0's checkpoint in its own checkpoint folder (a deleted study's, whose id it got)
    from emnist_hpo.search.optuna.storage import checkpoint_folder

    url = f"sqlite:///{cwd}/other.db"
    mine = checkpoint_folder(cwd / "mlruns" / "checkpoints", optuna.create_study(
        study_name="emnist-digits", storage=url, direction="maximize"), url)
    assert mine != kept[0].parent
    mine.mkdir(parents=True)
    for f in kept[0].parent.glob("running_0.*"):
        (mine / f.name).write_bytes(f.read_bytes())
    other = _run(cwd, env, args=[*args, "--trials", "1", "--no-final-fit", "--no-register", "--storage", url,
                                 "--tracking-uri", f"sqlite:///{cwd}/other-mlflow.db"])
    first = optuna.load_study(study_name="emnist-digits", storage=f"sqlite:///{cwd}/other.db").trials[0]
    assert first.state.name == "COMPLETE" and "resume_of" not in first.user_attrs, other.stderr[-2000:]
    assert first.user_attrs["epochs_run"] == 3 and first.user_attrs["train_seconds"] > 0
    assert [m.step for m in MlflowClient(f"sqlite:///{cwd}/other-mlflow.db").get_metric_history(
        first.user_attrs["mlflow_run_id"], "loss")] == [1, 2, 3]  # all three epochs trained here
    assert kept[0].is_file()  # the interrupted study's checkpoint is untouched

    res = _run(cwd, env, args=args)
    assert "trial(s) 0 were interrupted: queued to continue from their last epoch" in res.stderr
    study, client, runs = _stores(cwd)
    states = [(t.state.name, t.user_attrs.get("seed_experiment"), t.user_attrs.get("resume_of")) for t in study.trials]
    assert states[:2] == [("FAIL", "tiny", None), ("COMPLETE", "tiny", 0)]  # the seed is not lost, nor run twice
    assert len([s for s in states if s[1] == "tiny"]) == 2 and len(states) == 3
    resumed = study.trials[1]
    assert resumed.user_attrs["epochs_run"] == 3  # two epochs from the checkpoint, the third trained here
    steps = [m.step for m in client.get_metric_history(_trial_run(runs, 1).info.run_id, "loss")]
    assert steps == [3]  # its run logged only the epoch it trained
    assert not list((cwd / "mlruns" / "checkpoints").glob("emnist-digits-*/running_1.npz"))  # done: removed
