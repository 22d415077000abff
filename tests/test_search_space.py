"""Search-space and experiment YAML: validated on load, sampled architectures always fit 28x28."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from emnist_hpo.model.architecture import feature_sides
from emnist_hpo.config import ExperimentConfig, load_experiment
from emnist_hpo.errors import ConfigError
from emnist_hpo.model.build import build_model
from emnist_hpo.search.space import SearchSpace

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "search_spaces" / "default.yaml"


def _space(tmp_path: Path, text: str) -> SearchSpace:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return SearchSpace.load(p)


MINIMAL = """
conv_blocks: {low: 1, high: 2}
filters: {choices: [8, 16]}
kernel: {choices: [3]}
dense_layers: {low: 0, high: 1}
dense_units: {choices: [32]}
learning_rate: {low: 1.0e-3, high: 1.0e-2, log: true}
"""


@pytest.mark.parametrize(
    "edit, needle",
    [
        ("convblocks: {low: 1, high: 2}", "unknown key 'convblocks'; allowed:"),
        ("dropout_rate: 0.5", "unknown key 'dropout_rate'"),
        ("conv_dropout: {low: 0.4, high: 0.1}", "conv_dropout: low must be <= high (low=0.4, high=0.1)"),
        ("pool: {choices: []}", "pool.choices must be a non-empty list"),
        ("pool: {choices: [max, median]}", "pool.choices must be one of max, avg (pool='median')"),
        ("batch_size: {choices: [64, '128']}", "batch_size.choices must be of type int, got '128'"),
        ("label_smoothing: {low: 0, high: 0.2, log: true}", "low must be > 0 for a log range (low=0.0)"),
        ("kernel: {choices: [4]}", "kernel.choices must be an odd integer in 1..27 (kernel=4)"),
        ("conv_blocks: {low: 1, high: 5}", "conv_blocks must be <= 4 for kernel 3 with padding 'same'"),
        ("optimizer: {choices: [adam], step: 1}", "unknown key 'step' beside 'choices'"),
        ("augment: {low: 0.0}", "a range needs 'high'"),
    ],
)
def test_malformed_space_names_file_key_and_value(tmp_path, edit, needle):
    key = edit.split(":")[0]
    lines = [line for line in MINIMAL.strip().splitlines() if not line.startswith(key + ":")]
    with pytest.raises(ConfigError) as err:
        _space(tmp_path, "\n".join(lines + [edit]))
    assert needle in str(err.value) and "space.yaml" in str(err.value)


def test_valid_padding_limits_depth(tmp_path):
    with pytest.raises(ConfigError, match="conv_blocks must be <= 2 for kernel 5 with padding 'valid'"):
        _space(tmp_path, MINIMAL.replace("kernel: {choices: [3]}", "kernel: {choices: [3, 5]}")
               .replace("high: 2}", "high: 3}", 1) + "padding: {choices: [same, valid]}\n")


def test_default_space_only_samples_architectures_that_fit():
    space = SearchSpace.load(DEFAULT)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    depths = set()
    for _ in range(300):
        trial = study.ask()
        cfg = space.sample(trial, ExperimentConfig())
        sides = feature_sides([b.kernel for b in cfg.model.conv_blocks], [b.convs for b in cfg.model.conv_blocks],
                              cfg.model.padding)
        assert min(sides) >= 1
        depths.add(len(cfg.model.conv_blocks))
        if cfg.train.optimizer == "adam":
            assert "weight_decay" not in trial.params
        study.tell(trial, 0.0)
    assert depths == {1, 2, 3, 4}
    deepest = space.sample(optuna.trial.FixedTrial({
        "conv_blocks": 4, "convs_per_block": 2, **{f"filters_{i}": 16 for i in range(4)},
        **{f"kernel_{i}": 5 for i in range(4)}, "pool": "avg", "batch_norm": True, "global_pool": True,
        "conv_dropout": 0.1, "dense_layers": 0, "augment": 0.5, "batch_size": 64, "optimizer": "adamw", "learning_rate": 0.001,
        "schedule": "cosine", "weight_decay": 1e-4, "label_smoothing": 0.1}), ExperimentConfig())
    model = build_model(deepest.model, 47)
    assert model.output_shape == (None, 47)


def test_seed_experiment_maps_onto_the_space_exactly():
    space = SearchSpace.load(DEFAULT)
    seed = load_experiment(REPO / "experiments" / "two_conv.yaml")
    params = space.params_for(seed)
    assert params["conv_blocks"] == 2 and params["filters_0"] == params["filters_1"] == 64
    assert params["dense_units_0"] == 512 and params["dense_units_1"] == 128 and params["schedule"] == "plateau"
    cfg = space.sample(optuna.trial.FixedTrial(params), ExperimentConfig())
    assert [b.filters for b in cfg.model.conv_blocks] == [64, 64] and cfg.model.dense == [512, 128]


@pytest.mark.parametrize(
    "text, needle",
    [
        ("model:\n  conv_blocks: [{filters: 8, kernal: 3}]\n", "unknown key 'model.conv_blocks[0].kernal'"),
        ("train:\n  epochs: 0\n", "train.epochs must be >= 1 (epochs=0)"),
        ("train:\n  optimizer: rmsprop\n", "train.optimizer must be one of adam, adamw, sgd (optimizer='rmsprop')"),
        ("train:\n  batch_size: 12.5\n", "train.batch_size must be an integer, got 12.5"),
        ("model:\n  padding: valid\n  conv_blocks: [{filters: 8, kernel: 5}, {filters: 8, kernel: 5}, "
         "{filters: 8, kernel: 5}]\n", "does not fit a 28x28 image"),
        ("data: [1, 2]\n", "data must be a mapping"),
        ("model: {kind: transformer}\n", "model.kind must be one of cnn, lstm"),
        ("train: {epochs: 3\n", "not valid YAML"),
    ],
)
def test_malformed_experiment_names_file_key_and_value(tmp_path, text, needle):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_experiment(p)
    assert needle in str(err.value) and "exp.yaml" in str(err.value)


def test_experiment_overrides_only_what_differs(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("train:\n  batch_size: 512\n")
    cfg = load_experiment(p, overrides={"train": {"epochs": 2}})
    default = ExperimentConfig()
    assert cfg.train.batch_size == 512 and cfg.train.epochs == 2
    assert cfg.train.learning_rate == default.train.learning_rate and cfg.model == default.model
    assert cfg.name == "exp"


def test_augmentation_maps_to_a_strength_only_on_the_space_scale():
    from emnist_hpo.config import AugmentConfig
    from emnist_hpo.search.space import augment_strength

    assert augment_strength(AugmentConfig()) == 0.0
    assert augment_strength(AugmentConfig(rotation=9, shift=0.09, zoom=0.09)) == pytest.approx(0.6)
    assert augment_strength(AugmentConfig(rotation=10, shift=0.3, zoom=0.3)) is None  # the research's: off the scale


@pytest.mark.parametrize(
    "edit, needle",
    [
        ("filters: {choices: [8, 1000000000]}", "filters.choices must be in 1..1024 (filters=1000000000)"),
        ("kernel: 29", "kernel must be an odd integer in 1..27 (kernel=29)"),
        ("convs_per_block: 1000000000", "convs_per_block must be in 1..8 (convs_per_block=1000000000)"),
        ("dense_units: {low: 16, high: 1000000}", "dense_units.high must be in 1..8192 (dense_units=1000000)"),
        ("dense_layers: {low: 0, high: 100}", "dense_layers.high must be in 0..8 (dense_layers=100)"),
        ("batch_size: {choices: [64, 100000]}", "batch_size.choices must be in 1..16384 (batch_size=100000)"),
        ("learning_rate: {low: 1.0e-3, high: .inf, log: true}", "learning_rate.high must be a finite number"),
        ("weight_decay: .nan", "weight_decay must be a finite number (weight_decay=nan)"),
        ("augment: {low: 0.0, high: 1.0, step: .inf}", "augment.step must be a finite number > 0 (step=inf)"),
        ("learning_rate: {low: 1.0e-3, high: 1.0e+400}", "learning_rate.high must be a finite number"),
    ],
)
def test_absurd_and_non_finite_space_values_name_the_field(tmp_path, edit, needle):
    key = edit.split(":")[0]
    lines = [line for line in MINIMAL.strip().splitlines() if not line.startswith(key + ":")]
    with pytest.raises(ConfigError) as err:
        _space(tmp_path, "\n".join(lines + [edit]))
    assert needle in str(err.value) and "space.yaml" in str(err.value)


def _laughs() -> str:
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 10) + "]" for i in range(1, 10)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "data, needle",
    [
        (_laughs().encode(), "line 2, column 8: alias *a (YAML anchors and aliases are not allowed"),
        (b"base: &b {epochs: 3}\ntrain:\n  <<: *b\n", "alias *b"),
        (("train: " + "[" * 100_000 + "]" * 100_000).encode(), "nested deeper than 32 levels"),
        (("train:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 40))).encode(), "nested deeper than 32 levels"),
        ("description: \u00e9t\u00e9\n".encode("latin-1"), "not UTF-8 text: byte 0xe9 at offset 13 (line 1)"),
        ("train: {epochs: 3}\n".encode("utf-16"), "not UTF-8 text: byte 0xff at offset 0"),
        (b"# x\n" * 300_000, "1,200,000 bytes is too large for an experiment or search-space file"),
        (b"train: {epochs: " + b"9" * 5000 + b"}\n", "not valid YAML: Exceeds the limit (4300 digits)"),
        (b"train: !!python/object:os.system {}\n", "not valid YAML"),
    ],
)
def test_yaml_that_would_hang_crash_or_decode_wrongly_is_refused_fast(tmp_path, data, needle):
    import time

    p = tmp_path / "exp.yaml"
    p.write_bytes(data)
    for load in (load_experiment, SearchSpace.load):
        start = time.perf_counter()
        with pytest.raises(ConfigError) as err:
            load(p)
        assert needle in str(err.value) and "exp.yaml" in str(err.value)
        assert time.perf_counter() - start < 5


def test_a_utf8_bom_and_anchors_without_aliases_load(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_bytes("\ufefftrain: &t {epochs: 3}\ndescription: \u00e9t\u00e9\n".encode("utf-8"))
    cfg = load_experiment(p)
    assert cfg.train.epochs == 3 and cfg.description == "\u00e9t\u00e9"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("model:\n  conv_blocks: [{filters: 2048}]\n", "model.conv_blocks[0].filters must be <= 1024 (filters=2048)"),
        ("model:\n  conv_blocks: [{kernel: 29}]\n", "model.conv_blocks[0].kernel must be <= 28 (kernel=29)"),
        ("model:\n  dense: [64, 64, 64, 64, 64, 64, 64, 64, 64]\n", "model.dense must be <= 8 layers (dense=9 layers)"),
        ("model:\n  augment: {rotation: 720}\n", "model.augment.rotation must be <= 180 (rotation=720"),
        ("train:\n  steps_per_execution: 1000000\n", "train.steps_per_execution must be <= 1024"),
        ("train:\n  weight_decay: .inf\n", "train.weight_decay must be a finite number, got inf"),
        ("train:\n  learning_rate: 1.0e+400\n", "train.learning_rate must be a finite number, got inf"),
        ("data:\n  val_fraction: .nan\n", "data.val_fraction must be a finite number, got nan"),
        ("data:\n  seed: -1\n", "data.seed must be >= 0 (seed=-1)"),
        ("model:\n  kind: svm\n  options: {C: -1.0}\n", "The 'C' parameter of SVC must be a float in the range (0.0, inf"),
        ("model:\n  kind: random_forest\n  options: {max_depth: deep}\n", "'max_depth' parameter of RandomForestClassifier"),
        ("model:\n  kind: knn\n  options: {weights: heavy}\n", "'weights' parameter of KNeighborsClassifier"),
        ("model:\n  options: {n_jobs: 2}\n", "model.options applies to the classical kinds random_forest, svm, knn"),
    ],
)
def test_absurd_experiment_values_name_the_field(tmp_path, text, needle):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_experiment(p)
    assert needle in str(err.value) and "exp.yaml" in str(err.value)


def test_the_programmatic_api_refuses_nan_too():
    """ExperimentConfig built in Python (not from YAML) still fails on NaN/inf: every range check is finite."""
    import dataclasses

    for field, value in (("weight_decay", float("nan")), ("weight_decay", float("inf")), ("learning_rate", float("nan")),
                         ("label_smoothing", float("nan")), ("momentum", float("inf"))):
        cfg = ExperimentConfig()
        cfg.train = dataclasses.replace(cfg.train, **{field: value})
        with pytest.raises(ConfigError, match=f"train.{field}"):
            cfg.validate()
