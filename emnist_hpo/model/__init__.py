"""The CNN family: shape arithmetic (:mod:`.architecture`), cost before building (:mod:`.cost`), Keras builders (:mod:`.build`), one-line descriptions (:mod:`.describe`)."""

from emnist_hpo._lazy import exports

#: name -> module: imported on first use, so that importing this package loads nothing heavy
_EXPORTS = {
    'IMAGE_SIDE': 'emnist_hpo.model.architecture',
    'ModelCost': 'emnist_hpo.model.cost',
    'build_model': 'emnist_hpo.model.build',
    'check_fits': 'emnist_hpo.model.architecture',
    'count_params': 'emnist_hpo.model.build',
    'describe_model': 'emnist_hpo.model.describe',
    'feature_sides': 'emnist_hpo.model.architecture',
    'human': 'emnist_hpo.model.cost',
    'max_blocks': 'emnist_hpo.model.architecture',
    'model_cost': 'emnist_hpo.model.cost',
    'model_from_params': 'emnist_hpo.model.describe',
}

__getattr__, __all__ = exports(__name__, _EXPORTS)
