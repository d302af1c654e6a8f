"""The one way osbuilder runs a subprocess.

`run()` logs the exact command line (credentials in URLs shown as ***, in the log file too),
appends all output to the step's log file, shows progress
on stderr while a long command runs, and turns a failure into an `OsbuilderError` whose message
names the step and whose detail is the tail of the command's output. Every command runs in a
process group of its own that never outlives osbuilder (procs.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from osbuilder import procs
from osbuilder.errors import OsbuilderError, seconds
from osbuilder.terminal import printable

log = logging.getLogger("osbuilder")

PROGRESS_EVERY = 10.0  # seconds between "still running" lines for long commands
TOOL_VERSIONS = "tool-versions.json"


def format_command(cmd: Sequence[str | os.PathLike]) -> str:
    return shlex.join(str(c) for c in cmd)


# The user information of a URL: from `://` to the last `@` before the next white space or the next
# `://`, so a password with an unencoded `@` or `/` is hidden whole (http://user:p@ss@host/,
# http://user:pa/ss@host/). Possessive quantifiers, and no segment crossing another `://`, keep it
# linear: each character is looked at a bounded number of times, however long the line.
_USERINFO = r"://(?:(?:[^\s@:]++|:(?!//))*+@)++"
_USERINFO_TEXT = re.compile(_USERINFO)
_USERINFO_BYTES = re.compile(_USERINFO.encode())
REDACT_CHUNK = 1 << 16  # characters redacted per step; between steps, signals and other threads run


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it replaced by *** (for what is shown or logged).

    Linear in the length of `text`, and done in pieces of about REDACT_CHUNK characters, so a huge
    line neither takes long nor holds off a signal (or, in a reader thread, the main thread)."""
    if "@" not in text or "://" not in text:
        return text
    return "".join(_redacted_pieces(text, _USERINFO_TEXT, "://***@", "://"))


def redact_bytes(data: bytes) -> bytes:
    """`redact` for raw output (a tool's log lines)."""
    if b"@" not in data or b"://" not in data:
        return data
    return b"".join(_redacted_pieces(data, _USERINFO_BYTES, b"://***@", b"://"))


def _redacted_pieces(text, pattern, replacement, separator):
    """Redact `text` piece by piece, each cut where no credential can span: before a `://`."""
    start, end = 0, len(text)
    while start < end:
        stop = text.find(separator, start + REDACT_CHUNK)
        stop = end if stop < 0 else stop
        yield pattern.sub(replacement, text[start:stop])
        start = stop


@dataclass(frozen=True)
class Command:
    """One program to run, and how (`run`'s arguments)."""

    argv: list[str]
    step: str  # names the step in the log, the progress lines and errors
    shown: str  # the command line as logged (credentials redacted); the program gets `argv`
    cwd: Path | None = None
    env: dict[str, str] | None = None  # added to this process's environment
    input: bytes | None = None
    capture: bool = False  # stdout is returned; stderr is the log
    timeout: float | None = None
    check: bool = True  # a non-zero exit raises
    verbose: bool = False  # every output line on stderr, instead of progress lines


def run(
    cmd: Sequence[str | os.PathLike],
    *,
    step: str,
    logfile: Path | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
    capture: bool = False,
    timeout: float | None = None,
    check: bool = True,
    verbose: bool = False,
) -> subprocess.CompletedProcess:
    """Run `cmd` (never through a shell) as part of `step`.

    Output goes to `logfile` (appended) and, with `verbose`, to stderr line by line; without it a
    progress line with the elapsed time and the latest output line is printed every
    PROGRESS_EVERY seconds. With `capture`, stdout is returned separately (stderr is logged).
    Raises OsbuilderError when the command cannot start, times out, or (with `check`) exits non-zero.
    """
    argv = [str(c) for c in cmd]
    command = Command(argv, step, redact(format_command(argv)), cwd=cwd, env=env, input=input, capture=capture,
                      timeout=timeout, check=check, verbose=verbose)
    log.info("%s: + %s", step, command.shown)
    if logfile:
        logfile.parent.mkdir(parents=True, exist_ok=True)
    sink = open(logfile, "ab") if logfile else None
    try:
        if sink:
            sink.write(f"+ {command.shown}\n".encode())
            sink.flush()
        return _run(command, sink)
    finally:
        if sink:
            sink.close()


def _run(command: Command, sink: BinaryIO | None) -> subprocess.CompletedProcess:
    full_env = None if command.env is None else {**os.environ, **command.env}
    try:
        proc = procs.spawn(
            command.argv,
            cwd=command.cwd,
            env=full_env,
            stdin=subprocess.PIPE if command.input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if command.capture else subprocess.STDOUT,
        )
    except FileNotFoundError:
        raise OsbuilderError(
            f"{command.step}: program '{command.argv[0]}' not found; run `osbuilder check-deps --install`"
        ) from None
    try:
        return _follow(proc, command, sink)
    finally:
        procs.finish(proc)  # whatever ended the wait (exit, timeout, interrupt): no process of it is left


