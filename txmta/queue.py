"""The queue: owner of message state, and the spool's only user.

It has three faces (txmta/faces.py): intake (`new_message_id`, `body_writer`, `put`),
delivery (`due`, `next_due`, `read_body`, `record`) and admin (hold, release, flush,
delete, requeue, status, the suppression list).

`put()` stores a new message with every recipient QUEUED and due now, in one durable
commit.  `record()` commits an attempt in one transaction: the outcomes (states, attempts,
next attempt from the retry policy, last reply), the recipients postponed because their
destination is throttled (next attempt moved, no attempt counted), those that expired
without an attempt because their deadline passed while they waited, the DSNs owed and the
suppressions of hard-bounced addresses.  `due()` reads messages with due recipients from
the spool's time-ordered index (invariant 6: no scans).

Deadlines (deadline.py): a recipient is tried until the earliest of its message's deadline
(`StoredMessage.expires`), its lane's (`Lane.deadline`, looked up in `lanes` each time, so
a new configuration applies to queued mail) and the end of its lifetime, with its lane's
retry schedule; its last attempt comes a margin before a deadline.  A recipient past its
deadline ends EXPIRED, never BOUNCED: its DSN says it was not delivered in time, and it is
never suppressed.  The lane's `dsn` policy bounds every DSN of its mail ("failures": no
delay warnings; "none": none at all; the events still happen), the recipient's NOTIFY
applies within it.

Every change writes its events (txmta/events.py) to the spool's outbox in its own
transaction, and only after the commit publishes the same events on `self.events`
(DESIGN invariant 3: persist first, then tell): the mail log, the dispatcher, the
suppression mirror and the worker's channel to the master are subscribers.  Nothing else
is told, and a subscriber never changes the queue.

Not here: delivering (dispatch.py, outbound/), deciding what a reply means (outcome.py),
the retry arithmetic (retry.py), building DSNs (dsn.py).
"""
# test: tests/test_queue.py

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Collection, Iterable, Mapping, Sequence

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txmta import deadline, dsn, retry, suppression
from txmta import events as E      # events.Deferred beside twisted's Deferred; `events` below is a timeline
from txmta.lanes import Lane, Lanes
from txmta.suppression import SuppressionList
from txmta.message import NO_LABELS, Envelope, Idempotency, Labels, MessageIds
from txmta.messagejson import iso_utc
from txmta.partition import ALL
from txmta.outcome import Delivered, Outcome, PermFailed, TempFailed
from txmta.reply import Reply
from txmta.message import BOUNCED, DELETED, DELIVERED, EXPIRED, HELD, QUEUED, SUPPRESSED, Change, Event, RecipientState, StoredMessage, Suppression
from txmta.spool.interface import BodyWriter, Spool

DEFAULT_SCHEDULE = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
DSN_FULL_LIMIT = 256 * 1024     # above this, a DSN returns only the header section unless RET=FULL
PICKED_KEPT = 10000             # pickup(): how many told-of ids a worker remembers

log = Logger()


SignReport = Callable[[bytes, float], bytes]


def _not_in_time(end: float) -> Reply:
    """What the events of a recipient that expired before any attempt carry as its reply
    (RFC 3463 X.4.7 "delivery time expired")."""
    return Reply(451, dsn.EXPIRED_STATUS,
                 f"Not delivered in time: its deadline {iso_utc(end)} passed before an attempt")


