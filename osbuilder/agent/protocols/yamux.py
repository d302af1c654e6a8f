"""A small yamux client session (protocol version 0, as hashicorp/yamux speaks it) over a ByteStream.

Frames are a 12-byte header, big-endian:

    version u8 (0) | type u8 | flags u16 | stream id u32 | length u32

then, for Data frames only, `length` bytes of payload. Types: Data (0), WindowUpdate (1: `length`
is a credit in bytes), Ping (2: `length` is an opaque value echoed back), GoAway (3: `length` is a
reason: 0 normal, 1 protocol error, 2 internal error). Flags: SYN opens a stream, ACK accepts it,
FIN half-closes it, RST resets it. A client's streams have odd ids.

Flow control: each direction of a stream starts with a 256 KiB window; a sender never has more
unacknowledged bytes in flight, and the receiver grants more with WindowUpdate frames as it
consumes (here: once half the window has been consumed, as hashicorp/yamux does).

Heartbeat (optional, `Session(heartbeat=seconds, quiet_heartbeat=seconds)`): while a caller waits
and nothing arrives for that long (`quiet_heartbeat` until the peer's first byte), a Ping is sent,
and one when the peer's first byte arrives. Over QEMU's virtio-serial chardev, bytes the host wrote
can sit unread in QEMU until the next write wakes it (seen here with the Kata 1.x agent under load:
about 1 call in 20 unanswered until something else was written, most often right when the guest
opened the port and QEMU started reading what was queued; kata-proxy worked around the same hang
with a heartbeat, kata-containers/proxy#91).

Single-threaded: frames are read only while a caller waits (`Stream.recv`, `Stream.send` waiting
for window, `Session.ping`), each read bounded by the caller's deadline; frames for other streams
are buffered on those streams (never more than their window), frames for streams we no longer
know are discarded, Pings are answered, a GoAway is recorded (and, unless normal, ends the
session). The peer may not open streams: a SYN from it is answered with RST.
"""

from __future__ import annotations

import enum
import struct
import time
from dataclasses import dataclass

from osbuilder.agent.protocols.errors import ProtocolClosed, ProtocolError, ProtocolTimeout
from osbuilder.agent.protocols.transport import ByteStream

VERSION = 0
HEADER = struct.Struct(">BBHII")
HEADER_SIZE = HEADER.size  # 12
INITIAL_WINDOW = 256 * 1024
MAX_DATA_FRAME = INITIAL_WINDOW  # no peer may send more than a stream's window in one frame
CONTROL_TIMEOUT = 2.0  # seconds allowed for a best-effort control frame (FIN, RST, GoAway)


class FrameType(enum.IntEnum):
    DATA = 0
    WINDOW_UPDATE = 1
    PING = 2
    GO_AWAY = 3


class Flag(enum.IntFlag):
    NONE = 0
    SYN = 1
    ACK = 2
    FIN = 4
    RST = 8


GO_AWAY_REASONS = {0: "normal", 1: "protocol error", 2: "internal error"}


@dataclass(frozen=True)
class Header:
    """One frame header."""

    type: FrameType
    flags: Flag
    stream_id: int
    length: int
    version: int = VERSION

    def encode(self) -> bytes:
        return HEADER.pack(self.version, self.type, self.flags, self.stream_id, self.length)

    @classmethod
    def decode(cls, raw: bytes) -> Header:
        """A header from exactly 12 bytes; ProtocolError for another size, version or type."""
        if len(raw) != HEADER_SIZE:
            raise ProtocolError(f"yamux: truncated frame header ({len(raw)} of {HEADER_SIZE} bytes)")
        version, kind, flags, stream_id, length = HEADER.unpack(raw)
        if version != VERSION:
            raise ProtocolError(f"yamux: frame with protocol version {version} (expected {VERSION}): "
                                f"not a yamux peer, or out of step (header {raw.hex()})")
        if kind not in FrameType._value2member_map_:
            raise ProtocolError(f"yamux: unknown frame type {kind} (header {raw.hex()})")
        return cls(FrameType(kind), Flag(flags), stream_id, length, version)


def frame(kind: FrameType, flags: Flag, stream_id: int, length: int, payload: bytes = b"") -> bytes:
    return Header(kind, flags, stream_id, length).encode() + payload


