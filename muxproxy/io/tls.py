"""A listener's certificates: one or several, chosen by the SNI name the client sends.

Every entry of ``[listeners].tls`` becomes its own :class:`ssl.SSLContext` (TLS 1.2 minimum,
ALPN ``http/1.1``).  The listener's handshakes all start on one *dispatch* context whose
``sni_callback`` switches the connection to the chosen entry's context: an exact name first,
then a ``*.suffix`` wildcard (one label, as certificates match), else the default entry (the
one without names, or the first).  The callback runs for clients without SNI too, so the
default applies to them.

:meth:`ServerCertificates.reload` re-reads every file and swaps the lookup tables in one
assignment; handshakes already under way keep the context they got.  A file that cannot be
read, or a certificate and key that do not load together, raises :class:`ConfigError` naming
the key path — the same line ``check``, ``run`` and a reload print.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from ..config import ConfigError, ListenerConfig, ListenerTLS

__all__ = ["ServerCertificates", "check_certificates"]


@dataclass(frozen=True, slots=True)
class _Table:
    exact: dict[str, ssl.SSLContext]
    wildcard: dict[str, ssl.SSLContext]  # "b.example" for "*.b.example"
    default: ssl.SSLContext


def alpn(lc: ListenerConfig) -> list[str]:
    """The ALPN ids offered, in the order of the listener's ``protocols``."""
    return ["http/1.1" if p == "http1" else p for p in lc.client_protocols]


def _context(entry: ListenerTLS, where: str, protocols: list[str]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(protocols)
    for key in ("cert", "key"):
        path = getattr(entry, key)
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise ConfigError(f"{where}.{key}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        ctx.load_cert_chain(entry.cert, entry.key)
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        raise ConfigError(
            f"{where}: certificate {entry.cert} and key {entry.key} do not load: {reason}"
        ) from None
    return ctx


def _table(lc: ListenerConfig, where: str) -> _Table:
    exact: dict[str, ssl.SSLContext] = {}
    wildcard: dict[str, ssl.SSLContext] = {}
    default: ssl.SSLContext | None = None
    for i, entry in enumerate(lc.certificates):
        ctx = _context(entry, f"{where}.{lc.tls_path(i)}", alpn(lc))
        if not entry.names and default is None:
            default = ctx
        for name in entry.names:
            name = name.lower()
            if name.startswith("*."):
                wildcard[name[2:]] = ctx
            else:
                exact[name] = ctx
    if default is None:  # every entry has names: the first is the default
        first = lc.certificates[0]
        default = exact.get(first.names[0].lower()) or wildcard[first.names[0].lower()[2:]]
    return _Table(exact, wildcard, default)


class ServerCertificates:
    """The certificates of one TLS listener; :attr:`context` is what the listener uses."""

    def __init__(self, lc: ListenerConfig, where: str) -> None:
        self.where = where  # "listeners[0]"
        self._lc = lc
        self._table = _table(lc, where)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(alpn(lc))
        # No certificate of its own: the callback runs for every ClientHello (SNI or not)
        # and switches the connection to the chosen entry's context before one is needed.
        ctx.sni_callback = self._pick
        self.context = ctx

    def reload(self, lc: ListenerConfig | None = None) -> None:
        """Re-read every certificate and key (of ``lc`` if given: a reloaded config).
        Raises ConfigError and keeps the current ones if any fails to load."""
        lc = lc or self._lc
        table = _table(lc, self.where)
        self._lc, self._table = lc, table

    def select(self, server_name: str | None) -> ssl.SSLContext:
        """The context for a client's SNI name (None: the client sent none)."""
        table = self._table
        if server_name:
            name = server_name.lower().rstrip(".")
            ctx = table.exact.get(name)
            if ctx is not None:
                return ctx
            _, dot, parent = name.partition(".")
            if dot:
                ctx = table.wildcard.get(parent)
                if ctx is not None:
                    return ctx
        return table.default

    def _pick(self, sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: object) -> None:
        sock.context = self.select(name)


def check_certificates(lc: ListenerConfig, where: str) -> None:
    """Load every certificate and key of a listener once; ConfigError if one fails."""
    if lc.tls is not None:
        _table(lc, where)
