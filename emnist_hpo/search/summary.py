"""The end-of-search summary both engines print: what was found, its cost, and what to run next."""

from __future__ import annotations

from typing import Any

from emnist_hpo.coordination import redact_secrets as redact


def format_summary(title: str, states: dict[str, int], rows: list[tuple[str, str]], params: dict[str, Any],
                   next_steps: list[str]) -> str:
    """The end-of-study summary both engines print: states, a table of what was found, its parameters, what next."""
    lines = [title, "  states: " + ", ".join(f"{k.lower()} {v}" for k, v in sorted(states.items()))]
    if rows:
        w = max(len(k) for k, _ in rows)
        lines += [f"  {k:<{w}}  {v}" for k, v in rows]
    if params:
        lines.append("  best params:")
        lines += [f"    {k} = {v}" for k, v in sorted(params.items())]
    if next_steps:
        lines.append("  next:")
        lines += [f"    {s}" for s in next_steps]
    return "\n".join(lines)


def next_commands(split: str, parent_run_id: str | None, tracking_uri: str | None, registered: bool) -> list[str]:
    """What a user runs after a study: the UIs, the leaderboard, the champion on their own images."""
    exe = "python -m emnist_hpo"
    uri = f" --tracking-uri {redact(tracking_uri)}" if tracking_uri and "mlruns/mlflow.db" not in tracking_uri else ""
    out = [f"{exe} ui{uri}" + (f"      # the study's runs (parent run {parent_run_id})" if parent_run_id else "")]
    out.append(f"{exe} compare{uri}      # the leaderboard across splits")
    if registered:
        out.append(f"{exe} predict --split {split}{uri} IMAGE.png      # the champion on your own images")
    return out
