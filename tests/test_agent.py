"""The guest agent, compiled for real and run on the host over a socketpair (--fd)."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from osbuilder.agent import AGENT_NAME, AGENT_SOURCE, AGENT_VERSION, source_hash
from osbuilder.agent.build import build_agent
from osbuilder.agent.client import AgentClient, AgentConnectionClosed, AgentError, AgentTimeout
from osbuilder.errors import OsbuilderError

PT_INTERP = 3


@pytest.fixture(scope="session")
def agent_bin(tmp_path_factory) -> Path:
    return build_agent(tmp_path_factory.mktemp("agent-build"))


class Running:
    def __init__(self, argv: list[str]) -> None:
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [*argv, "--fd", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        theirs.close()
        self.sock = ours
        self.client = AgentClient(ours)

    def raw(self, data: bytes, timeout: float = 5.0) -> dict:
        """Send raw bytes, return the next reply line parsed."""
        self.sock.sendall(data)
        return json.loads(self.client._read_line(time.monotonic() + timeout))

    def stop(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stderr.close()


@pytest.fixture
def agent(agent_bin):
    r = Running([str(agent_bin)])
    yield r
    r.stop()


def proc_state(pid: int) -> str | None:
    """State letter of a process from /proc/<pid>/stat, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def host_children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


# ------------------------------------------------------------------ build


def elf_program_header_types(path: Path) -> list[int]:
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF", "not an ELF file"
    is64 = data[4] == 2
    endian = "<" if data[5] == 1 else ">"
    if is64:
        (phoff,) = struct.unpack_from(endian + "Q", data, 0x20)
        phentsize, phnum = struct.unpack_from(endian + "HH", data, 0x36)
    else:
        (phoff,) = struct.unpack_from(endian + "I", data, 0x1C)
        phentsize, phnum = struct.unpack_from(endian + "HH", data, 0x2A)
    return [struct.unpack_from(endian + "I", data, phoff + i * phentsize)[0] for i in range(phnum)]


def test_build_is_static_and_runs(agent_bin):
    assert agent_bin.name == AGENT_NAME
    types = elf_program_header_types(agent_bin)
    assert types, "no program headers"
    assert PT_INTERP not in types, "binary has an ELF interpreter: not static"
    assert os.access(agent_bin, os.X_OK)
    out = subprocess.run([agent_bin, "--version"], capture_output=True, text=True, timeout=5)
    assert out.returncode == 0
    assert out.stdout.strip() == f"{AGENT_NAME} {AGENT_VERSION}"
    assert not [p for p in agent_bin.parent.iterdir() if p.name != AGENT_NAME], "temp files left behind"


def test_build_is_reproducible(agent_bin, tmp_path):
    again = build_agent(tmp_path / "second")
    assert again.read_bytes() == agent_bin.read_bytes()


def test_build_failure_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")
    log = tmp_path / "agent.log"
    with pytest.raises(OsbuilderError) as exc:
        build_agent(tmp_path / "out", logfile=log)
    assert "agent" in str(exc.value)
    assert not (tmp_path / "out" / AGENT_NAME).exists()
    assert "false" in log.read_text()


def test_version_constant_and_hash():
    m = re.search(r'#define AGENT_VERSION "([^"]+)"', AGENT_SOURCE.read_text())
    assert m and m.group(1) == AGENT_VERSION
    assert re.fullmatch(r"[0-9a-f]{64}", source_hash())


def test_bad_command_line_is_usage_error(agent_bin):
    out = subprocess.run([agent_bin, "--bogus"], capture_output=True, text=True, timeout=5)
    assert out.returncode == 2
    assert "usage" in out.stderr


# ------------------------------------------------------------------ protocol basics


def test_ping_returns_version(agent):
    assert agent.client.ping() == AGENT_VERSION


def test_version_fields(agent):
    v = agent.client.version()
    assert v["ok"] is True
    assert v["version"] == AGENT_VERSION
    assert v["protocol"] == 1
    assert v["pid1"] is False


def test_id_is_echoed_verbatim(agent):
    agent.sock.sendall(b'{"id":1.50,"cmd":"ping"}\n')
    line = agent.client._read_line(time.monotonic() + 5)
    assert line.startswith(b'{"id":1.50,"ok":true')
    assert agent.raw(b'{"cmd":"ping","id":"a\\"b\xc3\xa9"}\n')["id"] == 'a"b\u00e9'
    assert agent.raw(b'{"cmd":"ping","id":null}\n')["id"] is None
    assert "id" not in agent.raw(b'{"cmd":"ping"}\n')


