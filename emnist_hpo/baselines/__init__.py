"""The research's fixed systems: one experiment trained, tested and tracked (:mod:`.experiment`), and the classical scikit-learn baselines (:mod:`.classical`)."""

from emnist_hpo._lazy import exports

#: name -> module: imported on first use, so that importing this package loads nothing heavy
_EXPORTS = {
    'ExperimentResult': 'emnist_hpo.baselines.experiment',
    'is_classical': 'emnist_hpo.baselines.classical',
    'make_estimator': 'emnist_hpo.baselines.classical',
    'run_experiment': 'emnist_hpo.baselines.experiment',
    'train_classical': 'emnist_hpo.baselines.classical',
}

__getattr__, __all__ = exports(__name__, _EXPORTS)
