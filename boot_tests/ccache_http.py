"""A small HTTP server for ccache's remote storage (`remote_storage = http://host:port/path`), for the
multi-host test: ccache GETs an entry (404 when absent), PUTs a new one, HEADs and DELETEs; each key is
one file under the storage directory. Run as `python3 ccache_http.py ADDRESS PORT DIR`; it prints
"listening" once it accepts connections, and counts what it served in DIR/../requests.log."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

KEY = re.compile(r"^/[A-Za-z0-9._/-]+$")


class Storage(BaseHTTPRequestHandler):
    root: Path
    log: Path

    def _path(self) -> Path | None:
        if not KEY.match(self.path) or ".." in self.path:
            self.send_error(400)
            return None
        return self.root / self.path.lstrip("/")

    def _note(self, what: str) -> None:
        with self.log.open("a") as f:
            f.write(f"{self.command} {what} {self.path}\n")

    def do_GET(self) -> None:  # noqa: N802 - the http.server protocol
        path = self._path()
        if path is None:
            return
        if not path.is_file():
            self._note("miss")
            self.send_error(404)
            return
        data = path.read_bytes()
        self._note("hit")
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data)

    do_HEAD = do_GET  # noqa: N815

    def do_PUT(self) -> None:  # noqa: N802
        path = self._path()
        if path is None:
            return
        data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # a reader never sees half an entry
        self._note("stored")
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_DELETE(self) -> None:  # noqa: N802
        path = self._path()
        if path is not None:
            path.unlink(missing_ok=True)
            self.send_response(204)
            self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet: requests.log counts
        pass


def main() -> None:
    address, port, root = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    root.mkdir(parents=True, exist_ok=True)
    Storage.root, Storage.log = root, root.parent / "requests.log"
    server = ThreadingHTTPServer((address, port), Storage)
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
