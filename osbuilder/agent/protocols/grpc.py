"""Unary gRPC calls over HTTP/2 on any ByteStream (a yamux stream, a socket), with the h2 library.

A call: the client's HTTP/2 preface and SETTINGS (once per connection), a HEADERS frame
(`:method POST`, `:scheme http`, `:path /pkg.Service/Method`, `:authority`, `content-type:
application/grpc`, `te: trailers`), a DATA frame with END_STREAM holding the request message
behind gRPC's 5-byte prefix (compressed flag 0, u32 big-endian length). The answer: response
HEADERS (`:status 200`), DATA with the prefixed response message, and trailers with `grpc-status`
(0 is OK) and `grpc-message` (percent-encoded); a "trailers-only" answer carries the status in its
only HEADERS frame. A non-zero status is a RemoteError naming the method, the status and the message.

Bounded: each HTTP/2 frame header is screened as it arrives, before h2 buffers the frame: the
peer's first frame must be SETTINGS (so a peer that is not an HTTP/2 server fails at once) and no
frame may exceed the 16 KiB frame size we advertise; a response message may be at most
`max_message` bytes (default 4 MiB, gRPC's own default); the connection's and stream's
flow-control windows are replenished as data is consumed.
`call` is `start` then `finish`; a `finish` that timed out may be called again (the call stays
pending), so a caller can wait for one call across several short waits. Frames of streams we gave
up on are ignored.
"""

from __future__ import annotations

import time
import urllib.parse
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from osbuilder.agent.protocols.errors import ProtocolClosed, ProtocolError, RemoteError
from osbuilder.agent.protocols.transport import ByteStream

MAX_MESSAGE = 4 * 1024 * 1024
PREFIX_SIZE = 5

