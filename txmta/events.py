"""The queue's events: what happened to mail, as values, and the stream that tells them.

Every state change anyone outside the queue cares about is an event value.  The committed
facts (`Received`, `Delivered`, `Deferred`, `Bounced`, `Expired`, `Suppressed`, `Deleted`,
`AdminAction`, `DsnQueued`, `SuppressionAdded`) carry an `event_id` and are written to the
spool's outbox in the same transaction as the change they describe; `Due` and `RetryNow`
are signals for the dispatcher, `Postponed` one for the mail log, `SuppressionChanged` one for
the cluster, never stored.  The queue publishes on its `EventStream` only after the commit
fired (DESIGN invariant 3, "persist first, then tell").

Refer to them through the module (`events.Deferred`): the names are the glossary's and one
of them is also Twisted's `Deferred`.

Exactly one terminal event per recipient (invariant 10): `Delivered`, `Bounced`, `Expired`,
`Suppressed` (at intake) or `Deleted` (by an admin).

An event id is the outbox key: 8 bytes of the event time in microseconds, 1 byte of the
partition of the worker that wrote it, 4 bytes of that worker's counter, 2 bytes of the
event's place in its change (`EventIds`).  Ids sort by time; two workers never share a
partition, so they never make the same id.

Pure values and a synchronous publisher: no I/O, no clock of its own (times come in).
"""
# test: tests/test_events.py, tests/test_queue_faces.py

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Union

from twisted.logger import Logger

from txmta.message import MessageFacts, OutboxRecord, StoredMessage, Suppression
from txmta.outcome import Outcome

log = Logger()


# -- committed facts (each is one outbox record) ------------------------------------------

def _remote(outcome: Outcome) -> str:
    return f"{outcome.host}[{outcome.address}]" if outcome.address else outcome.host


def _rcpt(message: StoredMessage, index: int) -> str:
    return str(message.envelope.recipients[index].address)


@dataclass(frozen=True)
class Received:
    """A message was committed (intake or the API; DSNs are `DsnQueued`)."""
    event_id: bytes
    message: StoredMessage

    def record(self) -> OutboxRecord:
        m = self.message
        return OutboxRecord("received", m.arrival, m.id,
                            text=f"from=<{m.envelope.sender}> nrcpt={len(m.envelope.recipients)} "
                                 f"size={m.size}", facts=MessageFacts.of(m))


@dataclass(frozen=True)
class _Attempted:
    """One recipient's outcome of one attempt; `message` holds its state after the commit."""
    event_id: bytes
    message: StoredMessage
    index: int
    outcome: Outcome
    at: float

    kind = ""

    def record(self) -> OutboxRecord:
        state = self.message.recipients[self.index]
        return OutboxRecord(self.kind, self.at, self.message.id, self.index,
                            _rcpt(self.message, self.index), self.outcome.reply.as_dict(),
                            _remote(self.outcome), state.category, self.outcome.tls,
                            state.attempts, facts=MessageFacts.of(self.message))


@dataclass(frozen=True)
class Delivered(_Attempted):
    kind = "delivered"


@dataclass(frozen=True)
class Deferred(_Attempted):
    """A temporary failure: the recipient stays queued until `message.recipients[index]
    .next_attempt`."""
    kind = "deferred"


@dataclass(frozen=True)
class Bounced(_Attempted):
    kind = "bounced"


@dataclass(frozen=True)
class Expired(_Attempted):
    kind = "expired"


@dataclass(frozen=True)
class Suppressed:
    """A recipient ended at intake: its address is on the suppression list (drop mode)."""
    event_id: bytes
    message: StoredMessage
    index: int

    def record(self) -> OutboxRecord:
        state = self.message.recipients[self.index]
        return OutboxRecord("suppressed", self.message.arrival, self.message.id, self.index,
                            _rcpt(self.message, self.index),
                            state.last_reply.as_dict() if state.last_reply else None,
                            category=state.category, facts=MessageFacts.of(self.message))


@dataclass(frozen=True)
class Deleted:
    """An admin deleted the recipient (no DSN)."""
    event_id: bytes
    message: StoredMessage
    index: int
    at: float

    def record(self) -> OutboxRecord:
        return OutboxRecord("deleted", self.at, self.message.id, self.index,
                            _rcpt(self.message, self.index), text="by the administrator")


@dataclass(frozen=True)
class AdminAction:
    """An admin held, released, requeued or flushed a message (`action`)."""
    event_id: bytes
    message: StoredMessage
    action: str
    at: float

    def record(self) -> OutboxRecord:
        return OutboxRecord(self.action, self.at, self.message.id, text="by the administrator")


@dataclass(frozen=True)
class DsnQueued:
    """A delivery status notification (`action`: failed, delayed, relayed) about `message`
    was queued as the message `report`, in the transaction of the outcome that owed it."""
    event_id: bytes
    message: StoredMessage
    report: StoredMessage
    action: str

    def record(self) -> OutboxRecord:
        return OutboxRecord("dsn", self.report.arrival, self.message.id,
                            rcpt=", ".join(str(r.address) for r in self.report.envelope.recipients),
                            text=f"{self.action} report {self.report.id}")


