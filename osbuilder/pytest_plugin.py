"""The pytest plugin (entry point `pytest11`, with `pip install osbuilder[pytest]`): every osbuilder
fixture, marker and option, all named `osbuilder_*` so that they meet no other plugin's.

Fixtures are thin shells over the build steps and the boot check. Built artifacts live in the
content-addressed cache under WORKDIR/cache, so a second session with the same inputs reuses them,
and under `pytest -n N` each artifact is built once (the cache holds a file lock while it builds; the
workers key the rootfs on the archive state the first of them read).

    def test_my_image(osbuilder_image):         # .path is a container.img that passed its checks
        ...

    def test_other_image(osbuilder_artifacts, osbuilder_settings):   # a differently configured one
        img = osbuilder_artifacts.image(osbuilder_settings.with_values(AGENT_INIT="yes"))

    def test_in_the_guest(osbuilder_guest):     # module-scoped: one boot, many assertions
        assert osbuilder_guest.exec(["true"]).status == 0

A test that asks for a build fixture gets the `build` marker, one that boots gets `boot`, and the tests of
a module sharing one booted guest stay on one xdist worker (an `xdist_group` named after the module,
unless it has one). A failed boot test's report has a "boot logs" section naming the log directories;
the phase timings of every guest a test used are `osbuilder_*` properties in JUnit XML. A bad setting
is a usage error (exit 4) before anything is built.

Config gates: `pytest boot_tests --osbuilder-kernel-config a.config --osbuilder-kernel-config b.config`
runs every test that boots `osbuilder_boot_kernel` once per config (ids `[a]`, `[b]`), booting that
config's kernel (built as it is, once per session, cached); `xdist_group`s are extended by the config id
so that configs can go to different workers (or hosts: the cache and locks are per WORKDIR).

Architectures: `pytest boot_tests --osbuilder-arch x86_64 --osbuilder-arch arm64` runs every test that
asks for an osbuilder fixture once per architecture (ids `[x86_64]`, `[arm64]`), each with ARCH set and
a WORKDIR of its own (WORKDIR/<arch>, where `ARCH=<arch> WORKDIR=<WORKDIR>/<arch> osbuilder install-image`
finds what its gate booted). In such a matrix each cell's tests (an architecture, a config) stay in one
`xdist_group` (a group of their own is extended by the cell's id), so with `--dist loadgroup` each cell
is built and booted on one worker, or one host (`--tx ssh=...`). One `--osbuilder-arch` sets ARCH for
the session, no ids.

Options: --osbuilder-workdir, --osbuilder-config, --osbuilder-rebuild, --osbuilder-kernel-config,
--osbuilder-arch, --osbuilder-agent-bin. Markers: build, boot.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from osbuilder import arch as arch_mod
from osbuilder import artifacts as artifacts_mod
from osbuilder import layout, run
from osbuilder import settings as settings_mod
from osbuilder.artifacts import Artifact, Artifacts
from osbuilder.cache import Cache
from osbuilder.errors import OsbuilderError
from osbuilder.rootfs import inputs as rootfs_inputs
from osbuilder.settings import Settings
from osbuilder.vm import accel as accel_mod
from osbuilder.vm import check, phases, ssh
from osbuilder.vm.guest import Guest
from osbuilder.vm.options import BootKernel

log = logging.getLogger("osbuilder")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("osbuilder")
    group.addoption("--osbuilder-workdir", metavar="DIR", help="WORKDIR for artifacts and the cache")
    group.addoption("--osbuilder-config", metavar="FILE", help="osbuilder.yaml profile")
    group.addoption("--osbuilder-rebuild", action="store_true", help="ignore cached artifacts and build again")
    group.addoption("--osbuilder-kernel-config", action="append", default=[], metavar="FILE",
                    help="a complete kernel .config: run the boot tests once per config, booting its kernel "
                         "(repeat for more configs)")
    group.addoption("--osbuilder-arch", action="append", default=[], metavar="ARCH",
                    help="build and boot for this guest architecture (ARCH); repeat to run the tests once per "
                         "architecture, each in WORKDIR/<arch>")
    group.addoption("--osbuilder-agent-bin", metavar="PATH",
                    help="build the images with this agent (AGENT_SOURCE_BIN) and prove it over its own protocol")


# The fixtures that build an artifact, and those that boot one (a test asking for one gets the marker).
BUILD_FIXTURES = {"osbuilder_rootfs", "osbuilder_image", "osbuilder_initrd", "osbuilder_kernel"}
BOOT_FIXTURES = {"osbuilder_boot_guest", "osbuilder_booted_guest", "osbuilder_guest", "osbuilder_accel"}
MODULE_GUEST = "osbuilder_booted_guest"  # one boot per module: its tests stay on one worker

RUN_DIR = "osbuilder_run_dir"  # workerinput: the controller's basetemp, which the run's local workers share


def pytest_configure(config: pytest.Config) -> None:
    run.with_sbin_on_path()
    config.addinivalue_line("markers", "build: builds real artifacts (rootfs, image, kernel)")
    config.addinivalue_line("markers", "boot: boots artifacts under QEMU")
    for path in config.getoption("osbuilder_kernel_config"):
        if not Path(path).expanduser().is_file():
            raise pytest.UsageError(f"--osbuilder-kernel-config: {path}: no such file")
    guest_arches(config)  # a bad name stops the run here
    agent_bin = config.getoption("osbuilder_agent_bin")
    if agent_bin and not Path(agent_bin).expanduser().is_file():
        raise pytest.UsageError(f"--osbuilder-agent-bin: {agent_bin}: no such file")
    run_dir = (getattr(config, "workerinput", None) or {}).get(RUN_DIR)
    if run_dir:
        rootfs_inputs.share_archive_states(Path(run_dir) / "osbuilder-archive-states.json")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # noqa: ANN001 - pytest-xdist's WorkerController, when installed
    """On the controller, for each xdist worker on this machine: the directory its workers share, so that
    they key the rootfs on one archive state (rootfs/inputs.py), whatever the archive publishes meanwhile."""
    factory = getattr(node.config, "_tmp_path_factory", None)
    if node.gateway.spec.popen and factory is not None:
        node.workerinput[RUN_DIR] = str(factory.getbasetemp())


def load_settings(config: pytest.Config) -> Settings:
    """The session's settings: environment and profile, the --osbuilder-* options on top; a bad value is
    a pytest usage error (one line, exit 4), not a traceback."""
    profile = config.getoption("osbuilder_config")
    cli = {"WORKDIR": config.getoption("osbuilder_workdir"),
           "AGENT_SOURCE_BIN": config.getoption("osbuilder_agent_bin")}
    try:
        return settings_mod.load(cli, config=Path(profile) if profile else None)
    except OsbuilderError as e:
        raise pytest.UsageError(e.message) from None


def guest_arches(config: pytest.Config) -> list[str]:
    """The --osbuilder-arch names, each once, as arch.py names them (aarch64 -> arm64)."""
    try:
        return list(dict.fromkeys(arch_mod.lookup(name).name for name in config.getoption("osbuilder_arch")))
    except OsbuilderError as e:
        raise pytest.UsageError(f"--osbuilder-arch: {e.message.removeprefix('ARCH: ')}") from None


# --- config gates (--osbuilder-kernel-config) ---------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """One --osbuilder-kernel-config file and its test id."""

    id: str
    path: Path


def kernel_configs(config: pytest.Config) -> list[KernelConfig]:
    """The --osbuilder-kernel-config files, each once, with ids from their names (`a.config` -> `a`; a second
    `a.config` from another directory -> `a-2`), safe in node ids and xdist group names."""
    configs: list[KernelConfig] = []
    for given in config.getoption("osbuilder_kernel_config"):
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
    """With --osbuilder-kernel-config: every test that boots `osbuilder_boot_kernel` runs once per config.
    With --osbuilder-arch given more than once: every test of the osbuilder fixtures runs once per arch."""
    configs = kernel_configs(metafunc.config)
    if configs and "osbuilder_kernel_config" in metafunc.fixturenames:
        metafunc.parametrize("osbuilder_kernel_config", configs, ids=[c.id for c in configs], indirect=True,
                             scope="session")
    arches = guest_arches(metafunc.config)
    if len(arches) > 1 and "osbuilder_arch" in metafunc.fixturenames:
        metafunc.parametrize("osbuilder_arch", arches, ids=arches, indirect=True, scope="session")


def _cell(item: pytest.Item) -> bool:
    """The test runs in a cell of a matrix: parametrised by --osbuilder-arch or --osbuilder-kernel-config."""
    callspec = getattr(item, "callspec", None)
    return bool(callspec and ({"osbuilder_arch", "osbuilder_kernel_config"} & set(callspec.params)))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Markers and groups from the fixtures a test asks for: `build`, `boot`, and one xdist group per
    module whose tests share a booted guest. In a matrix (--osbuilder-arch, --osbuilder-kernel-config), a
    cell's tests stay together, in a group of their own (`good-path` -> `good-path-a`; a test without a
    group: `osbuilder-cell-a`), so that `--dist loadgroup` sends each cell to one worker or host, where its
    artifacts are built once.
    When any test asks for an osbuilder fixture, the settings are checked now (a bad one stops the run)."""
    ours = False
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        ours = ours or any(n.startswith("osbuilder_") for n in names)
        if names & BUILD_FIXTURES:
            item.add_marker(pytest.mark.build)
        if names & BOOT_FIXTURES:
            item.add_marker(pytest.mark.boot)
        if not any(True for _ in item.iter_markers("xdist_group")):
            if _cell(item):  # one matrix cell's tests together: its artifacts built on one worker (or host)
                item.add_marker(pytest.mark.xdist_group("osbuilder-cell"))
            elif MODULE_GUEST in names:
                item.add_marker(pytest.mark.xdist_group(f"osbuilder-guest-{item.module.__name__}"))  # type: ignore[attr-defined]
    if ours:
        load_settings(config)
    for item in items:
        callspec = getattr(item, "callspec", None)
        kconfig = callspec.params.get("osbuilder_kernel_config") if callspec else None
        guest = callspec.params.get("osbuilder_arch") if callspec else None
        groups = {str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                  for m in item.iter_markers("xdist_group")}
        suffix = "".join(f"-{part}" for part in (kconfig.id if kconfig else None, guest) if part)
        if suffix and groups:
            item.add_marker(pytest.mark.xdist_group("_".join(sorted(groups)) + suffix))


