"""No process outlives osbuilder, leftovers are swept safely, and concurrent runs on one WORKDIR wait.

Every test runs the real programs: osbuilder as a separate process (`python -m osbuilder`), started
in a session of its own so that everything it started is found by session id, and by its WORKDIR
on the command line. One program of the step (mke2fs; apt-get under mmdebstrap; ccache under make)
is gated: a wrapper that notes it started, then waits quietly for a file before running the real
one. So the moment osbuilder is killed (or a second run starts) never depends on timing, and the
children are quiet: a child that writes is also ended by SIGPIPE once osbuilder's end of its output
pipe is gone, one that does not (mke2fs -q, a compiler, apt waiting on the network) was not.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fakes import make_tree, workdir_entries

from osbuilder import fs
from osbuilder.cache import Cache, Manifest
from osbuilder.readback import read_file, read_layout
from osbuilder.run import run
from osbuilder.vm import qemu

REAL_MKE2FS = shutil.which("mke2fs") or "/sbin/mke2fs"
# Stands in for mke2fs: notes that it started (and whether another one was already running in this
# WORKDIR), then waits for $GATE/release before running the real one.
GATED_MKE2FS = f"""#!/bin/sh
case "$1" in -V) exec {REAL_MKE2FS} "$@";; esac  # the version asked for the image's key: not gated
mkdir "$GATE/busy" 2>/dev/null || touch "$GATE/overlap"
touch "$GATE/started.$$"
while [ ! -e "$GATE/release" ]; do sleep 0.1; done
rmdir "$GATE/busy" 2>/dev/null
exec {REAL_MKE2FS} "$@"
"""


def gate_first(bindir: Path, gate: Path, program: str, pattern: str) -> None:
    """bindir/program runs the real program, but the first call whose arguments match the shell
    `case` pattern first touches gate/started and waits, printing nothing, for gate/release."""
    real = shutil.which(program)
    assert real, f"{program} is not installed"
    bindir.mkdir(exist_ok=True)
    gate.mkdir(exist_ok=True)
    (bindir / program).write_text(f"""#!/bin/sh
case " $* " in
  {pattern}) if mkdir "{gate}/held" 2>/dev/null; then
      touch "{gate}/started"
      while [ ! -e "{gate}/release" ]; do sleep 0.1; done
    fi ;;
esac
exec {real} "$@"
""")
    (bindir / program).chmod(0o755)


# -- helpers -------------------------------------------------------------------------------------

class Osbuilder:
    """`python -m osbuilder ARGS` in a session of its own (so its pid is its process group and session
    id), its stderr collected as it comes."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        full_env = {k: v for k, v in os.environ.items() if k not in ("WORKDIR", "IMG_SIZE", "EXTRA_PKGS")}
        full_env.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "osbuilder", *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=full_env,
                                     start_new_session=True)
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            self._lines.append(raw.decode(errors="replace"))

    @property
    def stderr(self) -> str:
        return "".join(self._lines)

    def finish(self, timeout: float = 600) -> int:
        """Wait for osbuilder to exit (killing its group after `timeout`); its exit status."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._reader.join(10)
        return self.proc.returncode


def wait_for(condition: Callable[[], object], timeout: float, what: str, osb: Osbuilder | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if osb is not None and osb.proc.poll() is not None:
            osb.finish()
            pytest.fail(f"osbuilder exited ({osb.proc.returncode}) before {what}:\n{osb.stderr}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f}s" + (f":\n{osb.stderr}" if osb else ""))
        time.sleep(0.1)


def processes() -> Iterator[tuple[int, int, str, str]]:
    """(pid, session id, state, command line) of every process but this one."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        yield int(entry.name), int(fields[3]), fields[0], cmdline


def descendants(session: int, marker: str) -> dict[int, str]:
    """Live processes in `session` (osbuilder's) or naming `marker` (its WORKDIR) on their command line."""
    return {pid: cmd[:150] for pid, sid, state, cmd in processes()
            if state not in "ZX" and (sid == session or marker in cmd)}


