"""The cross-split leaderboard: champions, baselines and published figures, read from MLflow.

:func:`run_compare` is what ``python -m emnist_hpo compare`` calls. For every
split it takes

* the champion: the model version holding alias ``champion`` of registered model
  ``emnist-<split>`` (its run's test and validation accuracy, parameters, the
  size of its ``.keras`` file, the training time and epochs of its trial);
* every finished baseline run (``emnist_hpo.kind=baseline``) on the same test
  data as the champion (equal ``test_fingerprint``; ``same_data`` says whether
  training and validation data were also the same); without a champion, every
  baseline of the split;
* the published figures of :mod:`emnist_hpo.reporting.published`, with deltas;
* a Pareto plot of validation accuracy against parameters over the split's
  COMPLETE trials that learnt something (validation accuracy at or above twice
  the no-skill accuracy: pruned and chance-level trials are left out), those on
  the champion's data when there is one;
* the search engines side by side: every study that crowned a champion (Optuna or
  Keras Tuner, ``emnist_hpo.engine``) with its budget (finished trials, epochs per
  trial), best validation and test accuracy, champion size and wall time, and
  whether the engines on the same data had the same budget.

It writes ``leaderboard.csv``, ``published.csv``, ``engines.csv``, ``leaderboard.md`` and
``compare.html`` (self-contained, plotly figures) into one folder and logs them
to a run of MLflow experiment ``emnist-compare`` (``emnist_hpo.kind=compare``).
"""

from __future__ import annotations

import datetime as _dt
import html
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from emnist_hpo.data.nist import SPLITS
from emnist_hpo.model.cost import human
from emnist_hpo.model.describe import describe_params, log_ticks
from emnist_hpo.errors import ConfigError, EmnistHpoError
from emnist_hpo.reporting.published import for_split
from emnist_hpo.tracking.registry import CHAMPION_ALIAS, model_name
from emnist_hpo.tracking.tracker import (
    TAG_ENGINE,
    TAG_KIND,
    TAG_SPLIT,
    TAG_STATE,
    TAG_STUDY,
    TAG_TRIAL,
    Tracker,
    make_client,
    redact,
    resolve_tracking_uri,
)

COMPARE_EXPERIMENT = "emnist-compare"
DEFAULT_OUTPUT = "mlruns/compare"
FILES = ("leaderboard.csv", "published.csv", "engines.csv", "leaderboard.md", "compare.html")

#: Leaderboard columns (accuracies are fractions; ``*_pp`` deltas are percentage points).
COLUMNS = [
    "split", "role", "name", "test_accuracy", "val_accuracy", "delta_vs_champion_pp", "delta_vs_research_pp",
    "delta_vs_best_published_pp", "params", "flops", "model_size_bytes", "train_seconds", "epochs", "train_size",
    "architecture", "same_data", "data_fingerprint", "test_fingerprint", "run_id",
]

#: Engine comparison columns: one row per study (all its invocations) that crowned a champion.
ENGINE_COLUMNS = [
    "split", "engine", "algorithm", "study", "trials", "epochs", "best_val_accuracy", "test_accuracy",
    "champion_params", "wall_seconds", "invocations", "same_budget", "data_fingerprint", "run_id",
]


@dataclass
class Comparison:
    leaderboard: pd.DataFrame  # one row per champion or baseline run, COLUMNS
    published: pd.DataFrame  # one row per published figure, with the champion's and the best run's deltas
    engines: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=ENGINE_COLUMNS))  # ENGINE_COLUMNS
    trials: dict[str, pd.DataFrame] = field(default_factory=dict)  # split -> trial points (all; see ``eligible``)
    left_out: dict[str, int] = field(default_factory=dict)  # split -> baselines on other test data


@dataclass
class CompareResult:
    comparison: Comparison
    output: Path  # the folder written
    files: list[Path]
    run_id: str  # the emnist-compare run


# --------------------------------------------------------------------------- reading the store


def _search(client, experiment_id: str, kind: str, extra: str = "") -> list:
    query = f"tags.`{TAG_KIND}` = '{kind}'" + (f" and {extra}" if extra else "")
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=query, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time DESC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _metric(run, key: str) -> float | None:
    v = run.data.metrics.get(key)
    return None if v is None or not math.isfinite(v) else float(v)


