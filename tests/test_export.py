"""``export --format tflite``: the champion as float32 and int8 TFLite files that load and score like it."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from emnist_hpo.cli import main
from emnist_hpo.data.nist import load_split
from emnist_hpo.tracking.registry import load_champion

def _interpreter(path: Path):
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        it = tf.lite.Interpreter(model_path=str(path))
    return it


def _scores(path: Path, x: np.ndarray) -> np.ndarray:
    """Run a .tflite file on uint8 images with the interpreter, one image per call (no batching code shared)."""
    it = _interpreter(path)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    rows = []
    for image in x:
        value = image[None].astype(inp["dtype"])  # float32 raw pixels, or uint8 with scale 1 / zero point 0
        it.set_tensor(inp["index"], value)
        it.invoke()
        rows.append(it.get_tensor(out["index"])[0].astype(np.float32))
    return np.stack(rows)


def _table(text: str) -> dict[str, tuple[float, float]]:
    """kind -> (KiB, accuracy) from the command's summary."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\s+(keras|tflite-float32|tflite-int8)\s+([\d,.]+) KiB\s+accuracy ([\d.]+)", line)
        if m:
            rows[m.group(1)] = (float(m.group(2).replace(",", "")), float(m.group(3)))
    return rows


@pytest.mark.slow
def test_export_float_and_int8_round_trip(digits_champion, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EMNIST_HPO_CACHE", digits_champion["cache"])
    out = tmp_path / "deploy" / "digits.tflite"
    rc = main(["export", "--split", "digits", "--format", "tflite", "--int8", "--output", str(out),
               "--tracking-uri", digits_champion["tracking"], "--data-dir", digits_champion["data"]])
    assert rc == 0
    table = _table(capsys.readouterr().out)
    assert set(table) == {"keras", "tflite-float32", "tflite-int8"}
    int8 = out.with_name("digits-int8.tflite")
    assert out.is_file() and int8.is_file()
    assert table["tflite-float32"][0] == pytest.approx(out.stat().st_size / 1024, abs=0.1)
    assert int8.stat().st_size < out.stat().st_size / 3  # 8-bit weights

    keras_acc = table["keras"][1]
    assert keras_acc == pytest.approx(digits_champion["result"].test_accuracy, abs=1e-4)  # the registered model
    assert abs(table["tflite-float32"][1] - keras_acc) <= 0.005  # float32 vs the champion's mixed bfloat16
    assert abs(table["tflite-int8"][1] - keras_acc) <= 0.02
    print(f"sizes KiB {({k: v[0] for k, v in table.items()})}, accuracies {({k: v[1] for k, v in table.items()})}")

    # the files themselves: the interpreter loads them; integer model in and out; same answers as the champion
    it = _interpreter(int8)
    it.allocate_tensors()
    inp, outp = it.get_input_details()[0], it.get_output_details()[0]
    assert inp["dtype"] == np.uint8 and tuple(inp["quantization"]) == (1.0, 0) and outp["dtype"] == np.uint8
    assert _interpreter(out).get_input_details()[0]["dtype"] == np.float32
    data = load_split("digits", digits_champion["data"], progress=False)
    x = data.x_test[:300]
    reference = np.asarray(load_champion(digits_champion["tracking"], "digits").predict(x))
    float_scores = _scores(out, x)
    assert np.abs(float_scores - reference).max() < 0.05 and (float_scores.argmax(1) == reference.argmax(1)).mean() >= 0.99
    assert (_scores(int8, x).argmax(1) == reference.argmax(1)).mean() >= 0.97


def test_default_output_name(digits_champion, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EMNIST_HPO_CACHE", digits_champion["cache"])
    monkeypatch.chdir(tmp_path)
    version = digits_champion["result"].registered.version
    assert main(["export", "--split", "digits", "--tracking-uri", digits_champion["tracking"],
                 "--data-dir", digits_champion["data"]]) == 0
    assert f"emnist-digits-v{version}.tflite" in capsys.readouterr().out
    assert (tmp_path / f"emnist-digits-v{version}.tflite").is_file()
    assert not list(tmp_path.glob("*-int8.tflite"))


def test_no_champion_is_one_clear_error(tmp_path, sample_dir, capsys):
    rc = main(["export", "--split", "letters", "--tracking-uri", f"sqlite:///{tmp_path}/empty.db",
               "--data-dir", str(sample_dir)])
    assert rc == 2
    assert "no champion model for split 'letters'" in capsys.readouterr().err


def test_other_backend_is_refused(digits_champion, tmp_path, capsys, monkeypatch):
    """On JAX or PyTorch (not installed here: Keras' backend query answers as it would there) export stops at once."""
    import keras

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    rc = main(["export", "--split", "digits", "--output", str(tmp_path / "m.tflite"),
               "--tracking-uri", digits_champion["tracking"], "--data-dir", digits_champion["data"]])
    assert rc == 2
    err = capsys.readouterr().err
    assert "needs the TensorFlow backend" in err and "'jax'" in err and "KERAS_BACKEND=tensorflow" in err
    assert not (tmp_path / "m.tflite").exists()
