"""Envelope values: message ids, addresses, recipients and the envelope of one message.

Pure values; no I/O.  Addresses keep the exact local part the client sent (RFC 5321 2.4:
local parts are case sensitive) and a lower-cased domain.  ESMTP parameters that
travel with the message are kept here: SIZE (RFC 1870), BODY (RFC 6152), SMTPUTF8
(RFC 6531), RET/ENVID/NOTIFY/ORCPT (RFC 3461).
"""
# test: tests/test_envelope.py

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXZbcdfghjkmnpqrstvwxz"  # no vowels: ids never spell words
_counter_lock = threading.Lock()
_last = [0, 0]


def new_message_id(now: float | None = None) -> str:
    """A queue id that sorts by arrival time: 10 chars of microseconds + 4 of sequence/random.

    Unique within one process (counter) and across restarts (time, random tail).
    """
    us = int((time.time() if now is None else now) * 1_000_000)
    with _counter_lock:
        if us <= _last[0]:
            us = _last[0] + 1
        _last[0] = us
    base = len(_ALPHABET)
    digits = []
    n = us
    for _ in range(11):
        n, r = divmod(n, base)
        digits.append(_ALPHABET[r])
    rnd = int.from_bytes(os.urandom(3), "big")
    tail = []
    for _ in range(4):
        rnd, r = divmod(rnd, base)
        tail.append(_ALPHABET[r])
    return "".join(reversed(digits)) + "".join(tail)


@dataclass(frozen=True, slots=True)
class Address:
    """A mailbox `local@domain`; the null reverse-path is Address("", "")."""

    local: str
    domain: str

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    def __str__(self) -> str:
        if self.is_null:
            return ""
        if not self.domain:
            return self.local
        return f"{self.local}@{self.domain}"

    @property
    def is_ascii(self) -> bool:
        return str(self).isascii()

    @classmethod
    def parse_stored(cls, text: str) -> "Address":
        if not text:
            return NULL_ADDRESS
        local, sep, domain = text.rpartition("@")
        if not sep:
            return cls(text, "")
        return cls(local, domain)


NULL_ADDRESS = Address("", "")

NOTIFY_VALUES = frozenset({"NEVER", "SUCCESS", "FAILURE", "DELAY"})


@dataclass(frozen=True, slots=True)
class Recipient:
    address: Address
    notify: tuple[str, ...] = ()        # RFC 3461 NOTIFY; () = not given (FAILURE,DELAY implied)
    orcpt: str | None = None            # RFC 3461 ORCPT as "addr-type;xtext-decoded address"


@dataclass(frozen=True, slots=True)
class Envelope:
    sender: Address
    recipients: tuple[Recipient, ...] = ()
    size: int | None = None             # SIZE= declared by the client
    body: str = "7BIT"                  # BODY=7BIT | 8BITMIME
    smtputf8: bool = False
    ret: str | None = None              # RET=FULL | HDRS
    envid: str | None = None            # ENVID, xtext-decoded
    auth: str | None = None             # AUTH= (RFC 4954) as given by a trusted client
    extra: dict[str, str] = field(default_factory=dict)
    requiretls: bool = False            # MAIL ... REQUIRETLS (RFC 8689)
    tls_optional: bool = False          # a "TLS-Required: No" header field (RFC 8689 5)

    def with_recipient(self, rcpt: Recipient) -> "Envelope":
        return Envelope(self.sender, self.recipients + (rcpt,), self.size, self.body, self.smtputf8,
                        self.ret, self.envid, self.auth, self.extra, self.requiretls,
                        self.tls_optional)
