"""A deliberately loaded host: busy loops on every core, for as long as a block runs.

    with busy_loops():            # os.cpu_count() * 2 processes spinning
        ...boot something...

Each loop is a Python process at the default priority (a loop at a lower priority would not compete
with QEMU). All are killed, by their pids, when the block ends, however it ends, and each dies with the
process that started it (PR_SET_PDEATHSIG), so not even a SIGKILLed test leaves one spinning.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# PR_SET_PDEATHSIG (1) to SIGKILL (9); then make sure the parent had not died already
SPIN = ("import ctypes, os, sys\nctypes.CDLL(None).prctl(1, 9)\nif os.getppid() != int(sys.argv[1]):\n    sys.exit()\n"
        "while True:\n    pass\n")


@contextmanager
def busy_loops(count: int | None = None) -> Iterator[list[int]]:
    """`count` (default: twice the cores) spinning processes while the block runs; yields their pids."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(count if count is not None else 2 * (os.cpu_count() or 1)):
            procs.append(subprocess.Popen([sys.executable, "-I", "-S", "-c", SPIN, str(os.getpid())],
                                          stdin=subprocess.DEVNULL))
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