# --- build artifacts ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def osbuilder_arch(request: pytest.FixtureRequest) -> str | None:
    """The --osbuilder-arch this test runs with (pytest_generate_tests parametrises it when there are
    several); None without one."""
    given = guest_arches(request.config)
    return getattr(request, "param", None) or (given[0] if given else None)


@pytest.fixture(scope="session")
def osbuilder_settings(pytestconfig: pytest.Config, osbuilder_arch: str | None) -> Settings:
    """Settings from the environment and profile, with the --osbuilder-* options on top (ARCH, and with
    several --osbuilder-arch a WORKDIR of the architecture's own, WORKDIR/<arch>)."""
    settings = load_settings(pytestconfig)
    if osbuilder_arch is None:
        return settings
    if len(guest_arches(pytestconfig)) == 1:
        return settings.with_values(ARCH=osbuilder_arch)
    return settings.with_values(ARCH=osbuilder_arch, WORKDIR=str(settings.workdir / osbuilder_arch))


@pytest.fixture(scope="session")
def osbuilder_cache(osbuilder_settings: Settings) -> Cache:
    return Cache(layout.Workdir.of(osbuilder_settings).cache)


@pytest.fixture(scope="session")
def osbuilder_artifacts(osbuilder_cache: Cache, pytestconfig: pytest.Config) -> Artifacts:
    """The factory: `.rootfs(settings)`, `.image(settings)`, `.kernel(settings)`, each built once."""
    return Artifacts(osbuilder_cache, pytestconfig.getoption("osbuilder_rebuild"), run_id(pytestconfig))


