"""`osbuilder install-image` / `install-initrd` / `install-kernel`: put boot-checked artifacts where a runtime
finds them.

An artifact is installable once a boot check passed for that exact content (same sha256); `--force`
overrides and says so. The artifact is hashed once, as it is copied into a temp file in the install
directory, and the gate asks for the boot record of that hash: the bytes installed are the bytes that
were checked, even if the source is replaced meanwhile. The copy (sparse, fsync'd) is renamed to a
content-named file with a stable symlink to it (`container.img`, `container-initrd.img`,
`vmlinuz.container`, `vmlinux.container`). A failed or interrupted install removes its temp files (a
killed one's are swept by the next run, see fs.temp_beside).

The runtime's configuration.toml is pointed at the symlink (`image =` / `kernel =` in its
[hypervisor.*] section, as an escaped TOML string that must read back as exactly that path; `initrd =`
for an initrd, which comments out `image =`, and the reverse). It is
rewritten with its mode and owner, fsync'd with its directory, after a backup that never replaces an
earlier one (`.bak`, then `.bak.1`, ...).

Symlinks: nothing is written outside the install root (DESTDIR, else /). configuration.toml may be a
symlink (Kata's packages link it to configuration-qemu.toml) only when it resolves inside the
runtime's own directories; the file it points to is then edited and the link kept. An existing stable
link or content-named file is replaced only when it resolves inside PREFIX.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import itertools
import json
import logging
import os
import posixpath
import re
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from osbuilder import errors, fs, layout, runtimes
from osbuilder.errors import InfrastructureError, OsbuilderError, UsageError
from osbuilder.fs import discard, link_atomically, not_a_file, publish, sha256_file, temp_beside
from osbuilder.layout import Workdir
from osbuilder.settings import Settings
from osbuilder.vm import attachments
from osbuilder.vm.records import passed_attachments, passing_record_of

log = logging.getLogger("osbuilder")

BLOCK = 1 << 20
ZEROS = bytes(BLOCK)


@dataclass(frozen=True)
class Target:
    """Where one artifact goes: its source, its content's hash, the content-named file and the stable link."""

    source: Path
    sha256: str
    installed: Path
    link: Path


@dataclass(frozen=True)
class Item:
    """One file to install: its source, the content-named pattern and the stable link's name."""

    source: Path
    pattern: str
    link_name: str


@dataclass(frozen=True)
class Config:
    """The runtime's configuration.toml: its path, and the file to rewrite (the path, or its symlink's target)."""

    path: Path
    file: Path


def install_image(settings: Settings, *, dry_run: bool = False, force: bool = False,
                  source: Path | None = None) -> list[Target]:
    """WORKDIR's container.img (or `source`, an image gated in this WORKDIR's boot records)."""
    items = [Item(source or Workdir.of(settings).image, "osbuilder-{}.img", layout.IMAGE)]
    return install(settings, "install-image", items, "image", image_lacks, dry_run=dry_run, force=force)


def install_initrd(settings: Settings, *, dry_run: bool = False, force: bool = False,
                   source: Path | None = None) -> list[Target]:
    """The initrd (`osbuilder initrd`, or `source`), pointed at by `initrd =`; `image =` is commented out."""
    items = [Item(source or Workdir.of(settings).initrd, "osbuilder-initrd-{}.img", layout.INITRD)]
    return install(settings, "install-initrd", items, "initrd", initrd_lacks, dry_run=dry_run, force=force)


def install_kernel(settings: Settings, *, dry_run: bool = False, force: bool = False,
                   source: Path | None = None) -> list[Target]:
    """WORKDIR's kernel (or `source`, a vmlinuz; a vmlinux.container beside it goes too)."""
    files = Workdir.of(settings).kernel
    vmlinuz = source or files.vmlinuz
    vmlinux = vmlinuz.with_name(layout.VMLINUX) if source else files.vmlinux
    items = [Item(vmlinuz, "vmlinuz-osbuilder-{}.container", layout.VMLINUZ)]
    if vmlinux.is_file():
        items.append(Item(vmlinux, "vmlinux-osbuilder-{}.container", layout.VMLINUX))
    return install(settings, "install-kernel", items, "kernel", kernel_lacks, dry_run=dry_run, force=force)