STATUS_NAMES = {0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
                5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
                9: "FAILED_PRECONDITION", 10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED",
                13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED"}


def status_name(code: int) -> str:
    return STATUS_NAMES.get(code, str(code))


def frame_message(message: bytes) -> bytes:
    """gRPC's length-prefixed message: flag 0 (not compressed), u32 big-endian length, the bytes."""
    return b"\0" + len(message).to_bytes(4, "big") + message


def unframe_message(body: bytes, what: str) -> bytes:
    """The one message of a unary response body; ProtocolError if it is not exactly one."""
    if len(body) < PREFIX_SIZE:
        raise ProtocolError(f"{what}: response body of {len(body)} bytes has no 5-byte gRPC message prefix")
    if body[0] != 0:
        raise ProtocolError(f"{what}: compressed response (flag {body[0]}), but no compression was offered")
    length = int.from_bytes(body[1:5], "big")
    if length != len(body) - PREFIX_SIZE:
        raise ProtocolError(f"{what}: message prefix says {length} bytes, the body holds {len(body) - PREFIX_SIZE}")
    return body[PREFIX_SIZE:]


@dataclass
class Call:
    """One call's answer as it arrives."""

    what: str
    headers: dict[str, str] = field(default_factory=dict)
    trailers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    answered_at: float | None = None  # time.monotonic() when the response headers arrived


class GrpcConnection:
    """An HTTP/2 client connection on `stream` (which it owns and closes)."""

    def __init__(self, stream: ByteStream, authority: str = "localhost", max_message: int = MAX_MESSAGE) -> None:
        self.stream = stream
        self.authority = authority
        self.max_message = max_message
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.h2.initiate_connection()  # preface + SETTINGS: sent with the first call, in one write
        self._header = bytearray()  # the part of the next frame header received so far
        self._skip = 0  # bytes of the current frame's payload still to come
        self._first_frame = True
        self.calls: dict[int, Call] = {}  # calls started and not yet finished, by stream id
        self.last_answered_at: float | None = None  # when the last finished call's response began

    def call(self, path: str, request: bytes, timeout: float) -> bytes:
        """Call method `path` (/pkg.Service/Method) with an encoded request; the encoded response.

        RemoteError for a non-zero grpc-status, ProtocolTimeout after `timeout` seconds,
        ProtocolClosed if the connection or the call's stream is closed or reset, ProtocolError for
        a malformed or oversized answer."""
        deadline = time.monotonic() + timeout
        return self.finish(self.start(path, request, deadline), deadline)

    def start(self, path: str, request: bytes, deadline: float) -> int:
        """Send a call; its HTTP/2 stream id, for `finish`."""
        what = f"gRPC {path}"
        body = frame_message(request)
        try:
            sid = self.h2.get_next_available_stream_id()
            self.h2.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", path),
                                       (":authority", self.authority), ("content-type", "application/grpc"),
                                       ("te", "trailers")])
            if len(body) > self.h2.local_flow_control_window(sid):
                raise ValueError(f"{what}: request of {len(body)} bytes exceeds the peer's flow-control window")
            size = self.h2.max_outbound_frame_size
            for i in range(0, len(body), size):
                self.h2.send_data(sid, body[i:i + size], end_stream=i + size >= len(body))
        except h2.exceptions.H2Error as e:
            raise ProtocolError(f"{what}: cannot send: {e}") from None
        self.calls[sid] = Call(what)
        self.stream.send(self.h2.data_to_send(), deadline)
        return sid

    def finish(self, sid: int, deadline: float) -> bytes:
        """The answer to the call `start` sent on stream `sid`. A ProtocolTimeout leaves the call
        pending: `finish` may be called again to go on waiting."""
        call = self.calls[sid]
        while not call.ended:
            data = self.stream.recv(deadline)
            self._screen(data, call.what)
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.H2Error as e:
                raise ProtocolError(f"{call.what}: HTTP/2 protocol error from the peer: {e}") from None
            for ev in events:
                self._event(ev, deadline)
            pending = self.h2.data_to_send()  # SETTINGS ACK, PING ACK, WINDOW_UPDATE
            if pending:
                self.stream.send(pending, deadline)
        del self.calls[sid]
        self.last_answered_at = call.answered_at
        return self._result(call.what, call.headers, call.trailers, bytes(call.body))

    def _event(self, ev: h2.events.Event, deadline: float) -> None:
        if isinstance(ev, h2.events.ConnectionTerminated):
            waiting = [c for c in self.calls.values() if not c.ended]
            if waiting:
                extra = f" ({ev.additional_data!r})" if ev.additional_data else ""
                raise ProtocolClosed(f"{waiting[0].what}: the peer ended the HTTP/2 connection "
                                     f"(GOAWAY {ev.error_code!s}){extra}")
            return
        sid = getattr(ev, "stream_id", None)
        call = self.calls.get(sid) if sid is not None else None
        if sid is None or call is None or call.ended:
            return  # a stream we gave up on, or connection-level
        if isinstance(ev, h2.events.ResponseReceived):
            call.headers = dict(ev.headers)  # type: ignore[arg-type]
            call.answered_at = time.monotonic()
        elif isinstance(ev, h2.events.TrailersReceived):
            call.trailers = dict(ev.headers)  # type: ignore[arg-type]
        elif isinstance(ev, h2.events.DataReceived):
            self.h2.acknowledge_received_data(ev.flow_controlled_length, sid)
            if len(call.body) + len(ev.data) > self.max_message + PREFIX_SIZE:
                del self.calls[sid]
                self._abandon(sid, deadline)
                raise ProtocolError(f"{call.what}: response exceeds {self.max_message} bytes")
            call.body += ev.data
        elif isinstance(ev, h2.events.StreamReset):
            del self.calls[sid]
            raise ProtocolClosed(f"{call.what}: the peer reset the stream (RST_STREAM {ev.error_code!s})")
        elif isinstance(ev, h2.events.StreamEnded):
            call.ended = True

    def _abandon(self, sid: int, deadline: float) -> None:
        """RST_STREAM for a call we give up on (nothing to do if the peer already ended it)."""
        try:
            self.h2.reset_stream(sid)
        except h2.exceptions.H2Error:
            return
        self.stream.send(self.h2.data_to_send(), deadline)

    def _screen(self, data: bytes, what: str) -> None:
        """Check every frame header in the byte stream before h2 buffers its frame."""
        view = memoryview(data)
        while view:
            if self._skip:
                k = min(self._skip, len(view))
                self._skip -= k
                view = view[k:]
                continue
            need = 9 - len(self._header)
            self._header += view[:need]
            view = view[need:]
            if len(self._header) < 9:
                return
            length, kind = int.from_bytes(self._header[:3], "big"), self._header[3]
            if self._first_frame and kind != 4:
                raise ProtocolError(f"{what}: the peer's first bytes are not HTTP/2 SETTINGS "
                                    f"({bytes(self._header).hex()}): not an HTTP/2 server")
            if length > self.h2.max_inbound_frame_size:
                raise ProtocolError(f"{what}: HTTP/2 frame of {length} bytes exceeds the "
                                    f"{self.h2.max_inbound_frame_size}-byte maximum")
            self._first_frame = False
            self._skip = length
            self._header.clear()

    @staticmethod
    def _result(what: str, headers: dict[str, str], trailers: dict[str, str], body: bytes) -> bytes:
        if headers.get(":status") != "200":
            raise ProtocolError(f"{what}: HTTP status {headers.get(':status', 'missing')}, not 200")
        status = trailers or headers  # trailers-only: the status rides in the response headers
        if "grpc-status" not in status:
            raise ProtocolError(f"{what}: the response has no grpc-status")
        try:
            code = int(status["grpc-status"])
        except ValueError:
            raise ProtocolError(f"{what}: grpc-status {status['grpc-status']!r} is not a number") from None
        if code != 0:
            raise RemoteError(what, status_name(code), urllib.parse.unquote(status.get("grpc-message", "")))
        content_type = headers.get("content-type", "")
        if not content_type.startswith("application/grpc"):
            raise ProtocolError(f"{what}: content-type {content_type!r}, not application/grpc")
        return unframe_message(body, what)

    def close(self) -> None:
        try:
            self.h2.close_connection()
            self.stream.send(self.h2.data_to_send(), time.monotonic() + 1.0)
        except (ProtocolError, h2.exceptions.H2Error):
            pass
        self.stream.close()
