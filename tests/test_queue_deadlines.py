"""Deadlines in the queue and the dispatcher: a recipient past its message's or its lane's
deadline ends expired (never bounced), with a DSN that says it was not delivered in time and
no suppression; its last attempt comes before the deadline; one waiting past its deadline is
not tried at all; the lane's dsn policy bounds every DSN.  Time is a Clock."""

from twisted.internet.task import Clock

from txmta import events
from txmta import outcome as O
from txmta.dispatch import SCAN_COALESCE, Dispatcher
from txmta.lanes import Lane, Lanes
from txmta.message import BOUNCED, EXPIRED, QUEUED, Address, Envelope, Recipient
from txmta.outbound.deliverer import AttemptResult
from txmta.queue import Queue
from txmta.reply import Reply
from txmta.spool.memory import MemorySpool

from test_dispatch import FakeDeliverer
from test_queue import Recorder, logged

T0 = 1_800_000_000.0
LATER = Reply(451, "4.4.1", "connection refused")
NO_SUCH = Reply(550, "5.1.1", "no such user")
# a deferral whose category would suppress the address if it were a permanent failure
NO_DOMAIN = O.TempFailed(Reply(451, "4.4.4", "no MX for dest.test"), stage=O.ROUTE,
                         category="bad-domain")

LANES = Lanes([Lane("transactional", deadline=None),
               Lane("fast", deadline=10.0),
               Lane("quarter", deadline=900.0, retry=(30.0, 60.0)),
               Lane("quiet", dsn="none"),
               Lane("quiet-fast", deadline=10.0, dsn="none"),
               Lane("failures", dsn="failures")])


def make(lanes=LANES, delay_warning=4 * 3600.0):
    clock = Clock()
    clock.advance(T0)
    spool = MemorySpool()
    rec = Recorder()
    q = logged(Queue(spool, clock, schedule=(60.0, 300.0), max_lifetime=86400.0,
                     jitter=lambda: 0.0, lanes=lanes, delay_warning=delay_warning), rec)
    told = []
    q.events.subscribe(told.append, events.Expired, events.Bounced, events.DsnQueued,
                       events.SuppressionAdded)
    return q, spool, clock, rec, told


def put(q, clock, n=1, lane="", expires=None, notify=()):
    env = Envelope(Address("app", "example.com"),
                   tuple(Recipient(Address(f"u{i}", "dest.test"), notify=notify)
                         for i in range(n)))
    mid = q.new_message_id()
    body = q.body_writer(mid)
    body.write(b"Subject: reset your password\r\n\r\nhi\r\n")
    done = []
    q.put(mid, env, body, {}, clock.seconds(), lane=lane, expires=expires).addCallback(done.append)
    return done[0]


def record(q, m, outcomes, **kw):
    done = []
    q.record(m, outcomes, **kw).addCallback(done.append)
    return done[0]


def tries(deliverer):
    """The attempts at dest.test (the DSNs go to example.com)."""
    return [c for c in deliverer.calls if c[0].endswith("@dest.test")]


def reports(spool):
    return [spool.bodies[m.id] for m in spool.messages.values() if m.envelope.sender.is_null]


def test_a_lane_deadline_expires_the_recipient_with_its_own_dsn_and_no_suppression():
    """10 s lane: first failure at arrival, the last attempt at 9 s, then expired (not
    bounced): an "expired" event, a failure DSN with 4.4.7 and "not delivered in time", and
    the address is not suppressed although the last reply's category would suppress it."""
    q, spool, clock, rec, told = make()
    m = put(q, clock, lane="fast")
    m = record(q, m, {0: NO_DOMAIN})
    assert m.recipients[0].state == QUEUED and m.recipients[0].next_attempt == T0 + 9.0
    clock.advance(9.0)
    assert record(q, m, {0: NO_DOMAIN}) is None            # the message left
    final = spool.history[m.id][0].recipients[0]
    assert final.state == EXPIRED and final.attempts == 2
    assert [type(e) for e in told] == [events.Expired, events.DsnQueued]
    assert [e["event"] for e in rec.events][-2:] == ["expired", "dsn"]
    [report] = reports(spool)
    assert b"Action: failed" in report and b"Status: 4.4.7" in report
    assert b"not delivered in time (deadline" in report
    assert b"Diagnostic-Code: smtp; 451 4.4.4 no MX for dest.test" in report
    assert spool.suppressions == {} and q.suppression_entry("u0@dest.test") is None


def test_a_message_deadline_counts_like_a_lane_deadline():
    """`expires` (X-Txmta-Expires, ExpiresAt, TTL) in the default lane: the same ending."""
    q, spool, clock, _, told = make()
    m = put(q, clock, expires=T0 + 100.0)
    m = record(q, m, {0: O.TempFailed(LATER)})
    assert m.recipients[0].next_attempt == T0 + 60.0       # the schedule, before the last
    clock.advance(60.0)
    m = record(q, m, {0: O.TempFailed(LATER)})
    assert m.recipients[0].next_attempt == T0 + 90.0       # last: 10 % before the deadline
    clock.advance(30.0)
    assert record(q, m, {0: O.TempFailed(LATER)}) is None
    assert isinstance(told[0], events.Expired)
    assert b"not delivered in time" in reports(spool)[0]


