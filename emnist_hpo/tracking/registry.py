"""The MLflow model registry: log a Keras model as a pyfunc, register it, move the ``champion`` alias.

The model is logged "from code" (:mod:`emnist_hpo.tracking.pyfunc_model`), never pickled.
``mlflow.pyfunc.load_model("models:/emnist-<split>@champion").predict(x)`` with
``x`` a uint8 array (N, 28, 28) of upright images (white ink on black, as in
EMNIST) returns a DataFrame of class probabilities, one column per class in the
mapping's order, named by character. That call executes the version's stored
Python file, as every pyfunc load does.

This package itself never runs code from the registry: anyone who can write to
the tracking store (an MLflow server without authentication, say) could
register a version whose code would run on the next load. Every loading path
here (``predict``, ``export``, the check before the alias moves) goes through
:func:`fetch_version`: it downloads only the version's ``MLmodel`` (YAML, read
safely), its code file (hashed, never imported: it must be byte-identical to
this package's ``pyfunc_model.py``) and its two data files, the Keras file
(loaded with ``safe_mode=True``: no Lambda layers, no classes from outside
Keras) and ``classes.json``. Anything else (another loader, a pickled model,
code paths, other or missing artifacts) is refused with :class:`RegistryError`.
Nothing is unpickled, and MLflow's own pickle loading is switched off
(``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``) while loading.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import logging
import os
import posixpath
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd

from emnist_hpo.coordination import pause_point, redact_secrets, saved_environ, sqlite_file
from emnist_hpo.errors import RegistryError
from emnist_hpo.tracking.tracker import Tracker, make_client, redact

CHAMPION_ALIAS = "champion"

#: The pyfunc code every version must carry byte for byte (MLflow runs it for ``mlflow.pyfunc.load_model``;
#: this package never does).
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
#: MLflow's loader of "models from code", the only loader a version may name.
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"
#: The pyfunc artifacts a version must have, exactly, at these paths inside the model folder.
ARTIFACTS = {"keras_model": "artifacts/model.keras", "classes": "artifacts/classes.json"}
#: The largest ``MLmodel`` and ``classes.json`` read (bytes).
MAX_METADATA_BYTES = 1024 * 1024
#: While loading: no pickles, and MLflow's HTTP client gives up on a dead server within seconds instead of
#: retrying for minutes (its defaults: 7 retries, 120 s timeout). Set only where the user has not set them.
_PICKLE_ENV = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


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

    from emnist_hpo.model.batch_norm import plain

    with tempfile.TemporaryDirectory() as tmp:
        keras_path = Path(tmp) / "model.keras"
        plain(model).save(keras_path)  # Keras' own layers only: it loads where this package is not installed
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
    promote = beats_champion(test_accuracy, current.tags.get("test_accuracy") if current else None)
    if promote:
        _verify_version(tracker, name, str(mv.version), len(classes))  # the alias never points at a broken model
        client.set_registered_model_alias(name, CHAMPION_ALIAS, mv.version)
    return Registered(name, str(mv.version), promote, current.version if current else None, info.model_uri)


def beats_champion(test_accuracy: float, champion_test_accuracy: str | float | None) -> bool:
    """Whether a new version takes the ``champion`` alias: there is none yet, or it tests strictly better.

    A champion whose recorded test accuracy is missing or unreadable is replaced (it cannot be compared).
    """
    if champion_test_accuracy is None:
        return True
    try:
        current = float(champion_test_accuracy)
    except (TypeError, ValueError):
        return True
    return not math.isfinite(current) or test_accuracy > current


def _describe(tracker: Tracker, name: str, version: str, split: str, tags: Mapping[str, Any],
              test_accuracy: float) -> None:
    """Descriptions the registry UI shows: the model's (what it is, its input, how to load it), unless someone
    wrote another, and the version's (study, trial, scores). A description never fails a registration."""
    from emnist_hpo.model.describe import model_version_description, registered_model_description

    try:
        if not (tracker.client.get_registered_model(name).description or "").strip():
            tracker.client.update_registered_model(name, description=registered_model_description(split))
        tracker.client.update_model_version(name, version,
                                            description=model_version_description(tags, test_accuracy))
    except Exception as exc:  # noqa: BLE001
        logging.getLogger(__name__).debug("descriptions of %s v%s not set: %s", name, version, exc)


def _verify_version(tracker: Tracker, name: str, version: str, num_classes: int) -> None:
    """Raise :class:`RegistryError` unless version ``version`` of ``name`` is READY, is this package's own
    kind of model (:func:`fetch_version`), loads and predicts ``num_classes`` probabilities."""
    try:
        model = load_version(tracker.client, tracker.tracking_uri, name, version)
    except RegistryError as exc:
        raise RegistryError(f"{exc}: champion alias not moved") from None
    if len(model.classes) != num_classes:
        raise RegistryError(f"model version {name} v{version} has {len(model.classes)} classes, not {num_classes}: "
                            "champion alias not moved")


