"""Which accelerator boots run under: KVM only after a probe proved a guest really runs, else TCG.

Nested KVM on these hosts is unreliable (plain `-cpu host` aborts; guests run slower than software
emulation, or die with "KVM internal error"), so ACCEL=auto first runs a probe guest under KVM: a
64 KiB firmware image assembled from `kvm_probe.S` that goes from real mode to long mode with paging,
as a kernel does, runs a loop of a few million additions and reports the sum on QEMU's
isa-debug-exit port, so QEMU exits with a status only a guest that ran every instruction produces.
It runs with the `-cpu` of real boots (qemu.KVM_CPU); where KVM works it ends in a fraction of a
second, and it is stopped after PROBE_TIMEOUT. The same guest under TCG is the tests' proof that
the guest does what the probe expects, so only the accelerator differs.

The verdict does not depend on the WORKDIR: it lives in the per-user cache
(`UserCache.accel_verdict`), keyed by the host (kernel release and boot id, QEMU version, CPU
model), for PROBE_TTL seconds, under a file lock so parallel workers probe once. A fresh WORKDIR on
the same host reuses it. A KVM failure during a real boot marks the verdict bad (`distrust_kvm`).

ACCEL=auto falls back to TCG when the probe fails. ACCEL=kvm insists on KVM, so a failed probe is an
infrastructure failure (exit 125: bisection's "skip"), never the artifact's: a kernel that cannot run
because KVM runs nothing is not a bad kernel.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from filelock import FileLock

from osbuilder import fs, procs
from osbuilder.errors import InfrastructureError, OsbuilderError, UsageError
from osbuilder.layout import UserCache, Workdir
from osbuilder.run import format_command, run, tool_version
from osbuilder.settings import Settings
from osbuilder.vm.options import Accel
from osbuilder.vm.qemu import QEMU, accel_args

log = logging.getLogger("osbuilder")

PROBE_TTL = 3600.0
PROBE_TIMEOUT = 1.5  # seconds the probe guest may run, QEMU's start included (~0.3 s where KVM works)
PROBE_SOURCE = Path(__file__).with_name("kvm_probe.S")
PROBE_LOAD_ADDRESS = 0xF0000  # where the 64 KiB image sits below 1 MiB (its last 16 bytes: the reset vector)
PROBE_SIZE = 0x10000
# The guest's work and its answer: ITERATIONS additions of STEP, the sum's low byte written to the
# isa-debug-exit port, which makes QEMU exit with (byte << 1) | 1. Natively ~20 ms, under TCG ~0.2 s.
ITERATIONS = 0xFFFFFF
STEP = 0x56
DEBUG_EXIT_PORT = 0xF4


def expected_status() -> int:
    """QEMU's exit status when the probe guest ran to the end."""
    return (((ITERATIONS * STEP) & 0xFF) << 1 | 1) & 0xFF


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


def assemble_probe(out_dir: Path) -> Path:
    """`out_dir/kvm-probe.bin`: the probe guest, assembled from kvm_probe.S with binutils."""
    obj, image = out_dir / "kvm-probe.o", out_dir / "kvm-probe.bin"
    symbols = {"ITERATIONS": ITERATIONS, "STEP": STEP, "DEBUG_EXIT": DEBUG_EXIT_PORT}
    logfile = out_dir / "assemble.log"
    run(["as", "--32", *(f"--defsym={k}={v}" for k, v in symbols.items()), "-o", str(obj), str(PROBE_SOURCE)],
        step="boot", logfile=logfile)
    run(["ld", "-m", "elf_i386", f"-Ttext={PROBE_LOAD_ADDRESS:#x}", "-e", "_start", "--oformat", "binary",
         "-o", str(image), str(obj)], step="boot", logfile=logfile)
    size = image.stat().st_size
    if size != PROBE_SIZE:
        raise OsbuilderError(f"boot: the KVM probe image is {size} bytes, expected {PROBE_SIZE}", str(PROBE_SOURCE))
    return image


