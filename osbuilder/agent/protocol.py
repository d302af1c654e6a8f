"""The guest agents' protocols as records: one `AgentProtocol` each, owning every fact about it.

A record says which virtio-serial ports (or vsock port) the guest needs for it, how the boot check
proves the agent is up over it and which version it is (`connect`, `wait_ready`), what else the check
may ask of it (run commands, power off a guest it is init of), and what its agents' binaries carry
(to tell, for AGENT_PROTOCOL=auto, which protocol a runtime's agent binary speaks, without running it).
The wire clients are modules of their own:

    osbuilder   osbuilder's JSON lines on agent.channel.0 (agent/client.py)
    kata1       Kata 1.x: gRPC on yamux over agent.channel.0 (protocols/kata1.py)
    hyperstart  Clear Containers 3.x: frames on sh.hyper.channel.0 and .1 (protocols/hyperstart.py)
    kata        Kata 2.x/3.x: ttRPC on vsock port 1024 (protocols/ttrpc.py)

What an agent's protocol cannot do the boot check does otherwise: commands (`running`, `exec`) go over
SSH, the power-off through the ACPI button. To add a protocol: its client module, and one record below.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from osbuilder.agent import PORT_NAME
from osbuilder.agent.client import AgentClient, AgentTimeout
from osbuilder.errors import UsageError

PortPath = Callable[[str], Path]  # a virtio-serial port's name -> the UNIX socket QEMU serves it on


@dataclass(frozen=True)
class Ready:
    """What proved the agent up: its own version ("" when the protocol cannot tell), and the proof."""

    version: str
    proof: str  # e.g. "ping", "grpc.Health/Check SERVING", "READY, PING/ACK"


@dataclass(frozen=True)
class AgentProtocol:
    name: str
    description: str
    serial_ports: tuple[str, ...]  # the virtio-serial ports its agent opens (by name)
    connect: Callable[[PortPath, int | None, float], Any]  # (port sockets, vsock CID, timeout) -> a client
    wait_ready: Callable[[Any, float], Ready]  # (client, seconds) -> Ready; AgentTimeout while not yet
    vsock_port: int | None = None  # the vsock port its agent listens on (the guest needs a vsock device)
    can_exec: bool = False  # the check runs commands through it (else over SSH)
    can_poweroff: bool = False  # it powers off a guest it is the init of (else the ACPI button)
    markers: tuple[bytes, ...] = ()  # byte strings only its agents' binaries carry


PROTOCOLS: dict[str, AgentProtocol] = {}


def register(protocol: AgentProtocol) -> AgentProtocol:
    if protocol.name in PROTOCOLS or protocol.name == "auto":
        raise ValueError(f"agent protocol {protocol.name!r} is registered twice (or named auto)")
    PROTOCOLS[protocol.name] = protocol
    return protocol


@contextmanager
def registered(protocol: AgentProtocol) -> Iterator[AgentProtocol]:
    """`protocol` registered for the duration of a `with` block (tests)."""
    register(protocol)
    try:
        yield protocol
    finally:
        del PROTOCOLS[protocol.name]


def names() -> tuple[str, ...]:
    return tuple(PROTOCOLS)


def get(name: str) -> AgentProtocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise UsageError(f"AGENT_PROTOCOL: no agent protocol {name!r}; expected one of auto, "
                         f"{', '.join(PROTOCOLS)}") from None


def spoken_by(binary: Path, candidates: tuple[str, ...]) -> list[str]:
    """Which of `candidates` (protocol names) the agent binary carries the markers of."""
    data = binary.read_bytes()
    return [name for name in candidates if any(m in data for m in get(name).markers)]


# -- osbuilder ---------------------------------------------------------------------------------


def _osbuilder_connect(port: PortPath, cid: int | None, timeout: float) -> AgentClient:
    return AgentClient.connect_unix(port(PORT_NAME), timeout)


def _osbuilder_ready(client: AgentClient, seconds: float) -> Ready:
    return Ready(client.wait_ready(seconds, try_timeout=0.5), "ping")


OSBUILDER = register(AgentProtocol(
    name="osbuilder",
    description="osbuilder's own agent: JSON lines on agent.channel.0 (ping, version, exec, poweroff)",
    serial_ports=(PORT_NAME,),
    connect=_osbuilder_connect,
    wait_ready=_osbuilder_ready,
    can_exec=True,
    can_poweroff=True,
    markers=(b"Serves newline-delimited JSON requests on the virtio-serial port",),
))


# -- Kata Containers 1.x -----------------------------------------------------------------------


def _kata1_connect(port: PortPath, cid: int | None, timeout: float) -> Any:
    from osbuilder.agent.protocols.kata1 import Kata1Client

    return Kata1Client.connect_unix(port(PORT_NAME), timeout)


def _kata1_ready(client: Any, seconds: float) -> Ready:
    client.wait_ready(seconds)
    _, version = client.version(timeout=max(5.0, seconds))
    return Ready(version, "grpc.Health/Check SERVING")


KATA1 = register(AgentProtocol(
    name="kata1",
    description="Kata Containers 1.x: gRPC on yamux over agent.channel.0 (grpc.Health Check, Version)",
    serial_ports=(PORT_NAME,),
    connect=_kata1_connect,
    wait_ready=_kata1_ready,
    markers=(b"github.com/hashicorp/yamux",),
))


# -- Clear Containers 3.x ------------------------------------------------------------------------

HYPER_CONTROL, HYPER_TTY = "sh.hyper.channel.0", "sh.hyper.channel.1"


def _hyperstart_connect(port: PortPath, cid: int | None, timeout: float) -> Any:
    from osbuilder.agent.protocols.hyperstart import HyperstartClient

    return HyperstartClient.connect_unix(port(HYPER_CONTROL), port(HYPER_TTY), timeout)


def _hyperstart_ready(client: Any, seconds: float) -> Ready:
    client.wait_ready(seconds)  # READY, sent once when the agent is up and the host connected
    client.ping(timeout=max(5.0, seconds))  # answered with ACK
    return Ready("", "READY, PING/ACK")  # the agent has no VERSION command


HYPERSTART = register(AgentProtocol(
    name="hyperstart",
    description="Clear Containers 3.x: hyperstart frames on sh.hyper.channel.0/.1 (READY, PING/ACK)",
    serial_ports=(HYPER_CONTROL, HYPER_TTY),
    connect=_hyperstart_connect,
    wait_ready=_hyperstart_ready,
    markers=(HYPER_CONTROL.encode(),),
))


# -- Kata Containers 2.x/3.x ---------------------------------------------------------------------

KATA_VSOCK_PORT = 1024


class VsockTtrpc:
    """The Kata agent's ttRPC over vsock: connected (again) until the agent listens and answers."""

    def __init__(self, cid: int) -> None:
        self.cid = cid
        self.client: Any = None

    def wait_ready(self, seconds: float) -> tuple[str, str]:
        from osbuilder.agent.protocols.errors import ProtocolError
        from osbuilder.agent.protocols.ttrpc import TtrpcClient

        deadline = time.monotonic() + seconds
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if self.client is None:
                    self.client = TtrpcClient.connect_vsock(self.cid, KATA_VSOCK_PORT,
                                                            timeout=max(0.1, deadline - time.monotonic()))
                if self.client.check(timeout=max(0.1, deadline - time.monotonic())) == "SERVING":
                    return self.client.version(timeout=5.0)
            except (OSError, ProtocolError) as e:
                last = e
                self.close()
                time.sleep(0.1)
        raise AgentTimeout(f"the Kata agent on vsock {self.cid}:{KATA_VSOCK_PORT} did not answer (last: {last})")

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def _kata_connect(port: PortPath, cid: int | None, timeout: float) -> VsockTtrpc:
    if cid is None:
        raise UsageError("AGENT_PROTOCOL=kata: the guest has no vsock device")
    return VsockTtrpc(cid)


def _kata_ready(client: VsockTtrpc, seconds: float) -> Ready:
    _, version = client.wait_ready(seconds)
    return Ready(version, "grpc.Health/Check SERVING (ttRPC)")


KATA = register(AgentProtocol(
    name="kata",
    description="Kata Containers 2.x/3.x: ttRPC on vsock port 1024 (grpc.Health Check, Version)",
    serial_ports=(),
    connect=_kata_connect,
    wait_ready=_kata_ready,
    vsock_port=KATA_VSOCK_PORT,
    markers=(b"ttrpc",),
))
