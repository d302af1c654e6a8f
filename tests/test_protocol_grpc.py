"""protobuf.py, health.py, grpc.py and kata1.py from constructed bytes and in-process HTTP/2 and yamux
servers (tests/protocol_servers.py): malformed input is one clean error, lengths are bounded, the
Kata 1.x client recovers from a dropped session. The real agent: boot_tests/test_agent_peers.py."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from protocol_servers import Answer, YamuxGrpcServer, serve_h2

from osbuilder.agent.protocols import health, protobuf, yamux
from osbuilder.agent.protocols.errors import ProtocolClosed, ProtocolError, ProtocolTimeout, RemoteError
from osbuilder.agent.protocols.grpc import GrpcConnection, frame_message, unframe_message
from osbuilder.agent.protocols.kata1 import Kata1Client
from osbuilder.agent.protocols.transport import SocketStream
from osbuilder.agent.protocols.yamux import Flag, FrameType, Header

# -- protobuf --------------------------------------------------------------------------------


@pytest.mark.parametrize("value, encoded", [(0, "00"), (1, "01"), (127, "7f"), (128, "8001"), (300, "ac02"),
                                            (2**63, "80808080808080808001"), (-1, "ffffffffffffffffff01")])
def test_varints(value: int, encoded: str) -> None:
    assert protobuf.encode_varint(value).hex() == encoded
    decoded, end = protobuf.decode_varint(bytes.fromhex(encoded))
    assert (decoded if value >= 0 else decoded - 2**64, end) == (value, len(encoded) // 2)


@pytest.mark.parametrize("raw, message", [
    ("08", "truncated varint at byte 1"),
    ("08" + "ff" * 11, "longer than 10 bytes"),
    ("08ffffffffffffffffff7f", "exceeds 64 bits"),
    ("0a05616263", "field 1 claims 5 bytes, 3 left"),
    ("0b", "field 1 has unsupported wire type 3"),
    ("0001", "field number 0"),
    ("0d0102", "truncated fixed-size field 1"),
    ("0a02ffff", "string field 1 is not UTF-8"),
])
def test_malformed_messages_are_one_line_errors(raw: str, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        protobuf.Message(bytes.fromhex(raw)).string(1)


def test_messages_keep_the_last_value_and_skip_unknown_fields() -> None:
    raw = (protobuf.bytes_field(1, "a") + protobuf.varint_field(7, 5) + protobuf.bytes_field(1, "b")
           + bytes.fromhex("1d01020304") + bytes.fromhex("210102030405060708"))
    msg = protobuf.Message(raw)
    assert msg.string(1) == "b" and msg.varint(7) == 5 and msg.string(2) == "" and msg.varint(9) == 0
    assert msg.repeated_bytes(1) == [b"a", b"b"]
    with pytest.raises(ProtocolError, match="field 7 has wire type 0, expected 2"):
        msg.string(7)
    assert protobuf.varint_field(1, 0) == b"" and protobuf.bytes_field(2, "") == b""  # proto3 defaults


def test_health_messages() -> None:
    assert health.check_request() == b"" and health.check_request("x") == b"\x0a\x01x"
    assert health.serving_status(b"\x08\x01") == "SERVING"
    assert health.serving_status(b"") == "UNKNOWN" and health.serving_status(b"\x08\x07") == "status 7"
    assert health.versions(b"\x0a\x050.0.1\x12\x031.2") == ("0.0.1", "1.2")
    assert health.grpc_path("Check") == "/grpc.Health/Check"


# -- gRPC message framing --------------------------------------------------------------------


def test_grpc_length_prefix() -> None:
    assert frame_message(b"\x08\x01") == bytes.fromhex("00 00000002 0801")  # HealthCheckResponse{SERVING}
    assert unframe_message(bytes.fromhex("00 00000002 0801"), "t") == b"\x08\x01"
    for body, message in ((b"\0\0", "has no 5-byte gRPC message prefix"),
                          (bytes.fromhex("01 00000000"), "compressed response"),
                          (bytes.fromhex("00 00000009 0801"), "prefix says 9 bytes, the body holds 2"),
                          (bytes.fromhex("00 00000001 0801"), "prefix says 1 bytes, the body holds 2")):
        with pytest.raises(ProtocolError, match=message):
            unframe_message(body, "t")


# -- gRPC calls over HTTP/2 ------------------------------------------------------------------


def connection(handler) -> GrpcConnection:
    client, server = socket.socketpair()
    serve_h2(server, handler)
    return GrpcConnection(SocketStream(client, "test socket"))


def test_a_unary_call_returns_the_response_message() -> None:
    seen = []

    def handler(path: str, request: bytes) -> Answer:
        seen.append((path, request))
        return Answer(body=b"\x08\x01")

    conn = connection(handler)
    assert conn.call("/grpc.Health/Check", b"", 5) == b"\x08\x01"
    assert conn.call("/grpc.Health/Check", b"\x0a\x01x", 5) == b"\x08\x01"  # a second call, next stream
    assert seen == [("/grpc.Health/Check", b""), ("/grpc.Health/Check", b"\x0a\x01x")]
    conn.close()


@pytest.mark.parametrize("answer, error, message, code", [
    (Answer(status=12, message="unknown method Nope"), RemoteError, "gRPC /p.S/M: UNIMPLEMENTED: unknown method Nope",
     "UNIMPLEMENTED"),
    (Answer(status=5, message="no%20such%20thing", body=b""), RemoteError, "NOT_FOUND: no such thing", "NOT_FOUND"),
    (Answer(status=99), RemoteError, "gRPC /p.S/M: 99$", "99"),
    (Answer(raw_body=bytes.fromhex("01 00000000")), ProtocolError, "compressed response", None),
    (Answer(body=b"x", content_type="text/html"), ProtocolError, "content-type 'text/html'", None),
    (Answer(raw_body=b"\0" * (4 * 1024 * 1024 + 100)), ProtocolError, "response exceeds 4194304 bytes", None),
])
def test_error_answers_are_one_line_errors(answer: Answer, error: type, message: str, code: str | None) -> None:
    conn = connection(lambda path, request: answer)
    with pytest.raises(error, match=message) as e:
        conn.call("/p.S/M", b"", 10)
    assert "\n" not in str(e.value)
    assert getattr(e.value, "code", None) == code


def test_a_silent_or_closing_peer_is_a_timeout_or_a_clean_close() -> None:
    client, server = socket.socketpair()
    conn = GrpcConnection(SocketStream(client, "test socket"))
    started = time.monotonic()
    with pytest.raises(ProtocolTimeout, match="waiting for test socket"):
        conn.call("/p.S/M", b"", 0.3)
    assert time.monotonic() - started < 1
    server.close()
    with pytest.raises(ProtocolClosed, match="closed"):
        conn.call("/p.S/M", b"", 5)


@pytest.mark.parametrize("garbage, message", [
    (b'{"ok":true}\n', "first bytes are not HTTP/2 SETTINGS .7b226f6b22.*not an HTTP/2 server"),
    (bytes.fromhex("000000 04 00 00000000") + bytes.fromhex("ffffff 00 00 00000001"),
     "HTTP/2 frame of 16777215 bytes exceeds the 16384-byte maximum"),
    (bytes.fromhex("000000 04 00 00000000") + bytes.fromhex("000004 01 04 00000002") + b"\xff" * 4,
     "HTTP/2 protocol error from the peer"),
])
def test_garbage_instead_of_http2_fails_at_once(garbage: bytes, message: str) -> None:
    client, server = socket.socketpair()
    server.sendall(garbage)
    conn = GrpcConnection(SocketStream(client, "test socket"))
    started = time.monotonic()
    with pytest.raises(ProtocolError, match=message) as e:
        conn.call("/p.S/M", b"", 5)
    assert not isinstance(e.value, ProtocolTimeout) and time.monotonic() - started < 1
    server.close()


# -- Kata 1.x: gRPC on yamux streams ---------------------------------------------------------


def health_handler(path: str, request: bytes) -> Answer:
    if path == "/grpc.Health/Check":
        return Answer(body=b"\x08\x01")
    if path == "/grpc.Health/Version":
        return Answer(body=protobuf.bytes_field(1, "0.0.1") + protobuf.bytes_field(2, "1.13.0-test"))
    return Answer(status=12, message=f"unknown method {path}")


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "agent.sock"


def test_kata1_check_version_and_errors(sock_path: Path) -> None:
    server = YamuxGrpcServer(str(sock_path), health_handler)
    with Kata1Client.connect_unix(sock_path, 5) as client:
        assert client.check() == "SERVING"
        assert client.version() == ("0.0.1", "1.13.0-test")
        with pytest.raises(RemoteError, match="UNIMPLEMENTED"):
            client.call("/grpc.Health/Nope", b"", 5)
        assert client.ping() < 5
        assert client.check() == "SERVING"
    assert server.stream_ids == [1, 3, 5, 7]  # a new odd stream per call, one session
    assert server.connections == 1
    server.close()


def test_kata1_wait_ready_starts_fresh_sessions_after_a_dropped_one(sock_path: Path) -> None:
    """The agent drops a session at the first stray byte (GoAway protocol error): the client connects
    again, never reusing a stream id, until Check answers."""
    server = YamuxGrpcServer(str(sock_path), health_handler, sessions_to_break=2)
    with Kata1Client.connect_unix(sock_path, 5) as client:
        ready = client.wait_ready(10, try_timeout=1.0)
        assert (ready.status, ready.sessions, ready.tries) == ("SERVING", 3, 3)
        assert ready.seconds < 5
    assert server.connections == 3
    assert server.stream_ids == [5]  # streams 1 and 3 went to the broken sessions
    server.close()


def test_kata1_wait_ready_keeps_one_try_while_the_agent_is_silent(sock_path: Path) -> None:
    """Before the agent has said a word its port is not being read: one Check waits, queued (more would
    only be more HTTP/2 connections for the agent to set up when it starts), with a quiet heartbeat
    Ping now and then; the timeout names the port and the last error."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # accepts, never answers
    listener.bind(str(sock_path))
    listener.listen(4)
    with Kata1Client.connect_unix(sock_path, 5) as client:
        started = time.monotonic()
        with pytest.raises(ProtocolTimeout, match=r"agent.channel.0 .* did not answer grpc.Health/Check within "
                                                  r"1.5s \(1 tries; last: .*timed out"):
            client.wait_ready(1.5, try_timeout=0.2)
        assert 1.4 < time.monotonic() - started < 3
        for _ in range(3):  # a caller waiting in slices keeps the same try too
            with pytest.raises(ProtocolTimeout):
                client.wait_ready(0.25, try_timeout=0.2)
        assert client.sessions == 1 and client.tries == 1 and client.pending is not None
        assert client.session is not None and client.session.heartbeats >= 1  # the quiet heartbeat
    listener.close()


