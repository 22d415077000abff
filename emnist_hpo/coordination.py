"""Coordination between processes that share a study: who owns what, and locks through the stores.

Several processes may work on one study: ``study --workers N`` on one machine,
or independent ``study`` commands on several machines sharing a PostgreSQL
storage and an MLflow server. Two tools keep them from stepping on each other:

* **Owners.** Every trial (Optuna user attribute ``owner``) and every MLflow
  run (tag ``emnist_hpo.owner``) records ``host:pid:start`` of the process that
  runs it. On the same host, :func:`owner_alive` tells a live owner from a dead
  one (``kill -9``, a crash, a reboot; the start time guards against a reused
  pid), so the next invocation fails a dead process's trial at once instead of
  waiting for Optuna's heartbeat grace period. Owners on other hosts are
  unknown (``None``); their trials go stale through the heartbeat.
* **Locks.** :func:`store_lock` is a mutex among all processes using one store:
  an exclusive ``flock`` on ``<db>.lock`` beside an SQLite file, a session-level
  advisory lock (``pg_advisory_lock``) on PostgreSQL, ``GET_LOCK`` on MySQL. The
  lock dies with its holder (the kernel drops a dead process's flock, the server
  a closed session's advisory lock), so a ``kill -9`` never leaves it held.

:data:`PAUSE_ENV` is a test hook: ``EMNIST_HPO_TEST_PAUSE_AT=<phase>[#<n>]``
makes :func:`pause_point` print one line and sleep at the n-th time (default 1)
the process reaches ``phase`` (``training``, ``artifacts``, ``register``), so a
test can kill the process at a known moment. Unset, :func:`pause_point` does
nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import time
import zlib
from pathlib import Path
from typing import Iterator

from emnist_hpo.errors import StorageError

#: Optuna trial user attribute and MLflow run tag naming the process that runs it.
OWNER_ATTR = "owner"
OWNER_TAG = "emnist_hpo.owner"
#: Test hook: ``<phase>[#<n>]`` pauses the process at the n-th ``pause_point(phase)``.
PAUSE_ENV = "EMNIST_HPO_TEST_PAUSE_AT"
#: Seconds :func:`store_lock` waits for another process before giving up.
LOCK_TIMEOUT_S = 600.0
#: First key of every advisory lock this project takes on PostgreSQL ("EMNI").
_PG_LOCK_SPACE = 0x454D4E49


#: ``scheme://user:password@`` in any text. SQLAlchemy takes any character but ``@`` in a password (``/``
#: included), so the pattern does too, but for spaces and quotes, which end a URL in a message ...
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"]*):[^\s@'\"]*@")
#: ... and in a single command-line argument, where spaces are part of it.
_ARG_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"]*):[^@]*@")
#: ``?password=...`` style query parameters (psycopg2 and MySQL drivers take them too).
_QUERY_SECRET = re.compile(r"(?i)([?&](?:password|passwd|pwd|secret|token|access_token)=)[^&\s'\"]*")


def redact_secrets(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***`` (``postgresql://u:***@host/db``).

    For messages, log lines and command lines that may show a storage or tracking URL; text without
    credentials is returned unchanged.
    """
    return _QUERY_SECRET.sub(r"\1***", _URL_PASSWORD.sub(r"\1:***@", str(text)))


def redact_arg(arg: str) -> str:
    """One command-line argument (``URL`` or ``--option=URL``) redacted; its password may hold spaces too."""
    return redact_secrets(_ARG_PASSWORD.sub(r"\1:***@", str(arg), count=1))


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None where /proc is unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), counted after "pid (comm)"


