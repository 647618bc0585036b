"""The queue stores new messages with every recipient due at arrival, then tells others."""

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel

from txmta.envelope import Address, Envelope, Recipient
from txmta.maillog import MailLog
from txmta.queue import Queue
from txmta.spool.interface import QUEUED, CommitFailed
from txmta.spool.memory import MemorySpool


def envelope(n=2):
    return Envelope(Address("app", "example.com"),
                    tuple(Recipient(Address(f"u{i}", "example.net")) for i in range(n)))


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)


def make_queue():
    clock = Clock()
    clock.advance(1_700_000_000)
    rec = Recorder()
    spool = MemorySpool()
    q = Queue(spool, clock, MailLog(Logger(namespace="txmta.maillog", observer=rec)))
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


def test_mail_log_and_listeners_hear_only_after_the_commit():
    """Persist first, then tell (DESIGN invariant 3): a failed commit logs nothing."""
    q, spool, clock, rec = make_queue()
    heard = []
    q.listeners.append(heard.append)
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
