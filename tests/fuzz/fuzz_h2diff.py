"""atheris (libFuzzer) target: muxproxy's HTTP/2 client codec against h2's, on raw server bytes.

Each input is a server byte stream played after the server's SETTINGS frame, fed to both
clients in pieces whose sizes the input picks; they must agree or differ in one of the ways
``tests/fuzz/h2diff.py`` documents (``KNOWN``).  Run from the repository root:

    mkdir -p /tmp/h2diff-corpus
    python -m tests.fuzz.fuzz_h2diff /tmp/h2diff-corpus -max_total_time=14400

CI runs it briefly (``test_fuzz_smoke.py``).  An unknown difference raises; libFuzzer saves
the input as ``crash-*``.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["muxproxy", "h2", "hpack", "hyperframe"]):
    import muxproxy.core.backend_h2
    from tests.fuzz.h2diff import KNOWN, Pair, classify

assert muxproxy.core.backend_h2

SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    cuts = fdp.ConsumeIntInRange(1, 4)
    rest = fdp.ConsumeBytes(fdp.remaining_bytes())
    pair = Pair()
    pieces = [SETTINGS]
    step = max(1, len(rest) // cuts)
    pieces += [rest[i : i + step] for i in range(0, len(rest), step)]
    for piece in pieces:
        diffs, mux, ref = pair.feed(piece)
        if diffs:
            label = classify("bytes", mux, ref, diffs)
            if label not in KNOWN:
                raise AssertionError(f"{label}: {diffs}")
            return
        if not mux.alive:
            return


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
