"""Bad input anywhere: exit code 2, one line naming the value and what is allowed, nothing recorded.

One real study populates the default stores (``mlruns/`` in a working folder)
and registers a digits champion; then every bad input of the table runs the
CLI there, and the stores are compared with a snapshot taken before: every
table's rows and every artifact file are unchanged.
"""

from __future__ import annotations

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


# Each case: (id, function of the working folder -> argv, substrings the one error line must hold).
CASES = [
    # command-line options
    ("split", lambda r: ["study", "--split", "klingon"], ["'klingon'", "allowed: byclass, bymerge"]),
    ("trials", lambda r: [*STUDY, "--trials", "0"], ["--trials must be >= 1 (trials=0)"]),
    ("trials-text", lambda r: [*STUDY, "--trials", "many"], ["--trials", "integer", "'many'"]),
    ("epochs", lambda r: [*STUDY, "--epochs", "0"], ["--epochs must be >= 1 (epochs=0)"]),
    ("max-train", lambda r: [*STUDY, "--max-train-samples", "5"], ["--max-train-samples must be >= 10", "=5"]),
    ("val-fraction", lambda r: [*STUDY, "--val-fraction", "1.5"], ["--val-fraction must be in (0, 1)", "1.5"]),
    ("sampler", lambda r: [*STUDY, "--sampler", "grid"], ["--sampler must be one of tpe", "'grid'"]),
    ("pruner", lambda r: [*STUDY, "--pruner", "always"], ["--pruner must be one of successive-halving", "'always'"]),
    ("objectives", lambda r: [*STUDY, "--objectives", "params"], ["--objectives must be 'accuracy' or", "'params'"]),
    ("timeout", lambda r: [*STUDY, "--timeout", "-5"], ["--timeout must be > 0", "-5"]),
    ("study-name", lambda r: [*STUDY, "--study-name", "../../etc"], ["--study-name must be", "'../../etc'"]),
    ("workers", lambda r: [*STUDY, "--workers", "0"], ["--workers must be >= 1 (workers=0)"]),
    ("seed", lambda r: [*STUDY, "--seed", "-3"], ["--seed must be >= 0 (seed=-3)"]),
    ("early-stopping", lambda r: [*STUDY, "--early-stopping", "-1"], ["--early-stopping must be >= 0", "=-1"]),
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


@pytest.mark.parametrize("make_argv, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_records_nothing(world, make_argv, needles, capsys):
    argv = make_argv(world)
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


def test_a_tampered_checkpoint_is_never_executed(tmp_path, sample_dir, monkeypatch):
    """--no-final-fit loads the champion's checkpoint in Keras' safe mode: a file carrying code is refused, the
    trial retrained, and the code never runs."""
    import keras

    from emnist_hpo.study import StudyOptions, run_study

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMNIST_HPO_CACHE", str(tmp_path / "cache"))
    (tmp_path / "space.yaml").write_text(SPACE)
    opts = dict(split="digits", trials=1, epochs=1, max_train_samples=1000, data_dir=str(sample_dir),
                search_space="space.yaml", warm_start=False, progress=False, final_fit=False, finalists=0,
                storage=f"sqlite:///{tmp_path}/optuna.db", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                checkpoint_dir=str(tmp_path / "ckpt"))
    run_study(StudyOptions(**opts, register=False), log=lambda m: None)
    checkpoint = tmp_path / "ckpt" / "emnist-digits" / "trial_0.keras"
    assert checkpoint.is_file()
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
