"""The guest's serial console: drained to a log file from the first byte, and watched line by line.

A `ConsoleWatcher` reads a stream (the console chardev's UNIX socket, or QEMU's stderr) in a
thread, appends every byte to a log file, splits lines and matches each against:

* FATAL patterns (kernel panic, emergency mode, an initramfs shell, the error lines of the init of
  osbuilder's initrd, no init, systemd freezing, KVM internal error): the first match is kept, with
  its line, so a boot fails within seconds with the evidence instead of waiting for a timeout;
* EXEC_FAILED: a unit whose program systemd could not run (status 203/EXEC), by unit, so that the
  agent phase can name an agent that is missing or cannot run as soon as systemd says so;
* MILESTONES (first byte, "Linux version", init started, systemd, the agent starting as PID 1,
  multi-user): the host time of the first occurrence, for the boot's phase timings and the waits
  in `phases`.

Each complete line is also the guest's progress (`last_line`, `line_count`): a guest that prints is
getting somewhere; systemd's "A start job is running" spinner rewrites one line with carriage returns
and ends it only when the job ends, so a job that hangs is not progress.

A guest can print without end: each byte is looked at once, a line is kept up to LINE_CAP bytes
(the rest is dropped and the line ends with "[N bytes cut]"), and the log file keeps at most
LOG_CAP bytes: the first LOG_HEAD bytes, a line "[osbuilder: N bytes of output cut here]" and the
latest output.
"""

from __future__ import annotations

import functools
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from osbuilder.terminal import printable

TAIL_LINES = 40
LINE_CAP = 4096  # bytes kept of one console line (the kernel's are under 1 KiB)
LOG_CAP = 16 << 20  # bytes kept of a console log
LOG_HEAD = 1 << 20  # ... of which the first output (the kernel's boot messages) is this much


@dataclass(frozen=True)
class FatalPattern:
    regex: re.Pattern[str]
    reason: str
    infrastructure: bool = False  # not the artifact's fault


def _fatal(pattern: str, reason: str, infrastructure: bool = False) -> FatalPattern:
    return FatalPattern(re.compile(pattern), reason, infrastructure)


# Most specific first: a kernel without an initrd says "Kernel panic - not syncing: No working init
# found" or "...: VFS: Unable to mount root fs", and that line should name the cause, not just "panic".
FATAL: tuple[FatalPattern, ...] = (
    _fatal(r"KVM internal error", "KVM internal error (the host's nested KVM failed)", True),
    # the init of osbuilder's initrd for Debian's kernel (boot_init.c) names why it stops the boot
    _fatal(r"osbuilder-init: error: root device \S+ did not appear",
           "root filesystem not found (the initrd gave up waiting for root=)"),
    _fatal(r"osbuilder-init: error: (?:no init to run|cannot run )", "no init to run"),
    _fatal(r"osbuilder-init: error: cannot mount root device", "the initrd cannot mount the root filesystem"),
    _fatal(r"osbuilder-init: error: ", "the initrd's init failed"),
    # without an initrd, a missing /sbin/init makes the kernel try its fallbacks, ending in a shell
    _fatal(r"No working init found|Requested init \S+ failed|No init found|"
           r"Target filesystem doesn't have requested|Run /(?:etc/init|bin/init|bin/sh) as init process",
           "no init to run"),
    _fatal(r"Gave up waiting for root|ALERT!|^\(initramfs\)|\(initramfs\) ?$",
           "dropped to an initramfs shell (root filesystem not found)"),
    _fatal(r"VFS: Unable to mount root fs", "kernel panic: root filesystem not found"),
    _fatal(r"Kernel panic - not syncing", "kernel panic"),
    _fatal(r"Entering emergency mode|You are in emergency mode|You are in rescue mode|"
           r"Cannot open access to console, the root account is locked", "systemd entered emergency mode"),
    _fatal(r"Freezing execution", "systemd crashed (freezing execution)"),
)

