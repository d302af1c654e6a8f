"""`osbuilder uninstall`: take out what the install steps put into PREFIX and the runtime's configuration,
as PREFIX's install record (install_record.py) says, leaving the configuration as it was before.

- A drop-in osbuilder wrote is removed (or given back the content it had before); if someone added keys
  to it since, only osbuilder's keys are taken out, theirs stay.
- An edited configuration file is restored from the backup holding its content before osbuilder's first
  change, only if it still holds exactly what osbuilder wrote; the backups osbuilder made go too.
- Content-named files osbuilder made are removed, and links it pointed are removed or pointed back where
  they pointed before; then the directories it made, if empty, and the record.

Everything is checked before anything is touched: a file changed since osbuilder wrote it (a value of
osbuilder's keys, an edited configuration, an installed file or link) is one line saying so, exit 1,
nothing changed. `--dry-run` says what would be done.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from osbuilder import fs, install_record, runtime_config
from osbuilder.errors import OsbuilderError, UsageError
from osbuilder.install import config_lock, drop_in_staging, write_error, write_like
from osbuilder.install_record import ConfigEntry, Record, sha256_bytes
from osbuilder.placement import Placement, place
from osbuilder.settings import Settings

log = logging.getLogger("osbuilder")


@dataclass(frozen=True)
class Action:
    """One thing uninstall does: what it says, and doing it."""

    says: str
    run: Callable[[], None]


class Changed(OsbuilderError):
    """Something osbuilder installed was changed since: uninstall touches nothing (exit 1)."""


def uninstall(settings: Settings, *, dry_run: bool = False) -> list[Action]:
    placement = place(settings)
    record_path = placement.install_dir / install_record.NAME
    with config_lock(placement, "uninstall", exclusive=not dry_run):
        record = install_record.load(record_path)
        if record is None:
            raise UsageError(f"PREFIX: no osbuilder install record at {record_path}; nothing to uninstall",
                             "was it installed with another PREFIX, DESTDIR or RUNTIME_CONFIG?")
        actions = plan(placement, record, record_path)
        for action in actions:
            print(f"{'would ' if dry_run else ''}{action.says}")
        if not dry_run:
            for action in actions:
                action.run()
    return actions


def plan(placement: Placement, record: Record, record_path: Path) -> list[Action]:
    """Every action, in order (the configuration first, so the runtime stops pointing at the files before
    they go); a `Changed` error if something osbuilder installed changed since."""
    actions: list[Action] = []
    made_dirs = list(record.made_dirs)
    for system_path, entry in record.configs.items():
        actions += config_actions(placement, placement.host(system_path), entry)
        made_dirs += entry.made_dirs
    for system_path, link in record.links.items():
        actions += link_actions(placement.host(system_path), link)
    for system_path, file in record.files.items():
        actions += file_actions(placement.host(system_path), file)
    actions.append(Action(f"remove the install record {record_path}", lambda: remove(record_path)))
    for d in sorted(made_dirs, key=lambda d: d.count("/"), reverse=True):
        path = placement.host(d)
        actions.append(Action(f"remove {path} if empty (osbuilder made it)", partial(remove_dir, path)))
    return actions


def config_actions(placement: Placement, path: Path, entry: ConfigEntry) -> list[Action]:
    current = current_content(path)
    now = sha256_bytes(current)
    if now == entry.before:
        return [Action(f"leave {path}: already as before osbuilder's install", lambda: None)]
    if now == entry.written:
        if entry.drop_in:
            return [restore_drop_in(path, entry)]
        return restore_edited(placement, path, entry)
    if entry.drop_in and current is not None:
        return [strip_drop_in(path, entry, current)]
    raise Changed(f"uninstall: {path} changed since osbuilder wrote it; not restoring it (nothing was changed)",
                  "undo your change, or restore it yourself from its backup and remove "
                  f"{placement.install_dir / install_record.NAME}")


def restore_drop_in(path: Path, entry: ConfigEntry) -> Action:
    if entry.before_text is None:
        return Action(f"remove the drop-in {path}", lambda: remove(path))
    before = entry.before_text.encode()
    return Action(f"give the drop-in {path} back its content before osbuilder's install",
                  lambda: rewrite(path, before, drop_in=True))


def strip_drop_in(path: Path, entry: ConfigEntry, current: bytes) -> Action:
    """A drop-in someone else also wrote to: take only osbuilder's keys out, if they are as osbuilder left them."""
    values = runtime_config.section_of(runtime_config.parse(current, path), entry.section)
    for key, value in entry.keys.items():
        if values.get(key, "") != value:
            raise Changed(f"uninstall: {path} changed since osbuilder wrote it: {key} is {values.get(key)!r}, "
                          f"not {value!r}; not changing it (nothing was changed)",
                          f"set it back, or remove osbuilder's keys ({', '.join(entry.keys)}) yourself")
    rest = runtime_config.without_keys(current, entry.section, list(entry.keys), path)
    if rest is None:
        return Action(f"remove the drop-in {path} (nothing but osbuilder's keys in it)", lambda: remove(path))
    return Action(f"take osbuilder's keys ({', '.join(entry.keys)}) out of the drop-in {path}, keeping the rest",
                  lambda: rewrite(path, rest, drop_in=True))


