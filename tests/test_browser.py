"""What a person sees: headless Chromium on the two UIs that `emnist_hpo.serve.ui serve` starts.

The MLflow UI must open the experiment ``emnist-digits`` on its runs table (not
MLflow 3's GenAI overview of traces and token usage) from the link this project
prints, show each trial's validation accuracy there (in its name, and as the
``val_accuracy`` column once chosen), and nest the trials under the study's
parent run; the Optuna dashboard must list the study and show its trials.
Screenshots go to ``test-results/browser/`` (git-ignored); ``mlflow-runs.png``
and ``optuna-study.png`` are the ones in ``docs/``.

Chromium is Debian's (``apt-get install -y chromium``), driven over the Chrome
DevTools Protocol with the small standard-library WebSocket client below (both
UIs are React single-page apps, so the page is polled until the text appears).
Each test starts a fresh Chromium profile: nothing a browser remembers (MLflow's
GenAI / Model training switch included) carries over. The stores are those of a
real 3-trial study on the digits sample, shared by the tests of this file.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

try:  # the same `serve` subprocess helper as test_ui's (tests/ on sys.path, or tests/ a package)
    from test_ui import ServeProcess, free_port
except ImportError:  # pragma: no cover
    from tests.test_ui import ServeProcess, free_port

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "test-results" / "browser"
SPLIT = "digits"
EXPERIMENT = STUDY = f"emnist-{SPLIT}"
PARENT = f"study-{STUDY}"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1600,900", "--remote-debugging-port=0"]


# --------------------------------------------------------------------------- Chrome DevTools Protocol


class DevTools:
    """A minimal CDP client over one WebSocket (RFC 6455 text frames; standard library only)."""

    def __init__(self, ws_url: str, timeout: float = 30.0) -> None:
        parts = urlsplit(ws_url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            assert chunk, "DevTools closed the connection during the handshake"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head[:200]
        self.buffer = head.split(b"\r\n\r\n", 1)[1]
        self.next_id = 0

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("DevTools connection closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x80 | opcode])
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", n)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _receive(self) -> dict[str, Any]:
        message = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            opcode = b0 & 0x0F
            if opcode == 0x9:  # ping
                self._send_frame(0xA, payload)
                continue
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the connection")
            message += payload
            if b0 & 0x80:
                return json.loads(message)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events in between are dropped)."""
        self.next_id += 1
        self._send_frame(0x1, json.dumps({"id": self.next_id, "method": method, "params": params}).encode())
        while True:
            reply = self._receive()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for(self, expression: str, what: str, timeout: float = 45.0) -> Any:
        """Poll a JavaScript expression until it is truthy; fail with the page's text if it never is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            time.sleep(0.25)
        text = self.evaluate("document.body ? document.body.innerText : ''") or ""
        raise AssertionError(f"page never showed {what} within {timeout:g} s; it shows:\n{text[:2000]}")

    def text(self) -> str:
        return self.evaluate("document.body.innerText") or ""

    def screenshot(self, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{name}.png"
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        self.sock.close()


def shows(*texts: str) -> str:
    """A JavaScript expression: the page's visible text contains every one of ``texts``."""
    return "(() => { const t = document.body ? document.body.innerText : ''; return " + \
        " && ".join(f"t.includes({json.dumps(s)})" for s in texts) + "; })()"


