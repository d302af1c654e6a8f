"""`osbuilder install-image` / `install-initrd` / `install-kernel`: put boot-checked artifacts where a runtime
finds them, and point the runtime at them.

An artifact is installable once a boot check passed for that exact content (same sha256); `--force`
overrides and says so. The artifact is hashed once, as it is copied into a temp file in the install
directory, and the gate asks for the boot record of that hash: the bytes installed are the bytes that
were checked, even if the source is replaced meanwhile. The copy (sparse, fsync'd) is renamed to a
content-named file with a stable symlink to it (`container.img`, `container-initrd.img`,
`vmlinuz.container`, `vmlinux.container`). A failed or interrupted install removes its temp files (a
killed one's are swept by the next run, see fs.temp_beside).

The runtime is pointed at the stable link in the configuration it loads (placement.py finds it as the
runtime does; runtime_config.py plans the change and reads it back with the runtime's precedence): a
drop-in, config.d/50-osbuilder.toml, for a runtime that reads them (the package's file is not
touched), else the file itself, edited with its comments kept, with its mode and owner, fsync'd with its
directory, after a backup that never replaces an earlier one (`.bak`, then `.bak.1`, ...). The drop-in
is staged beside the configuration file, not in config.d, which the runtime reads whole. What was done
goes into PREFIX's install record (install_record.py) first, so `osbuilder uninstall` can undo it.
Installs and uninstalls of one configuration take turns (a lock on its directory).

Symlinks: nothing is written outside the install root (DESTDIR, else /), nor, for the configuration,
outside the runtime's own directories (placement.py). An existing stable link or content-named file is
replaced only when it resolves inside PREFIX.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import posixpath
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from osbuilder import errors, fs, install_record, layout, runtime_config, runtimes
from osbuilder.arch import X86_64
from osbuilder.errors import InfrastructureError, OsbuilderError, UsageError
from osbuilder.fs import discard, link_atomically, not_a_file, publish, sha256_file, temp_beside
from osbuilder.install_record import Record
from osbuilder.layout import Workdir
from osbuilder.placement import DROP_IN_DIR, Placement, check_replaceable, place
from osbuilder.runtime_config import Change
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
class Placed:
    """A target as published: whether osbuilder made the content-named file, and where the link pointed
    before (None: nowhere)."""

    target: Target
    made: bool
    previous: str | None


def install_image(settings: Settings, *, dry_run: bool = False, force: bool = False,
                  source: Path | None = None) -> list[Target]:
    """WORKDIR's container.img (or `source`, an image gated in this WORKDIR's boot records)."""
    items = [Item(source or Workdir.of(settings).image, "osbuilder-{}.img", layout.IMAGE)]
    return install(settings, "install-image", items, "image", image_lacks, dry_run=dry_run, force=force)


def install_initrd(settings: Settings, *, dry_run: bool = False, force: bool = False,
                   source: Path | None = None) -> list[Target]:
    """The initrd (`osbuilder initrd`, or `source`), pointed at by `initrd =`; the image is unset."""
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


# -- the steps --------------------------------------------------------------------------------


def install(settings: Settings, step: str, items: list[Item], key: str, lacks: Lacks, *, dry_run: bool,
            force: bool) -> list[Target]:
    """Check where everything goes and plan the configuration's change, stage and gate the files, publish
    them, record what was done, then change the configuration."""
    for item in items:
        why = not_a_file(item.source)
        if why:
            raise UsageError(f"{step}: {item.source} {why}; build it first")
    placement = place(settings)
    base = placement.install_dir
    for item in items:
        check_replaceable(base / item.link_name, base)
    runtime_path = posixpath.join(placement.prefix, items[0].link_name)
    with config_lock(placement, step, exclusive=not dry_run):
        change = None
        if placement.config is not None:
            change = runtime_config.plan(placement.config, runtime_config.keys_for(key, runtime_path))
            warn_other_hypervisor(step, placement, change)

        def announce(targets: list[Target]) -> None:
            report(placement, targets, change, key, runtime_path, dry_run=dry_run)

        if dry_run:
            targets = [target(base, item, sha256_file(item.source)) for item in items]
            gate(settings, step, items[0].source, targets[0], force, lacks)
            for t in targets[1:]:
                gate_companion(settings, step, targets[0], t, force)
            announce(targets)
            return targets
        record_path = base / install_record.NAME
        record = install_record.load(record_path) or Record(settings.runtime, placement.prefix)
        placed, made = copy_in(settings, step, items, base, force, lacks, announce)
        note_files(record, placement, placed, made)
        if change is None:
            install_record.save(record, record_path)
        else:
            change_config(placement, change, record, record_path)
        print(f"`osbuilder uninstall` undoes it (record: {record_path})")
    return [p.target for p in placed]


@contextlib.contextmanager
def config_lock(placement: Placement, step: str, *, exclusive: bool = True) -> Iterator[None]:
    """Hold a lock on the configuration's directory (its flock, which creates nothing there): installs and
    uninstalls of one configuration take turns, so neither loses what the other wrote."""
    if placement.config is None or not exclusive:
        yield
        return
    where = placement.config.file.parent
    fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: waiting for another osbuilder install or uninstall of %s to finish", step, where)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def warn_other_hypervisor(step: str, placement: Placement, change: Change) -> None:
    if change.section != placement.runtime.hypervisor:
        log.warning("%s: %s configures the %s hypervisor; osbuilder's boot checks prove the guest under %s",
                    step, change.located.shown, change.section, placement.runtime.hypervisor)


def note_files(record: Record, placement: Placement, placed: list[Placed], made: list[Path]) -> None:
    """Add what copy_in published to the record (a file or link already in it keeps its first state)."""
    for p in placed:
        installed, link = placement.system(p.target.installed), placement.system(p.target.link)
        made_before = record.files[installed].made if installed in record.files else p.made
        record.files[installed] = install_record.FileEntry(p.target.sha256, made_before)
        previous = record.links[link].previous if link in record.links else p.previous
        record.links[link] = install_record.LinkEntry(p.target.installed.name, previous)
    record.made_dirs += [placement.system(d) for d in made if placement.system(d) not in record.made_dirs]


def change_config(placement: Placement, change: Change, record: Record, record_path: Path) -> None:
    """Record the change, then make it: the drop-in written (its directory made if need be), or the file
    edited after a backup."""
    made: list[Path] = []
    if change.changes and change.drop_in and not change.target.parent.is_dir():
        made = make_dirs(change.target.parent, "RUNTIME_CONFIG")
    entry = record.note_config(placement.system(change.target), drop_in=change.drop_in, section=change.section,
                               keys=change.keys, old=change.old, new=change.new,
                               made_dirs=[placement.system(d) for d in made])
    install_record.save(record, record_path)
    if not change.changes:
        return
    if change.drop_in:
        try:
            write_drop_in(change)
        except BaseException:
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only if empty
            raise
    else:
        backup = write_config(change.target, change.new)
        entry.backups[placement.system(backup)] = install_record.sha256_bytes(change.old) or ""
        install_record.save(record, record_path)


def copy_in(settings: Settings, step: str, items: list[Item], base: Path, force: bool, lacks: Lacks,
            announce: Callable[[list[Target]], None]) -> tuple[list[Placed], list[Path]]:
    """Copy every item into a temp file in `base`, hashing it; gate the first item on that hash; then
    publish them all; return them, and the directories made. On any failure nothing is left: no temp
    file, no directory made for nothing."""
    created = make_dirs(base, "PREFIX")
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
        placed = []
        for t, tmp in zip(targets, staged, strict=True):
            previous = os.readlink(t.link) if t.link.is_symlink() else None
            placed.append(Placed(t, not os.path.lexists(t.installed), previous))
            publish(tmp, t.installed)
            link_atomically(t.installed.name, t.link)
            fs.fsync_dir(base)
        done = True
        return placed, created
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
    return other_arch(settings, passes[attach]) or agent_unspoken(settings, passes[attach])


def initrd_lacks(settings: Settings, passes: dict[str, Any]) -> str | None:
    """An initrd needs a pass booted as the initrd, with an agent the runtime speaks to."""
    if attachments.INITRD.name not in passes:
        return "passing boot check in the initrd profile"
    passed = passes[attachments.INITRD.name]
    return other_arch(settings, passed) or agent_unspoken(settings, passed)


def other_arch(settings: Settings, passed: dict[str, Any]) -> str | None:
    """Why a pass does not hold for ARCH: it booted another architecture (a record from before ARCH: x86_64)."""
    booted = passed.get("arch") or X86_64.name
    if booted == settings.arch:
        return None
    return f"passing boot check for ARCH={settings.arch} (the one it has is for {booted})"


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
    """A kernel needs a pass with this WORKDIR's image (attached as the runtime does) or its initrd, for ARCH."""
    runtime_attach = runtimes.get(settings.runtime).attachment
    partners = {runtime_attach: Workdir.of(settings).image, attachments.INITRD.name: Workdir.of(settings).initrd}
    for attach, partner in partners.items():
        if attach in passes and partner.is_file() and sha256_file(partner) in passes[attach].get("with", []):
            return other_arch(settings, passes[attach])
    return (f"passing boot check with this WORKDIR's image ({runtime_attach}, as the {settings.runtime} "
            "runtime boots it) or initrd")


