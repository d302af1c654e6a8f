"""The pytest plugin: session-scoped build fixtures, markers and options.

Fixtures call the same functions as the CLI. Their results live in the content-addressed cache
under WORKDIR/cache, so a second session with the same inputs reuses them, and under
`pytest -n N` each artifact is built once (the cache holds a file lock while it builds).

    def test_my_image(image):          # image.path is a container.img that passed its checks
        ...

Options: --osbuilder-workdir, --osbuilder-config, --rebuild. Markers: build, boot.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from osbuilder import settings as settings_mod
from osbuilder.cache import Cache, Manifest
from osbuilder.settings import Settings

log = logging.getLogger("osbuilder")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("osbuilder")
    group.addoption("--osbuilder-workdir", metavar="DIR", help="WORKDIR for artifacts and the cache")
    group.addoption("--osbuilder-config", metavar="FILE", help="osbuilder.yaml profile")
    group.addoption("--rebuild", action="store_true", help="ignore cached artifacts and build again")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "build: builds real artifacts (rootfs, image, kernel)")
    config.addinivalue_line("markers", "boot: boots artifacts under QEMU")


@dataclass(frozen=True)
class Artifact:
    """A built artifact: its path, and the manifest (inputs and key) it was built from."""

    path: Path
    manifest: Manifest

    @property
    def key(self) -> str:
        return self.manifest.key


@pytest.fixture(scope="session")
def osbuilder_settings(pytestconfig: pytest.Config) -> Settings:
    """Settings from the environment and profile, with the --osbuilder-* options on top."""
    config = pytestconfig.getoption("osbuilder_config")
    cli = {"WORKDIR": pytestconfig.getoption("osbuilder_workdir")}
    return settings_mod.load(cli, config=Path(config) if config else None)


@pytest.fixture(scope="session")
def osbuilder_cache(osbuilder_settings: Settings) -> Cache:
    return Cache(osbuilder_settings.workdir / "cache")


@pytest.fixture(scope="session")
def rootfs(osbuilder_settings: Settings, osbuilder_cache: Cache, pytestconfig: pytest.Config) -> Artifact:
    """The rootfs directory for the session's settings (built once, cached)."""
    from osbuilder.rootfs import build_rootfs, manifest

    m = manifest(osbuilder_settings)
    entry = _timed("rootfs", lambda: osbuilder_cache.get_or_build(
        m, lambda tmp: build_rootfs(osbuilder_settings, tmp / "rootfs"), pytestconfig.getoption("rebuild")))
    return Artifact(entry / "rootfs", m)


@pytest.fixture(scope="session")
def image(osbuilder_settings: Settings, osbuilder_cache: Cache, rootfs: Artifact,
          pytestconfig: pytest.Config) -> Artifact:
    """container.img made from the `rootfs` fixture (built once, cached)."""
    from osbuilder.image import build_image, image_manifest

    m = image_manifest(osbuilder_settings, rootfs.key)
    entry = _timed("image", lambda: osbuilder_cache.get_or_build(
        m, lambda tmp: build_image(osbuilder_settings, rootfs.path, tmp / "container.img"),
        pytestconfig.getoption("rebuild")))
    return Artifact(entry / "container.img", m)


from osbuilder.kernel.fixtures import kernel  # noqa: E402,F401
from osbuilder.vm.fixtures import (  # noqa: E402,F401
    boot_accel,
    boot_guest,
    boot_kernel,
    booted_guest,
    guest,
    ssh_session_key,
)


def _timed(what: str, fn):
    started = time.monotonic()
    result = fn()
    log.info("osbuilder fixture %s ready in %.1fs", what, time.monotonic() - started)
    return result
