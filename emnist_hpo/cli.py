"""Command line: ``python -m emnist_hpo <command>`` (also installed as ``emnist-hpo``).

Every user error is one line on stderr and exit code 2; Ctrl-C exits 130 and
SIGTERM 143, each after closing the current trial's run and saying how to resume.
"""

from __future__ import annotations

import argparse
import errno
import math
import shlex
import signal
import sys
from typing import Sequence

from emnist_hpo.errors import ConfigError, EmnistHpoError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM so the same clean-up as Ctrl-C runs."""


def _on_sigterm(signum, frame):
    raise Terminated()


_TF_NOISE = ("All log messages before absl::InitializeLog()", "oneDNN custom operations", "cpu_feature_guard",
             "This TensorFlow binary is optimized", "failed call to cuInit", "Unable to register cu",
             "TF-TRT Warning", "computation placer already registered")


def import_keras_quietly() -> None:
    """Import Keras (and TensorFlow) with TensorFlow's C++ start-up notices filtered out of stderr.

    TF_CPP_MIN_LOG_LEVEL does not silence the lines absl prints before its logging is
    initialised, so fd 2 is captured during the import and only other lines are replayed.
    """
    import os
    import tempfile

    from . import runtime

    runtime.configure()
    if "keras" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            import keras  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if line.strip() and not any(n in line for n in _TF_NOISE):
                    print(line, file=sys.stderr)


def _positive_int(text: str) -> int:
    """An integer (its range is checked with the other options, naming the option's rule)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _finite_float(text: str) -> float:
    """A number; NaN and infinity are refused here (every range check would let one of them through)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 1..65535, got {text!r}")
    return value


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's default in its help: "(default: X)" from the parser, or written in the help where the
    default is not a plain value (an environment variable, the experiment's own, computed)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or not action.option_strings or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return text
        if action.nargs == 0:  # a flag: off unless given
            return text
        return f"{text} (default: %(default)s)"


_TRACKING_HELP = "MLflow tracking store (default: MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)"
_STORAGE_HELP = "Optuna storage URL, any SQLAlchemy URL (default: EMNIST_HPO_STORAGE, else sqlite:///mlruns/optuna.db)"
_DATA_HELP = ("folder of NIST's gzip IDX files or gzip.zip (default: EMNIST_DATA_DIR, else the emnist package's "
              "cache, else a download)")
_SPLITS_HELP = "byclass, bymerge, balanced, letters, digits or mnist"


def _common_data(p: argparse.ArgumentParser, *, experiment: bool = False) -> None:
    """Options of ``study`` and ``run``; ``experiment``: unset values fall back to the experiment file's."""
    own = " (default: the experiment's own)"
    p.add_argument("--split", required=True, help=_SPLITS_HELP)
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="max epochs per training run" + (own if experiment else " (default: 10)"))
    p.add_argument("--max-train-samples", type=_positive_int, default=None, metavar="K",
                   help="stratified subset of K training images, for quick runs (default: all)")
    p.add_argument("--val-fraction", type=_finite_float, default=0.2,
                   help="validation share carved from train" + (own if experiment else ""))
    p.add_argument("--data-dir", default=None, help=_DATA_HELP)
    p.add_argument("--tracking-uri", default=None, help=_TRACKING_HELP)
    p.add_argument("--seed", type=_positive_int, default=0,
                   help="seeds sampling, data split and training" + (own if experiment else ""))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from emnist_hpo.options import DEFAULT_TRIALS

    parser = _Parser(
        prog="emnist-hpo", formatter_class=_HelpFormatter,
        description="Hyperparameter search and experiment tracking for the best and smallest CNN on every EMNIST "
                    "split (Optuna + MLflow + Keras 3). Also run as: python -m emnist_hpo COMMAND.",
        epilog="Each command has its own options: emnist-hpo COMMAND --help.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    def command(name: str, text: str, description: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=description or text[:1].upper() + text[1:] + ".",
                              formatter_class=_HelpFormatter)

    s = command("study", "run or resume an Optuna study on one split",
                "Run or resume an Optuna study on one split: every trial an MLflow run, the champion re-evaluated, "
                "tested once and registered as model emnist-<split>. Running the same command again resumes it.")
    _common_data(s)
    s.add_argument("--trials", type=_positive_int, default=None,
                   help=f"finished trials the study ends with (default: {DEFAULT_TRIALS}; with --timeout, as many "
                        "as the budget affords)")
    s.add_argument("--storage", default=None, help=_STORAGE_HELP)
    s.add_argument("--study-name", default=None,
                   help="the study to run or resume (default: emnist-<split>; emnist-<split>-pareto for two objectives; "
                        "emnist-<split>-kt-<tuner> with --engine keras-tuner)")
    s.add_argument("--search-space", default="search_spaces/default.yaml",
                   help="YAML search space: a file, or a name in search_spaces/")
    s.add_argument("--sampler", default=None,
                   help="tpe, random, qmc, cmaes or nsga2 (default: tpe; nsga2 for two objectives)")
    s.add_argument("--random-fraction", type=_finite_float, default=0.0, metavar="F",
                   help="TPE: after its random start, draw this share of the configurations at random (evenly "
                        "spaced; BOHB's random fraction, a third there) so that the search keeps exploring (default: 0, "
                        "off)")
    s.add_argument("--last-rung", default=None, metavar="RULE",
                   help="under --timeout (one objective, successive halving): who trains the last, full-length rung. "
                        "close: nobody while the search screens, then the best two of the rung below when it stops; "
                        "leaders: the best of the rung below, as soon as it leads (and, where one ran it alone, the "
                        "best left waiting as the search closes; fewer configurations screened) (default: close)")
    s.add_argument("--pruner", default="successive-halving",
                   help="successive-halving (the best 1/eta of each rung go on), hyperband, median (one objective "
                        "only), none; all but none also end a trial still under twice the no-skill accuracy at a rung")
    s.add_argument("--fidelity", default="data",
                   help="what the rungs grow. data: rung k of R sees 1/eta^(R-1-k) of the last rung's images, as two "
                        "passes over a nested share of the training set; the last trains --epochs on all of it. "
                        "epochs: rungs end after 1, eta, eta^2 ... epochs on all the data. none: one rung")
    s.add_argument("--reduction-factor", type=_positive_int, default=3, metavar="ETA",
                   help="eta: the best 1/eta of a rung go on, and each rung has eta times the data of the one before")
    s.add_argument("--max-flops", type=_positive_int, default=None, metavar="N",
                   help="prune sampled models needing more than N forward FLOPs per image before training "
                        "(default: no limit)")
    s.add_argument("--warm-start-from", default="", metavar="STUDY[,STUDY]",
                   help="queue the best trials of other studies in the same storage first (a study name, or a "
                        "split for its emnist-<split> study): balanced <-> bymerge share classes (default: none)")
    s.add_argument("--warm-start-top", type=_positive_int, default=5, metavar="K",
                   help="how many of each --warm-start-from study's best trials")
    s.add_argument("--timeout", type=_finite_float, default=None,
                   help="wall-clock budget in seconds for the whole study: the search stops in time to "
                        "re-evaluate the finalists and fit the champion within it (default: none)")
    s.add_argument("--objectives", default="accuracy",
                   help="accuracy, or a Pareto front of accuracy against size or cost: accuracy,params or accuracy,flops")
    s.add_argument("--no-warm-start", action="store_true", help="do not enqueue the seed experiments first")
    s.add_argument("--seed-experiments", default="two_conv,one_conv,compact",
                   help="experiments enqueued first, in this order")
    s.add_argument("--early-stopping", type=_positive_int, default=0,
                   help="patience in epochs at the last rung and in re-evaluations; 0 = off: each trains the whole "
                        "schedule, as the final fit will")
    s.add_argument("--average-epochs", type=_finite_float, default=None, metavar="EPOCHS",
                   help="validate and deliver each run's weights averaged over about this many epochs (Polyak "
                        "averaging, Keras' use_ema), at most an eighth of the first rung's steps; 0 = off (default: 0.5)")
    s.add_argument("--no-final-fit", action="store_true",
                   help="register the champion trial's own model instead of retraining it on train+validation")
    s.add_argument("--no-register", action="store_true", help="do not register the champion")
    s.add_argument("--no-prefer-smaller", action="store_true",
                   help="crown the best validation score; by default the trial with the fewest parameters among "
                        "those within one standard error of the best, and no larger than it in parameters or FLOPs, is "
                        "crowned (scores closer than their noise do not rank models)")
    s.add_argument("--finalists", type=_positive_int, default=3,
                   help="top-k trials re-trained on other folds before crowning the best mean, 0 = off")
    s.add_argument("--folds", type=_positive_int, default=1,
                   help="re-evaluation folds per finalist (each one full-fidelity training)")
    s.add_argument("--no-trial-plots", action="store_true",
                   help="log trial reports as CSV only and draw the PNGs for the champion's trial only (faster trials)")
    s.add_argument("--max-params", type=_positive_int, default=None, metavar="N",
                   help="prune sampled models with more than N parameters before training (default: no limit)")
    s.add_argument("--workers", type=_positive_int, default=1,
                   help="trials run at once, each worker a subprocess on the same study")
    s.add_argument("--engine", choices=("optuna", "keras-tuner"), default="optuna",
                   help="search engine; keras-tuner keeps its state in mlruns/keras_tuner/<study-name>")
    s.add_argument("--tuner", choices=("hyperband", "bayesian"), default=None,
                   help="Keras Tuner algorithm for --engine keras-tuner (default: hyperband)")

    u = command("ui", "serve the MLflow UI and the Optuna dashboard on the studies' stores")
    u.add_argument("--storage", default=None, help=_STORAGE_HELP)
    u.add_argument("--tracking-uri", default=None, help=_TRACKING_HELP)
    u.add_argument("--mlflow-port", type=_port, default=5000, help="port of the MLflow UI")
    u.add_argument("--dashboard-port", type=_port, default=8080, help="port of the Optuna dashboard")
    u.add_argument("--host", default="127.0.0.1", help="address to bind")

    r = command("run", "train, test and track one fixed experiment (experiments/<name>.yaml)")
    r.add_argument("experiment", help="experiment YAML, or a name in experiments/ (lenet, svm, ...)")
    _common_data(r, experiment=True)
    r.set_defaults(val_fraction=None, seed=None)  # unset: the experiment's own values

    c = command("compare", "write the cross-split leaderboard (champions, baselines, published figures)")
    c.add_argument("--output", default=None, help="folder for the report files (default: mlruns/compare)")
    c.add_argument("--tracking-uri", default=None, help=_TRACKING_HELP)

    p = command("predict", "classify image files with a split's registered champion",
                "Top characters per image (PNG, JPEG, ...; dark ink on light paper or the reverse) by the "
                "champion model of a split. Exit code 2 if any image could not be classified; the others are "
                "still answered.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, one character each")
    p.add_argument("--split", required=True, help="whose champion: " + _SPLITS_HELP)
    p.add_argument("--json", action="store_true", help='print [{"image", "top": [{"char", "prob"}]}] (or "error")')
    p.add_argument("--top", type=_positive_int, default=3, help="characters listed per image")
    p.add_argument("--tracking-uri", default=None, help=_TRACKING_HELP)

    e = command("export", "write a split's champion as a TFLite model and report its test accuracy")
    e.add_argument("--split", required=True, help=_SPLITS_HELP)
    e.add_argument("--format", choices=("tflite",), default="tflite", help="float32 TFLite")
    e.add_argument("--int8", action="store_true", help="also write a full-integer int8 model (PATH-int8.tflite)")
    e.add_argument("--output", default=None, metavar="PATH",
                   help="the float file (default: emnist-<split>-v<version>.tflite)")
    e.add_argument("--data-dir", default=None, help="NIST files for the test set and calibration; " + _DATA_HELP[
        len("folder of NIST's gzip IDX files or gzip.zip "):])
    e.add_argument("--tracking-uri", default=None, help=_TRACKING_HELP)
    return parser


