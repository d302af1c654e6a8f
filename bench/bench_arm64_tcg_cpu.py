"""Benchmark: an arm64 boot check under TCG with QEMU's `max` CPU as it comes (pointer authentication by
the architected QARMA5 cipher) against `max,pauth-impdef=on` (QEMU's implementation-defined algorithm,
osbuilder's ARM64_TCG_CPU), as a ratio measured in the same run.

One arm64 image (`osbuilder rootfs` and `image` with ARCH=arm64 in a new WORKDIR, from the per-user
cache), Debian's arm64 kernel, one vCPU, ACCEL=tcg; the rounds alternate the two CPUs so that machine
drift hits both alike. Each boot check runs in a child process that sets the CPU for arm64 and then runs
`osbuilder boot --check`; its CPU time (QEMU's, mostly) is the child's and its children's.

Usage (as root): python3 bench/bench_arm64_tcg_cpu.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_first_boot import cpu_seconds as children_cpu

from osbuilder.arch import ARM64_TCG_CPU

CPUS = {"max (QARMA5)": "max", "max,pauth-impdef=on": ARM64_TCG_CPU}
CHECK = """
import dataclasses, sys
from osbuilder import arch, cli
arch.ARCHES["arm64"] = dataclasses.replace(arch.ARM64, tcg_cpu=sys.argv[1])
sys.exit(cli.main(["boot", "--check", "--json"]))
"""


def boot(env: dict[str, str], cpu: str) -> tuple[float, float, dict]:
    """(seconds, CPU seconds, boot record) of one boot check with QEMU's -cpu `cpu`."""
    started, used = time.monotonic(), children_cpu()
    done = subprocess.run([sys.executable, "-c", CHECK, cpu], env=env, capture_output=True, text=True)
    seconds, cpu_seconds = time.monotonic() - started, children_cpu() - used
    record = json.loads(done.stdout) if done.stdout.strip() else {}
    if done.returncode != 0 or not record.get("passed"):
        sys.exit(f"-cpu {cpu}: the boot check failed: {record.get('failure') or done.stderr[-2000:]}")
    if f"-cpu {cpu} " not in " ".join(record["command"]) + " ":
        sys.exit(f"-cpu {cpu}: the boot did not run with it: {record['command']}")
    return seconds, cpu_seconds, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-arm64-cpu-", dir=os.environ.get("BENCH_DIR", "/var/tmp")))
    env = {**os.environ, "WORKDIR": str(work), "ARCH": "arm64", "ACCEL": "tcg", "BOOT_KERNEL": "debian",
           "VM_CPUS": "1"}
    try:
        for step in ("rootfs", "image"):
            subprocess.run([sys.executable, "-m", "osbuilder", step], env=env, check=True, capture_output=True)
        boot(env, ARM64_TCG_CPU)  # Debian's arm64 kernel fetched and its initrd made (untimed)
        rows: dict[str, dict[str, list[float]]] = {name: {"s": [], "cpu": [], "running": []} for name in CPUS}
        for n in range(1, args.rounds + 1):
            for name, cpu in CPUS.items():
                seconds, cpu_seconds, record = boot(env, cpu)
                running = record["timings"]["system_running"]
                for key, value in (("s", seconds), ("cpu", cpu_seconds), ("running", running)):
                    rows[name][key].append(value)
                print(f"round {n} -cpu {cpu}: boot --check {seconds:.1f} s, {cpu_seconds:.1f} CPU-s, "
                      f"systemd running at {running:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in rows.items()}
    for name, m in med.items():
        print(f"{name:>22}: boot --check {m['s']:5.1f} s, {m['cpu']:5.1f} CPU-s, running at {m['running']:5.1f} s"
              " (medians)")
    slow, fast = med["max (QARMA5)"], med["max,pauth-impdef=on"]
    for key, what in (("s", "boot --check seconds"), ("cpu", "CPU seconds"), ("running", "systemd running")):
        print(f"ratio pauth-impdef / QARMA5, {what}: {fast[key] / slow[key]:.2f}")


if __name__ == "__main__":
    main()
