"""Message values: ids, addresses, recipients, envelopes, stored messages, recipient states,
timeline events, suppressions, outbox records, and the change a spool transaction commits.

Pure values; no I/O.  Addresses keep the exact local part the client sent (RFC 5321 2.4:
local parts are case sensitive) and a lower-cased domain.  ESMTP parameters that
travel with the message are kept here: SIZE (RFC 1870), BODY (RFC 6152), SMTPUTF8
(RFC 6531), RET/ENVID/NOTIFY/ORCPT (RFC 3461).  Every side (inbound, queue, spool,
outbound, the mail log) speaks in these values; none of them imports another side for them.
"""
# test: tests/test_codec.py, tests/test_spool_contract.py

from __future__ import annotations

import os
import random as _random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol

from txmta.reply import Reply

_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXZbcdfghjkmnpqrstvwxz"  # no vowels: ids never spell words
_TIME_DIGITS = 11   # microseconds since the epoch, base 49: sorts by time until the year 8000+
_TAIL_DIGITS = 3    # random, so two processes' ids in one microsecond still differ


def _digits(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, len(_ALPHABET))
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


_DIGIT = {c: i for i, c in enumerate(_ALPHABET)}


def message_id_time(message_id: str) -> float | None:
    """The arrival time (seconds) a queue id carries, None when it is not one of ours."""
    micros = 0
    for c in message_id[:_TIME_DIGITS]:
        digit = _DIGIT.get(c)
        if digit is None:
            return None
        micros = micros * len(_ALPHABET) + digit
    return micros / 1e6 if len(message_id) >= _TIME_DIGITS else None


def format_message_id(micros: int, partition: int, tail: int) -> str:
    """A queue id: 11 digits of time (so ids sort by arrival), the partition's character,
    3 random digits.  15 characters of `_ALPHABET`; `partition.partition_of` reads it back."""
    if not 0 <= partition < len(_ALPHABET):
        raise ValueError(f"partition {partition} out of range")
    return _digits(micros, _TIME_DIGITS) + _ALPHABET[partition] + _digits(tail, _TAIL_DIGITS)


class MessageIds:
    """Makes the queue ids of one process: strictly increasing time digits (a counter when
    the clock stands still or steps back), partitions taken in turn from `partitions`.

    `clock` gives seconds, `random` gives n random bytes: both injected so tests fix them.
    By default the bytes come from a generator seeded from the system's randomness: the tail
    only keeps ids apart, and a getrandom() per id released the GIL to the spool's writer
    thread, which the reactor then waited for (about 3 % of an API submission's CPU).
    """

    def __init__(self, partitions: Iterable[int] = (0,), *,
                 clock: Callable[[], float] = time.time,
                 random: Callable[[int], bytes] | None = None) -> None:
        self.partitions = tuple(sorted(partitions))
        if not self.partitions:
            raise ValueError("an id generator needs at least one partition")
        self._clock = clock
        self._random = random or _random.Random(os.urandom(16)).randbytes
        self._last = 0
        self._turn = 0
        self._lock = threading.Lock()   # ids are also made on the spool's writer thread

    def __call__(self, now: float | None = None) -> str:
        micros = int((self._clock() if now is None else now) * 1_000_000)
        with self._lock:
            if micros <= self._last:
                micros = self._last + 1
            self._last = micros
            partition = self.partitions[self._turn % len(self.partitions)]
            self._turn += 1
        tail = int.from_bytes(self._random(2), "big")
        return format_message_id(micros, partition, tail)


_default_ids = MessageIds(range(32))


def new_message_id(now: float | None = None) -> str:
    """An id from the process-wide generator (every partition in turn): for tools and tests;
    the daemon's queue has a generator of its own for the partitions its worker owns."""
    return _default_ids(now)


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


# Recipient states.  Only QUEUED and HELD are unfinished; the others are final.
QUEUED = "queued"
HELD = "held"
DELIVERED = "delivered"
BOUNCED = "bounced"
EXPIRED = "expired"
SUPPRESSED = "suppressed"
DELETED = "deleted"
FINAL = frozenset({DELIVERED, BOUNCED, EXPIRED, SUPPRESSED, DELETED})
UNFINISHED = frozenset({QUEUED, HELD})


@dataclass(frozen=True, slots=True)
class Labels:
    """What an application attached to a message it sent through the HTTP API: a tag, its
    metadata (string to string) and the stream (Postmark's MessageStream) it asked for.
    They go into the history, the events and the webhooks; SMTP mail has none."""
    tag: str = ""
    metadata: tuple[tuple[str, str], ...] = ()
    stream: str = ""

    def __bool__(self) -> bool:
        return bool(self.tag or self.metadata or self.stream)


NO_LABELS = Labels()


@dataclass(frozen=True, slots=True)
class Search:
    """What a message search of the HTTP API (txmta.spool.view.search) looks for: mail to `recipient` and/or with `tag` (through the lookup
    index), or every message (by id) when neither is given; with a recipient in `state`
    (of the given recipient, when there is one); arrived at or after `since`; at most
    `limit` messages, after the `after` cursor of a previous answer."""
    recipient: str | None = None
    tag: str | None = None
    state: str | None = None
    since: float | None = None
    limit: int = 50
    after: bytes | None = None
    token: str | None = None      # only mail sent with this API token


