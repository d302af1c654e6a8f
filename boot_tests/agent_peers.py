"""Booting osbuilder's image with a runtime's real agent (from ../shared/peers) for the protocol clients'
boot tests (test_agent_peer_kata1.py, test_agent_peer_cc3.py).

The agent is installed with AGENT_SOURCE_BIN (its unit is <binary name>.service); the guest gets the
virtio-serial ports that agent opens (VmSpec.serial_ports). A test connects to the port's socket right
after QEMU starts, long before the guest opens the port (as a runtime does), and waits for the agent
with the client's own readiness loop. Timings (seconds since QEMU started: the guest opening the
port, from QMP's VSERPORT_CHANGE; the first SERVING or READY) go to `agent-peer.json` in the boot's
log directory and are printed. Where ../shared/peers is absent the tests skip, saying so.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from osbuilder.agent.protocols.errors import ProtocolTimeout
from osbuilder.vm import check
from osbuilder.vm.console import format_tail
from osbuilder.vm.qemu import Vm, port_id

PEERS = Path(__file__).resolve().parents[1].parent / "shared" / "peers"
KATA_AGENT = PEERS / "kata-agent-1.x" / "kata-agent"
CC_AGENT = PEERS / "cc-agent-3.x" / "cc-agent"
KATA_AGENT_VERSION = "1.13.0-alpha0-0b75b2d"  # what build-kata-agent.sh links in (-X main.version=...)
KEEPALIVE_INTERVAL = 30.0  # hashicorp/yamux's default: an agent with keepalive on pings this often


class RecordingStream:
    """A ByteStream that keeps every byte received, to record a real agent's answers (for the replay
    unit tests in tests/data/)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.received = bytearray()

    def send(self, data: bytes, deadline: float) -> None:
        self.inner.send(data, deadline)

    def recv(self, deadline: float) -> bytes:
        chunk = self.inner.recv(deadline)
        self.received += chunk
        return chunk

    def close(self) -> None:
        self.inner.close()


def boot_name(name: str, kernel_config: Any) -> str:
    """The boot's name (its log directory): one per --kernel-config, whose boots may run at once."""
    return f"{name}-{kernel_config.id}" if kernel_config is not None else name


def peer(binary: Path) -> Path:
    if not binary.is_file():
        pytest.skip(f"{binary} is absent: the real agents come with ../shared/peers (see its README)")
    return binary


@dataclass
class PeerBoot:
    """A booted guest running a real agent, the client connected at QEMU start, and what was measured."""

    vm: Vm
    log_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def port_open_at(self, name: str) -> float | None:
        """Seconds since QEMU started at which the guest opened port `name` (QMP VSERPORT_CHANGE)."""
        for event in self.vm.qmp.events:
            data = event.get("data", {})
            if event.get("event") == "VSERPORT_CHANGE" and data.get("id") == port_id(name) and data.get("open"):
                ts = event["timestamp"]
                wall = ts["seconds"] + ts["microseconds"] / 1e6
                return round(wall - self.wall_t0, 3)
        return None

    @property
    def wall_t0(self) -> float:
        return self.facts["wall_t0"]

    def now(self) -> float:
        return round(time.monotonic() - self.vm.t0, 3)

    def write(self) -> None:
        record = {"timings": self.timings, **{k: v for k, v in self.facts.items() if k != "wall_t0"}}
        (self.log_dir / "agent-peer.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"\n{self.log_dir.name}: {json.dumps(record)}")



@contextmanager
def boot_peer(settings, artifacts, boot_kernel, boot_accel, agent: Path, ports: tuple[str, ...],
              name: str) -> Iterator[PeerBoot]:
    """The image with `agent` installed (AGENT_SOURCE_BIN; its unit is <binary name>.service), booted
    with `ports` as its virtio-serial ports; stopped (ACPI power button, then quit, then kill) after."""
    agent_settings = settings.with_values(AGENT_SOURCE_BIN=str(agent))
    image = artifacts.image(agent_settings)
    opts = check.guest_options(agent_settings, image=image.path, kernel=boot_kernel, accel=boot_accel, name=name)
    spec = dataclasses.replace(opts.spec(), serial_ports=ports)
    with Vm(spec, opts.log_dir) as vm:
        boot = PeerBoot(vm, opts.log_dir)
        boot.facts["wall_t0"] = time.time() - (time.monotonic() - vm.t0)
        boot.facts["timeout"] = opts.timeout
        try:
            yield boot
        finally:
            boot.write()


def wait_for(boot: PeerBoot, budget: float, step: Callable[[float], Any], what: str) -> Any:
    """`step(seconds)` until it returns (ProtocolTimeout: again), guarding the boot: QEMU gone or a
    fatal console line fails at once, with the console's tail."""
    deadline = boot.vm.t0 + budget
    while True:
        console = boot.vm.console
        if not boot.vm.alive() or console.fatal is not None:
            reason = console.fatal.reason if console.fatal else f"QEMU exited ({boot.vm.proc.returncode})"
            pytest.fail(f"{what}: {reason}\n{format_tail(console.tail(40), 'console tail')}")
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"{what}: not within {budget:.0f}s of QEMU's start\n"
                        f"{format_tail(console.tail(40), 'console tail')}")
        try:
            return step(min(2.0, left))
        except ProtocolTimeout:
            continue