def _int(v: Any) -> int | None:
    try:
        return None if v is None else int(float(v))
    except (TypeError, ValueError):
        return None


def _keras_bytes(client, source: str) -> int | None:
    """Size of the ``.keras`` file inside a registered pyfunc model (its whole folder when there is none)."""
    try:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        if source.startswith("models:/m-"):
            location = client.get_logged_model(source[len("models:/"):]).artifact_location
        else:
            location = source
        repo = get_artifact_repository(location)
        sizes: dict[str, int] = {}

        def walk(path: str | None) -> None:
            for f in repo.list_artifacts(path):
                if f.is_dir:
                    walk(f.path)
                else:
                    sizes[f.path] = int(f.file_size or 0)

        walk(None)
        keras = [s for p, s in sizes.items() if p.endswith(".keras")]
        return keras[0] if keras else (sum(sizes.values()) or None)
    except Exception:  # noqa: BLE001 - a missing or remote-only artifact leaves the cell empty
        return None


def _champion_row(client, split: str) -> dict[str, Any] | None:
    try:
        mv = client.get_model_version_by_alias(model_name(split), CHAMPION_ALIAS)
    except Exception:  # noqa: BLE001 - no registered model or no alias
        return None
    run = client.get_run(mv.run_id)
    tags = mv.tags or {}
    study, trial = tags.get("study") or run.data.tags.get(TAG_STUDY), tags.get("trial") or run.data.tags.get(TAG_TRIAL)
    trial_run = None
    if study is not None and trial is not None:
        found = _search(client, run.info.experiment_id, "trial",
                        f"tags.`{TAG_STUDY}` = '{study}' and tags.`{TAG_TRIAL}` = '{trial}'")
        trial_run = found[0] if found else None
    final_fit = str(tags.get("final_fit", "True")) == "True"
    epochs = _int(run.data.params.get("train.epochs")) if final_fit else None
    if epochs is None and trial_run is not None:
        epochs = len(client.get_metric_history(trial_run.info.run_id, "accuracy")) or None
    val = _metric(run, "val_accuracy")
    if val is None and tags.get("val_accuracy"):
        val = float(tags["val_accuracy"])
    train_size = None
    parent_id = run.data.tags.get("mlflow.parentRunId")
    if parent_id:
        try:
            train_size = _int(client.get_run(parent_id).data.params.get("train_size"))
        except Exception:  # noqa: BLE001 - a deleted parent run leaves the cell empty
            train_size = None
    return {
        "split": split,
        "role": "champion",
        "name": f"{model_name(split)} v{mv.version} (study {study}, trial {trial})",
        "test_accuracy": _metric(run, "test_accuracy"),
        "val_accuracy": val,
        "params": _int(_metric(run, "params") or tags.get("params")),
        "flops": _int(_metric(run, "flops")),
        "model_size_bytes": _keras_bytes(client, mv.source),
        "train_seconds": _metric(trial_run, "train_seconds") if trial_run is not None else None,
        "epochs": epochs,
        "train_size": train_size,
        "architecture": describe_params(run.data.params),
        "data_fingerprint": tags.get("data_fingerprint"),
        "test_fingerprint": tags.get("test_fingerprint"),
        "run_id": mv.run_id,
    }


def _baseline_row(run, split: str) -> dict[str, Any]:
    t = run.data.tags
    return {
        "split": split,
        "role": "baseline",
        "name": t.get("emnist_hpo.baselines.experiment") or run.info.run_name,
        "test_accuracy": _metric(run, "test_accuracy"),
        "val_accuracy": _metric(run, "best_val_accuracy"),
        "params": _int(_metric(run, "params")),
        "flops": _int(_metric(run, "flops")),
        "model_size_bytes": _int(_metric(run, "model_size_bytes")),
        "train_seconds": _metric(run, "train_seconds"),
        "epochs": _int(_metric(run, "epochs_run")) or None,
        "train_size": _int(run.data.params.get("train_size")),
        "architecture": t.get("emnist_hpo.model.architecture") or describe_params(run.data.params),
        "data_fingerprint": t.get("emnist_hpo.data_fingerprint"),
        "test_fingerprint": t.get("emnist_hpo.test_fingerprint"),
        "run_id": run.info.run_id,
    }