class Queue:
    """`sign_report(report, now)`: the DSN signed with DKIM, or unchanged; never raises
    (`set_sign_report` replaces it on SIGHUP).  `drop_suppressed`: a recipient on the
    suppression list ends at intake ([suppression] action = "drop").  `lanes`: the
    configured lanes (their deadlines, retry schedules and DSN policies); assign
    `queue.lanes` to apply new ones, to queued mail too."""

    def __init__(self, spool: Spool, clock: IReactorTime, *,
                 schedule: Sequence[float] = DEFAULT_SCHEDULE, max_lifetime: float = 5 * 86400.0,
                 jitter: Callable[[], float] | None = None, hostname: str = "localhost",
                 delay_warning: float = 4 * 3600.0,
                 suppress_categories: Iterable[str] = ("invalid-recipient", "bad-domain"),
                 suppression_ttl: float = 90 * 86400.0,
                 suppression_ttls: Mapping[str, float] | None = None,
                 partitions: Iterable[int] = ALL,
                 events: E.EventStream | None = None, sign_report: SignReport | None = None,
                 drop_suppressed: bool = False, lanes: Lanes | None = None) -> None:
        self.spool = spool
        self.clock = clock
        partitions = tuple(partitions)
        self.ids = MessageIds(partitions, clock=clock.seconds)   # this worker's partitions
        self.flush_batch = 1000     # recipients per spool transaction of a flush of all / a domain
        self.background_flush: Deferred[Any] | None = None  # the last one started: fires when done
        # no two workers share a partition, so no two make the same event id
        self.event_ids = E.EventIds(min(partitions))
        self.events = events or E.EventStream()
        self._status_parts: dict[str, Callable[[], Any]] = {}   # add_status
        self.schedule = tuple(schedule)
        self.max_lifetime = max_lifetime
        self.jitter = jitter
        self.hostname = hostname
        self.delay_warning = delay_warning          # 0: no delay DSNs
        self.suppress_categories = frozenset(suppress_categories)
        self.suppression_ttl = suppression_ttl
        # how long a hard bounce of each category suppresses (others: suppression_ttl)
        self.suppression_ttls = dict(suppression_ttls or {})
        self.suppression = SuppressionList()    # the mirror of the spool's list, a subscriber
        self.events.subscribe(lambda e: self.suppression.add(e.entry), E.SuppressionAdded)
        self.drop_suppressed = drop_suppressed
        self.lanes = lanes if lanes is not None else Lanes()
        self._sign_report = sign_report
        self._picked: dict[str, None] = {}     # pickup(): the ids told of, oldest first

    def set_sign_report(self, sign_report: SignReport | None) -> None:
        """The DKIM signing of DSNs from now on (SIGHUP); None: unsigned."""
        self._sign_report = sign_report

    # -- intake ---------------------------------------------------------------------------

    def new_message_id(self, now: float | None = None) -> str:
        return self.ids(now)

    def body_writer(self, message_id: str) -> BodyWriter:
        return self.spool.body_writer(message_id)

    def put(self, message_id: str, envelope: Envelope, body: BodyWriter, client: dict[str, str],
            arrival: float, header_id: str = "", labels: Labels = NO_LABELS,
            idempotency: Idempotency | None = None, lane: str = "",
            expires: float | None = None, priority: int = 0) -> Deferred[StoredMessage]:
        states = tuple(self._initial_state(r, arrival) for r in envelope.recipients)
        message = StoredMessage(message_id, envelope, arrival, body.size, states, client,
                                header_id=header_id, labels=labels, lane=lane, expires=expires,
                                priority=priority)
        number = E.Numbering(self.event_ids.base(arrival))
        told: list[E.Committed] = [E.Received(number(), message)]
        told += [E.Suppressed(number(), message, index)
                 for index, state in enumerate(message.recipients) if state.state == SUPPRESSED]
        d = self.spool.put(message, body, told, idempotency) if idempotency is not None \
            else self.spool.put(message, body, told)

        def committed(_: Any) -> StoredMessage:
            self.events.publish_all(told)
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

    def webhook_replay(self, message_id: str | None = None, event_id: str | None = None
                       ) -> Deferred[int]:
        """Queue the events of a message (or one event, by its webhook-id "msg_...") for
        the [[webhook]] endpoints again; how many deliveries were queued."""
        eid = None
        if event_id:
            from txmta.webhooks.sign import event_id_of
            try:
                eid = event_id_of(event_id)
            except ValueError:
                return succeed(0)
        return self.spool.hooks_replay(self.clock.seconds(), message_id, eid)

    @inlineCallbacks
    def idempotent_trim(self, before: float, batch: int = 1000) -> Any:
        """Forget idempotency keys stored before `before`, `batch` per spool transaction,
        until none is left; fires with how many."""
        total = 0
        while True:
            n = yield self.spool.idempotent_trim(before, batch)
            total += n
            if n < batch:
                return total

    def idempotent_get(self, key: bytes, not_before: float) -> Deferred[bytes | None]:
        """What a put with this idempotency key stored at or after `not_before`, or None."""
        return self.spool.idempotent_get(key, not_before)

    # -- suppression list (admin) -----------------------------------------------------------

    def load_suppressions(self) -> Deferred[int]:
        def loaded(entries: list[Suppression]) -> int:
            self.suppression.load(entries)
            return len(entries)
        return self.spool.suppression_all().addCallback(loaded)

    def suppression_entry(self, address: str) -> Suppression | None:
        """The mirror's entry for `address`, expired or not (None if it is not listed)."""
        return self.suppression.check(suppression.key(address), float("-inf"))

    def suppress_add(self, address: str, reason: str = "manual") -> Deferred[bool]:
        return self.suppress_import([(address, reason)]).addCallback(lambda n: n == 1)

    def suppress_import(self, entries: Sequence[tuple[str, str]]) -> Deferred[int]:
        now = self.clock.seconds()
        records = [Suppression(suppression.key(a), r or "manual", now, now + self.suppression_ttl)
                   for a, r in entries if a.strip()]

        def stored(n: int) -> int:
            for r in records:
                self.suppression.add(r)
            self.events.publish(E.SuppressionChanged(tuple(records)))
            return n
        return self.spool.suppression_put(records).addCallback(stored)

    def suppress_remove(self, address: str) -> Deferred[bool]:
        def removed(found: bool) -> bool:
            self.suppression.remove(address)
            self.events.publish(E.SuppressionChanged((), (suppression.key(address),)))
            return found
        return self.spool.suppression_delete(suppression.key(address)).addCallback(removed)

    @inlineCallbacks
    def suppress_merge(self, added: Sequence[Suppression], removed: Sequence[str]) -> Any:
        """Entries other nodes added and removed (cluster/suppression.py): stored as they
        come (their times and reasons), then mirrored; nothing is told."""
        if added:
            yield self.spool.suppression_put(list(added))
            for entry in added:
                self.suppression.add(entry)
        for address in removed:
            yield self.spool.suppression_delete(suppression.key(address))
            self.suppression.remove(address)

    @inlineCallbacks
    def expire_history(self, retention: float, batch: int = 1000) -> Any:
        """Forget finished messages older than `retention`, and outbox entries older than
        that (the outbox stays bounded until a webhook sender drains it), `batch` per spool
        transaction (so one call never holds the writer for long), until none is left."""
        before = self.clock.seconds() - retention
        total = 0
        while True:
            n = yield self.spool.expire_history(before, batch)
            total += n
            if n < batch:
                break
        while (yield self.spool.outbox_trim(before, batch)) >= batch:
            pass
        return total

    # -- delivery -------------------------------------------------------------------------

    def due(self, now: float, limit: int, exclude: Iterable[str] = (),
            classes: Collection[int] | None = None) -> Deferred[list[StoredMessage]]:
        """Messages due by `now` with recipients of the due `classes` (None: any), by class
        then time (lanes.due_class)."""
        return self.spool.load_due(now, limit, frozenset(exclude), classes)

    def due_groups(self, now: float, groups: Sequence[tuple[Collection[int], int]],
                   exclude: Iterable[str] = ()) -> Deferred[list[list[StoredMessage]]]:
        """`due` for each (classes, limit) of `groups`, in one read of the spool."""
        return self.spool.load_due_groups(now, groups, frozenset(exclude))

    def next_due(self, exclude: Iterable[str] = (), classes: Collection[int] | None = None
                 ) -> Deferred[float | None]:
        return self.spool.next_due(frozenset(exclude), classes)

    def read_body(self, message_id: str) -> Deferred[bytes]:
        return self.spool.read_body(message_id)

    # -- deadlines -------------------------------------------------------------------------

    def lane_of(self, message: StoredMessage) -> Lane:
        """The message's lane as configured now (the default lane for "" or for a lane no
        longer configured)."""
        return self.lanes.get(message.lane)

    def limit_of(self, message: StoredMessage) -> deadline.Limit:
        """Until when the message's recipients are tried, and their last attempt
        (deadline.py): its own deadline, its lane's, or the end of its lifetime.  Our own
        reports (DSNs) have only the lifetime: a lane's deadline is a promise about the
        application's mail, and a report that expired could not be reported."""
        own_report = "dsn_for" in message.client
        return deadline.limit(message.arrival, self.max_lifetime, message.expires,
                              None if own_report else self.lane_of(message).deadline)

    def past_deadline(self, message: StoredMessage, now: float) -> bool:
        """Whether the message's due recipients must expire without being tried: its
        deadline has passed (the dispatcher records them with `expired=`)."""
        return deadline.past_deadline(self.limit_of(message), now)

    # -- recording attempts ---------------------------------------------------------------

    def _next_state(self, message: StoredMessage, old: RecipientState, outcome: Outcome,
                    now: float, limit: deadline.Limit, lane: Lane) -> RecipientState:
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
        # the last attempt is at limit.last: retry.next_delay's "end of the lifetime"
        delay = retry.next_delay(attempts, now - message.arrival, lane.retry or self.schedule,
                                 limit.last - message.arrival, greylisted=outcome.greylisted,
                                 retry_after=outcome.retry_after,
                                 greylisted_before=old.greylisted, **kwargs)
        greylisted = old.greylisted or outcome.greylisted
        # a greylister lets through the retry from the address it greylisted (RFC 6647)
        source = outcome.source if outcome.greylisted and outcome.source else old.source
        if isinstance(delay, retry.Expired):
            return replace(old, state=EXPIRED, attempts=attempts, last_reply=outcome.reply,
                           remote=remote, greylisted=greylisted, source=source)
        return replace(old, state=QUEUED, attempts=attempts, next_attempt=now + delay,
                       last_reply=outcome.reply, remote=remote, greylisted=greylisted,
                       source=source)

    def record(self, message: StoredMessage, outcomes: Mapping[int, Outcome],
               postponed: Mapping[int, tuple[float, Reply]] | None = None,
               now: float | None = None, expired: Iterable[int] = ()
               ) -> Deferred[StoredMessage | None]:
        """Commit an attempt in one transaction, then publish its events.

        `outcomes`: what the attempt did to each recipient tried.  `postponed`: recipients
        of a throttled destination, moved to (time, reply) without counting an attempt
        (their destination was not tried; never past their deadline).  `expired`:
        recipients not tried because their deadline has passed (`past_deadline`): they end
        EXPIRED without an attempt.  The same transaction holds the timeline, the outbox,
        the suppressions of hard-bounced addresses, and every DSN owed (DESIGN invariant 2:
        a recipient fails only with its DSN committed).  Fires with the updated message
        (None if it left the spool)."""
        at = self.clock.seconds() if now is None else now
        base = self.event_ids.base(at)
        until = dict(postponed or {})
        late = sorted(set(expired) - set(outcomes))

        def change(current: StoredMessage, body: Callable[[], bytes]) -> Change:
            # runs on the spool's writer thread, maybe more than once (after the map grew):
            # a function of `current` and `body` alone, whose result says everything
            number = E.Numbering(base)      # the same event ids on every run
            lane = self.lane_of(current)
            limit = self.limit_of(current)
            states = list(current.recipients)
            for index, (when, reply) in sorted(until.items()):
                if states[index].state == QUEUED:
                    if limit.deadline:      # a throttle never carries it past its deadline
                        when = min(when, limit.end)
                    states[index] = replace(states[index], next_attempt=when, last_reply=reply)
            # (index, outcome, new state, time of the attempt or None): attempts, then the
            # recipients past their deadline, not tried
            ended: list[tuple[int, Outcome, RecipientState, float | None]] = []
            for index, outcome in sorted(outcomes.items()):
                old = states[index]
                if old.state != QUEUED:   # held or finished meanwhile
                    continue
                new = self._next_state(current, old, outcome, at, limit, lane)
                category = "" if isinstance(outcome, Delivered) else outcome.category
                ended.append((index, outcome, replace(new, category=category), at))
            for index in late:
                old = states[index]
                if old.state != QUEUED:
                    continue
                ended.append((index, TempFailed(old.last_reply or _not_in_time(limit.end),
                                                host=old.remote, category=old.category),
                              replace(old, state=EXPIRED), None))
            tried: list[tuple[int, Outcome, str]] = []
            events: list[Event] = []
            suppressions: list[Suppression] = []
            reports: dict[str, list[dsn.RecipientReport]] = {}
            for index, outcome, new, attempted in ended:
                rcpt = current.envelope.recipients[index]
                category = new.category
                events.append(Event(at, new.state if new.state != QUEUED else "deferred",
                                    str(rcpt.address), str(outcome.reply), new.remote, category,
                                    outcome.tls))
                action = self._report_action(current, new, outcome, rcpt, at, lane)
                if action is not None:
                    expiry = new.state == EXPIRED
                    reply = outcome.reply if attempted is not None else new.last_reply
                    reports.setdefault(action, []).append(dsn.RecipientReport(
                        rcpt, action,
                        dsn.EXPIRED_STATUS if expiry else dsn.status_for(action, reply),
                        reply, new.remote, attempted,
                        limit.end if action == dsn.DELAYED else None,
                        deadline=limit.end if expiry and limit.deadline else None))
                    if action == dsn.DELAYED:
                        new = replace(new, warned=True)
                # only a permanent failure suppresses: never an expiry, whatever its
                # last reply's category
                if new.state == BOUNCED and category in self.suppress_categories:
                    suppressions.append(Suppression(
                        suppression.key(str(rcpt.address)), category, at,
                        at + self.suppression_ttls.get(category, self.suppression_ttl),
                        str(outcome.reply)))
                states[index] = new
                tried.append((index, outcome, new.state))
            updated = replace(current, recipients=tuple(states))
            told: list[E.Committed] = [E.for_outcome(state)(number(), updated, index, outcome, at)
                                       for index, outcome, state in tried]
            new_messages = []
            for action, recipient_reports in reports.items():
                built = self._dsn(current, recipient_reports, body, at)
                if built is not None:
                    new_messages.append(built)
                    events.append(Event(at, "dsn", text=f"{action} report {built[0].id}"))
                    told.append(E.DsnQueued(number(), updated, built[0], action))
            told += [E.SuppressionAdded(number(), sup) for sup in suppressions]
            return Change(updated, tuple(events), tuple(new_messages), tuple(suppressions),
                          finished_at=at, outbox=tuple(told))

        def committed(done: Change | None) -> StoredMessage | None:
            if done is None:  # deleted by an admin while in flight
                return None
            updated = done.message
            left = updated if updated.unfinished else None
            self.events.publish_all(done.outbox)
            for index, (_, reply) in sorted(until.items()):
                if updated.recipients[index].state == QUEUED and index not in outcomes:
                    self.events.publish(E.Postponed(updated, index, reply, at))
            self._due(left, [m for m, _ in done.new_messages])
            return left

        return self.spool.apply(message.id, change, with_body=True).addCallback(committed)

    def _report_action(self, m: StoredMessage, new: RecipientState, outcome: Outcome,
                       rcpt: Any, now: float, lane: Lane) -> str | None:
        """The DSN action owed for this recipient after this attempt, if any: what the
        lane's dsn policy allows, and within it what the recipient's NOTIFY asks (RFC 3461)."""
        if m.envelope.sender.is_null:
            return None          # never a report for a report (invariant 7)
        if lane.dsn == "none":
            return None          # the events tell the application instead
        if new.state in (BOUNCED, EXPIRED):
            return dsn.FAILED if dsn.owed(rcpt, dsn.FAILED) else None
        if new.state == DELIVERED:
            if isinstance(outcome, Delivered) and not outcome.remote_dsn \
                    and dsn.owed(rcpt, dsn.RELAYED):
                return dsn.RELAYED    # the next hop cannot report success: we say "relayed"
            return None
        if (new.state == QUEUED and lane.dsn == "all" and self.delay_warning > 0
                and not new.warned and now - m.arrival >= self.delay_warning
                and dsn.owed(rcpt, dsn.DELAYED)):
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
        if self._sign_report is not None:  # on the writer thread, in the transaction that owes it
            report = self._sign_report(report, now)
        env = dsn.envelope_for_report(m.envelope, report)
        if env is None:
            return None
        states = tuple(RecipientState(QUEUED, 0, now) for _ in env.recipients)
        stored = StoredMessage(dsn_id, env, now, len(report), states,
                               {"address": "", "helo": "", "listener": "dsn", "dsn_for": m.id},
                               header_id=f"<{dsn_id}@{self.hostname}>",
                               # in the default lane, with its priority in the due order
                               lane=self.lanes.default,
                               priority=self.lanes.get(self.lanes.default).priority)
        return stored, report

    def _due(self, message: StoredMessage | None, new: Sequence[StoredMessage] = ()) -> None:
        """Publish `Due` with the earliest next attempt of a changed message and of the
        messages its change made (DSNs), if any."""
        times = [r.next_attempt for m in ([message] if message is not None else []) + list(new)
                 for r in m.recipients if r.state == QUEUED]
        if times:
            self.events.publish(E.Due(min(times)))

    # -- admin ----------------------------------------------------------------------------

    def _change(self, message_id: str, change: Callable[[RecipientState, float], RecipientState],
                retry_now: bool = False, event: str = "") -> Deferred[bool]:
        now = self.clock.seconds()
        base = self.event_ids.base(now)

        def apply(current: StoredMessage) -> Change:
            number = E.Numbering(base)
            updated = replace(current, recipients=tuple(change(r, now) for r in current.recipients))
            events = (Event(now, event, text="by the administrator"),) if event else ()
            told: list[E.Committed] = [
                E.Deleted(number(), updated, index, now)
                for index, (old, new) in enumerate(zip(current.recipients, updated.recipients))
                if new.state == DELETED and old.state != DELETED]
            if event and event != "deleted":
                told.append(E.AdminAction(number(), updated, event, now))
            return Change(updated, events, finished_at=now, outbox=tuple(told))

        def committed(done: Change | None) -> bool:
            if done is None:
                return False
            updated = done.message
            self.events.publish_all(done.outbox)
            if retry_now:  # an admin asked: whatever throttles its destinations is lifted
                self.events.publish(E.RetryNow(updated))
            self._due(updated if updated.unfinished else None)
            return True

        return self.spool.apply(message_id, apply).addCallback(committed)

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
    def flush(self, message_id: str | None = None, domain: str | None = None,
              background: bool = False) -> Any:
        """Make queued recipients due now: one message, one recipient domain, or all.

        A domain or all goes through the spool's indexes `flush_batch` recipients per transaction
        (intake commits in between), never loading a message (DESIGN invariant 6); fires
        with the number of messages that had recipients made due.

        `background` (the admin commands' flush of a domain, like `postqueue -s`): fire with
        the number of messages still queued for the domain (deferred, due or held: counted
        from the domains index's keys, no record read), then make its recipients due batch by
        batch, waking the dispatcher after each, so delivery starts with the first batch and
        the command does not wait for the last.  A restart in the middle leaves the rest as
        it was."""
        now = self.clock.seconds()
        if message_id is not None:
            found = yield self._change(message_id, lambda r, n: replace(r, next_attempt=n)
                                       if r.state == QUEUED else r, retry_now=True, event="flushed")
            return 1 if found else 0
        if domain is not None:
            domain = domain.lower()
        if background and domain is not None:
            count = yield self.spool.queued_at(domain)
            d = self._flush_batches(now, domain, wake_each=True)   # lifts throttles even if 0
            d.addErrback(lambda f: log.info("flush of {domain} stopped: {why}",
                                            domain=domain, why=f.getErrorMessage()))
            self.background_flush = d
            return count
        count = yield self._flush_batches(now, domain)
        return count

    @inlineCallbacks
    def _flush_batches(self, now: float, domain: str | None, wake_each: bool = False) -> Any:
        # an admin asked: whatever throttles the destinations concerned is lifted
        self.events.publish(E.RetryNow(None, domain=domain))
        count = 0
        after = None
        while True:
            messages, _, after = yield self.spool.flush(now, domain, after, self.flush_batch)
            count += messages
            if wake_each and messages:
                self.events.publish(E.Due(now))
            if after is None:
                break
        if count and not wake_each:
            self.events.publish(E.Due(now))     # one wake-up of the dispatcher for all of them
        return count

    def pickup(self, message_id: str) -> Deferred[bool]:
        """Another process (txmta-sendmail) committed the message `message_id` to the spool
        with its events: tell this worker's subscribers as if its own intake had (the mail
        log's `received` line, the metrics, the webhook sender, the dispatcher, which finds
        the message in the due index).  Changes nothing in the spool; a message already
        told of, one not in the spool, or one already tried is not told again (anyone may
        send Pickup), but the dispatcher is woken all the same.  Fires with whether the
        message was found."""
        def found(m: StoredMessage | None) -> bool:
            if m is None:
                self.events.publish(E.Due(self.clock.seconds()))
                return False
            fresh = message_id not in self._picked and not any(
                st.attempts for st in m.recipients)
            if fresh:
                self._picked[message_id] = None
                while len(self._picked) > PICKED_KEPT:
                    del self._picked[next(iter(self._picked))]
                told: list[E.Committed] = [E.Received(b"", m)]
                told += [E.Suppressed(b"", m, index) for index, st in enumerate(m.recipients)
                         if st.state == SUPPRESSED]
                self.events.publish_all(told)
            self.events.publish(E.Due(self.clock.seconds()))
            return True
        return self.spool.get(message_id).addCallback(found)

    def status(self) -> Deferred[dict[str, Any]]:
        """The message count, and what the parts added with `add_status` report."""
        def build(n: int) -> dict[str, Any]:
            out: dict[str, Any] = {"messages": n}
            for name, report in self._status_parts.items():
                out[name] = report()
            return out
        return self.spool.count().addCallback(build)

    def add_status(self, name: str, report: Callable[[], Any]) -> None:
        """Put `report()` (JSON-able) under `name` in `status()`: delivery's parts
        (per-provider shaping, relayhost circuits) are not the queue's, but status asks it."""
        self._status_parts[name] = report
