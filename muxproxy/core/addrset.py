"""The address set behind one DNS name, and how an answer changes it, pure.

Theory of operation
-------------------
A backend written as a DNS name (``"app.default.svc.cluster.local:8080"``) stands for every
address the name resolves to (Envoy's STRICT_DNS).  The resolving loop (io/discovery.py) asks
the name's DNS server every ``resolve_interval`` and reports each outcome here; this module
decides what the pool's backend set becomes, and says what was added and what removed:

* **An answer with addresses** replaces the set: new addresses are added (the pool opens their
  ``connections``), vanished ones removed (the pool drains them: no new streams, in-flight
  ones finish).
* **A failure** (timeout, SERVFAIL, refused, no server): the last good set stays, however
  long it lasts; a DNS outage must not take the backends away.
* **An empty answer** (NXDOMAIN or no records): deployments briefly go to zero endpoints
  (a rollout, a headless Service in flux), so the set stays for ``hold`` seconds after the
  first empty answer and is emptied only if the name is still empty then.  Any answer with
  addresses ends the hold.

Addresses are opaque strings (the IPs); order in an answer is irrelevant (the set is kept
sorted, so "changed" means the set changed, not DNS round-robin order).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["AddressSet", "Change", "merge"]


@dataclass(frozen=True, slots=True)
class Change:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


NO_CHANGE = Change()

T = TypeVar("T")


class AddressSet:
    """The current addresses of one name; feed it every resolution outcome."""

    __slots__ = ("addresses", "empty_since", "failures", "hold", "resolved_once")

    def __init__(self, hold: float) -> None:
        self.hold = hold
        self.addresses: tuple[str, ...] = ()
        self.empty_since: float | None = None  # first of a run of empty answers
        self.failures = 0  # consecutive failed resolutions
        self.resolved_once = False  # some answer (empty or not) arrived

    def answered(self, addresses: Iterable[str], now: float) -> Change:
        """The server answered (an empty iterable for NXDOMAIN or no records)."""
        self.failures = 0
        self.resolved_once = True
        new = tuple(sorted(set(addresses)))
        if not new:
            if not self.addresses:
                return NO_CHANGE
            if self.empty_since is None:
                self.empty_since = now
            if now - self.empty_since < self.hold:
                return NO_CHANGE
        self.empty_since = None
        old = set(self.addresses)
        change = Change(
            added=tuple(a for a in new if a not in old),
            removed=tuple(a for a in self.addresses if a not in set(new)),
        )
        self.addresses = new
        return change

    def failed(self) -> Change:
        """No usable answer (timeout, SERVFAIL, ...): keep the last good set."""
        self.failures += 1
        return NO_CHANGE

    @property
    def holding(self) -> bool:
        """Empty answers are being ignored for now (the hold is running)."""
        return self.empty_since is not None


def merge(static: Iterable[T], resolved: Iterable[Iterable[T]]) -> list[T]:
    """The backend list of a cluster: its literal addresses, then every resolved one, in
    order, each once (a name may resolve to a literal backend too)."""
    seen: dict[T, None] = {}
    for a in static:
        seen.setdefault(a, None)
    for group in resolved:
        for a in group:
            seen.setdefault(a, None)
    return list(seen)
