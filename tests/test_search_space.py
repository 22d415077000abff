"""Search-space and experiment YAML: validated on load, sampled architectures always fit 28x28."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from emnist_hpo.architecture import feature_sides
from emnist_hpo.config import ExperimentConfig, load_experiment
from emnist_hpo.errors import ConfigError
from emnist_hpo.models import build_model
from emnist_hpo.search_space import SearchSpace

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
        "conv_blocks": 4, "convs_per_block": 2, **{f"filters_{i}": 8 for i in range(4)},
        **{f"kernel_{i}": 5 for i in range(4)}, "pool": "avg", "batch_norm": True, "conv_dropout": 0.1,
        "dense_layers": 0, "augment": 0.5, "batch_size": 64, "optimizer": "sgd", "learning_rate": 0.01,
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
    from emnist_hpo.search_space import augment_strength

    assert augment_strength(AugmentConfig()) == 0.0
    assert augment_strength(AugmentConfig(rotation=9, shift=0.09, zoom=0.09)) == pytest.approx(0.6)
    assert augment_strength(AugmentConfig(rotation=10, shift=0.3, zoom=0.3)) is None  # the research's: off the scale
