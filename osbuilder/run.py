"""The one way osbuilder runs a subprocess.

`run()` logs the exact command line, appends all output to the step's log file, shows progress
on stderr while a long command runs, and turns a failure into an `OsbuilderError` whose message
names the step and whose detail is the tail of the command's output.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from osbuilder.errors import OsbuilderError

log = logging.getLogger("osbuilder")

PROGRESS_EVERY = 10.0  # seconds between "still running" lines for long commands


def format_command(cmd: Sequence[str | os.PathLike]) -> str:
    return shlex.join(str(c) for c in cmd)


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
    line = format_command(argv)
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
        proc = subprocess.Popen(
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
        if sink:
            sink.write(raw)
            sink.flush()
        text = raw.decode(errors="replace").rstrip()
        tail.append(text)
        if verbose:
            print(f"  | {text}", file=sys.stderr, flush=True)


def _wait(proc, step, started, tail, timeout, verbose) -> None:
    next_report = started + PROGRESS_EVERY
    while True:
        try:
            proc.wait(timeout=1.0)
            return
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if timeout is not None and now - started > timeout:
            proc.kill()
            proc.wait()
            raise OsbuilderError(
                f"{step}: `{proc.args[0]}` timed out after {timeout:.0f}s", "\n".join(tail)
            )
        if not verbose and now >= next_report:
            latest = tail[-1][:100] if tail else ""
            print(f"  {step}: {now - started:.0f}s … {latest}", file=sys.stderr, flush=True)
            next_report = now + PROGRESS_EVERY


def tool_version(program: str, *args: str) -> str:
    """First line a program prints about its version ('' when it is not installed)."""
    try:
        out = subprocess.run(
            [program, *(args or ("--version",))], capture_output=True, text=True, timeout=30
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return ""
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else ""
