"""The trial trainer's speed settings (precision, XLA, steps per execution) on real EMNIST images.

Speed itself is measured in benchmarks/ (bench_throughput.py), never here: these tests check
that every setting trains to the same accuracy range, that ``precision: auto`` picks bf16
only where the CPU has bf16 units and falls back to float32 cleanly, and that the trainer
feeds batches from the uint8 arrays without touching Keras' global state.
"""

from __future__ import annotations

import copy
import math
import os

import keras
import numpy as np
import pytest

from emnist_hpo.train import trainer as training
from emnist_hpo.config import ConvBlock, DataConfig, ExperimentConfig, ModelConfig, TrainConfig, from_dict
from emnist_hpo.data.prepared import Rows, prepare
from emnist_hpo.errors import ConfigError
from emnist_hpo.train.trainer import ArrayBatches, predict_proba, resolve_precision, rung_score, train


@pytest.fixture(scope="module")
def digits(prepared_sample):
    """3,000 real digits (2,400 train / 600 validation)."""
    return prepared_sample("digits", 3000)


def _cfg(**train) -> ExperimentConfig:
    model = ModelConfig(conv_blocks=[ConvBlock(16, 3)], padding="same", dense=[64])
    return ExperimentConfig(model=model, train=TrainConfig(**{"epochs": 2, "batch_size": 64, **train})).validate()


@pytest.fixture(scope="module")
def float32_run(digits):
    return train(_cfg(precision="float32"), digits.x_train, digits.y_train, digits.x_val, digits.y_val,
                 digits.num_classes)


def test_float32_trainer_learns_digits(float32_run):
    assert float32_run.precision == "float32"
    assert float32_run.best_val_accuracy > 0.8, float32_run.history  # 10 classes: chance is 0.1
    assert float32_run.epochs_run == 2 and float32_run.stopped_reason is None


def test_a_run_is_scored_by_the_model_it_ends_with_not_its_best_epoch(float32_run):
    """What a trial is ranked by (``val_score``, the last rung's score) is its last epoch's validation accuracy:
    the final fit delivers the whole schedule's last epoch, and a best-epoch score reads high for a run whose
    validation swings. Early stopping restores the best epoch's weights: then the best."""
    assert rung_score([0.90, 0.94, 0.92], final=True, restores_best=False) == 0.92
    assert rung_score([0.90, 0.94, 0.92], final=True, restores_best=True) == 0.94
    assert rung_score([0.90, 0.94, 0.92], final=False, restores_best=True) == 0.92  # a screening rung: at its end
    assert math.isnan(rung_score([], final=True, restores_best=False))
    assert float32_run.val_score == float32_run.history["val_accuracy"][-1] == float32_run.rungs[-1].score
    assert float32_run.best_val_accuracy == max(float32_run.history["val_accuracy"])  # still logged


@pytest.mark.parametrize("option", [
    {"precision": "mixed_bfloat16"},
    {"steps_per_execution": 4},
    {"precision": "mixed_bfloat16", "steps_per_execution": 4},
    {},  # the defaults
], ids=["bf16", "steps_per_execution", "bf16+steps", "defaults"])
def test_speed_options_train_to_the_same_accuracy(digits, float32_run, option):
    r = train(_cfg(**option), digits.x_train, digits.y_train, digits.x_val, digits.y_val, digits.num_classes)
    assert r.epochs_run == 2 and r.stopped_reason is None
    assert abs(r.best_val_accuracy - float32_run.best_val_accuracy) < 0.04, (option, r.history)
    # the model it returns predicts probabilities in float32, whatever it computed in
    proba = predict_proba(r.model, digits.x_val)
    assert proba.dtype == np.float32 and np.allclose(proba.sum(axis=1), 1.0, atol=1e-3)
    assert abs(float((proba.argmax(1) == digits.y_val).mean()) - r.history["val_accuracy"][-1]) < 0.01


def test_mixed_bfloat16_computes_in_bf16_and_leaves_the_global_policy_alone(digits):
    before = keras.config.dtype_policy().name
    r = train(_cfg(precision="mixed_bfloat16", epochs=1), digits.x_train[:256], digits.y_train[:256],
              digits.x_val, digits.y_val, digits.num_classes)
    assert keras.config.dtype_policy().name == before == "float32"
    conv = r.model.get_layer("conv_0_0")
    assert conv.compute_dtype == "bfloat16" and conv.variable_dtype == "float32"  # float32 master weights
    assert r.model.get_layer("probs").compute_dtype == "float32"  # softmax and loss stay float32
    assert keras.layers.Dense(2).compute_dtype == "float32"  # layers built afterwards are float32 again


def test_auto_precision_follows_the_cpu(monkeypatch):
    training.native_bf16.cache_clear()
    try:
        has_units = bool(training.cpu_flags() & set(training.BF16_CPU_FLAGS))
        expected = "mixed_bfloat16" if has_units and training.onednn_enabled() else "float32"
        assert resolve_precision("auto") == expected
        assert resolve_precision("float32") == "float32" and resolve_precision("mixed_bfloat16") == "mixed_bfloat16"
    finally:
        training.native_bf16.cache_clear()


