"""USE_DOCKER=yes for real: podman runs `osbuilder rootfs`, `image` and `boot --check` inside the tools
image, from a PATH that holds only Python and the engine, and the result is the host build's: with one
SOURCE_DATE_EPOCH, the same tree path for path (type, mode, owner, link target, device, content hash:
issue 20 item 11), the same package versions, the same agent. A killed osbuilder's container stops.

No registry is reachable here, so the base image is made from the Debian archive (mmdebstrap to a
tarball, `podman import`) and kept between runs, like the tools image built on it (tagged by a hash of
its inputs). The failures a user meets first (no engine, an engine that cannot run a container, no base
image) are each one line, and leave no WORKDIR behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import filelock
import pytest
from trees import listing, package_versions

from osbuilder import settings as settings_mod
from osbuilder.container import engine as engine_mod
from osbuilder.container import step, tools_image
from osbuilder.errors import InfrastructureError, OsbuilderError
from osbuilder.readback import read_file, read_layout, stat_path

PODMAN = shutil.which("podman")
# The leanest Debian image (Essential packages and apt): the tools image must bring every tool itself.
# (On a base without `mount` the tools image had none, and mmdebstrap, which only recommends it, went on
# without mounting the chroot's /dev and /proc: issue 20, item 11.)
BASE = "localhost/osbuilder-test-base-apt:bookworm"
# Paths whose owner and mode matter most (the agent, the shadow file, units osbuilder enables).
CHECKED = ["/etc/shadow", "/root", "/usr/bin/osbuilder-agent", "/var/lib/osbuilder/osbuilder.yaml",
           "/etc/ssh/sshd_config.d/osbuilder.conf", "/usr/lib/systemd/system/osbuilder-agent.service",
           "/var/log/journal", "/usr/bin/passwd",
           "/etc/systemd/system/multi-user.target.wants/osbuilder-slirp-network.service"]

EPOCH = "1700000000"  # both builds: a tree's contents then depend on its inputs alone

needs_podman = pytest.mark.skipif(PODMAN is None, reason="needs podman (.ci/install-deps installs it)")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="builds with root's podman, as CI does")


@pytest.fixture(scope="session")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """TOOLS_BASE_IMAGE for the tests: Debian bookworm's Essential packages and apt, from the archive,
    imported once."""
    with filelock.FileLock(tmp_path_factory.getbasetemp().parent / "osbuilder-test-base.lock"):
        if subprocess.run([PODMAN, "image", "exists", BASE]).returncode != 0:
            tar = tmp_path_factory.mktemp("base") / "base.tar"
            subprocess.run(["mmdebstrap", "--mode=unshare", "--variant=apt", "--format=tar", "bookworm",
                            str(tar)], check=True, capture_output=True, timeout=900)
            subprocess.run([PODMAN, "import", str(tar), BASE], check=True, capture_output=True, timeout=600)
            tar.unlink()
    return BASE


@pytest.fixture(scope="session")
def engine_only_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PATH directory with Python and the engines, nothing else (no mmdebstrap, no e2fsprogs)."""
    bindir = tmp_path_factory.mktemp("engine-only-bin")
    for name, target in (("python3", sys.executable), ("podman", PODMAN), ("docker", shutil.which("docker"))):
        if target:
            (bindir / name).symlink_to(target)
    return bindir


def osb(bindir: Path, *args: str, cwd: Path, **settings: str) -> subprocess.CompletedProcess:
    """`osbuilder ARGS` with USE_DOCKER=yes and only `bindir` on PATH."""
    return subprocess.run([sys.executable, "-m", "osbuilder", *args], env=engine_env(bindir, **settings), cwd=cwd,
                          capture_output=True, text=True, timeout=1800)


def engine_env(bindir: Path, **settings: str) -> dict[str, str]:
    env = {"PATH": str(bindir), "HOME": os.environ.get("HOME", "/root"), "LC_ALL": "C.UTF-8", "USE_DOCKER": "yes",
           "CONTAINER_ENGINE": "podman", "TOOLS_BASE_IMAGE": BASE}
    for name in ("PYTEST_XDIST_WORKER_COUNT", "CACHE_DIR", "XDG_CACHE_HOME"):
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(settings)
    return env


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("osbuilder: error:")]


