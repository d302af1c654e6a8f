"""Host-side client for the osbuilder guest agent.

Protocol (version 1)
====================

Transport: a byte stream -- the guest's virtio-serial port ``agent.channel.0`` (on the host,
typically a UNIX socket QEMU exposes for the port's chardev). The agent serves one request at
a time, in order.

Framing: one JSON object per line, UTF-8, terminated by ``\\n``. A request line may hold at most
65536 bytes (not counting the newline). Blank lines are ignored (a client may send one to end
any partial garbage line). Replies are single lines too; they contain no raw control
characters.

Requests: a JSON object with ``"cmd"`` (string) and optionally ``"id"`` (any JSON scalar:
string, number, true/false, null). Every reply to a parseable request echoes ``"id"`` verbatim
(numbers keep their exact spelling) as its first member, if the request had one. Unknown
members are ignored.

Ids: the port is one stream that host clients use in turn (QEMU's chardev socket serves one
connection at a time), and the agent answers in order: the reply to a request whose client gave
up or disconnected goes to whoever is connected next. A client therefore uses ids that no other
client of the agent uses and ignores every reply with another id. This client's ids are strings:
a random 64-bit prefix per `AgentClient`, then a counter (``"9f1c03a4b2e6d870-1"``).

Size: a reply is at most about 12 MiB (an exec reply with both streams at their 1 MiB cap, every
byte escaped). This client drops a line longer than 16 MiB (`MAX_REPLY`) without buffering it
and looks at each byte once for the newline, so a guest cannot make it run out of memory or time.

``{"id":1,"cmd":"ping"}``
    -> ``{"id":1,"ok":true,"version":"0.1.0"}``

``{"cmd":"version"}``
    -> ``{"ok":true,"version":"0.1.0","protocol":1,"pid1":false}``
    ``pid1`` is true when the agent runs as the guest's init.

``{"cmd":"exec","argv":["sh","-c","echo hi; exit 3"],"timeout":10,"stdin":"text"}``
    -> ``{"ok":true,"status":3,"signal":null,"stdout":"hi\\n","stderr":"","timed_out":false,"truncated":false}``

    * ``argv``: non-empty array (at most 4096) of strings without NUL; ``argv[0]`` is looked up
      in ``PATH`` (the agent sets a standard PATH when it has none).
    * ``timeout``: seconds, a number in (0, 3600], default 30. ``stdin``: string or null
      (default: the child's stdin is empty). It has to fit in the 64 KiB request line.
    * The child runs in its own process group with default signal dispositions, stdout and
      stderr captured separately. On timeout the whole process group is SIGKILLed:
      ``timed_out`` true, ``status`` null, ``signal`` 9.
    * ``status`` is the exit code (``signal`` null) or null when the child was killed by signal
      ``signal``.
    * After the child exits, output is read until both pipes close, but for at most 0.5 s more
      (a background process keeping stdout open does not hold up the reply; it is not killed).
    * Each stream is capped at 1 MiB (1048576 bytes); ``truncated`` is true if either was cut.
    * Output bytes are decoded as UTF-8; every byte that is not part of a well-formed UTF-8
      sequence becomes U+FFFD (sent as ``\\ufffd``). Control characters are escaped.
    * A program that cannot be executed is not a protocol error: ``ok`` true, ``status`` 127
      (not found) or 126 (other exec failure), and ``stderr`` is
      ``osbuilder-agent: cannot execute '<argv0>': <strerror>\\n``.

``{"cmd":"poweroff"}`` (only when the agent is PID 1)
    -> ``{"ok":true}``, then the agent syncs and calls ``reboot(RB_POWER_OFF)``. Not PID 1:
    an ``ok:false`` error.

Errors: malformed JSON (including invalid UTF-8, unpaired ``\\u`` surrogates, nesting deeper
than 16), a request that is not an object, a missing or non-string ``cmd``, an unknown ``cmd``,
a non-scalar ``id``, members of the wrong type or range, and an over-long line (the rest of it,
up to the newline, is discarded) are answered with
``{"id":<id, only if the request was parsed and had one>,"ok":false,"error":"<message>"}``;
the agent then keeps serving.

Agent command line: ``osbuilder-agent [--port PATH] [--fd N] [--no-mount] [--version]``.
Without ``--port``/``--fd`` it opens ``/dev/virtio-ports/agent.channel.0`` or, without udev,
the ``/dev/vportNpM`` whose ``/sys/class/virtio-ports/*/name`` is ``agent.channel.0``, waiting
for it to appear. While the host side is not connected it backs off and retries. With ``--fd``
EOF means the peer closed and the agent exits 0 (unless it is PID 1). As PID 1 it mounts
/proc, /sys, /dev (devtmpfs) and /run (tmpfs) where nothing is mounted yet (``--no-mount``
skips that), reaps all orphans, forwards SIGTERM/SIGINT/SIGHUP to the running exec child's
process group and never exits.

Readiness: bytes sent before the guest agent has opened its port may be lost, or delivered
late; replies with an id other than the one awaited (and lines that are not JSON objects) are
ignored, so `AgentClient.wait_ready` pings with a short per-try timeout until one is answered.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_LINE = 64 * 1024
MAX_REPLY = 16 * 1024 * 1024  # longest reply line accepted; the agent's longest is about 12 MiB
EXEC_REPLY_MARGIN = 10.0  # seconds allowed on top of an exec timeout for the reply to arrive


class AgentError(Exception):
    """The agent answered ok:false, or the conversation with it failed."""


class AgentTimeout(AgentError, TimeoutError):
    """No reply (or no connection) within the timeout."""


class AgentConnectionClosed(AgentError, ConnectionError):
    """The agent's end of the stream closed."""


