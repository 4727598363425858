"""Run a command and record its peak RSS, from a small process.

    RSS_FILE=figures.json python -m benchmarks.launch COMMAND [ARGS...]

Linux counts in a child's peak RSS (``ru_maxrss``) the resident memory of the parent it was
forked from, so a benchmark that serves the simulator or builds state in its own process would
measure itself. This launcher is small after its own exec; the command forked from it is
measured alone (``wait4``). Writes ``{"exit": code, "maxrss_kib": n}`` to ``RSS_FILE`` and
exits with the command's code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson


def main() -> int:
    proc = subprocess.Popen(sys.argv[1:])
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    Path(os.environ["RSS_FILE"]).write_bytes(
        orjson.dumps({"exit": code, "maxrss_kib": usage.ru_maxrss})
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
