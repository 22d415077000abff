"""The EMNIST loader: find NIST's files, parse and validate them, cache the arrays.

EMNIST (Cohen et al. 2017) comes from NIST as ``gzip.zip``: for each of the six
splits, four gzip'd IDX files ``gzip/emnist-<split>-<train|test>-<images-idx3|labels-idx1>-ubyte.gz``
and a mapping file ``emnist-<split>-mapping.txt`` (label -> character codes).
:func:`load_split` finds those files, in this order:

1. the ``data_dir`` argument, else the ``EMNIST_DATA_DIR`` environment variable: a
   folder of the IDX files (``.gz`` or gunzipped, also in its ``gzip/`` subfolder),
   a folder holding ``gzip.zip`` or ``emnist.zip``, or the path of such a zip. A
   place given this way must hold the split: the loader never looks further;
2. the ``emnist`` pip package's cache, ``~/.cache/emnist/emnist.zip`` (same layout);
3. with ``download=True``, NIST's ``gzip.zip`` downloaded into that cache, every
   member checked against :data:`OFFICIAL_SHA256`.

Every file is validated (gzip integrity, IDX magic number, 28x28 images, data
length, image/label counts, label range) and a bad one raises
:class:`~emnist_hpo.errors.DataError` naming the file, the bad value and what is
allowed. Images are transposed upright (NIST stores them transposed) and kept as
C-contiguous ``uint8`` (white ink on black); labels become ``int32`` class indices
``0..C-1`` (``letters`` is stored as 1..26 and shifted). The parsed arrays are
cached as ``.npy`` files (``cache_dir``, else ``EMNIST_HPO_CACHE``, else
``~/.cache/emnist_hpo``) keyed on the source files' path, size and mtime, so a
second load takes a fraction of a second. Class names come from the mapping files
packaged with this module, so they are known whatever the source.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import math
import os
import struct
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emnist_hpo.errors import ConfigError, DataError

__all__ = [
    "MAX_IMAGES",
    "NIST_URL",
    "OFFICIAL_SHA256",
    "SPLITS",
    "SplitData",
    "check_split",
    "fingerprint",
    "load_classes",
    "load_split",
    "read_idx",
    "subsample",
    "train_val_split",
]

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("byclass", "bymerge", "balanced", "letters", "digits", "mnist")
NIST_URL = "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip"

#: sha256 of the files in NIST's ``gzip.zip`` (``emnist-mnist-train-images`` is not recorded).
OFFICIAL_SHA256: dict[str, str] = {
    "emnist-balanced-test-images-idx3-ubyte.gz": "117fc12b015e37ea98bfb2cbba3f77c3782c056cdbd219b87abfc8661d7135db",
    "emnist-balanced-test-labels-idx1-ubyte.gz": "a67cac948379b67270b9a4d0a01c8ec661598accf2f2b1964340b7c83cb175cd",
    "emnist-balanced-train-images-idx3-ubyte.gz": "74295e75e4e9fa2c102147460ee7eb763653d5132d883a84fb88932bfb8d2db4",
    "emnist-balanced-train-labels-idx1-ubyte.gz": "b46d41e5156a0a8aaaa4d18979fdd1588850fa8571018acffd5d93b325a7d6ed",
    "emnist-byclass-test-images-idx3-ubyte.gz": "5ec835bd5d5b1a66378a132e727fef20fe994b3cc666899befcca5ac766f50cd",
    "emnist-byclass-test-labels-idx1-ubyte.gz": "501e305eeeacb093b162592d80e8a2632040872360fa6d85cfcb2200d91ca92a",
    "emnist-byclass-train-images-idx3-ubyte.gz": "9e21987f03a6eb8b870187e785883ddad96947299587908f1a7ec2ca0f4be5f0",
    "emnist-byclass-train-labels-idx1-ubyte.gz": "f7ef403d48dc18a89dae0d83d11ee69cecb6e1c12c3a961d03712e495c02a8fa",
    "emnist-bymerge-test-images-idx3-ubyte.gz": "5e5815ec1b522089134435f7c55e75a00960b58414793593ffff23efc0821683",
    "emnist-bymerge-test-labels-idx1-ubyte.gz": "8bda1516255683ba9071e141947ca0c91a911176065cdd6259b0b4d8dc5b5f35",
    "emnist-bymerge-train-images-idx3-ubyte.gz": "39bf8c68037dad40db35348895f7e4e056e8c0a005ab78869c9fbc2c96e947be",
    "emnist-bymerge-train-labels-idx1-ubyte.gz": "2c47293b9e62d6abf6ad05fbf67e40baa32adfd380b8d7b44dcc35534b64e1f1",
    "emnist-digits-test-images-idx3-ubyte.gz": "20ebe43509264f7639d37c835a3f0b009e90b29e00a099a03101abe1644a3f63",
    "emnist-digits-test-labels-idx1-ubyte.gz": "bad1834c45d5988e270b99d43b13edc3fd898f658ffbc2caf2846ef27f7b05b0",
    "emnist-digits-train-images-idx3-ubyte.gz": "f7c95004d14d81af89522e67d8f0c781dfb3bd544181c81bfe1eb6b41c35b726",
    "emnist-digits-train-labels-idx1-ubyte.gz": "6638a6ff5fe2eefd9cca2471995b46c82986b8e4b2a70d2f5ce8e05d7edb319e",
    "emnist-letters-test-images-idx3-ubyte.gz": "50f0e93d75b99b463e9760b8345866f22587fa2c2fba472730a5ba09c693412d",
    "emnist-letters-test-labels-idx1-ubyte.gz": "924955c31fe7fd809b7303b5c0141282955f4b8390c74cdfd5d80435e0f4b4cb",
    "emnist-letters-train-images-idx3-ubyte.gz": "6288f418a917e007bf5fddb823a2dc7a5c6a35031401b93292a539cb12bd881f",
    "emnist-letters-train-labels-idx1-ubyte.gz": "9759af91ea6bccdf07a6040fd085861f2ec88e37f7c3f5760f6feb57106fbe5c",
    "emnist-mnist-test-images-idx3-ubyte.gz": "b25640fa9e356c618132f5df347c95ef5bae6d9c2596be1de40f7e0ae1c3eac6",
    "emnist-mnist-test-labels-idx1-ubyte.gz": "bcc5385d38f083dba046f5f756e99b32f5ea7fad122c6243c71c2239873065ca",
    "emnist-mnist-train-labels-idx1-ubyte.gz": "00c6d3c2342fdffb1711e0b5656cac4ce5862d2826399d383a9bac07d612e9f8",
}

IMAGE_SIZE = 28
_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_LABEL_OFFSET = {"letters": 1}  # raw label of class index 0
_ROLES = ("train-images", "train-labels", "test-images", "test-labels")
_ZIP_NAMES = ("gzip.zip", "emnist.zip")
_DOWNLOAD_TIMEOUT_S = 10.0
_CACHE_VERSION = 1
_MAPPINGS = Path(__file__).resolve().parent / "mappings"
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"
#: The most images an EMNIST file may hold: NIST's largest (byclass and bymerge train) holds 697,932.
#: A header claiming more (2**32 - 1, say) is refused before anything is allocated or inflated.
MAX_IMAGES = 1_000_000
_MAX_IMAGE_BYTES = MAX_IMAGES * IMAGE_SIZE * IMAGE_SIZE
#: Bytes read past a file's data to say how much more it holds than its header (a gzip bomb stops here).
_TRAILING_PROBE = 1 << 20


@dataclass(frozen=True)
class SplitData:
    """One EMNIST split: upright uint8 images (N, 28, 28) and int32 class indices."""

    split: str
    x_train: np.ndarray = field(repr=False)
    y_train: np.ndarray = field(repr=False)
    x_test: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)
    classes: tuple[str, ...] = field(repr=False)
    source: str

    @property
    def num_classes(self) -> int:
        """Number of classes C; labels are 0..C-1."""
        return len(self.classes)


@dataclass(frozen=True)
class _Source:
    """Where one split's four files are: a folder's files or a zip's members."""

    description: str
    files: dict[str, str]  # role -> file path (folder) or member name (zip)
    zip_path: Path | None = None
    key: tuple[Any, ...] = ()  # what the cache entry depends on