def assert_none_survive(osb: Osbuilder, marker: str, within: float = 5.0) -> None:
    """Nothing osbuilder started is alive `within` seconds after osbuilder itself died (what is, is
    killed before the test fails)."""
    osb.finish(60)
    deadline = time.monotonic() + within
    while (left := descendants(osb.proc.pid, marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"still running {within:.0f}s after osbuilder died:\n" + \
        "\n".join(f"{pid}: {cmd}" for pid, cmd in left.items())


def alive(pid: int) -> bool:
    return any(p == pid and state not in "ZX" for p, _, state, _ in processes())


def lock_is_free(path: Path) -> bool:
    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def image_run(tmp_path: Path) -> Callable[..., Osbuilder]:
    """Starts `osbuilder image` on a small tree in tmp_path/wd with mke2fs gated by tmp_path/gate."""
    make_tree(tmp_path / "wd" / "rootfs")
    gate, bindir = tmp_path / "gate", tmp_path / "bin"
    gate.mkdir()
    bindir.mkdir()
    (bindir / "mke2fs").write_text(GATED_MKE2FS)
    (bindir / "mke2fs").chmod(0o755)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "GATE": str(gate)}
    return lambda: Osbuilder("image", "--workdir", str(tmp_path / "wd"), env=env)


def started(gate: Path) -> list[Path]:
    return sorted(gate.glob("started.*"))


def image_temps(wd: Path) -> list[str]:
    """Temporary images in WORKDIR: beside container.img or in the cache, where the image step builds."""
    return sorted(p.name for p in [*wd.glob(".container.img.tmp-*"), *wd.glob("cache/image/.*.tmp-*")])


# -- ends of osbuilder: normal exit, signals, SIGKILL ---------------------------------------------

def test_a_finished_command_leaves_no_process_behind():
    """A command's background children are killed when it exits (its process group)."""
    out = run(["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"], step="test", capture=True)
    straggler = int(out.stdout)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and alive(straggler):
            time.sleep(0.05)
        assert not alive(straggler)
    finally:
        try:
            os.kill(straggler, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_to_osbuilder_alone_ends_its_children(tmp_path: Path, image_run, sig: signal.Signals):
    """SIGTERM, SIGHUP or SIGINT to osbuilder only (not its group): it unwinds, kills the running
    mke2fs and its child, and removes its temporary image."""
    wd, gate = tmp_path / "wd", tmp_path / "gate"
    osb = image_run()
    wait_for(lambda: started(gate), 60, "mke2fs start", osb)
    os.kill(osb.proc.pid, sig)
    assert osb.finish(60) != 0
    assert_none_survive(osb, str(wd))
    assert image_temps(wd) == []


@pytest.mark.parametrize("target", ["osbuilder alone", "its process group"])
def test_sigkill_leaves_no_child_and_the_next_run_works(tmp_path: Path, image_run, target: str):
    """SIGKILL (to osbuilder only, or to its process group as `timeout` sends it) mid-mke2fs: nothing
    it started survives, its lock is free, and the next run sweeps its temporary and succeeds."""
    wd, gate = tmp_path / "wd", tmp_path / "gate"
    osb = image_run()
    wait_for(lambda: started(gate), 60, "mke2fs start", osb)
    (os.kill if target == "osbuilder alone" else os.killpg)(osb.proc.pid, signal.SIGKILL)
    assert_none_survive(osb, str(wd))
    assert lock_is_free(wd / "logs" / "image.log")
    assert len(image_temps(wd)) == 1  # what the killed run left
    (gate / "release").touch()
    again = image_run()
    assert again.finish() == 0, again.stderr
    assert image_temps(wd) == []
    assert read_file(wd / "container.img", "/etc/hostname") == b"guest\n"


def test_children_hold_the_step_lock(tmp_path: Path):
    """A child inherits the step lock, so the lock of a dead osbuilder is free only when its
    children are gone; and they are killed when osbuilder exits normally."""
    lock = tmp_path / "step.lock"
    code = ("import sys; from pathlib import Path; from osbuilder import procs; "
            f"procs.hold_lock(Path({str(lock)!r}), 'test'); "
            "p = procs.spawn(['sleep', '300']); print(p.pid, flush=True); sys.stdin.read()")
    script = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        child = int(script.stdout.readline())  # type: ignore[union-attr]
        fds = [os.readlink(p) for p in Path(f"/proc/{child}/fd").iterdir()]
        assert str(lock) in fds
        assert not lock_is_free(lock)
    finally:
        script.communicate(timeout=30)  # end of input: the script exits normally
    deadline = time.monotonic() + 5
    while (alive(child) or not lock_is_free(lock)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)  # the lock is released as its last holder exits, a moment before it is a zombie
    assert lock_is_free(lock)


# -- concurrent runs on one WORKDIR ---------------------------------------------------------------

def test_two_image_runs_on_one_workdir_take_turns(tmp_path: Path, image_run):
    """The second `osbuilder image` waits for the first (one line says so) instead of building
    beside it, then finds the image up to date; both succeed and the image is whole."""
    wd, gate = tmp_path / "wd", tmp_path / "gate"
    first = image_run()
    wait_for(lambda: started(gate), 60, "first mke2fs", first)
    second = image_run()
    wait_for(lambda: (gate / "overlap").exists() or "waiting for another osbuilder" in second.stderr,
             60, "wait or overlap", second)
    (gate / "release").touch()
    assert first.finish() == 0, first.stderr
    assert second.finish() == 0, second.stderr
    assert not (gate / "overlap").exists(), "two mke2fs ran at once in one WORKDIR"
    waits = [line for line in second.stderr.splitlines() if "waiting for another osbuilder" in line]
    assert len(waits) == 1 and f"pid {first.proc.pid}" in waits[0], second.stderr
    assert len(started(gate)) == 1  # the second found the first one's image up to date: no mke2fs of its own
    layout = read_layout(wd / "container.img")
    check = subprocess.run(["e2fsck", "-fn", layout.fs_spec(wd / "container.img")], capture_output=True)
    assert check.returncode == 0, check.stdout
    assert image_temps(wd) == []


# -- leftovers: swept when their process is gone, kept while anything still uses them -----------------

@pytest.fixture
def user_of() -> Iterator[Callable[[Path], subprocess.Popen]]:
    """Starts a process that names a path on its command line (an orphan writing there)."""
    procs: list[subprocess.Popen] = []

    def start(path: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", str(path)])
        procs.append(proc)
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        wait_for(lambda: os.fsencode(path) in cmdline.read_bytes(), 10, "the user's command line")
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_temp_sweep_keeps_a_leftover_a_live_process_still_writes(tmp_path: Path, user_of):
    dest = tmp_path / "rootfs"
    leftover = tmp_path / f".rootfs.tmp-{dead_pid()}"
    leftover.mkdir()
    writer = user_of(leftover)
    fs.temp_beside(dest)
    assert leftover.is_dir()
    writer.kill()
    writer.wait()
    fs.temp_beside(dest)
    assert not leftover.exists()


def test_cache_sweeps_temporaries_of_dead_builds(tmp_path: Path, user_of):
    cache = Cache(tmp_path / "cache")
    manifest = Manifest("thing", {"a": "1"})
    entry = cache.entry(manifest)
    entry.parent.mkdir(parents=True)
    dead = entry.with_name(f".{entry.name}.tmp-{dead_pid()}")
    in_use = entry.with_name(f".{entry.name}.tmp-{dead_pid()}")
    dead.mkdir()
    in_use.mkdir()
    user_of(in_use)
    cache.get_or_build(manifest, lambda tmp: (tmp / "out").write_text("x"))
    assert not dead.exists()
    assert in_use.is_dir()


def test_qemu_run_dirs_of_dead_processes_are_swept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_of):
    short = Path(tempfile.mkdtemp(prefix="osbt-", dir="/tmp"))
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(short))
        stale = short / f"osbvm-{dead_pid()}-abcd1234"
        orphaned = short / f"osbvm-{dead_pid()}-efgh5678"
        live = short / f"osbvm-{os.getpid()}-ijkl9012"
        for d in (stale, orphaned, live):
            d.mkdir()
        user_of(orphaned / "qmp")  # an orphaned QEMU still serving its sockets
        vm = qemu.Vm(qemu.VmSpec(kernel=tmp_path / "vmlinuz", cmdline=""), tmp_path / "logs")
        vm.stop(graceful=0)
        assert sorted(p.name for p in short.iterdir()) == sorted([orphaned.name, live.name])
    finally:
        shutil.rmtree(short, ignore_errors=True)


# -- SIGKILL in the middle of the real steps -----------------------------------------------------------

def in_session(session: int, *words: str) -> bool:
    """Whether a live process in `session` has all `words` on its command line."""
    return any(sid == session and state not in "ZX" and all(w in cmd for w in words)
               for _, sid, state, cmd in processes())


@pytest.mark.build
def test_sigkill_mid_rootfs(tmp_path: Path):
    """mmdebstrap and what runs in its namespaces (here apt-get, held quiet) die with a SIGKILLed
    osbuilder; the next run builds the rootfs and leaves no temporary behind."""
    wd, gate = tmp_path / "wd", tmp_path / "gate"
    gate_first(tmp_path / "bin", gate, "apt-get", '*" update "*')
    # a CACHE_DIR of its own: with the base tree of this rootfs already there, mmdebstrap would not run
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "CACHE_DIR": str(tmp_path / "cache")}
    osb = Osbuilder("rootfs", "--workdir", str(wd), env=env)
    wait_for(lambda: (gate / "started").exists(), 600, "apt-get update under mmdebstrap", osb)
    assert in_session(osb.proc.pid, "mmdebstrap")
    os.kill(osb.proc.pid, signal.SIGKILL)
    assert_none_survive(osb, str(wd))
    (gate / "release").touch()
    again = Osbuilder("rootfs", "--workdir", str(wd), env=env)
    assert again.finish(900) == 0, again.stderr
    assert (wd / "rootfs" / "usr/lib/systemd/systemd").is_file()
    assert workdir_entries(wd) == ["cache/rootfs/<entry>", "logs", "published", "rootfs"]
    base = tmp_path / "cache/artifacts/rootfs-base"  # the killed base build's temporary is gone too
    assert [p.name for p in base.iterdir() if p.name.startswith(".")] == []