def _check_stores(storage: str | None, tracking_uri: str | None, *, optuna: bool = True) -> None:
    """The stores' URLs as the command will use them: no in-memory SQLite, neither pointing at the other's
    database (nothing is written; the study loop checks the rest when it opens them). ``optuna=False``: the
    command uses no Optuna storage, only the tracking store's database is checked."""
    from emnist_hpo.config import resolve_storage, resolve_tracking_uri
    from emnist_hpo.coordination import check_separate_stores, check_sqlite_location

    storage_url = resolve_storage(storage) if optuna else None
    tracking = resolve_tracking_uri(tracking_uri)
    if storage_url is not None:
        check_sqlite_location(storage_url, "Optuna storage", "--storage")
    check_sqlite_location(tracking, "MLflow tracking store", "--tracking-uri")
    check_separate_stores(storage_url, tracking)


def _study_options(args: argparse.Namespace):
    """The study's options, validated with its search space, seed experiments and stores, before Keras loads."""
    from emnist_hpo.config import load_experiment
    from emnist_hpo.options import DEFAULT_TRIALS, MAX_TRIALS, StudyOptions
    from emnist_hpo.paths import find_experiment, find_search_space
    from emnist_hpo.search.space import SearchSpace

    opts = StudyOptions(
        split=args.split,
        trials=args.trials if args.trials is not None else MAX_TRIALS if args.timeout is not None else DEFAULT_TRIALS,
        epochs=args.epochs if args.epochs is not None else 10,
        max_train_samples=args.max_train_samples,
        val_fraction=args.val_fraction,
        data_dir=args.data_dir,
        storage=args.storage,
        tracking_uri=args.tracking_uri,
        study_name=args.study_name,
        search_space=args.search_space,
        sampler=args.sampler,
        random_fraction=args.random_fraction,
        last_rung=args.last_rung or StudyOptions.last_rung,
        pruner=args.pruner,
        seed=args.seed,
        timeout=args.timeout,
        objectives=tuple(o.strip() for o in args.objectives.split(",") if o.strip()),
        warm_start=not args.no_warm_start,
        seed_experiments=tuple(n.strip() for n in args.seed_experiments.split(",") if n.strip()),
        early_stopping_patience=args.early_stopping,
        average_epochs=StudyOptions.average_epochs if args.average_epochs is None else args.average_epochs,
        final_fit=not args.no_final_fit,
        register=not args.no_register,
        prefer_smaller=not args.no_prefer_smaller,
        finalists=args.finalists,
        folds=args.folds,
        max_params=args.max_params,
        max_flops=args.max_flops,
        fidelity=args.fidelity,
        reduction_factor=args.reduction_factor,
        warm_start_from=tuple(n.strip() for n in args.warm_start_from.split(",") if n.strip()),
        warm_start_top=args.warm_start_top,
        trial_plots=not args.no_trial_plots,
        progress=not args.no_progress,
        workers=args.workers,
    )
    opts.validate()
    if args.tuner is not None and args.engine != "keras-tuner":
        raise ConfigError(f"--tuner applies to --engine keras-tuner (engine={args.engine!r}, tuner={args.tuner!r})")
    if args.last_rung is not None and args.engine != "optuna":
        raise ConfigError(f"--last-rung is the Optuna engine's successive halving (engine={args.engine!r}, "
                          f"last_rung={opts.last_rung!r})")
    if opts.random_fraction and args.engine != "optuna":
        raise ConfigError(f"--random-fraction is the Optuna engine's TPE (engine={args.engine!r}, "
                          f"random_fraction={opts.random_fraction})")
    SearchSpace.load(find_search_space(opts.search_space))
    if opts.warm_start:
        for name in opts.seed_experiments:
            load_experiment(find_experiment(name))
    if args.engine != "keras-tuner" or args.storage is not None:
        _check_stores(args.storage, args.tracking_uri)
    else:
        _check_stores(None, args.tracking_uri, optuna=False)
    args.options = opts
    return args


