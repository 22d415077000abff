"""Training as a plain function (:mod:`.trainer`), its learning-rate schedules (:mod:`.schedules`), the multi-fidelity ladder (:mod:`.fidelity`) and the lifecycle hooks around a trial (:mod:`.hooks`)."""

from emnist_hpo._lazy import exports

#: name -> module: imported on first use, so that importing this package loads nothing heavy
_EXPORTS = {
    'FIDELITIES': 'emnist_hpo.train.fidelity',
    'Ladder': 'emnist_hpo.train.fidelity',
    'Rung': 'emnist_hpo.train.fidelity',
    'RungControl': 'emnist_hpo.train.trainer',
    'RungResult': 'emnist_hpo.train.trainer',
    'TrainResult': 'emnist_hpo.train.trainer',
    'TrialCheckpoint': 'emnist_hpo.train.trainer',
    'TrialHooks': 'emnist_hpo.train.hooks',
    'TrialOutcome': 'emnist_hpo.train.hooks',
    'make_ladder': 'emnist_hpo.train.fidelity',
    'nested_order': 'emnist_hpo.train.fidelity',
    'predict_proba': 'emnist_hpo.train.trainer',
    'promotable': 'emnist_hpo.train.fidelity',
    'recalibrate_batch_norm': 'emnist_hpo.train.trainer',
    'release_memory': 'emnist_hpo.train.trainer',
    'runtime_settings': 'emnist_hpo.train.trainer',
    'single': 'emnist_hpo.train.fidelity',
    'train': 'emnist_hpo.train.trainer',
}

__getattr__, __all__ = exports(__name__, _EXPORTS)
