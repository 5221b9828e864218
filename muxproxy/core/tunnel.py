"""One WebSocket tunnel's rules, sans-IO: every driver (callbacks, tasks, any backend) uses this.

Theory of operation
-------------------
After the ``101``, a tunnel is two byte streams and a set of rules about when and how it ends.
:class:`TunnelCore` holds the rules and the little state they need; a *driver* (one per way of
doing I/O, see ``muxproxy.io.detached`` and ``muxproxy.io.tunnel_tasks``) only moves bytes: it
feeds inputs in and carries out the actions that come back, in order.

Inputs (each takes ``now``, the clock of the proxy's timer wheel; nothing here reads a clock):

* client side: :meth:`~TunnelCore.client_data`, :meth:`~TunnelCore.client_eof`,
  :meth:`~TunnelCore.client_gone`, and after each :class:`WriteToClient` one report —
  :meth:`~TunnelCore.client_drained` (it all went out) or :meth:`~TunnelCore.client_stalled`
  (the client's buffer holds it; drained is reported later);
* backend side: :meth:`~TunnelCore.backend_data` (bytes with their flow-control length),
  :meth:`~TunnelCore.backend_end`, :meth:`~TunnelCore.backend_reset`, or all three at once from
  a :class:`~muxproxy.core.relay.StreamState` (:meth:`~TunnelCore.stream_news`: RFC 8441 over
  HTTP/2 and RFC 9220 over HTTP/3 share it), and :meth:`~TunnelCore.window_opened`;
* :meth:`~TunnelCore.tick` when the armed deadline passed, :meth:`~TunnelCore.close` when the
  proxy ends the tunnel (end of a shutdown's grace period).

The rules, decided here and nowhere else:

* **close handshake both ways** (close frames seen in both directions by two
  :class:`~muxproxy.core.websocket.FrameWatcher`, and the client's bytes all sent): reset the
  backend stream (RST_STREAM(CANCEL)): some backends forget a stream after its close without
  ending it;
* **client gone** (EOF before its close frame, or the connection lost): reset at once;
* **client half-close after its close frame**: end the backend stream (END_STREAM) and keep
  relaying the backend's answer;
* **backend ends or resets**: the client connection is closed (after what was written to it);
* **nothing moved either way** for ``idle_timeout``: both closed;
* **backpressure**: client bytes go out only as the stream's send window allows
  (:attr:`~TunnelCore.wants_window`, :attr:`~TunnelCore.reading`: the driver stops reading the
  client while bytes wait); backend bytes are acknowledged (:class:`CreditBackend`) only after
  they were written to the client, so a client that stops reading holds at most one stream
  window in the proxy, and is dropped ``send_timeout`` after it stopped taking bytes;
* **ending**: credit not yet given back is returned, the stream reset unless closed already,
  and the client closed once what was written to it is out (or aborted ``send_timeout`` later).

An idle WebSocket is most of what an edge proxy holds, so the object is slotted and small (two
frame watchers, a few fields).  Actions are small slotted records, compared by value in tests
(not frozen: a frozen dataclass costs twice as much to build, on every message).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .relay import StreamState
from .websocket import FrameWatcher

# --- actions ------------------------------------------------------------------------------


@dataclass(slots=True)
class SendToBackend:
    """Send ``data`` on the backend stream (it fits the window last offered)."""

    data: bytes


@dataclass(slots=True)
class EndBackend:
    """End the backend stream in the proxy's direction (END_STREAM; FIN for a socket)."""


@dataclass(slots=True)
class ResetBackend:
    """The tunnel is done with the backend stream: reset it with the protocol's CANCEL code
    (RST_STREAM(CANCEL), H3_REQUEST_CANCELLED; a socket is closed) unless it is closed both
    ways already.  ``reason`` is why the tunnel ended (a code of ``core.outcome.REASONS``)."""

    reason: str


@dataclass(slots=True)
class WriteToClient:
    """Write ``data`` to the client, then report ``client_drained`` or ``client_stalled``."""

    data: bytes


@dataclass(slots=True)
class CreditBackend:
    """``amount`` bytes of the stream's DATA were written to the client: acknowledge them."""

    amount: int


@dataclass(slots=True)
class CloseClient:
    """Close the client connection; ``abort`` when bytes written to it are still unsent."""

    abort: bool = False


@dataclass(slots=True)
class ArmDeadline:
    """Call :meth:`TunnelCore.tick` at ``when`` (replacing any earlier deadline)."""

    when: float


Action = (
    SendToBackend
    | EndBackend
    | ResetBackend
    | WriteToClient
    | CreditBackend
    | CloseClient
    | ArmDeadline
)

