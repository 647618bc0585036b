"""The delivery loop: wakes when something is due, starts attempts, records their outcomes.

The dispatcher reads due messages from the queue's time-ordered index (never a scan),
splits each message's due recipients by destination (recipients of one message with the
same destination go in one attempt), runs the attempts through the deliverer, and hands
all outcomes of the message to `queue.record()`, which commits them in one transaction.
Nothing in flight is persisted (DESIGN invariant 3): after a crash every unfinished
recipient is due again at its stored time.

There is no polling loop: the dispatcher sleeps with one `callLater` until the next due
time, and is woken by finished attempts and by the queue's events (`heard`, subscribed by
worker.py to `HEARS`): new mail (`events.Received`), the next attempt a change left
(`events.Due`), an admin's "try now" (`events.RetryNow`).  A destination whose attempt
ended in a site failure (the deliverer's `AttemptResult.site_failure`, from
`outcome.classify`: its last host could not be reached, failed before the mail transaction or
closed the session with 421) is throttled as a whole: its other queued mail waits for the
destination's next retry instead of each message trying on its own; those recipients are
committed with the attempt's outcomes, in the same `record()`.  Outcomes are made by the
deliverer from classify's verdicts; the only ones made here, for our own bugs, are classified
too (`internal_error`).  A message whose deadline has passed (`queue.past_deadline`, see
deadline.py) is not tried: its due recipients are recorded as expired.

When the spool cannot commit an attempt's outcomes (`SpoolError`: a full disk or map), nothing
of the attempt is kept: its recipients stay as they were, still due, and a bounce owed stays
owed (the DSN is committed with the failure or not at all).  The message is then left out of
the scans for RECORD_RETRY seconds instead of being tried again at once, over and over.  A
next hop that accepted it will get it again (DESIGN invariant 3: the duplicate window between
its 250 and our commit).
"""
# test: tests/test_dispatch.py

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from txmta import events
from txmta import outcome as O
from txmta.faces import DeliveryQueue
from txmta.lanes import Lanes, due_groups
from txmta.reply import Reply
from txmta.message import QUEUED, StoredMessage
from txmta.message import SpoolError

log = Logger()
SCAN_COALESCE = 0.002   # seconds: wake-ups this close together share one scan
RECORD_RETRY = 10.0     # seconds a message whose outcomes the spool refused waits


def internal_error(text: str) -> O.Outcome:
    """The deferral of a recipient our own bug left without an outcome: a 451 4.3.0 (RFC 3463
    X.3.0 "other or undefined mail system status"), classified like any reply."""
    reply = Reply(451, "4.3.0", text)
    return O.classify(reply, "").outcome(reply, "")


def _pinned(message: StoredMessage, indices: list[int]) -> dict[int, str]:
    """The recipients among `indices` that must be tried from a given source address (the
    one they were greylisted from), and that address."""
    return {i: message.recipients[i].source for i in indices if message.recipients[i].source}


class BodyLoader:
    """Reads a message body from the spool on first use (only once a connection is ready),
    once for all the destinations of an attempt."""

    def __init__(self, queue: DeliveryQueue, message_id: str) -> None:
        self.queue = queue
        self.message_id = message_id
        self._body: bytes | None = None
        self._waiting: list[Deferred[bytes]] | None = None

    def __call__(self) -> Deferred[bytes]:
        if self._body is not None:
            return succeed(self._body)
        d: Deferred[bytes] = Deferred()
        if self._waiting is None:
            self._waiting = [d]
            self.queue.read_body(self.message_id).addCallbacks(self._loaded, self._failed)
        else:
            self._waiting.append(d)
        return d

    def _loaded(self, body: bytes) -> None:
        self._body = body
        waiting, self._waiting = self._waiting or [], None
        for d in waiting:
            d.callback(body)

    def _failed(self, failure: Any) -> None:
        waiting, self._waiting = self._waiting or [], None
        for d in waiting:
            d.errback(failure)


