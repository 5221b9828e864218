"""TunnelCore as tables: each scenario is a trace of inputs (with an explicit ``now``) and the
exact actions each must give, the way h11 tests its state machine."""

from __future__ import annotations

from typing import Any

import pytest

from muxproxy.core.relay import StreamState
from muxproxy.core.tunnel import (
    Action,
    ArmDeadline,
    CloseClient,
    CreditBackend,
    EndBackend,
    ResetBackend,
    SendToBackend,
    TunnelCore,
    WriteToClient,
)

from .wsframe import TEXT, close, frame

IDLE, SEND = 100.0, 10.0

# What each side sends: the client masks its frames, the backend does not.
C_MSG = frame(TEXT, b"hello", masked=True)
C_CLOSE = close(1000, masked=True)
B_MSG = frame(TEXT, b"world")
B_CLOSE = close(1000)

Step = tuple[tuple[Any, ...], list[Action]]

Arm, Send, Write = ArmDeadline, SendToBackend, WriteToClient
Credit, Reset = CreditBackend, ResetBackend
END, CLOSE, ABORT = EndBackend(), CloseClient(), CloseClient(abort=True)

SCENARIOS: dict[str, list[Step]] = {
    # --- relaying and backpressure ------------------------------------------------------
    "client bytes go out as the window allows": [
        (("client_data", C_MSG + C_MSG, 1.0), [Arm(101.0)]),
        (("window_opened", 5, 1.0), [Send(C_MSG[:5])]),
        (("window_opened", 0, 1.5), []),
        (("window_opened", 1000, 2.0), [Send(C_MSG[5:] + C_MSG)]),
        (("window_opened", 1000, 2.0), []),  # nothing left to send
    ],
    "backend bytes are acknowledged once written": [
        (("backend_data", [(B_MSG, len(B_MSG) + 9), (b"", 5)], 1.0), [Arm(101.0), Write(B_MSG)]),
        (("client_drained", 1.0), [Credit(len(B_MSG) + 14)]),
    ],
    "chunks are written as one": [
        (("backend_data", [(b"ab", 2), (b"cd", 2)], 1.0), [Arm(101.0), Write(b"abcd")]),
        (("client_drained", 1.0), [Credit(4)]),
    ],
    "credit of padding alone goes back at once": [
        (("backend_data", [(b"", 7)], 1.0), [Credit(7)]),
    ],
    "a stalled client holds the credit until it drains": [
        (("backend_data", [(b"x" * 100, 100)], 1.0), [Arm(101.0), Write(b"x" * 100)]),
        (("client_stalled", 1.0), [Arm(11.0)]),
        (("backend_data", [(b"y", 1)], 2.0), [Write(b"y")]),  # the send deadline stays
        (("client_stalled", 2.0), []),
        (("backend_data", [(b"", 3)], 2.0), []),  # even padding waits behind the stall
        (("client_data", C_MSG, 3.0), []),  # client activity does not extend it either
        (("client_drained", 4.0), [Arm(104.0), Credit(104)]),
    ],
    # --- the close handshake ------------------------------------------------------------
    "close handshake, client first: reset once the backend's close is written": [
        (("client_data", C_CLOSE, 1.0), [Arm(101.0)]),
        (("window_opened", 100, 1.0), [Send(C_CLOSE)]),
        (
            ("backend_data", [(B_CLOSE, 4)], 2.0),
            [Arm(102.0), Write(B_CLOSE), Credit(4), Reset("tunnel_closed"), Arm(12.0)],
        ),
        (("client_drained", 2.0), [CLOSE]),
    ],
    "close handshake, backend first: reset once the client's close is sent": [
        (("backend_data", [(B_CLOSE, 4)], 1.0), [Arm(101.0), Write(B_CLOSE)]),
        (("client_drained", 1.0), [Credit(4)]),
        (("client_data", C_CLOSE, 2.0), [Arm(102.0)]),
        (("window_opened", 3, 2.0), [Send(C_CLOSE[:3])]),  # not until all of it is out
        (("window_opened", 100, 2.0), [Send(C_CLOSE[3:]), Reset("tunnel_closed"), CLOSE]),
    ],
    "close frames split across reads": [
        (("client_data", C_CLOSE[:1], 1.0), [Arm(101.0)]),
        (("window_opened", 100, 1.0), [Send(C_CLOSE[:1])]),
        (("backend_data", [(B_CLOSE, 4)], 1.0), [Arm(101.0), Write(B_CLOSE)]),
        (("client_drained", 1.0), [Credit(4)]),
        (("client_data", C_CLOSE[1:], 2.0), [Arm(102.0)]),
        (("window_opened", 100, 2.0), [Send(C_CLOSE[1:]), Reset("tunnel_closed"), CLOSE]),
    ],
    "a close frame's look-alike inside a payload does not count": [
        (("client_data", frame(TEXT, C_CLOSE, masked=True), 1.0), [Arm(101.0)]),
        (("window_opened", 100, 1.0), [Send(frame(TEXT, C_CLOSE, masked=True))]),
        (("backend_data", [(B_CLOSE, 4)], 1.0), [Arm(101.0), Write(B_CLOSE)]),
        (("client_drained", 1.0), [Credit(4)]),  # one way only: the tunnel stays
    ],
    # --- the client goes away -----------------------------------------------------------
    "client EOF without a close frame: reset at once": [
        (("client_data", C_MSG, 1.0), [Arm(101.0)]),
        (("window_opened", 100, 1.0), [Send(C_MSG)]),
        (("client_eof", 2.0), [Reset("client_gone"), CLOSE]),
    ],
    "client lost: reset at once, unacknowledged credit returned": [
        (("backend_data", [(B_MSG, 7)], 1.0), [Arm(101.0), Write(B_MSG)]),
        (("client_stalled", 1.0), [Arm(11.0)]),
        (("client_gone", 2.0), [Credit(7), Reset("client_gone"), CLOSE]),
    ],
    "client half-close after its close frame: END_STREAM, the answer still relayed": [
        (("client_data", C_CLOSE, 1.0), [Arm(101.0)]),
        (("window_opened", 100, 1.0), [Send(C_CLOSE)]),
        (("client_eof", 2.0), [END]),
        (("backend_data", [(B_MSG, 5)], 3.0), [Arm(103.0), Write(B_MSG)]),
        (("client_drained", 3.0), [Credit(5)]),
        (("backend_end", 4.0), [Reset("tunnel_closed"), CLOSE]),
    ],
    "EOF while bytes wait for window: acted on once they are out": [
        (("client_data", C_MSG + C_CLOSE, 1.0), [Arm(101.0)]),
        (("client_eof", 1.0), []),
        (("window_opened", 4, 2.0), [Send((C_MSG + C_CLOSE)[:4])]),
        (("window_opened", 100, 2.0), [Send((C_MSG + C_CLOSE)[4:]), END]),
    ],
    "EOF while bytes wait, no close frame: reset once they are out": [
        (("client_data", C_MSG, 1.0), [Arm(101.0)]),
        (("client_eof", 1.0), []),
        (("window_opened", 100, 2.0), [Send(C_MSG), Reset("client_gone"), CLOSE]),
    ],
    # --- the backend ends ---------------------------------------------------------------
    "backend ends: the client is closed": [
        (("backend_end", 1.0), [Reset("tunnel_closed"), CLOSE]),
    ],
    "backend resets: the client is closed": [
        (("backend_reset", 1.0), [Reset("backend_reset"), CLOSE]),
    ],
    "backend ends after data: closed once the data is out": [
        (("backend_data", [(B_MSG, 5)], 1.0), [Arm(101.0), Write(B_MSG)]),
        (("backend_end", 1.0), [Credit(5), Reset("tunnel_closed"), Arm(11.0)]),
        (("client_drained", 1.5), [CLOSE]),
    ],
    "backend ends while the client stalls: aborted after send_timeout": [
        (("backend_data", [(B_MSG, 5)], 1.0), [Arm(101.0), Write(B_MSG)]),
        (("client_stalled", 1.0), [Arm(11.0)]),
        (("backend_end", 2.0), [Credit(5), Reset("tunnel_closed"), Arm(12.0)]),
        (("tick", 11.0), [Arm(12.0)]),  # early: the deadline is re-armed
        (("tick", 12.0), [ABORT]),
    ],
    "a client lost while its last bytes wait is closed": [
        (("backend_data", [(B_MSG, 5)], 1.0), [Arm(101.0), Write(B_MSG)]),
        (("backend_end", 1.0), [Credit(5), Reset("tunnel_closed"), Arm(11.0)]),
        (("client_gone", 2.0), [CLOSE]),
    ],
    # --- deadlines ----------------------------------------------------------------------
    "idle: nothing moved either way for idle_timeout": [
        (("tick", 99.0), [Arm(100.0)]),
        (("tick", 100.0), [Reset("tunnel_idle"), CLOSE]),
    ],
    "activity either way moves the idle deadline": [
        (("client_data", C_MSG, 50.0), [Arm(150.0)]),
        (("window_opened", 100, 50.0), [Send(C_MSG)]),
        (("tick", 100.0), [Arm(150.0)]),
        (("backend_data", [(B_MSG, 5)], 120.0), [Arm(220.0), Write(B_MSG)]),
        (("client_drained", 120.0), [Credit(5)]),
        (("tick", 219.9), [Arm(220.0)]),
        (("tick", 220.0), [Reset("tunnel_idle"), CLOSE]),
    ],
    "a client that stops reading is dropped at send_timeout": [
        (("backend_data", [(B_MSG, 5)], 1.0), [Arm(101.0), Write(B_MSG)]),
        (("client_stalled", 1.0), [Arm(11.0)]),
        (("tick", 11.0), [Credit(5), Reset("send_timeout"), Arm(21.0)]),
        (("client_drained", 12.0), [CLOSE]),
    ],
    "shutdown: the proxy closes the tunnel": [
        (("client_data", C_MSG, 1.0), [Arm(101.0)]),
        (("close", 2.0), [Reset("draining"), CLOSE]),
    ],
    # --- once ended, nothing more happens ------------------------------------------------
    "after the end every input is ignored": [
        (("backend_reset", 1.0), [Reset("backend_reset"), CLOSE]),
        (("client_data", C_MSG, 2.0), []),
        (("window_opened", 100, 2.0), []),
        (("client_eof", 2.0), []),
        (("client_gone", 2.0), []),
        (("client_drained", 2.0), []),
        (("backend_data", [(B_MSG, 5)], 2.0), []),
        (("backend_end", 2.0), []),
        (("close", 2.0), []),
        (("tick", 500.0), []),
    ],
}


