"""The queue: owner of message state, and the spool's only user.

`put()` stores a new message with every recipient QUEUED and due now, in one durable
commit.  `record()` commits the outcomes of an attempt (states, attempts, next attempt from
the retry policy, last reply) in one transaction, and only then tells the mail log and the
listeners (DESIGN invariant 3: persist first, then tell memory).  `due()` reads messages
with due recipients from the spool's time-ordered index (invariant 6: no scans).
Admin changes (hold, release, delete, requeue, flush) go through here too.

Not here: delivering (dispatch.py, outbound/), deciding what a reply means (outcome.py),
the retry arithmetic (retry.py), DSNs (the bounce issue adds them to `record()`'s commit).
"""
# test: tests/test_queue.py

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterable, Mapping, Sequence

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime

from txmta import retry
from txmta.envelope import Envelope, new_message_id
from txmta.maillog import MailLog
from txmta.outcome import Delivered, Outcome, PermFailed, TempFailed
from txmta.reply import Reply
from txmta.spool.interface import (BOUNCED, DELETED, DELIVERED, EXPIRED, HELD, QUEUED,
                                   BodyWriter, RecipientState, Spool, StoredMessage)

DEFAULT_SCHEDULE = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)


class Queue:
    def __init__(self, spool: Spool, clock: IReactorTime, maillog: MailLog | None = None, *,
                 schedule: Sequence[float] = DEFAULT_SCHEDULE, max_lifetime: float = 5 * 86400.0,
                 jitter: Callable[[], float] | None = None) -> None:
        self.spool = spool
        self.clock = clock
        self.maillog = maillog or MailLog()
        self.schedule = tuple(schedule)
        self.max_lifetime = max_lifetime
        self.jitter = jitter
        self.listeners: list[Callable[[StoredMessage], Any]] = []       # new messages
        self.changed: list[Callable[[StoredMessage | None, float | None], Any]] = []  # after record/admin
        # told of an admin's "try now" (flush, release, requeue): the message, or None for all
        self.retry_now: list[Callable[[StoredMessage | None], Any]] = []

    # -- intake ---------------------------------------------------------------------------

    def new_message_id(self, now: float | None = None) -> str:
        return new_message_id(self.clock.seconds() if now is None else now)

    def body_writer(self, message_id: str) -> BodyWriter:
        return self.spool.body_writer(message_id)

    def put(self, message_id: str, envelope: Envelope, body: BodyWriter, client: dict[str, str],
            arrival: float) -> Deferred[StoredMessage]:
        states = tuple(RecipientState(next_attempt=arrival) for _ in envelope.recipients)
        message = StoredMessage(message_id, envelope, arrival, body.size, states, client)
        d = self.spool.put(message, body)

        def committed(_: Any) -> StoredMessage:
            self.maillog.received(message)
            for listener in self.listeners:
                listener(message)
            return message

        return d.addCallback(committed)

    # -- delivery -------------------------------------------------------------------------

    def due(self, now: float, limit: int, exclude: Iterable[str] = ()) -> Deferred[list[StoredMessage]]:
        return self.spool.load_due(now, limit, frozenset(exclude))

    def next_due(self, exclude: Iterable[str] = ()) -> Deferred[float | None]:
        return self.spool.next_due(frozenset(exclude))

    def read_body(self, message_id: str) -> Deferred[bytes]:
        return self.spool.read_body(message_id)

    def postpone(self, message: StoredMessage, until: Mapping[int, tuple[float, Reply]]
                 ) -> Deferred[StoredMessage | None]:
        """Move recipients of a throttled destination to the destination's next retry,
        without counting an attempt (their destination was not tried)."""
        def change(current: StoredMessage) -> StoredMessage:
            states = list(current.recipients)
            for index, (when, reply) in until.items():
                if states[index].state == QUEUED:
                    states[index] = replace(states[index], next_attempt=when, last_reply=reply)
            return replace(current, recipients=tuple(states))

        def committed(updated: StoredMessage | None) -> StoredMessage | None:
            if updated is not None:
                self._changed(updated if updated.unfinished else None)
            return updated

        return self.spool.modify(message.id, change).addCallback(committed)

    def _next_state(self, message: StoredMessage, old: RecipientState, outcome: Outcome,
                    now: float) -> RecipientState:
        remote = f"{outcome.host}[{outcome.address}]" if outcome.address else outcome.host
        if isinstance(outcome, Delivered):
            return replace(old, state=DELIVERED, attempts=old.attempts + 1,
                           last_reply=outcome.reply, remote=remote)
        if isinstance(outcome, PermFailed):
            return replace(old, state=BOUNCED, attempts=old.attempts + 1,
                           last_reply=outcome.reply, remote=remote)
        assert isinstance(outcome, TempFailed)
        attempts = old.attempts + 1
        kwargs = {} if self.jitter is None else {"jitter": self.jitter}
        delay = retry.next_delay(attempts, now - message.arrival, outcome.reply, self.schedule,
                                 self.max_lifetime, greylisted_before=old.greylisted, **kwargs)
        greylisted = old.greylisted or retry.greylisting_delay(outcome.reply) is not None
        if outcome.retry_after is not None and not isinstance(delay, retry.Expired):
            age = now - message.arrival
            delay = max(delay, outcome.retry_after)
            if age + delay > self.max_lifetime:  # never past the lifetime: last try at its end
                delay = self.max_lifetime - age
        if isinstance(delay, retry.Expired):
            return replace(old, state=EXPIRED, attempts=attempts, last_reply=outcome.reply,
                           remote=remote, greylisted=greylisted)
        return replace(old, state=QUEUED, attempts=attempts, next_attempt=now + delay,
                       last_reply=outcome.reply, remote=remote, greylisted=greylisted)

    def record(self, message: StoredMessage, outcomes: Mapping[int, Outcome],
               now: float | None = None) -> Deferred[StoredMessage | None]:
        """Commit the outcomes of an attempt in one transaction, then tell the others.

        Fires with the updated message (None if it left the spool)."""
        at = self.clock.seconds() if now is None else now

        def change(current: StoredMessage) -> StoredMessage:   # pure; on the spool's thread
            states = list(current.recipients)
            for index, outcome in outcomes.items():
                if states[index].state == QUEUED:   # not held or finished meanwhile
                    states[index] = self._next_state(current, states[index], outcome, at)
            return replace(current, recipients=tuple(states))

        def committed(updated: StoredMessage | None) -> StoredMessage | None:
            if updated is None:  # deleted by an admin while in flight
                return None
            for index, outcome in sorted(outcomes.items()):
                self.maillog.outcome(updated, index, outcome, at)
            left = updated if updated.unfinished else None
            self._changed(left)
            return left

        return self.spool.modify(message.id, change).addCallback(committed)

    def _changed(self, message: StoredMessage | None) -> None:
        nxt = None
        if message is not None:
            times = [r.next_attempt for r in message.recipients if r.state == QUEUED]
            nxt = min(times) if times else None
        for listener in self.changed:
            listener(message, nxt)

    # -- admin ----------------------------------------------------------------------------

    def _change(self, message_id: str, change: Callable[[RecipientState, float], RecipientState],
                retry_now: bool = False) -> Deferred[bool]:
        now = self.clock.seconds()

        def apply(current: StoredMessage) -> StoredMessage:
            return replace(current, recipients=tuple(change(r, now) for r in current.recipients))

        def committed(updated: StoredMessage | None) -> bool:
            if updated is None:
                return False
            if retry_now:  # an admin asked: whatever throttles its destinations is lifted
                for listener in self.retry_now:
                    listener(updated)
            self._changed(updated if updated.unfinished else None)
            return True

        return self.spool.modify(message_id, apply).addCallback(committed)

    def hold(self, message_id: str) -> Deferred[bool]:
        return self._change(message_id, lambda r, now: replace(r, state=HELD) if r.state == QUEUED else r)

    def release(self, message_id: str) -> Deferred[bool]:
        return self._change(message_id, lambda r, now: replace(r, state=QUEUED, next_attempt=now)
                            if r.state == HELD else r, retry_now=True)

    def requeue(self, message_id: str) -> Deferred[bool]:
        """Every unfinished recipient due now, as if new (attempts and greylisting state reset)."""
        return self._change(message_id, lambda r, now: RecipientState(QUEUED, 0, now)
                            if r.state in (QUEUED, HELD) else r, retry_now=True)

    def delete(self, message_id: str) -> Deferred[bool]:
        return self._change(message_id, lambda r, now: replace(r, state=DELETED)
                            if r.state in (QUEUED, HELD) else r)

    @inlineCallbacks
    def flush(self, message_id: str | None = None, domain: str | None = None) -> Any:
        """Make queued recipients due now: one message, one recipient domain, or all."""
        now = self.clock.seconds()
        if message_id is not None:
            found = yield self._change(message_id, lambda r, n: replace(r, next_attempt=n)
                                       if r.state == QUEUED else r, retry_now=True)
            return 1 if found else 0
        count = 0
        if domain is None:
            for listener in self.retry_now:
                listener(None)
        messages = yield self.spool.load_due(now + 1e12, 1 << 30)  # every queued message
        for m in messages:
            wanted = [domain is None or rcpt.address.domain == domain.lower()
                      for rcpt in m.envelope.recipients]
            if not any(w and r.state == QUEUED and r.next_attempt > now
                       for w, r in zip(wanted, m.recipients)):
                continue
            yield self._change(m.id, lambda r, n, _w=iter(wanted): replace(r, next_attempt=n)
                               if next(_w) and r.state == QUEUED else r, retry_now=True)
            count += 1
        return count

    def status(self) -> Deferred[dict[str, Any]]:
        return self.spool.count().addCallback(lambda n: {"messages": n})