def test_the_earlier_of_the_message_and_lane_deadlines_wins():
    q, _, clock, _, _ = make()
    m = put(q, clock, lane="quarter", expires=T0 + 5.0)
    assert q.limit_of(m).end == T0 + 5.0
    m = put(q, clock, lane="quarter", expires=T0 + 5000.0)
    assert q.limit_of(m).end == T0 + 900.0


def test_the_lane_retry_schedule_paces_its_retries():
    """A lane with `retry` uses it instead of [retry] schedule (here 60 s, 300 s)."""
    q, _, clock, _, _ = make()
    m = put(q, clock, lane="quarter")
    m = record(q, m, {0: O.TempFailed(LATER)})
    assert m.recipients[0].next_attempt == T0 + 30.0
    clock.advance(30.0)
    m = record(q, m, {0: O.TempFailed(LATER)})
    assert m.recipients[0].next_attempt == T0 + 90.0


def test_a_new_lane_deadline_applies_to_queued_mail():
    """The lane's deadline is read when it is needed: a configuration that gives the lane a
    deadline ends mail queued before it."""
    q, spool, clock, _, _ = make()
    m = put(q, clock, lane="failures")
    m = record(q, m, {0: O.TempFailed(LATER)})
    assert m.recipients[0].next_attempt == T0 + 60.0
    q.lanes = Lanes([Lane("transactional"), Lane("failures", deadline=30.0)])
    clock.advance(60.0)
    assert q.past_deadline(m, clock.seconds())
    assert record(q, m, {0: O.TempFailed(LATER)}) is None
    assert spool.history[m.id][0].recipients[0].state == EXPIRED


def test_our_own_reports_have_no_lane_deadline():
    """A DSN is in the default lane but keeps only the lifetime: its lane's deadline is a
    promise about the application's mail, and an expired report could not be reported."""
    q, spool, clock, _, _ = make(lanes=Lanes([Lane("transactional", deadline=10.0)]))
    m = put(q, clock)
    record(q, m, {0: O.PermFailed(NO_SUCH)})
    [report] = [r for r in spool.messages.values() if r.envelope.sender.is_null]
    assert q.limit_of(m).deadline and q.limit_of(m).end == T0 + 10.0
    assert not q.limit_of(report).deadline and q.limit_of(report).end == T0 + 86400.0


def test_a_permanent_failure_before_the_deadline_still_bounces_and_suppresses():
    """The deadline changes nothing for a 5xx: bounced, and its category suppresses."""
    q, spool, clock, _, told = make()
    m = put(q, clock, lane="fast")
    record(q, m, {0: O.PermFailed(NO_SUCH, category="invalid-recipient")})
    assert spool.history[m.id][0].recipients[0].state == BOUNCED
    assert isinstance(told[0], events.Bounced)
    assert "u0@dest.test" in spool.suppressions


def test_a_lifetime_expiry_keeps_its_own_text():
    """Without a deadline, expiry at the end of the lifetime says "within the time allowed",
    not "not delivered in time"."""
    q, spool, clock, _, told = make()
    m = put(q, clock)
    clock.advance(86400.0)
    assert record(q, m, {0: O.TempFailed(LATER)}) is None
    [report] = reports(spool)
    assert b"within the time allowed" in report and b"not delivered in time" not in report
    assert isinstance(told[0], events.Expired)


# -- expiry without an attempt ----------------------------------------------------------------

def test_a_recipient_past_its_deadline_expires_without_an_attempt():
    """record(expired=...) ends recipients never tried (e.g. after a restart past the
    deadline): no attempt counted, an "expired" event each, one DSN for all without a
    Diagnostic-Code (no reply was ever seen) and no suppression."""
    q, spool, clock, rec, told = make()
    m = put(q, clock, n=2, lane="fast")
    clock.advance(3600.0)
    assert q.past_deadline(m, clock.seconds())
    assert record(q, m, {}, expired=[0, 1]) is None
    finals = spool.history[m.id][0].recipients
    assert [r.state for r in finals] == [EXPIRED, EXPIRED] and [r.attempts for r in finals] == [0, 0]
    assert [type(e) for e in told] == [events.Expired, events.Expired, events.DsnQueued]
    assert "4.4.7" in str(told[0].outcome.reply) and "deadline" in str(told[0].outcome.reply)
    assert [e["event"] for e in rec.events if e["event"] != "received"] == \
        ["expired", "expired", "dsn"]
    [report] = reports(spool)
    assert report.count(b"not delivered in time (deadline") == 2
    assert b"Diagnostic-Code" not in report and b"Status: 4.4.7" in report
    assert spool.suppressions == {}