def _study(args: argparse.Namespace) -> int:
    opts = args.options
    if args.engine == "keras-tuner":
        from emnist_hpo.search.keras_tuner.engine import run_kt_study, summary_table as kt_summary

        print(kt_summary(run_kt_study(opts, tuner=args.tuner or "hyperband", log=lambda m: print(m, file=sys.stderr))))
        return 0
    from emnist_hpo.search.optuna.study import run_study, summary_table

    res = run_study(opts, log=lambda m: print(m, file=sys.stderr))
    print(summary_table(res))
    return 0


def _ui(args: argparse.Namespace) -> int:
    from emnist_hpo.config import resolve_storage, resolve_tracking_uri  # light: the UIs need no Keras
    from emnist_hpo.serve.ui import serve

    _check_stores(args.storage, args.tracking_uri)
    return serve(
        storage=resolve_storage(args.storage),
        tracking_uri=resolve_tracking_uri(args.tracking_uri),
        mlflow_port=args.mlflow_port,
        dashboard_port=args.dashboard_port,
        host=args.host,
    )


def _run(args: argparse.Namespace) -> int:
    from emnist_hpo.baselines.experiment import run_experiment, summary_table

    _check_stores(None, args.tracking_uri, optuna=False)

    res = run_experiment(
        args.experiment, args.split, epochs=args.epochs, max_train_samples=args.max_train_samples,
        val_fraction=args.val_fraction, data_dir=args.data_dir, tracking_uri=args.tracking_uri, seed=args.seed,
        progress=not args.no_progress, log=lambda m: print(m, file=sys.stderr),
    )
    print(summary_table(res))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from emnist_hpo.reporting.compare import run_compare, summary

    res = run_compare(args.output, args.tracking_uri, log=lambda m: print(m, file=sys.stderr))
    print(summary(res.comparison))
    return 0