@dataclass
class ExecResult:
    status: int | None
    signal: int | None
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.status == 0


class AgentClient:
    """Talks to the agent over a connected stream socket. Not thread-safe."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._scanned = 0  # leading bytes of _buf known to hold no newline
        self._dropping = False  # inside a line longer than MAX_REPLY: discard it up to its newline
        self._id_prefix = secrets.token_hex(8)  # no other client of the agent uses our ids
        self._next_id = 1

    # -- connection ----------------------------------------------------------------------

    @classmethod
    def connect_unix(cls, path: str | Path, timeout: float) -> AgentClient:
        """Connect to a UNIX stream socket, retrying until it exists and accepts or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                sock.connect(str(path))
                return cls(sock)
            except (TimeoutError, FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                if time.monotonic() >= deadline:
                    raise AgentTimeout(f"cannot connect to agent socket {path} within {timeout:g}s: {e}") from None
                time.sleep(0.1)
            except BaseException:
                sock.close()
                raise

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- protocol --------------------------------------------------------------------------

    def request(self, obj: dict[str, Any], timeout: float, *, resync: bool = False) -> dict[str, Any]:
        """Send `obj` with a fresh `id`; return the reply with that id.

        Raises AgentError (ok:false, message from the agent), AgentTimeout, AgentConnectionClosed.
        With `resync`, a newline is sent first to end any partial line the agent may hold.
        """
        req_id = f"{self._id_prefix}-{self._next_id}"
        self._next_id += 1
        line = json.dumps({**obj, "id": req_id}, separators=(",", ":")).encode()
        if len(line) > MAX_LINE:
            raise ValueError(f"request is {len(line)} bytes; the agent accepts at most {MAX_LINE}")
        deadline = time.monotonic() + timeout
        self._send((b"\n" if resync else b"") + line + b"\n", deadline)
        while True:
            raw = self._read_line(deadline)
            try:
                reply = json.loads(raw)
            except ValueError:
                continue  # garbage on the port
            if not isinstance(reply, dict) or reply.get("id") != req_id:
                continue  # a reply to an earlier (timed-out) request, another client's, or to no request
            if reply.get("ok") is not True:
                raise AgentError(str(reply.get("error", f"malformed reply: {raw[:200]!r}")))
            return reply

    def ping(self, timeout: float = 5.0) -> str:
        """The agent's version."""
        return self.request({"cmd": "ping"}, timeout)["version"]

    def version(self, timeout: float = 5.0) -> dict[str, Any]:
        """The version reply: version, protocol, pid1 (plus id and ok)."""
        return self.request({"cmd": "version"}, timeout)

    def exec(self, argv: list[str], timeout: float = 30, stdin: str | None = None) -> ExecResult:
        """Run argv in the guest and wait for it (at most `timeout` seconds there)."""
        req: dict[str, Any] = {"cmd": "exec", "argv": list(argv), "timeout": timeout}
        if stdin is not None:
            req["stdin"] = stdin
        r = self.request(req, timeout + EXEC_REPLY_MARGIN)
        return ExecResult(
            status=r.get("status"),
            signal=r.get("signal"),
            stdout=r.get("stdout", ""),
            stderr=r.get("stderr", ""),
            timed_out=bool(r.get("timed_out")),
            truncated=bool(r.get("truncated")),
        )

    def poweroff(self, timeout: float = 5.0) -> None:
        """Ask an agent running as PID 1 to power the guest off."""
        self.request({"cmd": "poweroff"}, timeout)

    def wait_ready(self, deadline_seconds: float, *, try_timeout: float = 1.0) -> str:
        """Ping until the agent answers; return its version. AgentTimeout after `deadline_seconds`."""
        deadline = time.monotonic() + deadline_seconds
        last: Exception | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentTimeout(f"agent did not answer within {deadline_seconds:g}s (last: {last})")
            try:
                return self.request({"cmd": "ping"}, min(try_timeout, left), resync=True)["version"]
            except AgentConnectionClosed:
                raise
            except AgentError as e:  # timeout, or garbage made the agent reject our line
                last = e

    # -- I/O ---------------------------------------------------------------------------------

    def _send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentTimeout("timed out sending a request to the agent")
            self.sock.settimeout(left)
            try:
                n = self.sock.send(view)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError) as e:
                raise AgentConnectionClosed(f"agent connection closed: {e}") from None
            view = view[n:]

    def _read_line(self, deadline: float) -> bytes:
        """The next line. Each byte is looked at once; a line longer than MAX_REPLY is dropped whole."""
        while True:
            nl = self._buf.find(b"\n", self._scanned)
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                self._scanned = 0
                if not self._dropping:
                    return line
                self._dropping = False
                continue
            self._scanned = len(self._buf)
            if self._dropping or self._scanned > MAX_REPLY:
                self._buf.clear()
                self._scanned = 0
                self._dropping = True
            self._buf += self._recv(deadline)

    def _recv(self, deadline: float) -> bytes:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentTimeout("timed out waiting for the agent's reply")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except ConnectionResetError as e:
                raise AgentConnectionClosed(f"agent connection closed: {e}") from None
            if not chunk:
                raise AgentConnectionClosed("agent connection closed")
            return chunk
