"""In-process gRPC servers for the protocol clients' unit tests: the server half of HTTP/2 (the h2
library, as on the client) on a socket, and a yamux server that runs one such HTTP/2 server per
stream, as the Kata 1.x agent does. They exist to make error paths happen on demand (a status, a
trailers-only answer, a dropped session); the real agents are in boot_tests/test_agent_peers.py.

A handler maps a :path to `Answer` (status, message, response body bytes after the gRPC prefix).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events

from osbuilder.agent.protocols import yamux
from osbuilder.agent.protocols.grpc import frame_message
from osbuilder.agent.protocols.yamux import Flag, FrameType, Header


@dataclass
class Answer:
    status: int = 0
    message: str = ""
    body: bytes | None = None  # the response message; None: none (with a non-zero status: trailers-only)
    raw_body: bytes | None = None  # bytes sent as DATA as they are (no gRPC prefix added)
    content_type: str = "application/grpc"


Handler = Callable[[str, bytes], Answer]


class H2Server:
    """The server side of one HTTP/2 connection: feed it bytes, get bytes to send back."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.requests: dict[int, tuple[str, bytearray]] = {}
        self.calls: list[tuple[str, bytes]] = []
        self.pending: dict[int, tuple[bytes, list[tuple[str, str]]]] = {}

    def feed(self, data: bytes) -> bytes:
        for ev in self.conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                self.requests[ev.stream_id] = (dict(ev.headers)[":path"], bytearray())
            elif isinstance(ev, h2.events.DataReceived):
                self.requests[ev.stream_id][1].extend(ev.data)
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                path, body = self.requests.pop(ev.stream_id)
                self.calls.append((path, bytes(body)))
                self._answer(ev.stream_id, self.handler(path, bytes(body[5:])))
            elif isinstance(ev, h2.events.WindowUpdated):
                self._flush()
        return self.conn.data_to_send()

    def _answer(self, sid: int, a: Answer) -> None:
        status = [("grpc-status", str(a.status))] + ([("grpc-message", a.message)] if a.message else [])
        headers = [(":status", "200"), ("content-type", a.content_type)]
        if a.body is None and a.raw_body is None and a.status != 0:
            self.conn.send_headers(sid, headers + status, end_stream=True)  # trailers-only
            return
        self.conn.send_headers(sid, headers)
        data = a.raw_body if a.raw_body is not None else frame_message(a.body or b"")
        self.pending[sid] = (data, status)
        self._flush()

    def _flush(self) -> None:
        """Send what the flow-control windows allow (the rest when the client grants more)."""
        for sid, (data, status) in list(self.pending.items()):
            while data:
                n = min(len(data), self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
                if n <= 0:
                    break
                self.conn.send_data(sid, data[:n])
                data = data[n:]
            if data:
                self.pending[sid] = (data, status)
            else:
                del self.pending[sid]
                self.conn.send_headers(sid, status, end_stream=True)


def serve_h2(sock: socket.socket, handler: Handler) -> threading.Thread:
    """Serve HTTP/2 on `sock` in a thread until the client closes."""
    def run() -> None:
        server = H2Server(handler)
        try:
            sock.sendall(server.conn.data_to_send())
            while data := sock.recv(65536):
                sock.sendall(server.feed(data))
        except OSError:
            pass
        finally:
            sock.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


class YamuxGrpcServer:
    """A yamux server on a listening UNIX socket, one HTTP/2 server per stream, as the Kata 1.x agent.
    `sessions_to_break` first connections get a GoAway (protocol error) and are closed at the first
    frame they send, as the agent does with a stray byte."""

    def __init__(self, path: str, handler: Handler, sessions_to_break: int = 0) -> None:
        self.handler = handler
        self.sessions_to_break = sessions_to_break
        self.connections = 0
        self.stream_ids: list[int] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self._session(sock, broken=self.connections <= self.sessions_to_break)

    def _session(self, sock: socket.socket, broken: bool) -> None:
        buf = b""
        servers: dict[int, H2Server] = {}
        try:
            while data := sock.recv(65536):
                buf += data
                while len(buf) >= yamux.HEADER_SIZE:
                    h = Header.decode(buf[:yamux.HEADER_SIZE])
                    size = yamux.HEADER_SIZE + (h.length if h.type is FrameType.DATA else 0)
                    if len(buf) < size:
                        break
                    payload, buf = buf[yamux.HEADER_SIZE:size], buf[size:]
                    if broken:
                        sock.sendall(yamux.frame(FrameType.GO_AWAY, Flag.NONE, 0, 1))
                        return
                    self._frame(sock, h, payload, servers)
        except OSError:
            pass
        finally:
            sock.close()

    def _frame(self, sock: socket.socket, h: Header, payload: bytes, servers: dict[int, H2Server]) -> None:
        if h.flags & Flag.SYN and h.type in (FrameType.DATA, FrameType.WINDOW_UPDATE):
            self.stream_ids.append(h.stream_id)
            servers[h.stream_id] = H2Server(self.handler)
            sock.sendall(yamux.frame(FrameType.WINDOW_UPDATE, Flag.ACK, h.stream_id, 0))
        server = servers.get(h.stream_id)
        if h.type is FrameType.PING and h.flags & Flag.SYN:
            sock.sendall(yamux.frame(FrameType.PING, Flag.ACK, 0, h.length))
        if server is None or h.type is not FrameType.DATA or not payload:
            return
        out = server.conn.data_to_send() + server.feed(payload)
        for i in range(0, len(out), 65536):
            part = out[i:i + 65536]
            sock.sendall(yamux.frame(FrameType.DATA, Flag.NONE, h.stream_id, len(part), part))

    def close(self) -> None:
        self.listener.close()
