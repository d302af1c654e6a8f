"""A mirror's credentials stay home (issue 20, items 1 and 2).

The Release-date request that keys the cached rootfs logs in to a mirror whose URL carries a
password; a redirect to another host must not take the login along (two local servers, as the issue
reproduced it). And a password holding `@` or `/` is hidden whole wherever a URL is shown: `osbuilder
help`, error lines, the log of a command and the tail of its output, the archive warning, manifests
and the image's metadata.
"""

from __future__ import annotations

import base64
import http.server
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.error import HTTPError
from urllib.parse import urlsplit
from urllib.request import Request

import pytest

from osbuilder import settings as S
from osbuilder import urls
from osbuilder.errors import OsbuilderError
from osbuilder.rootfs import build as rootfs_build
from osbuilder.rootfs.debian import Debian
from osbuilder.run import redact, run

RELEASE = b"Origin: Debian\nCodename: bookworm\nDate: Sat, 10 Jan 2026 10:00:00 UTC\nMD5Sum:\n"
LOGIN = "Basic " + base64.b64encode(b"alice:s3cr3t").decode()


class Mirror(http.server.ThreadingHTTPServer):
    """A local server that records the Authorization header of every request and answers from `routes`:
    path -> bytes (200) or ("redirect", location)."""

    daemon_threads = True

    def __init__(self, host: str) -> None:
        super().__init__((host, 0), _Handler)
        self.routes: dict[str, object] = {}
        self.seen: list[tuple[str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Mirror

    def do_GET(self) -> None:  # noqa: N802 - the http.server protocol
        self.server.seen.append((self.path, self.headers.get("Authorization")))
        route = self.server.routes.get(self.path)
        if isinstance(route, tuple):
            self.send_response(302)
            self.send_header("Location", route[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif isinstance(route, bytes):
            self.send_response(200)
            self.send_header("Content-Length", str(len(route)))
            self.end_headers()
            self.wfile.write(route)
        else:
            self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mirrors(fresh_archive_reads: None) -> Iterator[tuple[Mirror, Mirror]]:
    """Two mirrors on different hosts: 127.0.0.1 (the one REPO_URL names) and 127.0.0.2."""
    servers = (Mirror("127.0.0.1"), Mirror("127.0.0.2"))
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def with_login(url: str) -> str:
    return url.replace("http://", "http://alice:s3cr3t@")


INRELEASE = "/debian/dists/bookworm/InRelease"


def test_a_redirect_to_another_host_does_not_take_the_login(mirrors):
    home, other = mirrors
    home.routes[INRELEASE] = ("redirect", other.url + INRELEASE)
    other.routes[INRELEASE] = RELEASE
    assert Debian().archive_state(with_login(home.url + "/debian"), "bookworm") == "Sat, 10 Jan 2026 10:00:00 UTC"
    assert home.seen == [(INRELEASE, LOGIN)]
    assert other.seen == [(INRELEASE, None)]


def test_the_rootfs_cache_key_logs_in_only_at_home(mirrors, tmp_path: Path):
    """The fixtures' path: the rootfs manifest asks every suite's Release; the mirror redirects them
    all to another host, which never sees the password."""
    home, other = mirrors
    for suite, root in (("bookworm", "/debian"), ("bookworm-updates", "/debian"),
                        ("bookworm-security", "/debian-security")):
        path = f"{root}/dists/{suite}/InRelease"
        home.routes[path] = ("redirect", other.url + path)
        other.routes[path] = RELEASE
    settings = S.load({}, env={"WORKDIR": str(tmp_path / "wd"), "CACHE_DIR": str(tmp_path / "cache"),
                               "REPO_URL": with_login(home.url + "/debian")}, cwd=tmp_path)
    inputs_ = rootfs_build.manifest(settings).inputs
    assert inputs_["archive_date"] == "Sat, 10 Jan 2026 10:00:00 UTC"
    assert inputs_["archive_updates"].count("Sat, 10 Jan 2026") == 2
    assert {auth for _, auth in home.seen} == {LOGIN} and len(home.seen) == 3
    assert {auth for _, auth in other.seen} == {None} and len(other.seen) == 3


def test_a_redirect_within_the_mirror_keeps_the_login(mirrors):
    home, _ = mirrors
    home.routes[INRELEASE] = ("redirect", home.url + "/pool" + INRELEASE)
    home.routes["/pool" + INRELEASE] = RELEASE
    Debian().archive_state(with_login(home.url + "/debian"), "bookworm")
    assert home.seen == [(INRELEASE, LOGIN), ("/pool" + INRELEASE, LOGIN)]


@pytest.mark.parametrize("target", ["http://m.example/debian/x", "http://m.example:443/debian/x"])
def test_a_redirect_from_https_to_http_is_refused(target: str):
    """As apt refuses it: the login (and the Release's integrity) would travel in clear."""
    handler = urls.LoginStaysHome(urlsplit("https://m.example/debian/x"), LOGIN)
    request = Request("https://m.example/debian/x")
    with pytest.raises(HTTPError, match="refusing a redirect from https to http"):
        handler.redirect_request(request, None, 302, "Found", {}, target)


# --- passwords with `@` and `/`, in every place a URL is shown ------------------------------------------

PASSWORDS = ["Xq7@Zr9", "Xq7/Zr9"]  # distinctive pieces: neither half appears in any other text


def url_with(password: str) -> str:
    return f"http://osbuser:{password}@mirror.example/debian"


def assert_hidden(text: str, password: str) -> None:
    for piece in (password, "Xq7", "Zr9", "osbuser"):
        assert piece not in text, (piece, text)


def osb(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in S.BY_NAME}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "osbuilder", *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize("where", ["{}", "'{}'", "--mirror={}", "x {} y", "{},{}", "GET {}/dists/x/InRelease"])
def test_redact_hides_the_whole_password(password: str, where: str):
    url = url_with(password)
    shown = redact(where.format(url, url))
    assert_hidden(shown, password)
    assert "http://***@mirror.example/debian" in shown


def test_a_password_with_a_slash_is_refused_without_showing_it(tmp_path: Path):
    """`/` ends the host part of a URL, so `http://user:pa/ss@host` is no URL a mirror has: refused,
    in a line that says how to write it and shows no piece of it."""
    result = osb("help", "--repo-url", url_with("Xq7/Zr9"), cwd=tmp_path)
    assert result.returncode == 2
    [line] = [x for x in result.stderr.splitlines() if x.startswith("osbuilder: error:")]
    assert line.startswith("osbuilder: error: REPO_URL: 'http://***@mirror.example/debian': a '/', '?' or '#' in its "
                           "user name or password must be written %2F")
    assert_hidden(result.stdout + result.stderr, "Xq7/Zr9")


def test_a_password_with_an_at_sign_is_used_and_hidden_in_help(tmp_path: Path):
    result = osb("help", env={"REPO_URL": url_with("Xq7@Zr9")}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("REPO_URL "))
    assert row.split()[1] == "http://***@mirror.example/debian"
    assert_hidden(result.stdout + result.stderr, "Xq7@Zr9")
    settings = S.load({}, env={"REPO_URL": url_with("Xq7@Zr9")}, cwd=tmp_path)
    assert S.without_credentials(settings.repo_url) == "http://mirror.example/debian"


@pytest.mark.parametrize("password", PASSWORDS)
def test_a_commands_log_and_error_tail_hide_the_password(tmp_path: Path, password: str,
                                                         caplog: pytest.LogCaptureFixture):
    url = url_with(password)
    log = tmp_path / "step.log"
    caplog.set_level(logging.INFO, "osbuilder")
    with pytest.raises(OsbuilderError) as e:
        run(["sh", "-c", 'echo "E: Failed to fetch $1/dists/bookworm/InRelease"; exit 3', "sh", url], step="rootfs",
            logfile=log)
    for text in (log.read_text(), str(e.value), caplog.text):
        assert "mirror.example" in text
        assert_hidden(text, password)


def test_the_archive_warning_and_stored_records_hide_the_password(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                   fresh_archive_reads: None):
    """An unreachable mirror: the warning names it without its login; the manifest and the image's
    metadata keep no credentials."""
    url = "http://osbuser:Xq7@Zr9@127.0.0.1:9/debian"
    settings = S.load({}, env={"WORKDIR": str(tmp_path / "wd"), "CACHE_DIR": str(tmp_path / "cache"),
                               "REPO_URL": url}, cwd=tmp_path)
    caplog.set_level(logging.WARNING, "osbuilder")
    manifest = rootfs_build.manifest(settings)
    assert "cannot read the archive state of bookworm at http://127.0.0.1:9/debian" in caplog.text
    choice = rootfs_build.AgentChoice.from_settings(settings)
    metadata = rootfs_build.metadata(settings, choice, rootfs_build.packages(settings))
    for text in (caplog.text, repr(manifest.inputs), repr(metadata)):
        assert_hidden(text, "Xq7@Zr9")
    assert metadata["distro"]["mirror"] == "http://127.0.0.1:9/debian"
    assert [s["mirror"] for s in metadata["distro"]["suites"]] == ["http://127.0.0.1:9/debian"] * 2 + [
        "http://127.0.0.1:9/debian-security"]
