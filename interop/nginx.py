"""A real nginx as an h2c, TLS h2 or plain HTTP/1.1 backend, in its own prefix, for one test.

Endpoints (identical on both protocols):

- ``GET /small``   → 100 bytes (``Nginx.small``)
- ``GET /big``     → 1 MiB of deterministic bytes (``Nginx.big``)
- ``POST /echo``   → the request body, exactly (bodies up to 2 MiB; see ``_ECHO``)
- ``GET /headers`` → ``HEADERS_FIELDS`` joined by ``|``, as nginx saw them
- every response carries ``X-Conn: $connection``, nginx's serial number of the TCP connection

As a plain HTTP/1.1 backend (``http1``) it also logs every request to ``access.log`` as
``$connection $remote_port $status`` (``Nginx.access_log()``), and serves ``GET /chunked`` (the
static /big rewritten by sub_filter, so sent chunked), ``GET /slow`` (/big at 256 KiB/s) and
``GET /drop`` (nginx closes the connection without answering: ``return 444``).

A second, plain HTTP/1.1 listener serves ``stub_status`` so a test can read how many TCP
connections nginx accepted in total (``Nginx.accepted_backend_connections``).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import trustme

Protocol = Literal["h2c", "h2", "http1"]

SMALL_SIZE = 100
BIG_SIZE = 1024 * 1024
START_DEADLINE = 10.0
STOP_DEADLINE = 10.0

# What ``GET /headers`` returns, in order, joined by "|".
HEADERS_FIELDS = (
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "via",
    "host",
    "http_host",
    "server_protocol",
)
_HEADERS_VALUE = (
    "$http_x_forwarded_for|$http_x_forwarded_proto|$http_x_forwarded_host|$http_via"
    "|$host|$http_host|$server_protocol"
)

# nginx cannot echo a body natively: `return 200 $request_body;` alone answers an empty body,
# because `return` runs in the rewrite phase, before anything reads the body. `mirror` with
# `mirror_request_body on` reads the whole body in the precontent phase; the static handler then
# refuses the POST (405, or 404: there is no file), and `error_page ... = @echo` redirects
# internally to a location whose `return` now sees `$request_body` (kept in one memory buffer
# because it fits `client_body_buffer_size`).
_ECHO = """
        location = /echo {
            client_body_buffer_size 2m;
            client_body_in_single_buffer on;
            client_max_body_size 10m;
            mirror /_mirror_sink;
            mirror_request_body on;
            error_page 404 405 = @echo;
        }
        location = /_mirror_sink {
            internal;
            return 204;
        }
        location @echo {
            return 200 $request_body;
        }
"""


def deterministic_bytes(size: int, seed: bytes = b"muxproxy-interop") -> bytes:
    """Reproducible bytes without repeating patterns (so misordered chunks are detected)."""
    blocks = (hashlib.sha256(seed + i.to_bytes(8, "big")).digest() for i in range(size // 32 + 1))
    return b"".join(blocks)[:size]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def nginx_binary() -> str:
    """The nginx executable; a missing nginx fails the test loudly (CI installs it)."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.fail("nginx is not installed: interop tests need it (apt-get install -y nginx)")
    return found


@dataclass
class Nginx:
    protocol: Protocol
    port: int
    status_port: int
    keepalive_requests: int
    prefix: Path
    process: subprocess.Popen[bytes]
    small: bytes
    big: bytes
    ca_file: Path | None  # the CA that signed the TLS certificate (h2 only)
    _status_reads: int = field(default=0, repr=False)
    _baseline: int = field(default=0, repr=False)  # accepts before the test (readiness probes)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def error_log(self) -> str:
        return (self.prefix / "error.log").read_text(errors="replace")

    def access_log(self) -> list[tuple[int, int, int]]:
        """(connection serial, client port, status) per request, http1 only."""
        path = self.prefix / "access.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        rows = (line.split() for line in text.splitlines() if line.strip())
        return [(int(c), int(p), int(s)) for c, p, s in rows]

    def status(self) -> dict[str, int]:
        """nginx's stub_status counters: active, accepts, handled, requests."""
        conn = http.client.HTTPConnection("127.0.0.1", self.status_port, timeout=10)
        try:
            conn.request("GET", "/status", headers={"Connection": "close"})
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        self._status_reads += 1
        m = re.search(r"Active connections:\s*(\d+).*?(\d+)\s+(\d+)\s+(\d+)", text, re.S)
        if m is None:
            raise AssertionError(f"unexpected stub_status output: {text!r}")
        active, accepts, handled, requests = map(int, m.groups())
        return {"active": active, "accepts": accepts, "handled": handled, "requests": requests}

    def mark_baseline(self) -> None:
        """From now on, count accepted connections from zero."""
        self._baseline = self.status()["accepts"]
        self._status_reads = 0

    def accepted_backend_connections(self) -> int:
        """TCP connections nginx accepted since ``mark_baseline``, not counting status reads
        (each status read is one connection to the status listener, counted by ``accepts``)."""
        accepts = self.status()["accepts"]
        return accepts - self._baseline - self._status_reads


