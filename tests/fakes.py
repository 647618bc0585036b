"""Fakes of the queue's faces (txmta/faces.py) and a spool whose commits can be made to fail.

`FakeQueue` keeps messages in a dict and answers at once: intake, delivery and admin, with
an event stream published after each "commit", as the real queue does.  It has no retry
policy (a temporary failure is due again `retry` seconds later), no lanes (only a
message's own deadline, `expires`, counts), no DSNs and no suppression by bounces.  tests/test_queue_faces.py runs the same contract tests on it and
on the real `Queue`, so a test that uses it tests against the real behaviour.

`FaultySpool` wraps a real spool; `fail_next` makes its next write fail as a failed
commit would, writing nothing.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any, Iterable, Mapping, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime

from txmta import events, suppression
from txmta.lanes import due_class
from txmta.message import AlreadySubmitted
from txmta.message import (BOUNCED, DELETED, DELIVERED, EXPIRED, HELD, NO_LABELS, QUEUED, Envelope, Labels,
                           RecipientState,
                           StoredMessage, Suppression)
from txmta.outcome import Delivered, Outcome, PermFailed, TempFailed
from txmta.reply import Reply
from txmta.spool.interface import BodyWriter, SpoolError
from txmta.spool.memory import MemoryBodyWriter


class FakeQueue:
    """The intake, delivery and admin faces of the queue, in memory."""

    def __init__(self, clock: IReactorTime, retry: float = 60.0) -> None:
        self.clock = clock
        self.retry = retry
        self.events = events.EventStream()
        self.messages: dict[str, StoredMessage] = {}
        self.bodies: dict[str, bytes] = {}
        self.suppressions: dict[str, Suppression] = {}
        self.fail_next: SpoolError | None = None
        self.idempotent: dict[bytes, tuple[float, bytes]] = {}
        self._ids = itertools.count(1)
        self._event_ids = events.EventIds(0)

    def idempotent_get(self, key: bytes, not_before: float) -> Deferred[bytes | None]:
        found = self.idempotent.get(key)
        return succeed(found[1] if found is not None and found[0] >= not_before else None)

    def _failing(self) -> SpoolError | None:
        err, self.fail_next = self.fail_next, None
        return err

    # -- intake ---------------------------------------------------------------------------

    def new_message_id(self, now: float | None = None) -> str:
        return f"fake{next(self._ids):07d}"

    def body_writer(self, message_id: str) -> MemoryBodyWriter:
        return MemoryBodyWriter()

    def put(self, message_id: str, envelope: Envelope, body: BodyWriter,
            client: dict[str, str], arrival: float, header_id: str = "",
            labels: Labels = NO_LABELS, idempotency: Any = None, lane: str = "",
            expires: float | None = None, priority: int = 0) -> Deferred[StoredMessage]:
        err = self._failing()
        if err is None and idempotency is not None:
            found = self.idempotent.get(idempotency.key)
            if found is not None and found[0] >= idempotency.not_before:
                err = AlreadySubmitted(found[1])
        if err is not None:
            body.abort()
            return fail(err)
        if idempotency is not None:
            self.idempotent[idempotency.key] = (arrival, idempotency.result)
        states = tuple(RecipientState(next_attempt=arrival) for _ in envelope.recipients)
        message = StoredMessage(message_id, envelope, arrival, body.size, states, client,
                                header_id=header_id, labels=labels, lane=lane, expires=expires,
                                priority=priority)
        self.messages[message_id] = message
        self.bodies[message_id] = b"".join(body.read_chunks())
        number = events.Numbering(self._event_ids.base(arrival))
        self.events.publish(events.Received(number(), message))
        return succeed(message)

    # -- delivery -------------------------------------------------------------------------

    def due(self, now: float, limit: int, exclude: Iterable[str] = (), classes: Any = None
            ) -> Deferred[list[StoredMessage]]:
        skip = set(exclude)
        found = []
        for m in self.messages.values():
            due = [(due_class(m.priority, r.attempts), r.next_attempt) for r in m.recipients
                   if r.state == QUEUED and r.next_attempt <= now
                   and (classes is None or due_class(m.priority, r.attempts) in classes)]
            if m.id not in skip and due:
                found.append((min(due), m.id, m))
        return succeed([m for _, _, m in sorted(found, key=lambda t: t[:2])][:limit])

    def due_groups(self, now: float, groups: Any, exclude: Iterable[str] = ()
                   ) -> Deferred[list[list[StoredMessage]]]:
        skip, out = set(exclude), []
        for classes, limit in groups:
            found = self.due(now, limit, skip, classes).result if limit > 0 else []
            skip.update(m.id for m in found)
            out.append(found)
        return succeed(out)

    def next_due(self, exclude: Iterable[str] = (), classes: Any = None
                 ) -> Deferred[float | None]:
        skip = set(exclude)
        times = [r.next_attempt for m in self.messages.values() if m.id not in skip
                 for r in m.recipients if r.state == QUEUED
                 and (classes is None or due_class(m.priority, r.attempts) in classes)]
        return succeed(min(times) if times else None)

    def read_body(self, message_id: str) -> Deferred[bytes]:
        return succeed(self.bodies[message_id])

    def past_deadline(self, message: StoredMessage, now: float) -> bool:
        return message.expires is not None and now >= message.expires

    def record(self, message: StoredMessage, outcomes: Mapping[int, Outcome],
               postponed: Mapping[int, tuple[float, Reply]] | None = None,
               now: float | None = None, expired: Iterable[int] = ()
               ) -> Deferred[StoredMessage | None]:
        err = self._failing()
        if err is not None:
            return fail(err)
        at = self.clock.seconds() if now is None else now
        current = self.messages.get(message.id)
        if current is None:
            return succeed(None)
        states = list(current.recipients)
        for i, (when, reply) in (postponed or {}).items():
            if states[i].state == QUEUED:
                states[i] = replace(states[i], next_attempt=when, last_reply=reply)
        tried = []
        for i, outcome in sorted(outcomes.items()):
            old = states[i]
            if old.state != QUEUED:
                continue
            if isinstance(outcome, Delivered):
                new = replace(old, state=DELIVERED, attempts=old.attempts + 1,
                              last_reply=outcome.reply)
            elif isinstance(outcome, PermFailed):
                new = replace(old, state=BOUNCED, attempts=old.attempts + 1,
                              last_reply=outcome.reply)
            else:
                new = replace(old, attempts=old.attempts + 1, next_attempt=at + self.retry,
                              last_reply=outcome.reply)
            states[i] = new
            tried.append((i, outcome, new.state))
        for i in sorted(set(expired) - set(outcomes)):
            old = states[i]
            if old.state == QUEUED:
                states[i] = replace(old, state=EXPIRED)
                reply = old.last_reply or Reply(451, "4.4.7", "Not delivered in time")
                tried.append((i, TempFailed(reply), EXPIRED))
        updated = replace(current, recipients=tuple(states))
        number = events.Numbering(self._event_ids.base(at))
        told = [events.for_outcome(state)(number(), updated, i, outcome, at)
                for i, outcome, state in tried]
        left = self._store(updated)
        self.events.publish_all(told)
        for i, (_, reply) in sorted((postponed or {}).items()):
            if states[i].state == QUEUED and i not in outcomes:
                self.events.publish(events.Postponed(updated, i, reply, at))
        self._publish_due(left)
        return succeed(left)

    def _store(self, m: StoredMessage) -> StoredMessage | None:
        if m.unfinished:
            self.messages[m.id] = m
            return m
        del self.messages[m.id]
        del self.bodies[m.id]
        return None

    def _publish_due(self, m: StoredMessage | None) -> None:
        times = [r.next_attempt for r in m.recipients if r.state == QUEUED] if m else []
        at = min(times) if times else None
        if at is not None:
            self.events.publish(events.Due(at))

    # -- admin ----------------------------------------------------------------------------

    def _change(self, message_id: str, change: Any, action: str, retry_now: bool = False
                ) -> Deferred[bool]:
        err = self._failing()
        if err is not None:
            return fail(err)
        current = self.messages.get(message_id)
        if current is None:
            return succeed(False)
        now = self.clock.seconds()
        updated = replace(current, recipients=tuple(change(r, now) for r in current.recipients))
        number = events.Numbering(self._event_ids.base(now))
        told: list[Any] = [events.Deleted(number(), updated, i, now)
                           for i, (old, new) in enumerate(zip(current.recipients, updated.recipients))
                           if new.state == DELETED and old.state != DELETED]
        if action != "deleted":
            told.append(events.AdminAction(number(), updated, action, now))
        left = self._store(updated)
        self.events.publish_all(told)
        if retry_now:
            self.events.publish(events.RetryNow(updated))
        self._publish_due(left)
        return succeed(True)

    def hold(self, message_id: str) -> Deferred[bool]:
        return self._change(message_id, lambda r, now: replace(r, state=HELD)
                            if r.state == QUEUED else r, "held")

    def release(self, message_id: str) -> Deferred[bool]:
        return self._change(message_id, lambda r, now: replace(r, state=QUEUED, next_attempt=now)
                            if r.state == HELD else r, "released", retry_now=True)

    def requeue(self, message_id: str) -> Deferred[bool]:
        return self._change(message_id, lambda r, now: RecipientState(QUEUED, 0, now)
                            if r.state in (QUEUED, HELD) else r, "requeued", retry_now=True)

    def delete(self, message_id: str) -> Deferred[bool]:
        return self._change(message_id, lambda r, now: replace(r, state=DELETED)
                            if r.state in (QUEUED, HELD) else r, "deleted")

    def pickup(self, message_id: str) -> Deferred[bool]:
        self.events.publish(events.Due(self.clock.seconds()))
        return succeed(True)

    def flush(self, message_id: str | None = None, domain: str | None = None,
              background: bool = False) -> Deferred[int]:
        # background: the answer counts the domain's queued messages; all is done before it
        if background and domain is not None:
            wanted = domain.lower()
            queued = sum(1 for m in self.messages.values() if any(
                r.state in (QUEUED, HELD) and rcpt.address.domain.lower() == wanted
                for rcpt, r in zip(m.envelope.recipients, m.recipients)))
            return self.flush(None, domain).addCallback(lambda _: queued)
        if message_id is not None:
            return self._change(message_id, lambda r, now: replace(r, next_attempt=now)
                                if r.state == QUEUED else r, "flushed",
                                retry_now=True).addCallback(int)
        now = self.clock.seconds()
        domain = None if domain is None else domain.lower()
        self.events.publish(events.RetryNow(None, domain=domain))
        count = 0
        for m in list(self.messages.values()):
            wanted = [domain is None or r.address.domain == domain
                      for r in m.envelope.recipients]
            if any(w and r.state == QUEUED and r.next_attempt > now
                   for w, r in zip(wanted, m.recipients)):
                states = tuple(replace(r, next_attempt=now) if w and r.state == QUEUED else r
                               for w, r in zip(wanted, m.recipients))
                self.messages[m.id] = replace(m, recipients=states)
                count += 1
        if count:
            self.events.publish(events.Due(now))
        return succeed(count)

    def status(self) -> Deferred[dict[str, Any]]:
        return succeed({"messages": len(self.messages)})

    def suppression_entry(self, address: str) -> Suppression | None:
        return self.suppressions.get(suppression.key(address))

    def suppress_add(self, address: str, reason: str = "manual") -> Deferred[bool]:
        return self.suppress_import([(address, reason)]).addCallback(lambda n: n == 1)

    def suppress_import(self, entries: Sequence[tuple[str, str]]) -> Deferred[int]:
        now = self.clock.seconds()
        added = [Suppression(suppression.key(a), r or "manual", now, now + 86400.0)
                 for a, r in entries if a.strip()]
        for e in added:
            self.suppressions[e.address] = e
        return succeed(len(added))

    def suppress_remove(self, address: str) -> Deferred[bool]:
        return succeed(self.suppressions.pop(suppression.key(address), None) is not None)

    def webhook_replay(self, message_id: str | None = None, event_id: str | None = None
                       ) -> Deferred[int]:
        return succeed(0)       # the fake keeps no webhook deliveries


class FaultySpool:
    """A spool whose next write (`put`, `apply`, `modify`) fails with `fail_next` when it is
    set, writing nothing; everything else goes to the wrapped spool."""

    def __init__(self, spool: Any) -> None:
        self.spool = spool
        self.fail_next: SpoolError | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.spool, name)

    def _failing(self) -> SpoolError | None:
        err, self.fail_next = self.fail_next, None
        return err

    def put(self, message: StoredMessage, body: Any, outbox: Sequence[Any] = (),
            idempotency: Any = None) -> Deferred[None]:
        err = self._failing()
        if err is not None:
            body.abort()
            return fail(err)
        if idempotency is not None:
            return self.spool.put(message, body, outbox, idempotency)
        return self.spool.put(message, body, outbox)

    def apply(self, message_id: str, change: Any, with_body: bool = False) -> Deferred[Any]:
        err = self._failing()
        if err is not None:
            return fail(err)
        return self.spool.apply(message_id, change, with_body)

    def modify(self, message_id: str, change: Any, with_body: bool = False) -> Deferred[Any]:
        err = self._failing()
        if err is not None:
            return fail(err)
        return self.spool.modify(message_id, change, with_body)

