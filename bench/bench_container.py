"""Benchmark: USE_DOCKER=yes against the host path, in the same run.

Prints each measurement and the ratios:
  - `osbuilder rootfs` + `osbuilder image` through the tools container against the same on the host
    (fresh WORKDIRs, the tools image already built);
  - the container's overhead per step: `osbuilder image` through the container minus on the host, on
    the same rootfs (aim: at most 1 s);
  - the first tools-image build (a base image the engine has no layers for, an empty apt cache: every
    package downloaded), and the rebuild after a change to osbuilder (only its own layer).

Usage (as root, podman installed): python3 bench/bench_container.py [--rounds N] [--overhead-rounds N]
[--base IMAGE]
--base names a local Debian image (default: one imported from mmdebstrap, as the tests make it).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from osbuilder import settings as S
from osbuilder.container import engine as engine_mod
from osbuilder.container import tools_image

BASE = "localhost/osbuilder-test-base:bookworm"


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    started = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, **(env or {})})
    return time.monotonic() - started


def osb(step: str, wd: Path, container: bool, base: str) -> float:
    env = {"USE_DOCKER": "yes" if container else "no", "CONTAINER_ENGINE": "podman", "TOOLS_BASE_IMAGE": base}
    return timed([sys.executable, "-m", "osbuilder", step, "--workdir", str(wd)], env)


def base_tarball(work: Path) -> Path:
    tar = work / "base.tar"
    if not tar.exists():
        subprocess.run(["mmdebstrap", "--mode=unshare", "--variant=minbase", "--format=tar", "bookworm", str(tar)],
                       check=True, capture_output=True)
    return tar


def ensure_base(base: str, work: Path) -> None:
    if subprocess.run(["podman", "image", "exists", base]).returncode != 0:
        subprocess.run(["podman", "import", str(base_tarball(work)), base], check=True, capture_output=True)


def first_build(work: Path) -> tuple[float, float]:
    """(first build, rebuild after an osbuilder change): a base the engine has never seen (imported
    anew: another id, so no layer of it is cached) and an empty CACHE_DIR (apt downloads everything)."""
    name = f"localhost/osbuilder-bench-base:{secrets.token_hex(4)}"
    subprocess.run(["podman", "import", str(base_tarball(work)), name], check=True, capture_output=True)
    cache = work / "empty-cache"
    s = S.load({"CACHE_DIR": str(cache), "TOOLS_BASE_IMAGE": name, "CONTAINER_ENGINE": "podman"}, env={},
               cwd=Path("/"))
    engine = engine_mod.select(s, lambda e: tools_image.base_image(e, s))
    tags = []
    try:
        started = time.monotonic()
        tags.append(tools_image.ensure(engine, s))
        cold = time.monotonic() - started
        # osbuilder changed (one more byte in a module): only the last layer is rebuilt
        copy = work / "package" / "osbuilder"
        shutil.copytree(tools_image.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        with (copy / "__init__.py").open("a") as f:
            f.write("\n")
        tools_image.PACKAGE_DIR = copy
        started = time.monotonic()
        tags.append(tools_image.ensure(engine, s))
        changed = time.monotonic() - started
    finally:
        for tag in [*tags, name]:
            subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)
    return cold, changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--overhead-rounds", type=int, default=5)
    parser.add_argument("--base", default=BASE)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="osbuilder-bench-container-", dir="/var/tmp"))
    work.chmod(0o755)  # _apt must reach the trees (mmdebstrap's apt sandbox)
    try:
        ensure_base(args.base, work)
        # the tools image for this osbuilder, built before anything is timed
        subprocess.run([sys.executable, "-m", "osbuilder", "rootfs", "--workdir", str(work / "warmup")], check=True,
                       capture_output=True, env={**os.environ, "USE_DOCKER": "yes", "CONTAINER_ENGINE": "podman",
                                                 "TOOLS_BASE_IMAGE": args.base})
        host, container, overhead = [], [], []
        for i in range(args.rounds):
            for kind, times in (("host", host), ("container", container)):
                wd = work / f"{kind}-{i}"
                times.append(osb("rootfs", wd, kind == "container", args.base)
                             + osb("image", wd, kind == "container", args.base))
                print(f"round {i + 1}: rootfs+image on the {kind}: {times[-1]:.1f} s", flush=True)
        for i in range(args.overhead_rounds):  # alternating, on the same rootfs
            wd = work / "host-0"
            on_host, inside = osb("image", wd, False, args.base), osb("image", wd, True, args.base)
            overhead.append(inside - on_host)
            print(f"image alone {i + 1}: host {on_host:.2f} s, container {inside:.2f} s", flush=True)
        cold, changed = first_build(work)
        h, c = statistics.median(host), statistics.median(container)
        print(f"\nrootfs+image, median of {args.rounds}: host {h:.1f} s, container {c:.1f} s: ratio {c / h:.2f}")
        print(f"container overhead per step (image through the container minus on the host), median: "
              f"{statistics.median(overhead):.2f} s (aim <= 1 s)")
        print(f"first tools-image build (new base, empty apt cache): {cold:.1f} s = {cold / h:.2f}x the host's "
              f"rootfs+image; after a change to osbuilder: {changed:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
