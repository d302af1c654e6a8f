"""Benchmark: a kernel build from ccache hits with nm given gcc's LTO plugin, against the same build with
nm left to load every plugin in bfd-plugins/ (LLVM's, where LLVM is installed), in one run.

Both builds use the user's ccache as it is (run `osbuilder kernel` once first, so they are hits) and
the default kernel's .config, each in a new object tree; they alternate, ROUNDS times. Prints each
build's wall and CPU seconds (make and everything it ran), the ratio with / without, and whether the
two vmlinux files are identical.

Usage (about 4 minutes on 2 cores): python3 bench/bench_kernel_nm.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from osbuilder import settings as S
from osbuilder.kernel import build


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(settings: S.Settings, config: Path, work: Path, name: str) -> tuple[float, float, bytes, dict]:
    shutil.rmtree(work / name, ignore_errors=True)
    started, cpu = time.monotonic(), children_cpu()
    done = build.build_kernel(settings, work / name / "out", config=config, build_dir=work / name / "objects")
    wall, cpu = time.monotonic() - started, children_cpu() - cpu
    return wall, cpu, done.vmlinux.read_bytes(), done.metadata["ccache"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    settings = S.load(env=dict(os.environ))
    work = Path(tempfile.mkdtemp(prefix="bench-kernel-nm-", dir="/var/tmp"))
    with_plugin = build.lto_plugin_nm
    if not with_plugin(settings.guest):
        raise SystemExit("gcc has no liblto_plugin.so here: nothing to compare")
    load = os.getloadavg()[0]
    results: dict[str, list[tuple[float, float]]] = {"without": [], "with": []}
    images: dict[str, bytes] = {}
    # the default kernel's .config (its object tree in WORKDIR is up to date: seconds)
    config = build.build_kernel(settings, work / "config").config
    for _ in range(args.rounds):
        for name in ("without", "with"):
            build.lto_plugin_nm = with_plugin if name == "with" else (lambda guest: [])  # type: ignore[assignment]
            wall, cpu, image, ccache = timed(settings, config, work, name)
            results[name].append((wall, cpu))
            images[name] = image
            print(f"{name:8} gcc's LTO plugin: {wall:6.1f} s wall, {cpu:6.1f} s CPU; ccache {ccache}", flush=True)
    build.lto_plugin_nm = with_plugin  # type: ignore[assignment]
    cpu_with = sum(c for _, c in results["with"])
    cpu_without = sum(c for _, c in results["without"])
    wall_with = sum(w for w, _ in results["with"])
    wall_without = sum(w for w, _ in results["without"])
    print(f"{os.cpu_count()} cores, load {load:.2f} -> {os.getloadavg()[0]:.2f}; plugins in bfd-plugins: "
          f"{sorted(p.name for p in Path('/usr/lib/bfd-plugins').glob('*'))}")
    print(f"with / without: CPU {cpu_with / cpu_without:.2f}, wall {wall_with / wall_without:.2f}; "
          f"vmlinux identical: {images['with'] == images['without']}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