# ---------------------------------------------------------------- names ---


def check_split(split: str) -> str:
    """Return ``split`` if it is one of :data:`SPLITS` exactly; ConfigError otherwise.

    Exactly: the name becomes the study, the MLflow experiment and the registered model
    (``emnist-<split>``), so ``DIGITS`` would start a second, empty history beside
    ``digits``. A case or spacing slip gets a "did you mean".
    """
    if isinstance(split, str) and split in SPLITS:
        return split
    hint = ""
    if isinstance(split, str):
        import difflib

        folded = split.strip().lower()
        if folded in SPLITS:
            hint = f" (split names are lowercase: did you mean {folded!r}?)"
        else:
            close = difflib.get_close_matches(folded, SPLITS, n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}{hint}")


def _file_name(split: str, role: str) -> str:
    part, kind = role.split("-")
    dims = "idx3" if kind == "images" else "idx1"
    return f"emnist-{split}-{part}-{kind}-{dims}-ubyte.gz"


def _how_to(split: str, *, sentence: bool = False) -> str:
    return (
        f"{'P' if sentence else 'p'}ut NIST's gzip IDX files "
        f"(emnist-{split}-{{train,test}}-{{images-idx3,labels-idx1}}-ubyte.gz) or its gzip.zip "
        "in a folder and pass --data-dir DIR or set EMNIST_DATA_DIR=DIR"
    )


