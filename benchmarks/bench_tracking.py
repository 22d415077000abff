"""Tracking overhead per trial: MLflow runs, params, metrics, reports and model files, against the trial's wall time.

A real study (``run_study``) of 1-epoch trials on the balanced sample, no pruning (every
trial finishes and logs its reports), warm-started with the research's seed models.
Two measures of the overhead per trial:
- ``tracking_seconds``, what :class:`~emnist_hpo.tracking.tracker.MlflowTrialHooks` records itself;
- the wall time of every hook call and per-epoch logging callback, timed from outside
  (this also counts the final ``tracking_seconds`` metric and the end of the run).
The trial's wall time is Optuna's start-to-complete. Also reported: how many times the data
was loaded, how many trial model files were written, and what the PNG reports the trial
runs no longer draw would cost.

    python benchmarks/bench_tracking.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import DEFAULT_DATA, load_now, log, machine, median, table, write_results  # noqa: E402

from emnist_hpo.cli import import_keras_quietly  # noqa: E402

import_keras_quietly()

import optuna  # noqa: E402

from emnist_hpo.data import prepared as dataset  # noqa: E402
from emnist_hpo.tracking import tracker as tracking  # noqa: E402
from emnist_hpo.search.optuna.study import StudyOptions, run_study  # noqa: E402


class HookClock:
    """Times MlflowTrialHooks' calls and the per-epoch logging callback, per trial, from outside."""

    def __init__(self):
        self.seconds: dict[int, float] = defaultdict(float)
        self._saved: list[tuple[Any, str, Any]] = []

    def _wrap(self, owner, name, key):
        original = getattr(owner, name)
        clock = self

        def timed(self_, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(self_, *args, **kwargs)
            finally:
                clock.seconds[key(self_, *args)] += time.perf_counter() - t0

        self._saved.append((owner, name, original))
        setattr(owner, name, timed)

    def __enter__(self):
        self._wrap(tracking.MlflowTrialHooks, "on_trial_begin", lambda s, trial, *a: trial.number)
        self._wrap(tracking.MlflowTrialHooks, "on_trial_end", lambda s, trial, *a: trial.number)
        self._wrap(tracking.MlflowMetricsCallback, "on_epoch_end", lambda s, *a: s.trial_number)
        original_init = tracking.MlflowMetricsCallback.__init__

        def init(self_, tracker, run_id, *a, **kw):
            original_init(self_, tracker, run_id, *a, **kw)
            self_.trial_number = _current_trial[0]

        self._saved.append((tracking.MlflowMetricsCallback, "__init__", original_init))
        tracking.MlflowMetricsCallback.__init__ = init
        begin = tracking.MlflowTrialHooks.on_trial_begin

        def begin_marking(self_, trial, *a, **kw):
            _current_trial[0] = trial.number
            return begin(self_, trial, *a, **kw)

        self._saved.append((tracking.MlflowTrialHooks, "on_trial_begin", begin))
        tracking.MlflowTrialHooks.on_trial_begin = begin_marking
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)


_current_trial = [-1]


def measure(quick: bool, data_dir: str) -> dict[str, Any]:
    trials = 3 if quick else 8
    samples = 4000 if quick else None  # None: the whole balanced sample (13,385 train / 3,347 validation)
    loads = [0]
    real_load = dataset.load_split

    def counting_load(*a, **kw):
        loads[0] += 1
        return real_load(*a, **kw)

    dataset.load_split = counting_load
    with tempfile.TemporaryDirectory() as tmp, HookClock() as clock:
        root = Path(tmp)
        opts = StudyOptions(
            split="balanced", trials=trials, epochs=1, max_train_samples=samples, data_dir=data_dir,
            storage=f"sqlite:///{root}/optuna.db", tracking_uri=f"sqlite:///{root}/mlflow.db",
            study_name="tracking-bench", pruner="none", finalists=0, final_fit=False, register=False,
            progress=False, checkpoint_dir=str(root / "ckpt"),
        )
        t0 = time.perf_counter()
        load0 = load_now()
        res = run_study(opts, log=lambda m: None)
        wall = time.perf_counter() - t0
        dataset.load_split = real_load
        study = optuna.load_study(study_name="tracking-bench", storage=opts.storage)
        ckpts = sorted(p.name for p in (root / "ckpt" / "tracking-bench").glob("trial_*.keras"))
        # what the trial runs no longer draw: the champion trial's PNGs, timed again here
        tracker = tracking.Tracker(opts.tracking_uri, "emnist-balanced")
        champ_run = res.champion_trial.user_attrs["mlflow_run_id"] if res.champion_trial else None
        t = time.perf_counter()
        drawn = tracker.log_report_plots(champ_run) if champ_run else []
        png_s = time.perf_counter() - t
    rows = []
    for tr in study.trials:
        if tr.datetime_complete is None:
            continue
        trial_wall = (tr.datetime_complete - tr.datetime_start).total_seconds()
        own = tr.user_attrs.get("tracking_seconds")
        outside = clock.seconds.get(tr.number)
        rows.append({
            "trial": tr.number, "state": tr.state.name, "seed": tr.user_attrs.get("seed_experiment", ""),
            "params": tr.user_attrs.get("params"), "wall_s": trial_wall,
            "train_s": tr.user_attrs.get("train_seconds"), "tracking_seconds": own, "hooks_timed_s": outside,
            "fraction": (outside or own or 0) / trial_wall if trial_wall else None,
        })
    return {
        "trials": rows, "study_wall_s": wall, "train_size": 13385 if samples is None else int(samples * 0.8),
        "data_loads": loads[0], "model_files": ckpts, "png_reports_s": png_s, "png_reports": drawn,
        "load_start": load0, "load_end": load_now(),
        "fraction_median": median(r["fraction"] for r in rows),
        "fraction_max": max((r["fraction"] for r in rows), default=None),
        "tracking_median_s": median(r["hooks_timed_s"] for r in rows),
    }


def markdown(res: dict[str, Any]) -> str:
    out = [f"Tracking overhead, balanced sample ({res['train_size']:,} training images), 1-epoch trials, "
           f"no pruning; study wall time {res['study_wall_s']:.0f} s; machine load {res['load_start']}-"
           f"{res['load_end']}.\n"]
    out.append(table(
        ["trial", "seed model", "params", "state", "trial wall s", "fit s", "tracking_seconds (recorded)",
         "hooks timed from outside s", "share of the trial"],
        [[r["trial"], r["seed"] or "-", r["params"], r["state"], r["wall_s"], r["train_s"], r["tracking_seconds"],
          r["hooks_timed_s"], f"{100 * r['fraction']:.2f}%" if r["fraction"] is not None else "-"]
         for r in res["trials"]]))
    out.append("")
    out.append(f"- tracking share of a trial: median {100 * res['fraction_median']:.2f}%, max "
               f"{100 * res['fraction_max']:.2f}% (target: at most 2%)")
    out.append(f"- the data set was loaded {res['data_loads']} time(s) for {len(res['trials'])} trials")
    out.append(f"- trial model files written: {len(res['model_files'])} of {len(res['trials'])} trials "
               "(only a trial that beats every finished one can become the champion)")
    out.append(f"- PNG reports (confusion matrix, curves) drawn once, for the champion trial: "
               f"{res['png_reports_s']:.2f} s; drawn for every finished trial before, that was "
               f"{res['png_reports_s']:.2f} s per trial")
    return "\n".join(out)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    args = p.parse_args(argv)
    res = {"machine": machine(), **measure(args.quick, args.data_dir)}
    md = markdown(res)
    write_results("tracking", res, md)
    print(md)
    return res


if __name__ == "__main__":
    main()
