"""Tests of the EMNIST loader on real NIST files and on synthetic broken ones."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import re
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from emnist_hpo.data import nist as data
from emnist_hpo.errors import ConfigError, DataError

SAMPLE_COUNTS = {  # split: (train, test, classes), from ../shared/emnist/README.md
    "bymerge": (93_058, 23_265, 47),
    "balanced": (16_732, 2_773, 47),
    "letters": (18_044, 2_990, 26),
    "digits": (45_660, 7_600, 10),
    "mnist": (17_368, 10_000, 10),
    "byclass": (13_182, 3_296, 62),
}
OFFICIAL_LABEL_COUNTS = {  # NIST's full release (Cohen et al. 2017, table II)
    "emnist-balanced-test-labels-idx1-ubyte.gz": 18_800,
    "emnist-balanced-train-labels-idx1-ubyte.gz": 112_800,
    "emnist-byclass-test-labels-idx1-ubyte.gz": 116_323,
    "emnist-bymerge-test-labels-idx1-ubyte.gz": 116_323,
    "emnist-digits-test-labels-idx1-ubyte.gz": 40_000,
    "emnist-digits-train-labels-idx1-ubyte.gz": 240_000,
    "emnist-letters-test-labels-idx1-ubyte.gz": 20_800,
    "emnist-mnist-test-labels-idx1-ubyte.gz": 10_000,
    "emnist-mnist-train-labels-idx1-ubyte.gz": 60_000,
}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No real data dir, cache or network: HOME, the cache and NIST_URL point into tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("EMNIST_HPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EMNIST_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "NIST_URL", f"http://127.0.0.1:{_closed_port()}/gzip.zip")
    return home


@pytest.fixture(scope="module")
def sample_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sample-cache")


@pytest.fixture(scope="module")
def samples(sample_dir: Path, sample_cache: Path) -> dict[str, tuple[data.SplitData, float]]:
    """Every sample split, loaded once (first load, so parsed) with its load time."""
    loaded = {}
    for split in data.SPLITS:
        start = time.perf_counter()
        loaded[split] = (data.load_split(split, sample_dir, cache_dir=sample_cache, download=False),
                         time.perf_counter() - start)
    return loaded


def _no_download(*args: object, **kwargs: object) -> None:
    raise AssertionError("the loader must not download here")


# ------------------------------------------------------------ names ---


def test_check_split_names_allowed_values() -> None:
    assert data.SPLITS == ("byclass", "bymerge", "balanced", "letters", "digits", "mnist")
    assert data.check_split("bymerge") == "bymerge"
    # exactly: "DIGITS" would name a second study, experiment and model (emnist-DIGITS) beside emnist-digits
    for wrong, hint in (("ByMerge", "lowercase: did you mean 'bymerge'?"), (" digits", "did you mean 'digits'?"),
                        ("leters", "did you mean 'letters'?")):
        with pytest.raises(ConfigError, match=rf"unknown split '{re.escape(wrong)}'; allowed: byclass, .*{re.escape(hint)}"):
            data.check_split(wrong)
    with pytest.raises(ConfigError, match=r"unknown split 'foo'; allowed: byclass, bymerge, balanced, "
                                          r"letters, digits, mnist"):
        data.check_split("foo")
    with pytest.raises(ConfigError, match="unknown split 'foo'"):
        data.load_split("foo")


def test_load_classes_from_packaged_mappings(official_dir: Path) -> None:
    counts = {split: len(data.load_classes(split)) for split in data.SPLITS}
    assert counts == {"byclass": 62, "bymerge": 47, "balanced": 47, "letters": 26, "digits": 10, "mnist": 10}
    byclass = data.load_classes("byclass")
    assert byclass[:10] == tuple("0123456789") and byclass[10] == "A" and byclass[36] == "a"
    assert data.load_classes("letters")[:2] == ("A/a", "B/b") and data.load_classes("letters")[-1] == "Z/z"
    assert data.load_classes("bymerge")[-1] == "t"
    for split in data.SPLITS:  # packaged copies are NIST's files
        name = f"emnist-{split}-mapping.txt"
        assert (Path(data.__file__).parent / "mappings" / name).read_bytes() == (official_dir / name).read_bytes()


# -------------------------------------------------------- real data ---


@pytest.mark.parametrize("split", data.SPLITS)
def test_sample_split_loads(samples: dict, sample_dir: Path, split: str) -> None:
    d, _ = samples[split]
    n_train, n_test, n_classes = SAMPLE_COUNTS[split]
    assert d.split == split and d.num_classes == n_classes and d.classes == data.load_classes(split)
    assert d.x_train.shape == (n_train, 28, 28) and d.x_test.shape == (n_test, 28, 28)
    assert d.y_train.shape == (n_train,) and d.y_test.shape == (n_test,)
    for x, y in ((d.x_train, d.y_train), (d.x_test, d.y_test)):
        assert x.dtype == np.uint8 and x.flags.c_contiguous and y.dtype == np.int32
        assert 0 <= y.min() and y.max() == n_classes - 1
        assert x.max() == 255 and x.min() == 0
    assert len(np.unique(d.y_train)) == n_classes
    assert str(sample_dir.resolve()) in d.source


def _ink_stats(images: np.ndarray) -> tuple[float, float, float, float]:
    """(row spread, column spread, top-half ink fraction, left-half ink fraction)."""
    ink = images.astype(np.float64)
    mass = ink.sum(axis=(1, 2))[:, None]
    pos = np.arange(28)
    spreads = []
    for axis in (2, 1):  # profile over rows, then over columns
        profile = ink.sum(axis=axis) / mass
        mean = (profile * pos).sum(axis=1, keepdims=True)
        spreads.append(float(np.sqrt((profile * (pos - mean) ** 2).sum(axis=1)).mean()))
    return spreads[0], spreads[1], ink[:, :14].sum() / ink.sum(), ink[:, :, :14].sum() / ink.sum()


@pytest.mark.parametrize("split", ["digits", "mnist"])
def test_images_are_upright(samples: dict, sample_dir: Path, split: str) -> None:
    d, _ = samples[split]
    x, y = d.x_test, d.y_test
    rows, cols, _, _ = _ink_stats(x[y == 1])
    assert rows > 2 * cols  # a '1' is tall and thin
    assert _ink_stats(x[y == 7])[2] > 0.58  # a '7' has its bar on top
    assert _ink_stats(x[y == 6])[2] < 0.40  # a '6' has its loop at the bottom
    assert _ink_stats(x[y == 3])[3] < 0.45  # a '3' opens to the left
    # NIST's stored (transposed) orientation fails the same test: the loader did turn them.
    raw = data.read_idx((sample_dir / f"emnist-{split}-test-images-idx3-ubyte.gz").read_bytes())
    raw_rows, raw_cols, _, _ = _ink_stats(raw[y == 1])
    assert raw_cols > 2 * raw_rows
    np.testing.assert_array_equal(raw.transpose(0, 2, 1), x)


def test_official_files_match_sha256(official_dir: Path) -> None:
    checked = 0
    for path in sorted(official_dir.glob("*.gz")):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == data.OFFICIAL_SHA256[path.name], path.name
        checked += 1
    assert checked == 10
    assert len(data.OFFICIAL_SHA256) == 23 and all(len(h) == 64 for h in data.OFFICIAL_SHA256.values())


def test_official_mnist_test_set_through_read_idx(official_dir: Path, samples: dict) -> None:
    packed = (official_dir / "emnist-mnist-test-images-idx3-ubyte.gz").read_bytes()
    images = data.read_idx(packed, name="emnist-mnist-test-images-idx3-ubyte.gz")
    labels = data.read_idx((official_dir / "emnist-mnist-test-labels-idx1-ubyte.gz").read_bytes())
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and np.bincount(labels).tolist() == [1000] * 10
    np.testing.assert_array_equal(data.read_idx(gzip.decompress(packed)), images)  # gunzipped bytes too
    d, _ = samples["mnist"]  # the sample's test set is the official one
    np.testing.assert_array_equal(d.x_test, images.transpose(0, 2, 1))
    np.testing.assert_array_equal(d.y_test, labels)


def test_official_label_files_counts_and_ranges(official_dir: Path) -> None:
    for name, count in OFFICIAL_LABEL_COUNTS.items():
        labels = data.read_idx((official_dir / name).read_bytes(), name=name)
        split = name.split("-")[1]
        low = 1 if split == "letters" else 0
        assert labels.shape == (count,), name
        assert labels.min() == low and labels.max() == low + len(data.load_classes(split)) - 1, name


# ---------------------------------------------------------- sources ---


def test_zip_layout_as_folder_and_as_path(samples: dict, sample_dir: Path, nist, tmp_path: Path) -> None:
    zip_path = nist.zip(sample_dir, tmp_path / "zipdir" / "gzip.zip", "emnist-balanced-*")
    expected, _ = samples["balanced"]
    for place in (zip_path.parent, zip_path):
        d = data.load_split("balanced", place, cache_dir=tmp_path / f"cache-{place.name}", download=False)
        assert str(zip_path.resolve()) in d.source
        for name in ("x_train", "y_train", "x_test", "y_test"):
            np.testing.assert_array_equal(getattr(d, name), getattr(expected, name))


def test_folder_with_gzip_subfolder_and_gunzipped_files(nist, tmp_path: Path) -> None:
    folder = nist.folder("letters")
    unpacked = tmp_path / "torchvision-like" / "gzip"
    unpacked.mkdir(parents=True)
    for path in folder.iterdir():
        (unpacked / path.name[:-3]).write_bytes(gzip.decompress(path.read_bytes()))
    d = data.load_split("letters", unpacked.parent)
    expected = nist.arrays("letters")
    np.testing.assert_array_equal(d.x_train, expected["x_train"])
    np.testing.assert_array_equal(d.y_train, expected["raw_train"].astype(np.int32) - 1)
    assert d.y_train.min() == 0 and d.classes[d.y_train[0]] == "A/a"


def test_emnist_package_cache_is_used(nist, isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_zip = isolated / ".cache" / "emnist" / "emnist.zip"
    assert data._emnist_cache_zip() == cache_zip
    nist.zip(nist.folder("digits"), cache_zip)
    monkeypatch.setattr(data, "_download", _no_download)
    d = data.load_split("digits", download=False)
    assert d.source == f"emnist package cache {cache_zip.resolve()}"
    np.testing.assert_array_equal(d.x_test, nist.arrays("digits")["x_test"])


def test_env_data_dir(nist, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EMNIST_DATA_DIR", str(nist.folder("mnist")))
    assert data.load_split("mnist").x_train.shape == (30, 28, 28)
    monkeypatch.setattr(data, "_download", _no_download)
    monkeypatch.setenv("EMNIST_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=rf"EMNIST_DATA_DIR {tmp_path / 'nowhere'} does not exist"):
        data.load_split("mnist")


def test_explicit_data_dir_never_falls_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nist) -> None:
    monkeypatch.setattr(data, "_download", _no_download)
    nist.zip(nist.folder("digits"), data._emnist_cache_zip())  # would satisfy a fall-through
    missing = tmp_path / "missing"
    with pytest.raises(DataError, match=rf"data_dir {missing} does not exist; put NIST's gzip IDX files"):
        data.load_split("digits", missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as caught:
        data.load_split("digits", empty)
    message = str(caught.value)
    assert f"data_dir {empty} lacks the EMNIST digits files" in message
    for role in ("train-images", "train-labels", "test-images", "test-labels"):
        assert nist.file_name("digits", role) in message
    assert "--data-dir DIR or set EMNIST_DATA_DIR" in message
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(DataError, match="notes.txt is a file but not a zip archive"):
        data.load_split("digits", text)


def test_no_data_offline_download_fails_with_one_clear_message(isolated: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(DataError) as caught:
        data.load_split("bymerge")
    assert time.perf_counter() - start < 15
    message = str(caught.value)
    for part in ("EMNIST split 'bymerge' not found", "data_dir argument (not given)", "$EMNIST_DATA_DIR (not set)",
                 f"emnist package cache {isolated / '.cache/emnist/emnist.zip'}", f"download of {data.NIST_URL}",
                 "failed:", "--data-dir DIR or set EMNIST_DATA_DIR"):
        assert part in message
    assert "\n" not in message
    assert not list((isolated / ".cache" / "emnist").glob("*"))  # no partial download left


def test_download_disabled_message() -> None:
    with pytest.raises(DataError, match=r"not found.*not tried: download disabled.*--data-dir DIR"):
        data.load_split("digits", download=False)


@pytest.fixture
def http_server(tmp_path: Path):
    """A local HTTP server for tmp_path/www (the tests never reach the real network)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/gzip.zip"
    server.shutdown()
    server.server_close()


