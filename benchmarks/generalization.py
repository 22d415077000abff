"""Champions that generalize: emnist-hpo's study against Optuna wired by hand, same budget.

    python benchmarks/generalization.py --split balanced --budget-minutes 20 --seeds 0,1,2 \
        --data-dir ../shared/emnist/sample

For each seed, both searches get the same wall-clock budget on the same data:
- peer: TPE + median pruning over a typical hand-written Keras space, up to 8 epochs, the
  best single validation score crowned (as tutorials and the MLflowCallback recipe do);
- emnist-hpo: ``run_study`` with finalist re-evaluation, a final fit on train+validation and a
  parameter cap of a quarter of the research's 2-conv model; its ``timeout`` is the whole budget
  (the search stops in time for the re-evaluation and the final fit).
Reported per run: champion test accuracy, parameters, the validation-to-test gap, wall time;
then means and spread, next to the research's 2-conv recipe trained on the same data.
Writes JSON and Markdown to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emnist_hpo.cli import import_keras_quietly  # noqa: E402

import_keras_quietly()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402

from emnist_hpo.config import DataConfig, load_experiment  # noqa: E402
from emnist_hpo.data.prepared import prepare  # noqa: E402
from emnist_hpo.search.optuna.study import StudyOptions, run_study  # noqa: E402
from emnist_hpo.train.trainer import predict_proba, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE_PARAMS = 928_947  # the 2-conv recipe on 47 classes


def forward_flops(model) -> int:
    """Forward FLOPs per image of a built Keras CNN's conv and dense layers (multiply-add = 2), the convention
    of emnist_hpo.model.cost."""
    flops = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw, cin, cout = layer.kernel.shape
            _, h, w, _ = layer.output.shape
            flops += 2 * kh * kw * cin * cout * h * w
        elif isinstance(layer, keras.layers.Dense):
            cin, cout = layer.kernel.shape
            flops += 2 * cin * cout
    return int(flops)


def peer(data, budget_s: float, seed: int) -> dict:
    """Optuna by hand: float32 inputs, TPE + MedianPruner, best single validation score wins."""
    xtr = data.x_train.astype("float32")[..., None] / 255.0
    xva = data.x_val.astype("float32")[..., None] / 255.0
    best = {"val": -1.0, "model": None}

    def objective(trial):
        keras.utils.set_random_seed(seed * 1000 + trial.number)
        m = keras.Sequential([keras.Input((28, 28, 1))])
        for i in range(trial.suggest_int("n_conv", 1, 3)):
            m.add(keras.layers.Conv2D(trial.suggest_categorical(f"filters_{i}", [32, 64, 128]), 3, activation="relu",
                                      padding="same"))
            m.add(keras.layers.MaxPooling2D())
        m.add(keras.layers.Flatten())
        m.add(keras.layers.Dense(trial.suggest_categorical("dense", [128, 256, 512]), activation="relu"))
        m.add(keras.layers.Dropout(trial.suggest_float("dropout", 0.0, 0.5)))
        m.add(keras.layers.Dense(data.num_classes, activation="softmax"))
        m.compile(keras.optimizers.Adam(trial.suggest_float("lr", 1e-4, 1e-2, log=True)),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])
        top = 0.0
        for epoch in range(8):
            h = m.fit(xtr, data.y_train, batch_size=128, epochs=1, validation_data=(xva, data.y_val), verbose=0)
            top = max(top, h.history["val_accuracy"][0])
            trial.report(top, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        if top > best["val"]:
            best.update(val=top, model=m)
        return top

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner())
    t0 = time.perf_counter()
    study.optimize(objective, timeout=budget_s)
    m = best["model"]
    test = float((m.predict(data.x_test.astype("float32")[..., None] / 255.0, verbose=0).argmax(1)
                  == data.y_test).mean())
    return {"engine": "optuna-by-hand", "seed": seed, "trials": len(study.trials), "val": best["val"],
            "test": test, "params": int(m.count_params()), "flops": forward_flops(m), "gap": best["val"] - test,
            "seconds": time.perf_counter() - t0}


def ours(split: str, data_dir: str | None, budget_s: float, seed: int, work: Path) -> dict:
    t0 = time.perf_counter()
    res = run_study(StudyOptions(
        split=split, trials=100_000, epochs=15, data_dir=data_dir, timeout=budget_s, seed=seed,
        storage=f"sqlite:///{work}/optuna.db", tracking_uri=f"sqlite:///{work}/mlflow.db",
        study_name=f"generalization-{seed}", finalists=3, folds=2, max_params=RECIPE_PARAMS // 4,
        checkpoint_dir=str(work / "ckpt"), progress=False,
    ), log=lambda m: print(f"[emnist-hpo seed {seed}] {m}", file=sys.stderr, flush=True))
    chosen = res.chosen
    val = chosen.mean if chosen else res.val_accuracy
    return {"engine": "emnist-hpo", "seed": seed, "trials": len(res.study.trials), "val": val,
            "single_val": res.val_accuracy, "test": res.test_accuracy, "params": res.params,
            "gap": val - res.test_accuracy, "seconds": time.perf_counter() - t0}


def recipe(split: str, data_dir: str | None, seed: int) -> dict:
    cfg = load_experiment(ROOT / "experiments" / "two_conv.yaml")
    cfg.train.seed = seed
    d = prepare(split, data_dir, DataConfig(seed=seed), progress=False)
    r = train(cfg, d.x_train, d.y_train, d.x_val, d.y_val, d.num_classes)
    test = float((predict_proba(r.model, d.x_test).argmax(1) == d.y_test).mean())
    return {"engine": "2-conv recipe", "seed": seed, "val": r.best_val_accuracy, "test": test, "params": r.params,
            "gap": r.best_val_accuracy - test, "seconds": r.train_seconds, "trials": 1}


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for engine in dict.fromkeys(r["engine"] for r in rows):
        rs = [r for r in rows if r["engine"] == engine]

        def ms(key):
            vals = [r[key] for r in rs]
            return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

        out.append({"engine": engine, "runs": len(rs), "test": ms("test"), "params": ms("params"), "gap": ms("gap"),
                    "trials": ms("trials"), "seconds": ms("seconds")})
    return out


def markdown(summary: list[dict], args) -> str:
    lines = [f"Split {args.split} ({args.data_dir or 'default data'}), budget {args.budget_minutes} min per search, "
             f"seeds {args.seeds}", "",
             "| engine | runs | test accuracy | parameters | val-to-test gap | trials | wall s |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['engine']} | {s['runs']} | {s['test'][0]:.2%} +/- {s['test'][1]:.2%} | "
                     f"{s['params'][0]:,.0f} | {s['gap'][0]*100:+.2f} pt +/- {s['gap'][1]*100:.2f} | "
                     f"{s['trials'][0]:.0f} | {s['seconds'][0]:.0f} |")
    return "\n".join(lines)


def one(args) -> dict:
    """One role for one seed, in this process (the parent runs roles as child processes)."""
    seed = args.seed
    if args.role == "recipe":
        return recipe(args.split, args.data_dir, seed)
    if args.role == "peer":
        data = prepare(args.split, args.data_dir, DataConfig(seed=seed), progress=False)
        return peer(data, args.budget_minutes * 60, seed)
    with tempfile.TemporaryDirectory() as tmp:
        return ours(args.split, args.data_dir, args.budget_minutes * 60, seed, Path(tmp))


def spawn(args, role: str, seed: int, threads: int, out: Path) -> subprocess.Popen:
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS=str(threads), TF_NUM_INTEROP_THREADS="1")
    cmd = [sys.executable, __file__, "--role", role, "--seed", str(seed), "--split", args.split,
           "--budget-minutes", str(args.budget_minutes), "--row-file", str(out)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    return subprocess.Popen(cmd, env=env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="balanced")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--budget-minutes", type=float, default=20.0)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--no-recipe", action="store_true", help="skip training the 2-conv recipe for reference")
    ap.add_argument("--sequential", action="store_true",
                    help="run the two searches one after the other with every core each (default: side by side, "
                         "half the cores each, so both see the same machine load)")
    ap.add_argument("--role", choices=["peer", "ours", "recipe"], help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--row-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:
        row = one(args)
        Path(args.row_file).write_text(json.dumps(row))
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    cores = os.cpu_count() or 1
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def collect(jobs):
        for proc, path in jobs:
            if proc.wait() != 0:
                raise SystemExit(f"a benchmark process failed (exit {proc.returncode}): {path.name}")
            rows.append(json.loads(path.read_text()))
            print(json.dumps(rows[-1]), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            jobs = []
            for role in ("peer", "ours"):
                path = Path(tmp) / f"{role}-{seed}.json"
                threads = cores if args.sequential else max(1, cores // 2)
                jobs.append((spawn(args, role, seed, threads, path), path))
                if args.sequential:
                    collect(jobs)
                    jobs = []
            collect(jobs)
        if not args.no_recipe:
            for i in range(0, len(seeds), 2):
                jobs = []
                for seed in seeds[i:i + 2]:
                    path = Path(tmp) / f"recipe-{seed}.json"
                    jobs.append((spawn(args, "recipe", seed, max(1, cores // 2), path), path))
                collect(jobs)
    summary = summarize(rows)
    md = markdown(summary, args)
    (out / "generalization.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    (out / "generalization.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
