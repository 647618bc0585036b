"""The event stream and the event values: subscribers, ids, outbox records."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher

from txmta import events
from txmta import outcome as O
from txmta.message import (DELIVERED, QUEUED, Address, Envelope, OutboxRecord, Recipient,
                           RecipientState, StoredMessage, Suppression)
from txmta.reply import Reply
from txmta.spool import codec

OK = Reply(250, "2.0.0", "OK")


def message(*states: RecipientState) -> StoredMessage:
    env = Envelope(Address("app", "example.com"),
                   tuple(Recipient(Address(f"u{i}", "example.net")) for i in range(len(states))))
    return StoredMessage("0000000000B1234", env, 1000.0, 42, states, {})


# -- the stream ---------------------------------------------------------------------------------

def test_subscribers_hear_the_kinds_they_asked_for_in_order() -> None:
    """A subscriber with kinds hears only those; one without hears everything, in order."""
    stream = events.EventStream()
    every: list[Any] = []
    due: list[Any] = []
    stream.subscribe(every.append)
    stream.subscribe(due.append, events.Due)
    stream.publish_all([events.Due(1.0), events.RetryNow(None), events.Due(2.0)])
    assert every == [events.Due(1.0), events.RetryNow(None), events.Due(2.0)]
    assert due == [events.Due(1.0), events.Due(2.0)]


def test_unsubscribed_hears_nothing_more() -> None:
    """After unsubscribe() a subscriber is not called again; the others still are."""
    stream = events.EventStream()
    a: list[Any] = []
    b: list[Any] = []
    stream.subscribe(a.append)
    stream.subscribe(b.append)
    stream.publish(events.Due(1.0))
    stream.unsubscribe(a.append)
    stream.publish(events.Due(2.0))
    assert a == [events.Due(1.0)] and b == [events.Due(1.0), events.Due(2.0)]


def test_a_failing_subscriber_is_logged_and_the_others_still_hear() -> None:
    """One subscriber raising neither stops the ones after it nor reaches the publisher."""
    stream = events.EventStream()
    after: list[Any] = []
    logged: list[dict[str, Any]] = []

    def broken(event: Any) -> None:
        raise RuntimeError("subscriber bug")

    stream.subscribe(broken)
    stream.subscribe(after.append)
    globalLogPublisher.addObserver(logged.append)
    try:
        stream.publish(events.Due(1.0))
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert after == [events.Due(1.0)]
    failures = [e for e in logged if "log_failure" in e]
    assert len(failures) == 1 and failures[0]["log_failure"].check(RuntimeError)
    assert failures[0]["kind"] == "Due"


# -- ids -----------------------------------------------------------------------------------------

def test_event_ids_sort_by_time_then_order_and_never_repeat() -> None:
    """Ids of one change number its events; later changes sort later, even in one microsecond."""
    ids = events.EventIds(7)
    first, second, later = ids.base(100.0), ids.base(100.0), ids.base(100.5)
    made = [events.event_id(b, i) for b in (first, second, later) for i in range(3)]
    assert made == sorted(made) and len(set(made)) == 9
    assert all(len(e) == 15 for e in made)
    assert events.id_time(made[0]) == 100.0 and made[0][8] == 7


def test_two_workers_never_make_the_same_id() -> None:
    """Workers own different partitions: the same time and counter still give other ids."""
    a, b = events.EventIds(0), events.EventIds(1)
    assert a.base(5.0) != b.base(5.0)


def test_numbering_is_the_same_on_every_run_of_a_change() -> None:
    """A change function run twice (after the map grew) names its events the same way."""
    base = events.EventIds(3).base(1.0)
    runs = [[n() for _ in range(4)] for n in (events.Numbering(base), events.Numbering(base))]
    assert runs[0] == runs[1] and len(set(runs[0])) == 4


def test_time_key_orders_against_ids() -> None:
    """Ids of events before time t sort below time_key(t); the others not."""
    ids = events.EventIds(0)
    old, new = events.event_id(ids.base(9.999), 0), events.event_id(ids.base(10.0), 0)
    assert old < events.time_key(10.0) <= new


# -- outbox records ------------------------------------------------------------------------------

def test_attempt_events_record_the_recipient_as_committed() -> None:
    """An attempt's record names message, recipient, reply, remote, category, attempts."""
    m = message(RecipientState(DELIVERED, 2, 0.0, OK), RecipientState(QUEUED, 1, 60.0))
    e = events.Delivered(b"k" * 15, m, 0, O.Delivered(OK, "mx.example.net", "192.0.2.5",
                                                         tls="TLSv1.3"), 1010.0)
    r = e.record()
    assert (r.kind, r.time, r.message_id, r.index, r.rcpt) == \
        ("delivered", 1010.0, m.id, 0, "u0@example.net")
    assert r.reply == OK.as_dict() and r.remote == "mx.example.net[192.0.2.5]"
    assert r.tls == "TLSv1.3" and r.attempts == 2
    assert events.for_outcome(QUEUED) is events.Deferred
    assert events.for_outcome("expired") is events.Expired


