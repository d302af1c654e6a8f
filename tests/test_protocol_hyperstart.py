"""hyperstart.py (Clear Containers 3.x control frames) from constructed bytes on a socketpair: framing,
READY, ACK and ERROR replies, malformed lengths, timeouts. The real cc-agent:
boot_tests/test_agent_peer_cc3.py."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from osbuilder.agent.protocols import hyperstart
from osbuilder.agent.protocols.errors import ProtocolClosed, ProtocolError, ProtocolTimeout, RemoteError
from osbuilder.agent.protocols.hyperstart import Command, Frame, HyperstartClient
from osbuilder.agent.protocols.transport import SocketStream


def client_and_agent() -> tuple[HyperstartClient, socket.socket]:
    a, b = socket.socketpair()
    b.settimeout(2)
    return HyperstartClient(SocketStream(a, "sh.hyper.channel.0 socket")), b


def test_frame_layout() -> None:
    assert Frame(Command.READY).encode() == bytes.fromhex("00000008 00000008")
    assert Frame(Command.ERROR, b"oops").encode() == bytes.fromhex("0000000a 0000000c") + b"oops"
    assert Frame(Command.PING).name == "PING" and Frame(99).name == "command 99"
    with pytest.raises(ValueError, match="exceeds"):
        Frame(Command.STARTPOD, b"x" * hyperstart.MAX_FRAME).encode()


def test_ready_then_ping_acknowledged() -> None:
    client, agent = client_and_agent()
    agent.sendall(Frame(Command.READY).encode())
    assert client.wait_ready(2) < 1 and client.ready_seen
    agent.sendall(Frame(Command.ACK).encode())  # the agent's answer, waiting for the ping below
    assert client.ping(2) < 1
    assert agent.recv(100) == Frame(Command.PING).encode()  # one whole frame, one write


def test_ready_arriving_while_a_command_waits_is_noted() -> None:
    client, agent = client_and_agent()
    agent.sendall(Frame(Command.READY).encode() + Frame(Command.ACK, b"[]").encode())
    assert client.command(Command.PSCONTAINER, b"{}", 2) == b"[]"
    assert client.ready_seen


def test_error_reply_is_a_remote_error_with_the_agents_text() -> None:
    client, agent = client_and_agent()
    agent.sendall(Frame(Command.ERROR, b'No callback found for command ""').encode())
    with pytest.raises(RemoteError, match='hyperstart VERSION: ERROR: No callback found for command ""') as e:
        client.version(2)
    assert e.value.code == "ERROR"
    agent.sendall(Frame(Command.ACK).encode())
    client.ping(2)  # still in step


@pytest.mark.parametrize("raw, message", [
    (bytes.fromhex("00000009 00000004"), "ACK frame claims 4 bytes, less than its 8-byte header"),
    (bytes.fromhex("00000009 7fffffff"), "ACK frame of 2147483647 bytes exceeds 4194304"),
    (Frame(Command.NEWCONTAINER).encode(), "unexpected NEWCONTAINER reply"),
])
def test_malformed_replies_are_one_line_errors_at_once(raw: bytes, message: str) -> None:
    client, agent = client_and_agent()
    agent.sendall(raw)
    started = time.monotonic()
    with pytest.raises(ProtocolError, match=message) as e:
        client.ping(5)
    assert not isinstance(e.value, ProtocolTimeout) and time.monotonic() - started < 1
    assert len(client.reader.buffer) <= hyperstart.HEADER_SIZE


def test_another_frame_before_ready_is_an_error() -> None:
    client, agent = client_and_agent()
    agent.sendall(Frame(Command.ACK).encode())
    with pytest.raises(ProtocolError, match="ACK before READY"):
        client.wait_ready(2)


def test_no_ready_is_a_timeout_naming_the_port() -> None:
    client, _agent = client_and_agent()
    with pytest.raises(ProtocolTimeout, match="no READY from the agent on sh.hyper.channel.0 within 0.2s"):
        client.wait_ready(0.2)


def test_after_a_timeout_the_client_refuses_to_take_a_late_reply_for_the_next() -> None:
    client, agent = client_and_agent()
    with pytest.raises(ProtocolTimeout, match="hyperstart PING: no reply within 0.2s"):
        client.ping(0.2)
    agent.sendall(Frame(Command.ACK).encode())  # PING's late ACK
    with pytest.raises(ProtocolError, match="an earlier PING timed out .* reconnect first"):
        client.ping(2)


def test_a_closed_port_is_a_clean_error() -> None:
    client, agent = client_and_agent()
    agent.sendall(bytes.fromhex("00000009"))  # half a header, then the end
    agent.shutdown(socket.SHUT_WR)
    with pytest.raises(ProtocolClosed, match="closed by the peer"):
        client.ping(2)


def test_connect_holds_both_ports(tmp_path) -> None:
    listeners = []
    for name in ("ctl", "tty"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(tmp_path / name))
        sock.listen(1)
        listeners.append(sock)
    with HyperstartClient.connect_unix(tmp_path / "ctl", tmp_path / "tty", 2) as client:
        assert client.tty is not None
        accepted = [listener.accept()[0] for listener in listeners]
    assert all(conn.recv(10) == b"" for conn in accepted)  # both closed by the client
    with pytest.raises(ProtocolTimeout, match="cannot connect to .*/missing"):
        HyperstartClient.connect_unix(tmp_path / "ctl", tmp_path / "missing", 0.3)


def test_heartbeat_pings_while_silent_and_their_acks_are_dropped_in_order() -> None:
    client, agent = client_and_agent()
    client.heartbeat = 0.1
    late = threading.Timer(0.35, lambda: agent.sendall(Frame(Command.ACK, b"[1]").encode()))
    late.start()
    assert client.command(Command.PSCONTAINER, b"{}", 5) == b"[1]"  # the reply comes first ...
    n = client.heartbeats
    assert n >= 2 and client.owed_acks == n
    expected = Frame(Command.PSCONTAINER, b"{}").encode() + Frame(Command.PING).encode() * n
    sent = b""
    while len(sent) < len(expected):
        sent += agent.recv(1000)
    assert sent == expected
    agent.sendall(Frame(Command.ACK).encode() * n + Frame(Command.ERROR, b"no").encode())  # ... then the ACKs
    with pytest.raises(RemoteError, match="ERROR: no"):
        client.command(Command.WINSIZE, b"{}", 5)
    assert client.owed_acks == 0
