"""The Kata Containers 1.x agent (../shared/peers/kata-agent-1.x, the real one) in osbuilder's image,
and osbuilder/agent/protocols/kata1.py against it: yamux + gRPC on agent.channel.0, connected at
QEMU's start; Check answers SERVING, Version names the agent, an unknown method names its status, no
keepalive is needed, and a JSON line (osbuilder's own protocol) breaks the agent's session, which
the client recovers from. See boot_tests/agent_peers.py for the boot and the timings recorded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from boot_tests.agent_peers import (
    KATA_AGENT,
    KATA_AGENT_VERSION,
    KEEPALIVE_INTERVAL,
    PeerBoot,
    RecordingStream,
    boot_name,
    boot_peer,
    peer,
    wait_for,
)
from osbuilder.agent import PORT_NAME
from osbuilder.agent.protocols.errors import ProtocolClosed, ProtocolTimeout, RemoteError
from osbuilder.agent.protocols.kata1 import Kata1Client, ReadyResult
from osbuilder.agent.protocols.transport import connect_unix
from osbuilder.pytest_plugin import note_logs

pytestmark = [pytest.mark.boot, pytest.mark.xdist_group("agent-peer-kata1")]


@dataclass
class KataBoot:
    boot: PeerBoot
    client: Kata1Client
    ready: ReadyResult


@pytest.fixture(scope="module")
def kata(osbuilder_settings, osbuilder_artifacts, osbuilder_boot_kernel, osbuilder_accel,
         osbuilder_kernel_config) -> Iterator[KataBoot]:
    agent = peer(KATA_AGENT)
    with boot_peer(osbuilder_settings, osbuilder_artifacts, osbuilder_boot_kernel, osbuilder_accel, agent, (PORT_NAME,),
                   boot_name("kata1-peer", osbuilder_kernel_config)) as boot:
        client = Kata1Client.connect_unix(boot.vm.paths.agent, 10)
        boot.timings["host_connected"] = boot.now()
        ready = wait_for(boot, boot.facts["timeout"], lambda s: client.wait_ready(s, try_timeout=1.0),
                         "the Kata 1.x agent answering grpc.Health/Check")
        boot.timings["serving"] = boot.now()
        if client.session and client.session.first_received_at:  # the agent's first byte on the session
            boot.timings["agent_first_byte"] = round(client.session.first_received_at - boot.vm.t0, 3)
        if ready.answered_at is not None:  # the agent's answer began to arrive: from there on it is ours
            boot.timings["agent_answered"] = round(ready.answered_at - boot.vm.t0, 3)
            boot.timings["client_after_the_answer"] = round(boot.timings["serving"] - boot.timings["agent_answered"], 3)
        boot.timings["port_opened"] = boot.port_open_at(PORT_NAME)
        if boot.timings["port_opened"] is not None:
            boot.timings["answered_after_port_open"] = round(
                boot.timings["serving"] - boot.timings["port_opened"], 3)
        boot.facts.update(check_tries=client.tries, yamux_sessions=client.sessions,
                          stale_answer_bytes_discarded=client.session.discarded if client.session else None)
        try:
            yield KataBoot(boot, client, ready)
        finally:
            client.close()


@pytest.fixture
def kata_boot(kata: KataBoot, request: pytest.FixtureRequest) -> KataBoot:
    note_logs(request.node, kata.boot.log_dir)
    return kata


def test_kata1_check_answers_serving_soon_after_the_port_opens(kata_boot: KataBoot) -> None:
    k = kata_boot
    assert k.ready.status == "SERVING"
    assert k.client.check(10) == "SERVING"  # and again, on a new stream of the same session
    opened = k.boot.timings["port_opened"]
    assert opened is not None, "QMP reported no VSERPORT_CHANGE for agent.channel.0"
    assert k.boot.timings["host_connected"] < opened <= k.boot.timings["serving"]
    # connected ~a minute before the guest opened the port, the first session was the one that answered
    assert k.ready.sessions == 1, k.ready
    assert any("kata-agent" in line for line in k.boot.vm.console.tail(5000)), "the console never named the agent"


def test_kata1_version_names_the_agent(kata_boot: KataBoot) -> None:
    grpc_version, agent_version = kata_boot.client.version(10)
    kata_boot.boot.facts.update(grpc_version=grpc_version, agent_version=agent_version)
    assert (grpc_version, agent_version) == ("0.0.1", KATA_AGENT_VERSION)


def test_kata1_unknown_method_is_an_error_naming_the_status(kata_boot: KataBoot) -> None:
    with pytest.raises(RemoteError, match=r"gRPC /grpc.Health/NoSuchMethod: UNIMPLEMENTED") as e:
        kata_boot.client.call("/grpc.Health/NoSuchMethod", b"", 10)
    assert e.value.code == "UNIMPLEMENTED"
    assert kata_boot.client.check(10) == "SERVING"  # the session survives a failed call


def test_kata1_answers_with_keepalive_off_on_both_sides(kata_boot: KataBoot) -> None:
    """The agent runs yamux with keepalive off and this client sends no keepalives: a session idle for
    longer than yamux's keepalive interval still answers, and the agent never pinged us. It does
    answer a Ping of ours."""
    k = kata_boot
    session = k.client.session
    assert session is not None
    idle_until = k.boot.vm.t0 + k.boot.timings["port_opened"] + KEEPALIVE_INTERVAL + 2
    time.sleep(max(0.0, idle_until - time.monotonic()))
    assert k.client.check(10) == "SERVING"
    assert k.client.session is session  # the same session, not a reconnect
    assert session.pings_answered == 0, "the agent sent yamux pings: keepalive is on"
    rtt = k.client.ping(10)
    k.boot.facts["yamux_ping_rtt"] = round(rtt, 4)
    assert rtt < 5


def test_kata1_a_json_line_breaks_the_session_and_the_client_recovers(kata_boot: KataBoot) -> None:
    """osbuilder's own JSON protocol on the port is a yamux protocol error for this agent: it drops
    the session (and its port) and serves a fresh one; `wait_ready` on a new connection gets SERVING."""
    k = kata_boot
    k.client.close()
    raw = connect_unix(k.boot.vm.paths.agent, 10)
    raw.send(b'{"id":1,"cmd":"ping"}\n', time.monotonic() + 5)
    try:
        answer = raw.recv(time.monotonic() + 5)
        k.boot.facts["answer_to_a_json_line"] = answer[:80].hex()
    except (ProtocolTimeout, ProtocolClosed) as e:
        answer = b""
        k.boot.facts["answer_to_a_json_line"] = f"none ({e})"
    raw.close()
    assert not answer.startswith(b"{"), answer  # no JSON reply: it is not osbuilder's agent
    recorded: list[RecordingStream] = []

    def connect(timeout: float) -> RecordingStream:
        recorded.append(RecordingStream(connect_unix(k.boot.vm.paths.agent, timeout)))
        return recorded[-1]

    fresh = Kata1Client(connect)
    started = time.monotonic()
    try:
        ready = fresh.wait_ready(30, try_timeout=1.0)
        k.boot.facts["recovery_after_json_line"] = {"seconds": round(time.monotonic() - started, 3),
                                                    "tries": ready.tries, "sessions": ready.sessions}
        assert fresh.version(10)[1] == KATA_AGENT_VERSION
    finally:
        fresh.close()
    # the agent's bytes of this session (Check on stream 1, Version on stream 3), for replay tests
    (k.boot.log_dir / "kata1-agent-answers.bin").write_bytes(bytes(recorded[-1].received))