# -- where things go ------------------------------------------------------------------------


def install_root(settings: Settings) -> Path:
    """The installed system's `/`: DESTDIR (absolute, symlinks resolved), else /."""
    return Path(os.path.realpath(settings.destdir)) if settings.destdir else Path("/")


def destdir(settings: Settings, path: str) -> Path:
    """`path` on the installed system, under DESTDIR."""
    return install_root(settings) / path.lstrip("/")


def prefix(settings: Settings) -> str:
    return settings.prefix or runtimes.get(settings.runtime).prefix


def runtime_dirs(settings: Settings) -> list[Path]:
    """The runtime's own directories: PREFIX, its default one, those of its configuration files."""
    runtime = runtimes.get(settings.runtime)
    dirs = [prefix(settings), runtime.prefix, *(posixpath.dirname(c) for c in runtime.configs)]
    if settings.runtime_config:
        dirs.append(posixpath.dirname(settings.runtime_config))
    return [destdir(settings, d) for d in dirs]


def inside(path: Path, base: Path) -> bool:
    return path == base or base in path.parents


def install_dir(settings: Settings) -> Path:
    """PREFIX under DESTDIR; refused if the part of it that exists leads (by a symlink) out of DESTDIR."""
    root, base = install_root(settings), destdir(settings, prefix(settings))
    existing = base
    while existing != root and not os.path.lexists(existing):
        existing = existing.parent
    real = Path(os.path.realpath(existing))
    if not inside(real, root):
        raise UsageError(f"PREFIX: {existing} leads to {real}, outside DESTDIR {root}; "
                         "refusing to write through that symlink")
    return base


def runtime_config(settings: Settings) -> Config | None:
    """The runtime's configuration.toml, if there is one (RUNTIME_CONFIG must exist)."""
    candidates = [settings.runtime_config] if settings.runtime_config else runtimes.get(settings.runtime).configs
    for c in candidates:
        path = destdir(settings, c)
        if path.is_file():
            return Config(path, config_file(settings, path))
    if settings.runtime_config:
        path = destdir(settings, settings.runtime_config)
        raise UsageError(f"RUNTIME_CONFIG: {path} {not_a_file(path) or 'is not a file'}")
    return None


def config_file(settings: Settings, path: Path) -> Path:
    """The file to rewrite for `path`: itself, or where its symlinks lead if that is the runtime's own."""
    real = Path(os.path.realpath(path))
    if real == path:
        return path
    dirs = runtime_dirs(settings)
    if any(inside(real, d) for d in dirs):
        return real
    raise UsageError(f"RUNTIME_CONFIG: {path} is a symlink to {real}, outside the runtime's own directories; "
                     "refusing to write through it",
                     f"the runtime's directories: {', '.join(map(str, dict.fromkeys(dirs)))}; "
                     f"set RUNTIME_CONFIG={real} to edit that file")


def check_replaceable(path: Path, base: Path) -> None:
    """An existing entry osbuilder replaces must be its own: not a symlink that resolves outside PREFIX."""
    if path.is_symlink():
        real = Path(os.path.realpath(path))
        if not inside(real, Path(os.path.realpath(base))):
            raise UsageError(f"PREFIX: {path} is a symlink to {real}, outside {base}; not replacing it",
                             "remove it, or choose another PREFIX")


# -- the steps --------------------------------------------------------------------------------


def install(settings: Settings, step: str, items: list[Item], key: str, lacks: Lacks, *, dry_run: bool,
            force: bool) -> list[Target]:
    """Check where everything goes, stage and gate the files, publish them, then point the config at them."""
    for item in items:
        why = not_a_file(item.source)
        if why:
            raise UsageError(f"{step}: {item.source} {why}; build it first")
    base = install_dir(settings)
    for item in items:
        check_replaceable(base / item.link_name, base)
    config = runtime_config(settings)
    runtime_path = posixpath.join(prefix(settings), items[0].link_name)
    old, new = planned_config(config, key, runtime_path)

    def announce(targets: list[Target]) -> None:
        report(settings.runtime, targets, config, (old, new), key, runtime_path, dry_run=dry_run)

    if dry_run:
        targets = [target(base, item, sha256_file(item.source)) for item in items]
        gate(settings, step, items[0].source, targets[0], force, lacks)
        for t in targets[1:]:
            gate_companion(settings, step, targets[0], t, force)
        announce(targets)
        return targets
    targets = copy_in(settings, step, items, base, force, lacks, announce)
    if config is not None and new != old:
        write_config(config.file, new)
    return targets


