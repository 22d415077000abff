"""How well does the study's speed model predict a rung's wall time? Leave-one-out over real rungs.

Reads the rungs of finished studies (``optuna.db`` files, e.g. the ones ``bench_search.py`` leaves in its
``search-*`` folders), and for every rung fits :class:`~emnist_hpo.search.budget.Throughput` to all the other
rungs and predicts this one: with FLOPs alone, and with the batch-norm term (``norm``: training images x
elements through batch-norm, rebuilt from each trial's configuration where the study did not record it).
Prints the median and worst prediction error, and the median predicted/actual ratio of rungs with and without
batch-norm (a model that is right on average but 26% short on every batch-norm model refuses the wrong ones).

    python benchmarks/bench_speed_model.py /tmp/search-letters-1-*/optuna.db
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402

from _common import fmt, log, machine, table, write_results  # noqa: E402

from emnist_hpo.config import ExperimentConfig, load_experiment  # noqa: E402
from emnist_hpo.model.cost import model_cost  # noqa: E402
from emnist_hpo.paths import find_experiment, find_search_space  # noqa: E402
from emnist_hpo.search.budget import RungRecord, Throughput, rung_norm  # noqa: E402
from emnist_hpo.search.space import SearchSpace  # noqa: E402
from emnist_hpo.search.trial import SEED_ATTR  # noqa: E402


def rungs_of(db: str, space: SearchSpace) -> list[tuple[RungRecord, bool]]:
    """Every rung a trial trained itself (a continuation's earlier rungs belong to the trial it continues),
    with its batch-norm work, and whether the model has batch-norm."""
    url = f"sqlite:///{db}"
    out = []
    for name in optuna.study.get_all_study_names(url):
        for t in optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False):
            seed = t.user_attrs.get(SEED_ATTR)
            model = (load_experiment(find_experiment(seed)).model if seed
                     else space.sample(optuna.trial.FixedTrial(t.params), ExperimentConfig()).model)
            normalized = model_cost(model, 10).normalized  # per image: the classes do not change it
            for r in t.user_attrs.get("rungs") or []:
                if isinstance(r, dict) and r.get("trial", t.number) == t.number and "work" in r:
                    out.append((RungRecord(float(r["work"]), float(r["seconds"]),
                                           float(r.get("norm", rung_norm(int(r["images"]), normalized)))),
                                model.batch_norm))
    return out


def leave_one_out(records: list[RungRecord], with_norm: bool) -> list[float]:
    """Predicted over actual seconds of each rung, the model fitted to the others."""
    use = records if with_norm else [RungRecord(r.work, r.seconds) for r in records]
    ratios = []
    for i, r in enumerate(use):
        fit = Throughput.fit(use[:i] + use[i + 1:])
        ratios.append(fit.seconds(r.work, r.norm or 0.0) / r.seconds)
    return ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dbs", nargs="+", help="optuna.db files of finished studies")
    p.add_argument("--search-space", default="default", help="the space the studies sampled from")
    p.add_argument("--name", default="speed_model")
    args = p.parse_args()
    space = SearchSpace.load(find_search_space(args.search_space))
    rows = [x for db in args.dbs for x in rungs_of(db, space)]
    records, bn = [r for r, _ in rows], [b for _, b in rows]
    log(f"{len(records)} rungs ({sum(bn)} with batch-norm) from {len(args.dbs)} studies")
    results, out = {}, []
    for label, with_norm in (("FLOPs alone", False), ("FLOPs + batch-norm", True)):
        ratios = leave_one_out(records, with_norm)
        errors = [abs(math.log(x)) for x in ratios]
        fit = Throughput.fit(records if with_norm else [RungRecord(r.work, r.seconds) for r in records])
        res = {
            "median_error": math.exp(statistics.median(errors)) - 1, "worst_factor": math.exp(max(errors)),
            "bn_median_ratio": statistics.median(x for x, b in zip(ratios, bn) if b) if any(bn) else None,
            "plain_median_ratio": statistics.median(x for x, b in zip(ratios, bn) if not b) if not all(bn) else None,
            "overhead_s": fit.overhead, "gflops": fit.rate / 1e9, "ns_per_bn_element": fit.norm_cost * 1e9,
        }
        results[label] = res
        out.append([label, f"{res['median_error']:.0%}", f"{res['worst_factor']:.2f}x", fmt(res["bn_median_ratio"]),
                    fmt(res["plain_median_ratio"]), fmt(res["overhead_s"], 1), fmt(res["gflops"], 1),
                    fmt(res["ns_per_bn_element"], 1)])
    md = table(["speed model", "median error", "worst", "batch-norm rungs: predicted/actual", "others",
                "overhead s", "GFLOP/s", "ns per BN element"], out)
    print(md)
    write_results(args.name, {"machine": machine(), "args": vars(args), "rungs": len(records),
                              "with_batch_norm": sum(bn), "results": results}, md)


if __name__ == "__main__":
    main()
