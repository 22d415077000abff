"""Can a low-fidelity score be trusted? Rank correlation of each rung's score with the full-budget score.

Samples ``--configs`` models from the default search space (random sampler, seeded;
``--max-flops``/``--max-params`` as a study would apply them), trains each up the
whole ``data`` ladder of a study with no pruning (every rung's score recorded on the
way), and reports Spearman's rho between each rung's score and the final rung's best
score: the signal successive halving prunes on. Rung-0 variants are trained from
scratch beside it to show what each choice is worth:

- ``no precise BN, momentum 0.99``: validation with Keras' default batch-norm
  momentum and no recomputed statistics (the project before this benchmark);
- ``a third of rung 0``: two passes over a third of rung 0's share (the budget of one
  rung further down: below ``MIN_RUNG_SEEN``).

    python benchmarks/bench_fidelity.py --split balanced --configs 32 --epochs 8
    python benchmarks/bench_fidelity.py --quick      # 6 configs, 2 epochs: a smoke run
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from _common import DEFAULT_DATA, log, machine, table, write_results  # noqa: E402
from emnist_hpo.train import trainer as training  # noqa: E402
from emnist_hpo.config import DataConfig, ExperimentConfig, TrainConfig  # noqa: E402
from emnist_hpo.model.cost import human, model_cost  # noqa: E402
from emnist_hpo.data.prepared import prepare  # noqa: E402
from emnist_hpo.train.fidelity import Ladder, Rung, make_ladder  # noqa: E402
from emnist_hpo.search.trial import Limits  # noqa: E402
from emnist_hpo.paths import find_search_space  # noqa: E402
from emnist_hpo.search.space import SearchSpace  # noqa: E402
from emnist_hpo.train.trainer import train  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


def rung0_only(fraction: float, epochs: int, eta: int) -> Ladder:
    """A ladder of one screening rung (scored at its end on the rung's share of the validation set)."""
    return Ladder((Rung(fraction, epochs, 1, final=fraction >= 1),), eta, "data")


def rho(xs, ys) -> float:
    pairs = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return float("nan")
    return float(spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", default="balanced")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--configs", type=int, default=32)
    p.add_argument("--epochs", type=int, default=10, help="epochs of the full-fidelity rung (the study's default)")
    p.add_argument("--max-flops", type=float, default=25e6)
    p.add_argument("--max-params", type=int, default=None)
    p.add_argument("--space", default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.configs, args.epochs = 6, 2

    data = prepare(args.split, args.data_dir, DataConfig(), progress=False)
    n, nv = len(data.y_train), len(data.y_val)
    ladder = make_ladder("data", args.epochs, n, data.num_classes)
    r0 = ladder.rungs[0]
    log(ladder.describe(n, nv))
    space = SearchSpace.load(find_search_space(args.space))
    limits = Limits(args.max_params, int(args.max_flops) if args.max_flops else None)
    sampler = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))
    base = ExperimentConfig(train=TrainConfig(epochs=args.epochs, early_stopping_patience=3))
    variants = {
        "rung 0 without precise BN, momentum 0.99 (before)": ("nobn", rung0_only(r0.fraction, r0.epochs, ladder.eta)),
        "a third of rung 0's images (one rung further down)": ("small", rung0_only(r0.fraction / 3, r0.epochs,
                                                                                    ladder.eta)),
    }
    rows = []
    t_start = time.perf_counter()
    while len(rows) < args.configs:
        trial = sampler.ask()
        cfg = space.sample(trial, base)
        cost = model_cost(cfg.model, data.num_classes)
        if limits.refuse(cost):
            continue
        cfg.train.seed = args.seed + len(rows)
        row = {"config": len(rows), "params": cost.params, "flops": cost.flops, "batch_norm": cfg.model.batch_norm,
               "optimizer": cfg.train.optimizer, "batch_size": cfg.train.batch_size}
        t0 = time.perf_counter()
        res = train(cfg, data.x_train, data.y_train, data.x_val, data.y_val, data.num_classes, ladder=ladder)
        row["seconds_ladder"] = round(time.perf_counter() - t0, 1)
        for r in res.rungs:
            row[f"rung{r.index}"] = r.score
            row[f"rung{r.index}_s"] = round(r.seconds, 2)
        row["final"] = res.val_score  # what the search ranks a full run by: its last epoch (its peak before db39fe8)
        for label, (key, lad) in variants.items():
            c = copy.deepcopy(cfg)
            old = training.PRECISE_BN_IMAGES
            if key == "nobn":
                c.model.bn_momentum = 0.99
                training.PRECISE_BN_IMAGES = 0
            try:
                t0 = time.perf_counter()
                v = train(c, data.x_train, data.y_train, data.x_val, data.y_val, data.num_classes, ladder=lad)
                row[key] = v.rungs[0].score if v.rungs else float("nan")
                row[f"{key}_s"] = round(time.perf_counter() - t0, 2)
            finally:
                training.PRECISE_BN_IMAGES = old
        rows.append(row)
        log(f"config {row['config']}: {human(cost.params)} params {human(cost.flops)} FLOPs bn={cfg.model.batch_norm} "
            + " ".join(f"r{i}={row.get(f'rung{i}', float('nan')):.3f}" for i in range(len(ladder.rungs)))
            + f" final={row['final']:.3f} | nobn={row['nobn']:.3f} small={row['small']:.3f}"
            + f" ({row['seconds_ladder']:.0f} s)")

    final = [r["final"] for r in rows]
    bn = [r for r in rows if r["batch_norm"]]
    results = []
    for i in range(len(ladder.rungs) - 1):
        results.append((f"rung {i} of the ladder (the study's screening)", ladder.rungs[i].fraction,
                        ladder.rungs[i].epochs, rho([r[f"rung{i}"] for r in rows], final),
                        rho([r[f"rung{i}"] for r in bn], [r["final"] for r in bn]),
                        sum(r.get(f"rung{i}_s", 0) for r in rows) / len(rows)))
    for label, (key, lad) in variants.items():
        results.append((label, lad.rungs[0].fraction, lad.rungs[0].epochs, rho([r[key] for r in rows], final),
                        rho([r[key] for r in bn], [r["final"] for r in bn]),
                        sum(r[f"{key}_s"] for r in rows) / len(rows)))
    md = [f"# Low-fidelity scores against the full-budget score ({args.split} sample)", "",
          f"{len(rows)} configurations sampled from `search_spaces/{args.space}.yaml` (random, seed {args.seed}; "
          f"max FLOPs {human(args.max_flops) if args.max_flops else '-'}, {len(bn)} with batch-norm), each trained "
          f"up the whole ladder without pruning: {ladder.describe(n, nv)}. Full-budget score: the last rung's best "
          f"validation accuracy. {time.perf_counter() - t_start:.0f} s in all.", "",
          table(["rung score", "data share", "epochs", "Spearman rho (all)", "rho (batch-norm models)", "s per config"],
                [[r[0], f"{r[1]:.3f}", r[2], f"{r[3]:.2f}", f"{r[4]:.2f}", f"{r[5]:.1f}"] for r in results]), ""]
    data_out = {"machine": machine(), "args": vars(args), "ladder": ladder.to_dict(), "rows": rows,
                "spearman": [{"score": r[0], "fraction": r[1], "epochs": r[2], "rho": r[3], "rho_bn": r[4],
                              "seconds": r[5]} for r in results]}
    json_path, md_path = write_results("fidelity", data_out, "\n".join(md))
    print("\n".join(md))
    log(f"wrote {json_path} and {md_path}")
    return data_out


if __name__ == "__main__":
    main()
