"""console.py and systemd.py: what the guest prints, read: fatal lines, milestones, failed units, startup times."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from osbuilder.vm import console, systemd


@pytest.mark.parametrize("line, reason", [
    ("[    2.1] Kernel panic - not syncing: VFS: Unable to mount root fs", "kernel panic"),
    ("Kernel panic - not syncing: No working init found.  Try passing init= option", "no init to run"),
    ("Target filesystem doesn't have requested /sbin/init.", "no init to run"),
    ("[    3.0] Requested init /sbin/init failed (error -2).", "no init to run"),
    ("Gave up waiting for root file system device.  Common problems:", "initramfs shell"),
    ("ALERT!  /dev/vdz1 does not exist.  Dropping to a shell!", "initramfs shell"),
    ("(initramfs) ", "initramfs shell"),
    ("You are in emergency mode. After logging in, type \"journalctl -xb\"", "emergency mode"),
    ("Cannot open access to console, the root account is locked.", "emergency mode"),
    ("[  5.0] systemd[1]: Freezing execution.", "freezing execution"),
])
def test_fatal_patterns(line: str, reason: str) -> None:
    pat = console.match_fatal(line)
    assert pat is not None and reason in pat.reason and not pat.infrastructure


def test_kvm_internal_error_is_infrastructure() -> None:
    pat = console.match_fatal("KVM internal error. Suberror: 1")
    assert pat is not None and pat.infrastructure


@pytest.mark.parametrize("line", [
    "[  OK  ] Reached target multi-user.target - Multi-User System.",
    "Begin: Running /scripts/local-block ... done.",
    "[    0.000000] Linux version 6.1.0-50-cloud-amd64 (debian-kernel@lists.debian.org)",
    "panic=-1 in the command line",
])
def test_harmless_lines(line: str) -> None:
    assert console.match_fatal(line) is None


def test_milestones() -> None:
    assert console.match_milestones("[    0.000000] Linux version 6.1.0") == ["linux_version"]
    assert console.match_milestones("[    3.7] Run /init as init process") == ["init_started"]
    assert console.match_milestones("[ 5.1] EXT4-fs (vda1): mounted filesystem 9c1e-4 ro with ordered data mode."
                                    " Quota mode: none.") == ["root_mounted"]
    assert console.match_milestones("EXT4-fs (vda1): mounted filesystem with ordered data mode.") == ["root_mounted"]
    assert console.match_milestones("EXT4-fs (vdb): mounted filesystem with ordered data mode.") == []
    assert "systemd_started" in console.match_milestones("Welcome to Debian GNU/Linux 12 (bookworm)!")
    assert "multi_user" in console.match_milestones("[  OK  ] Reached target multi-user.target - Multi-User System.")
    # the agent as init says so; started by systemd it does not claim PID 1
    assert console.match_milestones("[    2.0] osbuilder-agent: version 0.1.0 starting as PID 1") == ["agent_started"]
    assert console.match_milestones("osbuilder-agent[231]: osbuilder-agent: version 0.1.0 starting") == []


def test_clean_strips_colours() -> None:
    assert console.clean(b"[\x1b[0;32m  OK  \x1b[0m] Started x.\r") == "[  OK  ] Started x."


def test_watcher_drains_to_log_and_finds_evidence(tmp_path: Path) -> None:
    stream = io.BytesIO(b"[    0.0] Linux version 6.1\n[\x1b[0;1;31mFAILED\x1b[0m] Failed to start a.service\n"
                        b"Kernel panic - not syncing: Attempted to kill init!\nvm login: ")
    w = console.ConsoleWatcher(tmp_path / "console.log", time.monotonic())
    w.start(stream)
    assert w.wait(lambda: w.closed, 5)
    assert (tmp_path / "console.log").read_bytes() == stream.getvalue()
    assert {"first_byte", "linux_version", "login_prompt"} <= set(w.milestones)
    assert w.fatal is not None and w.fatal.reason == "kernel panic" and "Attempted to kill init" in w.fatal.line
    assert w.failed_lines == ["[FAILED] Failed to start a.service"]
    assert w.tail(1) == ["vm login:"]


def test_a_unit_whose_program_cannot_run_is_noted_by_unit(tmp_path: Path) -> None:
    """systemd's lines for a program it could not execute (status 203/EXEC), kept per unit; other exits are not."""
    w = console.ConsoleWatcher(tmp_path / "console.log", time.monotonic())
    for line in ("[    3.88] systemd[1]: osbuilder-agent.service: Main process exited, code=exited, status=203/EXEC",
                 "[    3.89] systemd[1]: osbuilder-agent.service: Failed with result 'exit-code'.",
                 "[    5.01] systemd[1]: other.service: Main process exited, code=exited, status=1/FAILURE",
                 "[    6.20] kata-agent.service: Failed to execute /usr/bin/kata-agent: Exec format error",
                 "[    6.21] systemd[1]: osbuilder-agent.service: Main process exited, code=exited, status=203/EXEC"):
        w.feed(line)
    assert w.exec_failed == {
        "osbuilder-agent.service": "[    3.88] systemd[1]: osbuilder-agent.service: Main process exited, code=exited, "
                                   "status=203/EXEC",
        "kata-agent.service": "[    6.20] kata-agent.service: Failed to execute /usr/bin/kata-agent: Exec format error"}


def test_a_panic_line_is_named_by_its_cause():
    from osbuilder.vm.console import match_fatal

    assert match_fatal("Kernel panic - not syncing: No working init found.  Try passing init=").reason \
        == "no init to run"
    assert "root filesystem not found" in match_fatal(
        "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)").reason
    assert match_fatal("Kernel panic - not syncing: Attempted to kill init!").reason == "kernel panic"
    assert match_fatal("[    0.938013] Run /etc/init as init process").reason == "no init to run"
    assert match_fatal("[    0.934979] Run /sbin/init as init process") is None


def test_parse_span_and_startup() -> None:
    assert systemd.parse_span("1min 2.500s") == 62.5
    assert systemd.parse_span("865ms") == 0.865
    out = ("Startup finished in 5.626s (kernel) + 2.1s (initrd) + 1min 11.253s (userspace) = 1min 18.979s \n"
           "graphical.target reached after 10.962s in userspace.\n")
    assert systemd.parse_startup(out) == {"kernel": 5.626, "initrd": 2.1, "userspace": 71.253, "total": 78.979}
    assert systemd.parse_startup("Bootup is not yet finished") == {}


def test_parse_failed_units() -> None:
    text = ("osbuilder-test-fails.service loaded failed failed osbuilder test\n"
            "● ssh.service loaded failed failed OpenBSD Secure Shell server\n")
    assert systemd.parse_failed_units(text) == ["osbuilder-test-fails.service", "ssh.service"]

