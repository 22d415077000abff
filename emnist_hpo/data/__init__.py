"""EMNIST data: NIST's files read and checked (:mod:`.nist`), a split made ready for training (:mod:`.prepared`), real-world images turned into EMNIST inputs (:mod:`.images`)."""

from emnist_hpo._lazy import exports

#: name -> module: imported on first use, so that importing this package loads nothing heavy
_EXPORTS = {
    'ImageError': 'emnist_hpo.data.images',
    'PreparedData': 'emnist_hpo.data.prepared',
    'Rows': 'emnist_hpo.data.prepared',
    'SPLITS': 'emnist_hpo.data.nist',
    'SplitData': 'emnist_hpo.data.nist',
    'check_split': 'emnist_hpo.data.nist',
    'fingerprint': 'emnist_hpo.data.nist',
    'load_classes': 'emnist_hpo.data.nist',
    'load_split': 'emnist_hpo.data.nist',
    'prepare': 'emnist_hpo.data.prepared',
    'prepare_file': 'emnist_hpo.data.images',
    'read_idx': 'emnist_hpo.data.nist',
    'subsample': 'emnist_hpo.data.nist',
    'to_emnist': 'emnist_hpo.data.images',
    'train_val_split': 'emnist_hpo.data.nist',
}

__getattr__, __all__ = exports(__name__, _EXPORTS)
