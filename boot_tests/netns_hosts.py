"""Hosts made on this machine for the multi-host test: each a network namespace with its own address
on a bridge, an `sshd` listening on that address only, and an ordinary user with a home of its own
where osbuilder is installed (a venv, `pip install` of this project), as on a real build host.
Like a real build host, each keeps its per-user cache (`~/.cache`: base trees, Debian's boot kernels,
kernel sources, pip's downloads) from one run to the next, in KEPT: the user comes back with the same
uid and subordinate ids, so its rootless trees stay its own. ccache's directory is not kept (the
multi-host test wants each host's own ccache empty).

`NetnsHosts(names, workdir)` is a context manager (root only): on entry it makes the bridge
(BRIDGE, CONTROLLER's address), each namespace with a veth on it and a default route through the
controller, which masquerades their traffic to the outside (the hosts fetch packages from Debian's
archive and PyPI, as real ones would), the users, an SSH key for the controller and an ssh_config
naming every host; on exit it stops every process of the hosts' users and removes all of it again,
whatever failed. Everything between the controller and the hosts (SSH, xdist, ccache's remote
storage) uses the bridge's addresses.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

BRIDGE = "osbmh-br"
SUBNET = "10.213.77"
CONTROLLER = f"{SUBNET}.1"
KEPT = Path("/var/cache/osbuilder-test-hosts")  # each host user's ~/.cache between runs, and its uid
SUBUID_BASE = 400000  # each host user gets 65536 subordinate ids from here on (rootless rootfs builds)
PROGRAMS = ("ip", "iptables", "sshd", "ssh", "ssh-keygen", "useradd", "runuser")


def sh(*cmd: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    if check and done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done


@dataclass
class Host:
    """One host: namespace and user are both `name`."""

    name: str
    address: str
    ssh_config: Path

    @property
    def home(self) -> Path:
        return Path("/home") / self.name

    @property
    def python(self) -> str:
        """The Python of osbuilder's venv in the user's home (what xdist's `//python=` names)."""
        return str(self.home / "venv/bin/python")

    def ssh(self, command: str, *, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a shell command as the host's user, over SSH to the host's address."""
        return sh("ssh", "-F", str(self.ssh_config), self.name, command, timeout=timeout, check=check)

    def tx(self, chdir: str) -> str:
        """pytest-xdist's --tx for one worker on this host."""
        return f"ssh={self.name}//python={self.python}//chdir={chdir}//ssh_config={self.ssh_config}"


class NetnsHosts:
    def __init__(self, names: list[str], scratch: Path) -> None:
        self.scratch = scratch
        self.ssh_config = scratch / "ssh_config"
        self.hosts = [Host(name, f"{SUBNET}.{11 + i}", self.ssh_config) for i, name in enumerate(names)]
        self.sshds: list[subprocess.Popen[bytes]] = []
        self.forwarding = ""

    def __enter__(self) -> list[Host]:
        try:
            self._make()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.hosts

    def _make(self) -> None:
        self._remove_users()  # what an interrupted run may have left
        self._cleanup_network()
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{CONTROLLER}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        self.forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        sh("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", f"{SUBNET}.0/24", "!", "-d", f"{SUBNET}.0/24",
           "-j", "MASQUERADE")
        key = self.scratch / "id_ed25519"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        config = []
        for i, host in enumerate(self.hosts):
            self._namespace(host)
            self._user(host, i, key.with_suffix(".pub").read_text())
            self.sshds.append(self._sshd(host))
            config += [f"Host {host.name}", f"  HostName {host.address}", f"  User {host.name}",
                       f"  IdentityFile {key}", "  IdentitiesOnly yes", "  StrictHostKeyChecking no",
                       "  UserKnownHostsFile /dev/null", "  LogLevel ERROR", "  BatchMode yes", ""]
        self.ssh_config.write_text("\n".join(config))
        for host in self.hosts:
            self._wait_for_ssh(host)

    def _namespace(self, host: Host) -> None:
        veth = f"{host.name}-v"
        sh("ip", "netns", "add", host.name)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host.name)
        sh("ip", "link", "set", veth, "master", BRIDGE, "up")
        inside = ("ip", "netns", "exec", host.name)
        sh(*inside, "ip", "addr", "add", f"{host.address}/24", "dev", "eth0")
        sh(*inside, "ip", "link", "set", "eth0", "up")
        sh(*inside, "ip", "link", "set", "lo", "up")
        sh(*inside, "ip", "route", "add", "default", "via", CONTROLLER)

    def _user(self, host: Host, index: int, public_key: str) -> None:
        add_user(host)
        sh("usermod", "-p", "*", host.name)  # no password, but not locked: sshd without PAM refuses locked ones
        first = SUBUID_BASE + index * 65536
        sh("usermod", "--add-subuids", f"{first}-{first + 65535}", "--add-subgids", f"{first}-{first + 65535}",
           host.name)
        ssh_dir = host.home / ".ssh"
        ssh_dir.mkdir(mode=0o700)
        (ssh_dir / "authorized_keys").write_text(public_key)
        shutil.chown(ssh_dir, host.name, host.name)
        shutil.chown(ssh_dir / "authorized_keys", host.name, host.name)

    def _sshd(self, host: Host) -> subprocess.Popen[bytes]:
        hostkey = self.scratch / f"{host.name}-hostkey"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey))
        config = self.scratch / f"{host.name}-sshd_config"
        config.write_text("\n".join([
            f"ListenAddress {host.address}", "Port 22", f"HostKey {hostkey}",
            f"PidFile {self.scratch / host.name}-sshd.pid", "AuthorizedKeysFile .ssh/authorized_keys",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "PermitRootLogin no",
            f"AllowUsers {host.name}", "",
        ]))
        log = (self.scratch / f"{host.name}-sshd.log").open("wb")
        return subprocess.Popen(["ip", "netns", "exec", host.name, shutil.which("sshd") or "sshd", "-D", "-e",
                                 "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)

    def _wait_for_ssh(self, host: Host) -> None:
        deadline = time.monotonic() + 30
        while True:
            done = host.ssh("true", timeout=20, check=False)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{host.name}: no SSH at {host.address}: {done.stderr.strip()[-500:]}")
            time.sleep(0.5)

    def __exit__(self, *exc: object) -> None:
        for proc in self.sshds:
            proc.kill()
            proc.wait()
        self._remove_users()
        self._cleanup_network()
        if self.forwarding:
            Path("/proc/sys/net/ipv4/ip_forward").write_text(self.forwarding + "\n")

    def _remove_users(self) -> None:
        """Every process of the hosts (their users', and sshds of an earlier run), then the users and homes."""
        for host in self.hosts:
            sh("pkill", "-KILL", "-u", host.name, check=False)
            sh("pkill", "-KILL", "-f", f"{host.name}-sshd_config", check=False)
        time.sleep(0.5)
        for host in self.hosts:
            remove_user(host)

    def _cleanup_network(self) -> None:
        for host in self.hosts:
            sh("ip", "netns", "del", host.name, check=False)
            sh("ip", "link", "del", f"{host.name}-v", check=False)
        sh("ip", "link", "del", BRIDGE, check=False)
        while sh("iptables", "-t", "nat", "-D", "POSTROUTING", "-s", f"{SUBNET}.0/24", "!", "-d", f"{SUBNET}.0/24",
                 "-j", "MASQUERADE", check=False).returncode == 0:
            pass


def add_user(host: Host) -> None:
    """The host's user and home, with the ~/.cache its last user of that name left in KEPT (without ccache's
    directory) when it can have that user's uid again."""
    kept = KEPT / host.name
    uid = _kept_uid(kept)
    sh("useradd", "--create-home", "--shell", "/bin/bash", *(["--uid", str(uid)] if uid else []), host.name)
    if uid and (kept / "cache").is_dir():
        shutil.rmtree(host.home / ".cache", ignore_errors=True)
        shutil.move(kept / "cache", host.home / ".cache")
        shutil.rmtree(host.home / ".cache/osbuilder/ccache", ignore_errors=True)
    shutil.rmtree(kept, ignore_errors=True)


def remove_user(host: Host) -> None:
    """The user (its processes must be gone) and its home; its ~/.cache is kept in KEPT."""
    if sh("id", host.name, check=False).returncode == 0:
        _keep_cache(host)
        sh("userdel", "--remove", host.name, check=False)
    sh("rm", "-rf", "--one-file-system", str(host.home), check=False)
    # pytest's temporary directories of the user: a later user of that name (another uid) could not use them
    sh("rm", "-rf", "--one-file-system", f"/tmp/pytest-of-{host.name}", check=False)


def _keep_cache(host: Host) -> None:
    """Move the user's ~/.cache to KEPT, with the uid it belongs to."""
    kept = KEPT / host.name
    shutil.rmtree(kept, ignore_errors=True)
    if (host.home / ".cache").is_dir():
        kept.mkdir(parents=True)
        KEPT.chmod(0o700)
        shutil.move(host.home / ".cache", kept / "cache")
        (kept / "uid").write_text(f"{host.home.stat().st_uid}\n")


def _kept_uid(kept: Path) -> int | None:
    """The uid the kept cache belongs to, if no other user has it now."""
    try:
        uid = int((kept / "uid").read_text())
    except (OSError, ValueError):
        return None
    return uid if sh("getent", "passwd", str(uid), check=False).returncode != 0 else None


def in_namespace(host: Host, *cmd: str) -> list[str]:
    """A command line that runs `cmd` as root inside the host's network namespace."""
    return ["ip", "netns", "exec", host.name, *cmd]


def world_readable_copy(project: Path, dest: Path) -> Path:
    """This project's tracked files (or, outside git, its source folders) copied where any user can read them."""
    listed = sh("git", "-C", str(project), "ls-files", "-z", "--cached", "--others", "--exclude-standard", check=False)
    files = [f for f in listed.stdout.split("\0") if f] if listed.returncode == 0 else []
    if not files:
        files = [str(p.relative_to(project)) for top in ("osbuilder", "pyproject.toml", "README.md")
                 for p in ([project / top] if (project / top).is_file() else (project / top).rglob("*"))
                 if p.is_file() and "__pycache__" not in p.parts]
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if (project / rel).is_file():
            shutil.copy2(project / rel, target)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
    return dest
