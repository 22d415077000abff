"""What a person sees: headless Chromium on the two UIs that `emnist_hpo.ui serve` starts.

The MLflow UI must list the experiment ``emnist-letters`` with a parent run
whose two nested runs appear under it when its row is expanded; the Optuna
dashboard must list the study and show its two trials. Screenshots go to
``test-results/browser/`` (git-ignored).

Chromium is Debian's (``apt-get install -y chromium``), driven over the Chrome
DevTools Protocol with the small standard-library WebSocket client below (both
UIs are React single-page apps, so the page is polled until the text appears).
The stores are those of a real 2-trial study on the letters sample.
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

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "test-results" / "browser"
EXPERIMENT = "emnist-letters"
PARENT, CHILDREN = "study-emnist-letters", ("trial-0", "trial-1")
STUDY = "emnist-letters"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000", "--remote-debugging-port=0"]


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


def make_stores(root: Path, sample_dir: Path) -> tuple[str, str, str, str]:
    """A real 2-trial study on the letters sample, into fresh stores under ``root``.

    Returns ``(optuna_url, tracking_uri, experiment_id, parent_run_id)``.
    """
    from mlflow.tracking import MlflowClient

    from emnist_hpo.study import StudyOptions, run_study

    optuna_url, tracking_uri = f"sqlite:///{root}/mlruns/optuna.db", f"sqlite:///{root}/mlruns/mlflow.db"
    os.environ["EMNIST_HPO_CACHE"] = str(root / "cache")
    res = run_study(StudyOptions(
        split="letters", trials=2, epochs=1, max_train_samples=1000, data_dir=str(sample_dir), storage=optuna_url,
        tracking_uri=tracking_uri, search_space="small", warm_start=False, finalists=0, progress=False,
        checkpoint_dir=str(root / "ckpt"),
    ), log=lambda m: None)
    exp = MlflowClient(tracking_uri).get_experiment_by_name(EXPERIMENT)
    return optuna_url, tracking_uri, exp.experiment_id, res.parent_run_id


@pytest.fixture
def served(tmp_path: Path, sample_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """``serve`` on the stores of a real 2-trial study; yields (urls, experiment_id, parent_run_id); SIGINT afterwards."""
    monkeypatch.setenv("EMNIST_HPO_CACHE", str(tmp_path / "cache"))
    optuna_url, tracking_uri, exp_id, parent_id = make_stores(tmp_path, sample_dir)
    server = ServeProcess(tmp_path, optuna_url, tracking_uri, free_port(), free_port())
    try:
        yield server.urls, exp_id, parent_id
    finally:
        assert server.stop(signal.SIGINT) == 0


# --------------------------------------------------------------------------- the test


def test_uis_show_experiment_nested_runs_and_study_trials(served, browser: DevTools) -> None:
    urls, exp_id, parent_id = served
    mlflow_url, dashboard_url = urls["MLflow UI"], urls["Optuna dashboard"]

    # MLflow: the experiment's runs table shows the parent run; its children are nested under it.
    browser.goto(f"{mlflow_url}/#/experiments/{exp_id}/runs")
    browser.wait_for(shows(EXPERIMENT, PARENT), f"experiment {EXPERIMENT} with run {PARENT}")
    browser.screenshot("mlflow-runs-collapsed")
    assert not any(child in browser.text() for child in CHILDREN), "nested runs are listed at the top level"
    expanded = browser.evaluate(
        "(() => { const link = [...document.querySelectorAll('a')].find(a => a.textContent.trim() === "
        f"{json.dumps(PARENT)}); const cell = link && link.closest('[role=\"gridcell\"]');"
        " const button = cell && cell.querySelector('button'); if (!button) return false;"
        " button.click(); return true; })()")
    assert expanded, "the parent run has no expander: its runs are not nested"
    browser.wait_for(shows(PARENT, *CHILDREN), f"nested runs {CHILDREN} under {PARENT}")
    text = browser.text()
    assert text.index(PARENT) < text.index(CHILDREN[0]) and text.index(PARENT) < text.index(CHILDREN[1])
    browser.screenshot("mlflow-runs-expanded")

    # The parent run's own page lists its child runs.
    browser.goto(f"{mlflow_url}/#/experiments/{exp_id}/runs/{parent_id}")
    browser.wait_for(shows(PARENT, "Child runs", *CHILDREN), f"the page of run {PARENT} with its child runs")
    browser.screenshot("mlflow-parent-run")

    # Optuna dashboard: the study list, then the study's trials.
    browser.goto(dashboard_url)
    browser.wait_for(shows(STUDY), f"study {STUDY} in the study list")
    browser.screenshot("optuna-studies")
    study_link = browser.wait_for(
        "(() => { const a = [...document.querySelectorAll('a')].find(a => a.href.includes('/dashboard/studies/'));"
        " return a ? a.href : null; })()", "a link to the study")
    browser.goto(study_link.rstrip("/") + "/trials")
    browser.wait_for(shows(STUDY, "Trial 0", "Trial 1", "Complete"), "the study's two complete trials")
    browser.screenshot("optuna-trials")
    browser.goto(study_link)
    browser.wait_for(shows(STUDY, "History", "Best Trial"), "the study's history page")
    browser.screenshot("optuna-study")
    assert len(list(SHOTS.glob("*.png"))) >= 6
