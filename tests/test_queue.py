"""The queue stores new messages with every recipient due at arrival, then tells others."""

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel

from txmta import events
from txmta.message import Address, Envelope, Recipient
from txmta.maillog import MailLog
from txmta.queue import Queue
from txmta.message import QUEUED
from txmta.spool.interface import CommitFailed
from txmta.spool.memory import MemorySpool


def envelope(n=2):
    return Envelope(Address("app", "example.com"),
                    tuple(Recipient(Address(f"u{i}", "example.net")) for i in range(n)))


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)


def logged(q, rec):
    """`q` with a mail log writing to `rec` subscribed to its events (as worker.py does)."""
    maillog = MailLog(Logger(namespace="txmta.maillog", observer=rec))
    q.events.subscribe(maillog.heard, *maillog.HEARS)
    return q


def make_queue():
    clock = Clock()
    clock.advance(1_700_000_000)
    rec = Recorder()
    spool = MemorySpool()
    q = logged(Queue(spool, clock), rec)
    return q, spool, clock, rec


def test_put_stores_every_recipient_queued_and_due_at_arrival():
    """A new message's recipients are QUEUED, with no attempts, due at arrival."""
    q, spool, clock, _ = make_queue()
    mid = q.new_message_id()
    body = q.body_writer(mid)
    body.write(b"Subject: hi\r\n\r\nbody\r\n")
    results = []
    q.put(mid, envelope(), body, {"address": "127.0.0.1"}, clock.seconds()).addCallback(results.append)
    stored = spool.messages[mid]
    assert results == [stored]
    assert [r.state for r in stored.recipients] == [QUEUED, QUEUED]
    assert all(r.next_attempt == clock.seconds() and r.attempts == 0 for r in stored.recipients)
    assert stored.size == len(b"Subject: hi\r\n\r\nbody\r\n")
    due = []
    spool.due(clock.seconds(), 10).addCallback(due.append)
    assert due == [[(clock.seconds(), mid)]]


def test_mail_log_and_subscribers_hear_only_after_the_commit():
    """Persist first, then tell (DESIGN invariant 3): a failed commit logs nothing."""
    q, spool, clock, rec = make_queue()
    heard = []
    q.events.subscribe(lambda e: heard.append(e.message), events.Received)
    spool.fail_next = CommitFailed("disk on fire")
    mid = q.new_message_id()
    failures = []
    q.put(mid, envelope(1), q.body_writer(mid), {}, clock.seconds()).addErrback(failures.append)
    assert len(failures) == 1 and failures[0].check(CommitFailed)
    assert rec.events == [] and heard == [] and spool.messages == {}
    mid2 = q.new_message_id()
    q.put(mid2, envelope(1), q.body_writer(mid2), {"address": "192.0.2.1", "tls": "TLSv1.3 X"},
          clock.seconds())
    assert [m.id for m in heard] == [mid2]
    assert len(rec.events) == 1
    event = rec.events[0]
    assert event["id"] == mid2 and event["event"] == "received" and event["nrcpt"] == 1
    assert event["log_level"] == LogLevel.info
    assert event["client"] == "192.0.2.1" and event["tls"] == "TLSv1.3 X"