def champion_version(tracker: Tracker, split: str):
    """The model version holding the ``champion`` alias, or None."""
    try:
        return tracker.client.get_model_version_by_alias(model_name(split), CHAMPION_ALIAS)
    except Exception:  # noqa: BLE001 - no such model or alias
        return None


# ------------------------------------------------------------------ loading without running registry code


def pyfunc_code_sha256() -> str:
    """sha256 of this package's ``pyfunc_model.py``: the only pyfunc code a loadable version may carry."""
    return hashlib.sha256(PYFUNC_CODE.read_bytes()).hexdigest()


@contextlib.contextmanager
def guarded_mlflow():
    """For a block: MLflow may not unpickle, and its HTTP retries and timeouts are bounded (unless the user set them)."""
    with saved_environ(_PICKLE_ENV, *HTTP_BOUNDS):
        os.environ[_PICKLE_ENV] = "false"
        for key, value in HTTP_BOUNDS.items():
            os.environ.setdefault(key, value)
        yield


@dataclass
class FetchedVersion:
    name: str
    version: str
    keras_path: Path  # the downloaded Keras file (a .keras zip)
    classes: list[str]  # class names, in the model's output order


def fetch_version(client, tracking_uri: str, name: str, version: str, dst: Path) -> FetchedVersion:
    """Download version ``version`` of ``name``'s data files into ``dst`` after checking what it is.

    Downloads ``MLmodel``, the pyfunc code file and the two artifacts, nothing else; runs, imports and
    unpickles nothing. Raises :class:`RegistryError` (one line) for a version that is not READY, whose
    ``MLmodel`` names another loader, a pickled model, code paths, another code file or other artifacts,
    whose code differs from this package's ``pyfunc_model.py``, or whose files are missing or malformed.
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    label = f"model version {name} v{version}"

    def refuse(why: str) -> RegistryError:
        return RegistryError(f"{label} is refused: {why}; emnist_hpo loads only models logged by its own code and "
                             "never runs code from the registry (register a new one with `python -m emnist_hpo "
                             "study`)")

    try:
        mv = client.get_model_version(name, version)
        uri = client.get_model_version_download_uri(name, version)
        repo = get_artifact_repository(uri, tracking_uri=tracking_uri, registry_uri=tracking_uri)
    except Exception as exc:  # noqa: BLE001
        raise RegistryError(f"{label} cannot be read from {redact(tracking_uri)!r} "
                            f"({redact_secrets(' '.join(str(exc).split()))[:200]})") from None
    if mv.status != "READY":
        raise RegistryError(f"{label} is {mv.status}, not READY")

    def get(path: str, limit: int | None = None) -> Path:
        try:
            local = Path(repo.download_artifacts(path, dst_path=str(dst)))
        except Exception as exc:  # noqa: BLE001
            raise refuse(f"its file {path!r} is missing or unreadable "
                         f"({redact_secrets(' '.join(str(exc).split()))[:160]})") from None
        if not local.is_file():
            raise refuse(f"{path!r} is not a file")
        if limit is not None and local.stat().st_size > limit:
            raise refuse(f"{path!r} has {local.stat().st_size:,} bytes (at most {limit:,} expected)")
        return local

    import yaml

    try:
        meta = yaml.safe_load(get("MLmodel", MAX_METADATA_BYTES).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise refuse(f"its MLmodel is not valid YAML ({' '.join(str(exc).split())[:120]})") from None
    flavors = meta.get("flavors") if isinstance(meta, dict) else None
    if not isinstance(flavors, dict) or set(flavors) != {"python_function"} \
            or not isinstance(flavors["python_function"], dict):
        found = sorted(flavors) if isinstance(flavors, dict) else flavors
        raise refuse(f"its MLmodel flavors are {found!r}, not ['python_function']")
    conf = flavors["python_function"]
    if conf.get("loader_module") != CODE_LOADER or "python_model" in conf:
        raise refuse(f"it is not a model from code (loader {conf.get('loader_module')!r}"
                     f"{', a pickled python_model' if 'python_model' in conf else ''}; expected {CODE_LOADER!r})")
    if conf.get("code"):
        raise refuse(f"it adds code paths to the import path ({conf.get('code')!r})")
    code_name = posixpath.basename(str(conf.get("model_code_path") or "").replace("\\", "/"))
    if code_name != PYFUNC_CODE.name:
        raise refuse(f"its code file is {code_name!r}, not {PYFUNC_CODE.name!r}")
    artifacts = conf.get("artifacts")
    paths = {k: v.get("path") if isinstance(v, dict) else v for k, v in artifacts.items()} \
        if isinstance(artifacts, dict) else artifacts
    if paths != ARTIFACTS:
        raise refuse(f"its artifacts are {paths!r}, expected {ARTIFACTS!r}")
    digest = hashlib.sha256(get(code_name, MAX_METADATA_BYTES).read_bytes()).hexdigest()
    if digest != pyfunc_code_sha256():
        raise refuse(f"its {code_name} (sha256 {digest[:12]}...) is not this package's own "
                     f"(sha256 {pyfunc_code_sha256()[:12]}...)")
    keras_path = get(ARTIFACTS["keras_model"])
    if not zipfile.is_zipfile(keras_path):
        raise refuse(f"{ARTIFACTS['keras_model']!r} is not a .keras zip file")
    try:
        classes = json.loads(get(ARTIFACTS["classes"], MAX_METADATA_BYTES).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        classes = None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise refuse(f"{ARTIFACTS['classes']!r} is not a JSON list of class names")
    return FetchedVersion(name, str(version), keras_path, classes)


@dataclass
class LoadedModel:
    """A registered version's Keras model and classes, with the pyfunc's ``predict`` contract."""

    name: str
    version: str
    model: Any  # keras.Model
    classes: list[str]

    def predict(self, model_input) -> pd.DataFrame:
        """Class probabilities (a DataFrame, one column per class) of uint8 images (N, 28, 28) or (N, 784).

        The same contract as the registered pyfunc's (pyfunc_model.py, which must stay self-contained: MLflow
        runs it where emnist_hpo may not be installed, and its bytes are checked against the package's own).
        """
        x = model_input.to_numpy() if isinstance(model_input, pd.DataFrame) else np.asarray(model_input)
        if x.ndim == 2 and x.shape[1] == 784:
            x = x.reshape(-1, 28, 28)
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise ValueError(f"input must be images of shape (N, 28, 28) or (N, 784), got shape {x.shape}")
        if x.dtype != np.uint8:
            if x.size and not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 255):
                raise ValueError("pixel values must be finite and in 0..255")
            x = x.astype(np.uint8)
        proba = self.model.predict(x, batch_size=1024, verbose=0)
        return pd.DataFrame(np.asarray(proba, dtype=np.float64), columns=self.classes)


def load_version(client, tracking_uri: str, name: str, version: str) -> LoadedModel:
    """:func:`fetch_version`, then the Keras file in safe mode; checked to predict one probability per class."""
    import keras

    label = f"model version {name} v{version}"
    tf_log = logging.getLogger("tensorflow")
    level = tf_log.level
    with guarded_mlflow(), tempfile.TemporaryDirectory(prefix="emnist-hpo-model-") as tmp:
        fetched = fetch_version(client, tracking_uri, name, version, Path(tmp))
        try:
            tf_log.setLevel(logging.ERROR)  # tf.function retracing notes: this check is meant to be extra
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                model = keras.saving.load_model(fetched.keras_path, compile=False, safe_mode=True)
                loaded = LoadedModel(name, str(version), model, fetched.classes)
                proba = loaded.predict(np.zeros((2, 28, 28), dtype=np.uint8)).to_numpy()
        except Exception as exc:  # noqa: BLE001 - a broken or unsafe Keras file
            raise RegistryError(f"{label} does not load ({' '.join(str(exc).split())[:200]})") from None
        finally:
            tf_log.setLevel(level)
    if proba.shape != (2, len(fetched.classes)) or not np.isfinite(proba).all():
        raise RegistryError(f"{label} predicts shape {proba.shape}, not (2, {len(fetched.classes)}) finite "
                            "probabilities")
    return loaded


def champion_client(tracking_uri: str, split: str):
    """An MLflow client on an existing store (never creating one), failing fast on an unreachable server."""
    db = sqlite_file(tracking_uri)
    if db is not None and not db.is_file():
        raise RegistryError(f"no champion model for split {split!r}: the tracking store {tracking_uri!r} does not "
                            f"exist (run `python -m emnist_hpo study --split {split}` first, or pass --tracking-uri)")
    with guarded_mlflow():
        return make_client(tracking_uri)


def champion_version_number(client, tracking_uri: str, split: str) -> str:
    """The version of ``emnist-<split>`` holding the champion alias; :class:`RegistryError` if there is none."""
    name = model_name(split)
    try:
        with guarded_mlflow():
            return str(client.get_model_version_by_alias(name, CHAMPION_ALIAS).version)
    except Exception as exc:  # noqa: BLE001 - no such model or alias
        raise RegistryError(
            f"no champion model for split {split!r} in {redact(tracking_uri)!r} (models:/{name}@{CHAMPION_ALIAS}): "
            f"run `python -m emnist_hpo study --split {split}` first "
            f"({redact_secrets(' '.join(str(exc).split()))[:200]})"
        ) from None


def load_champion(tracking_uri: str, split: str) -> LoadedModel:
    """The champion of ``split`` (``models:/emnist-<split>@champion``), loaded without running registry code."""
    client = champion_client(tracking_uri, split)
    version = champion_version_number(client, tracking_uri, split)
    return load_version(client, tracking_uri, model_name(split), version)
