"""`python -m emnist_hpo.serve.ui serve`: both UIs on real stores, loopback only, clean shutdown.

The stores are made here with Optuna and MLflow directly (no study code), the
servers are real (``mlflow server`` and the Optuna dashboard), and their REST
APIs are what is checked: the UI in a browser is ``test_browser.py``'s part.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from emnist_hpo.serve import ui
from emnist_hpo.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "emnist-letters"
STUDY = "letters-ui-test"


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 30) -> dict:
    """GET (or POST ``body`` as JSON) ``url``, no proxy; the decoded JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=timeout) as response:
        return json.loads(response.read())


def make_stores(root: Path, *, n_trials: int = 2) -> tuple[str, str]:
    """An Optuna study with ``n_trials`` trials and an MLflow experiment with one run, in ``root``.

    Returns ``(optuna_url, tracking_uri)``; the run has a metric and a text artifact
    under ``root/mlruns/artifacts`` (the layout the study uses).
    """
    import optuna
    from mlflow.tracking import MlflowClient

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    (root / "mlruns" / "artifacts").mkdir(parents=True, exist_ok=True)
    optuna_url = f"sqlite:///{root}/mlruns/optuna.db"
    tracking_uri = f"sqlite:///{root}/mlruns/mlflow.db"
    study = optuna.create_study(study_name=STUDY, storage=optuna_url, direction="maximize")
    study.optimize(lambda t: t.suggest_float("learning_rate", 1e-4, 1e-1, log=True), n_trials=n_trials)

    client = MlflowClient(tracking_uri=tracking_uri)
    exp_id = client.create_experiment(EXPERIMENT, artifact_location=(root / "mlruns" / "artifacts").as_uri())
    run = client.create_run(exp_id, run_name="ui-test-run")
    client.log_metric(run.info.run_id, "val_accuracy", 0.5)
    client.log_text(run.info.run_id, "hello", "notes.txt")
    client.set_terminated(run.info.run_id)
    return optuna_url, tracking_uri


class ServeProcess:
    """``python -m emnist_hpo.serve.ui serve`` in a subprocess; its printed URLs once both servers answer."""

    def __init__(self, cwd: Path, storage: str, tracking_uri: str, mlflow_port: int, dashboard_port: int,
                 timeout: float = 120.0) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.pop("MLFLOW_TRACKING_URI", None)
        self.log_dir = cwd / "ui-logs"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "emnist_hpo.serve.ui", "serve", "--storage", storage, "--tracking-uri", tracking_uri,
             "--mlflow-port", str(mlflow_port), "--dashboard-port", str(dashboard_port),
             "--log-dir", str(self.log_dir)],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.urls = self._wait_urls(timeout)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def _wait_urls(self, timeout: float) -> dict[str, str]:
        urls: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while "Optuna dashboard" not in urls:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if not line:
                self.stop()
                raise AssertionError(f"serve printed no URLs (exit {self.proc.returncode}):\n"
                                     f"{''.join(self.stdout)}\n{self.proc.stderr.read()}")
            self.stdout.append(line)
            name, sep, url = line.partition(":")
            if sep and url.strip().startswith("http"):
                urls[name.strip()] = url.strip()
        return urls

    def descendants(self) -> set[int]:
        """Pids of all processes below the serve process (from /proc)."""
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        found, frontier = set(), {self.proc.pid}
        while frontier:
            frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
            found |= frontier
        return found

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket in LISTEN state on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":
                if len(address) == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
                else:
                    raw = bytes.fromhex(address)
                    found.add(socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))
    return found


def alive(pids: set[int]) -> set[int]:
    """The pids of ``pids`` that still exist and are not zombies."""
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


