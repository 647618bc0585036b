"""The dispatcher delivers due mail, records outcomes, waits with one timer, throttles dead sites."""

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from txmta import outcome as O
from txmta.dispatch import SCAN_COALESCE, Dispatcher
from txmta.message import Address, Envelope, Recipient
from txmta.outbound.deliverer import AttemptResult
from txmta.queue import Queue
from txmta.reply import Reply
from txmta.message import QUEUED
from txmta.spool.memory import MemorySpool

OK = Reply(250, "2.0.0", "OK")
LATER = Reply(451, "4.3.0", "try later")


class FakeDeliverer:
    def __init__(self):
        self.calls = []          # (message recipients' addresses)
        self.answer = lambda env, indices: AttemptResult(
            {i: O.Delivered(OK, "mx", "127.0.0.21") for i in indices}, "d")
        self.hold = False
        self.pending = []
        self.bodies = []
        self.lanes = []          # the lane of each call

    def destination(self, domain):
        return domain

    def deliver(self, env, indices, body, lane="", **sources):
        self.calls.append([str(env.recipients[i].address) for i in indices])
        self.lanes.append(lane)
        if callable(body):  # as the pool does once a connection is ready
            self.bodies.append([])
            body().addCallback(self.bodies[-1].append)
        if self.hold:
            d = Deferred()
            self.pending.append((d, env, indices))
            return d
        return succeed(self.answer(env, indices))


def setup(schedule=(60.0, 300.0)):
    clock = Clock()
    clock.advance(1_700_000_000)
    spool = MemorySpool()
    queue = Queue(spool, clock, schedule=schedule, max_lifetime=3600.0, jitter=lambda: 0.0)
    deliverer = FakeDeliverer()
    dispatcher = Dispatcher(queue, deliverer, clock)
    queue.events.subscribe(dispatcher.heard, *Dispatcher.HEARS)   # as worker.py wires it
    dispatcher.start()
    return clock, spool, queue, deliverer, dispatcher


def put(queue, clock, *rcpts):
    env = Envelope(Address("app", "example.com"),
                   tuple(Recipient(Address(*r.split("@"))) for r in rcpts))
    mid = queue.new_message_id()
    body = queue.body_writer(mid)
    body.write(b"Subject: x\r\n\r\nhi\r\n")
    queue.put(mid, env, body, {}, clock.seconds())
    return mid


def test_new_mail_is_delivered_and_leaves_the_spool():
    """A message put in the queue is attempted at once; when delivered it leaves the spool."""
    clock, spool, queue, deliverer, _ = setup()
    put(queue, clock, "a@example.net")
    clock.advance(SCAN_COALESCE)
    assert deliverer.calls == [["a@example.net"]]
    assert deliverer.bodies == [[b"Subject: x\r\n\r\nhi\r\n"]]
    assert spool.messages == {}


def test_temporary_failure_is_retried_after_the_schedule():
    """A 4xx schedules the next attempt schedule[0] later, and no earlier (one timer, no polling)."""
    clock, spool, queue, deliverer, _ = setup()
    deliverer.answer = lambda env, idx: AttemptResult({i: O.TempFailed(LATER) for i in idx}, "d")
    mid = put(queue, clock, "a@example.net")
    clock.advance(SCAN_COALESCE)
    state = spool.messages[mid].recipients[0]
    assert state.state == QUEUED and state.attempts == 1
    assert state.next_attempt == clock.seconds() + 60
    clock.advance(59)
    assert len(deliverer.calls) == 1
    deliverer.answer = lambda env, idx: AttemptResult({i: O.Delivered(OK) for i in idx}, "d")
    clock.advance(1)
    assert len(deliverer.calls) == 2
    assert spool.messages == {}


def test_recipients_with_one_destination_share_an_attempt_and_others_get_their_own():
    """Recipients of one message are grouped by destination; all outcomes commit together."""
    clock, spool, queue, deliverer, _ = setup()
    put(queue, clock, "a@example.net", "b@example.net", "c@example.org")
    clock.advance(SCAN_COALESCE)
    assert sorted(deliverer.calls) == [["a@example.net", "b@example.net"], ["c@example.org"]]
    assert spool.messages == {}


def test_a_message_in_flight_is_not_attempted_twice():
    """While an attempt runs, wake-ups do not start another attempt for the same message."""
    clock, spool, queue, deliverer, dispatcher = setup()
    deliverer.hold = True
    mid = put(queue, clock, "a@example.net")
    clock.advance(SCAN_COALESCE)
    put(queue, clock, "b@example.net")
    clock.advance(SCAN_COALESCE)
    dispatcher.wake()
    clock.advance(SCAN_COALESCE)
    assert deliverer.calls == [["a@example.net"], ["b@example.net"]]
    d, env, indices = deliverer.pending[0]
    d.callback(AttemptResult({0: O.Delivered(OK)}, "d"))
    assert mid not in spool.messages


