"""The DATA and BDAT byte streams: end-of-data detection, dot-unstuffing, bare CR/LF.

Pure: bytes in, bytes out, no I/O.  RFC 5321 4.1.1.4 and 4.5.2: the mail data ends with
a line holding a single "." and CRLF; a leading "." on any other line is removed.  Only
CRLF "." CRLF ends DATA (RFC 5321 2.3.8: CR and LF are not line ends alone); a bare CR or
LF is recorded (SMTP smuggling, CVE-2023-51764) so the server can reject the message, or
converted to CRLF so that nothing txmta relays ever carries one.

The stream may arrive split at any byte; the output never depends on how it was split
(tests/test_data_stream.py proves it with hypothesis).
"""
# test: tests/test_data_stream.py

from __future__ import annotations

import re

_ANY_EOL = re.compile(rb"\r\n|\r|\n")
MAX_PARTIAL = 64 * 1024   # a line longer than this is passed on in pieces


def has_bare(chunk: bytes) -> bool:
    """True if `chunk` holds a CR not followed by LF or an LF not preceded by CR."""
    crlf = chunk.count(b"\r\n")
    return chunk.count(b"\n") != crlf or chunk.count(b"\r") != crlf


def fix_bare(chunk: bytes) -> bytes:
    return _ANY_EOL.sub(b"\r\n", chunk)


class DataStream:
    """Consumes the bytes after DATA's 354 until CRLF.CRLF.

    `feed(data)` returns (content, leftover): the un-stuffed content to store, and, once
    the end was seen (`done` is then True), the bytes after it (pipelined commands).
    """

    __slots__ = ("_pending", "_bol", "bare", "done", "size", "fix")

    def __init__(self, fix: bool = False) -> None:
        self._pending = b""
        self._bol = True           # the next byte starts a line
        self.bare = False          # a bare CR or LF was seen
        self.done = False
        self.size = 0              # octets of content produced
        self.fix = fix

    def _emit(self, prefix: bytes, raw: bytes) -> bytes:
        if not raw:
            return b""
        if (prefix and raw[:1] == b".") or b"\r\n." in raw:
            raw = (prefix + raw).replace(b"\r\n.", b"\r\n")[len(prefix):]
        if has_bare(raw):
            self.bare = True
            if self.fix:
                raw = fix_bare(raw)
        self.size += len(raw)
        return raw

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        if self.done:
            return b"", data
        buf = self._pending + data if self._pending else data
        prefix = b"\r\n" if self._bol else b""
        s = prefix + buf
        end = s.find(b"\r\n.\r\n")
        if end >= 0:
            self.done = True
            self._pending = b""
            content = s[len(prefix):end + 2] if end + 2 > len(prefix) else b""
            return self._emit(prefix, content), s[end + 5:]
        cut = s.rfind(b"\n") + 1
        if cut <= len(prefix):
            # no complete line yet: keep it, unless it grows past MAX_PARTIAL
            if len(buf) > MAX_PARTIAL:
                head, self._pending = buf[:-1], buf[-1:]
                out = self._emit(prefix, head)
                self._bol = False
                return out, b""
            self._pending = buf
            return b"", b""
        content = s[len(prefix):cut]
        self._pending = s[cut:]
        out = self._emit(prefix, content)
        self._bol = content.endswith(b"\r\n")
        return out, b""


class BdatStream:
    """Checks BDAT chunks (RFC 3030: raw octets, no dot-stuffing) for bare CR or LF."""

    __slots__ = ("_cr", "bare", "size", "fix")

    def __init__(self, fix: bool = False) -> None:
        self._cr = False           # the previous chunk ended with CR
        self.bare = False
        self.size = 0
        self.fix = fix

    def feed(self, data: bytes) -> bytes:
        if not data:
            return data
        if self._cr:
            data = b"\r" + data
        self._cr = data.endswith(b"\r")
        body = data[:-1] if self._cr else data
        if has_bare(body):
            self.bare = True
            if self.fix:
                body = fix_bare(body)
        self.size += len(body)
        return body

    def finish(self) -> bytes:
        """The end of the last chunk: a CR left waiting is a bare CR."""
        if self._cr:
            self._cr = False
            self.bare = True
            out = b"\r\n" if self.fix else b"\r"
            self.size += len(out)
            return out
        return b""
