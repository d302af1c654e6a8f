"""Settings that reach external programs: checked first, passed as data, their secrets never shown.

Issue 10, "Settings reach external programs unchecked". Most tests run the real `osbuilder` command,
where the user meets the behaviour; one real rootfs build (marker `build`) proves that a WORKDIR with
a space and a quote works and that a mirror's credentials reach apt and nothing else.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import http.server
import logging
import lzma
import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fakes import workdir_entries

from osbuilder import apt as apt_mod
from osbuilder import cli, steps
from osbuilder import settings as S
from osbuilder.errors import OsbuilderError, UsageError
from osbuilder.rootfs import build as rootfs_build
from osbuilder.run import run
from osbuilder.vm import debian_kernel

PASSWORD = "s3cret-Pw"
CREDENTIALED = f"http://osbuser:{PASSWORD}@mirror.example:8080/debian"


def osb(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m osbuilder ARGS` with no osbuilder setting inherited from the test's environment."""
    full_env = {k: v for k, v in os.environ.items() if k not in S.BY_NAME}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "osbuilder", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=600)


def error_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    return next(line for line in result.stderr.splitlines() if line.startswith("osbuilder: error:"))


def help_row(result: subprocess.CompletedProcess, name: str) -> list[str]:
    return next(line.split() for line in result.stdout.splitlines() if line.startswith(name + " "))


# --- OS_VERSION: never an option of mmdebstrap ----------------------------------------------------


