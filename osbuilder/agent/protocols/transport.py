"""Deadline-bounded byte streams: the one interface the protocol layers read and write through.

A `ByteStream` sends and receives bytes with an absolute deadline (`time.monotonic()` seconds) on
every call, never blocking past it. `SocketStream` is one over a connected stream socket (the UNIX
socket QEMU gives a virtio-serial port, a vsock connection, a socketpair in tests); a yamux stream
(yamux.py) is another, so gRPC runs unchanged on either.
"""

from __future__ import annotations

import errno
import socket
import time
from pathlib import Path
from typing import Protocol

from osbuilder.agent.protocols.errors import ProtocolClosed, ProtocolTimeout

RECV_CHUNK = 64 * 1024


class ByteStream(Protocol):
    def send(self, data: bytes, deadline: float) -> None:
        """Send all of `data`; ProtocolTimeout at `deadline`, ProtocolClosed if the peer is gone."""

    def recv(self, deadline: float) -> bytes:
        """Some bytes (at least one); ProtocolTimeout at `deadline`, ProtocolClosed at the end of the stream."""

    def close(self) -> None:
        """Release the stream (idempotent)."""


def left(deadline: float, what: str) -> float:
    """Seconds until `deadline`; ProtocolTimeout naming `what` once it has passed."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ProtocolTimeout(f"timed out {what}")
    return remaining


class SocketStream:
    """A ByteStream over a connected stream socket."""

    def __init__(self, sock: socket.socket, name: str = "socket") -> None:
        self.sock = sock
        self.name = name
        self.closed = False

    def send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            self.sock.settimeout(left(deadline, f"sending to {self.name}"))
            try:
                n = self.sock.send(view)
            except TimeoutError:
                continue
            except OSError as e:
                raise ProtocolClosed(f"{self.name} closed while sending: {e.strerror or e}") from None
            view = view[n:]

    def recv(self, deadline: float) -> bytes:
        while True:
            self.sock.settimeout(left(deadline, f"waiting for {self.name}"))
            try:
                chunk = self.sock.recv(RECV_CHUNK)
            except TimeoutError:
                continue
            except OSError as e:
                raise ProtocolClosed(f"{self.name} closed: {e.strerror or e}") from None
            if not chunk:
                raise ProtocolClosed(f"{self.name} closed by the peer")
            return chunk

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


def connect_unix(path: str | Path, timeout: float) -> SocketStream:
    """Connect to a UNIX stream socket, retrying while it does not exist or refuses (QEMU starting),
    until `timeout` seconds have passed (ProtocolTimeout naming the path)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            sock.connect(str(path))
            return SocketStream(sock, str(path))
        except (TimeoutError, FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            if time.monotonic() >= deadline:
                raise ProtocolTimeout(f"cannot connect to {path} within {timeout:.3g}s: {e}") from None
            time.sleep(0.05)
        except BaseException:
            sock.close()
            raise


VSOCK_HOST_ERRORS = (errno.ENODEV, errno.ENOENT, errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.ENETUNREACH)


def connect_vsock(cid: int, port: int, timeout: float) -> SocketStream:
    """Connect to a guest's vsock port (Kata 2.x/3.x: port 1024), retrying while the guest refuses or
    resets (its agent not listening yet) until `timeout` seconds have passed. A host without vsock
    support (no vhost_vsock) is ProtocolClosed naming it at once."""
    deadline = time.monotonic() + timeout
    name = f"vsock cid {cid} port {port}"
    while True:
        try:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        except (AttributeError, OSError) as e:
            raise ProtocolClosed(f"{name}: this host has no vsock sockets: {e}") from None
        try:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            sock.connect((cid, port))
            return SocketStream(sock, name)
        except (TimeoutError, ConnectionRefusedError, ConnectionResetError) as e:
            sock.close()
            if time.monotonic() >= deadline:
                raise ProtocolTimeout(f"cannot connect to {name} within {timeout:.3g}s: {e}") from None
            time.sleep(0.05)
        except OSError as e:
            sock.close()
            if e.errno in VSOCK_HOST_ERRORS:
                raise ProtocolClosed(f"{name}: {e.strerror} (no vhost-vsock device, or no such guest)") from None
            raise
        except BaseException:
            sock.close()
            raise