def restore_edited(placement: Placement, path: Path, entry: ConfigEntry) -> list[Action]:
    """The edited file restored from the backup holding its content before osbuilder's first change (the
    file keeps its mode and owner); then the backups osbuilder made go."""
    candidates = [placement.host(b) for b in entry.backups] + sorted(path.parent.glob(f"{path.name}.bak*"))
    original = next((b for b in candidates if b.is_file() and not b.is_symlink()
                     and fs.sha256_file(b) == entry.before), None)
    if original is None:
        raise Changed(f"uninstall: no backup of {path} holds its content before osbuilder's install; "
                      "not restoring it (nothing was changed)")
    data = original.read_bytes()
    actions = [Action(f"restore {path} from {original}", lambda: rewrite(path, data))]
    for system_path, digest in entry.backups.items():
        backup = placement.host(system_path)
        if backup.is_file() and not backup.is_symlink() and fs.sha256_file(backup) == digest:
            actions.append(Action(f"remove the backup {backup}", partial(remove, backup)))
    return actions


def link_actions(link: Path, entry: install_record.LinkEntry) -> list[Action]:
    if not os.path.lexists(link):
        return []
    if not link.is_symlink() or os.readlink(link) != entry.target:
        now = os.readlink(link) if link.is_symlink() else "a file"
        raise Changed(f"uninstall: {link} changed since osbuilder installed it (now {now}, not "
                      f"{entry.target}); not removing it (nothing was changed)")
    previous = entry.previous
    if previous is not None and previous != entry.target:
        return [Action(f"point {link} back at {previous}", partial(relink, previous, link))]
    if previous is not None:
        return []
    return [Action(f"remove the link {link}", lambda: remove(link))]


def file_actions(path: Path, entry: install_record.FileEntry) -> list[Action]:
    if not entry.made or not os.path.lexists(path):
        return []
    if path.is_symlink() or not path.is_file() or fs.sha256_file(path) != entry.sha256:
        raise Changed(f"uninstall: {path} changed since osbuilder installed it; not removing it "
                      "(nothing was changed)")
    return [Action(f"remove {path}", lambda: remove(path))]


def current_content(path: Path) -> bytes | None:
    if path.is_symlink() or (os.path.lexists(path) and not path.is_file()):
        raise Changed(f"uninstall: {path} is no longer the file osbuilder wrote; not changing it "
                      "(nothing was changed)")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise OsbuilderError(f"RUNTIME_CONFIG: cannot read {path}: {e.strerror}") from None


def rewrite(path: Path, data: bytes, *, drop_in: bool = False) -> None:
    """`path` with `data`, its mode and owner kept; a drop-in staged outside config.d (the runtime reads all of it)."""
    try:
        write_like(path, data, path.stat(), staged=drop_in_staging(path) if drop_in else None)
    except OSError as e:
        raise write_error("RUNTIME_CONFIG", f"restoring {path}", e)


def remove(path: Path) -> None:
    try:
        path.unlink()
        fs.fsync_dir(path.parent)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise write_error("PREFIX", f"removing {path}", e)


def relink(target: str, link: Path) -> None:
    try:
        fs.link_atomically(target, link)
    except OSError as e:
        raise write_error("PREFIX", f"pointing {link} back at {target}", e)


def remove_dir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty (someone else's files), or already gone: it stays
