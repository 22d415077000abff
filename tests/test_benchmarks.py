"""The statistics the benchmarks' claims rest on (benchmarks/ is not a package: imported by path)."""

import sys
from pathlib import Path

import numpy as np
import optuna
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import json  # noqa: E402

from bench_search import bar_met, bars, last_rung_runs, paired, pooled, rung_seconds, summarize  # noqa: E402


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


COMPACT = {"test_accuracy": 0.8431, "params": 191_582, "flops": 34_900_000}


def _run(test, params=101_550, flops=32_700_000, sampled=True, diff=None, se=0.004):
    r = {"test_accuracy": test, "params": params, "flops": flops, "sampled": sampled}
    r["vs_compact"] = {"difference": test - COMPACT["test_accuracy"] if diff is None else diff, "se": se,
                       "p_mcnemar": 0.5}
    return r


def test_the_no_seeds_bar_is_compacts_test_accuracy_at_no_more_parameters():
    assert bar_met("search", _run(0.8431), COMPACT)  # a tie at fewer parameters
    assert not bar_met("search", _run(0.8422), COMPACT)  # 0.09 pt under: missed, however small
    assert not bar_met("search", _run(0.8600, params=191_583), COMPACT)  # more accurate, but one parameter larger
    assert bar_met("search", _run(0.8433, flops=109_300_000), COMPACT)  # FLOPs are not this bar's
    assert bar_met("search", _run(0.85), None) is None  # compact alone not run: nothing to judge


def test_the_seeded_bar_wants_a_sampled_champion_half_a_point_up_or_a_match_with_fewer_flops():
    assert bar_met("seeds", _run(0.8481, flops=66_900_000), COMPACT)  # +0.50 pt: FLOPs do not matter
    assert bar_met("seeds", _run(0.8440, flops=34_000_000), COMPACT)  # +0.09 pt with fewer FLOPs
    assert not bar_met("seeds", _run(0.8440, flops=34_900_000), COMPACT)  # +0.09 pt at the same FLOPs
    assert not bar_met("seeds", _run(0.8368, flops=20_000_000), COMPACT)  # fewer FLOPs, 0.63 pt under
    assert not bar_met("seeds", _run(0.8600, sampled=False), COMPACT)  # compact itself crowned: not the search's
    with pytest.raises(ValueError, match="runs 'search' or 'seeds', not 'hand'"):
        bar_met("hand", _run(0.85), COMPACT)


def test_the_grid_pools_the_cells_differences_as_independent_measurements():
    p = pooled([{"difference": 0.010, "se": 0.004}, {"difference": -0.004, "se": 0.003}])
    assert p["cells"] == 2
    assert p["difference"] == pytest.approx(0.003)
    assert p["se"] == pytest.approx(0.005 / 2)  # sqrt(0.004^2 + 0.003^2) / 2: tighter than either cell's
    with pytest.raises(ValueError, match="at least one"):
        pooled([])


def test_the_grid_counts_each_bar_over_the_cells_that_ran_it():
    results = [
        {"split": "balanced", "seed": 0, "compact": COMPACT, "search": _run(0.8500), "seeds": _run(0.8490)},
        {"split": "byclass", "seed": 1, "compact": COMPACT, "search": _run(0.8422),
         "seeds": _run(0.8700, sampled=False)},
        {"split": "letters", "seed": 1, "search": {**_run(0.95), "vs_compact": None}},  # compact alone not run
    ]
    lines = bars(results)
    assert len(lines) == 2
    assert "no seeds" in lines[0] and "met in 1 of 2 cells" in lines[0]
    assert "pooled over 2: +0.30 +/- 0.28 pt" in lines[0]  # (0.69 - 0.09) / 2, sqrt(2 x 0.40^2) / 2
    assert "seeds first" in lines[1] and "met in 1 of 2 cells" in lines[1] and "sampled in 1 of 2" in lines[1]


def test_summarize_names_a_file_that_is_not_a_results_file(tmp_path):
    missing, other = tmp_path / "nope.json", tmp_path / "other.json"
    other.write_text('{"rows": []}')
    with pytest.raises(SystemExit, match=r"cannot read .*nope\.json"):
        summarize([str(missing)], "x")
    with pytest.raises(SystemExit, match=r"other\.json is not a bench_search\.py results file"):
        summarize([str(other)], "x")


