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
# TensorFlow's oneDNN kernels on every x86-64 CPU. TensorFlow turns them on by itself only where the CPU has
# AVX512-VNNI or newer units; on an AVX2-only CPU (AMD Zen 3) they ran a 1-channel conv 2.4x faster, and trials of a
# small CNN 1.8x the research's fit (the 2-conv model 1.1x), same accuracy (benchmarks/README.md).
# TF_ENABLE_ONEDNN_OPTS=0 keeps TensorFlow's default kernels.
if __import__("platform").machine().lower() in ("x86_64", "amd64"):
    _os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

_os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

__version__ = "0.1.0"