def probe_command(firmware: Path, accel: str) -> list[str]:
    """QEMU running the probe guest as its firmware, on the machine and (for KVM) the -cpu of real boots."""
    return [QEMU, "-name", "osbuilder-kvm-probe", "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-machine", "q35", *accel_args(accel, 1), "-m", "32", "-bios", str(firmware),
            "-device", f"isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=1", "-serial", "none",
            "-monitor", "none"]


def run_probe(accel: str, log_dir: Path, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Run the probe guest under `accel` for at most `timeout` seconds; (ran to the end, one-line detail).
    QEMU's output is kept in `log_dir/qemu.log`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = probe_command(assemble_probe(log_dir), accel)
    qemu_log = log_dir / "qemu.log"
    (log_dir / "command.txt").write_text(format_command(cmd) + "\n")
    log.info("boot: KVM probe: + %s", format_command(cmd))
    started = time.monotonic()
    with open(qemu_log, "wb") as out:
        try:
            proc = procs.spawn(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        except FileNotFoundError:
            raise OsbuilderError(f"boot: program '{QEMU}' not found; run `osbuilder check-deps --install`") from None
        try:
            finished = procs.wait(proc, timeout)
        finally:
            status = procs.finish(proc)
    took = time.monotonic() - started
    said = " / ".join(line.strip() for line in qemu_log.read_text(errors="replace").splitlines()[-3:] if line.strip())
    if not finished:
        return False, (f"the probe guest did not finish within {timeout:g}s under {accel.upper()} (it takes "
                       f"milliseconds where KVM works: guest code runs too slowly or not at all)"
                       + (f"; QEMU said: {said}" if said else ""))
    if status != expected_status():
        return False, f"QEMU exited with status {status}, not the probe guest's {expected_status()}" + (
            f": {said}" if said else "")
    return True, f"a probe guest ran to long mode and through its loop under {accel.upper()} in {took:.2f}s"


def probe_kvm(log_dir: Path) -> tuple[bool, str]:
    """Run the probe guest under KVM; (works, one-line detail)."""
    return run_probe("kvm", log_dir)


def choose(settings: Settings) -> Accel:
    """The accelerator for boots under these settings: TCG for ACCEL=tcg; KVM once the probe proved it
    runs a guest (ACCEL=auto: else TCG, with a notice; ACCEL=kvm: else an InfrastructureError)."""
    if settings.accel == "tcg":
        return Accel("tcg", "ACCEL=tcg", False)
    forced = settings.accel == "kvm"
    guest = settings.guest
    if not guest.native or not guest.kvm_probe:  # KVM runs the host's own architecture, proven by the probe
        foreign = (f"ARCH={guest.name} is not this host's architecture" if not guest.native else
                   f"osbuilder has no KVM probe for {guest.name} yet")
        if forced:
            raise UsageError(f"ACCEL=kvm: {foreign}; use ACCEL=auto or ACCEL=tcg")
        return Accel("tcg", foreign, True)
    why = kvm_usable()
    if why:
        if forced:
            raise InfrastructureError(f"ACCEL=kvm: {why}")
        return _tcg_notice(why)
    verdict = probed_verdict(settings)
    if verdict["kvm"]:
        return Accel("kvm", f"{'ACCEL=kvm; ' if forced else ''}KVM probe passed: {verdict['detail']}", not forced)
    if forced:
        raise InfrastructureError(f"ACCEL=kvm: KVM does not run guests on this host (probe: {verdict['detail']}); "
                                  "use ACCEL=auto (TCG when KVM fails) or ACCEL=tcg")
    return _tcg_notice(f"KVM probe failed: {verdict['detail']}")


def probed_verdict(settings: Settings) -> dict[str, Any]:
    """The KVM verdict for this host: the cached one, or a new probe's (kept for PROBE_TTL)."""
    path = verdict_path(settings)
    with _lock(path):
        verdict = cached_verdict(path)
        if verdict is not None:
            return verdict
        boot_logs = Workdir.of(settings).boot_logs
        boot_logs.mkdir(parents=True, exist_ok=True)
        log_dir = Path(tempfile.mkdtemp(prefix="accel-probe-", dir=boot_logs))
        ok, detail = probe_kvm(log_dir)
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
