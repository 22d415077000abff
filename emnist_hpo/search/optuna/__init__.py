"""The Optuna engine: the study loop (:mod:`.study`), its objective and rung decisions (:mod:`.objective`), pruners (:mod:`.pruners`), trial slots and claims between processes (:mod:`.slots`)."""

from emnist_hpo._lazy import exports

#: name -> module: imported on first use, so that importing this package loads nothing heavy
_EXPORTS = {
    'StudyContext': 'emnist_hpo.search.optuna.study',
    'StudyResult': 'emnist_hpo.search.optuna.study',
    'make_pruner': 'emnist_hpo.search.optuna.pruners',
    'no_skill_accuracy': 'emnist_hpo.search.optuna.pruners',
    'open_study': 'emnist_hpo.search.optuna.study',
    'run_study': 'emnist_hpo.search.optuna.study',
    'summary_table': 'emnist_hpo.search.optuna.study',
}

__getattr__, __all__ = exports(__name__, _EXPORTS)