#: Columns of a split's trial points (:attr:`Comparison.trials`).
TRIAL_COLUMNS = ["study", "trial", "state", "val_accuracy", "params", "flops", "no_skill", "eligible", "pareto",
                 "run_id"]
#: A trial is on the Pareto plot only when COMPLETE with validation accuracy >= this many times the no-skill
#: accuracy (always answering the most frequent class): the pruners' own bar for having learnt something.
NO_SKILL_FACTOR = 2.0


def _trial_points(client, experiment_id: str, fingerprint: str | None, split: str) -> pd.DataFrame:
    """Trials with both ``best_val_accuracy`` and ``params`` (of studies on ``fingerprint`` when given).

    ``eligible``: COMPLETE and at or above twice the no-skill accuracy of its validation set; ``pareto``:
    on the front of the eligible trials (never a pruned, failed or chance-level one).
    """
    studies = {r.info.run_id: r for r in _search(client, experiment_id, "study")}
    rows = []
    for r in _search(client, experiment_id, "trial"):
        acc, params = _metric(r, "best_val_accuracy"), _metric(r, "params")
        if acc is None or params is None:
            continue
        parent = studies.get(r.data.tags.get("mlflow.parentRunId", ""))
        fp = parent.data.tags.get("emnist_hpo.data_fingerprint") if parent is not None else None
        if fingerprint is not None and fp != fingerprint:
            continue
        rows.append({
            "study": r.data.tags.get(TAG_STUDY), "trial": _int(r.data.tags.get(TAG_TRIAL)),
            "state": r.data.tags.get(TAG_STATE, "?"), "val_accuracy": acc, "params": int(params),
            "flops": _int(_metric(r, "flops")), "run_id": r.info.run_id, "_fp": fp, "_parent": parent,
        })
    no_skill: dict[str | None, float] = {}
    for fp in {row["_fp"] for row in rows}:
        group = [row for row in rows if row["_fp"] == fp]
        no_skill[fp] = _no_skill(client, group, split)
    for row in rows:
        row["no_skill"] = no_skill[row.pop("_fp")]
        row.pop("_parent")
        row["eligible"] = row["state"] == "COMPLETE" and row["val_accuracy"] >= NO_SKILL_FACTOR * row["no_skill"]
    df = pd.DataFrame(rows, columns=[c for c in TRIAL_COLUMNS if c != "pareto"])
    df["eligible"] = df["eligible"].astype(bool)
    df["pareto"] = False
    if df["eligible"].any():
        ok = df[df["eligible"]]
        df.loc[ok.index, "pareto"] = pareto_mask(ok["params"].tolist(), ok["val_accuracy"].tolist())
    return df[TRIAL_COLUMNS]


def _no_skill(client, group: list[dict[str, Any]], split: str) -> float:
    """The no-skill validation accuracy of trials on one data set (max class share of the validation labels).

    From the study's param ``no_skill_accuracy`` when logged, else from the class counts (row sums) of a
    COMPLETE trial's validation confusion matrix, else 1 / number of classes (exact on the balanced splits).
    """
    for row in group:
        parent = row["_parent"]
        value = parent.data.params.get("no_skill_accuracy") if parent is not None else None
        if value is not None:
            try:
                return float(value)
            except ValueError:
                pass
    for row in group:
        if row["state"] != "COMPLETE":
            continue
        try:
            with tempfile.TemporaryDirectory() as tmp:
                local = client.download_artifacts(row["run_id"], "reports/validation_confusion_matrix.csv", tmp)
                counts = pd.read_csv(local, index_col=0).to_numpy().sum(axis=1)
            if counts.sum() > 0:
                return float(counts.max() / counts.sum())
        except Exception:  # noqa: BLE001 - no report on this run: try the next
            continue
    from emnist_hpo.data.nist import load_classes

    return 1.0 / len(load_classes(split))


