"""Mirror URLs: their credentials kept apart from what is stored or shown, and a mirror read with them.

A REPO_URL may carry `user:password@`; what is stored (cache manifests, the image's metadata and
sources list) is the URL without them, and a request osbuilder makes itself logs in the way apt does:
only to the mirror's own origin (scheme, host and port). A redirect elsewhere is followed without the
login, one from https to http is refused.
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.error import HTTPError
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit
from urllib.request import HTTPRedirectHandler, Request, build_opener


def without_credentials(url: str) -> str:
    """A URL without its user:password@ (what a manifest, the image's metadata or sources list keep)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])) if "@" in parts.netloc else url


def read_head(mirror: str, path: str, size: int) -> bytes:
    """The first `size` bytes of `<mirror>/<path>`, logged in with the mirror URL's credentials the way
    apt does (debian.mirror_access), and only at the mirror's origin."""
    parts = urlsplit(mirror)
    url = f"{without_credentials(mirror).rstrip('/')}/{path}"
    request = Request(url, headers={"Range": f"bytes=0-{size - 1}"})
    login = None
    if parts.username is not None:
        secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        login = "Basic " + base64.b64encode(secret.encode()).decode()
        request.add_unredirected_header("Authorization", login)  # a redirect decides for itself
    opener = build_opener(LoginStaysHome(urlsplit(url), login))
    with opener.open(request, timeout=10) as response:
        return response.read(size)


def origin(url: SplitResult) -> tuple[str, str, int | None]:
    """Scheme, host and port: where a login may be sent (RFC 6454's origin)."""
    default = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, (url.hostname or "").lower(), url.port or default


class LoginStaysHome(HTTPRedirectHandler):
    """Follows a mirror's redirects, sending its login only to the mirror's own origin (urllib would
    copy the Authorization header to any host); a redirect from https to http is refused."""

    def __init__(self, home: SplitResult, login: str | None) -> None:
        self.home = origin(home)
        self.login = login

    def redirect_request(self, req: Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is None:
            return None
        target = urlsplit(new.full_url)
        if urlsplit(req.full_url).scheme == "https" and target.scheme != "https":
            raise HTTPError(req.full_url, code, f"refusing a redirect from https to {target.scheme}", headers, fp)
        new.remove_header("Authorization")
        if self.login and origin(target) == self.home:
            new.add_unredirected_header("Authorization", self.login)
        return new