def test_auto_precision_falls_back_to_float32_without_bf16_units(digits, monkeypatch):
    monkeypatch.setattr(training, "cpu_flags", lambda: {"avx2", "fma"})
    training.native_bf16.cache_clear()
    try:
        assert resolve_precision("auto") == "float32"
        r = train(_cfg(precision="auto", epochs=1), digits.x_train, digits.y_train, digits.x_val, digits.y_val,
                  digits.num_classes)
        assert r.precision == "float32"
        assert {layer.compute_dtype for layer in r.model.layers if layer.weights} == {"float32"}
        assert r.best_val_accuracy > 0.5
    finally:
        training.native_bf16.cache_clear()


def test_onednn_off_means_no_auto_bf16(monkeypatch):
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    training.native_bf16.cache_clear()
    try:
        assert resolve_precision("auto") == "float32"
    finally:
        training.native_bf16.cache_clear()


def test_speed_settings_are_validated_config_fields():
    cfg = from_dict(ExperimentConfig, {"train": {"precision": "mixed_bfloat16", "jit_compile": False,
                                                 "steps_per_execution": 8}})
    assert cfg.validate().train.steps_per_execution == 8 and cfg.train.jit_compile is False
    assert TrainConfig().jit_compile is None  # Keras' "auto": XLA stays off for TensorFlow on CPU
    with pytest.raises(ConfigError, match=r"train.precision must be one of auto, float32, mixed_bfloat16 "
                                          r"\(precision='float16'\)"):
        from_dict(ExperimentConfig, {"train": {"precision": "float16"}}).validate()
    with pytest.raises(ConfigError, match=r"train.steps_per_execution must be >= 1 \(steps_per_execution=0\)"):
        from_dict(ExperimentConfig, {"train": {"steps_per_execution": 0}}).validate()
    with pytest.raises(ConfigError, match="train.jit_compile must be true or false"):
        from_dict(ExperimentConfig, {"train": {"jit_compile": "yes"}})


def test_a_diverging_run_is_stopped_and_reported_as_nan(digits):
    cfg = _cfg(precision="float32", optimizer="sgd", learning_rate=1e9, epochs=3)
    r = train(cfg, digits.x_train, digits.y_train, digits.x_val, digits.y_val, digits.num_classes)
    assert r.stopped_reason == "nan"
    assert r.epochs_run == 1  # the NaN guard looks once per epoch and stops after the first bad one


def test_batches_cover_every_row_once_per_epoch_reshuffled_with_the_seed():
    x = (np.arange(1000) % 251).astype(np.uint8).reshape(-1, 1, 1)
    y = np.arange(1000, dtype=np.int32)
    b = ArrayBatches(x, y, batch_size=96, shuffle=True, seed=5)
    assert len(b) == 11
    first = np.concatenate([b[i][1] for i in range(len(b))])
    assert sorted(first.tolist()) == list(range(1000))  # each row exactly once, last batch partial
    assert first.tolist() != list(range(1000))  # shuffled
    b.on_epoch_end()
    second = np.concatenate([b[i][1] for i in range(len(b))])
    assert sorted(second.tolist()) == list(range(1000)) and second.tolist() != first.tolist()
    again = ArrayBatches(x, y, batch_size=96, shuffle=True, seed=5)
    assert np.concatenate([again[i][1] for i in range(len(again))]).tolist() == first.tolist()  # seeded
    plain = ArrayBatches(x, None, batch_size=300)
    assert np.array_equal(np.concatenate([plain[i] for i in range(len(plain))]), x)  # in order, images only


def test_trainer_accepts_rows_of_a_pool_without_copying_it(digits):
    x, y = digits.train_and_val()
    assert np.shares_memory(x, digits.x_train) and np.shares_memory(x, digits.x_val)  # a view, not a concatenation
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    tr, va = np.sort(order[:2000]), np.sort(order[2000:])
    rows = Rows(x, tr)
    assert len(rows) == 2000 and rows.shape == (2000, 28, 28) and rows.dtype == np.uint8
    assert np.array_equal(rows[5:9], x[tr[5:9]]) and np.array_equal(np.asarray(rows), x[tr])
    r = train(_cfg(epochs=1), rows, y[tr], Rows(x, va), y[va], digits.num_classes)
    assert r.best_val_accuracy > 0.5
    assert np.array_equal(predict_proba(r.model, Rows(x, va)), predict_proba(r.model, x[va]))


@pytest.mark.slow
def test_a_trained_model_does_not_keep_its_training_images_alive(digits):
    """Keras' data adapters outlive a fit; the images must not (the final phase of a full-bymerge study
    frees 0.55 GB of training images before it reads the test set)."""
    import gc
    import weakref

    x, y = digits.x_train.copy(), digits.y_train.copy()
    xv, yv = digits.x_val.copy(), digits.y_val.copy()
    refs = [weakref.ref(a) for a in (x, xv)]
    r = train(_cfg(epochs=1), x, y, xv, yv, digits.num_classes)
    predict_proba(r.model, xv)
    del x, xv
    gc.collect()
    assert [ref() is None for ref in refs] == [True, True]
    assert predict_proba(r.model, digits.x_val[:10]).shape == (10, digits.num_classes)  # the model still works


