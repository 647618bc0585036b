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

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime

from txmta import dsn, retry, suppression
from txmta.suppression import SuppressionList
from txmta.message import Envelope, MessageIds
from txmta.partition import ALL
from txmta.maillog import MailLog
from txmta.outcome import Delivered, Outcome, PermFailed, TempFailed
from txmta.reply import Reply
from txmta.message import BOUNCED, DELETED, DELIVERED, EXPIRED, HELD, QUEUED, SUPPRESSED, Change, Event, RecipientState, StoredMessage, Suppression
from txmta.spool.interface import BodyWriter, Spool

DEFAULT_SCHEDULE = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
DSN_FULL_LIMIT = 256 * 1024     # above this, a DSN returns only the header section unless RET=FULL


class Queue:
    def __init__(self, spool: Spool, clock: IReactorTime, maillog: MailLog | None = None, *,
                 schedule: Sequence[float] = DEFAULT_SCHEDULE, max_lifetime: float = 5 * 86400.0,
                 jitter: Callable[[], float] | None = None, hostname: str = "localhost",
                 delay_warning: float = 4 * 3600.0,
                 suppress_categories: Iterable[str] = ("invalid-recipient", "bad-domain"),
                 suppression_ttl: float = 90 * 86400.0, partitions: Iterable[int] = ALL) -> None:
        self.spool = spool
        self.clock = clock
        self.ids = MessageIds(partitions, clock=clock.seconds)   # this worker's partitions
        self.maillog = maillog or MailLog()
        self.schedule = tuple(schedule)
        self.max_lifetime = max_lifetime
        self.jitter = jitter
        self.hostname = hostname
        self.delay_warning = delay_warning          # 0: no delay DSNs
        self.suppress_categories = frozenset(suppress_categories)
        self.suppression_ttl = suppression_ttl
        self.suppressed: list[Callable[[Suppression], Any]] = []   # told of new suppressions
        self.suppression = SuppressionList()
        self.suppressed.append(self.suppression.add)
        self.drop_suppressed = False     # [suppression] action = "drop": end them at intake
        self.listeners: list[Callable[[StoredMessage], Any]] = []       # new messages
        self.changed: list[Callable[[StoredMessage | None, float | None], Any]] = []  # after record/admin
        # told of an admin's "try now" (flush, release, requeue): the message, or None for all
        self.retry_now: list[Callable[[StoredMessage | None], Any]] = []
        # DKIM: (report, now) -> the report signed, or unchanged; never raises (tap sets it)
        self.sign_report: Callable[[bytes, float], bytes] | None = None

    # -- intake ---------------------------------------------------------------------------

    def new_message_id(self, now: float | None = None) -> str:
        return self.ids(now)

    def body_writer(self, message_id: str) -> BodyWriter:
        return self.spool.body_writer(message_id)

    def put(self, message_id: str, envelope: Envelope, body: BodyWriter, client: dict[str, str],
            arrival: float, header_id: str = "") -> Deferred[StoredMessage]:
        states = tuple(self._initial_state(r, arrival) for r in envelope.recipients)
        message = StoredMessage(message_id, envelope, arrival, body.size, states, client,
                                header_id=header_id)
        d = self.spool.put(message, body)

        def committed(_: Any) -> StoredMessage:
            self.maillog.received(message)
            for index, state in enumerate(message.recipients):
                if state.state == SUPPRESSED:
                    self.maillog.suppressed(message, index)
            for listener in self.listeners:
                listener(message)
            return message

        return d.addCallback(committed)

    def _initial_state(self, rcpt: Any, arrival: float) -> RecipientState:
        if self.drop_suppressed:
            entry = self.suppression.check(str(rcpt.address), arrival)
            if entry is not None:
                return RecipientState(SUPPRESSED, 0, arrival,
                                      suppression.rejection(str(rcpt.address), entry),
                                      category=entry.reason)
        return RecipientState(next_attempt=arrival)

    # -- suppression list (admin) -----------------------------------------------------------

    def load_suppressions(self) -> Deferred[int]:
        def loaded(entries: list[Suppression]) -> int:
            self.suppression.load(entries)
            return len(entries)
        return self.spool.suppression_all().addCallback(loaded)

    def suppress_add(self, address: str, reason: str = "manual") -> Deferred[bool]:
        return self.suppress_import([(address, reason)]).addCallback(lambda n: n == 1)

    def suppress_import(self, entries: Sequence[tuple[str, str]]) -> Deferred[int]:
        now = self.clock.seconds()
        records = [Suppression(suppression.key(a), r or "manual", now, now + self.suppression_ttl)
                   for a, r in entries if a.strip()]

        def stored(n: int) -> int:
            for r in records:
                self.suppression.add(r)
            return n
        return self.spool.suppression_put(records).addCallback(stored)

    def suppress_remove(self, address: str) -> Deferred[bool]:
        def removed(found: bool) -> bool:
            self.suppression.remove(address)
            return found
        return self.spool.suppression_delete(suppression.key(address)).addCallback(removed)

    @inlineCallbacks
    def expire_history(self, retention: float, batch: int = 1000) -> Any:
        """Forget finished messages older than `retention`, `batch` per spool transaction
        (so one call never holds the writer for long), until none is left to forget."""
        before = self.clock.seconds() - retention
        total = 0
        while True:
            n = yield self.spool.expire_history(before, batch)
            total += n
            if n < batch:
                return total

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
        delay = retry.next_delay(attempts, now - message.arrival, self.schedule, self.max_lifetime,
                                 greylisted=outcome.greylisted, retry_after=outcome.retry_after,
                                 greylisted_before=old.greylisted, **kwargs)
        greylisted = old.greylisted or outcome.greylisted
        if isinstance(delay, retry.Expired):
            return replace(old, state=EXPIRED, attempts=attempts, last_reply=outcome.reply,
                           remote=remote, greylisted=greylisted)
        return replace(old, state=QUEUED, attempts=attempts, next_attempt=now + delay,
                       last_reply=outcome.reply, remote=remote, greylisted=greylisted)

    def record(self, message: StoredMessage, outcomes: Mapping[int, Outcome],
               now: float | None = None) -> Deferred[StoredMessage | None]:
        """Commit the outcomes of an attempt in one transaction, then tell the others.

        The same transaction holds the timeline events, the suppressions of hard-bounced
        addresses, and every DSN owed (DESIGN invariant 2: a recipient fails only with its
        DSN committed).  Fires with the updated message (None if it left the spool)."""
        at = self.clock.seconds() if now is None else now

        def change(current: StoredMessage, body: Callable[[], bytes]) -> Change:
            # runs on the spool's writer thread, maybe more than once (after the map grew):
            # a function of `current` and `body` alone, whose result says everything
            states = list(current.recipients)
            events: list[Event] = []
            suppressions: list[Suppression] = []
            reports: dict[str, list[dsn.RecipientReport]] = {}
            for index, outcome in sorted(outcomes.items()):
                old = states[index]
                if old.state != QUEUED:   # held or finished meanwhile
                    continue
                new = self._next_state(current, old, outcome, at)
                rcpt = current.envelope.recipients[index]
                category = "" if isinstance(outcome, Delivered) else outcome.category
                new = replace(new, category=category)
                events.append(Event(at, new.state if new.state != QUEUED else "deferred",
                                    str(rcpt.address), str(outcome.reply), new.remote, category,
                                    outcome.tls))
                action = self._report_action(current, new, outcome, rcpt, at)
                if action is not None:
                    reports.setdefault(action, []).append(dsn.RecipientReport(
                        rcpt, action,
                        dsn.EXPIRED_STATUS if new.state == EXPIRED else
                        dsn.status_for(action, outcome.reply),
                        outcome.reply, new.remote, at,
                        current.arrival + self.max_lifetime if action == dsn.DELAYED else None))
                    if action == dsn.DELAYED:
                        new = replace(new, warned=True)
                if new.state == BOUNCED and category in self.suppress_categories:
                    suppressions.append(Suppression(
                        suppression.key(str(rcpt.address)), category, at,
                        at + self.suppression_ttl, str(outcome.reply)))
                states[index] = new
            updated = replace(current, recipients=tuple(states))
            new_messages = []
            for action, recipient_reports in reports.items():
                built = self._dsn(current, recipient_reports, body, at)
                if built is not None:
                    new_messages.append(built)
                    events.append(Event(at, "dsn", text=f"{action} report {built[0].id}"))
            return Change(updated, tuple(events), tuple(new_messages), tuple(suppressions),
                          finished_at=at)

        def committed(done: Change | None) -> StoredMessage | None:
            if done is None:  # deleted by an admin while in flight
                return None
            updated = done.message
            for index, outcome in sorted(outcomes.items()):
                self.maillog.outcome(updated, index, outcome, at)
            for report, _ in done.new_messages:
                self.maillog.dsn(updated, report)
                for listener in self.listeners:
                    listener(report)
            for sup in done.suppress:
                for listener in self.suppressed:
                    listener(sup)
            left = updated if updated.unfinished else None
            self._changed(left)
            return left

        return self.spool.apply(message.id, change, with_body=True).addCallback(committed)

    def _report_action(self, m: StoredMessage, new: RecipientState, outcome: Outcome,
                       rcpt: Any, now: float) -> str | None:
        """The DSN action owed for this recipient after this attempt, if any (RFC 3461)."""
        if m.envelope.sender.is_null:
            return None          # never a report for a report (invariant 7)
        if new.state in (BOUNCED, EXPIRED):
            return dsn.FAILED if dsn.owed(rcpt, dsn.FAILED) else None
        if new.state == DELIVERED:
            if isinstance(outcome, Delivered) and not outcome.remote_dsn \
                    and dsn.owed(rcpt, dsn.RELAYED):
                return dsn.RELAYED    # the next hop cannot report success: we say "relayed"
            return None
        if (new.state == QUEUED and self.delay_warning > 0 and not new.warned
                and now - m.arrival >= self.delay_warning and dsn.owed(rcpt, dsn.DELAYED)):
            return dsn.DELAYED
        return None

    def _dsn(self, m: StoredMessage, reports: list[Any], body: Callable[[], bytes],
             now: float) -> tuple[StoredMessage, bytes] | None:
        envelope = m.envelope
        if envelope.requiretls or (envelope.ret != "FULL" and m.size > DSN_FULL_LIMIT):
            # only the header section: a big body is not needed, and the content of a
            # REQUIRETLS message is not sent back whatever RET asked for (RFC 8689)
            envelope = replace(envelope, ret="HDRS")
        original = body()
        dsn_id = self.new_message_id(now)
        report = dsn.build_report(envelope=envelope, message_id=m.id, arrival=m.arrival,
                                  reports=reports, original=original, reporting_mta=self.hostname,
                                  now=now, dsn_message_id=dsn_id,
                                  headers_only_above=DSN_FULL_LIMIT)
        if self.sign_report is not None:  # on the writer thread, in the transaction that owes it
            report = self.sign_report(report, now)
        env = dsn.envelope_for_report(m.envelope, report)
        if env is None:
            return None
        states = tuple(RecipientState(QUEUED, 0, now) for _ in env.recipients)
        stored = StoredMessage(dsn_id, env, now, len(report), states,
                               {"address": "", "helo": "", "listener": "dsn", "dsn_for": m.id},
                               header_id=f"<{dsn_id}@{self.hostname}>")
        return stored, report

    def _changed(self, message: StoredMessage | None) -> None:
        nxt = None
        if message is not None:
            times = [r.next_attempt for r in message.recipients if r.state == QUEUED]
            nxt = min(times) if times else None
        for listener in self.changed:
            listener(message, nxt)

    # -- admin ----------------------------------------------------------------------------

    def _change(self, message_id: str, change: Callable[[RecipientState, float], RecipientState],
                retry_now: bool = False, event: str = "") -> Deferred[bool]:
        now = self.clock.seconds()

        def apply(current: StoredMessage) -> Change:
            updated = replace(current, recipients=tuple(change(r, now) for r in current.recipients))
            events = (Event(now, event, text="by the administrator"),) if event else ()
            return Change(updated, events, finished_at=now)

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
        return self._change(message_id, lambda r, now: replace(r, state=HELD) if r.state == QUEUED
                            else r, event="held")

    def release(self, message_id: str) -> Deferred[bool]:
        return self._change(message_id, lambda r, now: replace(r, state=QUEUED, next_attempt=now)
                            if r.state == HELD else r, retry_now=True, event="released")

    def requeue(self, message_id: str) -> Deferred[bool]:
        """Every unfinished recipient due now, as if new (attempts and greylisting state reset)."""
        return self._change(message_id, lambda r, now: RecipientState(QUEUED, 0, now)
                            if r.state in (QUEUED, HELD) else r, retry_now=True, event="requeued")

    def delete(self, message_id: str) -> Deferred[bool]:
        return self._change(message_id, lambda r, now: replace(r, state=DELETED)
                            if r.state in (QUEUED, HELD) else r, event="deleted")

    @inlineCallbacks
    def flush(self, message_id: str | None = None, domain: str | None = None) -> Any:
        """Make queued recipients due now: one message, one recipient domain, or all."""
        now = self.clock.seconds()
        if message_id is not None:
            found = yield self._change(message_id, lambda r, n: replace(r, next_attempt=n)
                                       if r.state == QUEUED else r, retry_now=True, event="flushed")
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