def test_malformed_json_then_next_request_works(agent):
    for bad in [
        b'{"cmd":',
        b'{"cmd":"ping"} x',
        b"[1,2]",
        b'{"cmd":"ping",}',
        b'{"cmd":"p\xffing"}',  # invalid UTF-8
        b'{"cmd":"\\ud800"}',  # unpaired surrogate
        b'{"cmd":01}',
        b"[" * 100 + b"]" * 100,
        b"nul",
    ]:
        reply = agent.raw(bad + b"\n")
        assert reply["ok"] is False, bad
        assert reply["error"], bad
        assert "id" not in reply
    assert agent.client.ping() == AGENT_VERSION


def test_blank_lines_are_ignored(agent):
    agent.sock.sendall(b"\n  \r\n\n")
    assert agent.client.ping() == AGENT_VERSION


def test_oversized_line_is_rejected_and_serving_continues(agent):
    big = b'{"id":7,"cmd":"exec","argv":["echo"],"stdin":"' + b"x" * 70000 + b'"}\n'
    reply = agent.raw(big)
    assert reply["ok"] is False
    assert "longer" in reply["error"]
    assert "id" not in reply
    # exactly at the limit is accepted
    pad = 65536 - len(b'{"cmd":"ping","pad":""}')
    assert agent.raw(b'{"cmd":"ping","pad":"' + b"y" * pad + b'"}\n')["ok"] is True
    assert agent.client.ping() == AGENT_VERSION


def test_missing_and_unknown_cmd(agent):
    with pytest.raises(AgentError, match="unknown cmd"):
        agent.client.request({"cmd": "frobnicate"}, 5)
    with pytest.raises(AgentError, match="missing"):
        agent.client.request({"nocmd": 1}, 5)
    with pytest.raises(AgentError, match="must be a string"):
        agent.client.request({"cmd": 5}, 5)
    reply = agent.raw(b'{"id":"x","cmd":"nope"}\n')
    assert reply["id"] == "x" and reply["ok"] is False
    reply = agent.raw(b'{"id":[1],"cmd":"ping"}\n')
    assert reply["ok"] is False and "id" not in reply


@pytest.mark.parametrize(
    "req, message",
    [
        ({"argv": "ls"}, "argv"),
        ({"argv": []}, "argv"),
        ({"argv": ["ls", 1]}, "argv"),
        ({"argv": ["a\u0000b"]}, "NUL"),
        ({}, "argv"),
        ({"argv": ["true"], "timeout": -1}, "timeout"),
        ({"argv": ["true"], "timeout": 4000}, "timeout"),
        ({"argv": ["true"], "timeout": "5"}, "timeout"),
        ({"argv": ["true"], "stdin": 5}, "stdin"),
    ],
)
def test_exec_rejects_wrong_types(agent, req, message):
    with pytest.raises(AgentError, match=message):
        agent.client.request({"cmd": "exec", **req}, 5)
    assert agent.client.ping() == AGENT_VERSION


def test_poweroff_refused_when_not_pid1(agent):
    with pytest.raises(AgentError, match="PID 1"):
        agent.client.poweroff()
    assert agent.proc.poll() is None


# ------------------------------------------------------------------ exec


def test_exec_status_stdout_stderr(agent):
    r = agent.client.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.status, r.signal, r.timed_out, r.truncated) == (3, None, False, False)
    assert r.stdout == "out\n"
    assert r.stderr == "err\n"
    assert agent.client.exec(["true"]).status == 0


def test_exec_stdin(agent):
    text = "hello\nwörld \u2603\n" * 2000
    r = agent.client.exec(["cat"], stdin=text)
    assert r.status == 0
    assert r.stdout == text
    # no stdin given: the child reads EOF at once instead of hanging
    r = agent.client.exec(["cat"], timeout=5)
    assert (r.status, r.stdout, r.timed_out) == (0, "", False)


def test_exec_missing_program(agent):
    r = agent.client.exec(["/nonexistent/program-xyz", "arg"])
    assert r.status == 127
    assert "cannot execute '/nonexistent/program-xyz'" in r.stderr
    assert agent.client.exec(["program-xyz-not-on-path"]).status == 127


def test_exec_killed_by_signal(agent):
    r = agent.client.exec(["sh", "-c", "kill -TERM $$"])
    assert (r.status, r.signal) == (None, signal.SIGTERM)


