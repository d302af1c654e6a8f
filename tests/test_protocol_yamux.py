"""The yamux client session (osbuilder/agent/protocols/yamux.py) from constructed bytes: the peer's
side of a socketpair is written and read by the test itself, frame by frame (the client is
single-threaded and reads only while a caller waits, so no thread is needed). The real peer, the
Kata 1.x agent, is in boot_tests/test_agent_peers.py."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from osbuilder.agent.protocols import yamux
from osbuilder.agent.protocols.errors import ProtocolClosed, ProtocolError, ProtocolTimeout
from osbuilder.agent.protocols.transport import SocketStream
from osbuilder.agent.protocols.yamux import Flag, FrameType, Header, Session, frame

W = yamux.INITIAL_WINDOW


class Peer:
    """The other end of the socketpair: writes frames, reads what the client sent."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(2)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_frame(self) -> tuple[Header, bytes]:
        while len(self.buf) < yamux.HEADER_SIZE:
            self.buf += self.sock.recv(1 << 20)
        h = Header.decode(self.buf[:yamux.HEADER_SIZE])
        size = yamux.HEADER_SIZE + (h.length if h.type is FrameType.DATA else 0)
        while len(self.buf) < size:
            self.buf += self.sock.recv(1 << 20)
        payload, self.buf = self.buf[yamux.HEADER_SIZE:size], self.buf[size:]
        return h, payload

    def nothing_sent(self) -> bool:
        self.sock.settimeout(0.1)
        try:
            return not self.buf and not self.sock.recv(1 << 16, socket.MSG_PEEK)
        except TimeoutError:
            return not self.buf
        finally:
            self.sock.settimeout(2)


@pytest.fixture
def pair() -> Iterator[tuple[Session, Peer]]:
    a, b = socket.socketpair()
    for sock in (a, b):  # room for a whole window in flight without the peer reading
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * W)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * W)
    session = Session(SocketStream(a, "test socket"))
    try:
        yield session, Peer(b)
    finally:
        session.transport.close()
        b.close()


def soon(seconds: float = 2.0) -> float:
    return time.monotonic() + seconds


# -- frame headers -----------------------------------------------------------------------


def test_header_round_trip_and_layout() -> None:
    h = Header(FrameType.WINDOW_UPDATE, Flag.SYN, 1, 0)
    assert h.encode() == bytes.fromhex("00 01 0001 00000001 00000000")
    assert Header.decode(h.encode()) == h
    data = Header(FrameType.DATA, Flag.ACK | Flag.FIN, 0xFFFFFFFF, 7)
    assert Header.decode(data.encode()) == data


@pytest.mark.parametrize("raw, message", [
    (bytes.fromhex("01 00 0000 00000001 00000000"), "protocol version 1 .expected 0."),
    (b'{"id":1,"cmd"', "protocol version 123"),  # osbuilder's JSON protocol is not yamux
    (bytes.fromhex("00 04 0000 00000001 00000000"), "unknown frame type 4"),
    (bytes.fromhex("00 00 0000 0000"), "truncated frame header .6 of 12 bytes."),
])
def test_malformed_headers_are_one_line_errors(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message) as e:
        Header.decode(raw[:12])
    assert "\n" not in str(e.value)


# -- streams -------------------------------------------------------------------------------


def test_opening_a_stream_sends_window_update_with_syn_on_odd_ids(pair) -> None:
    session, peer = pair
    s1 = session.open_stream(soon())
    s3 = session.open_stream(soon())
    assert (s1.id, s3.id) == (1, 3)
    assert peer.read_frame() == (Header(FrameType.WINDOW_UPDATE, Flag.SYN, 1, 0), b"")
    assert peer.read_frame()[0].stream_id == 3
    with pytest.raises(ValueError):
        Session(session.transport, first_stream_id=2)