def _results_file(path, date, commit, cpu, units, results):
    path.write_text(json.dumps({"machine": {"date": date, "commit": commit, "cpu": cpu, "cores": 2,
                                            "bf16_units": units}, "results": results}))
    return str(path)


def test_a_grid_of_several_runs_counts_each_cell_once_at_its_latest_run_and_names_each_rows_machine(tmp_path, capsys):
    older = _results_file(tmp_path / "amd.json", "2026-12-04T10:00:00", "c79d859", "AMD EPYC", ["avx512_bf16"], [
        {"split": "balanced", "seed": 1, "compact": COMPACT, "search": _run(0.8474)},  # +0.43: met
    ])
    newer = _results_file(tmp_path / "intel.json", "2026-12-05T21:36:18", "2c978b711991-dirty", "Intel Xeon", [], [
        {"split": "balanced", "seed": 1, "compact": COMPACT, "search": _run(0.8381)},  # -0.50: missed
        {"split": "letters", "seed": 0, "compact": COMPACT, "search": _run(0.8461)},  # +0.30: met
    ])
    for order in ([older, newer], [newer, older]):  # the file's date decides, not the order given
        assert summarize(order, str(tmp_path / "grid")) == 0
        out = capsys.readouterr().out
        line = next(ln for ln in out.splitlines() if ln.startswith("- no seeds"))
        assert "met in 1 of 2 cells" in line and "1 earlier run of a cell not counted" in line
        assert "pooled over 2: -0.10 +/- 0.28 pt" in line  # (-0.50 + 0.30) / 2: the AMD run's +0.43 left out
        rows = [ln for ln in out.splitlines() if ln.startswith("| balanced | 1 | search |")]
        assert len(rows) == 2  # the table keeps every run
        assert any("AMD EPYC (2 cores, avx512_bf16), c79d859" in r and "| met |" in r for r in rows)
        assert any("Intel Xeon (2 cores, no bf16), 2c978b7-dirty" in r and "| missed |" in r for r in rows)
    saved = json.loads((tmp_path / "grid.json").read_text())
    assert {e["source"]["file"] for e in saved["results"]} == {older, newer}


def test_a_results_file_records_the_onednn_setting_the_studies_ran_with():
    """The studies (`python -m emnist_hpo`) turn TensorFlow's oneDNN kernels on for every x86-64 CPU before Keras
    loads; a benchmark's own process imported Keras first, and on the Zen 3 machine (no AVX512-VNNI, where
    TensorFlow leaves them off by itself) its results file said "onednn": false for studies that ran with them on."""
    import subprocess

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    recorded = subprocess.run([sys.executable, "-c", "from _common import machine; print(machine().get('onednn'))"],
                              cwd=bench, capture_output=True, text=True, timeout=300)
    study = subprocess.run([sys.executable, "-c", "from emnist_hpo.cli import import_keras_quietly; "
                            "import_keras_quietly(); from emnist_hpo.train.trainer import onednn_enabled; "
                            "print(onednn_enabled())"], capture_output=True, text=True, timeout=300)
    assert recorded.returncode == 0 and study.returncode == 0, recorded.stderr[-2000:] + study.stderr[-2000:]
    assert recorded.stdout.split()[-1] == study.stdout.split()[-1]


def test_the_seconds_at_each_rung_count_every_rung_once_for_the_trial_that_trained_it():
    """A paused trial's continuation carries the rung records it took over; they were trained once."""
    from types import SimpleNamespace

    paused = SimpleNamespace(number=3, user_attrs={"rungs": [{"rung": 0, "score": 0.8, "seconds": 20.0},
                                                             {"rung": 1, "score": 0.9, "seconds": 55.0}]})
    continued = SimpleNamespace(number=7, user_attrs={"promote_of": 3, "rungs": [
        {"rung": 0, "score": 0.8, "seconds": 20.0, "trial": 3}, {"rung": 1, "score": 0.9, "seconds": 55.0, "trial": 3},
        {"rung": 2, "score": 0.93, "seconds": 140.0}]})
    other = SimpleNamespace(number=4, user_attrs={"rungs": [{"rung": 0, "score": 0.5, "seconds": 18.5}]})
    refused = SimpleNamespace(number=5, user_attrs={"refused": True})
    assert rung_seconds([paused, continued, other, refused]) == {0: 38.5, 1: 55.0, 2: 140.0}
    assert rung_seconds([]) == {}


