"""The boot matrix spread over several hosts, as a team runs it when one machine is not enough: pytest-xdist
workers on other hosts over SSH (`--tx ssh=user@host//python=...`), each matrix cell on one host, and the
kernel builds of every host sharing one ccache over the network (CCACHE_REMOTE_STORAGE).

The hosts are made on this machine (netns_hosts.py): two network namespaces on a bridge, each with its own
address, an sshd listening there, its own user and home with osbuilder installed in a venv, and its own
WORKDIR and per-user cache (kept from one run to the next, as a build host keeps it; not its ccache).
ccache's remote storage is a small HTTP server (ccache_http.py) on the first host's address, started and
stopped here.

- The matrix: a user's project run from this machine with `--osbuilder-arch x86_64 --osbuilder-arch arm64`
  and one xdist worker on each host. Every test of a cell (an architecture) runs on one host; each cell's
  rootfs is built and booted there (rootless: the hosts' users are ordinary users) and passes every phase.
- The shared ccache: a kernel (a small complete .config, `--osbuilder-kernel-config`) built on the first host
  fills the remote storage; built on the second host, whose own ccache is empty, it is compiled from
  the first host's objects: remote hits, almost no misses.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from boot_tests import netns_hosts
from boot_tests.netns_hosts import PROGRAMS, Host, NetnsHosts, in_namespace, sh, world_readable_copy
from boot_tests.scratch import remove_later
from boot_tests.user_env import without_settings
from osbuilder.arch import ARM64

pytestmark = [pytest.mark.build, pytest.mark.boot, pytest.mark.xdist_group("multihost"),
              pytest.mark.skipif(os.geteuid() != 0, reason="makes network namespaces and users: needs root"),
              pytest.mark.skipif(platform.machine() != "x86_64", reason="an arm64 cell on an x86_64 host")]

PROJECT = Path(__file__).resolve().parents[1]
ARM64_PROGRAMS = ("qemu-system-aarch64", "qemu-aarch64-static", "aarch64-linux-gnu-gcc")
CCACHE_PORT = 8080

USER_TESTS = """
import getpass
from pathlib import Path

from osbuilder import elf

MACHINES = {"x86_64": "x86_64", "arm64": "aarch64"}


def note(cell, what):
    with (Path.home() / "cells.txt").open("a") as f:
        f.write(f"{cell} {what} {getpass.getuser()}\\n")


def test_the_rootfs_is_built_for_the_architecture(osbuilder_rootfs, osbuilder_settings):
    note(osbuilder_settings.arch, "rootfs")
    for program in ("usr/lib/systemd/systemd", "usr/bin/osbuilder-agent"):
        assert elf.read_elf(osbuilder_rootfs.path / program).machine == MACHINES[osbuilder_settings.arch]


def test_the_guest_runs_the_architecture(osbuilder_guest, osbuilder_settings):
    note(osbuilder_settings.arch, "guest")
    assert osbuilder_guest.exec(["uname", "-m"]).stdout.strip() == MACHINES[osbuilder_settings.arch]
    assert osbuilder_guest.exec(["systemctl", "is-system-running"]).stdout.strip() == "running"
    record = osbuilder_guest.record()
    assert record["arch"] == osbuilder_settings.arch
    for phase in ("kernel", "root", "init", "agent", "running"):  # the power-off comes when the module ends
        assert record["phases"][phase] == "passed", record["phases"]
"""

KERNEL_TEST = """
import json


def test_the_kernel_is_built(osbuilder_boot_kernel):
    meta = json.loads(osbuilder_boot_kernel.kernel.with_name("kernel-metadata.json").read_text())
    print("KERNEL-METADATA", json.dumps({"ccache": meta["ccache"], "outputs": meta["outputs"]}))
