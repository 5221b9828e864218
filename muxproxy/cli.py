"""Command line: ``muxproxy run | check | reload | demo``, ``--version``.

This is, with ``__main__``, the only place that picks the event loop.  Whatever stops the
proxy from starting (a config error, a certificate that does not load, a port in use, a
missing ``--loop`` extra) ends here as one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

import anyio
import anyio.abc

from . import __version__
from .budget import connection_budget
from .config import Address, AdminConfig, Config, ConfigError, load, loads
from .io.accesslog import UNLIMITED, AccessLog, configure_logging
from .io.listen import bind_error
from .io.reload_scope import Action, Role, applied, plan, settings
from .io.server import Proxy
from .io.startup import check_loop, check_startup
from .io.supervisor import READY_FD_ENV, die_with_supervisor, supervise

log = logging.getLogger("muxproxy")

DESCRIPTION = """\
muxproxy: an edge reverse proxy that carries many HTTP/1.1 client connections over a small,
fixed pool of HTTP/2 or HTTP/3 connections per backend."""
EPILOG = """\
examples:
  muxproxy demo                      see it work (backend, proxy and clients in one process)
  muxproxy check -c proxy.toml       validate a config (--bind: also try every listen port)
  muxproxy run -c proxy.toml         serve; SIGTERM/SIGINT drain gracefully, SIGHUP reloads
  muxproxy reload -c proxy.toml      validate, then SIGHUP the proxy named in [proxy].pid_file
"""


def _demo_config() -> Config:
    """The demo's config, shipped inside the package (muxproxy/demo/demo.toml)."""
    text = resources.files("muxproxy.demo").joinpath("demo.toml").read_text(encoding="utf-8")
    return loads(text, source="muxproxy/demo/demo.toml")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="muxproxy",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"muxproxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,check,reload,demo}")
    loop_help = (
        "event loop: asyncio (default), uvloop or trio; the last two need an extra: "
        "pip install 'muxproxy[uvloop]' or 'muxproxy[trio]'"
    )
    for name, help_ in (
        ("run", "run the proxy"),
        ("check", "validate a config file"),
        ("reload", "validate a config file and make the running proxy (pid_file) reload it"),
    ):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("-c", "--config", required=True, type=Path, help="TOML config file")
        if name == "check":
            sp.add_argument(
                "--bind",
                action="store_true",
                help="also bind every listen address once (and release it): finds ports in use",
            )
        if name == "run":
            sp.add_argument("--loop", choices=("asyncio", "uvloop", "trio"), help=loop_help)
            sp.add_argument("-v", "--verbose", action="store_true", help="debug logging")
            sp.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    d = sub.add_parser(
        "demo",
        help="in-process HTTP/2 backend + proxy, and a burst of clients",
        description="An in-process HTTP/2 backend, the proxy in front of it, and a burst of "
        "client connections; then it keeps serving until Ctrl-C.",
    )
    d.add_argument("-c", "--config", type=Path, help="TOML config (default: the packaged demo)")
    d.add_argument("--loop", choices=("asyncio", "uvloop", "trio"), help=loop_help)
    d.add_argument("--clients", type=int, default=500, help="concurrent client connections")
    d.add_argument("--requests", type=int, default=4, help="requests per client connection")
    d.add_argument("--once", action="store_true", help="exit after the burst")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # (a write outside _say; the output is lost either way)
        _silence(sys.stdout)
        return 1


def _say(*lines: str, err: bool = False) -> None:
    """Print the lines and flush.  A reader that went away (``muxproxy check … | head -1``)
    silences the stream instead of a BrokenPipeError traceback; the command's exit status
    stays its own."""
    stream = sys.stderr if err else sys.stdout
    try:
        stream.write("".join(f"{line}\n" for line in lines))
        stream.flush()
    except BrokenPipeError:
        _silence(stream)


def _silence(stream: TextIO) -> None:
    """Point a broken stream at /dev/null, so later writes and the flush at exit are quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("hpack", "h2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    where = args.config or "muxproxy/demo/demo.toml"
    try:
        cfg = load(args.config) if args.config is not None else _demo_config()
        loop = getattr(args, "loop", None) or cfg.proxy.loop
        check_loop(loop, "--loop" if getattr(args, "loop", None) else "proxy.loop")
        if args.command == "check":
            check_startup(cfg, bind=args.bind)
            _print_routes(cfg)
            return 0
        if args.command == "reload":
            return _signal_reload(cfg)
        configure_logging(cfg.proxy.log_format, logging.root.level)
        if args.command == "run":
            if args.worker:
                die_with_supervisor()
                return _run_loop(loop, _serve, _worker_config(cfg), args.config, True)
            if cfg.proxy.workers > 1:
                check_startup(cfg, bind=True, reuse_port=True)
                with _pid_file(cfg):
                    return supervise(args.config, cfg, args.loop)
            with _pid_file(cfg):
                return _run_loop(loop, _serve, cfg, args.config, False, args.loop)
        return _run_loop(loop, _demo, cfg, args.clients, args.requests, args.once)
    except ConfigError as exc:
        _say(f"muxproxy: {where}: {exc}", err=True)
        return 1


def _worker_config(cfg: Config) -> Config:
    """A worker's admin listener is on a private loopback port, with or without ``[admin]``:
    the supervisor owns the configured one (and may add or move it on reload) and gathers
    every worker's figures from these (io/supervisor.py)."""
    import msgspec

    return msgspec.structs.replace(cfg, admin=AdminConfig(listen=Address("127.0.0.1", 0)))