def run_id(config: pytest.Config) -> str:
    """The id of this test run: pytest-xdist's `testrunuid` on its workers (the same on every
    worker of a run), a fresh one in a run without workers."""
    workerinput = getattr(config, "workerinput", None) or {}
    return str(workerinput.get("testrunuid") or uuid.uuid4().hex)


@pytest.fixture(scope="session")
def osbuilder_rootfs(osbuilder_settings: Settings, osbuilder_artifacts: Artifacts) -> Artifact:
    """The rootfs directory for the session's settings (built once, cached, published as WORKDIR/rootfs)."""
    built = osbuilder_artifacts.rootfs(osbuilder_settings)
    artifacts_mod.publish(osbuilder_settings, "rootfs", built)
    return built


@pytest.fixture(scope="session")
def osbuilder_image(osbuilder_settings: Settings, osbuilder_artifacts: Artifacts,
                    osbuilder_rootfs: Artifact) -> Artifact:
    """container.img made from the `osbuilder_rootfs` fixture (built once, cached, published as
    WORKDIR/container.img: what `osbuilder install-image` installs)."""
    built = osbuilder_artifacts.image(osbuilder_settings, osbuilder_rootfs)
    artifacts_mod.publish(osbuilder_settings, "image", built)
    return built


@pytest.fixture(scope="session")
def osbuilder_initrd(osbuilder_settings: Settings, osbuilder_artifacts: Artifacts) -> Artifact:
    """container-initrd.img (the agent as /init) made from an AGENT_INIT=yes rootfs of the session's
    settings (built once, cached, published as WORKDIR/container-initrd.img); it boots with the
    `osbuilder_kernel` fixture's kernel, not Debian's."""
    built = osbuilder_artifacts.initrd(osbuilder_settings)
    artifacts_mod.publish(osbuilder_settings, "initrd", built)
    return built