"""


def user_project(where: Path, tests: dict[str, str]) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    (where / "pytest.ini").write_text("[pytest]\n")
    for name, text in tests.items():
        (where / name).write_text(text)
    return where


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="osbuilder-multihost-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        remove_later(path)


@pytest.fixture(scope="module")
def hosts(scratch: Path, osbuilder_settings) -> Iterator[list[Host]]:
    missing = [p for p in (*PROGRAMS, *ARM64_PROGRAMS) if shutil.which(p) is None]
    if missing or not Path(ARM64.firmware).is_file():
        pytest.skip(f"no {', '.join(missing) or ARM64.firmware} (.ci/install-deps installs them)")
    from osbuilder.rootfs import foreign

    foreign.ensure(ARM64, scratch / "binfmt.log")  # the hosts' users build arm64 trees rootless: register as root
    source = world_readable_copy(PROJECT, scratch / "src")
    with NetnsHosts(["osbmh1", "osbmh2"], scratch) as made:
        with ThreadPoolExecutor(len(made)) as pool:  # osbuilder installed for each user, on each host
            install = (f"cp -r {source} ~/osbuilder-src && python3 -m venv ~/venv && ~/venv/bin/pip install -q "
                       '--disable-pip-version-check "$HOME/osbuilder-src[pytest]"')
            for done in pool.map(lambda h: h.ssh(install, check=False, timeout=900), made):
                assert done.returncode == 0, done.stderr[-3000:]
        yield made


@pytest.fixture(scope="module")
def ccache_server(hosts: list[Host], scratch: Path) -> Iterator[str]:
    """ccache's remote storage on the first host's address; its URL."""
    first = hosts[0]
    server = subprocess.Popen(in_namespace(first, sys.executable, str(Path(__file__).with_name("ccache_http.py")),
                                           first.address, str(CCACHE_PORT), str(scratch / "ccache/storage")),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        yield f"http://{first.address}:{CCACHE_PORT}/ccache"
    finally:
        server.kill()
        server.wait()


def controller_env(osbuilder_settings) -> dict[str, str]:
    """This machine's environment for the controlling pytest, without any osbuilder setting."""
    env = without_settings()
    return {**env, "ACCEL": osbuilder_settings.accel}


def run_matrix(project: Path, hosts: list[Host], env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    txs = [a for h in hosts for a in ("--tx", h.tx(f"{h.home}/{project.name}"))]
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *txs, "--dist", "loadgroup",
                           "-rA", "-v", *args], cwd=project, env=env, capture_output=True, text=True, timeout=3000)


def give(host: Host, project: Path) -> None:
    """The user's project, in the host user's home."""
    dest = host.home / project.name
    shutil.copytree(project, dest)
    for path in [dest, *dest.rglob("*")]:
        shutil.chown(path, host.name, host.name)


def cells_by_host(hosts: list[Host]) -> dict[str, set[str]]:
    cells: dict[str, set[str]] = {}
    for host in hosts:
        notes = host.home / "cells.txt"
        for line in notes.read_text().splitlines() if notes.is_file() else []:
            cell, _, user = line.split()
            assert user == host.name
            cells.setdefault(cell, set()).add(host.name)
    return cells


def test_the_arch_matrix_runs_each_cell_on_one_host_over_ssh(hosts, scratch, osbuilder_settings) -> None:
    project = user_project(scratch / "matrix", {"test_arch.py": USER_TESTS})
    for host in hosts:
        give(host, project)
    done = run_matrix(project, hosts, controller_env(osbuilder_settings), "--osbuilder-arch", "x86_64",
                      "--osbuilder-arch", "arm64")
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    passed = sorted(line.split()[-1].split("::")[-1].split("@")[0] for line in done.stdout.splitlines()
                    if line.startswith("PASSED"))
    assert passed == ["test_the_guest_runs_the_architecture[arm64]", "test_the_guest_runs_the_architecture[x86_64]",
                      "test_the_rootfs_is_built_for_the_architecture[arm64]",
                      "test_the_rootfs_is_built_for_the_architecture[x86_64]"], done.stdout[-3000:]
    cells = cells_by_host(hosts)
    assert set(cells) == {"x86_64", "arm64"}
    for cell, where in cells.items():
        assert len(where) == 1, f"cell {cell} ran on {sorted(where)}"  # its rootfs built and booted on one host
    for cell, (where,) in ((c, tuple(w)) for c, w in cells.items()):
        boot = json.loads(next((Path("/home") / where / "matrix/workdir" / cell / "boot-logs").glob("*/boot.json"))
                          .read_text())
        assert boot["passed"] is True and boot["arch"] == cell and boot["phases"]["powerdown"] == "passed"