@pytest.fixture(scope="module")
def engine_build(base_image: str, engine_only_path: Path) -> Iterator[Path]:
    """A WORKDIR with a rootfs and an image, both made in the tools container."""
    assert shutil.which("mmdebstrap", path=str(engine_only_path)) is None
    assert shutil.which("mke2fs", path=str(engine_only_path)) is None
    # Searchable by others, like the fixtures' WORKDIR: mmdebstrap lets apt download as _apt only when
    # _apt can reach the tree (under pytest's 0700 temporary directory it could not, and the tree's
    # apt/partial directories would belong to root instead).
    home = Path(tempfile.mkdtemp(prefix="osbuilder-engine-build-", dir="/var/tmp"))
    home.chmod(0o755)
    workdir = home / "workdir"
    try:
        for step_name in ("rootfs", "image"):
            # a CACHE_DIR of its own: the host build's base tree there would make the container's rootfs a copy of it
            r = osb(engine_only_path, step_name, "--workdir", str(workdir), cwd=home, SOURCE_DATE_EPOCH=EPOCH,
                    CACHE_DIR=str(home / "cache"))
            assert r.returncode == 0, f"osbuilder {step_name} in the container:\n{r.stderr[-4000:]}"
            if step_name == "image":  # the tools image the rootfs step built is reused, not built again
                assert "building the tools image" not in r.stderr
        yield workdir
    finally:
        shutil.rmtree(home)


pytestmark = [pytest.mark.xdist_group("container")]