def test_message_ids_sort_by_arrival_and_are_unique():
    """Queue ids sort in arrival order, even for ids made in the same microsecond."""
    q, _, clock, _ = make_queue()
    ids = [q.new_message_id(clock.seconds() + i // 10) for i in range(100)]
    assert ids == sorted(ids) and len(set(ids)) == 100


# -- record: outcomes committed in one transaction ------------------------------------------

from txmta import outcome as O  # noqa: E402
from txmta.reply import Reply  # noqa: E402
from txmta.message import BOUNCED, DELIVERED, HELD  # noqa: E402

OK = Reply(250, "2.0.0", "OK")
LATER = Reply(451, "4.3.0", "try later")
GREY = Reply(451, "4.7.1", "Greylisted, please retry in 120 seconds")


def queue_with(schedule=(60.0, 300.0), lifetime=3600.0):
    clock = Clock()
    clock.advance(1_700_000_000)
    spool = MemorySpool()
    rec = Recorder()
    q = logged(Queue(spool, clock, schedule=schedule, max_lifetime=lifetime, jitter=lambda: 0.0),
               rec)
    return q, spool, clock, rec


def stored(q, clock, n=2):
    mid = q.new_message_id()
    done = []
    q.put(mid, envelope(n), q.body_writer(mid), {}, clock.seconds()).addCallback(done.append)
    return done[0]


def test_record_commits_each_outcome_and_logs_after():
    """Delivered and bounced recipients become final; a deferred one is due after schedule[0]."""
    q, spool, clock, rec = queue_with()
    m = stored(q, clock, 3)
    clock.advance(10)
    q.record(m, {0: O.Delivered(OK, "mx", "192.0.2.1"), 1: O.PermFailed(Reply(550, "5.1.1", "no")),
                 2: O.TempFailed(LATER)})
    states = spool.messages[m.id].recipients
    assert [s.state for s in states] == [DELIVERED, BOUNCED, QUEUED]
    assert states[2].attempts == 1 and states[2].next_attempt == clock.seconds() + 60
    assert states[0].remote == "mx[192.0.2.1]" and states[1].last_reply.code == 550
    events = [e["event"] for e in rec.events]
    assert events == ["received", "sent", "bounced", "deferred", "dsn"]
    reports = [m for m in spool.messages.values() if m.envelope.sender.is_null]
    assert len(reports) == 1 and b"Action: failed" in spool.bodies[reports[0].id]


def test_greylisting_reply_waits_the_named_delay_once():
    """A greylisting 4xx is retried after the delay it names, once; then the schedule goes on."""
    q, spool, clock, _ = queue_with()
    m = stored(q, clock, 1)
    q.record(m, {0: O.TempFailed(GREY, greylisted=True, retry_after=120.0)})
    state = spool.messages[m.id].recipients[0]
    assert state.greylisted and state.next_attempt == clock.seconds() + 120
    q.record(spool.messages[m.id], {0: O.TempFailed(GREY, greylisted=True, retry_after=120.0)})
    state = spool.messages[m.id].recipients[0]
    assert state.attempts == 2 and state.next_attempt == clock.seconds() + 300


def test_the_source_address_a_recipient_was_greylisted_from_is_kept():
    """The source address of the greylisted attempt is stored for the recipient (its retry
    goes from it); later deferrals that are not greylisting keep it; other deferrals store
    none."""
    q, spool, clock, _ = queue_with()
    m = stored(q, clock, 2)
    q.record(m, {0: O.TempFailed(GREY, greylisted=True, retry_after=120.0, source="192.0.2.10"),
                 1: O.TempFailed(LATER, source="192.0.2.11")})
    first, other = spool.messages[m.id].recipients
    assert (first.source, other.source) == ("192.0.2.10", "")
    q.record(spool.messages[m.id], {0: O.TempFailed(LATER, source="192.0.2.12")})
    assert spool.messages[m.id].recipients[0].source == "192.0.2.10"


def test_the_category_recorded_is_the_one_the_outcome_carries():
    """The queue reads no reply: the state, the timeline and the suppression list get the
    category outcome.classify put in the outcome (only invalid-recipient suppresses here)."""
    q, spool, clock, _ = queue_with()
    m = stored(q, clock, 2)
    q.record(m, {0: O.PermFailed(Reply(550, "5.1.1", "no such user"), category="policy"),
                 1: O.PermFailed(Reply(550, "5.7.1", "blocked"), category="invalid-recipient")})
    states = spool.history[m.id][0].recipients
    assert [s.category for s in states] == ["policy", "invalid-recipient"]
    assert [e.category for e in spool.events[m.id] if e.kind == "bounced"] == [
        "policy", "invalid-recipient"]
    assert sorted(spool.suppressions) == ["u1@example.net"]


def test_retry_after_never_goes_past_the_lifetime():
    """A reply asking for a long wait is cut at the end of the lifetime."""
    q, spool, clock, _ = queue_with(lifetime=600.0)
    m = stored(q, clock, 1)
    clock.advance(500)
    q.record(m, {0: O.TempFailed(LATER, retry_after=3600.0)})
    state = spool.messages[m.id].recipients[0]
    assert state.state == QUEUED and state.next_attempt == m.arrival + 600.0


def test_lifetime_over_expires_the_recipient_and_the_message_leaves():
    """Temporary failure past max_lifetime: expired (not bounced), and the message is gone."""
    q, spool, clock, rec = queue_with(lifetime=600.0)
    m = stored(q, clock, 1)
    clock.advance(600)
    left = []
    q.record(m, {0: O.TempFailed(LATER)}).addCallback(left.append)
    assert left == [None] and m.id not in spool.messages
    assert [e["event"] for e in rec.events[-2:]] == ["expired", "dsn"]
    [report] = spool.messages.values()       # the failure report, committed with the expiry
    assert report.envelope.sender.is_null and b"Status: 4.4.7" in spool.bodies[report.id]


def test_admin_changes_hold_release_requeue_delete_flush():
    """hold/release/requeue/delete/flush change recipient states as the man page says."""
    q, spool, clock, _ = queue_with()
    m = stored(q, clock, 2)
    q.record(m, {0: O.TempFailed(LATER), 1: O.TempFailed(LATER)})
    out = []
    q.hold(m.id).addCallback(out.append)
    assert [s.state for s in spool.messages[m.id].recipients] == [HELD, HELD]
    q.release(m.id).addCallback(out.append)
    assert all(s.state == QUEUED and s.next_attempt == clock.seconds()
               for s in spool.messages[m.id].recipients)
    q.record(spool.messages[m.id], {0: O.TempFailed(LATER), 1: O.TempFailed(LATER)})
    q.flush().addCallback(out.append)
    assert all(s.next_attempt == clock.seconds() for s in spool.messages[m.id].recipients)
    q.requeue(m.id).addCallback(out.append)
    assert all(s.attempts == 0 for s in spool.messages[m.id].recipients)
    q.delete(m.id).addCallback(out.append)
    assert spool.messages == {}
    q.hold("nosuchid").addCallback(out.append)
    assert out == [True, True, 1, True, True, False]


def test_flush_by_domain_only_touches_that_domain():
    """`flush --domain` makes only recipients in that domain due now."""
    q, spool, clock, _ = queue_with()
    env = Envelope(Address("app", "example.com"),
                   (Recipient(Address("a", "one.example")), Recipient(Address("b", "two.example"))))
    mid = q.new_message_id()
    q.put(mid, env, q.body_writer(mid), {}, clock.seconds())
    q.record(spool.messages[mid], {0: O.TempFailed(LATER), 1: O.TempFailed(LATER)})
    counts = []
    q.flush(domain="two.example").addCallback(counts.append)
    states = spool.messages[mid].recipients
    assert counts == [1]
    assert states[0].next_attempt == clock.seconds() + 60 and states[1].next_attempt == clock.seconds()


def test_flush_goes_in_batches_and_wakes_the_dispatcher_once():
    """`flush` of all walks the spool batch by batch, each its own commit, counts every
    deferred message once, leaves held mail held, and tells the dispatcher once, with now."""
    q, spool, clock, _ = queue_with()
    deferred = [stored(q, clock, 2) for _ in range(5)]
    for m in deferred:
        q.record(m, {0: O.TempFailed(LATER), 1: O.TempFailed(LATER)})
    held = stored(q, clock, 1)
    q.record(held, {0: O.TempFailed(LATER)})
    q.hold(held.id)
    woken, lifted, counts = [], [], []
    q.events.subscribe(lambda e: woken.append(e.at), events.Due)
    q.events.subscribe(lambda e: lifted.append((e.message, e.domain)), events.RetryNow)
    commits = spool.commits
    q.flush_batch = 2
    q.flush().addCallback(counts.append)
    assert counts == [5]
    assert spool.commits - commits >= 3                 # 10 recipients, 2 a batch
    assert woken == [clock.seconds()] and lifted == [(None, None)]
    assert all(r.next_attempt == clock.seconds() for m in deferred
               for r in spool.messages[m.id].recipients)
    assert spool.messages[held.id].recipients[0].state == HELD
    assert spool.messages[held.id].recipients[0].next_attempt == clock.seconds() + 60


def test_flush_of_a_domain_lifts_that_domains_throttle():
    """`flush --domain` lifts the throttle of the domain (lower case) alone; with nothing
    to flush the dispatcher is not woken."""
    q, _, _, _ = queue_with()
    lifted, woken, counts = [], [], []
    q.events.subscribe(lambda e: lifted.append((e.message, e.domain)), events.RetryNow)
    q.events.subscribe(lambda e: woken.append(e.at), events.Due)
    q.flush(domain="Two.Example").addCallback(counts.append)
    assert counts == [0] and woken == []
    assert lifted == [(None, "two.example")]


def test_postponed_recipients_move_without_counting_an_attempt_in_the_same_commit():
    """Mail for a throttled destination waits for its retry, attempts unchanged, committed
    with the attempt's outcomes in one transaction."""
    q, spool, clock, _ = queue_with()
    m = stored(q, clock, 2)
    commits = spool.commits
    q.record(m, {1: O.TempFailed(LATER)}, postponed={0: (clock.seconds() + 500, LATER)})
    assert spool.commits == commits + 1
    state = spool.messages[m.id].recipients[0]
    assert state.attempts == 0 and state.next_attempt == clock.seconds() + 500
    assert state.last_reply == LATER
    assert spool.messages[m.id].recipients[1].attempts == 1


def test_admin_changes_appear_in_the_timeline():
    """hold, release and delete are events of the message's timeline, kept in its history."""
    q, spool, clock, _ = queue_with()
    m = stored(q, clock, 1)
    q.hold(m.id)
    q.release(m.id)
    q.delete(m.id)
    assert [e.kind for e in spool.events[m.id]] == ["received", "held", "released", "deleted"]
    assert spool.history[m.id][0].recipients[0].state == "deleted"


def test_expire_history_forgets_every_old_finished_message_in_batches():
    """Finished messages past the retention are all forgotten, a batch per transaction."""
    q, spool, clock, _ = queue_with()
    for _ in range(5):
        m = stored(q, clock, 1)
        q.record(m, {0: O.Delivered(OK)})
    assert len(spool.history) == 5
    clock.advance(100)
    done = []
    q.expire_history(50.0, batch=2).addCallback(done.append)
    assert done == [5] and spool.history == {}


def test_expire_history_trims_the_outbox_to_the_retention():
    """The outbox stays bounded until a webhook sender drains it: entries of events older than
    the retention go with the history, newer ones stay."""
    q, spool, clock, _ = queue_with()
    m = stored(q, clock, 1)
    q.record(m, {0: O.Delivered(OK)})
    clock.advance(100)
    newer = stored(q, clock, 1)
    assert len(spool.outbox) == 3
    q.expire_history(50.0, batch=1)
    assert [(r.kind, r.message_id) for _, r in (q.spool.outbox_read(None, 10).result)] == \
        [("received", newer.id)]


def test_a_report_on_a_requiretls_message_asks_requiretls_and_returns_headers_only():
    """RFC 8689: the bounce of a REQUIRETLS message travels with REQUIRETLS too, and carries
    the original's header section only, even when the sender asked RET=FULL."""
    from dataclasses import replace
    q, spool, clock, _ = queue_with()
    mid = q.new_message_id()
    env = replace(envelope(1), requiretls=True, ret="FULL")
    body = q.body_writer(mid)
    body.write(b"Subject: secret plans\r\n\r\nthe secret body\r\n")
    done = []
    q.put(mid, env, body, {}, clock.seconds()).addCallback(done.append)
    q.record(done[0], {0: O.PermFailed(Reply(550, "5.7.10", "REQUIRETLS not offered"))})
    report, = [m for m in spool.messages.values() if m.envelope.sender.is_null]
    assert report.envelope.requiretls
    text = spool.bodies[report.id]
    assert b"Subject: secret plans" in text and b"the secret body" not in text


def test_a_record_rerun_after_the_map_grew_reports_and_tells_once(open_lmdb, wait):
    """The writer runs a change again after growing a full map (LmdbSpool._run_batch): the
    bounce still gives exactly one DSN in the spool, one `bounced` and one `dsn` line in the
    mail log, each subscriber hears of the report and the suppression once, and the outbox
    holds each event once, under the id it was published with."""
    spool = open_lmdb(map_size=256 * 1024, max_map_size=64 << 20, inline_limit=1 << 20)
    clock = Clock()
    clock.advance(1_700_000_000)
    rec = Recorder()
    q = logged(Queue(spool, clock), rec)
    heard, suppressed, published = [], [], []
    q.events.subscribe(lambda e: heard.append(e.report), events.DsnQueued)
    q.events.subscribe(lambda e: suppressed.append(e.entry), events.SuppressionAdded)
    q.events.subscribe(published.append)
    mid = q.new_message_id()
    body = q.body_writer(mid)
    body.write(b"Subject: big\r\n\r\n")
    for _ in range(1500):
        body.write(b"y" * 76 + b"\r\n")
    env = Envelope(Address("app", "example.com"), (Recipient(Address("gone", "example.net")),),
                   ret="FULL")
    m = wait(q.put(mid, env, body, {}, clock.seconds()))
    published.clear()
    before = spool._env.info()["map_size"]
    wait(q.record(m, {0: O.PermFailed(Reply(550, "5.1.1", "no such user"),
                                      category="invalid-recipient")}))
    assert spool._env.info()["map_size"] > before       # the change ran again after growing
    assert wait(spool.count()) == 1                     # the original left; one DSN queued
    (report,) = wait(spool.load_due(clock.seconds() + 1, 10))
    assert report.envelope.sender.is_null
    assert [e["event"] for e in rec.events] == ["received", "bounced", "dsn"]
    assert [h.id for h in heard] == [report.id]
    assert [s.address for s in suppressed] == ["gone@example.net"]
    assert [type(e) for e in published] == [events.Bounced, events.DsnQueued,
                                            events.SuppressionAdded, events.Due]
    outbox = wait(spool.outbox_read(None, 100))
    assert [r.kind for _, r in outbox] == ["received", "bounced", "dsn", "suppression-added"]
    assert [k for k, _ in outbox[1:]] == [e.event_id for e in published[:3]]
