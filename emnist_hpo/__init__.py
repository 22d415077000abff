"""emnist-hpo: find the best and smallest CNN for every EMNIST split, reproducibly.

Optuna searches, Keras 3 trains (any backend), MLflow tracks every trial and
registers the champion of each split.
"""

import os as _os

# Quiet TensorFlow's C++ start-up noise (oneDNN notices, CUDA stubs on CPU machines) before it loads.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_os.environ.setdefault("KERAS_BACKEND", "tensorflow")
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
_os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")

_os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

__version__ = "0.1.0"