@pytest.mark.build
@needs_podman
@needs_root
def test_rootfs_and_image_in_the_container_match_a_host_build(engine_build: Path, osbuilder_settings,
                                                            osbuilder_artifacts, osbuilder_image):
    """The whole tree: every path with its type, mode, owner, symlink target, device and content (no
    exception: nothing of the machine that builds reaches the tree); the same package versions; the
    image's layout and the owners and modes in it."""
    rootfs = osbuilder_artifacts.rootfs(osbuilder_settings.with_values(SOURCE_DATE_EPOCH=EPOCH))
    ours, theirs = listing(engine_build / "rootfs"), listing(rootfs.path)
    assert sorted(set(ours) ^ set(theirs)) == []
    assert {p: (ours[p], theirs[p]) for p in ours if ours[p] != theirs[p]} == {}
    status = "var/lib/dpkg/status"
    assert package_versions((engine_build / "rootfs" / status).read_text()) == \
        package_versions((rootfs.path / status).read_text())
    agent = "usr/bin/osbuilder-agent"
    assert (engine_build / "rootfs" / agent).read_bytes() == (rootfs.path / agent).read_bytes()

    built = engine_build / "container.img"
    check = subprocess.run(["e2fsck", "-fn", read_layout(built).fs_spec(built)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert read_layout(built) == read_layout(osbuilder_image.path)
    for path in CHECKED:
        got, want = stat_path(built, path), stat_path(osbuilder_image.path, path)
        assert want is not None and got == want, path
    assert package_versions(read_file(built, "/" + status).decode()) == \
        package_versions(read_file(osbuilder_image.path, "/" + status).decode())
    assert read_file(built, "/" + agent) == read_file(osbuilder_image.path, "/" + agent)


@pytest.mark.boot
@needs_podman
@needs_root
def test_boot_check_passes_in_the_container(engine_build: Path, engine_only_path: Path):
    r = osb(engine_only_path, "boot", "--check", "--workdir", str(engine_build), cwd=engine_build.parent)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"boot check PASSED: {engine_build / 'container.img'}" in r.stdout + r.stderr
    assert list((engine_build / "boot-records").glob("*.json")), "no boot record: install-image would refuse"


@pytest.mark.build
@needs_podman
@needs_root
def test_a_killed_osbuilder_stops_its_container(base_image: str, engine_only_path: Path):
    """SIGKILL cannot be caught, and the engine's client dying does not stop a container: osbuilder's
    watchdog stops it (the step inside unwinds as on Ctrl-C and removes its temporaries)."""
    home = Path(tempfile.mkdtemp(prefix="osbuilder-engine-kill-", dir="/var/tmp"))
    home.chmod(0o755)
    proc = subprocess.Popen([sys.executable, "-m", "osbuilder", "rootfs", "--workdir", str(home / "wd")], cwd=home,
                            env=engine_env(engine_only_path, CACHE_DIR=str(home / "cache")),  # no base tree yet
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pattern = f"^osbuilder-rootfs-{proc.pid}-"
    try:
        deadline = time.monotonic() + 900  # the tools image may be built first
        base_dir = home / "cache/artifacts/rootfs-base"  # where mmdebstrap's tree is built, in a temporary
        while not containers(pattern) or not list(base_dir.glob(".*.tmp-*")):
            assert proc.poll() is None and time.monotonic() < deadline, "the step's container never ran mmdebstrap"
            time.sleep(1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while containers(pattern) and time.monotonic() < deadline:
            time.sleep(1)
        assert containers(pattern) == [], "the container outlived the osbuilder that started it"
        assert [p.name for p in (home / "wd").iterdir() if ".tmp-" in p.name] == []
        assert [p.name for p in base_dir.iterdir() if ".tmp-" in p.name] == []
    finally:
        for name in containers(pattern):
            subprocess.run([PODMAN, "rm", "--force", "--time", "0", name], capture_output=True)
        shutil.rmtree(home)


def containers(pattern: str) -> list[str]:
    out = subprocess.run([PODMAN, "ps", "--all", "--filter", f"name={pattern}", "--format", "{{.Names}}"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


@pytest.mark.build
@needs_podman
@needs_root
def test_a_missing_base_image_is_one_line_and_writes_nothing(tmp_path: Path, engine_only_path: Path):
    r = osb(engine_only_path, "rootfs", "--workdir", str(tmp_path / "wd"), cwd=tmp_path,
            TOOLS_BASE_IMAGE="localhost/osbuilder-no-such-base:none")
    assert r.returncode == 2, r.stderr[-3000:]
    (line,) = error_lines(r)
    assert line.startswith("osbuilder: error: TOOLS_BASE_IMAGE: localhost/osbuilder-no-such-base:none is not a "
                           "local podman image and cannot be pulled"), line
    assert "podman import" in line
    assert not (tmp_path / "wd").exists()


@pytest.mark.skipif(shutil.which("docker") is None,
                    reason="needs a docker client to stand for an engine whose daemon is not running")
def test_an_engine_that_cannot_run_containers_is_one_line_exit_125(tmp_path: Path, engine_only_path: Path):
    """A docker client whose daemon does not answer (DOCKER_HOST names no socket): installed, but it
    cannot run a container; that is the machine's fault (125), and nothing is written."""
    r = osb(engine_only_path, "image", "--workdir", str(tmp_path / "wd"), cwd=tmp_path,
            CONTAINER_ENGINE="docker", DOCKER_HOST=f"unix://{tmp_path}/no-daemon.sock", CACHE_DIR=str(tmp_path / "c"))
    assert r.returncode == 125, r.stderr[-3000:]
    (line,) = error_lines(r)
    assert line.startswith("osbuilder: error: CONTAINER_ENGINE: docker is installed but cannot run a container ("), line
    assert line.endswith("start the Docker daemon, or set CONTAINER_ENGINE=podman"), line
    assert not (tmp_path / "wd").exists()


def test_a_missing_engine_names_the_setting(tmp_path: Path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(sys.executable)
    r = osb(bindir, "rootfs", "--workdir", str(tmp_path / "wd"), cwd=tmp_path, CONTAINER_ENGINE="docker")
    assert r.returncode == 2
    assert error_lines(r) == ["osbuilder: error: CONTAINER_ENGINE: docker not found on PATH; install one "
                              "(apt-get install podman runc) or set USE_DOCKER=no"]
    assert not (tmp_path / "wd").exists()


def test_crun_without_runc_is_explained_in_one_line(tmp_path: Path, monkeypatch):
    """Podman 4.3 with crun and no runc on these hosts: each probe run fails as podman really does here
    (its messages played back; nothing else is faked), and the one line says what to install."""
    said = {  # what podman printed on this machine for each attempt
        "as configured": "Error: crun: setrlimit `RLIMIT_NOFILE`: Operation not permitted: OCI permission denied",
        "limits": "Error: OCI runtime error: crun: cgroups in hybrid mode not supported, drop all controllers "
                  "from cgroupv2",
        "runc": 'Error: default OCI runtime "runc" not found: invalid argument',
    }
    ran: list[list[str]] = []

    def fake_run(cmd, **kwargs):
        cmd = [str(c) for c in cmd]
        ran.append(cmd)
        if cmd[1] != "run":
            return subprocess.CompletedProcess(cmd, 0, b"", None)
        attempt = "runc" if "--runtime" in cmd else "limits" if any("--ulimit" in c for c in cmd) else "as configured"
        raise OsbuilderError("container: `podman` failed (exit 126)", f"command: {' '.join(cmd)}\n{said[attempt]}")

    monkeypatch.setattr(engine_mod, "run", fake_run)
    monkeypatch.setattr(engine_mod, "tool_version", lambda program: "podman version 4.3.1")
    s = settings_mod.load({"CACHE_DIR": str(tmp_path / "cache")}, env={}, cwd=tmp_path)
    with pytest.raises(InfrastructureError) as caught:
        engine_mod.probe(s, engine_mod.Engine("podman", "/usr/bin/podman"), lambda e: BASE)
    message = caught.value.message
    assert message.startswith("CONTAINER_ENGINE: podman is installed but cannot run a container (Error: "), message
    assert message.endswith("install runc (apt-get install runc): crun cannot run containers on this host's cgroups")
    assert "\n" not in message and caught.value.exit_code == 125
    runs = [c for c in ran if c[1] == "run"]
    assert runs[0][-len(engine_mod.PROBE_COMMAND):] == list(engine_mod.PROBE_COMMAND)
    assert any("--ulimit=nofile" in " ".join(c) for c in runs[1:]), "the host's limits were not tried"
    assert not (tmp_path / "cache" / "container-probe.json").exists(), "a failed probe left a verdict"


def test_settings_reach_the_container_by_name_and_paths_at_their_place(tmp_path: Path, monkeypatch):
    """The settings table names what is forwarded; values travel in the environment (a REPO_URL password
    stays off the command line); WORKDIR and the per-user cache are writable, named files read-only."""
    agent = tmp_path / "my-agent"
    agent.write_bytes(b"\x7fELF")
    monkeypatch.chdir(tmp_path)
    s = settings_mod.load({"EXTRA_PKGS": "curl", "AGENT_SOURCE_BIN": str(agent), "WORKDIR": str(tmp_path / "wd"),
                           "CACHE_DIR": str(tmp_path / "cache"), "PREFIX": "/usr"},
                          env={"REPO_URL": "http://user:s3cret@mirror.example/debian", "USE_DOCKER": "yes"},
                          cwd=tmp_path)

    cmd = step.container_command(engine_mod.Engine("podman", "/usr/bin/podman", ("--ulimit=nofile=1:1",)),
                                 "localhost/osbuilder-tools:x", s, step.Invocation("boot", ("--check",)), "name",
                                 False)
    assert "s3cret" not in " ".join(cmd)
    env = step.environment(s)
    assert env["REPO_URL"] == "http://user:s3cret@mirror.example/debian" and env["USE_DOCKER"] == "no"
    assert env["EXTRA_PKGS"] == "curl" and env["CACHE_DIR"] == str(tmp_path / "cache")
    assert "OS_VERSION" not in env  # a default: the container has the same
    assert {cmd[i + 1] for i, word in enumerate(cmd) if word == "-e"} == set(env)
    volumes = {cmd[i + 1] for i, word in enumerate(cmd) if word == "-v"}
    assert {f"{tmp_path / 'wd'}:{tmp_path / 'wd'}:rw", f"{tmp_path / 'cache'}:{tmp_path / 'cache'}:rw",
            f"{agent}:{agent}:ro", f"{tmp_path}:{tmp_path}:ro"} <= volumes
    assert not [v for v in volumes if v.startswith("/usr:")], "the host's /usr would hide the image's tools"
    assert cmd[-3:] == ["localhost/osbuilder-tools:x", "boot", "--check"]
    assert "--ulimit=nofile=1:1" in cmd


def test_the_tools_image_tag_follows_its_inputs(tmp_path: Path):
    """A changed file of osbuilder, another base image or another package set gives another tag; the same
    inputs the same."""
    copy = tmp_path / "osbuilder"
    shutil.copytree(tools_image.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    import osbuilder.cli  # noqa: F401 - registers the steps' records, whose packages the image holds

    packages = tools_image.system_packages(settings_mod.load({}, env={"WORKDIR": str(tmp_path / "wd")}, cwd=tmp_path))
    assert {"mmdebstrap", "e2fsprogs", "qemu-system-x86", "python3"} <= set(packages)
    same = tools_image.digest(BASE, "id1", packages, copy)
    assert same == tools_image.digest(BASE, "id1", packages, tools_image.PACKAGE_DIR)
    assert tools_image.digest(BASE, "id2", packages, copy) != same
    assert tools_image.digest(BASE, "id1", [*packages, "vim"], copy) != same
    with (copy / "agent" / "agent.c").open("a") as f:
        f.write("\n")
    assert tools_image.digest(BASE, "id1", packages, copy) != same


@needs_podman
def test_check_deps_asks_only_for_the_engine(tmp_path: Path, engine_only_path: Path):
    r = osb(engine_only_path, "check-deps", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^  podman\s+podman\s+/", r.stdout, re.M) and re.search(r"^  runc\s+runc", r.stdout, re.M)
    assert "mmdebstrap" not in r.stdout and "mke2fs" not in r.stdout


@needs_podman
@needs_root
def test_help_names_the_engine_and_the_tools_image(tmp_path: Path, base_image: str, engine_only_path: Path):
    r = osb(engine_only_path, "help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if line.startswith("Container (USE_DOCKER=yes)"))
    assert f"engine podman ({engine_only_path / 'podman'})" in line
    assert re.search(r"tools image localhost/osbuilder-tools:[0-9a-f]{20} \(", line), line
    assert f"TOOLS_BASE_IMAGE {BASE}" in line
