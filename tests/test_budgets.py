"""Budgets follow the guest's progress (guest.Wait, options.Budget), on stub guests fed console lines on a timer.

BOOT_TIMEOUT 2 here: a phase tolerates 0.5 s of silence, and the boot's ceiling is 3 s after QEMU's start.
What the host gives QEMU is a stand-in (vmstubs.FakeHost): starved, not starved, or no evidence.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from vmstubs import FakeAgent, FakeHost, Printer, host_share, load_settings, stub_guest

from osbuilder.agent.client import AgentTimeout, ExecResult
from osbuilder.errors import InfrastructureError
from osbuilder.vm import check, phases
from osbuilder.vm.guest import BootFailure, Guest, HostOverloaded
from osbuilder.vm.options import Accel, BootOptions
from osbuilder.vm.profiles import Outcome

TIMEOUT = 2.0
SILENCE = 0.5
CEILING = 3.0
BANNER = "[    0.000000] Linux version 6.1.0-50-cloud-amd64 (debian-kernel@lists.debian.org)"
STARVED = host_share(ran=6.4, waited=54.0, seconds=30)  # a good guest under busy loops (bench/bench_loaded_host.py)
STARVED_GIVEN = 6.4 / (6.4 + 54.0)  # the share of the CPU it asked for that QEMU got there: 11%
IDLE = host_share(ran=0.3, waited=0.9, seconds=30)  # a guest hung idle under the same loops: not starved
SLACK = 0.5  # seconds a check may come late (a thread's wake-up on a loaded test machine)
TICK = 0.001  # guest.now() is rounded to milliseconds: a lower bound may read up to half of one short


def guest_with_host(tmp_path: Path, share: Any = None) -> Guest:
    guest = stub_guest(tmp_path, timeout=TIMEOUT)
    guest.host = FakeHost(share)  # type: ignore[assignment]
    return guest


def test_progress_keeps_a_phase_alive_past_its_silence_budget(tmp_path: Path) -> None:
    guest = guest_with_host(tmp_path)
    started = time.monotonic()
    with Printer(guest, every=0.1, stop_after=3 * SILENCE, last=BANNER) as printer:
        phases.kernel(guest)
    assert time.monotonic() - started >= 3 * SILENCE and printer.printed >= 10
    assert guest.phases["kernel"] == Outcome.passed()


def test_a_silent_guest_is_hung_within_the_silence_budget(tmp_path: Path) -> None:
    guest = guest_with_host(tmp_path, IDLE)
    with Printer(guest, every=0.05, stop_after=0.2), pytest.raises(BootFailure) as info:
        phases.kernel(guest)
    last_line_at, last_line = guest.vm.console.last_line or (0.0, "")
    assert SILENCE - TICK <= guest.now() - last_line_at <= SILENCE + SLACK, (guest.now(), last_line_at, info.value)
    e = info.value
    assert e.exit_code == 1 and e.phase == "kernel"
    assert e.reason.startswith("timed out after 0.5s waiting for the kernel's 'Linux version' banner on the console: "
                               "no progress from the guest for ")
    assert repr(last_line) in e.reason  # the last thing the guest did
    assert "host (not starving the guest): load average 9.01 7.50 5.25 on 2 CPUs" in e.detail
    assert "QEMU ran 0.3s of CPU and waited 0.9s for a CPU" in e.detail
    assert guest.phases["kernel"] == Outcome.failed(e.reason)


def test_a_silent_guest_without_evidence_of_the_host_is_hung(tmp_path: Path) -> None:
    """No /proc to read (FakeHost None): nothing says the host is at fault."""
    guest = guest_with_host(tmp_path, None)
    with pytest.raises(BootFailure, match="no progress from the guest for .* QEMU started at 0.0s"):
        phases.kernel(guest)
    assert guest.now() <= SILENCE + SLACK


def test_the_ceiling_with_progress_is_the_hosts_failure(tmp_path: Path) -> None:
    guest = guest_with_host(tmp_path, host_share(ran=40.0, waited=300.0, seconds=180))
    with Printer(guest, every=0.1), pytest.raises(InfrastructureError) as info:
        phases.kernel(guest)  # the banner never comes, but lines do
    e = info.value
    assert isinstance(e, HostOverloaded) and e.exit_code == 125 and e.phase == "kernel"
    assert CEILING - TICK <= guest.now() <= CEILING + SLACK
    assert e.message.startswith("boot infrastructure failure in phase 'kernel': the host is overloaded (load "
                                "average 9.01 on 2 CPUs): still waiting for the kernel's 'Linux version' banner "
                                "on the console 3s after QEMU's start (the ceiling, 1.5 x BOOT_TIMEOUT) while "
                                "the guest kept making progress")
    assert "boot check failed" not in str(e) and "timed out" not in e.message
    assert "QEMU ran 40.0s of CPU and waited 300.0s for a CPU" in e.detail
    assert "the guest's last progress: console line '[ " in e.detail
    assert guest.record()["failure"].startswith("kernel: the host is overloaded")


def test_a_guest_silent_while_the_host_starves_it_waits_for_the_ceiling(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    guest = guest_with_host(tmp_path, STARVED)
    with caplog.at_level(logging.WARNING, "osbuilder"), Printer(guest, every=0.1, stop_after=0.3), \
            pytest.raises(HostOverloaded) as info:
        phases.kernel(guest)
    assert guest.now() >= CEILING - TICK  # not failed at 0.8 s, when its silence ran out
    assert "while the host starved the guest (no progress for " in info.value.reason
    assert "QEMU ran 6.4s of CPU and waited 54.0s for a CPU" in info.value.detail
    warned = [r.getMessage() for r in caplog.records if "the host is starving it" in r.getMessage()]
    assert len(warned) == 1 and "kernel: no progress from the guest for 0.5s" in warned[0]


class EasingHost(FakeHost):
    """Starving QEMU until `until` (time.monotonic()), then not."""

    def __init__(self, until: float) -> None:
        super().__init__(STARVED)
        self.until = until

    def share(self, since: float) -> Any:
        return STARVED if time.monotonic() < self.until else IDLE


def test_once_the_host_stops_starving_it_a_silent_guest_is_hung(tmp_path: Path) -> None:
    guest = stub_guest(tmp_path, timeout=TIMEOUT)
    guest.host = EasingHost(time.monotonic() + 1.2)  # type: ignore[assignment]
    with pytest.raises(BootFailure) as info:
        phases.kernel(guest)
    # checked again within a second (a starved guest's wait goes on in slices of a second), long before the ceiling
    assert 1.2 - TICK <= guest.now() <= 1.2 + 1 + SLACK < CEILING and "no progress from the guest" in info.value.reason


def test_progress_is_what_only_the_guest_produces(tmp_path: Path) -> None:
    guest = guest_with_host(tmp_path)
    assert (guest.last_progress().at, guest.last_progress().what) == (0.0, "QEMU started")
    qmp = guest.vm.qmp
    qmp.events.append({"event": "RESUME"})  # QEMU's answer to `cont`
    qmp.arrived.append(0.5)
    qmp.events.append({"event": "POWERDOWN"})  # to system_powerdown
    qmp.arrived.append(0.6)
    assert guest.last_progress().what == "QEMU started"
    qmp.events.append({"event": "VSERPORT_CHANGE", "data": {"id": "agent", "open": True}})  # the agent opened its port
    qmp.arrived.append(0.7)
    assert (guest.last_progress().at, guest.last_progress().what) == (0.7, "QMP event VSERPORT_CHANGE")
    time.sleep(0.75)
    guest.vm.console.feed("[  OK  ] Reached target multi-user.target")
    assert guest.last_progress().what == "console line '[  OK  ] Reached target multi-user.target'"
    guest.note_progress("systemd's job queue")
    assert guest.last_progress().what == "systemd's job queue"


class SystemdAgent(FakeAgent):
    """`systemctl is-system-running --wait` that blocks its whole slice and says "starting" until `ready`
    calls to `systemctl show` (the job queue) have been made; the queue changes when `jobs_move`."""

    def __init__(self, ready: int, jobs_move: bool) -> None:
        super().__init__()
        self.ready, self.jobs_move, self.shows = ready, jobs_move, 0

    def exec(self, argv: list[str], timeout: float) -> ExecResult:
        self.calls.append(" ".join(argv))
        if "is-system-running" in argv:
            if self.shows >= self.ready:
                return ExecResult(0, None, "running\n", "", False)
            time.sleep(min(timeout, 0.3))
            return ExecResult(None, 9, "starting\n", "", True)
        if "show" in argv:
            self.shows += 1
            queued = 20 - self.shows if self.jobs_move else 20
            return ExecResult(0, None, f"{queued}\n{100 + (self.shows if self.jobs_move else 0)}\n", "", False)
        return ExecResult(1, None, "", "", False)  # systemd-analyze: not needed here


def test_systemds_job_queue_is_progress_while_the_console_is_quiet(tmp_path: Path) -> None:
    guest = guest_with_host(tmp_path, IDLE)
    guest.agent = SystemdAgent(ready=6, jobs_move=True)  # type: ignore[assignment]
    assert phases.running(guest) == "running"  # 6 slices of 0.3 s: past the silence budget, console silent
    assert guest.now() > 3 * SILENCE and guest.last_progress().what.startswith("systemd's job queue")


def test_a_systemd_whose_jobs_do_not_move_is_hung(tmp_path: Path) -> None:
    guest = guest_with_host(tmp_path, IDLE)
    guest.agent = SystemdAgent(ready=100, jobs_move=False)  # type: ignore[assignment]
    with pytest.raises(BootFailure) as info:
        phases.running(guest)
    assert info.value.phase == "running" and "waiting for systemd to finish starting" in info.value.reason
    assert guest.now() <= SILENCE + 0.3 + SLACK  # one slice of `--wait` late at most


class SlowAgent(FakeAgent):
    def exec(self, argv: list[str], timeout: float) -> ExecResult:
        raise AgentTimeout(f"no reply within {timeout:g}s")


@pytest.mark.parametrize("share, error, exit_code", [(STARVED, HostOverloaded, 125), (IDLE, BootFailure, 1),
                                                      (None, BootFailure, 1)])
def test_a_request_unanswered_on_a_starved_host_is_the_hosts_failure(tmp_path: Path, share: Any, error: type,
                                                                     exit_code: int) -> None:
    guest = guest_with_host(tmp_path, share)
    guest.agent = SlowAgent()  # type: ignore[assignment]
    guest.settle = lambda phase, seconds=3.0: None  # type: ignore[method-assign]  # QEMU's last words: none here
    with pytest.raises(error) as info:
        guest.exec(["findmnt", "/"], timeout=0.1)
    assert type(info.value) is error and info.value.exit_code == exit_code
    assert "agent exec 'findmnt' failed: no reply within 0.1s" in info.value.reason


def test_the_agents_lag_behind_multi_user_stretches_on_a_starved_host(tmp_path: Path) -> None:
    """The agent's grace after multi-user.target is in the CPU the guest asked for: 60 s is long past
    it on a host that gives QEMU what it asks for, within it at a tenth of that, and ten times the
    grace is past it again (the ceiling would blame the host for an agent that never answers)."""
    grace = stub_guest(tmp_path, timeout=TIMEOUT).budgets.agent_grace
    for share, ago, fails in ((IDLE, 60, True), (STARVED, 60, False), (STARVED, grace / STARVED_GIVEN + 2, True)):
        guest = guest_with_host(tmp_path, share)
        guest.vm.console.milestones["multi_user"] = guest.now() - ago
        if fails:
            with pytest.raises(BootFailure, match=f"reached multi-user.target {ago:.0f}s ago") as info:
                phases._check_agent_lag(guest, guest.budgets)
            assert ("11% of the CPU it asked for" in info.value.reason) == (share is STARVED), info.value.reason
        else:
            phases._check_agent_lag(guest, guest.budgets)


def test_a_silent_agent_on_a_starved_host_gets_its_grace_in_the_cpu_it_was_given(tmp_path: Path) -> None:
    """An agent that opened its port and stays silent fails after SPEAK_GRACE seconds of the CPU the guest
    asked for: on a host that gives QEMU a tenth of it, after about ten times as long, not never (the
    budget's ceiling would then blame the host for an image that speaks the wrong protocol)."""
    for share, silent, fails in ((IDLE, phases.SPEAK_GRACE + 0.5, True), (None, phases.SPEAK_GRACE + 0.5, True),
                                 (STARVED, phases.SPEAK_GRACE * 2, False),
                                 (STARVED, phases.SPEAK_GRACE / STARVED_GIVEN - 1, False),
                                 (STARVED, phases.SPEAK_GRACE / STARVED_GIVEN + 1, True)):
        guest = guest_with_host(tmp_path, share)
        port = guest.protocol.serial_ports[0]
        guest.vm.ports_opened[port] = guest.now() - silent
        if not fails:
            phases._check_agent_speaks(guest)
            assert "agent_gave_up" not in guest.timings, (share, silent)
            continue
        with pytest.raises(BootFailure) as info:
            phases._check_agent_speaks(guest)
        assert info.value.phase == "agent" and info.value.exit_code == 1, (share, silent)
        assert "did not answer over the osbuilder protocol within 8s" in info.value.reason
        assert ("of the CPU it asked for" in info.value.reason) == (share is STARVED), info.value.reason
        if share is STARVED:
            assert f"{silent:.0f}s here, the host giving QEMU 11% of the CPU it asked for" in info.value.reason


def test_an_overloaded_host_is_no_reason_to_distrust_kvm(tmp_path: Path) -> None:
    s = load_settings(tmp_path)
    opts = dataclasses.replace(stub_guest(tmp_path).opts, accel=Accel("kvm", "probe passed", True))
    calls: list[str] = []

    def fn(o: BootOptions) -> str:
        calls.append(o.accel.name)
        raise HostOverloaded("running", "the host is overloaded (load average 9 on 2 CPUs): ...")

    with pytest.raises(HostOverloaded):
        check.with_kvm_fallback(opts, s, fn)
    assert calls == ["kvm"]  # no retry under TCG, which would only be slower
