"""A non-editable install: the wheel carries the search spaces, experiments and mappings, and a study runs
from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_non_editable_install_runs_a_study_from_any_folder(tmp_path, sample_dir):
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(REPO), "-w", str(wheels)],
                   check=True, capture_output=True)
    wheel = next(wheels.glob("emnist_hpo-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTEST_CURRENT_TEST")}
    env.update(PYTHONPATH=str(site), EMNIST_HPO_CACHE=str(tmp_path / "cache"))
    where = subprocess.run([sys.executable, "-c", "import emnist_hpo, emnist_hpo.paths as p; "
                            "print(emnist_hpo.__file__); print(p.find_search_space('default'))"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(line.startswith(str(site)) for line in where), where  # the installed copy, not the checkout
    res = subprocess.run([sys.executable, "-m", "emnist_hpo", "study", "--split", "digits", "--trials", "2",
                          "--epochs", "1", "--max-train-samples", "1000", "--data-dir", str(sample_dir),
                          "--no-progress", "--finalists", "0"], cwd=elsewhere, env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    study = optuna.load_study(study_name="emnist-digits", storage=f"sqlite:///{elsewhere}/mlruns/optuna.db")
    # the seed experiments came from the wheel's own experiments/
    assert [t.user_attrs.get("seed_experiment") for t in study.trials[:2]] == ["two_conv", "one_conv"]
    assert "registered           emnist-digits v1" in res.stdout
