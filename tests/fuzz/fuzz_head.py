"""atheris (libFuzzer) target: the smuggling invariant of :mod:`tests.fuzz.invariant`.

Run from the repository root; the first directory receives new inputs, the corpus seeds it:

    mkdir -p /tmp/fuzz-head /tmp/fuzz-seeds && cp tests/corpus/*.http /tmp/fuzz-seeds
    python -m tests.fuzz.fuzz_head /tmp/fuzz-head /tmp/fuzz-seeds -max_total_time=600

CI runs it briefly (``test_fuzz_smoke.py``: a few thousand inputs).  Each input is checked fed
whole, split in two at a point the input itself picks, and (when short) one byte at a time.
A crash means muxproxy forwarded something a strict RFC 9112 parser reads differently, or
raised something other than ClientError; libFuzzer saves the input as ``crash-*``.
"""

from __future__ import annotations

import sys

import atheris

# Coverage feedback from the parsers only: instrumenting all that ``muxproxy`` imports
# (anyio, h2, aioquic, cryptography, ...) costs seconds and guides nothing here.
with atheris.instrument_imports(include=["h11", "muxproxy"]):
    import h11

    import muxproxy.core.frontend_h11
    import muxproxy.core.headers

from tests.fuzz.invariant import check

assert h11 and muxproxy.core.frontend_h11 and muxproxy.core.headers  # instrumented above


def test_one_input(data: bytes) -> None:
    check(data)
    if len(data) > 1:
        check(data, [data[-1] * len(data) // 256 or 1])
    if len(data) <= 256:
        check(data, range(1, len(data)))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
