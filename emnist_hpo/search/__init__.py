"""The search: its space (:mod:`.space`), one trial for either engine (:mod:`.trial`), the time budget (:mod:`.budget`), finalists (:mod:`.selection`), the champion (:mod:`.finalize`); the engines in :mod:`.optuna` and :mod:`.keras_tuner`."""

from emnist_hpo._lazy import exports

#: name -> module: imported on first use, so that importing this package loads nothing heavy
_EXPORTS = {
    'Champion': 'emnist_hpo.search.finalize',
    'Finalist': 'emnist_hpo.search.selection',
    'Limits': 'emnist_hpo.search.trial',
    'SearchSpace': 'emnist_hpo.search.space',
    'Throughput': 'emnist_hpo.search.budget',
    'TimeBudget': 'emnist_hpo.search.budget',
    'choose': 'emnist_hpo.search.selection',
    'finalize_champion': 'emnist_hpo.search.finalize',
    'reevaluate': 'emnist_hpo.search.selection',
    'run_trial': 'emnist_hpo.search.trial',
}

__getattr__, __all__ = exports(__name__, _EXPORTS)
