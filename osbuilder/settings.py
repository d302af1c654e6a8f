"""The one settings table: every setting's env var, YAML key, CLI flag, default, parser and help.

Precedence, highest first: CLI flag > environment variable > YAML profile (`osbuilder.yaml` in the
current directory, or `--config FILE`) > default. `osbuilder help` prints the table with each
setting's current value and where it came from.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from osbuilder.errors import UsageError

PROFILE_NAME = "osbuilder.yaml"
PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")  # Debian policy 5.6.1


def _text(name: str, raw: str) -> str:
    return raw.strip()


def _path(name: str, raw: str) -> Path:
    if not raw.strip():
        raise UsageError(f"{name}: must not be empty")
    return Path(raw.strip()).expanduser()


def _optional_path(name: str, raw: str) -> Path | None:
    return Path(raw.strip()).expanduser() if raw.strip() else None


def _yes_no(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("yes", "y", "true", "1", "on"):
        return True
    if value in ("no", "n", "false", "0", "off", ""):
        return False
    raise UsageError(f"{name}: expected yes or no, got {raw!r}")


def _positive_int(name: str, raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise UsageError(f"{name}: expected a whole number, got {raw!r}") from None
    if value <= 0:
        raise UsageError(f"{name}: must be greater than zero, got {value}")
    return value


def _img_size(name: str, raw: str) -> int | None:
    """Image size in MiB, or None for automatic."""
    if raw.strip().lower() in ("", "auto"):
        return None
    return _positive_int(name, raw)


def _epoch(name: str, raw: str) -> int | None:
    if not raw.strip():
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise UsageError(f"{name}: expected seconds since 1970 (a whole number), got {raw!r}") from None
    if value < 0:
        raise UsageError(f"{name}: must not be negative, got {value}")
    return value


def _package_list(name: str, raw: str) -> tuple[str, ...]:
    """Package names separated by spaces or commas, each checked against Debian policy."""
    names = [p for p in re.split(r"[\s,]+", raw.strip()) if p]
    for pkg in names:
        if not PACKAGE_NAME.match(pkg):
            raise UsageError(f"{name}: {pkg!r} is not a valid package name")
    return tuple(names)


def _word_list(name: str, raw: str) -> tuple[str, ...]:
    return tuple(p for p in re.split(r"[\s,]+", raw.strip()) if p)


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise UsageError(f"{name}: expected one of {', '.join(choices)}, got {raw!r}")
        return value

    return parse


def _distro(name: str, raw: str) -> str:
    from osbuilder.rootfs.distros import get  # the plugin registry knows the valid names

    return get(raw.strip().lower()).name


def _block_size(name: str, raw: str) -> int:
    value = _positive_int(name, raw)
    if value not in (1024, 2048, 4096):
        raise UsageError(f"{name}: expected 1024, 2048 or 4096, got {value}")
    return value


@dataclass(frozen=True)
class Setting:
    """One row of the table. The env var is `name`; the YAML key and CLI flag derive from it."""

    name: str
    default: str
    help: str
    parse: Callable[[str, str], Any] = _text
    group: str = "general"

    @property
    def yaml_key(self) -> str:
        return self.name.lower()

    @property
    def flag(self) -> str:
        return "--" + self.name.lower().replace("_", "-")

    @property
    def attr(self) -> str:
        return self.name.lower()


TABLE: tuple[Setting, ...] = (
    Setting("WORKDIR", "./workdir", "directory for the rootfs, images, kernels, caches and logs", _path),
    Setting("DEBUG", "no", "show every line the build tools print (yes/no)", _yes_no),
    Setting("SOURCE_DATE_EPOCH", "", "timestamp for reproducible builds (default: now)", _epoch),
    Setting("USE_DOCKER", "no", "accepted for compatibility; osbuilder is rootless and needs no container", _yes_no),
    Setting("CACHE_DIR", "", "per-user cache shared by every WORKDIR (default: $XDG_CACHE_HOME/osbuilder, else ~/.cache/osbuilder)", _optional_path),
    # rootfs
    Setting("DISTRO", "debian", "distribution of the rootfs (a plugin in osbuilder/rootfs/: debian)", _distro, "rootfs"),
    Setting("OS_VERSION", "bookworm", "release of the distribution (debian: bookworm, trixie, sid)", _text, "rootfs"),
    Setting("REPO_URL", "", "package mirror (default: the distribution's standard public mirror)", _text, "rootfs"),
    Setting("EXTRA_PKGS", "", "extra packages for the rootfs, separated by spaces or commas", _package_list, "rootfs"),
    Setting("AGENT_SOURCE_BIN", "", "install this agent binary instead of osbuilder's own agent", _optional_path, "rootfs"),
    Setting("AGENT_SERVICE", "", "systemd unit name for AGENT_SOURCE_BIN (default: <binary name>.service)", _text, "rootfs"),
    Setting("AGENT_INIT", "no", "run the agent as PID 1 instead of systemd (yes/no)", _yes_no, "rootfs"),
    # image
    Setting("IMG_SIZE", "auto", "image size in MiB (auto: rootfs usage + headroom), rounded up to 128 MiB", _img_size, "image"),
    Setting("BLOCK_SIZE", "4096", "filesystem block size in bytes", _block_size, "image"),
    Setting("FS_TYPE", "ext4", "filesystem of the image", _choice("ext4", "ext3", "ext2"), "image"),
    # boot checks
    Setting("ACCEL", "auto", "QEMU accelerator: auto (KVM only after a probe proves it works), kvm, tcg", _choice("auto", "kvm", "tcg"), "boot"),
    Setting("VM_MEMORY", "1024", "guest memory in MiB for boot checks", _positive_int, "boot"),
    Setting("VM_CPUS", "1", "guest vCPUs for boot checks", _positive_int, "boot"),
    Setting("BOOT_KERNEL", "auto", "kernel for boot checks: auto (built kernel if present, else Debian's), built, debian, or a path", _text, "boot"),
    Setting("BOOT_TIMEOUT", "120", "seconds a boot may take before it is declared hung (per phase budget scales from it)", _positive_int, "boot"),
    Setting("BOOT_IMAGE", "", "image for `osbuilder boot` (default: the image in WORKDIR)", _optional_path, "boot"),
    Setting("BOOT_APPEND", "", "extra kernel command line parameters for boots (e.g. systemd.unit=rescue.target)", _text, "boot"),
    # kernel
    Setting("KERNEL_SOURCE", "debian", "kernel source: debian (linux-source package), a tarball, a git tree, or a git URL", _text, "kernel"),
    Setting("KERNEL_FRAGMENTS", "", "extra config fragment files, on top of osbuilder's own", _word_list, "kernel"),
    Setting("KERNEL_CONFIG", "", "a whole .config to use as the base instead of allnoconfig", _optional_path, "kernel"),
    # install
    Setting("RUNTIME", "kata", "runtime to install for: kata or clear-containers", _choice("kata", "clear-containers"), "install"),
    Setting("PREFIX", "", "install directory (default: the runtime's, e.g. /usr/share/kata-containers)", _text, "install"),
    Setting("RUNTIME_CONFIG", "", "runtime configuration.toml to point at the installed files (default: the runtime's)", _text, "install"),
    Setting("DESTDIR", "", "staging root prepended to every installed path (packaging, tests)", _text, "install"),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in TABLE}
BY_YAML: dict[str, Setting] = {s.yaml_key: s for s in TABLE}


@dataclass(frozen=True)
class Settings:
    """Every setting, parsed and typed, plus where each value came from.

    The fields mirror TABLE one for one (a test checks it); `raw` keeps the strings as given and
    `sources` says 'cli', 'env', 'yaml:<file>', 'override' or 'default' for each.
    """

    workdir: Path
    debug: bool
    source_date_epoch: int | None
    use_docker: bool
    cache_dir: Path | None
    distro: str
    os_version: str
    repo_url: str
    extra_pkgs: tuple[str, ...]
    agent_source_bin: Path | None
    agent_service: str
    agent_init: bool
    img_size: int | None
    block_size: int
    fs_type: str
    accel: str
    vm_memory: int
    vm_cpus: int
    boot_kernel: str
    boot_timeout: int
    boot_image: Path | None
    boot_append: str
    kernel_source: str
    kernel_fragments: tuple[str, ...]
    kernel_config: Path | None
    runtime: str
    prefix: str
    runtime_config: str
    destdir: str
    raw: Mapping[str, str] = field(repr=False)
    sources: Mapping[str, str] = field(repr=False)
    profile: Path | None = None

    @classmethod
    def from_values(cls, values: Mapping[str, Any], raw: Mapping[str, str], sources: Mapping[str, str],
                    profile: Path | None) -> Settings:
        return cls(**{s.attr: values[s.name] for s in TABLE}, raw=dict(raw), sources=dict(sources),
                   profile=profile)

    def with_values(self, **overrides: str) -> Settings:
        """A copy with some settings replaced (raw strings, parsed as if given on the CLI)."""
        raw = dict(self.raw)
        sources = dict(self.sources)
        values = {s.name: getattr(self, s.attr) for s in TABLE}
        for key, text in overrides.items():
            setting = BY_NAME[key.upper()]
            raw[setting.name] = str(text)
            values[setting.name] = setting.parse(setting.name, str(text))
            sources[setting.name] = "override"
        return Settings.from_values(_pin_workdir(values), raw, sources, self.profile)


def read_profile(path: Path) -> dict[str, str]:
    """Read a YAML profile: a mapping of setting keys (any case) to scalars or lists."""
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1})" if where else ""
        raise UsageError(f"{path}: malformed YAML{at}", str(e)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    out: dict[str, str] = {}
    for key, value in data.items():
        setting = BY_YAML.get(str(key).lower())
        if setting is None:
            raise UsageError(f"{path}: unknown key {key!r}", f"known keys: {', '.join(sorted(BY_YAML))}")
        if isinstance(value, list):
            value = " ".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        elif value is None:
            value = ""
        elif isinstance(value, dict):
            raise UsageError(f"{path}: {key}: expected a value or a list, got a mapping")
        out[setting.name] = str(value)
    return out


def load(
    cli: Mapping[str, str | None] | None = None,
    env: Mapping[str, str] | None = None,
    config: Path | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Resolve every setting. `cli` maps setting names to strings (None = not given)."""
    cli = cli or {}
    env = os.environ if env is None else env
    profile = config
    if profile is None:
        candidate = (cwd or Path.cwd()) / PROFILE_NAME
        profile = candidate if candidate.is_file() else None
    from_yaml = read_profile(profile) if profile else {}
    values: dict[str, Any] = {}
    raw: dict[str, str] = {}
    sources: dict[str, str] = {}
    for s in TABLE:
        if cli.get(s.name) is not None:
            text, source = str(cli[s.name]), "cli"
        elif s.name in env:
            text, source = env[s.name], "env"
        elif s.name in from_yaml:
            text, source = from_yaml[s.name], f"yaml:{profile}"
        else:
            text, source = s.default, "default"
        raw[s.name] = text
        values[s.name] = s.parse(s.name, text)
        sources[s.name] = source
    return Settings.from_values(_pin_workdir(values, cwd), raw, sources, profile)


def _pin_workdir(values: dict[str, Any], cwd: Path | None = None) -> dict[str, Any]:
    """Steps run tools in other directories: make WORKDIR (and CACHE_DIR) absolute, relative to where
    they were given."""
    for name in ("WORKDIR", "CACHE_DIR"):
        if values[name] is not None:
            values[name] = (cwd or Path.cwd()) / values[name]
    return values


def describe(settings: Settings) -> str:
    """The `osbuilder help` table: name, current value, source, default, description."""
    rows = [("SETTING", "VALUE", "FROM", "DEFAULT", "DESCRIPTION")]
    for s in TABLE:
        rows.append((s.name, settings.raw[s.name] or "''", settings.sources[s.name], s.default or "''", s.help))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for r in rows:
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
    return "\n".join(lines)
