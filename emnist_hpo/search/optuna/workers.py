"""``study --workers N``: N worker processes on one study, watched (and stopped) by the process that started them."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Sequence

import optuna

from emnist_hpo.coordination import signal_handlers
from emnist_hpo.options import StudyOptions
from emnist_hpo.search.optuna.progress import Progress
from emnist_hpo.search.optuna.storage import finished_count

# The payload (options, store URLs with any password) comes on stdin: a command line is visible to every user (ps).
_WORKER_CODE = (
    "import sys; import emnist_hpo.cli as cli; getattr(cli, 'import_keras_quietly', lambda: None)(); "
    "from emnist_hpo.search.optuna.study import worker_main; sys.exit(worker_main(sys.stdin.read()))"
)


def run_workers(opts: StudyOptions, parent: str, study: optuna.Study, progress: Progress,
                 log: Callable[[str], None]) -> None:
    """Run the study's trials in ``opts.workers`` subprocesses (this process only watches) and wait for them.

    Each worker is ``python -c`` of :func:`worker_main`: it opens the same
    stores, nests its trial runs under this process's parent run, and never
    finalizes. Every process that opens the study gets its own sampler seed
    (see :func:`_open_study`). On Ctrl-C or
    SIGTERM the workers get SIGTERM (each closes its trial as interrupted), and
    SIGKILL if they are not gone within a minute.
    """
    env = dict(os.environ)
    env.pop("PYTEST_CURRENT_TEST", None)  # MLflow adds test-only checks under pytest
    env.setdefault("TF_NUM_INTRAOP_THREADS", str(max(1, (os.cpu_count() or 1) // opts.workers)))
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(opts.workers):
            spec = {**dataclasses.asdict(opts), "workers": 1, "progress": False}
            payload = json.dumps({"options": spec, "parent_run_id": parent})
            proc = subprocess.Popen([sys.executable, "-c", _WORKER_CODE], env=env, stdin=subprocess.PIPE, text=True)
            procs.append(proc)
            proc.stdin.write(payload)
            proc.stdin.close()
        log(f"{opts.workers} worker processes on study {opts.name!r} (pids {', '.join(str(p.pid) for p in procs)})")
        while any(p.poll() is None for p in procs):
            progress.set(finished_count(study))
            time.sleep(1.0)
    except BaseException:
        stop_workers(procs)
        raise
    progress.set(finished_count(study))
    for i, p in enumerate(procs, 1):
        if p.returncode != 0:
            log(f"worker {i} (pid {p.pid}) exited with code {p.returncode}; any trials left run here")


def stop_workers(procs: Sequence[subprocess.Popen], grace: float = 60.0) -> None:
    """SIGTERM every worker, then SIGKILL what is left after ``grace``; a second Ctrl-C cannot cut this short."""
    with signal_handlers(signal.SIG_IGN, (signal.SIGINT, signal.SIGTERM)):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