def test_kata1_a_try_unanswered_after_the_agent_spoke_is_abandoned(sock_path: Path) -> None:
    """An agent that has spoken (it answers Pings) but not the Check (its bytes were lost before it
    opened the port, say): the try is abandoned `try_timeout` after its first byte, and another sent."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)
    seen: list[Header] = []

    def pings_only() -> None:
        conn, _ = listener.accept()
        buf = b""
        while chunk := conn.recv(65536):
            buf += chunk
            while len(buf) >= yamux.HEADER_SIZE:
                h = Header.decode(buf[:yamux.HEADER_SIZE])
                size = yamux.HEADER_SIZE + (h.length if h.type is FrameType.DATA else 0)
                if len(buf) < size:
                    break
                buf = buf[size:]
                seen.append(h)
                if h.type is FrameType.PING and h.flags & Flag.SYN:
                    conn.sendall(yamux.frame(FrameType.PING, Flag.ACK, 0, h.length))

    threading.Thread(target=pings_only, daemon=True).start()
    with Kata1Client.connect_unix(sock_path, 5) as client:
        assert client.ping(5) < 1  # the agent speaks
        with pytest.raises(ProtocolTimeout, match=r"\([3-5] tries; last: .*timed out"):
            client.wait_ready(1.2, try_timeout=0.3)
    resets = [h.stream_id for h in seen if h.flags & Flag.RST]
    assert len(resets) >= 2 and resets == sorted(resets)  # each abandoned try was reset, in order
    listener.close()


def test_kata1_connect_names_the_socket(tmp_path: Path) -> None:
    with pytest.raises(ProtocolTimeout, match=f"cannot connect to {tmp_path}/nothing within 0.2s: .*No such file"):
        Kata1Client.connect_unix(tmp_path / "nothing", 0.2)


def test_kata1_a_try_answered_after_several_slices_counts(sock_path: Path) -> None:
    """The answer to a Check sent in an earlier slice is taken when it comes."""
    server_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server_sock.bind(str(sock_path))
    server_sock.listen(1)
    with Kata1Client.connect_unix(sock_path, 5) as client:
        conn, _ = server_sock.accept()
        with pytest.raises(ProtocolTimeout):
            client.wait_ready(0.3, try_timeout=5.0)  # the Check is now queued in the socket, unread
        agent = YamuxGrpcServer(str(sock_path.with_name("unused.sock")), health_handler)
        threading.Thread(target=agent._session, args=(conn, False), daemon=True).start()  # the agent starts
        ready = client.wait_ready(5, try_timeout=5.0)
        assert (ready.tries, ready.status) == (0, "SERVING")  # no new try: the first one was answered
        assert client.tries == 1 and agent.stream_ids == [1]
        agent.close()
    server_sock.close()
