"""SMTP replies as values: code, RFC 3463 enhanced status code, human text.

Pure: no I/O.  Every reply txmta sends carries an enhanced status code (RFC 2034),
except the greeting and the replies to EHLO/HELO, which RFC 2034 section 3 exempts
(they are built with enhanced="").  `to_bytes()` renders multi-line replies
(RFC 5321 4.2.1) with the enhanced code repeated on every line.
"""
# test: tests/test_reply.py

from __future__ import annotations

import re
from dataclasses import dataclass

_LEADING_ENHANCED = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})\b")


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code}")

    @property
    def positive(self) -> bool:
        return self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def stated_enhanced(self) -> str:
        """The enhanced status code, also when a server left it at the start of the text
        instead of in its place; "" when it gave none."""
        if self.enhanced.strip():
            return self.enhanced.strip()
        m = _LEADING_ENHANCED.match(self.text)
        return m.group(1) if m else ""

    def to_bytes(self) -> bytes:
        lines = self.text.split("\n")
        last = len(lines) - 1
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == last else "-"
            if self.enhanced:
                out.append(f"{self.code}{sep}{self.enhanced} {line}\r\n")
            else:  # the greeting and EHLO/HELO replies carry none (RFC 2034 3)
                out.append(f"{self.code}{sep}{line}\r\n")
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    def as_dict(self) -> dict[str, object]:
        return {"code": self.code, "enhanced": self.enhanced, "text": self.text}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> "Reply":
        return cls(int(d["code"]), str(d["enhanced"]), str(d["text"]))  # type: ignore[call-overload]


def multiline(code: int, enhanced: str, lines: list[str]) -> Reply:
    return Reply(code, enhanced, "\n".join(lines))


def cut(text: str, octets: int) -> str:
    """`text` in at most `octets` octets of UTF-8, "..." marking a cut: a client's or a next
    hop's words shown in a reply line, which RFC 5321 4.5.3.1.5 bounds to 512 octets."""
    data = text.encode("utf-8")
    if len(data) <= octets:
        return text
    return data[:max(octets - 3, 0)].decode("utf-8", "ignore") + "..."


# Replies the server sends often (RFC 5321 4.2.2 codes, RFC 3463 enhanced codes).
OK = Reply(250, "2.0.0", "OK")
CLOSING = Reply(221, "2.0.0", "Bye")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
NOT_SMTP = Reply(221, "2.7.0", "This is an SMTP server, not a web server or proxy; closing")
SERVICE_SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing transmission channel")
TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing transmission channel")
# [server] command_time_limit and data_time_limit: a client too slow, not silent
COMMAND_TIME_LIMIT = Reply(421, "4.4.2", "Command not completed within the time limit, "
                                         "closing transmission channel")
DATA_TIME_LIMIT = Reply(421, "4.4.2", "Message data not completed within the time limit, "
                                      "closing transmission channel")
TLS_IN_PLAINTEXT = Reply(421, "4.5.1", "TLS handshake on a plaintext connection (use STARTTLS), "
                                       "closing transmission channel")
COMMIT_FAILED = Reply(451, "4.3.0", "Temporary failure storing the message, try again later")
SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage, try again later")
# RFC 3463 3.5 X.4.7 "delivery time expired": the message's own deadline (X-Txmta-Expires)
DEADLINE_PASSED = Reply(554, "5.4.7", "Message refused: its deadline (X-Txmta-Expires) has "
                                      "already passed, it would never be delivered in time")
