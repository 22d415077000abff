"""Safe by default: no registry code runs here, DNS rebinding is refused, no password is printed, nothing hangs
on a dead server, and ``kill -9`` of ``ui`` leaves no server behind.

The registry tests use a private SQLite store with a tiny (untrained) digits model logged by the project's own
code, and versions an attacker could register next to it: each attack's code writes a marker file when run,
so "never ran" is a file that does not exist.
"""

from __future__ import annotations

import http.client
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emnist_hpo.tracking import registry

from emnist_hpo.serve import ui
from emnist_hpo.cli import main
from emnist_hpo.coordination import redact_arg, redact_secrets
from emnist_hpo.errors import RegistryError

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cret"
PG_URL = f"postgresql://u:{SECRET}@127.0.0.1:1/x"
CLASSES = [str(i) for i in range(10)]
#: Prepended to the project's own pyfunc file: the attack runs when MLflow imports the file.
PAYLOAD = ('import os as _os, pathlib as _pl\n'
           'if _os.environ.get("EVIL_MARKER"):\n'
           '    _pl.Path(_os.environ["EVIL_MARKER"]).write_text("code from the registry ran")\n')


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emnist_hpo", *args], cwd=cwd, env=child_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def tiny_model():
    import keras

    inp = keras.Input((28, 28), dtype="uint8", name="image")
    h = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inp))
    return keras.Model(inp, keras.layers.Dense(10, activation="softmax")(h))


def write_marker(path: str) -> None:
    """Unpickling a :func:`pickled_model` calls this: the marker says a pickle from the registry was loaded."""
    Path(path).write_text("a pickle from the registry was loaded")


def pickled_model(marker: Path):
    """A pyfunc model MLflow stores with cloudpickle (its default before "models from code")."""
    import mlflow.pyfunc

    class Pickled(mlflow.pyfunc.PythonModel):
        def __reduce__(self):
            return write_marker, (str(marker),)

        def predict(self, context, model_input, params=None):
            return model_input

    return Pickled()


def image_file(path: Path) -> Path:
    """A dark "1" on light paper, as a user would photograph it."""
    a = np.full((120, 90), 235, np.uint8)
    a[20:100, 40:52] = 20
    Image.fromarray(a).save(path)
    return path


class Store:
    """A private MLflow store with a digits champion logged by the project, and a way to add attacks to it."""

    def __init__(self, root: Path) -> None:
        from emnist_hpo.tracking.tracker import Tracker

        self.root = root
        self.uri = f"sqlite:///{root}/mlflow.db"
        self.tracker = Tracker(self.uri, "emnist-digits")
        self.client = self.tracker.client
        self.name = registry.model_name("digits")
        self.model = tiny_model()
        run_id = self.tracker.start_run("legit")
        self.legit = registry.log_and_register(self.tracker, run_id, self.model, CLASSES, split="digits",
                                               test_accuracy=0.5, tags={})
        self.tracker.end_run(run_id)
        assert self.legit.champion

    def crown(self, version: str) -> None:
        """What anyone who can write to the store can do: point the champion alias at ``version``."""
        self.client.set_registered_model_alias(self.name, registry.CHAMPION_ALIAS, version)

    def register(self, python_model, artifacts: dict[str, str] | None = None) -> str:
        """Log ``python_model`` (a code file or an object) with MLflow directly and register it; its version."""
        import mlflow
        from mlflow.models import infer_signature

        tmp = self.root / f"files-{time.monotonic_ns()}"
        tmp.mkdir()
        keras_path, classes_path = tmp / "model.keras", tmp / "classes.json"
        self.model.save(keras_path)
        classes_path.write_text(json.dumps(CLASSES))
        if artifacts is None:
            artifacts = {"keras_model": str(keras_path), "classes": str(classes_path)}
        signature = infer_signature(np.zeros((2, 28, 28), np.uint8), np.zeros((2, 10)))
        run_id = self.tracker.start_run("attack")
        with registry.mlflow_uris(self.uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=python_model, artifacts=artifacts,
                                           signature=signature, pip_requirements=["mlflow"])
        with registry.mlflow_uris(self.uri):
            return str(mlflow.register_model(info.model_uri, self.name).version)

    def stored_file(self, version: str, relative: str) -> Path:
        uri = self.client.get_model_version_download_uri(self.name, version)
        assert uri.startswith("file://")
        return Path(uri[len("file://"):]) / relative


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    return Store(tmp_path_factory.mktemp("registry"))


