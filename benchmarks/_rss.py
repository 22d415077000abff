"""Run a command, then print its peak resident memory: ``python benchmarks/_rss.py CMD ARGS...``.

This process has exactly one child, so RUSAGE_CHILDREN's ``ru_maxrss`` is that
command's high-water mark (for a command with worker subprocesses: the largest
of its processes). The last stdout line is JSON.
"""

import json
import resource
import subprocess
import sys

if __name__ == "__main__":
    proc = subprocess.run(sys.argv[1:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": round(peak, 1), "child_rc": proc.returncode}), flush=True)
    sys.exit(proc.returncode)