class Stream:
    """One yamux stream we opened; a ByteStream for the layer above (gRPC)."""

    def __init__(self, session: Session, stream_id: int) -> None:
        self.session = session
        self.id = stream_id
        self.buffer = bytearray()
        self.recv_window = INITIAL_WINDOW  # credit the peer still has towards us
        self.send_window = INITIAL_WINDOW  # credit we still have towards the peer
        self.acked = False
        self.remote_closed = False  # FIN received
        self.local_closed = False  # FIN sent
        self.reset_by_peer = False

    def send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            self._check_open()
            if self.local_closed:
                raise ProtocolClosed(f"yamux: stream {self.id} already closed by us")
            if self.send_window == 0:
                self.session.pump(deadline, f"a window update on yamux stream {self.id}")
                continue
            n = min(self.send_window, len(view))
            self.session.write(frame(FrameType.DATA, Flag.NONE, self.id, n, bytes(view[:n])), deadline)
            self.send_window -= n
            view = view[n:]

    def recv(self, deadline: float) -> bytes:
        while not self.buffer:
            self._check_open()
            if self.remote_closed:
                raise ProtocolClosed(f"yamux: stream {self.id} closed by the peer (FIN)")
            self.session.pump(deadline, f"data on yamux stream {self.id}")
        data = bytes(self.buffer)
        self.buffer.clear()
        self._grant(deadline)
        return data

    def _grant(self, deadline: float) -> None:
        """Give the peer back the credit we consumed, once it is half the window."""
        delta = INITIAL_WINDOW - len(self.buffer) - self.recv_window
        if delta >= INITIAL_WINDOW // 2 and not self.reset_by_peer and not self.session.ended:
            self.recv_window += delta
            self.session.write(frame(FrameType.WINDOW_UPDATE, Flag.NONE, self.id, delta), deadline)

    def _check_open(self) -> None:
        if self.reset_by_peer:
            raise ProtocolClosed(f"yamux: stream {self.id} reset by the peer")
        self.session.check_alive()

    def close(self) -> None:
        """Half-close (FIN) if still open, best effort; the session forgets the stream."""
        if not (self.local_closed or self.reset_by_peer or self.session.ended):
            self.local_closed = True
            self.session.write_best_effort(frame(FrameType.WINDOW_UPDATE, Flag.FIN, self.id, 0))
        self.session.forget(self.id)

    def reset(self) -> None:
        """Abandon the stream (RST), e.g. after a timeout; late frames for it are discarded."""
        if not (self.reset_by_peer or self.session.ended):
            self.local_closed = True
            self.session.write_best_effort(frame(FrameType.WINDOW_UPDATE, Flag.RST, self.id, 0))
        self.session.forget(self.id)