@pytest.fixture(scope="session")
def osbuilder_kernel(osbuilder_settings: Settings, osbuilder_artifacts: Artifacts) -> Artifact:
    """A directory with vmlinuz.container, vmlinux.container, config.container, System.map.container
    and kernel-metadata.json for the session's settings (built once, cached)."""
    return osbuilder_artifacts.kernel(osbuilder_settings)


# --- boot ----------------------------------------------------------------------------------


def note_logs(node: pytest.Item | pytest.Collector, log_dir: Path) -> None:
    """Remember a guest's log dir on the test node: a failed test's report names it."""
    dirs = getattr(node, "_osbuilder_boot_logs", [])
    dirs.append(log_dir)
    node._osbuilder_boot_logs = dirs  # type: ignore[union-attr]


def note_guest(node: pytest.Item, guest: Guest) -> None:
    """A guest the test used: its log dir for the failure report, its phase timings for JUnit XML."""
    note_logs(node, guest.log_dir)
    prefix = "osbuilder_" + guest.opts.name.replace("-", "_") + "_"
    for name, at in guest.timings.items():
        node.user_properties.append((prefix + name, at))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failed test that booted guests says where their console logs, QMP transcripts and timings are."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    dirs = getattr(item, "_osbuilder_boot_logs", [])
    if report.failed and dirs:
        report.sections.append(("boot logs", "\n".join(str(d) for d in dict.fromkeys(dirs))))


@pytest.fixture(scope="session")
def osbuilder_kernel_config(request: pytest.FixtureRequest) -> KernelConfig | None:
    """The --osbuilder-kernel-config this test runs with (pytest_generate_tests parametrises it); None
    without one."""
    return getattr(request, "param", None)


def settings_kernel(settings: Settings, request: pytest.FixtureRequest) -> BootKernel:
    """BOOT_KERNEL's kernel (`built` takes the `osbuilder_kernel` fixture's)."""
    if settings.boot_kernel.strip() == "built":
        built = layout.KernelFiles(request.getfixturevalue("osbuilder_kernel").path).vmlinuz
        return check.boot_kernel(settings, built=built)
    return check.boot_kernel(settings)


@pytest.fixture(scope="session")
def osbuilder_boot_kernel(osbuilder_settings: Settings, osbuilder_kernel_config: KernelConfig | None,
                          request: pytest.FixtureRequest) -> BootKernel:
    """The kernel boot checks use: the --osbuilder-kernel-config's kernel (built once, cached), else
    BOOT_KERNEL's."""
    if osbuilder_kernel_config is None:
        return settings_kernel(osbuilder_settings, request)
    artifacts: Artifacts = request.getfixturevalue("osbuilder_artifacts")
    built = artifacts.kernel(osbuilder_settings, config=osbuilder_kernel_config.path)
    return check.boot_kernel(osbuilder_settings, path=layout.KernelFiles(built.path).vmlinuz)


