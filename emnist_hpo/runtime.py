"""The environment Keras and TensorFlow start in, set just before the project first imports them.

``import emnist_hpo`` changes nothing; the modules that import Keras call
:func:`configure` first (and so does the CLI), which only fills in variables the
user has not set:

- TensorFlow's C++ start-up noise (oneDNN notices, CUDA stubs on CPU machines) is quieted;
- Keras' backend defaults to TensorFlow (``KERAS_BACKEND=jax`` or ``torch`` still wins);
- TensorFlow's oneDNN kernels are on for every x86-64 CPU: TensorFlow turns them on by itself
  only where the CPU has AVX512-VNNI or newer units; on an AVX2-only CPU (AMD Zen 3) they ran a
  1-channel conv 2.4x faster, and trials of a small CNN 1.8x the research's fit, same accuracy
  (benchmarks/README.md). ``TF_ENABLE_ONEDNN_OPTS=0`` keeps TensorFlow's default kernels;
- MLflow's artifact progress bars are off (they interleave with the study's own progress);
- MLflow's usage telemetry is off (``MLFLOW_DISABLE_TELEMETRY=false`` turns it back on): it sends usage
  records to MLflow's servers from a background thread, and when its client is reset it deletes an
  environment variable while other threads read ``os.environ`` (a worker of
  ``tests/test_concurrency.py`` died of ``KeyError: '_MLFLOW_TELEMETRY_SESSION_ID'`` inside ``requests``).

Setting them after TensorFlow has loaded does nothing, so :func:`configure` says whether it came
in time.
"""

from __future__ import annotations

import os
import platform
import sys

DEFAULTS = {
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "KERAS_BACKEND": "tensorflow",
    "GRPC_VERBOSITY": "ERROR",
    "ABSL_MIN_LOG_LEVEL": "3",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


def configure() -> bool:
    """Fill in the defaults above (never overriding the user's); True when TensorFlow had not loaded yet."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    if platform.machine().lower() in ("x86_64", "amd64"):
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    return "tensorflow" not in sys.modules
