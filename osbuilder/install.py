"""`osbuilder install-image` / `install-kernel`: put boot-checked artifacts where a runtime finds them.

An artifact is installable once a boot check passed for that exact file (same sha256); `--force`
overrides and says so. Files are installed under a content-named file plus a stable symlink
(`container.img`, `vmlinuz.container`, `vmlinux.container`), each written to a temp name and renamed.
The runtime's configuration.toml is pointed at the symlink (`image =` / `kernel =` in its
[hypervisor.*] section) with a backup kept beside it, and the result must parse with tomllib.
"""

from __future__ import annotations

import difflib
import logging
import re
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path

from osbuilder import layout
from osbuilder.errors import OsbuilderError, UsageError
from osbuilder.fs import copy_atomically, link_atomically, write_atomically
from osbuilder.layout import Workdir
from osbuilder.settings import Settings
from osbuilder.vm.records import passing_record, sha256_file

log = logging.getLogger("osbuilder")

RUNTIMES = {
    "kata": ("/usr/share/kata-containers",
             ("/etc/kata-containers/configuration.toml", "/usr/share/defaults/kata-containers/configuration.toml")),
    "clear-containers": ("/usr/share/clear-containers",
                         ("/etc/clear-containers/configuration.toml",
                          "/usr/share/defaults/clear-containers/configuration.toml")),
}


@dataclass(frozen=True)
class Target:
    """Where one artifact goes: its source, the content-named file and the stable link to it."""

    source: Path
    installed: Path
    link: Path


def destdir(settings: Settings, path: str) -> Path:
    return Path(settings.destdir + path) if settings.destdir else Path(path)


def prefix(settings: Settings) -> str:
    return settings.prefix or RUNTIMES[settings.runtime][0]


def runtime_config(settings: Settings) -> Path | None:
    candidates = [settings.runtime_config] if settings.runtime_config else RUNTIMES[settings.runtime][1]
    for c in candidates:
        if destdir(settings, c).is_file():
            return destdir(settings, c)
    if settings.runtime_config:
        raise UsageError(f"RUNTIME_CONFIG: {destdir(settings, settings.runtime_config)} does not exist")
    return None


def gate(settings: Settings, artifact: Path, force: bool, step: str) -> None:
    """Refuse an artifact without a passing boot record for its exact content."""
    if not artifact.is_file():
        raise UsageError(f"{step}: {artifact} does not exist; build it first")
    if passing_record(settings.workdir, artifact) is not None:
        return
    if force:
        log.warning("%s: --force: installing %s without a passing boot check", step, artifact)
        return
    raise UsageError(f"{step}: {artifact} has no passing boot check (sha256 {sha256_file(artifact)[:12]}); "
                     "run `osbuilder boot --check` first, or use --force")


def install_image(settings: Settings, *, dry_run: bool = False, force: bool = False) -> list[Target]:
    image = Workdir.of(settings).image
    gate(settings, image, force, "install-image")
    target = plan(settings, image, "osbuilder-{}.img", layout.IMAGE)
    return apply(settings, [target], "image", target.link, dry_run)


def install_kernel(settings: Settings, *, dry_run: bool = False, force: bool = False) -> list[Target]:
    files = Workdir.of(settings).kernel
    gate(settings, files.vmlinuz, force, "install-kernel")
    targets = [plan(settings, files.vmlinuz, "vmlinuz-osbuilder-{}.container", layout.VMLINUZ)]
    if files.vmlinux.is_file():
        targets.append(plan(settings, files.vmlinux, "vmlinux-osbuilder-{}.container", layout.VMLINUX))
    return apply(settings, targets, "kernel", targets[0].link, dry_run)


def plan(settings: Settings, source: Path, pattern: str, link_name: str) -> Target:
    base = destdir(settings, prefix(settings))
    return Target(source, base / pattern.format(sha256_file(source)[:12]), base / link_name)


def apply(settings: Settings, targets: list[Target], key: str, link: Path, dry_run: bool) -> list[Target]:
    config = runtime_config(settings)
    runtime_path = "/" + str(link.relative_to(settings.destdir)).lstrip("/") if settings.destdir else str(link)
    for t in targets:
        print(f"{'would install' if dry_run else 'install'} {t.source} -> {t.installed} (link {t.link.name})")
    if config is None:
        print(f"no {settings.runtime} configuration.toml found; point the runtime's `{key}` at {runtime_path}")
    else:
        old = config.read_text()
        new = point_config(old, key, runtime_path, config)
        diff = "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(config), str(config)))
        print(diff or f"{config}: already points {key} at {runtime_path}")
    if dry_run:
        return targets
    for t in targets:
        copy_atomically(t.source, t.installed, mode=0o644)
        link_atomically(t.installed.name, t.link)
    if config is not None and new != old:
        shutil.copy2(config, config.with_name(config.name + ".bak"))
        write_atomically(config, new)
    return targets


def point_config(text: str, key: str, value: str, where: Path) -> str:
    """Set `key = "value"` in the [hypervisor.*] section; comment out `initrd` when setting the image."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(r"\s*\[hypervisor\.[^]]+\]", line)), None)
    if start is None:
        raise UsageError(f"RUNTIME_CONFIG: {where} has no [hypervisor.*] section")
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"\s*\[", lines[i])), len(lines))
    setting = f'{key} = "{value}"\n'
    found = False
    for i in range(start + 1, end):
        if re.match(rf"\s*{key}\s*=", lines[i]) and not found:
            lines[i], found = setting, True
        elif key == "image" and re.match(r"\s*initrd\s*=", lines[i]):
            lines[i] = "# " + lines[i]  # a runtime boots either an image or an initrd
    if not found:
        lines.insert(start + 1, setting)
    result = "".join(lines)
    try:
        tomllib.loads(result)
    except tomllib.TOMLDecodeError as e:
        raise OsbuilderError(f"RUNTIME_CONFIG: editing {where} would leave invalid TOML ({e}); not changed")
    return result
