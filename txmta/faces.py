"""The three faces of the queue: what intake, delivery and the admin side may ask of it.

`txmta.queue.Queue` implements all three; each user is typed against the one it needs:
the receiver (inbound/receiver.py) against `IntakeQueue`, the dispatcher (dispatch.py)
against `DeliveryQueue`, the control code (control/amp.py, control/channel.py) against
`AdminQueue`.  Their fakes (tests/fakes.py) pass the same contract tests as the real queue
(tests/test_queue_faces.py).  None of them sees the spool: the body writer is the one spool
object intake holds, through the `BodyWriter` interface.

What the queue tells after a commit goes on its event stream (txmta/events.py), not
through these faces.  Interfaces only: no behaviour here.
"""
# test: tests/test_queue_faces.py

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Collection, Iterable, Mapping, Protocol, Sequence

from twisted.internet.defer import Deferred

from txmta.message import NO_LABELS, Envelope, Idempotency, Labels, StoredMessage, Suppression
from txmta.outcome import Outcome
from txmta.reply import Reply

if TYPE_CHECKING:
    from txmta.spool.interface import BodyWriter


class IntakeQueue(Protocol):
    """Intake: an id for a new message, a writer for its body, and the durable put (the
    250 waits for it; DESIGN invariant 1)."""

    def new_message_id(self, now: float | None = None) -> str: ...

    def body_writer(self, message_id: str) -> "BodyWriter": ...

    def put(self, message_id: str, envelope: Envelope, body: "BodyWriter",
            client: dict[str, str], arrival: float, header_id: str = "",
            labels: Labels = NO_LABELS, idempotency: Idempotency | None = None,
            lane: str = "", expires: float | None = None, priority: int = 0
            ) -> "Deferred[StoredMessage]":
        """Store the message with every recipient queued and due at `arrival` (or ended
        at intake, when suppressed in drop mode), in one durable commit; with
        `idempotency`, its result under its key too, or fail with AlreadySubmitted when
        the key has a fresh result (nothing stored)."""

    def idempotent_get(self, key: bytes, not_before: float) -> "Deferred[bytes | None]": ...


class DeliveryQueue(Protocol):
    """Delivery: what is due, the bodies, and one commit per attempt."""

    def due(self, now: float, limit: int, exclude: Iterable[str] = (),
            classes: Collection[int] | None = None) -> "Deferred[list[StoredMessage]]": ...

    def due_groups(self, now: float, groups: Sequence[tuple[Collection[int], int]],
                   exclude: Iterable[str] = ()) -> "Deferred[list[list[StoredMessage]]]": ...

    def next_due(self, exclude: Iterable[str] = (), classes: Collection[int] | None = None
                 ) -> "Deferred[float | None]": ...

    def read_body(self, message_id: str) -> "Deferred[bytes]": ...

    def past_deadline(self, message: StoredMessage, now: float) -> bool:
        """Whether the message's deadline has passed: its due recipients are not tried but
        recorded as `expired`."""

    def record(self, message: StoredMessage, outcomes: Mapping[int, Outcome],
               postponed: Mapping[int, tuple[float, Reply]] | None = None,
               now: float | None = None, expired: Iterable[int] = ()
               ) -> "Deferred[StoredMessage | None]":
        """One attempt, one commit: the recipients tried get their outcomes, the
        `postponed` ones (a throttled destination) their next attempt and reply without
        an attempt counted, the `expired` ones (past their deadline, not tried) end
        expired.  Fires with the message as committed, None once it left."""


class AdminQueue(Protocol):
    """The admin side: the `txmta queue` and `txmta suppression` commands."""

    def hold(self, message_id: str) -> "Deferred[bool]": ...

    def release(self, message_id: str) -> "Deferred[bool]": ...

    def flush(self, message_id: str | None = None, domain: str | None = None,
              background: bool = False) -> "Deferred[int]":
        """Messages with recipients made due (`background`, a domain: counted, then made
        due after the answer)."""

    def delete(self, message_id: str) -> "Deferred[bool]": ...

    def requeue(self, message_id: str) -> "Deferred[bool]": ...

    def pickup(self, message_id: str) -> "Deferred[bool]":
        """Another process committed `message_id`, due now: deliver it (a wake-up)."""

    def status(self) -> "Deferred[dict[str, Any]]": ...

    def suppress_add(self, address: str, reason: str = "manual") -> "Deferred[bool]": ...

    def suppress_remove(self, address: str) -> "Deferred[bool]": ...

    def webhook_replay(self, message_id: str | None = None, event_id: str | None = None
                       ) -> "Deferred[int]": ...

    def suppress_import(self, entries: Sequence[tuple[str, str]]) -> "Deferred[int]": ...

    def suppression_entry(self, address: str) -> Suppression | None:
        """The in-memory entry for `address` (expired or not), None if not listed."""
