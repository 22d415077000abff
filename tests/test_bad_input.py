"""Bad input anywhere: exit code 2, one line naming the value and what is allowed, nothing recorded.

One real study populates the default stores (``mlruns/`` in a working folder)
and registers a digits champion; then every bad input of the table runs the
CLI there, and the stores are compared with a snapshot taken before: every
table's rows and every artifact file are unchanged.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from emnist_hpo.cli import main

SPACE = """\
conv_blocks: 1
filters: {choices: [4, 8]}
kernel: 3
dense_layers: 0
dense_units: 16
learning_rate: {low: 1.0e-3, high: 1.0e-2, log: true}
"""
STUDY = ["study", "--split", "digits", "--trials", "1", "--epochs", "1", "--max-train-samples", "1000",
         "--finalists", "0", "--search-space", "space.yaml", "--no-warm-start", "--no-progress"]


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def world(tmp_path_factory, sample_dir):
    """A working folder whose default stores hold one finished study and a registered digits champion."""
    root = tmp_path_factory.mktemp("bad_input")
    (root / "space.yaml").write_text(SPACE)
    old_cwd, old_env = os.getcwd(), dict(os.environ)
    os.environ.update(EMNIST_DATA_DIR=str(sample_dir), EMNIST_HPO_CACHE=str(root / "cache"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.chdir(root)
    try:
        assert main(STUDY) == 0
        yield root
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)


def snapshot(root: Path) -> dict:
    """Every row of every table of both databases (hashed) and every other file under mlruns/ with its size."""
    state: dict = {}
    for db in sorted((root / "mlruns").glob("*.db")):
        with sqlite3.connect(db) as conn:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for t in tables:
                rows = sorted(repr(r) for r in conn.execute(f'SELECT * FROM "{t}"'))
                state[f"{db.name}:{t}"] = (len(rows), hashlib.sha256("\n".join(rows).encode()).hexdigest())
    for p in sorted((root / "mlruns").rglob("*")):
        # registered_model_meta: MLflow's loader rewrites it in a local store each time a model is loaded by name
        if p.is_file() and not p.name.endswith((".db", ".db-wal", ".db-shm", ".lock", "registered_model_meta")):
            state[str(p.relative_to(root))] = p.stat().st_size
    return state


def _nist_folder(root: Path, name: str, **replace: bytes) -> str:
    """A digits split in NIST's layout (30 train, 10 test images) with some files replaced."""
    folder = root / "data" / name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for part, n in (("train", 30), ("test", 10)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        files = {
            f"{part}-images": b"\x00\x00\x08\x03" + np.array([n, 28, 28], ">u4").tobytes() + images.tobytes(),
            f"{part}-labels": b"\x00\x00\x08\x01" + np.array([n], ">u4").tobytes() + labels.tobytes(),
        }
        for role, raw in files.items():
            kind = role.split("-")[1]
            path = folder / f"emnist-digits-{part}-{kind}-{'idx3' if kind == 'images' else 'idx1'}-ubyte.gz"
            path.write_bytes(replace.get(role, gzip.compress(raw, mtime=0)))
    return str(folder)


def _labels(values, n=30) -> bytes:
    return gzip.compress(b"\x00\x00\x08\x01" + np.array([n], ">u4").tobytes() + np.asarray(values, np.uint8).tobytes())


def _zip_of_letters_only(root: Path) -> str:
    import zipfile

    path = root / "data" / "letters-only.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("gzip/emnist-letters-train-images-idx3-ubyte.gz", b"")
    return str(path)


def _file(root: Path, name: str, text: str) -> str:
    path = root / "inputs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _png(root: Path, name: str, size: tuple[int, int], truncate: bool = False) -> str:
    path = root / "inputs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, 255).save(path)
    if truncate:
        path.write_bytes(path.read_bytes()[:60])
    return str(path)


def _bytes(root: Path, name: str, data: bytes) -> str:
    path = root / "inputs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def _laughs() -> str:
    """The "billion laughs": ten lines whose aliases stand for 10**9 strings."""
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 10):
        this, prev = chr(97 + i), chr(96 + i)
        lines.append(f"{this}: &{this} [" + ", ".join([f"*{prev}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def _deep(key: str = "train") -> str:
    return f"{key}: " + "[" * 50_000 + "]" * 50_000 + "\n"


def _images_header(n: int) -> bytes:
    return b"\x00\x00\x08\x03" + np.array([n, 28, 28], ">u4").tobytes()


def _gzip_bomb() -> bytes:
    """A 4 MB gzip file that inflates to 4 GiB: a valid header for 30 images, their data, then gzip members of zeros.

    Made from one 64 MiB member repeated, so building it allocates 64 MiB, never gigabytes."""
    head = gzip.compress(_images_header(30) + bytes(30 * 28 * 28), mtime=0)
    return head + gzip.compress(bytes(64 << 20), compresslevel=9, mtime=0) * 64


def _sparse_images(root: Path) -> str:
    """A digits folder whose train images file is 900 MB long, all of it a hole (no disk used, nothing to read)."""
    folder = _nist_folder(root, "oversized")
    with open(Path(folder) / "emnist-digits-train-images-idx3-ubyte.gz", "r+b") as f:
        f.truncate(900_000_000)
    return folder


def _foreign_sqlite(root: Path) -> str:
    path = root / "inputs" / "app.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    return str(path)


def _disk_full_at_run_start(monkeypatch, root: Path) -> None:
    """The MLflow store's disk is full as `run` starts its run (nothing is written: the write is what fails)."""
    from emnist_hpo.tracking.tracker import Tracker

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(root / "mlruns" / "artifacts" / "1" / "run"))

    monkeypatch.setattr(Tracker, "start_run", full)


def _sqlite_full_at_run_start(monkeypatch, root: Path) -> None:
    """As MLflow reports SQLite's full disk: its own exception, caused by sqlite3's OperationalError."""
    from emnist_hpo.tracking.tracker import Tracker

    def full(self, *args, **kwargs):
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as exc:
            raise RuntimeError("(sqlite3.OperationalError) database or disk is full [SQL: INSERT INTO runs ...]") from exc

    monkeypatch.setattr(Tracker, "start_run", full)


RUN = ["run", "--split", "digits", "--max-train-samples", "100", "--no-progress"]


def _run_yaml(r: Path, name: str, text: str) -> list[str]:
    """`run` of an experiment file with ``text``."""
    return ["run", _file(r, name, text), *RUN[1:]]


def _seed_yaml(r: Path, name: str, text: str) -> list[str]:
    """A study whose seed experiment is a file with ``text``."""
    return [*STUDY[:-2], "--no-progress", "--seed-experiments", _file(r, name, text)]


def _space_yaml(r: Path, name: str, text: str) -> list[str]:
    return [*STUDY, "--search-space", _file(r, name, text)]


# Each case: (id, function of the working folder -> argv, substrings the one error line must hold[, patch]);
# patch(monkeypatch, working folder) sets up a fault before the command runs.
CASES = [
    # command-line options
    ("split", lambda r: ["study", "--split", "klingon"], ["'klingon'", "allowed: byclass, bymerge"]),
    ("trials", lambda r: [*STUDY, "--trials", "0"], ["--trials must be >= 1 (trials=0)"]),
    ("trials-text", lambda r: [*STUDY, "--trials", "many"], ["--trials", "integer", "'many'"]),
    ("epochs", lambda r: [*STUDY, "--epochs", "0"], ["--epochs must be >= 1 (epochs=0)"]),
    ("max-train", lambda r: [*STUDY, "--max-train-samples", "5"], ["--max-train-samples must be >= 10", "=5"]),
    ("val-fraction", lambda r: [*STUDY, "--val-fraction", "1.5"], ["--val-fraction must be in (0, 1)", "1.5"]),
    ("sampler", lambda r: [*STUDY, "--sampler", "grid"], ["--sampler must be one of tpe", "'grid'"]),
    ("random-fraction", lambda r: [*STUDY, "--random-fraction", "1"], ["--random-fraction must be in [0, 1)", "=1.0"]),
    ("random-fraction-sampler", lambda r: [*STUDY, "--random-fraction", "0.3", "--sampler", "random"],
     ["--random-fraction is TPE's", "'random'"]),
    ("random-fraction-pareto", lambda r: [*STUDY, "--random-fraction", "0.3", "--objectives", "accuracy,params"],
     ["--random-fraction is TPE's", "'nsga2'"]),
    ("last-rung", lambda r: [*STUDY, "--last-rung", "later"], ["--last-rung must be one of leaders, close", "'later'"]),
    ("last-rung-engine", lambda r: [*STUDY, "--engine", "keras-tuner", "--last-rung", "leaders"],
     ["--last-rung is the Optuna engine's successive halving", "'keras-tuner'", "'leaders'"]),
    ("pruner", lambda r: [*STUDY, "--pruner", "always"], ["--pruner must be one of successive-halving", "'always'"]),
    ("objectives", lambda r: [*STUDY, "--objectives", "params"], ["--objectives must be 'accuracy', 'accuracy,params' or 'accuracy,flops'", "'params'"]),
    ("timeout", lambda r: [*STUDY, "--timeout", "-5"], ["--timeout must be > 0", "-5"]),
    ("study-name", lambda r: [*STUDY, "--study-name", "../../etc"], ["--study-name must be", "'../../etc'"]),
    ("workers", lambda r: [*STUDY, "--workers", "0"], ["--workers must be >= 1 (workers=0)"]),
    ("seed", lambda r: [*STUDY, "--seed", "-3"], ["--seed must be >= 0 (seed=-3)"]),
    ("early-stopping", lambda r: [*STUDY, "--early-stopping", "-1"], ["--early-stopping must be >= 0", "=-1"]),
    ("average-epochs", lambda r: [*STUDY, "--average-epochs", "-1"], ["--average-epochs must be in [0, 1000]", "=-1.0"]),
    ("other-split", lambda r: [*STUDY[:2], "letters", *STUDY[3:], "--study-name", "emnist-digits"],
     ["'emnist-digits'", "'digits'", "not 'letters'"]),
    # search-space and experiment YAML
    ("space-missing", lambda r: [*STUDY, "--search-space", "nope.yaml"],
     ["search space 'nope.yaml' not found", "default, small"]),
    ("space-key", lambda r: [*STUDY, "--search-space", _file(r, "k.yaml", SPACE + "colour: {choices: [red]}\n")],
     ["colour"]),
    ("space-range", lambda r: [*STUDY, "--search-space", _file(r, "r.yaml", SPACE.replace(
        "{low: 1.0e-3, high: 1.0e-2, log: true}", "{low: 0.1, high: 0.01}"))], ["learning_rate", "0.1"]),
    ("space-choice", lambda r: [*STUDY, "--search-space", _file(r, "c.yaml", SPACE + "optimizer: {choices: [adam, "
                                                                                      "rmsprop]}\n")],
     ["optimizer", "rmsprop", "adam, adamw, sgd"]),
    ("space-syntax", lambda r: [*STUDY, "--search-space", _file(r, "s.yaml", "conv_blocks: {low: 1\n")], ["s.yaml"]),
    ("space-list", lambda r: [*STUDY, "--search-space", _file(r, "l.yaml", "- 1\n- 2\n")], ["l.yaml"]),
    ("experiment-key", lambda r: [*STUDY[:-2], "--no-progress", "--seed-experiments",
                                  _file(r, "e1.yaml", "train: {epoks: 3}\n")],
     ["e1.yaml", "epoks"]),
    ("experiment-value", lambda r: [*STUDY[:-2], "--no-progress", "--seed-experiments",
                                    _file(r, "e2.yaml", "model: {kind: gpt}\n")],
     ["e2.yaml", "model.kind", "'gpt'"]),
    # data files
    ("data-missing", lambda r: [*STUDY, "--data-dir", "/nonexistent/emnist"], ["/nonexistent/emnist"]),
    ("data-truncated", lambda r: [*STUDY, "--data-dir", _nist_folder(r, "trunc", **{
        "train-images": gzip.compress(b"\x00\x00\x08\x03" + np.array([30, 28, 28], ">u4").tobytes() + b"\x01" * 99)})],
     ["emnist-digits-train-images-idx3-ubyte.gz"]),
    ("data-magic", lambda r: [*STUDY, "--data-dir", _nist_folder(r, "magic", **{
        "train-labels": gzip.compress(b"\x00\x00\x0d\x01" + np.array([30], ">u4").tobytes() + bytes(30))})],
     ["emnist-digits-train-labels-idx1-ubyte.gz", "0x00000801"]),
    ("data-count", lambda r: [*STUDY, "--data-dir", _nist_folder(r, "count", **{"train-labels": _labels(
        np.arange(20) % 10, 20)})], ["30", "20"]),
    ("data-labels", lambda r: [*STUDY, "--data-dir", _nist_folder(r, "labels", **{"train-labels": _labels(
        np.full(30, 12))})], ["emnist-digits-train-labels-idx1-ubyte.gz", "12"]),
    ("data-not-gzip", lambda r: [*STUDY, "--data-dir", _nist_folder(r, "notgz", **{"test-images": b"plain bytes"})],
     ["emnist-digits-test-images-idx3-ubyte.gz"]),
    ("data-zip-without-split", lambda r: [*STUDY, "--data-dir", _zip_of_letters_only(r)],
     ["letters-only.zip", "digits"]),
    # storage URLs
    ("storage-scheme", lambda r: [*STUDY, "--storage", "foo://bar"], ["'foo://bar'", "sqlite:///PATH.db"]),
    ("storage-text", lambda r: [*STUDY, "--storage", "not a url"], ["'not a url'", "sqlite:///PATH.db"]),
    ("storage-closed-port", lambda r: [*STUDY, "--storage", "postgresql://postgres@127.0.0.1:1/x"],
     ["'postgresql://postgres@127.0.0.1:1/x'", "refused"]),
    ("storage-unwritable", lambda r: [*STUDY, "--storage", f"sqlite:///{r}/space.yaml/optuna.db"],
     ["space.yaml", "not a writable folder"]),
    ("storage-password", lambda r: [*STUDY, "--storage", "postgresql://u:hunter2@127.0.0.1:1/x"], ["u:***@"]),
    ("tracking-closed-port", lambda r: [*STUDY, "--tracking-uri", "http://127.0.0.1:1"],
     ["'http://127.0.0.1:1'", "unreachable", "--tracking-uri"]),
    ("tracking-scheme", lambda r: [*STUDY, "--tracking-uri", "ftp://host/x"], ["'ftp://host/x'", "allowed"]),
    ("tracking-unwritable", lambda r: [*STUDY, "--tracking-uri", f"sqlite:///{r}/space.yaml/mlflow.db"],
     ["space.yaml", "not a writable folder"]),
    ("tracking-db-closed-port", lambda r: [*STUDY, "--tracking-uri", "postgresql://postgres@127.0.0.1:1/m"],
     ["'postgresql://postgres@127.0.0.1:1/m'", "unreachable"]),
    # YAML that would hang, exhaust the stack or decode wrongly (experiment and search-space files)
    ("space-billion-laughs", lambda r: _space_yaml(r, "laughs.yaml", _laughs()), ["laughs.yaml", "alias *a"]),
    ("experiment-billion-laughs", lambda r: _seed_yaml(r, "laughs-e.yaml", _laughs()), ["laughs-e.yaml", "alias *a"]),
    ("run-billion-laughs", lambda r: _run_yaml(r, "laughs-r.yaml", _laughs()), ["laughs-r.yaml", "alias *a"]),
    ("space-deep-nesting", lambda r: _space_yaml(r, "deep.yaml", _deep("filters")),
     ["deep.yaml", "nested deeper than 32 levels"]),
    ("experiment-deep-nesting", lambda r: _seed_yaml(r, "deep-e.yaml", _deep()),
     ["deep-e.yaml", "nested deeper than 32 levels"]),
    ("run-deep-nesting", lambda r: _run_yaml(r, "deep-r.yaml", _deep()), ["deep-r.yaml", "nested deeper than 32"]),
    ("space-latin-1", lambda r: [*STUDY, "--search-space", _bytes(r, "latin1.yaml", SPACE.encode() + "# caf\u00e9\n".encode(
        "latin-1"))], ["latin1.yaml", "not UTF-8", "0xe9", "line 7"]),
    ("experiment-latin-1", lambda r: [*STUDY[:-2], "--no-progress", "--seed-experiments", _bytes(
        r, "latin1-e.yaml", "description: \u00e9t\u00e9\n".encode("latin-1"))], ["latin1-e.yaml", "not UTF-8", "0xe9"]),
    ("run-utf-16", lambda r: ["run", _bytes(r, "utf16.yaml", "train: {epochs: 1}\n".encode("utf-16")), *RUN[1:]],
     ["utf16.yaml", "not UTF-8", "0xff"]),
    ("run-huge-integer", lambda r: _run_yaml(r, "digits5000.yaml", "train: {epochs: " + "9" * 5000 + "}\n"),
     ["digits5000.yaml", "5000 digits"]),
    ("run-file-too-large", lambda r: _run_yaml(r, "big.yaml", "# padding\n" * 120_000),
     ["big.yaml", "1,200,000 bytes is too large", "1,048,576"]),
    ("run-mixed-keys", lambda r: _run_yaml(r, "keys.yaml", "1: one\nfoo: two\n"), ["keys.yaml", "unknown key '1'"]),
    # NaN and infinity: on the command line and in YAML
    ("val-fraction-nan", lambda r: [*STUDY, "--val-fraction", "nan"], ["--val-fraction", "finite", "'nan'"]),
    ("timeout-inf", lambda r: [*STUDY, "--timeout", "inf"], ["--timeout", "finite", "'inf'"]),
    ("timeout-nan", lambda r: [*STUDY, "--timeout", "NaN"], ["--timeout", "finite", "'NaN'"]),
    ("timeout-overflow", lambda r: [*STUDY, "--timeout", "1e999"], ["--timeout", "finite", "'1e999'"]),
    ("run-val-fraction-inf", lambda r: ["run", "two_conv", *RUN[1:], "--val-fraction=-inf"],
     ["--val-fraction", "finite", "'-inf'"]),
    ("space-nan", lambda r: _space_yaml(r, "nan.yaml", SPACE.replace("low: 1.0e-3", "low: .nan")),
     ["nan.yaml", "learning_rate.low must be a finite number", "nan"]),
    ("space-inf", lambda r: _space_yaml(r, "inf.yaml", SPACE.replace("high: 1.0e-2", "high: .inf")),
     ["inf.yaml", "learning_rate.high must be a finite number", "inf"]),
    ("space-step-nan", lambda r: _space_yaml(r, "step.yaml", SPACE + "conv_dropout: {low: 0.0, high: 0.5, step: .nan}\n"),
     ["step.yaml", "conv_dropout.step", "nan"]),
    ("run-nan", lambda r: _run_yaml(r, "wd.yaml", "train: {weight_decay: .nan}\n"),
     ["wd.yaml", "train.weight_decay must be a finite number", "nan"]),
    ("run-inf", lambda r: _run_yaml(r, "rot.yaml", "model: {augment: {rotation: .inf}}\n"),
     ["rot.yaml", "model.augment.rotation must be a finite number", "inf"]),
    ("experiment-inf", lambda r: _seed_yaml(r, "lr.yaml", "train: {learning_rate: -.inf}\n"),
     ["lr.yaml", "train.learning_rate must be a finite number", "-inf"]),
    # seeds: every derived seed (seed + 1000 per process, + trial number, ...) must stay below 2**32
    ("seed-2**32-1", lambda r: [*STUDY, "--seed", "4294967295"], ["--seed must be <= 2147483647", "=4294967295"]),
    ("seed-2**31", lambda r: [*STUDY, "--seed", "2147483648"], ["--seed must be <= 2147483647", "=2147483648"]),
    ("run-seed", lambda r: ["run", "two_conv", *RUN[1:], "--seed", "4294967295"],
     ["--seed must be <= 2147483647", "=4294967295"]),
    ("experiment-seed", lambda r: _run_yaml(r, "seed.yaml", "train: {seed: 4294967296}\n"),
     ["seed.yaml", "train.seed must be <= 2147483647", "4294967296"]),
    # split names: exactly one of the six, everywhere a split is taken
    ("split-case", lambda r: [*STUDY[:2], "DIGITS", *STUDY[3:]], ["'DIGITS'", "allowed: byclass", "did you mean 'digits'"]),
    ("split-typo", lambda r: [*STUDY[:2], "leters", *STUDY[3:]], ["'leters'", "did you mean 'letters'"]),
    ("run-split-case", lambda r: ["run", "two_conv", "--split", "Digits", *RUN[3:]], ["'Digits'", "did you mean 'digits'"]),
    ("predict-split-case", lambda r: ["predict", "--split", "DIGITS", _png(r, "ok2.png", (64, 64))],
     ["'DIGITS'", "did you mean 'digits'"]),
    ("export-split-case", lambda r: ["export", "--split", "Mnist", "--output", str(r / "inputs" / "m.tflite")],
     ["'Mnist'", "did you mean 'mnist'"]),
    # counts with a ceiling
    ("workers-too-many", lambda r: [*STUDY, "--workers", "1000"], ["--workers must be <= 64", "workers=1000"]),
    ("trials-too-many", lambda r: [*STUDY, "--trials", "1000000000"], ["--trials must be <= 100000", "=1000000000"]),
    ("epochs-too-many", lambda r: [*STUDY, "--epochs", "100000"], ["--epochs must be <= 1000", "=100000"]),
    ("run-epochs-too-many", lambda r: ["run", "two_conv", *RUN[1:], "--epochs", "100000"],
     ["--epochs must be <= 1000", "=100000"]),
    ("folds-too-many", lambda r: [*STUDY, "--folds", "500"], ["--folds must be <= 20", "=500"]),
    ("early-stopping-text", lambda r: [*STUDY, "--early-stopping", "three"], ["--early-stopping", "'three'"]),
    ("ui-port", lambda r: ["ui", "--mlflow-port", "70000"], ["--mlflow-port", "1..65535", "'70000'"]),
    # absurd architectures: errors naming the field
    ("space-filters", lambda r: _space_yaml(r, "f.yaml", SPACE.replace("{choices: [4, 8]}", "1000000000")),
     ["f.yaml", "filters must be in 1..1024", "1000000000"]),
    ("space-kernel", lambda r: _space_yaml(r, "k29.yaml", SPACE.replace("kernel: 3", "kernel: {choices: [3, 29]}")),
     ["k29.yaml", "kernel.choices must be an odd integer in 1..27", "29"]),
    ("space-dense-units", lambda r: _space_yaml(r, "du.yaml", SPACE.replace("dense_units: 16", "dense_units: {low: 16, "
                                                                                             "high: 100000}")),
     ["du.yaml", "dense_units.high must be in 1..8192", "100000"]),
    ("space-batch-size", lambda r: _space_yaml(r, "bs.yaml", SPACE + "batch_size: 10000000\n"),
     ["bs.yaml", "batch_size must be in 1..16384", "10000000"]),
    ("space-convs", lambda r: _space_yaml(r, "cpb.yaml", SPACE + "convs_per_block: 1000000000\n"),
     ["cpb.yaml", "convs_per_block must be in 1..8", "1000000000"]),
    ("run-filters", lambda r: _run_yaml(r, "filters.yaml", "model: {conv_blocks: [{filters: 1000000000}]}\n"),
     ["filters.yaml", "model.conv_blocks[0].filters must be <= 1024", "1000000000"]),
    ("run-kernel", lambda r: _run_yaml(r, "kernel.yaml", "model: {conv_blocks: [{filters: 8, kernel: 29}]}\n"),
     ["kernel.yaml", "model.conv_blocks[0].kernel must be <= 28", "29"]),
    ("run-dense", lambda r: _run_yaml(r, "dense.yaml", "model: {dense: [128, 50000000]}\n"),
     ["dense.yaml", "model.dense[1] must be <= 8192", "50000000"]),
    ("run-batch-size", lambda r: _run_yaml(r, "batch.yaml", "train: {batch_size: 100000000}\n"),
     ["batch.yaml", "train.batch_size must be <= 16384", "100000000"]),
    ("run-epochs", lambda r: _run_yaml(r, "ep.yaml", "train: {epochs: 1000000}\n"),
     ["ep.yaml", "train.epochs must be <= 1000", "1000000"]),
    ("run-lstm-units", lambda r: _run_yaml(r, "lstm.yaml", "model: {kind: lstm, lstm_units: 100000000}\n"),
     ["lstm.yaml", "model.lstm_units must be <= 4096", "100000000"]),
    ("experiment-filters", lambda r: _seed_yaml(r, "f-e.yaml", "model: {conv_blocks: [{filters: 8, convs: 1000000}]}\n"),
     ["f-e.yaml", "model.conv_blocks[0].convs must be <= 8", "1000000"]),
    # scikit-learn options of the classical baselines: checked when the YAML is loaded
    ("sklearn-unknown", lambda r: _run_yaml(r, "rf.yaml", "model: {kind: random_forest, options: {n_trees: 5}}\n"),
     ["rf.yaml", "model.options.n_trees", "n_estimators"]),
    ("sklearn-value", lambda r: _run_yaml(r, "svm.yaml", "model: {kind: svm, options: {kernel: cubic}}\n"),
     ["svm.yaml", "SVC", "'kernel'", "'cubic'"]),
    ("sklearn-range", lambda r: _run_yaml(r, "knn.yaml", "model: {kind: knn, options: {n_neighbors: 0}}\n"),
     ["knn.yaml", "'n_neighbors'", "Got 0"]),
    ("sklearn-in-seed-experiment", lambda r: _seed_yaml(r, "rf-e.yaml", "model: {kind: random_forest, options: "
                                                                         "{n_estimators: -5}}\n"),
     ["rf-e.yaml", "'n_estimators'", "Got -5"]),
    ("options-on-cnn", lambda r: _run_yaml(r, "opts.yaml", "model: {options: {n_estimators: 5}}\n"),
     ["opts.yaml", "model.options applies to the classical kinds", "n_estimators"]),
    # stores: in-memory, or one store pointing at the other's database
    ("storage-memory", lambda r: [*STUDY, "--storage", "sqlite:///:memory:"], ["'sqlite:///:memory:'", "in-memory",
                                                                                "sqlite:///PATH.db"]),
    ("storage-memory-bare", lambda r: [*STUDY, "--storage", "sqlite://"], ["'sqlite://'", "in-memory"]),
    ("tracking-memory", lambda r: [*STUDY, "--tracking-uri", "sqlite:///:memory:"],
     ["MLflow tracking store 'sqlite:///:memory:'", "in-memory"]),
    ("tracking-memory-bare", lambda r: ["run", "two_conv", *RUN[1:], "--tracking-uri", "sqlite://"],
     ["'sqlite://'", "in-memory", "--tracking-uri"]),
    ("ui-storage-memory", lambda r: ["ui", "--storage", "sqlite:///:memory:"], ["'sqlite:///:memory:'", "in-memory"]),
    ("storage-is-mlflow-db", lambda r: [*STUDY, "--storage", f"sqlite:///{r}/mlruns/mlflow.db", "--tracking-uri",
                                        f"sqlite:///{r}/elsewhere/mlflow.db"],
     ["--storage", "mlruns/mlflow.db' is an MLflow tracking store's database", "experiments"]),
    ("tracking-is-optuna-db", lambda r: [*STUDY, "--tracking-uri", f"sqlite:///{r}/mlruns/optuna.db", "--storage",
                                         f"sqlite:///{r}/elsewhere/optuna.db"],
     ["--tracking-uri", "mlruns/optuna.db' is an Optuna storage's database", "studies"]),
    ("run-tracking-is-optuna-db", lambda r: ["run", "two_conv", *RUN[1:], "--tracking-uri",
                                             f"sqlite:///{r}/mlruns/optuna.db"],
     ["--tracking-uri", "optuna.db' is an Optuna storage's database"]),
    ("storage-same-as-tracking", lambda r: [*STUDY, "--storage", "sqlite:///mlruns/mlflow.db"],
     ["mlruns/mlflow.db", "Optuna storage", "MLflow tracking store", "same database"]),
    ("storage-same-server-db", lambda r: [*STUDY, "--storage", "postgresql://u:hunter2@127.0.0.1:1/db",
                                          "--tracking-uri", "postgresql+psycopg2://u@127.0.0.1:1/db"],
     ["u:***@127.0.0.1:1/db", "same database"]),
    ("ui-same-database", lambda r: ["ui", "--storage", "sqlite:///mlruns/mlflow.db"], ["mlflow.db", "same database"]),
    ("storage-other-application", lambda r: [*STUDY, "--storage", f"sqlite:///{_foreign_sqlite(r)}"],
     ["app.db", "tables of another application", "customers"]),
    # data files that claim or inflate to gigabytes
    ("data-2**32-images", lambda r: [*STUDY, "--data-dir", _nist_folder(r, "huge", **{
        "train-images": gzip.compress(_images_header(2**32 - 1) + bytes(784), mtime=0)})],
     ["emnist-digits-train-images-idx3-ubyte.gz", "4294967295 x 28 x 28", "at most 784,000,000 bytes"]),
    ("data-2**32-labels", lambda r: [*STUDY, "--data-dir", _nist_folder(r, "hugel", **{
        "test-labels": gzip.compress(b"\x00\x00\x08\x01" + np.array([2**32 - 1], ">u4").tobytes(), mtime=0)})],
     ["emnist-digits-test-labels-idx1-ubyte.gz", "4294967295", "1,000,000 labels"]),
    ("data-gzip-bomb", lambda r: [*STUDY, "--data-dir", _nist_folder(r, "bomb", **{"train-images": _gzip_bomb()})],
     ["emnist-digits-train-images-idx3-ubyte.gz", "23520 bytes of data", "at least"]),
    ("data-file-too-large", lambda r: [*STUDY, "--data-dir", _sparse_images(r)],
     ["emnist-digits-train-images-idx3-ubyte.gz", "900,000,000 bytes is larger than any EMNIST images file"]),
    # a full disk
    ("disk-full", lambda r: ["run", "two_conv", *RUN[1:]], ["disk full", "No space left on device",
                                                            "an MLflow artifact", "mlruns/artifacts", "run the same command"],
     _disk_full_at_run_start),
    ("sqlite-full", lambda r: ["run", "two_conv", *RUN[1:]], ["disk full", "database or disk is full"],
     _sqlite_full_at_run_start),
    # images for predict (the stores hold a digits champion)
    ("image-empty", lambda r: ["predict", "--split", "digits", _file(r, "empty.png", "")], ["empty.png", "empty"]),
    ("image-text", lambda r: ["predict", "--split", "digits", _file(r, "note.png", "not an image")],
     ["note.png", "PNG, JPEG"]),
    ("image-directory", lambda r: ["predict", "--split", "digits", str(r / "mlruns")], ["mlruns", "directory"]),
    ("image-tiny", lambda r: ["predict", "--split", "digits", _png(r, "tiny.png", (3, 3))], ["tiny.png", "at least"]),
    ("image-truncated", lambda r: ["predict", "--split", "digits", _png(r, "cut.png", (64, 64), truncate=True)],
     ["cut.png"]),
    ("predict-split", lambda r: ["predict", "--split", "klingon", _png(r, "ok.png", (64, 64))],
     ["'klingon'", "allowed: byclass"]),
]


def test_the_table_holds_60_distinct_cases():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60, len(ids)


@pytest.mark.parametrize("make_argv, needles, patch", [(c[1], c[2], c[3] if len(c) > 3 else None) for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_records_nothing(world, make_argv, needles, patch, capsys, monkeypatch):
    argv = make_argv(world)
    if patch is not None:
        patch(monkeypatch, world)
    before = snapshot(world)
    code, out, err = _cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1, err
    assert lines[0].startswith("emnist-hpo") and "error:" in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert "hunter2" not in err
    assert snapshot(world) == before


@pytest.mark.slow
def test_the_real_process_exits_2_too(world):
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    res = subprocess.run([sys.executable, "-m", "emnist_hpo", *STUDY, "--storage", "foo://bar"], cwd=world, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert [line for line in res.stderr.splitlines() if line.strip()] == [
        line for line in res.stderr.splitlines() if line.startswith("emnist-hpo: error: Optuna storage 'foo://bar'")]


def test_names_cannot_escape_their_folders(world, capsys):
    """A study name becomes a run name and a checkpoint folder: path separators and '..' are refused up front."""
    for name in ("../x", "a/b", "..", ".hidden", "a" * 129, "x\ny"):
        code, _, err = _cli([*STUDY, "--study-name", name], capsys)
        assert code == 2 and "--study-name must be" in err
    assert not (world / "x").exists() and not (world.parent / "x").exists()


def test_a_server_that_is_not_mlflow_is_refused(world, capsys):
    """Something answers on the port, but not MLflow (GET /health is 404): exit 2 before anything is written."""
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # noqa: D102 - keep the CLI's stderr to itself
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        before = snapshot(world)
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        code, _, err = _cli([*STUDY, "--tracking-uri", uri], capsys)
        assert code == 2 and err.count("\n") == 1
        assert f"'{uri}' answered HTTP 404 to GET /health: not an MLflow tracking server" in err
        assert snapshot(world) == before
    finally:
        server.shutdown()


@pytest.mark.slow
def test_a_tampered_checkpoint_is_never_executed(tmp_path, sample_dir, monkeypatch):
    """--no-final-fit loads the champion's checkpoint in Keras' safe mode: a file carrying code is refused, the
    trial retrained, and the code never runs."""
    import keras

    from emnist_hpo.search.optuna.study import StudyOptions, run_study

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMNIST_HPO_CACHE", str(tmp_path / "cache"))
    (tmp_path / "space.yaml").write_text(SPACE)
    opts = dict(split="digits", trials=1, epochs=1, max_train_samples=1000, data_dir=str(sample_dir),
                search_space="space.yaml", warm_start=False, progress=False, final_fit=False, finalists=0,
                storage=f"sqlite:///{tmp_path}/optuna.db", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                checkpoint_dir=str(tmp_path / "ckpt"))
    run_study(StudyOptions(**opts, register=False), log=lambda m: None)
    [checkpoint] = (tmp_path / "ckpt").glob("emnist-digits-*/trial_0.keras")
    marker = tmp_path / "pwned"
    code = eval(f"lambda x: x + 0 * len(open({str(marker)!r}, 'w').name)")  # writes the marker when it runs
    evil = keras.Sequential([keras.Input((28, 28)), keras.layers.Lambda(code), keras.layers.Flatten(),
                             keras.layers.Dense(10, activation="softmax")])
    evil.save(checkpoint)
    marker.unlink(missing_ok=True)  # building the model above ran the lambda once
    said: list[str] = []
    res = run_study(StudyOptions(**opts, register=True), log=said.append)  # registration not done yet: finalize again
    assert any(f"checkpoint {checkpoint} not loaded" in m and "retraining trial 0" in m for m in said), said
    assert not marker.exists()
    assert res.registered is not None and res.params is not None and res.params != evil.count_params()


@pytest.mark.slow
def test_the_largest_seed_runs_and_resumes(tmp_path, sample_dir, isolated_in):
    """--seed 2**31-1, the documented maximum, runs and resumes: the resumed process's sampler seed (seed + 1000)
    and the trials' training seeds (seed + trial number) all stay below 2**32, as NumPy requires."""
    import optuna

    from emnist_hpo.config import MAX_SEED

    (tmp_path / "space.yaml").write_text(SPACE)
    argv = [*STUDY, "--seed", str(MAX_SEED), "--data-dir", str(sample_dir), "--no-register", "--no-final-fit",
            "--no-trial-plots"]
    with isolated_in(tmp_path):
        assert main(argv) == 0
        assert main([*argv, "--trials", "2"]) == 0  # a second process opens the study: seed + 1000
    study = optuna.load_study(study_name="emnist-digits", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]


def test_disk_full_names_what_was_written_and_other_errors_still_raise(monkeypatch, capsys):
    """ENOSPC/EDQUOT, however deeply wrapped, is one line naming the file; any other OSError stays a traceback."""
    from emnist_hpo import cli

    assert cli.disk_full(OSError(errno.ENOSPC, "No space left on device", "/w/mlruns/checkpoints/s/trial_3.keras")) == (
        "No space left on device while writing a trial checkpoint /w/mlruns/checkpoints/s/trial_3.keras")
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", "/w/mlruns/mlflow.db-wal")
        except OSError as inner:
            raise RuntimeError("write failed") from inner
    except RuntimeError as outer:
        assert cli.disk_full(outer) == "Disk quota exceeded while writing the store database /w/mlruns/mlflow.db-wal"
    assert cli.disk_full(OSError(errno.EACCES, "Permission denied", "/x")) is None
    assert cli.disk_full(ValueError("bad")) is None

    def denied(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/root/x")

    monkeypatch.setitem(cli.COMMANDS, "compare", denied)
    with pytest.raises(PermissionError):  # not a user error: the traceback is what helps
        cli.main(["compare"])
