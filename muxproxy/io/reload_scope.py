"""What a reload does with the keys that shape the process, not the traffic.

``Proxy.reload`` swaps listeners, routes, clusters, certificates and the access log inside one
event loop.  A few keys are about the process tree around it: how many worker processes, which
event loop runs them, where the admin port is, where the pid file is, how log lines look.
:func:`plan` decides, from what runs, the file just read and the role of the process that got
SIGHUP, what each changed key needs; the CLI (single process, worker) and the supervisor
carry it out.

=====================  ==========================  ==================================  ========
key                    single process              supervisor (``workers > 1``)        worker
=====================  ==========================  ==================================  ========
``proxy.workers``      restart                     reshape: start or drain workers     –
``proxy.loop``         restart                     roll: replace the workers one by    –
                                                   one (new one ready, old one drains)
``admin``              in place (Proxy.reload      rebind: the supervisor's admin      –
                       binds the new address)      port moves (workers keep theirs)
``proxy.pid_file``     restart                     restart                             –
``proxy.log_format``   relog                       relog                               relog
=====================  ==========================  ==================================  ========

"restart" is one log line per key, ``KEY: OLD -> NEW: not applied until a restart``; "–":
the supervisor's business, so a worker says nothing.  ``proxy.loop`` overridden by ``--loop``
is not in force: changing it in the file changes nothing and says nothing.  A single process
cannot become a supervisor in place (its listening sockets were not opened for sharing), and
a pid file that moves would leave ``muxproxy reload`` of the old file pointing nowhere, so
those two wait for a restart.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from ..config import Config

__all__ = ["Action", "Change", "Role", "applied", "plan", "settings"]

Role = Literal["single", "supervisor", "worker"]


class Action(enum.Enum):
    IN_PLACE = "applied by the proxy's own reload"
    RESHAPE = "workers started or drained to match"
    ROLL = "every worker replaced, one at a time"
    REBIND = "the admin port moves"
    RELOG = "log lines take the new format"
    RESTART = "not applied until a restart"


@dataclass(frozen=True)
class Change:
    """One changed key and what it needs."""

    key: str
    old: str
    new: str
    action: Action

    def line(self) -> str:
        """The log line for it: ``proxy.workers: 2 -> 4: not applied until a restart``."""
        return f"{self.key}: {self.old} -> {self.new}: {self.action.value}"


# key → action, per role; a key missing from a role's row is not that process's business.
_TABLE: dict[str, dict[Role, Action]] = {
    "proxy.workers": {"single": Action.RESTART, "supervisor": Action.RESHAPE},
    "proxy.loop": {"single": Action.RESTART, "supervisor": Action.ROLL},
    "admin": {"single": Action.IN_PLACE, "supervisor": Action.REBIND},
    "proxy.pid_file": {"single": Action.RESTART, "supervisor": Action.RESTART},
    "proxy.log_format": {
        "single": Action.RELOG,
        "supervisor": Action.RELOG,
        "worker": Action.RELOG,
    },
}


def settings(cfg: Config, loop_override: str | None = None) -> dict[str, str]:
    """The process-shaping keys of a config, as text (what :func:`plan` compares)."""
    p = cfg.proxy
    return {
        "proxy.workers": str(p.workers),
        "proxy.loop": loop_override or p.loop,
        "admin": str(cfg.admin.listen) if cfg.admin is not None else "off",
        "proxy.pid_file": p.pid_file or "none",
        "proxy.log_format": p.log_format,
    }


def plan(
    in_force: dict[str, str], new: Config, role: Role, loop_override: str | None = None
) -> list[Change]:
    """The process-shaping keys that differ between ``in_force`` and ``new``, each with what the
    process in ``role`` must do about it (in the order of the table above).  ``in_force`` is
what the process runs (:func:`settings` of the config it started with, updated by
:func:`applied`): a key that waits for a restart is named again at every reload until the
file agrees with what runs."""
    after = settings(new, loop_override)
    out: list[Change] = []
    for key, actions in _TABLE.items():
        action = actions.get(role)
        if action is not None and in_force[key] != after[key]:
            out.append(Change(key, in_force[key], after[key], action))
    return out


def applied(in_force: dict[str, str], changes: list[Change]) -> dict[str, str]:
    """What runs after ``changes`` were carried out (the restart-only ones were not)."""
    return in_force | {c.key: c.new for c in changes if c.action is not Action.RESTART}