def tiny_config(scratch: Path, osbuilder_settings) -> Path:
    """A small complete x86_64 .config (tinyconfig, 64-bit) of the session's kernel source."""
    from osbuilder.kernel.source import ensure_source

    tree = ensure_source(osbuilder_settings)
    out = scratch / "tiny-build"
    allconfig = scratch / "64bit.config"
    allconfig.write_text("CONFIG_64BIT=y\n")
    sh("make", "-s", "-C", str(tree.path), f"O={out}", f"KCONFIG_ALLCONFIG={allconfig}", "tinyconfig", timeout=300)
    config = scratch / "tiny.config"
    shutil.copyfile(out / ".config", config)
    config.chmod(0o644)
    return config


def kernel_metadata(done: subprocess.CompletedProcess[str]) -> dict:
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    line = next(line for line in done.stdout.splitlines() if "KERNEL-METADATA" in line)
    return json.loads(line.split("KERNEL-METADATA", 1)[1])


def test_a_kernel_compiled_on_one_host_is_a_ccache_hit_on_the_next(hosts, ccache_server, scratch,
                                                                      osbuilder_settings) -> None:
    config = tiny_config(scratch, osbuilder_settings)
    project = user_project(scratch / "kernels", {"test_kernel.py": KERNEL_TEST})
    runs = []
    for host in hosts:  # one after the other: the first fills the remote storage, the second reads it
        give(host, project)
        shutil.copyfile(config, host.home / "kernels/tiny.config")
        done = host.ssh(f"cd ~/kernels && CCACHE_REMOTE_STORAGE={ccache_server} ~/venv/bin/python -m pytest "
                        "-p no:cacheprovider -s -rA --osbuilder-kernel-config tiny.config", check=False)
        runs.append(kernel_metadata(done))
    first, second = (r["ccache"] for r in runs)
    assert first["misses"] > 100 and first.get("remote_hits", 0) == 0, first  # compiled there, stored remotely
    assert second["remote_hits"] >= 0.95 * first["misses"], second  # the second host's own ccache was empty
    assert second["misses"] <= 0.05 * first["misses"], second
    assert runs[0]["outputs"] == runs[1]["outputs"]  # the same kernel, byte for byte
    log = (scratch / "ccache/requests.log").read_text().split("\n")
    assert sum(1 for line in log if line.startswith("GET hit")) >= second["remote_hits"]


def test_a_hosts_cache_outlives_its_user_but_not_its_ccache() -> None:
    """What the hosts keep between runs (netns_hosts.KEPT): the per-user cache comes back with the user, its
    own again (the same uid), and without ccache's directory, which the test above wants empty."""
    host = Host("osbmhkeep", "", Path("/dev/null"))
    netns_hosts.remove_user(host)
    shutil.rmtree(netns_hosts.KEPT / host.name, ignore_errors=True)
    try:
        netns_hosts.add_user(host)
        uid = host.home.stat().st_uid
        cache = host.home / ".cache/osbuilder"
        for path in (cache / "artifacts/rootfs-base/entry/marker", cache / "ccache/0/object"):
            path.parent.mkdir(parents=True)
            path.write_text("kept?\n")
        sh("chown", "-R", f"{host.name}:{host.name}", str(host.home / ".cache"))
        netns_hosts.remove_user(host)
        assert not host.home.exists() and sh("id", host.name, check=False).returncode != 0
        netns_hosts.add_user(host)
        assert host.home.stat().st_uid == uid
        marker = cache / "artifacts/rootfs-base/entry/marker"
        assert marker.read_text() == "kept?\n" and marker.stat().st_uid == uid
        assert not (cache / "ccache").exists()
        assert not (netns_hosts.KEPT / host.name).exists()  # handed back, not copied
    finally:
        netns_hosts.remove_user(host)
        shutil.rmtree(netns_hosts.KEPT / host.name, ignore_errors=True)
