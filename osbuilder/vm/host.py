"""What the host gives a guest: the CPU time QEMU's threads got, the time they waited for a CPU, the load.

A guest under TCG (and a KVM guest's vCPUs) is ordinary threads of the QEMU process on the host. Linux
accounts, per thread, the time it ran on a CPU and the time it was runnable but waited on a run queue
for a CPU (`/proc/PID/task/TID/schedstat`: run time, run delay, in nanoseconds). That tells a starved
guest from a hung one:

* a guest hung idle (an init that sleeps forever, a kernel waiting for a device) halts its vCPUs:
  QEMU's threads sleep, so they neither run nor wait, whatever the host's load;
* a guest hung busy (an init in a loop) runs: QEMU gets CPU time, and on a loaded host waits too;
* a guest the host starves wants to run and is not let: QEMU waits for a CPU about as long as it runs,
  or longer, and gets too little CPU time to get anywhere.

So a window in which the guest showed no progress is the host's fault (`Share.starved`) when QEMU's
threads waited for a CPU at least as long as they ran (the guest got at most half of the CPU it asked
for: everything it does takes twice as long, or longer) and at least STARVED_WAIT seconds a second (a
CPU-bound guest denied half of one vCPU's time waits that long), or when the host's own hypervisor stole
STOLEN of its CPUs' time (`/proc/stat`: a host starved from below shows no run-queue wait, its CPUs are
simply gone). A window under MIN_WINDOW seconds tells nothing.
Measured on the 2-core machine the tests run on (bench/bench_loaded_host.py): QEMU of
a guest hung idle waits 0.02-0.14 s a second, with two busy loops per core or without; of a good guest
those loops starve, 1.4-1.9 s a second while it runs 0.2-0.4 s. The one case the numbers cannot settle
is a guest hung *busy* on a loaded host (QEMU waits 0.9-1.1 s a second and runs 0.2-0.3 s, as for a
starved one): it is given the benefit of the doubt, and at the ceiling the failure is the host's.

The load average and the CPU pressure (`/proc/pressure/cpu`) describe the whole host, not this guest:
they go into the message as evidence for the reader, and do not decide.

`Monitor` samples one QEMU process once a second in a daemon thread; `Monitor.share(since)` is what the
host gave it from then to now. Where the files cannot be read (another OS, a process that is gone), there
is no evidence, and nothing is called starved.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

STARVED_WAIT = 0.5  # QEMU waited for a CPU at least half a second a second (a guest hung idle: 0.03-0.14)
STOLEN = 0.25  # or the host's hypervisor took this share of its CPUs' time
MIN_WINDOW = 2.0  # seconds: a shorter window (samples are a second apart) is no evidence
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    """One look at a QEMU process and the host."""

    at: float  # time.monotonic()
    threads: dict[int, tuple[int, int]]  # thread id -> (ns run on a CPU, ns waited for one)
    steal: float  # seconds the host's hypervisor took from all of its CPUs so far (0 where not reported)


@dataclass(frozen=True)
class Share:
    """What the host gave QEMU over a window of `seconds`."""

    seconds: float
    ran: float  # CPU seconds QEMU's threads ran (summed over threads)
    waited: float  # seconds they were runnable but waited for a CPU (summed over threads)
    stolen: float  # seconds the hypervisor took from each of the host's CPUs, on average
    load: tuple[float, float, float]
    cpus: int
    pressure: float | None = None  # /proc/pressure/cpu "some" avg10, percent

    @property
    def starved(self) -> bool:
        """The host, not the guest, is why nothing happened in this window (see the module's docstring)."""
        if self.seconds < MIN_WINDOW:
            return False
        if self.stolen >= STOLEN * self.seconds:
            return True
        return self.waited >= max(self.ran, STARVED_WAIT * self.seconds)

    @property
    def given(self) -> float:
        """The share of the CPU QEMU asked for in this window that it got: ran / (ran + waited), less the
        share of the host's CPUs the hypervisor stole; 1.0 when it asked for none (a guest asleep)."""
        wanted = self.ran + self.waited
        got = self.ran / wanted if wanted > 0 else 1.0
        return max(0.0, got * (1.0 - self.stolen / self.seconds)) if self.seconds > 0 else got

    def describe(self) -> str:
        """One line of evidence: the load, and what QEMU got in the window."""
        load = f"load average {self.load[0]:.2f} {self.load[1]:.2f} {self.load[2]:.2f} on {self.cpus} CPUs"
        pressure = f", CPU pressure {self.pressure:.0f}%" if self.pressure is not None else ""
        stolen = f", {self.stolen:.1f}s stolen by the hypervisor" if self.stolen >= 0.05 else ""
        return (f"{load}{pressure}; in the last {self.seconds:.0f}s QEMU ran {self.ran:.1f}s of CPU and waited "
                f"{self.waited:.1f}s for a CPU{stolen}")


def sample(pid: int, proc: Path = Path("/proc")) -> Sample | None:
    """A sample of process `pid`'s threads, or None when it cannot be read (gone, no /proc)."""
    threads: dict[int, tuple[int, int]] = {}
    try:
        tids = os.listdir(proc / str(pid) / "task")
    except OSError:
        return None
    for tid in tids:
        try:
            ran, waited, *_ = (proc / str(pid) / "task" / tid / "schedstat").read_text().split()
            threads[int(tid)] = (int(ran), int(waited))
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
    return Sample(time.monotonic(), threads, steal_seconds(proc)) if threads else None


def steal_seconds(proc: Path = Path("/proc")) -> float:
    """Seconds the hypervisor took from all of the host's CPUs since boot (`/proc/stat`), 0 if unknown."""
    try:
        fields = (proc / "stat").read_text().split("\n", 1)[0].split()
        return int(fields[8]) / CLOCK_TICKS if fields[0] == "cpu" and len(fields) > 8 else 0.0
    except (OSError, ValueError):
        return 0.0


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


def cpu_pressure(proc: Path = Path("/proc")) -> float | None:
    """The share of the last 10 s in which some task waited for a CPU, in percent (PSI), if reported."""
    try:
        some = (proc / "pressure" / "cpu").read_text().split("\n", 1)[0]
        return float(some.split("avg10=", 1)[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


def between(first: Sample, last: Sample) -> Share:
    """What the host gave the process from `first` to `last`. A thread that started meanwhile counts
    from zero; one that ended is left out (QEMU's vCPU and main threads live as long as it does)."""
    ran = waited = 0
    for tid, (r, w) in last.threads.items():
        r0, w0 = first.threads.get(tid, (0, 0))
        ran += max(0, r - r0)
        waited += max(0, w - w0)
    cpus = os.cpu_count() or 1
    return Share(seconds=max(0.0, last.at - first.at), ran=ran / 1e9, waited=waited / 1e9,
                 stolen=max(0.0, last.steal - first.steal) / cpus, load=load_average(), cpus=cpus,
                 pressure=cpu_pressure())


class Monitor:
    """Samples of one process, one every `interval` seconds, kept for `keep` seconds, in a daemon thread."""

    def __init__(self, pid: int | None, interval: float = 1.0, keep: float = 3600.0) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: deque[Sample] = deque(maxlen=max(2, int(keep / interval)))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Monitor:
        if self.pid is not None and self._thread is None:
            self._take()
            self._thread = threading.Thread(target=self._run, name=f"host-monitor-{self.pid}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self._take() is None:
                return  # the process is gone

    def _take(self) -> Sample | None:
        s = sample(self.pid) if self.pid is not None else None
        if s is not None:
            with self._lock:
                self.samples.append(s)
        return s

    def share(self, since: float, until: float | None = None) -> Share | None:
        """What the host gave the process from `since` (time.monotonic()) to now: from the last sample
        taken at or before `since` (else the first) to a fresh one; or, given `until`, to the first
        sample taken at or after it (else the last). None without two samples."""
        now = self._take() if until is None else None
        with self._lock:
            samples = list(self.samples)
        if until is not None:
            now = next((s for s in samples if s.at >= until), None)
        if now is None and samples:
            now = samples[-1]
        if now is None:
            return None
        first = next((s for s in reversed(samples) if s.at <= since), samples[0])
        if first is now or first.at >= now.at:
            return None
        return between(first, now)