def load_classes(split: str) -> tuple[str, ...]:
    """Display name per class index, from the packaged NIST mapping file.

    A mapping line ``label code [code...]`` gives the characters of one label; two
    codes (``letters``: ``1 65 97``) give ``"A/a"``.
    """
    split = check_split(split)
    path = _MAPPINGS / f"emnist-{split}-mapping.txt"
    rows = sorted(
        (int(fields[0]), "/".join(chr(int(code)) for code in fields[1:]))
        for fields in (line.split() for line in path.read_text(encoding="ascii").splitlines())
        if fields
    )
    offset = _LABEL_OFFSET.get(split, 0)
    labels = [label for label, _ in rows]
    if labels != list(range(offset, offset + len(rows))):
        raise DataError(f"{path}: labels {labels[:3]}... are not {offset}..{offset + len(rows) - 1}")
    return tuple(name for _, name in rows)


# -------------------------------------------------------------- parsing ---


class _GzipErrors:
    """``with _GzipErrors(name):`` turns a gzip stream's errors into a DataError naming the file."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None and isinstance(exc, (EOFError, gzip.BadGzipFile, zlib.error, OSError)):
            raise DataError(
                f"{self.name}: truncated or corrupt gzip data ({exc}); delete the file and fetch it again"
            ) from exc
        return False


def _open_idx(data: bytes) -> io.BufferedIOBase:
    """A stream of the IDX bytes in ``data``, gunzipped on the fly if they are gzip: nothing is inflated
    beyond what is read, so a small file that inflates to gigabytes costs only what the header allows."""
    return gzip.GzipFile(fileobj=io.BytesIO(data)) if data[:2] == _GZIP_MAGIC else io.BytesIO(data)


def _read_into(stream: io.BufferedIOBase, buf: memoryview) -> int:
    """Fill ``buf`` from ``stream``; the number of bytes read (fewer at end of stream)."""
    got = 0
    while got < len(buf):
        n = stream.readinto(buf[got:])
        if not n:
            break
        got += n
    return got


def _trailing(stream: io.BufferedIOBase) -> tuple[int, bool]:
    """Bytes left in ``stream``, counted up to :data:`_TRAILING_PROBE`; and whether there are more than that."""
    n = 0
    while n < _TRAILING_PROBE:
        block = stream.read(min(1 << 16, _TRAILING_PROBE - n))
        if not block:
            return n, False
        n += len(block)
    return n, bool(stream.read(1))


def _read_magic(stream: io.BufferedIOBase, name: str) -> int:
    head = stream.read(4)
    if len(head) < 4:
        raise DataError(f"{name}: {len(head)} bytes is too short for an IDX header (4 bytes at least)")
    (magic,) = struct.unpack(">I", head)
    return magic


def _read_dims(stream: io.BufferedIOBase, name: str, magic: int, max_bytes: int,
               most: str = f"{MAX_IMAGES:,} images of {IMAGE_SIZE}x{IMAGE_SIZE}") -> tuple[np.dtype, tuple[int, ...]]:
    """The element type and sizes of an IDX header whose magic number was read; refuses a header claiming more
    than ``max_bytes`` of data before anything is allocated or inflated."""
    type_code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    if magic >> 16 or type_code not in _IDX_DTYPES or ndim == 0:
        codes = ", ".join(f"{code:02X}" for code in _IDX_DTYPES)
        raise DataError(
            f"{name}: magic number 0x{magic:08X} is not an IDX magic number "
            f"(0x0000TTDD with TT one of {codes} and DD >= 1 dimensions)"
        )
    raw = stream.read(4 * ndim)
    if len(raw) < 4 * ndim:
        raise DataError(f"{name}: header of {ndim} dimensions needs {4 + 4 * ndim} bytes, the file has {4 + len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw)
    dtype = np.dtype(_IDX_DTYPES[type_code])
    count = math.prod(dims)
    if count * dtype.itemsize > max_bytes:
        raise DataError(
            f"{name}: header says {' x '.join(map(str, dims))} = {count} items ({count * dtype.itemsize:,} bytes of "
            f"data), more than any EMNIST file holds (at most {max_bytes:,} bytes: {most}); not an EMNIST file"
        )
    return dtype, dims


def _length_error(name: str, dims: tuple[int, ...], expected: int, actual: int, more: bool = False) -> DataError:
    shape = " x ".join(map(str, dims))
    holds = f"at least {actual}" if more else str(actual)
    return DataError(
        f"{name}: header says {shape} = {math.prod(dims)} items ({expected} bytes of data), "
        f"but the file holds {holds} bytes of data"
    )


def _read_payload(stream: io.BufferedIOBase, name: str, dtype: np.dtype, dims: tuple[int, ...]) -> np.ndarray:
    """The data after a header: exactly what the header says, checked to be all there and nothing more."""
    expected = math.prod(dims) * dtype.itemsize
    buf = np.empty(expected, dtype=np.uint8)
    got = _read_into(stream, memoryview(buf))
    if got < expected:
        raise _length_error(name, dims, expected, got)
    extra, more = _trailing(stream)
    if extra:
        raise _length_error(name, dims, expected, expected + extra, more)
    array = buf.view(dtype).reshape(dims)
    if not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
    array.flags.writeable = False
    return array


def read_idx(data: bytes, *, name: str = "<bytes>", max_bytes: int | None = None) -> np.ndarray:
    """Parse an IDX file's bytes (gunzipped on the fly if they are gzip) into an array.

    The header is a magic number ``0x0000TTDD`` (TT the element type, DD the number
    of dimensions) and DD big-endian uint32 sizes; the data must be exactly their
    product of elements, at most ``max_bytes`` (default: the largest EMNIST image
    file, :data:`MAX_IMAGES` images). The result is read-only, native byte order.
    """
    with _GzipErrors(name):
        stream = _open_idx(data)
        magic = _read_magic(stream, name)
        dtype, dims = _read_dims(stream, name, magic, _MAX_IMAGE_BYTES if max_bytes is None else max_bytes)
        return _read_payload(stream, name, dtype, dims)


def _check_magic(magic: int | None, name: str, expected: int, what: str) -> None:
    if magic != expected:
        got = "no magic number" if magic is None else f"magic number 0x{magic:08X}"
        dims = "3 dimensions" if expected == _IMAGES_MAGIC else "1 dimension"
        raise DataError(f"{name}: {got}, but {what} files must start with 0x{expected:08X} (unsigned bytes, {dims})")


def _expect_magic(stream: io.BufferedIOBase, name: str, expected: int, what: str) -> int:
    head = stream.read(4)
    magic = struct.unpack(">I", head)[0] if len(head) == 4 else None
    _check_magic(magic, name, expected, what)
    return expected


def _parse_images(raw: bytes, name: str, chunk: int = 8192) -> np.ndarray:
    """Upright uint8 images (N, 28, 28), gunzipped straight into place a chunk of images at a time.

    Full bymerge then needs its 0.55 GB of images once, not three times (the gunzipped
    bytes, their transposed copy and the result); a header claiming more than
    :data:`MAX_IMAGES` images is refused before anything is inflated.
    """
    side = IMAGE_SIZE * IMAGE_SIZE
    with _GzipErrors(name):
        stream = _open_idx(raw)
        magic = _expect_magic(stream, name, _IMAGES_MAGIC, "image")
        dtype, dims = _read_dims(stream, name, magic, _MAX_IMAGE_BYTES)
        n, rows, cols = dims
        if (rows, cols) != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(
                f"{name}: images are {rows}x{cols} pixels; EMNIST images must be {IMAGE_SIZE}x{IMAGE_SIZE}"
            )
        expected = n * side
        out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)  # pages are committed only as they are filled
        block = np.empty(min(chunk, max(n, 1)) * side, dtype=np.uint8)
        for lo in range(0, n, chunk):
            k = min(chunk, n - lo)
            got = _read_into(stream, memoryview(block)[: k * side])
            if got < k * side:
                raise _length_error(name, dims, expected, lo * side + got)
            # NIST stores each image transposed: turn it upright
            out[lo:lo + k] = block[: k * side].reshape(k, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 1)
        extra, more = _trailing(stream)
        if extra:
            raise _length_error(name, dims, expected, expected + extra, more)
    if n == 0:
        raise DataError(f"{name}: holds no images")
    return out


def _parse_labels(raw: bytes, name: str, split: str, num_classes: int) -> np.ndarray:
    with _GzipErrors(name):
        stream = _open_idx(raw)
        magic = _expect_magic(stream, name, _LABELS_MAGIC, "label")
        dtype, dims = _read_dims(stream, name, magic, MAX_IMAGES, f"{MAX_IMAGES:,} labels")
        labels = _read_payload(stream, name, dtype, dims)
    low = _LABEL_OFFSET.get(split, 0)
    high = low + num_classes - 1
    bad = np.flatnonzero((labels < low) | (labels > high))
    if bad.size:
        raise DataError(
            f"label {labels[bad[0]]} in {name} is outside {low}..{high} for split {split} "
            f"({bad.size} of {labels.size} labels are; the first at index {bad[0]})"
        )
    classes = labels.astype(np.int32)
    classes -= low
    return classes


def _parse_split(split: str, raw: dict[str, bytes], names: dict[str, str], num_classes: int) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for part in ("train", "test"):
        images_name, labels_name = names[f"{part}-images"], names[f"{part}-labels"]
        x = _parse_images(raw.pop(f"{part}-images"), images_name)
        y = _parse_labels(raw.pop(f"{part}-labels"), labels_name, split, num_classes)
        if len(x) != len(y):
            raise DataError(
                f"emnist-{split} {part}: {len(x)} images in {images_name} but {len(y)} labels "
                f"in {labels_name}; the counts must be equal"
            )
        arrays[f"x_{part}"], arrays[f"y_{part}"] = x, y
    return arrays


# -------------------------------------------------------------- sources ---


def _emnist_cache_zip() -> Path:
    """The ``emnist`` package's cache file (its own function when installed)."""
    try:
        import emnist  # noqa: PLC0415 - only for its cache path; its parser breaks under numpy 2

        return Path(emnist.get_cached_data_path())
    except Exception:  # noqa: BLE001 - not installed or changed: use its documented default
        return Path.home() / ".cache" / "emnist" / "emnist.zip"


