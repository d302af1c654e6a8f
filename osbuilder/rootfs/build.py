"""The rootfs step: a guest root filesystem directory with systemd (or the agent as init) and the agent.

The distribution plugin installs the packages into a base tree that rootfs differing only in osbuilder's
files share (`base.py`: cached per user); this module stages the files osbuilder adds on top (the agent
and its unit, SSH set up for a read-only root, and /var/lib/osbuilder/osbuilder.yaml describing the
build) as a root-owned tarball (while the base is built or copied: the agent compiles meanwhile), unpacks
it over a copy of the base as mmdebstrap's `tar-in` would, and applies the image policy.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from osbuilder import __version__, agent, arch, elf, runtimes, userns
from osbuilder.agent import protocol
from osbuilder.agent.build import build_agent, compiler_for
from osbuilder.cache import Manifest
from osbuilder.errors import UsageError
from osbuilder.fs import discard, file_hash, publish, resolve_in, temp_beside
from osbuilder.layout import Workdir
from osbuilder.rootfs import base, distros, inputs, policy
from osbuilder.rootfs.base import packages, suites
from osbuilder.rootfs.distro import Distro
from osbuilder.run import run, tool_version
from osbuilder.settings import Settings
from osbuilder.terminal import shown
from osbuilder.urls import without_credentials

OVERLAY_DIR = Path(__file__).parent / "overlay"
# units in OVERLAY_DIR that a systemd guest starts at boot (see the unit files for what they do)
OVERLAY_UNITS = ("osbuilder-slirp-network.service", "osbuilder-power-button.service")
METADATA_PATH = "var/lib/osbuilder/osbuilder.yaml"
# How the overlay is unpacked over the base: mmdebstrap's `tar-in` (its hook helper's GNU tar), run as the
# tree's root, so owners (root, from the tarball), modes and times are the tarball's, those of directories
# that exist already too, exactly as when mmdebstrap unpacked it in a customize hook. tar removes a file
# before it extracts one of the same name (never --overwrite, which writes into it): the copy's files are
# hard links to the cached base tree's (base.copy).
TAR_IN = ("tar", "--numeric-owner", "--xattrs", "--format=pax",
          "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime", "--xattrs-include=*")


@dataclass(frozen=True)
class AgentChoice:
    """Which agent goes into the rootfs: osbuilder's own or the user's binary."""

    binary: Path | None  # None: build osbuilder's agent
    name: str
    service: str
    version: str
    protocol: str  # the agent protocol it speaks (osbuilder/agent/protocol.py)

    @classmethod
    def from_settings(cls, settings: Settings) -> AgentChoice:
        src = settings.agent_source_bin
        if src is None:
            chosen = settings.agent_protocol if settings.agent_protocol != "auto" else protocol.OSBUILDER.name
            return cls(None, agent.AGENT_NAME, agent.SERVICE_NAME, agent.AGENT_VERSION, chosen)
        if not src.is_file():
            raise UsageError(f"AGENT_SOURCE_BIN: {shown(str(src))} is not a file")
        if not os.access(src, os.X_OK):
            raise UsageError(f"AGENT_SOURCE_BIN: {shown(str(src))} is not executable")
        check_program_name(src.name)
        try:
            check_machine(elf.read_elf(src), src.name, settings.guest)  # before any build: libraries need the tree
        except elf.NotElf:
            pass
        service = settings.agent_service or f"{unit_name_escape(src.name)}.service"
        check_unit_name(service)
        return cls(src, src.name, service, "custom:" + file_hash(src)[:16], agent_protocol(settings, src))


def agent_protocol(settings: Settings, binary: Path) -> str:
    """AGENT_PROTOCOL for the agent `binary`; auto: the protocol of the RUNTIME's whose markers the binary
    carries (else of any protocol's, else the RUNTIME's only one). Read from the file, never by running it."""
    if settings.agent_protocol != "auto":
        return settings.agent_protocol
    spoken = runtimes.get(settings.runtime).agent_protocols
    for candidates in (spoken, protocol.names()):
        found = protocol.spoken_by(binary, candidates)
        if len(found) == 1:
            return found[0]
    if len(spoken) == 1:
        return spoken[0]
    raise UsageError(f"AGENT_PROTOCOL: cannot tell which protocol the agent {binary.name} speaks (RUNTIME="
                     f"{settings.runtime} speaks {', '.join(spoken)}); set AGENT_PROTOCOL")


# A unit name: systemd's characters (no `@`: a template needs an instance), at most 255 of them.
UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\-]{1,247}\.service$")
# What systemd refuses in a program's name (`Executable name contains special characters`), and what
# cannot be written in a unit file at all.
UNSTARTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\"'\\\udc80-\udcff]")


def check_program_name(name: str) -> None:
    """AGENT_SOURCE_BIN's file name becomes /usr/bin/<name> and the unit's ExecStart: spaces, `%`, `$`,
    `;` and non-ASCII letters are written so that systemd runs exactly that file; control characters
    (a new line would start a directive of its own), quotes, backslashes and bytes that are not UTF-8
    are refused, since systemd would not start such a program."""
    bad = UNSTARTABLE.search(name)
    if bad:
        raise UsageError(f"AGENT_SOURCE_BIN: the file name {shown(name)} has {shown(bad.group())}, which systemd "
                         "does not allow in a program's name (control characters, quotes, backslashes, bytes "
                         "that are not UTF-8); rename the binary")


def check_unit_name(service: str) -> None:
    if not UNIT_NAME.match(service):
        raise UsageError(f"AGENT_SERVICE: {shown(service)} is not a systemd service name (letters, digits and "
                         ":_.-\\ , at most 255 characters, ending in .service; no @ template)")


def unit_name_escape(name: str) -> str:
    """`name` as the start of a unit name: every byte outside systemd's unit-name characters written
    \\xNN, as `systemd-escape` does (`my agent` -> `my\\x20agent`)."""
    return "".join(c if re.match(r"[A-Za-z0-9:_.-]", c) else "".join(f"\\x{b:02x}" for b in c.encode())
                   for c in name)


def manifest(settings: Settings) -> Manifest:
    """Every input that shapes the rootfs, for the artifact cache: the base tree's, and osbuilder's files."""
    choice = AgentChoice.from_settings(settings)
    return Manifest("rootfs", {
        **base.manifest(settings).inputs,
        "agent": choice.version if choice.binary else "osbuilder:" + agent.source_hash(),
        "agent_service": choice.service,
        "agent_protocol": choice.protocol,
        "agent_init": str(settings.agent_init),
        "overlay": file_hash(OVERLAY_DIR) + ":" + file_hash(Path(__file__), Path(policy.__file__)),
        "overlay_tool": tool_version(TAR_IN[0]),
        "agent_toolchain": (inputs.agent_toolchain(compiler_for(settings.guest)) if choice.binary is None
                            else "AGENT_SOURCE_BIN"),
    })


def build_rootfs(settings: Settings, dest: Path, *, logfile: Path | None = None, rebuild: bool = False,
                 session: str | None = None) -> dict[str, str]:
    """Build the rootfs into `dest`, replacing it only when the build completed: a copy of the base tree
    (built first when the per-user cache has none; `rebuild` and `session` as for the cache) with
    osbuilder's files over it. Returns the base tree's content record (base.copy's) but for the paths the
    overlay wrote."""
    d = distros.get(settings.distro)
    d.check_release(settings.os_version)
    choice = AgentChoice.from_settings(settings)
    pkgs = packages(settings)
    suites(settings)  # every setting checked before anything is built
    dest = dest.absolute()
    logfile = logfile or Workdir.of(settings).log("rootfs")
    if userns.rootless():
        userns.check_subordinate_ids()
        userns.check_reachable(dest.parent, "WORKDIR")
    tmp = temp_beside(dest)
    overlay = temp_beside(dest.with_name(dest.name + "-overlay"))
    overlay_tar = temp_beside(dest.with_name(dest.name + "-overlay.tar"))
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:  # osbuilder's files (the agent compiles) meanwhile
            staged = pool.submit(stage_and_pack, settings, choice, pkgs, overlay, overlay_tar, logfile)
            copied = base.copy(settings, tmp, logfile, rebuild=rebuild, session=session)
            staged.result()
        for path in overlay.rglob("*"):  # what the overlay replaces is not the base's file any more
            copied.pop(str(path.relative_to(overlay)), None)
        unpack_overlay(overlay_tar, tmp, logfile)
        policy.apply(tmp, logfile)
        policy.verify(tmp)
        check_agent_runs(tmp, choice.name, d, settings.guest)
        publish(tmp, dest)
    finally:
        discard(tmp)
        discard(overlay)
        discard(overlay_tar)
    return copied


def stage_and_pack(settings: Settings, choice: AgentChoice, pkgs: list[str], overlay: Path, overlay_tar: Path,
                   logfile: Path) -> None:
    """The overlay (`stage_overlay`) as the tarball `unpack_overlay` takes (`pack_overlay`)."""
    stage_overlay(settings, choice, pkgs, overlay, logfile)
    pack_overlay(overlay, overlay_tar, settings.source_date_epoch)


def unpack_overlay(overlay_tar: Path, tree: Path, logfile: Path) -> None:
    """Unpack the overlay tarball (`pack_overlay`) over `tree` as mmdebstrap's `tar-in` does: fed on
    stdin (as mmdebstrap's helper feeds it) to GNU tar in the tree's namespace."""
    run(userns.in_tree_namespace([*TAR_IN, "--directory", str(tree), "--extract", "--file", "-"]), step="rootfs",
        logfile=logfile, input=overlay_tar.read_bytes())


def check_agent_runs(tree: Path, name: str, distro: Distro, guest: arch.Arch) -> None:
    """The agent in `tree` (/usr/bin/<name>) can start in the guest: it is built for the guest's machine
    and every shared library it names is in the tree where the dynamic linker looks. One-line
    UsageError naming the first problem (the library's package where the plugin can tell)."""
    path = resolve_in(tree, f"usr/bin/{name}")
    if path is None:
        return  # the image's tree check names a missing agent
    try:
        info = elf.read_elf(path)
    except elf.NotElf:
        return  # a script: its interpreter is the tree's business
    check_machine(info, name, guest)
    missing = elf.missing_libraries(info, tree)
    if missing:
        package = distro.package_of(missing[0])
        hint = (f"{distro.name}'s {package} ships {missing[0]}: add {package} to EXTRA_PKGS" if package else
                "add the package that ships it to EXTRA_PKGS")
        raise UsageError(f"AGENT_SOURCE_BIN: the agent {name} needs {', '.join(missing)}, which the rootfs does not "
                         f"have ({hint})")


def check_machine(info: elf.ElfInfo, name: str, guest: arch.Arch) -> None:
    """The agent is built for the machine the guest runs on (ARCH)."""
    if info.machine != guest.machine:
        raise UsageError(f"AGENT_SOURCE_BIN: the agent {name} is built for {info.machine}, but the guest is "
                         f"{guest.machine} (ARCH={guest.name})")


def stage_overlay(settings: Settings, choice: AgentChoice, pkgs: list[str], overlay: Path, logfile: Path) -> None:
    """Lay out, in `overlay`, every file osbuilder adds to the distribution's tree."""
    shutil.copytree(OVERLAY_DIR, overlay, symlinks=True)
    overlay.chmod(0o755)
    bindir = overlay / "usr/bin"
    bindir.mkdir(parents=True, exist_ok=True)
    if choice.binary is None:
        built = build_agent(overlay / "usr/bin", logfile=logfile, cc=compiler_for(settings.guest))
        unit_text = (agent.SOURCE_DIR / agent.SERVICE_NAME).read_text()
    else:
        built = bindir / choice.name
        shutil.copy2(choice.binary, built)
        unit_text = generic_unit(choice)
    built.chmod(0o755)
    unitdir = overlay / "usr/lib/systemd/system"
    unitdir.mkdir(parents=True, exist_ok=True)
    (unitdir / choice.service).write_text(unit_text)
    if settings.agent_init:
        sbin = overlay / "usr/sbin"
        sbin.mkdir(parents=True, exist_ok=True)
        (sbin / "init").symlink_to(f"../bin/{choice.name}")
    else:
        # Enabled here, not shipped as symlinks: a wheel drops symlinks whose target is not on the host.
        wants = overlay / "etc/systemd/system/multi-user.target.wants"
        wants.mkdir(parents=True, exist_ok=True)
        for unit in (choice.service, *OVERLAY_UNITS):
            (wants / unit).symlink_to(f"/usr/lib/systemd/system/{unit}")
    meta = overlay / METADATA_PATH
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(yaml.safe_dump(metadata(settings, choice, pkgs), sort_keys=False))


def pack_overlay(overlay: Path, tar_path: Path, epoch: int | None) -> None:
    """The overlay as a tarball owned by root (uid and gid 0 in its headers, so no chown is needed
    and an ordinary user can make it), in sorted order, with SOURCE_DATE_EPOCH times when set.
    Modes do not depend on the umask: directories 0755, files 0644 or 0755."""
    def as_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        if info.isdir():
            info.mode = 0o755
        elif info.isfile():
            info.mode = 0o755 if info.mode & 0o111 else 0o644
        if epoch is not None:
            info.mtime = epoch
        return info

    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(overlay.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(overlay)), recursive=False, filter=as_root)


def generic_unit(choice: AgentChoice) -> str:
    """The unit of a user's agent. Its name is quoted in ExecStart (a space stays part of the name) and
    its `%` doubled everywhere (systemd's specifiers); check_program_name refused what cannot be written."""
    check_program_name(choice.name)
    name = choice.name.replace("%", "%%")
    return (f"[Unit]\nDescription=Container agent ({name})\n\n"
            f'[Service]\nExecStart="/usr/bin/{name}"\nRestart=always\n\n'
            f"[Install]\nWantedBy=multi-user.target\n")


def metadata(settings: Settings, choice: AgentChoice, pkgs: list[str]) -> dict:
    d = distros.get(settings.distro)
    created = settings.source_date_epoch if settings.source_date_epoch is not None else int(time.time())
    defaults = d.default_packages(settings.agent_init)
    return {
        "osbuilder": {"version": __version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
        "architecture": d.architecture(settings.guest.machine),
        "distro": {"name": d.name, "version": settings.os_version,
                   "mirror": without_credentials(settings.repo_url or d.default_mirror),
                   "suites": [{"suite": s.name, "mirror": without_credentials(s.mirror)} for s in suites(settings)]},
        "packages": {"default": defaults, "extra": [p for p in pkgs if p not in defaults]},
        "agent": {"name": choice.name, "version": choice.version, "service": choice.service,
                  "protocol": choice.protocol, "init": settings.agent_init},
    }
