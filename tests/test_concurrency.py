"""Several processes on one study: ``study --workers N`` and independent processes on shared stores.

Real processes, real stores: the embedded SQLite files, and PostgreSQL at
127.0.0.1:5432 (a fresh database per test) behind a real ``mlflow server``.
Every test checks the stores afterwards: exactly the requested number of
finished trials, one MLflow run per trial and no duplicate, no run left
RUNNING, and the champion finalized and registered exactly once.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from emnist_hpo.search.optuna.slots import FINALIZE_ATTR
from emnist_hpo.serve.ui import start_mlflow_server, stop_process, wait_http

pytestmark = pytest.mark.slow  # several real study processes: the full suite (CI) runs them

SPACE = """\
conv_blocks: 1
filters: {choices: [4, 8]}
kernel: 3
dense_layers: 0
dense_units: 16
batch_size: 128
learning_rate: {low: 1.0e-3, high: 1.0e-2, log: true}
"""
PG = "postgresql://postgres@127.0.0.1:5432"


@pytest.fixture
def workdir(tmp_path, sample_dir):
    (tmp_path / "space.yaml").write_text(SPACE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST", "MLFLOW_TRACKING_URI")}
    env.update(EMNIST_DATA_DIR=str(sample_dir), EMNIST_HPO_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    return tmp_path, env


def _study_args(trials: int, *extra: str) -> list[str]:
    return ["study", "--split", "digits", "--trials", str(trials), "--epochs", "2", "--max-train-samples", "1000",
            "--search-space", "space.yaml", "--no-warm-start", "--no-progress", "--sampler", "random",
            "--pruner", "median", "--finalists", "0", *extra]


def _start(args: list[str], cwd: Path, env: dict, name: str) -> subprocess.Popen:
    log = open(cwd / f"{name}.log", "w")  # noqa: SIM115 - closed by the OS when the process ends
    return subprocess.Popen([sys.executable, "-m", "emnist_hpo", *args], cwd=cwd, env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _wait_all(procs: dict[str, subprocess.Popen], cwd: Path, timeout: float = 400) -> None:
    for name, p in procs.items():
        rc = p.wait(timeout=timeout)
        assert rc == 0, f"{name} exited {rc}:\n" + (cwd / f"{name}.log").read_text()[-3000:]


def _check_stores(storage: str, tracking: str, study_name: str, trials: int, min_owners: int) -> None:
    study = optuna.load_study(study_name=study_name, storage=storage)
    states = Counter(t.state.name for t in study.trials)
    finished = states["COMPLETE"] + states["PRUNED"]
    assert finished == trials, f"{trials} finished trials wanted, got {dict(states)}"
    assert states["RUNNING"] == 0 and states["WAITING"] == 0, dict(states)
    draws = [t.params["learning_rate"] for t in study.trials]
    assert len(set(draws)) == len(draws), f"processes drew the same parameters: {sorted(draws)}"
    owners = {t.user_attrs["owner"] for t in study.trials}
    assert len(owners) >= min_owners, f"trials ran in {len(owners)} process(es): {owners}"
    for t in study.trials:  # every rung's score reached the shared storage, where every worker's pruner reads it
        if t.state.name == "COMPLETE":
            steps = [r["step"] for r in t.user_attrs["rungs"]]
            assert steps and sorted(t.intermediate_values) == steps

    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("emnist-digits")
    runs = client.search_runs([exp.experiment_id], f"tags.`optuna.study_name` = '{study_name}'", max_results=1000)
    trial_runs = [r for r in runs if r.data.tags["emnist_hpo.kind"] == "trial"]
    numbers = Counter(int(r.data.tags["optuna.trial_number"]) for r in trial_runs)
    assert numbers == Counter(t.number for t in study.trials), "one MLflow run per Optuna trial, no duplicate"
    for r in trial_runs:
        assert r.data.tags["optuna.trial_state"] == study.trials[int(r.data.tags["optuna.trial_number"])].state.name
        assert study.trials[int(r.data.tags["optuna.trial_number"])].user_attrs["mlflow_run_id"] == r.info.run_id
    assert all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    finals = [r for r in runs if r.data.tags["emnist_hpo.kind"] == "final"]
    assert len(finals) == 1, f"the champion was finalized {len(finals)} times"

    versions = client.search_model_versions("name = 'emnist-digits'")
    mine = [v for v in versions if v.tags.get("study") == study_name]
    assert len(mine) == 1, f"the champion was registered {len(mine)} times"
    assert study.user_attrs[FINALIZE_ATTR]["state"] == "done"
    assert study.user_attrs[FINALIZE_ATTR]["registered"]["version"] == str(mine[0].version)
    champion = client.get_model_version_by_alias("emnist-digits", "champion")
    assert str(champion.version) == str(mine[0].version) and champion.status == "READY"
    mlflow.set_tracking_uri(tracking)
    proba = mlflow.pyfunc.load_model("models:/emnist-digits@champion").predict(np.zeros((3, 28, 28), np.uint8))
    assert proba.shape == (3, 10)


def test_two_studies_with_two_workers_each_share_the_default_sqlite_stores(workdir):
    """``--workers 2`` twice at once: four trial processes and two would-be finalizers on the same SQLite files."""
    cwd, env = workdir
    procs = {f"study{i}": _start(_study_args(4, "--workers", "2"), cwd, env,
                                 f"study{i}") for i in range(2)}
    _wait_all(procs, cwd)
    logs = "".join((cwd / f"study{i}.log").read_text() for i in range(2))
    assert "database is locked" not in logs
    assert logs.count("test accuracy") == 2  # both print the summary; only one of them finalized
    assert "already finalized" in logs or "being finalized by another process" in logs
    _check_stores(f"sqlite:///{cwd}/mlruns/optuna.db", f"sqlite:///{cwd}/mlruns/mlflow.db", "emnist-digits",
                  trials=4, min_owners=2)


@pytest.fixture
def postgres_dbs():
    """Two fresh PostgreSQL databases (Optuna's and MLflow's), dropped afterwards."""
    import psycopg2

    names = [f"emnist_hpo_test_{uuid.uuid4().hex[:10]}_{what}" for what in ("optuna", "mlflow")]
    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        for name in names:
            cur.execute(f'CREATE DATABASE "{name}"')
    yield [f"{PG}/{name}" for name in names]
    with conn.cursor() as cur:
        for name in names:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.postgres
def test_independent_processes_share_postgresql_and_an_mlflow_server(workdir, postgres_dbs):
    """Three independent ``study`` commands, 2 trials' worth each: 6 trials, 6 runs, one registration."""
    cwd, env = workdir
    optuna_url, mlflow_db = postgres_dbs
    port = _free_port()
    server = start_mlflow_server(mlflow_db, host="127.0.0.1", port=port, artifacts_destination=cwd / "served",
                                 serve_artifacts=True, log_file=cwd / "mlflow-server.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=180, proc=server)
        tracking = f"http://127.0.0.1:{port}"
        args = _study_args(6, "--storage", optuna_url, "--tracking-uri", tracking)
        procs = {f"worker{i}": _start(args, cwd, env, f"worker{i}") for i in range(3)}
        _wait_all(procs, cwd)
        _check_stores(optuna_url, tracking, "emnist-digits", trials=6, min_owners=2)
        # artifacts went through the server into its destination, not next to the clients
        assert any((cwd / "served").rglob("validation_confusion_matrix.csv"))
        assert not list(cwd.glob("mlruns/*.db")) and not (cwd / "mlruns" / "artifacts").exists()
    finally:
        stop_process(server)
