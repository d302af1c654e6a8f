"""Clear Containers 3.x (hyperstart-style): control frames on `sh.hyper.channel.0`, stdio on `.1`.

A control frame is `[u32 BE command][u32 BE total length, the 8-byte header included][payload]`;
payloads are JSON where a command takes one. The tty port carries `[u64 BE session][u32 BE
length incl. the 12-byte header][data]` frames for process stdio (not used here).

What the cc-agent 3.x (clearcontainers/agent at ad0daee, api/commands.go and agent.go) does:

- It opens both ports, then sends READY (8) once on the control port; the write completes when the
  host side is connected. A later connection does not get READY again: use `ping()` then.
- Each command is answered, in order, with ACK (9), carrying the command's reply payload (only
  PSCONTAINER has one), or ERROR (10) with the error text as payload. Replies carry no id.
- Commands it handles: STARTPOD (1), DESTROYPOD (4), EXECCMD (6), READY (8), WINSIZE (11),
  PING (12), NEWCONTAINER (17), KILLCONTAINER (18), REMOVECONTAINER (22), PSCONTAINER (23).
  VERSION (0) has no handler: it is answered ERROR `No callback found for command ""`, so the
  agent's version (main.Version, e.g. 3.0.x-ad0daee) is not available over the protocol.
- It reads a header with one read() and exits when that returns fewer than 8 bytes (systemd then
  restarts it, and it sends READY again), so this client writes each frame with one send().

Replies have no ids: after a command timed out its late reply could be taken for the next one's,
so the client refuses further commands (ProtocolError) until it is reconnected.

Heartbeat: QEMU's virtio-serial chardev can leave bytes the host wrote unread until the next write
(see yamux.py), so while a command waits in silence the client sends a PING every `HEARTBEAT`
seconds. The agent answers in order, so the command's own reply comes first and the ACKs owed for
the heartbeats are dropped as they arrive.
"""

from __future__ import annotations

import enum
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from osbuilder.agent.protocols.errors import ProtocolError, ProtocolTimeout, RemoteError
from osbuilder.agent.protocols.transport import ByteStream, connect_unix

CONTROL_PORT = "sh.hyper.channel.0"
TTY_PORT = "sh.hyper.channel.1"
HEADER = struct.Struct(">II")
HEADER_SIZE = HEADER.size  # 8
MAX_FRAME = 4 << 20  # far beyond any control message (JSON specs, ps output)
HEARTBEAT = 0.2  # seconds of silence while a command waits after which a PING is sent


class Command(enum.IntEnum):
    VERSION = 0
    STARTPOD = 1
    GETPOD_DEPRECATED = 2
    STOPPOD_DEPRECATED = 3
    DESTROYPOD = 4
    RESTARTCONTAINER_DEPRECATED = 5
    EXECCMD = 6
    FINISHCMD_DEPRECATED = 7
    READY = 8
    ACK = 9
    ERROR = 10
    WINSIZE = 11
    PING = 12
    FINISHPOD_DEPRECATED = 13
    NEXT = 14
    WRITEFILE = 15
    READFILE = 16
    NEWCONTAINER = 17
    KILLCONTAINER = 18
    ONLINECPUMEM = 19
    SETUPINTERFACE = 20
    SETUPROUTE = 21
    REMOVECONTAINER = 22
    PSCONTAINER = 23
    PROCESSASYNCEVENT = 24


def command_name(code: int) -> str:
    return Command(code).name if code in Command._value2member_map_ else f"command {code}"


@dataclass(frozen=True)
class Frame:
    command: int
    payload: bytes = b""

    def encode(self) -> bytes:
        size = HEADER_SIZE + len(self.payload)
        if size > MAX_FRAME:
            raise ValueError(f"hyperstart: frame of {size} bytes exceeds {MAX_FRAME}")
        return HEADER.pack(self.command, size) + self.payload

    @property
    def name(self) -> str:
        return command_name(self.command)


