"""Children that never outlive osbuilder, and step locks that last as long as any of its processes.

`spawn()` starts a command in a process group of its own (Popen's `process_group`: no preexec_fn,
so it is safe while threads run) and registers the group with the watchdog. `finish()` SIGKILLs
what is left of the group, all of it while the command still runs (timeout, interrupt) or the
stragglers once it has exited, then reaps the command: its exit status keeps the group id ours
until then (`wait()` watches a pidfd, which does not reap).

The watchdog is this file run as a script, once per osbuilder process, in a session of its own (a
signal to osbuilder's process group, as `timeout` or a CI runner sends it, does not reach it). It
reads registrations from a pipe whose write end only osbuilder holds. However osbuilder ends (normal
exit, a signal, SIGKILL) the pipe reaches end of file, and the watchdog SIGKILLs every group still
registered and every process whose environment carries this osbuilder's owner token: a child caught
between its start and its registration, or a descendant that left its group. What is not a process
of osbuilder's (a container the engine's daemon or conmon runs) is stopped by a command registered
with `on_death()` (`podman stop NAME`), which the watchdog runs in between.

`hold_lock()` takes a step's lock (flock) for the rest of the process, and every child inherits it:
the lock of an osbuilder that died is free only once its last child is gone. `in_use()` tells the
sweeps of leftover temporaries whether a live process may still write into one. Standard library
only: the watchdog runs this file with `python -I -S`.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("osbuilder")

OWNER_ENV = "OSBUILDER_OWNER"  # in every child's environment: which osbuilder's watchdog owns it


class _State:
    """This process's watchdog pipe, its live children and the lock descriptors they inherit."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = 0  # the process that started the watchdog (a forked child needs its own)
        self.watchdog: subprocess.Popen | None = None
        self.pipe = -1
        self.token = ""
        self.children: dict[int, tuple[int, str]] = {}  # pid -> (pidfd, registration)
        self.held: list[int] = []
        self.cleanups = itertools.count(1)


_state = _State()


def _ensure_watchdog() -> None:
    """Start this process's watchdog unless it runs (call with _state.lock held)."""
    if _state.pid == os.getpid():
        return
    token = f"{os.getpid()}-{secrets.token_hex(8)}"
    env = {k: v for k, v in os.environ.items() if k != OWNER_ENV}  # never killed as someone's child
    read, write = os.pipe()
    try:
        _state.watchdog = subprocess.Popen(
            [sys.executable, "-I", "-S", __file__, token], stdin=read, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    except BaseException:
        os.close(write)
        raise
    finally:
        os.close(read)
    _state.pid, _state.pipe, _state.token = os.getpid(), write, token
    _state.children.clear()


def _tell(message: str) -> None:
    try:
        os.write(_state.pipe, message.encode())
    except OSError as e:
        log.warning("osbuilder's watchdog is gone (%s): children may outlive a killed osbuilder", e.strerror)


def spawn(argv: list[str], *, own_group: bool = True, env: dict[str, str] | None = None,
          **popen: Any) -> subprocess.Popen:
    """Popen(argv), registered with the watchdog. `own_group` False keeps the child in osbuilder's
    process group (an interactive QEMU must stay in the terminal's foreground group)."""
    with _state.lock:
        _ensure_watchdog()
        full_env = {**(os.environ if env is None else env), OWNER_ENV: _state.token}
        proc = subprocess.Popen(argv, env=full_env, process_group=0 if own_group else None,
                                pass_fds=tuple(_state.held), **popen)
        registration = f"{'g' if own_group else 'p'}{proc.pid}"
        _tell(f"+{registration}\n")
        _state.children[proc.pid] = (_pidfd(proc.pid), registration)
    return proc


def on_death(argv: list[str]) -> str:
    """Have the watchdog run `argv` if osbuilder dies (SIGKILL) before `cancel(...)` of the id returned:
    how to stop something that is not a process of osbuilder's (a container the engine runs)."""
    with _state.lock:
        _ensure_watchdog()
        registration = f"c{next(_state.cleanups)}"
        _tell(f"+{registration} {json.dumps(argv)}\n")
    return registration


def cancel(registration: str) -> None:
    """Forget an `on_death()` command (what it would stop has ended)."""
    with _state.lock:
        if _state.pid == os.getpid():
            _tell(f"-{registration}\n")


def _pidfd(pid: int) -> int:
    try:
        return os.pidfd_open(pid)
    except OSError:  # no pidfd (a kernel before 5.3, a seccomp filter): wait() reaps instead
        return -1


def wait(proc: subprocess.Popen, timeout: float | None) -> bool:
    """Whether `proc` exited within `timeout` seconds; it is not reaped (see finish)."""
    if proc.returncode is not None:
        return True
    pidfd = _state.children.get(proc.pid, (-1, ""))[0]
    if pidfd < 0:
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else int(timeout * 1000)))


