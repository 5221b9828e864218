"""Real HTTP/3 servers as muxproxy backends (Caddy, hypercorn), and muxproxy in front of them.

Both peers serve the same endpoints, with the certificate of a test CA made at run time:

- ``GET /small`` → 100 deterministic bytes, ``GET /big`` → 1 MiB (files written per run)
- ``POST /echo`` → the request body, exactly
- every response carries ``X-Peer`` (the UDP port of the QUIC connection that carried it, so a
  test can count muxproxy's backend connections) and ``X-Proto`` (the HTTP version the peer
  saw: Caddy says ``HTTP/3.0``, hypercorn ``3``)

Caddy 2.6 (Go, quic-go) cannot echo through a module of its own, but its
``{http.request.body}`` placeholder reads the whole request body and ``respond`` writes it
back, so the echo is Caddy's own HTTP/3 request and response path, with no second backend.
hypercorn (``--quic-bind``, aioquic underneath) serves ``interop/h3_app.py``.

Before muxproxy is put in front, each peer is checked directly over HTTP/3 with aioquic's
client (``interop/h3client.py``), certificate verified: a peer that does not really serve h3
fails loudly there, never as a puzzling proxy failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import trustme

from .h3client import H3Request, h3_fetch
from .nginx import BIG_SIZE, SMALL_SIZE, deterministic_bytes, port_accepts
from .proxy import PROBLEM, READY_DEADLINE, REPO, Proxy, StderrReader, _stop, parse_ready

PeerName = Literal["caddy", "hypercorn"]

START_DEADLINE = 20.0
STOP_DEADLINE = 10.0
PROBE_TIMEOUT = 3.0  # one direct h3 probe; retried until START_DEADLINE
CONNECTIONS = 2
# In a peer's log: Caddy's JSON error levels, a Python traceback or error line from hypercorn.
PEER_PROBLEM = re.compile(r'"level":"(?:error|panic|fatal)"|Traceback|\b(?:ERROR|CRITICAL)\b')


@dataclass(frozen=True)
class Pki:
    """A trustme CA made for this run, and a leaf certificate for localhost and 127.0.0.1."""

    ca_file: Path
    cert_file: Path  # leaf + chain, PEM
    key_file: Path

    @classmethod
    def create(cls, directory: Path) -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        pki = cls(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
        ca.cert_pem.write_to_path(str(pki.ca_file))
        leaf.private_key_pem.write_to_path(str(pki.key_file))
        for i, pem in enumerate(leaf.cert_chain_pems):
            pem.write_to_path(str(pki.cert_file), append=i > 0)
        return pki


@dataclass
class H3Peer:
    name: PeerName
    port: int  # UDP, HTTP/3
    pki: Pki
    small: bytes
    big: bytes
    proto: str  # the X-Proto value of a request that arrived over HTTP/3
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


# --------------------------------------------------------------------------- ports


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_tcp_udp_port() -> int:
    """A port number free on 127.0.0.1 for TCP and UDP alike (Caddy serves h1/h2 on the TCP
    port and h3 on the UDP port of the same number)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise AssertionError("no port free for both TCP and UDP in 100 tries")


# --------------------------------------------------------------------------- peers

CADDYFILE = """\
{
	admin off
	auto_https off
	servers {
		protocols h1 h2 h3
	}
}

https://:{{port}} {
	bind 127.0.0.1
	tls {{cert}} {{key}}
	header X-Peer {http.request.remote.port}
	header X-Proto {http.request.proto}
	@echo {
		method POST
		path /echo
	}
	handle @echo {
		respond "{http.request.body}" 200
	}
	handle {
		root * {{www}}
		file_server
	}
}
"""

# The addresses and the certificate are on the command line; this file has the rest.
HYPERCORN_TOML = """\
workers = 0
worker_class = "asyncio"
# hypercorn 0.18 closes an h1/h2 connection after 1,000 requests by default; its HTTP/3 code
# does not read this setting (0.18's protocol/h3.py), raised anyway so no peer limit applies
keep_alive_max_requests = 1000000
keep_alive_timeout = 300
"""


