"""The registry of distribution plugins: every plugin is listed here, by name."""

from __future__ import annotations

from osbuilder.errors import UsageError
from osbuilder.rootfs.debian import Debian
from osbuilder.rootfs.distro import Distro

DISTROS: dict[str, Distro] = {d.name: d for d in (Debian(),)}


def get(name: str) -> Distro:
    try:
        return DISTROS[name]
    except KeyError:
        raise UsageError(f"DISTRO: unknown distribution {name!r}; available: {', '.join(sorted(DISTROS))}") from None
