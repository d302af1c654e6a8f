"""The Kata 1.x client against the real agent's recorded bytes (no guest needed): what the Kata 1.x agent
(../shared/peers/kata-agent-1.x, in osbuilder's image) sent on a fresh session, answering Check on
yamux stream 1 and Version on stream 3, as boot_tests/test_agent_peer_kata1.py recorded it
(`kata1-agent-answers.bin` in its boot's log directory, copied to tests/data/).

A peer on a socketpair replays each stream's frames once the client has opened that stream, so the
client's yamux, HTTP/2 (HPACK state included) and protobuf layers decode exactly what the agent said.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from osbuilder.agent.protocols import yamux
from osbuilder.agent.protocols.errors import ProtocolError, ProtocolTimeout
from osbuilder.agent.protocols.kata1 import Kata1Client
from osbuilder.agent.protocols.transport import SocketStream
from osbuilder.agent.protocols.yamux import Flag, FrameType, Header

RECORDED = Path(__file__).parent / "data" / "kata1-agent-answers.bin"
AGENT_VERSION = "1.13.0-alpha0-0b75b2d"


def split_frames(data: bytes) -> list[tuple[Header, bytes]]:
    frames, pos = [], 0
    while pos < len(data):
        h = Header.decode(data[pos:pos + yamux.HEADER_SIZE])
        size = yamux.HEADER_SIZE + (h.length if h.type is FrameType.DATA else 0)
        frames.append((h, data[pos:pos + size]))
        pos += size
    return frames


def replay(sock: socket.socket, frames: list[tuple[Header, bytes]]) -> None:
    """Send each stream's recorded frames when the client opens that stream (its SYN)."""
    by_stream: dict[int, bytes] = {}
    for h, raw in frames:
        by_stream[h.stream_id] = by_stream.get(h.stream_id, b"") + raw
    buf = b""
    try:
        while chunk := sock.recv(65536):
            buf += chunk
            while len(buf) >= yamux.HEADER_SIZE:
                h = Header.decode(buf[:yamux.HEADER_SIZE])
                size = yamux.HEADER_SIZE + (h.length if h.type is FrameType.DATA else 0)
                if len(buf) < size:
                    break
                buf = buf[size:]
                if h.flags & Flag.SYN and h.type is FrameType.WINDOW_UPDATE:
                    sock.sendall(by_stream.pop(h.stream_id, b""))
    except OSError:
        pass


@pytest.fixture
def recorded_frames() -> list[tuple[Header, bytes]]:
    if not RECORDED.is_file():
        pytest.fail(f"{RECORDED} missing (record it with boot_tests/test_agent_peer_kata1.py)")
    return split_frames(RECORDED.read_bytes())


def test_the_recording_is_the_agents_answers_on_streams_1_and_3(recorded_frames) -> None:
    streams = {h.stream_id for h, _ in recorded_frames}
    assert {1, 3} <= streams <= {0, 1, 3}  # stream 0: ACKs of heartbeat pings, if any
    first = recorded_frames[0][0]
    assert (first.type, first.flags & Flag.ACK, first.stream_id) == (FrameType.WINDOW_UPDATE, Flag.ACK, 1)


def test_check_and_version_decode_from_the_agents_bytes(recorded_frames) -> None:
    client_sock, peer_sock = socket.socketpair()
    threading.Thread(target=replay, args=(peer_sock, recorded_frames), daemon=True).start()
    client = Kata1Client(lambda timeout: SocketStream(client_sock, "recorded agent"))
    try:
        assert client.check(5) == "SERVING"
        assert client.version(5) == ("0.0.1", AGENT_VERSION)
    finally:
        client.close()
        peer_sock.close()


@pytest.mark.parametrize("cut, message", [
    (1, "yamux: unknown frame type 255"),  # the yamux header's type byte
    (13, "HTTP/2 frame of 65280 bytes exceeds the 16384-byte maximum"),  # the HTTP/2 frame's length
    (15, "first bytes are not HTTP/2 SETTINGS"),  # the HTTP/2 frame's type
])
def test_a_corrupted_recording_fails_cleanly(recorded_frames, cut: int, message: str) -> None:
    """A byte flipped in the agent's first data frame (its SETTINGS): one clean error, at once."""
    index = next(i for i, (h, _) in enumerate(recorded_frames) if h.type is FrameType.DATA)
    h, raw = recorded_frames[index]
    raw = raw[:cut] + bytes([raw[cut] ^ 0xFF]) + raw[cut + 1:]
    frames = recorded_frames[:index] + [(h, raw)] + recorded_frames[index + 1:]
    client_sock, peer_sock = socket.socketpair()
    threading.Thread(target=replay, args=(peer_sock, frames), daemon=True).start()
    client = Kata1Client(lambda timeout: SocketStream(client_sock, "recorded agent"))
    try:
        with pytest.raises(ProtocolError, match=message) as e:
            client.check(5)
        assert not isinstance(e.value, ProtocolTimeout)
    finally:
        client.close()
        peer_sock.close()
