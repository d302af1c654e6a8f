"""Kata Containers 1.x: gRPC on yamux streams over the virtio-serial port `agent.channel.0`.

The agent opens the port, waits until the host side is connected, then runs a yamux server
(version 0, keepalive off) on it and serves gRPC (`grpc.Health`, `grpc.AgentService`) on every
stream the host opens. Any byte that is not yamux (a JSON line, say) is a protocol error: the agent
drops the session, closes and reopens the port and serves a fresh session. So this client speaks
yamux from its first byte.

Each call opens a new yamux stream (odd ids, never reused while the client lives, not even across
reconnections: an agent session that missed our reconnect must not see a duplicate id) and runs
one HTTP/2 connection with one gRPC call on it, then half-closes the stream.

Heartbeat: QEMU's virtio-serial chardev sometimes leaves bytes the host wrote unread until the next
write wakes it (measured with the real agent under load: about 1 call in 20 unanswered, its stream
never even acknowledged; the same hang kata-proxy worked around with a heartbeat). It happens most
right after the guest opens the port, when QEMU starts reading what the client queued. So the
session sends a yamux Ping when the agent's first byte arrives and, while a call waits, after each
0.1 s of silence (`HEARTBEAT`); before the agent has said anything, one per second
(`QUIET_HEARTBEAT`). The agent answers Pings even with keepalive off.

Readiness (`wait_ready`): QEMU does not read the host side of a port until the guest has opened it,
so bytes sent early wait in the socket (measured: the agent, once up, reads and answers them). So
`wait_ready` sends one Check and keeps it while the agent has said nothing at all: every further
Check queued unread behind it would only be one more HTTP/2 connection for the agent to set up and
tear down when it starts (measured: 8 abandoned tries cost it about 0.3 s). The quiet heartbeat
covers a first try that was lost (a guest that opens and closes the port may discard what it had
buffered): the agent answers the Pings sent after it, and from its first byte on, a try unanswered
for `try_timeout` is abandoned (RST) and another sent. After a session-level failure (a GoAway, a
frame out of step, the socket closed) it reconnects for a fresh session on both sides. It returns
how long it took and how many tries and sessions it used. The try in flight lives across
`wait_ready` calls (a caller may wait in short slices to watch the console between them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from osbuilder.agent.protocols import health
from osbuilder.agent.protocols.errors import ProtocolError, ProtocolTimeout
from osbuilder.agent.protocols.grpc import GrpcConnection
from osbuilder.agent.protocols.transport import ByteStream, connect_unix
from osbuilder.agent.protocols.yamux import Session, Stream

PORT_NAME = "agent.channel.0"
HEARTBEAT = 0.1  # seconds of silence while waiting for an answer after which a yamux Ping is sent
QUIET_HEARTBEAT = 1.0  # ... while the agent has not said a word yet


@dataclass(frozen=True)
class ReadyResult:
    """What `wait_ready` saw: seconds from its call to SERVING, the Check tries it sent (0 when the
    answer was to a try an earlier call sent; `Kata1Client.tries` counts them all), and the yamux
    sessions it used."""

    seconds: float
    tries: int
    sessions: int
    status: str = health.SERVING
    answered_at: float | None = None  # time.monotonic() when the agent's answer (its headers) arrived


@dataclass
class PendingTry:
    """A Check sent by wait_ready and not yet answered; abandoned (RST) at `until`."""

    session: Session
    stream: Stream
    conn: GrpcConnection
    sid: int
    until: float


class Kata1Client:
    """A Kata 1.x agent client. `connect` makes a fresh byte stream to the port (given a timeout)."""

    def __init__(self, connect: Callable[[float], ByteStream], name: str = PORT_NAME) -> None:
        self.connect = connect
        self.name = name
        self.session: Session | None = None
        self.next_stream_id = 1
        self.sessions = 0  # yamux sessions (connections) made so far
        self.tries = 0  # Check calls made by wait_ready so far
        self.pending: PendingTry | None = None  # wait_ready's Check in flight (kept across its calls)
        self.last_answered_at: float | None = None  # when wait_ready's last answer began to arrive

    @classmethod
    def connect_unix(cls, path: str | Path, timeout: float) -> Kata1Client:
        """A client for the port behind QEMU's chardev socket `path`, connected now (ProtocolTimeout
        if the socket does not accept within `timeout`)."""
        client = cls(lambda t: connect_unix(path, t), f"{PORT_NAME} ({path})")
        client._session(time.monotonic() + timeout)
        return client

    # -- calls ---------------------------------------------------------------------------------

    def call(self, method: str, request: bytes, timeout: float) -> bytes:
        """One unary gRPC call (`method` is the :path, /pkg.Service/Method) on a new yamux stream.
        RemoteError, ProtocolTimeout, ProtocolClosed, ProtocolError as grpc.GrpcConnection.call."""
        deadline = time.monotonic() + timeout
        session = self._session(deadline)
        stream = session.open_stream(deadline)
        self.next_stream_id = session.next_stream_id
        conn = GrpcConnection(stream)
        try:
            answer = conn.call(method, request, max(0.001, deadline - time.monotonic()))
        except ProtocolTimeout:
            stream.reset()  # its late answer, if any, is discarded
            raise
        except ProtocolError:
            if session.ended:
                self._drop_session()
            else:
                stream.reset()
            raise
        stream.close()
        return answer

    def check(self, timeout: float = 5.0) -> str:
        """grpc.Health/Check: "SERVING" from a healthy agent."""
        return health.serving_status(self.call(health.grpc_path(health.CHECK), health.check_request(), timeout))

    def version(self, timeout: float = 5.0) -> tuple[str, str]:
        """grpc.Health/Version: (grpc_version, agent_version), e.g. ("0.0.1", "1.13.0-alpha0-0b75b2d")."""
        return health.versions(self.call(health.grpc_path(health.VERSION), health.check_request(), timeout))

    def ping(self, timeout: float = 5.0) -> float:
        """A yamux Ping's round-trip time in seconds (the agent answers Pings even with keepalive off)."""
        return self._session(time.monotonic() + timeout).ping(time.monotonic() + timeout)

    def wait_ready(self, deadline_seconds: float, *, try_timeout: float = 1.0) -> ReadyResult:
        """Call Check until it answers SERVING; ProtocolTimeout after `deadline_seconds` naming the
        last failure. Safe to call again after a timeout: the session and the Check in flight are kept."""
        started = time.monotonic()
        deadline = started + deadline_seconds
        sessions_before = self.sessions - (self.session is not None)  # the open session counts as used
        tries_before = self.tries
        last: Exception | None = None
        while True:
            if time.monotonic() >= deadline:
                raise ProtocolTimeout(f"the Kata agent on {self.name} did not answer grpc.Health/Check within "
                                      f"{deadline_seconds:g}s ({self.tries - tries_before} tries; last: {last})")
            try:
                status = self._try_check(try_timeout, deadline)
            except ProtocolTimeout as e:
                last = e
                continue
            except ProtocolError as e:  # closed, go away, out of step: a fresh session next try
                last = e
                self._drop_session()
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                continue
            if status == health.SERVING:
                return ReadyResult(round(time.monotonic() - started, 3), self.tries - tries_before,
                                   self.sessions - sessions_before, answered_at=self.last_answered_at)
            last = ProtocolError(f"grpc.Health/Check answered {status}")

    def _try_check(self, try_timeout: float, deadline: float) -> str:
        """Go on waiting for the Check in flight (or send one) until it is answered, until `deadline`
        (the try stays pending), or until the try's own time is up (it is abandoned). A try's time
        starts only once the agent has said something on the session: before that it is queued unread."""
        p = self.pending
        if p is not None and p.session is not self.session:
            self.pending = p = None
        if p is None:
            self.tries += 1
            session = self._session(deadline)
            stream = session.open_stream(deadline)
            self.next_stream_id = session.next_stream_id
            conn = GrpcConnection(stream)
            sid = conn.start(health.grpc_path(health.CHECK), health.check_request(), deadline)
            p = self.pending = PendingTry(session, stream, conn, sid, time.monotonic() + try_timeout)
        try:
            answer = p.conn.finish(p.sid, min(deadline, self._try_end(p, try_timeout)))
        except ProtocolTimeout:
            if time.monotonic() >= self._try_end(p, try_timeout):  # the try's own time is up: abandon it
                self.pending = None
                p.stream.reset()
            raise
        except ProtocolError:
            self.pending = None
            if not p.session.ended:
                p.stream.reset()
            raise
        self.pending = None
        self.last_answered_at = p.conn.last_answered_at
        p.stream.close()
        return health.serving_status(answer)

    @staticmethod
    def _try_end(p: PendingTry, try_timeout: float) -> float:
        """When a try is abandoned: `try_timeout` after it was sent or after the agent's first byte on
        the session, whichever is later; never while the agent has not said a word."""
        heard = p.session.first_received_at
        return float("inf") if heard is None else max(p.until, heard + try_timeout)

    # -- session -------------------------------------------------------------------------------

    def _session(self, deadline: float) -> Session:
        if self.session is not None and self.session.ended:
            self._drop_session()
        if self.session is None:
            transport = self.connect(max(0.05, deadline - time.monotonic()))
            self.session = Session(transport, first_stream_id=self.next_stream_id, heartbeat=HEARTBEAT,
                                   quiet_heartbeat=QUIET_HEARTBEAT)
            self.sessions += 1
        return self.session

    def _drop_session(self) -> None:
        if self.session is not None:
            self.next_stream_id = self.session.next_stream_id
            self.session.close()
            self.session = None

    def close(self) -> None:
        self._drop_session()

    def __enter__(self) -> Kata1Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