def test_a_model_is_collected_when_the_next_one_starts_and_the_heap_before_is_frozen(digits):
    """A study trains hundreds of models in one process: each is freed when the next starts (its graph holds
    reference cycles, so only a collection frees it). The first release freezes the heap it found (the imported
    modules) out of every later collection's scan, never a model."""
    import gc
    import weakref

    r = train(_cfg(epochs=1), digits.x_train[:256], digits.y_train[:256], None, None, digits.num_classes)
    model = weakref.ref(r.model)
    del r
    assert model() is not None  # a cycle: not freed by its last reference
    train(_cfg(epochs=1), digits.x_train[:256], digits.y_train[:256], None, None, digits.num_classes)
    assert model() is None
    assert gc.get_freeze_count() > 0


def test_prepared_data_releases_training_images_and_keeps_its_fingerprint(digits):
    import copy as _copy

    d = _copy.copy(digits)
    before = d.fingerprint(), d.test_fingerprint()
    d.release_training_images()
    assert len(d.x_train) == len(d.x_val) == 0 and len(d.y_train) == len(digits.y_train)
    assert (d.fingerprint(), d.test_fingerprint()) == before


def test_a_config_is_not_changed_by_training(digits):
    cfg = _cfg(epochs=1)
    before = copy.deepcopy(cfg)
    train(cfg, digits.x_train[:200], digits.y_train[:200], None, None, digits.num_classes)
    assert cfg == before  # "auto" is resolved for the run (TrainResult.precision), not written back


def test_prepare_splits_in_place_with_the_same_sets_as_train_val_split(sample_dir, tmp_path, monkeypatch):
    from emnist_hpo.data.nist import load_split, train_val_split

    monkeypatch.setenv("EMNIST_HPO_CACHE", str(tmp_path))
    d = prepare("balanced", str(sample_dir), DataConfig(val_fraction=0.2, seed=3), progress=False)
    raw = load_split("balanced", str(sample_dir), progress=False)
    _, _, x_val, y_val = train_val_split(raw.x_train, raw.y_train, 0.2, seed=3)

    def rows(x, y):
        return sorted(zip(map(bytes, x.reshape(len(x), -1)), y.tolist()))

    assert len(d.x_val) == len(x_val) and rows(d.x_val, d.y_val) == rows(x_val, y_val)
    assert rows(np.concatenate([d.x_train, d.x_val]), np.concatenate([d.y_train, d.y_val])) == rows(raw.x_train,
                                                                                                      raw.y_train)
    x, y = d.train_and_val()  # one buffer: the final fit's pool costs no memory
    assert np.shares_memory(x, d.x_train) and np.shares_memory(y, d.y_val) and len(x) == len(raw.x_train)


def _onednn_in_fresh_process(env_value: str | None) -> str:
    """Start Python, import emnist_hpo then TensorFlow (as the CLI does) and say whether oneDNN kernels run."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    if env_value is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = env_value
    code = ("import emnist_hpo, os; from emnist_hpo.train.trainer import onednn_enabled; "
            "print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'), onednn_enabled())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()[-2:]


@pytest.mark.slow
def test_onednn_kernels_are_on_for_x86_unless_the_user_says_no():
    import platform

    if keras.backend.backend() != "tensorflow":  # oneDNN is TensorFlow's: other backends never report it
        assert training.onednn_enabled() is False
        return
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    env, on = _onednn_in_fresh_process(None)
    if x86:  # TensorFlow alone turns them on only on AVX512-VNNI-or-newer CPUs; emnist_hpo on every x86-64 one
        assert (env, on) == ("1", "True")
    assert _onednn_in_fresh_process("0") == ["0", "False"]  # the user's choice stands


def test_augmented_models_compile_on_jax_and_keep_keras_choice_elsewhere(monkeypatch):
    """One random-transform layer marked ``supports_jit = False`` makes Keras train the whole model eagerly: on
    JAX an augmented model then trained at ~70 images/s on an H200. Under JAX they are marked compilable; under
    TensorFlow (a graph anyway) Keras' own choice stays."""
    from emnist_hpo.config import AugmentConfig
    from emnist_hpo.model.build import build_model

    cfg = ModelConfig(conv_blocks=[ConvBlock(8, 3)], dense=[16], augment=AugmentConfig(rotation=9, shift=0.1, zoom=0.1))
    augment = lambda model: [layer for layer in model.layers if layer.name.startswith("aug_")]  # noqa: E731

    on_tf = build_model(cfg, 10)
    assert [layer.name for layer in augment(on_tf)] == ["aug_rotate", "aug_shift", "aug_zoom"]
    assert not any(layer.supports_jit for layer in augment(on_tf))

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    on_jax = build_model(cfg, 10)
    assert all(layer.supports_jit for layer in on_jax.layers)
