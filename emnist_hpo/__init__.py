"""emnist-hpo: find the best and smallest CNN for every EMNIST split, reproducibly.

Optuna searches, Keras 3 trains (any backend), MLflow tracks every trial and
registers the champion of each split. Importing the package has no side effects;
the modules that load Keras set its environment first (:mod:`emnist_hpo.runtime`).

Layers, lowest first (a module imports only from layers below it): ``errors``,
``config``, ``options``, ``paths``, ``coordination``, ``runtime`` | ``data``,
``model``, ``train`` | ``tracking``, ``reporting.evaluation`` | ``search``
(space, trial, budget, selection, finalize; the ``optuna`` and ``keras_tuner``
engines) | ``baselines``, ``reporting`` | ``serve`` | ``cli``.
"""

__version__ = "0.1.0"
