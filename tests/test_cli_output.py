"""What the command line prints: `--help` of every command, and a clean terminal during a study and predict."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from emnist_hpo.cli import COMMANDS, build_parser, main

REPO = Path(__file__).resolve().parents[1]
#: reStructuredText that has no business in a terminal: ``literal``, :func:`role`, :class:`...`.
RST = re.compile(r"``|:(?:func|class|mod|meth|attr|data|exc|ref|doc):`")
ANSI = "\x1b["


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _entries(text: str) -> dict[str, str]:
    """The options section of a help text: first option string -> its whole entry (whitespace collapsed)."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^  (-\w, )?(--[\w-]+|-\w)\b", line)
        if match:
            current = match.group(2)
            entries[current] = line
        elif current and line.startswith("      "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_command_has_help_without_markup(capsys):
    top = _help([], capsys)
    assert not RST.search(top), top
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", top, re.M), f"{command} is not listed in the top-level help"
        text = _help([command], capsys)
        assert not RST.search(text), f"{command} --help shows markup:\n{text}"
        assert text.startswith(f"usage: emnist-hpo {command}")


def test_every_option_shows_its_default(capsys):
    """An option that takes a value and is not required says its default, given by the parser or in words."""
    for command, sub in _subparsers(build_parser()).items():
        entries = _entries(_help([command], capsys))
        for action in sub._actions:
            if not action.option_strings or action.required or action.nargs == 0:
                continue  # positionals, --split, flags (off unless given) and -h
            option = max(action.option_strings, key=len)
            assert option in entries, f"{command} {option} missing from the help: {sorted(entries)}"
            entry = entries[option]
            assert "(default: " in entry, f"{command} {option} does not say its default: {entry!r}"
            if action.default is not None and "(default" not in (action.help or ""):
                assert f"(default: {action.default})" in entry, f"{command} {option}: {entry!r}"


def test_defaults_shown_are_the_parsers_own(capsys):
    entries = _entries(_help(["study"], capsys))
    assert "(default: 20; with --timeout, as many as the budget affords)" in entries["--trials"] and "(default: successive-halving)" in entries["--pruner"]
    assert "(default: 0)" in entries["--seed"]  # a zero default is still shown
    assert "(default: 10)" in entries["--epochs"]  # what the study uses when --epochs is not given
    args = build_parser().parse_args(["study", "--split", "digits"])
    assert (args.trials, args.pruner, args.seed, args.finalists, args.folds) == (None, "successive-halving", 0, 3, 1)
    run = _entries(_help(["run"], capsys))
    assert "(default: the experiment's own)" in run["--epochs"] and "(default: the experiment's own)" in run["--seed"]
    assert build_parser().parse_args(["run", "lenet", "--split", "digits"]).seed is None


@pytest.mark.slow
def test_study_and_predict_print_no_colour_codes(tmp_path, sample_dir):
    """MLflow's "Add type hints to the `predict` method" warning (yellow ANSI codes) no longer reaches stderr.

    It came from MLflow checking the pyfunc's ``predict`` each time the model's code file runs (when it is
    logged, verified and loaded), under a "once" warnings filter of MLflow's own that no caller can override.
    """
    from PIL import Image, ImageDraw

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "EMNIST_DATA_DIR")}
    env.update(PYTHONPATH=str(REPO), EMNIST_HPO_CACHE=str(tmp_path / "cache"), TERM="xterm-256color")
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    study = subprocess.run(
        [sys.executable, "-m", "emnist_hpo", "study", "--split", "digits", "--trials", "1", "--epochs", "1",
         "--max-train-samples", "1000", "--data-dir", str(sample_dir), "--storage", f"sqlite:///{tmp_path}/optuna.db",
         "--tracking-uri", tracking, "--no-warm-start", "--finalists", "0", "--search-space", "small",
         "--pruner", "none", "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert study.returncode == 0, study.stderr
    assert "-> @champion" in study.stdout  # the model was logged, verified and registered: where it used to warn
    image = Image.new("L", (64, 64), 255)
    ImageDraw.Draw(image).line([(32, 8), (32, 56)], fill=0, width=7)
    image.save(tmp_path / "one.png")
    predict = subprocess.run(
        [sys.executable, "-m", "emnist_hpo", "predict", "--split", "digits", "--tracking-uri", tracking,
         str(tmp_path / "one.png")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert predict.returncode == 0, predict.stderr
    for name, proc in (("study", study), ("predict", predict)):
        assert ANSI not in proc.stderr and ANSI not in proc.stdout, f"{name} printed colour codes:\n{proc.stderr}"
        assert "Add type hints" not in proc.stderr, f"{name}:\n{proc.stderr}"
