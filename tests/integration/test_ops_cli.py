"""The command line as an operator meets it: one line for whatever stops the proxy, the
admin port with several workers, and the packaged demo."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from muxproxy.demo.h1client import H1Client
from muxproxy.demo.h2server import H2Origin

from .origin import Script
from .test_tls_and_cli import proxy_process

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path = REPO, pre: str = "") -> subprocess.CompletedProcess[str]:
    """``python -m muxproxy ARGS`` (``pre``: Python run first in the same process)."""
    code = f"{pre}\nimport sys; from muxproxy.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a refused start (exit 1, no traceback)."""
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def taken() -> Iterator[int]:
    """A port another process (well, socket) is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield int(s.getsockname()[1])


def write(tmp_path: Path, listeners: str, extra: str = "", cluster: str = "") -> Path:
    path = tmp_path / "proxy.toml"
    path.write_text(
        extra
        + textwrap.dedent(listeners)
        + '[[clusters]]\nname = "app"\nbackends = ["127.0.0.1:9"]\n'
        + cluster
        + '[[routes]]\ncluster = "app"\n'
    )
    return path


def listener(name: str, listen: str, more: str = "") -> str:
    return f'[[listeners]]\nname = "{name}"\nlisten = "{listen}"\n{more}'


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, Path]:
    ca = trustme.CA()
    out = {}
    for name in ("a.example", "b.example"):
        c = ca.issue_cert(name)
        out[f"{name}.pem"] = tmp_path / f"{name}.pem"
        out[f"{name}.key"] = tmp_path / f"{name}.key"
        c.cert_chain_pems[0].write_to_path(str(out[f"{name}.pem"]))
        c.private_key_pem.write_to_path(str(out[f"{name}.key"]))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return out


# --- check catches what run would fail on ---------------------------------------------------


@pytest.mark.parametrize(
    ("listeners", "admin", "key"),
    [
        (listener("a", "127.0.0.1:8080") + listener("b", "127.0.0.1:8080"), "", "listeners[1]"),
        (listener("a", "0.0.0.0:8080") + listener("b", "127.0.0.1:8080"), "", "listeners[1]"),
        (listener("a", "127.0.0.1:8080") + listener("b", "[::]:8080"), "", "listeners[1]"),
        (listener("a", "127.0.0.1:8080"), '[admin]\nlisten = "0.0.0.0:8080"\n', "admin"),
    ],
)
def test_check_refuses_overlapping_listen_addresses(
    tmp_path: Path, listeners: str, admin: str, key: str
) -> None:
    line = one_line(cli("check", "-c", str(write(tmp_path, listeners, admin))))
    assert f"{key}.listen: " in line and "overlaps" in line, line


def test_different_hosts_on_one_port_are_fine(tmp_path: Path) -> None:
    text = listener("a", "127.0.0.1:8080") + listener("b", "127.0.0.2:8080")
    assert cli("check", "-c", str(write(tmp_path, text))).returncode == 0


def test_check_refuses_unreadable_certificate_files(
    tmp_path: Path, certs: dict[str, Path]
) -> None:
    missing = tmp_path / "missing.pem"
    tls = f'tls = {{ cert = "{missing}", key = "{certs["a.example.key"]}" }}\n'
    line = one_line(cli("check", "-c", str(write(tmp_path, listener("a", "127.0.0.1:0", tls)))))
    assert line.endswith(
        f"listeners[0].tls.cert: cannot read {missing}: No such file or directory"
    ), line
    unreadable = tmp_path / "key.pem"
    unreadable.write_text("x")
    unreadable.chmod(0)
    if os.access(unreadable, os.R_OK):  # root reads anything: use a directory instead
        unreadable = tmp_path
    tls = (
        f'tls = [{{ cert = "{certs["a.example.pem"]}", key = "{certs["a.example.key"]}" }},'
        f' {{ cert = "{certs["b.example.pem"]}", key = "{unreadable}", names = ["b.example"] }}]\n'
    )
    line = one_line(cli("check", "-c", str(write(tmp_path, listener("a", "127.0.0.1:0", tls)))))
    assert f"listeners[0].tls[1].key: cannot read {unreadable}" in line, line


def test_check_refuses_a_certificate_and_key_that_do_not_match(
    tmp_path: Path, certs: dict[str, Path]
) -> None:
    tls = f'tls = {{ cert = "{certs["a.example.pem"]}", key = "{certs["b.example.key"]}" }}\n'
    line = one_line(cli("check", "-c", str(write(tmp_path, listener("a", "127.0.0.1:0", tls)))))
    assert "listeners[0].tls: certificate " in line and "do not load" in line, line


def test_check_bind_finds_a_port_in_use(tmp_path: Path, taken: int) -> None:
    path = write(tmp_path, listener("a", f"127.0.0.1:{taken}"))
    assert cli("check", "-c", str(path)).returncode == 0  # without --bind: not looked at
    line = one_line(cli("check", "--bind", "-c", str(path)))
    assert f"listeners[0].listen: cannot listen on 127.0.0.1:{taken}: " in line, line
    assert "in use" in line
    free = write(tmp_path, listener("a", f"127.0.0.1:{free_port()}"))
    assert cli("check", "--bind", "-c", str(free)).returncode == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_run_with_a_port_in_use_is_one_line(tmp_path: Path, taken: int, workers: int) -> None:
    path = write(tmp_path, listener("a", f"127.0.0.1:{taken}"), f"[proxy]\nworkers = {workers}\n")
    line = one_line(cli("run", "-c", str(path)))
    assert f"listeners[0].listen: cannot listen on 127.0.0.1:{taken}" in line, line


def test_run_with_the_admin_port_in_use_is_one_line(tmp_path: Path, taken: int) -> None:
    path = write(
        tmp_path, listener("a", "127.0.0.1:0"), f'[admin]\nlisten = "127.0.0.1:{taken}"\n'
    )
    line = one_line(cli("run", "-c", str(path)))
    assert f"admin.listen: cannot listen on 127.0.0.1:{taken}" in line, line


def test_run_with_a_missing_certificate_is_one_line(tmp_path: Path) -> None:
    tls = f'tls = {{ cert = "{tmp_path}/nope.pem", key = "{tmp_path}/nope.key" }}\n'
    line = one_line(cli("run", "-c", str(write(tmp_path, listener("a", "127.0.0.1:0", tls)))))
    assert "listeners[0].tls.cert: cannot read" in line, line


# --- messages -------------------------------------------------------------------------------


@pytest.mark.parametrize(("loop", "extra"), [("trio", "trio"), ("uvloop", "uvloop")])
def test_loop_without_its_extra_names_the_extra(tmp_path: Path, loop: str, extra: str) -> None:
    path = write(tmp_path, listener("a", "127.0.0.1:0"))
    # As if not installed, for the CLI's check (after muxproxy's own imports: dnspython, which
    # the pools import, imports trio itself when its metadata says it is installed).
    hide = f"import sys, muxproxy.cli; sys.modules[{extra!r}] = None"
    line = one_line(cli("run", "-c", str(path), "--loop", loop, pre=hide))
    assert f"pip install 'muxproxy[{extra}]'" in line, line
    line = one_line(cli("demo", "--once", "--loop", loop, pre=hide))
    assert f"pip install 'muxproxy[{extra}]'" in line, line


def test_help_is_for_users() -> None:
    r = cli("--help")
    assert r.returncode == 0
    assert "only place that picks the event loop" not in r.stdout
    assert "muxproxy demo" in r.stdout and "reverse proxy" in r.stdout
    r = cli("run", "--help")
    assert "muxproxy[trio]" in r.stdout and "--worker" not in r.stdout


def test_check_output_and_messages(tmp_path: Path) -> None:
    path = write(tmp_path, listener("a", "127.0.0.1:0"), cluster="connections = 1\n")
    r = cli("check", "-c", str(path))
    assert "(1 connection per backend, least_streams)" in r.stdout, r.stdout
    bad = write(tmp_path, listener("a", "127.0.0.1:0"), cluster='protocol = "http2"\n')
    line = one_line(cli("check", "-c", str(bad)))
    assert line.endswith(
        "clusters[0].protocol: Invalid enum value 'http2' (use one of: 'h2c', 'h2', 'h3', 'http1')"
    ), line
    bad = write(tmp_path, listener("a", "127.0.0.1:0"), "[proxy]\ngrace_period = 10\n")
    line = one_line(cli("check", "-c", str(bad)))
    assert line.endswith('proxy.grace_period: a duration needs a unit: write "10s" or "10ms"')
    bad = write(tmp_path, listener("a", "127.0.0.1:0", "[listeners.limits]\nmax_body = 1024\n"))
    line = one_line(cli("check", "-c", str(bad)))
    assert "listeners[0].limits.max_body: a size needs a unit" in line, line
    bad = write(tmp_path, listener("a", "127.0.0.1:0", 'forwarded = "rfc"\n'))
    line = one_line(cli("check", "-c", str(bad)))
    assert line.endswith(
        "listeners[0].forwarded: Invalid enum value 'rfc' "
        "(use one of: 'x-forwarded', 'rfc7239', 'both')"
    ), line


# --- several workers, one admin port ----------------------------------------------------------


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def test_two_workers_one_admin_port_shows_both(tmp_path: Path) -> None:
    """`workers = 2` with [admin] starts (the supervisor owns the port), and one scrape
    shows each worker's series labelled worker="0" and worker="1"."""

    async def scenario() -> None:
        origin = H2Origin(Script())
        async with anyio.create_task_group() as tg:
            port = await tg.start(origin.serve)
            listen, admin = free_port(), free_port()
            cfg = tmp_path / "proxy.toml"
            cfg.write_text(
                f'[proxy]\nworkers = 2\n[admin]\nlisten = "127.0.0.1:{admin}"\n'
                f'[[listeners]]\nname = "edge"\nlisten = "127.0.0.1:{listen}"\n'
                f'[[clusters]]\nname = "app"\nbackends = ["127.0.0.1:{port}"]\nconnections = 1\n'
                '[[routes]]\ncluster = "app"\n'
            )
            argv = [sys.executable, "-m", "muxproxy", "run", "-c", str(cfg)]
            async with proxy_process(argv) as px:
                assert f"admin=127.0.0.1:{admin}".encode() in px.log, px.log
                clients = [await H1Client.connect("127.0.0.1", listen) for _ in range(8)]
                for c in clients:
                    assert (await c.request("GET", "/hello")).status == 200
                status, text = await anyio.to_thread.run_sync(scrape, admin)
                assert status == 200
                fams = {f.name: f for f in text_string_to_metric_families(text)}
                up = {s.labels["worker"]: s.value for s in fams["muxproxy_worker_up"].samples}
                assert up == {"0": 1.0, "1": 1.0}
                conns = {
                    s.labels["worker"]: s.value
                    for s in fams["muxproxy_client_connections"].samples
                }
                assert set(conns) == {"0", "1"} and sum(conns.values()) == 8, conns
                opened = [
                    s for s in fams["muxproxy_pool_events"].samples
                    if s.labels["event"] == "connections_opened"
                ]
                assert {s.labels["worker"] for s in opened} == {"0", "1"}
                assert (await anyio.to_thread.run_sync(scrape, admin, "/healthz"))[0] == 200
                for c in clients:
                    await c.aclose()
                assert await px.stop(30) == 0, px.log
            tg.cancel_scope.cancel()

    anyio.run(scenario)