class FrameReader:
    """Whole control frames out of a ByteStream; lengths are checked before anything is buffered."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    def read(self, deadline: float) -> Frame:
        self._fill(HEADER_SIZE, deadline)
        command, size = HEADER.unpack(bytes(self.buffer[:HEADER_SIZE]))
        if size < HEADER_SIZE:
            raise ProtocolError(f"hyperstart: {command_name(command)} frame claims {size} bytes, less than its "
                                f"{HEADER_SIZE}-byte header")
        if size > MAX_FRAME:
            raise ProtocolError(f"hyperstart: {command_name(command)} frame of {size} bytes exceeds {MAX_FRAME}")
        self._fill(size, deadline)
        payload = bytes(self.buffer[HEADER_SIZE:size])
        del self.buffer[:size]
        return Frame(command, payload)

    def _fill(self, n: int, deadline: float) -> None:
        while len(self.buffer) < n:
            self.buffer += self.stream.recv(deadline)


class HyperstartClient:
    """A client of the control port (and the holder of the tty port, so the agent's tty reader sees a
    connected host). Owns both streams."""

    def __init__(self, control: ByteStream, tty: ByteStream | None = None) -> None:
        self.control = control
        self.tty = tty
        self.reader = FrameReader(control)
        self.ready_seen = False
        self.out_of_step: str | None = None
        self.heartbeat = HEARTBEAT
        self.heartbeats = 0  # PINGs sent as heartbeats
        self.owed_acks = 0  # ACKs still to come for those PINGs, after the replies before them

    @classmethod
    def connect_unix(cls, control_path: str | Path, tty_path: str | Path | None = None,
                     timeout: float = 5.0) -> HyperstartClient:
        """Connect to QEMU's chardev sockets of the control (and tty) port."""
        control = connect_unix(control_path, timeout)
        try:
            tty = connect_unix(tty_path, timeout) if tty_path is not None else None
        except BaseException:
            control.close()
            raise
        return cls(control, tty)

    def wait_ready(self, deadline_seconds: float) -> float:
        """Wait for the agent's READY; the seconds waited. ProtocolTimeout after `deadline_seconds`;
        ProtocolError for any other frame first (this connection is not the agent's first)."""
        started = time.monotonic()
        deadline = started + deadline_seconds
        while not self.ready_seen:
            try:
                frame = self.reader.read(deadline)
            except ProtocolTimeout:
                raise ProtocolTimeout(f"no READY from the agent on {CONTROL_PORT} within {deadline_seconds:g}s") \
                    from None
            if frame.command != Command.READY:
                raise ProtocolError(f"hyperstart: {frame.name} before READY on {CONTROL_PORT}")
            self.ready_seen = True
        return round(time.monotonic() - started, 3)

    def command(self, command: int, payload: bytes = b"", timeout: float = 5.0) -> bytes:
        """Send one command; the ACK's payload. RemoteError (code "ERROR", the agent's text) for an
        ERROR reply, ProtocolTimeout (then the client is out of step), ProtocolError for another reply."""
        what = f"hyperstart {command_name(command)}"
        if self.out_of_step:
            raise ProtocolError(f"{what}: {self.out_of_step}; reconnect first")
        deadline = time.monotonic() + timeout
        self.control.send(Frame(command, payload).encode(), deadline)
        owed_before = self.owed_acks  # heartbeat ACKs that come before this command's reply
        while True:
            try:
                reply = self._read_with_heartbeat(deadline)
            except ProtocolTimeout:
                self.out_of_step = f"an earlier {command_name(command)} timed out and its reply may still come"
                raise ProtocolTimeout(f"{what}: no reply within {timeout:g}s") from None
            if reply.command == Command.READY and not self.ready_seen:
                self.ready_seen = True  # the agent came up while we waited
                continue
            if owed_before and reply.command == Command.ACK and not reply.payload:
                owed_before -= 1  # an earlier command's heartbeat
                self.owed_acks -= 1
                continue
            if reply.command == Command.ACK:
                return reply.payload
            if reply.command == Command.ERROR:
                raise RemoteError(what, "ERROR", reply.payload.decode(errors="replace"))
            raise ProtocolError(f"{what}: unexpected {reply.name} reply")

    def _read_with_heartbeat(self, deadline: float) -> Frame:
        while True:
            wake = min(deadline, time.monotonic() + self.heartbeat) if self.heartbeat else deadline
            try:
                return self.reader.read(wake)
            except ProtocolTimeout:
                if time.monotonic() >= deadline:
                    raise
                self.control.send(Frame(Command.PING).encode(), deadline)
                self.heartbeats += 1
                self.owed_acks += 1

    def ping(self, timeout: float = 5.0) -> float:
        """PING -> ACK; the round-trip time in seconds."""
        started = time.monotonic()
        self.command(Command.PING, timeout=timeout)
        return time.monotonic() - started

    def version(self, timeout: float = 5.0) -> str:
        """VERSION's reply payload. The cc-agent 3.x has no VERSION handler: RemoteError ERROR
        'No callback found for command ""'."""
        return self.command(Command.VERSION, timeout=timeout).decode(errors="replace")

    def close(self) -> None:
        self.control.close()
        if self.tty is not None:
            self.tty.close()

    def __enter__(self) -> HyperstartClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