def test_the_full_length_runs_are_listed_once_each_with_the_score_that_sent_them_up():
    """Each run of the last rung once, for the trial that trained it, with its score at the rung below (taken
    over from the paused trial it continues, where it does) beside its last-rung score and size, and whether it
    was the search's closing run."""
    from types import SimpleNamespace

    paused = SimpleNamespace(number=3, user_attrs={"params": 900, "flops": 2e6, "rungs": [
        {"rung": 0, "score": 0.8, "seconds": 20.0}, {"rung": 1, "score": 0.9, "seconds": 55.0}]})
    continued = SimpleNamespace(number=7, user_attrs={"promote_of": 3, "closing_of": 3, "params": 900, "flops": 2e6})
    continued.user_attrs["rungs"] = [{"rung": 0, "score": 0.8, "trial": 3}, {"rung": 1, "score": 0.9, "trial": 3},
                                     {"rung": 2, "score": 0.93, "seconds": 140.0}]
    straight = SimpleNamespace(number=5, user_attrs={"params": 500, "flops": 1e6, "rungs": [
        {"rung": 0, "score": 0.7}, {"rung": 1, "score": 0.85}, {"rung": 2, "score": 0.91, "seconds": 90.0}]})
    low = SimpleNamespace(number=6, user_attrs={"rungs": [{"rung": 0, "score": 0.5}]})
    assert last_rung_runs([paused, straight, low, continued]) == [
        {"trial": 5, "below": 0.85, "score": 0.91, "seconds": 90.0, "params": 500, "flops": 1e6, "closing": False},
        {"trial": 7, "below": 0.9, "score": 0.93, "seconds": 140.0, "params": 900, "flops": 2e6, "closing": True}]
    assert last_rung_runs([low]) == [] and last_rung_runs([]) == []


def _trial(number, value, params, flops):
    from types import SimpleNamespace

    return SimpleNamespace(number=number, values=[value], user_attrs={"params": params, "flops": flops})


def test_the_best_re_evaluated_mean_is_read_from_the_study_runs_finalist_metrics():
    """The finalist ``--no-prefer-smaller`` would have crowned: the best mean whatever its size, the smaller on a
    tie; other metrics (the champion's, the optimism of each finalist) are not finalists."""
    from bench_search import best_mean_finalist

    trials = [_trial(3, 0.93, 180_000, 30e6), _trial(8, 0.94, 60_000, 8e6), _trial(11, 0.92, 90_000, 12e6)]
    metrics = {"finalist_3_mean": 0.941, "finalist_3_std": 0.0, "finalist_3_optimism": -0.011,
               "finalist_8_mean": 0.938, "finalist_11_mean": 0.936, "champion_reeval_mean": 0.938}
    best = best_mean_finalist(metrics, trials)
    assert (best.trial, best.mean, best.params, best.flops) == (3, 0.941, 180_000, 30e6)
    metrics["finalist_8_mean"] = 0.941  # a tie: the smaller
    assert best_mean_finalist(metrics, trials).trial == 8
    assert best_mean_finalist({"champion_reeval_mean": 0.9}, trials) is None  # no finalists re-evaluated


def test_the_rules_trade_is_pooled_over_the_runs_where_it_crowned_another_finalist():
    from bench_search import trades

    def run(trial, best):
        return {"champion_trial": trial, "best_mean": best}

    other = {"trial": 4, "reeval_mean": 0.9421, "crowned_reeval_mean": 0.9390, "crowned": False, "params": 186_938,
             "flops": 34.9e6, "test_accuracy": 0.9310, "vs_crowned": {"difference": 0.0032, "se": 0.0020},
             "vs_compact": {"difference": -0.0018, "se": 0.0030}}
    results = [{"split": "letters", "seed": 1, "seeds": run(55, other)},
               {"split": "byclass", "seed": 0, "search": run(13, {**other, "trial": 40, "vs_crowned": {
                   "difference": -0.0010, "se": 0.0030}})},
               {"split": "balanced", "seed": 0, "search": run(7, {"trial": 7, "reeval_mean": 0.88, "crowned": True})},
               {"split": "balanced", "seed": 1, "search": run(9, None)}]
    head, *lines = trades(results)
    assert "the same trial in 1 run(s), another in 2" in head
    assert f"pooled: +0.11 +/- {100 * np.sqrt(0.002 ** 2 + 0.003 ** 2) / 2:.2f} pt" in head
    assert lines[0].startswith("- letters seed 1, seeds: the rule crowned trial 55 (re-evaluated 93.90); the best "
                               "re-evaluated mean, trial 4 (94.21; 186,938 parameters, 34.9M FLOPs), tests 93.10: "
                               "+0.32 +/- 0.20 pt against the crowned champion, -0.18 against compact")
    assert len(lines) == 2 and trades([{"split": "digits", "seed": 0, "search": run(1, None)}]) == []
    # no finalist re-evaluated: the counterfactual is the best single score, and the line says so
    by_score = {**other, "by": "score", "reeval_mean": 0.9468, "crowned_reeval_mean": 0.9432}
    _, line = trades([{"split": "letters", "seed": 1, "seeds": run(29, by_score)}])
    assert line.startswith("- letters seed 1, seeds: the rule crowned trial 29 (scored 94.32); the best single "
                           "score (no finalist re-evaluated), trial 4 (94.68; ")