def test_data_is_received_and_the_window_replenished_as_it_is_consumed(pair) -> None:
    session, peer = pair
    stream = session.open_stream(soon())
    peer.read_frame()
    peer.send(frame(FrameType.WINDOW_UPDATE, Flag.ACK, 1, 0) + frame(FrameType.DATA, Flag.NONE, 1, 5, b"hello"))
    assert stream.recv(soon()) == b"hello"
    assert stream.acked and peer.nothing_sent()  # 5 bytes consumed: no update yet
    chunk = b"x" * (W // 2)
    peer.send(frame(FrameType.DATA, Flag.NONE, 1, len(chunk), chunk))
    got = b""
    while len(got) < len(chunk):
        got += stream.recv(soon())
    assert got == chunk
    update, _ = peer.read_frame()  # half the window consumed: credit given back
    assert (update.type, update.stream_id, update.length) == (FrameType.WINDOW_UPDATE, 1, W // 2 + 5)
    assert stream.recv_window == W


def test_sending_waits_for_window_and_respects_it(pair) -> None:
    session, peer = pair
    stream = session.open_stream(soon())
    peer.read_frame()
    stream.send(b"a" * W, soon())  # the whole initial window
    assert stream.send_window == 0
    with pytest.raises(ProtocolTimeout, match="window update on yamux stream 1"):
        stream.send(b"b", soon(0.3))
    peer.send(frame(FrameType.WINDOW_UPDATE, Flag.NONE, 1, 10))
    stream.send(b"b" * 10, soon())
    total = 0
    while total < W + 10:
        h, payload = peer.read_frame()
        assert h.type is FrameType.DATA and h.length <= W and len(payload) == h.length
        total += h.length
    assert total == W + 10


def test_pings_from_the_peer_are_answered_and_ours_are_timed(pair) -> None:
    session, peer = pair
    stream = session.open_stream(soon())
    peer.read_frame()
    peer.send(frame(FrameType.PING, Flag.SYN, 0, 0xABCD) + frame(FrameType.DATA, Flag.NONE, 1, 2, b"ok"))
    assert stream.recv(soon()) == b"ok"
    assert peer.read_frame() == (Header(FrameType.PING, Flag.ACK, 0, 0xABCD), b"")
    assert session.pings_answered == 1
    peer.send(frame(FrameType.PING, Flag.ACK, 0, 1))  # the answer to the ping below, already waiting
    assert session.ping(soon()) < 2
    assert peer.read_frame()[0] == Header(FrameType.PING, Flag.SYN, 0, 1)


def test_go_away_with_an_error_ends_the_session(pair) -> None:
    session, peer = pair
    stream = session.open_stream(soon())
    peer.send(frame(FrameType.GO_AWAY, Flag.NONE, 0, 1))
    with pytest.raises(ProtocolClosed, match="go away .protocol error."):
        stream.recv(soon())
    assert session.ended
    with pytest.raises(ProtocolClosed, match="session ended"):
        session.open_stream(soon())


def test_normal_go_away_refuses_new_streams_but_lets_open_ones_finish(pair) -> None:
    session, peer = pair
    stream = session.open_stream(soon())
    peer.send(frame(FrameType.GO_AWAY, Flag.NONE, 0, 0) + frame(FrameType.DATA, Flag.FIN, 1, 4, b"last"))
    assert stream.recv(soon()) == b"last"
    with pytest.raises(ProtocolClosed, match="closed by the peer .FIN."):
        stream.recv(soon())
    with pytest.raises(ProtocolClosed, match="refuses new streams"):
        session.open_stream(soon())


def test_a_reset_stream_fails_cleanly(pair) -> None:
    session, peer = pair
    stream = session.open_stream(soon())
    peer.send(frame(FrameType.WINDOW_UPDATE, Flag.RST, 1, 0))
    with pytest.raises(ProtocolClosed, match="stream 1 reset by the peer"):
        stream.recv(soon())
    with pytest.raises(ProtocolClosed, match="reset"):
        stream.send(b"x", soon())
    other = session.open_stream(soon())  # the session itself is fine
    assert other.id == 3


def test_an_oversized_frame_fails_at_once_without_buffering(pair) -> None:
    session, peer = pair
    stream = session.open_stream(soon())
    peer.send(Header(FrameType.DATA, Flag.NONE, 1, 1 << 30).encode() + b"x" * 100)
    started = time.monotonic()
    with pytest.raises(ProtocolError, match="data frame of 1073741824 bytes on stream 1 exceeds") as e:
        stream.recv(soon(10))
    assert time.monotonic() - started < 1  # refused from the header, not after waiting for the bytes
    assert not isinstance(e.value, ProtocolTimeout) and len(session.inbuf) < 1024
    assert session.ended  # out of step: unusable


def test_a_peer_exceeding_the_receive_window_is_a_protocol_error(pair) -> None:
    session, peer = pair
    stream = session.open_stream(soon())
    peer.send(frame(FrameType.DATA, Flag.NONE, 1, W, b"a" * W) + frame(FrameType.DATA, Flag.NONE, 1, 1, b"b"))
    with pytest.raises(ProtocolError, match="sent 1 bytes on stream 1 with only 0 bytes of window left"):
        while True:
            session.pump(soon())
    assert stream.recv_window == 0


def test_a_timeout_in_the_middle_of_a_frame_keeps_the_session_in_step(pair) -> None:
    session, peer = pair
    stream = session.open_stream(soon())
    whole = frame(FrameType.DATA, Flag.NONE, 1, 10, b"0123456789")
    peer.send(whole[:5])
    with pytest.raises(ProtocolTimeout, match="data on yamux stream 1"):
        stream.recv(soon(0.2))
    peer.send(whole[5:16])
    with pytest.raises(ProtocolTimeout):
        stream.recv(soon(0.2))
    peer.send(whole[16:])
    assert stream.recv(soon()) == b"0123456789"
    assert not session.ended


def test_frames_for_unknown_streams_are_discarded_and_peer_streams_refused(pair) -> None:
    session, peer = pair
    stream = session.open_stream(soon())
    peer.read_frame()
    gone = session.open_stream(soon())
    peer.read_frame()
    gone.reset()
    assert peer.read_frame()[0] == Header(FrameType.WINDOW_UPDATE, Flag.RST, 3, 0)
    peer.send(frame(FrameType.DATA, Flag.NONE, 3, 6, b"stale!")  # the late answer to an abandoned stream
              + frame(FrameType.WINDOW_UPDATE, Flag.SYN, 2, 0)  # the peer opening a stream of its own
              + frame(FrameType.DATA, Flag.NONE, 1, 3, b"yes"))
    assert stream.recv(soon()) == b"yes"
    assert session.discarded == 6
    assert peer.read_frame()[0] == Header(FrameType.WINDOW_UPDATE, Flag.RST, 2, 0)


def test_the_peer_closing_the_connection_is_a_clean_error(pair) -> None:
    session, peer = pair
    stream = session.open_stream(soon())
    peer.sock.close()
    with pytest.raises(ProtocolClosed, match="connection closed while waiting for data on yamux stream 1"):
        stream.recv(soon())
    with pytest.raises(ProtocolClosed):
        session.open_stream(soon())


def test_close_half_closes_streams_and_says_go_away(pair) -> None:
    session, peer = pair
    stream = session.open_stream(soon())
    peer.read_frame()
    stream.close()
    assert peer.read_frame()[0] == Header(FrameType.WINDOW_UPDATE, Flag.FIN, 1, 0)
    assert 1 not in session.streams
    session.close()
    assert peer.read_frame()[0] == Header(FrameType.GO_AWAY, Flag.NONE, 0, 0)


def test_heartbeat_pings_while_waiting_in_silence() -> None:
    """With `heartbeat`, a caller waiting in silence makes the session send a Ping every so often (bytes
    on the wire wake QEMU's virtio-serial chardev); their ACKs are consumed, the wait goes on."""
    a, b = socket.socketpair()
    session = Session(SocketStream(a, "test socket"), heartbeat=0.1)
    peer = Peer(b)
    stream = session.open_stream(soon())
    peer.read_frame()
    with pytest.raises(ProtocolTimeout, match="data on yamux stream 1"):
        stream.recv(soon(0.35))
    assert session.heartbeats == 0  # the peer has not said anything yet: not stuck, not up
    peer.send(frame(FrameType.WINDOW_UPDATE, Flag.ACK, 1, 0))
    with pytest.raises(ProtocolTimeout, match="data on yamux stream 1"):
        stream.recv(soon(0.35))
    assert session.first_received_at is not None
    pings = [peer.read_frame()[0] for _ in range(session.heartbeats)]
    # one when the peer's first byte came (what we queued before may sit in QEMU), then one per 0.1 s
    assert 3 <= len(pings) <= 5 and all((p.type, p.flags) == (FrameType.PING, Flag.SYN) for p in pings)
    peer.send(b"".join(frame(FrameType.PING, Flag.ACK, 0, p.length) for p in pings)
              + frame(FrameType.DATA, Flag.NONE, 1, 2, b"ok"))
    assert stream.recv(soon()) == b"ok"
    assert not session._ping_acks and not session._heartbeat_ids
    c, d = socket.socketpair()
    quiet = Session(SocketStream(c, "quiet"))  # no heartbeat: nothing is sent
    with pytest.raises(ProtocolTimeout):
        quiet.pump(soon(0.2))
    assert quiet.heartbeats == 0 and Peer(d).nothing_sent()
    for sock in (a, b, c, d):
        sock.close()
