"""The champion's analysis files: misclassified gallery, confused pairs, activation maps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from emnist_hpo.reporting.analysis import write_analysis
from emnist_hpo.config import ConvBlock, ModelConfig
from emnist_hpo.data.nist import load_split
from emnist_hpo.model.build import build_model
from emnist_hpo.reporting.evaluation import evaluate


def test_write_analysis_files(sample_dir, tmp_path):
    data = load_split("letters", sample_dir, progress=False)
    x, y = data.x_test[:400], data.y_test[:400]
    model = build_model(ModelConfig(conv_blocks=[ConvBlock(8, 3), ConvBlock(12, 3, convs=2)], batch_norm=True),
                        len(data.classes))
    proba = np.asarray(model.predict(x, verbose=0))  # untrained: plenty of mistakes
    ev = evaluate(y, proba, data.classes)
    paths = write_analysis(model, x, y, proba, data.classes, ev, tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in paths}
    # one map per conv layer, taken after its ReLU; the pairs table is the evaluation's
    assert names == {"misclassified.png", "confused_pairs.csv", "confused_pairs.png", "activations/relu_0_0.png",
                     "activations/relu_1_0.png", "activations/relu_1_1.png"}
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "confused_pairs.csv"), ev.confused_pairs,
                                  check_dtype=False, atol=1e-4)
    for p in paths:
        if p.suffix == ".png":
            with Image.open(p) as im:
                assert im.size[0] > 100 and im.size[1] > 100


def test_nothing_wrong_means_no_gallery(sample_dir, tmp_path):
    data = load_split("digits", sample_dir, progress=False)
    x, y = data.x_test[:50], data.y_test[:50]
    model = build_model(ModelConfig(conv_blocks=[ConvBlock(4, 3)]), 10)
    perfect = np.eye(10, dtype=np.float32)[y]
    ev = evaluate(y, perfect, data.classes)
    names = {p.name for p in write_analysis(model, x, y, perfect, data.classes, ev, tmp_path)}
    assert "misclassified.png" not in names and "confused_pairs.png" not in names
    assert "confused_pairs.csv" in names and "relu_0_0.png" in names


@pytest.mark.slow
def test_study_champion_run_carries_the_analysis(digits_champion):
    client = MlflowClient(digits_champion["tracking"], registry_uri=digits_champion["tracking"])
    run_id = client.get_model_version_by_alias("emnist-digits", "champion").run_id
    run = client.get_run(run_id)
    assert run.data.tags["emnist_hpo.kind"] == "final" and run.data.tags["emnist_hpo.engine"] == "optuna"
    top = {a.path for a in client.list_artifacts(run_id, "analysis")}
    assert {"analysis/misclassified.png", "analysis/confused_pairs.csv", "analysis/confused_pairs.png"} <= top
    maps = {a.path for a in client.list_artifacts(run_id, "analysis/activations")}
    assert maps and all(p.startswith("analysis/activations/relu_") for p in maps)
