"""Where a cold guest-kernel build spends its time: compile seconds per source directory.

Builds the kernel configured in WORKDIR/kernel-build/.config (run `osbuilder kernel` first) once more
in a scratch object tree, with plain gcc (no ccache) behind a wrapper that logs how long each
compiler call took, then prints the total wall and CPU time and the sums per directory. The per-call
times overlap (make -j<cores+1>), so they add up to more than the wall time: read them as shares.

Usage: python3 bench/kernel_compile_profile.py [--workdir ./workdir] [--scratch /tmp/kprofile] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path

from osbuilder.layout import Workdir

WRAPPER = """#!/bin/sh
# times one compiler call: "<seconds> <output file>" appended to $OSB_PROFILE_LOG
start=$(date +%s.%N)
gcc "$@"; rc=$?
out=""; prev=""
for a in "$@"; do [ "$prev" = "-o" ] && out=$a; prev=$a; done
echo "$start $(date +%s.%N) $out" >> "$OSB_PROFILE_LOG"
exit $rc
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("workdir"))
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/kprofile"))
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    workdir = Workdir(args.workdir)
    src, config = workdir.linux.resolve(), workdir.kernel_build / ".config"  # linux: a link to the source
    if not config.is_file():
        raise SystemExit(f"no {config}: run `osbuilder kernel` first")
    shutil.rmtree(args.scratch, ignore_errors=True)
    obj = args.scratch / "obj"
    obj.mkdir(parents=True)
    shutil.copy(config, obj / ".config")
    wrapper, log = args.scratch / "timed-gcc", args.scratch / "calls.log"
    wrapper.write_text(WRAPPER)
    wrapper.chmod(0o755)
    jobs = (os.cpu_count() or 1) + 1
    cmd = ["make", "-s", "-C", str(src.absolute()), f"O={obj.absolute()}", f"-j{jobs}", f"CC={wrapper}",
           "KBUILD_BUILD_USER=osbuilder", "KBUILD_BUILD_HOST=osbuilder", "bzImage"]
    print("+", " ".join(cmd), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    subprocess.run(cmd, check=True, env={**os.environ, "OSB_PROFILE_LOG": str(log)}, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    user, sys_ = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime

    per_dir: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    last_end = 0.0
    rows = [line.split() for line in log.read_text().splitlines()]
    rows = [r for r in rows if len(r) == 3 and r[2].endswith(".o")]
    first_start = min(float(r[0]) for r in rows)
    for start, end, out in rows:
        parts = Path(out).parts
        key = "/".join(parts[:2]) if len(parts) > 2 else parts[0] if len(parts) > 1 else "(top)"
        per_dir[key] += float(end) - float(start)
        calls[key] += 1
        last_end = max(last_end, float(end))
    total = sum(per_dir.values())
    print(f"wall {wall:.0f} s, cpu {user + sys_:.0f} s (user {user:.0f}, sys {sys_:.0f}); "
          f"{len(rows)} compiler calls, {total:.0f} call-seconds; last compile ended "
          f"{last_end - first_start:.0f} s after the first started (the rest: host tools, link, kallsyms, compression)")
    for key, secs in per_dir.most_common(args.top):
        print(f"{secs:7.1f} s {100 * secs / total:5.1f} % {calls[key]:5d} calls  {key}")


if __name__ == "__main__":
    main()