def _engine_rows(client, experiment_id: str, split: str) -> list[dict[str, Any]]:
    """One row per study of the split that crowned a champion: its engine, budget, results and total wall time."""
    by_study: dict[tuple[str, str], list] = {}
    for r in _search(client, experiment_id, "study"):
        engine = r.data.tags.get(TAG_ENGINE) or r.data.params.get("engine") or "optuna"
        by_study.setdefault((engine, r.data.tags.get(TAG_STUDY, r.info.run_name)), []).append(r)
    rows = []
    for (engine, study), runs in by_study.items():
        done = [r for r in runs if _metric(r, "test_accuracy") is not None]  # newest first
        if not done:
            continue
        last = done[0]
        p, t = last.data.params, last.data.tags
        if engine == "keras-tuner":
            algorithm = f"keras-tuner {t.get('keras_tuner.tuner') or p.get('tuner', '?')}"
        else:
            algorithm = f"{sampler_name(p)} sampler, {p.get('pruner', '?')} pruner"
        wall = sum((r.info.end_time - r.info.start_time) / 1000 for r in runs if r.info.end_time and r.info.start_time)
        rows.append({
            "split": split, "engine": engine, "algorithm": algorithm, "study": study,
            "trials": _int(_metric(last, "finished_trials")) or _int(p.get("trials")),
            "epochs": _int(p.get("epochs")), "best_val_accuracy": _metric(last, "best_val_accuracy"),
            "test_accuracy": _metric(last, "test_accuracy"), "champion_params": _int(_metric(last, "champion_params")),
            "wall_seconds": round(wall, 1), "invocations": len(runs),
            "data_fingerprint": t.get("emnist_hpo.data_fingerprint"), "run_id": last.info.run_id,
        })
    # Equal budgets: same data, same finished trials and epochs per trial as every other engine's study on it.
    for r in rows:
        others = [o for o in rows if o is not r and o["engine"] != r["engine"]
                  and o["data_fingerprint"] == r["data_fingerprint"]]
        r["same_budget"] = None if not others else all(
            (o["trials"], o["epochs"]) == (r["trials"], r["epochs"]) for o in others)
    return sorted(rows, key=lambda r: (r["engine"], -(r["test_accuracy"] or 0)))


def sampler_name(params: dict[str, str]) -> str:
    """The sampler a study used: its ``sampler`` param, with "default" (or none) resolved as the study does
    (tpe for one objective, nsga2 for two)."""
    name = params.get("sampler") or "default"
    if name in ("default", "None"):
        return "nsga2" if len(params.get("objectives", "accuracy").split(",")) > 1 else "tpe"
    return name


def pareto_mask(params: list[float], accuracy: list[float]) -> list[bool]:
    """True for points no other point beats (fewer or equal parameters and higher accuracy, or vice versa)."""
    order = sorted(range(len(params)), key=lambda i: (params[i], -accuracy[i]))
    keep, best = [False] * len(params), -math.inf
    for i in order:
        if accuracy[i] > best:
            keep[i], best = True, accuracy[i]
    return keep


def collect(client, splits: Iterable[str] = SPLITS) -> Comparison:
    """Read champions, baselines, trials and published figures for ``splits`` from the store."""
    rows: list[dict[str, Any]] = []
    engines: list[dict[str, Any]] = []
    trials: dict[str, pd.DataFrame] = {}
    left_out: dict[str, int] = {}
    for split in splits:
        exp = client.get_experiment_by_name(f"emnist-{split}")
        if exp is not None:
            engines.extend(_engine_rows(client, exp.experiment_id, split))
        champ = _champion_row(client, split)
        baselines = []
        if exp is not None:
            for run in _search(client, exp.experiment_id, "baseline", "attributes.status = 'FINISHED'"):
                if run.data.tags.get(TAG_SPLIT, split) == split:
                    baselines.append(_baseline_row(run, split))
        if champ is not None and champ["test_fingerprint"]:
            keep = [b for b in baselines if b["test_fingerprint"] == champ["test_fingerprint"]]
            if len(keep) < len(baselines):
                left_out[split] = len(baselines) - len(keep)
            baselines = keep
        for b in baselines:
            b["same_data"] = None if champ is None else b["data_fingerprint"] == champ["data_fingerprint"]
        if champ is not None:
            champ["same_data"] = True
            rows.append(champ)
        rows.extend(sorted(baselines, key=lambda b: -(b["test_accuracy"] or 0)))
        if exp is not None:
            pts = _trial_points(client, exp.experiment_id, champ["data_fingerprint"] if champ else None, split)
            if len(pts):
                trials[split] = pts
    board = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("params", "flops", "model_size_bytes", "epochs", "train_size"):
        board[col] = board[col].astype("Int64")
    for col in ("test_accuracy", "val_accuracy", "train_seconds"):
        board[col] = board[col].astype("float64")
    _add_deltas(board)
    eng = pd.DataFrame(engines, columns=ENGINE_COLUMNS)
    for col in ("trials", "epochs", "champion_params", "invocations"):
        eng[col] = eng[col].astype("Int64")
    return Comparison(board, _published_table(board), eng, trials, left_out)