def report(placement: Placement, targets: list[Target], change: Change | None, key: str, runtime_path: str, *,
           dry_run: bool) -> None:
    for t in targets:
        print(f"{'would install' if dry_run else 'install'} {t.source} -> {t.installed} (link {t.link.name})")
    if change is None:
        print(f"no {placement.runtime.name} configuration file found (looked for "
              f"{', '.join(placement.runtime.configs)}); point the runtime's `{key}` at {runtime_path}")
        return
    located = change.located
    if not change.changes:
        print(f"{change.target}: already points {key} at {runtime_path}")
        return
    would = "would " if dry_run else ""
    if change.drop_in:
        print(f"{would}write the drop-in {change.target} for {located.shown} (which is not changed):")
    else:
        print(f"{would}edit {located.shown}:")
    print(change.diff(), end="")


# -- writing ------------------------------------------------------------------------------------


def make_dirs(path: Path, setting: str) -> list[Path]:
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
        raise write_error(setting, f"creating {missing[0]}", e)
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


def write_config(file: Path, data: bytes) -> Path:
    """Rewrite `file` with `data`, keeping its mode and owner; a backup first, both fsync'd; the backup."""
    try:
        st = file.stat()
        backup = write_like(file, file.read_bytes(), st, backup=True)
        print(f"backup: {backup}")
        write_like(file, data, st)
        return backup
    except OSError as e:
        raise write_error("RUNTIME_CONFIG", f"rewriting {file}", e)


def write_drop_in(change: Change) -> None:
    """Write osbuilder's drop-in with the configuration file's mode and owner, staged beside that file: the
    runtime reads every entry of config.d, a half-written or left-over temp file there included."""
    try:
        write_like(change.target, change.new, change.located.file.stat(), staged=drop_in_staging(change.target))
    except OSError as e:
        raise write_error("RUNTIME_CONFIG", f"writing {change.target}", e)


def drop_in_staging(drop_in: Path) -> Path:
    """Where a drop-in's temp file goes: beside its config.d (same filesystem), not in it."""
    return drop_in.parent.parent / f"{DROP_IN_DIR}-{drop_in.name}"


def write_like(dest: Path, data: bytes, st: os.stat_result, *, backup: bool = False,
               staged: Path | None = None) -> Path:
    """Write `data` with the mode and owner in `st`, fsync it, and publish it as `dest` (atomically); or, with
    `backup`, as the first free name of dest.bak, dest.bak.1, ... (never replacing one). The temp file is
    beside `staged` (default: `dest`), on the same filesystem."""
    tmp = temp_beside(staged or dest)
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
        if tmp.parent != dest.parent:
            fs.fsync_dir(tmp.parent)
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


