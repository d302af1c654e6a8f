"""Benchmark: `osbuilder rootfs && osbuilder image` when nothing changed, against the build they replace.

Prints, in one run, on one WORKDIR whose rootfs and image are already published:
  - `osbuilder rootfs && osbuilder image` with unchanged inputs (both say "up to date"): each round's
    wall time (target: <= 1 s in all);
  - the same two commands with `-f` (the rootfs rebuilt by mmdebstrap, the image made again): the
    baseline, and the ratio.

Usage: python3 bench/bench_up_to_date.py [--workdir DIR] [--rounds N] [--force-rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def steps(workdir: Path, *extra: str) -> float:
    started = time.monotonic()
    for step in ("rootfs", "image"):
        result = subprocess.run([sys.executable, "-m", "osbuilder", step, "--workdir", str(workdir), *extra],
                                capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"osbuilder {step} failed:\n{result.stderr[-2000:]}")
        if not extra and "up to date" not in result.stdout:
            sys.exit(f"osbuilder {step} was not up to date:\n{result.stdout}")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path("workdir"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--force-rounds", type=int, default=1)
    args = parser.parse_args()
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    steps(args.workdir)  # publish once (a build if the cache has nothing), then everything is up to date
    quick = [steps(args.workdir) for _ in range(args.rounds)]
    for i, t in enumerate(quick, 1):
        print(f"round {i}: rootfs && image, nothing changed: {t:.2f} s")
    forced = [steps(args.workdir, "-f") for _ in range(args.force_rounds)]
    for i, t in enumerate(forced, 1):
        print(f"forced {i}: rootfs -f && image -f: {t:.1f} s")
    median = statistics.median(quick)
    print(f"median up to date: {median:.2f} s (target: <= 1 s); median, max of {len(quick)}: "
          f"{median:.2f}, {max(quick):.2f}")
    print(f"up to date / rebuilt: {median / statistics.median(forced):.4f}")
    print(os.getloadavg())


if __name__ == "__main__":
    main()