@dataclass(frozen=True)
class SuppressionAdded:
    """A hard bounce put an address on the suppression list."""
    event_id: bytes
    entry: Suppression

    def record(self) -> OutboxRecord:
        e = self.entry
        return OutboxRecord("suppression-added", e.since, "", rcpt=e.address, category=e.reason,
                            text=e.reply)


# -- signals (not stored) ---------------------------------------------------------------

@dataclass(frozen=True)
class Postponed:
    """After a commit: recipient `index` was not tried because its destination is throttled;
    it waits until `message.recipients[index].next_attempt` with `reply` as its last reply
    (no attempt counted, so no outbox record: the mail log's "deferred" line)."""
    message: StoredMessage
    index: int
    reply: Any
    at: float


@dataclass(frozen=True)
class Due:
    """After a change: the earliest next attempt it left (the dispatcher's timer)."""
    at: float


@dataclass(frozen=True)
class RetryNow:
    """An admin asked to try now (flush, release, requeue): whatever throttles the
    destinations of `message`, or of recipient `domain`, is lifted (of every destination,
    when both are None)."""
    message: StoredMessage | None
    domain: str | None = None


@dataclass(frozen=True)
class SuppressionChanged:
    """An admin change of the suppression list was committed (add, import, remove): the
    entries added, the addresses removed.  For the cluster's sharing of the list
    (cluster/suppression.py); a bounce's addition is `SuppressionAdded`.  Entries merged
    from other nodes are not told (they came from the cluster)."""
    added: tuple[Suppression, ...]
    removed: tuple[str, ...] = ()


Committed = Union[Received, Delivered, Deferred, Bounced, Expired, Suppressed, Deleted,
                  AdminAction, DsnQueued, SuppressionAdded]
Event = Union[Committed, Due, RetryNow, Postponed, SuppressionChanged]
ATTEMPTED = (Delivered, Deferred, Bounced, Expired)
TERMINAL = (Delivered, Bounced, Expired, Suppressed, Deleted)


def for_outcome(state: str) -> type[_Attempted]:
    """The event of an attempt that left a recipient in `state`."""
    return {"delivered": Delivered, "bounced": Bounced, "expired": Expired}.get(state, Deferred)


# -- event ids ------------------------------------------------------------------------------

class EventIds:
    """Makes the base of the ids of one change: time (µs), partition, counter.  The events
    of the change are `event_id(base, 0)`, `event_id(base, 1)`, … so a change function run
    twice names its events the same way twice."""

    def __init__(self, partition: int, first: int = 0) -> None:
        """`first`: where the counter starts; another process writing in the same
        partition (txmta-sendmail) starts at a random place, so its ids and the worker's
        would have to meet in the same microsecond and counter value."""
        self.partition = partition & 0xFF
        self._counter = itertools.count(first)

    def base(self, at: float) -> bytes:
        return struct.pack(">QBI", max(0, int(at * 1e6)), self.partition,
                           next(self._counter) & 0xFFFFFFFF)


def event_id(base: bytes, seq: int) -> bytes:
    return base + struct.pack(">H", seq)


def id_time(eid: bytes) -> float:
    """The time (seconds) an event id carries."""
    return struct.unpack(">Q", eid[:8])[0] / 1e6


def time_key(at: float) -> bytes:
    """The smallest event id of time `at`: ids below it are older."""
    return struct.pack(">Q", max(0, int(at * 1e6)))


class Numbering:
    """The ids of one run of a change function, in order."""

    def __init__(self, base: bytes) -> None:
        self.base = base
        self._seq = itertools.count()

    def __call__(self) -> bytes:
        return event_id(self.base, next(self._seq))


# -- the stream -----------------------------------------------------------------------------

Subscriber = Callable[[Any], Any]


class EventStream:
    """Synchronous publish/subscribe.  A subscriber is a callable, with the event types it
    wants (all when none are named).  One subscriber raising is logged and does not stop
    the others, nor the queue that publishes."""

    def __init__(self) -> None:
        self._subscribers: list[tuple[Subscriber, tuple[type, ...]]] = []

    def subscribe(self, subscriber: Subscriber, *kinds: type) -> None:
        # a new list, never changed in place: a publish under way goes on with the old one
        self._subscribers = self._subscribers + [(subscriber, kinds)]

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self._subscribers = [(s, k) for s, k in self._subscribers if s != subscriber]

    def publish(self, event: Any) -> None:
        for subscriber, kinds in self._subscribers:
            if kinds and not isinstance(event, kinds):
                continue
            try:
                subscriber(event)
            except Exception:
                log.failure("event subscriber {s!r} failed on {kind}", s=subscriber,
                            kind=type(event).__name__)

    def publish_all(self, events: Iterable[Any]) -> None:
        for event in events:
            self.publish(event)