def new_core() -> TunnelCore:
    core = TunnelCore(IDLE, SEND)
    assert core.start(0.0) == [ArmDeadline(IDLE)]
    return core


@pytest.mark.parametrize("steps", list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_scenario(steps: list[Step]) -> None:
    core = new_core()
    for i, ((name, *args), expected) in enumerate(steps):
        got = getattr(core, name)(*args)
        assert got == expected, f"step {i}: {name}"


def test_reading_follows_the_window_and_the_end() -> None:
    core = new_core()
    assert core.reading and not core.wants_window
    core.client_data(C_MSG, 1.0)
    assert core.wants_window and not core.reading  # stop reading the client
    core.window_opened(3, 1.0)
    assert core.wants_window and not core.reading
    core.window_opened(100, 1.0)
    assert core.reading and not core.wants_window
    core.client_eof(2.0)
    assert not core.reading and core.finished and core.closed


def test_finished_then_closed_while_the_last_bytes_wait() -> None:
    core = new_core()
    core.backend_data([(B_MSG, 5)], 1.0)
    core.backend_end(1.0)
    assert core.finished and not core.closed and not core.reading
    assert core.reason == "tunnel_closed"
    core.client_drained(1.0)
    assert core.closed


def test_stream_news_takes_the_chunks_then_the_end() -> None:
    core = new_core()
    st = StreamState(1, chunks=[(B_MSG, 5), (b"", 2)])
    assert core.stream_news(st, 1.0) == [Arm(101.0), Write(B_MSG)]
    assert st.chunks == []
    assert core.stream_news(st, 1.0) == []  # nothing new
    assert core.client_drained(1.0) == [Credit(7)]
    st.chunks.append((B_MSG, 5))
    st.ended = True
    assert core.stream_news(st, 2.0) == [
        Arm(102.0),
        Write(B_MSG),
        Credit(5),
        Reset("tunnel_closed"),
        Arm(12.0),
    ]
    assert core.client_drained(2.0) == [CLOSE]


def test_stream_news_reset() -> None:
    core = new_core()
    st = StreamState(1, reset_code=8)
    assert core.stream_news(st, 1.0) == [Reset("backend_reset"), CLOSE]
    assert core.reason == "backend_reset"


def test_the_window_bounds_what_is_held_for_the_backend() -> None:
    """Credit never goes back before the client took the bytes: with a window W the proxy
    holds at most W of the backend's bytes, however many chunks arrive."""
    core = new_core()
    window, held = 1000, 0
    for i in range(5):
        out = core.backend_data([(b"z" * 200, 200)], float(i))
        assert Credit(200) not in out
        held += 200
        if i == 0:
            core.client_stalled(0.0)
    assert held <= window
    assert core.client_drained(5.0) == [Arm(105.0), Credit(1000)]


def test_slotted_and_small() -> None:
    core = new_core()
    assert not hasattr(core, "__dict__")
