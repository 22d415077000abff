"""``python -m emnist_hpo export``: a small deployable TFLite model from a split's registered champion.

The champion's Keras file (the pyfunc's ``keras_model`` artifact) is downloaded
from the registry (:func:`emnist_hpo.tracking.registry.fetch_version`: the version is
checked to be this package's own kind of model, and no code stored in the
registry runs), loaded in safe mode, given a float32 input of raw pixel values 0..255 (the
Rescaling layer stays inside the model) and converted:

- ``float``: a float32 TFLite model;
- ``int8`` (``--int8``): full-integer quantisation, calibrated on a seeded
  sample of the split's training images; input uint8 raw pixels (scale 1,
  zero point 0: feed the 28x28 image as it is), output uint8 probabilities.

Every file is evaluated with the TFLite interpreter on the split's whole test
set and reported beside the Keras model's size and accuracy. TFLite conversion
needs TensorFlow: on another Keras backend the command stops with an error.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from emnist_hpo.data.nist import check_split, load_split
from emnist_hpo.errors import ConfigError, RegistryError
from emnist_hpo.tracking.registry import model_name

FORMATS = ("tflite",)
#: Training images that calibrate the int8 quantisation.
REPRESENTATIVE = 500
#: Images per interpreter call when evaluating.
BATCH = 256


@dataclass
class Exported:
    kind: str  # "keras" | "tflite-float32" | "tflite-int8"
    path: str  # the file
    bytes: int  # its size
    accuracy: float  # top-1 accuracy on the split's test set


@dataclass
class ExportResult:
    split: str
    version: str  # the champion's registered version
    rows: list[Exported]
    test_size: int


def _require_tensorflow():
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ConfigError(
            f"export --format tflite needs the TensorFlow backend; Keras runs on {keras.backend.backend()!r} "
            "(run it with KERAS_BACKEND=tensorflow)"
        )
    try:
        import tensorflow as tf
    except ImportError as exc:  # pragma: no cover - tensorflow is a dependency
        raise ConfigError(f"export --format tflite needs TensorFlow, which cannot be imported ({exc})") from None
    return tf


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[list[str]]:
    """Capture fd 2 (the converter's C++ chatter); the captured lines are kept for an error message."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())


def download_champion(tracking_uri: str, split: str, dst: Path):
    """Download the champion version's Keras file and classes (checked, see
    :func:`emnist_hpo.tracking.registry.fetch_version`); return (version, Keras file path, classes)."""
    from emnist_hpo.tracking.registry import champion_client, champion_version_number, fetch_version, guarded_mlflow

    client = champion_client(tracking_uri, split)
    version = champion_version_number(client, tracking_uri, split)
    with guarded_mlflow():
        fetched = fetch_version(client, tracking_uri, model_name(split), version, dst)
    return fetched.version, fetched.keras_path, fetched.classes


def _float32_policies(config):
    """``config`` with every layer's dtype policy made float32 (a mixed_bfloat16 model computes in float32)."""
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy" or config.get("class_name") == "DTypePolicyMap":
            return "float32"
        return {k: _float32_policies(v) for k, v in config.items()}
    if isinstance(config, list):
        return [_float32_policies(v) for v in config]
    return config


def float_input(model):
    """The same network and weights, computing in float32, with a float32 input of raw pixels 0..255.

    TFLite has no bfloat16 kernels, and a uint8 -> float cast at the input would not quantise.
    """
    import keras

    config = _float32_policies(model.get_config())
    plain = keras.Model.from_config(config)
    plain.set_weights(model.get_weights())
    inp = keras.Input(plain.input_shape[1:], dtype="float32", name="image")
    h = inp
    for layer in plain.layers[1:]:
        h = layer(h)
    return keras.Model(inp, h, name=f"{model.name}_float_input")


def convert(tf, model, int8: bool, representative: np.ndarray | None = None) -> bytes:
    """TFLite bytes of ``model`` (float input): float32, or full-integer int8 with uint8 input/output."""
    with tempfile.TemporaryDirectory() as tmp, _quiet_stderr() as chatter:
        try:
            model.export(tmp, format="tf_saved_model", verbose=False)
            converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
            if int8:
                def calibration():
                    for x in representative:
                        yield [x[None].astype(np.float32)]

                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.representative_dataset = calibration
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
                converter.inference_input_type = tf.uint8
                converter.inference_output_type = tf.uint8
            return converter.convert()
        except Exception as exc:  # noqa: BLE001
            tail = " | ".join(chatter[-3:])
            raise ConfigError(f"TFLite conversion failed: {' '.join(str(exc).split())[:300]} {tail}") from None


def _interpreter(tf, content: bytes):
    try:  # LiteRT, TensorFlow Lite's successor, when installed
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter(model_content=content)
    except ImportError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
            return tf.lite.Interpreter(model_content=content)


def tflite_predict(tf, content: bytes, x: np.ndarray, batch: int = BATCH) -> np.ndarray:
    """Class scores (N, C) of a TFLite model for uint8 images (N, 28, 28), quantising the input if needed."""
    it = _interpreter(tf, content)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    it.resize_tensor_input(inp["index"], [batch, *x.shape[1:]])
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    scale, zero = inp["quantization"]
    o_scale, o_zero = out["quantization"]
    scores = []
    for start in range(0, len(x), batch):
        xb = x[start:start + batch].astype(np.float32)
        n = len(xb)
        if n < batch:
            xb = np.concatenate([xb, np.zeros((batch - n, *x.shape[1:]), np.float32)])
        if inp["dtype"] != np.float32:
            info = np.iinfo(inp["dtype"])
            xb = np.clip(np.round(xb / scale + zero), info.min, info.max)
        it.set_tensor(inp["index"], xb.astype(inp["dtype"]))
        it.invoke()
        y = it.get_tensor(out["index"])[:n].astype(np.float32)
        if out["dtype"] != np.float32 and o_scale:
            y = (y - o_zero) * o_scale
        scores.append(y)
    return np.concatenate(scores) if scores else np.zeros((0, 0), np.float32)


def default_output(split: str, version: str) -> Path:
    return Path(f"emnist-{split}-v{version}.tflite")


def int8_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}-int8{path.suffix or '.tflite'}")


