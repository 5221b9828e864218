"""Which process-shaping keys a reload applies, and how, per role (io/reload_scope.py)."""

from __future__ import annotations

import pytest

from muxproxy.config import Config, loads
from muxproxy.io.reload_scope import Action, Role, applied, plan, settings


def cfg(proxy: str = "", admin: str = "") -> Config:
    return loads(
        f"[proxy]\n{proxy}\n{admin}\n"
        '[[listeners]]\nname = "e"\nlisten = "127.0.0.1:8080"\n'
        '[[clusters]]\nname = "a"\nbackends = ["127.0.0.1:9"]\n[[routes]]\ncluster = "a"\n'
    )


ADMIN = '[admin]\nlisten = "127.0.0.1:9901"\n'
ADMIN2 = '[admin]\nlisten = "127.0.0.1:9902"\n'

# (what changes: old, new) → the action for single / supervisor / worker (None: nothing)
CASES = [
    ("workers", cfg("workers = 2"), cfg("workers = 4"), Action.RESTART, Action.RESHAPE, None),
    ("loop", cfg('loop = "asyncio"'), cfg('loop = "trio"'), Action.RESTART, Action.ROLL, None),
    ("admin added", cfg(), cfg(admin=ADMIN), Action.IN_PLACE, Action.REBIND, None),
    ("admin moved", cfg(admin=ADMIN), cfg(admin=ADMIN2), Action.IN_PLACE, Action.REBIND, None),
    ("admin removed", cfg(admin=ADMIN), cfg(), Action.IN_PLACE, Action.REBIND, None),
    (
        "pid_file",
        cfg('pid_file = "/run/a.pid"'),
        cfg('pid_file = "/run/b.pid"'),
        Action.RESTART,
        Action.RESTART,
        None,
    ),
    (
        "log_format",
        cfg('log_format = "json"'),
        cfg('log_format = "text"'),
        Action.RELOG,
        Action.RELOG,
        Action.RELOG,
    ),
    # What Proxy.reload swaps by itself is none of this module's business.
    ("grace_period", cfg('grace_period = "1s"'), cfg('grace_period = "9s"'), None, None, None),
    ("access_log", cfg('access_log = "off"'), cfg(), None, None, None),
    ("unchanged", cfg(admin=ADMIN), cfg(admin=ADMIN), None, None, None),
]


@pytest.mark.parametrize(
    ("what", "old", "new", "single", "supervisor", "worker"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_table(
    what: str,
    old: Config,
    new: Config,
    single: Action | None,
    supervisor: Action | None,
    worker: Action | None,
) -> None:
    expected: dict[Role, Action | None] = {
        "single": single,
        "supervisor": supervisor,
        "worker": worker,
    }
    for role, action in expected.items():
        got = [c.action for c in plan(settings(old), new, role)]
        assert got == ([] if action is None else [action]), (what, role, got)


def test_a_loop_given_on_the_command_line_is_not_the_files() -> None:
    old, new = cfg('loop = "asyncio"'), cfg('loop = "trio"')
    assert plan(settings(old, "uvloop"), new, "single", loop_override="uvloop") == []
    assert plan(settings(old, "uvloop"), new, "supervisor", loop_override="uvloop") == []


def test_lines_name_the_key_and_both_values() -> None:
    changes = plan(settings(cfg("workers = 2", ADMIN)), cfg('workers = 3\nloop = "trio"'), "single")
    assert [c.line() for c in changes] == [
        "proxy.workers: 2 -> 3: not applied until a restart",
        "proxy.loop: asyncio -> trio: not applied until a restart",
        "admin: 127.0.0.1:9901 -> off: applied by the proxy's own reload",
    ]


def test_several_changes_keep_the_table_order() -> None:
    old = cfg('workers = 2\nloop = "asyncio"\nlog_format = "json"', ADMIN)
    new = cfg('workers = 3\nloop = "trio"\nlog_format = "text"', ADMIN2)
    assert [(c.key, c.action) for c in plan(settings(old), new, "supervisor")] == [
        ("proxy.workers", Action.RESHAPE),
        ("proxy.loop", Action.ROLL),
        ("admin", Action.REBIND),
        ("proxy.log_format", Action.RELOG),
    ]


def test_a_key_waiting_for_a_restart_is_named_at_every_reload_until_the_file_agrees() -> None:
    """What runs, not the last file read, is compared: workers 1 → 2 (not applied) is said
    again at the next reload, and going back to 1 says nothing."""
    started = settings(cfg())
    two, text = cfg("workers = 2"), cfg('log_format = "text"')
    first = plan(started, two, "single")
    assert [c.line() for c in first] == ["proxy.workers: 1 -> 2: not applied until a restart"]
    in_force = applied(started, first)
    assert in_force == started
    assert [c.key for c in plan(in_force, two, "single")] == ["proxy.workers"]
    assert plan(in_force, cfg(), "single") == []
    relog = plan(in_force, text, "single")
    assert applied(in_force, relog)["proxy.log_format"] == "text"