@dataclass(frozen=True, slots=True)
class RecipientState:
    state: str = QUEUED
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: Reply | None = None
    greylisted: bool = False        # a greylisting reply was seen once (retry.next_delay)
    remote: str = ""                # the host that gave last_reply, e.g. "mx.example.net[192.0.2.1]"
    warned: bool = False            # a delay DSN was sent for it
    category: str = ""              # bounce category of last_reply (outcome.classify), for failures
    source: str = ""                # our source address when it was greylisted: its retries go from it


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: str
    envelope: Envelope
    arrival: float
    size: int                                   # octets of the stored body (with our headers)
    recipients: tuple[RecipientState, ...]      # parallel to envelope.recipients
    client: dict[str, str]                      # address, helo, tls, auth user, listener
    body_in_file: bool = False
    header_id: str = ""                         # the Message-ID header, e.g. "<abc@example.com>"
    labels: Labels = NO_LABELS                  # tag, metadata, stream (HTTP API)
    lane: str = ""                              # its lane (lanes.py); "" = the default lane
    expires: float | None = None                # its deadline (epoch seconds); None = none
    priority: int = 0                           # its lane's priority at arrival (due order)

    def with_recipient_state(self, index: int, state: RecipientState) -> "StoredMessage":
        states = list(self.recipients)
        states[index] = state
        return replace(self, recipients=tuple(states))

    @property
    def unfinished(self) -> bool:
        return any(r.state in UNFINISHED for r in self.recipients)


@dataclass(frozen=True)
class Event:
    """One entry of a message's timeline (received, attempt outcomes, DSNs, admin changes)."""

    time: float
    kind: str                       # received | delivered | deferred | bounced | expired | ...
    rcpt: str = ""
    text: str = ""                  # the reply or a human note
    remote: str = ""
    category: str = ""
    tls: str = ""                   # the attempt's TLS and its verification, "" without TLS

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"time": self.time, "event": self.kind}
        for k in ("rcpt", "text", "remote", "category", "tls"):
            if getattr(self, k):
                d[k] = getattr(self, k)
        return d


def intake_events(m: StoredMessage) -> tuple[Event, ...]:
    """The timeline a new message starts with: received, and any recipient ended at intake."""
    return (received_event(m),) + tuple(
        Event(m.arrival, r.state, str(rcpt.address), str(r.last_reply or ""), category=r.category)
        for rcpt, r in zip(m.envelope.recipients, m.recipients) if r.state == SUPPRESSED)


def received_event(m: StoredMessage) -> Event:
    client = m.client.get("address", "") or "local"
    return Event(m.arrival, "received", text=f"from <{m.envelope.sender}> client={client} "
                 f"size={m.size} nrcpt={len(m.envelope.recipients)}")


@dataclass(frozen=True)
class Suppression:
    address: str                    # lower-cased
    reason: str                     # category, or "manual"
    since: float
    expires: float
    reply: str = ""


@dataclass(frozen=True)
class OutboxRecord:
    """What the outbox keeps of one event (`txmta.events`): flat, for the webhook sender."""

    kind: str                       # received | delivered | deferred | bounced | expired | ...
    time: float
    message_id: str = ""            # "" for a suppression-list change
    index: int = -1                 # the recipient's place in the envelope, -1 for none
    rcpt: str = ""
    reply: dict[str, object] | None = None
    remote: str = ""
    category: str = ""
    tls: str = ""
    attempts: int = 0
    text: str = ""
    facts: "MessageFacts | None" = None  # of the message the event is about (for webhooks)


@dataclass(frozen=True)
class MessageFacts:
    """What a webhook tells of the message an event is about, beside the event itself."""
    sender: str = ""
    header_id: str = ""                 # the Message-ID header
    tag: str = ""
    metadata: tuple[tuple[str, str], ...] = ()
    stream: str = ""
    token: str = ""                     # the API token's name, "" for SMTP mail

    @classmethod
    def of(cls, m: "StoredMessage") -> "MessageFacts":
        return cls(str(m.envelope.sender), m.header_id, m.labels.tag, m.labels.metadata,
                   m.labels.stream, m.client.get("token", ""))


class OutboxEntry(Protocol):
    """An event the spool writes to its outbox: the key, and the record (txmta.events)."""

    @property
    def event_id(self) -> bytes: ...

    def record(self) -> OutboxRecord: ...


@dataclass(frozen=True)
class Change:
    """What one `Spool.modify()` commits beside the new recipient states: timeline events,
    new messages (DSNs, committed in the same transaction, invariant 2), suppressions, and
    the events for the outbox (the queue publishes the same ones after the commit)."""

    message: StoredMessage
    events: tuple[Event, ...] = ()
    new_messages: tuple[tuple[StoredMessage, bytes], ...] = ()
    suppress: tuple[Suppression, ...] = ()
    finished_at: float | None = None    # when the message finished, if this change finishes it
    outbox: tuple[OutboxEntry, ...] = ()


# What storing can fail with (the spool raises them; intake turns them into replies).

class SpoolError(Exception):
    """A spool operation failed; nothing it would have written was kept."""


class SpoolFull(SpoolError):
    """The LMDB map or the disk is full."""


class AlreadySubmitted(SpoolError):
    """A put with an idempotency key that an earlier message committed within its window:
    nothing was stored; `result` is what the earlier one stored for the key."""

    def __init__(self, result: bytes) -> None:
        super().__init__("already submitted with this idempotency key")
        self.result = result


@dataclass(frozen=True)
class Idempotency:
    """Store `result` under `key` with the message, unless a result stored for the key at
    or after `not_before` is there (then the put fails with AlreadySubmitted)."""
    key: bytes
    result: bytes
    not_before: float


class CommitFailed(SpoolError):
    """Any other failure to make a change durable."""


class SpoolFormatError(SpoolError):
    """The spool on disk has a format this version cannot use."""