@pytest.fixture
def browser(tmp_path: Path):
    """A headless Chromium with its DevTools page target; killed (process group) afterwards."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed: apt-get install -y chromium", pytrace=False)
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tools = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, f"chromium exited with code {proc.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        targets = json.loads(opener.open(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        tools.call("Page.enable")
        yield tools
    finally:
        if tools is not None:
            tools.close()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


# --------------------------------------------------------------------------- stores and server


def make_stores(root: Path, sample_dir: Path) -> dict[str, Any]:
    """A real 3-trial study on the digits sample (2 epochs, 2,000 images), into fresh stores under ``root``.

    Returns the stores' URLs, the experiment's id and link, the parent run's id and the trial runs.
    """
    from mlflow.tracking import MlflowClient

    from emnist_hpo.search.optuna.study import StudyOptions, run_study
    from emnist_hpo.tracking.tracker import Tracker

    optuna_url, tracking_uri = f"sqlite:///{root}/mlruns/optuna.db", f"sqlite:///{root}/mlruns/mlflow.db"
    res = run_study(StudyOptions(
        split=SPLIT, trials=3, epochs=2, max_train_samples=2000, data_dir=str(sample_dir), storage=optuna_url,
        tracking_uri=tracking_uri, search_space="small", warm_start=False, finalists=0, pruner="none",
        progress=False, checkpoint_dir=str(root / "ckpt"),
    ), log=lambda m: None)
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    trials = client.search_runs([exp.experiment_id], "tags.`emnist_hpo.kind` = 'trial'")
    return {"storage": optuna_url, "tracking": tracking_uri, "experiment_id": exp.experiment_id,
            "link": Tracker(tracking_uri, EXPERIMENT).experiment_link(), "parent": res.parent_run_id,
            "trials": sorted(trials, key=lambda r: int(r.data.tags["optuna.trial_number"]))}


@pytest.fixture(scope="module")
def served(tmp_path_factory, sample_dir: Path):
    """``serve`` on the stores of a real 3-trial study; yields (urls, stores); SIGINT afterwards."""
    from emnist_hpo.coordination import saved_environ

    root = tmp_path_factory.mktemp("browser")
    with saved_environ("EMNIST_HPO_CACHE", "MLFLOW_TRACKING_URI"):
        os.environ["EMNIST_HPO_CACHE"] = str(root / "cache")
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        stores = make_stores(root, sample_dir)
    server = ServeProcess(root, stores["storage"], stores["tracking"], free_port(), free_port())
    try:
        yield server.urls, stores
    finally:
        assert server.stop(signal.SIGINT) == 0


def quiet_assistant(browser: "DevTools", mlflow_url: str) -> None:
    """Keep MLflow's assistant panel closed (it opens itself on a first visit and hides half the page).

    Only the assistant's keys: the view switch (GenAI / Model training) stays as a new browser has it.
    """
    browser.goto(f"{mlflow_url}/#/")
    browser.wait_for("document.readyState === 'complete'", "the MLflow UI")
    browser.evaluate("localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
                     "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true')")
    browser.goto("about:blank")  # the next page is a new document that reads them


def expand(browser: "DevTools", run_name: str) -> None:
    expanded = browser.evaluate(
        "(() => { const link = [...document.querySelectorAll('a')].find(a => a.textContent.trim() === "
        f"{json.dumps(run_name)}); const cell = link && link.closest('[role=\"gridcell\"]');"
        " const button = cell && cell.querySelector('button'); if (!button) return false;"
        " button.click(); return true; })()")
    assert expanded, f"the run {run_name} has no expander: its runs are not nested"


def choose_columns(browser: "DevTools", *names: str) -> None:
    """Tick ``names`` in the runs table's Columns menu, then close it (what a person does to add a metric)."""
    browser.evaluate("[...document.querySelectorAll('button')].find(b => b.textContent.trim() === 'Columns').click()")
    browser.wait_for("!!document.querySelector('input[placeholder=\"Search columns\"]')", "the Columns menu")
    for name in names:
        clicked = browser.evaluate(
            "(() => { const els = [...document.querySelectorAll('label, span, div')].filter(e => "
            f"e.textContent.trim() === {json.dumps(name)} && e.children.length <= 2); const el = els[els.length - 1];"
            " if (!el) return false; const box = (el.closest('label') || el.parentElement)"
            ".querySelector('input[type=checkbox]'); (box || el).click(); return true; })()")
        assert clicked, f"no column {name} in the Columns menu"
    browser.call("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape", windowsVirtualKeyCode=27)


# --------------------------------------------------------------------------- the tests