@pytest.mark.build
@pytest.mark.skipif(not shutil.which("ccache"), reason="the kernel build is gated through ccache")
def test_sigkill_mid_kernel_build(tmp_path: Path):
    """make -j and its compilers (one held quiet) die with a SIGKILLed osbuilder; its locks are free
    at once and the next run can go on."""
    wd, gate = tmp_path / "wd", tmp_path / "gate"
    gate_first(tmp_path / "bin", gate, "ccache", '*" -Wp,-MMD,"*" -c "*')  # a kernel object, not a probe
    osb = Osbuilder("kernel", "--workdir", str(wd), env={"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"})
    wait_for(lambda: (gate / "started").exists(), 600, "the first kernel object's compile", osb)
    assert in_session(osb.proc.pid, "make")
    os.kill(osb.proc.pid, signal.SIGKILL)
    assert_none_survive(osb, str(wd))
    assert lock_is_free(wd / "kernel-build.lock") and lock_is_free(wd / "logs" / "kernel.log")
    again = Osbuilder("kernel-src", "--workdir", str(wd))
    assert again.finish(300) == 0, again.stderr


@pytest.mark.boot
def test_sigkill_mid_boot_check(tmp_path: Path, osbuilder_image, monkeypatch: pytest.MonkeyPatch):
    """QEMU dies with a SIGKILLed `osbuilder boot --check`; the next boot sweeps its run directory."""
    wd = tmp_path / "wd"
    short = Path(tempfile.mkdtemp(prefix="osbt-", dir="/tmp"))
    try:
        osb = Osbuilder("boot", "--check", "--workdir", str(wd), env={"BOOT_IMAGE": str(osbuilder_image.path),
                                                                      "TMPDIR": str(short)})
        wait_for(lambda: in_session(osb.proc.pid, "qemu-system", str(short)), 300, "QEMU", osb)
        os.kill(osb.proc.pid, signal.SIGKILL)
        assert_none_survive(osb, str(short))
        assert len(list(short.glob("osbvm-*"))) == 1  # what it left
        monkeypatch.setattr(tempfile, "tempdir", str(short))
        vm = qemu.Vm(qemu.VmSpec(kernel=tmp_path / "vmlinuz", cmdline=""), tmp_path / "logs")
        vm.stop(graceful=0)
        assert list(short.glob("osbvm-*")) == []
    finally:
        shutil.rmtree(short, ignore_errors=True)
