"""The pytest plugin (entry point `pytest11`): every osbuilder fixture, marker and option.

Fixtures are thin shells over the build steps and the boot check. Built artifacts live in the
content-addressed cache under WORKDIR/cache, so a second session with the same inputs reuses them,
and under `pytest -n N` each artifact is built once (the cache holds a file lock while it builds).

    def test_my_image(image):             # image.path is a container.img that passed its checks
        ...

    def test_other_image(osbuilder_artifacts, osbuilder_settings):   # a differently configured one
        img = osbuilder_artifacts.image(osbuilder_settings.with_values(AGENT_INIT="yes"))

    def test_guest(booted_guest):          # module-scoped: one boot, many assertions
        assert booted_guest.exec(["true"]).status == 0

Config gates: `pytest boot_tests --kernel-config a.config --kernel-config b.config` runs every test that
boots `boot_kernel` once per config (ids `[a]`, `[b]`), booting that config's kernel (built as it is, once
per session, cached); `xdist_group`s are extended by the config id so that configs can go to different
workers (or hosts: the cache and locks are per WORKDIR).

Options: --osbuilder-workdir, --osbuilder-config, --rebuild, --kernel-config. Markers: build, boot.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from osbuilder import image as image_step
from osbuilder import initrd as initrd_step
from osbuilder import layout
from osbuilder import settings as settings_mod
from osbuilder.cache import Cache, Manifest
from osbuilder.kernel import build as kernel_step
from osbuilder.rootfs import build as rootfs_step
from osbuilder.settings import Settings
from osbuilder.vm import accel as accel_mod
from osbuilder.vm import check, ssh
from osbuilder.vm.guest import Guest
from osbuilder.vm.options import BootKernel

log = logging.getLogger("osbuilder")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("osbuilder")
    group.addoption("--osbuilder-workdir", metavar="DIR", help="WORKDIR for artifacts and the cache")
    group.addoption("--osbuilder-config", metavar="FILE", help="osbuilder.yaml profile")
    group.addoption("--rebuild", action="store_true", help="ignore cached artifacts and build again")
    group.addoption("--kernel-config", action="append", default=[], metavar="FILE",
                    help="a complete kernel .config: run the boot tests once per config, booting its kernel "
                         "(repeat for more configs)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "build: builds real artifacts (rootfs, image, kernel)")
    config.addinivalue_line("markers", "boot: boots artifacts under QEMU")
    for path in config.getoption("kernel_config"):
        if not Path(path).expanduser().is_file():
            raise pytest.UsageError(f"--kernel-config: {path}: no such file")


# --- config gates (--kernel-config) ---------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """One --kernel-config file and its test id."""

    id: str
    path: Path


def kernel_configs(config: pytest.Config) -> list[KernelConfig]:
    """The --kernel-config files, each once, with ids from their names (`a.config` -> `a`; a second
    `a.config` from another directory -> `a-2`), safe in node ids and xdist group names."""
    configs: list[KernelConfig] = []
    for given in config.getoption("kernel_config"):
        path = Path(given).expanduser().absolute()
        if any(c.path == path for c in configs):
            continue
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.name.removesuffix(".config") or path.name)
        ident, n = stem, 1
        while any(c.id == ident for c in configs):
            n += 1
            ident = f"{stem}-{n}"
        configs.append(KernelConfig(ident, path))
    return configs


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """With --kernel-config: every test that boots `boot_kernel` runs once per config."""
    configs = kernel_configs(metafunc.config)
    if configs and "osbuilder_kernel_config" in metafunc.fixturenames:
        metafunc.parametrize("osbuilder_kernel_config", configs, ids=[c.id for c in configs], indirect=True,
                             scope="session")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A config's tests in an xdist_group stay together (one module-scoped guest), in a group of
    their own (`good-path` -> `good-path-a`), so that `--dist loadgroup` can send each config elsewhere."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        kconfig = callspec.params.get("osbuilder_kernel_config") if callspec else None
        groups = {str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                  for m in item.iter_markers("xdist_group")}
        if kconfig is not None and groups:
            item.add_marker(pytest.mark.xdist_group("_".join(sorted(groups)) + f"-{kconfig.id}"))


# --- build artifacts ------------------------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    """A built artifact: its path, and the manifest (inputs and key) it was built from."""

    path: Path
    manifest: Manifest

    @property
    def key(self) -> str:
        return self.manifest.key


class Artifacts:
    """Builds each artifact once per set of inputs, through the cache: the one factory behind the
    `rootfs`, `image`, `initrd` and `kernel` fixtures, for tests that need a differently configured one.

    `rebuild` (--rebuild) builds each artifact again once per `session`: the test run's id, which
    pytest-xdist's workers share, so an entry another worker of this run built (and may be using)
    is a hit, never rebuilt or deleted."""

    def __init__(self, cache: Cache, rebuild: bool = False, session: str | None = None) -> None:
        self.cache = cache
        self.rebuild = rebuild
        self.session = session or uuid.uuid4().hex

    def _get(self, what: str, manifest: Manifest, build: Callable[[Path], object]) -> Path:
        started = time.monotonic()
        entry = self.cache.get_or_build(manifest, build, self.rebuild, session=self.session)
        log.info("osbuilder fixture %s ready in %.1fs", what, time.monotonic() - started)
        return entry

    def rootfs(self, settings: Settings) -> Artifact:
        """The rootfs directory for these settings."""
        m = rootfs_step.manifest(settings)
        entry = self._get("rootfs", m, lambda tmp: rootfs_step.build_rootfs(settings, tmp / layout.ROOTFS))
        return Artifact(entry / layout.ROOTFS, m)

    def image(self, settings: Settings, rootfs: Artifact | None = None) -> Artifact:
        """container.img made from `rootfs` (default: `rootfs(settings)`)."""
        tree = rootfs or self.rootfs(settings)
        m = image_step.image_manifest(settings, tree.key)
        entry = self._get("image", m, lambda tmp: image_step.build_image(settings, tree.path, tmp / layout.IMAGE))
        return Artifact(entry / layout.IMAGE, m)

    def initrd(self, settings: Settings, rootfs: Artifact | None = None) -> Artifact:
        """container-initrd.img made from `rootfs` (default: `rootfs(settings)` with AGENT_INIT=yes, the
        only kind of rootfs an initrd can boot)."""
        settings = settings.with_values(AGENT_INIT="yes")
        tree = rootfs or self.rootfs(settings)
        m = initrd_step.initrd_manifest(settings, tree.key)
        entry = self._get("initrd", m,
                          lambda tmp: initrd_step.build_initrd(settings, tree.path, tmp / layout.INITRD))
        return Artifact(entry / layout.INITRD, m)

    def kernel(self, settings: Settings, config: Path | None = None) -> Artifact:
        """A directory with the kernel outputs (layout.KernelFiles) for these settings: from osbuilder's
        fragments, or with `config` from that complete .config as it is."""
        m = kernel_step.kernel_manifest(settings, config=config)
        entry = self._get("kernel", m, lambda tmp: kernel_step.build_kernel(settings, tmp, config=config))
        return Artifact(entry, m)


@pytest.fixture(scope="session")
def osbuilder_settings(pytestconfig: pytest.Config) -> Settings:
    """Settings from the environment and profile, with the --osbuilder-* options on top."""
    config = pytestconfig.getoption("osbuilder_config")
    cli = {"WORKDIR": pytestconfig.getoption("osbuilder_workdir")}
    return settings_mod.load(cli, config=Path(config) if config else None)


@pytest.fixture(scope="session")
def osbuilder_cache(osbuilder_settings: Settings) -> Cache:
    return Cache(layout.Workdir.of(osbuilder_settings).cache)


@pytest.fixture(scope="session")
def osbuilder_artifacts(osbuilder_cache: Cache, pytestconfig: pytest.Config) -> Artifacts:
    """The factory: `.rootfs(settings)`, `.image(settings)`, `.kernel(settings)`, each built once."""
    return Artifacts(osbuilder_cache, pytestconfig.getoption("rebuild"), run_id(pytestconfig))


def run_id(config: pytest.Config) -> str:
    """The id of this test run: pytest-xdist's `testrunuid` on its workers (the same on every
    worker of a run), a fresh one in a run without workers."""
    workerinput = getattr(config, "workerinput", None) or {}
    return str(workerinput.get("testrunuid") or uuid.uuid4().hex)


@pytest.fixture(scope="session")
def rootfs(osbuilder_settings: Settings, osbuilder_artifacts: Artifacts) -> Artifact:
    """The rootfs directory for the session's settings (built once, cached)."""
    return osbuilder_artifacts.rootfs(osbuilder_settings)


