"""Serve the two UIs of a study: the MLflow UI and the Optuna dashboard.

:func:`serve` starts both servers as child processes, each in its own process
group, on the same stores the study writes to:

* the MLflow UI is an ``mlflow server`` (``--workers 1`` and
  ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``: two processes, ~0.5 GB RSS and
  ~6 s to start, instead of ~2.7 GB and ~16 s with MLflow's defaults) on the
  tracking store. For a local SQLite store it reads artifacts straight from
  their ``file://`` locations (``mlruns/artifacts`` for the default store), so
  the artifacts of the experiments a study made are viewable; for an
  ``http(s)://`` tracking URI no server is started: that server already is the UI.
* the Optuna dashboard runs ``optuna_dashboard.wsgi`` on a threaded ``wsgiref``
  server (``python -m emnist_hpo.serve.ui dashboard``; one process, ~0.24 GB RSS),
  after creating Optuna's schema, which a brand-new database lacks
  ("no such table: version_info").

Both bind to ``host`` (``127.0.0.1`` by default). :func:`serve` waits until both
answer HTTP, prints their URLs on stdout, and on Ctrl-C or SIGTERM stops both
process groups (SIGTERM, then SIGKILL after a grace period) and returns 0.
The children's output goes to log files, whose paths are printed too.

Safety:

* DNS rebinding. A web page can make a browser send requests to a loopback
  port under the page's own host name; a server that does not check the
  ``Host`` header then takes them (``DELETE /api/studies/2`` on the dashboard).
  Both servers accept only :func:`allowed_hosts`: ``localhost``, ``127.0.0.1``,
  ``[::1]`` and the bind address, each with the server's port (for a wildcard
  bind also the machine's names and private addresses, as MLflow's default),
  plus ``--allowed-hosts`` / ``EMNIST_HPO_ALLOWED_HOSTS``. MLflow gets them as
  ``--allowed-hosts`` and ``--cors-allowed-origins`` (unless
  ``MLFLOW_SERVER_ALLOWED_HOSTS`` / ``MLFLOW_SERVER_CORS_ALLOWED_ORIGINS`` are
  set); the dashboard's WSGI app is wrapped in :class:`HostGuard`, which answers
  403 to another ``Host``, and to a state-changing request whose ``Origin`` is
  not allowed either.
* No orphans. The children get ``PR_SET_PDEATHSIG`` (Linux): the kernel sends
  them SIGTERM when the process that started them dies, ``kill -9`` included.
  The MLflow server runs under ``python -m emnist_hpo.serve.ui mlflow-server``, which
  passes that SIGTERM on to its whole process group (MLflow's uvicorn).
* No passwords in ``ps``: the store URLs reach the children through the
  environment (``MLFLOW_BACKEND_STORE_URI``, ``EMNIST_HPO_STORAGE``), not their
  command lines, and every message shows them redacted.

SQLite and a running study: the UIs only read. MLflow opens every session with
``PRAGMA busy_timeout = 20000``; the dashboard's connections here wait up to 30 s
(``connect_args={"timeout": 30}``). :func:`serve` also switches local SQLite
stores to write-ahead logging (:func:`enable_sqlite_wal`; the setting is stored in
the database file), under which readers and the one writer never block each
other. For the study's own writers, :func:`sqlite_url_with_timeout` adds a 30 s
busy timeout to an SQLite URL (SQLAlchemy passes ``?timeout=`` to ``sqlite3``;
Python's default is 5 s).

Run ``python -m emnist_hpo.serve.ui serve --help`` (or ``emnist_hpo ui`` through the
project's CLI) for the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fnmatch
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Callable, Iterable, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit

from emnist_hpo.config import DEFAULT_ARTIFACT_ROOT, DEFAULT_OPTUNA_STORAGE, DEFAULT_TRACKING_URI, resolve_storage
from emnist_hpo.coordination import signal_handlers, redact_arg, redact_secrets
from emnist_hpo.errors import ConfigError, EmnistHpoError, StorageError

__all__ = [
    "HostGuard",
    "SQLITE_TIMEOUT_S",
    "allowed_hosts",
    "enable_sqlite_wal",
    "ensure_port_free",
    "main",
    "run_dashboard",
    "serve",
    "sqlite_path",
    "sqlite_url_with_timeout",
    "start_dashboard",
    "start_mlflow_server",
    "stop_process",
    "stop_processes",
    "wait_http",
]

#: Seconds an SQLite connection waits for a lock before "database is locked".
SQLITE_TIMEOUT_S = 30.0
#: Seconds :func:`serve` waits for each server to answer HTTP.
STARTUP_TIMEOUT_S = 120.0
#: Seconds between SIGTERM and SIGKILL when stopping a server.
STOP_GRACE_S = 10.0
#: Seconds :func:`serve` gives an existing MLflow server (an ``http(s)://`` tracking URI) to answer.
REMOTE_CHECK_S = 5.0
#: Extra ``Host`` values both servers accept (comma-separated names or fnmatch patterns, ``*`` for any).
ALLOWED_HOSTS_ENV = "EMNIST_HPO_ALLOWED_HOSTS"
#: The names of this machine's loopback interface, as browsers write them in a ``Host`` header.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
#: Private address ranges MLflow's server accepts by default (``mlflow.server.security_utils``); allowed here
#: too on a wildcard bind, where a browser may reach the machine by any of its addresses.
PRIVATE_HOST_PATTERNS = ("10.*", "192.168.*", *(f"172.{i}.*" for i in range(16, 32)))
#: Linux's ``prctl`` option: the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


# --------------------------------------------------------------------------- helpers


def sqlite_path(url: str) -> Path | None:
    """The database file of an SQLite SQLAlchemy URL (absolute), else ``None``.

    ``sqlite:///mlruns/optuna.db`` is relative to the working directory,
    ``sqlite:////abs/optuna.db`` absolute; in-memory databases give ``None``.
    """
    parts = urlsplit(url)
    if not parts.scheme.startswith("sqlite"):
        return None
    path = url.split("://", 1)[1].split("?", 1)[0]
    if not path.startswith("/"):
        return None
    path = path[1:]  # the third slash separates the (empty) host from the path
    if path in ("", ":memory:"):
        return None
    return Path(path).expanduser().resolve()


def _absolute_sqlite_url(url: str) -> str:
    """``url`` with a relative SQLite path made absolute (other URLs unchanged)."""
    path = sqlite_path(url)
    if path is None:
        return url
    query = url.split("?", 1)[1] if "?" in url else ""
    scheme = url.split("://", 1)[0]
    return f"{scheme}:///{path}" + (f"?{query}" if query else "")


def sqlite_url_with_timeout(url: str, timeout: float = SQLITE_TIMEOUT_S) -> str:
    """``url`` with ``?timeout=<timeout>`` added when it is an SQLite URL without one.

    SQLAlchemy's ``pysqlite`` dialect hands ``timeout`` to :func:`sqlite3.connect`:
    the seconds a connection waits for another process's lock before raising
    "database is locked" (Python's default is 5). Works for Optuna's
    ``RDBStorage`` and MLflow's SQLAlchemy store alike. Other URLs are returned
    unchanged, as are SQLite URLs that already set ``timeout``.
    """
    if not urlsplit(url).scheme.startswith("sqlite"):
        return url
    base, _, query = url.partition("?")
    params = parse_qsl(query, keep_blank_values=True)
    if any(key == "timeout" for key, _ in params):
        return url
    params.append(("timeout", f"{timeout:g}"))
    return f"{base}?{urlencode(params)}"


def enable_sqlite_wal(url: str, timeout: float = 5.0) -> bool:
    """Switch an existing SQLite database to write-ahead logging; True if it is in WAL mode.

    WAL is a property of the database file (it persists), so one call is enough
    for every later connection, whatever opens it. Under WAL, readers (the UIs)
    never block the writer (a study) nor it them. Best effort: a database that is
    missing, not SQLite, on a read-only disk, or held by a writer right now is
    left as it is and ``False`` returned.
    """
    path = sqlite_path(url)
    if path is None or not path.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(str(path), timeout=timeout)) as conn:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    except sqlite3.Error:
        return False
    return str(mode).lower() == "wal"


def redact(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (for messages)."""
    return redact_arg(url)


def _is_http(uri: str) -> bool:
    return urlsplit(uri).scheme in ("http", "https")


def _url_host(host: str) -> str:
    """The host part for a URL a browser can open (a wildcard bind becomes loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def allowed_hosts(host: str, port: int, extra: Iterable[str] | None = None) -> list[str]:
    """The ``Host`` header values a server bound to ``host:port`` accepts (exact, or fnmatch patterns with ``*``).

    ``localhost``, ``127.0.0.1``, ``[::1]`` and ``host`` itself, each with ``port``; for a wildcard bind
    (``0.0.0.0``, ``::``) also this machine's host names and the private address ranges MLflow accepts by
    default. ``extra`` (default: ``EMNIST_HPO_ALLOWED_HOSTS``, comma-separated) adds names (given without a
    port, they get ``port``) or patterns; ``*`` accepts every host (no DNS-rebinding protection).
    """
    names = list(LOOPBACK_NAMES)
    if _is_wildcard(host):
        names += [socket.gethostname(), socket.getfqdn()]
    else:
        names.append(_url_host(host))
    if extra is None:
        extra = os.environ.get(ALLOWED_HOSTS_ENV, "").split(",")
    out: list[str] = []
    for name in names:
        if name and f"{name.lower()}:{port}" not in out:
            out.append(f"{name.lower()}:{port}")
    if _is_wildcard(host):
        out += list(PRIVATE_HOST_PATTERNS)
    for item in (e.strip().lower() for e in extra):
        if not item:
            continue
        has_port = item.rsplit("]", 1)[-1].count(":") == 1 if item.startswith("[") else item.count(":") == 1
        value = item if item == "*" or has_port or item.endswith("*") else f"{item}:{port}"
        if value not in out:
            out.append(value)
    return out


def host_allowed(value: str | None, allowed: Sequence[str]) -> bool:
    """Whether a ``Host`` value (``name:port``) matches ``allowed``: exactly, or as an fnmatch pattern with ``*``
    (``[`` matched literally, for IPv6 addresses), the rule MLflow's server applies."""
    value = (value or "").strip().lower()
    if not value:
        return False
    for pattern in allowed:
        if pattern == "*":
            return True
        if "*" in pattern:
            if fnmatch.fnmatchcase(value, pattern.replace("[", "[[]")):
                return True
        elif value == pattern:
            return True
    return False


class HostGuard:
    """WSGI middleware against DNS rebinding and cross-site requests (as MLflow's server guards itself).

    Answers ``403 Forbidden`` (a one-line text body naming the refused value and the allowed ones) to a request
    whose ``Host`` header is not in ``allowed``, and to any request but GET/HEAD whose ``Origin`` header names
    another host (a page of another site posting to this server). Other requests go to ``app`` unchanged.
    """

    SAFE_METHODS = ("GET", "HEAD")

    def __init__(self, app: Callable, allowed: Sequence[str], log: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.allowed = list(allowed)
        self.log = log

    def __call__(self, environ: dict, start_response: Callable):
        host = environ.get("HTTP_HOST")
        if not host_allowed(host, self.allowed):
            return self._deny(start_response, f"Host {host!r} is not allowed")
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None and environ.get("REQUEST_METHOD", "GET").upper() not in self.SAFE_METHODS:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not host_allowed(parts.netloc, self.allowed):
                return self._deny(start_response, f"Origin {origin!r} is not allowed")
        return self.app(environ, start_response)

    def _deny(self, start_response: Callable, why: str) -> list[bytes]:
        message = f"403 Forbidden: {why} (allowed hosts: {', '.join(self.allowed)})"
        if self.log is not None:
            self.log(message)
        body = (message + "\n").encode("utf-8", "replace")
        start_response("403 Forbidden", [("Content-Type", "text/plain; charset=utf-8"),
                                         ("Content-Length", str(len(body)))])
        return [body]


def local_artifact_root(tracking_uri: str) -> str | None:
    """``file://`` artifact root for a local SQLite tracking store, else ``None``.

    The same rule as the study's (:func:`emnist_hpo.tracking.tracker.local_artifact_root`,
    not imported here because that module imports Keras): ``mlruns/artifacts``
    for the default store, ``artifacts/`` beside the database file otherwise.
    """
    path = sqlite_path(tracking_uri)
    if path is None:
        return None
    if path == sqlite_path(DEFAULT_TRACKING_URI):
        return Path(DEFAULT_ARTIFACT_ROOT).resolve().as_uri()
    return (path.parent / "artifacts").as_uri()


def ensure_port_free(host: str, port: int, what: str = "server") -> None:
    """Raise :class:`ConfigError` naming ``port`` when nothing can listen on ``host:port``.

    Binds a socket the way the servers do (``SO_REUSEADDR``, so a port that only
    has connections in TIME_WAIT counts as free) and closes it at once.
    """
    if not 0 < port < 65536:
        raise ConfigError(f"{what} port must be in 1..65535 (port={port})")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"{what} port {port} is already in use on {host} (port={port})") from None
        raise ConfigError(f"cannot listen on {host}:{port} for the {what}: {exc.strerror} (port={port})") from None


def wait_http(url: str, timeout: float = 60.0, *, proc: subprocess.Popen | None = None,
              interval: float = 0.2) -> int:
    """Poll ``url`` with GET until the server answers; return the HTTP status.

    Any response below 500 counts as an answer (a 401 from a server with basic
    auth, say). Raises :class:`TimeoutError` after ``timeout`` seconds, or
    :class:`RuntimeError` at once if ``proc`` (the server's process) has exited.
    """
    deadline = time.monotonic() + timeout
    last: str = "no answer yet"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with code {proc.returncode} before {url} answered")
        try:  # a server that accepts and never answers costs at most what is left of the timeout
            with opener.open(url, timeout=max(0.5, min(5.0, deadline - time.monotonic()))) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return exc.code
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:g} s ({last})")
        time.sleep(interval)


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # Under pytest MLflow turns on test-only checks of its own sessions; a server
    # started from a test should behave as in production.
    env.pop("PYTEST_CURRENT_TEST", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` giving the child ``SIGTERM`` when this process dies (Linux ``PR_SET_PDEATHSIG``).

    Without it a ``kill -9`` of ``ui`` would leave both servers running on their ports. The setting
    survives ``exec`` but not ``fork``: :func:`run_mlflow_server` passes the signal on to its group. The
    kernel sends it when the *thread* that started the child ends, so start servers from a thread that
    lives as long as they should. ``None`` (nothing to do) on other systems.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above: nothing will signal us
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _popen(cmd: Sequence[str], *, env: dict[str, str], log_file: str | os.PathLike[str] | None) -> subprocess.Popen:
    """Start ``cmd`` as the leader of a new session (process group), output to ``log_file``; it dies with us."""
    out: IO[bytes] | int
    out = open(log_file, "ab") if log_file is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(list(cmd), env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent())
    finally:
        if out is not subprocess.DEVNULL:
            out.close()


def _package_env() -> dict[str, str]:
    """PYTHONPATH for a child that imports this package, so it finds this copy.

    A source checkout goes first on PYTHONPATH; an installed copy is found anyway, and
    site-packages must not go on PYTHONPATH ahead of the standard library.
    """
    package_root = str(Path(__file__).resolve().parents[2])
    if package_root in {str(Path(p).resolve()) for p in sysconfig.get_paths().values()}:
        return {}
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": package_root + (os.pathsep + path if path else "")}


def start_mlflow_server(backend_store_uri: str, *, host: str = "127.0.0.1", port: int = 5000,
                        artifacts_destination: str | os.PathLike[str] | None = None,
                        serve_artifacts: bool = False, workers: int = 1,
                        default_artifact_root: str | None = None,
                        log_file: str | os.PathLike[str] | None = None,
                        extra_args: Sequence[str] = (),
                        allowed: Sequence[str] | None = None) -> subprocess.Popen:
    """Start ``mlflow server`` on ``backend_store_uri`` in its own process group; return at once.

    Small footprint: ``--workers`` (1 by default) and
    ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` (no job consumers). With
    ``serve_artifacts`` the server proxies artifacts (``--serve-artifacts``) and
    keeps them under ``artifacts_destination`` (``--artifacts-destination``; a
    plain path is made absolute), and experiments it creates get
    ``mlflow-artifacts:/`` locations; otherwise ``--no-serve-artifacts`` and
    ``default_artifact_root`` (if given) is where new experiments keep theirs.
    ``extra_args`` are appended (``--app-name basic-auth``, say).
    ``allowed`` (default :func:`allowed_hosts` of ``host`` and ``port``) goes to
    ``--allowed-hosts``, and as ``http://`` origins to ``--cors-allowed-origins``,
    unless ``MLFLOW_SERVER_ALLOWED_HOSTS`` / ``MLFLOW_SERVER_CORS_ALLOWED_ORIGINS``
    are set. The store URL travels in ``MLFLOW_BACKEND_STORE_URI``, not on the
    command line (``ps`` shows command lines to every user). The server runs
    under :func:`run_mlflow_server`, which stops its whole process group when it
    gets SIGTERM, also from the kernel when this process dies.
    Use :func:`wait_http` on ``http://host:port/health`` to wait for it, and
    :func:`stop_process` to stop it (the CLI process and its uvicorn child).
    """
    cmd = [sys.executable, "-m", "emnist_hpo.serve.ui", "mlflow-server",
           "--host", host, "--port", str(port), "--workers", str(workers)]
    allowed = list(allowed) if allowed is not None else allowed_hosts(host, port)
    if not os.environ.get("MLFLOW_SERVER_ALLOWED_HOSTS"):
        cmd += ["--allowed-hosts", ",".join(allowed)]
    if not os.environ.get("MLFLOW_SERVER_CORS_ALLOWED_ORIGINS") and "*" not in allowed:
        cmd += ["--cors-allowed-origins", ",".join(f"http://{h}" for h in allowed)]
    if serve_artifacts:
        cmd.append("--serve-artifacts")
        if artifacts_destination is not None:
            dest = str(artifacts_destination)
            if "://" not in dest:
                dest = str(Path(dest).resolve())
            cmd += ["--artifacts-destination", dest]
    else:
        cmd.append("--no-serve-artifacts")
    if default_artifact_root is not None:
        cmd += ["--default-artifact-root", default_artifact_root]
    cmd += list(extra_args)
    env = _child_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                      "MLFLOW_BACKEND_STORE_URI": _absolute_sqlite_url(backend_store_uri), **_package_env()})
    return _popen(cmd, env=env, log_file=log_file)


def run_mlflow_server(args: Sequence[str]) -> int:
    """``mlflow server ARGS`` in this process, which stops its whole process group on SIGTERM or SIGHUP.

    MLflow's CLI runs uvicorn as a child process, which a plain SIGTERM to the CLI would orphan; and the
    SIGTERM of ``PR_SET_PDEATHSIG`` (the kernel's, when ``ui`` dies) reaches only this process. So, when
    this process leads its process group (:func:`start_mlflow_server` starts it so), the handler sends
    SIGTERM to the group, waits up to :data:`STOP_GRACE_S` for its children to exit, SIGKILLs the group
    if they did not, and exits 0.
    """
    def stop_group(signum, frame) -> None:  # noqa: ARG001
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        pgid = os.getpgrp()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    if time.monotonic() >= deadline:
                        os.killpg(pgid, signal.SIGKILL)  # the stragglers, and this process
                    time.sleep(0.05)
            except ChildProcessError:  # no children left
                break
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    if os.getpgrp() == os.getpid():  # leading a group of its own: never signal a shell's job
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, stop_group)
    from mlflow.cli import cli

    return cli.main(args=["server", *args], prog_name="mlflow", standalone_mode=True)


def start_dashboard(storage: str, *, host: str = "127.0.0.1", port: int = 8080,
                    log_file: str | os.PathLike[str] | None = None,
                    allowed: Sequence[str] | None = None) -> subprocess.Popen:
    """Start the Optuna dashboard (:func:`run_dashboard`) in its own process group; return at once.

    The storage URL travels in ``EMNIST_HPO_STORAGE``, not on the command line (``ps`` shows those to
    every user); ``allowed`` (default :func:`allowed_hosts`) are the ``Host`` values it accepts.
    """
    cmd = [sys.executable, "-m", "emnist_hpo.serve.ui", "dashboard", "--host", host, "--port", str(port)]
    if allowed is not None:
        cmd += ["--allowed-hosts", ",".join(allowed)]
    extra = {"EMNIST_HPO_STORAGE": _absolute_sqlite_url(storage), **_package_env()}
    return _popen(cmd, env=_child_env(extra), log_file=log_file)


def stop_processes(procs: Sequence[subprocess.Popen], grace: float = STOP_GRACE_S) -> list[int]:
    """:func:`stop_process` for several servers at once: all get SIGTERM first, then each is awaited."""
    for proc in procs:
        _signal_group(proc.pid, signal.SIGTERM)
    return [_await_group(proc, grace) for proc in procs]


def stop_process(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> int:
    """Stop ``proc``'s process group: SIGTERM, then SIGKILL after ``grace`` seconds.

    ``proc`` must have been started as a session leader (as :func:`start_mlflow_server`
    and :func:`start_dashboard` do), so its group id is its pid and the whole
    group (mlflow's CLI process and its uvicorn worker, say) goes. Returns the
    exit code of ``proc``.
    """
    _signal_group(proc.pid, signal.SIGTERM)
    return _await_group(proc, grace)


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def _await_group(proc: subprocess.Popen, grace: float) -> int:
    """Wait up to ``grace`` s for the (signalled) group of ``proc`` to be gone, then SIGKILL it."""
    pgid = proc.pid
    if not _wait_group(proc, grace):
        _signal_group(pgid, signal.SIGKILL)
        _wait_group(proc, 5.0)
    return proc.returncode if proc.returncode is not None else -signal.SIGKILL


def _wait_group(proc: subprocess.Popen, timeout: float) -> bool:
    """True once ``proc`` has exited and no process of its group is left within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        proc.poll()
        if proc.returncode is not None and not _group_alive(proc.pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    # Reap members that became our children (when this process is PID 1, orphans do).
    with contextlib.suppress(ChildProcessError, OSError):
        while os.waitpid(-pgid, os.WNOHANG)[0]:
            pass
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


# --------------------------------------------------------------------------- dashboard


def open_optuna_storage(storage: str):
    """An Optuna storage for the dashboard; for an RDB URL, created (schema and all) if new.

    SQLite connections wait up to :data:`SQLITE_TIMEOUT_S` for locks. A schema
    from an older Optuna raises :class:`StorageError` (run ``optuna storage upgrade``).
    Non-RDB storages (a journal file, ``redis://``) are left to optuna-dashboard.
    """
    import optuna

    if "://" not in storage or storage.startswith("redis"):
        return storage
    engine_kwargs: dict = {}
    if urlsplit(storage).scheme.startswith("sqlite"):
        path = sqlite_path(storage)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    try:
        return optuna.storages.RDBStorage(storage, engine_kwargs=engine_kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure means this storage cannot be served
        raise StorageError(f"Optuna storage {redact(storage)!r} cannot be used: "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None


def run_dashboard(storage: str, *, host: str = "127.0.0.1", port: int = 8080, quiet: bool = True,
                  allowed: Sequence[str] | None = None) -> None:
    """Run the Optuna dashboard on ``storage`` in the foreground until SIGTERM/SIGINT.

    A threaded ``wsgiref`` server around :func:`optuna_dashboard.wsgi` (one
    process, ~0.24 GB; optuna-dashboard's own CLI picks gunicorn, two processes),
    behind :class:`HostGuard` with ``allowed`` (default :func:`allowed_hosts` of
    ``host`` and ``port``). ``quiet`` drops the per-request log lines (errors and
    refused requests are still printed).
    """
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    import optuna
    import optuna_dashboard

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opened = open_optuna_storage(storage)
    allowed = list(allowed) if allowed is not None else allowed_hosts(host, port)
    app = HostGuard(optuna_dashboard.wsgi(opened), allowed, log=lambda m: print(m, file=sys.stderr, flush=True))

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        daemon_threads = True
        allow_reuse_address = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Handler(WSGIRequestHandler):
        def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib's name
            if not quiet:
                super().log_message(format, *args)

    try:
        httpd = make_server(host, port, app, server_class=Server, handler_class=Handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"Optuna dashboard port {port} is already in use on {host} (port={port})") from None
        raise ConfigError(f"cannot listen on {host}:{port} for the Optuna dashboard: {exc.strerror}") from None

    def _stop(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    print(f"Optuna dashboard on http://{_url_host(host)}:{port}/dashboard/ (storage {redact(storage)})",
          file=sys.stderr, flush=True)
    try:
        httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        engine = getattr(opened, "engine", None)
        if engine is not None:
            engine.dispose()  # close the database connections cleanly


# --------------------------------------------------------------------------- serve


def _check_database(url: str, what: str, timeout: float = 5.0) -> None:
    """:class:`StorageError` (redacted) unless a PostgreSQL or MySQL ``url`` accepts a connection within
    ``timeout`` s; other URLs are left to the servers. Without this a server on a database host that drops
    packets would take minutes to fail."""
    dialect = urlsplit(url).scheme.split("+", 1)[0]
    if dialect not in ("postgresql", "mysql"):
        return
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                          connect_args={"connect_timeout": int(timeout)})
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure: the server could not use it either
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise StorageError(f"{what} {redact(url)!r} is unreachable: {redact_secrets(text)[:300]}") from None


def _raise_keyboard_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


def _signals_raise_keyboard_interrupt():
    """Within the block, SIGTERM (and SIGHUP) raise KeyboardInterrupt like Ctrl-C does."""
    return signal_handlers(_raise_keyboard_interrupt)


def serve(*, storage: str = DEFAULT_OPTUNA_STORAGE, tracking_uri: str = DEFAULT_TRACKING_URI,
          mlflow_port: int = 5000, dashboard_port: int = 8080, host: str = "127.0.0.1",
          log_dir: str | os.PathLike[str] | None = None, startup_timeout: float = STARTUP_TIMEOUT_S,
          allowed: Sequence[str] | None = None) -> int:
    """Serve the MLflow UI and the Optuna dashboard until Ctrl-C or SIGTERM; return 0.

    ``storage`` is the Optuna storage URL, ``tracking_uri`` the MLflow tracking
    store (both as the study got them; relative SQLite paths are relative to the
    working directory). An ``http(s)://`` tracking URI is a running MLflow
    server: it is checked and its URL printed, and no second server started.
    Both servers bind to ``host``; on a non-loopback ``host``, MLflow accepts
    only Host headers of localhost and private addresses unless
    ``MLFLOW_SERVER_ALLOWED_HOSTS`` is set.

    Both accept only the ``Host`` values of :func:`allowed_hosts` (``allowed``
    adds to them; default ``EMNIST_HPO_ALLOWED_HOSTS``). A database store
    (PostgreSQL, MySQL) and an ``http(s)://`` server are checked to answer within
    seconds before anything starts.

    Prints ``MLflow UI: <url>`` and ``Optuna dashboard: <url>`` on stdout once
    both answer HTTP. The servers' output goes to ``mlflow-server.log`` and
    ``optuna-dashboard.log`` in ``log_dir`` (a new temporary folder if ``None``).
    Raises :class:`ConfigError` if a port is taken (naming it) and
    :class:`StorageError` if a server does not come up (with its log's last
    lines). Returns 1 if a server dies while serving (the other is stopped).
    """
    if mlflow_port == dashboard_port and not _is_http(tracking_uri):
        raise ConfigError(f"--mlflow-port and --dashboard-port must differ (both {mlflow_port})")
    start_mlflow = not _is_http(tracking_uri)
    if start_mlflow:
        ensure_port_free(host, mlflow_port, "MLflow UI")
    ensure_port_free(host, dashboard_port, "Optuna dashboard")
    if not start_mlflow:  # an existing server: it answers now, or this fails within seconds
        try:
            wait_http(f"{tracking_uri.rstrip('/')}/health", REMOTE_CHECK_S)
        except TimeoutError as exc:
            raise StorageError(f"MLflow server {redact(tracking_uri)} does not answer: "
                               f"{redact_secrets(str(exc))}") from None
    _check_database(storage, "Optuna storage")
    if start_mlflow:
        _check_database(tracking_uri, "MLflow tracking store")

    logs = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="emnist-hpo-ui-"))
    logs.mkdir(parents=True, exist_ok=True)
    mlflow_log, dashboard_log = logs / "mlflow-server.log", logs / "optuna-dashboard.log"

    for url in (storage, tracking_uri):
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            enable_sqlite_wal(url)

    mlflow_url = tracking_uri.rstrip("/") if not start_mlflow else f"http://{_url_host(host)}:{mlflow_port}"
    dashboard_url = f"http://{_url_host(host)}:{dashboard_port}/dashboard/"
    children: dict[str, tuple[subprocess.Popen, Path]] = {}
    with _signals_raise_keyboard_interrupt():
        try:
            if start_mlflow:
                children["MLflow UI"] = (start_mlflow_server(
                    tracking_uri, host=host, port=mlflow_port, serve_artifacts=False, workers=1,
                    default_artifact_root=local_artifact_root(tracking_uri), log_file=mlflow_log,
                    allowed=allowed_hosts(host, mlflow_port, allowed)), mlflow_log)
            children["Optuna dashboard"] = (start_dashboard(
                storage, host=host, port=dashboard_port, log_file=dashboard_log,
                allowed=allowed_hosts(host, dashboard_port, allowed)), dashboard_log)

            # The dashboard first: it starts (or fails) in a couple of seconds, MLflow in several.
            probes = {"Optuna dashboard": f"http://{_url_host(host)}:{dashboard_port}/api/studies",
                      "MLflow UI": f"{mlflow_url}/health"}
            t0 = time.monotonic()
            for name, url in probes.items():
                proc, log = children.get(name, (None, None))
                left = max(1.0, startup_timeout - (time.monotonic() - t0))
                try:
                    wait_http(url, left if proc is not None else min(left, 10.0), proc=proc)
                except (TimeoutError, RuntimeError) as exc:
                    if proc is None:
                        raise StorageError(f"MLflow server {redact(tracking_uri)} does not answer: "
                                           f"{redact_secrets(str(exc))}") from None
                    raise StorageError(f"{name} did not start: {exc}\n{redact_secrets(_log_tail(log))}") from None

            print(f"MLflow UI:        {redact(mlflow_url)}", flush=True)
            print(f"Optuna dashboard: {dashboard_url}", flush=True)
            print(f"Logs in {logs}. Press Ctrl-C to stop.", flush=True)
            while True:
                for name, (proc, log) in children.items():
                    if proc.poll() is not None:
                        print(f"emnist-hpo ui: the {name} exited with code {proc.returncode}; "
                              f"stopping.\n{redact_secrets(_log_tail(log))}", file=sys.stderr, flush=True)
                        return 1
                time.sleep(0.5)
        except KeyboardInterrupt:
            return 0
        finally:
            # A second Ctrl-C (or SIGTERM) while stopping is ignored, so it cannot
            # leave a child behind half-way: both process groups are always stopped.
            with _ignoring_interrupts():
                stop_processes([proc for proc, _ in children.values()])


def _ignoring_interrupts():
    """Within the block, SIGTERM, SIGHUP and SIGINT are ignored (a clean-up that must not be cut short)."""
    return signal_handlers(signal.SIG_IGN)


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m emnist_hpo.serve.ui", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the MLflow UI and the Optuna dashboard (Ctrl-C stops both)")
    s.add_argument("--storage", default=DEFAULT_OPTUNA_STORAGE, help="Optuna storage URL (default: %(default)s)")
    s.add_argument("--tracking-uri", default=None,
                   help=f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else {DEFAULT_TRACKING_URI})")
    s.add_argument("--mlflow-port", type=int, default=5000, help="MLflow UI port (default: %(default)s)")
    s.add_argument("--dashboard-port", type=int, default=8080, help="Optuna dashboard port (default: %(default)s)")
    s.add_argument("--host", default="127.0.0.1", help="address both servers bind to (default: %(default)s)")
    s.add_argument("--log-dir", default=None, help="folder for the servers' logs (default: a new temporary one)")
    allowed_help = (f"comma-separated extra Host names or patterns to accept (default: ${ALLOWED_HOSTS_ENV}); "
                    "localhost, 127.0.0.1, [::1] and --host are always accepted")
    s.add_argument("--allowed-hosts", default=None, help=allowed_help)
    d = sub.add_parser("dashboard", help="run only the Optuna dashboard, in the foreground")
    d.add_argument("--storage", default=None,
                   help=f"Optuna storage URL (default: $EMNIST_HPO_STORAGE, else {DEFAULT_OPTUNA_STORAGE})")
    d.add_argument("--host", default="127.0.0.1", help="address to bind to (default: %(default)s)")
    d.add_argument("--port", type=int, default=8080, help="port (default: %(default)s)")
    d.add_argument("--allowed-hosts", default=None, help=allowed_help)
    d.add_argument("--verbose", action="store_true", help="log every request")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m emnist_hpo.serve.ui serve|dashboard|mlflow-server ...``; errors print one line and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["mlflow-server"]:  # mlflow server's own options follow; see run_mlflow_server
        return run_mlflow_server(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "dashboard":
            allowed = allowed_hosts(args.host, args.port,
                                    args.allowed_hosts.split(",") if args.allowed_hosts is not None else None)
            run_dashboard(resolve_storage(args.storage), host=args.host, port=args.port, quiet=not args.verbose,
                          allowed=allowed)
            # Server and connections are closed: skip the interpreter's ~2 s teardown of
            # the dashboard's imports, so that stopping it is quick.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
        extra = args.allowed_hosts.split(",") if args.allowed_hosts is not None else None
        return serve(storage=args.storage, tracking_uri=tracking_uri, mlflow_port=args.mlflow_port,
                     dashboard_port=args.dashboard_port, host=args.host, log_dir=args.log_dir, allowed=extra)
    except EmnistHpoError as exc:
        print(f"error: {redact_secrets(str(exc))}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