def test_every_committed_kind_has_a_record_that_round_trips() -> None:
    """Each committed event encodes to an outbox record and decodes back equal."""
    m = message(RecipientState(QUEUED, 0, 0.0))
    report = message(RecipientState(QUEUED, 0, 0.0))
    eid = b"\0" * 15
    told = [events.Received(eid, m), events.Suppressed(eid, m, 0),
            events.Deleted(eid, m, 0, 5.0), events.AdminAction(eid, m, "held", 5.0),
            events.DsnQueued(eid, m, report, "failed"),
            events.SuppressionAdded(eid, Suppression("a@example.net", "invalid-recipient", 1.0, 2.0)),
            *(kind(eid, m, 0, O.TempFailed(OK), 3.0) for kind in events.ATTEMPTED)]
    for e in told:
        r = e.record()
        assert codec.decode_outbox(codec.encode_outbox(r)) == r
    assert [e.record().kind for e in told] == [
        "received", "suppressed", "deleted", "held", "dsn", "suppression-added",
        "delivered", "deferred", "bounced", "expired"]


text = st.text(max_size=20)


@given(st.builds(OutboxRecord, kind=text, time=st.floats(0, 4e9), message_id=text,
                 index=st.integers(-1, 999), rcpt=text,
                 reply=st.none() | st.fixed_dictionaries({"code": st.integers(200, 599),
                                                          "text": text}),
                 remote=text, category=text, tls=text, attempts=st.integers(0, 100), text=text))
def test_outbox_records_round_trip(record: OutboxRecord) -> None:
    """Any outbox record decodes to itself (trailing defaults are left out of the bytes)."""
    assert codec.decode_outbox(codec.encode_outbox(record)) == record


def test_a_corrupt_outbox_record_is_refused() -> None:
    """Bytes that are not an outbox record raise CorruptRecord (never a crash)."""
    import pytest
    for data in (b"", b"\x09[]", b"\x01{}", b"\x01[\"x\"]", b"\x01[1,\"t\"]"):
        with pytest.raises(codec.CorruptRecord):
            codec.decode_outbox(data)


def test_subscribing_while_publishing_takes_effect_from_the_next_event() -> None:
    """A subscriber added or removed during a publish does not change who hears that event."""
    stream = events.EventStream()
    late: list[Any] = []
    first: list[Any] = []

    def subscribe_late(event: Any) -> None:
        first.append(event)
        stream.unsubscribe(subscribe_late)
        stream.subscribe(late.append)

    stream.subscribe(subscribe_late)
    stream.publish(events.Due(1.0))
    stream.publish(events.Due(2.0))
    assert first == [events.Due(1.0)] and late == [events.Due(2.0)]
