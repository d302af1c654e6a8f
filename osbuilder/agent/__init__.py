"""osbuilder's own guest agent: a static C binary serving a JSON-lines protocol on a virtio-serial port."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
AGENT_SOURCE = SOURCE_DIR / "agent.c"
UNIT_FILE = SOURCE_DIR / "osbuilder-agent.service"

AGENT_NAME = "osbuilder-agent"
PORT_NAME = "agent.channel.0"
SERVICE_NAME = "osbuilder-agent.service"
PROTOCOL_VERSION = 1

# Installed locations inside the guest.
GUEST_BINARY_PATH = "/usr/bin/osbuilder-agent"
GUEST_UNIT_PATH = "/usr/lib/systemd/system/osbuilder-agent.service"


def _read_version() -> str:
    """AGENT_VERSION from the C source's `#define AGENT_VERSION "x.y.z"`: the one source of truth."""
    m = re.search(r'^#define\s+AGENT_VERSION\s+"([^"]+)"', AGENT_SOURCE.read_text(), re.MULTILINE)
    if not m:
        raise RuntimeError(f"{AGENT_SOURCE}: no #define AGENT_VERSION")
    return m.group(1)


AGENT_VERSION = _read_version()


def source_hash() -> str:
    """sha256 over everything that determines the built agent and its install: agent.c, the
    unit file and build.py (it holds the compiler flags). For cache keys."""
    h = hashlib.sha256()
    for path in (AGENT_SOURCE, UNIT_FILE, SOURCE_DIR / "build.py"):
        data = path.read_bytes()
        h.update(f"{path.name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()
