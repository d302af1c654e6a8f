"""Benchmark: the boot profiles and VM_CPUS, side by side in one run, under the same kernel and image.

TCG boots (interleaved, so machine noise spreads evenly) of one DAX image with osbuilder's kernel:
  - virtio-blk vs nvdimm (the runtimes' attachment, DAX in effect), one vCPU: agent ready and
    systemd running, seconds since QEMU start (promise: nvdimm no more than 10 % slower);
  - nvdimm with VM_CPUS=1 vs 2 (multi-threaded TCG uses a host thread per vCPU);
  - with --initrd, the initrd profile's agent-ready time.

Usage: python3 bench/bench_profiles.py --kernel vmlinuz.container --image container.img
       [--initrd container-initrd.img] [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from osbuilder import settings as S
from osbuilder.vm import check, profiles
from osbuilder.vm.guest import Guest
from osbuilder.vm.options import Accel, BootKernel


def boot(settings: S.Settings, image: Path, kernel: Path, name: str, profile=None) -> dict[str, float]:
    extra = {"profile": profile} if profile is not None else {}
    opts = check.guest_options(settings, image=image, kernel=BootKernel(kernel, None, "built"),
                               accel=Accel("tcg", "bench", False), name=name, **extra)
    with Guest.start(opts) as guest:
        check.boot_to_ready(guest)
        return dict(guest.timings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", type=Path, required=True)
    parser.add_argument("--image", type=Path, required=True, help="an image made with DAX=yes")
    parser.add_argument("--initrd", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="osb-bench-profiles-") as tmp:
        base = S.load({"WORKDIR": tmp, "ACCEL": "tcg", "VM_CPUS": "1"})
        variants = {"virtio-blk/1": (base.with_values(BOOT_PROFILE="virtio-blk"), args.image),
                    "nvdimm/1": (base.with_values(BOOT_PROFILE="nvdimm"), args.image),
                    "nvdimm/2": (base.with_values(BOOT_PROFILE="nvdimm", VM_CPUS="2"), args.image)}
        if args.initrd:
            variants["initrd/1"] = (base.with_values(AGENT_INIT="yes"), args.initrd)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                settings, artifact = variants[name]
                profile = profiles.INITRD if name.startswith("initrd") else None
                t = boot(settings, artifact, args.kernel, f"{name.replace('/', '-')}-{r}", profile)
                results[name].append(t)
                print(f"round {r + 1} {name:13} agent ready {t['agent_ready']:6.2f} s"
                      + (f", systemd running {t['system_running']:6.2f} s" if "system_running" in t else ""),
                      flush=True)
    med = {name: {k: statistics.median(t[k] for t in runs) for k in ("agent_ready", "system_running")
                  if all(k in t for t in runs)} for name, runs in results.items()}
    for name, m in med.items():
        print(f"median {name:13} " + ", ".join(f"{k} {v:.2f} s" for k, v in m.items()))
    for key in ("agent_ready", "system_running"):
        print(f"nvdimm / virtio-blk, {key}: {med['nvdimm/1'][key] / med['virtio-blk/1'][key]:.3f} (promise: <= 1.10)")
        print(f"2 vCPUs / 1 vCPU (nvdimm), {key}: {med['nvdimm/2'][key] / med['nvdimm/1'][key]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