@pytest.fixture(scope="session")
def image(osbuilder_settings: Settings, osbuilder_artifacts: Artifacts, rootfs: Artifact) -> Artifact:
    """container.img made from the `rootfs` fixture (built once, cached)."""
    return osbuilder_artifacts.image(osbuilder_settings, rootfs)


@pytest.fixture(scope="session")
def initrd(osbuilder_settings: Settings, osbuilder_artifacts: Artifacts) -> Artifact:
    """container-initrd.img (the agent as /init) made from an AGENT_INIT=yes rootfs of the session's
    settings (built once, cached); it boots with the `kernel` fixture's kernel, not Debian's."""
    return osbuilder_artifacts.initrd(osbuilder_settings)


@pytest.fixture(scope="session")
def kernel(osbuilder_settings: Settings, osbuilder_artifacts: Artifacts) -> Artifact:
    """A directory with vmlinuz.container, vmlinux.container, config.container, System.map.container
    and kernel-metadata.json for the session's settings (built once, cached)."""
    return osbuilder_artifacts.kernel(osbuilder_settings)


# --- boot ----------------------------------------------------------------------------------


def note_logs(node: pytest.Item | pytest.Collector, log_dir: Path) -> None:
    """Remember a guest's log dir on the test node; boot_tests/conftest.py prints it on failure."""
    dirs = getattr(node, "_osbuilder_boot_logs", [])
    dirs.append(log_dir)
    node._osbuilder_boot_logs = dirs  # type: ignore[union-attr]


