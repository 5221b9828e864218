#!/usr/bin/env python3
"""The CPU floor of one proxied request's protocol work, with no I/O at all.

Usage: python3 bench/protocol_floor.py [N]

Runs the sans-IO cores muxproxy uses on its hot path — HTTP/1.1 head checks and parsing,
head translation, HTTP/2 open_stream + serialisation, HTTP/2 parsing of a response (HEADERS
with 7 fields + 100 B DATA, from the h2 library's server role, which indexes repeated fields),
HTTP/1.1 response serialisation — N times and prints microseconds per request for each step.
No sockets, no event loop: whatever the I/O layer does, a proxy built on these cores cannot do
better than 1 / (this total) requests per CPU-second.  The server side of the HTTP/2 exchange
is timed apart and not counted.
"""

from __future__ import annotations

import sys
import time

import h2.config
import h2.connection

from muxproxy.core.backend_h2 import H2Backend
from muxproxy.core.frontend_h11 import ClientSession
from muxproxy.core.headers import Forwarding, request_to_h2, response_from_h2

REQUEST = b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:29000\r\n\r\n"
RESPONSE = [
    (b":status", b"200"),
    (b"server", b"nginx/1.22.1"),
    (b"date", b"Mon, 23 Nov 2026 09:30:00 GMT"),
    (b"content-type", b"application/octet-stream"),
    (b"content-length", b"100"),
    (b"last-modified", b"Mon, 23 Nov 2026 08:00:00 GMT"),
    (b"etag", b'"6540a1b0-64"'),
    (b"accept-ranges", b"bytes"),
]


def main(n: int) -> None:
    fwd = Forwarding("127.0.0.1", b"http", False)
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    client = H2Backend()
    client.initiate()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    steps = dict.fromkeys(
        [
            "HTTP/1.1 head checks + parse",
            "request_to_h2",
            "HTTP/2 open_stream + serialise",
            "HTTP/2 parse response",
            "HTTP/1.1 response out",
        ],
        0.0,
    )
    names = list(steps)
    for _ in range(n):
        t0 = time.perf_counter()
        session = ClientSession()
        session.receive_data(REQUEST)
        head = session.next_event()
        session.next_event()
        t1 = time.perf_counter()
        fields = request_to_h2(head.method, head.target, head.authority, head.headers, fwd)  # type: ignore[union-attr]
        t2 = time.perf_counter()
        st = client.open_stream(fields, True)
        out = client.data_to_send()
        t3 = time.perf_counter()
        server.receive_data(out)
        server.send_headers(st.stream_id, RESPONSE)
        server.send_data(st.stream_id, b"a" * 100, end_stream=True)
        back = server.data_to_send()
        t4 = time.perf_counter()
        client.receive_data(back)
        client.consumed(st.stream_id, 100)
        client.data_to_send()
        t5 = time.perf_counter()
        assert st.headers is not None
        status, hdrs = response_from_h2(st.headers)
        session.response_head(status, hdrs)
        session.response_body(b"a" * 100)
        session.response_end()
        t6 = time.perf_counter()
        for name, dt in zip(names, (t1 - t0, t2 - t1, t3 - t2, t5 - t4, t6 - t5), strict=True):
            steps[name] += dt
    total = sum(steps.values())
    for name, v in steps.items():
        print(f"{name:30s} {v / n * 1e6:7.1f} µs")
    print(f"{'total (no I/O)':30s} {total / n * 1e6:7.1f} µs  → at most {n / total:,.0f} req/CPU-s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
