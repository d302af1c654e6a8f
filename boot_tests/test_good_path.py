"""One boot of the session's image, many checks: read-only root, systemd running, agent, exec, SSH,
clean power-off, boot records, and the image left untouched. All on one xdist worker, in order."""

from __future__ import annotations

import json

import pytest

from boot_tests.imagetools import kernel_release
from osbuilder.agent import AGENT_VERSION, PROTOCOL_VERSION
from osbuilder.fs import sha256_file
from osbuilder.vm import phases, records, ssh
from osbuilder.vm.guest import BOOT_JSON, Guest
from osbuilder.vm.profiles import Outcome

pytestmark = [pytest.mark.boot, pytest.mark.xdist_group("good-path")]

IMAGE_HASHES: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def image_hash_before(osbuilder_image) -> str:
    IMAGE_HASHES["before"] = sha256_file(osbuilder_image.path)
    return IMAGE_HASHES["before"]


def test_kernel_boots_with_runtime_command_line(osbuilder_guest: Guest) -> None:
    cmdline = osbuilder_guest.exec(["cat", "/proc/cmdline"]).stdout.split()
    runtime_root = {"virtio-blk": "root=/dev/vda1",
                    "nvdimm": "root=/dev/pmem0p1"}[osbuilder_guest.opts.profile.attach.name]
    for param in (runtime_root, "rootfstype=ext4", "ro", "console=ttyS0", "panic=-1"):
        assert param in cmdline
    assert cmdline == osbuilder_guest.opts.cmdline.split()  # the kernel got exactly the command line we gave QEMU
    assert "kernel_handoff" in osbuilder_guest.timings
    assert osbuilder_guest.phases["root"] == Outcome.passed() and "root_mounted" in osbuilder_guest.timings


def test_root_filesystem_is_read_only(osbuilder_guest: Guest) -> None:
    options = phases.root_mount_options(osbuilder_guest)
    assert "ro" in options, options
    r = osbuilder_guest.exec(["touch", "/osbuilder-write-test"])
    assert r.status != 0 and "Read-only file system" in r.stderr


def test_systemd_is_running(osbuilder_guest: Guest) -> None:
    assert osbuilder_guest.phases["running"] == Outcome.passed()
    r = osbuilder_guest.exec(["systemctl", "is-system-running"])
    assert r.stdout.strip() == "running", r
    assert osbuilder_guest.guest_startup.get("total", 0) > 0


def test_agent_answers_ping_with_expected_version(osbuilder_guest: Guest) -> None:
    assert osbuilder_guest.agent is not None
    assert osbuilder_guest.agent.ping() == AGENT_VERSION
    info = osbuilder_guest.agent.version()
    assert info["version"] == AGENT_VERSION and info["protocol"] == PROTOCOL_VERSION and info["pid1"] is False


def test_exec_returns_status_and_output(osbuilder_guest: Guest) -> None:
    r = osbuilder_guest.exec(["sh", "-c", "echo hello; echo oops >&2; exit 7"])
    assert (r.status, r.stdout, r.stderr, r.timed_out) == (7, "hello\n", "oops\n", False)
    # the kernel we booted, whichever BOOT_KERNEL chose, not one the image brought along
    assert osbuilder_guest.exec(["uname", "-r"]).stdout.strip() == kernel_release(osbuilder_guest.opts.kernel.kernel)


def test_ssh_login_with_session_key(osbuilder_guest: Guest, osbuilder_ssh_key: ssh.SessionKey) -> None:
    assert osbuilder_guest.ssh_client is not None
    status, out, _ = ssh.run_command(osbuilder_guest.ssh_client, "cat /run/osbuilder/ssh/authorized_keys.root; id -u")
    assert status == 0
    assert osbuilder_ssh_key.public in out and out.strip().endswith("0")


def test_session_key_not_baked_into_image(osbuilder_guest: Guest, osbuilder_ssh_key: ssh.SessionKey) -> None:
    # the key reached the guest as a credential, not through the image
    r = osbuilder_guest.exec(["sh", "-c", "grep -rl osbuilder-boot-check /etc /root /usr/lib 2>/dev/null || true"])
    assert r.stdout.strip() == ""
    creds = osbuilder_guest.exec(["ls", "/run/credentials/@system"]).stdout.split()
    assert ssh.CREDENTIAL in creds


def test_timings_cover_every_phase(osbuilder_guest: Guest) -> None:
    for key in ("qemu_start", "first_console_byte", "kernel_handoff", "agent_ready", "system_running",
                "startup_finished", "ssh_ready"):
        assert key in osbuilder_guest.timings, (key, osbuilder_guest.timings)


def test_powers_off_cleanly_and_records_the_pass(osbuilder_guest: Guest, osbuilder_settings, osbuilder_image) -> None:
    # One test, not two: the records depend on the powerdown, and a test must not depend on
    # another test having run before it on the same guest (xdist decides the order).
    event = phases.run(osbuilder_guest, "powerdown")
    assert event["data"] == {"guest": True, "reason": "guest-shutdown"}
    assert osbuilder_guest.powerdown_seconds is not None and osbuilder_guest.powerdown_seconds < 60
    assert "power_down" in osbuilder_guest.vm.console.milestones
    osbuilder_guest.vm.stop()
    assert osbuilder_guest.vm.proc.poll() is not None

    assert osbuilder_guest.passed, osbuilder_guest.phases
    paths = osbuilder_guest.write_passing_records(osbuilder_settings.workdir)
    assert len(paths) == 2
    rec = records.passing_record(osbuilder_settings.workdir, osbuilder_image.path)
    assert rec is not None and rec["passed"] and rec["role"] == "image"
    assert rec["timings"]["agent_ready"] > 0
    krec = records.passing_record(osbuilder_settings.workdir, osbuilder_guest.opts.kernel.kernel)
    assert krec is not None and krec["role"] == "kernel"
    boot_json = json.loads(osbuilder_guest.write_boot_json().read_text())
    assert osbuilder_guest.write_boot_json() == osbuilder_guest.log_dir / BOOT_JSON
    assert boot_json["passed"] and set(boot_json["phases"].values()) == {"passed"}
    assert (osbuilder_guest.log_dir / "console.log").stat().st_size > 0
    assert any('"SHUTDOWN"' in line for line in (osbuilder_guest.log_dir / "qmp.jsonl").read_text().splitlines())


def test_image_unchanged(osbuilder_image) -> None:
    assert sha256_file(osbuilder_image.path) == IMAGE_HASHES["before"]


def test_phase_timings_reach_junit_xml(osbuilder_guest: Guest, request: pytest.FixtureRequest) -> None:
    """The guest's phase timings are this test's properties (`--junitxml` writes them)."""
    props = dict(request.node.user_properties)
    assert props["osbuilder_test_good_path_booted_agent_ready"] == osbuilder_guest.timings["agent_ready"] > 0