# --------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_serve_shows_study_and_experiment_on_loopback_and_stops_cleanly(tmp_path: Path) -> None:
    """Both UIs serve the stores (also while a study writes to them), on 127.0.0.1 only; SIGINT stops all."""
    optuna_url, tracking_uri = make_stores(tmp_path)
    mlflow_port, dashboard_port = free_port(), free_port()
    server = ServeProcess(tmp_path, optuna_url, tracking_uri, mlflow_port, dashboard_port)
    try:
        mlflow_url, dashboard_url = server.urls["MLflow UI"], server.urls["Optuna dashboard"]
        assert mlflow_url == f"http://127.0.0.1:{mlflow_port}"
        assert dashboard_url == f"http://127.0.0.1:{dashboard_port}/dashboard/"

        # MLflow: the experiment, its run and the run's file:// artifact.
        experiments = http_json(f"{mlflow_url}/api/2.0/mlflow/experiments/search", {"max_results": 100})
        by_name = {e["name"]: e for e in experiments["experiments"]}
        assert EXPERIMENT in by_name
        exp_id = by_name[EXPERIMENT]["experiment_id"]
        runs = http_json(f"{mlflow_url}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})["runs"]
        assert [r["info"]["run_name"] for r in runs] == ["ui-test-run"]
        run_id = runs[0]["info"]["run_id"]
        listing = http_json(f"{mlflow_url}/ajax-api/2.0/mlflow/artifacts/list?run_uuid={run_id}")
        assert [f["path"] for f in listing["files"]] == ["notes.txt"]

        # Optuna dashboard: the study and its two trials.
        studies = http_json(f"http://127.0.0.1:{dashboard_port}/api/studies")["study_summaries"]
        study = next(s for s in studies if s["study_name"] == STUDY)
        detail = http_json(f"http://127.0.0.1:{dashboard_port}/api/studies/{study['study_id']}?after=0")
        assert [t["number"] for t in detail["trials"]] == [0, 1]
        assert all(t["state"] == "Complete" for t in detail["trials"])

        # Bound to loopback only.
        assert listening_addresses(mlflow_port) == {"127.0.0.1"}
        assert listening_addresses(dashboard_port) == {"127.0.0.1"}

        # A study keeps writing to both SQLite files while the UIs read them: no "database is locked".
        errors: list[str] = []
        _write_while_reading(optuna_url, tracking_uri, exp_id, mlflow_url, dashboard_port, errors)
        assert errors == []
        detail = http_json(f"http://127.0.0.1:{dashboard_port}/api/studies/{study['study_id']}?after=0")
        assert len(detail["trials"]) > 2

        children = server.descendants()
        assert len(children) >= 3  # mlflow CLI + its uvicorn worker, and the dashboard
    finally:
        code = server.stop(signal.SIGINT)
    assert code == 0, server.proc.stderr.read()
    deadline = time.monotonic() + 10
    while alive(children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive(children) == set(), "serve left child processes behind"
    assert listening_addresses(mlflow_port) == set() and listening_addresses(dashboard_port) == set()


def _write_while_reading(optuna_url: str, tracking_uri: str, exp_id: str, mlflow_url: str,
                         dashboard_port: int, errors: list[str], seconds: float = 4.0) -> None:
    """A writer (Optuna trials and MLflow runs, as a study logs them) against readers on both APIs."""
    import optuna
    from mlflow.tracking import MlflowClient

    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                http_json(f"{mlflow_url}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})
                for s in http_json(f"http://127.0.0.1:{dashboard_port}/api/studies")["study_summaries"]:
                    http_json(f"http://127.0.0.1:{dashboard_port}/api/studies/{s['study_id']}?after=0")
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                errors.append(f"reader: {exc!r}: {getattr(exc, 'read', lambda: b'')()[:300]!r}")

    readers = [threading.Thread(target=read) for _ in range(2)]
    for thread in readers:
        thread.start()
    try:
        study = optuna.load_study(study_name=STUDY, storage=optuna_url)
        client = MlflowClient(tracking_uri=tracking_uri)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            trial = study.ask()
            rate = trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True)
            run = client.create_run(exp_id, run_name=f"trial-{trial.number}")
            for step in range(5):
                trial.report(rate * step, step)
                client.log_metric(run.info.run_id, "val_accuracy", rate * step, step=step)
            client.set_terminated(run.info.run_id)
            study.tell(trial, rate)
    except Exception as exc:  # noqa: BLE001
        errors.append(f"writer: {exc!r}")
    finally:
        stop.set()
        for thread in readers:
            thread.join()


@pytest.mark.parametrize("taken", ["mlflow", "dashboard"])
def test_port_in_use_is_a_config_error_naming_the_port(tmp_path: Path, taken: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A taken port stops serve before it starts anything: ConfigError naming it; the CLI exits 2."""
    mlflow_port, dashboard_port = free_port(), free_port()
    busy = mlflow_port if taken == "mlflow" else dashboard_port
    storage, tracking = f"sqlite:///{tmp_path}/optuna.db", f"sqlite:///{tmp_path}/mlflow.db"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", busy))
        sock.listen()
        with pytest.raises(ConfigError, match=rf"\b{busy}\b"):
            ui.serve(storage=storage, tracking_uri=tracking, mlflow_port=mlflow_port, dashboard_port=dashboard_port)
        code = ui.main(["serve", "--storage", storage, "--tracking-uri", tracking,
                        "--mlflow-port", str(mlflow_port), "--dashboard-port", str(dashboard_port)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"port {busy} is already in use" in err and err.count("\n") == 1
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_same_port_for_both_is_a_config_error(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(ConfigError, match=str(port)):
        ui.serve(storage=f"sqlite:///{tmp_path}/o.db", tracking_uri=f"sqlite:///{tmp_path}/m.db",
                 mlflow_port=port, dashboard_port=port)


def test_sqlite_helpers(tmp_path: Path) -> None:
    """sqlite_url_with_timeout / sqlite_path / enable_sqlite_wal / redact."""
    assert ui.sqlite_url_with_timeout("sqlite:///mlruns/optuna.db") == "sqlite:///mlruns/optuna.db?timeout=30"
    assert ui.sqlite_url_with_timeout("sqlite:////abs/x.db?timeout=5") == "sqlite:////abs/x.db?timeout=5"
    assert ui.sqlite_url_with_timeout("sqlite:///x.db?foo=1", 12.5) == "sqlite:///x.db?foo=1&timeout=12.5"
    assert ui.sqlite_url_with_timeout("postgresql://u@h/db") == "postgresql://u@h/db"
    assert ui.sqlite_path("sqlite:////abs/x.db") == Path("/abs/x.db")
    assert ui.sqlite_path("sqlite:///rel/x.db?timeout=3") == Path("rel/x.db").resolve()
    assert ui.sqlite_path("sqlite://") is None and ui.sqlite_path("postgresql://h/db") is None
    assert ui.redact("postgresql+psycopg2://user:s3cret@db:5432/optuna") == "postgresql+psycopg2://user:***@db:5432/optuna"

    # Optuna takes the URL with ?timeout= (SQLAlchemy hands it to sqlite3.connect).
    import optuna

    url = ui.sqlite_url_with_timeout(f"sqlite:///{tmp_path}/t.db")
    storage = optuna.storages.RDBStorage(url)
    assert storage.engine.dialect.create_connect_args(storage.engine.url)[1]["timeout"] == 30.0
    assert ui.enable_sqlite_wal(url) is True
    import sqlite3

    assert sqlite3.connect(tmp_path / "t.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ui.enable_sqlite_wal(f"sqlite:///{tmp_path}/missing.db") is False


def test_wait_http_times_out_and_notices_a_dead_server() -> None:
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=str(port)):
        ui.wait_http(f"http://127.0.0.1:{port}/health", timeout=0.5)
    assert time.monotonic() - t0 < 5
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with pytest.raises(RuntimeError, match="exited"):
        ui.wait_http(f"http://127.0.0.1:{port}/health", timeout=30, proc=dead)


@pytest.mark.slow
@pytest.mark.postgres
def test_start_mlflow_server_on_postgresql_serves_artifacts(tmp_path: Path) -> None:
    """The server the distributed tests use: PostgreSQL backend, artifacts proxied into a folder."""
    import psycopg2
    from mlflow.tracking import MlflowClient

    db = f"emnist_hpo_ui_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    admin.autocommit = True
    admin.cursor().execute(f'CREATE DATABASE "{db}"')
    port = free_port()
    proc = ui.start_mlflow_server(f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db}", host="127.0.0.1",
                                  port=port, artifacts_destination=tmp_path / "mlartifacts", serve_artifacts=True,
                                  log_file=tmp_path / "mlflow.log")
    try:
        try:
            ui.wait_http(f"http://127.0.0.1:{port}/health", timeout=90, proc=proc)
        except (TimeoutError, RuntimeError):
            pytest.fail((tmp_path / "mlflow.log").read_text()[-3000:])
        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        exp_id = client.create_experiment("emnist-digits")
        assert client.get_experiment(exp_id).artifact_location.startswith("mlflow-artifacts:")
        run = client.create_run(exp_id)
        client.log_text(run.info.run_id, "served", "reports/summary.txt")
        stored = list((tmp_path / "mlartifacts").rglob("summary.txt"))
        assert len(stored) == 1 and stored[0].read_text() == "served"
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        pgid = proc.pid
        ui.stop_process(proc)
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.close()