def _fill(template: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        template = template.replace("{{" + key + "}}", value)
    return template


def _caddy_command(directory: Path, pki: Pki, www: Path) -> tuple[list[str], dict[str, str], int]:
    caddy = _which("caddy", "apt-get install -y caddy")
    port = free_tcp_udp_port()
    conf = directory / "Caddyfile"
    conf.write_text(
        _fill(
            CADDYFILE,
            {
                "port": str(port),
                "cert": str(pki.cert_file),
                "key": str(pki.key_file),
                "www": str(www),
            },
        )
    )
    env = {
        "HOME": str(directory),  # Caddy writes autosave.json and its storage under these
        "XDG_CONFIG_HOME": str(directory / "config"),
        "XDG_DATA_HOME": str(directory / "data"),
    }
    argv = [caddy, "run", "--config", str(conf), "--adapter", "caddyfile"]
    return argv, env, port


def _hypercorn_command(
    directory: Path, pki: Pki, www: Path
) -> tuple[list[str], dict[str, str], int]:
    port, tcp_port = free_udp_port(), free_tcp_udp_port()
    conf = directory / "hypercorn.toml"
    conf.write_text(HYPERCORN_TOML)
    env = {"H3_APP_ROOT": str(www), "PYTHONPATH": str(REPO)}
    argv = [
        sys.executable,
        "-m",
        "hypercorn",
        "--config",
        str(conf),
        "--quic-bind",
        f"127.0.0.1:{port}",
        "--bind",  # hypercorn always has a TCP listener too (else 127.0.0.1:8000)
        f"127.0.0.1:{tcp_port}",
        "--certfile",
        str(pki.cert_file),
        "--keyfile",
        str(pki.key_file),
        "interop.h3_app:app",
    ]
    return argv, env, port


def _which(tool: str, install: str) -> str:
    found = shutil.which(tool)
    if found is None:
        pytest.fail(f"{tool} is not installed: the HTTP/3 interop tests need it ({install})")
    return found


Starter = Callable[[Path, Pki, Path], tuple[list[str], dict[str, str], int]]
_STARTERS: dict[PeerName, tuple[Starter, str, str]] = {
    # name: (command, a log line that says the h3 listener is up, X-Proto of an h3 request)
    "caddy": (_caddy_command, '"msg":"server running"', "HTTP/3.0"),
    "hypercorn": (_hypercorn_command, "(QUIC) (CTRL + C to quit)", "3"),
}


@contextmanager
def run_peer(directory: Path, name: PeerName, pki: Pki, *, attempts: int = 3) -> Iterator[H3Peer]:
    """Start the peer, wait for its h3 listener, prove it serves h3 directly, stop it after."""
    starter, ready_text, proto = _STARTERS[name]
    www = directory / "www"
    www.mkdir(parents=True, exist_ok=True)
    small = deterministic_bytes(SMALL_SIZE, b"small")
    big = deterministic_bytes(BIG_SIZE, b"big")
    (www / "small").write_bytes(small)
    (www / "big").write_bytes(big)
    log_path = directory / f"{name}.log"

    for attempt in range(attempts):
        argv, env, port = starter(directory, pki, www)
        with log_path.open("wb") as out:
            process = subprocess.Popen(
                argv,
                cwd=REPO,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        peer = H3Peer(name, port, pki, small, big, proto, process, log_path)
        try:
            started = _wait_listening(peer, ready_text)
        except BaseException:
            _terminate(process)
            raise
        if started:
            break
        text = peer.log()
        if "address already in use" in text.lower() and attempt + 1 < attempts:
            continue  # lost the free-port race; pick other ports
        pytest.fail(f"{name} exited with {process.returncode} before listening:\n{text}")
    else:  # pragma: no cover - the loop always breaks or fails
        raise AssertionError("unreachable")

    try:
        _probe_h3(peer)
        yield peer
    finally:
        _terminate(process)
    problems = [line for line in peer.log().splitlines() if PEER_PROBLEM.search(line)]
    assert not problems, f"{name} logged errors:\n" + "\n".join(problems[:20])


def _wait_listening(peer: H3Peer, ready_text: str) -> bool:
    """True once the log says the h3 listener is up; False if the peer exited first."""
    deadline = time.monotonic() + START_DEADLINE
    while ready_text not in peer.log():
        if peer.process.poll() is not None:
            return False
        if time.monotonic() > deadline:
            pytest.fail(f"{peer.name} did not start in {START_DEADLINE}s:\n{peer.log()}")
        time.sleep(0.05)  # poll interval, not synchronisation: the condition is re-checked
    if peer.name == "caddy" and not port_accepts(peer.port):
        pytest.fail(f"caddy logged 'server running' but 127.0.0.1:{peer.port} refuses TCP")
    return True


def _probe_h3(peer: H3Peer) -> None:
    """GET /small straight over HTTP/3 (aioquic client, certificate checked against the test
    CA); retried until START_DEADLINE, since a UDP listener gives no accept to wait for."""
    deadline = time.monotonic() + START_DEADLINE
    while True:
        try:
            (r,) = h3_fetch(
                peer.port,
                [H3Request("GET", "/small")],
                ca_file=peer.pki.ca_file,
                timeout=PROBE_TIMEOUT,
            )
        except (TimeoutError, OSError, ConnectionError) as exc:
            if peer.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"{peer.name} does not answer HTTP/3 on udp {peer.address}: {exc!r}\n"
                    f"{peer.log()}"
                )
            time.sleep(0.1)  # retry interval, not synchronisation: the probe is repeated
            continue
        if r.status != 200 or r.body != peer.small:
            pytest.fail(f"{peer.name} over h3: GET /small → {r.status} {r.body[:100]!r}")
        return


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL the process group past the deadline (not reaped before the kill,
    so the group id cannot have been reused)."""
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


# --------------------------------------------------------------------------- muxproxy


def render_config(
    listen_port: int, peer: H3Peer, *, server_name: str, ca_file: Path, connections: int
) -> str:
    return f"""\
[proxy]
workers = 1
grace_period = "5s"

[[listeners]]
name = "edge"
listen = "127.0.0.1:{listen_port}"

[[clusters]]
name = "app"
protocol = "h3"
backends = ["{peer.address}"]
connections = {connections}
# aioquic's pure-Python handshake can take seconds on a busy 2-core machine
connect_timeout = "10s"
tls = {{ verify = true, ca = {json.dumps(str(ca_file))}, server_name = {json.dumps(server_name)} }}

[[routes]]
host = "*"
path_prefix = "/"
cluster = "app"
"""


@contextmanager
def run_h3_proxy(
    workdir: Path,
    peer: H3Peer,
    loop: str,
    *,
    server_name: str = "localhost",
    ca_file: Path | None = None,
    connections: int = CONNECTIONS,
    attempts: int = 3,
) -> Iterator[Proxy]:
    """muxproxy (``python -m muxproxy run``) with an h3 cluster in front of ``peer``; as
    interop/proxy.py's ``run_proxy``: wait for ``ready``, SIGTERM afterwards, and fail if it
    did not exit 0 or logged an error."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "muxproxy.toml"
    for attempt in range(attempts):
        port = free_tcp_udp_port()
        config.write_text(
            render_config(
                port,
                peer,
                server_name=server_name,
                ca_file=ca_file or peer.pki.ca_file,
                connections=connections,
            )
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "muxproxy", "run", "-c", str(config), "--loop", loop],
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert process.stderr is not None
        reader = StderrReader(process.stderr, f"muxproxy-stderr-{loop}")
        if not reader.decided.wait(READY_DEADLINE):
            _stop(process)
            reader.finish()
            pytest.fail(f"muxproxy printed no ready line in {READY_DEADLINE}s:\n{reader.text()}")
        if reader.ready_line is None:  # EOF: it exited before accepting
            process.wait(STOP_DEADLINE)
            reader.finish()
            if "Address already in use" in reader.text() and attempt + 1 < attempts:
                continue
            pytest.fail(f"muxproxy exited with {process.returncode}:\n{reader.text()}")
        break
    else:  # pragma: no cover - the loop always breaks or fails
        raise AssertionError("unreachable")

    try:
        assert parse_ready(reader.ready_line).get("edge") == f"127.0.0.1:{port}", reader.ready_line
        yield Proxy(loop, port, config, process, reader)
    finally:
        graceful = _stop(process)
        reader.finish()
        text = reader.text()
        problems = [line for line in reader.lines if PROBLEM.search(line)]
        assert not problems, "muxproxy logged errors:\n" + "\n".join(problems[:20])
        assert graceful, f"muxproxy did not exit within {STOP_DEADLINE}s of SIGTERM:\n{text}"
        assert process.returncode == 0, f"muxproxy exited {process.returncode}:\n{text}"