def test_a_dead_destination_is_throttled_as_a_whole():
    """After every host of a destination failed, its other queued mail waits for the
    destination's next retry instead of being tried message by message."""
    clock, spool, queue, deliverer, _ = setup()
    refused = Reply(451, "4.4.1", "connection refused")
    deliverer.answer = lambda env, idx: AttemptResult(
        {i: O.TempFailed(refused, stage=O.CONNECT) for i in idx}, "example.net", refused)
    first = put(queue, clock, "a@example.net")
    clock.advance(SCAN_COALESCE)
    assert len(deliverer.calls) == 1
    second = put(queue, clock, "b@example.net")
    clock.advance(SCAN_COALESCE)
    assert len(deliverer.calls) == 1          # not attempted: the destination is throttled
    until = spool.messages[first].recipients[0].next_attempt
    postponed = spool.messages[second].recipients[0]
    assert postponed.next_attempt == until and postponed.attempts == 0
    assert postponed.last_reply == refused
    deliverer.answer = lambda env, idx: AttemptResult({i: O.Delivered(OK) for i in idx}, "d")
    clock.advance(until - clock.seconds())
    assert len(deliverer.calls) == 3 and spool.messages == {}


def test_an_attempt_with_a_throttled_destination_is_one_commit():
    """A message with one recipient at a throttled destination and one elsewhere: the attempt's
    outcome and the postponed recipient are committed together, in one record()."""
    clock, spool, queue, deliverer, _ = setup()
    refused = Reply(451, "4.4.1", "connection refused")
    deliverer.answer = lambda env, idx: AttemptResult(
        {i: O.TempFailed(refused, stage=O.CONNECT) for i in idx}, "dead.example", refused)
    put(queue, clock, "a@dead.example")
    clock.advance(SCAN_COALESCE)
    deliverer.answer = lambda env, idx: AttemptResult({i: O.Delivered(OK) for i in idx}, "d")
    mid = put(queue, clock, "b@dead.example", "c@live.example")
    commits = spool.commits
    clock.advance(SCAN_COALESCE)
    assert deliverer.calls[-1] == ["c@live.example"]
    assert spool.commits == commits + 1
    waiting, done = spool.messages[mid].recipients
    assert waiting.attempts == 0 and waiting.last_reply == refused and done.state == "delivered"


def test_held_message_is_not_delivered_until_released():
    """hold keeps a message out of delivery; release makes it due at once."""
    clock, spool, queue, deliverer, dispatcher = setup()
    deliverer.answer = lambda env, idx: AttemptResult({i: O.TempFailed(LATER) for i in idx}, "d")
    mid = put(queue, clock, "a@example.net")
    clock.advance(SCAN_COALESCE)
    queue.hold(mid)
    clock.advance(3600)
    assert len(deliverer.calls) == 1
    deliverer.answer = lambda env, idx: AttemptResult({i: O.Delivered(OK) for i in idx}, "d")
    queue.release(mid)
    clock.advance(SCAN_COALESCE)
    assert len(deliverer.calls) == 2 and spool.messages == {}


def test_expiry_marks_recipients_expired_and_queues_one_failure_report():
    """Temporary failures past max_lifetime end the recipient as expired (not bounced); the
    message leaves with a failure DSN to its sender committed in the same transaction."""
    clock, spool, queue, deliverer, _ = setup(schedule=(1800.0,))
    deliverer.answer = lambda env, idx: AttemptResult({i: O.TempFailed(LATER) for i in idx}, "d")
    mid = put(queue, clock, "a@example.net")
    clock.advance(SCAN_COALESCE)
    clock.advance(1800)
    assert mid in spool.messages
    clock.advance(1800)                       # the last try, at the end of the lifetime
    assert mid not in spool.messages
    assert spool.history[mid][0].recipients[0].state == "expired"
    reports = list(spool.messages.values())
    assert len(reports) == 1 and reports[0].envelope.sender.is_null
    assert [str(r.address) for r in reports[0].envelope.recipients] == ["app@example.com"]
    assert b"Action: failed" in spool.bodies[reports[0].id]
    assert b"Status: 4.4.7" in spool.bodies[reports[0].id]


