"""The runtimes' own agents pass the gate, proven over their own protocols (../shared/peers: the real
Kata 1.x agent and Clear Containers 3.x agent, built from their vendored sources).

One boot per agent, through the boot check (`check.booted`, the protocol chosen from what the image
records): every phase passes, boot.json names the protocol, the proof and the agent's version, commands
go over SSH; then the protocol clients are driven against the same real agent (osbuilder/agent/protocols:
Version, an unknown method, an idle session with keepalive off, a JSON line that breaks a Kata agent's
session and the recovery, hyperstart's PING and VERSION); the guest powers off, its pass is recorded,
and `install-image` installs it for its runtime without --force. Two short boots show that the wrong
protocol fails fast, naming the unit the image really has. Without ../shared/peers the tests skip.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from boot_tests.agent_peers import CC_AGENT, KATA_AGENT, KATA_AGENT_VERSION, KEEPALIVE_INTERVAL, peer
from osbuilder import install
from osbuilder.agent import PORT_NAME
from osbuilder.agent.protocols import hyperstart
from osbuilder.agent.protocols.errors import ProtocolClosed, ProtocolTimeout, RemoteError
from osbuilder.agent.protocols.kata1 import Kata1Client
from osbuilder.agent.protocols.transport import connect_unix
from osbuilder.fs import sha256_file
from osbuilder.pytest_plugin import note_guest, note_logs
from osbuilder.settings import Settings
from osbuilder.vm import check, phases, profiles
from osbuilder.vm.guest import BootFailure, Guest

# One worker runs the module, in order: each guest is booted once, its tests use it in turn and the
# install test powers it off (on two workers each booted the guests again, and the order broke apart).
pytestmark = [pytest.mark.boot, pytest.mark.xdist_group("runtime-agents")]

KATA_CONFIG = '[hypervisor.qemu]\npath = "/usr/bin/qemu-system-x86_64"\nimage = "/old.img"\n'


def runtime_guest(settings: Settings, artifacts, kernel, accel, key, name: str) -> Iterator[tuple[Guest, Path]]:
    """The image of `settings` (a runtime's agent) booted through the check; powered off and its pass
    recorded after the module's tests (unless a test did)."""
    image = artifacts.image(settings)
    opts = check.guest_options(settings, image=image.path, kernel=kernel, accel=accel, name=name, ssh_key=key)
    with check.booted(opts, settings) as guest:
        yield guest, image.path
        if guest.vm.alive() and "powerdown" not in guest.phases:
            phases.run(guest, "powerdown")


def power_off_and_record(guest: Guest, settings: Settings) -> None:
    phases.run(guest, "powerdown")
    assert guest.passed, guest.phases
    assert guest.write_passing_records(settings.workdir)


def installs_the_booted_bytes(settings: Settings, image: Path, tmp_path: Path, config: str) -> None:
    """`install-image --image` for the settings' runtime, into a DESTDIR with its configuration: no
    --force needed, and the installed bytes are the booted ones."""
    dest = tmp_path / "dest"
    (dest / config.lstrip("/")).parent.mkdir(parents=True)
    (dest / config.lstrip("/")).write_text(KATA_CONFIG)
    targets = install.install_image(settings.with_values(DESTDIR=str(dest)), source=image)
    assert sha256_file(targets[0].installed) == sha256_file(image) == targets[0].sha256


# -- Kata Containers 1.x ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kata_settings(osbuilder_settings: Settings) -> Settings:
    return osbuilder_settings.with_values(AGENT_SOURCE_BIN=str(peer(KATA_AGENT)), RUNTIME="kata",
                                          AGENT_PROTOCOL="auto")


@pytest.fixture(scope="module")
def kata_booted(kata_settings, osbuilder_artifacts, osbuilder_boot_kernel, osbuilder_accel,
                osbuilder_ssh_key) -> Iterator[tuple[Guest, Path]]:
    yield from runtime_guest(kata_settings, osbuilder_artifacts, osbuilder_boot_kernel, osbuilder_accel,
                             osbuilder_ssh_key, "kata1-agent")


@pytest.fixture
def kata(kata_booted: tuple[Guest, Path], request: pytest.FixtureRequest) -> Guest:
    note_guest(request.node, kata_booted[0])
    return kata_booted[0]


def test_the_kata_agent_passes_the_check_over_kata1(kata: Guest) -> None:
    assert all(kata.profile.counts(p, kata.phases.get(p)) for p in profiles.READY), kata.phases
    info = kata.record()["agent"]
    assert info == {"protocol": "kata1", "name": "kata-agent", "service": "kata-agent.service", "commands": "ssh",
                    "version": KATA_AGENT_VERSION, "proof": "grpc.Health/Check SERVING"}
    assert isinstance(kata.agent, Kata1Client)
    opened = kata.vm.port_opened_at(PORT_NAME)
    assert opened is not None and opened <= kata.timings["agent_ready"]
    print(f"\nKata 1.x agent: port opened {opened:.1f}s, SERVING {kata.timings['agent_ready']:.1f}s after QEMU start")
    assert kata.exec(["systemctl", "is-active", "kata-agent.service"]).stdout.strip() == "active"  # over SSH


def test_kata1_version_names_the_agent(kata: Guest) -> None:
    assert kata.agent.version(10) == ("0.0.1", KATA_AGENT_VERSION)


def test_kata1_unknown_method_is_an_error_naming_the_status(kata: Guest) -> None:
    with pytest.raises(RemoteError, match=r"gRPC /grpc.Health/NoSuchMethod: UNIMPLEMENTED") as e:
        kata.agent.call("/grpc.Health/NoSuchMethod", b"", 10)
    assert e.value.code == "UNIMPLEMENTED"
    assert kata.agent.check(10) == "SERVING"  # the session survives a failed call


# -- Clear Containers 3.x -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cc_settings(osbuilder_settings: Settings) -> Settings:
    return osbuilder_settings.with_values(AGENT_SOURCE_BIN=str(peer(CC_AGENT)), RUNTIME="clear-containers",
                                          AGENT_PROTOCOL="auto", BOOT_PROFILE="auto")


@pytest.fixture(scope="module")
def cc_booted(cc_settings, osbuilder_artifacts, osbuilder_boot_kernel, osbuilder_accel,
              osbuilder_ssh_key) -> Iterator[tuple[Guest, Path]]:
    yield from runtime_guest(cc_settings, osbuilder_artifacts, osbuilder_boot_kernel, osbuilder_accel,
                             osbuilder_ssh_key, "cc3-agent")


@pytest.fixture
def cc(cc_booted: tuple[Guest, Path], request: pytest.FixtureRequest) -> Guest:
    note_guest(request.node, cc_booted[0])
    return cc_booted[0]


def test_the_cc_agent_passes_the_check_as_clear_containers_attaches_it(cc: Guest) -> None:
    assert all(cc.profile.counts(p, cc.phases.get(p)) for p in profiles.READY), cc.phases
    assert cc.profile.attach.name == "nvdimm" and cc.record()["agent"] == {
        "protocol": "hyperstart", "name": "cc-agent", "service": "cc-agent.service", "commands": "ssh",
        "version": "", "proof": "READY, PING/ACK"}
    for port in (hyperstart.CONTROL_PORT, hyperstart.TTY_PORT):
        assert cc.vm.port_opened_at(port) is not None, port
    print(f"\nCC 3.x agent: READY {cc.timings['agent_ready']:.1f}s after QEMU start")


def test_cc3_ping_is_acknowledged_and_has_no_version(cc: Guest) -> None:
    assert all(cc.agent.ping(10) < 5 for _ in range(3))
    with pytest.raises(RemoteError, match='hyperstart VERSION: ERROR: No callback found for command ""'):
        cc.agent.version(10)
    assert cc.agent.ping(10) < 5  # the agent keeps serving


def test_the_cc_image_installs_for_clear_containers_without_force(cc: Guest, cc_booted, cc_settings,
                                                                   tmp_path: Path) -> None:
    power_off_and_record(cc, cc_settings)
    installs_the_booted_bytes(cc_settings, cc_booted[1], tmp_path,
                              "/usr/share/defaults/clear-containers/configuration.toml")


# -- Kata Containers 1.x, after the Clear Containers guest: the idle session -----------------------
# The keepalive test needs the Kata session idle for longer than yamux's keepalive interval (30 s). The Kata
# guest waits, idle, while the Clear Containers image is made and booted and its tests run; the test then
# sleeps only for what is left of the interval (it slept about 25 s when it came right after the tests above).


def test_kata1_answers_with_keepalive_off_on_both_sides(kata: Guest) -> None:
    """The agent runs yamux with keepalive off and the client sends no keepalives: a session idle for
    longer than yamux's keepalive interval still answers, and the agent never pinged us; it answers a
    Ping of ours."""
    session = kata.agent.session
    assert session is not None
    idle_until = kata.vm.t0 + kata.vm.port_opened_at(PORT_NAME) + KEEPALIVE_INTERVAL + 2
    slept = max(0.0, idle_until - time.monotonic())
    time.sleep(slept)
    print(f"\nKata 1.x session idle until {KEEPALIVE_INTERVAL + 2:.0f}s after the port opened: slept {slept:.1f}s")
    assert kata.agent.check(10) == "SERVING"
    assert kata.agent.session is session and session.pings_answered == 0
    assert kata.agent.ping(10) < 5


def test_kata1_a_json_line_gets_no_json_answer(kata: Guest) -> None:
    """osbuilder's own JSON protocol on the port is a yamux protocol error for this agent: no JSON reply
    (why the protocol is chosen before the first byte is sent). The agent drops the session; the bytes
    of the line it did not read stay in the port and break the next session too, so no recovery is
    expected on this guest (the install test below needs only its power-off, by ACPI)."""
    kata.agent.close()
    raw = connect_unix(kata.vm.paths.agent, 10)
    raw.send(b'{"id":1,"cmd":"ping"}\n', time.monotonic() + 5)
    try:
        answer = raw.recv(time.monotonic() + 5)
    except (ProtocolTimeout, ProtocolClosed):
        answer = b""
    raw.close()
    assert not answer.startswith(b"{"), answer
    kata.agent = None


def test_the_kata_image_installs_for_kata_without_force(kata: Guest, kata_booted, kata_settings,
                                                        tmp_path: Path) -> None:
    power_off_and_record(kata, kata_settings)
    installs_the_booted_bytes(kata_settings, kata_booted[1], tmp_path, "/etc/kata-containers/configuration.toml")


# -- the wrong protocol fails fast ----------------------------------------------------------------


@pytest.mark.parametrize("agent_bin, protocol, unit", [
    (KATA_AGENT, "osbuilder", "kata-agent.service"),  # a Kata image proven as osbuilder's
    (None, "kata1", "osbuilder-agent.service"),  # osbuilder's image proven as Kata's
], ids=["kata-image-as-osbuilder", "osbuilder-image-as-kata1"])
def test_the_wrong_protocol_fails_within_seconds_of_the_agent_opening_its_port(
        agent_bin, protocol, unit, osbuilder_settings, osbuilder_artifacts, osbuilder_boot_kernel, osbuilder_accel,
        osbuilder_ssh_key, request: pytest.FixtureRequest) -> None:
    settings = osbuilder_settings.with_values(AGENT_SOURCE_BIN=str(peer(agent_bin)) if agent_bin else "")
    image = osbuilder_artifacts.image(settings)
    wrong = settings.with_values(AGENT_PROTOCOL=protocol)
    opts = check.guest_options(wrong, image=image.path, kernel=osbuilder_boot_kernel, accel=osbuilder_accel,
                               name=f"wrong-protocol-{protocol}", ssh_key=osbuilder_ssh_key)
    note_logs(request.node, opts.log_dir)
    with Guest.start(opts) as guest:
        with pytest.raises(BootFailure) as failure:
            check.boot_to_ready(guest)
        failed_at, opened = guest.timings.get("agent_gave_up"), guest.vm.port_opened_at(PORT_NAME)
        assert opened is not None and failed_at is not None, guest.timings
        share = guest.host.share(guest.vm.t0 + opened, until=guest.vm.t0 + failed_at)
    e = failure.value
    assert e.phase == "agent", e
    assert f"({unit}," in e.reason and f"did not answer over the {protocol} protocol" in e.reason, e.reason
    # SPEAK_GRACE seconds of the CPU the guest asked for: on a host that starved it (a cold kernel build
    # beside this test), as much longer as QEMU got less of it. The product stretches the grace while the
    # window since the port opened counts as starved and gives up once it no longer does, which on a busy
    # host can be a window that ends just under the line (waited 10.7 s of 21.5); either way it gave up
    # before SPEAK_GRACE / given seconds, given over that window (on a quiet host about 1: SPEAK_GRACE).
    given = share.given if share is not None else 1.0
    assert failed_at - opened <= phases.SPEAK_GRACE / max(given, 0.05) + 4, (opened, failed_at, share)
