"""Does the search, not a hand-written seed, find the champion within a user's budget?

    python benchmarks/bench_search.py --splits balanced,letters,byclass --seeds 0,1 --budget-minutes 30
    python benchmarks/bench_search.py --quick        # balanced, one seed, 4-minute budgets: a smoke run

For each split and seed, on the sample beside the repository, one process at a time (2 cores each):

- ``compact alone``: the hand-written compact seed (experiments/compact.yaml) trained with the study's own
  final fit (train+validation, the same fidelity ladder, ``--epochs`` at the last rung) and tested once:
  what a user gets without any search;
- ``search, no seeds``: ``python -m emnist_hpo study --no-warm-start --timeout BUDGET --max-params P``
  (P = compact's parameter count for the split's classes by default: the search must find a model no
  larger than the seed);
- ``search, seeds first``: the same with the research's seeds and compact enqueued first (the default).

Reported per run: champion test accuracy, parameters, FLOPs per image, whether the champion was sampled (not a
seed), configurations screened (trials that trained at least one rung) and per hour, trials per rung reached
and seconds trained at each (:func:`rung_seconds`), the full-length runs (:func:`last_rung_runs`), wall time
and its overrun of the budget, and the champion against compact alone on the same test images
(:func:`paired`). ``--runs ...,hand`` adds Optuna wired by hand under the same budget
(benchmarks/generalization.py's peer; its overrun is its search's, data loading excluded). ``--old-rev REV``
adds the project's previous default (a git revision of this repository, run from a temporary worktree) for the
screening rate. Each cell is judged by issue 12's bars (:func:`bar_met`), and the cells' paired differences
are pooled (:func:`pooled`). Writes JSON and Markdown to benchmarks/results/.

    python benchmarks/bench_search.py --summarize benchmarks/proof/*.json

runs nothing: one grid from cells run one at a time (a full grid is ~6 hours on 2 cores), each row with its
machine and commit; the bars and the pooled differences count each cell's latest run once
(:func:`latest_of`). benchmarks/proof/ keeps the results files of the cells the README reports.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import DEFAULT_DATA, PYTHON, ROOT, log, machine, table, write_results  # noqa: E402

from emnist_hpo.search.optuna.promotions import CLOSING_ATTR, records_of, rung_table  # noqa: E402


def compact_alone(split: str, seed: int, epochs: int, data_dir: str, predictions: Path) -> dict:
    """The compact seed trained exactly as a champion is finally fitted, then tested once (in a child process);
    its predicted test labels are saved to ``predictions`` (.npy) for :func:`paired`."""
    code = f"""
import json, time
import numpy as np
from emnist_hpo.cli import import_keras_quietly; import_keras_quietly()
from emnist_hpo.config import DataConfig, load_experiment
from emnist_hpo.data.prepared import prepare
from emnist_hpo.model.cost import model_cost
from emnist_hpo.paths import find_experiment
from emnist_hpo.reporting.evaluation import evaluate
from emnist_hpo.search.finalize import Champion, final_model
from emnist_hpo.train.fidelity import make_ladder
from emnist_hpo.train.trainer import predict_proba
data = prepare({split!r}, {data_dir!r}, DataConfig(seed={seed}), progress=False)
cfg = load_experiment(find_experiment("compact"))
cfg.train.seed = {seed}
cfg.train.epochs = {epochs}
ladder = make_ladder("data", {epochs}, len(data.y_train), data.num_classes)
t0 = time.perf_counter()
model, _, fit = final_model(Champion(0, cfg, float("nan"), "none"), data, ladder, True)
seconds = time.perf_counter() - t0
proba = predict_proba(model, data.x_test)
np.save({str(predictions)!r}, proba.argmax(axis=1))
ev = evaluate(data.y_test, proba, data.classes)
cost = model_cost(cfg.model, data.num_classes)
print("RESULT " + json.dumps({{"test_accuracy": ev.accuracy, "params": cost.params, "flops": cost.flops,
                              "seconds": seconds}}))
