"""ttrpc.py: framing from constructed bytes, and the client against a real peer: containerd's Go ttRPC
server (Debian's golang-github-containerd-ttrpc-dev) serving grpc.Health as the Kata 2.x/3.x agent
does (tests/peers/ttrpc_health_server.go), built once per session with `go build` in GOPATH mode."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from osbuilder.agent.protocols import ttrpc
from osbuilder.agent.protocols.errors import ProtocolClosed, ProtocolError, ProtocolTimeout, RemoteError
from osbuilder.agent.protocols.transport import SocketStream
from osbuilder.agent.protocols.ttrpc import Header, Request, Response, TtrpcClient, encode_message

SERVER_SOURCE = Path(__file__).parent / "peers" / "ttrpc_health_server.go"
GOPATH_SYSTEM = "/usr/share/gocode"  # where Debian's golang-*-dev packages put their sources
TTRPC_SOURCE = Path(GOPATH_SYSTEM) / "src/github.com/containerd/ttrpc"
PEER_VERSION = "3.2.0-peer"

# -- framing ------------------------------------------------------------------------------


def test_header_layout() -> None:
    h = Header(length=5, stream_id=3, type=ttrpc.TYPE_REQUEST)
    assert h.encode() == bytes.fromhex("00000005 00000003 01 00")
    assert Header.decode(h.encode()) == h
    with pytest.raises(ProtocolError, match="truncated message header .4 of 10 bytes."):
        Header.decode(b"\0" * 4)


def test_request_and_response_messages_round_trip() -> None:
    req = Request("grpc.Health", "Check", b"\x0a\x01x", timeout_nano=5_000_000_000, metadata=(("k", "v"),))
    assert Request.decode(req.encode()) == req
    assert req.encode().startswith(b"\x0a\x0bgrpc.Health\x12\x05Check\x1a\x03\x0a\x01x\x20")
    resp = Response(code=12, message="method Nope", payload=b"")
    assert Response.decode(resp.encode()) == resp
    assert Response.decode(b"\x0a\x00\x12\x02\x08\x01") == Response(0, "", b"\x08\x01")


def client_and_peer() -> tuple[TtrpcClient, socket.socket]:
    a, b = socket.socketpair()
    b.settimeout(2)
    return TtrpcClient(SocketStream(a, "test socket")), b


def test_answers_to_abandoned_calls_are_skipped() -> None:
    client, peer = client_and_peer()
    with pytest.raises(ProtocolTimeout):
        client.call("grpc.Health", "Check", b"", 0.2)  # stream 1, answered late below
    peer.sendall(encode_message(1, ttrpc.TYPE_RESPONSE, Response(payload=b"\x08\x02").encode())
                 + encode_message(3, ttrpc.TYPE_RESPONSE, Response(payload=b"\x08\x01").encode()))
    assert client.check(2) == "SERVING"


@pytest.mark.parametrize("reply, message", [
    (ttrpc.HEADER.pack(ttrpc.MAX_MESSAGE + 1, 1, 2, 0), "message of 4194305 bytes on stream 1 exceeds"),
    (ttrpc.HEADER.pack(2, 1, 1, 0) + b"\x08\x01", "message type 1 on stream 1, expected a response"),
    (ttrpc.HEADER.pack(3, 1, 2, 0) + b"\x0a\x05\x08", "protobuf: field 1 claims 5 bytes"),
])
def test_malformed_answers_are_one_line_errors_and_close_the_connection(reply: bytes, message: str) -> None:
    client, peer = client_and_peer()
    peer.sendall(reply)
    started = time.monotonic()
    with pytest.raises(ProtocolError, match=message) as e:
        client.call("grpc.Health", "Check", b"", 5)
    assert not isinstance(e.value, ProtocolTimeout) and time.monotonic() - started < 1
    assert "\n" not in str(e.value) and len(client.reader.buffer) <= ttrpc.HEADER_SIZE + 16
    with pytest.raises(ProtocolClosed, match="unusable"):
        client.check(1)


def test_a_truncated_answer_then_close_is_a_clean_error() -> None:
    client, peer = client_and_peer()
    peer.sendall(ttrpc.HEADER.pack(100, 1, 2, 0) + b"\0" * 10)
    peer.shutdown(socket.SHUT_WR)  # the peer's end of the stream: no more bytes will come
    with pytest.raises(ProtocolClosed, match=r"connection closed \(20 bytes of a message received\)"):
        client.call("grpc.Health", "Check", b"", 5)


# -- the real peer: containerd's Go ttRPC ----------------------------------------------------


@pytest.fixture(scope="session")
def ttrpc_server_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    go = shutil.which("go")
    if go is None:
        pytest.skip("no `go` on PATH: install golang-go and golang-github-containerd-ttrpc-dev (.ci/install-deps)")
    if not TTRPC_SOURCE.is_dir():
        pytest.fail(f"{TTRPC_SOURCE} missing: install golang-github-containerd-ttrpc-dev (.ci/install-deps)")
    work = tmp_path_factory.mktemp("ttrpc-peer")
    out = work / "ttrpc_health_server"
    env = {**os.environ, "GO111MODULE": "off", "GOFLAGS": "", "GOPATH": f"{GOPATH_SYSTEM}:{work / 'gopath'}",
           "GOCACHE": str(work / "gocache")}
    result = subprocess.run([go, "build", "-o", str(out), str(SERVER_SOURCE)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"go build of {SERVER_SOURCE.name} failed:\n{result.stderr[-3000:]}"
    return out


@pytest.fixture
def ttrpc_server(ttrpc_server_binary: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    sock = tmp_path / "ttrpc.sock"
    proc = subprocess.Popen([str(ttrpc_server_binary), str(sock), PEER_VERSION], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening", proc.stderr
        yield proc, sock
    finally:
        proc.kill()
        proc.wait(10)


def test_real_peer_check_serving_and_version(ttrpc_server) -> None:
    _, sock = ttrpc_server
    with TtrpcClient.connect_unix(sock, 5) as client:
        assert client.check() == "SERVING"
        assert client.version() == ("0.0.1", PEER_VERSION)
        assert client.check() == "SERVING"  # the next stream id on the same connection
        assert client.next_stream_id == 7


def test_real_peer_unknown_method_and_service_name_the_status(ttrpc_server) -> None:
    _, sock = ttrpc_server
    with TtrpcClient.connect_unix(sock, 5) as client:
        with pytest.raises(RemoteError, match="ttRPC grpc.Health/Nope: UNIMPLEMENTED: method Nope") as e:
            client.call("grpc.Health", "Nope", b"", 5)
        assert e.value.code == "UNIMPLEMENTED"
        with pytest.raises(RemoteError, match="ttRPC grpc.Nothing/Check: UNIMPLEMENTED: service grpc.Nothing"):
            client.call("grpc.Nothing", "Check", b"", 5)
        with pytest.raises(RemoteError, match='NOT_FOUND: unknown service "kata"'):
            client.call("grpc.Health", "Check", b"\x0a\x04kata", 5)
        assert client.check() == "SERVING"  # errors leave the connection usable


def test_real_peer_that_goes_away_mid_call_is_a_clean_error(ttrpc_server) -> None:
    proc, sock = ttrpc_server
    with TtrpcClient.connect_unix(sock, 5) as client:
        assert client.check() == "SERVING"
        with pytest.raises(ProtocolClosed, match="ttRPC: connection closed"):
            client.call("grpc.Health", "Check", b"\x0a\x09close-now", 5)  # the server exits in the handler
    assert proc.wait(5) == 3


def test_real_peer_killed_between_calls_is_a_clean_error(ttrpc_server) -> None:
    proc, sock = ttrpc_server
    with TtrpcClient.connect_unix(sock, 5) as client:
        assert client.check() == "SERVING"
        proc.kill()
        proc.wait(5)
        with pytest.raises(ProtocolClosed):
            client.check(5)


def test_vsock_without_a_guest_is_a_clean_error() -> None:
    """Kata 2.x/3.x listens on vsock port 1024; with no such guest (or no vhost-vsock here) connecting
    fails at once or times out, each as one line naming the address."""
    started = time.monotonic()
    with pytest.raises((ProtocolClosed, ProtocolTimeout), match="vsock cid 4242 port 1024"):
        TtrpcClient.connect_vsock(4242, timeout=1.0)
    assert time.monotonic() - started < 3
