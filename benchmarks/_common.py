"""Shared helpers of the benchmarks: machine description, child processes, result files, tables."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "emnist" / "sample"
PYTHON = sys.executable
#: Images in the full EMNIST bymerge split (train, test), NIST's release.
BYMERGE_FULL = (697_932, 116_323)


def machine() -> dict[str, Any]:
    """What the numbers were measured on (CPU, cores, load, versions), for the report header."""
    cpu = platform.processor() or ""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.partition(":")[2].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.partition(":")[2].split())
    except OSError:
        pass
    from emnist_hpo.runtime import configure

    configure()  # as every study process does before Keras loads: else oneDNN read "off" on the Zen 3 machine here,
    import keras  # where the studies (python -m emnist_hpo) ran with it on

    info = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "bf16_units": sorted(flags & {"avx512_bf16", "amx_bf16"}),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
    }
    if info["backend"] == "tensorflow":
        import tensorflow as tf

        from emnist_hpo.train.trainer import onednn_enabled

        info["tensorflow"] = tf.__version__
        info["onednn"] = onednn_enabled()  # TensorFlow's oneDNN kernels (emnist_hpo turns them on for x86-64)
    info["commit"] = commit()
    return info


def commit() -> str:
    """The code the figures were taken with: ``git describe``'s commit, ``-dirty`` with uncommitted changes."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def load_now() -> float:
    """1-minute load average: how busy the shared machine was while a figure was taken."""
    return round(os.getloadavg()[0], 2)


def peak_rss_mb() -> float:
    """High-water mark of this process's resident memory (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(args: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
              timeout: float | None = None) -> dict[str, Any]:
    """Run ``args`` through ``_rss.py``: returns rc, wall seconds, the child's peak RSS (MB) and its output tail."""
    cmd = [PYTHON, str(ROOT / "benchmarks" / "_rss.py"), *args]
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    report: dict[str, Any] = {"rc": proc.returncode, "wall_s": round(wall, 2)}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("{\"peak_rss_mb\""):
            report.update(json.loads(line))
            break
    report["tail"] = (proc.stderr + proc.stdout)[-1500:]
    return report


def median(xs: Iterable[float]) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:  # nan
            return "-"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(c) for c in r) + " |")
    return "\n".join(out)


def write_results(name: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` and ``results/<name>.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    j, m = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    j.write_text(json.dumps(data, indent=2, default=str) + "\n")
    m.write_text(markdown + "\n")
    return j, m


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
