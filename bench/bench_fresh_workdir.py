"""Benchmark: the first `osbuilder boot --check` in a new WORKDIR, with and without the per-user cache.

A user with one WORKDIR per branch or distribution (or a script booting several variants) starts in
a WORKDIR that has never booted anything. What does not depend on the WORKDIR (the KVM verdict,
Debian's boot kernel and initrd) lives in the per-user cache (CACHE_DIR), so only the first WORKDIR
of a user pays for it. Measured in one run, each in a fresh WORKDIR with a copy of the same image:

  cold: an empty CACHE_DIR (what every new WORKDIR paid before the per-user cache)
  warm: the CACHE_DIR the cold run filled (every later WORKDIR)

Usage (as root): python3 bench/bench_fresh_workdir.py --image WORKDIR/container.img [--rounds N]
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

from osbuilder.layout import Workdir


def boot_check(workdir: Path, cache_dir: Path, image: Path) -> float:
    wd = Workdir(workdir)
    wd.root.mkdir(parents=True)
    shutil.copyfile(image, wd.image)
    env = {**os.environ, "WORKDIR": str(wd.root), "CACHE_DIR": str(cache_dir), "BOOT_KERNEL": "debian"}
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "osbuilder", "boot", "--check"], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, required=True, help="a container.img that passes boot --check")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    cold, warm = [], []
    with tempfile.TemporaryDirectory(prefix="osb-fresh-", dir="/var/tmp") as tmp:
        for r in range(args.rounds):
            cache = Path(tmp) / f"cache-{r}"
            cold.append(boot_check(Path(tmp) / f"cold-{r}", cache, args.image))
            warm.append(boot_check(Path(tmp) / f"warm-{r}", cache, args.image))
            print(f"round {r + 1}: cold CACHE_DIR {cold[-1]:6.1f} s, warm CACHE_DIR {warm[-1]:6.1f} s", flush=True)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"median: cold {c:.1f} s, warm {w:.1f} s; a new WORKDIR's first boot check takes {w / c:.2f}x "
          f"the time it took without the per-user cache ({c - w:.1f} s saved)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