def test_exec_timeout_kills_process_group(agent):
    start = time.monotonic()
    r = agent.client.exec(["sh", "-c", "sleep 100 & echo $!; sleep 100"], timeout=0.5)
    elapsed = time.monotonic() - start
    assert r.timed_out is True
    assert (r.status, r.signal) == (None, signal.SIGKILL)
    assert elapsed < 3, elapsed
    grandchild = int(r.stdout.strip())
    for _ in range(50):
        if proc_state(grandchild) in (None, "Z"):
            break
        time.sleep(0.05)
    assert proc_state(grandchild) in (None, "Z"), "background sleep in the process group survived"
    assert agent.client.ping() == AGENT_VERSION


def test_exec_background_process_does_not_hold_reply(agent):
    start = time.monotonic()
    r = agent.client.exec(["sh", "-c", "sleep 3 & echo started"], timeout=10)
    assert time.monotonic() - start < 2
    assert (r.status, r.stdout, r.timed_out) == (0, "started\n", False)


def test_exec_non_utf8_and_control_output(agent):
    r = agent.client.exec(["printf", '\\377\\376abc\\000\\001"\\\\\\303\\251\\342\\202'])
    assert r.status == 0
    # 0xff, 0xfe invalid; é valid; truncated 3-byte sequence -> one U+FFFD per byte
    assert r.stdout == '\ufffd\ufffdabc\x00\x01"\\\u00e9\ufffd\ufffd'


def test_exec_output_is_capped(agent):
    r = agent.client.exec(["sh", "-c", "yes | head -c 3000000; echo done >&2"], timeout=20)
    assert r.status == 0
    assert r.truncated is True
    assert len(r.stdout) == 1024 * 1024
    assert r.stderr == "done\n"


def test_exec_endless_output_still_times_out(agent):
    start = time.monotonic()
    r = agent.client.exec(["yes"], timeout=1)
    assert time.monotonic() - start < 4
    assert r.timed_out is True
    assert r.truncated is True
    assert len(r.stdout) == 1024 * 1024


# ------------------------------------------------------------------ lifecycle / client


def test_agent_exits_zero_when_peer_closes(agent_bin):
    r = Running([str(agent_bin)])
    assert r.client.ping() == AGENT_VERSION
    r.sock.close()
    assert r.proc.wait(timeout=5) == 0
    r.proc.stderr.close()


def test_client_ignores_stale_replies_and_garbage(agent):
    # A stale reply (id 999) and garbage queued before ours must be skipped.
    a, b = socket.socketpair()
    try:
        client = AgentClient(a)
        b.sendall(b'garbage\n{"id":999,"ok":true,"version":"old"}\n[1]\n')

        def answer():
            req = json.loads(b.recv(4096).decode().strip())
            b.sendall(json.dumps({"id": req["id"], "ok": True, "version": "new"}).encode() + b"\n")

        t = threading.Thread(target=answer)
        t.start()
        assert client.ping(timeout=5) == "new"
        t.join()
        with pytest.raises(AgentTimeout):
            client.ping(timeout=0.2)
        b.close()
        with pytest.raises(AgentConnectionClosed):
            client.ping(timeout=2)
    finally:
        a.close()


def test_a_second_client_never_gets_the_first_clients_reply(agent):
    """Clients take turns on the one port (QEMU's chardev socket serves one connection at a time) and the
    agent answers in order: the first client gives up on a slow exec, the second connects and pings. The
    exec's reply reaches the second client first; it must not be taken for the ping's."""
    first = AgentClient(agent.sock)
    with pytest.raises(AgentTimeout):
        first.request({"cmd": "exec", "argv": ["sh", "-c", "sleep 1; echo first"], "timeout": 10}, timeout=0.3)
    second = AgentClient(agent.sock)
    assert second.ping(timeout=10) == AGENT_VERSION
    third = AgentClient(agent.sock)
    assert third.exec(["echo", "third"]).stdout == "third\n"


def test_client_ids_differ_between_clients():
    a, b = socket.socketpair()
    seen = []
    try:

        def answer_twice():
            pending = b""
            while len(seen) < 2:
                pending += b.recv(4096)
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    seen.append(json.loads(line)["id"])
                    b.sendall(json.dumps({"id": seen[-1], "ok": True, "version": "v"}).encode() + b"\n")

        t = threading.Thread(target=answer_twice)
        t.start()
        assert AgentClient(a).ping(timeout=5) == AgentClient(a).ping(timeout=5) == "v"
        t.join()
    finally:
        a.close()
        b.close()
    assert len(set(seen)) == 2, seen


class CountingBuffer(bytearray):
    """A bytearray that counts the bytes its find() looks at."""

    scanned = 0

    def find(self, sub, start=0, *args):  # type: ignore[override]
        CountingBuffer.scanned += len(self) - start
        return super().find(sub, start, *args)


