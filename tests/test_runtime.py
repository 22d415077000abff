"""The environment the CLI sets up before Keras and MLflow load (emnist_hpo.runtime)."""

import os
import subprocess
import sys


def _telemetry_in_fresh_process(user_value: str | None) -> list[str]:
    """Start Python as the CLI does (runtime.configure, then MLflow) and say whether MLflow's telemetry client runs."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_DISABLE_TELEMETRY", "PYTEST_CURRENT_TEST")}
    if user_value is not None:
        env["MLFLOW_DISABLE_TELEMETRY"] = user_value
    code = ("import os; from emnist_hpo import runtime; runtime.configure(); import mlflow; "
            "from mlflow.telemetry.client import get_telemetry_client; "
            "print(os.environ.get('MLFLOW_DISABLE_TELEMETRY'), get_telemetry_client() is None)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()[-2:]


def test_mlflow_telemetry_is_off_unless_the_user_turns_it_on():
    # Its client thread deleted an environment variable under a study worker's requests call (KeyError).
    assert _telemetry_in_fresh_process(None) == ["true", "True"]
    assert _telemetry_in_fresh_process("false")[0] == "false"  # the user's choice stands