# --- packaging ------------------------------------------------------------------------------


def test_a_wheel_runs_the_demo_from_anywhere(tmp_path: Path) -> None:
    """`pip wheel` + a fresh venv: `muxproxy demo --once` from an unrelated directory uses
    the config shipped inside the package (no conf/ next to site-packages)."""
    wheels = tmp_path / "wheels"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no source tree on the path
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
        timeout=300,
        capture_output=True,
        text=True,
        env=env,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("muxproxy-*.whl")
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True
    )
    py = venv / "bin" / "python"
    installed = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)],
        timeout=300,
        capture_output=True,
        text=True,
        env=env,
    )
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [str(py), "-c", "import muxproxy; print(muxproxy.__file__)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True,
    ).stdout
    assert where.startswith(str(venv)), where  # the wheel's copy, not the editable one
    r = subprocess.run(
        [str(venv / "bin" / "muxproxy"), "demo", "--once", "--clients", "20"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "20 client connections sent 80 requests, 80 answered 200" in r.stdout, r.stdout


def test_demo_with_its_backend_port_taken_is_one_line(tmp_path: Path, taken: int) -> None:
    path = tmp_path / "demo.toml"
    path.write_text(
        (REPO / "muxproxy" / "demo" / "demo.toml")
        .read_text()
        .replace("127.0.0.1:18081", f"127.0.0.1:{taken}")
        .replace("127.0.0.1:18080", f"127.0.0.1:{free_port()}")
    )
    line = one_line(cli("demo", "--once", "-c", str(path)))
    assert f"clusters[0].backends[0]: cannot listen on 127.0.0.1:{taken}" in line, line


# --- output into a closed pipe (`muxproxy … | head -1`) ---------------------------------------


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("check", "-c", "CONFIG"), 0),  # valid: the truncated output does not change that
        (("check", "-c", "BAD"), 1),
        (("--help",), 0),
        (("run", "--help"), 0),
        (("--version",), 0),
    ],
)
def test_output_to_a_closed_pipe_exits_quietly(
    tmp_path: Path, args: tuple[str, ...], code: int
) -> None:
    """The reader is gone before the first write (its end closed before the start), so
    every write meets EPIPE: no BrokenPipeError traceback, no "Exception ignored" at exit."""
    good = write(tmp_path, listener("a", "127.0.0.1:0"))
    bad = tmp_path / "bad.toml"
    bad.write_text('[proxy]\nworkers = "x"\n')
    argv = [str(good) if a == "CONFIG" else str(bad) if a == "BAD" else a for a in args]
    r, w = os.pipe()
    os.close(r)
    err_r, err_w = os.pipe()
    os.close(err_r)  # stderr is a closed pipe too (`2>&1 | head -1`)
    try:
        for stderr in (subprocess.PIPE, err_w):
            p = subprocess.run(
                [sys.executable, "-m", "muxproxy", *argv],
                stdout=w,
                stderr=stderr,
                cwd=tmp_path,
                timeout=60,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            assert p.returncode == code, (p.returncode, p.stderr)
            if stderr is subprocess.PIPE:
                assert b"Traceback" not in p.stderr and b"BrokenPipe" not in p.stderr, p.stderr
    finally:
        os.close(w)
        os.close(err_w)
