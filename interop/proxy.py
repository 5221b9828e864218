"""muxproxy as a subprocess (``python -m muxproxy run``), configured to front one nginx."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from .h1 import H1Client
from .nginx import Nginx, free_port

READY_DEADLINE = 15.0
STOP_DEADLINE = 10.0
CONNECTIONS = 2
REPO = Path(__file__).resolve().parent.parent
# Against a healthy nginx, any of these on muxproxy's stderr is a bug. Log lines look like
# "2026-01-01 12:00:00,000 ERROR muxproxy.pool: …" ("%(asctime)s %(levelname)s %(name)s: …").
PROBLEM = re.compile(r"Traceback|\b(?:ERROR|CRITICAL)\b|internal error")


def render_config(listen_port: int, nginx: Nginx, *, connections: int = CONNECTIONS) -> str:
    tls = ""
    if nginx.protocol == "h2":
        assert nginx.ca_file is not None
        tls = (
            f"tls = {{ verify = true, ca = {json.dumps(str(nginx.ca_file))}, "
            'server_name = "localhost" }\n'
        )
    return f"""\
[proxy]
workers = 1
grace_period = "5s"

[[listeners]]
name = "edge"
listen = "127.0.0.1:{listen_port}"

[[clusters]]
name = "app"
protocol = "{nginx.protocol}"
backends = ["{nginx.address}"]
connections = {connections}
{tls}
[[routes]]
host = "*"
path_prefix = "/"
cluster = "app"
"""


class StderrReader:
    """Drains the proxy's stderr on a thread; ``decided`` is set on the ready line or at EOF."""

    def __init__(self, stream: IO[bytes], name: str) -> None:
        self.stream = stream
        self.lines: list[str] = []
        self.ready_line: str | None = None
        self.decided = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for raw in self.stream:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            if self.ready_line is None and line.startswith("ready "):
                self.ready_line = line
                self.decided.set()
        self.decided.set()

    def finish(self) -> None:
        """After the process exited: collect the last lines, close the pipe."""
        self.thread.join(STOP_DEADLINE)
        self.stream.close()

    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass
class Proxy:
    loop: str
    port: int
    config: Path
    process: subprocess.Popen[bytes]
    stderr: StderrReader

    def client(self) -> H1Client:
        return H1Client("127.0.0.1", self.port)


def parse_ready(line: str) -> dict[str, str]:
    """``ready edge=127.0.0.1:43117 admin=…`` → {"edge": "127.0.0.1:43117", …}."""
    return dict(item.split("=", 1) for item in line.split()[1:])


@contextmanager
def run_proxy(
    workdir: Path, nginx: Nginx, loop: str, *, attempts: int = 3, connections: int = CONNECTIONS
) -> Iterator[Proxy]:
    """Start muxproxy in front of ``nginx``; wait for its ``ready`` line; SIGTERM it afterwards
    and check that it exited 0 and logged no error."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "muxproxy.toml"
    for attempt in range(attempts):
        port = free_port()
        config.write_text(render_config(port, nginx, connections=connections))
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
                continue  # lost the free-port race; pick another port
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


def _stop(process: subprocess.Popen[bytes]) -> bool:
    """SIGTERM and wait; SIGKILL its process group past the deadline. True if it exited alone."""
    if process.poll() is not None:
        return True
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_DEADLINE)
        return True
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # not reaped yet: the group id is still ours
        process.wait(STOP_DEADLINE)
        return False
