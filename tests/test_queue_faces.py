"""The queue's faces keep one contract: the real Queue (over MemorySpool and over LmdbSpool)
and the fake (tests/fakes.py) pass the same tests (STYLE habit 9).

Intake: put, then the message is due.  Delivery: record() commits an attempt at once,
outcomes and postponed recipients.  Admin: hold, release, requeue, delete, flush.  Events:
published after the commit, in order; none when the commit fails; one terminal event per
recipient (DESIGN invariant 10).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from twisted.internet.task import Clock

from fakes import FakeQueue, FaultySpool
from txmta import events
from txmta import outcome as O
from txmta.faces import AdminQueue, DeliveryQueue, IntakeQueue
from txmta.message import DELETED, DELIVERED, FINAL, QUEUED, Address, Envelope, Recipient
from txmta.queue import Queue
from txmta.reply import Reply
from txmta.spool.interface import CommitFailed
from txmta.spool.memory import MemorySpool

T0 = 1_700_000_000.0
OK = Reply(250, "2.0.0", "OK")
LATER = Reply(451, "4.3.0", "try later")
NO = Reply(550, "5.1.1", "no such user")
TOLD = (events.Received, *events.ATTEMPTED, events.Deleted, events.AdminAction, events.Due,
        events.RetryNow, events.Postponed)   # what every implementation tells (DSNs and suppressions: the real one)


@dataclass
class Face:
    """One implementation under test: the queue, its clock, and how to fail its next commit."""
    queue: Any
    clock: Clock
    fail_next: Callable[[Exception], None]
    wait: Callable[..., Any]


def _clock() -> Clock:
    clock = Clock()
    clock.advance(T0)
    return clock


def _queue(spool: Any, clock: Clock) -> Queue:
    # no DSN for the sender <>; a plain retry schedule
    return Queue(spool, clock, schedule=(60.0,), max_lifetime=3600.0, jitter=lambda: 0.0)


@pytest.fixture(params=["queue-memory", "queue-lmdb", "fake"])
def face(request: pytest.FixtureRequest, open_lmdb: Any, wait: Any) -> Face:
    clock = _clock()
    if request.param == "fake":
        fake = FakeQueue(clock)
        return Face(fake, clock, lambda e: setattr(fake, "fail_next", e), wait)
    spool = FaultySpool(MemorySpool() if request.param == "queue-memory" else open_lmdb())
    return Face(_queue(spool, clock), clock, lambda e: setattr(spool, "fail_next", e), wait)


def envelope(n: int = 2, sender: Address | None = None) -> Envelope:
    return Envelope(sender or Address("", ""),   # <>: no DSN, the same in every implementation
                    tuple(Recipient(Address(f"u{i}", f"d{i}.example")) for i in range(n)))


def put(f: Face, n: int = 2) -> Any:
    q: IntakeQueue = f.queue
    mid = q.new_message_id(f.clock.seconds())
    body = q.body_writer(mid)
    body.write(b"Subject: x\r\n\r\nhi\r\n")
    return f.wait(q.put(mid, envelope(n), body, {"address": "192.0.2.1"}, f.clock.seconds()))


def heard(f: Face) -> list[Any]:
    told: list[Any] = []
    f.queue.events.subscribe(told.append, *TOLD)
    return told


def kinds(told: list[Any]) -> list[str]:
    return [type(e).__name__ for e in told]


# -- intake -------------------------------------------------------------------------------------

def test_put_then_due_returns_it(face: Face) -> None:
    """A message put is due at once, with every recipient queued and no attempt made."""
    m = put(face)
    q: DeliveryQueue = face.queue
    (due,) = face.wait(q.due(face.clock.seconds(), 10))
    assert due.id == m.id and [r.state for r in due.recipients] == [QUEUED, QUEUED]
    assert all(r.attempts == 0 for r in due.recipients)
    assert face.wait(q.next_due()) == face.clock.seconds()
    assert face.wait(q.due(face.clock.seconds(), 10, exclude=[m.id])) == []
    assert face.wait(q.read_body(m.id)).endswith(b"Subject: x\r\n\r\nhi\r\n")


def test_a_failed_put_stores_nothing_and_tells_nothing(face: Face) -> None:
    """A failed commit fails put(), leaves nothing due and publishes no event."""
    told = heard(face)
    face.fail_next(CommitFailed("disk on fire"))
    with pytest.raises(CommitFailed):
        put(face)
    assert face.wait(face.queue.due(face.clock.seconds(), 10)) == [] and told == []


# -- delivery -----------------------------------------------------------------------------------

def test_record_delivered_removes_the_recipient(face: Face) -> None:
    """A delivered recipient is final; once all are, the message leaves and record() fires None."""
    m = put(face)
    q: DeliveryQueue = face.queue
    left = face.wait(q.record(m, {0: O.Delivered(OK)}))
    assert [r.state for r in left.recipients] == [DELIVERED, QUEUED]
    assert face.wait(q.record(left, {1: O.Delivered(OK)})) is None
    assert face.wait(q.due(face.clock.seconds() + 1e6, 10)) == []


def test_record_with_postponed_moves_next_attempt_without_counting_an_attempt(face: Face) -> None:
    """A postponed recipient (throttled destination) waits, attempts unchanged, committed with
    the other outcomes of the attempt."""
    m = put(face)
    q: DeliveryQueue = face.queue
    until = face.clock.seconds() + 500
    told = heard(face)
    left = face.wait(q.record(m, {1: O.TempFailed(LATER)}, postponed={0: (until, LATER)}))
    assert left.recipients[0].next_attempt == until and left.recipients[0].attempts == 0
    assert left.recipients[0].last_reply == LATER
    assert left.recipients[1].attempts == 1 and left.recipients[1].next_attempt > face.clock.seconds()
    assert kinds(told) == ["Deferred", "Postponed", "Due"] and told[0].index == 1
    assert told[1].index == 0 and told[1].reply == LATER   # the mail log's deferred line
    assert told[2].at == min(until, left.recipients[1].next_attempt)
    assert face.wait(q.due(face.clock.seconds(), 10)) == []


def test_record_only_postponed_is_one_commit_with_no_attempt_event(face: Face) -> None:
    """record() with no outcome and only postponed recipients moves them and says that
    (Postponed, not stored: no attempt event), then Due."""
    m = put(face, 1)
    told = heard(face)
    until = face.clock.seconds() + 300
    left = face.wait(face.queue.record(m, {}, postponed={0: (until, LATER)}))
    assert left.recipients[0].next_attempt == until and left.recipients[0].attempts == 0
    assert told == [events.Postponed(left, 0, LATER, face.clock.seconds()), events.Due(until)]


def test_record_expired_ends_recipients_past_their_deadline_without_an_attempt(
        face: Face) -> None:
    """A message with a deadline (`expires`) is past it at the deadline, not before; record()
    with `expired` ends those recipients EXPIRED, no attempt counted, one Expired each."""
    q = face.queue
    mid = q.new_message_id(face.clock.seconds())
    body = q.body_writer(mid)
    body.write(b"Subject: x\r\n\r\nhi\r\n")
    m = face.wait(q.put(mid, envelope(3), body, {}, face.clock.seconds(),
                        expires=face.clock.seconds() + 10))
    assert m.expires == T0 + 10
    assert not q.past_deadline(m, T0 + 9.99) and q.past_deadline(m, T0 + 10)
    face.clock.advance(10)
    told = heard(face)
    left = face.wait(q.record(m, {1: O.Delivered(OK)}, expired=[0]))
    assert [r.state for r in left.recipients] == ["expired", DELIVERED, QUEUED]
    assert left.recipients[0].attempts == 0
    assert {e.index: type(e).__name__ for e in told[:2]} == {0: "Expired", 1: "Delivered"}


def test_events_are_published_after_the_commit_and_in_order(face: Face) -> None:
    """Subscribers hear of an attempt after it is committed (what they read sees it), one
    event per recipient in recipient order, then the next due time."""
    m = put(face, 3)
    q = face.queue
    reads: list[Any] = []
    q.events.subscribe(lambda e: reads.append(q.due(face.clock.seconds() + 1e6, 10)),
                       events.ATTEMPTED)
    told = heard(face)
    face.wait(q.record(m, {2: O.TempFailed(LATER), 0: O.Delivered(OK), 1: O.PermFailed(NO)}))
    assert kinds(told) == ["Delivered", "Bounced", "Deferred", "Due"]
    assert [e.index for e in told[:3]] == [0, 1, 2]
    assert told[0].message.recipients[2].attempts == 1   # the message as committed
    for d in reads:
        (seen,) = face.wait(d)
        assert seen.recipients[2].attempts == 1           # read after the commit
    ids = [e.event_id for e in told[:3]]
    assert ids == sorted(ids) and len(set(ids)) == 3


def test_a_failed_record_changes_nothing_and_tells_nothing(face: Face) -> None:
    """A failed commit of an attempt publishes no event; the recipients stay due."""
    m = put(face)
    told = heard(face)
    face.fail_next(CommitFailed("disk on fire"))
    with pytest.raises(CommitFailed):
        face.wait(face.queue.record(m, {0: O.Delivered(OK), 1: O.TempFailed(LATER)}))
    assert told == []
    (due,) = face.wait(face.queue.due(face.clock.seconds(), 10))
    assert [r.attempts for r in due.recipients] == [0, 0]


# -- admin --------------------------------------------------------------------------------------

def test_hold_and_release(face: Face) -> None:
    """A held message is not due; released, it is due now and its throttles are lifted."""
    m = put(face)
    q: AdminQueue = face.queue
    told = heard(face)
    assert face.wait(q.hold(m.id)) is True
    assert face.wait(face.queue.due(face.clock.seconds() + 1e6, 10)) == []
    face.clock.advance(10)
    assert face.wait(q.release(m.id)) is True
    (due,) = face.wait(face.queue.due(face.clock.seconds(), 10))
    assert all(r.state == QUEUED and r.next_attempt == face.clock.seconds() for r in due.recipients)
    assert kinds(told) == ["AdminAction", "AdminAction", "RetryNow", "Due"]
    assert [e.action for e in told[:2]] == ["held", "released"]
    assert told[2].message.id == m.id and told[3].at == face.clock.seconds()


def test_requeue_resets_attempts_and_makes_due_now(face: Face) -> None:
    """requeue: every unfinished recipient due now, as if new."""
    m = put(face)
    q = face.queue
    q.record(m, {0: O.TempFailed(LATER), 1: O.TempFailed(LATER)})
    face.clock.advance(5)
    assert face.wait(q.requeue(m.id)) is True
    (due,) = face.wait(q.due(face.clock.seconds(), 10))
    assert [(r.attempts, r.next_attempt) for r in due.recipients] == [(0, face.clock.seconds())] * 2


def test_delete_ends_each_recipient_with_one_deleted_event(face: Face) -> None:
    """delete: the message leaves; each unfinished recipient gets one Deleted event."""
    m = put(face, 3)
    q = face.queue
    left = face.wait(q.record(m, {0: O.Delivered(OK)}))
    told = heard(face)
    assert face.wait(q.delete(m.id)) is True
    assert kinds(told) == ["Deleted", "Deleted"] and [e.index for e in told] == [1, 2]
    assert [r.state for r in told[0].message.recipients] == [DELIVERED, DELETED, DELETED]
    assert face.wait(q.due(face.clock.seconds() + 1e6, 10)) == []
    assert face.wait(q.delete(m.id)) is False and face.wait(q.hold(left.id)) is False


def test_flush_of_a_message_makes_it_due_now(face: Face) -> None:
    """flush ID: its queued recipients are due now; the count is 1 (0 for an unknown id)."""
    m = put(face, 1)
    q = face.queue
    face.wait(q.record(m, {0: O.TempFailed(LATER)}))
    assert face.wait(q.due(face.clock.seconds(), 10)) == []
    told = heard(face)
    assert face.wait(q.flush(m.id)) == 1
    assert [x.id for x in face.wait(q.due(face.clock.seconds(), 10))] == [m.id]
    assert kinds(told) == ["AdminAction", "RetryNow", "Due"] and told[0].action == "flushed"
    assert face.wait(q.flush("nosuchid0000000")) == 0


def test_flush_of_everything_lifts_every_throttle(face: Face) -> None:
    """flush (all): RetryNow(None) first, then every deferred message is due now."""
    ms = [put(face, 1) for _ in range(2)]
    q = face.queue
    for m in ms:
        face.wait(q.record(m, {0: O.TempFailed(LATER)}))
    told = heard(face)
    assert face.wait(q.flush()) == 2
    assert told == [events.RetryNow(None), events.Due(face.clock.seconds())]
    assert sorted(m.id for m in face.wait(q.due(face.clock.seconds(), 10))) == sorted(m.id for m in ms)


def test_flush_of_a_domain_makes_only_its_recipients_due(face: Face) -> None:
    """flush --domain D (any case): RetryNow for D, then D's deferred recipients are due
    now and the others keep their time; a domain with nothing deferred wakes nobody."""
    q = face.queue
    m = put(face, 2)        # recipients at d0.example and d1.example
    face.wait(q.record(m, {0: O.TempFailed(LATER), 1: O.TempFailed(LATER)}))
    told = heard(face)
    assert face.wait(q.flush(domain="nowhere.example")) == 0
    assert told == [events.RetryNow(None, domain="nowhere.example")]
    del told[:]
    domain = m.envelope.recipients[1].address.domain
    assert face.wait(q.flush(domain=domain.upper())) == 1
    assert told == [events.RetryNow(None, domain=domain), events.Due(face.clock.seconds())]
    now = face.clock.seconds()
    (due,) = face.wait(q.due(now, 10))
    assert due.recipients[1].next_attempt == now and due.recipients[0].next_attempt > now


def test_flush_of_a_domain_in_the_background_answers_with_the_count(face: Face) -> None:
    """flush --domain D from an admin command (background): the count of messages still
    queued for D; their recipients at D are due once the batches ran, with the same events,
    and a domain with nothing queued still lifts its throttles."""
    q = face.queue
    ms = [put(face, 2) for _ in range(3)]
    for m in ms:
        face.wait(q.record(m, {0: O.TempFailed(LATER), 1: O.TempFailed(LATER)}))
    told = heard(face)
    assert face.wait(q.flush(domain="nowhere.example", background=True)) == 0
    assert told == [events.RetryNow(None, domain="nowhere.example")]
    del told[:]
    domain = ms[0].envelope.recipients[1].address.domain
    assert face.wait(q.flush(domain=domain.upper(), background=True)) == 3
    if getattr(q, "background_flush", None) is not None:    # the real queue: batches follow
        face.wait(q.background_flush)
    now = face.clock.seconds()
    assert told[0] == events.RetryNow(None, domain=domain) and events.Due(now) in told
    due = face.wait(q.due(now, 10))
    assert sorted(m.id for m in due) == sorted(m.id for m in ms)
    assert all(m.recipients[1].next_attempt == now < m.recipients[0].next_attempt for m in due)


def test_suppression_add_remove_import(face: Face) -> None:
    """The admin's suppression commands change the list the queue checks."""
    q: AdminQueue = face.queue
    assert face.wait(q.suppress_add("X@Example.com", "manual")) is True
    assert face.wait(q.suppress_import([("a@example.com", "complaint"), (" ", "")])) == 1
    assert q.suppression_entry("x@example.com").reason == "manual"
    assert q.suppression_entry("A@EXAMPLE.COM").reason == "complaint"
    assert face.wait(q.suppress_remove("x@example.com")) is True
    assert q.suppression_entry("x@example.com") is None
    assert face.wait(q.status())["messages"] == 0


