"""The one way osbuilder runs a subprocess.

`run()` logs the exact command line (credentials in URLs shown as ***, in the log file too),
appends all output to the step's log file, shows progress
on stderr while a long command runs, and turns a failure into an `OsbuilderError` whose message
names the step and whose detail is the tail of the command's output. Every command runs in a
process group of its own that never outlives osbuilder (procs.py).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from osbuilder import procs
from osbuilder.errors import OsbuilderError, seconds
from osbuilder.terminal import printable

log = logging.getLogger("osbuilder")

PROGRESS_EVERY = 10.0  # seconds between "still running" lines for long commands


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
    line = redact(format_command(argv))  # what is shown and logged; the program gets the real argv
    log.info("%s: + %s", step, line)
    if logfile:
        logfile.parent.mkdir(parents=True, exist_ok=True)
    sink = open(logfile, "ab") if logfile else None
    try:
        if sink:
            sink.write(f"+ {line}\n".encode())
            sink.flush()
        return _run(argv, line, step, sink, cwd, env, input, capture, timeout, check, verbose)
    finally:
        if sink:
            sink.close()


def _run(argv, line, step, sink, cwd, env, input, capture, timeout, check, verbose):
    full_env = None if env is None else {**os.environ, **env}
    try:
        proc = procs.spawn(
            argv,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if capture else subprocess.STDOUT,
        )
    except FileNotFoundError:
        raise OsbuilderError(
            f"{step}: program '{argv[0]}' not found; run `osbuilder check-deps --install`"
        ) from None
    try:
        return _follow(proc, argv, line, step, sink, input, capture, timeout, check, verbose)
    finally:
        procs.finish(proc)  # whatever ended the wait (exit, timeout, interrupt): no process of it is left


def _follow(proc, argv, line, step, sink, input, capture, timeout, check, verbose):
    tail: deque[str] = deque(maxlen=40)
    out_chunks: list[bytes] = []
    started = time.monotonic()
    readers = []
    # With capture, stdout is data (kept whole) and stderr is the log; otherwise stdout is the log.
    log_stream = proc.stderr if capture else proc.stdout
    readers.append(threading.Thread(target=_pump_log, args=(log_stream, sink, tail, verbose), daemon=True))
    if capture:
        readers.append(threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True))
    for t in readers:
        t.start()
    if input is not None:
        try:
            proc.stdin.write(input)
            proc.stdin.close()
        except BrokenPipeError:
            pass
    _wait(proc, step, started, tail, timeout, verbose)
    procs.finish(proc)  # the stragglers of its group hold the output pipe: the readers end with them
    for t in readers:
        t.join()
    stdout = b"".join(out_chunks) if capture else b"".join(s.encode() + b"\n" for s in tail)
    result = subprocess.CompletedProcess(argv, proc.returncode, stdout, None)
    if check and proc.returncode != 0:
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        raise OsbuilderError(f"{step}: `{argv[0]}` failed ({how})", f"command: {line}\n" + "\n".join(tail))
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


def _wait(proc, step, started, tail, timeout, verbose) -> None:
    next_report = started + PROGRESS_EVERY
    while True:
        if procs.wait(proc, 1.0):
            return
        now = time.monotonic()
        if timeout is not None and now - started > timeout:
            raise OsbuilderError(
                f"{step}: `{proc.args[0]}` timed out after {seconds(timeout)}", "\n".join(tail)
            )
        if not verbose and now >= next_report:
            latest = tail[-1][:100] if tail else ""
            print(f"  {step}: {now - started:.0f}s … {latest}", file=sys.stderr, flush=True)
            next_report = now + PROGRESS_EVERY


def tool_version(program: str, *args: str) -> str:
    """First line a program prints about its version ('' when it is not installed)."""
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
