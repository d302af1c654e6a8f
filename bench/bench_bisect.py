"""Bench: one `kconfig bisect` step against a cold build and a plain boot, and a whole hunt.

    .venv/bin/python bench/bench_bisect.py [--workdir DIR]

In one run, on this machine (TCG unless KVM works):
  (a) cold build: the GOOD config in an empty object tree with ccache disabled
  (b) plain boot: `osbuilder boot --check` of the image with GOOD's kernel
  (c) the hunt: `osbuilder kconfig bisect` over boot_tests/test_kconfig_bisect.py's pair (GOOD:
      osbuilder's kernel config; BAD: 19 more options, one of which, ext4 off, breaks the boot):
      wall time, steps, and where the time went (configure / compile / boot) per step.
Prints the median split step (rebuild after a split + boot to agent-ready) and its ratio to (a) and (b).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boot_tests.test_kconfig_bisect import CULPRIT, HARMLESS, with_options  # noqa: E402
from osbuilder import layout  # noqa: E402
from osbuilder import settings as settings_mod  # noqa: E402
from osbuilder.kernel.build import build_kernel  # noqa: E402

OSBUILDER = str(Path(sys.executable).parent / "osbuilder")


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode not in (0,):
        sys.exit(f"bench: {' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.monotonic() - started, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="default: a new temporary directory")
    args = parser.parse_args()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-bisect-"))).absolute()
    env = {**os.environ, "WORKDIR": str(workdir)}
    wd = layout.Workdir(workdir)
    for step in ("rootfs", "image", "kernel"):
        seconds, _ = timed([OSBUILDER, step], env)
        print(f"setup: osbuilder {step}: {seconds:.0f}s", flush=True)
    good, bad = workdir / "good.config", workdir / "bad.config"
    good.write_text(wd.kernel.config.read_text())
    bad.write_text(with_options(good.read_text(), {**HARMLESS, **CULPRIT}))

    settings = settings_mod.load({"WORKDIR": str(workdir)})
    cold_dir = workdir / "cold-build"
    os.environ["CCACHE_DISABLE"] = "1"
    started = time.monotonic()
    build_kernel(settings, workdir / "cold-out", config=good, build_dir=cold_dir)
    cold = time.monotonic() - started
    del os.environ["CCACHE_DISABLE"]
    shutil.rmtree(cold_dir)
    print(f"(a) cold build (empty object tree, no ccache): {cold:.0f}s", flush=True)

    boot, _ = timed([OSBUILDER, "boot", "--check", "--kernel", str(wd.kernel.vmlinuz)], env)
    print(f"(b) plain boot check: {boot:.1f}s", flush=True)

    hunt, done = timed([OSBUILDER, "kconfig", "bisect", "--good", str(good), "--bad", str(bad), "--json"], env)
    result = json.loads(done.stdout)
    steps = result["steps"]
    options = len({n for s in steps for n in s["options"]})
    print(f"(c) hunt: {hunt:.0f}s, {len(steps)} steps (bound ceil(log2 n)+2 = "
          f"{math.ceil(math.log2(max(options, 2))) + 2} for n = {options} options), culprit "
          f"{', '.join(c['name'] for c in result['culprits'])}")
    totals = {"configure": 0.0, "compile": 0.0, "test": 0.0}
    for s in steps:
        sec = s["seconds"]
        for key in totals:
            totals[key] += sec.get(key, 0.0)
        print(f"    step {s['step']:>2} {s['role']:<13} {s['verdict']:<4} configure {sec.get('configure', 0):5.1f}s "
              f"compile {sec.get('compile', 0):6.1f}s boot {sec.get('test', 0):5.1f}s total {sec['total']:6.1f}s")
    print("    where the time went: " + ", ".join(f"{k} {v:.0f}s ({v / hunt:.0%})" for k, v in totals.items())
          + f", other (normalising, collapsed splits, start-up) {hunt - sum(totals.values()):.0f}s")
    splits = [s["seconds"]["total"] for s in steps if s["role"] == "split"]
    median = statistics.median(splits)
    print(f"median split step: {median:.0f}s = {median / cold:.2f}x the cold build, {median / boot:.2f}x a plain boot")


if __name__ == "__main__":
    main()