def current_owner() -> str:
    """``host:pid:start`` of this process."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or 0}"


def owner_alive(owner: str | None) -> bool | None:
    """True or False for an owner on this host; None when it runs elsewhere (or ``owner`` is unknown)."""
    if not owner:
        return None
    try:
        host, pid_text, start = owner.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, but someone else's
    now = _start_time(pid)
    if start not in ("0", "") and now is not None and now != start:
        return False  # the pid was reused by a newer process
    return True


def sqlite_file(url: str) -> Path | None:
    """The database file of an SQLite URL (None for other URLs and in-memory databases)."""
    if not url.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    try:
        db = make_url(url).database
    except Exception:  # noqa: BLE001 - not a URL: not a file either
        return None
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db)


def check_sqlite_location(url: str, what: str, option: str) -> None:
    """Raise :class:`StorageError` unless the SQLite file of ``url`` exists or can be created; writes nothing.

    An SQLite URL without a file (``sqlite://``, ``sqlite:///:memory:``, ``file:`` URIs) is refused:
    an in-memory store vanishes with the process, so a study in it can never be resumed, shared
    with ``--workers`` processes or shown by ``ui``.
    """
    path = sqlite_file(url)
    if path is None:
        if url.startswith("sqlite:"):
            raise StorageError(
                f"{what} {url!r} is not an SQLite file: an in-memory database is lost when the process ends, so "
                f"it cannot be resumed or shared with worker processes (give {option} sqlite:///PATH.db)"
            )
        return
    if path.exists():
        if not path.is_file():
            raise StorageError(f"{what} {url!r} is not usable: {path} is not a file (give {option} sqlite:///PATH.db)")
        if not os.access(path, os.R_OK | os.W_OK):
            raise StorageError(f"{what} {url!r} is not usable: {path} is not readable and writable")
        return
    parent = path.parent if str(path.parent) else Path(".")
    probe = parent
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise StorageError(
            f"{what} {url!r} cannot be created: {probe} is not a writable folder (give {option} a path you can write)"
        )


#: Tables only Optuna's RDB storage creates, and tables only MLflow's SQLAlchemy store creates (both have
#: ``alembic_version``, so it tells them apart from neither).
OPTUNA_TABLES = frozenset({"version_info", "studies", "trials", "study_directions", "trial_values"})
MLFLOW_TABLES = frozenset({"experiments", "runs", "metrics", "params", "registered_models", "model_versions"})


def _hide_password(url: str) -> str:
    from urllib.parse import urlsplit

    try:
        password = urlsplit(url).password
    except ValueError:
        return url
    return url.replace(f":{password}@", ":***@", 1) if password else url


def _database(url: str) -> tuple | None:
    """What identifies the database of a SQLAlchemy URL: (backend, host, port, database); None if not one."""
    from sqlalchemy.engine import make_url

    db = sqlite_file(url)
    if db is not None:
        return ("sqlite", str(db.expanduser().resolve()))
    if "://" not in url or url.startswith(("http:", "https:", "file:", "sqlite:")):
        return None
    try:
        u = make_url(url)
    except Exception:  # noqa: BLE001 - not a database URL: the store's own check says so
        return None
    return (u.get_backend_name(), (u.host or "localhost").lower(), u.port, u.database)


def sqlite_tables(url: str) -> set[str]:
    """The tables of an existing SQLite database file, read without writing anything (empty if none)."""
    import sqlite3

    db = sqlite_file(url)
    if db is None or not db.is_file() or db.stat().st_size == 0:
        return set()
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
        try:
            return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise StorageError(f"{_hide_password(url)!r}: {db} is not an SQLite database ({exc})") from None


def check_separate_stores(storage: str | None, tracking_uri: str | None) -> None:
    """Refuse an Optuna storage and an MLflow tracking store that are one database, or one store's URL that
    points at the other's database: each would write its tables into the other's. Reads, never writes.

    Call it with the resolved URLs before either store is opened (either may be None: only the other's
    database is then checked for the foreign tables). The two stores are told apart by their own tables,
    :data:`OPTUNA_TABLES` and :data:`MLFLOW_TABLES`.
    """
    if storage is not None and tracking_uri is not None:
        a, b = _database(storage), _database(tracking_uri)
        if a is not None and a == b:
            raise StorageError(
                f"the Optuna storage (--storage {_hide_password(storage)!r}) and the MLflow tracking store "
                f"(--tracking-uri {_hide_password(tracking_uri)!r}) are the same database; each needs its own "
                "(e.g. sqlite:///mlruns/optuna.db and sqlite:///mlruns/mlflow.db)"
            )
    for url, option, what, own, foreign, foreign_name in (
        (storage, "--storage", "Optuna storage", OPTUNA_TABLES, MLFLOW_TABLES, "MLflow tracking store"),
        (tracking_uri, "--tracking-uri", "MLflow tracking store", MLFLOW_TABLES, OPTUNA_TABLES, "Optuna storage"),
    ):
        if url is None:
            continue
        tables = sqlite_tables(url)
        theirs = sorted(tables & foreign)
        if theirs and not tables & own:
            raise StorageError(
                f"{option} {_hide_password(url)!r} is an {foreign_name}'s database (it holds the tables "
                f"{', '.join(theirs[:4])}): the {what} must not write its tables into it; give {option} "
                "a database of its own"
            )
        if tables and not tables & own and tables - {"alembic_version", "sqlite_sequence"}:
            others = sorted(tables)
            raise StorageError(
                f"{option} {_hide_password(url)!r} holds tables of another application "
                f"({', '.join(others[:4])}{', ...' if len(others) > 4 else ''}), not an {what}'s; give {option} "
                "a database of its own"
            )


def sqlite_wal(db: Path) -> None:
    """Switch an SQLite database to write-ahead logging, under which readers and the one writer never block
    each other (a property of the file: once is enough for every later connection)."""
    import sqlite3

    conn = sqlite3.connect(str(db), timeout=60)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()


@contextlib.contextmanager
def saved_environ(*keys: str) -> Iterator[None]:
    """Restore environment variables ``keys`` (set or unset) as they were, whatever the block did to them."""
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def store_lock(url: str, name: str, engine=None, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold an exclusive lock named ``name`` among all processes using the store at ``url``.

    ``engine`` (a SQLAlchemy engine on ``url``) is reused for database locks when
    given. Stores without a lock mechanism (in-memory, journal files) get none:
    only one process can use them anyway. Raises :class:`StorageError` after
    ``timeout`` seconds. Not re-entrant: never nest two locks on one store.
    """
    db = sqlite_file(url)
    if db is not None:
        with _file_lock(Path(f"{db}.lock"), timeout):
            yield
        return
    dialect = url.split(":", 1)[0].split("+", 1)[0]
    if dialect not in ("postgresql", "mysql"):
        yield
        return
    import sqlalchemy

    own = engine is None
    if own:
        connect_args = {"connect_timeout": 5}
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args=connect_args)
    key = zlib.crc32(name.encode()) - (1 << 31)  # a signed 32-bit key
    try:
        with engine.connect() as conn:
            if dialect == "postgresql":
                conn.execute(sqlalchemy.text(f"SET lock_timeout = '{int(timeout * 1000)}ms'"))
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:a, :b)"), {"a": _PG_LOCK_SPACE, "b": key})
                conn.commit()
            else:
                got = conn.execute(sqlalchemy.text("SELECT GET_LOCK(:n, :t)"),
                                   {"n": f"emnist_hpo:{name}"[:64], "t": int(timeout)}).scalar()
                if got != 1:
                    raise StorageError(f"could not take the lock {name!r} on {url.split('@')[-1]} in {timeout:g} s")
            try:
                yield
            finally:
                if dialect == "postgresql":
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:a, :b)"), {"a": _PG_LOCK_SPACE, "b": key})
                    conn.commit()
                else:
                    conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:n)"), {"n": f"emnist_hpo:{name}"[:64]})
    finally:
        if own:
            engine.dispose()


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StorageError(f"{path} stayed locked by another process for {timeout:g} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


_pause_counts: dict[str, int] = {}


@contextlib.contextmanager
def signal_handlers(handler, signals: tuple[int, ...] | None = None) -> Iterator[None]:
    """Within the block, ``signals`` (SIGTERM, SIGHUP, SIGINT by default) go to ``handler`` (``signal.SIG_IGN``
    to ignore them); outside the main thread nothing changes (Python allows handlers there only)."""
    import signal as _signal

    if signals is None:
        signals = (_signal.SIGTERM, _signal.SIGHUP, _signal.SIGINT)
    previous = {}
    try:
        for sig in signals:
            previous[sig] = _signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            _signal.signal(sig, old)


def pause_point(phase: str) -> None:
    """Test hook: sleep here if :data:`PAUSE_ENV` names ``phase`` (see the module docstring)."""
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    want, _, nth = spec.partition("#")
    if want != phase:
        return
    _pause_counts[phase] = _pause_counts.get(phase, 0) + 1
    if _pause_counts[phase] != int(nth or 1):
        return
    print(f"emnist-hpo: test pause at {phase} (pid {os.getpid()})", file=sys.stderr, flush=True)
    time.sleep(3600)