def test_without_finalists_the_counterfactual_is_the_best_single_score():
    """Where nothing was re-evaluated the rule chose between single scores: the trial it traded away is the best
    complete one (the smaller on a tie); pruned trials and repeats (their twins trained the model) are not."""
    from types import SimpleNamespace

    from bench_search import best_score_trial
    from emnist_hpo.search.optuna.repeats import REPEAT_ATTR

    def t(number, value, params, state="COMPLETE", **attrs):
        return SimpleNamespace(number=number, values=[value], state=SimpleNamespace(name=state),
                               user_attrs={"params": params, "flops": params * 100, **attrs})

    trials = [t(3, 0.9432, 186_938), t(7, 0.9490, 50_000, "PRUNED"), t(9, 0.9468, 170_026),
              t(12, 0.9468, 120_000), t(14, 0.9500, 90_000, **{REPEAT_ATTR: 12}), t(15, 0.9357, 144_170)]
    def study(ts):  # what pick_champion reads of a study
        return SimpleNamespace(directions=[optuna.study.StudyDirection.MAXIMIZE],
                               direction=optuna.study.StudyDirection.MAXIMIZE,
                               get_trials=lambda deepcopy=False, states=None: [
                                   x for x in ts if states is None or x.state.name in {s.name for s in states}])

    best = best_score_trial(study(trials))
    assert (best.trial, best.mean, best.params) == (12, 0.9468, 120_000)
    assert best_score_trial(study([t(1, 0.5, 10, "PRUNED")])) is None


@pytest.mark.slow
def test_a_trial_fitted_alone_is_what_the_study_would_have_registered_had_it_crowned_it(tmp_path, sample_dir):
    """The counterfactual behind the rule's trade: the bench rebuilds a trial's config as the study does and gives
    it the study's final fit, so on the crowned trial it reproduces the registered champion's test accuracy."""
    import subprocess

    import optuna

    from bench_search import best_mean_finalist, fit_trial_alone, study_run_metrics

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = [sys.executable, "-m", "emnist_hpo", "study", "--split", "digits", "--trials", "4", "--epochs", "2",
            "--max-train-samples", "600", "--data-dir", str(sample_dir), "--search-space", "small",
            "--storage", f"sqlite:///{tmp_path}/optuna.db", "--tracking-uri", uri, "--no-warm-start",
            "--finalists", "2", "--no-progress", "--seed", "3"]
    res = subprocess.run(argv, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    study = optuna.load_study(study_name="emnist-digits", storage=f"sqlite:///{tmp_path}/optuna.db")
    champ = study.user_attrs["champion"]
    best = best_mean_finalist(study_run_metrics(uri, "digits"), study.get_trials())
    assert best is not None and f"trial {best.trial} original" in res.stderr  # one of the re-evaluated finalists
    options = {"split": "digits", "seed": 3, "epochs": 2, "data_dir": str(sample_dir), "max_train_samples": 600,
               "search_space": "small", "warm_start": False}
    alone = fit_trial_alone(options, str(tmp_path), champ["trial"], tmp_path / "pred.npy")
    assert alone["params"] == champ["params"]
    assert alone["test_accuracy"] == pytest.approx(champ["test_accuracy"], abs=0.002)  # a test image or two
    assert len(np.load(tmp_path / "pred.npy")) > 0
