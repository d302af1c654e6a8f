"""Config gates spread over hosts: `pytest --osbuilder-kernel-config a.config --osbuilder-kernel-config
b.config` under pytest-xdist with two workers whose WORKDIRs differ (`--tx popen//env:WORKDIR=...`), standing for two
hosts (`--tx ssh=...`). An inner pytest runs a small boot test (one module-scoped guest, two tests, an
xdist_group); the evidence is read from each WORKDIR: which config's kernel was built there (cache entry,
kernel-metadata.json), which kernel booted there (console banner, boot.json, boot records), and that each
config stayed on one worker and the two configs on different ones.

Config `a` is the `kernel` fixture's own config, `b` the same with CONFIG_LOCALVERSION="-gate-b", so
the guest's release says which kernel it runs. Both hosts start from a copy of this WORKDIR's kernel
object tree (as a CI runner keeps its WORKDIR between runs) and share this session's image: each host
only recompiles what its config changes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from boot_tests.imagetools import kernel_release
from boot_tests.object_tree import seed_object_tree
from osbuilder import readback
from osbuilder.cache import Cache
from osbuilder.kernel.build import kernel_manifest
from osbuilder.layout import KernelFiles, Workdir
from osbuilder.settings import Settings
from osbuilder.vm import records
from osbuilder.vm.guest import BOOT_JSON

pytestmark = [pytest.mark.build, pytest.mark.boot]

ROOT = Path(__file__).resolve().parent.parent

INNER_CONFTEST = '''
"""Every host already has the image (the outer session's): only the kernels differ."""
import os
from pathlib import Path

import pytest

from osbuilder.cache import Manifest
from osbuilder.pytest_plugin import Artifact


@pytest.fixture(scope="session")
def osbuilder_image():
    path = Path(os.environ["GATE_IMAGE"])
    return Artifact(path, Manifest("image", {"given": str(path)}))
'''

INNER_TEST = '''
import pytest

from boot_tests.imagetools import kernel_release
from osbuilder.vm import phases

pytestmark = pytest.mark.xdist_group("gate")


def test_the_configs_kernel_runs(osbuilder_guest, osbuilder_boot_kernel):
    assert osbuilder_guest.exec(["uname", "-r"]).stdout.strip() == kernel_release(osbuilder_boot_kernel.kernel)


def test_powers_off_and_records_the_pass(osbuilder_guest, osbuilder_settings):
    phases.run(osbuilder_guest, "powerdown")
    osbuilder_guest.vm.stop()
    assert osbuilder_guest.passed, osbuilder_guest.phases
    osbuilder_guest.write_passing_records(osbuilder_settings.workdir)
'''


def gate_configs(base: Path, where: Path) -> dict[str, Path]:
    """a.config: `base` as it is; b.config: the same with a local version the guest's `uname -r` shows."""
    where.mkdir()
    text = base.read_text()
    assert 'CONFIG_LOCALVERSION=""\n' in text, "the kernel's config has no empty CONFIG_LOCALVERSION"
    (where / "a.config").write_text(text)
    (where / "b.config").write_text(text.replace('CONFIG_LOCALVERSION=""\n', 'CONFIG_LOCALVERSION="-gate-b"\n'))
    return {"a": where / "a.config", "b": where / "b.config"}


def inner_env(settings: Settings, image: Path) -> dict[str, str]:
    """This session's settings (but WORKDIR) for the inner run, none of this run's pytest/xdist variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and k != "WORKDIR"}
    env.update({k: v for k, v in settings.raw.items() if settings.sources[k] != "default" and k != "WORKDIR"})
    env["GATE_IMAGE"] = str(image)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def workers_by_config(output: str) -> dict[str, set[int]]:
    """From the inner run's -v lines (`[gw1] [ 50%] PASSED test_gate.py::test_x[b]@...`): config -> workers."""
    ran: dict[str, set[int]] = {}
    for worker, config in re.findall(r"\[gw(\d+)\].* PASSED test_gate\.py::\w+\[(\w+)\]", output):
        ran.setdefault(config, set()).add(int(worker))
    return ran


def test_two_configs_build_and_boot_on_two_hosts(osbuilder_kernel, osbuilder_image, osbuilder_settings,
                                                 tmp_path: Path) -> None:
    configs = gate_configs(KernelFiles(osbuilder_kernel.path).config, tmp_path / "configs")
    hosts = [tmp_path / "host0", tmp_path / "host1"]  # gw0, gw1: xdist names workers in --tx order
    for host in hosts:
        seed_object_tree(osbuilder_settings, host)
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "conftest.py").write_text(INNER_CONFTEST)
    (project / "test_gate.py").write_text(INNER_TEST)

    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'inner-tmp'}",
           "--dist", "loadgroup", *[f"--tx=popen//env:WORKDIR={host}" for host in hosts],
           *[f"--osbuilder-kernel-config={path}" for path in configs.values()]]
    proc = subprocess.run(cmd, cwd=project, env=inner_env(osbuilder_settings, osbuilder_image.path),
                          capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "4 passed" in proc.stdout, proc.stdout[-3000:]

    # each config's tests on one worker (its module-scoped guest), the two configs on different workers
    ran = workers_by_config(proc.stdout)
    assert set(ran) == {"a", "b"} and all(len(w) == 1 for w in ran.values()), ran
    assert ran["a"] != ran["b"], ran
    releases = {}
    for cid, config in configs.items():
        host = hosts[ran[cid].pop()]
        other = next(h for h in hosts if h != host)
        # built once, on the host that ran the config, from that config
        manifest = kernel_manifest(osbuilder_settings, config=config)
        entry = readback.cache_entry(Cache(Workdir(host).cache), manifest)
        assert entry is not None and readback.cache_entry(Cache(Workdir(other).cache), manifest) is None, (cid, host)
        files = KernelFiles(entry)
        assert json.loads(files.metadata.read_text())["base_config"] == str(config)
        releases[cid] = kernel_release(files.vmlinuz)
        # booted there, once, through every phase: the guest's banner names that kernel's release
        log_dir = Workdir(host).boot_log(f"test_gate-booted-{cid}")
        assert f"Linux version {releases[cid]} " in (log_dir / "console.log").read_text(errors="replace")
        boot = json.loads((log_dir / BOOT_JSON).read_text())
        assert boot["passed"] and Path(boot["kernel"]["path"]).resolve() == files.vmlinuz.resolve(), boot
        assert records.passing_record(host, files.vmlinuz) is not None
        assert not Workdir(other).boot_log(f"test_gate-booted-{cid}").exists()
    assert releases["b"] == releases["a"] + "-gate-b", releases