class Dispatcher:
    HEARS = (events.Received, events.Due, events.RetryNow)   # what `heard` wants of the stream

    def __init__(self, queue: DeliveryQueue, deliverer: Any, clock: IReactorTime, *,
                 max_inflight: int = 1000, metrics: Any = None, lanes: Lanes | None = None
                 ) -> None:
        self.queue = queue
        self.metrics = metrics          # txmta.metrics.Metrics: attempt durations
        self.deliverer = deliverer
        self.clock = clock
        self.max_inflight = max_inflight     # per group of due classes (a priority level)
        self.lanes = lanes if lanes is not None else Lanes()
        self.groups = due_groups(self.lanes)
        self.inflight: set[str] = set()
        self._group_of: dict[str, int] = {}  # message in flight -> its group
        self._busy = [0] * len(self.groups)  # messages in flight per group
        self.throttled: dict[str, tuple[float, Reply]] = {}
        self.unrecorded: dict[str, float] = {}  # message whose outcomes were refused -> until
        self._timer: IDelayedCall | None = None
        self._timer_at: float | None = None
        self._scanning = False
        self._again = False
        self._running = False
        self._drained: list[Deferred[None]] = []

    def heard(self, event: Any) -> None:
        """An event of the queue's stream: new mail wakes a (coalesced) scan, a change's next
        attempt sets the timer, an admin's "try now" lifts throttles."""
        if isinstance(event, events.Received):
            self.wake(self.clock.seconds() + SCAN_COALESCE)
        elif isinstance(event, events.Due):
            self.wake(event.at)
        elif isinstance(event, events.RetryNow):
            self._unthrottle(event.message, event.domain)

    # -- scheduling -----------------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        self.wake()

    def stop(self) -> Deferred[None]:
        """Start nothing new; fires when the attempts in flight have been recorded."""
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        d: Deferred[None] = Deferred()
        if self.inflight:
            self._drained.append(d)
        else:
            d.callback(None)
        return d

    def wake(self, at: float | None = None) -> None:
        """Scan for due mail at `at` (now if None); keeps only the earliest wake-up."""
        if not self._running:
            return
        now = self.clock.seconds()
        at = now if at is None else max(at, now)
        if self._timer is not None and self._timer.active():
            if self._timer_at is not None and self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.clock.callLater(at - now, self._scan)

    def _unthrottle(self, message: StoredMessage | None, domain: str | None = None) -> None:
        """An admin flushed (or released, requeued): try the destinations of the message, or
        of the domain, or all of them, again now."""
        if domain is not None:
            self.throttled.pop(self.deliverer.destination(domain), None)
        if message is not None:
            for rcpt in message.envelope.recipients:
                self.throttled.pop(self.deliverer.destination(rcpt.address.domain), None)
        if message is None and domain is None:
            self.throttled.clear()

    @inlineCallbacks
    def _scan(self) -> Any:
        self._timer = None
        self._timer_at = None
        if self._scanning:
            self._again = True
            return
        self._scanning = True
        try:
            more = True
            while self._running and more:
                self._again = False
                now = self.clock.seconds()
                skip = self._skipped(now)
                # one read for every group with room, highest priority first
                batches = [min(max(0, self.max_inflight - busy), 500) for busy in self._busy]
                if not any(batches):
                    break       # every group is full: a finishing attempt wakes us
                found = yield self.queue.due_groups(now, list(zip(self.groups, batches)),
                                                    exclude=skip)
                for g, messages in enumerate(found):
                    if not self._running:
                        break
                    for m in messages:
                        self._start(m, now, g)
                more = self._again or any(
                    batch and len(messages) >= batch for batch, messages in zip(batches, found))
            open_groups = [c for g, c in enumerate(self.groups)
                           if self._busy[g] < self.max_inflight]
            if self._running and open_groups:
                classes = frozenset().union(*open_groups)
                nxt = yield self.queue.next_due(exclude=self._skipped(self.clock.seconds()),
                                                classes=classes)
                if nxt is not None:
                    self.wake(nxt)
                if self.unrecorded:
                    self.wake(min(self.unrecorded.values()))
        except Exception:
            if self._running:
                log.failure("dispatch scan failed; retrying in 5 s")
                self.wake(self.clock.seconds() + 5)
        finally:
            self._scanning = False
        if self._again:
            self.wake()

    def _skipped(self, now: float) -> set[str]:
        """The messages a scan passes over: those in flight, and those whose outcomes the
        spool refused less than RECORD_RETRY ago."""
        for mid, until in list(self.unrecorded.items()):
            if until <= now:
                del self.unrecorded[mid]
        return self.inflight | self.unrecorded.keys()

    # -- attempts ---------------------------------------------------------------------------

    def _start(self, message: StoredMessage, now: float, group: int = 0) -> None:
        due = [i for i, r in enumerate(message.recipients)
               if r.state == QUEUED and r.next_attempt <= now]
        if not due:
            return
        self.inflight.add(message.id)
        self._group_of[message.id] = group
        self._busy[group] += 1
        if self.queue.past_deadline(message, now):
            # its deadline passed while it waited (e.g. behind a throttled destination):
            # it expires without an attempt
            d = self.queue.record(message, {}, expired=due)
        else:
            d = self._attempt(message, due, now)
        d.addErrback(self._attempt_failed, message.id)
        d.addBoth(self._finished, message.id)

    def _attempt_failed(self, failure: Any, message_id: str) -> None:
        if not self._running and failure.check(SpoolError):
            log.info("{id}: outcome not recorded during shutdown ({e}); due again at start",
                     id=message_id, e=failure.getErrorMessage())
            return
        if failure.check(SpoolError):
            self.unrecorded[message_id] = self.clock.seconds() + RECORD_RETRY
            log.warn("{id}: outcome not recorded ({e}); tried again in {s:.0f} s",
                     id=message_id, e=failure.getErrorMessage(), s=RECORD_RETRY)
            return
        log.failure("attempt for {id} failed", failure, id=message_id)

    def _finished(self, _: Any, message_id: str) -> None:
        self.inflight.discard(message_id)
        group = self._group_of.pop(message_id, None)
        if group is not None:
            self._busy[group] -= 1
        if not self.inflight and self._drained:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)
        # coalesce: attempts finishing close together share one scan of the due index
        self.wake(self.clock.seconds() + SCAN_COALESCE)

    @inlineCallbacks
    def _attempt(self, message: StoredMessage, due: list[int], now: float) -> Any:
        groups: dict[str, list[int]] = {}
        for i in due:
            dest = self.deliverer.destination(message.envelope.recipients[i].address.domain)
            groups.setdefault(dest, []).append(i)
        outcomes: dict[int, O.Outcome] = {}
        postponed: dict[int, tuple[float, Reply]] = {}
        live: list[tuple[str, list[int]]] = []
        for dest, indices in groups.items():
            throttle = self.throttled.get(dest)
            if throttle is not None and throttle[0] > now:
                for i in indices:
                    postponed[i] = throttle
            else:
                self.throttled.pop(dest, None)
                live.append((dest, indices))
        site_failed: list[tuple[str, list[int], Reply]] = []
        if live:
            body = BodyLoader(self.queue, message.id)
            started = self.clock.seconds()
            lane = self.lanes.name_of(message.lane)
            token = message.client.get("token", "")     # the API token's name (IP pools)
            attempts = [self.deliverer.deliver(message.envelope, indices, body, lane=lane,
                                               token=token, pinned=_pinned(message, indices))
                        for _, indices in live]
            results = yield DeferredList(attempts, consumeErrors=True)
            if self.metrics is not None:
                from txmta.metrics import attempt_result
                for ok, result in results:
                    if ok:
                        self.metrics.observe_attempt(self.clock.seconds() - started,
                                                     attempt_result(result.outcomes.values()))
            for (dest, indices), (ok, result) in zip(live, results):
                if not ok:
                    log.failure("delivery to {dest} failed", result, dest=dest)
                    outcomes.update(dict.fromkeys(indices,
                                                  internal_error("internal error during delivery")))
                    continue
                outcomes.update(result.outcomes)
                if result.site_failure is not None:
                    site_failed.append((dest, indices, result.site_failure))
        for i in due:  # every due recipient gets an outcome, or it would be due again at once
            if i not in outcomes and i not in postponed:
                log.error("{id}: no outcome for recipient {i}; deferring it", id=message.id, i=i)
                outcomes[i] = internal_error("internal error: no outcome")
        if not self._running:
            # shutting down: keep the facts (delivered, bounced) and leave the rest due;
            # a "shutting down" deferral is not an attempt worth counting
            outcomes = {i: o for i, o in outcomes.items() if not isinstance(o, O.TempFailed)}
            postponed = {}
        if outcomes or postponed:   # one commit for the attempt
            updated = yield self.queue.record(message, outcomes, postponed)
            for dest, indices, reply in site_failed:
                self._throttle(dest, indices, reply, updated)

    def _throttle(self, dest: str, indices: list[int], reply: Reply,
                  updated: StoredMessage | None) -> None:
        """Hold the destination's other mail until this message's next try for it."""
        if updated is None:
            return
        times = [updated.recipients[i].next_attempt for i in indices
                 if updated.recipients[i].state == QUEUED]
        if times:
            until = min(times)
            self.throttled[dest] = (until, reply)
            log.info("destination {dest} throttled for {s:.0f} s: {reply}", dest=dest,
                     s=until - self.clock.seconds(), reply=str(reply))
