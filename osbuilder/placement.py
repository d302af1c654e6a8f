"""Where an install goes: the installed system's root (DESTDIR), PREFIX, and the runtime's configuration
file as the runtime itself finds it.

The configuration file is RUNTIME_CONFIG, else the first of the runtime's own files that exists on the
installed system (its record's `configs`, in the runtime's order: Kata looks in /etc/kata-containers, then
its defaults directory, /usr/share/defaults/kata-containers for the packages and
/opt/kata/share/defaults/kata-containers for kata-deploy and the static release). Its symlinks are
resolved as the runtime resolves them on the installed system: an absolute target is a path under
DESTDIR (`configuration.toml -> configuration-qemu.toml`, `/etc/... -> /opt/kata/...`). The runtime reads
its drop-ins from `config.d/` beside the file that resolution ends at, so that is where they go.

Writes stay inside the runtime's own directories: a configuration file (or its config.d) that resolves
anywhere else is refused, and PREFIX must not lead, by a symlink on this host, out of DESTDIR.
PREFIX's default is the runtime's, or the one of the installation the configuration was found in
(/opt/kata/share/kata-containers next to /opt/kata/share/defaults/kata-containers).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from osbuilder import fs, runtimes
from osbuilder.errors import UsageError
from osbuilder.runtimes import Runtime
from osbuilder.settings import Settings

DROP_IN_DIR = "config.d"


def install_root(settings: Settings) -> Path:
    """The installed system's `/`: DESTDIR (absolute, symlinks resolved), else /."""
    return Path(os.path.realpath(settings.destdir)) if settings.destdir else Path("/")


def inside(path: Path, base: Path) -> bool:
    return path == base or base in path.parents


@dataclass(frozen=True)
class Located:
    """The configuration file the runtime loads: as named (`path`), and where its symlinks lead (`file`, a
    path with no symlink in it, under the install root); `drop_ins`: the config.d beside `file` that the
    install writes to (None: the file itself is edited)."""

    path: Path
    file: Path
    drop_ins: Path | None

    @property
    def shown(self) -> str:
        return str(self.path) if self.file == self.path else f"{self.path} -> {self.file}"


@dataclass(frozen=True)
class Placement:
    runtime: Runtime
    root: Path  # the installed system's /, on this host
    prefix: str  # PREFIX, on the installed system
    config: Located | None

    def host(self, system_path: str) -> Path:
        """A path of the installed system, on this host (under DESTDIR)."""
        return self.root / system_path.lstrip("/")

    def system(self, path: Path) -> str:
        """A path on this host under the install root, as the installed system names it."""
        relative = path.relative_to(self.root)
        return "/" if relative == Path(".") else f"/{relative}"

    @property
    def install_dir(self) -> Path:
        return self.host(self.prefix)


def place(settings: Settings) -> Placement:
    """Where this install goes; refused (one line naming the setting) when a write would leave DESTDIR
    or the runtime's own directories."""
    runtime = runtimes.get(settings.runtime)
    root = install_root(settings)
    found = find_config(settings, runtime, root)
    if settings.prefix:
        prefix = settings.prefix
    elif found is None:
        prefix = runtime.prefix
    else:
        named, loaded = (posixpath.dirname("/" + str(p.relative_to(root))) for p in found)
        prefix = runtime.prefix_for(loaded) if loaded in dict(runtime.prefixes) else runtime.prefix_for(named)
    placement = Placement(runtime, root, prefix, None)
    check_prefix(placement)
    if found is None:
        return placement
    path, file = found
    dirs = own_dirs(settings, placement)
    if not any(inside(file, d) for d in dirs):
        raise UsageError(f"RUNTIME_CONFIG: {path} is a symlink to {file}, outside the runtime's own directories; "
                         "refusing to write through it",
                         f"the runtime's directories: {', '.join(map(str, dict.fromkeys(dirs)))}; "
                         f"set RUNTIME_CONFIG={placement.system(file)} to use that file")
    return Placement(runtime, root, prefix, Located(path, file, drop_in_dir(settings, placement, file, dirs)))


def find_config(settings: Settings, runtime: Runtime, root: Path) -> tuple[Path, Path] | None:
    """The configuration file the runtime loads, (as named, resolved), both under `root`; None if there is none
    (RUNTIME_CONFIG must exist)."""
    candidates = [settings.runtime_config] if settings.runtime_config else list(runtime.configs)
    for c in candidates:
        resolved = fs.resolve_in(root, c)
        if resolved is not None and resolved.is_file():
            return root / c.lstrip("/"), resolved
    if settings.runtime_config:
        resolved = fs.resolve_in(root, settings.runtime_config)
        why = "does not exist" if resolved is None else fs.not_a_file(resolved)
        raise UsageError(f"RUNTIME_CONFIG: {root / settings.runtime_config.lstrip('/')} {why or 'is not a file'}")
    return None


def own_dirs(settings: Settings, placement: Placement) -> list[Path]:
    """The runtime's own directories on the installed system (resolved inside it): PREFIX, its default ones,
    those of its configuration files and RUNTIME_CONFIG's."""
    runtime = placement.runtime
    dirs = [placement.prefix, runtime.prefix, *(p for _, p in runtime.prefixes),
            *(posixpath.dirname(c) for c in runtime.configs)]
    if settings.runtime_config:
        dirs.append(posixpath.dirname(settings.runtime_config))
    return [fs.resolve_in(placement.root, d) or placement.host(d) for d in dirs]


def drop_in_dir(settings: Settings, placement: Placement, file: Path, dirs: list[Path]) -> Path | None:
    """config.d beside `file` when the install writes a drop-in (DROP_IN, by default the runtime's way);
    None when it edits the file."""
    runtime = placement.runtime
    if settings.drop_in is False:
        return None
    if not runtime.drop_ins:
        if settings.drop_in:
            raise UsageError(f"DROP_IN: the {runtime.name} runtime reads no {DROP_IN_DIR}/ drop-ins; "
                             "set DROP_IN=auto or no to edit its configuration file")
        return None
    where = file.parent / DROP_IN_DIR
    if where.is_symlink():
        real = fs.resolve_in(placement.root, placement.system(where))
        if real is None or not real.is_dir() or not any(inside(real, d) for d in dirs):
            raise UsageError(f"RUNTIME_CONFIG: {where} is a symlink to {os.readlink(where)}, not a directory "
                             "in the runtime's own directories; refusing to write through it")
        return real
    if os.path.lexists(where) and not where.is_dir():
        raise UsageError(f"RUNTIME_CONFIG: {where} is not a directory; the runtime cannot read drop-ins from it")
    return where


def check_prefix(placement: Placement) -> None:
    """PREFIX under DESTDIR; refused if the part of it that exists leads (by a symlink) out of DESTDIR."""
    root, base = placement.root, placement.install_dir
    existing = base
    while existing != root and not os.path.lexists(existing):
        existing = existing.parent
    real = Path(os.path.realpath(existing))
    if not inside(real, root):
        raise UsageError(f"PREFIX: {existing} leads to {real}, outside DESTDIR {root}; "
                         "refusing to write through that symlink")


def check_replaceable(path: Path, base: Path) -> None:
    """An existing entry osbuilder replaces must be its own: not a symlink that resolves outside PREFIX."""
    if path.is_symlink():
        real = Path(os.path.realpath(path))
        if not inside(real, Path(os.path.realpath(base))):
            raise UsageError(f"PREFIX: {path} is a symlink to {real}, outside {base}; not replacing it",
                             "remove it, or choose another PREFIX")