def test_a_failed_admin_change_tells_nothing(face: Face) -> None:
    """A failed commit of an admin change publishes nothing and changes nothing."""
    m = put(face)
    told = heard(face)
    face.fail_next(CommitFailed("disk on fire"))
    with pytest.raises(CommitFailed):
        face.wait(face.queue.hold(m.id))
    assert told == [] and len(face.wait(face.queue.due(face.clock.seconds(), 10))) == 1


# -- recipients' states: one terminal event each (hypothesis) ----------------------------------

OUTCOMES = st.sampled_from([O.Delivered(OK), O.TempFailed(LATER), O.PermFailed(NO)])


class RecipientStates(RuleBasedStateMachine):
    """Random puts, attempts and admin commands: each recipient gets at most one terminal
    event, and exactly one once it left the queue; a recipient with one is never due again."""

    make: Callable[[], Any] = staticmethod(lambda: None)

    def __init__(self) -> None:
        super().__init__()
        self.clock = _clock()
        self.queue = self.make(self.clock)
        self.terminal: dict[tuple[str, int], int] = {}
        self.ids: list[str] = []
        self.sizes: dict[str, int] = {}
        self.queue.events.subscribe(self._heard, *events.TERMINAL)

    def _heard(self, e: Any) -> None:
        key = (e.message.id, e.index)
        self.terminal[key] = self.terminal.get(key, 0) + 1

    def _now(self, d: Any) -> Any:
        out: list[Any] = []
        d.addBoth(out.append)
        return out[0]

    @rule(n=st.integers(1, 3))
    def put(self, n: int) -> None:
        mid = self.queue.new_message_id(self.clock.seconds())
        body = self.queue.body_writer(mid)
        body.write(b"x")
        self._now(self.queue.put(mid, envelope(n), body, {}, self.clock.seconds()))
        self.ids.append(mid)
        self.sizes[mid] = n

    @precondition(lambda self: self.ids)
    @rule(data=st.data())
    def attempt(self, data: Any) -> None:
        due = self._now(self.queue.due(self.clock.seconds(), 100))
        if not due:
            return
        m = data.draw(st.sampled_from(due))
        indices = [i for i, r in enumerate(m.recipients) if r.state == QUEUED]
        outcomes = {i: data.draw(OUTCOMES) for i in indices}
        self._now(self.queue.record(m, outcomes))

    @precondition(lambda self: self.ids)
    @rule(data=st.data(), command=st.sampled_from(["hold", "release", "requeue", "delete", "flush"]))
    def admin(self, data: Any, command: str) -> None:
        mid = data.draw(st.sampled_from(self.ids))
        self._now(getattr(self.queue, command)(mid))

    @rule(seconds=st.sampled_from([1.0, 60.0, 4000.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def one_terminal_event_per_finished_recipient(self) -> None:
        assert all(n == 1 for n in self.terminal.values())
        for mid, n in self.sizes.items():
            m = self._lookup(mid)
            for i in range(n):
                ended = m is None or m.recipients[i].state in FINAL
                assert ended == ((mid, i) in self.terminal), (mid, i, m)

    def _lookup(self, mid: str) -> Any:
        """The message as stored, None once it left the queue."""
        q = self.queue
        if isinstance(q, FakeQueue):
            return q.messages.get(mid)
        return self._now(q.spool.get(mid))


@pytest.mark.parametrize("kind", ["queue-memory", "fake"])
def test_each_recipient_gets_exactly_one_terminal_event(kind: str) -> None:
    """DESIGN invariant 10, on the real queue and on the fake."""
    class Machine(RecipientStates):
        make = staticmethod((lambda c: FakeQueue(c)) if kind == "fake"
                            else (lambda c: _queue(MemorySpool(), c)))
    run_state_machine_as_test(Machine, settings=settings(
        max_examples=60, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))


def test_held_recipients_are_neither_due_nor_ended(face: Face) -> None:
    """hold keeps recipients in the queue (HELD) with no terminal event."""
    m = put(face, 1)
    told: list[Any] = []
    face.queue.events.subscribe(told.append, *events.TERMINAL)
    face.wait(face.queue.hold(m.id))
    assert told == []
    face.wait(face.queue.release(m.id))
    (due,) = face.wait(face.queue.due(face.clock.seconds(), 10))
    assert due.recipients[0].state == QUEUED


# -- the faces' signatures ---------------------------------------------------------------------

@pytest.mark.parametrize("face_type", [IntakeQueue, DeliveryQueue, AdminQueue])
@pytest.mark.parametrize("implementation", [Queue, FakeQueue])
def test_the_queue_and_the_fake_have_every_method_of_each_face(face_type: Any,
                                                                implementation: Any) -> None:
    """Each face's methods exist on the queue and on the fake, with the same parameters (in
    the absence of a type checker run, what mypy would check of the Protocols)."""
    import inspect
    members = [n for n, v in vars(face_type).items() if inspect.isfunction(v) and not n.startswith("_")]
    assert members
    for name in members:
        want = list(inspect.signature(getattr(face_type, name)).parameters)
        got = list(inspect.signature(getattr(implementation, name)).parameters)
        assert got == want, (implementation.__name__, name)
