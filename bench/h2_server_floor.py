"""Protocol cost per request of the client-side HTTP/2 core, without I/O.

    python3 bench/h2_server_floor.py

A real h2 client state machine sends GET requests (browser-like head: 10 fields) on one
connection, 10 concurrent streams at a time; muxproxy's H2Server (core/frontend_h2.py,
muxproxy's own codec) parses them and answers each with a head and a 100-byte body.  Prints
µs of CPU (time.process_time) per request spent in H2Server alone (the client's work is
measured separately and subtracted), the median of 3 batches.  Compare with the HTTP/1.1
head parse in bench/protocol_floor.py.
"""

from __future__ import annotations

import statistics
import time

import h2.config
import h2.connection
import h2.events

from muxproxy.core.frontend_h2 import H2Server, Request

HEAD = [
    (b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"www.example.com"),
    (b":path", b"/assets/app.js"), (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64)"),
    (b"accept", b"*/*"), (b"accept-encoding", b"gzip, deflate, br"),
    (b"accept-language", b"en-US,en;q=0.9"), (b"referer", b"https://www.example.com/"),
    (b"cookie", b"session=abcdef0123456789"),
]  # fmt: skip
RESPONSE = [(b"content-type", b"text/javascript"), (b"content-length", b"100")]


def run(n: int) -> tuple[float, float]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    server = H2Server()
    server.initiate()
    server.receive_data(client.data_to_send(), 0.0)
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send(), 0.0)
    in_server = in_client = 0.0
    sid = 1
    for _ in range(n // 10):
        t0 = time.process_time()
        for _ in range(10):
            client.send_headers(sid, HEAD, end_stream=True)
            sid += 2
        data = client.data_to_send()
        t1 = time.process_time()
        reqs = [e for e in server.receive_data(data, 0.0) if type(e) is Request]
        for r in reqs:
            server.send_head(r.stream_id, 200, RESPONSE, end=False)
            server.send_data(r.stream_id, b"x" * 100, end=True)
        out = server.data_to_send()
        t2 = time.process_time()
        for ev in client.receive_data(out):
            if type(ev) is h2.events.DataReceived:
                client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        ack = client.data_to_send()
        t3 = time.process_time()
        server.receive_data(ack, 0.0)
        t4 = time.process_time()
        in_server += (t2 - t1) + (t4 - t3)
        in_client += (t1 - t0) + (t3 - t2)
    return in_server / n * 1e6, in_client / n * 1e6


def main() -> None:
    runs = [run(20_000) for _ in range(3)]
    print(f"H2Server: {statistics.median(r[0] for r in runs):.1f} µs per request "
          f"(the h2 client: {statistics.median(r[1] for r in runs):.1f} µs)")


if __name__ == "__main__":
    main()