"""
    return child_result(code, "compact alone")


def child_result(code: str, what: str) -> dict:
    """Run ``code`` in a child Python process (one model's memory freed with it) and return the JSON it printed on
    its ``RESULT`` line; a child that printed none fails with ``what`` and the end of its stderr."""
    res = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{what} failed:\n{res.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def champion_predictions(split: str, seed: int, data_dir: str, tracking_uri: str, out: Path) -> None:
    """The registered champion's predicted test labels (``models:/emnist-<split>@champion``) and the true ones,
    saved to ``out`` (.npz: ``pred``, ``y``)."""
    code = f"""
import numpy as np
from emnist_hpo.cli import import_keras_quietly; import_keras_quietly()
from emnist_hpo.config import DataConfig
from emnist_hpo.data.prepared import prepare
from emnist_hpo.tracking.registry import load_champion
data = prepare({split!r}, {data_dir!r}, DataConfig(seed={seed}), progress=False)
pred = load_champion({tracking_uri!r}, {split!r}).predict(data.x_test).to_numpy().argmax(axis=1)
np.savez({str(out)!r}, pred=pred, y=data.y_test)
"""
    res = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"predicting with the champion failed:\n{res.stderr[-3000:]}")


def paired(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict:
    """Model ``a`` against model ``b`` on the same test images: the accuracy difference, its standard error
    from the images they disagree on (paired: the images both get right or both wrong add no noise to the
    difference), and McNemar's exact two-sided p-value. One test set's standard error of a single accuracy
    (~0.5 pt on these samples) overstates the noise of a difference between two models evaluated on it."""
    from scipy.stats import binomtest

    y, a, b = (np.asarray(v).ravel() for v in (y, a, b))
    if not (len(y) == len(a) == len(b)) or not len(y):
        raise ValueError(f"paired predictions must be non-empty and of one length (labels {len(y)}, "
                         f"a {len(a)}, b {len(b)})")
    only_a = int(np.sum((a == y) & (b != y)))  # images a gets right and b wrong
    only_b = int(np.sum((a != y) & (b == y)))
    n = len(y)
    diff = (only_a - only_b) / n
    se = float(np.sqrt(max(only_a + only_b - (only_a - only_b) ** 2 / n, 0.0)) / n)
    p = float(binomtest(only_a, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0
    return {"difference": diff, "se": se, "only_a": only_a, "only_b": only_b, "images": n, "p_mcnemar": p}


def compact_params(split: str) -> int:
    """The compact seed's parameter count with ``split``'s classes (its dense head grows with them)."""
    from emnist_hpo.config import load_experiment
    from emnist_hpo.data.nist import load_classes
    from emnist_hpo.model.cost import model_cost
    from emnist_hpo.paths import find_experiment

    return model_cost(load_experiment(find_experiment("compact")).model, len(load_classes(split))).params


def rung_seconds(trials) -> dict[int, float]:
    """Seconds a study trained at each rung: every rung record once, for the trial that trained it (a paused
    trial's continuation carries the records it took over; the study's own ``rung_table``). Where a 30-minute
    study's time went: on the Zen 3 machine the last rung took 31-33% of two searches, and 7 of their 9 runs
    there were not crowned."""
    spent = rung_table(trials, field="seconds")
    return {rung: round(sum(spent[rung].values()), 1) for rung in sorted(spent)}


def last_rung_runs(trials) -> list[dict]:
    """A study's full-length runs in trial order: each one's score at the rung below (what sent it up) and at the
    last rung, its seconds there and its size; for the trial that trained the last rung (a continuation carries
    the records below it; ``closing``: the search's closing run, not a leader). What a rule into the last rung is
    judged on: on letters seed 0 (Intel, 5ed7c05) the
    crowned run had gone up as the new best of the rung below by 0.08 pt, under a fifth of a standard error."""
    table = rung_table(trials)
    if len(table) < 2:
        return []
    last = max(table)
    out = []
    for t in trials:
        recs = {int(r.get("rung", i)): r for i, r in enumerate(records_of(t))}
        top = recs.get(last)
        if top is None or int(top.get("trial", t.number)) != t.number or "score" not in recs.get(last - 1, {}):
            continue
        out.append({"trial": t.number, "below": recs[last - 1]["score"], "score": top.get("score"),
                    "seconds": top.get("seconds"), "params": t.user_attrs.get("params"),
                    "flops": t.user_attrs.get("flops"), "closing": CLOSING_ATTR in t.user_attrs})
    return out


def best_mean_finalist(metrics: dict, trials):
    """The finalist the best re-evaluated mean would have crowned (``--no-prefer-smaller``: fewer parameters on a
    tie), from the study run's ``finalist_<trial>_mean`` metrics and the trials' sizes; None without finalists.
    Beside what the one-standard-error rule crowned, its final fit measures what the rule's trade cost on test."""
    from emnist_hpo.search.selection import Finalist, choose

    by_number = {t.number: t for t in trials}
    found = []
    for key, value in metrics.items():
        m = re.fullmatch(r"finalist_(\d+)_mean", key)
        t = by_number.get(int(m[1])) if m else None
        if t is not None:
            found.append(Finalist(t.number, float(t.values[0]) if t.values else float("nan"),
                                  int(t.user_attrs.get("params") or 0), [float(value)],
                                  float(t.user_attrs.get("flops") or float("inf"))))
    return choose(found, False, 0.0, 0) if found else None


def study_run_metrics(tracking_uri: str, split: str) -> dict:
    """The metrics of the study's own MLflow run (the latest run tagged ``emnist_hpo.kind = study``)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(f"emnist-{split}")
    runs = client.search_runs([exp.experiment_id], "tags.`emnist_hpo.kind` = 'study'",
                              order_by=["attributes.start_time DESC"], max_results=1) if exp else []
    return dict(runs[0].data.metrics) if runs else {}


def fit_trial_alone(options: dict, work: str, trial: int, predictions: Path) -> dict:
    """Trial ``trial`` of the study in ``work`` (run with the :class:`~emnist_hpo.options.StudyOptions` fields
    ``options``) given the study's own final fit and tested once, in a child process; its predicted test labels
    to ``predictions`` (.npy). What the study would have registered had it crowned that trial."""
    code = f"""
import json, time
import numpy as np, optuna
from emnist_hpo.cli import import_keras_quietly; import_keras_quietly()
from emnist_hpo.config import load_experiment
from emnist_hpo.data.prepared import prepare
from emnist_hpo.model.cost import model_cost
from emnist_hpo.options import StudyOptions
from emnist_hpo.paths import find_experiment, find_search_space
from emnist_hpo.reporting.evaluation import evaluate
from emnist_hpo.search.finalize import Champion, final_model
from emnist_hpo.search.optuna.objective import Objective, config_of
from emnist_hpo.search.space import SearchSpace
from emnist_hpo.search.trial import rates_of
from emnist_hpo.train.fidelity import make_ladder
from emnist_hpo.train.trainer import predict_proba
opts = StudyOptions(**json.loads({json.dumps(options)!r}))
base = opts.base_config()
data = prepare(opts.split, opts.data_dir, base.data, progress=False)
seeds = {{n: load_experiment(find_experiment(n)) for n in opts.seed_experiments}} if opts.warm_start else {{}}
ladder = make_ladder(opts.fidelity, opts.epochs, len(data.y_train), data.num_classes, eta=opts.reduction_factor)
objective = Objective(SearchSpace.load(find_search_space(opts.search_space)), base, data, ladder=ladder, seeds=seeds)
study = optuna.load_study(study_name=opts.name, storage="sqlite:///{work}/optuna.db")
trial = next(t for t in study.get_trials(deepcopy=False) if t.number == {trial})
cfg = config_of(objective, trial)
t0 = time.perf_counter()
model, _, _ = final_model(Champion(trial.number, cfg, float("nan"), "optuna", rates=rates_of(trial.user_attrs)), data,
                          ladder, True)
seconds = time.perf_counter() - t0
proba = predict_proba(model, data.x_test)
np.save({str(predictions)!r}, proba.argmax(axis=1))
cost = model_cost(cfg.model, data.num_classes)
print("RESULT " + json.dumps({{"test_accuracy": evaluate(data.y_test, proba, data.classes).accuracy,
                              "params": cost.params, "flops": cost.flops, "seconds": seconds}}))
"""
    return child_result(code, f"fitting trial {trial} alone")


def best_score_trial(study):
    """The trial the best single validation score crowns (the study's own :func:`pick_champion` with no margin, as
    ``--no-prefer-smaller`` without finalists), as a :class:`~emnist_hpo.search.selection.Finalist` with its score
    for a mean; None without a complete trial."""
    from emnist_hpo.search.optuna.study import pick_champion
    from emnist_hpo.search.selection import Finalist

    t, _ = pick_champion(study, 0.0, images=0)
    if t is None:
        return None
    return Finalist(t.number, float(t.values[0]), int(t.user_attrs.get("params") or 0), [float(t.values[0])],
                    float(t.user_attrs.get("flops") or float("inf")))


def the_rules_trade(split: str, seed: int, args, warm: bool, r: dict, champ: Path, compact_pred: Path) -> dict | None:
    """What the one-standard-error rule traded in run ``r``: where it crowned a smaller trial than the best
    re-evaluated mean (``by: "mean"``) or, where no finalist was re-evaluated, than the best single validation score
    (``by: "score"``), that trial fitted and tested too (after the study, outside its budget), against the crowned
    champion and compact on the same test images. None without a complete trial."""
    import optuna

    study = optuna.load_study(study_name=f"emnist-{split}", storage=f"sqlite:///{r['work']}/optuna.db")
    metrics = study_run_metrics(r["tracking_uri"], split)
    trials = study.get_trials(deepcopy=False)
    best, by = best_mean_finalist(metrics, trials), "mean"
    if best is None:
        best, by = best_score_trial(study), "score"
    if best is None:
        return None
    crowned = next((t for t in trials if t.number == r["champion_trial"]), None)
    # reeval_mean / crowned_reeval_mean: the two trials on the same footing (without finalists, their single scores)
    out = {"by": by, "trial": best.trial, "reeval_mean": best.mean,
           "crowned_reeval_mean": (metrics.get(f"finalist_{r['champion_trial']}_mean") if by == "mean"
                                   else crowned.values[0] if crowned is not None and crowned.values else None),
           "crowned": best.trial == r["champion_trial"]}
    if out["crowned"]:
        return out
    pred = Path(r["work"]) / f"trial-{best.trial}-predictions.npy"
    options = {"split": split, "seed": seed, "epochs": args.epochs, "data_dir": args.data_dir, "warm_start": warm}
    study_args = shlex.split(getattr(args, "study_args", "") or "")
    if "--search-space" in study_args[:-1]:
        options["search_space"] = study_args[study_args.index("--search-space") + 1]
    out.update(fit_trial_alone(options, r["work"], best.trial, pred))
    with np.load(champ) as z:
        out["vs_crowned"] = paired(z["y"], np.load(pred), z["pred"])
        out["vs_compact"] = paired(z["y"], np.load(pred), np.load(compact_pred))
    return out


def run_study(split: str, seed: int, args, warm: bool, python: str = PYTHON, cwd: Path = ROOT,
              extra: list[str] | None = None) -> dict:
    """One budgeted study in a fresh folder of stores; what it crowned and what it screened."""
    work = Path(tempfile.mkdtemp(prefix=f"search-{split}-{seed}-"))
    argv = [python, "-m", "emnist_hpo", "study", "--split", split, "--seed", str(seed), "--trials", "100000",
            "--timeout", str(args.budget_minutes * 60), "--epochs", str(args.epochs), "--data-dir", args.data_dir,
            "--storage", f"sqlite:///{work}/optuna.db", "--tracking-uri", f"sqlite:///{work}/mlflow.db",
            "--no-progress"]
    limit = compact_params(split) if args.max_params is None else args.max_params
    if limit:
        argv += ["--max-params", str(limit)]
    if not warm:
        argv.append("--no-warm-start")
    argv += shlex.split(getattr(args, "study_args", "") or "")
    argv += extra or []
    env = {**os.environ, "EMNIST_HPO_CACHE": str(work / "cache")}
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env)
    wall = time.perf_counter() - t0
    (work / "stderr.txt").write_text(res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"study failed ({res.returncode}):\n{res.stderr[-3000:]}")
    import optuna

    study = optuna.load_study(study_name=f"emnist-{split}", storage=f"sqlite:///{work}/optuna.db")
    trials = study.get_trials(deepcopy=False)
    # a paused trial's continuation ("promote_of") is the same configuration: screened once; its rungs count
    # for the trial that trained them (each rung record names it)
    trained = [t for t in trials if (t.user_attrs.get("rungs") or t.user_attrs.get("epochs_run"))
               and "promote_of" not in t.user_attrs]
    reached = {i: len(v) for i, v in sorted(rung_table(trials).items())}
    champ = study.user_attrs.get("champion", {})
    number = champ.get("trial")
    chosen = next((t for t in trials if t.number == number), None)
    seed_name = chosen.user_attrs.get("seed_experiment") if chosen else None
    plan = [ln for ln in res.stderr.splitlines() if ln.strip().startswith(("configurations", "ETA"))]
    return {
        "test_accuracy": champ.get("test_accuracy"), "params": champ.get("params"),
        "flops": chosen.user_attrs.get("flops") if chosen else None,
        "champion_trial": number, "champion_seed": seed_name, "sampled": chosen is not None and not seed_name,
        "val_accuracy": chosen.values[0] if chosen and chosen.values else None,
        "champion_config": dict(chosen.params) if chosen else None, "max_params": limit,
        "complete": sum(1 for t in trials if t.state.name == "COMPLETE"),
        "trials": len(trials), "screened": len(trained), "reached": reached,
        "rung_seconds": {str(k): v for k, v in rung_seconds(trials).items()},
        "last_rung_runs": last_rung_runs(trials),
        "repeats": sum(1 for t in trials if "repeat_of" in t.user_attrs),
        "continuations": sum(1 for t in trials if "promote_of" in t.user_attrs),
        "pruned_before_training": sum(1 for t in trials if t.user_attrs.get("refused")),  # search.trial.REFUSED_ATTR
        "refused_for_time": sum(1 for t in trials if t.user_attrs.get("refused")  # of those, too slow for the budget
                                and str(t.user_attrs.get("fail_reason", "")).startswith("model would take")),
        "stopped_too_slow": sum(1 for t in trials  # stopped after a rung: its own speed too slow to be crowned
                                if str(t.user_attrs.get("fail_reason", "")).startswith("too slow to be crowned")),
        "wall_s": round(wall, 1), "budget_s": args.budget_minutes * 60,
        "overrun": round(wall / (args.budget_minutes * 60) - 1, 3),
        "screened_per_hour": round(len(trained) / wall * 3600, 1), "plan": plan, "work": str(work),
        "tracking_uri": f"sqlite:///{work}/mlflow.db",
    }


def by_hand(split: str, seed: int, args) -> dict:
    """Optuna wired by hand (benchmarks/generalization.py's peer: TPE + median pruning over a typical Keras
    space, up to 8 epochs, the best single validation score crowned), same budget, data split and seed."""
    with tempfile.TemporaryDirectory() as tmp:
        row_file = Path(tmp) / "row.json"
        t0 = time.perf_counter()
        res = subprocess.run([PYTHON, str(ROOT / "benchmarks" / "generalization.py"), "--role", "peer", "--seed",
                              str(seed), "--split", split, "--budget-minutes", str(args.budget_minutes),
                              "--data-dir", args.data_dir, "--row-file", str(row_file)],
                             capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(f"Optuna by hand failed ({res.returncode}):\n{res.stderr[-3000:]}")
        row = json.loads(row_file.read_text())
    budget = args.budget_minutes * 60
    return {"test_accuracy": row["test"], "params": row["params"], "flops": row.get("flops"),
            "val_accuracy": row["val"], "sampled": True, "trials": row["trials"], "screened": row["trials"],
            "search_s": round(row["seconds"], 1), "wall_s": round(wall, 1), "budget_s": budget,
            "overrun": round(row["seconds"] / budget - 1, 3),
            "screened_per_hour": round(row["trials"] / row["seconds"] * 3600, 1)}


def old_default(split: str, seed: int, args) -> dict:
    """The project's default before multi-fidelity (``--old-rev``), same budget: trials screened per hour."""
    tree = Path(tempfile.mkdtemp(prefix="old-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), args.old_rev], check=True)
    try:
        env_py = PYTHON
        out = run_study(split, seed, argparse.Namespace(**{**vars(args), "max_params": args.max_params}), warm=False,
                        python=env_py, cwd=tree, extra=None)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    return out


#: The issue's seeded bar: a sampled champion beats compact by this much on test, or matches it with fewer FLOPs.
BEAT_BY = 0.005


def bar_met(kind: str, run: dict, compact: dict | None) -> bool | None:
    """Issue 12's bar for one cell's run, against compact alone on the same test images (None: not both tested).

    ``search`` (no seeds): the champion's test accuracy at least compact's, at no more parameters. ``seeds``:
    a sampled champion (not a seed) that beats compact by :data:`BEAT_BY` or more, or matches it with fewer
    FLOPs."""
    if not compact or run.get("test_accuracy") is None or compact.get("test_accuracy") is None:
        return None
    diff = run["test_accuracy"] - compact["test_accuracy"]
    if kind == "search":
        return diff >= 0 and run["params"] <= compact["params"]
    if kind == "seeds":
        return bool(run.get("sampled")) and (diff >= BEAT_BY - 1e-12 or (diff >= 0 and run["flops"] < compact["flops"]))
    raise ValueError(f"the bar is for runs 'search' or 'seeds', not {kind!r}")


def pooled(diffs: Sequence[dict]) -> dict:
    """The mean of several cells' paired differences (:func:`paired`) and its standard error, the cells being
    independent (other seeds, splits or test images): ``sqrt(sum se_i^2) / k``. One cell's difference is within
    its ~0.4 pt noise of a 0.1 pt bar; the grid's mean is the trend."""
    if not diffs:
        raise ValueError("pooled needs at least one paired difference")
    k = len(diffs)
    return {"cells": k, "difference": float(np.mean([d["difference"] for d in diffs])),
            "se": float(np.sqrt(sum(d["se"] ** 2 for d in diffs)) / k)}


def tested(entry: dict, kind: str) -> bool:
    """Whether the cell ``entry`` ran ``kind`` to a tested champion."""
    return bool(entry.get(kind)) and entry[kind].get("test_accuracy") is not None


def latest_of(results: Sequence[dict], kind: str) -> list[dict]:
    """The cells that ran ``kind``, each once: where one cell (split and seed) ran it in several runs (files given
    to ``--summarize``, on other commits or machines), the latest run's (by its ``source`` date, else the later in
    ``results``). A grid that counted a cell run twice would weigh it twice."""
    best: dict[tuple, tuple] = {}
    for i, e in enumerate(results):
        if tested(e, kind):
            key, when = (e["split"], e["seed"]), ((e.get("source") or {}).get("date") or "", i)
            if key not in best or when >= best[key][0]:
                best[key] = (when, e)
    return [e for _, e in sorted(best.values(), key=lambda v: v[0])]


def bars(results: Sequence[dict]) -> list[str]:
    """Markdown lines: for each of the studies, in how many cells issue 12's bar was met (each cell's latest run),
    and the pooled paired difference against compact alone."""
    out = []
    for kind, bar in (("search", "no seeds: test accuracy >= compact alone's at <= its parameters"),
                      ("seeds", "seeds first: a sampled champion that beats compact by >= 0.5 pt or matches it with "
                                "fewer FLOPs")):
        entries = latest_of(results, kind)
        cells = [(e, e[kind]) for e in entries]
        verdicts = [bar_met(kind, r, e.get("compact")) for e, r in cells]
        judged = [v for v in verdicts if v is not None]
        if not judged:
            continue
        line = f"- {bar}: **met in {sum(judged)} of {len(judged)} cells**"
        older = sum(tested(e, kind) for e in results) - len(entries)
        if older:
            line += f" (each cell's latest run; {older} earlier run{'s' if older > 1 else ''} of a cell not counted)"
        if kind == "seeds":
            line += f"; the champion sampled in {sum(bool(r.get('sampled')) for _, r in cells)} of {len(cells)} " \
                    "(the bar: at least half)"
        diffs = [r["vs_compact"] for _, r in cells if r.get("vs_compact")]
        if diffs:
            p = pooled(diffs)
            line += f"; against compact, pooled over {p['cells']}: {100 * p['difference']:+.2f} +/- {100 * p['se']:.2f} pt"
        out.append(line)
    return out


def trades(results: Sequence[dict]) -> list[str]:
    """Markdown lines: in each run that recorded it (:func:`the_rules_trade`), the finalist with the best
    re-evaluated mean where the one-standard-error rule crowned another, its test accuracy beside the crowned one's
    (paired), and the runs' pooled difference: what the rule cost or gained on test."""
    out, diffs, same = [], [], 0
    for entry in results:
        for key in ("search", "seeds"):
            t = (entry.get(key) or {}).get("best_mean")
            if not t:
                continue
            if t.get("crowned"):
                same += 1
                continue
            v = t["vs_crowned"]
            diffs.append(v)
            what = ("re-evaluated", "the best re-evaluated mean") if t.get("by", "mean") == "mean" else (
                "scored", "the best single score (no finalist re-evaluated)")
            out.append(f"- {entry['split']} seed {entry['seed']}, {key}: the rule crowned trial "
                       f"{entry[key]['champion_trial']} ({what[0]} {100 * (t.get('crowned_reeval_mean') or 0):.2f}); "
                       f"{what[1]}, trial {t['trial']} ({100 * t['reeval_mean']:.2f}; "
                       f"{t['params']:,} parameters, {t['flops'] / 1e6:.1f}M FLOPs), tests "
                       f"{100 * t['test_accuracy']:.2f}: {100 * v['difference']:+.2f} +/- {100 * v['se']:.2f} pt "
                       f"against the crowned champion, {100 * t['vs_compact']['difference']:+.2f} against compact")
    if not out and not same:
        return []
    head = (f"- The one-standard-error rule against the best re-evaluated mean (without finalists: the best single "
            f"score): the same trial in {same} run(s), another in {len(diffs)}")
    if diffs:
        p = pooled(diffs)
        head += (f"; the best mean's test minus the crowned's, pooled: {100 * p['difference']:+.2f} +/- "
                 f"{100 * p['se']:.2f} pt")
    return [head, *out]


def rows_of(results: Sequence[dict]) -> list[list]:
    """The Markdown table's rows: one per run of each cell; with the machine and commit of each where the results
    came from several runs (``--summarize``)."""
    rows = []
    sourced = any(e.get("source") for e in results)
    for entry in results:
        split, seed = entry["split"], entry["seed"]
        for key in ("compact", "search", "seeds", "hand", "old"):
            r = entry.get(key)
            if r is None:
                continue
            met = bar_met(key, r, entry.get("compact")) if key in ("search", "seeds") else None
            rows.append([split, seed, key, f"{100 * r['test_accuracy']:.2f}" if r.get("test_accuracy") else "-",
                         r.get("params"), r.get("flops"),
                         ("sampled" if r.get("sampled") else r.get("champion_seed") or "-") if key != "compact" else "-",
                         r.get("screened", "-"), r.get("repeats", "-"), r.get("screened_per_hour", "-"),
                         " / ".join(str(r.get("reached", {}).get(i, 0)) for i in sorted(r.get("reached", {})))
                         if key != "compact" else "-",
                         " / ".join(f"{v:.0f}" for _, v in sorted(r["rung_seconds"].items(), key=lambda kv: int(kv[0])))
                         if r.get("rung_seconds") else "-",
                         r.get("wall_s", r.get("seconds")), f"{100 * r['overrun']:+.1f}%" if "overrun" in r else "-",
                         (f"{100 * r['vs_compact']['difference']:+.2f} +/- {100 * r['vs_compact']['se']:.2f} "
                          f"(p={r['vs_compact']['p_mcnemar']:.2f})") if r.get("vs_compact") else "-",
                         "-" if met is None else "met" if met else "missed"])
            if sourced:
                src = entry.get("source") or {}
                rows[-1].insert(3, f"{src.get('machine', '?')}, {src.get('commit', '?')}")
    return rows


def markdown(title: str, results: Sequence[dict]) -> str:
    head = ["split", "seed", "run", "test %", "params", "FLOPs", "champion", "screened", "repeats", "per hour",
            "trials per rung", "s per rung", "wall s", "overrun", "vs compact, paired (pt)", "bar"]
    if any(e.get("source") for e in results):
        head.insert(3, "machine, commit")
    return "\n".join([f"# {title}", "", table(head, rows_of(results)), "", *bars(results), *trades(results), ""])


def source_of(path: str, data: dict) -> dict:
    """Where a results file's cells were measured: the file, when it was written, the machine (CPU, cores, its bf16
    units) and the commit."""
    m = data.get("machine") or {}
    units = "/".join(m.get("bf16_units") or []) or "no bf16"
    sha = str(m.get("commit") or "?")
    return {"file": str(path), "date": str(m.get("date", "")),
            "commit": sha[:7] + ("-dirty" if sha.endswith("-dirty") else ""),
            "machine": f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores, {units})"}


def summarize(paths: Sequence[str], name: str) -> int:
    """One grid from several runs' JSON (cells run one at a time, in other sessions or on other commits): the
    table, each bar's count and the pooled differences."""
    results = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--summarize: cannot read {path}: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            raise SystemExit(f"--summarize: {path} is not a bench_search.py results file (no 'results' list)")
        results.extend({**e, "source": source_of(path, data)} for e in data["results"])
    md = markdown(f"The search against the compact seed: {len(results)} cell(s) from {len(paths)} run(s)", results)
    json_path, md_path = write_results(name, {"machine": machine(), "sources": list(paths), "results": results}, md)
    print(md)
    log(f"wrote {json_path} and {md_path}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--splits", default="balanced,letters,byclass")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--budget-minutes", type=float, default=30)
    p.add_argument("--epochs", type=int, default=15, help="epochs at the last rung (compact's own 15)")
    p.add_argument("--max-params", type=int, default=None,
                   help="parameter limit of the studies (default: the compact seed's size for each split; 0: none)")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--runs", default="compact,search,seeds", help="which of compact,search,seeds,hand,old to run")
    p.add_argument("--old-rev", default=None, help="git revision of the previous default, for --runs old")
    p.add_argument("--study-args", default="", metavar="ARGS",
                   help="more options for both studies, one string (e.g. \"--random-fraction 0.34\"): a variant "
                        "measured against the same cells")
    p.add_argument("--no-trade", action="store_true",
                   help="do not fit and test the finalist with the best re-evaluated mean where the one-standard-error "
                        "rule crowned another (by default it is, after each study: what the rule's trade cost)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--name", default="search")
    p.add_argument("--summarize", nargs="+", metavar="JSON",
                   help="run nothing: one grid (table, bars, pooled differences) from these results files")
    args = p.parse_args(argv)
    if args.summarize:
        return summarize(args.summarize, args.name)
    if args.quick:
        args.splits, args.seeds, args.budget_minutes, args.epochs = "balanced", "0", 4, 3
    runs = args.runs.split(",")
    results = []
    for split in args.splits.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            entry: dict = {"split": split, "seed": seed}
            compact_pred = None
            if "compact" in runs:
                compact_pred = Path(tempfile.mkdtemp(prefix=f"compact-{split}-{seed}-")) / "predictions.npy"
                log(f"{split} seed {seed}: compact alone")
                entry["compact"] = compact_alone(split, seed, args.epochs, args.data_dir, compact_pred)
            for key, warm in (("search", False), ("seeds", True)):
                if key in runs:
                    log(f"{split} seed {seed}: {key} ({args.budget_minutes:g} min)")
                    entry[key] = r = run_study(split, seed, args, warm)
                    if compact_pred is not None and r.get("test_accuracy") is not None:
                        champ = Path(r["work"]) / "champion-predictions.npz"
                        champion_predictions(split, seed, args.data_dir, r["tracking_uri"], champ)
                        with np.load(champ) as z:
                            r["vs_compact"] = paired(z["y"], z["pred"], np.load(compact_pred))
                        if not args.no_trade:
                            log(f"{split} seed {seed}: {key}: the best re-evaluated mean (or score), if not crowned, "
                                "fitted too")
                            r["best_mean"] = the_rules_trade(split, seed, args, warm, r, champ, compact_pred)
            if "hand" in runs:
                log(f"{split} seed {seed}: Optuna wired by hand ({args.budget_minutes:g} min)")
                entry["hand"] = by_hand(split, seed, args)
            if "old" in runs and args.old_rev:
                log(f"{split} seed {seed}: previous default ({args.old_rev})")
                entry["old"] = old_default(split, seed, args)
            results.append(entry)
            write_results(args.name, {"machine": machine(), "args": vars(args), "results": results}, "(partial)")
    title = (f"The search against the compact seed ({args.budget_minutes:g}-minute budgets, --epochs {args.epochs}, "
             f"--max-params {'compact' if args.max_params is None else args.max_params or '-'}"
             + (f", the studies with {args.study_args}" if args.study_args else "") + ")")
    md = markdown(title, results)
    json_path, md_path = write_results(args.name, {"machine": machine(), "args": vars(args), "results": results},
                                       md)
    print(md)
    log(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