def _pp(a: float | None, b: float | None) -> float | None:
    """``a - b`` in percentage points, both fractions."""
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)) or (isinstance(b, float) and math.isnan(b)):
        return None
    return round(100.0 * (a - b), 3)


def _add_deltas(board: pd.DataFrame) -> None:
    for i, r in board.iterrows():
        champ = board[(board["split"] == r["split"]) & (board["role"] == "champion")]
        champ_acc = champ["test_accuracy"].iloc[0] if len(champ) else None
        research = for_split(r["split"], "research")
        best = for_split(r["split"])
        board.at[i, "delta_vs_champion_pp"] = _pp(r["test_accuracy"], champ_acc) if r["role"] != "champion" else None
        board.at[i, "delta_vs_research_pp"] = _pp(r["test_accuracy"], research[0].accuracy / 100) if research else None
        board.at[i, "delta_vs_best_published_pp"] = _pp(r["test_accuracy"], best[0].accuracy / 100) if best else None


def _published_table(board: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for split in SPLITS:
        sub = board[board["split"] == split]
        champ = sub[sub["role"] == "champion"]["test_accuracy"]
        champ_acc = float(champ.iloc[0]) if len(champ) and pd.notna(champ.iloc[0]) else None
        best_idx = sub["test_accuracy"].astype(float).idxmax() if sub["test_accuracy"].notna().any() else None
        best_acc = float(sub.at[best_idx, "test_accuracy"]) if best_idx is not None else None
        for p in for_split(split):
            rows.append({
                "split": split, "kind": p.kind, "model": p.model, "published_accuracy_pct": p.accuracy,
                "champion_test_accuracy": champ_acc, "champion_delta_pp": _pp(champ_acc, p.accuracy / 100),
                "best_run": sub.at[best_idx, "name"] if best_idx is not None else None,
                "best_run_test_accuracy": best_acc, "best_run_delta_pp": _pp(best_acc, p.accuracy / 100),
                "source": p.source, "note": p.note,
            })
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- writing the report


def _fmt(v: Any, col: str) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return ""
    if col in ("test_accuracy", "val_accuracy", "champion_test_accuracy", "best_run_test_accuracy",
               "best_val_accuracy"):
        return f"{100 * float(v):.2f}%"
    if col.endswith("_pp"):
        return f"{float(v):+.2f}"
    if col == "published_accuracy_pct":
        return f"{float(v):.2f}%"
    if col in ("params", "epochs", "champion_params", "trials", "train_size"):
        return f"{int(v):,}"
    if col == "model_size_bytes":
        return f"{float(v) / 1e6:.2f} MB"
    if col == "flops":
        return human(float(v))
    if col in ("train_seconds", "wall_seconds"):
        return f"{float(v):.1f} s"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def _markdown_table(df: pd.DataFrame, cols: list[str]) -> str:
    def cell(v: Any, c: str) -> str:
        return _fmt(v, c).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c], c) for c in cols) + " |" for _, r in df.iterrows()]
    return "\n".join(lines)


_SHOWN = ["role", "name", "test_accuracy", "val_accuracy", "delta_vs_champion_pp", "delta_vs_research_pp",
          "delta_vs_best_published_pp", "params", "flops", "model_size_bytes", "train_seconds", "epochs",
          "train_size", "same_data", "architecture"]
_PUB_SHOWN = ["kind", "model", "published_accuracy_pct", "champion_test_accuracy", "champion_delta_pp",
              "best_run", "best_run_test_accuracy", "best_run_delta_pp", "source"]