# Name -> pattern; the first line matching each is timestamped. "first_byte" is implicit.
MILESTONES: dict[str, re.Pattern[str]] = {
    "linux_version": re.compile(r"Linux version \d"),
    "init_started": re.compile(r"Run /\S*init as init process|Freeing unused kernel"),
    "root_mounted": re.compile(r"EXT4-fs \(vda1?\): mounted filesystem"),  # ro/rw: checked via the agent
    "systemd_started": re.compile(r"systemd\[1\]|Welcome to |systemd \d+ running in system mode"),
    "agent_started": re.compile(r"osbuilder-agent: version \S+ starting as PID 1"),  # the agent is init
    "multi_user": re.compile(r"Reached target .*Multi-User System|Reached target multi-user"),
    "login_prompt": re.compile(r"login: ?$"),
    "power_down": re.compile(r"reboot: Power down|System halted"),
}

FAILED_UNIT = re.compile(r"\[FAILED\].*|Failed to start .*")
# A unit whose program could not be run at all (missing, not executable, for another architecture): systemd's
# own line, on the console while it still logs there (until journald starts). Group 1 is the unit.
EXEC_FAILED = re.compile(r"(\S+\.service): (?:Main process exited, code=exited, status=203/EXEC|"
                         r"Failed at step EXEC spawning |Failed to execute )")


@dataclass(frozen=True)
class FatalMatch:
    reason: str
    line: str
    at: float  # seconds since the watcher's t0
    source: str
    infrastructure: bool


def match_fatal(line: str) -> FatalPattern | None:
    """The first fatal pattern `line` matches, if any."""
    for pat in FATAL:
        if pat.regex.search(line):
            return pat
    return None


def match_milestones(line: str) -> list[str]:
    """Names of the milestones `line` reaches."""
    return [name for name, rx in MILESTONES.items() if rx.search(line)]


def clean(raw: bytes) -> str:
    """A console line as it may be shown and matched: without escape sequences (colours, but also a
    guest's window titles, clipboard writes and other terminal commands) and carriage returns, other
    control characters shown as \\xNN (terminal.printable)."""
    return printable(raw.decode(errors="replace")).rstrip()