def _predict(args: argparse.Namespace) -> int:
    """Exit code 0 when every image was classified, 2 when any could not be (each says why)."""
    from emnist_hpo.serve.predict import format_json, format_text, predict_images

    results = predict_images(args.images, args.split, args.tracking_uri, top=args.top)
    answered = next((r.model for r in results if r.model and r.error is None), None)  # none: errors only
    if answered and not args.json:
        print(f"answered by {answered} (@champion)", file=sys.stderr)
    if args.json:
        print(format_json(results))
    else:
        for line in format_text(results):
            print(line)
    for r in results:
        if r.error is not None and not args.json:
            print(f"emnist-hpo: error: {r.error}", file=sys.stderr)
    return 2 if any(r.error is not None for r in results) else 0


def _export(args: argparse.Namespace) -> int:
    from emnist_hpo.serve.export import export_tflite, summary_table

    res = export_tflite(args.split, int8=args.int8, output=args.output, tracking_uri=args.tracking_uri,
                        data_dir=args.data_dir, log=lambda m: print(m, file=sys.stderr))
    print(summary_table(res))
    return 0


#: errno values of a full disk or an exhausted quota.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full(exc: BaseException) -> str | None:
    """One line for an exception caused by a full disk (an OSError ENOSPC/EDQUOT, or SQLite's "database or
    disk is full", however wrapped), naming what was being written; None for any other exception."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            path = exc.filename if exc.filename is not None else exc.filename2
            return f"{exc.strerror or 'no space left on device'} while writing {_what_is(path)}"
        if "database or disk is full" in str(exc):
            return "SQLite's 'database or disk is full' while writing to a store database"
        exc = exc.__cause__ or exc.__context__
    return None


def _what_is(path) -> str:
    """``path`` with what it is, as far as its place tells."""
    if path is None:
        return "a file"
    text = str(path)
    parts = text.replace("\\", "/").split("/")
    if text.endswith((".db", ".db-wal", ".db-journal", ".db-shm")):
        what = "the store database"
    elif "artifacts" in parts or "mlartifacts" in parts:
        what = "an MLflow artifact"
    elif "checkpoints" in parts or text.endswith(".keras"):
        what = "a trial checkpoint"
    elif "keras_tuner" in parts:
        what = "Keras Tuner state"
    else:
        what = "a file"
    return f"{what} {text}"


def _predict_check(args: argparse.Namespace) -> argparse.Namespace:
    from emnist_hpo.serve.predict import check_top

    check_top(args.top, args.split)
    return args


def _split_check(args: argparse.Namespace) -> argparse.Namespace:
    from emnist_hpo.data.nist import check_split

    check_split(args.split)
    return args


def _run_check(args: argparse.Namespace) -> argparse.Namespace:
    from emnist_hpo.data.nist import check_split
    from emnist_hpo.paths import find_experiment

    check_split(args.split)
    find_experiment(args.experiment)
    _check_stores(None, args.tracking_uri, optuna=False)
    return args


COMMANDS = {"study": _study, "ui": _ui, "run": _run, "compare": _compare, "predict": _predict, "export": _export}
#: What each command checks before Keras is imported (seconds of TensorFlow start-up are not spent on a typo).
CHECKS = {"study": _study_options, "predict": _predict_check, "export": _split_check, "run": _run_check}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    from emnist_hpo.coordination import redact_arg, redact_secrets

    try:
        args = CHECKS.get(args.command, lambda a: a)(args)  # bad input fails here, before Keras loads
        if args.command != "ui":
            import_keras_quietly()
        return COMMANDS[args.command](args)
    except EmnistHpoError as exc:
        print(f"emnist-hpo: error: {redact_secrets(' '.join(str(exc).split()))}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        full = disk_full(exc)
        if full is None:
            raise
        # everything finished before this write was committed (trials, runs, artifacts): a rerun resumes
        print(f"emnist-hpo: error: disk full: {full}; nothing finished was lost: free some space and run the "
              "same command again to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        code = 143 if isinstance(exc, Terminated) else 130
        what = "terminated" if code == 143 else "interrupted"
        # the interpreter that ran this (a venv's python need not be first on PATH); never a password
        again = shlex.join([sys.executable, "-m", "emnist_hpo", *(redact_arg(a) for a in argv)])
        print(f"emnist-hpo: {what}. Resume with: {again}"
              + (" (put the password back in place of ***)" if "***" in again else ""), file=sys.stderr)
        return code


__all__ = ["main", "build_parser", "ConfigError"]