_ALL_PUB = ["split", "kind", "model", "published_accuracy_pct", "source", "note"]
_ENG_SHOWN = ["split", "engine", "algorithm", "study", "trials", "epochs", "best_val_accuracy", "test_accuracy",
              "champion_params", "wall_seconds", "same_budget"]
_ENG_INTRO = ("Every study that crowned a champion, per search engine (Optuna or Keras Tuner on the same search-space "
              "file). trials: finished trials; epochs: the per-trial maximum; wall_seconds: all invocations of the "
              "study, re-evaluation and final fit included; same_budget: the other engine's studies on the same data "
              "had the same trials and epochs (empty when there is no other engine to compare with).")


def _sections(c: Comparison):
    """``(split, leaderboard rows, published rows)`` for each split with at least one run."""
    for split in SPLITS:
        sub = c.leaderboard[c.leaderboard["split"] == split]
        if len(sub):
            pub = c.published[c.published["split"] == split] if len(c.published) else c.published
            yield split, sub, pub


def to_markdown(c: Comparison, store: str) -> str:
    out = ["# EMNIST cross-split leaderboard", "", f"Store: `{store}`. {_INTRO}", ""]
    for split, sub, pub in _sections(c):
        out += [f"## {split}", "", _markdown_table(sub, _SHOWN), ""]
        if c.left_out.get(split):
            out += [f"{c.left_out[split]} baseline run(s) on other test data left out.", ""]
        if len(pub):
            out += ["Published:", "", _markdown_table(pub, _PUB_SHOWN), ""]
    if len(c.engines):
        out += ["## Search engines", "", _ENG_INTRO, "", _markdown_table(c.engines, _ENG_SHOWN), ""]
    if len(c.published):
        out += ["## Published figures, all splits", "", _markdown_table(c.published, _ALL_PUB), ""]
    return "\n".join(out)


_INTRO = ("Accuracies are test accuracies unless named otherwise; deltas are percentage points. Published figures "
          "are on the official NIST test sets: runs on a sample or subset are not directly comparable with them. "
          "same_data: trained and validated on the champion's data (baselines are shown only when tested on the "
          "champion's test set). train_size: training images of the study or run (the champion's final fit also "
          "uses the validation images).")


def pareto_figure(split: str, pts: pd.DataFrame, board: pd.DataFrame):
    import plotly.graph_objects as go

    shown = pts[pts["eligible"]]
    left_out = len(pts) - len(shown)
    fig = go.Figure()
    for study, sub in shown.groupby("study", dropna=False):
        fig.add_trace(go.Scatter(
            x=sub["params"], y=sub["val_accuracy"], mode="markers", name=f"trials of {study}",
            text=[f"{s} #{t}" + (f", {human(float(f))} FLOPs per image" if pd.notna(f) else "")
                  for s, t, f in zip(sub["study"], sub["trial"], sub["flops"])],
            hovertemplate="%{text}<br>params %{x:,}<br>val accuracy %{y:.4f}<extra></extra>",
            marker={"size": 8, "opacity": 0.75},
        ))
    front = shown[shown["pareto"]].sort_values("params")
    fig.add_trace(go.Scatter(x=front["params"], y=front["val_accuracy"], mode="lines+markers", name="Pareto front",
                             line={"shape": "hv", "color": "crimson"}, marker={"color": "crimson", "size": 9}))
    sub = board[board["split"] == split]
    xs = list(shown["params"])
    for role, symbol in (("champion", "star"), ("baseline", "diamond")):
        rows = sub[(sub["role"] == role) & sub["params"].notna() & sub["val_accuracy"].notna()]
        xs += list(rows["params"])
        if len(rows):
            fig.add_trace(go.Scatter(
                x=rows["params"], y=rows["val_accuracy"], mode="markers+text", name=role + "s" if role == "baseline" else role,
                text=rows["name"] if role == "baseline" else ["champion"] * len(rows), textposition="top center",
                marker={"symbol": symbol, "size": 14 if role == "champion" else 11},
            ))
    no_skill = float(pts["no_skill"].max()) if len(pts) else 0.0
    tickvals, ticktext = log_ticks(xs)
    fig.update_layout(
        title=f"{split}: validation accuracy against parameters ({len(shown)} complete trials at or above "
              f"{NO_SKILL_FACTOR:g}x the no-skill accuracy {no_skill:.3f}, {int(shown['pareto'].sum())} on the "
              f"front; {left_out} pruned, failed or chance-level left out)",
        xaxis={"title": "parameters (classical baselines: stored numbers)", "type": "log",
               "tickvals": tickvals, "ticktext": ticktext},
        yaxis={"title": "validation accuracy"}, height=480, template="plotly_white",
    )
    return fig


