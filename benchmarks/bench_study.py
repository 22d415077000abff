"""Study efficiency: Hyperband pruning against none, same sampler seed, same data, same trial budget.

Both studies run the default search space on the balanced sample, without warm start (the
seed model would otherwise be trial 0 and reach its own accuracy at once), with TPE seeded
alike, no finalist re-evaluation and no final fit: what is measured is the search. Reported
for each: wall time, best validation accuracy, trial states, and the wall time until a
finished trial first reached the validation accuracy of the research's 2-conv seed model
(trained here once on the same split with the same epoch budget and early stopping).

    python benchmarks/bench_study.py [--quick] [--trials 20] [--epochs 10] [--samples K]

``--epochs`` defaults to the study command's own (10): Hyperband's rungs are 1, 3 and 9 epochs
there, and a shorter budget leaves it little to cut (4 epochs: rungs 1 and 3 only).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import DEFAULT_DATA, ROOT, load_now, log, machine, table, write_results  # noqa: E402

from emnist_hpo.cli import import_keras_quietly  # noqa: E402

import_keras_quietly()

import optuna  # noqa: E402

from emnist_hpo.config import DataConfig, load_experiment  # noqa: E402
from emnist_hpo.data.prepared import prepare  # noqa: E402
from emnist_hpo.search.optuna.pruners import make_pruner  # noqa: E402
from emnist_hpo.train.fidelity import make_ladder  # noqa: E402
from emnist_hpo.search.optuna.study import StudyOptions, run_study  # noqa: E402
from emnist_hpo.train.trainer import train  # noqa: E402

PATIENCE = 3  # the study's default per-trial early stopping


def seed_accuracy(data_dir: str, samples: int | None, epochs: int) -> dict[str, Any]:
    """The 2-conv seed model on the studies' split, with their epoch budget and early stopping."""
    data = prepare("balanced", data_dir, DataConfig(max_train_samples=samples, seed=0), progress=False)
    cfg = copy.deepcopy(load_experiment(ROOT / "experiments" / "two_conv.yaml"))
    cfg.train.epochs, cfg.train.early_stopping_patience, cfg.train.seed = epochs, PATIENCE, 0
    t = time.perf_counter()
    r = train(cfg, data.x_train, data.y_train, data.x_val, data.y_val, data.num_classes)
    return {"val_accuracy": r.best_val_accuracy, "seconds": time.perf_counter() - t, "epochs": r.epochs_run,
            "train_size": len(data.x_train)}


def one_study(root: Path, data_dir: str, pruner: str, trials: int, epochs: int, samples: int | None,
              target: float) -> dict[str, Any]:
    name = f"efficiency-{pruner}"
    opts = StudyOptions(
        split="balanced", trials=trials, epochs=epochs, max_train_samples=samples, data_dir=data_dir,
        storage=f"sqlite:///{root}/optuna.db", tracking_uri=f"sqlite:///{root}/mlflow.db", study_name=name,
        pruner=pruner, warm_start=False, finalists=0, final_fit=False, register=False, progress=False,
        checkpoint_dir=str(root / "ckpt"), early_stopping_patience=PATIENCE, seed=0,
    )
    load0 = load_now()
    t = time.perf_counter()
    run_study(opts, log=lambda m: None)
    wall = time.perf_counter() - t
    study = optuna.load_study(study_name=name, storage=opts.storage)
    done = [tr for tr in study.trials if tr.datetime_complete is not None]
    start = min(tr.datetime_start for tr in done)
    search_s = (max(tr.datetime_complete for tr in done) - start).total_seconds()
    reached = None
    for tr in sorted(done, key=lambda tr: tr.datetime_complete):
        if tr.state.name == "COMPLETE" and tr.value is not None and tr.value >= target:
            reached = (tr.datetime_complete - start).total_seconds()
            break
    states: dict[str, int] = {}
    for tr in study.trials:
        states[tr.state.name] = states.get(tr.state.name, 0) + 1
    complete = [tr for tr in done if tr.state.name == "COMPLETE"]
    return {
        "pruner": pruner, "wall_s": wall, "search_s": search_s, "reached_seed_s": reached,
        "best_val_accuracy": max((tr.value for tr in complete), default=None), "states": states,
        "epochs_trained": sum(int(tr.user_attrs.get("epochs_run") or len(tr.intermediate_values)) for tr in done),
        "load_start": load0, "load_end": load_now(),
    }