END_BACKEND = EndBackend()
CLOSE_CLIENT = CloseClient()

# Why a tunnel ended (codes of core.outcome.REASONS).
CLOSED_NORMALLY = "tunnel_closed"
IDLE = "tunnel_idle"
CLIENT_GONE = "client_gone"
SEND_TIMEOUT = "send_timeout"
BACKEND_RESET = "backend_reset"
DRAINING = "draining"

# State bits.
_EOF = 1  # the client half-closed (acted on once its pending bytes are out)
_ENDED = 2  # END_STREAM sent
_WRITING = 4  # a WriteToClient awaits its report
_STALLED = 8  # the client's buffer holds bytes: the send deadline runs
_LOST = 16  # the client connection is gone
_CLOSING = 32  # done with the backend; the client is closed once its bytes are out
_CLOSED = 64  # all done


class TunnelCore:
    """The state of one tunnel (see the module docstring)."""

    __slots__ = (
        "_down",
        "_pending",
        "_state",
        "_unacked",
        "_up",
        "deadline",
        "idle_timeout",
        "reason",
        "send_timeout",
    )

    def __init__(self, idle_timeout: float, send_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self.deadline = 0.0
        self.reason = ""  # why it ended, once it did
        self._up = FrameWatcher()  # client → backend
        self._down = FrameWatcher()  # backend → client
        self._pending = b""  # client bytes waiting for send window
        self._unacked = 0  # flow-control length written to the client, not yet acknowledged
        self._state = 0

    # --- what drivers read ---------------------------------------------------------------

    @property
    def wants_window(self) -> bool:
        """Client bytes wait for the stream's send window (offer it: :meth:`window_opened`)."""
        return bool(self._pending)

    @property
    def reading(self) -> bool:
        """The client may be read: nothing waits for window, no EOF, not ending."""
        return not self._pending and not self._state & (_EOF | _CLOSING | _CLOSED)

    @property
    def finished(self) -> bool:
        """Done with the backend (the client may still be taking its last bytes)."""
        return bool(self._state & (_CLOSING | _CLOSED))

    @property
    def closed(self) -> bool:
        return bool(self._state & _CLOSED)

    # --- inputs --------------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """The tunnel is open: the idle deadline starts."""
        self.deadline = now + self.idle_timeout
        return [ArmDeadline(self.deadline)]

    def client_data(self, data: bytes, now: float) -> list[Action]:
        """Bytes from the client; they go out through :meth:`window_opened`."""
        out: list[Action] = []
        if not self._state & (_CLOSING | _CLOSED):
            self._up.feed(data)
            self._pending += data
            self._touch(now, out)
        return out

    def window_opened(self, window: int, now: float) -> list[Action]:
        """``window`` bytes may be sent on the stream now."""
        pending = self._pending
        if window <= 0 or not pending or self._state & (_CLOSING | _CLOSED):
            return []
        self._pending = pending[window:]
        out: list[Action] = [SendToBackend(pending[:window] if window < len(pending) else pending)]
        if not self._pending:
            if self._state & _EOF:
                self._eof(now, out)
            elif self._up.closed and self._down.closed:
                self._finish(CLOSED_NORMALLY, now, out)
        return out

    def client_eof(self, now: float) -> list[Action]:
        """The client half-closed its connection."""
        out: list[Action] = []
        if not self._state & (_EOF | _CLOSING | _CLOSED):
            self._state |= _EOF
            if not self._pending:  # else acted on once the pending bytes are out
                self._eof(now, out)
        return out

    def client_gone(self, now: float) -> list[Action]:
        """The client connection was lost (reset, or an error writing to it)."""
        out: list[Action] = []
        state = self._state
        self._state = state | _LOST
        if state & _CLOSING:
            self._closed(False, out)
        elif not state & _CLOSED:
            self._finish(CLIENT_GONE, now, out)
        return out

    def client_drained(self, now: float) -> list[Action]:
        """What was written to the client went out: its credit goes back."""
        out: list[Action] = []
        state = self._state
        self._state = state & ~(_WRITING | _STALLED)
        if state & (_CLOSING | _CLOSED):
            if state & _CLOSING:
                self._closed(False, out)
            return out
        if state & _STALLED:
            self.deadline = now + self.idle_timeout
            out.append(ArmDeadline(self.deadline))
        if self._unacked:
            out.append(CreditBackend(self._unacked))
            self._unacked = 0
        return out

    def client_stalled(self, now: float) -> list[Action]:
        """The client did not take a write at once: it has ``send_timeout`` to drain it."""
        state = self._state
        if state & (_STALLED | _CLOSING | _CLOSED):
            return []
        self._state = state | _STALLED
        self.deadline = now + self.send_timeout
        return [ArmDeadline(self.deadline)]

    def backend_data(self, chunks: Iterable[tuple[bytes, int]], now: float) -> list[Action]:
        """DATA from the backend: ``(bytes, flow-control length)`` pairs, in order."""
        out: list[Action] = []
        if not self._state & (_CLOSING | _CLOSED):
            self._backend_data(chunks, now, out)
        return out

    def backend_end(self, now: float) -> list[Action]:
        """The backend ended the stream."""
        return self._finish(CLOSED_NORMALLY, now, [])

    def backend_reset(self, now: float) -> list[Action]:
        """The backend reset the stream, or its connection was lost."""
        return self._finish(BACKEND_RESET, now, [])

    def stream_news(self, st: StreamState, now: float) -> list[Action]:
        """What a backend connection's reader left on ``st``: its chunks (taken), then its end
        or reset."""
        out: list[Action] = []
        if self._state & (_CLOSING | _CLOSED):
            return out
        chunks = st.chunks
        if chunks:
            self._backend_data(chunks, now, out)
            chunks.clear()
        if st.ended:
            self._finish(CLOSED_NORMALLY, now, out)
        elif st.reset_code is not None:
            self._finish(BACKEND_RESET, now, out)
        return out

    def tick(self, now: float) -> list[Action]:
        """The armed deadline may have passed."""
        out: list[Action] = []
        state = self._state
        if state & _CLOSED:
            pass
        elif now < self.deadline:
            out.append(ArmDeadline(self.deadline))
        elif state & _CLOSING:
            self._closed(True, out)  # a client that never took its last bytes
        else:
            self._finish(SEND_TIMEOUT if state & _STALLED else IDLE, now, out)
        return out

    def close(self, now: float, reason: str = DRAINING) -> list[Action]:
        """The proxy ends the tunnel (a shutdown's grace period is over)."""
        return self._finish(reason, now, [])

    # --- internals: each appends its actions to ``out`` ---------------------------------------

    def _backend_data(
        self, chunks: Iterable[tuple[bytes, int]], now: float, out: list[Action]
    ) -> None:
        parts = []
        credit = 0
        feed = self._down.feed
        for data, n in chunks:
            credit += n
            if data:
                parts.append(data)
                feed(data)
        if parts:
            self._touch(now, out)
            out.append(WriteToClient(b"".join(parts) if len(parts) > 1 else parts[0]))
            self._state |= _WRITING
        self._unacked += credit
        if self._unacked and not self._state & (_WRITING | _STALLED):
            out.append(CreditBackend(self._unacked))  # nothing to write: acknowledge now
            self._unacked = 0
        if self._up.closed and self._down.closed and not self._pending:
            self._finish(CLOSED_NORMALLY, now, out)

    def _touch(self, now: float, out: list[Action]) -> None:
        """Activity moves the idle deadline, unless a send deadline runs (a client that sends
        but never reads is dropped at send_timeout all the same)."""
        if not self._state & _STALLED:
            self.deadline = now + self.idle_timeout
            out.append(ArmDeadline(self.deadline))

    def _eof(self, now: float, out: list[Action]) -> None:
        if self._up.closed:
            self._state |= _ENDED
            out.append(END_BACKEND)  # half-close after the close frame; the answer still comes
        else:
            self._finish(CLIENT_GONE, now, out)  # vanished without a close handshake

    def _finish(self, reason: str, now: float, out: list[Action]) -> list[Action]:
        state = self._state
        if state & (_CLOSING | _CLOSED):
            return out
        self.reason = reason
        self._pending = b""
        if self._unacked:
            out.append(CreditBackend(self._unacked))
            self._unacked = 0
        out.append(ResetBackend(reason))
        if state & (_WRITING | _STALLED) and not state & _LOST:
            self._state = state | _CLOSING  # the client is closed once its bytes are out
            self.deadline = now + self.send_timeout
            out.append(ArmDeadline(self.deadline))
        else:
            self._closed(False, out)
        return out

    def _closed(self, abort: bool, out: list[Action]) -> None:
        self._state = (self._state & ~_CLOSING) | _CLOSED
        out.append(CloseClient(abort=True) if abort else CLOSE_CLIENT)


__all__ = [
    "Action",
    "ArmDeadline",
    "CloseClient",
    "CreditBackend",
    "EndBackend",
    "ResetBackend",
    "SendToBackend",
    "TunnelCore",
    "WriteToClient",
]
