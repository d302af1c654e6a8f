"""What an artifact records about itself: /var/lib/osbuilder/osbuilder.yaml, read from a rootfs tree, an
image or an initrd without mounting or unpacking it.

The rootfs step writes the record (rootfs/build.py `metadata`): the osbuilder version, the distribution,
the packages, and the agent: its binary's name, its unit, its version and the protocol it speaks. The
boot check reads it to know which agent to prove and over which protocol; `agent_of` gives that part.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from osbuilder.errors import OsbuilderError
from osbuilder.rootfs.build import METADATA_PATH

log = logging.getLogger("osbuilder")


def read(artifact: Path) -> dict[str, Any] | None:
    """The record of a rootfs directory, an image (a partitioned disk image, DAX header or not) or an
    initrd (zstd-compressed newc); None when there is none or it cannot be read."""
    from osbuilder import readback

    try:
        if artifact.is_dir():
            text = (artifact / METADATA_PATH).read_bytes()
        elif _is_zstd(artifact):
            text = next((e.data for e in readback.list_initrd(artifact) if e.name == METADATA_PATH), b"")
        else:
            text = readback.read_file(artifact, "/" + METADATA_PATH)
        record = yaml.safe_load(text) if text else None
    except (OSError, OsbuilderError, yaml.YAMLError, KeyError, ValueError) as e:
        log.debug("no osbuilder record in %s: %s", artifact, e)
        return None
    return record if isinstance(record, dict) else None


def agent_of(artifact: Path) -> dict[str, Any] | None:
    """The agent an artifact records (name, service, version, protocol, init), or None."""
    record = read(artifact)
    found = record.get("agent") if record else None
    return found if isinstance(found, dict) else None


def _is_zstd(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x28\xb5\x2f\xfd"