def export_tflite(split: str, *, int8: bool = False, output: str | None = None, tracking_uri: str | None = None,
                  data_dir: str | None = None, seed: int = 0, progress: bool = False,
                  log: Callable[[str], None] = print) -> ExportResult:
    """Write the champion as TFLite (float32, and int8 when asked); return sizes and test accuracies."""
    import keras

    from emnist_hpo.tracking.tracker import resolve_tracking_uri

    split = check_split(split)
    tf = _require_tensorflow()
    uri = resolve_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:  # the registry first: an unreachable server fails in seconds
        version, keras_path, classes = download_champion(uri, split, Path(tmp))
        keras_bytes = keras_path.stat().st_size
        try:
            model = keras.saving.load_model(keras_path, compile=False, safe_mode=True)
        except Exception as exc:  # noqa: BLE001 - a broken or unsafe Keras file
            raise RegistryError(f"{model_name(split)} v{version} does not load "
                                f"({' '.join(str(exc).split())[:200]})") from None
    data = load_split(split, data_dir, progress=progress)
    if classes is not None and len(classes) != data.num_classes:
        raise RegistryError(f"the champion has {len(classes)} classes; split {split!r} has {data.num_classes}")
    x, y = data.x_test, data.y_test
    keras_acc = float((np.asarray(model.predict(x, batch_size=1024, verbose=0)).argmax(1) == y).mean())
    served = float_input(model)
    probe = x[:256]
    if (served.predict(probe.astype(np.float32), verbose=0).argmax(1)
            != model.predict(probe, verbose=0).argmax(1)).mean() > 0.02:  # bfloat16 rounding aside
        raise ConfigError("cannot export: the champion is not a single chain of layers (its float-input copy "
                          "predicts differently)")
    out = Path(output) if output else default_output(split, version)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [Exported("keras", str(keras_path.name), keras_bytes, keras_acc)]
    jobs = [("tflite-float32", out, False)] + ([("tflite-int8", int8_path(out), True)] if int8 else [])
    rng = np.random.default_rng(seed)
    calibration = data.x_train[np.sort(rng.choice(len(data.x_train), min(REPRESENTATIVE, len(data.x_train)),
                                                  replace=False))]
    for kind, path, quantised in jobs:
        log(f"converting {model_name(split)} v{version} to {kind}...")
        content = convert(tf, served, quantised, calibration)
        path.write_bytes(content)
        with _quiet_stderr():  # "Created TensorFlow Lite XNNPACK delegate for CPU."
            acc = float((tflite_predict(tf, content, x).argmax(1) == y).mean())
        rows.append(Exported(kind, str(path), len(content), acc))
    return ExportResult(split, version, rows, len(y))


def summary_table(res: ExportResult) -> str:
    lines = [f"{model_name(res.split)} v{res.version} (champion): test accuracy on {res.test_size:,} images"]
    w = max(len(r.kind) for r in res.rows)
    base = res.rows[0].accuracy
    for r in res.rows:
        delta = "" if r.kind == "keras" else f"  ({(r.accuracy - base) * 100:+.2f} pts)"
        lines.append(f"  {r.kind:<{w}}  {r.bytes / 1024:>10,.1f} KiB  accuracy {r.accuracy:.4f}{delta}  {r.path}")
    return "\n".join(lines)
