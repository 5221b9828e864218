"""core/addrset.py: what a DNS answer does to a backend name's address set."""

from __future__ import annotations

from muxproxy.core.addrset import AddressSet, Change, merge


def test_first_answer_adds_everything_sorted() -> None:
    s = AddressSet(hold=10)
    assert s.answered(["10.0.0.2", "10.0.0.1", "10.0.0.2"], now=0) == Change(
        added=("10.0.0.1", "10.0.0.2")
    )
    assert s.addresses == ("10.0.0.1", "10.0.0.2")


def test_new_and_vanished_addresses() -> None:
    s = AddressSet(hold=10)
    s.answered(["a", "b"], now=0)
    assert s.answered(["b", "c"], now=1) == Change(added=("c",), removed=("a",))
    assert s.answered(["c", "b"], now=2) == Change()  # order alone is no change
    assert not s.answered(["b", "c"], now=3)


def test_failure_keeps_the_last_good_set_indefinitely() -> None:
    s = AddressSet(hold=10)
    s.answered(["a"], now=0)
    for _ in range(100):
        assert not s.failed()
    assert s.addresses == ("a",)
    assert s.failures == 100
    s.answered(["a"], now=1000)
    assert s.failures == 0


def test_empty_answer_removes_only_after_the_hold() -> None:
    s = AddressSet(hold=10)
    s.answered(["a", "b"], now=0)
    assert not s.answered([], now=5)  # the hold starts
    assert s.holding and s.addresses == ("a", "b")
    assert not s.answered([], now=14.9)
    assert s.answered([], now=15) == Change(removed=("a", "b"))
    assert s.addresses == () and not s.holding


def test_an_answer_with_addresses_ends_the_hold() -> None:
    s = AddressSet(hold=10)
    s.answered(["a"], now=0)
    s.answered([], now=1)
    assert s.answered(["b"], now=2) == Change(added=("b",), removed=("a",))
    assert not s.holding
    assert not s.answered([], now=3)  # a new hold, from 3
    assert not s.answered([], now=12)
    assert s.answered([], now=13) == Change(removed=("b",))


def test_empty_when_nothing_was_known_is_no_change() -> None:
    s = AddressSet(hold=0)
    assert not s.answered([], now=0)
    assert s.resolved_once and not s.holding


def test_zero_hold_removes_at_once() -> None:
    s = AddressSet(hold=0)
    s.answered(["a"], now=0)
    assert s.answered([], now=0) == Change(removed=("a",))


def test_merge_keeps_order_and_drops_duplicates() -> None:
    assert merge(["x", "y"], [["b", "a"], ["y", "c"]]) == ["x", "y", "b", "a", "c"]
    assert merge([], []) == []
