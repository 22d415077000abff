"""``python -m emnist_hpo predict``: the registered champion on real-world images.

Each image is read and converted by :mod:`emnist_hpo.data.images`; the champion
(``models:/emnist-<split>@champion``) scores all readable images in one batch.
An image that cannot be used gets its own error and the others are still
answered; the command then exits with code 2.

The champion is loaded by :func:`emnist_hpo.tracking.registry.load_champion`: its Keras
file and class names only, in safe mode; no code stored in the registry runs.
``top`` must be in 1..N, N the split's number of classes (10 for digits, 62
for byclass): a larger value is an error rather than silently fewer lines.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from emnist_hpo.config import resolve_tracking_uri
from emnist_hpo.data.nist import check_split, load_classes
from emnist_hpo.errors import ConfigError
from emnist_hpo.data.images import ImageError, prepare_file


@dataclass
class Prediction:
    image: str  # the path as given
    top: list[tuple[str, float]] = field(default_factory=list)  # (character, probability), most likely first
    error: str | None = None  # why the image could not be classified
    model: str | None = None  # the registered version that answered ("emnist-letters v3")

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        out = {"image": self.image, "top": [{"char": c, "prob": round(p, 6)} for c, p in self.top]}
        if self.model:
            out["model"] = self.model
        return out


def predict_images(paths: Sequence[str], split: str, tracking_uri: str | None = None, top: int = 3,
                   model=None) -> list[Prediction]:
    """Top-``top`` characters for every image in ``paths`` by the split's champion (or ``model``)."""
    split = check_split(split)
    check_top(top, split)
    if model is None:
        from emnist_hpo.tracking.registry import load_champion  # MLflow and Keras: only once the arguments are known to be good

        with warnings.catch_warnings():  # MLflow's type-hint advice about the pyfunc (its input is checked there)
            warnings.filterwarnings("ignore", message=".*type hints.*")
            model = load_champion(resolve_tracking_uri(tracking_uri), split)
    answered_by = f"{model.name} v{model.version}" if getattr(model, "version", None) else None
    results = [Prediction(str(p), model=answered_by) for p in paths]
    ok, images = [], []
    for i, path in enumerate(paths):
        try:
            images.append(prepare_file(path).image)
            ok.append(i)
        except ImageError as exc:
            results[i].error = str(exc)
        except Exception as exc:  # noqa: BLE001 - one odd file must not cost the others their answers
            results[i].error = f"{path}: the image cannot be converted ({type(exc).__name__}: " \
                               f"{' '.join(str(exc).split())[:160]})"
    if images:
        proba = model.predict(np.stack(images))
        classes = [str(c) for c in proba.columns]
        values = np.asarray(proba, dtype=np.float64)
        for row, i in zip(values, ok):
            best = np.argsort(-row, kind="stable")[:top]
            results[i].top = [(classes[j], float(row[j])) for j in best]
    return results


def check_top(top: int, split: str) -> int:
    """``top`` if it is in 1..N (N: the split's classes); else :class:`ConfigError` naming it and the range."""
    n = len(load_classes(split))
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= n:
        raise ConfigError(f"--top must be in 1..{n}, the number of classes of split {split!r} (top={top!r})")
    return top


def format_text(results: Sequence[Prediction]) -> list[str]:
    """One line per classified image: ``path: A/a 0.912  H/h 0.041  N/n 0.013``."""
    return [f"{r.image}: " + "  ".join(f"{c} {p:.3f}" for c, p in r.top) for r in results if r.error is None]


def format_json(results: Sequence[Prediction]) -> str:
    return json.dumps([r.to_dict() for r in results], indent=1, ensure_ascii=False)
