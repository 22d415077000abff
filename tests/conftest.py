"""Data fixtures: the real EMNIST files beside the repo, and synthetic NIST-format files."""

from __future__ import annotations

import gzip
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

SHARED_EMNIST = Path(__file__).resolve().parents[1].parent / "shared" / "emnist"
NUM_CLASSES = {"byclass": 62, "bymerge": 47, "balanced": 47, "letters": 26, "digits": 10, "mnist": 10}


def _shared(name: str) -> Path:
    path = SHARED_EMNIST / name
    if not path.is_dir() or not any(path.iterdir()):
        pytest.fail(
            f"real EMNIST data missing: {path} (expected ../shared/emnist/{name} beside the repository; "
            "the data tests never skip)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The real-image sample of all six splits, in NIST's file layout."""
    return _shared("sample")


@pytest.fixture(scope="session")
def official_dir() -> Path:
    """Files byte-identical to NIST's release (mnist test set, mappings, label files)."""
    return _shared("official")


def nist_name(split: str, role: str) -> str:
    part, kind = role.split("-")
    return f"emnist-{split}-{part}-{kind}-{'idx3' if kind == 'images' else 'idx1'}-ubyte.gz"


class NistFactory:
    """Writes small synthetic EMNIST splits in NIST's layout (images stored transposed)."""

    file_name = staticmethod(nist_name)

    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    def idx(array: np.ndarray, magic: int | None = None, dims: tuple[int, ...] | None = None) -> bytes:
        """IDX bytes of a uint8 array; ``magic``/``dims`` override the header."""
        dims = array.shape if dims is None else dims
        magic = 0x0800 | len(dims) if magic is None else magic
        return struct.pack(f">I{len(dims)}I", magic, *dims) + np.asarray(array, np.uint8).tobytes()

    @staticmethod
    def gz(data: bytes) -> bytes:
        return gzip.compress(data, compresslevel=1, mtime=0)

    @staticmethod
    def arrays(split: str = "digits", n_train: int = 30, n_test: int = 10) -> dict[str, np.ndarray]:
        """Upright images ``x_*`` and raw NIST labels ``raw_*`` (letters: 1..26)."""
        rng = np.random.default_rng(0)
        offset = 1 if split == "letters" else 0
        out = {}
        for part, n in (("train", n_train), ("test", n_test)):
            out[f"x_{part}"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            out[f"raw_{part}"] = (np.arange(n) % NUM_CLASSES[split] + offset).astype(np.uint8)
        return out

    def folder(self, split: str = "digits", name: str | None = None, *, n_train: int = 30, n_test: int = 10,
               replace: dict[str, bytes] | None = None) -> Path:
        """A folder of the split's four ``.gz`` files; ``replace`` maps a role to the exact bytes to write."""
        folder = self.root / (name or f"nist-{split}")
        folder.mkdir(parents=True, exist_ok=True)
        arrays = self.arrays(split, n_train, n_test)
        for part in ("train", "test"):
            files = {
                f"{part}-images": self.idx(arrays[f"x_{part}"].transpose(0, 2, 1)),
                f"{part}-labels": self.idx(arrays[f"raw_{part}"]),
            }
            for role, data in files.items():
                content = (replace or {}).get(role, self.gz(data))
                (folder / nist_name(split, role)).write_bytes(content)
        return folder

    @staticmethod
    def zip(source: Path, zip_path: Path, pattern: str = "emnist-*") -> Path:
        """Pack ``source``'s matching files as members ``gzip/<name>`` (NIST's gzip.zip layout)."""
        zip_path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as archive:
            for path in sorted(source.glob(pattern)):
                archive.write(path, f"gzip/{path.name}")
        return zip_path


@pytest.fixture
def nist(tmp_path: Path) -> NistFactory:
    """Factory of synthetic NIST-format folders and zips under tmp_path."""
    return NistFactory(tmp_path / "nist")


@pytest.fixture(scope="session")
def prepared_sample(tmp_path_factory, sample_dir):
    """``prepared_sample(split, n)``: ``n`` real images of ``split`` from the sample (80% train, 20% validation),
    parsed into a private cache, made once per session."""
    import os

    from emnist_hpo.config import DataConfig
    from emnist_hpo.data.prepared import prepare

    cache, made = tmp_path_factory.mktemp("prepared-cache"), {}

    def make(split: str, n: int):
        if (split, n) not in made:
            old = os.environ.get("EMNIST_HPO_CACHE")
            os.environ["EMNIST_HPO_CACHE"] = str(cache)
            try:
                made[split, n] = prepare(split, str(sample_dir), DataConfig(max_train_samples=n), progress=False)
            finally:
                if old is None:
                    os.environ.pop("EMNIST_HPO_CACHE", None)
                else:
                    os.environ["EMNIST_HPO_CACHE"] = old
        return made[split, n]

    return make


@pytest.fixture(scope="session")
def digits_champion(tmp_path_factory, sample_dir):
    """A digits champion registered in a private MLflow store by a quick real study (shared by the test files).

    Returns a dict: ``tracking`` (its MLflow URI), ``data`` (the sample folder), ``cache`` (parse cache),
    ``result`` (the :class:`StudyResult`).
    """
    import os

    from emnist_hpo.search.optuna.study import StudyOptions, run_study

    root = tmp_path_factory.mktemp("digits_champion")
    cache, old = str(root / "cache"), os.environ.get("EMNIST_HPO_CACHE")
    os.environ["EMNIST_HPO_CACHE"] = cache
    try:
        opts = StudyOptions(
            split="digits", trials=1, epochs=2, max_train_samples=4000, data_dir=str(sample_dir),
            storage=f"sqlite:///{root}/optuna.db", tracking_uri=f"sqlite:///{root}/mlflow.db", progress=False,
            checkpoint_dir=str(root / "ckpt"), finalists=0,
        )
        result = run_study(opts, log=lambda m: print(m, file=sys.stderr))
    finally:
        if old is None:
            os.environ.pop("EMNIST_HPO_CACHE", None)
        else:
            os.environ["EMNIST_HPO_CACHE"] = old
    assert result.registered is not None and result.registered.champion
    return {"tracking": opts.tracking_uri, "data": str(sample_dir), "cache": cache, "result": result}


@pytest.fixture(autouse=True)
def _mlflow_uris_restored():
    """``mlflow.set_tracking_uri`` exports MLFLOW_TRACKING_URI: undo what a test set, so no later test
    (or the study subprocesses it starts) silently writes to an earlier test's store."""
    import sys

    from emnist_hpo.coordination import saved_environ

    with saved_environ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        yield
        if "mlflow" in sys.modules:
            import mlflow

            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)


@pytest.fixture(scope="session")
def isolated_in():
    """``with isolated_in(root):`` runs a block in ``root`` with a private parse cache and no inherited
    MLFLOW_TRACKING_URI or EMNIST_DATA_DIR, restoring the directory and environment afterwards."""
    import contextlib
    import os

    from emnist_hpo.coordination import saved_environ

    @contextlib.contextmanager
    def enter(root):
        with saved_environ("EMNIST_HPO_CACHE", "MLFLOW_TRACKING_URI", "EMNIST_DATA_DIR"), contextlib.chdir(root):
            os.environ["EMNIST_HPO_CACHE"] = str(root / "cache")
            os.environ.pop("MLFLOW_TRACKING_URI", None)
            os.environ.pop("EMNIST_DATA_DIR", None)
            yield

    return enter
