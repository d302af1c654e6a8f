"""Benchmark: a second rootfs that differs only in the agent, with a cold and with a reused base tree.

Users trying agents, and the test suite (the Kata and the Clear Containers agent in
boot_tests/test_runtime_agents.py, a fresh WORKDIR with the Kata agent in boot_tests/test_pipeline.py),
build rootfs that differ only in osbuilder's files. The distribution's packages make a base tree kept in
the per-user cache (osbuilder/rootfs/base.py); a rootfs copies it. Measured in one run, per round, each
`osbuilder rootfs` in a fresh WORKDIR:

  cold: the Kata agent, an empty CACHE_DIR: the base is built (one whole mmdebstrap run; what every
        rootfs cost before the base tree)
  warm: the Clear Containers agent, the CACHE_DIR the cold run filled: the base is copied

The agents are the real ones from ../shared/peers when present (`--kata-agent`, `--cc-agent`), else two
shell scripts. The mmdebstrap runs in each WORKDIR's log are counted.

Usage (as root): python3 bench/bench_base_tree.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from osbuilder import settings as S

PEERS = Path(__file__).resolve().parent.parent.parent / "shared" / "peers"
MMDEBSTRAP_RUN = re.compile(r"^\+ mmdebstrap --mode=unshare ", re.M)


def rootfs(workdir: Path, cache: Path, agent: Path, runtime: str) -> tuple[float, int]:
    """Seconds `osbuilder rootfs` took, and the mmdebstrap runs it made."""
    env = {k: v for k, v in os.environ.items() if k not in S.BY_NAME or k == "REPO_URL"}
    env.update(WORKDIR=str(workdir), CACHE_DIR=str(cache), AGENT_SOURCE_BIN=str(agent), RUNTIME=runtime)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "osbuilder", "rootfs"], env=env, capture_output=True, text=True)
    took = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(f"osbuilder rootfs failed:\n{result.stderr[-3000:]}")
    return took, len(MMDEBSTRAP_RUN.findall((workdir / "logs/rootfs.log").read_text()))


def agents(args: argparse.Namespace, scratch: Path) -> tuple[Path, Path, str]:
    if args.kata_agent.is_file() and args.cc_agent.is_file():
        return args.kata_agent, args.cc_agent, "the real agents from ../shared/peers"
    made = []
    for name in ("kata-agent", "cc-agent"):
        script = scratch / name
        script.write_text("#!/bin/sh\nexec sleep infinity\n")
        script.chmod(0o755)
        made.append(script)
    return made[0], made[1], "two shell scripts (../shared/peers absent)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kata-agent", type=Path, default=PEERS / "kata-agent-1.x" / "kata-agent")
    parser.add_argument("--cc-agent", type=Path, default=PEERS / "cc-agent-3.x" / "cc-agent")
    args = parser.parse_args()
    cold, warm = [], []
    with tempfile.TemporaryDirectory(prefix="osb-base-", dir="/var/tmp") as tmp:
        home = Path(tmp)
        home.chmod(0o755)  # searchable by apt's _apt user, as a user's WORKDIR
        kata, cc, which = agents(args, home)
        print(f"agents: {which}; load average {os.getloadavg()[0]:.2f}", flush=True)
        for r in range(args.rounds):
            cache = home / f"cache-{r}"
            c, c_runs = rootfs(home / f"cold-{r}", cache, kata, "kata")
            w, w_runs = rootfs(home / f"warm-{r}", cache, cc, "clear-containers")
            cold.append(c)
            warm.append(w)
            print(f"round {r + 1}: cold base {c:6.1f} s ({c_runs} mmdebstrap run), reused base {w:6.1f} s "
                  f"({w_runs} mmdebstrap runs); load average {os.getloadavg()[0]:.2f}", flush=True)
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"median: cold base {c:.1f} s, reused base {w:.1f} s; a second rootfs that differs only in the agent "
          f"takes {w / c:.2f}x the time of one with its own mmdebstrap run ({c - w:.1f} s saved)")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