def evil_code(folder: Path, name: str = "pyfunc_model.py") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(PAYLOAD + registry.PYFUNC_CODE.read_text())
    return path


# --------------------------------------------------------------------------- 1. no code from the registry


def test_own_champion_loads_without_mlflow_pyfunc(store: Store) -> None:
    store.crown(store.legit.version)
    model = registry.load_champion(store.uri, "digits")
    x = np.zeros((3, 28, 28), np.uint8)
    proba = model.predict(x)
    assert list(proba.columns) == CLASSES and proba.shape == (3, 10)
    assert np.allclose(proba.to_numpy(), np.asarray(store.model.predict(x, verbose=0)), atol=1e-6)
    with pytest.raises(ValueError, match="finite"):
        model.predict(np.full((1, 28, 28), np.nan))


@pytest.mark.slow
def test_predict_never_runs_code_from_the_registry(store: Store, tmp_path: Path) -> None:
    """A champion whose pyfunc file carries a payload: `predict` refuses it in one line, and the payload never runs."""
    marker = tmp_path / "pwned"
    version = store.register(str(evil_code(tmp_path / "attack")))
    assert not marker.exists()
    store.crown(version)
    try:
        done = run_cli(["predict", "--split", "digits", "--tracking-uri", store.uri,
                        str(image_file(tmp_path / "one.png"))], tmp_path, EVIL_MARKER=str(marker))
    finally:
        store.crown(store.legit.version)
    assert not marker.exists(), "code stored in the registry ran on predict"
    assert done.returncode == 2, done.stderr
    lines = error_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("emnist-hpo: error: model version emnist-digits v") and "refused" in lines[0]
    assert "pyfunc_model.py" in lines[0] and "sha256" in lines[0]
    assert done.stdout == ""


@pytest.mark.parametrize("attack", ["other file name", "tampered in the artifact store", "pickled model",
                                    "missing classes", "extra artifact"])
