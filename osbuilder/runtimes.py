"""The container runtimes osbuilder builds for: one `Runtime` record each, owning every fact about it.

A runtime record says where the runtime keeps its files (install prefix, the configuration files it
reads, in the order it reads them, and the hypervisor section that names the image and kernel), how
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
    configs: tuple[str, ...]  # the configuration files it reads, the first that exists wins
    attachment: str  # how it attaches an image to the guest (an attachment's name, vm/attachments.py)
    dax: bool  # it mounts the root with DAX, so images get Kata's DAX header (DAX=auto)
    agent_protocols: tuple[str, ...]  # the agent protocols its shim speaks to the guest
    hypervisor: str = "qemu"  # the [hypervisor.<name>] section install points at the image and kernel


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
# it; the image is an NVDIMM mounted with DAX (rootflags=dax); the 1.x agent speaks gRPC over yamux on a
# virtio-serial port, 2.x and later ttRPC over vsock.
KATA = register(Runtime(
    name="kata",
    description="Kata Containers",
    prefix="/usr/share/kata-containers",
    configs=("/etc/kata-containers/configuration.toml", "/usr/share/defaults/kata-containers/configuration.toml"),
    attachment="nvdimm",
    dax=True,
    agent_protocols=("kata", "kata1"),
))

# Clear Containers 3.x (cc-runtime): the same NVDIMM attachment with DAX; its agent speaks the
# hyperstart protocol on two virtio-serial ports.
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