def _top(split: str, kind: str | None = None) -> float | None:
    rows = for_split(split, kind)
    return rows[0].accuracy if rows else None


def overview_figure(c: Comparison):
    import plotly.graph_objects as go

    board = c.leaderboard
    splits = [s for s in SPLITS if (board["split"] == s).any()]

    def best(split: str, role: str) -> float | None:
        v = board[(board["split"] == split) & (board["role"] == role)]["test_accuracy"].dropna()
        return 100 * float(v.max()) if len(v) else None

    fig = go.Figure()
    for name, ys in (
        ("champion", [best(s, "champion") for s in splits]),
        ("best baseline", [best(s, "baseline") for s in splits]),
        ("research", [_top(s, "research") for s in splits]),
        ("best published", [_top(s) for s in splits]),
    ):
        fig.add_trace(go.Bar(name=name, x=splits, y=ys, text=[f"{y:.2f}" if y is not None else "" for y in ys]))
    fig.update_layout(barmode="group", title="test accuracy per split (%)", yaxis={"title": "test accuracy (%)"},
                      height=420, template="plotly_white")
    return fig


def engines_figure(engines: pd.DataFrame):
    """Test accuracy against wall time, one marker per study, one colour per engine."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for engine, sub in engines.groupby("engine"):
        fig.add_trace(go.Scatter(
            x=sub["wall_seconds"], y=sub["test_accuracy"], mode="markers", name=engine,
            text=[f"{s} / {st} ({a}, {t} trials)" for s, st, a, t in
                  zip(sub["split"], sub["study"], sub["algorithm"], sub["trials"])],
            hovertemplate="%{text}<br>wall %{x:.0f} s<br>test accuracy %{y:.4f}<extra></extra>", marker={"size": 11},
        ))
    fig.update_layout(title="search engines: champion test accuracy against study wall time",
                      xaxis={"title": "wall time (s)"}, yaxis={"title": "test accuracy"}, height=420,
                      template="plotly_white")
    return fig


def to_html(c: Comparison, store: str) -> str:
    """A self-contained page (plotly.js embedded once, so it renders offline and inside the MLflow UI)."""
    import plotly.io as pio

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>EMNIST leaderboard</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}td:last-child{text-align:left}</style>",
        "</head><body><h1>EMNIST cross-split leaderboard</h1>",
        f"<p>Store <code>{html.escape(store)}</code>, written {_dt.datetime.now().isoformat(timespec='seconds')}. "
        f"{html.escape(_INTRO)}</p>",
        pio.to_html(overview_figure(c), full_html=False, include_plotlyjs=True),
    ]
    for split, sub, pub in _sections(c):
        parts += [f"<h2>{split}</h2>", _html_table(sub, _SHOWN)]
        if c.left_out.get(split):
            parts.append(f"<p>{c.left_out[split]} baseline run(s) on other test data left out.</p>")
        if len(pub):
            parts.append("<h3>published</h3>" + _html_table(pub, _PUB_SHOWN))
        if split in c.trials and c.trials[split]["eligible"].any():
            parts.append(pio.to_html(pareto_figure(split, c.trials[split], c.leaderboard), full_html=False,
                                     include_plotlyjs=False))
    if len(c.engines):
        parts += ["<h2>Search engines</h2>", f"<p>{html.escape(_ENG_INTRO)}</p>", _html_table(c.engines, _ENG_SHOWN),
                  pio.to_html(engines_figure(c.engines), full_html=False, include_plotlyjs=False)]
    if len(c.published):
        parts.append("<h2>Published figures, all splits</h2>" + _html_table(c.published, _ALL_PUB))
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_table(df: pd.DataFrame, cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r[c], c))}</td>" for c in cols) + "</tr>" for _, r in df.iterrows()
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(c: Comparison, output: Path, store: str) -> list[Path]:
    """Write the four report files into ``output`` (created if needed); nothing is written elsewhere."""
    output.mkdir(parents=True, exist_ok=True)
    paths = [output / name for name in FILES]
    c.leaderboard.to_csv(paths[0], index=False)
    c.published.to_csv(paths[1], index=False)
    c.engines.to_csv(paths[2], index=False)
    paths[3].write_text(to_markdown(c, store), encoding="utf-8")
    paths[4].write_text(to_html(c, store), encoding="utf-8")
    return paths


# --------------------------------------------------------------------------- the command


def run_compare(output: str | None = None, tracking_uri: str | None = None,
                log: Callable[[str], None] = print) -> CompareResult:
    """Build the leaderboard from the store, write it into ``output`` and log it to an ``emnist-compare`` run."""
    uri = resolve_tracking_uri(tracking_uri)
    store = redact(uri)
    from emnist_hpo.tracking.registry import mlflow_uris

    with mlflow_uris(uri):  # artifact repositories of mlflow-artifacts:/ URIs need the fluent URI
        return _run_compare(uri, store, output, log)


def _run_compare(uri: str, store: str, output: str | None, log: Callable[[str], None]) -> CompareResult:
    c = collect(make_client(uri))
    if not len(c.leaderboard):
        raise EmnistHpoError(
            f"nothing to compare in {store!r}: no champion and no baseline run on any split; run "
            f"`python -m emnist_hpo study --split <split>` or `python -m emnist_hpo run <experiment> --split <split>` first"
        )
    out = Path(output or DEFAULT_OUTPUT)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output must be a folder (output={str(out)!r} is a file)")
    try:
        files = write_report(c, out, store)
    except OSError as exc:
        raise ConfigError(f"--output folder {str(out)!r} cannot be written: {exc.strerror or exc}") from None
    tracker = Tracker(uri, COMPARE_EXPERIMENT)
    run = tracker.start_run("compare", {TAG_KIND: "compare"})
    try:
        metrics: dict[str, float] = {"rows": len(c.leaderboard)}
        for _, r in c.leaderboard[c.leaderboard["role"] == "champion"].iterrows():
            if r["test_accuracy"] is not None and pd.notna(r["test_accuracy"]):
                metrics[f"{r['split']}.champion_test_accuracy"] = float(r["test_accuracy"])
        tracker.log_metrics(run, metrics)
        tracker.log_params(run, {"splits": ",".join(sorted(set(c.leaderboard["split"]))), "output": str(out)})
        with tempfile.TemporaryDirectory() as tmp:  # only the report files, whatever else the folder holds
            for p in files:
                (Path(tmp) / p.name).write_bytes(p.read_bytes())
            tracker.log_artifacts(run, Path(tmp), "compare")
        tracker.end_run(run, "FINISHED")
    except BaseException as exc:
        tracker.end_run(run, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    log(f"compare: {len(c.leaderboard)} rows over {c.leaderboard['split'].nunique()} split(s) -> {out}/ "
        f"(MLflow run {run} in {COMPARE_EXPERIMENT})")
    return CompareResult(c, out, files, run)


def summary(c: Comparison) -> str:
    """The leaderboard printed by the command: one line per row."""
    lines = []
    for _, r in c.leaderboard.iterrows():
        lines.append(f"  {r['split']:<9} {r['role']:<9} {_fmt(r['test_accuracy'], 'test_accuracy'):>7}  "
                     f"{_fmt(r['params'], 'params'):>11}  {_fmt(r['train_size'], 'train_size'):>9}  {r['name']}")
    out = ["  split     role        test       params      train  name"] + lines
    if len(c.engines):
        out += ["", "  search engines (split, engine, trials x epochs, best val, test, params, wall time):"]
        for _, r in c.engines.iterrows():
            out.append(f"  {r['split']:<9} {r['algorithm']:<32} {_fmt(r['trials'], 'trials'):>4} x "
                       f"{_fmt(r['epochs'], 'epochs'):<3} {_fmt(r['best_val_accuracy'], 'val_accuracy'):>7} "
                       f"{_fmt(r['test_accuracy'], 'test_accuracy'):>7} {_fmt(r['champion_params'], 'params'):>10} "
                       f"{_fmt(r['wall_seconds'], 'wall_seconds'):>9}  {r['study']}")
    return "\n".join(out)
