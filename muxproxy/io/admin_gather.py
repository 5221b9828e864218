"""The supervisor's admin port: one scrape gathers every worker's figures.

With ``workers > 1`` each worker serves ``/healthz``, ``/pools`` and ``/metrics`` on a private
loopback port (named in its ready line); the supervisor, a plain synchronous process, serves
the configured ``[admin].listen`` from a thread and answers each request by asking every
worker in turn:

* ``/metrics``: each worker's families, merged so each family appears once, with every
  sample labelled ``worker="N"``; plus ``muxproxy_worker_up{worker}`` (0 while a worker is
  restarting or does not answer).
* ``/healthz``: 200 only if every worker answers 200 (503 while any drains or is missing).
* ``/pools``: ``{"0": {...}, "1": {...}}``, each worker's own ``/pools``.

A scrape costs one loopback request per worker; workers answer from their own event loops,
so the supervisor never touches their state.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..config import Address, ConfigError

__all__ = ["AdminGatherer", "merge_metrics"]

FETCH_TIMEOUT = 5.0


def _fetch(addr: str, path: str) -> tuple[int, bytes] | None:
    host, _, port = addr.rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=FETCH_TIMEOUT)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    except OSError:
        return None
    finally:
        conn.close()


def _with_worker(line: str, worker: str) -> str:
    """``name{a="b"} 1`` → ``name{worker="0",a="b"} 1``; ``name 1`` → ``name{worker="0"} 1``."""
    brace, space = line.find("{"), line.find(" ")
    if brace != -1 and (space == -1 or brace < space):
        rest = line[brace + 1 :]
        sep = "" if rest.startswith("}") else ","
        return f'{line[:brace]}{{worker="{worker}"{sep}{rest}'
    return f'{line[:space]}{{worker="{worker}"}}{line[space:]}'


def merge_metrics(texts: dict[str, str | None]) -> str:
    """Merge the workers' Prometheus texts (``worker → text``, None: not answering)."""
    families: dict[str, list[str]] = {}  # name → HELP and TYPE lines, then samples
    samples: dict[str, list[str]] = {}
    for worker, text in texts.items():
        if text is None:
            continue
        current = ""
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                current = line.split(" ", 3)[2]
                head = families.setdefault(current, [])
                if len(head) < 2 and line not in head:
                    head.append(line)
                samples.setdefault(current, [])
            elif line and not line.startswith("#"):
                samples.setdefault(current, []).append(_with_worker(line, worker))
    out: list[str] = [
        "# HELP muxproxy_worker_up 1 if the worker answered this scrape.",
        "# TYPE muxproxy_worker_up gauge",
    ]
    out += [f'muxproxy_worker_up{{worker="{w}"}} {int(t is not None)}' for w, t in texts.items()]
    for name, head in families.items():
        out += head
        out += samples.get(name, [])
    return "\n".join(out) + "\n"


class AdminGatherer:
    """Serves the configured admin address from a daemon thread until :meth:`close`."""

    def __init__(self, listen: Address, workers: int) -> None:
        # worker index → its private admin address ("127.0.0.1:41234"), None while unknown
        self.workers: dict[int, str | None] = dict.fromkeys(range(workers))
        # The supervisor's own series (Prometheus text), appended to every /metrics answer.
        self.own: Callable[[], str] = lambda: ""
        gatherer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, ctype, body = gatherer.answer(self.path.split("?", 1)[0])
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.send_header("connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        host = listen.host.strip("[]")

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            daemon_threads = True

        try:
            self._server = Server((host, listen.port), Handler)
        except OSError as exc:
            raise ConfigError(f"admin.listen: cannot listen on {listen}: {exc.strerror}") from None
        bound = self._server.server_address
        self.address = Address(str(bound[0]), int(bound[1]))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _ask(self, path: str) -> dict[str, tuple[int, bytes] | None]:
        out: dict[str, tuple[int, bytes] | None] = {}
        for i, addr in sorted(self.workers.items()):
            out[str(i)] = _fetch(addr, path) if addr is not None else None
        return out

    def answer(self, path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            got = self._ask(path)
            texts = {w: r[1].decode() if r and r[0] == 200 else None for w, r in got.items()}
            text = merge_metrics(texts) + self.own()
            return 200, "text/plain; version=0.0.4", text.encode()
        if path == "/healthz":
            got = self._ask(path)
            bad = [w for w, r in got.items() if r is None or r[0] != 200]
            if bad:
                return 503, "text/plain", f"not ready: worker {', '.join(bad)}\n".encode()
            return 200, "text/plain", b"ok\n"
        if path == "/pools":
            got = self._ask(path)
            pools = {w: json.loads(r[1]) if r and r[0] == 200 else None for w, r in got.items()}
            return 200, "application/json", json.dumps(pools, indent=2).encode()
        return 404, "text/plain", b"try /healthz, /pools or /metrics\n"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
