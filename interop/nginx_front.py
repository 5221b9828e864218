"""nginx as an HTTP/1.1 reverse proxy (its defaults), in front of a recording backend.

The differential test sends the same raw requests to this and to muxproxy.  The backend is a
plain HTTP/1.1 server on a thread that records every request nginx forwards *before* it
answers, so once a client has nginx's response, the record already says whether nginx
forwarded anything: no polling, no waiting for something not to happen.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest

from .nginx import _stop, _wait_accepting, free_port, nginx_binary

IO_TIMEOUT = 5.0  # per socket operation; nginx's own client timeouts are shorter (2 s)


@dataclass
class RecordingBackend:
    """Accepts one connection at a time; records each request head and body it receives."""

    sock: socket.socket
    heads: list[bytes] = field(default_factory=list)  # raw bytes up to the blank line
    bodies: list[bytes] = field(default_factory=list)
    _stopping: bool = False

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def serve(self) -> None:
        while not self._stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(IO_TIMEOUT)
                try:
                    self._one(conn)
                except (OSError, h11.ProtocolError):
                    pass

    def _one(self, conn: socket.socket) -> None:
        raw = b""
        while b"\r\n\r\n" not in raw:
            data = conn.recv(65536)
            if not data:
                return
            raw += data
        # Recorded as soon as a head arrives, before anything else: whatever nginx sends
        # counts.  nginx reads a request body whole before it forwards it, and then frames it
        # with Content-Length.
        head, _, body = raw.partition(b"\r\n\r\n")
        self.heads.append(head)
        m = re.search(rb"\r\ncontent-length:[ \t]*([0-9]+)", head, re.IGNORECASE)
        length = int(m.group(1)) if m else 0
        while len(body) < length and (data := conn.recv(65536)):
            body += data
        self.bodies.append(body[:length])
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\nconnection: close\r\n\r\nbackend\r\n"
        )

    def stop(self) -> None:
        """Wake the accept loop with a connection of our own (closing a listening socket
        does not interrupt an accept() blocked on it), then close."""
        self._stopping = True
        with socket.create_connection(("127.0.0.1", self.port), timeout=IO_TIMEOUT):
            pass


@contextmanager
def recording_backend() -> Iterator[RecordingBackend]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    backend = RecordingBackend(sock)
    thread = threading.Thread(target=backend.serve, name="recording-backend", daemon=True)
    thread.start()
    try:
        yield backend
    finally:
        backend.stop()
        thread.join(IO_TIMEOUT)
        sock.close()


def render_config(prefix: Path, port: int, backend_port: int) -> str:
    tmp = prefix / "tmp"
    return f"""
daemon off;
master_process on;
worker_processes 1;
user root;
error_log {prefix}/error.log info;
pid {prefix}/nginx.pid;

events {{
    worker_connections 256;
}}

http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    # Shorter than the defaults (60 s) so that a request nginx still waits on ends quickly.
    client_header_timeout 2s;
    client_body_timeout 2s;

    server {{
        listen 127.0.0.1:{port};
        # Rewrites with a muxproxy equivalent (test_differential.test_rewrites_against_nginx):
        # proxy_pass with a URI strips the location's prefix, proxy_set_header adds a field.
        location /api/ {{
            proxy_pass http://127.0.0.1:{backend_port}/;
            proxy_http_version 1.1;
            proxy_set_header X-Team web;
        }}
        location = /old {{
            return 308 https://$host$request_uri;
        }}
        location / {{
            proxy_pass http://127.0.0.1:{backend_port};
            proxy_http_version 1.1;
            # The path nginx routed on (its normalised $uri), for the path differential.
            proxy_set_header X-Nginx-Uri $uri;
            proxy_connect_timeout 2s;
            proxy_read_timeout 5s;
        }}
    }}
}}
"""


@dataclass
class FrontNginx:
    port: int
    backend: RecordingBackend
    prefix: Path

    def error_log(self) -> str:
        return (self.prefix / "error.log").read_text(errors="replace")


@contextmanager
def run_front(prefix: Path, attempts: int = 3) -> Iterator[FrontNginx]:
    binary = nginx_binary()
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    with recording_backend() as backend:
        for attempt in range(attempts):
            port = free_port()
            conf = prefix / "nginx.conf"
            conf.write_text(render_config(prefix, port, backend.port))
            error_log = prefix / "error.log"
            error_log.write_text("")
            with (prefix / "stderr.log").open("wb") as stderr:
                process = subprocess.Popen(
                    [binary, "-p", str(prefix), "-c", str(conf), "-e", str(error_log)],
                    stdin=subprocess.DEVNULL,
                    stdout=stderr,
                    stderr=stderr,
                    start_new_session=True,
                )
            try:
                started = _wait_accepting(process, (port,))
            except BaseException:
                _stop(process)
                raise
            if started:
                break
            log = error_log.read_text(errors="replace")
            if "Address already in use" in log and attempt + 1 < attempts:
                continue
            pytest.fail(f"nginx exited with {process.returncode} before accepting:\n{log}")
        try:
            yield FrontNginx(port, backend, prefix)
        finally:
            _stop(process)


def exchange(port: int, raw: bytes) -> tuple[int | None, bytes]:
    """Send ``raw`` in one write; read one response (the status, or None if the server
    closed without one) and the bytes received.  Stops at the end of that response, so a
    server keeping the connection alive costs no wait."""
    c = h11.Connection(h11.CLIENT)
    c.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    c.send(h11.EndOfMessage())
    status: int | None = None
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as s:
        try:
            s.sendall(raw)
            while True:
                data = s.recv(65536)
                out += data
                c.receive_data(data)
                while (ev := c.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
                    if isinstance(ev, h11.Response):
                        status = ev.status_code
                    if isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
                        return status, out
        except (ConnectionResetError, BrokenPipeError, h11.RemoteProtocolError):
            pass
        try:
            while data := s.recv(65536):  # not HTTP/1.x (an HTTP/0.9 answer): read to the end
                out += data
        except (ConnectionResetError, TimeoutError):
            pass
    return status, out
