"""The statistics the benchmarks' claims rest on (benchmarks/ is not a package: imported by path)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_search import paired  # noqa: E402


def test_the_paired_difference_counts_only_the_images_the_two_models_disagree_on():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 26, 2000)
    a, b = y.copy(), y.copy()
    a[:30] = (y[:30] + 1) % 26  # a alone wrong on 30 images
    b[30:90] = (y[30:90] + 1) % 26  # b alone wrong on 60
    a[90:190] = b[90:190] = (y[90:190] + 2) % 26  # both wrong on 100: no noise in the difference
    r = paired(y, a, b)
    assert (r["only_a"], r["only_b"], r["images"]) == (60, 30, 2000)
    assert r["difference"] == pytest.approx((60 - 30) / 2000)
    assert r["se"] == pytest.approx(np.sqrt(90 - 30**2 / 2000) / 2000)
    # under the standard error of a difference between accuracies on independent test sets: the images both
    # models miss add nothing
    pa, pb = 1 - 130 / 2000, 1 - 160 / 2000
    assert r["se"] < 0.6 * np.sqrt((pa * (1 - pa) + pb * (1 - pb)) / 2000)
    assert r["p_mcnemar"] < 0.01  # 60 against 30 is not a coin flip
    swapped = paired(y, b, a)
    assert swapped["difference"] == pytest.approx(-r["difference"]) and swapped["se"] == pytest.approx(r["se"])


def test_two_models_with_the_same_predictions_do_not_differ():
    y = np.arange(100) % 10
    r = paired(y, y, y)
    assert (r["difference"], r["se"], r["p_mcnemar"]) == (0.0, 0.0, 1.0)


def test_paired_refuses_predictions_of_other_lengths():
    with pytest.raises(ValueError, match=r"one length \(labels 3, a 3, b 2\)"):
        paired(np.zeros(3), np.zeros(3), np.zeros(2))
