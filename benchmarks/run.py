"""Run the trial-speed benchmarks and write one report: ``python benchmarks/run.py [--quick] [--only ...]``.

Sections (each also runs alone: ``python benchmarks/bench_<section>.py``):
  throughput  the trial trainer against a plain Keras fit, same model and data, same process
  tracking    MLflow tracking overhead per trial, as seconds and as a share of the trial
  release     the garbage collections between trials, with the imported heap frozen and as before
  data        load time of every split, peak memory of a bymerge study, full-bymerge estimate
  study       Hyperband against no pruning: wall time, best accuracy, time to the seed's accuracy
  scaling     trials per hour with 1 and 2 workers

``--quick`` is CI-sized (minutes); the full run takes about 3 hours on 2 cores (the
study section alone ~2.5 h: 20-trial studies of 10-epoch trials on the full balanced sample).
Results: ``benchmarks/results/<section>.{json,md}`` and ``benchmarks/results/benchmarks.md``
(git-ignored); the Markdown report is printed too.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DEFAULT_DATA, RESULTS, log  # noqa: E402

SECTIONS = {
    "throughput": ("bench_throughput", "Training throughput: trial trainer vs plain Keras fit"),
    "tracking": ("bench_tracking", "Tracking overhead per trial"),
    "release": ("bench_release", "Releasing memory between trials: garbage collections"),
    "data": ("bench_data", "Data loading and peak memory"),
    "study": ("bench_study", "Study efficiency: pruners against no pruning"),
    "fidelity": ("bench_fidelity", "Low-fidelity scores against the full-budget score (rank correlation)"),
    "scaling": ("bench_scaling", "Scaling: 1 and 2 workers"),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI-sized runs (fewer samples, trials and repetitions)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections ({', '.join(SECTIONS)})")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="NIST-format EMNIST (default ../shared/emnist/sample)")
    p.add_argument("--full-size", action="store_true", help="data: also measure a synthetic full-size bymerge study")
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in chosen if s not in SECTIONS]
    if bad:
        p.error(f"--only: unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    report, everything = [], {}
    for name in chosen:
        module, title = SECTIONS[name]
        log(f"--- {name}")
        t = time.perf_counter()
        sub = ["--data-dir", args.data_dir] + (["--quick"] if args.quick else [])
        if name == "data" and args.full_size:
            sub.append("--full-size")
        res = importlib.import_module(module).main(sub)
        everything[name] = res
        md = (RESULTS / f"{name}.md").read_text()
        report.append(f"### {title}\n\n{md}\n_({time.perf_counter() - t:.0f} s)_\n")
    m = next(iter(everything.values()))["machine"]
    head = (f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, bf16 units: "
            f"{', '.join(m['bf16_units']) or 'none'}), Python {m['python']}, Keras {m['keras']} "
            f"({m['backend']}{' ' + m['tensorflow'] if m.get('tensorflow') else ''}"
            f"{', oneDNN ' + ('on' if m['onednn'] else 'off') if 'onednn' in m else ''}); load average at start "
            f"{m['load_average']}. Command: `python benchmarks/run.py{' --quick' if args.quick else ''}"
            f"{' --full-size' if args.full_size else ''}{'' if len(chosen) == len(SECTIONS) else ' --only ' + ','.join(chosen)}`.\n")
    text = head + "\n" + "\n".join(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "benchmarks.md").write_text(text)
    (RESULTS / "benchmarks.json").write_text(json.dumps(everything, indent=2, default=str) + "\n")
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
