"""Cost known before training: the analytic parameter count is Keras' own, FLOPs follow the layers."""

from __future__ import annotations

import copy
import math

import optuna
import pytest

from emnist_hpo.config import ConvBlock, ExperimentConfig, ModelConfig, load_experiment
from emnist_hpo.model.cost import model_cost
from emnist_hpo.model.build import build_model
from emnist_hpo.search.space import SearchSpace
from emnist_hpo.paths import find_experiment, find_search_space


def test_params_match_keras_for_sampled_and_seed_models():
    """Every model the default space samples, and every seed CNN/LSTM, counts exactly as Keras counts it."""
    space = SearchSpace.load(find_search_space("default"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    configs = []
    for _ in range(25):
        cfg = space.sample(study.ask(), ExperimentConfig())
        configs.append(cfg.model)
        gp = copy.deepcopy(cfg.model)
        gp.global_pool = not gp.global_pool
        configs.append(gp)
    for name in ("two_conv", "one_conv", "lenet", "compact", "lstm", "wide_dropout"):
        configs.append(load_experiment(find_experiment(name)).model)
    for m in configs:
        for classes in (10, 47):
            assert model_cost(m, classes).params == build_model(m, classes).count_params(), m


def test_flops_of_the_research_recipe_by_hand():
    """conv 64-3x3 valid (26x26) / pool / conv 64-3x3 (11x11) / pool / 5x5x64 -> 512 -> 128 -> 47."""
    m = ModelConfig(conv_blocks=[ConvBlock(64, 3), ConvBlock(64, 3)], padding="valid", dense=[512, 128])
    macs = 26 * 26 * 9 * 64 + 11 * 11 * 9 * 64 * 64 + 1600 * 512 + 512 * 128 + 128 * 47
    cost = model_cost(m, 47)
    assert cost.flops == 2 * macs
    assert cost.params == build_model(m, 47).count_params()  # ~929k, as the brief says
    assert cost.train_flops == 3 * cost.flops


def test_batch_norm_work_is_the_elements_keras_normalizes():
    """``normalized`` (time that FLOPs do not count) is what the built model's batch-norm layers output per image,
    a layer's elements counted 3 times where its channels are not a multiple of 16 (the slower kernel); 0 without
    batch-norm, whatever the FLOPs."""
    import keras

    space = SearchSpace.load(find_search_space("default"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5))
    models = [space.sample(study.ask(), ExperimentConfig()).model for _ in range(12)]
    models.append(load_experiment(find_experiment("compact")).model)
    assert any(m.batch_norm for m in models) and not all(m.batch_norm for m in models)
    for m in models:
        built = build_model(m, 26)
        elements = sum(math.prod(layer.output.shape[1:]) * (1 if layer.output.shape[-1] % 16 == 0 else 3)
                       for layer in built.layers if isinstance(layer, keras.layers.BatchNormalization))
        assert model_cost(m, 26).normalized == elements, m
    compact = load_experiment(find_experiment("compact")).model
    assert model_cost(compact, 26).normalized == 2 * (28 * 28 * 32 + 14 * 14 * 48 + 7 * 7 * 64)  # 2 convs a block
    odd = copy.deepcopy(compact)
    odd.conv_blocks[1].filters = 24  # the fused kernel's slow width
    assert model_cost(odd, 26).normalized == 2 * (28 * 28 * 32 + 3 * 14 * 14 * 24 + 7 * 7 * 64)
    plain = copy.deepcopy(compact)
    plain.batch_norm = False
    assert model_cost(plain, 26).normalized == 0 and model_cost(plain, 26).flops == model_cost(compact, 26).flops


def test_cost_grows_with_width_and_global_pooling_shrinks_the_head():
    small = ModelConfig(conv_blocks=[ConvBlock(16, 3)], dense=[64])
    wide = ModelConfig(conv_blocks=[ConvBlock(32, 3)], dense=[64])
    assert model_cost(wide, 10).flops > model_cost(small, 10).flops
    gp = ModelConfig(conv_blocks=[ConvBlock(32, 3)], dense=[64], global_pool=True)
    assert model_cost(gp, 10).params < model_cost(wide, 10).params


@pytest.mark.parametrize("filters", [10**9, 10**6])
def test_absurd_models_are_costed_without_building_them(filters):
    """A YAML slip such as filters: 1e9 is priced in microseconds: --max-params can refuse it untrained."""
    m = ModelConfig(conv_blocks=[ConvBlock(filters, 3)], dense=[10])
    assert model_cost(m, 10).params > 10**9