@pytest.fixture(scope="session")
def osbuilder_kernel_config(request: pytest.FixtureRequest) -> KernelConfig | None:
    """The --kernel-config this test runs with (pytest_generate_tests parametrises it); None without one."""
    return getattr(request, "param", None)


def settings_kernel(settings: Settings, request: pytest.FixtureRequest) -> BootKernel:
    """BOOT_KERNEL's kernel (`built` takes the `kernel` fixture's)."""
    if settings.boot_kernel.strip() == "built":
        built = layout.KernelFiles(request.getfixturevalue("kernel").path).vmlinuz
        return check.boot_kernel(settings, built=built)
    return check.boot_kernel(settings)


@pytest.fixture(scope="session")
def boot_kernel(osbuilder_settings: Settings, osbuilder_kernel_config: KernelConfig | None,
                request: pytest.FixtureRequest) -> BootKernel:
    """The kernel boot checks use: the --kernel-config's kernel (built once, cached), else BOOT_KERNEL's."""
    if osbuilder_kernel_config is None:
        return settings_kernel(osbuilder_settings, request)
    artifacts: Artifacts = request.getfixturevalue("osbuilder_artifacts")
    built = artifacts.kernel(osbuilder_settings, config=osbuilder_kernel_config.path)
    return check.boot_kernel(osbuilder_settings, path=layout.KernelFiles(built.path).vmlinuz)


@pytest.fixture(scope="session")
def boot_accel(osbuilder_settings: Settings) -> accel_mod.Accel:
    """KVM if ACCEL says so and (for auto) the probe proved it works; else TCG. A property of the host
    (the probe runs a guest of its own, no kernel), so it is not repeated per --kernel-config."""
    return accel_mod.choose(osbuilder_settings)


@pytest.fixture(scope="session")
def ssh_session_key(tmp_path_factory: pytest.TempPathFactory) -> ssh.SessionKey:
    """An ed25519 key made for this test session; guests get its public half as a credential."""
    return ssh.make_session_key(tmp_path_factory.mktemp("ssh-key"))


@pytest.fixture
def boot_guest(osbuilder_settings: Settings, boot_kernel: BootKernel, boot_accel: accel_mod.Accel,
               ssh_session_key: ssh.SessionKey, request: pytest.FixtureRequest) -> Iterator[Callable[..., Guest]]:
    """Factory: `boot_guest(image, append="", name=None, timeout=None)` starts a guest of the session's
    settings on a throw-away overlay; every guest it started is stopped after the test."""
    guests: list[Guest] = []

    def start(image: Path, append: str = "", name: str | None = None, timeout: float | None = None) -> Guest:
        label = name or f"{request.node.name}-{len(guests)}"
        opts = check.guest_options(osbuilder_settings, image=image, kernel=boot_kernel, accel=boot_accel,
                                   name=label, ssh_key=ssh_session_key, append=append, timeout=timeout)
        note_logs(request.node, opts.log_dir)
        guest = check.start_guest(opts)
        guests.append(guest)
        return guest

    try:
        yield start
    finally:
        for guest in guests:
            guest.close()


@pytest.fixture(scope="module")
def booted_guest(osbuilder_settings: Settings, image: Artifact, boot_kernel: BootKernel,
                 boot_accel: accel_mod.Accel, ssh_session_key: ssh.SessionKey,
                 osbuilder_kernel_config: KernelConfig | None, request: pytest.FixtureRequest) -> Iterator[Guest]:
    """The session image booted through every phase but powerdown (kernel, agent, running, exec, ssh).

    One boot per module (per module and --kernel-config); its tests each check one thing. If the boot
    fails, they all fail with the boot's error (phase, matched console lines, console tail, log dir).
    """
    name = f"{request.module.__name__.rsplit('.', 1)[-1]}-booted"
    name += f"-{osbuilder_kernel_config.id}" if osbuilder_kernel_config else ""
    opts = check.guest_options(osbuilder_settings, image=image.path, kernel=boot_kernel, accel=boot_accel,
                               name=name, ssh_key=ssh_session_key)
    with check.booted(opts, osbuilder_settings) as guest:
        yield guest


@pytest.fixture
def guest(booted_guest: Guest, request: pytest.FixtureRequest) -> Guest:
    """`booted_guest`, with its log dir noted for this test's failure report."""
    note_logs(request.node, booted_guest.log_dir)
    return booted_guest
