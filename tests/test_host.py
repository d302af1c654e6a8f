"""host.py: what the host gives a QEMU process, read from /proc, and when that is starving it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from osbuilder.vm import host

SPIN = "while True:\n    pass\n"


def fake_proc(root: Path, pid: int, threads: dict[int, tuple[int, int]], steal_ticks: int = 0) -> Path:
    for tid, (ran, waited) in threads.items():
        (root / str(pid) / "task" / str(tid)).mkdir(parents=True, exist_ok=True)
        (root / str(pid) / "task" / str(tid) / "schedstat").write_text(f"{ran} {waited} 42\n")
    (root / "stat").write_text(f"cpu  100 0 50 1000 5 0 3 {steal_ticks} 0 0\ncpu0 50 0 25 500 2 0 1 0 0 0\n")
    return root


def test_a_sample_reads_every_thread_and_the_hosts_steal(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, 77, {77: (2_000_000_000, 500_000_000), 78: (1_000_000_000, 0)}, steal_ticks=250)
    s = host.sample(77, proc)
    assert s is not None and s.threads == {77: (2_000_000_000, 500_000_000), 78: (1_000_000_000, 0)}
    assert s.steal == 250 / host.CLOCK_TICKS
    assert host.sample(78, proc) is None  # no such process: no evidence
    (tmp_path / "stat").unlink()
    assert host.steal_seconds(tmp_path) == 0.0


def test_between_counts_new_threads_from_zero_and_leaves_out_ended_ones() -> None:
    first = host.Sample(10.0, {1: (1_000_000_000, 1_000_000_000), 2: (5_000_000_000, 0)}, steal=4.0)
    last = host.Sample(20.0, {1: (3_000_000_000, 7_000_000_000), 3: (500_000_000, 1_500_000_000)}, steal=8.0)
    share = host.between(first, last)
    assert (share.seconds, share.ran, share.waited) == (10.0, 2.5, 7.5)
    assert share.stolen == 4.0 / (os.cpu_count() or 1) and share.cpus == (os.cpu_count() or 1)


@pytest.mark.parametrize("ran, waited, stolen, seconds, starved", [
    (0.3, 0.9, 0, 30, False),  # hung idle under 2 busy loops per core: QEMU hardly wants a CPU
    (28.5, 4.5, 0, 30, False),  # hung busy on the host as it is: it runs, nothing else wants the CPUs
    (6.4, 54.0, 0, 30, True),  # a good guest under 2 busy loops per core: it waits more than it runs
    (9.0, 27.3, 0, 30, True),  # hung busy under the loops: the one case the numbers cannot tell apart
    (20.0, 19.0, 0, 30, False),  # waited less than it ran: at least half speed, a silent guest is hung
    (1.0, 5.0, 0, 30, False),  # waited more than it ran, but a sixth of the window: mostly idle
    (0.2, 0.1, 12.0, 30, True),  # the host's hypervisor took 40 % of its CPUs
    (0.1, 1.5, 0, 1.5, False),  # a window too short to tell
])
def test_starved_means_qemu_waited_for_a_cpu_more_than_it_ran(ran: float, waited: float, stolen: float,
                                                                seconds: float, starved: bool) -> None:
    share = host.Share(seconds=seconds, ran=ran, waited=waited, stolen=stolen, load=(1.0, 1.0, 1.0), cpus=2)
    assert share.starved is starved


def test_describe_gives_the_load_and_what_qemu_got() -> None:
    share = host.Share(seconds=30, ran=6.44, waited=54.0, stolen=1.25, load=(9.5, 8.25, 7.0), cpus=2, pressure=91.5)
    assert share.describe() == ("load average 9.50 8.25 7.00 on 2 CPUs, CPU pressure 92%; in the last 30s QEMU ran "
                                "6.4s of CPU and waited 54.0s for a CPU, 1.2s stolen by the hypervisor")


def test_a_monitor_without_a_process_has_no_evidence() -> None:
    assert host.Monitor(None).start().share(time.monotonic() - 5) is None
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    gone = host.Monitor(child.pid).start()
    assert gone.share(time.monotonic() - 5) is None
    gone.stop()


def test_a_share_between_two_past_moments_spans_the_samples_around_them() -> None:
    """share(since, until): from the last sample at or before `since` to the first at or after `until`,
    without a fresh sample (the window is over)."""
    monitor = host.Monitor(None)
    for at, ran in ((10.0, 0), (11.0, 1), (12.0, 2), (13.0, 3), (14.0, 4)):
        monitor.samples.append(host.Sample(at, {1: (int(ran * 1e9), int(ran * 3e9))}, 0.0))
    share = monitor.share(11.5, until=12.5)
    assert share is not None and (share.seconds, share.ran, share.waited) == (2.0, 2.0, 6.0)
    assert share.given == 0.25  # it ran a quarter of the time it wanted to
    assert monitor.share(13.0, until=20.0).seconds == 1.0  # type: ignore[union-attr]  # to the last sample


@pytest.mark.parametrize("ran, waited, stolen, seconds, given", [
    (3.0, 1.0, 0.0, 10.0, 0.75), (0.0, 0.0, 0.0, 10.0, 1.0), (2.0, 2.0, 5.0, 10.0, 0.25), (1.0, 0.0, 0.0, 0.0, 1.0)])
def test_given_is_the_share_of_the_cpu_qemu_asked_for_that_it_got(ran: float, waited: float, stolen: float,
                                                                  seconds: float, given: float) -> None:
    share = host.Share(seconds=seconds, ran=ran, waited=waited, stolen=stolen, load=(1.0, 1.0, 1.0), cpus=2)
    assert share.given == given


def spinning(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-I", "-S", "-c", SPIN]) for _ in range(count)]


def finish(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def test_the_kernel_tells_a_starved_process_from_an_idle_one() -> None:
    """What the classification rests on, on this host: a busy process among twice as many busy loops as
    cores waits for a CPU more than it runs; a sleeping one among them neither runs nor waits."""
    cores = os.cpu_count() or 1
    busy = spinning(1)[0]
    idle = subprocess.Popen([sys.executable, "-c", "import time; print('asleep', flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE, text=True)
    assert idle.stdout is not None and idle.stdout.readline() == "asleep\n"  # its start-up is not in the window
    loops = spinning(2 * cores)
    try:
        monitors = [host.Monitor(p.pid, interval=0.25).start() for p in (busy, idle)]
        since = time.monotonic()
        time.sleep(2.5)
        busy_share, idle_share = (m.share(since) for m in monitors)
        for m in monitors:
            m.stop()
    finally:
        finish([*loops, busy, idle])
    assert busy_share is not None and idle_share is not None
    assert busy_share.waited > busy_share.ran > 0.1 and busy_share.starved, busy_share.describe()
    assert idle_share.ran < 0.1 and idle_share.waited < 0.1 and not idle_share.starved, idle_share.describe()
