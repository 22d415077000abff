"""A split made ready for training: loaded once per process, subsampled, split train/validation."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .config import DataConfig
from .data import SplitData, load_split, subsample, train_val_split


@dataclass
class PreparedData:
    split: str  # EMNIST split name
    classes: tuple[str, ...]  # character per class index
    x_train: np.ndarray  # uint8 (N, 28, 28): the training part (validation carved out)
    y_train: np.ndarray
    x_val: np.ndarray  # uint8: the seeded, stratified validation part
    y_val: np.ndarray
    x_test: np.ndarray  # uint8: touched only to evaluate a final model
    y_test: np.ndarray
    source: str  # where the files came from

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def train_and_val(self) -> tuple[np.ndarray, np.ndarray]:
        """Training and validation together, for a final fit."""
        return np.concatenate([self.x_train, self.x_val]), np.concatenate([self.y_train, self.y_val])

    def fingerprint(self) -> str:
        """Short hash of the labels and sizes: runs with equal fingerprints saw the same data."""
        h = hashlib.sha256()
        for a in (self.y_train, self.y_val, self.y_test):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(str((len(self.x_train), len(self.x_val), len(self.x_test))).encode())
        return h.hexdigest()[:12]

    def test_fingerprint(self) -> str:
        h = hashlib.sha256(np.ascontiguousarray(self.y_test).tobytes())
        h.update(np.ascontiguousarray(self.x_test[:, 14, :]).tobytes())
        return h.hexdigest()[:12]


def prepare(split: str, data_dir: str | None, cfg: DataConfig, *, progress: bool = True) -> PreparedData:
    """Load ``split`` and carve the validation set (and an optional quick-run subset) from train."""
    raw: SplitData = load_split(split, data_dir, progress=progress)
    x, y = raw.x_train, raw.y_train
    if cfg.max_train_samples is not None:
        # the subset is of the whole training pool; validation is carved from it with the same ratio
        x, y = subsample(x, y, cfg.max_train_samples, seed=cfg.seed)
    x_tr, y_tr, x_val, y_val = train_val_split(x, y, cfg.val_fraction, seed=cfg.seed)
    return PreparedData(split, raw.classes, x_tr, y_tr, x_val, y_val, raw.x_test, raw.y_test, raw.source)
