"""ttRPC, containerd's lightweight gRPC framing, which the Kata 2.x/3.x agent serves on vsock port 1024.

A message is a 10-byte header, big-endian, then `length` bytes:

    length u32 (the payload only) | stream id u32 | type u8 (1 request, 2 response) | flags u8

A request's payload is a `Request{service = 1, method = 2, payload = 3 (the encoded call message),
timeout_nano = 4, metadata = 5 (repeated KeyValue{key = 1, value = 2})}`; the answer, on the same
stream id, is a `Response{status = 1 (google.rpc.Status{code = 1, message = 2}), payload = 2}`.
A client's stream ids are odd and increase. A message may be at most 4 MiB (ttRPC's own limit):
a longer header is refused before anything is buffered, and the connection is then out of step and
closed. A status code other than 0 is a RemoteError naming the method, the gRPC status and message.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from osbuilder.agent.protocols import health, protobuf
from osbuilder.agent.protocols.errors import ProtocolClosed, ProtocolError, ProtocolTimeout, RemoteError
from osbuilder.agent.protocols.grpc import status_name
from osbuilder.agent.protocols.transport import ByteStream, connect_unix, connect_vsock

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_MESSAGE = 4 << 20
TYPE_REQUEST = 1
TYPE_RESPONSE = 2
VSOCK_PORT = 1024  # the Kata 2.x/3.x agent's


@dataclass(frozen=True)
class Header:
    length: int
    stream_id: int
    type: int
    flags: int = 0

    def encode(self) -> bytes:
        return HEADER.pack(self.length, self.stream_id, self.type, self.flags)

    @classmethod
    def decode(cls, raw: bytes) -> Header:
        if len(raw) != HEADER_SIZE:
            raise ProtocolError(f"ttRPC: truncated message header ({len(raw)} of {HEADER_SIZE} bytes)")
        return cls(*HEADER.unpack(raw))


def encode_message(stream_id: int, kind: int, payload: bytes) -> bytes:
    if len(payload) > MAX_MESSAGE:
        raise ValueError(f"ttRPC: message of {len(payload)} bytes exceeds {MAX_MESSAGE}")
    return Header(len(payload), stream_id, kind).encode() + payload


@dataclass(frozen=True)
class Request:
    service: str
    method: str
    payload: bytes = b""
    timeout_nano: int = 0
    metadata: tuple[tuple[str, str], ...] = field(default=())

    def encode(self) -> bytes:
        out = (protobuf.bytes_field(1, self.service) + protobuf.bytes_field(2, self.method)
               + protobuf.bytes_field(3, self.payload) + protobuf.varint_field(4, self.timeout_nano))
        for k, v in self.metadata:
            out += protobuf.message_field(5, protobuf.bytes_field(1, k) + protobuf.bytes_field(2, v))
        return out

    @classmethod
    def decode(cls, raw: bytes) -> Request:
        msg = protobuf.Message(raw)
        meta = tuple((m.string(1), m.string(2)) for m in map(protobuf.Message, msg.repeated_bytes(5)))
        return cls(msg.string(1), msg.string(2), msg.raw(3), msg.varint(4, signed=True), meta)


@dataclass(frozen=True)
class Response:
    code: int = 0
    message: str = ""
    payload: bytes = b""

    def encode(self) -> bytes:
        status = protobuf.varint_field(1, self.code) + protobuf.bytes_field(2, self.message)
        return protobuf.message_field(1, status) + protobuf.bytes_field(2, self.payload)

    @classmethod
    def decode(cls, raw: bytes) -> Response:
        msg = protobuf.Message(raw)
        status = protobuf.Message(msg.raw(1))
        return cls(status.varint(1, signed=True), status.string(2), msg.raw(2))


class MessageReader:
    """Whole ttRPC messages out of a ByteStream; the header's length is checked before any payload
    is buffered."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    def read(self, deadline: float) -> tuple[Header, bytes]:
        self._fill(HEADER_SIZE, deadline)
        header = Header.decode(bytes(self.buffer[:HEADER_SIZE]))
        if header.length > MAX_MESSAGE:
            raise ProtocolError(f"ttRPC: message of {header.length} bytes on stream {header.stream_id} exceeds "
                                f"the {MAX_MESSAGE}-byte limit")
        self._fill(HEADER_SIZE + header.length, deadline)
        payload = bytes(self.buffer[HEADER_SIZE:HEADER_SIZE + header.length])
        del self.buffer[:HEADER_SIZE + header.length]
        return header, payload

    def _fill(self, n: int, deadline: float) -> None:
        while len(self.buffer) < n:
            try:
                self.buffer += self.stream.recv(deadline)
            except ProtocolClosed as e:
                partial = f" ({len(self.buffer)} bytes of a message received)" if self.buffer else ""
                raise ProtocolClosed(f"ttRPC: connection closed{partial}: {e}") from None


class TtrpcClient:
    """A ttRPC client on a ByteStream (which it owns). Calls run one at a time; answers to calls
    that timed out are recognised by their stream id and dropped."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.reader = MessageReader(stream)
        self.next_stream_id = 1
        self.broken: str | None = None

    @classmethod
    def connect_unix(cls, path: str | Path, timeout: float) -> TtrpcClient:
        return cls(connect_unix(path, timeout))

    @classmethod
    def connect_vsock(cls, cid: int, port: int = VSOCK_PORT, timeout: float = 5.0) -> TtrpcClient:
        return cls(connect_vsock(cid, port, timeout))

    def call(self, service: str, method: str, payload: bytes, timeout: float) -> bytes:
        """The encoded response of `service`.`method` for an encoded request `payload`.

        RemoteError for a non-zero status, ProtocolTimeout after `timeout` seconds, ProtocolClosed
        when the connection closes, ProtocolError for a malformed or oversized answer (after which
        the client is unusable)."""
        if self.broken:
            raise ProtocolClosed(f"ttRPC: connection unusable: {self.broken}")
        deadline = time.monotonic() + timeout
        what = f"ttRPC {service}/{method}"
        sid = self.next_stream_id
        self.next_stream_id += 2
        request = Request(service, method, payload, timeout_nano=int(timeout * 1e9))
        try:
            self.stream.send(encode_message(sid, TYPE_REQUEST, request.encode()), deadline)
            while True:
                header, raw = self.reader.read(deadline)
                if header.stream_id != sid:
                    continue  # the answer to a call that timed out
                if header.type != TYPE_RESPONSE:
                    raise ProtocolError(f"{what}: message type {header.type} on stream {sid}, expected a "
                                        f"response ({TYPE_RESPONSE})")
                response = Response.decode(raw)
                break
        except ProtocolTimeout:
            raise
        except ProtocolError as e:
            self.broken = str(e)
            self.stream.close()
            raise
        if response.code != 0:
            raise RemoteError(what, status_name(response.code), response.message)
        return response.payload

    def check(self, timeout: float = 5.0) -> str:
        """grpc.Health/Check: "SERVING" from a healthy agent."""
        return health.serving_status(self.call(health.SERVICE, health.CHECK, health.check_request(), timeout))

    def version(self, timeout: float = 5.0) -> tuple[str, str]:
        """grpc.Health/Version: (grpc_version, agent_version)."""
        return health.versions(self.call(health.SERVICE, health.VERSION, health.check_request(), timeout))

    def close(self) -> None:
        self.stream.close()

    def __enter__(self) -> TtrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
