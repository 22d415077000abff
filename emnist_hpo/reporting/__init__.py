"""What runs are turned into: evaluations (:mod:`.evaluation`), a champion's analysis (:mod:`.analysis`), Optuna's plots (:mod:`.study_plots`), the cross-split leaderboard (:mod:`.compare`) and the published figures it compares with (:mod:`.published`)."""

from emnist_hpo._lazy import exports

#: name -> module: imported on first use, so that importing this package loads nothing heavy
_EXPORTS = {
    'Evaluation': 'emnist_hpo.reporting.evaluation',
    'evaluate': 'emnist_hpo.reporting.evaluation',
    'run_compare': 'emnist_hpo.reporting.compare',
}

__getattr__, __all__ = exports(__name__, _EXPORTS)
