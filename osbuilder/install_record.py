"""What the install steps put into a PREFIX, so that `osbuilder uninstall` takes out exactly that.

The record is PREFIX/osbuilder-install.json. Every install adds to it: the content-named files it made
(sha256), the stable links it pointed (and where they pointed before), the directories it created, and
each configuration file it wrote (the drop-in, or the configuration file it edited): its sha256 before
osbuilder's first change (and a drop-in's text then; an edited file keeps those bytes in its first
backup), the sha256 of what osbuilder last wrote, osbuilder's keys, and the backups made. A
configuration file found changed since osbuilder last wrote it starts a new entry: uninstall then
goes back to that state, not further. Paths are the installed system's (without DESTDIR), so a staged
tree can be moved. The record is written atomically, before the configuration is changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from osbuilder import fs
from osbuilder.errors import OsbuilderError

NAME = "osbuilder-install.json"
VERSION = 1


def sha256_bytes(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


@dataclass
class ConfigEntry:
    """One configuration file osbuilder wrote."""

    drop_in: bool  # osbuilder's drop-in (else: the configuration file, edited)
    section: str  # the [hypervisor.<name>] table of osbuilder's keys
    keys: dict[str, str]  # osbuilder's keys there and the values it set ("" in an edit: commented out)
    before: str | None  # sha256 before osbuilder's first change (None: the file did not exist)
    written: str  # sha256 of what osbuilder last wrote
    before_text: str | None = None  # a drop-in's content before osbuilder's first change
    backups: dict[str, str] = field(default_factory=dict)  # backups made of an edited file -> their sha256
    made_dirs: list[str] = field(default_factory=list)  # directories made for it (config.d)


@dataclass
class FileEntry:
    sha256: str
    made: bool  # osbuilder made it (it did not exist before the first install recorded)


@dataclass
class LinkEntry:
    target: str  # what osbuilder pointed it at
    previous: str | None  # what it pointed at before (None: it did not exist, or was not a link)


@dataclass
class Record:
    runtime: str
    prefix: str
    files: dict[str, FileEntry] = field(default_factory=dict)
    links: dict[str, LinkEntry] = field(default_factory=dict)
    configs: dict[str, ConfigEntry] = field(default_factory=dict)
    made_dirs: list[str] = field(default_factory=list)  # directories made for PREFIX

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, **asdict(self)}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: Path) -> Record:
        try:
            data: dict[str, Any] = json.loads(text)
            if data.pop("version") != VERSION:
                raise ValueError("an unknown version")
            return cls(runtime=data["runtime"], prefix=data["prefix"],
                       files={k: FileEntry(**v) for k, v in data["files"].items()},
                       links={k: LinkEntry(**v) for k, v in data["links"].items()},
                       configs={k: ConfigEntry(**v) for k, v in data["configs"].items()},
                       made_dirs=list(data["made_dirs"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise OsbuilderError(f"PREFIX: {where} is not an install record osbuilder can read ({e})") from None

    def note_config(self, path: str, *, drop_in: bool, section: str, keys: dict[str, str], old: bytes | None,
                    new: bytes, made_dirs: list[str]) -> ConfigEntry:
        """osbuilder writes `new` over `old` at `path`: add to its entry, or start one (first change, or the
        file was changed by someone else since osbuilder last wrote it)."""
        entry = self.configs.get(path)
        if entry is None or entry.written != sha256_bytes(old) or entry.section != section:
            entry = ConfigEntry(drop_in=drop_in, section=section, keys={}, before=sha256_bytes(old),
                                written="", before_text=old.decode() if drop_in and old is not None else None)
            self.configs[path] = entry
        entry.keys.update(keys)
        entry.written = sha256_bytes(new) or ""
        entry.made_dirs += [d for d in made_dirs if d not in entry.made_dirs]
        return entry


def load(path: Path) -> Record | None:
    """The record at `path` (None: there is none)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise OsbuilderError(f"PREFIX: cannot read the install record {path} ({e})") from None
    return Record.from_json(text, path)


def save(record: Record, path: Path) -> None:
    """Write the record atomically and durably (before the configuration it describes is changed)."""
    def fill(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write(record.to_json())
            f.flush()
            os.fsync(f.fileno())

    fs.write_via_temp(path, fill, mode=0o644)
    fs.fsync_dir(path.parent)
