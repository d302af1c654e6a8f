"""The protobuf wire format, just enough for the agents' small health and framing messages.

Encoding: a field is a key varint (field number << 3 | wire type) and a value: a varint (type 0),
8 bytes (type 1), a varint length and that many bytes (type 2: strings, bytes, nested messages)
or 4 bytes (type 5). Proto3 leaves out fields at their default (0, "", b"").

Decoding is strict and bounded: a varint is at most 10 bytes, a length never reaches past the
message, groups (types 3 and 4) and unknown wire types are errors; every error is one ProtocolError
line naming what was wrong. Unknown fields are kept, so callers ignore them as proto3 does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from osbuilder.agent.protocols.errors import ProtocolError

VARINT, I64, LEN, I32 = 0, 1, 2, 5
MAX_VARINT_BYTES = 10


def encode_varint(value: int) -> bytes:
    """Unsigned LEB128; a negative int64 is its two's complement (10 bytes), as protobuf does."""
    if value < 0:
        value += 1 << 64
    if not 0 <= value < 1 << 64:
        raise ValueError(f"varint out of range: {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes, pos: int = 0) -> tuple[int, int]:
    """(value, position after it)."""
    value = shift = 0
    for i in range(MAX_VARINT_BYTES):
        if pos + i >= len(data):
            raise ProtocolError(f"protobuf: truncated varint at byte {pos}")
        byte = data[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value >= 1 << 64:
                raise ProtocolError(f"protobuf: varint at byte {pos} exceeds 64 bits")
            return value, pos + i + 1
        shift += 7
    raise ProtocolError(f"protobuf: varint at byte {pos} longer than {MAX_VARINT_BYTES} bytes")


def key(field: int, wire_type: int) -> bytes:
    return encode_varint(field << 3 | wire_type)


def varint_field(field: int, value: int) -> bytes:
    """A varint field; empty at the proto3 default (0)."""
    return key(field, VARINT) + encode_varint(value) if value else b""


def bytes_field(field: int, value: bytes | str) -> bytes:
    """A length-delimited field (str as UTF-8); empty at the proto3 default (empty)."""
    raw = value.encode() if isinstance(value, str) else value
    return key(field, LEN) + encode_varint(len(raw)) + raw if raw else b""


def message_field(field: int, encoded: bytes) -> bytes:
    """A nested message (always present, even when empty)."""
    return key(field, LEN) + encode_varint(len(encoded)) + encoded


@dataclass(frozen=True)
class Field:
    number: int
    wire_type: int
    value: int | bytes


def iter_fields(data: bytes) -> Iterator[Field]:
    pos = 0
    while pos < len(data):
        k, pos = decode_varint(data, pos)
        number, wire_type = k >> 3, k & 7
        if number == 0:
            raise ProtocolError("protobuf: field number 0")
        value: int | bytes
        if wire_type == VARINT:
            value, pos = decode_varint(data, pos)
        elif wire_type == LEN:
            length, pos = decode_varint(data, pos)
            if length > len(data) - pos:
                raise ProtocolError(f"protobuf: field {number} claims {length} bytes, {len(data) - pos} left")
            value, pos = data[pos:pos + length], pos + length
        elif wire_type in (I64, I32):
            size = 8 if wire_type == I64 else 4
            if size > len(data) - pos:
                raise ProtocolError(f"protobuf: truncated fixed-size field {number}")
            value, pos = int.from_bytes(data[pos:pos + size], "little"), pos + size
        else:
            raise ProtocolError(f"protobuf: field {number} has unsupported wire type {wire_type}")
        yield Field(number, wire_type, value)


class Message:
    """A decoded message: the last value of each field (proto3's rule for scalars), all values for
    repeated ones."""

    def __init__(self, data: bytes) -> None:
        self.fields: dict[int, list[Field]] = {}
        for f in iter_fields(bytes(data)):
            self.fields.setdefault(f.number, []).append(f)

    def _last(self, number: int, wire_type: int) -> Field | None:
        found = self.fields.get(number)
        if not found:
            return None
        f = found[-1]
        if f.wire_type != wire_type:
            raise ProtocolError(f"protobuf: field {number} has wire type {f.wire_type}, expected {wire_type}")
        return f

    def varint(self, number: int, signed: bool = False) -> int:
        f = self._last(number, VARINT)
        value = f.value if f and isinstance(f.value, int) else 0
        return value - (1 << 64) if signed and value >= 1 << 63 else value

    def raw(self, number: int) -> bytes:
        f = self._last(number, LEN)
        return f.value if f and isinstance(f.value, bytes) else b""

    def string(self, number: int) -> str:
        raw = self.raw(number)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise ProtocolError(f"protobuf: string field {number} is not UTF-8") from None

    def repeated_bytes(self, number: int) -> list[bytes]:
        return [f.value for f in self.fields.get(number, []) if isinstance(f.value, bytes)]
