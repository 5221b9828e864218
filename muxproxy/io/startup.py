"""What ``run`` would fail on at startup, checked beforehand by ``muxproxy check``.

:func:`check_startup` loads every listener's certificates (the same code ``run`` uses) and,
with ``bind=True``, binds each listen address once and releases it at once, so a port taken
by another process is reported by ``check --bind`` — and by the supervisor before it starts
workers — as one line naming the key, like any other config error.
"""

from __future__ import annotations

import importlib.util
import socket

from ..config import Address, Config, ConfigError
from .listen import bind_error
from .tls import check_certificates

__all__ = ["LOOP_EXTRAS", "check_loop", "check_startup"]

LOOP_EXTRAS = {"uvloop": "uvloop", "trio": "trio"}  # --loop → the pip extra that provides it


def check_loop(loop: str, key: str) -> None:
    """A loop whose package is missing: one line naming the extra to install."""
    extra = LOOP_EXTRAS.get(loop)
    if extra is not None and importlib.util.find_spec(extra) is None:
        raise ConfigError(
            f"{key}: {loop} is not installed; install the extra: pip install 'muxproxy[{extra}]'"
        )


def _try_bind(addr: Address, where: str, reuse_port: bool) -> None:
    try:
        infos = socket.getaddrinfo(
            addr.host or None, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise ConfigError(bind_error(where, addr, exc)) from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(sockaddr)
                sock.listen(1)
            except OSError as exc:
                raise ConfigError(bind_error(where, addr, exc)) from None


def check_startup(cfg: Config, *, bind: bool = False, reuse_port: bool = False) -> None:
    """Raise ConfigError (one line, key path first) for what would stop ``run``."""
    for i, lc in enumerate(cfg.listeners):
        check_certificates(lc, f"listeners[{i}]")
    if not bind:
        return
    for i, lc in enumerate(cfg.listeners):
        _try_bind(lc.listen, f"listeners[{i}].listen", reuse_port)
    if cfg.admin is not None:
        _try_bind(cfg.admin.listen, "admin.listen", False)