def render_config(
    prefix: Path,
    *,
    protocol: Protocol,
    port: int,
    status_port: int,
    keepalive_requests: int,
    cert: Path | None,
    key: Path | None,
) -> str:
    if protocol == "h2":
        listen = f"listen 127.0.0.1:{port} ssl http2;"
        tls = (
            f"ssl_certificate {cert};\n"
            f"        ssl_certificate_key {key};\n"
            "        ssl_protocols TLSv1.2 TLSv1.3;"
        )
    elif protocol == "http1":
        listen = f"listen 127.0.0.1:{port};"
        tls = ""
    else:
        listen = f"listen 127.0.0.1:{port} http2;"  # h2c with prior knowledge (nginx 1.22)
        tls = ""
    tmp = prefix / "tmp"
    http1 = ""
    if protocol == "http1":
        http1 = f"""
        access_log {prefix}/access.log conns;
        location = /chunked {{
            alias {prefix}/www/big;
            sub_filter_types *;
            sub_filter "muxproxy-never-present" "";
            sub_filter_once off;
        }}
        location = /slow {{
            alias {prefix}/www/big;
            limit_rate 256k;
        }}
        location = /drop {{
            return 444;
        }}
"""
    return f"""
daemon off;
master_process on;
worker_processes 1;
user root;
error_log {prefix}/error.log notice;
pid {prefix}/nginx.pid;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    log_format conns "$connection $remote_port $status";
    default_type application/octet-stream;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests {keepalive_requests};
    keepalive_timeout 300s;
    http2_max_concurrent_streams 128;

    server {{
        {listen}
        server_name localhost;
        {tls}
        root {prefix}/www;
        add_header X-Conn $connection always;

        location = /small {{ }}
        location = /big {{ }}
        location = /headers {{
            default_type text/plain;
            return 200 "{_HEADERS_VALUE}";
        }}
{_ECHO}{http1}
    }}

    server {{
        listen 127.0.0.1:{status_port};
        location = /status {{
            stub_status;
        }}
    }}
}}
"""


@contextmanager
def run_nginx(
    prefix: Path,
    *,
    protocol: Protocol,
    keepalive_requests: int = 1000,
    attempts: int = 3,
) -> Iterator[Nginx]:
    """Start nginx in ``prefix``, wait until it accepts, stop it (and its workers) afterwards."""
    binary = nginx_binary()
    (prefix / "www").mkdir(parents=True, exist_ok=True)
    (prefix / "tmp").mkdir(exist_ok=True)
    small = deterministic_bytes(SMALL_SIZE, b"small")
    big = deterministic_bytes(BIG_SIZE, b"big")
    (prefix / "www" / "small").write_bytes(small)
    (prefix / "www" / "big").write_bytes(big)

    cert = key = ca_file = None
    if protocol == "h2":
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        ca_file, cert, key = prefix / "ca.pem", prefix / "server.pem", prefix / "server.key"
        ca.cert_pem.write_to_path(str(ca_file))
        leaf.private_key_pem.write_to_path(str(key))
        for i, pem in enumerate(leaf.cert_chain_pems):
            pem.write_to_path(str(cert), append=i > 0)

    for attempt in range(attempts):
        port, status_port = free_port(), free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(
            render_config(
                prefix,
                protocol=protocol,
                port=port,
                status_port=status_port,
                keepalive_requests=keepalive_requests,
                cert=cert,
                key=key,
            )
        )
        error_log = prefix / "error.log"
        error_log.write_text("")
        with (prefix / "stderr.log").open("wb") as stderr:
            process = subprocess.Popen(
                [binary, "-p", str(prefix), "-c", str(conf), "-e", str(error_log)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                start_new_session=True,  # its own process group: master and workers die together
            )
        try:
            started = _wait_accepting(process, (port, status_port))
        except BaseException:
            _stop(process)
            raise
        if started:
            break
        log = error_log.read_text(errors="replace") + (prefix / "stderr.log").read_text(
            errors="replace"
        )
        if "Address already in use" in log and attempt + 1 < attempts:
            continue  # lost the free-port race; pick other ports
        pytest.fail(f"nginx exited with {process.returncode} before accepting:\n{log}")
    else:  # pragma: no cover - the loop always breaks or fails
        raise AssertionError("unreachable")

    nginx = Nginx(
        protocol=protocol,
        port=port,
        status_port=status_port,
        keepalive_requests=keepalive_requests,
        prefix=prefix,
        process=process,
        small=small,
        big=big,
        ca_file=ca_file,
    )
    nginx.mark_baseline()
    try:
        yield nginx
    finally:
        _stop(process)


def _wait_accepting(process: subprocess.Popen[bytes], ports: tuple[int, ...]) -> bool:
    """Poll until every port accepts (True) or nginx exited (False); fail past the deadline."""
    deadline = time.monotonic() + START_DEADLINE
    pending = list(ports)
    while pending:
        if process.poll() is not None:
            return False
        if port_accepts(pending[0]):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            pytest.fail(f"nginx did not accept on 127.0.0.1:{pending[0]} in {START_DEADLINE}s")
        time.sleep(0.02)  # poll interval, not synchronisation: the condition is re-checked
    return True


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (fast shutdown: the master stops its workers, then exits); SIGKILL the group
    if that takes too long. The master is not reaped before the kill, so its pid, which is
    the group id, cannot have been reused."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_DEADLINE)
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(STOP_DEADLINE)
