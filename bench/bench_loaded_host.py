"""Benchmark: what tells a guest the host starves from a guest that hangs, and the verdicts the boot check gives.

Boots, one at a time, under TCG with the default settings (BOOT_TIMEOUT 120: 30 s of silence, a 180 s
ceiling), each on the host as it is and then with two busy loops per core running (boot_tests/hostload.py):
  - good:      the image;
  - hung-idle: the image with an init that sleeps forever, printing nothing;
  - hung-busy: the image with an init that loops forever, printing nothing.
For each: the verdict (passed; failed in a phase, exit 1; the host overloaded, exit 125) and when it came;
the longest stretch without progress (console line, QMP event) before the verdict, and what QEMU got of
the CPU in it (host.py: seconds it ran and waited for a CPU, per second); the same over the whole boot.
Ratios: the loaded run against the same scenario's run on the host as it is, in the same invocation.

With --baseline (the code before the change, a copy of its `osbuilder` package): `osbuilder boot --check`
of the good image on the loaded host, the old code and this checkout's in turn, --rounds times: exit code
(0 passed, 1 a phase failed, 125 the host), the error line, and the time.

Usage (as root, after `osbuilder rootfs && osbuilder image`):
    python3 bench/bench_loaded_host.py [--workdir ./workdir] [--only good,hung-idle,hung-busy]
    git archive c68a3b1 osbuilder | tar -x -C /tmp/osbuilder-before
    python3 bench/bench_loaded_host.py --only none --baseline /tmp/osbuilder-before [--rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boot_tests import hostload, imagetools  # noqa: E402
from osbuilder import settings as S  # noqa: E402
from osbuilder.errors import OsbuilderError  # noqa: E402
from osbuilder.layout import Workdir  # noqa: E402
from osbuilder.vm import check, host, phases  # noqa: E402
from osbuilder.vm.guest import Guest, HostOverloaded  # noqa: E402
from osbuilder.vm.options import Accel  # noqa: E402

INITS = {"hung-idle": imagetools.SLEEPING_INIT, "hung-busy": imagetools.SPINNING_INIT}


@dataclass
class Run:
    scenario: str
    loaded: bool
    verdict: str
    at: float  # seconds since QEMU's start
    running: float | None  # systemd running, seconds since QEMU's start
    gap: float  # the longest stretch without progress, seconds
    gap_share: host.Share | None
    boot_share: host.Share | None
    load: float


def per_second(share: host.Share | None) -> str:
    if share is None or share.seconds <= 0:
        return "ran    -   waited    -"
    return f"ran {share.ran / share.seconds:4.2f} waited {share.waited / share.seconds:4.2f}"


def longest_gap(points: list[float], end: float) -> tuple[float, float]:
    """(start, length) of the longest stretch between progress points (seconds since QEMU's start)."""
    marks = sorted([0.0, *(p for p in points if p <= end), end])
    return max(((a, b - a) for a, b in zip(marks, marks[1:], strict=False)), key=lambda g: g[1])


def share_between(samples: list[host.Sample], start: float, end: float) -> host.Share | None:
    """What the host gave QEMU from `start` to `end` (time.monotonic()), from the monitor's samples."""
    before = [s for s in samples if s.at <= start]
    after = [s for s in samples if s.at >= end]
    first = before[-1] if before else (samples[0] if samples else None)
    last = after[0] if after else (samples[-1] if samples else None)
    return host.between(first, last) if first and last and last.at > first.at else None


def boot(settings: S.Settings, image: Path, scenario: str, loaded: bool) -> Run:
    img, kernel, profile, _ = check.plan(settings)
    opts = check.guest_options(settings, image=image, kernel=kernel, accel=Accel("tcg", "bench", False),
                               name=f"bench-loaded-{scenario}-{'loaded' if loaded else 'as-is'}", profile=profile)
    load = hostload.busy_loops() if loaded else contextlib.nullcontext([])
    with load:
        guest = Guest.start(opts)
        points: list[float] = []
        guest.vm.console.on_change(lambda: points.append(time.monotonic() - guest.vm.t0))
        try:
            check.boot_to_ready(guest)
            phases.run(guest, "powerdown")
            verdict = "passed"
        except HostOverloaded as e:
            verdict = f"exit 125 in {e.phase}: {e.reason[:110]}"
        except OsbuilderError as e:
            verdict = f"exit {e.exit_code} in {getattr(e, 'phase', '?')}: {getattr(e, 'reason', e.message)[:110]}"
        at = guest.now()
        samples = list(guest.host.samples)
        guest.close(graceful=0)
    t0 = guest.vm.t0
    start, gap = longest_gap(points, at)
    return Run(scenario, loaded, verdict, at, guest.timings.get("system_running"), gap,
               share_between(samples, t0 + start, t0 + start + gap), guest.host_share, os.getloadavg()[0])


def show(r: Run) -> str:
    running = f"{r.running:6.1f}s" if r.running else "     -"
    return (f"{r.scenario:9} {'loaded' if r.loaded else 'as is':6}  verdict at {r.at:6.1f}s  running {running}  "
            f"longest silence {r.gap:5.1f}s ({per_second(r.gap_share)})  boot ({per_second(r.boot_share)})  "
            f"load {r.load:5.2f}\n    {r.verdict}")


def ratio(a: float | None, b: float | None) -> str:
    return f"x{a / b:.2f}" if a and b else "-"


def cli_check(code: Path, image: Path, workdir: Path) -> tuple[int, str, float]:
    """`osbuilder boot --check` of `image` with the osbuilder package under `code`, on the loaded host:
    (exit code, the error line or "passed", seconds)."""
    env = {k: v for k, v in os.environ.items() if k not in S.BY_NAME or k == "CACHE_DIR"}
    env.update(PYTHONPATH=str(code), WORKDIR=str(workdir), BOOT_IMAGE=str(image), ACCEL="tcg")
    started = time.monotonic()
    with hostload.busy_loops():
        proc = subprocess.run([sys.executable, "-m", "osbuilder", "boot", "--check"], env=env, cwd=workdir,
                              capture_output=True, text=True, timeout=1800)
    error = next((line for line in proc.stderr.splitlines() if line.startswith("osbuilder: error:")), "passed")
    return proc.returncode, error, time.monotonic() - started


def compare(baseline: Path, image: Path, rounds: int) -> None:
    here = Path(__file__).resolve().parents[1]
    print(f"\ngood image, `osbuilder boot --check` on the loaded host: the code before ({baseline}) and now")
    verdicts: dict[str, list[int]] = {"before": [], "now": []}
    for n in range(1, rounds + 1):
        for name, code in (("before", baseline), ("now", here)):
            with tempfile.TemporaryDirectory(prefix="bench-loaded-") as wd:
                rc, error, took = cli_check(code, image, Path(wd))
            verdicts[name].append(rc)
            print(f"round {n} {name:6} exit {rc:3}  {took:6.1f}s  load {os.getloadavg()[0]:5.2f}  {error[:150]}",
                  flush=True)
    for name, codes in verdicts.items():
        print(f"  {name:6} passed {codes.count(0)}/{len(codes)}, a phase failed {codes.count(1)}/{len(codes)}, "
              f"the host blamed {codes.count(125)}/{len(codes)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--only", default="good,hung-idle,hung-busy", help="scenarios, or none")
    parser.add_argument("--baseline", type=Path, help="the code before the change (a directory with `osbuilder/`)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    values = {"ACCEL": "tcg", **({"WORKDIR": str(args.workdir)} if args.workdir else {})}
    settings = S.load(values)
    image = Workdir.of(settings).image
    scratch = Workdir.of(settings).root / "bench-loaded-host"
    scratch.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs, {2 * (os.cpu_count() or 1)} busy loops when loaded, BOOT_TIMEOUT "
          f"{settings.boot_timeout}, VM_CPUS {settings.vm_cpus}, load average {os.getloadavg()[0]:.2f} at start")
    runs: list[Run] = []
    for scenario in [] if args.only == "none" else args.only.split(","):
        target = image
        if scenario in INITS:
            target = imagetools.copy_image(image, scratch / f"{scenario}.img")
            imagetools.replace_init(target, INITS[scenario])
        for loaded in (False, True):
            runs.append(boot(settings, target, scenario, loaded))
            print(show(runs[-1]), flush=True)
    if runs:
        print("\nloaded against as is (same scenario, this run):")
    for as_is, loaded in zip(runs[::2], runs[1::2], strict=True):
        a, b = as_is.boot_share, loaded.boot_share
        print(f"  {as_is.scenario:9} verdict time {ratio(loaded.at, as_is.at)}, "
              f"running {ratio(loaded.running, as_is.running)}"
              f", QEMU's CPU per second {ratio(b and b.ran / b.seconds, a and a.ran / a.seconds)}"
              f", its wait per second {ratio(b and b.waited / b.seconds, a and a.waited / a.seconds)}")
    if args.baseline:
        compare(args.baseline.absolute(), image.absolute(), args.rounds)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
