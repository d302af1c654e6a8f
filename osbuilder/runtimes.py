"""The container runtimes osbuilder builds for: one `Runtime` record each, owning every fact about it.

A runtime record says where the runtime keeps its files (install prefix, the configuration files it
reads, in the order it looks for them, whether it reads drop-ins from `config.d/` beside the one it
loaded, and the hypervisor section osbuilder's guests are checked for), how
it attaches the image to its guest (the boot attachment, `osbuilder/vm/attachments.py`, and whether
the image carries Kata's DAX header), and which agent protocols its shim speaks. Everything else asks
the record (`get(settings.runtime)`) and never compares a runtime's name.

To add a runtime: write one `Runtime(...)` below and `register` it (a test may register one for its
own duration with `registered`); `RUNTIME`, `osbuilder help`, the install steps and the boot checks
pick it up.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from osbuilder.errors import UsageError


@dataclass(frozen=True)
class Runtime:
    name: str
    description: str
    prefix: str  # where the installed image and kernel go (PREFIX's default)
    configs: tuple[str, ...]  # the configuration files it looks for, in its order: the first that exists wins
    attachment: str  # how it attaches an image to the guest (an attachment's name, vm/attachments.py)
    dax: bool  # it mounts the root with DAX, so images get Kata's DAX header (DAX=auto)
    agent_protocols: tuple[str, ...]  # the agent protocols its shim speaks to the guest
    # the [hypervisor.<name>] section of its configuration that names the guest osbuilder's boot checks
    # prove (QEMU); a configuration for another hypervisor is still pointed at, with a warning
    hypervisor: str = "qemu"
    # it reads every file of `config.d/` beside the configuration file it loaded (symlinks resolved), in
    # lexical order, each overriding what came before key by key: install writes a drop-in there
    drop_ins: bool = False
    # (configuration directory, install prefix): where a runtime whose configuration is found in that
    # directory keeps its images and kernels, when it is not `prefix` (a kata-deploy install in /opt/kata)
    prefixes: tuple[tuple[str, str], ...] = ()

    def prefix_for(self, config_dir: str) -> str:
        """PREFIX's default when the configuration was found in `config_dir` (a path on the installed system)."""
        return dict(self.prefixes).get(config_dir, self.prefix)


RUNTIMES: dict[str, Runtime] = {}


def register(runtime: Runtime) -> Runtime:
    if runtime.name in RUNTIMES:
        raise ValueError(f"runtime {runtime.name!r} is registered twice")
    RUNTIMES[runtime.name] = runtime
    return runtime


@contextmanager
def registered(runtime: Runtime) -> Iterator[Runtime]:
    """`runtime` registered for the duration of a `with` block (tests)."""
    register(runtime)
    try:
        yield runtime
    finally:
        del RUNTIMES[runtime.name]


def names() -> tuple[str, ...]:
    return tuple(RUNTIMES)


def get(name: str) -> Runtime:
    try:
        return RUNTIMES[name]
    except KeyError:
        raise UsageError(f"RUNTIME: unknown runtime {name!r}; known: {', '.join(RUNTIMES)}") from None


# Kata Containers: its packages install the configuration under /usr/share/defaults and let /etc override
# it; kata-deploy and the static release install everything under /opt/kata (the runtime built with
# PREFIX=/opt/kata looks in /etc, then /opt/kata/share/defaults). configuration.toml is a symlink to
# configuration-<hypervisor>.toml, whose one [hypervisor.<name>] table names image, initrd and kernel.
# Since 2.5 the runtime (Go's katautils.decodeDropIns, and runtime-rs) reads config.d/ beside the file
# it resolved. The image is an NVDIMM mounted with DAX (rootflags=dax); the 1.x agent speaks gRPC over
# yamux on a virtio-serial port, 2.x and later ttRPC over vsock.
KATA = register(Runtime(
    name="kata",
    description="Kata Containers",
    prefix="/usr/share/kata-containers",
    configs=("/etc/kata-containers/configuration.toml", "/usr/share/defaults/kata-containers/configuration.toml",
             "/opt/kata/share/defaults/kata-containers/configuration.toml"),
    attachment="nvdimm",
    dax=True,
    agent_protocols=("kata", "kata1"),
    drop_ins=True,
    prefixes=(("/opt/kata/share/defaults/kata-containers", "/opt/kata/share/kata-containers"),),
))

# Clear Containers 3.x (cc-runtime): the same NVDIMM attachment with DAX; its agent speaks the
# hyperstart protocol on two virtio-serial ports. It reads one configuration file, no drop-ins.
CLEAR_CONTAINERS = register(Runtime(
    name="clear-containers",
    description="Clear Containers",
    prefix="/usr/share/clear-containers",
    configs=("/etc/clear-containers/configuration.toml",
             "/usr/share/defaults/clear-containers/configuration.toml"),
    attachment="nvdimm",
    dax=True,
    agent_protocols=("hyperstart",),
))
