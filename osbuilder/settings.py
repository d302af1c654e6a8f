"""The one settings table: every setting's env var, YAML key, CLI flag, default, parser and help.

Precedence, highest first: CLI flag > environment variable > YAML profile (`osbuilder.yaml` in the
current directory, or `--config FILE`) > default. `osbuilder help` prints the table with each
setting's current value and where it came from.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

import yaml

from osbuilder import arch as arches  # `arch` is a setting's field
from osbuilder.errors import UsageError
from osbuilder.run import redact
from osbuilder.terminal import printable, shown
from osbuilder.urls import without_credentials  # noqa: F401 - settings.without_credentials, as before
from osbuilder.vm.qemu import MAX_MEMORY_MIB as MAX_VM_MEMORY  # what QEMU's guest can address

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


def _workdir(name: str, raw: str) -> Path:
    return _apt_friendly(name, _path(name, raw))


def _cache_dir(name: str, raw: str) -> Path | None:
    path = _optional_path(name, raw)
    return path if path is None else _apt_friendly(name, path)


def _apt_friendly(name: str, path: Path) -> Path:
    """WORKDIR and CACHE_DIR hold trees mmdebstrap builds (the rootfs, Debian's boot kernel), and apt's
    configuration cannot hold a double quote: refused before anything runs."""
    if '"' in str(path):
        raise UsageError(f"{name}: {shown(str(path), 300)} has a double quote (\"), which apt cannot handle "
                         f"(mmdebstrap builds there); choose another {name}")
    return path


def _yes_no(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("yes", "y", "true", "1", "on"):
        return True
    if value in ("no", "n", "false", "0", "off", ""):
        return False
    raise UsageError(f"{name}: expected yes or no, got {_short(raw)}")


def _positive_int(name: str, raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise UsageError(f"{name}: expected a whole number, got {_short(raw)}") from None
    if value <= 0:
        raise UsageError(f"{name}: must be greater than zero, got {_number(value)}")
    return value


def _short(text: str, limit: int = 40) -> str:
    """A value as quoted in a one-line error: repr (which escapes control characters and bytes that are
    not UTF-8), cut to `limit` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _number(value: int, limit: int = 40) -> str:
    digits = str(value)
    return digits if len(digits) <= limit else f"{digits[:limit]}... ({len(digits)} digits)"


# Upper bounds: what the programs a setting reaches accept, or far beyond any sensible value.
MAX_IMG_SIZE = 1 << 20  # MiB: 1 TiB, far beyond any guest image
MAX_VM_CPUS = 288  # QEMU's q35 machine
MAX_BOOT_TIMEOUT = 86400  # a day
MAX_EPOCH = 15032385535  # 2446-05-10T22:38:55Z, the latest time ext4 can store


def _bounded(upper: int, why: str) -> Callable[[str, str], int]:
    """A positive whole number of at most `upper` (`why` says what the bound is)."""
    def parse(name: str, raw: str) -> int:
        value = _positive_int(name, raw)
        if value > upper:
            raise UsageError(f"{name}: must be at most {upper} ({why}), got {_number(value)}")
        return value

    return parse


def host_vcpus(env: Mapping[str, str] | None = None) -> int:
    """VM_CPUS=auto: the host's cores shared among the guests that boot at once. Under pytest-xdist
    each worker boots its own guests (PYTEST_XDIST_WORKER_COUNT), so `pytest -n 2` on 2 cores gives
    each guest one vCPU instead of oversubscribing; a lone `osbuilder boot` gets every core."""
    env = os.environ if env is None else env
    try:
        sharing = max(1, int(env.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    except ValueError:
        sharing = 1
    return max(1, min(MAX_VM_CPUS, (os.cpu_count() or 1) // sharing))


def _vm_cpus(name: str, raw: str, env: Mapping[str, str] | None = None) -> int:
    """A number, or auto: the host's cores shared among the guests that boot at once, as `env` (the
    environment the settings are loaded from) says."""
    if raw.strip().lower() == "auto":
        return host_vcpus(env)
    return _bounded(MAX_VM_CPUS, "QEMU's q35 machine")(name, raw)


def _img_size(name: str, raw: str) -> int | None:
    """Image size in MiB, or None for automatic."""
    if raw.strip().lower() in ("", "auto"):
        return None
    return _bounded(MAX_IMG_SIZE, "1 TiB")(name, raw)


def _epoch(name: str, raw: str) -> int | None:
    if not raw.strip():
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise UsageError(f"{name}: expected seconds since 1970 (a whole number), got {_short(raw)}") from None
    if value < 0:
        raise UsageError(f"{name}: must not be negative, got {_number(value)}")
    if value > MAX_EPOCH:
        raise UsageError(f"{name}: must be at most {MAX_EPOCH} (2446-05-10, the latest time ext4 stores), "
                         f"got {_number(value)}")
    return value


RELEASE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+~_-]{0,63}$")


def _release(name: str, raw: str) -> str:
    """A release (suite) name: it becomes a positional argument of mmdebstrap and part of apt's URLs."""
    value = raw.strip()
    if not RELEASE_NAME.match(value):
        raise UsageError(f"{name}: {_short(value)} is not a release name (letters, digits and . + ~ _ -, "
                         "not starting with a punctuation mark; e.g. bookworm)")
    return value


URL_CHARACTERS = re.compile(r"^[A-Za-z0-9._~:/?#@!$&'()*+,;=%\[\]-]+$")  # RFC 3986: no space, ", <, >, |, \\ or control


def _repo_url(name: str, raw: str) -> str:
    """A package mirror: a plain http, https or file URL. Nothing else reaches apt's sources list, so no
    `[trusted=yes]` or second entry can be slipped in, and signature checking stays on."""
    value = raw.strip()
    if not value:
        return ""
    shown = _short(redact(value))  # a password never reaches an error line, whatever it holds
    authority, _, rest = value.partition("://")[2].partition("/")
    if "@" in rest or re.search(r"[?#].*@", authority):  # http://user:pa/ss@host: the password ended the host
        raise UsageError(f"{name}: {shown}: a '/', '?' or '#' in its user name or password must be written "
                         "%2F, %3F, %23 (they end the host part of a URL; an '@' after it is refused)")
    try:
        url = urlsplit(value)
        url.port  # noqa: B018 - checks the port and a bracketed IPv6 host
    except ValueError as e:  # its text may quote a piece of the password (a "port"): not shown
        why = "its port is not a number from 0 to 65535" if "port" in str(e).lower() else "its host is not valid"
        raise UsageError(f"{name}: {shown} is not a valid URL ({why})") from None
    if url.scheme not in ("http", "https", "file") or not URL_CHARACTERS.match(value) \
            or not _brackets_only_around_ipv6(value, url):
        raise UsageError(f"{name}: expected a plain http://, https:// or file:// URL of a mirror "
                         f"(no spaces, no [options]), got {shown}")
    if url.scheme != "file" and not url.hostname:
        raise UsageError(f"{name}: {shown} names no host")
    if url.scheme == "file" and (url.netloc or not url.path.startswith("/")):
        raise UsageError(f"{name}: expected file:///absolute/path, got {shown}")
    return value


def _ccache_remote(name: str, raw: str) -> str:
    """ccache's remote storage for the kernel builds: an http:// or redis:// URL (ccache's own syntax,
    with its `|attribute=value` suffixes), or file:// for a shared directory."""
    value = raw.strip()
    if not value:
        return ""
    url = urlsplit(value.partition("|")[0])
    if url.scheme not in ("http", "redis", "file") or (url.scheme != "file" and not url.hostname) or " " in value:
        raise UsageError(f"{name}: expected ccache's http://host[:port]/path, redis://host[:port] or "
                         f"file:///path, got {_short(redact(value))}")
    return value


def _brackets_only_around_ipv6(value: str, url: SplitResult) -> bool:
    """`[` and `]` appear only around an IPv6 host (http://[::1]:3142/debian)."""
    if "[" not in value and "]" not in value:
        return True
    try:
        ipaddress.IPv6Address(url.hostname or "")
    except ValueError:
        return False
    return value.count("[") == value.count("]") == 1 and url.netloc.rpartition("@")[2].startswith("[")


def _package_list(name: str, raw: str) -> tuple[str, ...]:
    """Package names separated by spaces or commas, each checked against Debian policy."""
    names = [p for p in re.split(r"[\s,]+", raw.strip()) if p]
    for pkg in names:
        if not PACKAGE_NAME.match(pkg):
            raise UsageError(f"{name}: {_short(pkg)} is not a valid package name")
    return tuple(names)


def _word_list(name: str, raw: str) -> tuple[str, ...]:
    return tuple(p for p in re.split(r"[\s,]+", raw.strip()) if p)


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise UsageError(f"{name}: expected one of {', '.join(choices)}, got {_short(raw)}")
        return value

    return parse


IMAGE_REFERENCE = re.compile(r"^[a-z0-9][a-z0-9._/:@-]*$", re.I)  # registry/name:tag or @digest


def _image_reference(name: str, raw: str) -> str:
    """A container image name: it becomes one argument of the engine, never an option."""
    value = raw.strip()
    if not IMAGE_REFERENCE.match(value) or len(value) > 255:
        raise UsageError(f"{name}: {_short(value)} is not an image name (e.g. debian:bookworm, localhost/base:12)")
    return value


def _distro(name: str, raw: str) -> str:
    from osbuilder.rootfs.distros import get  # the plugin registry knows the valid names

    return get(raw.strip().lower()).name


def _block_size(name: str, raw: str) -> int:
    value = _positive_int(name, raw)
    if value not in (1024, 2048, 4096):
        raise UsageError(f"{name}: expected 1024, 2048 or 4096, got {_number(value)}")
    return value


def _auto_yes_no(name: str, raw: str) -> bool | None:
    """yes/no, or None for `auto` (the step decides from other settings)."""
    return None if raw.strip().lower() in ("", "auto") else _yes_no(name, raw)


def _arch(name: str, raw: str) -> str:
    """An architecture's name (osbuilder/arch.py; aliases such as aarch64 taken), '' for the host's."""
    return (arches.lookup(raw) if raw.strip() else arches.host()).name


def _runtimes() -> tuple[str, ...]:
    from osbuilder import runtimes  # the registry of runtime records

    return runtimes.names()


def _runtime(name: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in _runtimes():
        raise UsageError(f"{name}: unknown runtime {_short(raw.strip())}; expected one of {', '.join(_runtimes())}")
    return value


def _agent_protocols() -> tuple[str, ...]:
    from osbuilder.agent import protocol  # the registry of agent protocol records

    return ("auto", *protocol.names())


def _agent_protocol(name: str, raw: str) -> str:
    value = raw.strip().lower() or "auto"
    if value not in _agent_protocols():
        raise UsageError(f"{name}: no agent protocol {_short(raw.strip())}; expected one of "
                         f"{', '.join(_agent_protocols())}")
    return value


def _boot_profiles() -> tuple[str, ...]:
    from osbuilder.vm import attachments  # the registry of attachment records

    return ("auto", *attachments.names())


def _boot_profile(name: str, raw: str) -> str:
    value = raw.strip().lower() or "auto"
    if value not in _boot_profiles():
        raise UsageError(f"{name}: no boot profile {_short(raw.strip())}; expected one of {', '.join(_boot_profiles())}")
    return value


def _distros() -> tuple[str, ...]:
    from osbuilder.rootfs import distros  # the registry of distribution plugins

    return distros.names()


def _releases() -> tuple[str, ...]:
    from osbuilder.rootfs import distros

    return tuple(f"{name}: {' '.join(distros.get(name).releases)}" for name in distros.names())


def _optional_release(name: str, raw: str) -> str:
    """A release name, or '' for the distribution's default (resolved in `_check_together`)."""
    return _release(name, raw) if raw.strip() else ""


GIT_URL = re.compile(r"^(https?|git|ssh|file)://|^[\w.-]+@[\w.-]+:")  # kernel/source.py reads the rest


def _kernel_source(name: str, raw: str) -> str:
    """debian, a git URL, or an existing tarball or directory."""
    value = raw.strip() or "debian"
    if value != "debian" and not GIT_URL.match(value) and not Path(value).expanduser().exists():
        raise UsageError(f"{name}: {shown(value, 300)}: no such file or directory (give debian, a tarball, a git tree "
                         "or a git URL)")
    return value


def _install_text(name: str, raw: str) -> str:
    """A path for the install steps, `~` expanded: UTF-8, no control characters ('' stays '')."""
    text = raw.strip()
    try:
        text.encode()
    except UnicodeEncodeError:
        raise UsageError(f"{name}: must be valid UTF-8, got {_short(raw)}") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise UsageError(f"{name}: must not contain control characters, got {_short(raw)}")
    return os.path.expanduser(text) if text else ""


def _target_path(name: str, raw: str) -> str:
    """PREFIX, RUNTIME_CONFIG: an absolute path on the installed system (placed under DESTDIR), normalised;
    `..` is refused, since under DESTDIR it would climb out of it."""
    path = _install_text(name, raw)
    if not path:
        return ""
    if not path.startswith("/"):
        raise UsageError(f"{name}: must be an absolute path (a path on the installed system), got {_short(raw)}")
    if ".." in path.split("/"):
        raise UsageError(f"{name}: must not contain '..' (it would leave DESTDIR), got {_short(raw)}")
    return "/" + os.path.normpath(path).lstrip("/")


def _destdir(name: str, raw: str) -> str:
    """DESTDIR: a staging root, absolute or relative to the current directory, normalised."""
    path = _install_text(name, raw)
    return os.path.normpath(path) if path else ""


@dataclass(frozen=True)
class Setting:
    """One row of the table. The env var is `name`; the YAML key and CLI flag derive from it."""

    name: str
    default: str
    about: str  # the description; `{choices}` in it lists `choices()`
    parse: Callable[..., Any] = _text  # (name, raw) -> value; (name, raw, env) with reads_environment
    group: str = "general"
    # The variable's name is common in other programs' environments (DEBUG=app:* in JavaScript
    # shells): a value there that does not parse is ignored with a notice instead of failing.
    ambient: bool = False
    choices: Callable[[], tuple[str, ...]] | None = None  # the valid values, where a registry holds them
    empty: str = ""  # what an empty value (the default of some) stands for, as `help` shows the default
    reads_environment: bool = False  # `parse` takes the environment as a third argument (VM_CPUS=auto)

    def read(self, raw: str, env: Mapping[str, str] | None = None) -> Any:
        """The value `raw` stands for, in the environment `env` (None: this process's)."""
        return self.parse(self.name, raw, env) if self.reads_environment else self.parse(self.name, raw)

    @property
    def help(self) -> str:
        """The description, with the current choices where it lists them."""
        return self.about.format(choices=", ".join(self.choices())) if self.choices else self.about

    @property
    def shown_default(self) -> str:
        """The default as `osbuilder help` shows it: the value, or what the empty default stands for."""
        if self.default:
            return self.default
        return f"'' ({self.empty})" if self.empty else "''"

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
    Setting("WORKDIR", "./workdir", "directory for the rootfs, images, kernels, caches and logs", _workdir),
    Setting("DEBUG", "no", "show every line the build tools print (yes/no)", _yes_no, ambient=True),
    Setting("SOURCE_DATE_EPOCH", "", "timestamp for reproducible builds", _epoch, empty="now"),
    Setting("USE_DOCKER", "no", "run each step (rootfs, image, initrd, kernel-src, kernel, boot) in a tools container, so the host needs only Python and CONTAINER_ENGINE (yes/no)", _yes_no),
    Setting("CONTAINER_ENGINE", "auto", "engine for USE_DOCKER: auto (the first of podman, docker that can run a container), podman, docker", _choice("auto", "podman", "docker")),
    Setting("TOOLS_BASE_IMAGE", "debian:bookworm", "Debian image the USE_DOCKER tools image is built on (a local image, e.g. one made with mmdebstrap and `podman import`, or one to pull)", _image_reference),
    Setting("CACHE_DIR", "", "per-user cache shared by every WORKDIR", _cache_dir, empty="$XDG_CACHE_HOME/osbuilder, else ~/.cache/osbuilder"),
    # rootfs
    Setting("DISTRO", "debian", "distribution of the rootfs (a plugin in osbuilder/rootfs/: {choices})", _distro, "rootfs", choices=_distros),
    Setting("OS_VERSION", "", "release of the distribution ({choices})", _optional_release, "rootfs", choices=_releases, empty="the distribution's default release: debian's bookworm"),
    Setting("REPO_URL", "", "package mirror, an http(s):// or file:// URL", _repo_url, "rootfs", empty="the distribution's standard public mirror"),
    Setting("SECURITY_UPDATES", "yes", "install the release's security and stable updates (<release>-security, <release>-updates) over it; no: the release alone, as published (reproducible)", _yes_no, "rootfs"),
    Setting("EXTRA_PKGS", "", "extra packages for the rootfs, separated by spaces or commas", _package_list, "rootfs"),
    Setting("AGENT_SOURCE_BIN", "", "install this agent binary (the runtime's own agent) instead of osbuilder's", _optional_path, "rootfs", empty="osbuilder's own agent"),
    Setting("AGENT_SERVICE", "", "systemd unit name for AGENT_SOURCE_BIN", _text, "rootfs", empty="<binary name>.service"),
    Setting("AGENT_INIT", "no", "run the agent as PID 1 instead of systemd (yes/no)", _yes_no, "rootfs"),
    Setting("AGENT_PROTOCOL", "auto", "the protocol the agent speaks ({choices}); auto: what the image records (osbuilder's agent: osbuilder; AGENT_SOURCE_BIN: the one of the RUNTIME's its binary carries)", _agent_protocol, "rootfs", choices=_agent_protocols),
    # image
    Setting("IMG_SIZE", "auto", "image size in MiB (auto: rootfs usage + headroom), rounded up to 128 MiB", _img_size, "image"),
    Setting("BLOCK_SIZE", "4096", "filesystem block size in bytes", _block_size, "image"),
    Setting("FS_TYPE", "ext4", "filesystem of the image", _choice("ext4", "ext3", "ext2"), "image"),
    Setting("DAX", "auto", "lay the image out for DAX when mapped as an NVDIMM (a DAX metadata header in front of the disk): auto (yes: Kata and Clear Containers both mount the root with DAX), yes, no", _auto_yes_no, "image"),
    # boot checks
    Setting("ACCEL", "auto", "QEMU accelerator: auto (KVM only after a probe proves it works), kvm, tcg", _choice("auto", "kvm", "tcg"), "boot"),
    Setting("VM_MEMORY", "1024", "guest memory in MiB for boot checks", _bounded(MAX_VM_MEMORY, "1 TiB"), "boot"),
    Setting("VM_CPUS", "auto", "guest vCPUs for boot checks: auto (the host's cores shared among the guests booting at once), or a number", _vm_cpus, "boot", reads_environment=True),
    Setting("BOOT_KERNEL", "auto", "kernel for boot checks: auto (built kernel if present, else Debian's), built, debian, or a path", _text, "boot"),
    Setting("BOOT_PROFILE", "auto", "how boot checks attach the image (osbuilder/vm/attachments.py): {choices}; auto is the RUNTIME's own; AGENT_INIT chooses PID 1", _boot_profile, "boot", choices=_boot_profiles),
    Setting("BOOT_TIMEOUT", "120", "seconds that scale a boot's budgets: a guest that shows no progress for a quarter of it is hung; a boot not ready 1.5 times it after QEMU started, while the guest still made progress, is the host's failure (exit 125)", _bounded(MAX_BOOT_TIMEOUT, "a day"), "boot"),
    Setting("BOOT_IMAGE", "", "image for `osbuilder boot`", _optional_path, "boot", empty="the image in WORKDIR"),
    Setting("BOOT_APPEND", "", "extra kernel command line parameters for boots (e.g. systemd.unit=rescue.target)", _text, "boot"),
    # kernel
    Setting("KERNEL_SOURCE", "debian", "kernel source: debian (linux-source package), a tarball, a git tree, or a git URL", _kernel_source, "kernel"),
    Setting("KERNEL_FRAGMENTS", "", "extra config fragment files, on top of osbuilder's own", _word_list, "kernel"),
    Setting("KERNEL_CONFIG", "", "a whole .config to use as the base instead of allnoconfig", _optional_path, "kernel"),
    Setting("CCACHE_REMOTE_STORAGE", "", "ccache's remote storage that kernel builds share with other hosts (http://host:port/path, redis://host), so that a kernel compiled on one host is a cache hit on the next", _ccache_remote, "kernel", empty="none: the per-user cache only"),
    # install
    Setting("ARCH", "", "guest architecture (osbuilder/arch.py): {choices}; aarch64 and amd64 are taken as arm64 and x86_64; another than the host's is built with qemu-user and a cross compiler", _arch, "general", choices=arches.names, empty="the host's"),
    Setting("RUNTIME", "kata", "runtime to install for and boot as (osbuilder/runtimes.py): {choices}", _runtime, "general", choices=_runtimes),
    Setting("PREFIX", "", "install directory", _target_path, "install", empty="the runtime's, e.g. /usr/share/kata-containers"),
    Setting("RUNTIME_CONFIG", "", "runtime configuration.toml to point at the installed files", _target_path, "install", empty="the runtime's"),
    Setting("DROP_IN", "auto", "point the runtime at the installed files with a drop-in, config.d/50-osbuilder.toml beside its configuration file, instead of editing that file: auto (yes for a runtime that reads drop-ins: Kata 2.5 and later), yes, no (edit it: Kata before 2.5)", _auto_yes_no, "install"),
    Setting("DESTDIR", "", "staging root prepended to every installed path (packaging, tests)", _destdir, "install"),
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
    container_engine: str
    tools_base_image: str
    cache_dir: Path | None
    distro: str
    os_version: str
    repo_url: str
    security_updates: bool
    extra_pkgs: tuple[str, ...]
    agent_source_bin: Path | None
    agent_service: str
    agent_init: bool
    agent_protocol: str
    img_size: int | None
    block_size: int
    fs_type: str
    dax: bool | None
    accel: str
    vm_memory: int
    vm_cpus: int
    boot_kernel: str
    boot_profile: str
    boot_timeout: int
    boot_image: Path | None
    boot_append: str
    kernel_source: str
    kernel_fragments: tuple[str, ...]
    kernel_config: Path | None
    ccache_remote_storage: str
    arch: str
    runtime: str
    prefix: str
    runtime_config: str
    drop_in: bool | None
    destdir: str
    raw: Mapping[str, str] = field(repr=False)
    sources: Mapping[str, str] = field(repr=False)
    profile: Path | None = None
    notices: tuple[str, ...] = ()  # one line each, for the user: environment values that were ignored

    @classmethod
    def from_values(cls, values: Mapping[str, Any], raw: Mapping[str, str], sources: Mapping[str, str],
                    profile: Path | None, notices: tuple[str, ...] = ()) -> Settings:
        return cls(**{s.attr: values[s.name] for s in TABLE}, raw=dict(raw), sources=dict(sources),
                   profile=profile, notices=notices)

    @property
    def guest(self) -> arches.Arch:
        """ARCH's record: what the guest's architecture needs (osbuilder/arch.py)."""
        return arches.lookup(self.arch)

    def with_values(self, **overrides: str) -> Settings:
        """A copy with some settings replaced (raw strings, parsed as if given on the CLI)."""
        raw = dict(self.raw)
        sources = dict(self.sources)
        values = {s.name: getattr(self, s.attr) for s in TABLE}
        for key, text in overrides.items():
            setting = BY_NAME[key.upper()]
            raw[setting.name] = str(text)
            values[setting.name] = setting.read(str(text))
            sources[setting.name] = "override"
        _check_together(values)
        return Settings.from_values(_pin_workdir(values), raw, sources, self.profile, self.notices)


MAX_PROFILE_BYTES = 1 << 20  # a profile holds a few dozen settings; this is thousands of times that


class _ProfileLoader(yaml.SafeLoader):
    """YAML without aliases: `*name` (and `<<: *name`) would let a few hundred bytes stand for
    gigabytes once expanded (the "billion laughs"), and a profile of settings has no use for them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a profile",
                                              event.start_mark)
        return super().compose_node(parent, index)


def read_profile(path: Path) -> dict[str, str]:
    """Read a YAML profile: a mapping of setting keys (any case) to scalars or lists of scalars."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROFILE_BYTES + 1)
    except OSError as e:
        raise UsageError(f"{path}: cannot read the profile ({e.strerror})") from None
    if len(data) > MAX_PROFILE_BYTES:
        raise UsageError(f"{path}: a profile of more than {MAX_PROFILE_BYTES >> 20} MiB is not a list of settings")
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    loader = _ProfileLoader(text)
    loader.name = str(path)  # what its error messages call the text
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1})" if where else ""
        problem = getattr(e, "problem", None) or "malformed YAML"
        what = problem if "not allowed" in problem else f"malformed YAML{at}: {problem}"
        raise UsageError(f"{path}: {shown(what, 200)}{at if what is problem else ''}",
                         printable(str(e)[:2000])) from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    out: dict[str, str] = {}
    for key, value in data.items():
        setting = BY_YAML.get(str(key).lower())
        if setting is None:
            raise UsageError(f"{path}: unknown key {_short(str(key))}", f"known keys: {', '.join(sorted(BY_YAML))}")
        out[setting.name] = _profile_value(path, setting, value)
    return out


def _profile_value(path: Path, setting: Setting, value: Any) -> str:
    """A profile's value as the string the setting parses: a scalar, or a list of scalars joined by spaces."""
    if isinstance(value, list):
        nested = next((type(v).__name__ for v in value if isinstance(v, (list, dict))), None)
        if nested:
            raise UsageError(f"{path}: {setting.yaml_key}: expected a value or a list of values, got a list "
                             f"holding a {'list' if nested == 'list' else 'mapping'}")
        return " ".join(_scalar(v) for v in value)
    if isinstance(value, dict):
        raise UsageError(f"{path}: {setting.yaml_key}: expected a value or a list, got a mapping")
    return _scalar(value)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "" if value is None else str(value)


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
    notices: list[str] = []
    kata = _from_kata(env, notices)
    for s in TABLE:
        if cli.get(s.name) is not None:
            text, source = str(cli[s.name]), "cli"
        elif s.name in env and not (s.ambient and _ignored(s, env[s.name], notices)):
            text, source = env[s.name], "env"
        elif s.name in kata:
            text, source = kata[s.name][0], f"env:{kata[s.name][1]}"
        elif s.name in from_yaml:
            text, source = from_yaml[s.name], f"yaml:{profile}"
        else:
            text, source = s.default, "default"
        raw[s.name] = text
        values[s.name] = s.read(text, env)
        sources[s.name] = source
    _check_together(values)
    return Settings.from_values(_pin_workdir(values, cwd), raw, sources, profile, tuple(notices))


def _check_together(values: dict[str, Any]) -> None:
    """What one setting's parser cannot see: the release must be one of the distribution's (an empty one
    is the distribution's default)."""
    from osbuilder.rootfs import distros

    distro = distros.get(values["DISTRO"])
    values["OS_VERSION"] = values["OS_VERSION"] or distro.default_release
    distro.check_release(values["OS_VERSION"])


# Variables of Kata's own osbuilder (tools/osbuilder) that users carry over: the ones with a meaning here
# map to osbuilder's settings (FROM_KATA), the others are named in one notice with why they do nothing.
FROM_KATA = {"USE_PODMAN": {"USE_DOCKER": "yes", "CONTAINER_ENGINE": "podman"}}
KATA_IGNORED = {
    "ROOTFS_DIR": "the rootfs is WORKDIR/rootfs",
    "IMAGE": "the image is WORKDIR's",
    "INITRD_IMAGE": "the initrd is WORKDIR's",
    "ROOT_FREE_SPACE": "set IMG_SIZE",
    "KERNEL_MODULES_DIR": "osbuilder's kernel has no modules",
    "AGENT_BIN": "the agent keeps AGENT_SOURCE_BIN's name",
    "AGENT_VERSION": "osbuilder does not build Kata's agent",
    "GO_AGENT_PKG": "osbuilder does not build Kata's agent",
    "RUST_VERSION": "osbuilder does not build Kata's agent",
    "AGENT_TARBALL": "use AGENT_SOURCE_BIN",
    "LIBC": "osbuilder does not build Kata's agent",
    "SECCOMP": "osbuilder does not build Kata's agent",
    "SELINUX": "not supported",
    "MEASURED_ROOTFS": "not supported",
    "CONFIDENTIAL_GUEST": "not supported",
    "TARGET_ARCH": "the guest is the host's architecture",
    "DOCKER_RUNTIME": "see CONTAINER_ENGINE",
    "NSDAX_BIN": "osbuilder writes the DAX header itself (DAX)",
    "IMAGE_SIZE_ALIGNMENT_MB": "images are multiples of 128 MiB",
}


def _from_kata(env: Mapping[str, str], notices: list[str]) -> dict[str, tuple[str, str]]:
    """setting -> (value, the Kata variable it comes from) for Kata osbuilder's variables set in `env`
    (true: Kata's scripts test for it), and one notice naming those ignored."""
    mapped: dict[str, tuple[str, str]] = {}
    for name, settings in FROM_KATA.items():
        if env.get(name, "").strip().lower() in ("yes", "y", "true", "1", "on"):
            mapped.update({k: (v, name) for k, v in settings.items() if k not in env})
    ignored = [name for name in KATA_IGNORED if env.get(name, "").strip()]
    if ignored:
        why = "; ".join(f"{name}: {KATA_IGNORED[name]}" for name in ignored)
        notices.append(f"Kata osbuilder's {', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored here ({why})")
    return mapped


def _ignored(setting: Setting, text: str, notices: list[str]) -> bool:
    """Whether an ambient variable's value does not parse (then it is ignored, with a notice)."""
    try:
        setting.read(text)
    except UsageError as e:
        notices.append(f"{setting.name}={_short(text)} in the environment is ignored ({e.message.partition(': ')[2]}); "
                       f"use {setting.flag} or {setting.yaml_key}: in {PROFILE_NAME}")
        return True
    return False


def _pin_workdir(values: dict[str, Any], cwd: Path | None = None) -> dict[str, Any]:
    """Steps run tools in other directories: make WORKDIR (and CACHE_DIR) absolute, relative to where
    they were given."""
    for name in ("WORKDIR", "CACHE_DIR"):
        if values[name] is not None:
            values[name] = (cwd or Path.cwd()) / values[name]
    return values


def as_json(settings: Settings) -> list[dict[str, str]]:
    """`osbuilder help --json`: every setting with its value (credentials redacted), source and default."""
    return [{"name": s.name, "value": redact(settings.raw[s.name]), "from": settings.sources[s.name],
             "default": s.default, "empty_means": s.empty, "yaml_key": s.yaml_key, "flag": s.flag,
             "group": s.group, "description": s.help} for s in TABLE]
DESCRIBED_VALUE = 200  # characters of a value `osbuilder help` shows (the table stays readable)


def describe(settings: Settings) -> str:
    """The `osbuilder help` table: name, current value, source, default, description."""
    rows = [("SETTING", "VALUE", "FROM", "DEFAULT", "DESCRIPTION")]
    for s in TABLE:
        value = shown(redact(settings.raw[s.name]), DESCRIBED_VALUE)  # cut, printable, no credentials
        rows.append((s.name, value or "''", settings.sources[s.name], s.shown_default, s.help))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for r in rows:
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
    return "\n".join(lines)