@pytest.mark.parametrize("command", [["boot", "--check"], ["rootfs"], ["help"]])
def test_os_version_that_looks_like_an_option_is_refused(tmp_path: Path, command):
    hook = "--customize-hook=touch pwned"
    result = osb(*command, f"--os-version={hook}", "--workdir", str(tmp_path / "wd"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert error_line(result).startswith(f"osbuilder: error: OS_VERSION: {hook!r} is not a release name")
    assert not (tmp_path / "pwned").exists()


def test_debian_boot_kernel_checks_the_release_and_keeps_the_credentials_for_apt(tmp_path: Path, monkeypatch):
    """The boot check's Debian kernel refuses an unknown release before running anything; apt gets the
    mirror without its credentials in its sources.list and argv, and the credentials in a 0600
    auth.conf that exists only while apt runs."""
    calls: list[list[str]] = []
    seen: dict[str, object] = {}

    def fake_run(cmd, **kwargs):
        calls.append([str(c) for c in cmd])
        apt = debian_kernel.apt_state(s)
        seen["auth"] = apt.auth.read_text()
        seen["mode"] = apt.auth.stat().st_mode & 0o777
        seen["sources"] = (apt.etc / "sources.list").read_text()
        seen["env"] = kwargs.get("env") or {}
        raise OsbuilderError("debian-kernel: `apt-get` failed (exit 100)", "stopped by the test")

    monkeypatch.setattr(apt_mod, "run", fake_run)
    s = S.load({}, env={"WORKDIR": str(tmp_path / "wd"), "CACHE_DIR": str(tmp_path / "cache"),
                        "REPO_URL": CREDENTIALED}, cwd=tmp_path)
    injected = dataclasses.replace(s, os_version="--customize-hook=touch /tmp/pwned")  # past the settings check
    with pytest.raises(UsageError, match="^OS_VERSION: unknown debian release '--customize-hook"):
        debian_kernel.build(injected, tmp_path / "out")
    assert calls == []
    (tmp_path / "out").mkdir()
    with pytest.raises(OsbuilderError, match="stopped by the test"):
        debian_kernel.build(s, tmp_path / "out")
    [cmd] = calls
    assert cmd[:2] == ["apt-get", "update"] and not any(PASSWORD in arg for arg in cmd)
    assert seen["auth"] == f"machine http://mirror.example:8080/debian\nlogin osbuser\npassword {PASSWORD}\n"
    assert seen["mode"] == 0o600
    assert "http://mirror.example:8080/debian bookworm main" in seen["sources"] and PASSWORD not in seen["sources"]
    assert seen["env"]["APT_CONFIG"] == str(debian_kernel.apt_state(s).config)
    assert not debian_kernel.apt_state(s).auth.exists()  # gone once apt is done
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []  # nothing half-made


# --- REPO_URL: a plain URL, nothing that reaches apt as an option ------------------------------------


@pytest.mark.parametrize("value", [
    "deb [trusted=yes] http://deb.debian.org/debian",  # a whole sources line
    "[trusted=yes] http://deb.debian.org/debian",
    "http://deb.debian.org/debian [trusted=yes]",
    "http://deb.debian.org/debian\ndeb [trusted=yes] http://evil.example/debian bookworm main",
    "http://deb.debian.org/debian[trusted=yes]",
    "http://[trusted=yes]/debian",
    "-",  # mmdebstrap reads a sources list from its standard input
    "--aptopt=Acquire::AllowInsecureRepositories=1",
    "/etc/apt/sources.list",  # mmdebstrap reads an existing file as a sources list
    "ftp://deb.debian.org/debian",
    "http:///debian",
    "file://host/srv/mirror",
    "http://deb.debian.org:99999/debian",
    'http://deb.debian.org/deb"ian',
])
def test_repo_url_must_be_a_plain_url(tmp_path: Path, value):
    result = osb("help", f"--repo-url={value}")
    assert result.returncode == 2, result.stdout
    assert error_line(result).startswith("osbuilder: error: REPO_URL: ")


@pytest.mark.parametrize("value", ["http://deb.debian.org/debian", "https://deb.debian.org/debian/",
                                   "file:///srv/mirror", "http://[::1]:3142/debian", CREDENTIALED])
def test_plain_mirror_urls_are_accepted(value):
    assert S.load({"REPO_URL": value}, env={}, cwd=Path("/")).repo_url == value


def test_help_shows_a_mirror_without_its_credentials():
    result = osb("help", "--repo-url", CREDENTIALED)
    assert result.returncode == 0, result.stderr
    assert help_row(result, "REPO_URL")[1:3] == ["http://***@mirror.example:8080/debian", "cli"]
    assert PASSWORD not in result.stdout + result.stderr
    bad = osb("help", "--repo-url", CREDENTIALED + " [trusted=yes]")
    assert bad.returncode == 2 and PASSWORD not in bad.stderr and "***@mirror.example" in error_line(bad)


def test_stored_manifests_and_metadata_keep_no_credentials(tmp_path: Path):
    """The rootfs and boot-kernel cache manifests (stored in the cache) and the image's
    /var/lib/osbuilder/osbuilder.yaml name the mirror without its credentials, which do not change
    what it serves: the same key as without them."""
    env = {"WORKDIR": str(tmp_path / "wd"), "CACHE_DIR": str(tmp_path / "cache")}
    with_password = S.load({}, env={**env, "REPO_URL": CREDENTIALED}, cwd=tmp_path)
    bare = S.load({}, env={**env, "REPO_URL": "http://mirror.example:8080/debian"}, cwd=tmp_path)
    for manifest in (rootfs_build.manifest, debian_kernel.manifest):
        assert PASSWORD not in repr(manifest(with_password).inputs)
        assert manifest(with_password).key == manifest(bare).key
    choice = rootfs_build.AgentChoice.from_settings(with_password)
    meta = rootfs_build.metadata(with_password, choice, rootfs_build.packages(with_password))
    assert meta["distro"]["mirror"] == "http://mirror.example:8080/debian"


def test_run_logs_urls_without_credentials_but_runs_the_real_argv(tmp_path: Path, caplog):
    """What run() shows and keeps (the logged command line, the log file, the error's detail) has
    no credentials; the program still gets them."""
    received = tmp_path / "argv"
    script = f'printf %s "$1" > {received}; echo "fetching $1"; exit 3'
    with caplog.at_level(logging.INFO, logger="osbuilder"), pytest.raises(OsbuilderError) as e:
        run(["sh", "-c", script, "sh", CREDENTIALED], step="test", logfile=tmp_path / "log")
    assert received.read_text() == CREDENTIALED
    shown = caplog.text + (tmp_path / "log").read_text() + str(e.value)
    assert PASSWORD not in shown
    assert "+ sh -c" in caplog.text and "fetching http://***@mirror.example:8080/debian" in shown


# --- the real build: WORKDIR with a space and a quote, a mirror that wants a password -----------------


class AuthMirror(http.server.ThreadingHTTPServer):
    """A Debian mirror on 127.0.0.1 that wants HTTP basic auth: it redirects each authorized request
    to the real mirror (apt follows), and refuses every other."""

    daemon_threads = True

    def __init__(self, upstream: str, user: str, password: str) -> None:
        super().__init__(("127.0.0.1", 0), _MirrorHandler)
        self.upstream = upstream.rstrip("/")
        self.expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.served = self.refused = 0


class _MirrorHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: AuthMirror

    def do_GET(self) -> None:  # noqa: N802 - the http.server protocol
        if self.headers.get("Authorization") == self.server.expected:
            self.server.served += 1
            self._reply(302, {"Location": self.server.upstream + self.path.removeprefix("/debian")})
        else:
            self.server.refused += 1
            self._reply(401, {"WWW-Authenticate": 'Basic realm="osbuilder test"'})

    def _reply(self, code: int, headers: dict[str, str]) -> None:
        self.send_response(code)
        for key, value in {**headers, "Content-Length": "0"}.items():
            self.send_header(key, value)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def auth_mirror() -> Iterator[AuthMirror]:
    server = AuthMirror(os.environ.get("REPO_URL") or "http://deb.debian.org/debian", "osbuser", PASSWORD)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.build
def test_rootfs_in_a_workdir_with_a_space_and_a_quote_from_a_mirror_with_a_password(tmp_path: Path, auth_mirror):
    wd = tmp_path / "work dir's $HOME \\ `x`"
    bare = f"http://127.0.0.1:{auth_mirror.server_address[1]}/debian"
    url = bare.replace("http://", f"http://osbuser:{PASSWORD}@")
    cache = tmp_path / "cache"  # where the base tree is built (the mirror's port makes a new one each run)
    result = osb("rootfs", "--workdir", str(wd), "--repo-url", url, "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr[-3000:]
    assert auth_mirror.served > 0  # apt logged in with the credentials
    rootfs = wd / "rootfs"
    assert (rootfs / "usr/bin/osbuilder-agent").is_file()  # the overlay went in (over a WORKDIR with quotes)
    assert f"deb {bare} bookworm main" in (rootfs / "etc/apt/sources.list").read_text()
    assert not (rootfs / "etc/apt/auth.conf").exists()
    meta = yaml.safe_load((rootfs / "var/lib/osbuilder/osbuilder.yaml").read_text())
    assert meta["distro"]["mirror"] == bare
    assert workdir_entries(wd) == ["cache/rootfs/<entry>", "logs", "published", "rootfs"]  # no credentials file
    assert PASSWORD not in result.stdout + result.stderr
    secret = PASSWORD.encode()
    assert list((cache / "artifacts/rootfs-base").glob("*/rootfs/etc/apt/sources.list"))  # the base, searched too
    for path in [*wd.rglob("*"), *cache.rglob("*")]:
        if path.is_file() and not path.is_symlink():
            assert secret not in path.read_bytes(), path


@pytest.mark.build
def test_debian_boot_kernel_from_a_mirror_with_a_password(tmp_path: Path, auth_mirror):
    """apt logs in with the credentials; no file of the per-user cache, no log line keeps them."""
    bare = f"http://127.0.0.1:{auth_mirror.server_address[1]}/debian"
    url = bare.replace("http://", f"http://osbuser:{PASSWORD}@")
    s = S.load({}, env={"WORKDIR": str(tmp_path / "wd"), "CACHE_DIR": str(tmp_path / "cache"), "REPO_URL": url},
               cwd=tmp_path)
    kernel = debian_kernel.debian_kernel(s)
    assert kernel.kernel.is_file() and kernel.initrd is not None and kernel.initrd.is_file()
    assert auth_mirror.served > 0 and auth_mirror.refused == 0  # every request of apt carried them
    secret = PASSWORD.encode()
    for path in (tmp_path / "cache").rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert secret not in path.read_bytes(), path


def local_mirror(root: Path, upstream: str, release: str = "bookworm") -> Path:
    """A file:// Debian mirror of `release` holding just the signed InRelease, main's Packages.xz and the
    cloud kernel package, copied from `upstream` (apt checks them against the keyring as ever)."""
    def fetch(path: str) -> bytes:
        with urllib.request.urlopen(f"{upstream}/{path}", timeout=120) as response:
            data = response.read()
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
        return data

    fetch(f"dists/{release}/InRelease")
    packages = lzma.decompress(fetch(f"dists/{release}/main/binary-amd64/Packages.xz")).decode()
    stanzas = {apt_mod.parse_control(p).get("Package"): apt_mod.parse_control(p) for p in packages.split("\n\n")}
    kernel = stanzas[apt_mod.first_dependency(stanzas["linux-image-cloud-amd64"]["Depends"])]
    fetch(kernel["Filename"])
    return root


@pytest.mark.build
def test_debian_boot_kernel_from_a_file_mirror(tmp_path: Path):
    mirror = local_mirror(tmp_path / "mirror", os.environ.get("REPO_URL") or "http://deb.debian.org/debian")
    s = S.load({}, env={"WORKDIR": str(tmp_path / "wd"), "CACHE_DIR": str(tmp_path / "cache"),
                        "REPO_URL": f"file://{mirror}"}, cwd=tmp_path)
    kernel = debian_kernel.debian_kernel(s)
    assert kernel.kernel.is_file() and kernel.initrd is not None and kernel.initrd.is_file()
    assert f"file:{mirror} bookworm/main amd64 linux-image-" in (tmp_path / "cache/logs/debian-kernel.log").read_text()


# --- one-line errors instead of tracebacks ------------------------------------------------------------


def test_profile_that_is_not_utf8(tmp_path: Path):
    (tmp_path / "osbuilder.yaml").write_bytes(b"img_size: 512\nos_version: \xff\n")
    result = osb("help", cwd=tmp_path)
    assert result.returncode == 2
    assert error_line(result) == \
        f"osbuilder: error: {tmp_path / 'osbuilder.yaml'}: not UTF-8 text (byte 0xff at offset 26)"


HUGE = "9" * 30


@pytest.mark.parametrize("command,flag,expected", [
    (["rootfs"], "--source-date-epoch",
     "SOURCE_DATE_EPOCH: must be at most 15032385535 (2446-05-10, the latest time ext4 stores)"),
    (["image"], "--img-size", "IMG_SIZE: must be at most 1048576 (1 TiB)"),
    (["boot", "--check"], "--vm-memory", "VM_MEMORY: must be at most 1048576 (1 TiB)"),
    (["boot", "--check"], "--vm-cpus", "VM_CPUS: must be at most 288 (QEMU's q35 machine)"),
    (["boot", "--check"], "--boot-timeout", "BOOT_TIMEOUT: must be at most 86400 (a day)"),
])
def test_huge_numbers_are_refused_naming_the_bound(tmp_path: Path, command, flag, expected):
    result = osb(*command, flag, HUGE, "--workdir", str(tmp_path / "wd"))
    assert result.returncode == 2, result.stderr
    assert error_line(result) == f"osbuilder: error: {expected}, got {HUGE}"


def test_os_error_in_a_step_is_one_line_naming_the_path(tmp_path: Path):
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "logs").write_text("a file where the logs directory belongs")
    result = osb("rootfs", "--workdir", str(wd))
    assert result.returncode == 1, result.stderr
    assert error_line(result) == f"osbuilder: error: rootfs: {wd / 'logs'}: File exists"


def test_full_disk_in_a_step_is_an_infrastructure_failure(capsys):
    def full(s, args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/srv/wd/container.img")

    with steps.registered(steps.Step("fill-the-disk", full, "fails")):
        assert cli.main(["fill-the-disk"]) == 125
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "osbuilder: error: fill-the-disk: /srv/wd/container.img: No space left on device"


def test_unrelated_debug_in_the_environment_is_ignored_with_a_notice(tmp_path: Path):
    result = osb("help", env={"DEBUG": "app:*"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "osbuilder: notice: DEBUG='app:*' in the environment is ignored (expected yes or no, got 'app:*'); "
        "use --debug or debug: in osbuilder.yaml"]
    assert help_row(result, "DEBUG")[1:3] == ["no", "default"]
    assert help_row(osb("help", env={"DEBUG": "yes"}), "DEBUG")[1:3] == ["yes", "env"]
    flag = osb("help", "--debug", "app:*", env={"DEBUG": "app:*"})
    assert flag.returncode == 2 and error_line(flag).startswith("osbuilder: error: DEBUG: expected yes or no")
    (tmp_path / "osbuilder.yaml").write_text("debug: app\n")
    profile = osb("help", cwd=tmp_path)
    assert profile.returncode == 2 and error_line(profile).startswith("osbuilder: error: DEBUG: expected yes or no")


# --- which profile was read ---------------------------------------------------------------------------


def test_the_profile_read_is_named_on_stderr(tmp_path: Path):
    (tmp_path / "osbuilder.yaml").write_text("fs_type: ext3\nimg_size: 512\n")
    result = osb("help", cwd=tmp_path, env={"IMG_SIZE": "640"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"osbuilder: profile {tmp_path / 'osbuilder.yaml'}: fs_type"]
    other = tmp_path / "other.yaml"
    other.write_text("")
    given = osb("help", "--config", "other.yaml", cwd=tmp_path)
    assert given.stderr.splitlines() == [f"osbuilder: profile {other}: no setting taken from it"]
    (tmp_path / "osbuilder.yaml").unlink()
    assert "profile" not in osb("help", cwd=tmp_path).stderr


@pytest.mark.parametrize("name", ["WORKDIR", "CACHE_DIR"])
def test_a_double_quote_in_workdir_is_refused_before_anything_runs(tmp_path: Path, name: str):
    """apt's configuration cannot hold a path with a double quote, so mmdebstrap refuses one: say so
    before anything runs (issue 20, 12: it was said after the agent was compiled)."""
    where = tmp_path / 'work "dir"'
    result = osb("rootfs", f"--{name.lower().replace('_', '-')}", str(where), "--workdir" if name != "WORKDIR"
                 else "--cache-dir", str(tmp_path / "other"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert error_line(result) == (f'osbuilder: error: {name}: {where} has a double quote ("), which apt cannot '
                                  f"handle (mmdebstrap builds there); choose another {name}")
    assert "gcc" not in result.stderr and "agent:" not in result.stderr  # nothing was compiled
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was written