def test_mlflow_experiment_opens_on_the_runs_table_with_the_trials_val_accuracy(served, browser: "DevTools") -> None:
    urls, stores = served
    mlflow_url = urls["MLflow UI"]
    quiet_assistant(browser, mlflow_url)

    # The link the project prints, in a browser that never chose a view: MLflow 3.17 starts on GenAI.
    browser.goto(f"{mlflow_url}/{stores['link']}")
    browser.wait_for(shows(EXPERIMENT, "Run Name", PARENT), f"the runs table of {EXPERIMENT} with run {PARENT}")
    href, text = browser.evaluate("location.href"), browser.text()
    assert f"/experiments/{stores['experiment_id']}/runs" in href, href
    assert "workflowType=machine_learning" in href, href
    for genai in ("Token Usage", "Tokens per Trace", "No data available for the selected time range"):
        assert genai not in text, f"the GenAI overview is shown ({genai!r}):\n{text[:1500]}"
    assert "EMNIST digits (10 classes" in text  # the experiment's description heads the page

    # The trials, nested under the study's run, each named with its validation accuracy.
    expand(browser, PARENT)
    names = [r.info.run_name for r in stores["trials"]]
    assert len(names) == 3
    for run in stores["trials"]:
        number = run.data.tags["optuna.trial_number"]
        assert run.info.run_name == f"trial-{number} val={run.data.metrics['best_val_accuracy']:.4f}"
    browser.wait_for(shows(PARENT, *names), f"the trials {names} under {PARENT}")

    # The val_accuracy metric itself, as a column: each trial's value (MLflow shows the last epoch's).
    choose_columns(browser, "val_accuracy", "params")
    values = [repr(r.data.metrics["val_accuracy"]) for r in stores["trials"]]
    browser.wait_for(shows("val_accuracy", "params", *values), f"the val_accuracy column with {values}")
    time.sleep(1)  # the menu's closing animation
    browser.screenshot("mlflow-runs")


def test_uis_show_nested_runs_and_study_trials(served, browser: "DevTools") -> None:
    from emnist_hpo.tracking.tracker import ui_path

    urls, stores = served
    mlflow_url, dashboard_url = urls["MLflow UI"], urls["Optuna dashboard"]
    quiet_assistant(browser, mlflow_url)
    children = [r.info.run_name for r in stores["trials"]]

    # MLflow: the experiment's runs table shows the parent run; its children are nested under it.
    browser.goto(f"{mlflow_url}/{stores['link']}")
    browser.wait_for(shows(EXPERIMENT, PARENT), f"experiment {EXPERIMENT} with run {PARENT}")
    browser.screenshot("mlflow-runs-collapsed")
    assert not any(child in browser.text() for child in children), "nested runs are listed at the top level"
    expand(browser, PARENT)
    browser.wait_for(shows(PARENT, *children), f"nested runs {children} under {PARENT}")
    text = browser.text()
    assert all(text.index(PARENT) < text.index(child) for child in children)
    browser.screenshot("mlflow-runs-expanded")

    # The parent run's own page lists its child runs; a trial's page shows the note naming its Optuna trial.
    browser.goto(f"{mlflow_url}/{ui_path(stores['experiment_id'], stores['parent'])}")
    browser.wait_for(shows(PARENT, "Child runs", *children), f"the page of run {PARENT} with its child runs")
    browser.screenshot("mlflow-parent-run")
    trial = stores["trials"][0]
    browser.goto(f"{mlflow_url}/{ui_path(stores['experiment_id'], trial.info.run_id)}")
    browser.wait_for(shows(trial.info.run_name, f"Optuna trial 0 of study {STUDY}"), "the trial's note")
    browser.screenshot("mlflow-trial-run")

    # Optuna dashboard: the study list, then the study's trials and its page.
    browser.goto(dashboard_url)
    browser.wait_for(shows(STUDY), f"study {STUDY} in the study list")
    browser.screenshot("optuna-studies")
    study_link = browser.wait_for(
        "(() => { const a = [...document.querySelectorAll('a')].find(a => a.href.includes('/dashboard/studies/'));"
        " return a ? a.href : null; })()", "a link to the study")
    browser.goto(study_link.rstrip("/") + "/trials")
    browser.wait_for(shows(STUDY, "Trial 0", "Trial 1", "Trial 2", "Complete"), "the study's three complete trials")
    browser.screenshot("optuna-trials")
    browser.goto(study_link)
    browser.wait_for(shows(STUDY, "History", "Best Trial"), "the study's history page")
    time.sleep(2)  # the plots draw after the text
    browser.screenshot("optuna-study")
    assert len(list(SHOTS.glob("*.png"))) >= 7