@pytest.fixture(scope="session")
def osbuilder_accel(osbuilder_settings: Settings) -> accel_mod.Accel:
    """KVM if ACCEL says so and (for auto) the probe proved it works; else TCG. A property of the host
    (the probe runs a guest of its own, no kernel), so it is not repeated per --osbuilder-kernel-config."""
    return accel_mod.choose(osbuilder_settings)


@pytest.fixture(scope="session")
def osbuilder_ssh_key(tmp_path_factory: pytest.TempPathFactory) -> ssh.SessionKey:
    """An ed25519 key made for this test session; guests get its public half as a credential."""
    return ssh.make_session_key(tmp_path_factory.mktemp("ssh-key"))


@pytest.fixture
def osbuilder_boot_guest(osbuilder_settings: Settings, osbuilder_boot_kernel: BootKernel,
                         osbuilder_accel: accel_mod.Accel, osbuilder_ssh_key: ssh.SessionKey,
                         request: pytest.FixtureRequest) -> Iterator[Callable[..., Guest]]:
    """Factory: `osbuilder_boot_guest(image, append="", name=None, timeout=None)` starts a guest of the
    session's settings on a throw-away overlay; every guest it started is stopped after the test."""
    guests: list[Guest] = []

    def start(image: Path, append: str = "", name: str | None = None, timeout: float | None = None) -> Guest:
        label = name or f"{request.node.name}-{len(guests)}"
        opts = check.guest_options(osbuilder_settings, image=image, kernel=osbuilder_boot_kernel,
                                   accel=osbuilder_accel, name=label, ssh_key=osbuilder_ssh_key, append=append,
                                   timeout=timeout)
        note_logs(request.node, opts.log_dir)
        guest = Guest.start(opts)
        guests.append(guest)
        return guest

    try:
        yield start
    finally:
        for guest in guests:
            guest.close()
            note_guest(request.node, guest)


@pytest.fixture(scope="module")
def osbuilder_booted_guest(osbuilder_settings: Settings, osbuilder_image: Artifact,
                           osbuilder_boot_kernel: BootKernel, osbuilder_accel: accel_mod.Accel,
                           osbuilder_ssh_key: ssh.SessionKey, osbuilder_kernel_config: KernelConfig | None,
                           request: pytest.FixtureRequest) -> Iterator[Guest]:
    """The session image booted through every phase but powerdown (kernel, agent, running, exec, ssh).

    One boot per module (per module and --osbuilder-kernel-config); its tests each check one thing. If the
    boot fails, they all fail with the boot's error (phase, matched console lines, console tail, log dir).
    After the module's last test the guest is powered off (unless a test did), and a guest that passed
    every phase leaves the boot records `osbuilder install-image` asks for: a failing power-off is an
    error of the module's last test.
    """
    name = f"{request.module.__name__.rsplit('.', 1)[-1]}-booted"
    name += f"-{osbuilder_kernel_config.id}" if osbuilder_kernel_config else ""
    opts = check.guest_options(osbuilder_settings, image=osbuilder_image.path, kernel=osbuilder_boot_kernel,
                               accel=osbuilder_accel, name=name, ssh_key=osbuilder_ssh_key)
    with check.booted(opts, osbuilder_settings) as guest:
        yield guest
        if guest.vm.alive() and "powerdown" not in guest.phases:
            phases.run(guest, "powerdown")
        if guest.passed:
            guest.write_passing_records(osbuilder_settings.workdir)


@pytest.fixture
def osbuilder_guest(osbuilder_booted_guest: Guest, request: pytest.FixtureRequest) -> Guest:
    """`osbuilder_booted_guest`, noted on this test: its log dir in the failure report, its phase timings
    as `osbuilder_*` properties in JUnit XML."""
    note_guest(request.node, osbuilder_booted_guest)
    return osbuilder_booted_guest
