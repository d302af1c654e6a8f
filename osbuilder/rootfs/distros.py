"""The registry of distribution plugins: every plugin is registered here, by name.

To add a distribution: implement `distro.Distro` in a module of its own and `register` an instance
below (a test may register one for its own duration with `registered`); DISTRO, `osbuilder help`,
`check-deps` and the rootfs step pick it up.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from osbuilder.errors import UsageError
from osbuilder.rootfs.debian import Debian
from osbuilder.rootfs.distro import Distro

DISTROS: dict[str, Distro] = {}


def register(distro: Distro) -> Distro:
    if distro.name in DISTROS:
        raise ValueError(f"distribution {distro.name!r} is registered twice")
    DISTROS[distro.name] = distro
    return distro


@contextmanager
def registered(distro: Distro) -> Iterator[Distro]:
    """`distro` registered for the duration of a `with` block (tests)."""
    register(distro)
    try:
        yield distro
    finally:
        del DISTROS[distro.name]


def names() -> tuple[str, ...]:
    return tuple(DISTROS)


def get(name: str) -> Distro:
    try:
        return DISTROS[name]
    except KeyError:
        raise UsageError(f"DISTRO: unknown distribution {name!r}; available: {', '.join(sorted(DISTROS))}") from None


register(Debian())
