"""After a study: Optuna's plots on the parent run, and a warning when the best trial sits at an edge.

:func:`log_study_plots` is called once per study by :func:`study._finalize`. It
writes ``study/optuna_plots.html`` (one self-contained page: optimization
history, parameter importances, parallel coordinates, slice, intermediate values
or, for two objectives, the Pareto front) to the study's parent run. When the
champion's value of a numeric range parameter lies at a bound of the search
space (:meth:`SearchSpace.edges`), the best model may lie outside the space: the
warning is printed and set as tag ``emnist_hpo.edge_warning``. Bounds that are
limits of the parameter itself (dropout 0, one conv block, the deepest stack a
28x28 image can be pooled through) are not reported: the space cannot be widened
past them. Neither ever fails the study.
"""

from __future__ import annotations

import html
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna

from emnist_hpo.model.architecture import max_blocks
from emnist_hpo.search.space import SearchSpace
from emnist_hpo.tracking.tracker import Tracker

TAG_EDGE_WARNING = "emnist_hpo.edge_warning"
PLOTS_FILE = "optuna_plots.html"

#: Limits of each parameter's own domain: a best value sitting on one (no dropout, one block) is not a
#: sign that the optimum lies outside the space, since the space cannot be widened past it.
DOMAIN_LIMITS: dict[str, tuple[float | None, float | None]] = {
    "conv_blocks": (1, None), "convs_per_block": (1, None), "filters": (1, None), "kernel": (1, None),
    "dense_layers": (0, None), "dense_units": (1, None), "batch_size": (1, None),
    "conv_dropout": (0.0, None), "dense_dropout": (0.0, None), "label_smoothing": (0.0, None),
    "weight_decay": (0.0, None), "augment": (0.0, 1.0),
}


def _base(name: str) -> str:
    return name.rsplit("_", 1)[0] if name[-1].isdigit() else name


def _deepest(space: SearchSpace, params: dict[str, Any]) -> int:
    """The most conv blocks a 28x28 image holds with ``params``' kernels, padding and convs per block."""

    def value(name: str, default: Any) -> Any:
        if name in params:
            return params[name]
        spec = space.params.get(name)
        return spec.values[0] if spec is not None and spec.kind == "fixed" else default

    kernels = [v for k, v in params.items() if _base(k) == "kernel"] or [value("kernel", 3)]
    return max_blocks(max(kernels), value("padding", "same"), value("convs_per_block", 1))


def edge_params(space: SearchSpace, params: dict[str, Any]) -> list[str]:
    """:meth:`SearchSpace.edges` of ``params``, less values on a limit of the parameter's own domain."""
    out = []
    for name in space.edges(params):
        low, high = DOMAIN_LIMITS.get(_base(name), (None, None))
        if name == "conv_blocks":
            high = _deepest(space, params)  # 2x2 pooling: a fifth block would take 28x28 below 1x1
        if params[name] == low or params[name] == high:
            continue
        out.append(name)
    return out


def edge_warning(space: SearchSpace, trial: optuna.trial.FrozenTrial) -> str | None:
    """A sentence naming the parameters of ``trial`` at a bound of their range, or None."""
    hits = edge_params(space, trial.params)
    if not hits:
        return None
    parts = []
    for name in hits:
        spec = space.params[_base(name)]
        parts.append(f"{name}={trial.params[name]:g} (range {spec.low:g}..{spec.high:g})")
    return (f"best trial {trial.number} sits at the edge of the search space: {', '.join(parts)}; "
            f"the optimum may lie outside it: widen or shift those ranges")


def study_figures(study: optuna.Study) -> list[tuple[str, Any]]:
    """``(title, figure or the reason it is unavailable)`` for each of Optuna's plots that fits the study."""
    from optuna import visualization as vis

    multi = len(study.directions) > 1
    kw: dict[str, Any] = {}
    if multi:
        kw = {"target": lambda t: t.values[0], "target_name": "val_accuracy"}
    plots: list[tuple[str, Callable[[], Any]]] = [
        ("optimization history", lambda: vis.plot_optimization_history(study, **kw)),
        ("parameter importances", lambda: vis.plot_param_importances(study, **kw)),
        ("parallel coordinates", lambda: vis.plot_parallel_coordinate(study, **kw)),
        ("slice", lambda: vis.plot_slice(study, **kw)),
    ]
    if multi:
        plots.append(("Pareto front", lambda: _params_axis(
            vis.plot_pareto_front(study, target_names=["val_accuracy", "params"]), study)))
    else:
        plots.append(("intermediate values", lambda: vis.plot_intermediate_values(study)))
    out = []
    for title, make in plots:
        try:
            with warnings.catch_warnings():  # small studies make importances warn; the page says enough
                warnings.simplefilter("ignore")
                out.append((title, make()))
        except Exception as exc:  # noqa: BLE001 - e.g. importances need two complete trials
            out.append((title, f"not available: {' '.join(str(exc).split())[:300]}"))
    return out


def _params_axis(fig: Any, study: optuna.Study) -> Any:
    """The Pareto plot's parameter axis on a log scale, read as 10k, 100k, 1M (parameter counts span decades)."""
    from emnist_hpo.model.describe import log_ticks

    sizes = [t.values[1] for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
             if t.values and len(t.values) > 1]
    tickvals, ticktext = log_ticks(sizes)
    if tickvals:
        fig.update_yaxes(type="log", tickvals=tickvals, ticktext=ticktext)
    return fig


def plots_html(study: optuna.Study, warning: str | None = None) -> str:
    """One self-contained page of the study's plots (plotly.js embedded once: renders offline and in MLflow)."""
    import plotly.io as pio

    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             f"<title>{html.escape(study.study_name)}</title></head>",
             f"<body style='font-family:sans-serif;margin:2em'><h1>Study {html.escape(study.study_name)}</h1>"]
    if warning:
        parts.append(f"<p style='color:#b00'><b>warning:</b> {html.escape(warning)}</p>")
    js = True
    for title, fig in study_figures(study):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if isinstance(fig, str):
            parts.append(f"<p>{html.escape(fig)}</p>")
        else:
            parts.append(pio.to_html(fig, full_html=False, include_plotlyjs=js))
            js = False
    parts.append("</body></html>")
    return "\n".join(parts)


def log_study_plots(
    study: optuna.Study,
    space: SearchSpace,
    champion: optuna.trial.FrozenTrial,
    tracker: Tracker,
    parent_run_id: str,
    log: Callable[[str], None] = print,
) -> str | None:
    """Log the plots page to ``parent_run_id`` under ``study/``; warn about edges. Returns the warning."""
    warning = None
    try:
        warning = edge_warning(space, champion)
        if warning:
            log(f"warning: {warning}")
            tracker.set_tags(parent_run_id, {TAG_EDGE_WARNING: warning})
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / PLOTS_FILE).write_text(plots_html(study, warning), encoding="utf-8")
            tracker.log_artifacts(parent_run_id, Path(tmp), "study")
    except Exception as exc:  # noqa: BLE001 - plots are a report: they never fail a finished study
        log(f"warning: study plots not written: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
    return warning
