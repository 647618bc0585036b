"""What a spool is: the interface the queue uses, and the records it stores.

A spool keeps messages (envelope, arrival, body) and per-recipient state durably.
`put()` fires only once the message is on disk (DESIGN invariant 1); a failure fires
with `SpoolFull` (map or disk full: the caller answers 452 4.3.1) or `CommitFailed`
(anything else: 451 4.3.0), and leaves nothing behind.

Bodies are streamed into a `BodyWriter` while DATA arrives; a writer may keep the body in
memory or spill it to a file, which the spool makes durable before the commit that
references it.  Implementations: `spool.lmdb.LmdbSpool` (the real one) and
`spool.memory.MemorySpool` (tests); `tests/test_spool_contract.py` runs on both.
"""
# test: tests/test_spool_contract.py

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator, Protocol

from twisted.internet.defer import Deferred

from txmta.envelope import Envelope
from txmta.reply import Reply

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


class SpoolError(Exception):
    """A spool operation failed; nothing it would have written was kept."""


class SpoolFull(SpoolError):
    """The LMDB map or the disk is full."""


class CommitFailed(SpoolError):
    """Any other failure to make a change durable."""


class SpoolFormatError(SpoolError):
    """The spool on disk has a format this version cannot use."""


@dataclass(frozen=True, slots=True)
class RecipientState:
    state: str = QUEUED
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: Reply | None = None
    greylisted: bool = False        # a greylisting reply was seen once (retry.next_delay)
    remote: str = ""                # the host that gave last_reply, e.g. "mx.example.net[192.0.2.1]"
    warned: bool = False            # a delay DSN was sent for it
    category: str = ""              # bounce category of last_reply (categories.py), for failures


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
class Change:
    """What one `Spool.modify()` commits beside the new recipient states: timeline events,
    new messages (DSNs, committed in the same transaction, invariant 2) and suppressions."""

    message: StoredMessage
    events: tuple[Event, ...] = ()
    new_messages: tuple[tuple[StoredMessage, bytes], ...] = ()
    suppress: tuple[Suppression, ...] = ()
    finished_at: float | None = None    # when the message finished, if this change finishes it


class BodyWriter(Protocol):
    """Collects one message body.  `write()` never blocks on fsync; the spool syncs at put()."""

    @property
    def size(self) -> int: ...

    def write(self, data: bytes) -> None: ...

    def abort(self) -> None: ...

    def read_chunks(self, offset: int = 0) -> Iterator[bytes]:
        """What was written, from `offset` on, in pieces (DKIM signing reads the body back;
        called off the reactor, after the last write)."""

    def prepend(self, data: bytes) -> None:
        """Put `data` in front of what was written (a DKIM-Signature header field; called off
        the reactor, after the last write and before put()).  On error the body is unchanged."""


class Spool(Protocol):
    def body_writer(self, message_id: str) -> BodyWriter: ...

    def put(self, message: StoredMessage, body: BodyWriter) -> "Deferred[None]":
        """Store envelope, recipient states, due-index entries and body in one durable commit."""

    def update(self, message: StoredMessage) -> "Deferred[None]":
        """Replace the recipient states of a stored message (and its due-index entries);
        remove the message and its body when no recipient is unfinished."""

    def modify(self, message_id: str, change: "Callable[[StoredMessage], StoredMessage]"
               ) -> "Deferred[StoredMessage | None]":
        """Read, change (pure, may run on another thread) and write one message's recipient
        states in one transaction; None if there is no such message."""

    def remove(self, message_id: str) -> "Deferred[None]":
        """Delete a message, its recipients, due entries and body."""

    def get(self, message_id: str) -> "Deferred[StoredMessage | None]": ...

    def read_body(self, message_id: str) -> "Deferred[bytes]": ...

    def due(self, now: float, limit: int) -> "Deferred[list[tuple[float, str]]]":
        """Up to `limit` (time, message id) pairs with a recipient due at or before `now`,
        oldest first; the time-ordered index, no scan."""

    def next_due(self, exclude: "set[str] | frozenset[str]" = frozenset()) -> "Deferred[float | None]":
        """The earliest due time of a recipient whose message is not in `exclude`."""

    def load_due(self, now: float, limit: int, exclude: "set[str] | frozenset[str]" = frozenset()
                 ) -> "Deferred[list[StoredMessage]]":
        """Up to `limit` messages with a recipient due at or before `now`, oldest due first,
        skipping the ids in `exclude` (those in flight), read from the due index."""

    def count(self) -> "Deferred[int]": ...

    def cache_get(self, key: str) -> "Deferred[bytes | None]":
        """A value of the small persistent cache other parts keep in the spool (MTA-STS
        policies, key "mta-sts:<domain>"), or None."""

    def cache_put(self, key: str, value: bytes) -> "Deferred[None]":
        """Store (replace) a cache value, durably, through the one writer."""

    def close(self) -> "Deferred[None]": ...


class SpoolView(Protocol):
    """Read-only access for other processes (`txmta queue list` while the daemon runs)."""

    def messages(self) -> Iterator[StoredMessage]: ...

    def get(self, message_id: str) -> StoredMessage | None: ...

    def read_body(self, message_id: str) -> bytes: ...

    def close(self) -> None: ...