class Session:
    """The client side of a yamux session over `transport` (which it owns and closes)."""

    def __init__(self, transport: ByteStream, first_stream_id: int = 1, heartbeat: float | None = None,
                 quiet_heartbeat: float | None = None) -> None:
        if first_stream_id % 2 != 1:
            raise ValueError("a yamux client's stream ids are odd")
        self.transport = transport
        self.heartbeat = heartbeat  # seconds of silence while waiting after which a Ping is sent
        self.quiet_heartbeat = quiet_heartbeat  # ... while the peer has not sent a byte yet
        self.heartbeats = 0  # heartbeat Pings sent
        self.next_stream_id = first_stream_id
        self.streams: dict[int, Stream] = {}
        self.inbuf = bytearray()
        self.remote_go_away: int | None = None  # the reason of a GoAway received
        self.ended: str | None = None  # why the session can no longer be used
        self.pings_answered = 0  # Pings from the peer we answered
        self._ping_acks: set[int] = set()
        self._heartbeat_ids: set[int] = set()
        self._next_ping = 1
        self.discarded = 0  # bytes of data for streams we no longer know
        self.received = 0  # bytes received from the peer: 0 until it has said anything at all
        self.first_received_at: float | None = None  # time.monotonic() of its first byte

    # -- streams -----------------------------------------------------------------------------

    def open_stream(self, deadline: float) -> Stream:
        """A new stream (WindowUpdate with SYN, no extra credit: the peer's window starts at 256 KiB)."""
        self.check_alive()
        if self.remote_go_away is not None:
            raise ProtocolClosed(f"yamux: the peer refuses new streams (go away: "
                                 f"{GO_AWAY_REASONS.get(self.remote_go_away, self.remote_go_away)})")
        if self.next_stream_id >= 0xFFFFFFFF:
            raise ProtocolError("yamux: stream ids exhausted")
        stream = Stream(self, self.next_stream_id)
        self.next_stream_id += 2
        self.streams[stream.id] = stream
        self.write(frame(FrameType.WINDOW_UPDATE, Flag.SYN, stream.id, 0), deadline)
        return stream

    def forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)

    # -- session-level -----------------------------------------------------------------------

    def ping(self, deadline: float) -> float:
        """Round-trip time of a Ping (SYN) until its ACK."""
        opaque = self._next_ping
        self._next_ping = (self._next_ping + 1) & 0xFFFFFFFF
        started = time.monotonic()
        self.write(frame(FrameType.PING, Flag.SYN, 0, opaque), deadline)
        while opaque not in self._ping_acks:
            self.pump(deadline, "a yamux ping reply")
        self._ping_acks.discard(opaque)
        return time.monotonic() - started

    def _send_heartbeat(self) -> None:
        """A Ping nobody waits for (its ACK is dropped): bytes on the wire while we wait (see `heartbeat`)."""
        opaque = self._next_ping
        self._next_ping = (self._next_ping + 1) & 0xFFFFFFFF
        self._heartbeat_ids.add(opaque)
        self.write_best_effort(frame(FrameType.PING, Flag.SYN, 0, opaque))
        self.heartbeats += 1

    def check_alive(self) -> None:
        if self.ended:
            raise ProtocolClosed(f"yamux: session ended: {self.ended}")

    def close(self) -> None:
        """GoAway (normal), best effort, then close the transport."""
        if not self.ended:
            self.write_best_effort(frame(FrameType.GO_AWAY, Flag.NONE, 0, 0))
            self.ended = "closed by us"
        self.transport.close()

    # -- I/O -----------------------------------------------------------------------------------

    def write(self, data: bytes, deadline: float) -> None:
        self.check_alive()
        try:
            self.transport.send(data, deadline)
        except ProtocolClosed as e:
            self.ended = str(e)
            raise

    def write_best_effort(self, data: bytes) -> None:
        try:
            self.transport.send(data, time.monotonic() + CONTROL_TIMEOUT)
        except ProtocolError:
            pass

    def _fill(self, n: int, deadline: float, what: str) -> None:
        """Wait until `inbuf` holds `n` bytes, sending a heartbeat Ping after each `heartbeat` seconds
        of silence. Nothing is consumed, so a timeout leaves the session in step."""
        while len(self.inbuf) < n:
            beat = self.heartbeat if self.received else self.quiet_heartbeat
            wake = min(deadline, time.monotonic() + beat) if beat else deadline
            try:
                chunk = self.transport.recv(wake)
                if self.first_received_at is None:
                    self.first_received_at = time.monotonic()
                    if self.heartbeat:  # the peer just came up: what we queued before may be stuck
                        self._send_heartbeat()
                self.received += len(chunk)
                self.inbuf += chunk
            except ProtocolTimeout:
                if time.monotonic() >= deadline:
                    raise ProtocolTimeout(f"yamux: timed out waiting for {what}") from None
                self._send_heartbeat()
            except ProtocolClosed as e:
                self.ended = str(e)
                raise ProtocolClosed(f"yamux: connection closed while waiting for {what}: {e}") from None

    def pump(self, deadline: float, what: str = "a yamux frame") -> None:
        """Read and handle one whole frame (ProtocolTimeout at `deadline`, naming `what`). A frame is
        taken from the buffer only once complete (at most 12 bytes + the 256 KiB window)."""
        self.check_alive()
        try:
            self._fill(HEADER_SIZE, deadline, what)
            header = Header.decode(bytes(self.inbuf[:HEADER_SIZE]))
            if header.type is FrameType.DATA and header.length > MAX_DATA_FRAME:
                raise ProtocolError(f"yamux: data frame of {header.length} bytes on stream {header.stream_id} "
                                    f"exceeds the {MAX_DATA_FRAME}-byte window")
            size = HEADER_SIZE + (header.length if header.type is FrameType.DATA else 0)
            self._fill(size, deadline, what)
            payload = bytes(self.inbuf[HEADER_SIZE:size])
            del self.inbuf[:size]
            self._handle(header, payload, deadline)
        except (ProtocolClosed, ProtocolTimeout):
            raise
        except ProtocolError as e:
            self.ended = str(e)  # out of step with the peer: the session is unusable
            raise

    def _handle(self, h: Header, payload: bytes, deadline: float) -> None:
        if h.type is FrameType.PING:
            if h.flags & Flag.SYN:
                self.write(frame(FrameType.PING, Flag.ACK, 0, h.length), deadline)
                self.pings_answered += 1
            elif h.flags & Flag.ACK:
                if h.length in self._heartbeat_ids:
                    self._heartbeat_ids.discard(h.length)
                else:
                    self._ping_acks.add(h.length)
            return
        if h.type is FrameType.GO_AWAY:
            self.remote_go_away = h.length
            if h.length != 0:
                self.ended = f"the peer sent go away ({GO_AWAY_REASONS.get(h.length, f'reason {h.length}')})"
                raise ProtocolClosed(f"yamux: {self.ended}")
            return
        stream = self.streams.get(h.stream_id)
        if stream is None:
            if h.flags & Flag.SYN:  # the peer opening a stream: we accept none
                self.write_best_effort(frame(FrameType.WINDOW_UPDATE, Flag.RST, h.stream_id, 0))
            self.discarded += len(payload)
            return
        if h.flags & Flag.ACK:
            stream.acked = True
        if h.flags & Flag.RST:
            stream.reset_by_peer = True
        if h.flags & Flag.FIN:
            stream.remote_closed = True
        if h.type is FrameType.WINDOW_UPDATE:
            stream.send_window += h.length
            return
        if h.length > stream.recv_window:
            raise ProtocolError(f"yamux: the peer sent {h.length} bytes on stream {stream.id} with only "
                                f"{stream.recv_window} bytes of window left")
        stream.buffer += payload
        stream.recv_window -= h.length
