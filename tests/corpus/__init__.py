"""The malformed-request corpus: one raw request per file, named ``<status>-<rule>.http``.

See README.md beside this file.  ``load()`` is shared by the sans-IO, integration, fuzzing
and nginx differential tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DIR = Path(__file__).resolve().parent
_NAME = re.compile(r"^([1-5]\d\d)-([a-z0-9.\-]+)\.http$")


@dataclass(frozen=True)
class Case:
    name: str  # the file name without ".http"
    status: int  # what muxproxy must answer
    raw: bytes

    @property
    def head_end(self) -> int:
        """Offset just past the first blank line (CRLF CRLF), or -1: where a body starts."""
        end = self.raw.find(b"\r\n\r\n")
        return -1 if end < 0 else end + 4


def load() -> list[Case]:
    cases = []
    for path in sorted(DIR.glob("*.http")):
        m = _NAME.match(path.name)
        if m is None:
            raise AssertionError(f"corpus file {path.name} is not named <status>-<rule>.http")
        cases.append(Case(path.name.removesuffix(".http"), int(m.group(1)), path.read_bytes()))
    return cases
