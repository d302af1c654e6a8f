"""Benchmark: osbuilder rootfs + image against plain mmdebstrap + mke2fs -d (and debootstrap), same run.

Prints each measurement and the ratios the project promises:
  - cold `osbuilder rootfs` + `osbuilder image` within 1.3x of plain mmdebstrap + mke2fs -d
    of the same package set;
  - a warm pytest session (everything cached) reaches the `image` fixture in under 2 s;
  - `osbuilder image` alone under 5 s for the default (~200-250 MiB) rootfs; the image size.

Usage (as root): python3 bench/bench_build.py [--rounds N] [--skip-debootstrap]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from osbuilder import settings as S
from osbuilder.rootfs.build import packages

MIRROR = "http://deb.debian.org/debian"
RELEASE = "bookworm"


def timed(cmd: list[str], **kw) -> float:
    started = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    return time.monotonic() - started


def plain(work: Path, pkgs: list[str]) -> float:
    rootfs, img = work / "plain-rootfs", work / "plain.img"
    t = timed(["mmdebstrap", "--mode=unshare", "--variant=minbase", "--include=" + ",".join(pkgs),
               RELEASE, str(rootfs), MIRROR])
    with open(img, "wb") as f:
        f.truncate(1 << 30)
    t += timed(["mke2fs", "-q", "-t", "ext4", "-d", str(rootfs), "-F", str(img)])
    shutil.rmtree(rootfs)
    img.unlink()
    return t


def debootstrap(work: Path, pkgs: list[str]) -> float:
    rootfs = work / "debootstrap-rootfs"
    t = timed(["debootstrap", "--variant=minbase", "--include=" + ",".join(pkgs), RELEASE, str(rootfs), MIRROR])
    shutil.rmtree(rootfs)
    return t


def osbuilder_cold(work: Path) -> tuple[float, Path]:
    wd = work / "osb"
    shutil.rmtree(wd, ignore_errors=True)
    osb = [sys.executable, "-m", "osbuilder"]
    t = timed([*osb, "rootfs", "--workdir", str(wd)]) + timed([*osb, "image", "--workdir", str(wd)])
    return t, wd


def warm_session(work: Path, wd: Path) -> tuple[float, float]:
    """(pytest session asking for `osbuilder_image` from a warm cache, empty pytest session) wall times."""
    tests = work / "warm"
    tests.mkdir(exist_ok=True)
    (tests / "test_warm.py").write_text("def test_image(osbuilder_image):\n    assert osbuilder_image.path.is_file()\n")
    (tests / "test_empty.py").write_text("def test_nothing():\n    assert 1 + 1 == 2\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--osbuilder-workdir={wd}"]
    subprocess.run([*cmd, str(tests / "test_warm.py")], check=True, capture_output=True)  # fill the cache
    return (timed([*cmd, str(tests / "test_warm.py")], cwd=tests),
            timed([*cmd, str(tests / "test_empty.py")], cwd=tests))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-debootstrap", action="store_true")
    args = parser.parse_args()
    pkgs = packages(S.load({}, env={}, cwd=Path("/")))  # the same set osbuilder installs
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as tmp:
        work = Path(tmp)
        rows: dict[str, list[float]] = {"plain": [], "osbuilder": [], "debootstrap": []}
        wd = None
        for _ in range(args.rounds):  # interleaved, so mirror and machine drift hit both alike
            rows["plain"].append(plain(work, pkgs))
            t, wd = osbuilder_cold(work)
            rows["osbuilder"].append(t)
            if not args.skip_debootstrap:
                rows["debootstrap"].append(debootstrap(work, pkgs))
        best = {k: min(v) for k, v in rows.items() if v}
        print(f"packages: {' '.join(pkgs)}")
        for name, value in best.items():
            print(f"{name:>12}: {value:6.1f} s  (runs: {', '.join(f'{x:.1f}' for x in rows[name])})")
        print(f"ratio osbuilder rootfs+image / plain mmdebstrap+mke2fs -d: {best['osbuilder'] / best['plain']:.2f}"
              " (promise: <= 1.3)")
        if "debootstrap" in best:
            print(f"ratio debootstrap (rootfs only) / plain: {best['debootstrap'] / best['plain']:.2f}")
        image_only = timed([sys.executable, "-m", "osbuilder", "image", "--workdir", str(wd)])
        mke2fs_only = work / "m.img"
        with open(mke2fs_only, "wb") as f:
            f.truncate((wd / "container.img").stat().st_size)
        baseline = timed(["mke2fs", "-q", "-t", "ext4", "-d", str(wd / "rootfs"), "-F", str(mke2fs_only)])
        usage = subprocess.run(["du", "-sm", str(wd / "rootfs")], capture_output=True, text=True).stdout.split()[0]
        print(f"image alone: {image_only:.2f} s for a {usage} MiB rootfs (promise: < 5 s); "
              f"bare mke2fs -d: {baseline:.2f} s; ratio {image_only / baseline:.2f}")
        print(f"image size (default rootfs): {(wd / 'container.img').stat().st_size >> 20} MiB")
        warm, empty = warm_session(work, wd)
        print(f"warm session to the image fixture: {warm:.2f} s (promise: < 2 s); empty pytest session: "
              f"{empty:.2f} s; overhead {warm - empty:.2f} s")


if __name__ == "__main__":
    main()