def copy_in(settings: Settings, step: str, items: list[Item], base: Path, force: bool, lacks: Lacks,
            announce: Callable[[list[Target]], None]) -> list[Target]:
    """Copy every item into a temp file in `base`, hashing it; gate the first item on that hash; then
    publish them all. On any failure nothing is left: no temp file, no directory made for nothing."""
    created = make_dirs(base)
    staged: list[Path] = []
    done = False
    try:
        targets = []
        for item in items:
            staged.append(temp_beside(base / item.link_name))
            targets.append(target(base, item, copy_hashing(item.source, staged[-1])))
            if len(targets) == 1:
                gate(settings, step, item.source, targets[0], force, lacks)
            else:
                gate_companion(settings, step, targets[0], targets[-1], force)
            check_replaceable(targets[-1].installed, base)
        announce(targets)
        for t, tmp in zip(targets, staged, strict=True):
            publish(tmp, t.installed)
            link_atomically(t.installed.name, t.link)
            fs.fsync_dir(base)
        done = True
        return targets
    except OSError as e:
        raise write_error("PREFIX", f"installing into {base}", e)
    finally:
        for tmp in staged:
            discard(tmp)
        for d in [] if done else reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty


def target(base: Path, item: Item, digest: str) -> Target:
    return Target(item.source, digest, base / item.pattern.format(digest[:12]), base / item.link_name)


def gate(settings: Settings, step: str, source: Path, t: Target, force: bool, lacks: Lacks) -> None:
    """Refuse content whose boot records `lacks` what installing it needs (a pass in the way the runtime
    will boot it); `--force` overrides and says so."""
    why = lacks(settings, passed_attachments(passing_record_of(Workdir.of(settings), t.sha256)))
    if why is None:
        return
    if force:
        log.warning("%s: --force: installing %s without %s", step, source, why)
        return
    todo = ", or use --force" if ";" in why else "; run `osbuilder boot --check` first, or use --force"
    raise UsageError(f"{step}: {source} has no {why} (sha256 {t.sha256[:12]}){todo}")


def gate_companion(settings: Settings, step: str, gated: Target, t: Target, force: bool) -> None:
    """A file installed along the gated one (vmlinux.container with vmlinuz.container) has a gate of its
    own: the kernel build's record (kernel-metadata.json) must list it, with the content being installed,
    as an output of the same build as the gated file's content."""
    outputs = kernel_outputs(Workdir.of(settings).kernel.metadata)
    if outputs.get(gated.link.name) == gated.sha256 and outputs.get(t.link.name) == t.sha256:
        return
    why = (f"record of being built with the boot-checked {gated.link.name} (sha256 {gated.sha256[:12]}): "
           f"{Workdir.of(settings).kernel.metadata.name} lists other content")
    if force:
        log.warning("%s: --force: installing %s without a %s", step, t.source, why)
        return
    raise UsageError(f"{step}: {t.source} (sha256 {t.sha256[:12]}) has no {why}; rebuild the kernel with "
                     "`osbuilder kernel` and boot-check it, or use --force")


