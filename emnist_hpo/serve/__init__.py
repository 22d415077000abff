"""What users run on the results: the UIs (:mod:`.ui`), predictions on their own images (:mod:`.predict`), TFLite export (:mod:`.export`)."""

from emnist_hpo._lazy import exports

#: name -> module: imported on first use, so that importing this package loads nothing heavy
_EXPORTS = {
    'export_tflite': 'emnist_hpo.serve.export',
    'predict_images': 'emnist_hpo.serve.predict',
    'serve': 'emnist_hpo.serve.ui',
}

__getattr__, __all__ = exports(__name__, _EXPORTS)
