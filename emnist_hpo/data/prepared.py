"""A split made ready for training: loaded once per process, subsampled, split train/validation."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from emnist_hpo.config import DataConfig
from emnist_hpo.data.nist import SplitData, load_split, subsample, train_val_split


@dataclass
class PreparedData:
    split: str  # EMNIST split name
    classes: tuple[str, ...]  # character per class index
    x_train: np.ndarray  # uint8 (N, 28, 28): the training part (validation carved out)
    y_train: np.ndarray
    x_val: np.ndarray  # uint8: the seeded, stratified validation part
    y_val: np.ndarray
    x_test: np.ndarray  # uint8: touched only to evaluate a final model (memory-mapped from the parsed cache)
    y_test: np.ndarray
    source: str  # where the files came from

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def train_and_val(self) -> tuple[np.ndarray, np.ndarray]:
        """Training and validation together, for a final fit: a view, no copy, when :func:`prepare` made them."""
        x, y = _adjacent(self.x_train, self.x_val), _adjacent(self.y_train, self.y_val)
        if x is not None and y is not None:
            return x, y
        return np.concatenate([self.x_train, self.x_val]), np.concatenate([self.y_train, self.y_val])

    def fingerprint(self) -> str:
        """Short hash of the labels and sizes: runs with equal fingerprints saw the same data."""
        h = hashlib.sha256()
        for a in (self.y_train, self.y_val, self.y_test):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(str((len(self.y_train), len(self.y_val), len(self.y_test))).encode())
        return h.hexdigest()[:12]

    def test_fingerprint(self) -> str:
        """Short hash of the test labels and the middle row of 512 test images spread over the set.

        A sample, so a test set kept on disk (memory-mapped) is not read into memory for it.
        """
        h = hashlib.sha256(np.ascontiguousarray(self.y_test).tobytes())
        h.update(np.ascontiguousarray(self.x_test[:: max(1, len(self.x_test) // 512), 14, :]).tobytes())
        return h.hexdigest()[:12]

    def release_training_images(self) -> None:
        """Drop the training and validation images (labels stay): once the final model is trained only the
        test set is needed, and full bymerge's 0.55 GB of training images need not sit beside it."""
        self.x_train = self.x_val = np.empty((0, *self.x_test.shape[1:]), dtype=np.uint8)


class Rows:
    """Rows ``index`` of ``array`` without copying them: what :func:`~emnist_hpo.train.trainer.train` needs of its images.

    ``len()``, ``shape``, ``dtype`` and indexing by position (an int, a slice or an index
    array) act on the selected rows; only the rows asked for are copied. Re-training on
    k folds of full bymerge this way holds no 0.5 GB copy per fold.
    """

    def __init__(self, array: np.ndarray, index: np.ndarray):
        self.array, self.index = array, np.asarray(index)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.array.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def __getitem__(self, key):
        return self.array[self.index[key]]

    def __array__(self, dtype=None, copy=None):
        out = self.array[self.index]
        return out if dtype is None else out.astype(dtype)


def prepare(split: str, data_dir: str | None, cfg: DataConfig, *, progress: bool = True) -> PreparedData:
    """Load ``split`` and carve the validation set (and an optional quick-run subset) from train.

    The split is :func:`~emnist_hpo.data.nist.train_val_split`'s (same seeded, stratified sets), made
    in place: validation rows are swapped to the end of the loaded array, and train and
    validation are views of it. Full bymerge keeps one 0.55 GB copy of its training images,
    never two, and :meth:`PreparedData.train_and_val` is free.
    """
    raw: SplitData = load_split(split, data_dir, progress=progress)
    x, y = raw.x_train, raw.y_train
    if cfg.max_train_samples is not None:
        # the subset is of the whole training pool; validation is carved from it with the same ratio
        x, y = subsample(x, y, cfg.max_train_samples, seed=cfg.seed)
    x, y, n_train = _split_in_place(x, y, cfg.val_fraction, cfg.seed)
    return PreparedData(split, raw.classes, x[:n_train], y[:n_train], x[n_train:], y[n_train:], raw.x_test,
                        raw.y_test, raw.source)


def _split_in_place(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int,
                    chunk: int = 8192) -> tuple[np.ndarray, np.ndarray, int]:
    """Reorder ``x``/``y`` in place so the validation rows of ``train_val_split`` come last; return them and n_train."""
    _, _, val_index, _ = train_val_split(np.arange(len(y)), y, val_fraction, seed=seed)
    if not (x.flags.writeable and x.flags.c_contiguous):
        x = np.ascontiguousarray(x).copy()
    if not (y.flags.writeable and y.flags.c_contiguous):
        y = y.copy()
    n_train = len(y) - len(val_index)
    is_val = np.zeros(len(y), dtype=bool)
    is_val[val_index] = True
    out = np.flatnonzero(is_val[:n_train])  # validation rows in the training part ...
    into = n_train + np.flatnonzero(~is_val[n_train:])  # ... swap with training rows in the validation part
    for lo in range(0, len(out), chunk):  # a chunk of rows at a time: the temporaries stay small
        a, b = out[lo:lo + chunk], into[lo:lo + chunk]
        for arr in (x, y):
            tmp = arr[a]
            arr[a] = arr[b]
            arr[b] = tmp
    return x, y, n_train


def _adjacent(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """``a`` followed by ``b`` as one array without copying, when ``b`` starts where ``a`` ends in one buffer."""
    base = a.base
    if (base is None or b.base is not base or not isinstance(base, np.ndarray) or a.dtype != b.dtype
            or a.shape[1:] != b.shape[1:] or not (a.flags.c_contiguous and b.flags.c_contiguous)):
        return None
    if a.ctypes.data + a.nbytes != b.ctypes.data:
        return None
    offset = a.ctypes.data - base.ctypes.data
    if offset < 0 or offset + a.nbytes + b.nbytes > base.nbytes:
        return None
    return np.ndarray((len(a) + len(b), *a.shape[1:]), dtype=a.dtype, buffer=base, offset=offset)