def _startup_error(exc: BaseException) -> ConfigError | None:
    """The ConfigError (a bind or file failure) inside what a task group raised, if any."""
    if isinstance(exc, ConfigError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _startup_error(inner)
            if found is not None:
                return found
    return None


def _signal_reload(cfg: Config) -> int:
    """``muxproxy reload``: the file is valid (certificates too); SIGHUP the pid in
    ``[proxy].pid_file``, which reloads the file it was started with."""
    try:
        check_startup(cfg)  # (certificates load; nothing binds: the proxy holds the ports)
    except ConfigError as exc:
        _say(f"muxproxy: {cfg.source}: {exc}", err=True)
        return 1
    pid_file = cfg.proxy.pid_file
    if pid_file is None:
        _say(f"muxproxy: {cfg.source}: proxy.pid_file: not set, no running proxy to find", err=True)
        return 1
    try:
        pid = int(Path(pid_file).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        _say(f"muxproxy: proxy.pid_file: {pid_file}: {exc}", err=True)
        return 1
    _say(f"muxproxy: asked pid {pid} to reload {cfg.source}", err=True)
    return 0


class _pid_file:
    """Write ``[proxy].pid_file`` while running; remove it after if it still names us."""

    def __init__(self, cfg: Config) -> None:
        self.path = Path(cfg.proxy.pid_file) if cfg.proxy.pid_file else None

    def __enter__(self) -> None:
        if self.path is not None:
            self.path.write_text(f"{os.getpid()}\n")

    def __exit__(self, *exc: object) -> None:
        if self.path is None:
            return
        try:
            if self.path.read_text().strip() == str(os.getpid()):
                self.path.unlink()
        except OSError:
            pass


def _run_loop(loop: str, fn: Callable[..., Awaitable[int]], *args: Any) -> int:
    try:
        if loop == "trio":
            return anyio.run(fn, *args, backend="trio")
        return anyio.run(
            fn, *args, backend="asyncio", backend_options={"use_uvloop": loop == "uvloop"}
        )
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:
        found = _startup_error(group)
        if found is None:
            raise
        raise found from None


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _print_routes(cfg: Config) -> None:
    lines = [f"{cfg.source}: OK"]
    for lst in cfg.listeners:
        lines.append(f"listener {lst.name}: {'https' if lst.tls else 'http'}://{lst.listen}")
    for c in cfg.clusters:
        cap = f", up to {c.max_connections}" if c.max_connections else ""
        conns = _plural(c.connections, "connection")
        lines.append(
            f"cluster {c.name}: {c.protocol} → {', '.join(map(str, c.backends))} "
            f"({conns} per backend{cap}, {c.balance})"
        )
    for i, r in enumerate(cfg.routes):
        ws = " +websocket" if r.websocket else ""
        lines.append(f"route {i}: host {r.host} path {r.path_prefix}* → {r.cluster}{ws}")
    _say(*lines, *connection_budget(cfg))


async def _with_signals(
    proxy: Proxy,
    on_ready: Callable[[dict[str, Address]], Awaitable[None]],
    *,
    reuse_port: bool = False,
    on_hup: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (graceful); a second signal stops at once.  SIGHUP calls
    ``on_hup`` (the reload), SIGUSR1 reopens the access log, SIGUSR2 retires (the supervisor
    replacing a worker: a drain that answers each keep-alive client once more)."""
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            with anyio.open_signal_receiver(
                signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2
            ) as signals:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        if on_hup is not None:
                            tg.start_soon(on_hup)
                        continue
                    if signum == signal.SIGUSR1:
                        if proxy.access_log is not None:
                            proxy.access_log.reopen()
                        continue
                    if proxy.draining and signum != signal.SIGUSR2:
                        tg.cancel_scope.cancel()
                    proxy.shutdown(retire=signum == signal.SIGUSR2)

        async def serve(*, task_status: anyio.abc.TaskStatus[dict[str, Address]]) -> None:
            await proxy.serve(task_status=task_status, reuse_port=reuse_port)
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        bound = await tg.start(serve)
        await on_ready(bound)


# The cyclic garbage collector, tuned once the proxy is up.  A proxy's live heap is large and
# steady (connections, HPACK tables, streams in flight) while its per-request garbage is freed
# by reference counting; with CPython's default gen-0 threshold of 700 net allocations, the
# collector rescanned the objects of the requests in flight hundreds of times a second, and
# under h2load -c512 -m1 took 39 % of the proxy's CPU (gc.callbacks timing, 8 s window).
# At 20,000 (and after gc.freeze): HTTP/2 clients 120 -> 76 us of proxy CPU per request at
# -c512 -m1 and 79 -> 47 at -c64 -m10; HTTP/1.1 unchanged at 64 clients, ~4 % less at 512.
# Cyclic garbage (rare here: none in a DEBUG_SAVEALL run of the HTTP/2 path) waits at most
# that many net allocations.
GC_GEN0_THRESHOLD = 20_000


def settle_heap() -> None:
    """Move what startup built (modules, config, routes, pools) out of the collector's sight
    and make young collections rarer; see GC_GEN0_THRESHOLD."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def _ready_line(bound: dict[str, Address]) -> str:
    return "ready " + " ".join(f"{name}={addr}" for name, addr in bound.items())


async def _serve(
    cfg: Config, config_path: Path, worker: bool = False, loop_override: str | None = None
) -> int:
    proxy = Proxy(cfg)
    proxy.attach_access_log(AccessLog.from_config(cfg.proxy))

    in_force = settings(cfg, loop_override)  # the keys around the proxy (io/reload_scope.py)

    async def reload() -> None:
        """SIGHUP: the proxy's own reload, then the keys around it that are this process's
        business (a worker leaves workers, loop and [admin] to its supervisor)."""
        nonlocal in_force
        adjust = _worker_config if worker else None
        if await proxy.reload_file(config_path, adjust):
            role: Role = "worker" if worker else "single"
            changes = plan(in_force, proxy.config, role, loop_override)
            for change in changes:
                if change.action is Action.RESTART:
                    log.warning("%s", change.line(), extra=UNLIMITED)
                elif change.action is Action.RELOG:
                    configure_logging(proxy.config.proxy.log_format, logging.root.level)
            in_force = applied(in_force, changes)

    async def ready(bound: dict[str, Address]) -> None:
        # A worker tells its supervisor on a pipe of their own (stdout is the access log's);
        # the line names the worker's private admin port, which the supervisor gathers from,
        # and the supervisor prints the one ready line.
        settle_heap()
        line = _ready_line(bound)
        ready_fd = os.environ.get(READY_FD_ENV)
        if worker and ready_fd is not None:
            os.write(int(ready_fd), f"{line}\n".encode())
            os.close(int(ready_fd))
        else:
            _say(line, err=not worker)

    try:
        await _with_signals(
            proxy,
            ready,
            reuse_port=worker,
            on_hup=reload,
        )
    finally:
        if proxy.access_log is not None:
            proxy.access_log.close()
    return 0


async def _demo(cfg: Config, clients: int, requests: int, once: bool) -> int:
    from .demo.h1client import H1Client
    from .demo.h2server import H2Origin, hello_handler

    origin = H2Origin(hello_handler, max_concurrent_streams=1000)
    backend = cfg.clusters[0].backends[0]
    proxy = Proxy(cfg)
    async with anyio.create_task_group() as tg:
        try:
            await tg.start(origin.serve, backend.host, backend.port)
        except OSError as exc:
            raise ConfigError(bind_error("clusters[0].backends[0]", backend, exc)) from None

        async def ready(bound: dict[str, Address]) -> None:
            _say(_ready_line(bound), err=True)
            addr = next(iter(bound.values()))
            ok = 0

            async def one_client() -> None:
                nonlocal ok
                c = await H1Client.connect(addr.host, addr.port)
                try:
                    for i in range(requests):
                        r = await c.request("GET", f"/demo/{i}")
                        ok += r.status == 200
                finally:
                    await c.aclose()

            async with anyio.create_task_group() as burst:
                for _ in range(clients):
                    burst.start_soon(one_client)
            n = origin.connections_accepted
            _say(
                f"demo: {_plural(clients, 'client connection')} sent "
                f"{_plural(clients * requests, 'request')}, {ok} answered 200, over "
                f"{_plural(n, 'backend TCP connection')} to {backend}"
            )
            if once:
                proxy.shutdown()
            else:
                _say(f"try: curl -i http://{addr}/hello   (Ctrl-C to stop)")

        await _with_signals(proxy, ready)
        tg.cancel_scope.cancel()
    return 0