class Trickle:
    """A socket stand-in that hands out `data` in small pieces."""

    def __init__(self, data: bytes, piece: int) -> None:
        self.data, self.piece, self.at = data, piece, 0

    def settimeout(self, t: float) -> None:
        pass

    def recv(self, n: int) -> bytes:
        chunk = self.data[self.at : self.at + min(n, self.piece)]
        self.at += len(chunk)
        return chunk


def test_client_reads_a_long_reply_in_linear_time():
    """A 12 MiB reply (an exec with both streams at their cap) arriving 512 bytes at a time: each byte is
    looked at for the newline once, not once per piece."""
    from osbuilder.agent.client import AgentClient as Client

    reply = b'{"ok":true,"stdout":"' + b"x" * (12 << 20) + b'"}\n'
    client = Client(Trickle(reply, 512))  # type: ignore[arg-type]
    CountingBuffer.scanned = 0
    client._buf = CountingBuffer()
    assert client._read_line(time.monotonic() + 60) == reply[:-1]
    assert CountingBuffer.scanned <= 2 * len(reply)


def test_client_drops_an_endless_line_without_buffering_it():
    """A guest that sends 40 MiB without a newline: the client keeps at most MAX_REPLY of it, drops the
    line, and still takes the reply that follows."""
    import tracemalloc

    from osbuilder.agent import client as client_mod

    cap = getattr(client_mod, "MAX_REPLY", 16 << 20)
    a, b = socket.socketpair()
    junk = b"x" * (1 << 20)

    def flood():
        req = json.loads(b.recv(4096))
        for _ in range(40):
            b.sendall(junk)
        b.sendall(b"\n" + json.dumps({"id": req["id"], "ok": True, "version": "after"}).encode() + b"\n")

    t = threading.Thread(target=flood)
    tracemalloc.start()
    try:
        t.start()
        assert AgentClient(a).ping(timeout=60) == "after"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        t.join()
        a.close()
        b.close()
    assert peak < cap + (8 << 20), f"peak {peak >> 20} MiB"


def test_wait_ready_and_connect_unix(agent_bin, tmp_path):
    """connect_unix retries until the socket exists; wait_ready survives a garbage prefix."""
    path = tmp_path / "agent.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = None
    try:

        def serve():
            time.sleep(0.3)  # the socket appears late
            srv.bind(str(path))
            srv.listen(1)
            conn, _ = srv.accept()
            nonlocal proc
            proc = subprocess.Popen(
                [str(agent_bin), "--fd", str(conn.fileno())], pass_fds=(conn.fileno(),), stderr=subprocess.DEVNULL
            )
            conn.close()

        t = threading.Thread(target=serve)
        t.start()
        client = AgentClient.connect_unix(path, timeout=5)
        client.sock.sendall(b'{"partial garbage')  # the agent now holds half a line
        assert client.wait_ready(5) == AGENT_VERSION
        t.join()
        client.close()
        assert proc.wait(timeout=5) == 0
    finally:
        srv.close()
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(AgentTimeout):
        AgentClient.connect_unix(tmp_path / "never.sock", timeout=0.3)


def test_port_mode_waits_for_the_device(agent_bin, tmp_path):
    """--port PATH: the agent waits (without spinning) until PATH appears, then serves on it."""
    import pty
    import tty

    master, slave = pty.openpty()
    tty.setraw(slave)
    link = tmp_path / "agent.channel.0"
    proc = subprocess.Popen([str(agent_bin), "--port", str(link)], stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)
        assert proc.poll() is None
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu_ticks = int(fields[11]) + int(fields[12])  # utime + stime
        assert cpu_ticks < 0.2 * os.sysconf("SC_CLK_TCK"), f"agent busy-waits: {cpu_ticks} ticks in 1s"
        link.symlink_to(os.ttyname(slave))
        os.write(master, b'{"id":"p","cmd":"ping"}\n')
        deadline = time.monotonic() + 5
        data = b""
        while not data.endswith(b"\n") and time.monotonic() < deadline:
            if select.select([master], [], [], max(0.0, deadline - time.monotonic()))[0]:
                data += os.read(master, 4096)
        assert json.loads(data) == {"id": "p", "ok": True, "version": AGENT_VERSION}
    finally:
        proc.kill()
        proc.wait()
        err = proc.stderr.read().decode()
        proc.stderr.close()
        os.close(master)
        os.close(slave)
    assert err.count("waiting for virtio-serial port") == 1, err


