"""Weight averaging: what a run's validation says and what the model it ends with scores on test, with and without.

Trains configurations up a study's ladder on the training share only (validated on the held-out share, every
epoch of the last rung), with ``train.average_epochs`` 0 (off) and the study's default, and tests the model each
run ends with. The configurations: the compact seed and, with ``--champion FILE`` (a ``bench_search.py`` results
file), the champion its study crowned. A run at a constant learning rate swings from epoch to epoch; averaged,
what is validated is the model the run ends with, and its score says what the final fit will deliver.

    python benchmarks/bench_averaging.py --split letters --seed 1 \
        --champion benchmarks/proof/letters-s1-amd-db39fe8-seeds.json
    python benchmarks/bench_averaging.py --quick       # digits, 3,000 images, a 2-rung ladder: a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402

from _common import DEFAULT_DATA, fmt, log, machine, table, write_results  # noqa: E402
from emnist_hpo.config import DataConfig, load_experiment  # noqa: E402
from emnist_hpo.data.prepared import prepare  # noqa: E402
from emnist_hpo.options import StudyOptions  # noqa: E402
from emnist_hpo.paths import find_experiment, find_search_space  # noqa: E402
from emnist_hpo.search.space import SearchSpace  # noqa: E402
from emnist_hpo.train.fidelity import Ladder, Rung  # noqa: E402
from emnist_hpo.train.trainer import predict_proba, train  # noqa: E402


def ladder_of(spec: str) -> Ladder:
    """``"0.83:2,1:5,1:15"``: each rung's share of the training images and its epochs, the last one final."""
    rungs = [tuple(float(x) for x in r.split(":")) for r in spec.split(",")]
    return Ladder(tuple(Rung(f, int(e), 3**i, final=i == len(rungs) - 1) for i, (f, e) in enumerate(rungs)), 3, "data")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", default="letters")
    p.add_argument("--seed", type=int, default=1, help="the data split's and the training's seed (a study's --seed)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--champion", default=None, help="a bench_search.py results file whose champion to train too")
    p.add_argument("--ladder", default="0.83:2,1:5,1:15",
                   help="share:epochs per rung (default: a 30-minute letters study's ladder)")
    p.add_argument("--averages", default=f"0,{StudyOptions.average_epochs}", help="train.average_epochs values")
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--name", default="averaging")
    a = p.parse_args()
    if a.quick:
        a.split, a.max_train, a.ladder = "digits", 3000, "0.5:1,1:2"
    ladder = ladder_of(a.ladder)
    data = prepare(a.split, a.data_dir, DataConfig(val_fraction=0.2, seed=a.seed, max_train_samples=a.max_train),
                   progress=False)
    space = SearchSpace.load(find_search_space("default"))
    base = StudyOptions(split=a.split, seed=a.seed, epochs=ladder.final.epochs).base_config()
    configs = {"compact": space.sample(optuna.trial.FixedTrial(space.params_for(load_experiment(find_experiment("compact")))), base)}
    if a.champion:
        run = json.loads(Path(a.champion).read_text())["results"][0]
        found = run.get("seeds") or run.get("search")
        configs[f"champion (trial {found['champion_trial']})"] = space.sample(
            optuna.trial.FixedTrial(found["champion_config"]), base)
    rows = []
    for name, cfg in configs.items():
        for avg in (float(x) for x in a.averages.split(",")):
            c = copy.deepcopy(cfg)
            c.train.average_epochs = avg
            t0 = time.perf_counter()
            res = train(c, data.x_train, data.y_train, data.x_val, data.y_val, data.num_classes, ladder=ladder)
            test = float((predict_proba(res.model, data.x_test).argmax(1) == data.y_test).mean())
            last = [v for v, r in zip(res.history["val_accuracy"], res.history["rung"]) if int(r) == len(ladder.rungs) - 1]
            rows.append({"model": name, "schedule": c.train.schedule, "learning_rate": c.train.learning_rate,
                         "average_epochs": avg, "last_rung_validation": last, "val_score": res.val_score,
                         "peak": res.best_val_accuracy, "test_accuracy": test,
                         "seconds": time.perf_counter() - t0})
            log(f"{name}, average_epochs {avg}: validation ended {100 * res.val_score:.2f}% "
                f"(last rung {100 * min(last):.2f}-{100 * max(last):.2f}%), test {100 * test:.2f}%")
    head = ["model", "schedule", "average_epochs", "last rung's validation, range", "val_score (last epoch)",
            "test of the model it ended with", "s"]
    body = [[r["model"], f"{r['schedule']} {r['learning_rate']:.2g}", fmt(r["average_epochs"]),
             f"{100 * min(r['last_rung_validation']):.2f}-{100 * max(r['last_rung_validation']):.2f}",
             f"{100 * r['val_score']:.2f}", f"{100 * r['test_accuracy']:.2f}", fmt(r["seconds"], 0)] for r in rows]
    md = (f"# Weight averaging: {a.split}, seed {a.seed}, ladder {a.ladder}, train share only\n\n"
          + table(head, body) + "\n")
    print(md)
    write_results(a.name, {"machine": machine(), "args": vars(a), "rows": rows}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
