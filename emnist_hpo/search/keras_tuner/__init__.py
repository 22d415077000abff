"""The Keras Tuner engine over the same search space and trial path (:mod:`.engine`)."""

from emnist_hpo._lazy import exports

#: name -> module: imported on first use, so that importing this package loads nothing heavy
_EXPORTS = {
    'KtStudyResult': 'emnist_hpo.search.keras_tuner.engine',
    'run_kt_study': 'emnist_hpo.search.keras_tuner.engine',
}

__getattr__, __all__ = exports(__name__, _EXPORTS)
