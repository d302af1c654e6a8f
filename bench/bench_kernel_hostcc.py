"""Benchmark: kbuild's own programs (HOSTCC) through ccache, against the code before, in one run.

Every new object tree compiles the programs kbuild runs (Kconfig's conf, fixdep, modpost, kallsyms, ...),
even to configure a kernel. Before, HOSTCC was plain gcc; now it is ccache-gcc like CC. Two measurements,
each in a new object tree with the user's ccache as it is (run `osbuilder kernel` once first), the old code
(`--baseline`, a copy of osbuilder before the change) and this checkout's alternating, ROUNDS times:

  configure   the default kernel's configuration alone (fragments on allnoconfig, verified): what
              `kconfig diff`, `kconfig bisect` and every new object tree pay before compiling
  build       `osbuilder kernel` in a new WORKDIR, from ccache hits

Each runs in its own process; prints wall and CPU seconds (of everything it ran), the medians, the ratio
new / old, and whether the two builds' outputs are byte-identical.

Usage (about 4 minutes on 2 cores):
  git archive <commit before> osbuilder | tar -x -C /tmp/osbuilder-before
  python3 bench/bench_kernel_hostcc.py --baseline /tmp/osbuilder-before [--rounds N]
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

from bench_first_boot import cpu_seconds

HERE = Path(__file__).resolve().parent.parent

CONFIGURE = """
import sys
from pathlib import Path
from osbuilder import settings
from osbuilder.kernel import build, fragments
from osbuilder.kernel.source import ensure_source
s = settings.load({})
tree = ensure_source(s)
out = Path(sys.argv[1])
out.mkdir()
env = build.build_env(s, tree)
build.link_source(out, tree, env)
fragments.configure(s, tree.path, out, cc=build.compiler(s.guest)[0], logfile=out / "log", env=env)
"""

OUTPUTS = ("vmlinuz.container", "vmlinux.container", "config.container", "System.map.container")


def timed(source: Path, args: list[str], workdir: Path) -> tuple[float, float]:
    """Wall and CPU seconds of `python args` with osbuilder imported from `source`, in a new WORKDIR."""
    workdir.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(source), "WORKDIR": str(workdir)}
    started, cpu = time.monotonic(), cpu_seconds()
    subprocess.run([sys.executable, *args], env=env, cwd=workdir, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=3600)
    return time.monotonic() - started, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a copy of osbuilder before the change")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    versions = {"old": args.baseline.resolve(), "new": HERE}
    work = Path(tempfile.mkdtemp(prefix="bench-hostcc-", dir="/var/tmp"))
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    load = os.getloadavg()[0]
    try:
        for n in range(args.rounds):
            for what in ("configure", "build"):
                for name, source in versions.items():
                    where = work / f"{what}-{name}-{n}"
                    command = ["-c", CONFIGURE, str(where / "objects")] if what == "configure" else \
                        ["-m", "osbuilder", "kernel"]
                    wall, cpu = timed(source, command, where)
                    results.setdefault((what, name), []).append((wall, cpu))
                    print(f"round {n + 1} {what:9} {name}: {wall:6.1f} s wall {cpu:6.1f} s CPU", flush=True)
        same = all((work / "build-old-0" / f).read_bytes() == (work / "build-new-0" / f).read_bytes()
                   for f in OUTPUTS)
        print(f"{os.cpu_count()} cores, load {load:.2f} -> {os.getloadavg()[0]:.2f}; medians of {args.rounds}:")
        for what in ("configure", "build"):
            old, new = (results[what, name] for name in ("old", "new"))
            wall = [statistics.median(w for w, _ in r) for r in (old, new)]
            cpu = [statistics.median(c for _, c in r) for r in (old, new)]
            print(f"{what:9}  old {wall[0]:6.1f} s wall {cpu[0]:6.1f} s CPU   new {wall[1]:6.1f} s wall "
                  f"{cpu[1]:6.1f} s CPU   new / old: wall {wall[1] / wall[0]:.2f}, CPU {cpu[1] / cpu[0]:.2f}")
        print(f"the builds' outputs identical: {same}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