def test_stop_waits_for_attempts_in_flight_and_keeps_only_final_facts():
    """On shutdown the dispatcher starts nothing new, records deliveries that finish, drops
    deferrals (the recipients stay due at their stored time) and then says it is drained."""
    clock, spool, queue, deliverer, dispatcher = setup()
    deliverer.hold = True
    first = put(queue, clock, "a@example.net")
    second = put(queue, clock, "b@example.net")
    clock.advance(SCAN_COALESCE)
    assert len(deliverer.pending) == 2
    drained = []
    dispatcher.stop().addCallback(drained.append)
    put(queue, clock, "c@example.net")
    clock.advance(1)
    assert len(deliverer.calls) == 2                      # nothing new after stop
    (d1, _, i1), (d2, _, i2) = deliverer.pending
    d1.callback(AttemptResult({0: O.Delivered(OK)}, "d"))
    assert first not in spool.messages and drained == []
    d2.callback(AttemptResult({0: O.TempFailed(LATER)}, "d"))
    assert drained == [None]
    state = spool.messages[second].recipients[0]
    assert state.attempts == 0 and state.state == QUEUED


def test_flush_lifts_the_throttle_of_the_message_destinations():
    """`txmta queue flush ID` tries a throttled destination again at once (like postqueue -i)."""
    clock, spool, queue, deliverer, _ = setup()
    refused = Reply(451, "4.4.1", "connection refused")
    deliverer.answer = lambda env, idx: AttemptResult(
        {i: O.TempFailed(refused, stage=O.CONNECT) for i in idx}, "example.net", refused)
    mid = put(queue, clock, "a@example.net")
    clock.advance(SCAN_COALESCE)
    assert len(deliverer.calls) == 1
    deliverer.answer = lambda env, idx: AttemptResult({i: O.Delivered(OK) for i in idx}, "d")
    queue.flush(mid)
    clock.advance(SCAN_COALESCE)
    assert len(deliverer.calls) == 2 and spool.messages == {}


def test_flush_of_a_domain_lifts_its_throttle_and_not_anothers():
    """`txmta queue flush --domain D` tries throttled D again at once (like postqueue -s);
    another throttled destination keeps waiting; a flush of all lifts every throttle."""
    clock, spool, queue, deliverer, dispatcher = setup()
    refused = Reply(451, "4.4.1", "connection refused")
    deliverer.answer = lambda env, idx: AttemptResult(
        {i: O.TempFailed(refused, stage=O.CONNECT) for i in idx},
        env.recipients[idx[0]].address.domain, refused)
    net = put(queue, clock, "a@example.net")
    org = put(queue, clock, "b@example.org")
    clock.advance(SCAN_COALESCE)
    assert len(deliverer.calls) == 2 and set(dispatcher.throttled) == {"example.net", "example.org"}
    deliverer.answer = lambda env, idx: AttemptResult({i: O.Delivered(OK) for i in idx}, "d")
    counts = []
    queue.flush(domain="EXAMPLE.net").addCallback(counts.append)
    clock.advance(SCAN_COALESCE)
    assert counts == [1] and deliverer.calls[2:] == [["a@example.net"]]
    assert net not in spool.messages and org in spool.messages
    assert set(dispatcher.throttled) == {"example.org"}
    queue.flush().addCallback(counts.append)
    clock.advance(SCAN_COALESCE)
    assert counts == [1, 1] and deliverer.calls[3:] == [["b@example.org"]]
    assert spool.messages == {} and dispatcher.throttled == {}


def test_a_recipient_left_without_outcome_is_deferred_not_retried_at_once():
    """A deliverer bug that returns no outcome for a recipient must not make a hot loop."""
    clock, spool, queue, deliverer, _ = setup()
    deliverer.answer = lambda env, idx: AttemptResult({}, "d")
    mid = put(queue, clock, "a@example.net")
    clock.advance(10)
    assert len(deliverer.calls) == 1
    state = spool.messages[mid].recipients[0]
    assert state.attempts == 1 and state.next_attempt > clock.seconds()
    assert state.category == "other" and state.last_reply.enhanced == "4.3.0"


def test_a_failed_attempt_defers_its_recipients_as_classified():
    """An attempt that fails with our own bug defers its recipients with a 451 4.3.0 that
    went through outcome.classify like any reply (category and all), once, not at once again."""
    clock, spool, queue, deliverer, _ = setup()

    deliverer.hold = True
    mid = put(queue, clock, "a@example.net")
    clock.advance(SCAN_COALESCE)
    deliverer.pending[0][0].errback(RuntimeError("a bug in the deliverer"))
    clock.advance(10)
    assert len(deliverer.calls) == 1
    state = spool.messages[mid].recipients[0]
    assert state.attempts == 1 and state.next_attempt == clock.seconds() - 10 + 60
    assert state.category == "other" and state.last_reply.text == "internal error during delivery"
    assert not state.greylisted
