"""DNS-based backend discovery: the resolving loop of one cluster.

A cluster backend whose host is a DNS name (not an IP literal, not ``localhost``) stands for
every IPv4 address (A record) the name resolves to.  :class:`Discovery` resolves each name
before the pool starts, then every ``resolve_interval``, with dnspython's async resolver (it
runs on asyncio and on trio, picked through sniffio, so no thread or blocking getaddrinfo per
lookup), and hands the pool the whole backend list whenever it changed.  What an answer does
to the set (failures keep the last good set, an empty answer counts only after
``resolve_hold``) is decided in :mod:`muxproxy.core.addrset`.

The DNS server is ``resolver`` when set (tests run dnsmasq on a loopback port), else the
system's ``/etc/resolv.conf``.  The record TTL is not used: the interval is the refresh rate.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable

import anyio
import anyio.abc
import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.resolver
import sniffio

from ..config import Address, ClusterConfig
from ..core.addrset import AddressSet, merge

log = logging.getLogger("muxproxy.discovery")

FIRST_RETRY = 1.0  # while a name has never been answered, ask again this often


def is_name(host: str) -> bool:
    """True for a host that discovery resolves (neither an IP literal nor localhost)."""
    if host == "localhost":
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def make_resolver(cfg: ClusterConfig) -> dns.asyncresolver.Resolver:
    if cfg.resolver is None:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [cfg.resolver.host]
        resolver.port = cfg.resolver.port
    # One lookup never outlasts the interval; no cache: every round asks the server.
    resolver.lifetime = min(5.0, float(cfg.resolve_interval))
    resolver.timeout = min(2.0, resolver.lifetime)
    resolver.cache = None
    # EDNS with a 4 KiB payload, so a large A set fits one UDP answer (a truncated one is
    # retried over TCP by dnspython); HAProxy's 512-byte default is the cautionary tale.
    resolver.use_edns(0, 0, 4096)
    return resolver


class Discovery:
    """Resolve a cluster's DNS-named backends and report the backend list on every change."""

    def __init__(self, cfg: ClusterConfig, on_change: Callable[[list[Address]], None]) -> None:
        self.cfg = cfg
        self.on_change = on_change
        self.static = [a for a in cfg.backends if not is_name(a.host)]
        self.names = [a for a in cfg.backends if is_name(a.host)]
        self.sets = {name: AddressSet(float(cfg.resolve_hold)) for name in self.names}
        self.resolver = make_resolver(cfg)
        self.rounds = 0

    def backends(self) -> list[Address]:
        resolved = (
            [Address(ip, name.port) for ip in self.sets[name].addresses] for name in self.names
        )
        return merge(self.static, resolved)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Resolve every name once, report, then keep re-resolving until cancelled."""
        await self._round()
        self.on_change(self.backends())
        task_status.started()
        while True:
            unanswered = any(not s.resolved_once for s in self.sets.values())
            interval = float(self.cfg.resolve_interval)
            await anyio.sleep(min(FIRST_RETRY, interval) if unanswered else interval)
            if await self._round():
                self.on_change(self.backends())

    async def _round(self) -> bool:
        changed = False
        for name in self.names:
            changed |= await self._resolve(name)
        self.rounds += 1
        return changed

    async def _resolve(self, name: Address) -> bool:
        s = self.sets[name]
        try:
            # The event loop in use, asked every time: dnspython would otherwise keep the first
            # one it saw for the whole process (tests run asyncio and trio in one process).
            backend = dns.asyncbackend.get_backend(sniffio.current_async_library())
            answer = await self.resolver.resolve(name.host, "A", backend=backend)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            addresses: list[str] = []
        except dns.exception.DNSException as exc:  # timeout, SERVFAIL, no server, ...
            s.failed()
            if s.failures == 1:
                log.warning(
                    "cluster %s: resolving %s failed (%s); keeping %d address(es)",
                    self.cfg.name,
                    name.host,
                    exc.__class__.__name__,
                    len(s.addresses),
                )
            return False
        else:
            addresses = [rr.address for rr in answer]
        was_holding = s.holding
        change = s.answered(addresses, anyio.current_time())
        if s.holding and not was_holding:
            log.warning(
                "cluster %s: %s has no addresses; keeping %d for %.0fs",
                self.cfg.name,
                name.host,
                len(s.addresses),
                self.cfg.resolve_hold,
            )
        if change:
            log.info(
                "cluster %s: %s now %s (added %s, removed %s)",
                self.cfg.name,
                name.host,
                ", ".join(s.addresses) or "empty",
                ", ".join(change.added) or "none",
                ", ".join(change.removed) or "none",
            )
        return bool(change)
