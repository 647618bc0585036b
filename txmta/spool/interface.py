"""What a spool is: the interface the queue uses, and the records it stores.

A spool keeps messages (envelope, arrival, body) and per-recipient state durably.
Every committed change carries its events into the **outbox** in the same transaction
(`txmta.events`; the queue publishes them in the worker after the commit): an entry exists
if and only if its change was committed.

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

from typing import Any, Callable, Collection, Iterator, Protocol, Sequence

from twisted.internet.defer import Deferred

from txmta.message import (BOUNCED, DELETED, DELIVERED, EXPIRED, FINAL, HELD, QUEUED,  # noqa: F401
                           SUPPRESSED, UNFINISHED, Change, Event, OutboxEntry, OutboxRecord,
                           RecipientState, StoredMessage, Suppression, intake_events,
                           received_event)
from txmta.message import CommitFailed, SpoolError, SpoolFormatError, SpoolFull  # noqa: F401



class BodyWriter(Protocol):
    """Collects one message body.  `write()` never blocks on fsync; the spool syncs at put().
    `write()` never raises either: a write that fails (a full disk) is kept, and put() then
    fails with it (SpoolFull) and stores nothing."""

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

    def put(self, message: StoredMessage, body: BodyWriter,
            outbox: "Sequence[OutboxEntry]" = ()) -> "Deferred[None]":
        """Store envelope, recipient states, due-index entries, body and the `outbox` entries
        (the message's events) in one durable commit."""

    def update(self, message: StoredMessage) -> "Deferred[None]":
        """Replace the recipient states of a stored message (and its due-index entries);
        remove the message and its body when no recipient is unfinished."""

    def modify(self, message_id: str, change: "Callable[[StoredMessage], StoredMessage]"
               ) -> "Deferred[StoredMessage | None]":
        """Read, change (pure, may run on another thread) and write one message's recipient
        states in one transaction; None if there is no such message."""

    def apply(self, message_id: str, change: "Callable[..., StoredMessage | Change]",
              with_body: bool = False) -> "Deferred[Change | None]":
        """Like `modify()`, with the events, new messages, suppressions and outbox entries of
        a `Change` committed in the same transaction; fires with the committed Change (None if there is
        no such message).  `change` may run more than once: it must be a pure function of
        the message it is given (and of the body, with `with_body`)."""

    def remove(self, message_id: str) -> "Deferred[None]":
        """Delete a message, its recipients, due entries and body."""

    def get(self, message_id: str) -> "Deferred[StoredMessage | None]": ...

    def read_body(self, message_id: str) -> "Deferred[bytes]": ...

    def due(self, now: float, limit: int) -> "Deferred[list[tuple[float, str]]]":
        """Up to `limit` (time, message id) pairs with a recipient due at or before `now`, by
        due class (lanes.due_class: priority, then fresh before retries), then oldest first;
        the index, no scan."""

    def next_due(self, exclude: "set[str] | frozenset[str]" = frozenset(),
                 classes: "Collection[int] | None" = None) -> "Deferred[float | None]":
        """The earliest due time of a recipient of `classes` (None: any) whose message is
        not in `exclude`."""

    def load_due(self, now: float, limit: int, exclude: "set[str] | frozenset[str]" = frozenset(),
                 classes: "Collection[int] | None" = None) -> "Deferred[list[StoredMessage]]":
        """Up to `limit` messages with a recipient of `classes` (None: any) due at or before
        `now`, by class, then oldest due first, skipping the ids in `exclude` (those in
        flight), read from the due index."""

    def load_due_groups(self, now: float, groups: "Sequence[tuple[Collection[int], int]]",
                        exclude: "set[str] | frozenset[str]" = frozenset()
                        ) -> "Deferred[list[list[StoredMessage]]]":
        """`load_due` for each (classes, limit) of `groups` in one read; a message is in the
        first group it is found in only."""

    def flush(self, now: float, domain: str | None = None, after: Any = None,
              limit: int = 1000) -> "Deferred[tuple[int, int, Any]]":
        """Make QUEUED recipients due after `now` due at `now`: all of this spool's
        partitions, or those at `domain` (case ignored); HELD ones stay held.  One batch of
        about `limit` recipients (whole messages) in one transaction, from the indexes alone
        (no message record is read); fires with (messages, recipients) made due and the
        `after` of the next batch, None when there is none.  Cost grows with the mail
        flushed (with the domain's mail), not with the queue (DESIGN invariant 6)."""

    def queued_at(self, domain: str) -> "Deferred[int]":
        """Messages with a recipient at `domain` (case ignored) still in the queue (deferred,
        due or held), in this spool's partitions; from the index alone, cost grows with the
        domain's mail."""

    def count(self) -> "Deferred[int]": ...

    def outbox_read(self, after: bytes | None = None, limit: int = 1000
                    ) -> "Deferred[list[tuple[bytes, OutboxRecord]]]":
        """Up to `limit` outbox entries (event id, record) with an id above `after` (from the
        first when None), in id order: time order within a worker.  Entries of several
        workers commit in their own order, so a reader keeps behind the newest ids."""

    def outbox_trim(self, before: float, limit: int = 1000) -> "Deferred[int]":
        """Forget up to `limit` outbox entries of events older than `before`, oldest first;
        how many went."""

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