def measure(quick: bool, data_dir: str, trials: int | None, epochs: int | None,
            samples: int | None = None, pruners: tuple[str, ...] = ("hyperband", "none"),
            target: float | None = None) -> dict[str, Any]:
    trials = trials or (6 if quick else 20)
    epochs = epochs or (2 if quick else StudyOptions("balanced").epochs)
    samples = samples or (3000 if quick else None)
    if target is None:
        seed = seed_accuracy(data_dir, samples, epochs)
        log(f"seed two_conv: val {seed['val_accuracy']:.4f} in {seed['seconds']:.0f} s")
    else:  # an earlier run's figure, so studies run apart share one target
        train_size = len(prepare("balanced", data_dir, DataConfig(max_train_samples=samples, seed=0),
                                 progress=False).x_train)
        seed = {"val_accuracy": target, "seconds": float("nan"), "epochs": epochs, "train_size": train_size}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pruner in pruners:
            r = one_study(Path(tmp), data_dir, pruner, trials, epochs, samples, seed["val_accuracy"])
            rows.append(r)
            log(f"study pruner={pruner}: {r['wall_s']:.0f} s, best {r['best_val_accuracy']}, "
                f"reached seed at {r['reached_seed_s']}")
    hb = make_pruner("hyperband", make_ladder("epochs", epochs, 10_000, 47))  # Hyperband over epochs: its rungs
    hb._try_initialization(optuna.create_study())  # noqa: SLF001 - only to describe its brackets
    brackets = [[hb._min_resource * hb._reduction_factor ** (i + k) for k in range(9)  # noqa: SLF001
                 if hb._min_resource * hb._reduction_factor ** (i + k) < epochs] for i in range(hb._n_brackets)]  # noqa: SLF001
    return {"trials": trials, "epochs": epochs, "samples": samples, "seed": seed, "studies": rows,
            "hyperband_rungs": brackets}


def markdown(res: dict[str, Any]) -> str:
    s = res["seed"]
    rungs = "; ".join("epochs " + ", ".join(map(str, b)) if b else "none" for b in res.get("hyperband_rungs", []))
    out = [f"Study efficiency, balanced sample ({s['train_size']:,} training images), {res['trials']} trials of up "
           f"to {res['epochs']} epochs (early stopping patience {PATIENCE}; Hyperband brackets' rungs: {rungs}), "
           f"default search space, TPE seed 0, "
           f"no warm start. Target: the 2-conv seed model's validation accuracy on the same split and budget, "
           f"{s['val_accuracy']:.4f} ({s['epochs']} epochs, {s['seconds']:.0f} s).\n"]
    out.append(table(
        ["pruner", "study wall s", "search s", "epochs trained", "best val accuracy", "time to reach the seed's accuracy s",
         "trials (states)", "machine load"],
        [[r["pruner"], r["wall_s"], r["search_s"], r["epochs_trained"],
          f"{r['best_val_accuracy']:.4f}" if r["best_val_accuracy"] is not None else "-",
          r["reached_seed_s"] if r["reached_seed_s"] is not None else "not reached",
          ", ".join(f"{k.lower()} {v}" for k, v in sorted(r["states"].items())), f"{r['load_start']}-{r['load_end']}"]
         for r in res["studies"]]))
    by = {r["pruner"]: r for r in res["studies"]}
    if by.get("hyperband") and by.get("none"):
        h, n = by["hyperband"], by["none"]
        out.append(f"\n- Hyperband / no pruning: wall time x{h['search_s'] / n['search_s']:.2f}, epochs trained "
                   f"x{h['epochs_trained'] / max(1, n['epochs_trained']):.2f}")
        if h["reached_seed_s"] and n["reached_seed_s"]:
            out.append(f"- time to the seed model's accuracy: x{h['reached_seed_s'] / n['reached_seed_s']:.2f} "
                       "(target: at most 0.5)")
    return "\n".join(out)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--trials", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None, help="max epochs per trial (the study's default, 10)")
    p.add_argument("--samples", type=int, default=None, help="stratified subset of K images of the split (all)")
    p.add_argument("--pruners", default="hyperband,none", help="pruners to compare (hyperband,none)")
    p.add_argument("--target", type=float, default=None,
                   help="validation accuracy to reach (default: train the 2-conv seed model for it)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    args = p.parse_args(argv)
    res = {"machine": machine(), **measure(args.quick, args.data_dir, args.trials, args.epochs, args.samples,
                                               tuple(args.pruners.split(",")), args.target)}
    md = markdown(res)
    write_results("study", res, md)
    print(md)
    return res


if __name__ == "__main__":
    main()
