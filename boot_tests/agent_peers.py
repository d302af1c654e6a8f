"""The runtimes' real agents (../shared/peers, see its README), for the boot tests that bring them
(test_runtime_agents.py): where they are, what they say of themselves, and a stream that records a real
agent's answers for the replay unit tests (tests/data/). Where ../shared/peers is absent (a fresh clone),
`peer` skips the test, saying so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

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


def peer(binary: Path) -> Path:
    if not binary.is_file():
        pytest.skip(f"{binary} is absent: the real agents come with ../shared/peers (see its README)")
    return binary