# ------------------------------------------------------------------ PID 1


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="PID namespaces need root")
def test_pid1_reaps_orphans_and_powers_off(agent_bin):
    r = Running(["unshare", "--pid", "--fork", "--mount", "--mount-proc", "--kill-child", str(agent_bin)])
    try:
        try:
            v = r.client.version(timeout=10)
        except AgentConnectionClosed:
            pytest.skip(f"cannot create a PID namespace here: {r.proc.stderr.read().decode()[-300:]}")
        assert v["pid1"] is True
        assert r.client.exec(["cat", "/proc/1/cmdline"]).stdout.split("\0")[0].endswith(AGENT_NAME)
        # An orphan: its parent sh exits at once, so it is re-parented to PID 1 (the agent).
        orphan = r.client.exec(["sh", "-c", "sleep 0.3 >/dev/null 2>&1 & echo $!"])
        pid = int(orphan.stdout.strip())
        ppid = r.client.exec(["sh", "-c", f"cut -d' ' -f4 /proc/{pid}/stat"]).stdout.strip()
        assert ppid == "1"
        time.sleep(0.8)
        # Seen from the host (no exec in between that could reap it): no zombie child of the agent.
        agent_host_pid = int(Path(f"/proc/{r.proc.pid}/task/{r.proc.pid}/children").read_text().split()[0])
        zombies = [p for p in host_children(agent_host_pid) if proc_state(p) == "Z"]
        assert not zombies, f"agent (PID 1) left zombies: {zombies}"
        stats = r.client.exec(["sh", "-c", "cat /proc/[0-9]*/stat 2>/dev/null"]).stdout
        states = {int(line.split()[0]): line.rsplit(")", 1)[1].split()[0] for line in stats.splitlines() if line}
        assert pid not in states, f"orphan {pid} not reaped: state {states.get(pid)}"
        assert "Z" not in states.values(), states
        # SIGTERM to PID 1 is forwarded to the running exec child's process group; the agent lives on.
        timer = threading.Timer(0.3, os.kill, (agent_host_pid, signal.SIGTERM))
        timer.start()
        start = time.monotonic()
        res = r.client.exec(["sleep", "5"], timeout=10)
        timer.join()
        assert (res.status, res.signal) == (None, signal.SIGTERM)
        assert time.monotonic() - start < 3
        os.kill(agent_host_pid, signal.SIGTERM)  # no exec running: ignored
        assert r.client.ping() == AGENT_VERSION
        r.client.poweroff()
        r.proc.wait(timeout=5)
    finally:
        r.stop()


# ------------------------------------------------------------------ the console reader (the other stream a guest fills)


def chunks_of(data: bytes, size: int):
    """A read() callable handing out `data` in pieces of `size`, then b''."""
    pieces = iter(range(0, len(data), size))
    return lambda: next((data[i : i + size] for i in pieces), b"")


def test_console_reader_keeps_memory_bounded_on_an_endless_line(tmp_path):
    """8 MiB without a newline in 1 KiB pieces: the watcher keeps a bounded part of the line (and so never
    rescans a growing one), still notices what the line starts with, and says the rest was cut."""
    import tracemalloc

    from osbuilder.vm.console import ConsoleWatcher

    data = b"Kernel panic - not syncing: " + b"A" * (8 << 20) + b"\nlast line\n"
    w = ConsoleWatcher(tmp_path / "console.log", time.monotonic())
    tracemalloc.start()
    try:
        w._drain(chunks_of(data, 1024))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"peak {peak >> 10} KiB"
    assert w.fatal is not None and w.fatal.reason == "kernel panic"
    assert re.search(r"AAAA \[\d+ bytes cut\]$", w.fatal.line)
    assert w.tail(1) == ["last line"]


def test_console_log_is_capped_keeping_the_start_and_the_tail(tmp_path):
    from osbuilder.vm.console import ConsoleWatcher

    data = b"".join(b"line %07d\n" % i for i in range(100_000))  # 1.3 MB
    log = tmp_path / "console.log"
    w = ConsoleWatcher(log, time.monotonic(), log_cap=64 << 10, log_head=8 << 10)
    w._drain(chunks_of(data, 4096))
    kept = log.read_bytes()
    assert len(kept) <= 64 << 10
    head, marker, tail = re.split(rb"\n(\[osbuilder: \d+ bytes of output cut here\])\n", kept)
    assert data.startswith(head) and data.endswith(tail) and len(tail) > 16 << 10
    cut = int(re.search(rb"\d+", marker).group())
    assert len(head) + cut + len(tail) == len(data)
    assert w.tail(1) == ["line 0099999"]
