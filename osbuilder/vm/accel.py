"""Which accelerator boots run under: KVM only after a probe proved a guest really runs, else TCG.

Nested KVM on these hosts is unreliable (plain `-cpu host` aborts; guests sometimes die with
"KVM internal error", or run no code at all), so before a boot under KVM the check kernel is booted
under KVM for a few seconds and must reach its init. The verdict does not depend on the WORKDIR: it
lives in the per-user cache (`UserCache.accel_verdict`), keyed by the host (kernel release and boot
id, QEMU version, CPU model), for PROBE_TTL seconds, under a file lock so parallel workers probe once.
A fresh WORKDIR on the same host reuses it. A KVM failure during a real boot marks the verdict bad
(`distrust_kvm`).

ACCEL=auto falls back to TCG when the probe fails. ACCEL=kvm insists on KVM, so a failed probe is an
infrastructure failure (exit 125: bisection's "skip"), never the artifact's: a kernel that cannot
run because KVM runs nothing is not a bad kernel. A probe kernel that is not Debian's (one under
test) that fails under KVM is booted once more under TCG: if it cannot reach its init there either,
the kernel is at fault, KVM is not blamed and no verdict is kept.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from filelock import FileLock

from osbuilder import fs
from osbuilder.errors import InfrastructureError, OsbuilderError
from osbuilder.layout import UserCache, Workdir
from osbuilder.run import tool_version
from osbuilder.settings import Settings
from osbuilder.vm.options import Accel, BootKernel
from osbuilder.vm.qemu import QEMU, Vm, VmSpec

log = logging.getLogger("osbuilder")

PROBE_TTL = 3600.0
PROBE_TIMEOUT = 15.0  # seconds for the probe kernel to reach its init under KVM (~1 s when KVM works)
CONTROL_TIMEOUT = 90.0  # ... under TCG, for the control boot of a kernel that failed the probe
PROBE_SETTLE = 2.0  # and then keep running without an internal error


def kvm_usable() -> str | None:
    """Why /dev/kvm cannot be used, or None when it can be opened."""
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible"
    return None


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name":
            return value.strip()
    return "unknown"


def host_key() -> dict[str, str]:
    """What a KVM verdict holds for: this host kernel and boot, this QEMU, this CPU."""
    return {
        "kernel": os.uname().release,
        "boot_id": _read("/proc/sys/kernel/random/boot_id").strip() or "unknown",
        "qemu": tool_version(QEMU),
        "cpu": _cpu_model(),
    }


def verdict_path(settings: Settings) -> Path:
    return UserCache.of(settings).accel_verdict


def cached_verdict(path: Path, now: float | None = None, host: dict[str, str] | None = None) -> dict | None:
    """The cached probe verdict if it is fresh and from this host (`host_key()`)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    now = time.time() if now is None else now
    host = host_key() if host is None else host
    if data.get("host") != host or now - float(data.get("when", 0)) > PROBE_TTL:
        return None
    return data


def save_verdict(path: Path, ok: bool, detail: str, host: dict[str, str] | None = None) -> None:
    verdict: dict[str, Any] = {"kvm": ok, "detail": detail, "when": time.time(),
                               "host": host_key() if host is None else host}
    fs.write_atomically(path, json.dumps(verdict))


def _lock(path: Path) -> FileLock:
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock")


def probe_kvm(kernel: BootKernel, log_dir: Path) -> tuple[bool | None, str]:
    """Boot `kernel` under KVM briefly; (works, one-line detail). Works is None when the kernel does
    not reach its init under TCG either: that says nothing about KVM."""
    ok, detail = _probe(kernel, log_dir, "kvm", PROBE_TIMEOUT)
    if ok or kernel.name == "debian":
        return ok, detail
    control_ok, control = _probe(kernel, log_dir / "tcg-control", "tcg", CONTROL_TIMEOUT)
    if control_ok:
        return False, f"{detail}; under TCG {control}"
    return None, f"{detail}, and under TCG too ({control}): the kernel does not boot, KVM is not to blame"


