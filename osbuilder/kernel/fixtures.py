"""The session-scoped pytest fixture `kernel`: the guest kernel, built once and cached.

Its `.path` is the cache entry directory holding vmlinuz.container, vmlinux.container,
config.container, System.map.container and kernel-metadata.json. The cache key covers the source
(identity and version), the fragments and base config, the compiler version and the build epoch;
the cache's file lock makes pytest-xdist workers build it once.
"""

from __future__ import annotations

import pytest

from osbuilder.cache import Cache
from osbuilder.settings import Settings


@pytest.fixture(scope="session")
def kernel(osbuilder_settings: Settings, osbuilder_cache: Cache, pytestconfig: pytest.Config):
    """A directory (an Artifact) with vmlinuz.container and vmlinux.container for the session's settings."""
    # Imported here: pytest_plugin imports this module, so a top-level import would be circular.
    from osbuilder.kernel.build import build_kernel, kernel_manifest
    from osbuilder.pytest_plugin import Artifact, _timed

    m = kernel_manifest(osbuilder_settings)
    entry = _timed("kernel", lambda: osbuilder_cache.get_or_build(
        m, lambda tmp: build_kernel(osbuilder_settings, tmp), pytestconfig.getoption("rebuild")))
    return Artifact(entry, m)
