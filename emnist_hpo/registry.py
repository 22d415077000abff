"""The MLflow model registry: log a Keras model as a pyfunc, register it, move the ``champion`` alias.

The model is logged "from code" (:mod:`emnist_hpo.pyfunc_model`), never pickled.
``mlflow.pyfunc.load_model("models:/emnist-<split>@champion").predict(x)`` with
``x`` a uint8 array (N, 28, 28) of upright images (white ink on black, as in
EMNIST) returns a DataFrame of class probabilities, one column per class in the
mapping's order, named by character.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd

from .coordination import pause_point, saved_environ
from .errors import RegistryError
from .tracking import Tracker

CHAMPION_ALIAS = "champion"


def model_name(split: str) -> str:
    return f"emnist-{split}"


def _requirements() -> list[str]:
    reqs = []
    for dist in ("keras", "mlflow", "numpy", "pandas"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    for tf in ("tensorflow-cpu", "tensorflow"):
        try:
            reqs.append(f"{tf}=={metadata.version(tf)}")
            break
        except metadata.PackageNotFoundError:
            continue
    return reqs


@dataclass
class Registered:
    name: str  # registered model name
    version: str  # its new version
    champion: bool  # whether the champion alias now points at it
    previous_champion: str | None  # the version that held the alias before, if any
    model_uri: str  # the logged model's URI


def log_and_register(
    tracker: Tracker,
    run_id: str,
    model,
    classes: Sequence[str],
    *,
    split: str,
    test_accuracy: float,
    tags: Mapping[str, Any],
    register: bool = True,
) -> Registered | None:
    """Log ``model`` as a pyfunc on ``run_id``; register it and promote it if it beats the champion."""
    with mlflow_uris(tracker.tracking_uri):
        return _log_and_register(tracker, run_id, model, classes, split=split, test_accuracy=test_accuracy,
                                 tags=tags, register=register)


@contextlib.contextmanager
def mlflow_uris(uri: str):
    """Point MLflow's fluent API at ``uri`` for a block, then restore it.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` to the environment, which
    would silently redirect every later store lookup and child process of this one.
    """
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    # the explicitly set URIs (None: resolved from the environment), not the resolved ones
    saved = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None))
    with saved_environ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved[0])
            mlflow.set_registry_uri(saved[1])


def _log_and_register(tracker, run_id, model, classes, *, split, test_accuracy, tags, register):
    from mlflow.models import infer_signature

    with tempfile.TemporaryDirectory() as tmp:
        keras_path = Path(tmp) / "model.keras"
        model.save(keras_path)
        classes_path = Path(tmp) / "classes.json"
        classes_path.write_text(json.dumps(list(classes)), encoding="utf-8")
        example = np.zeros((2, 28, 28), dtype=np.uint8)
        out = pd.DataFrame(np.full((2, len(classes)), 1.0 / len(classes)), columns=list(classes))
        signature = infer_signature(example, out)
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # input-example and type-hint nags: the signature is explicit
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                artifacts={"keras_model": str(keras_path), "classes": str(classes_path)},
                signature=signature,
                pip_requirements=_requirements(),
            )
    # Leaving the fluent block ended the run FINISHED; it is not finished until registered: should this process die
    # before the caller ends it, the next run finds it RUNNING and closes it FAILED.
    tracker.client.update_run(run_id, status="RUNNING")
    if not register:
        return None
    name = model_name(split)
    client = tracker.client
    mv = mlflow.register_model(info.model_uri, name, tags={k: str(v) for k, v in tags.items()})
    pause_point("register")  # test hook: a kill here leaves a version that no alias points at
    client.set_model_version_tag(name, mv.version, "test_accuracy", f"{test_accuracy:.6f}")
    _describe(tracker, name, str(mv.version), split, tags, test_accuracy)
    current = champion_version(tracker, split)
    promote = current is None or test_accuracy > float(current.tags.get("test_accuracy", "-1"))
    if promote:
        _verify_version(tracker, name, str(mv.version), len(classes))  # the alias never points at a broken model
        client.set_registered_model_alias(name, CHAMPION_ALIAS, mv.version)
    return Registered(name, str(mv.version), promote, current.version if current else None, info.model_uri)


def _describe(tracker: Tracker, name: str, version: str, split: str, tags: Mapping[str, Any],
              test_accuracy: float) -> None:
    """Descriptions the registry UI shows: the model's (what it is, its input, how to load it), unless someone
    wrote another, and the version's (study, trial, scores). A description never fails a registration."""
    from .describe import model_version_description, registered_model_description

    try:
        if not (tracker.client.get_registered_model(name).description or "").strip():
            tracker.client.update_registered_model(name, description=registered_model_description(split))
        tracker.client.update_model_version(name, version,
                                            description=model_version_description(tags, test_accuracy))
    except Exception as exc:  # noqa: BLE001
        logging.getLogger(__name__).debug("descriptions of %s v%s not set: %s", name, version, exc)


def _verify_version(tracker: Tracker, name: str, version: str, num_classes: int) -> None:
    """Raise :class:`RegistryError` unless version ``version`` of ``name`` is READY, loads and predicts."""
    mv = tracker.client.get_model_version(name, version)
    if mv.status != "READY":
        raise RegistryError(f"model version {name} v{version} is {mv.status}, not READY: champion alias not moved")
    tf_log = logging.getLogger("tensorflow")
    level = tf_log.level
    try:
        tf_log.setLevel(logging.ERROR)  # tf.function retracing notes: this load and predict are meant to be extra
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
            proba = np.asarray(model.predict(np.zeros((2, 28, 28), dtype=np.uint8)), dtype=np.float64)
    except Exception as exc:  # noqa: BLE001
        raise RegistryError(f"model version {name} v{version} does not load ({' '.join(str(exc).split())[:200]}): "
                            "champion alias not moved") from None
    finally:
        tf_log.setLevel(level)
    if proba.shape != (2, num_classes) or not np.isfinite(proba).all():
        raise RegistryError(f"model version {name} v{version} predicts shape {proba.shape}, not (2, {num_classes}): "
                            "champion alias not moved")


def champion_version(tracker: Tracker, split: str):
    """The model version holding the ``champion`` alias, or None."""
    try:
        return tracker.client.get_model_version_by_alias(model_name(split), CHAMPION_ALIAS)
    except Exception:  # noqa: BLE001 - no such model or alias
        return None


def load_champion(tracking_uri: str, split: str):
    """Load ``models:/emnist-<split>@champion`` as a pyfunc, with a clear error if there is none."""
    uri = f"models:/{model_name(split)}@{CHAMPION_ALIAS}"
    try:
        with mlflow_uris(tracking_uri):
            return mlflow.pyfunc.load_model(uri)
    except Exception as exc:  # noqa: BLE001
        raise RegistryError(
            f"no champion model for split {split!r} in {tracking_uri!r} ({uri}): run "
            f"`python -m emnist_hpo study --split {split}` first ({' '.join(str(exc).split())[:200]})"
        ) from None