def _stat_key(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _find_in_folder(split: str, folder: Path) -> tuple[dict[str, str], list[str]]:
    """The split's files in ``folder`` or ``folder/gzip`` (``.gz`` or gunzipped)."""
    found: dict[str, str] = {}
    missing: list[str] = []
    for role in _ROLES:
        name = _file_name(split, role)
        candidates = [base / file for base in (folder, folder / "gzip") for file in (name, name[:-3])]
        hit = next((path for path in candidates if path.is_file()), None)
        if hit is None:
            missing.append(name)
        else:
            found[role] = str(hit)
    return found, missing


def _folder_source(split: str, folder: Path, files: dict[str, str]) -> _Source:
    key = tuple(_stat_key(Path(files[role])) for role in _ROLES)
    return _Source(description=f"folder {folder.resolve()}", files=files, key=key)


def _zip_source(split: str, zip_path: Path, origin: str = "zip") -> _Source:
    """The split's members of a NIST-layout zip; DataError if it lacks them."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            infos = {Path(info.filename).name: info for info in archive.infolist() if not info.is_dir()}
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{zip_path} is not a readable zip archive ({exc}); delete it and fetch it again") from exc
    files: dict[str, str] = {}
    missing: list[str] = []
    key: list[Any] = [_stat_key(zip_path)]
    for role in _ROLES:
        name = _file_name(split, role)
        info = infos.get(name) or infos.get(name[:-3])
        if info is None:
            missing.append(f"gzip/{name}")
            continue
        files[role] = info.filename
        key.append([info.filename, info.CRC, info.file_size])
    if missing:
        raise DataError(
            f"{zip_path} has no EMNIST {split} files: missing members {', '.join(missing)} "
            f"(it holds {len(infos)} files); {_how_to(split)}"
        )
    return _Source(description=f"{origin} {zip_path.resolve()}", files=files, zip_path=zip_path, key=tuple(key))


def _given_source(split: str, path: Path, origin: str) -> _Source:
    """Resolve a place the user named; never fall through to other places."""
    if not path.exists():
        raise DataError(f"{origin} {path} does not exist; {_how_to(split)}")
    if path.is_file():
        if zipfile.is_zipfile(path):
            return _zip_source(split, path)
        raise DataError(f"{origin} {path} is a file but not a zip archive; {_how_to(split)}")
    files, missing = _find_in_folder(split, path)
    if not missing:
        return _folder_source(split, path, files)
    for zip_name in _ZIP_NAMES:
        if (path / zip_name).is_file():
            return _zip_source(split, path / zip_name)
    raise DataError(
        f"{origin} {path} lacks the EMNIST {split} files: missing {', '.join(missing)} "
        f"(and it holds no {' or '.join(_ZIP_NAMES)}); {_how_to(split)}"
    )


def _resolve_source(split: str, data_dir: str | os.PathLike[str] | None, download: bool, progress: bool) -> _Source:
    if data_dir is not None:
        return _given_source(split, Path(data_dir).expanduser(), "data_dir")
    env = os.environ.get("EMNIST_DATA_DIR")
    if env:
        return _given_source(split, Path(env).expanduser(), "EMNIST_DATA_DIR")
    cache_zip = _emnist_cache_zip()
    if cache_zip.is_file():
        return _zip_source(split, cache_zip, "emnist package cache")
    looked = (
        f"EMNIST split {split!r} not found. Looked in: the data_dir argument (not given); "
        f"$EMNIST_DATA_DIR (not set); the emnist package cache {cache_zip} (no such file)"
    )
    how = _how_to(split, sentence=True)
    if not download:
        raise DataError(f"{looked}; download of {NIST_URL} (not tried: download disabled). {how}")
    try:
        _download(NIST_URL, cache_zip, progress)
    except (OSError, ValueError, EOFError) as exc:  # URLError, timeouts, HTTP errors, short reads
        raise DataError(f"{looked}; download of {NIST_URL} (failed: {exc}). {how}") from exc
    return _zip_source(split, cache_zip, "emnist package cache")


def _max_file_bytes(role: str) -> int:
    """The largest file (gzip'd or not) that can hold ``role``'s data: :data:`MAX_IMAGES` images or labels,
    plus gzip's worst-case growth on incompressible data (5 bytes per 16 KB block) and its header."""
    data = _MAX_IMAGE_BYTES if role.endswith("images") else MAX_IMAGES
    return 16 + data + data // 1000 + 4096


def _too_large(name: str, size: int, role: str) -> DataError:
    kind = "images" if role.endswith("images") else "labels"
    return DataError(
        f"{name}: {size:,} bytes is larger than any EMNIST {kind} file can be (at most {_max_file_bytes(role):,} "
        f"bytes: {MAX_IMAGES:,} {kind}); not an EMNIST file"
    )


def _read_source(source: _Source) -> dict[str, bytes]:
    """The four files' bytes, each checked against the largest size an EMNIST file can have before it is read."""
    names = _source_names(source)
    if source.zip_path is None:
        for role, path in source.files.items():
            size = Path(path).stat().st_size
            if size > _max_file_bytes(role):
                raise _too_large(names[role], size, role)
        return {role: Path(path).read_bytes() for role, path in source.files.items()}
    try:
        with zipfile.ZipFile(source.zip_path) as archive:
            for role, member in source.files.items():
                info = archive.getinfo(member)
                if info.file_size > _max_file_bytes(role):
                    raise _too_large(names[role], info.file_size, role)
            # zipfile stops inflating a member at its recorded size (and then checks its CRC)
            return {role: archive.read(member) for role, member in source.files.items()}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise DataError(
            f"{source.zip_path}: cannot read its members ({exc}); delete the zip and fetch it again"
        ) from exc


def _source_names(source: _Source) -> dict[str, str]:
    """File names for messages: ``emnist-...-ubyte.gz`` or ``zip:member``."""
    if source.zip_path is None:
        return {role: Path(path).name for role, path in source.files.items()}
    return {role: f"{source.zip_path.name}:{member}" for role, member in source.files.items()}


# ------------------------------------------------------------- download ---


def _download(url: str, dest: Path, progress: bool) -> None:
    """Download ``url`` to ``dest`` (atomically), verifying members against OFFICIAL_SHA256."""
    from http.client import HTTPException  # noqa: PLC0415

    from tqdm import tqdm  # noqa: PLC0415

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    try:
        log.info("downloading %s to %s", url, dest)
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response, part.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"EMNIST {dest.name}", disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        if total is not None and part.stat().st_size != total:
            raise EOFError(f"got {part.stat().st_size} of {total} bytes")
        _verify_download(url, part)
        os.replace(part, dest)
    except HTTPException as exc:
        raise OSError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        part.unlink(missing_ok=True)


def _verify_download(url: str, path: Path) -> None:
    checked = 0
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                expected = OFFICIAL_SHA256.get(Path(info.filename).name)
                if expected is None:
                    continue
                digest = hashlib.sha256()
                with archive.open(info) as member:
                    while block := member.read(1 << 20):
                        digest.update(block)
                if digest.hexdigest() != expected:
                    raise DataError(
                        f"download of {url}: {info.filename} has sha256 {digest.hexdigest()}, "
                        f"expected {expected}; the download was deleted"
                    )
                checked += 1
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise DataError(f"download of {url} is not a valid zip archive ({exc}); the download was deleted") from exc
    if not checked:
        raise DataError(f"download of {url} holds none of NIST's EMNIST files; the download was deleted")


# ---------------------------------------------------------------- cache ---

_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def _cache_entry(cache_dir: str | os.PathLike[str] | None, split: str, source: _Source) -> Path:
    root = cache_dir or os.environ.get("EMNIST_HPO_CACHE") or Path.home() / ".cache" / "emnist_hpo"
    key = hashlib.sha256(json.dumps([_CACHE_VERSION, split, source.key]).encode()).hexdigest()[:20]
    return Path(root).expanduser() / f"{split}-{key}"


def _valid_arrays(arrays: dict[str, np.ndarray], num_classes: int) -> bool:
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or not x.flags.c_contiguous:
            return False
        if y.dtype != np.int32 or y.shape != (len(x),) or len(x) == 0:
            return False
        if y.min() < 0 or y.max() >= num_classes:
            return False
    return True


def _load_cached(entry: Path, num_classes: int) -> dict[str, np.ndarray] | None:
    if not entry.is_dir():
        return None
    try:
        # The test images stay on disk until a final model is evaluated (read-only memory map):
        # a full-bymerge study does not hold their 91 MB through hours of trials.
        arrays = {name: np.load(entry / f"{name}.npy", allow_pickle=False, mmap_mode="r" if name == "x_test" else None)
                  for name in _ARRAYS}
        if _valid_arrays(arrays, num_classes):
            return arrays
        log.warning("ignoring inconsistent cached EMNIST arrays in %s; rebuilding", entry)
    except Exception as exc:  # noqa: BLE001 - the cache is only an optimisation: rebuild on any failure
        log.warning("ignoring unreadable cached EMNIST arrays in %s (%s); rebuilding", entry, exc)
    return None


def _save_cached(entry: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write each array to a temp file, then os.replace it into place."""
    try:
        entry.mkdir(parents=True, exist_ok=True)
        for name in _ARRAYS:
            fd, tmp = tempfile.mkstemp(dir=entry, prefix=f".{name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as out:
                    np.save(out, arrays[name], allow_pickle=False)
                os.replace(tmp, entry / f"{name}.npy")
            finally:
                Path(tmp).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not cache EMNIST arrays in %s (%s); loading will parse again next time", entry, exc)


# --------------------------------------------------------------- loader ---


def load_split(
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    progress: bool = True,
) -> SplitData:
    """Load one EMNIST split (see the module docstring for where it is looked for).

    Raises ConfigError for an unknown split and DataError when the files cannot be
    found, downloaded or parsed.
    """
    split = check_split(split)
    classes = load_classes(split)
    source = _resolve_source(split, data_dir, download, progress)
    entry = _cache_entry(cache_dir, split, source)
    arrays = _load_cached(entry, len(classes))
    if arrays is None:
        log.info("parsing EMNIST %s from %s", split, source.description)
        arrays = _parse_split(split, _read_source(source), _source_names(source), len(classes))
        _save_cached(entry, arrays)
    return SplitData(split=split, classes=classes, source=source.description, **arrays)


# ------------------------------------------------------- splitting data ---


def _check_pair(x: np.ndarray, y: np.ndarray) -> None:
    if len(x) != len(y):
        raise ConfigError(f"x and y must have the same length (len(x)={len(x)}, len(y)={len(y)})")


def train_val_split(
    x: np.ndarray, y: np.ndarray, val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded, stratified split into ``(x_train, y_train, x_val, y_val)``."""
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1) (val_fraction={val_fraction!r})")
    _check_pair(x, y)
    from sklearn.model_selection import train_test_split  # noqa: PLC0415 - slow import, needed here only

    try:
        x_tr, x_val, y_tr, y_val = train_test_split(
            x, y, test_size=val_fraction, random_state=seed, shuffle=True, stratify=y
        )
    except ValueError as exc:
        raise ConfigError(
            f"cannot split {len(y)} samples of {len(np.unique(y))} classes with "
            f"val_fraction={val_fraction} stratified: {exc}"
        ) from exc
    return x_tr, y_tr, x_val, y_val


def subsample(x: np.ndarray, y: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, stratified subset of exactly ``k`` samples, in their original order.

    Each class gets ``k * n_c / n`` samples rounded down or up (largest remainders
    first), so proportions match within one sample. ``k >= len(y)``: unchanged.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"subsample size must be an integer >= 1 (k={k!r})")
    _check_pair(x, y)
    n = len(y)
    if k >= n:
        return x, y
    rng = np.random.default_rng(seed)
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    quota = counts * (k / n)
    take = np.floor(quota).astype(np.int64)
    order = np.lexsort((rng.random(len(counts)), -(quota - take)))  # largest remainder, random ties
    take[order[: k - int(take.sum())]] += 1
    groups = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    picked = [rng.choice(group, size=int(t), replace=False) for group, t in zip(groups, take) if t]
    index = np.sort(np.concatenate(picked))
    return x[index], y[index]


def fingerprint(*arrays: np.ndarray) -> str:
    """sha256 (hex) of the arrays' dtypes, shapes and bytes: a data-set identity for logs."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()