def test_download_verifies_sha256(http_server, nist, isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, url = http_server
    nist.zip(nist.folder("mnist"), root / "gzip.zip")
    monkeypatch.setattr(data, "NIST_URL", url)
    name = "emnist-mnist-test-images-idx3-ubyte.gz"  # the zip's first member
    actual = hashlib.sha256((nist.root / "nist-mnist" / name).read_bytes()).hexdigest()
    with pytest.raises(DataError) as caught:
        data.load_split("mnist", progress=False)
    message = str(caught.value)
    assert f"gzip/{name} has sha256 {actual}, expected {data.OFFICIAL_SHA256[name]}" in message
    assert "download was deleted" in message
    assert not list((isolated / ".cache" / "emnist").glob("*"))
    for path in (nist.root / "nist-mnist").iterdir():  # now pretend these are NIST's files
        monkeypatch.setitem(data.OFFICIAL_SHA256, path.name, hashlib.sha256(path.read_bytes()).hexdigest())
    d = data.load_split("mnist")  # with its progress bar
    cache_zip = isolated / ".cache" / "emnist" / "emnist.zip"
    assert d.source == f"emnist package cache {cache_zip.resolve()}" and d.x_train.shape == (30, 28, 28)
    assert sorted(p.name for p in cache_zip.parent.iterdir()) == ["emnist.zip"]


# ------------------------------------------------------------ cache ---


def test_cache_hit_is_fast_and_equal(samples: dict, sample_dir: Path, sample_cache: Path) -> None:
    first, first_s = samples["bymerge"]
    start = time.perf_counter()
    again = data.load_split("bymerge", sample_dir, cache_dir=sample_cache, download=False)
    cached_s = time.perf_counter() - start
    assert cached_s < first_s and cached_s < 1.0, (first_s, cached_s)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    assert again.x_train.dtype == np.uint8 and again.x_train.flags.c_contiguous
    assert again.source == first.source


def _entry(cache: Path) -> Path:
    (entry,) = cache.iterdir()
    return entry


def test_corrupted_cache_is_rebuilt(nist, tmp_path: Path) -> None:
    folder, cache = nist.folder("balanced"), tmp_path / "c"
    first = data.load_split("balanced", folder, cache_dir=cache)
    entry = _entry(cache)
    assert sorted(p.name for p in entry.iterdir()) == ["x_test.npy", "x_train.npy", "y_test.npy", "y_train.npy"]
    (entry / "x_train.npy").write_bytes(b"garbage")
    (entry / "y_test.npy").write_bytes((entry / "y_test.npy").read_bytes()[:-7])
    for _ in range(2):  # rebuilt, then read back from the rebuilt files
        again = data.load_split("balanced", folder, cache_dir=cache)
        np.testing.assert_array_equal(again.x_train, first.x_train)
        np.testing.assert_array_equal(again.y_test, first.y_test)
    np.save(entry / "y_train.npy", first.y_train.astype(np.float32))  # readable but wrong dtype
    assert data.load_split("balanced", folder, cache_dir=cache).y_train.dtype == np.int32
    assert not list(entry.glob("*.tmp"))


def test_cache_follows_source_changes(nist, tmp_path: Path) -> None:
    folder, cache = nist.folder("digits"), tmp_path / "c"
    assert data.load_split("digits", folder, cache_dir=cache).y_test[0] == 0
    labels = np.full(10, 9, np.uint8)
    path = folder / nist.file_name("digits", "test-labels")
    path.write_bytes(nist.gz(nist.idx(labels)))
    os.utime(path, ns=(1, 1))
    assert data.load_split("digits", folder, cache_dir=cache).y_test.tolist() == [9] * 10


def test_unwritable_cache_still_loads(nist, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert data.load_split("digits", nist.folder("digits"), cache_dir=blocker).x_train.shape == (30, 28, 28)


# ------------------------------------------------------- bad inputs ---


def _load_broken(nist, split: str = "digits", **kwargs) -> str:
    folder = nist.folder(split, **kwargs)
    with pytest.raises(DataError) as caught:
        data.load_split(split, folder, download=False)
    return str(caught.value)


def test_truncated_gzip(nist) -> None:
    good = nist.gz(nist.idx(np.zeros((30, 28, 28), np.uint8)))
    message = _load_broken(nist, replace={"train-images": good[: len(good) // 2]})
    assert "emnist-digits-train-images-idx3-ubyte.gz: truncated or corrupt gzip data" in message


def test_wrong_magic_numbers(nist) -> None:
    labels_as_images = nist.gz(nist.idx(np.zeros(30, np.uint8), magic=0x803))
    message = _load_broken(nist, replace={"train-labels": labels_as_images})
    assert ("emnist-digits-train-labels-idx1-ubyte.gz: magic number 0x00000803, but label files must start "
            "with 0x00000801") in message
    images_as_labels = nist.gz(nist.idx(np.zeros((10, 28, 28), np.uint8), magic=0x801))
    message = _load_broken(nist, replace={"test-images": images_as_labels})
    assert ("emnist-digits-test-images-idx3-ubyte.gz: magic number 0x00000801, but image files must start "
            "with 0x00000803") in message
    message = _load_broken(nist, replace={"test-images": nist.gz(b"no")})
    assert "no magic number" in message


def test_images_not_28x28(nist) -> None:
    message = _load_broken(nist, replace={"train-images": nist.gz(nist.idx(np.zeros((30, 28, 27), np.uint8)))})
    assert "emnist-digits-train-images-idx3-ubyte.gz: images are 28x27 pixels; EMNIST images must be 28x28" in message


def test_data_length_disagrees_with_header(nist) -> None:
    short = nist.idx(np.zeros((29, 28, 28), np.uint8), dims=(30, 28, 28))
    message = _load_broken(nist, replace={"train-images": nist.gz(short)})
    assert ("emnist-digits-train-images-idx3-ubyte.gz: header says 30 x 28 x 28 = 23520 items (23520 bytes of "
            "data), but the file holds 22736 bytes of data") in message
    long = nist.idx(np.zeros(11, np.uint8), dims=(10,))
    message = _load_broken(nist, replace={"test-labels": nist.gz(long)})
    assert "emnist-digits-test-labels-idx1-ubyte.gz: header says 10 = 10 items" in message


def test_image_and_label_counts_disagree(nist) -> None:
    message = _load_broken(nist, replace={"train-labels": nist.gz(nist.idx(np.zeros(29, np.uint8)))})
    assert ("30 images in emnist-digits-train-images-idx3-ubyte.gz but 29 labels in "
            "emnist-digits-train-labels-idx1-ubyte.gz") in message


@pytest.mark.parametrize(("split", "bad", "allowed"), [("balanced", 47, "0..46"), ("letters", 0, "1..26"),
                                                       ("letters", 27, "1..26"), ("digits", 10, "0..9")])
def test_labels_outside_split_classes(nist, split: str, bad: int, allowed: str) -> None:
    labels = np.full(30, 1, np.uint8)
    labels[[3, 5]] = bad
    message = _load_broken(nist, split, replace={"train-labels": nist.gz(nist.idx(labels))})
    assert (f"label {bad} in emnist-{split}-train-labels-idx1-ubyte.gz is outside {allowed} for split {split} "
            "(2 of 30 labels are; the first at index 3)") in message


def test_zip_without_the_split(nist, tmp_path: Path) -> None:
    zip_path = nist.zip(nist.folder("digits"), tmp_path / "z" / "gzip.zip")
    for place in (zip_path, zip_path.parent):
        with pytest.raises(DataError) as caught:
            data.load_split("mnist", place, download=False)
        message = str(caught.value)
        assert f"{zip_path} has no EMNIST mnist files: missing members gzip/emnist-mnist-train-images" in message
        assert "gzip/emnist-mnist-test-labels-idx1-ubyte.gz" in message


def test_broken_zip(tmp_path: Path) -> None:
    folder = tmp_path / "z"
    folder.mkdir()
    (folder / "emnist.zip").write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(DataError, match=r"emnist.zip is not a readable zip archive .*delete it"):
        data.load_split("digits", folder)


def _peak_bytes(fn) -> int:
    """Peak bytes traced (Python and NumPy allocations) while ``fn()`` runs."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_header_claiming_2_32_images_is_refused_before_allocating(nist) -> None:
    huge = nist.gz(struct.pack(">4I", 0x803, 2**32 - 1, 28, 28) + bytes(784))
    peak = _peak_bytes(lambda: _load_broken(nist, replace={"train-images": huge}))
    message = _load_broken(nist, replace={"train-images": huge})
    assert ("emnist-digits-train-images-idx3-ubyte.gz: header says 4294967295 x 28 x 28 = 3367254359280 items "
            "(3,367,254,359,280 bytes of data), more than any EMNIST file holds (at most 784,000,000 bytes: "
            "1,000,000 images of 28x28)") in message
    assert peak < 16 << 20
    labels = nist.gz(struct.pack(">2I", 0x801, 2**32 - 1))
    message = _load_broken(nist, replace={"test-labels": labels})
    assert "header says 4294967295 = 4294967295 items" in message and "1,000,000 labels" in message
    with pytest.raises(DataError, match="more than any EMNIST file holds"):
        data.read_idx(struct.pack(">4I", 0x803, 2**32 - 1, 2**32 - 1, 2**32 - 1))


def test_gzip_bomb_is_never_inflated(nist) -> None:
    """4 MB that inflate to 4 GiB past a 30-image header: refused after the header's data plus 1 MiB, in little memory."""
    head = nist.gz(nist.idx(np.zeros((30, 28, 28), np.uint8)))
    bomb = head + gzip.compress(bytes(64 << 20), compresslevel=9, mtime=0) * 64
    assert len(bomb) < 8 << 20
    start = time.perf_counter()
    peak = _peak_bytes(lambda: _load_broken(nist, replace={"train-images": bomb}))
    assert peak < 64 << 20 and time.perf_counter() - start < 10
    message = _load_broken(nist, replace={"train-images": bomb})
    assert ("emnist-digits-train-images-idx3-ubyte.gz: header says 30 x 28 x 28 = 23520 items (23520 bytes of data), "
            "but the file holds at least") in message
    labels_bomb = nist.gz(nist.idx(np.zeros(10, np.uint8))) + gzip.compress(bytes(16 << 20), mtime=0) * 16
    assert "but the file holds at least" in _load_broken(nist, replace={"test-labels": labels_bomb})


def test_a_file_larger_than_any_emnist_file_is_not_read(nist, tmp_path: Path, monkeypatch) -> None:
    folder = nist.folder("digits", "oversized")
    target = folder / nist.file_name("digits", "train-images")
    with open(target, "r+b") as f:
        f.truncate(900_000_000)  # a hole: no disk used
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"read {self}"))
    with pytest.raises(DataError, match=r"emnist-digits-train-images-idx3-ubyte.gz: 900,000,000 bytes is larger than "
                                        r"any EMNIST images file can be \(at most 784,788,112 bytes: 1,000,000 images\)"):
        data.load_split("digits", folder, download=False)


def test_read_idx_validation() -> None:
    with pytest.raises(DataError, match=r"x.idx: 2 bytes is too short for an IDX header"):
        data.read_idx(b"\0\0", name="x.idx")
    with pytest.raises(DataError, match=r"<bytes>: magic number 0x12340801 is not an IDX magic number"):
        data.read_idx(b"\x12\x34\x08\x01" + b"\0" * 8)
    with pytest.raises(DataError, match=r"header of 3 dimensions needs 16 bytes, the file has 8"):
        data.read_idx(b"\0\0\x08\x03\0\0\0\x01")
    ints = data.read_idx(b"\0\0\x0c\x01\0\0\0\x02" + np.array([1, -2], ">i4").tobytes())
    assert ints.tolist() == [1, -2] and ints.dtype == np.int32


# -------------------------------------------------- splitting data ---


def test_train_val_split_stratified_and_seeded(samples: dict) -> None:
    y = samples["balanced"][0].y_train
    x = np.arange(len(y))
    x_tr, y_tr, x_val, y_val = data.train_val_split(x, y, 0.2, seed=3)
    assert len(x_val) == int(np.ceil(0.2 * len(y))) and len(x_tr) + len(x_val) == len(y)
    assert sorted(np.concatenate([x_tr, x_val]).tolist()) == x.tolist()
    np.testing.assert_array_equal(y[x_tr], y_tr)
    np.testing.assert_array_equal(y[x_val], y_val)
    expected = np.bincount(y) * 0.2
    assert np.abs(np.bincount(y_val, minlength=47) - expected).max() <= 1
    again = data.train_val_split(x, y, 0.2, seed=3)
    np.testing.assert_array_equal(again[2], x_val)
    assert not np.array_equal(data.train_val_split(x, y, 0.2, seed=4)[2], x_val)
    for bad in (0, 1, -0.1, 1.5, True):
        with pytest.raises(ConfigError, match=rf"val_fraction must be in \(0, 1\) \(val_fraction={bad}\)"):
            data.train_val_split(x, y, bad)
    with pytest.raises(ConfigError, match="cannot split 20 samples of 10 classes with val_fraction=0.1"):
        data.train_val_split(x[:20], np.arange(20) % 10, 0.1)


def test_subsample_stratified_and_seeded(samples: dict) -> None:
    y = samples["bymerge"][0].y_train
    x = np.arange(len(y))
    xs, ys = data.subsample(x, y, 1000, seed=1)
    assert len(xs) == 1000 and np.all(np.diff(xs) > 0)
    np.testing.assert_array_equal(y[xs], ys)
    expected = np.bincount(y) * 1000 / len(y)
    assert np.abs(np.bincount(ys, minlength=47) - expected).max() < 1
    np.testing.assert_array_equal(data.subsample(x, y, 1000, seed=1)[0], xs)
    assert not np.array_equal(data.subsample(x, y, 1000, seed=2)[0], xs)
    assert len(data.subsample(x, y, 5)[0]) == 5
    same_x, same_y = data.subsample(x, y, len(y) + 5)
    assert same_x is x and same_y is y
    for bad in (0, -3, 2.5):
        with pytest.raises(ConfigError, match=rf"subsample size must be an integer >= 1 \(k={bad}\)"):
            data.subsample(x, y, bad)


def test_split_data_and_fingerprint(samples: dict) -> None:
    d, _ = samples["digits"]
    assert "x_train" not in repr(d) and "digits" in repr(d)
    with pytest.raises(AttributeError):
        d.split = "mnist"  # type: ignore[misc]
    assert data.fingerprint(d.x_test, d.y_test) == data.fingerprint(d.x_test.copy(), d.y_test.copy())
    changed = d.y_test.copy()
    changed[0] += 1
    assert data.fingerprint(d.x_test, changed) != data.fingerprint(d.x_test, d.y_test)
    assert len(data.fingerprint(d.y_test)) == 64
