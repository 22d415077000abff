"""``python -m emnist_hpo predict``: the registered champion on real-world images.

Each image is read and converted by :mod:`emnist_hpo.images`; the champion
(``models:/emnist-<split>@champion``) scores all readable images in one batch.
An image that cannot be used gets its own error and the others are still
answered; the command then exits with code 2.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .data import check_split
from .images import ImageError, prepare_file
from .registry import load_champion
from .tracking import resolve_tracking_uri


@dataclass
class Prediction:
    image: str  # the path as given
    top: list[tuple[str, float]] = field(default_factory=list)  # (character, probability), most likely first
    error: str | None = None  # why the image could not be classified

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        return {"image": self.image, "top": [{"char": c, "prob": round(p, 6)} for c, p in self.top]}


def predict_images(paths: Sequence[str], split: str, tracking_uri: str | None = None, top: int = 3,
                   model=None) -> list[Prediction]:
    """Top-``top`` characters for every image in ``paths`` by the split's champion (or ``model``)."""
    split = check_split(split)
    if model is None:
        with warnings.catch_warnings():  # MLflow's type-hint advice about the pyfunc (its input is checked there)
            warnings.filterwarnings("ignore", message=".*type hints.*")
            model = load_champion(resolve_tracking_uri(tracking_uri), split)
    results = [Prediction(str(p)) for p in paths]
    ok, images = [], []
    for i, path in enumerate(paths):
        try:
            images.append(prepare_file(path).image)
            ok.append(i)
        except ImageError as exc:
            results[i].error = str(exc)
    if images:
        proba = model.predict(np.stack(images))
        classes = [str(c) for c in proba.columns]
        values = np.asarray(proba, dtype=np.float64)
        for row, i in zip(values, ok):
            best = np.argsort(-row, kind="stable")[:top]
            results[i].top = [(classes[j], float(row[j])) for j in best]
    return results


def format_text(results: Sequence[Prediction]) -> list[str]:
    """One line per classified image: ``path: A/a 0.912  H/h 0.041  N/n 0.013``."""
    return [f"{r.image}: " + "  ".join(f"{c} {p:.3f}" for c, p in r.top) for r in results if r.error is None]


def format_json(results: Sequence[Prediction]) -> str:
    return json.dumps([r.to_dict() for r in results], indent=1, ensure_ascii=False)