def _probe(kernel: BootKernel, log_dir: Path, accel: str, timeout: float) -> tuple[bool, str]:
    spec = VmSpec(kernel=kernel.kernel, initrd=kernel.initrd, cmdline="console=ttyS0 panic=-1", accel=accel,
                  memory=512, serial_ports=(), network=False)
    started = time.monotonic()
    try:
        with Vm(spec, log_dir, start_timeout=15) as vm:
            try:
                failure = _watch_probe(vm, accel, timeout)
            finally:
                vm.stop(graceful=0)
        if failure:
            return False, failure
    except OsbuilderError as e:
        return False, e.message
    return True, f"a kernel reached its init under {accel.upper()} in {time.monotonic() - started:.1f}s"


def _watch_probe(vm: Vm, accel: str, timeout: float) -> str | None:
    vm.console.wait(lambda: _probe_done(vm), timeout)
    if "init_started" in vm.console.milestones:
        vm.console.wait(lambda: _probe_failed(vm) is not None, PROBE_SETTLE)
    failure = _probe_failed(vm)
    if failure is None and "init_started" not in vm.console.milestones:
        seen = "no console output" if "first_byte" not in vm.console.milestones else "console output stopped"
        failure = f"the kernel did not reach its init within {timeout:g}s under {accel.upper()} ({seen})"
    return failure


def _probe_done(vm: Vm) -> bool:
    return "init_started" in vm.console.milestones or _probe_failed(vm) is not None


def _probe_failed(vm: Vm) -> str | None:
    for watcher in (vm.stderr, vm.console):
        if watcher.fatal and watcher.fatal.infrastructure:
            return watcher.fatal.line
    if not vm.alive() and "init_started" not in vm.console.milestones:
        return f"QEMU exited ({vm.proc.returncode if vm.proc else '?'}): " + " / ".join(vm.stderr.tail(3))
    return None


def choose(settings: Settings, kernel: BootKernel) -> Accel:
    """The accelerator for boots under these settings: TCG for ACCEL=tcg; KVM once the probe proved it
    runs a guest (ACCEL=auto: else TCG, with a notice; ACCEL=kvm: else an InfrastructureError)."""
    if settings.accel == "tcg":
        return Accel("tcg", "ACCEL=tcg", False)
    forced = settings.accel == "kvm"
    why = kvm_usable()
    if why:
        if forced:
            raise InfrastructureError(f"ACCEL=kvm: {why}")
        return _tcg_notice(why)
    verdict = probed_verdict(settings, kernel)
    if verdict["kvm"] is None and forced:  # the probe could not tell: KVM, as asked
        return Accel("kvm", f"ACCEL=kvm ({verdict['detail']})", False)
    if verdict["kvm"]:
        return Accel("kvm", f"{'ACCEL=kvm; ' if forced else ''}KVM probe passed: {verdict['detail']}", not forced)
    if forced:
        raise InfrastructureError(f"ACCEL=kvm: KVM does not run guests on this host (probe: {verdict['detail']}); "
                                  "use ACCEL=auto (TCG when KVM fails) or ACCEL=tcg")
    return _tcg_notice(f"KVM probe {'failed' if verdict['kvm'] is False else 'inconclusive'}: {verdict['detail']}")


def probed_verdict(settings: Settings, kernel: BootKernel) -> dict[str, Any]:
    """The KVM verdict for this host: the cached one, or a probe's (kept unless inconclusive)."""
    path = verdict_path(settings)
    with _lock(path):
        verdict = cached_verdict(path)
        if verdict is not None:
            return verdict
        boot_logs = Workdir.of(settings).boot_logs
        boot_logs.mkdir(parents=True, exist_ok=True)
        log_dir = Path(tempfile.mkdtemp(prefix="accel-probe-", dir=boot_logs))
        ok, detail = probe_kvm(kernel, log_dir)
        if ok is not None:
            save_verdict(path, ok, detail)
        if ok:
            shutil.rmtree(log_dir, ignore_errors=True)
        return {"kvm": ok, "detail": detail + ("" if ok else f" (logs: {log_dir})")}


def _tcg_notice(why: str) -> Accel:
    log.warning("boot: using TCG (slow, software emulation): %s", why)
    return Accel("tcg", why, True)


def distrust_kvm(settings: Settings, detail: str) -> None:
    """After a KVM failure in a real boot: cache 'KVM does not work' so later boots use TCG."""
    path = verdict_path(settings)
    with _lock(path):
        save_verdict(path, False, f"KVM failed during a boot: {detail}")
