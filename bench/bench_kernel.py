"""Benchmark: the default guest kernel's build times against the issue's floors, same run.

Measures, in one run, in a fresh scratch directory (nothing shared with ./workdir):
  (0) baseline: a minimal kernel of the same source, `make allnoconfig && make -j<cores> bzImage`
      with plain gcc (no ccache), in its own object tree;
  (a) cold build of the default kernel (osbuilder's default fragments) into a fresh WORKDIR with
      an empty ccache (the scratch CACHE_DIR's) -- floor 5 min;
  (b) rebuild after changing one option (an extra KERNEL_FRAGMENTS file with CONFIG_MAGIC_SYSRQ=y)
      in the same WORKDIR, i.e. with the object tree and ccache of (a) -- floor 2 min;
  (c) unchanged inputs: the default kernel again through `Cache.get_or_build(kernel_manifest(...))`
      exactly as the pytest `kernel` fixture does (manifest hashing included) -- floor 2 s.
(a) and (b) go through the same `Cache.get_or_build` + `build_kernel` path as the fixture.

For each build it prints wall time, CPU time (user+sys of all child processes), the load average,
and the ratio to its floor (< 1.00 = within the floor). The machine may be shared: CPU time / cores
is what the wall time would be on idle cores. It also prints cold build / minimal kernel.
The kernel source is unpacked once into the scratch CACHE_DIR (timed separately, not part of the floors).

Usage (as root, ~10-15 min on 2 cores):
    python3 bench/bench_kernel.py [--scratch DIR] [--keep]
Progress lines of the builds go to stderr; the results table goes to stdout.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from osbuilder import settings as S
from osbuilder.cache import Cache
from osbuilder.kernel.build import build_env, build_kernel, kernel_manifest
from osbuilder.kernel.source import ensure_source
from osbuilder.layout import UserCache, Workdir

FLOORS = {"cold": 300.0, "rebuild": 120.0, "hit": 2.0}
CORES = os.cpu_count() or 1


class Timing:
    """Wall and child-CPU time of a block, and the load average around it."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.wall = self.user = self.sys = 0.0
        self.load_before = self.load_after = (0.0, 0.0, 0.0)

    def __enter__(self) -> Timing:
        self.load_before = os.getloadavg()
        self._ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._self = resource.getrusage(resource.RUSAGE_SELF)
        self._t = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.monotonic() - self._t
        ru, me = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
        self.user = ru.ru_utime - self._ru.ru_utime + me.ru_utime - self._self.ru_utime
        self.sys = ru.ru_stime - self._ru.ru_stime + me.ru_stime - self._self.ru_stime
        self.load_after = os.getloadavg()
        print(f"[bench] {self.label}: {self.wall:.1f}s wall", file=sys.stderr, flush=True)

    @property
    def cpu(self) -> float:
        return self.user + self.sys

    def line(self, floor: float | None = None) -> str:
        idle = self.cpu / CORES
        text = (f"{self.label:<28} wall {fmt(self.wall):>8}  cpu {fmt(self.cpu):>8} "
                f"(user {fmt(self.user)}, sys {fmt(self.sys)}; cpu/{CORES} = {fmt(idle)})  "
                f"load {self.load_before[0]:.2f} -> {self.load_after[0]:.2f}")
        if floor is not None:
            text += (f"\n{'':<28} floor {fmt(floor)}: wall/floor {self.wall / floor:.2f}, "
                     f"(cpu/{CORES})/floor {idle / floor:.2f}")
        return text


def fmt(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2f}s"
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def settings_for(workdir: Path, fragments: str = "") -> S.Settings:
    """Settings with WORKDIR and a CACHE_DIR beside it (ccache and the unpacked source start empty)."""
    values = {"WORKDIR": str(workdir), "CACHE_DIR": str(workdir.parent / "user-cache"), "KERNEL_FRAGMENTS": fragments}
    return S.load(values, env={}, cwd=workdir)


def via_cache(settings: S.Settings) -> Path:
    """What the pytest `kernel` fixture does (osbuilder/pytest_plugin.py)."""
    cache = Cache(Workdir.of(settings).cache)
    manifest = kernel_manifest(settings)
    return cache.get_or_build(manifest, lambda tmp: build_kernel(settings, tmp))


def minimal_kernel(src: Path, out: Path, env: dict[str, str]) -> None:
    full_env = {**os.environ, **env}
    log = (out.parent / "minimal.log").open("wb")
    for target in (["allnoconfig"], [f"-j{CORES}", "bzImage"]):
        subprocess.run(["make", "-C", str(src), f"O={out}", "CC=gcc", *target], env=full_env, check=True,
                       stdout=log, stderr=subprocess.STDOUT)


def count_objects(tree: Path) -> int:
    return sum(1 for p in tree.rglob("*.o") if p.name != "built-in.o")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, help="scratch directory (default: a new one under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="bench-kernel-", dir="/tmp"))
    scratch.mkdir(parents=True, exist_ok=True)
    workdir = scratch / "work"
    for old in (workdir, scratch / "user-cache"):
        if old.exists():
            shutil.rmtree(old)
    results: list[str] = []
    try:
        default = settings_for(workdir)
        with Timing("unpack source (not timed)") as unpack:
            tree = ensure_source(default)

        minimal_dir = scratch / "minimal"
        shutil.rmtree(minimal_dir, ignore_errors=True)
        with Timing("minimal kernel (allnoconfig)") as minimal:
            minimal_kernel(tree.path, minimal_dir, build_env(default, tree))

        assert not UserCache.of(default).ccache.exists() and not Workdir.of(default).kernel_build.exists()
        with Timing("(a) cold default kernel") as cold:
            entry = via_cache(default)
        objects = count_objects(Workdir.of(default).kernel_build)

        extra = scratch / "one-option.config"
        extra.write_text("# one changed option, for the rebuild measurement\nCONFIG_MAGIC_SYSRQ=y\n")
        changed = settings_for(workdir, str(extra))
        with Timing("(b) rebuild, one option") as rebuild:
            via_cache(changed)

        with Timing("(c) unchanged inputs (hit)") as hit:
            again = via_cache(settings_for(workdir))
        assert again == entry, f"expected a cache hit on {entry}, got {again}"

        results += [
            f"kernel {tree.version}, {CORES} cores, gcc via ccache for (a)/(b); scratch {scratch}",
            unpack.line(),
            minimal.line(),
            cold.line(FLOORS["cold"]),
            f"{'':<28} objects: {objects} (minimal: {count_objects(minimal_dir)})",
            rebuild.line(FLOORS["rebuild"]),
            hit.line(FLOORS["hit"]),
            f"cold / minimal: wall {cold.wall / minimal.wall:.2f}, cpu {cold.cpu / minimal.cpu:.2f}",
        ]
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print("\n".join(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
