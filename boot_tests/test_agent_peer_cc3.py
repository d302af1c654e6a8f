"""The Clear Containers 3.x agent (../shared/peers/cc-agent-3.x, the real one) in osbuilder's image,
and osbuilder/agent/protocols/hyperstart.py against it: control frames on sh.hyper.channel.0 (and
the tty port sh.hyper.channel.1 held connected), connected at QEMU's start; READY arrives, PING is
acknowledged, VERSION is answered ERROR (the agent has no handler for it). See
boot_tests/agent_peers.py for the boot and the timings recorded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from boot_tests.agent_peers import CC_AGENT, PeerBoot, boot_name, boot_peer, peer, wait_for
from osbuilder.agent.protocols import hyperstart
from osbuilder.agent.protocols.errors import RemoteError
from osbuilder.pytest_plugin import note_logs

pytestmark = [pytest.mark.boot, pytest.mark.xdist_group("agent-peer-cc3")]


@dataclass
class CcBoot:
    boot: PeerBoot
    client: hyperstart.HyperstartClient


@pytest.fixture(scope="module")
def cc(osbuilder_settings, osbuilder_artifacts, osbuilder_boot_kernel, osbuilder_accel,
       osbuilder_kernel_config) -> Iterator[CcBoot]:
    agent = peer(CC_AGENT)
    ports = (hyperstart.CONTROL_PORT, hyperstart.TTY_PORT)
    with boot_peer(osbuilder_settings, osbuilder_artifacts, osbuilder_boot_kernel, osbuilder_accel, agent, ports,
                   boot_name("cc3-peer", osbuilder_kernel_config)) as boot:
        paths = boot.vm.paths
        client = hyperstart.HyperstartClient.connect_unix(paths.port(ports[0]), paths.port(ports[1]), 10)
        boot.timings["host_connected"] = boot.now()
        wait_for(boot, boot.facts["timeout"], client.wait_ready, "the Clear Containers agent's READY")
        boot.timings["ready"] = boot.now()
        boot.timings["port_opened"] = boot.port_open_at(hyperstart.CONTROL_PORT)
        if boot.timings["port_opened"] is not None:
            boot.timings["answered_after_port_open"] = round(
                boot.timings["ready"] - boot.timings["port_opened"], 3)
        try:
            yield CcBoot(boot, client)
        finally:
            client.close()


@pytest.fixture
def cc_boot(cc: CcBoot, request: pytest.FixtureRequest) -> CcBoot:
    note_logs(request.node, cc.boot.log_dir)
    return cc


def test_cc3_sends_ready_once_the_port_opens(cc_boot: CcBoot) -> None:
    assert cc_boot.client.ready_seen
    opened = cc_boot.boot.timings["port_opened"]
    assert opened is not None, "QMP reported no VSERPORT_CHANGE for sh.hyper.channel.0"
    assert cc_boot.boot.timings["host_connected"] < opened <= cc_boot.boot.timings["ready"]
    assert cc_boot.boot.port_open_at(hyperstart.TTY_PORT) is not None  # it opened the tty port too


def test_cc3_ping_is_acknowledged(cc_boot: CcBoot) -> None:
    rtts = [cc_boot.client.ping(10) for _ in range(3)]
    cc_boot.boot.facts["ping_rtts"] = [round(r, 4) for r in rtts]
    assert all(r < 5 for r in rtts)


def test_cc3_has_no_version_command(cc_boot: CcBoot) -> None:
    """VERSION (0) has no handler in the cc-agent 3.x: ERROR with its text; the agent keeps serving."""
    with pytest.raises(RemoteError, match='hyperstart VERSION: ERROR: No callback found for command ""') as e:
        cc_boot.client.version(10)
    cc_boot.boot.facts["version_reply"] = e.value.message
    cc_boot.client.ping(10)
