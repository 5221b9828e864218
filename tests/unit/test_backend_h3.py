"""H3Backend against an in-memory aioquic server: datagrams passed by hand, time explicit.

The server is aioquic's own ``QuicConnection(is_client=False)`` + ``H3Connection``; nothing
touches a socket, so every ordering (reset, GOAWAY, close first) is chosen by the test.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme
from aioquic.buffer import encode_uint_var
from aioquic.h3 import events as h3e
from aioquic.h3.connection import H3_ALPN, ErrorCode, FrameType, H3Connection, encode_frame
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from muxproxy.core.backend_h3 import ControlStreamWatcher, H3Backend
from muxproxy.core.relay import StreamState, Update

CLIENT = ("127.0.0.1", 40000)
SERVER = ("127.0.0.1", 443)
REJECTED = ErrorCode.H3_REQUEST_REJECTED


class Pair:
    """An H3Backend and an aioquic HTTP/3 server, joined by lists of datagrams."""

    def __init__(self, tmp: Path, **core_args: object) -> None:
        ca = trustme.CA()
        cert = ca.issue_cert("localhost")
        certfile, keyfile = tmp / "cert.pem", tmp / "key.pem"
        certfile.write_bytes(b"".join(c.bytes() for c in cert.cert_chain_pems))
        keyfile.write_bytes(cert.private_key_pem.bytes())
        self.server_config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
        self.server_config.load_cert_chain(str(certfile), str(keyfile))
        client_config = QuicConfiguration(
            is_client=True, alpn_protocols=H3_ALPN, server_name="localhost",
            verify_mode=ssl.CERT_NONE,
        )
        self.core = H3Backend(client_config, **core_args)  # type: ignore[arg-type]
        self.server: QuicConnection | None = None
        self.h3: H3Connection | None = None
        self.now = 1000.0
        self.requests: dict[int, list[h3e.H3Event]] = {}
        self.updates: list[Update] = []
        self.core.connect(SERVER, self.now)
        self.pump()
        assert self.core.settings_received

    # --- moving datagrams ---------------------------------------------------------------

    def to_server(self) -> None:
        for data in self.core.datagrams_to_send(self.now):
            if self.server is None:
                self.server = QuicConnection(
                    configuration=self.server_config,
                    original_destination_connection_id=data[6 : 6 + data[5]],
                )
                self.h3 = H3Connection(self.server)
            self.server.receive_datagram(data, CLIENT, self.now)
        assert self.server is not None and self.h3 is not None
        while (ev := self.server.next_event()) is not None:
            for h in self.h3.handle_event(ev):
                sid = getattr(h, "stream_id", None)
                if sid is not None:
                    self.requests.setdefault(sid, []).append(h)

    def server_datagrams(self) -> list[bytes]:
        assert self.server is not None
        return [d for d, _ in self.server.datagrams_to_send(self.now)]

    def to_client(self, datagrams: list[bytes] | None = None) -> None:
        for data in self.server_datagrams() if datagrams is None else datagrams:
            self.updates.append(self.core.receive_datagrams([data], SERVER, self.now))

    def pump(self) -> None:
        for _ in range(10):
            self.now += 0.001
            self.to_server()
            out = self.server_datagrams()
            if not out and not self.core.datagrams_to_send(self.now):
                return
            self.to_client(out)

    # --- the server's moves --------------------------------------------------------------

    def answer(self, sid: int, body: bytes = b"ok") -> None:
        assert self.h3 is not None
        self.h3.send_headers(sid, [(b":status", b"200")])
        self.h3.send_data(sid, body, end_stream=True)

    def reject(self, sid: int, *, stop: bool = True, reset: bool = True) -> None:
        assert self.server is not None
        if reset:
            self.server.reset_stream(sid, REJECTED)
        if stop:
            self.server.stop_stream(sid, REJECTED)

    def goaway(self, first_unprocessed: int) -> None:
        assert self.server is not None and self.h3 is not None
        frame = encode_frame(FrameType.GOAWAY, encode_uint_var(first_unprocessed))
        self.server.send_stream_data(self.h3._local_control_stream_id, frame)  # type: ignore[arg-type]

    def close(self) -> None:
        assert self.server is not None
        self.server.close(error_code=ErrorCode.H3_NO_ERROR)

    def request(self, body: bool = False) -> StreamState:
        head = [(b":method", b"POST" if body else b"GET"), (b":scheme", b"https"),
                (b":authority", b"localhost"), (b":path", b"/")]
        return self.core.open_stream(head, not body)


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return Pair(tmp_path)


def test_request_and_response(pair: Pair) -> None:
    st = pair.request()
    pair.pump()
    assert list(pair.requests) == [st.stream_id]
    pair.answer(st.stream_id, b"hello")
    pair.pump()
    assert st.headers == [(b":status", b"200")]
    assert b"".join(d for d, _ in st.chunks) == b"hello"
    assert st.ended and st.stream_id not in pair.core.streams  # finished both ways: forgotten


def test_a_batch_of_datagrams_is_one_update_in_order(pair: Pair) -> None:
    """Many responses' datagrams fed at once give one update naming every stream they
    touched, with the bytes as one at a time would (what ``DatagramTransport.receive``
    relies on)."""
    streams = [pair.request() for _ in range(8)]
    pair.pump()
    for i, st in enumerate(streams):
        pair.answer(st.stream_id, bytes([65 + i]) * 5000)
    largest = 0
    for _ in range(50):
        batch = pair.server_datagrams()
        if not batch:
            break
        largest = max(largest, len(batch))
        before = {st.stream_id: len(st.chunks) for st in streams}
        up = pair.core.receive_datagrams(batch, SERVER, pair.now)
        grew = {st.stream_id for st in streams if len(st.chunks) > before[st.stream_id]}
        assert grew <= {st.stream_id for st in up.streams}
        pair.now += 0.002  # past the ACK delay: the client's ACKs open the server's window
        pair.to_server()
    assert largest > 1
    for i, st in enumerate(streams):
        assert st.ended and b"".join(d for d, _ in st.chunks) == bytes([65 + i]) * 5000
    assert not pair.core.streams  # finished both ways: forgotten


def test_free_streams_counts_our_cap(tmp_path: Path) -> None:
    p = Pair(tmp_path, max_streams=2)
    assert p.core.free_streams() == 2
    p.request()
    assert p.core.free_streams() == 1
    p.request()
    assert p.core.free_streams() == 0


@pytest.mark.parametrize("stop", [True, False])
def test_rejected_reset_first_is_refused(pair: Pair, stop: bool) -> None:
    st = pair.request()
    pair.pump()
    pair.reject(st.stream_id, stop=stop)
    pair.pump()
    assert st.refused and st.reset_code == REJECTED
    assert pair.core.refused_received == 1


def test_goaway_first_refuses_streams_at_or_above_its_id(pair: Pair) -> None:
    a, b, c = pair.request(), pair.request(), pair.request()
    pair.pump()
    pair.goaway(b.stream_id)
    pair.pump()
    assert pair.core.draining and pair.core.free_streams() == 0
    assert not a.refused and a.reset_code is None  # below the id: may have been processed
    assert b.refused and c.refused
    assert any(u.goaway for u in pair.updates)
    pair.answer(a.stream_id)
    pair.pump()
    assert a.ended and not a.refused


def test_goaway_below_a_stream_already_answered_lets_it_finish(pair: Pair) -> None:
    """A GOAWAY id below a stream whose response head arrived contradicts itself: that stream
    is being answered, so it is relayed to the end, not cut (and not replayed)."""
    a, b = pair.request(), pair.request()
    pair.pump()
    assert pair.h3 is not None
    pair.h3.send_headers(b.stream_id, [(b":status", b"200")])
    pair.pump()
    pair.goaway(a.stream_id)
    pair.pump()
    assert a.refused
    assert b.reset_code is None and not b.refused
    pair.h3.send_data(b.stream_id, b"rest", end_stream=True)
    pair.pump()
    assert b.ended and b"".join(d for d, _ in b.chunks) == b"rest"


@pytest.mark.parametrize("batched", [False, True])
def test_close_after_goaway_still_refuses_the_rejected(pair: Pair, batched: bool) -> None:
    """The GOAWAY and the close arrive together (one at a time, or in one batch as the
    transport reads them): streams above the id are still refused, the one below (not
    answered) is a plain failure."""
    a, b = pair.request(), pair.request()
    pair.pump()
    pair.goaway(b.stream_id)
    first = pair.server_datagrams()
    pair.close()
    second = pair.server_datagrams()
    if batched:
        pair.updates.append(pair.core.receive_datagrams(first + second, SERVER, pair.now))
    else:
        pair.to_client(first + second)
    pair.now += 10  # aioquic reports the close when its draining period ends
    pair.core.handle_timer(pair.now)
    assert pair.core.closed
    assert b.refused
    assert a.reset_code is not None and not a.refused


def test_close_without_goaway_proves_nothing(pair: Pair) -> None:
    st = pair.request()
    pair.pump()
    pair.close()
    pair.to_client()
    pair.now += 10
    pair.core.handle_timer(pair.now)
    assert pair.core.closed and st.reset_code is not None and not st.refused


def test_close_refuses_what_never_left(pair: Pair) -> None:
    """Closed with no GOAWAY: a stream sent may have been processed (a plain failure); one
    whose bytes never left in a packet cannot have been (refused, replayable)."""
    sent = pair.request()
    pair.pump()
    pair.close()
    closing = pair.server_datagrams()
    unsent = pair.request()  # opened after the close was on its way, never flushed
    pair.to_client(closing)
    pair.now += 10
    pair.core.handle_timer(pair.now)
    assert pair.core.closed
    assert sent.reset_code is not None and not sent.refused
    assert unsent.reset_code is not None and unsent.refused


def test_abort_refuses_what_never_left(pair: Pair) -> None:
    sent = pair.request()
    pair.pump()
    unsent = pair.request()
    up = pair.core.abort("backend connection dead (no PING ACK)")
    assert up.closed and {sent.stream_id, unsent.stream_id} <= {s.stream_id for s in up.streams}
    assert not sent.refused and unsent.refused


def test_stop_sending_rejected_during_upload_is_refused_and_sending_is_harmless(
    pair: Pair,
) -> None:
    """STOP_SENDING(H3_REQUEST_REJECTED) alone, while the body is still being sent: the
    stream is refused (replayable) and a late send is not an error."""
    st = pair.request(body=True)
    pair.core.send_data(st.stream_id, b"x" * 100)
    pair.pump()
    pair.reject(st.stream_id, reset=False)
    pair.to_client()
    assert st.refused
    pair.core.send_data(st.stream_id, b"more")  # the uploader had not noticed yet
    pair.core.end_stream(st.stream_id)
    pair.pump()


def test_stop_sending_no_error_ends_the_upload_keeps_the_response(pair: Pair) -> None:
    """RFC 9114 §4.1: a server may answer early and ask the client to stop sending the body
    with H3_NO_ERROR; the response is still relayed and further body bytes are dropped."""
    st = pair.request(body=True)
    pair.core.send_data(st.stream_id, b"x" * 100)
    pair.pump()
    assert pair.server is not None
    pair.server.stop_stream(st.stream_id, ErrorCode.H3_NO_ERROR)
    pair.pump()
    assert st.reset_code is None and not st.refused
    assert pair.core.send_window(st.stream_id) > 0  # nothing waits for credit forever
    pair.core.send_data(st.stream_id, b"more")  # dropped, not an error
    pair.core.end_stream(st.stream_id)
    pair.answer(st.stream_id, b"early")
    pair.pump()
    assert st.headers == [(b":status", b"200")] and st.ended and not st.refused
    assert b"".join(d for d, _ in st.chunks) == b"early"
    assert st.stream_id not in pair.core.streams


def test_slow_client_cap_resets_after_grace(tmp_path: Path) -> None:
    p = Pair(tmp_path, stream_window=1000, slow_client_grace=5.0)
    st = p.request()
    p.pump()
    assert p.h3 is not None
    p.h3.send_headers(st.stream_id, [(b":status", b"200")])
    p.h3.send_data(st.stream_id, b"y" * 5000, end_stream=False)  # the client reads nothing
    p.pump()
    assert st.reset_code is None
    p.now += 10
    up = p.core.handle_timer(p.now)
    assert st.reset_code is not None and st in up.streams
    assert p.core.slow_client_resets == 1


def _control(*frames: bytes) -> bytes:
    return encode_uint_var(0x00) + b"".join(frames)  # stream type 0: control


def _frame(kind: int, payload: bytes) -> bytes:
    return encode_frame(kind, payload)


GOAWAY_8 = _frame(FrameType.GOAWAY, encode_uint_var(8))
SETTINGS = _frame(FrameType.SETTINGS, encode_uint_var(0x6) + encode_uint_var(1000))


@pytest.mark.parametrize(
    ("stream_id", "data", "goaway"),
    [
        (3, _control(SETTINGS, GOAWAY_8), 8),
        (3, _control(SETTINGS), None),
        (7, _control(GOAWAY_8), 8),  # any server-initiated unidirectional stream
        (0, _control(GOAWAY_8), None),  # a request stream: not the control stream
        (2, _control(GOAWAY_8), None),  # client-initiated unidirectional: ours
        (3, encode_uint_var(0x02) + GOAWAY_8, None),  # a QPACK encoder stream, not control
        (3, _control(GOAWAY_8, _frame(FrameType.GOAWAY, encode_uint_var(4))), 4),  # lower wins
        (3, _control(GOAWAY_8, _frame(FrameType.GOAWAY, encode_uint_var(12))), 8),  # never up
        (3, _control(_frame(0x21, b"reserved"), GOAWAY_8), 8),  # unknown frames skipped
    ],
)
def test_control_stream_watcher(stream_id: int, data: bytes, goaway: int | None) -> None:
    for split in range(len(data) + 1):  # the bytes may arrive cut anywhere
        w = ControlStreamWatcher()
        w.feed(stream_id, data[:split])
        w.feed(stream_id, data[split:])
        assert w.goaway_stream_id == goaway, split