def kernel_outputs(metadata: Path) -> dict[str, str]:
    """The output name -> sha256 a kernel build recorded ({} when there is no readable record)."""
    try:
        outputs = json.loads(metadata.read_text()).get("outputs", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return outputs if isinstance(outputs, dict) else {}


# What the boot records of a content lack for installing it (None: nothing), given the attachments it passed
# in, each with the digests of what it booted with.
Lacks = Callable[[Settings, dict[str, Any]], "str | None"]


def image_lacks(settings: Settings, passes: dict[str, Any]) -> str | None:
    """An image needs a pass attached the way the RUNTIME attaches it, with an agent the runtime speaks to."""
    attach = runtimes.get(settings.runtime).attachment
    if attach not in passes:
        return f"passing boot check attached as the {settings.runtime} runtime attaches it ({attach})"
    return agent_unspoken(settings, passes[attach])


def initrd_lacks(settings: Settings, passes: dict[str, Any]) -> str | None:
    """An initrd needs a pass booted as the initrd, with an agent the runtime speaks to."""
    if attachments.INITRD.name not in passes:
        return "passing boot check in the initrd profile"
    return agent_unspoken(settings, passes[attachments.INITRD.name])


def agent_unspoken(settings: Settings, passed: dict[str, Any]) -> str | None:
    """Why the runtime could not talk to the agent the pass proved (its protocol is not one the runtime
    speaks), or None. A record from before protocols were recorded proved osbuilder's own agent."""
    runtime = runtimes.get(settings.runtime)
    spoken = passed.get("agent_protocol") or "osbuilder"
    if spoken in runtime.agent_protocols:
        return None
    own = " (osbuilder's own agent, for the boot checks)" if spoken == "osbuilder" else ""
    return (f"agent the {runtime.name} runtime can talk to (its agent speaks {spoken}{own}, the runtime "
            f"{', '.join(runtime.agent_protocols)}); build the rootfs with the runtime's agent "
            f"(AGENT_SOURCE_BIN=/path/to/its agent) and boot-check it")


def kernel_lacks(settings: Settings, passes: dict[str, Any]) -> str | None:
    """A kernel needs a pass with this WORKDIR's image (attached as the runtime does) or its initrd."""
    runtime_attach = runtimes.get(settings.runtime).attachment
    partners = {runtime_attach: Workdir.of(settings).image, attachments.INITRD.name: Workdir.of(settings).initrd}
    for attach, partner in partners.items():
        if attach in passes and partner.is_file() and sha256_file(partner) in passes[attach].get("with", []):
            return None
    return (f"passing boot check with this WORKDIR's image ({runtime_attach}, as the {settings.runtime} "
            "runtime boots it) or initrd")


def planned_config(config: Config | None, key: str, runtime_path: str) -> tuple[str, str]:
    """The configuration's text now and after pointing `key` at `runtime_path` ('' and '' without one)."""
    if config is None:
        return "", ""
    try:
        old = config.file.read_bytes().decode()
    except UnicodeDecodeError:
        raise UsageError(f"RUNTIME_CONFIG: {config.file} is not UTF-8 text") from None
    except OSError as e:
        raise OsbuilderError(f"RUNTIME_CONFIG: cannot read {config.file}: {e.strerror}") from None
    return old, point_config(old, key, runtime_path, config.file)


def report(runtime: str, targets: list[Target], config: Config | None, texts: tuple[str, str], key: str,
           runtime_path: str, *, dry_run: bool) -> None:
    old, new = texts
    for t in targets:
        print(f"{'would install' if dry_run else 'install'} {t.source} -> {t.installed} (link {t.link.name})")
    if config is None:
        print(f"no {runtime} configuration.toml found; point the runtime's `{key}` at {runtime_path}")
        return
    shown = str(config.path) if config.file == config.path else f"{config.path} -> {config.file}"
    diff = "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), shown, shown))
    print(diff or f"{shown}: already points {key} at {runtime_path}")


# -- writing ------------------------------------------------------------------------------------


def make_dirs(path: Path) -> list[Path]:
    """Create `path` and its missing parents with mode 0755 whatever the umask (the runtime reads them);
    return the directories created."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    try:
        for d in reversed(missing):
            d.mkdir()
            d.chmod(0o755)
    except OSError as e:
        raise write_error("PREFIX", f"creating {missing[0]}", e)
    return missing[::-1]


def copy_hashing(source: Path, tmp: Path) -> str:
    """Copy `source` to the new file `tmp` (0644, holes kept, fsync'd) and return the sha256 of what was written."""
    h = hashlib.sha256()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with open(source, "rb") as src, os.fdopen(fd, "wb") as out:
        while block := src.read(BLOCK):
            h.update(block)
            if block == ZEROS[:len(block)]:
                out.seek(len(block), os.SEEK_CUR)
            else:
                out.write(block)
        out.truncate()
        out.flush()
        os.fchmod(fd, 0o644)
        os.fsync(fd)
    return h.hexdigest()


def write_config(file: Path, text: str) -> None:
    """Rewrite `file` with `text`, keeping its mode and owner; a backup first, both fsync'd."""
    try:
        st = file.stat()
        backup = write_like(file, file.read_bytes(), st, backup=True)
        print(f"backup: {backup}")
        write_like(file, text.encode(), st)
    except OSError as e:
        raise write_error("RUNTIME_CONFIG", f"rewriting {file}", e)


def write_like(dest: Path, data: bytes, st: os.stat_result, *, backup: bool = False) -> Path:
    """Write `data` with the mode and owner in `st`, fsync it, and publish it as `dest` (atomically); or, with
    `backup`, as the first free name of dest.bak, dest.bak.1, ... (never replacing one)."""
    tmp = temp_beside(dest)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            mine = os.fstat(fd)
            if (mine.st_uid, mine.st_gid) != (st.st_uid, st.st_gid):
                os.fchown(fd, st.st_uid, st.st_gid)  # before fchmod: a chown clears set-id bits
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
            os.fsync(fd)
        if backup:
            dest = first_free_backup(tmp, dest)
        else:
            publish(tmp, dest)
        fs.fsync_dir(dest.parent)
    finally:
        discard(tmp)
    return dest


def first_free_backup(tmp: Path, config: Path) -> Path:
    """Hard-link `tmp` as config.bak, or .bak.1, .bak.2, ...: the first name that does not exist yet."""
    for n in itertools.count():
        bak = config.with_name(f"{config.name}.bak" + (f".{n}" if n else ""))
        try:
            os.link(tmp, bak)
            return bak
        except FileExistsError:
            continue
    raise AssertionError("not reached")


def write_error(setting: str, doing: str, e: OSError) -> OsbuilderError:
    """A one-line error for a failed write; a full disk is not the artifact's fault (exit 125)."""
    cause = f"{e.filename}: {e.strerror}" if e.filename else (e.strerror or str(e))
    cls = InfrastructureError if errors.out_of_space(e) else OsbuilderError
    return cls(f"{setting}: {doing} failed ({cause})")


# -- the configuration ----------------------------------------------------------------------------


def toml_string(value: str) -> str:
    """`value` as a TOML basic string: quotes, backslashes and control characters escaped."""
    def char(c: str) -> str:
        if c in '"\\':
            return "\\" + c
        return f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c

    return '"' + "".join(map(char, value)) + '"'


# A runtime boots either an image or an initrd: setting one comments the other out.
EXCLUSIVE = {"image": "initrd", "initrd": "image"}


def point_config(text: str, key: str, value: str, where: Path) -> str:
    """Set `key = "value"` in the [hypervisor.*] section; comment out `initrd` when setting the image, and
    `image` when setting the initrd."""
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # the user's file, not osbuilder's edit: bad input
        raise UsageError(f"RUNTIME_CONFIG: {where} is not valid TOML ({e}); not changed") from None
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(r"\s*\[hypervisor\.[^]]+\]", line)), None)
    if start is None:
        raise UsageError(f"RUNTIME_CONFIG: {where} has no [hypervisor.*] section")
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"\s*\[", lines[i])), len(lines))
    setting = f"{key} = {toml_string(value)}\n"
    found = False
    for i in range(start + 1, end):
        if re.match(rf"\s*{key}\s*=", lines[i]) and not found:
            lines[i], found = setting, True
        elif key in EXCLUSIVE and re.match(rf"\s*{EXCLUSIVE[key]}\s*=", lines[i]):
            lines[i] = "# " + lines[i]  # a runtime boots either an image or an initrd
    if not found:
        lines.insert(start + 1, setting)
    result = "".join(lines)
    try:
        parsed = tomllib.loads(result)
    except tomllib.TOMLDecodeError as e:
        raise OsbuilderError(f"RUNTIME_CONFIG: editing {where} would leave invalid TOML ({e}); not changed")
    tables = parsed.get("hypervisor", {})
    if not any(isinstance(t, dict) and t.get(key) == value for t in tables.values()):
        raise OsbuilderError(f"RUNTIME_CONFIG: editing {where} would not set {key} to {value!r}; not changed")
    return result
