"""Issue 16 item 5 against nginx (h2c and TLS h2): a request without Host.

nginx refuses an HTTP/2 request whose :authority is empty, or that has neither :authority nor
Host, with 400.  muxproxy names the address the client connected to (RFC 9112 §3.3).
"""

from __future__ import annotations

import socket

from .nginx import Nginx
from .proxy import Proxy


def test_http10_request_without_host_reaches_nginx(proxy: Proxy, nginx: Nginx) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"GET /small HTTP/1.0\r\n\r\n")
        out = b""
        while data := s.recv(65536):
            out += data
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head[:200]
    assert body == nginx.small