class LineSplitter:
    """Splits a byte stream into lines, looking at each byte once; keeps at most `cap` bytes of a line."""

    def __init__(self, cap: int = LINE_CAP) -> None:
        self.cap = cap
        self.partial = b""  # the line so far (at most `cap` bytes)
        self.cut = 0  # bytes of it dropped

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines `chunk` completes."""
        *complete, rest = chunk.split(b"\n")
        lines = []
        for piece in complete:
            self._add(piece)
            lines.append(self.partial + (b" [%d bytes cut]" % self.cut if self.cut else b""))
            self.partial, self.cut = b"", 0
        self._add(rest)
        return lines

    def _add(self, piece: bytes) -> None:
        room = max(0, self.cap - len(self.partial))
        if len(piece) > room:
            self.cut += len(piece) - room
            piece = piece[:room]
        self.partial += piece


class CappedLog:
    """An output log of at most `cap` bytes: the first `head` bytes, a line saying how many bytes were
    cut, and the latest output (kept to about half of what is left, so a cut is rare)."""

    def __init__(self, path: Path, cap: int = LOG_CAP, head: int = LOG_HEAD) -> None:
        self.cap, self.head = cap, head
        self.file = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666), "r+b", buffering=0)
        self.size = self.file.seek(0, os.SEEK_END)  # earlier content (QEMU's overlay step) counts
        self.body = head  # where the latest output starts once something was cut
        self.dropped = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.size += len(data)
        if self.size > self.cap:
            self._cut()

    def _cut(self) -> None:
        keep = (self.cap - self.head) // 2
        start = self.size - keep
        self.file.seek(start)
        tail = self.file.read(keep)
        self.dropped += start - self.body
        marker = b"\n[osbuilder: %d bytes of output cut here]\n" % self.dropped
        self.file.seek(self.head)
        self.file.write(marker + tail)
        self.file.truncate()
        self.body = self.head + len(marker)
        self.size = self.body + len(tail)

    def close(self) -> None:
        self.file.close()


class ConsoleWatcher:
    """Drains one stream into a log file and keeps what the checks need from it. Thread-safe."""

    def __init__(self, log_path: Path, t0: float, source: str = "console", *, log_cap: int = LOG_CAP,
                 log_head: int = LOG_HEAD) -> None:
        self.log_path = log_path
        self.log_cap, self.log_head = log_cap, log_head
        self.t0 = t0
        self.source = source
        self.lines: deque[str] = deque(maxlen=2000)
        self.milestones: dict[str, float] = {}
        self.fatal: FatalMatch | None = None
        self.failed_lines: list[str] = []
        self.exec_failed: dict[str, str] = {}  # unit -> the first line saying its program could not run
        self.last_line: tuple[float, str] | None = None  # (seconds since t0, line) of the latest line
        self.line_count = 0
        self.closed = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from the reader thread) after each new line or the stream's end."""
        self._listeners.append(callback)

    def start(self, stream: BinaryIO | Callable[[], bytes]) -> None:
        """Read `stream` (a file object, or a function returning b'' at EOF) in a daemon thread."""
        read = stream if callable(stream) else functools.partial(stream.read1, 65536)  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._drain, args=(read,), name=f"drain-{self.source}",
                                        daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread:
            self._thread.join(timeout)

    def _drain(self, read: Callable[[], bytes]) -> None:
        lines = LineSplitter()
        log = CappedLog(self.log_path, self.log_cap, self.log_head)
        try:
            while True:
                try:
                    chunk = read()
                except (OSError, ValueError):
                    chunk = b""
                if not chunk:
                    break
                log.write(chunk)
                if "first_byte" not in self.milestones:
                    self._note_milestone("first_byte")
                for raw in lines.feed(chunk):
                    self.feed(clean(raw))
                if lines.partial.endswith((b"login: ", b"# ")):
                    self.feed(clean(lines.partial), keep=False)  # prompts end without a newline
        finally:
            log.close()
        if lines.partial:
            self.feed(clean(lines.partial))
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        self._notify()

    def feed(self, line: str, keep: bool = True) -> None:
        """Process one line (public for tests and for replaying a log)."""
        now = time.monotonic() - self.t0
        with self._cond:
            if keep:
                self.lines.append(line)
            self.last_line = (now, line)
            self.line_count += 1
            for name in match_milestones(line):
                self.milestones.setdefault(name, now)
            if FAILED_UNIT.search(line) and len(self.failed_lines) < 50:
                self.failed_lines.append(line)
            exec_failed = EXEC_FAILED.search(line)
            if exec_failed and len(self.exec_failed) < 50:
                self.exec_failed.setdefault(exec_failed.group(1), line)
            pat = match_fatal(line)
            if pat and self.fatal is None:
                self.fatal = FatalMatch(pat.reason, line, now, self.source, pat.infrastructure)
            self._cond.notify_all()
        self._notify()

    def _note_milestone(self, name: str) -> None:
        with self._cond:
            self.milestones.setdefault(name, time.monotonic() - self.t0)
            self._cond.notify_all()

    def _notify(self) -> None:
        for cb in self._listeners:
            cb()

    def tail(self, n: int = TAIL_LINES) -> list[str]:
        with self._cond:
            return list(self.lines)[-n:]

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until `predicate()` (checked under the lock after each line) is true, or timeout."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)


def format_tail(lines: Iterable[str], title: str = "console tail") -> str:
    """Lines of evidence (a guest's, QEMU's) under a title, each made printable (one line each)."""
    body = "\n".join(f"  | {printable(line, lines=False)}" for line in lines)
    return f"{title}:\n{body}" if body else f"{title}: (empty)"
