"""Scaling: trials per hour with 1 and 2 workers (``study --workers N``) on the same study budget.

Each run is a fresh study through the command line on the same data, no pruning, no finalists
or final fit, and the same workload: the seed experiments that lie inside the default search
space (experiments/*.yaml: one_conv, compact, two_conv, three_conv, four_conv, wide_dropout),
enqueued as the study's trials, so 1 and 2 workers train exactly the same models for the same
epochs (sampled trials would differ between them: each worker samples with its own seed). Trials per hour = finished trials / the time from the first
trial's start to the last trial's end (process start-up and data loading excluded, and
reported apart as the command's wall time). Workers split the machine's cores
(``TF_NUM_INTRAOP_THREADS`` = cores / workers), so on a 2-core machine two workers are
expected to gain little: they overlap one trial's Python, logging and start-up with the
other's compute.

    python benchmarks/bench_scaling.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import DEFAULT_DATA, PYTHON, load_now, log, machine, run_child, table, write_results  # noqa: E402


#: The workload: seed experiments inside the default search space, smallest first (experiments/<name>.yaml).
SEEDS = ("one_conv", "compact", "two_conv", "three_conv", "four_conv", "wide_dropout")


def measure(quick: bool, data_dir: str) -> dict[str, Any]:
    import optuna

    seeds = SEEDS[:4] if quick else SEEDS
    trials = len(seeds)
    epochs = 1 if quick else 2
    samples = 2000 if quick else 6000
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for workers in (1, 2):
            name = f"scaling-w{workers}"
            storage = f"sqlite:///{root}/optuna.db"
            cmd = [PYTHON, "-m", "emnist_hpo", "study", "--split", "balanced", "--trials", str(trials),
                   "--epochs", str(epochs), "--max-train-samples", str(samples), "--data-dir", data_dir,
                   "--seed-experiments", ",".join(seeds), "--pruner", "none", "--finalists", "0", "--no-final-fit", "--no-register",
                   "--no-progress", "--workers", str(workers), "--storage", storage,
                   "--tracking-uri", f"sqlite:///{root}/mlflow.db", "--study-name", name]
            load0 = load_now()
            r = run_child(cmd, cwd=root, env={"EMNIST_HPO_CACHE": str(root / "cache")})
            if r["rc"]:
                log(f"scaling workers={workers} failed: {r['tail']}")
                rows.append({"workers": workers, "rc": r["rc"], "tail": r["tail"]})
                continue
            study = optuna.load_study(study_name=name, storage=storage)
            done = [t for t in study.trials if t.datetime_complete is not None and t.state.is_finished()]
            span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
            row = {"workers": workers, "finished": len(done), "span_s": span, "command_wall_s": r["wall_s"],
                   "trials_per_hour": 3600 * len(done) / span, "peak_rss_mb": r.get("peak_rss_mb"),
                   "mean_trial_s": sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
                   / len(done), "load_start": load0, "load_end": load_now()}
            rows.append(row)
            log(f"scaling workers={workers}: {row['trials_per_hour']:.0f} trials/h ({len(done)} in {span:.0f} s)")
    return {"trials": trials, "epochs": epochs, "samples": samples, "models": list(seeds), "runs": rows}


def markdown(res: dict[str, Any]) -> str:
    out = [f"Scaling, balanced sample ({res['samples']:,} images: {int(res['samples'] * 0.8):,} train), "
           f"{res['trials']} trials of {res['epochs']} epoch(s), no pruning; the trials are the seed experiments "
           f"{', '.join(res.get('models', []))}, the same models in both runs:\n"]
    ok = [r for r in res["runs"] if "trials_per_hour" in r]
    out.append(table(["workers", "finished trials", "first start to last end s", "trials per hour",
                      "mean trial wall s", "command wall s", "largest process peak RSS MB", "machine load"],
                     [[r["workers"], r["finished"], r["span_s"], r["trials_per_hour"], r["mean_trial_s"],
                       r["command_wall_s"], r["peak_rss_mb"], f"{r['load_start']}-{r['load_end']}"] for r in ok]))
    if len(ok) == 2:
        out.append(f"\n- 2 workers / 1 worker: x{ok[1]['trials_per_hour'] / ok[0]['trials_per_hour']:.2f} trials per hour")
    return "\n".join(out)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    args = p.parse_args(argv)
    res = {"machine": machine(), **measure(args.quick, args.data_dir)}
    md = markdown(res)
    write_results("scaling", res, md)
    print(md)
    return res


if __name__ == "__main__":
    main()
