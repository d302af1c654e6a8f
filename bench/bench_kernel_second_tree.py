"""Benchmark: the same kernel from a second source tree, against a cold build, in one run.

The baseline is a cold build of the default kernel (an empty ccache of the run's own) from the shared
source tree; then the same .config is built from a hard-linked copy of that tree at another path, in a
new object tree, as `bisect-run` builds a git checkout. ccache-gcc names the sources relative to the
object tree, so the second build should be ccache hits. Prints both times, both builds' ccache hits and
misses and the ratio second / cold.

Usage (about 10 minutes on 2 cores): python3 bench/bench_kernel_second_tree.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from osbuilder import settings as S
from osbuilder.kernel.build import build_kernel
from osbuilder.kernel.source import SourceTree, ensure_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work here and keep it (default: a temporary directory)")
    args = parser.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench-second-tree-", dir="/var/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    env = {"WORKDIR": str(base / "wd1"), "CACHE_DIR": str(base / "cache")}
    first = S.load(env={**os.environ, **env})
    started = time.monotonic()
    cold = build_kernel(first, base / "out1")
    cold_s = time.monotonic() - started
    print(f"cold build from the shared tree: {cold_s:.0f}s, ccache {cold.metadata['ccache']}", flush=True)

    shared = ensure_source(first)
    copy = base / "elsewhere" / "linux"
    copy.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-al", str(shared.path.resolve()), str(copy)], check=True)
    second = S.load(env={**os.environ, **env, "WORKDIR": str(base / "wd2")})
    # a tree of its own (another content marker, so another object tree), dated like the shared one
    tree = SourceTree(copy, {**shared.marker, "content": f"copy at {copy}"}, False)
    started = time.monotonic()
    again = build_kernel(second, base / "out2", config=cold.config, tree=tree, build_dir=base / "wd2" / "build")
    again_s = time.monotonic() - started
    print(f"same .config from {copy}: {again_s:.0f}s, ccache {again.metadata['ccache']}")
    same = cold.vmlinux.read_bytes() == again.vmlinux.read_bytes()
    print(f"vmlinux identical: {same}; load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(f"ratio second tree / cold: {again_s / cold_s:.2f}")


if __name__ == "__main__":
    main()