def test_a_throttled_recipient_is_moved_no_later_than_its_deadline():
    """A throttle that lasts past the deadline moves the recipient to the deadline, where it
    expires instead of waiting for the throttle."""
    q, spool, clock, _, _ = make()
    m = put(q, clock, lane="fast")
    m = record(q, m, {}, postponed={0: (T0 + 300.0, LATER)})
    assert m.recipients[0].next_attempt == T0 + 10.0 and m.recipients[0].attempts == 0
    m = put(q, clock, lane="quarter")
    m = record(q, m, {}, postponed={0: (T0 + 300.0, LATER)})
    assert m.recipients[0].next_attempt == T0 + 300.0       # before its deadline: unchanged


def test_the_dispatcher_does_not_try_a_recipient_past_its_deadline():
    """Behind a throttled destination a recipient waits past its deadline: the dispatcher
    records it as expired without delivering it, and the DSN quotes the throttle's reply."""
    q, spool, clock, _, told = make()
    deliverer = FakeDeliverer()
    dispatcher = Dispatcher(q, deliverer, clock)
    q.events.subscribe(dispatcher.heard, *Dispatcher.HEARS)
    dispatcher.start()
    deliverer.answer = lambda env, idx: AttemptResult(
        {i: O.TempFailed(LATER, stage=O.CONNECT) for i in idx}, "dest.test", LATER)
    first = put(q, clock)                       # default lane: throttles dest.test for 60 s
    clock.advance(SCAN_COALESCE)
    assert len(tries(deliverer)) == 1
    late = put(q, clock, lane="fast")
    clock.advance(SCAN_COALESCE)
    assert len(tries(deliverer)) == 1            # postponed, to its deadline
    assert spool.messages[late.id].recipients[0].next_attempt == late.arrival + 10.0
    clock.advance(10.0)
    assert len(tries(deliverer)) == 1            # expired, never tried
    assert late.id not in spool.messages
    final = spool.history[late.id][0].recipients[0]
    assert final.state == EXPIRED and final.attempts == 0
    assert [type(e) for e in told] == [events.Expired, events.DsnQueued]
    [report] = reports(spool)
    assert b"not delivered in time" in report and b"connection refused" in report
    assert first.id in spool.messages and spool.suppressions == {}


def test_the_dispatcher_makes_the_last_attempt_before_the_deadline():
    """With the dispatcher: attempts at 0 and 9 s for a 10 s lane, then expired."""
    q, spool, clock, _, _ = make()
    deliverer = FakeDeliverer()
    dispatcher = Dispatcher(q, deliverer, clock)
    q.events.subscribe(dispatcher.heard, *Dispatcher.HEARS)
    dispatcher.start()
    deliverer.answer = lambda env, idx: AttemptResult(
        {i: O.TempFailed(Reply(451, "4.2.1", "busy")) for i in idx}, "d")
    m = put(q, clock, lane="fast")
    clock.advance(SCAN_COALESCE)
    clock.advance(9.0 - SCAN_COALESCE)
    assert len(tries(deliverer)) == 2
    assert m.id not in spool.messages
    assert spool.history[m.id][0].recipients[0].state == EXPIRED
    clock.advance(3600.0)
    assert len(tries(deliverer)) == 2


# -- the lane's dsn policy ----------------------------------------------------------------------

def test_dsn_none_sends_no_report_but_the_events_still_happen():
    """dsn = "none": neither an expiry nor a bounce makes a DSN; the events are there."""
    q, spool, clock, _, told = make()
    m = put(q, clock, n=2, lane="quiet-fast")
    record(q, m, {0: O.PermFailed(NO_SUCH)})
    clock.advance(20.0)
    record(q, spool.messages[m.id], {}, expired=[1])
    assert reports(spool) == []
    assert [type(e) for e in told] == [events.Bounced, events.Expired]


def test_dsn_failures_sends_no_delay_warning_but_the_failure():
    """dsn = "failures": no delay warning where "all" sends one; a failure still reports."""
    for lane, warned in (("transactional", True), ("failures", False)):
        q, spool, clock, _, _ = make(delay_warning=60.0)
        m = put(q, clock, lane=lane)
        clock.advance(60.0)
        m = record(q, m, {0: O.TempFailed(LATER)})
        assert m.recipients[0].warned is warned
        assert len(reports(spool)) == (1 if warned else 0)
    record(q, m, {0: O.PermFailed(NO_SUCH)})
    [report] = reports(spool)
    assert b"Action: failed" in report


def test_notify_still_applies_within_the_lane_policy():
    """NOTIFY=NEVER asks for nothing, whatever the lane allows."""
    q, spool, clock, _, told = make()
    m = put(q, clock, lane="fast", notify=("NEVER",))
    clock.advance(20.0)
    record(q, m, {}, expired=[0])
    assert reports(spool) == [] and isinstance(told[0], events.Expired)
