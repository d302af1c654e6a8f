"""Benchmark: the main job, `osbuilder rootfs && osbuilder image && osbuilder boot --check`, cold and warm.

Cold is a fresh machine after `.ci/install-deps`: an empty per-user cache (CACHE_DIR of its own: no
base tree, no Debian boot kernel, no KVM verdict, no ccache) and a fresh WORKDIR. Warm is the same
three commands again in another fresh WORKDIR with that cache kept (everything cached; the image is
made anew). Each command's wall time is printed, the totals, and the load average, since these are
absolute times on a shared 2-core machine (issue 18's targets: cold <= 90 s, warm <= 35 s).

Usage (as root): python3 bench/bench_main_job.py [--rounds N]   (each round: one cold, one warm)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OSBUILDER = [sys.executable, "-m", "osbuilder"]
STEPS = (["rootfs"], ["image"], ["boot", "--check"])


def job(cache: Path, workdir: Path) -> list[float]:
    env = {**os.environ, "CACHE_DIR": str(cache), "WORKDIR": str(workdir)}
    seconds = []
    for step in STEPS:
        started = time.monotonic()
        run = subprocess.run([*OSBUILDER, *step], env=env, capture_output=True, text=True)
        seconds.append(time.monotonic() - started)
        if run.returncode != 0:
            raise SystemExit(f"osbuilder {' '.join(step)} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    return seconds


def show(label: str, seconds: list[float]) -> None:
    parts = ", ".join(f"{' '.join(step)} {s:.1f}s" for step, s in zip(STEPS, seconds, strict=True))
    print(f"{label}: {sum(seconds):.1f}s ({parts}); load average {os.getloadavg()[0]:.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    print(f"load average at start {os.getloadavg()[0]:.1f}")
    cold, warm = [], []
    for n in range(1, args.rounds + 1):
        base = Path(tempfile.mkdtemp(prefix="bench-main-job-", dir="/var/tmp"))
        try:
            cold.append(job(base / "cache", base / "cold"))
            show(f"round {n} cold", cold[-1])
            warm.append(job(base / "cache", base / "warm"))
            show(f"round {n} warm", warm[-1])
        finally:
            shutil.rmtree(base, ignore_errors=True)
    print(f"median cold {statistics.median(map(sum, cold)):.1f}s (target <= 90 s), "
          f"warm {statistics.median(map(sum, warm)):.1f}s (target <= 35 s)")


if __name__ == "__main__":
    main()
