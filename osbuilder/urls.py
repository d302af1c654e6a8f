"""Mirror URLs: their credentials kept apart from what is stored or shown, and a mirror read with them.

A REPO_URL may carry `user:password@`; what is stored (cache manifests, the image's metadata and
sources list) is the URL without them, and a request osbuilder makes itself logs in the way apt does.
"""

from __future__ import annotations

import base64
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import Request, urlopen


def without_credentials(url: str) -> str:
    """A URL without its user:password@ (what a manifest, the image's metadata or sources list keep)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])) if "@" in parts.netloc else url


def read_head(mirror: str, path: str, size: int) -> bytes:
    """The first `size` bytes of `<mirror>/<path>`, logged in with the mirror URL's credentials the way
    apt does (debian.mirror_access)."""
    parts = urlsplit(mirror)
    url = f"{without_credentials(mirror).rstrip('/')}/{path}"
    request = Request(url, headers={"Range": f"bytes=0-{size - 1}"})
    if parts.username is not None:
        login = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    with urlopen(request, timeout=10) as response:
        return response.read(size)
