"""The runtimes' real agents (../shared/peers, see its README), for the boot tests that bring them
(test_runtime_agents.py): where they are, what they say of themselves, and a stream that records a real
agent's answers for the replay unit tests (tests/data/). Where ../shared/peers is absent (a fresh clone),
`peer` skips the test, saying so."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

PEERS = Path(__file__).resolve().parents[1].parent / "shared" / "peers"
KATA_AGENT = PEERS / "kata-agent-1.x" / "kata-agent"
CC_AGENT = PEERS / "cc-agent-3.x" / "cc-agent"
KATA_AGENT_VERSION = "1.13.0-alpha0-0b75b2d"  # what build-kata-agent.sh links in (-X main.version=...)
KATA_SOURCE = KATA_AGENT.with_name("kata-agent-1.x-0b75b2d-src.tar.gz")
KATA_BUILD = KATA_AGENT.with_name("build-kata-agent.sh")
# agents built for another architecture, kept between runs (the per-user cache's neighbour, not in it)
BUILT = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "osbuilder-tests" / "peers"
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


def kata_agent_for(goarch: str, cc: str) -> Path:
    """The Kata 1.x agent for `goarch`, built with the peer's own script from its vendored sources and
    kept in BUILT under a key of all the build reads: the source tarball, the script, `go version` and
    the C compiler's version. A run builds it again (20 s of Go, 38 CPU-s for arm64) only when one of
    them changed. tests/test_peer_rebuild.py rebuilds the x86_64 agent every run: that is its point."""
    peer(KATA_SOURCE)
    key = hashlib.sha256(goarch.encode())
    for path in (KATA_SOURCE, KATA_BUILD):
        key.update(hashlib.sha256(path.read_bytes()).digest())
    for command in (["go", "version"], [cc, "--version"]):
        key.update(subprocess.run(command, capture_output=True, check=True).stdout)
    agent = BUILT / f"kata-agent-{goarch}-{key.hexdigest()[:16]}"
    if not agent.is_file():
        agent.parent.mkdir(parents=True, exist_ok=True)
        partial = agent.with_name(agent.name + f".partial-{os.getpid()}")
        build = subprocess.run(["bash", str(KATA_BUILD), str(KATA_SOURCE), str(partial)],
                               env={**os.environ, "GOARCH": goarch, "CC": cc}, capture_output=True, text=True,
                               timeout=1200)
        if build.returncode != 0:
            partial.unlink(missing_ok=True)
            raise AssertionError(f"build-kata-agent.sh for {goarch} failed:\n{build.stderr[-3000:]}")
        partial.rename(agent)
    return agent
