"""Benchmark: the first boot check on a fresh machine, the old way against the new, in one run.

What a first `osbuilder boot --check` paid before anything booted: Debian's boot kernel and initrd
(before: an mmdebstrap chroot with initramfs-tools and update-initramfs; now: the kernel package
fetched by apt, unpacked, and osbuilder's own small initrd) and the KVM probe (before: Debian's
kernel booted under KVM, up to 15 s to reach its init; now: a 64 KiB guest, at most 1.5 s). The old
way is the code before the change, run from a copy of it (`--baseline`), the new way this checkout's;
each measurement runs in its own process with an empty CACHE_DIR and a fresh WORKDIR:

  kernel    the Debian boot kernel + initrd, cold (apt lists, package, build): wall and CPU time (the
            CPU time, of every process it ran, says what a machine less busy than this shared one waits)
  probe     the KVM probe alone (the old one boots the kernel built above); and the new probe's guest
            under TCG, the work it stands for
  boot      `osbuilder boot --check` of a copy of --image (ACCEL=auto, BOOT_KERNEL=debian): the total,
            the preparation before QEMU starts (total minus the boot record's last timing) and the boot

Targets: the first boot check <= 45 s, of which <= 10 s preparation; the probe <= 2 s either way.

Usage (as root, the image from `osbuilder rootfs && osbuilder image`):
  git archive 2625578 osbuilder | tar -x -C /tmp/osbuilder-before
  python3 bench/bench_first_boot.py --image workdir/container.img --baseline /tmp/osbuilder-before [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

KERNEL = """
import json, time
from osbuilder import settings
from osbuilder.vm import debian_kernel
s = settings.load({})
started = time.monotonic()
k = debian_kernel.debian_kernel(s)
import osbuilder
print(json.dumps({"seconds": time.monotonic() - started, "initrd": k.initrd.stat().st_size,
                  "code": osbuilder.__file__}))
"""

PROBE = """
import inspect, json, sys, time
from pathlib import Path
from osbuilder import settings
from osbuilder.vm import accel, debian_kernel
s = settings.load({})
log_dir = Path(sys.argv[1])
kernel = debian_kernel.debian_kernel(s)  # the old probe boots it; built before the clock starts
args = (kernel, log_dir) if len(inspect.signature(accel.probe_kvm).parameters) == 2 else (log_dir,)
started = time.monotonic()
ok, detail = accel.probe_kvm(*args)
result = {"seconds": time.monotonic() - started, "kvm": ok, "detail": detail}
if hasattr(accel, "run_probe"):
    started = time.monotonic()
    ran, _ = accel.run_probe("tcg", log_dir / "tcg", timeout=30)
    result["tcg_seconds"] = time.monotonic() - started if ran else None
print(json.dumps(result))
"""


def cpu_seconds() -> float:
    """User and system CPU time of this process's children that ended (and theirs), so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def python(source: Path, code: str, env: dict[str, str], *args: str) -> dict:
    """Run `code` with osbuilder imported from `source` (run from the WORKDIR: the current directory comes
    first in Python's path); its JSON output, with the CPU time it took ("cpu")."""
    full_env = {**os.environ, **env, "PYTHONPATH": str(source)}
    before = cpu_seconds()
    out = subprocess.run([sys.executable, "-c", code, *args], env=full_env, check=True, capture_output=True,
                         text=True, timeout=1800, cwd=env["WORKDIR"]).stdout
    return {**json.loads(out.strip().splitlines()[-1]), "cpu": cpu_seconds() - before}


def fresh(tmp: Path, name: str) -> dict[str, str]:
    """The environment of a fresh machine: an empty CACHE_DIR and an empty WORKDIR."""
    root = tmp / name
    (root / "cache").mkdir(parents=True)
    (root / "workdir").mkdir()
    return {"CACHE_DIR": str(root / "cache"), "WORKDIR": str(root / "workdir"), "BOOT_KERNEL": "debian",
            "ACCEL": "auto"}


def first_boot(source: Path, env: dict[str, str], image: Path) -> dict:
    workdir = Path(env["WORKDIR"])
    shutil.copyfile(image, workdir / "container.img")
    full_env = {**os.environ, **env, "PYTHONPATH": str(source)}
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "osbuilder", "boot", "--check"], env=full_env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800, cwd=workdir)
    total = time.monotonic() - started
    record = json.loads((workdir / "boot-logs/osbuilder-boot-check/boot.json").read_text())
    boot = max(record["timings"].values())
    return {"seconds": total, "boot": boot, "preparation": total - boot, "accel": record["accel"]["name"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, required=True, help="a container.img that passes boot --check")
    parser.add_argument("--baseline", type=Path, required=True, help="a copy of osbuilder before the change")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    versions = {"old": args.baseline.resolve(), "new": HERE}
    results: dict[str, dict[str, list[dict]]] = {v: {"kernel": [], "probe": [], "boot": []} for v in versions}
    print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="osb-first-boot-", dir="/var/tmp") as tmp_name:
        tmp = Path(tmp_name)
        for r in range(args.rounds):
            for name, source in versions.items():
                env = fresh(tmp, f"{name}-{r}-kernel")
                kernel = python(source, KERNEL, env)
                if not Path(kernel["code"]).is_relative_to(source):
                    raise SystemExit(f"{name}: osbuilder came from {kernel['code']}, not {source}")
                probe = python(source, PROBE, env, str(tmp / f"{name}-{r}-probe"))
                boot = first_boot(source, fresh(tmp, f"{name}-{r}-boot"), args.image)
                for key, value in (("kernel", kernel), ("probe", probe), ("boot", boot)):
                    results[name][key].append(value)
                tcg = f", its guest under TCG {probe['tcg_seconds']:.2f} s" if probe.get("tcg_seconds") else ""
                print(f"round {r + 1} {name}: kernel {kernel['seconds']:6.1f} s, {kernel['cpu']:5.1f} s CPU "
                      f"(initrd {kernel['initrd'] >> 10} KiB)"
                      f" | probe {probe['seconds']:5.2f} s, KVM {'works' if probe['kvm'] else 'refused'}{tcg}"
                      f" | first boot --check {boot['seconds']:6.1f} s = preparation {boot['preparation']:5.1f} s"
                      f" + boot {boot['boot']:5.1f} s ({boot['accel']})", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")

    def median(version: str, key: str, field: str = "seconds") -> float:
        return statistics.median(x[field] for x in results[version][key])

    for name in versions:
        prep, boot = median(name, "boot", "preparation"), median(name, "boot", "boot")
        print(f"median {name}: kernel {median(name, 'kernel'):6.1f} s, {median(name, 'kernel', 'cpu'):5.1f} s CPU | "
              f"probe {median(name, 'probe'):5.2f} s | "
              f"first boot --check {median(name, 'boot'):6.1f} s (preparation {prep:5.1f} s, boot {boot:5.1f} s)")
    print(f"new/old: kernel {median('new', 'kernel') / median('old', 'kernel'):.2f}, "
          f"probe {median('new', 'probe') / median('old', 'probe'):.2f}, "
          f"preparation {median('new', 'boot', 'preparation') / median('old', 'boot', 'preparation'):.2f}, "
          f"first boot --check {median('new', 'boot') / median('old', 'boot'):.2f}")
    print(f"targets: first boot --check {median('new', 'boot'):.1f} s (<= 45), preparation "
          f"{median('new', 'boot', 'preparation'):.1f} s (<= 10), probe {median('new', 'probe'):.2f} s (<= 2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