def finish(proc: subprocess.Popen) -> int:
    """SIGKILL `proc`'s process group (only `proc` itself if it shares osbuilder's), reap it, and
    unregister it. Safe to call more than once; returns the exit status."""
    with _state.lock:
        child = _state.children.pop(proc.pid, None)
    if child is None:
        return proc.wait()
    pidfd, registration = child
    try:
        if proc.returncode is None:  # not reaped: the group id cannot belong to anyone else yet
            _kill(registration)
    finally:
        if pidfd >= 0:
            os.close(pidfd)
        with _state.lock:
            _tell(f"-{registration}\n")
    return proc.wait()


def _kill(registration: str) -> None:
    number = int(registration[1:])
    try:
        if registration[0] == "g":
            os.killpg(number, signal.SIGKILL)
        else:
            os.kill(number, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# -- step locks and leftovers ---------------------------------------------------------------------

def hold_lock(path: Path, step: str, *, shared: bool = False) -> None:
    """Hold the flock on `path` (a file, made if missing, or a directory) until this process and every
    child it starts have exited (shared: with other readers). While another osbuilder holds it, say
    so in one line and wait."""
    if path.is_dir():
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    how = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = ", ".join(str(pid) for pid in lock_holders(path)) or "unknown"
            log.info("%s: waiting for another osbuilder run in this WORKDIR to finish (pid %s holds %s)",
                     step, holders, path)
            fcntl.flock(fd, how)
    except BaseException:
        os.close(fd)
        raise
    with _state.lock:
        _ensure_watchdog()
        _state.held.append(fd)


def lock_holders(path: Path) -> list[int]:
    """The processes that took a flock on `path` (from /proc/locks; a holder may have died since,
    leaving the lock to the children that inherited it)."""
    st = os.stat(path)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    return sorted({int(f[f.index(ident) - 1]) for f in map(str.split, lines)
                   if "FLOCK" in f and "->" not in f and ident in f})


def in_use(path: Path) -> bool:
    """Whether a live process names `path` (or a path inside it) on its command line: an orphan of a
    killed osbuilder that may still write there. The sweeps keep such a leftover."""
    needle = os.fsencode(path.absolute())
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if needle in Path(entry.path, "cmdline").read_bytes():
                    return True
            except OSError:
                continue
    return False


# -- the watchdog (this file as a script) ---------------------------------------------------------

def _owned(token: str) -> list[int]:
    """Processes whose environment carries this owner token."""
    mark = f"{OWNER_ENV}={token}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if mark in Path(entry.path, "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _watch(token: str) -> None:
    """Read registrations until osbuilder is gone, then kill what it left."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    live: set[str] = set()
    cleanups: dict[str, list[str]] = {}
    for line in sys.stdin.buffer:
        op, registration = line[:1], line[1:].strip().decode()
        registration, _, argv = registration.partition(" ")
        if op == b"+" and registration.startswith("c"):
            cleanups[registration] = json.loads(argv)
        elif op == b"+":
            live.add(registration)
        elif op == b"-":
            live.discard(registration)
            cleanups.pop(registration, None)
    for registration in live:
        _kill(registration)
    for argv in cleanups.values():  # e.g. `podman stop`: the step in the container unwinds as on Ctrl-C
        try:
            subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=120)
        except (OSError, subprocess.SubprocessError):
            pass
    for _ in range(5):  # again while killed processes' last forks show up
        for registration in live:
            _kill(registration)
        owned = _owned(token)
        if not owned:
            break
        for pid in owned:
            _kill(f"p{pid}")
        time.sleep(0.05)


if __name__ == "__main__":
    _watch(sys.argv[1])


def terminate_as_interrupt() -> None:
    """SIGTERM (a service manager, `timeout`) and SIGHUP (the terminal closed) unwind like Ctrl-C."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGHUP, handler)
