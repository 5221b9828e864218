"""TOML configuration → frozen, typed, validated objects.

The file is parsed by ``tomllib`` and decoded by ``msgspec`` into frozen Structs that forbid
unknown keys, so every error comes with the path of the key at fault.  Values with units
(durations, sizes, addresses) are decoded by :func:`_dec_hook`, whose errors msgspec also
decorates with the key path.  Cross-references (a route naming a cluster, unique names) are
checked afterwards in :func:`_check`.  Whatever goes wrong surfaces as one :class:`ConfigError`
whose message is a single line: ``"routes[2].cluster: no cluster named 'api'"``.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import msgspec

from .errors import ConfigError

__all__ = [
    "Address",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "Duration",
    "Limits",
    "ListenerConfig",
    "ProxyConfig",
    "RouteConfig",
    "Size",
    "WeightedCluster",
    "load",
    "loads",
]


class Duration(float):
    """Seconds, written in TOML as ``"250ms"``, ``"5s"``, ``"2m"``, ``"1h"``.

    A bare number is refused: ``grace_period = 10`` could mean seconds or milliseconds, and a
    config that means the other one fails at the worst moment."""

    _UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    _RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")

    @classmethod
    def parse(cls, value: object) -> Duration:
        if isinstance(value, bool):
            raise ValueError('expected a duration such as "5s"')
        if isinstance(value, int | float):
            raise ValueError(f'a duration needs a unit: write "{value}s" or "{value}ms"')
        if isinstance(value, str):
            m = cls._RE.match(value)
            if m:
                return cls(float(m.group(1)) * cls._UNITS[m.group(2)])
        raise ValueError(f"bad duration {value!r} (use a number with ms, s, m or h)")


class Size(int):
    """Bytes, written in TOML as ``"64KiB"``, ``"1GiB"``, ``"512B"`` (a bare number is refused,
    like a duration without a unit)."""

    _UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
    _RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB)\s*$")

    @classmethod
    def parse(cls, value: object) -> Size:
        if isinstance(value, bool):
            raise ValueError('expected a size such as "64KiB"')
        if isinstance(value, int):
            raise ValueError(f'a size needs a unit: write "{value}B" or use KiB, MiB or GiB')
        if isinstance(value, str):
            m = cls._RE.match(value)
            if m:
                return cls(int(m.group(1)) * cls._UNITS[m.group(2)])
        raise ValueError(f"bad size {value!r} (use a whole number with B, KiB, MiB or GiB)")


class Address:
    """``host:port`` or ``[v6]:port``.  (A plain class: msgspec hands it to ``_dec_hook``.)"""

    __slots__ = ("host", "port")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Address) and (self.host, self.port) == (other.host, other.port)

    def __hash__(self) -> int:
        return hash((self.host, self.port))

    def __repr__(self) -> str:
        return f"Address({self.host!r}, {self.port})"

    @classmethod
    def parse(cls, value: object) -> Address:
        if not isinstance(value, str):
            raise ValueError('expected an address string "host:port"')
        m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)$", value) or re.match(
            r"^([A-Za-z0-9.\-_]+):(\d+)$", value
        )
        if not m:
            raise ValueError(f"bad address {value!r} (use host:port or [v6]:port)")
        host, port = m.group(1), int(m.group(2))
        if value.startswith("["):
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"bad IPv6 address {host!r}") from None
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} out of range")
        return cls(host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Network:
    """An IP network from ``trusted_proxies`` (``"10.0.0.0/8"`` or a single address)."""

    __slots__ = ("net",)

    def __init__(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
        self.net = net

    @classmethod
    def parse(cls, value: object) -> Network:
        if not isinstance(value, str):
            raise ValueError('expected a network string such as "10.0.0.0/8"')
        try:
            return cls(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ValueError(f"bad network {value!r}") from None


_PARSERS: dict[type, Any] = {
    Duration: Duration.parse,
    Size: Size.parse,
    Address: Address.parse,
    Network: Network.parse,
}


def _dec_hook(typ: type, obj: Any) -> Any:
    parse = _PARSERS.get(typ)
    if parse is None:
        raise NotImplementedError(typ)
    return parse(obj)


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ProxyConfig(_Section, frozen=True):
    workers: int = 1
    loop: Literal["asyncio", "uvloop", "trio"] = "asyncio"
    grace_period: Duration = Duration(10.0)  # SIGTERM: longest wait for in-flight work
    # Reload and logging (README "Reload", "Access log")
    pid_file: str | None = None  # written at start; `muxproxy reload` signals the pid in it
    access_log: str = "stdout"  # "stdout" | "stderr" | "off" | a file path
    log_format: Literal["json", "text"] = "json"  # access lines and the other log lines
    access_log_buffer: int = 10_000  # lines waiting for the writer; beyond: dropped, counted


class AdminConfig(_Section, frozen=True):
    listen: Address


class ListenerTLS(_Section, frozen=True):
    cert: str
    key: str
    # SNI names this certificate answers ("a.example", "*.b.example"); none: the default one
    names: tuple[str, ...] = ()


class Limits(_Section, frozen=True):
    max_header_bytes: Size = Size(64 * 1024)
    max_headers: int = 100
    max_uri_bytes: Size = Size(8 * 1024)
    max_body: Size = Size(1024**3)
    header_timeout: Duration = Duration(10.0)
    idle_timeout: Duration = Duration(60.0)
    body_timeout: Duration = Duration(30.0)  # no request-body progress for this long → 408
    send_timeout: Duration = Duration(60.0)  # a client that reads nothing for this long is dropped
    max_connections: int = 100_000
    # proxy_protocol listeners: the whole PROXY header must arrive within this (spec: ≥ 3 s)
    proxy_protocol_timeout: Duration = Duration(5.0)
    # After a refusal, read and drop what the client still sends (lingering close), up to:
    linger_bytes: Size = Size(256 * 1024)
    linger_timeout: Duration = Duration(2.0)
    # A field name with "_": refuse the request, drop the field, or forward it (README: Security)
    underscore_headers: Literal["reject", "drop", "allow"] = "reject"
    # Connections open at once from one true client address (per worker); None: no limit.
    max_connections_per_client: int | None = None
    # HTTP/2 clients (core/h2guard.py H2Limits; README "HTTP/2 clients")
    max_concurrent_streams: int = 100
    max_header_list_size: Size = Size(64 * 1024)  # decoded (HPACK bomb) and encoded
    initial_window: Size = Size(65535)  # stream receive window for request bodies
    max_resets_per_second: int = 100  # rapid reset (CVE-2023-44487)
    max_continuation_frames: int = 16  # per header block (CVE-2024-27316)
    max_settings_per_second: int = 20
    max_pings_per_second: int = 100
    max_priority_per_second: int = 100
    max_window_updates_per_second: int = 10_000
    max_empty_frames_per_second: int = 100
    # After GOAWAY(ENHANCE_YOUR_CALM): the longest the streams in flight may take to finish
    calm_timeout: Duration = Duration(5.0)


# The protocols a listener may speak to clients (ALPN ids "h2" and "http/1.1").
ClientProtocol = Literal["h2", "http1"]


class ListenerConfig(_Section, frozen=True):
    name: str
    listen: Address
    # One certificate, or several chosen by SNI: [{cert, key, names = [...]}, ...]
    tls: ListenerTLS | tuple[ListenerTLS, ...] | None = None
    trusted_proxies: tuple[Network, ...] = ()
    # Every connection starts with a PROXY protocol v1/v2 header, from a trusted_proxies peer
    proxy_protocol: bool = False
    # What the backend is told of the client (core/forwarded.py): X-Forwarded-For/-Proto/-Host,
    # the RFC 7239 Forwarded field, or both; trusted_proxies decide extend or replace for all.
    forwarded: Literal["x-forwarded", "rfc7239", "both"] = "x-forwarded"
    limits: Limits = Limits()
    # Path normalisation before routing (RFC 3986 §6.2.2, README "Paths"): "//" → "/", and
    # what %2F / %5C in a path do: refused with 400, kept escaped, or decoded.
    merge_slashes: bool = True
    escaped_slashes: Literal["keep", "reject", "decode"] = "reject"

    @property
    def certificates(self) -> tuple[ListenerTLS, ...]:
        """The TLS entries as a tuple, whichever form the file used."""
        if self.tls is None:
            return ()
        return self.tls if isinstance(self.tls, tuple) else (self.tls,)

    def tls_path(self, index: int) -> str:
        """The key path of one TLS entry, in the form the file used (for messages)."""
        return "tls" if isinstance(self.tls, ListenerTLS) else f"tls[{index}]"
    # TLS: the ALPN list offered, in order (default h2, http1); plain: "h2" is h2c with prior
    # knowledge, told apart by the connection preface (default http1 only).
    protocols: tuple[ClientProtocol, ...] | None = None

    @property
    def client_protocols(self) -> tuple[ClientProtocol, ...]:
        if self.protocols is not None:
            return self.protocols
        return ("h2", "http1") if self.tls is not None else ("http1",)


class ClusterTLS(_Section, frozen=True):
    verify: bool = True
    ca: str | None = None
    server_name: str | None = None


class HealthConfig(_Section, frozen=True):
    path: str = "/healthz"
    interval: Duration = Duration(5.0)
    timeout: Duration = Duration(2.0)


class ClusterConfig(_Section, frozen=True):
    name: str
    backends: tuple[Address, ...]
    protocol: Literal["h2c", "h2", "h3", "http1"] = "h2c"
    connections: int = 4
    max_connections: int | None = None
    balance: Literal["round_robin", "least_streams"] = "least_streams"
    max_pending: int = 10_000
    pending_timeout: Duration = Duration(5.0)
    connect_timeout: Duration = Duration(2.0)
    request_timeout: Duration = Duration(30.0)
    tunnel_idle_timeout: Duration = Duration(3600.0)
    stream_window: Size = Size(256 * 1024)  # per-stream receive window W (DESIGN.md §3)
    max_streams_per_connection: int = 1000  # our own cap, below the backend's if it is lower
    max_replays: int = 2
    replay_buffer: Size = Size(64 * 1024)
    ping_interval: Duration = Duration(30.0)  # PING after this long without a frame
    ping_timeout: Duration = Duration(10.0)  # no PING ACK within it: the connection is dead
    eject_after: int = 3  # consecutive connect failures / protocol errors that eject a backend
    # h3 only: a stream whose client leaves more than stream_window unread for this long is
    # reset (QUIC windows grow on arrival, so this is the bound on a slow client's memory).
    slow_client_timeout: Duration = Duration(10.0)
    tls: ClusterTLS = ClusterTLS()
    health: HealthConfig | None = None
    # Backends written as DNS names (README "Backend discovery"): re-resolved every
    # resolve_interval; an empty answer (NXDOMAIN, no records) removes the name's addresses
    # only after resolve_hold; resolver is the DNS server ("ip:port"; default: resolv.conf).
    resolve_interval: Duration = Duration(30.0)
    resolve_hold: Duration = Duration(60.0)
    resolver: Address | None = None

    @property
    def connection_cap(self) -> int:
        return self.connections if self.max_connections is None else self.max_connections


class WeightedCluster(_Section, frozen=True):
    name: str
    weight: int = 1


class HeaderRulesConfig(_Section, frozen=True):
    set: dict[str, str] = {}
    add: dict[str, str] = {}
    remove: tuple[str, ...] = ()


class RedirectConfig(_Section, frozen=True):
    to: str  # a template: "https://{host}{path}"
    status: int = 308


class RespondConfig(_Section, frozen=True):
    status: int = 200
    body: str = ""
    content_type: str = "text/plain; charset=utf-8"


class RateLimitConfig(_Section, frozen=True):
    requests: int  # tokens per `per`, per client address, per worker
    per: Duration = Duration(1.0)
    burst: int | None = None  # bucket size; default `requests`
    max_clients: int = 100_000  # LRU cap on the client addresses remembered


class RouteConfig(_Section, frozen=True):
    # Exactly one of cluster, clusters, redirect, respond says where the request goes.
    cluster: str = ""
    clusters: tuple[WeightedCluster, ...] = ()
    sticky: str | None = None  # "header:NAME" or "client_ip"; with `clusters`
    name: str = ""  # for logs and {route}; default "routes[i]"
    # Match: all given conditions must hold.
    host: str = "*"
    path_prefix: str = "/"
    path_exact: str | None = None
    path_regex: str | None = None  # Python re, anchored at both ends
    methods: tuple[str, ...] = ()
    headers: dict[str, str] = {}  # name = "value" (exact) or "~regex"
    query: dict[str, str] = {}
    # Rewrite, after path normalisation.
    strip_prefix: str | None = None
    prefix_rewrite: str | None = None  # replaces the matched path_prefix
    host_rewrite: str | None = None  # sets :authority
    request_headers: HeaderRulesConfig | None = None
    response_headers: HeaderRulesConfig | None = None
    redirect: RedirectConfig | None = None
    respond: RespondConfig | None = None
    # Overrides of the cluster's / listener's values.
    request_timeout: Duration | None = None
    max_body: Size | None = None
    max_replays: int | None = None
    rate_limit: RateLimitConfig | None = None
    websocket: bool = False
    websocket_fallback_http1: bool = False

    def cluster_names(self) -> tuple[str, ...]:
        """Every cluster this route may send a request to."""
        return (self.cluster,) if self.cluster else tuple(c.name for c in self.clusters)


class Config(_Section, frozen=True):
    listeners: tuple[ListenerConfig, ...]
    clusters: tuple[ClusterConfig, ...]
    routes: tuple[RouteConfig, ...]
    proxy: ProxyConfig = ProxyConfig()
    admin: AdminConfig | None = None
    source: str = "<string>"  # where the config came from, for messages

    def cluster(self, name: str) -> ClusterConfig:
        for c in self.clusters:
            if c.name == name:
                return c
        raise KeyError(name)


_HOST_RE = re.compile(r"^(\*|\*\.[a-z0-9.\-]+|[a-z0-9.\-]+|\[[0-9a-f:.]+\])$")


_H2_LIMITS = (
    "max_concurrent_streams",
    "initial_window",
    "max_resets_per_second",
    "max_continuation_frames",
    "max_settings_per_second",
    "max_pings_per_second",
    "max_priority_per_second",
    "max_window_updates_per_second",
    "max_empty_frames_per_second",
)


def _check(cfg: Config) -> None:
    """Cross-field rules that a type cannot express; raise ConfigError naming the key."""

    def fail(path: str, msg: str) -> None:
        raise ConfigError(f"{path}: {msg}")

    if not cfg.listeners:
        fail("listeners", "at least one [[listeners]] is required")
    if not cfg.clusters:
        fail("clusters", "at least one [[clusters]] is required")
    if not cfg.routes:
        fail("routes", "at least one [[routes]] is required")
    if cfg.proxy.workers < 1:
        fail("proxy.workers", "must be at least 1")
    if cfg.proxy.access_log_buffer < 1:
        fail("proxy.access_log_buffer", "must be at least 1")
    if not cfg.proxy.access_log:
        fail("proxy.access_log", 'must be "stdout", "stderr", "off" or a file path')
    if cfg.proxy.pid_file == "":
        fail("proxy.pid_file", "must be a file path")
    if cfg.proxy.workers > 1:
        for i, lst in enumerate(cfg.listeners):
            if lst.listen.port == 0:
                fail(f"listeners[{i}].listen", "port 0 cannot be shared by several workers")
    seen: set[str] = set()
    for i, lst in enumerate(cfg.listeners):
        if lst.name in seen:
            fail(f"listeners[{i}].name", f"duplicate listener name {lst.name!r}")
        seen.add(lst.name)
        lim = lst.limits
        for key in ("max_header_bytes", "max_headers", "max_uri_bytes", "max_connections"):
            if getattr(lim, key) < 1:
                fail(f"listeners[{i}].limits.{key}", "must be at least 1")
        if lim.max_connections_per_client is not None and lim.max_connections_per_client < 1:
            fail(f"listeners[{i}].limits.max_connections_per_client", "must be at least 1")
        for key in (
            "header_timeout",
            "idle_timeout",
            "body_timeout",
            "send_timeout",
            "proxy_protocol_timeout",
            "calm_timeout",
        ):
            if getattr(lim, key) <= 0:
                fail(f"listeners[{i}].limits.{key}", "must be more than 0")
        _check_listener_tls(lst, f"listeners[{i}]", fail)
        if lst.proxy_protocol and not lst.trusted_proxies:
            fail(
                f"listeners[{i}].proxy_protocol",
                "needs trusted_proxies: the peers allowed to send a PROXY header",
            )
        for key in _H2_LIMITS:
            if getattr(lim, key) < 1:
                fail(f"listeners[{i}].limits.{key}", "must be at least 1")
        if lim.initial_window > 2**31 - 1:
            fail(f"listeners[{i}].limits.initial_window", "must be at most 2147483647")
        if lim.max_header_list_size < 1024:
            fail(f"listeners[{i}].limits.max_header_list_size", "must be at least 1KiB")
        if lst.protocols is not None:
            if not lst.protocols:
                fail(f"listeners[{i}].protocols", "must name at least one protocol")
            if len(set(lst.protocols)) != len(lst.protocols):
                fail(f"listeners[{i}].protocols", "names a protocol twice")
    _check_addresses(cfg, fail)
    names: set[str] = set()
    for i, c in enumerate(cfg.clusters):
        p = f"clusters[{i}]"
        if c.name in names:
            fail(f"{p}.name", f"duplicate cluster name {c.name!r}")
        names.add(c.name)
        if not c.backends:
            fail(f"{p}.backends", "at least one backend is required")
        if c.connections < 1:
            fail(f"{p}.connections", "must be at least 1")
        if c.max_connections is not None and c.max_connections < c.connections:
            fail(f"{p}.max_connections", f"must be at least connections ({c.connections})")
        if c.max_pending < 0:
            fail(f"{p}.max_pending", "cannot be negative")
        if not 1 <= c.max_streams_per_connection <= 2**31 - 1:
            fail(f"{p}.max_streams_per_connection", "must be between 1 and 2^31-1")
        if not 65535 <= c.stream_window <= 2**31 - 1:
            fail(f"{p}.stream_window", "must be between 64KiB-1 and 2GiB-1")
        if c.max_replays < 0:
            fail(f"{p}.max_replays", "cannot be negative")
        if c.eject_after < 1:
            fail(f"{p}.eject_after", "must be at least 1")
        if c.resolver is not None and not _is_ip(c.resolver.host):
            fail(f"{p}.resolver", "must be an IP address and port")
        for key in (
            "connect_timeout",
            "request_timeout",
            "pending_timeout",
            "ping_interval",
            "ping_timeout",
            "resolve_interval",
        ):
            if getattr(c, key) <= 0:
                fail(f"{p}.{key}", "must be more than 0")
    for i, r in enumerate(cfg.routes):
        _check_route(f"routes[{i}]", r, names, fail)


def _check_route(p: str, r: RouteConfig, names: set[str], fail: Any) -> None:
    targets = [k for k in ("cluster", "clusters", "redirect", "respond") if getattr(r, k)]
    if len(targets) != 1:
        fail(p, "needs exactly one of cluster, clusters, redirect or respond")
    if r.cluster and r.cluster not in names:
        fail(f"{p}.cluster", f"no cluster named {r.cluster!r}")
    for j, wc in enumerate(r.clusters):
        if wc.name not in names:
            fail(f"{p}.clusters[{j}].name", f"no cluster named {wc.name!r}")
        if wc.weight < 0:
            fail(f"{p}.clusters[{j}].weight", "cannot be negative")
    if r.clusters and sum(wc.weight for wc in r.clusters) < 1:
        fail(f"{p}.clusters", "the weights must add up to at least 1")
    if r.sticky is not None:
        if not r.clusters:
            fail(f"{p}.sticky", "only applies to weighted `clusters`")
        sticky_header = re.fullmatch(r"header:[A-Za-z0-9!#$%&'*+.^_`|~-]+", r.sticky)
        if r.sticky != "client_ip" and not sticky_header:
            fail(f"{p}.sticky", "use 'client_ip' or 'header:NAME'")
    if not _HOST_RE.match(r.host.lower()):
        fail(f"{p}.host", f"bad host pattern {r.host!r} (exact, '*.suffix' or '*')")
    for key in ("path_prefix", "path_exact", "strip_prefix", "prefix_rewrite"):
        v = getattr(r, key)
        if v is not None and not v.startswith("/"):
            fail(f"{p}.{key}", "must start with '/'")
    for key in ("path_prefix", "path_exact", "strip_prefix", "prefix_rewrite", "host_rewrite"):
        v = getattr(r, key)
        if v is not None and not _VISIBLE.fullmatch(v):
            fail(f"{p}.{key}", "may hold only visible ASCII characters")
    if r.strip_prefix is not None and r.prefix_rewrite is not None:
        fail(f"{p}.prefix_rewrite", "cannot be combined with strip_prefix")
    if r.host_rewrite is not None and not _HOST_RE.match(r.host_rewrite.lower().rsplit(":", 1)[0]):
        fail(f"{p}.host_rewrite", f"bad host {r.host_rewrite!r}")
    if r.path_regex is not None:
        try:
            re.compile(r.path_regex)
        except re.error as exc:
            fail(f"{p}.path_regex", f"not a valid regular expression: {exc}")
    for name, value in r.headers.items():
        if value.startswith("~"):
            try:
                re.compile(value[1:])
            except re.error as exc:
                fail(f"{p}.headers.{name}", f"not a valid regular expression: {exc}")
    for m in r.methods:
        if not re.fullmatch(r"[A-Z]+", m):
            fail(f"{p}.methods", f"bad method {m!r} (upper-case token such as 'GET')")
    for key in ("request_headers", "response_headers"):
        rules = getattr(r, key)
        if rules is not None:
            _check_header_rules(f"{p}.{key}", rules, fail)
    if r.redirect is not None:
        if r.redirect.status not in (301, 302, 303, 307, 308):
            fail(f"{p}.redirect.status", "must be one of 301, 302, 303, 307, 308")
        _check_template(f"{p}.redirect.to", r.redirect.to, fail)
    if r.respond is not None and not 200 <= r.respond.status <= 599:
        fail(f"{p}.respond.status", "must be between 200 and 599")
    if r.max_replays is not None and r.max_replays < 0:
        fail(f"{p}.max_replays", "cannot be negative")
    if r.request_timeout is not None and r.request_timeout <= 0:
        fail(f"{p}.request_timeout", "must be more than 0")
    rl = r.rate_limit
    if rl is not None:
        if rl.requests < 1:
            fail(f"{p}.rate_limit.requests", "must be at least 1")
        if rl.per <= 0:
            fail(f"{p}.rate_limit.per", "must be more than 0")
        if rl.burst is not None and rl.burst < 1:
            fail(f"{p}.rate_limit.burst", "must be at least 1")
        if rl.max_clients < 1:
            fail(f"{p}.rate_limit.max_clients", "must be at least 1")


_VISIBLE = re.compile(r"[\x21-\x7e]*")
_FIELD_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_TEMPLATE_VARS = frozenset(("client_ip", "request_id", "route", "host", "path", "method", "scheme"))
# The fields the proxy owns: no header rule may name them (core/routing.OWNED_FIELDS).
_OWNED = frozenset(
    ("connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "host",
     "content-length")
)


def _check_template(p: str, template: str, fail: Any) -> None:
    if not re.fullmatch(r"[\x20-\x7e]*", template):
        fail(p, "may hold only printable ASCII characters")
    for var in re.findall(r"\{([^}]*)\}", template):
        if var not in _TEMPLATE_VARS:
            fail(p, f"unknown variable {{{var}}} (use {', '.join(sorted(_TEMPLATE_VARS))})")


def _check_header_rules(p: str, rules: HeaderRulesConfig, fail: Any) -> None:
    for kind, names in (("set", rules.set), ("add", rules.add), ("remove", rules.remove)):
        for name in names:
            low = name.lower()
            if not _FIELD_NAME.fullmatch(low):
                fail(f"{p}.{kind}", f"bad field name {name!r}")
            if low in _OWNED:
                fail(f"{p}.{kind}", f"{name!r} is owned by the proxy and cannot be changed")
        if kind != "remove":
            assert isinstance(names, dict)
            for name, value in names.items():
                _check_template(f"{p}.{kind}.{name}", value, fail)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_listener_tls(lst: ListenerConfig, p: str, fail: Callable[[str, str], None]) -> None:
    certs = lst.certificates
    if isinstance(lst.tls, tuple) and not certs:
        fail(f"{p}.tls", "an empty list: give at least one {cert, key}")
    defaults = [i for i, t in enumerate(certs) if not t.names]
    if len(defaults) > 1:
        fail(f"{p}.tls[{defaults[1]}].names", "only one certificate may be the default (no names)")
    seen: set[str] = set()
    for i, t in enumerate(certs):
        for j, name in enumerate(t.names):
            where = f"{p}.{lst.tls_path(i)}.names[{j}]"
            low = name.lower()
            if not _SNI_RE.match(low):
                fail(where, f"bad server name {name!r} (exact or '*.suffix')")
            if low in seen:
                fail(where, f"{name!r} is named by two certificates")
            seen.add(low)


_SNI_RE = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9\-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9\-]*[a-z0-9])?)*$")
_WILDCARD_HOSTS = {"0.0.0.0": 4, "": 0, "::": 0, "*": 0}  # 4: every IPv4; 0: every address


def _overlap(a: Address, b: Address) -> bool:
    """Would binding both in one process fail (same port, same or wildcard host)?"""
    if a.port != b.port or a.port == 0:
        return False
    if a.host == b.host:
        return True
    for x, y in ((a, b), (b, a)):
        kind = _WILDCARD_HOSTS.get(x.host)
        if kind == 0:
            return True
        if kind == 4 and ":" not in y.host:
            return True
    return False


def _check_addresses(cfg: Config, fail: Callable[[str, str], None]) -> None:
    """Two listen addresses that cannot both be bound (the admin port included)."""
    addrs = [(f"listeners[{i}].listen", lst.listen) for i, lst in enumerate(cfg.listeners)]
    if cfg.admin is not None:
        addrs.append(("admin.listen", cfg.admin.listen))
    for n, (path, addr) in enumerate(addrs):
        for other_path, other in addrs[:n]:
            if _overlap(addr, other):
                fail(path, f"{addr} overlaps {other_path} ({other}): one port, one listener")


def _path(msgspec_path: str) -> str:
    """``$.routes[2].cluster`` → ``routes[2].cluster``."""
    return msgspec_path.removeprefix("$").removeprefix(".")


def loads(text: str, source: str = "<string>") -> Config:
    """Parse and validate a TOML document.

    Raises:
        ConfigError: with a one-line message naming the key path at fault.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"TOML syntax error: {exc}") from None
    raw["source"] = source
    try:
        cfg = msgspec.convert(raw, type=Config, dec_hook=_dec_hook, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(_format_validation(str(exc))) from None
    _check(cfg)
    return cfg


def _format_validation(msg: str) -> str:
    # msgspec: "Object contains unknown field `foo` - at `$.routes[0]`"
    m = re.match(r"^(.*?)(?: - at `([^`]*)`)?$", msg, re.S)
    assert m is not None
    what, where = m.group(1), _path(m.group(2) or "$")
    unknown = re.match(r"Object contains unknown field `([^`]*)`", what)
    if unknown:
        key = f"{where}.{unknown.group(1)}" if where else unknown.group(1)
        return f"{key}: unknown key"
    missing = re.match(r"Object missing required field `([^`]*)`", what)
    if missing:
        key = f"{where}.{missing.group(1)}" if where else missing.group(1)
        return f"{key}: required key is missing"
    if what.startswith("Invalid enum value"):
        choices = _choices(where)
        if choices:
            what += f" (use one of: {', '.join(map(repr, choices))})"
    return f"{where or '(top level)'}: {what}"


def _choices(path: str) -> tuple[object, ...]:
    """The allowed values of the Literal-typed key at ``path`` (``clusters[0].protocol``)."""
    typ: Any = Config
    for part in re.sub(r"\[\d+\]", "", path).split("."):
        hints = get_type_hints(typ) if isinstance(typ, type) else {}
        if part not in hints:
            return ()
        typ = hints[part]
        while get_origin(typ) is not None and get_origin(typ) is not Literal:
            args = [a for a in get_args(typ) if a is not type(None) and a is not Ellipsis]
            typ = args[0] if args else None
    return get_args(typ) if get_origin(typ) is Literal else ()


def load(path: str | Path) -> Config:
    """Read, parse and validate a TOML file.

    Raises:
        ConfigError: the file cannot be read or is invalid; the message names the key path.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    return loads(text, source=str(p))