def _follow(proc: subprocess.Popen, command: Command, sink: BinaryIO | None) -> subprocess.CompletedProcess:
    tail: deque[str] = deque(maxlen=40)
    out_chunks: list[bytes] = []
    started = time.monotonic()
    readers = []
    # With capture, stdout is data (kept whole) and stderr is the log; otherwise stdout is the log.
    log_stream = proc.stderr if command.capture else proc.stdout
    readers.append(threading.Thread(target=_pump_log, args=(log_stream, sink, tail, command.verbose), daemon=True))
    if command.capture:
        stdout = proc.stdout
        assert stdout is not None
        readers.append(threading.Thread(target=lambda: out_chunks.append(stdout.read()), daemon=True))
    for t in readers:
        t.start()
    if command.input is not None and proc.stdin is not None:
        try:
            proc.stdin.write(command.input)
            proc.stdin.close()
        except BrokenPipeError:
            pass
    _wait(proc, command, started, tail)
    procs.finish(proc)  # the stragglers of its group hold the output pipe: the readers end with them
    for t in readers:
        t.join()
    stdout_data = b"".join(out_chunks) if command.capture else b"".join(s.encode() + b"\n" for s in tail)
    result = subprocess.CompletedProcess(command.argv, proc.returncode, stdout_data, None)
    if command.check and proc.returncode != 0:
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        raise OsbuilderError(f"{command.step}: `{command.argv[0]}` failed ({how})",
                             f"command: {command.shown}\n" + "\n".join(tail))
    return result


def _pump_log(stream, sink, tail: deque, verbose: bool) -> None:
    for raw in iter(stream.readline, b""):
        raw = redact_bytes(raw)
        if sink:
            sink.write(raw)
            sink.flush()
        text = printable(raw.decode(errors="replace").rstrip())  # shown in progress lines and errors
        tail.append(text)
        if verbose:
            print(f"  | {text}", file=sys.stderr, flush=True)


def _wait(proc: subprocess.Popen, command: Command, started: float, tail: deque[str]) -> None:
    next_report = started + PROGRESS_EVERY
    while True:
        if procs.wait(proc, 1.0):
            return
        now = time.monotonic()
        if command.timeout is not None and now - started > command.timeout:
            raise OsbuilderError(f"{command.step}: `{command.argv[0]}` timed out after {seconds(command.timeout)}",
                                 "\n".join(tail))
        if not command.verbose and now >= next_report:
            latest = tail[-1][:100] if tail else ""
            print(f"  {command.step}: {now - started:.0f}s … {latest}", file=sys.stderr, flush=True)
            next_report = now + PROGRESS_EVERY


def user_cache_root(env: Mapping[str, str] | None = None) -> Path:
    """The per-user cache's default place: $XDG_CACHE_HOME/osbuilder, else ~/.cache/osbuilder."""
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
    return Path(base).absolute() / "osbuilder"


SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def with_sbin_on_path() -> None:
    """Add the sbin directories missing from PATH, after the user's own entries: Debian gives ordinary users
    (a login over SSH, a rootless build) a PATH without them, and mke2fs, sfdisk, debugfs and depmod are
    there. Called once by the CLI and the pytest plugin, so every command and check-deps see the same."""
    entries = [e for e in os.environ.get("PATH", "").split(os.pathsep) if e]
    missing = [d for d in SBIN_DIRS if d not in entries and os.path.isdir(d)]
    if missing:
        os.environ["PATH"] = os.pathsep.join([*entries, *missing])


def tool_version(program: str, *args: str) -> str:
    """First line a program prints about its version ('' when it is not installed). Remembered per
    version of the program's file (path, size, times, inode), in this process and on disk
    (tool-versions.json in the default per-user cache), so a cache key asks each program once."""
    found = shutil.which(program)
    if found is None:
        return ""
    st = os.stat(found)
    ident = json.dumps([os.path.realpath(found), args, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    memo = _tool_versions()
    if ident not in memo:
        memo[ident] = _ask_version(program, *args)
        _save_tool_versions(memo)
    return memo[ident]


_TOOL_VERSIONS: dict[str, str] | None = None


def _tool_versions() -> dict[str, str]:
    global _TOOL_VERSIONS
    if _TOOL_VERSIONS is None:
        try:
            loaded = json.loads((user_cache_root() / TOOL_VERSIONS).read_text())
        except (OSError, ValueError):
            loaded = {}
        _TOOL_VERSIONS = {k: v for k, v in loaded.items() if isinstance(v, str)} if isinstance(loaded, dict) else {}
    return _TOOL_VERSIONS


def _save_tool_versions(memo: dict[str, str]) -> None:
    """Best effort: a read-only or missing cache only costs asking again."""
    path = user_cache_root() / TOOL_VERSIONS
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(memo, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def _ask_version(program: str, *args: str) -> str:
    try:
        proc = procs.spawn([program, *(args or ("--version",))], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        return ""
    try:
        stdout, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        return ""
    finally:
        procs.finish(proc)
    text = (stdout or stderr).strip()
    return text.splitlines()[0] if text else ""