def test_other_versions_are_refused_and_nothing_runs(store: Store, tmp_path: Path, attack: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", raising=False)
    keras_path = tmp_path / "model.keras"
    store.model.save(keras_path)
    own = str(registry.PYFUNC_CODE)
    if attack == "other file name":
        monkeypatch.delenv("EVIL_MARKER")  # logging runs the file: arm it afterwards
        version = store.register(str(evil_code(tmp_path / "attack", "evil.py")))
        monkeypatch.setenv("EVIL_MARKER", str(marker))
        why = "code file is 'evil.py'"
    elif attack == "tampered in the artifact store":
        version = store.register(own)
        store.stored_file(version, "pyfunc_model.py").write_text(PAYLOAD + registry.PYFUNC_CODE.read_text())
        why = "is not this package's own"
    elif attack == "pickled model":
        version = store.register(pickled_model(marker))
        marker.unlink(missing_ok=True)  # MLflow may load it once while logging; what counts is loading it here
        why = "pickled python_model"
    elif attack == "missing classes":
        version = store.register(own, {"keras_model": str(keras_path)})
        why = "artifacts are"
    else:  # a module that would shadow keras, were the model folder ever put on the import path
        (tmp_path / "keras.py").write_text("raise SystemExit('shadowed')\n")
        (tmp_path / "classes.json").write_text(json.dumps(CLASSES))
        version = store.register(own, {"keras_model": str(keras_path), "classes": str(tmp_path / "classes.json"),
                                       "helper": str(tmp_path / "keras.py")})
        why = "artifacts are"
    store.crown(version)
    try:
        with pytest.raises(RegistryError, match="refused") as refused:
            registry.load_champion(store.uri, "digits")
        with pytest.raises(RegistryError, match="champion alias not moved"):
            registry._verify_version(store.tracker, store.name, version, 10)
    finally:
        store.crown(store.legit.version)
    message = str(refused.value)
    assert why in message and "\n" not in message
    assert not marker.exists(), f"{attack}: registry content ran or was unpickled"


def test_mlflow_pickle_switch_is_off_while_loading(store: Store, tmp_path: Path) -> None:
    """MLflow 3.17's MLFLOW_ALLOW_PICKLE_DESERIALIZATION, set by guarded_mlflow: even MLflow's own loader
    refuses a pickled model inside the block (the package never calls it; this checks the switch is real)."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    marker = tmp_path / "pwned"
    version = store.register(pickled_model(marker))
    marker.unlink(missing_ok=True)
    with registry.guarded_mlflow(), registry.mlflow_uris(store.uri):
        assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"
        with pytest.raises(MlflowException, match="pickle is disallowed"):
            mlflow.pyfunc.load_model(f"models:/{store.name}/{version}")
    assert not marker.exists()


# --------------------------------------------------------------------------- 2. DNS rebinding


def _request(port: int, method: str, path: str, host: str, origin: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Host": host}
    if origin is not None:
        headers["Origin"] = origin
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_dashboard_refuses_foreign_host_and_origin(tmp_path: Path) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    ids = {name: optuna.create_study(study_name=name, storage=storage)._study_id for name in ("kept", "deleted")}
    port = free_port()
    proc = ui.start_dashboard(storage, port=port, log_file=tmp_path / "dashboard.log")
    try:
        ui.wait_http(f"http://127.0.0.1:{port}/api/studies", 60, proc=proc)
        own = f"127.0.0.1:{port}"
        # DNS rebinding: the attacker's page, same IP and port, its own Host name
        status, body = _request(port, "DELETE", f"/api/studies/{ids['kept']}", f"attacker.example:{port}")
        assert status == 403
        text = body.decode()
        assert text.count("\n") == 1 and f"'attacker.example:{port}'" in text and own in text
        # a cross-site form or fetch: right Host, foreign Origin
        status, _ = _request(port, "DELETE", f"/api/studies/{ids['kept']}", own, origin="http://attacker.example")
        assert status == 403
        assert {s.study_name for s in optuna.get_all_study_summaries(storage)} == {"kept", "deleted"}
        # the browser on the dashboard itself still works: reading, and changing with its own Origin
        status, body = _request(port, "GET", "/api/studies", f"localhost:{port}")
        assert status == 200 and {s["study_name"] for s in json.loads(body)["study_summaries"]} == set(ids)
        status, _ = _request(port, "DELETE", f"/api/studies/{ids['deleted']}", own, origin=f"http://{own}")
        assert status < 300
        assert {s.study_name for s in optuna.get_all_study_summaries(storage)} == {"kept"}
    finally:
        ui.stop_process(proc)


def test_allowed_hosts_follow_the_bind_address() -> None:
    assert ui.allowed_hosts("127.0.0.1", 8080, []) == ["localhost:8080", "127.0.0.1:8080", "[::1]:8080"]
    assert "192.0.2.7:5000" in ui.allowed_hosts("192.0.2.7", 5000, [])
    assert "[fd00::2]:5000" in ui.allowed_hosts("fd00::2", 5000, [])
    wildcard = ui.allowed_hosts("0.0.0.0", 8080, ["ui.example", "*.corp.example"])
    assert ui.host_allowed("192.168.1.20:8080", wildcard) and ui.host_allowed("ui.example:8080", wildcard)
    assert ui.host_allowed("a.corp.example:8080", wildcard)
    assert not ui.host_allowed("attacker.example:8080", wildcard) and not ui.host_allowed("", wildcard)
    assert not ui.host_allowed("127.0.0.1:9999", ui.allowed_hosts("127.0.0.1", 8080, []))


# --------------------------------------------------------------------------- 3. passwords


@pytest.mark.parametrize("url, shown", [
    ("postgresql://u:s3cret@h/db", "postgresql://u:***@h/db"),
    ("postgresql+psycopg2://u:s3%40cret@h:5432/db", "postgresql+psycopg2://u:***@h:5432/db"),
    ("postgresql://u:s3/cret@h/db", "postgresql://u:***@h/db"),
    ("postgresql://:s3cret@h/db", "postgresql://:***@h/db"),
    ("postgresql://u@h/db?password=s3cret&sslmode=require", "postgresql://u@h/db?password=***&sslmode=require"),
    ("sqlite:////tmp/a:b/mlflow.db", "sqlite:////tmp/a:b/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_redaction(url: str, shown: str) -> None:
    assert redact_arg(url) == shown and ui.redact(url) == shown
    assert redact_secrets(f"store '{url}' failed") == f"store '{shown}' failed"
    assert redact_arg(f"--storage={url}") == f"--storage={shown}"


def test_resume_hint_has_the_interpreter_and_no_password(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from emnist_hpo import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "study", interrupted)
    code = main(["study", "--split", "digits", "--storage", PG_URL, "--tracking-uri=" + PG_URL.replace("x", "m")])
    err = capsys.readouterr().err
    assert code == 130 and SECRET not in err
    hint = err.split("Resume with: ", 1)[1].splitlines()[0]
    argv = shlex.split(hint.split(" (put the password", 1)[0])
    assert argv[:3] == [sys.executable, "-m", "emnist_hpo"]
    assert argv[3:] == ["study", "--split", "digits", "--storage", "postgresql://u:***@127.0.0.1:1/x",
                        "--tracking-uri=postgresql://u:***@127.0.0.1:1/m"]


@pytest.mark.slow
def test_failing_commands_print_no_password(tmp_path: Path, sample_dir: Path) -> None:
    done = run_cli(["study", "--split", "digits", "--trials", "1", "--storage", PG_URL, "--data-dir", str(sample_dir),
                    "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"], tmp_path,
                   EMNIST_HPO_CACHE=str(tmp_path / "cache"))
    assert done.returncode == 2 and SECRET not in done.stdout + done.stderr, done.stderr
    assert "u:***@127.0.0.1:1/x" in done.stderr
    done = run_cli(["ui", "--storage", PG_URL, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                    "--mlflow-port", str(free_port()), "--dashboard-port", str(free_port())], tmp_path, timeout=60)
    assert done.returncode == 2 and SECRET not in done.stdout + done.stderr, done.stderr
    assert len(error_lines(done.stderr)) == 1 and "u:***@127.0.0.1:1/x" in done.stderr


def test_servers_get_store_urls_outside_their_command_lines(tmp_path: Path) -> None:
    """``ps`` shows every process's command line to every user of the machine: no password there."""
    procs = [ui.start_dashboard(PG_URL, port=free_port(), log_file=tmp_path / "d.log"),
             ui.start_mlflow_server(PG_URL, port=free_port(), log_file=tmp_path / "m.log")]
    try:
        for proc in procs:
            assert SECRET not in " ".join(map(str, proc.args))
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            assert SECRET not in cmdline
    finally:
        ui.stop_processes(procs)


# --------------------------------------------------------------------------- 4. dead servers


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers; its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


@pytest.mark.parametrize("server", ["closed port", "silent"])
@pytest.mark.slow
def test_unreachable_tracking_server_fails_fast(server: str, silent_server: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    uri = silent_server if server == "silent" else f"http://127.0.0.1:{free_port()}"
    image = str(image_file(tmp_path / "one.png"))
    for argv in (["predict", "--split", "digits", "--tracking-uri", uri, image],
                 ["export", "--split", "digits", "--tracking-uri", uri, "--output", str(tmp_path / "m.tflite")]):
        t0 = time.monotonic()
        code = main(argv)
        took = time.monotonic() - t0
        err = capsys.readouterr().err
        assert code == 2 and took < 10, (argv[0], took, err)
        assert len(error_lines(err)) == 1 and err.startswith("emnist-hpo: error: ") and uri in err, err
    assert not (tmp_path / "m.tflite").exists()
    t0 = time.monotonic()
    done = run_cli(["ui", "--tracking-uri", uri, "--dashboard-port", str(free_port())], tmp_path, timeout=60)
    took = time.monotonic() - t0
    assert done.returncode == 2 and took < 10, (took, done.stderr)
    assert len(error_lines(done.stderr)) == 1 and uri in done.stderr


# --------------------------------------------------------------------------- 5. no orphans


def _descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.add(pid)
        except OSError:
            continue
    return out


def _answers(url: str) -> bool:
    try:
        ui.wait_http(url, 0.5)
        return True
    except (TimeoutError, RuntimeError):
        return False


@pytest.mark.slow
def test_kill_9_of_ui_leaves_no_server_behind(tmp_path: Path) -> None:
    """`ui --host 127.0.0.2` (not the default address): both servers answer under that Host and refuse a
    foreign one; after SIGKILL of `ui` both ports go quiet and every process it started is gone."""
    mlflow_port, dashboard_port = free_port(), free_port()
    host = "127.0.0.2"
    proc = subprocess.Popen(
        [sys.executable, "-m", "emnist_hpo", "ui", "--host", host, "--mlflow-port", str(mlflow_port),
         "--dashboard-port", str(dashboard_port)],
        cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children: set[int] = set()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Optuna dashboard:"):
                break
        assert lines and lines[-1].startswith("Optuna dashboard:"), proc.stderr.read()
        children = _descendants(proc.pid)
        assert len(children) >= 3  # the MLflow wrapper, its uvicorn, the dashboard
        # MLflow was told the same hosts as the dashboard: the bind address works, a foreign Host does not
        mlflow_api = "/api/2.0/mlflow/experiments/search?max_results=5"
        assert _request_to(host, mlflow_port, "GET", mlflow_api, f"{host}:{mlflow_port}")[0] == 200
        assert _request_to(host, mlflow_port, "GET", mlflow_api, f"attacker.example:{mlflow_port}")[0] == 403
        assert _request_to(host, dashboard_port, "GET", "/api/studies", f"{host}:{dashboard_port}")[0] == 200
        assert _request_to(host, dashboard_port, "GET", "/api/studies", f"attacker.example:{dashboard_port}")[0] \
            == 403
        status, _ = _request_to(host, mlflow_port, "POST", "/api/2.0/mlflow/experiments/create",
                                f"{host}:{mlflow_port}", origin=f"http://{host}:{mlflow_port}",
                                body=json.dumps({"name": "from-the-ui"}))
        assert status == 200
    finally:
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 15
        urls = [f"http://{host}:{mlflow_port}/health", f"http://{host}:{dashboard_port}/api/studies"]
        while (_alive(children) or any(_answers(u) for u in urls)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _alive(children)
        answering = [u for u in urls if _answers(u)]
        for pid in left:  # never leave servers to the next test, whatever failed above
            os.kill(pid, signal.SIGKILL)
    assert left == set(), "kill -9 of ui orphaned its servers"
    assert answering == []


def _request_to(host: str, port: int, method: str, path: str, host_header: str, origin: str | None = None,
                body: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    headers = {"Host": host_header, "Content-Type": "application/json"}
    if origin is not None:
        headers["Origin"] = origin
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()
