"""FrameWatcher: close frames seen through any split of the byte stream, masked or not, with
every header size (2, 4, 10 bytes; 6, 8, 14 masked), payload bytes never read as headers."""

from __future__ import annotations

import pytest

from muxproxy.core.websocket import FrameWatcher

from .wsframe import BINARY, CONTINUATION, PING, PONG, TEXT, close, frame, header_size

# Payload lengths at the edges of the three length encodings.
LENGTHS = [0, 1, 125, 126, 127, 65535, 65536, 70000]
# Payloads made of close-frame look-alikes: must be skipped by count, never parsed.
DECOY = close(1000) + close(1001, masked=True) + b"\x88\x00"


def payload(n: int) -> bytes:
    return (DECOY * (n // len(DECOY) + 1))[:n]


def feed_all(watcher: FrameWatcher, pieces: list[bytes]) -> list[bool]:
    return [watcher.feed(p) for p in pieces]


@pytest.mark.parametrize("masked", [False, True], ids=["server", "client"])
@pytest.mark.parametrize("n", LENGTHS)
def test_header_sizes(n: int, masked: bool) -> None:
    data = frame(BINARY, payload(n), masked=masked)
    assert len(data) == header_size(n, masked) + n
    w = FrameWatcher()
    assert w.feed(data) is False and not w.closed
    assert w.feed(close(masked=masked)) is True and w.closed


@pytest.mark.parametrize("masked", [False, True], ids=["server", "client"])
@pytest.mark.parametrize("n", [0, 125, 126, 65536])
def test_split_at_every_byte(n: int, masked: bool) -> None:
    """A data frame then a close frame, cut in two at every position, and fed byte by byte:
    closed becomes true exactly when the close frame's header is complete."""
    data = frame(TEXT, payload(n), masked=masked)
    stream = data + close(1000, masked=masked)
    done_at = len(data) + header_size(2, masked)  # bytes needed to see the close frame
    cuts = range(len(stream) + 1) if n < 1000 else [*range(40), *range(len(data) - 20, len(stream))]
    for cut in cuts:
        w = FrameWatcher()
        first = w.feed(stream[:cut])
        assert first == (cut >= done_at), cut
        assert w.feed(stream[cut:]) is True, cut
    if n < 1000:
        w = FrameWatcher()
        seen = feed_all(w, [stream[i : i + 1] for i in range(len(stream))])
        assert seen.index(True) == done_at - 1
        assert all(seen[done_at - 1 :])


@pytest.mark.parametrize("masked", [False, True], ids=["server", "client"])
def test_many_frames_in_one_read_and_control_frames(masked: bool) -> None:
    frames = [
        frame(TEXT, b"hello", masked=masked, fin=False),
        frame(PING, b"are you there", masked=masked),  # control frame inside a message
        frame(CONTINUATION, payload(300), masked=masked),
        frame(PONG, b"", masked=masked),
        frame(BINARY, payload(126), masked=masked),
    ]
    w = FrameWatcher()
    assert w.feed(b"".join(frames)) is False
    assert w.feed(b"".join(frames) + close(1001, masked=masked) + frames[0]) is True


def test_payload_spread_over_reads_is_skipped_by_count() -> None:
    data = frame(BINARY, payload(70000), masked=True)
    w = FrameWatcher()
    for i in range(0, len(data), 999):
        assert w.feed(data[i : i + 999]) is False
    assert w.feed(close(masked=True)[:1]) is False
    assert w.feed(close(masked=True)[1:]) is True


def test_close_frame_without_payload_and_stays_closed() -> None:
    w = FrameWatcher()
    assert w.feed(frame(0x8, b"")) is True  # a close frame may carry no status code
    assert w.feed(b"") is True
    assert w.feed(frame(TEXT, b"after close")) is True
    assert w.closed


def test_nothing_fed_nothing_seen() -> None:
    w = FrameWatcher()
    assert w.feed(b"") is False
    assert w.feed(b"\x81") is False  # half a header
    assert not w.closed
