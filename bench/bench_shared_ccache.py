"""Benchmark: the arm64 kernel cross-built on this x86 host, cold, and the same kernel built on a "second
host" that shares the first one's objects through ccache's remote storage (CCACHE_REMOTE_STORAGE), as a
ratio second / cold measured in the same run (issue 19).

Each build gets a new CACHE_DIR (a new, empty local ccache, no cached kernel, and so its own unpacking
of the kernel source, about 10 s, in both timings) and WORKDIR. The remote storage is boot_tests/ccache_http.py on
127.0.0.1 (on real hosts it is across the network; the multi-host test runs it on a namespace's
address). The cold build fills it; the second build reads it.

Usage: python3 bench/bench_shared_ccache.py [--arch arm64] [--scratch DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PORT = 18181


def build(work: Path, name: str, arch: str, remote: str) -> tuple[float, dict]:
    env = {**os.environ, "ARCH": arch, "CACHE_DIR": str(work / f"cache-{name}"), "WORKDIR": str(work / name),
           "CCACHE_REMOTE_STORAGE": remote}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "osbuilder", "kernel"], env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"{name}: osbuilder kernel failed:\n{done.stderr[-3000:]}")
    return seconds, json.loads((work / name / "kernel-metadata.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="arm64")
    parser.add_argument("--scratch", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-shared-ccache-", dir=args.scratch))
    server = subprocess.Popen([sys.executable, str(HERE.parent / "boot_tests/ccache_http.py"), "127.0.0.1",
                               str(PORT), str(work / "remote/storage")], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        remote = f"http://127.0.0.1:{PORT}/ccache"
        load = os.getloadavg()[0]
        cold, cold_meta = build(work, "first-host", args.arch, remote)
        second, second_meta = build(work, "second-host", args.arch, remote)
    finally:
        server.kill()
    print(f"kernel {cold_meta['kernel_version']} for {args.arch}, {os.cpu_count()} cores, load {load:.2f} -> "
          f"{os.getloadavg()[0]:.2f}")
    print(f"first host (cold, empty ccache)        {cold:7.1f} s  ccache {cold_meta['ccache']}")
    print(f"second host (empty ccache + remote)    {second:7.1f} s  ccache {second_meta['ccache']}")
    print(f"second / cold: {second / cold:.2f}; outputs identical: {cold_meta['outputs'] == second_meta['outputs']}")


if __name__ == "__main__":
    main()
