"""Benchmark: an arm64 guest against the x86_64 one on this x86 host (issue 19): a cold `osbuilder rootfs`
(the arm64 packages' scripts run under qemu-user), and `osbuilder boot --check` of each image with
Debian's kernel under TCG (the arm64 guest on qemu-system-aarch64 with UEFI, the x86 one on
qemu-system-x86_64), as ratios arm64 / x86_64 measured in the same run.

Both rootfs read bench_rootfs.py's local caching mirror (the network taken out; a first, untimed round
of each fills it), each cold build gets a new CACHE_DIR and WORKDIR, and the rounds are interleaved so
that machine drift hits both alike. The boots take the image of the round's build, with ACCEL=tcg for
both (an arm64 guest cannot have KVM here); the agent-ready time is the boot record's `agent_ready`
(seconds from QEMU's start to the agent's answer).

Usage (as root): python3 bench/bench_arm64.py [--rounds N] [--mirror-cache DIR]
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
from pathlib import Path

from bench_rootfs import serve, timed

ARCHES = ("x86_64", "arm64")


def build_and_boot(work: Path, mirror: str, arch: str, n: int) -> tuple[float, float, dict]:
    """(cold rootfs seconds, boot --check seconds, boot record) of one new CACHE_DIR and WORKDIR."""
    wd, cache = work / f"{arch}-{n}", work / f"cache-{arch}-{n}"
    env = {**os.environ, "REPO_URL": mirror, "CACHE_DIR": str(cache), "WORKDIR": str(wd), "ARCH": arch,
           "ACCEL": "tcg", "BOOT_KERNEL": "debian"}
    rootfs = timed([sys.executable, "-m", "osbuilder", "rootfs"], env=env, what=f"rootfs {arch}")
    timed([sys.executable, "-m", "osbuilder", "image"], env=env)
    # the Debian kernel is fetched and its initrd made before the timed boot (it is cached per user)
    subprocess.run([sys.executable, "-c", "from osbuilder import settings; from osbuilder.vm import check; "
                    "check.boot_kernel(settings.load({}))"], env=env, check=True, capture_output=True)
    out = wd / "boot.json"
    boot = timed(["sh", "-c", f"{sys.executable} -m osbuilder boot --check --json > {out}"], env=env,
                 what=f"boot {arch}")
    record = json.loads(out.read_text())
    if not record.get("passed"):
        sys.exit(f"{arch}: the boot check failed: {record.get('failure')}")
    shutil.rmtree(wd, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return rootfs, boot, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mirror-cache", type=Path, default=Path("/var/tmp/osbuilder-bench-mirror"))
    args = parser.parse_args()
    args.mirror_cache.mkdir(parents=True, exist_ok=True)
    mirror = serve(args.mirror_cache)
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        work = Path(tmp)
        for arch in ARCHES:  # fills the mirror with both architectures' packages (untimed)
            build_and_boot(work, mirror, arch, 0)
        for n in range(1, args.rounds + 1):
            for arch in ARCHES:
                rootfs, boot, record = build_and_boot(work, mirror, arch, n)
                timings = record["timings"]
                for name, value in (("rootfs", rootfs), ("boot --check", boot),
                                    ("agent ready", timings["agent_ready"]),
                                    ("systemd running", timings["system_running"])):
                    rows.setdefault(f"{name} {arch}", []).append(value)
                print(f"round {n} {arch}: rootfs {rootfs:.1f} s, boot --check {boot:.1f} s, agent ready "
                      f"{timings['agent_ready']:.1f} s, running {timings['system_running']:.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    for name, value in med.items():
        print(f"{name:>24}: {value:6.1f} s median  (runs: {', '.join(f'{x:.1f}' for x in rows[name])})")
    for name in ("rootfs", "boot --check", "agent ready", "systemd running"):
        print(f"ratio arm64 / x86_64, {name}: {med[f'{name} arm64'] / med[f'{name} x86_64']:.2f}")


if __name__ == "__main__":
    main()
