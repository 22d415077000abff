"""What releasing memory between trials costs: the garbage collector's scans, with the imported heap frozen or not.

A study trains hundreds of models in one process and frees each before the next (``release_memory``: Keras'
``clear_session``, which runs a full garbage collection, and Optuna's ``gc_after_trial``, another). A full
collection scans every object the process holds, ~650,000 of them in a study process (TensorFlow, Keras, MLflow
and Optuna's modules, the stores). Since 80a5aa8 the first release freezes what is alive then (``gc.freeze``), so every later collection
scans only what came after; before, a second collection ran in ``release_memory`` too.

Each run is a child process running the same real study (``run_study``: sampled trials, TPE seeded alike, no
pruning, 1 epoch on a subset of the balanced sample, MLflow tracking on, no final fit), with ``release_memory`` as
it is now (``frozen``) or as it was (``before``: nothing frozen, a second ``gc.collect``), in turns. Reported per
run: the study's wall time from the first trial's start to the last trial's end, the median trial, and the
seconds spent in garbage collections (every ``gc.collect`` call: Keras', Optuna's and the trainer's), per trial.

    python benchmarks/bench_release.py [--quick] [--trials 12] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import DEFAULT_DATA, PYTHON, load_now, log, machine, median, run_child, table, write_results  # noqa: E402

VARIANTS = ("frozen", "before")

CHILD = r"""
import contextlib, ctypes, gc, json, sys, time
variant, root, data_dir, trials, samples = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
from emnist_hpo.cli import import_keras_quietly
import_keras_quietly()
import keras, optuna
from emnist_hpo.search import finalize
from emnist_hpo.search.optuna.study import StudyOptions, run_study
from emnist_hpo.train import probe, trainer

collect, spent = gc.collect, []

def timed_collect(*a, **kw):
    t = time.perf_counter()
    try:
        return collect(*a, **kw)
    finally:
        spent.append(time.perf_counter() - t)

gc.collect = timed_collect  # Keras' clear_session, Optuna's gc_after_trial and the trainer look it up here

def before():  # release_memory as it was before 80a5aa8
    keras.backend.clear_session()
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)

if variant == "before":
    for module in (trainer, probe, finalize):
        module.release_memory = before
opts = StudyOptions(split="balanced", trials=trials, epochs=1, max_train_samples=samples, data_dir=data_dir,
                    storage=f"sqlite:///{root}/optuna.db", tracking_uri=f"sqlite:///{root}/mlflow.db",
                    study_name="release", pruner="none", finalists=0, final_fit=False, register=False,
                    progress=False, warm_start=False, seed=0, checkpoint_dir=f"{root}/ckpt")
run_study(opts, log=lambda m: None)
study = optuna.load_study(study_name="release", storage=opts.storage)
done = [t for t in study.trials if t.datetime_complete is not None]
walls = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
print("RESULT " + json.dumps({"trials": len(done), "span_s": span, "trial_median_s": sorted(walls)[len(walls) // 2],
                              "collections": len(spent), "collect_s": sum(spent), "frozen": gc.get_freeze_count()}))
"""


def run_once(variant: str, data_dir: str, trials: int, samples: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        load0 = load_now()
        r = run_child([PYTHON, "-c", CHILD, variant, tmp, data_dir, str(trials), str(samples)], cwd=Path(tmp),
                      env={"EMNIST_HPO_CACHE": str(Path(tmp) / "cache")})
        if r["rc"]:
            raise RuntimeError(f"{variant} run failed: {r['tail']}")
        line = next(x for x in r["tail"].splitlines()[::-1] if x.startswith("RESULT "))
        return {"variant": variant, "load_start": load0, "load_end": load_now(), **json.loads(line[len("RESULT "):])}


def markdown(res: dict[str, Any]) -> str:
    rows = [[r["variant"], r["trials"], r["span_s"], r["trial_median_s"], r["collections"],
             r["collect_s"] / r["trials"], r["frozen"], f"{r['load_start']}-{r['load_end']}"] for r in res["runs"]]
    out = [f"A study of {res['trials']} sampled 1-epoch trials on {res['samples']:,} balanced images, no pruning, "
           "in child processes taken in turns.\n",
           table(["release", "trials", "first start to last end s", "median trial s", "gc.collect calls",
                  "collection s per trial", "objects frozen", "load"], rows), ""]
    for v in VARIANTS:
        out.append(f"- {v}: study span median {res['summary'][v]['span_s']:.1f} s, collections "
                   f"{res['summary'][v]['collect_s_per_trial']:.3f} s per trial")
    return "\n".join(out)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="6 trials, one repetition")
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--samples", type=int, default=3000)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    args = p.parse_args(argv)
    trials, reps = (6, 1) if args.quick else (args.trials, args.reps)
    runs = []
    for rep in range(reps):
        for variant in VARIANTS:
            log(f"release benchmark: {variant}, repetition {rep + 1} of {reps}")
            runs.append(run_once(variant, args.data_dir, trials, args.samples))
    summary = {v: {"span_s": median(r["span_s"] for r in runs if r["variant"] == v),
                   "collect_s_per_trial": median(r["collect_s"] / r["trials"] for r in runs if r["variant"] == v)}
               for v in VARIANTS}
    res = {"machine": machine(), "trials": trials, "samples": args.samples, "runs": runs, "summary": summary}
    md = markdown(res)
    write_results("release", res, md)
    print(md)
    return res


if __name__ == "__main__":
    main()
