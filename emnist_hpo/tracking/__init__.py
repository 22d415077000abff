"""MLflow: the store and runs (:mod:`.tracker`), the model registry (:mod:`.registry`) and the registered model's own code (:mod:`.pyfunc_model`)."""

from emnist_hpo._lazy import exports

#: name -> module: imported on first use, so that importing this package loads nothing heavy
_EXPORTS = {
    'MlflowMetricsCallback': 'emnist_hpo.tracking.tracker',
    'MlflowTrialHooks': 'emnist_hpo.tracking.tracker',
    'Registered': 'emnist_hpo.tracking.registry',
    'Tracker': 'emnist_hpo.tracking.tracker',
    'load_champion': 'emnist_hpo.tracking.registry',
    'log_and_register': 'emnist_hpo.tracking.registry',
    'make_client': 'emnist_hpo.tracking.tracker',
}

__getattr__, __all__ = exports(__name__, _EXPORTS)
