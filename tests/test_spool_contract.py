"""The spool contract: MemorySpool and LmdbSpool keep the same promises (STYLE habit 9).

Every test runs once per implementation through the `spool` fixture (tests/conftest.py).
Times are whole milliseconds because the LMDB due index has millisecond resolution.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import pytest
from txmta.lanes import due_class, level, level_classes
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition,
                                 rule, run_state_machine_as_test)

from txmta import events
from txmta import outcome as O
from txmta.message import Address, Change, Envelope, MessageIds, Recipient, new_message_id
from txmta.reply import Reply
from txmta.message import (BOUNCED, DELETED, DELIVERED, HELD, QUEUED, RecipientState,
                           StoredMessage)
from txmta.spool.interface import CommitFailed
from txmta.spool.lmdb import LmdbSpool, _Op
from txmta.spool.view import domain_key
from txmta.spool.memory import MemorySpool


OK = Reply(250, "2.0.0", "OK")


def queued(ms: int, attempts: int = 0) -> RecipientState:
    return RecipientState(QUEUED, attempts, ms / 1000)


def put(spool: Any, wait: Any, message: StoredMessage, body: bytes = b"Subject: x\r\n\r\nhi\r\n") -> None:
    writer = spool.body_writer(message.id)
    writer.write(body)
    wait(spool.put(message, writer))


# -- put, get, read_body ---------------------------------------------------------------------

def test_put_then_get_returns_equal_record(spool, wait):
    """A message read back after put() equals the message stored, recipient states included."""
    env = Envelope(Address("s\u00e9nder", "example.com"),
                   (Recipient(Address("a", "example.org"), ("SUCCESS", "FAILURE"), "rfc822;a@x"),
                    Recipient(Address("\u00fc", "b\u00fccher.example"))),
                   size=1234, body="8BITMIME", smtputf8=True, ret="HDRS", envid="E1",
                   auth="<>", extra={"MT-PRIORITY": "3"})
    m = StoredMessage(new_message_id(), env, 1700000000.25, 21,
                      (queued(5000), RecipientState(HELD, 2, 7.0, Reply(451, "4.7.1", "grey"))),
                      {"address": "192.0.2.7", "tls": "TLSv1.3"})
    put(spool, wait, m)
    assert wait(spool.get(m.id)) == m


def test_get_of_unknown_id_is_none(spool, wait):
    """get() of an id the spool never stored fires with None."""
    assert wait(spool.get(new_message_id())) is None


@pytest.mark.parametrize("body", [b"", b"x", b"line\r\n" * 100, bytes(range(256)) * 16],
                         ids=["empty", "one-octet", "lines", "binary-at-limit"])
def test_read_body_returns_exactly_the_bytes_written(spool, wait, make_message, body):
    """read_body() returns the body octets unchanged, written in several chunks."""
    m = make_message()
    writer = spool.body_writer(m.id)
    for i in range(0, len(body), 1000):
        writer.write(body[i:i + 1000])
    assert writer.size == len(body)
    wait(spool.put(m, writer))
    assert wait(spool.read_body(m.id)) == body


def test_body_above_inline_limit_round_trips(spool, wait, make_message, inline_limit):
    """A body larger than inline_limit reads back exactly; LMDB keeps it in bodies/<id>."""
    m = make_message()
    body = bytes(range(256)) * (inline_limit // 256 * 3) + b"tail"
    put(spool, wait, m, body)
    assert wait(spool.read_body(m.id)) == body
    got = wait(spool.get(m.id))
    assert replace(got, body_in_file=False) == m
    if isinstance(spool, LmdbSpool):
        assert got.body_in_file
        with open(f"{spool.bodies}/{m.id}", "rb") as f:
            assert f.read() == body


# -- the due index ---------------------------------------------------------------------------

def test_due_returns_queued_messages_at_or_before_now_oldest_first(spool, wait, make_message):
    """due(now) lists messages with a QUEUED recipient due by now, oldest first, not later ones."""
    late = make_message(states=(queued(9000),))
    mid = make_message(states=(queued(5000),))
    early = make_message(states=(queued(1000),))
    exact = make_message(states=(queued(7000),))
    for m in (late, mid, early, exact):
        put(spool, wait, m)
    assert wait(spool.due(7.0, 100)) == [(1.0, early.id), (5.0, mid.id), (7.0, exact.id)]
    assert wait(spool.due(0.999, 100)) == []


def test_due_lists_a_message_once_at_its_oldest_recipient(spool, wait, make_message):
    """A message with several due recipients appears once, at its earliest due time."""
    m = make_message(states=(queued(3000), queued(1000), queued(2000)))
    put(spool, wait, m)
    assert wait(spool.due(10.0, 100)) == [(1.0, m.id)]


def test_due_honours_limit(spool, wait, make_message):
    """due(now, limit) returns the `limit` oldest due messages."""
    ms = [make_message(states=(queued(1000 * (i + 1)),)) for i in range(5)]
    for m in reversed(ms):
        put(spool, wait, m)
    assert wait(spool.due(100.0, 2)) == [(1.0, ms[0].id), (2.0, ms[1].id)]


def test_held_and_final_recipients_are_not_due(spool, wait, make_message):
    """Only QUEUED recipients are due: HELD (and final) ones never are, whatever their time."""
    held = make_message(states=(RecipientState(HELD, 0, 1.0),))
    mixed = make_message(states=(RecipientState(HELD, 0, 1.0), RecipientState(DELIVERED, 1, 1.0),
                                 queued(4000)))
    put(spool, wait, held)
    put(spool, wait, mixed)
    assert wait(spool.due(100.0, 100)) == [(4.0, mixed.id)]


@pytest.mark.parametrize("ms", [1, 570, 1001, 4055, 1_700_000_000_123])
def test_due_time_is_kept_to_the_millisecond(spool, wait, make_message, ms):
    """A recipient due at a whole millisecond is reported at that time, and not a ms earlier."""
    m = make_message(states=(queued(ms),))
    put(spool, wait, m)
    assert wait(spool.due((ms - 1) / 1000, 10)) == []
    assert wait(spool.due(ms / 1000, 10)) == [(ms / 1000, m.id)]
    assert wait(spool.next_due()) == ms / 1000


def test_next_due_is_the_earliest_queued_time_or_none(spool, wait, make_message):
    """next_due() is the earliest QUEUED recipient's time, None with nothing queued."""
    assert wait(spool.next_due()) is None
    put(spool, wait, make_message(states=(RecipientState(HELD, 0, 1.0),)))
    assert wait(spool.next_due()) is None
    put(spool, wait, make_message(states=(queued(8000),)))
    put(spool, wait, make_message(states=(queued(3000), queued(6000))))
    assert wait(spool.next_due()) == 3.0


def test_update_moving_next_attempt_moves_the_due_entry(spool, wait, make_message):
    """After update() defers a recipient, its old time is no longer due and the new one is."""
    m = make_message(states=(queued(1000),))
    put(spool, wait, m)
    later = m.with_recipient_state(0, queued(60000, attempts=1))
    wait(spool.update(later))
    assert wait(spool.due(59.999, 100)) == []
    assert wait(spool.next_due()) == 60.0
    assert wait(spool.due(60.0, 100)) == [(60.0, m.id)]
    assert wait(spool.get(m.id)) == later


def test_update_to_held_takes_the_recipient_out_of_the_due_index(spool, wait, make_message):
    """A recipient updated to HELD stops being due; the message stays stored."""
    m = make_message(states=(queued(1000),))
    put(spool, wait, m)
    wait(spool.update(m.with_recipient_state(0, RecipientState(HELD, 0, 1.0))))
    assert wait(spool.due(100.0, 100)) == []
    assert wait(spool.next_due()) is None
    assert wait(spool.count()) == 1


def test_update_with_every_recipient_final_removes_message_and_body(spool, wait, make_message):
    """When update() leaves no unfinished recipient, message, due entries and body are gone."""
    m = make_message(states=(queued(1000), queued(2000)))
    put(spool, wait, m)
    partly = m.with_recipient_state(0, RecipientState(DELIVERED, 1, 1.0))
    wait(spool.update(partly))
    assert wait(spool.get(m.id)) == partly
    wait(spool.update(partly.with_recipient_state(
        1, RecipientState(BOUNCED, 1, 2.0, Reply(550, "5.1.1", "no such user")))))
    assert wait(spool.get(m.id)) is None
    assert wait(spool.count()) == 0
    assert wait(spool.due(100.0, 100)) == []
    assert wait(spool.next_due()) is None


def test_final_update_removes_the_body_file(open_lmdb, wait, make_message, inline_limit):
    """LMDB: a message leaving through update() takes its bodies/<id> file with it."""
    spool = open_lmdb()
    m = make_message()
    put(spool, wait, m, b"x" * (inline_limit * 2))
    path = f"{spool.bodies}/{m.id}"
    with open(path, "rb") as f:
        assert f.read() == b"x" * (inline_limit * 2)
    wait(spool.update(m.with_recipient_state(0, RecipientState(DELIVERED, 1, 0.0))))
    assert wait(spool.count()) == 0
    with pytest.raises(FileNotFoundError):
        open(path, "rb")


def test_update_of_unknown_message_fails_with_commit_failed(spool, wait, make_message):
    """update() of a message not in the spool fails with CommitFailed and stores nothing."""
    with pytest.raises(CommitFailed):
        wait(spool.update(make_message()))
    assert wait(spool.count()) == 0


@pytest.mark.parametrize("big", [False, True], ids=["inline-body", "file-body"])
def test_remove_deletes_message_due_entries_and_body(spool, wait, make_message, inline_limit,
                                                    big):
    """remove() deletes the message, its due entries and its body (LMDB: the body file too)."""
    keep, gone = make_message(states=(queued(2000),)), make_message(states=(queued(1000),))
    put(spool, wait, keep)
    put(spool, wait, gone, b"y" * (inline_limit * 2 if big else 10))
    wait(spool.remove(gone.id))
    assert wait(spool.get(gone.id)) is None
    assert wait(spool.due(100.0, 100)) == [(2.0, keep.id)]
    assert wait(spool.count()) == 1
    if isinstance(spool, LmdbSpool):
        assert os.listdir(spool.bodies) == []


def test_remove_of_unknown_id_is_harmless(spool, wait, make_message):
    """remove() of an id that is not stored succeeds and changes nothing."""
    m = make_message()
    put(spool, wait, m)
    wait(spool.remove(new_message_id()))
    assert wait(spool.count()) == 1


def test_count_is_the_number_of_stored_messages(spool, wait, make_message):
    """count() counts messages (not recipients), following puts and removals."""
    assert wait(spool.count()) == 0
    ms = [make_message(n_rcpts=3) for _ in range(4)]
    for m in ms:
        put(spool, wait, m)
    assert wait(spool.count()) == 4
    wait(spool.remove(ms[0].id))
    assert wait(spool.count()) == 3


def test_duplicate_id_fails_with_commit_failed_and_keeps_the_first(spool, wait, make_message):
    """A second put() of a stored id fails with CommitFailed; the first message and body stay."""
    first = make_message(states=(queued(1000),))
    put(spool, wait, first, b"first body")
    second = replace(make_message(n_rcpts=2, states=(queued(500), queued(500))), id=first.id)
    with pytest.raises(CommitFailed):
        put(spool, wait, second, b"second body")
    assert wait(spool.get(first.id)) == first
    assert wait(spool.read_body(first.id)) == b"first body"
    assert wait(spool.due(100.0, 100)) == [(1.0, first.id)]
    assert wait(spool.count()) == 1


# -- the cache (MTA-STS policies) ---------------------------------------------------------------

def test_cache_put_then_get_and_replace(spool, wait):
    """cache_get() returns what cache_put() stored last under the key, None for other keys."""
    assert wait(spool.cache_get("mta-sts:example.org")) is None
    wait(spool.cache_put("mta-sts:example.org", b'{"v": 1}'))
    wait(spool.cache_put("mta-sts:example.net", b"other"))
    assert wait(spool.cache_get("mta-sts:example.org")) == b'{"v": 1}'
    wait(spool.cache_put("mta-sts:example.org", b'{"v": 2}'))
    assert wait(spool.cache_get("mta-sts:example.org")) == b'{"v": 2}'
    assert wait(spool.cache_get("mta-sts:example.com")) is None


def test_cache_survives_reopening(open_lmdb, wait, tmp_path):
    """The LMDB cache is durable: a new spool on the same directory still has the value."""
    path = tmp_path / "cached"
    first = open_lmdb(path)
    wait(first.cache_put("mta-sts:example.org", b"policy"))
    wait(first.close())
    assert wait(open_lmdb(path).cache_get("mta-sts:example.org")) == b"policy"


# -- flush: due now, in batches, from the indexes ----------------------------------------------

NOW = 5000 / 1000


def at(*domains: str, states: tuple[RecipientState, ...] | None = None,
       partition: int | None = None) -> StoredMessage:
    """A message with one recipient per domain, every one QUEUED and deferred past NOW
    unless `states` says otherwise; in `partition` if given."""
    if states is None:
        states = tuple(queued(60_000) for _ in domains)
    mid = new_message_id() if partition is None else MessageIds({partition})(1.0)
    return StoredMessage(mid, Envelope(Address("s", "example.com"), tuple(
        Recipient(Address(f"r{i}", d)) for i, d in enumerate(domains))), 1.0, 3, states, {})


def flush_all_batches(spool: Any, wait: Any, domain: str | None = None,
                      limit: int = 1000) -> list[tuple[int, int]]:
    """Every batch of one flush at NOW: (messages, recipients) of each."""
    batches, after = [], None
    while True:
        messages, recipients, after = wait(spool.flush(NOW, domain, after, limit))
        batches.append((messages, recipients))
        if after is None:
            return batches
        assert len(batches) < 100, "flush does not come to an end"


def next_attempts(spool: Any, wait: Any, m: StoredMessage) -> list[float]:
    return [r.next_attempt for r in wait(spool.get(m.id)).recipients]


def test_flush_makes_every_deferred_recipient_due_now(spool, wait):
    """flush() of all moves QUEUED recipients due later to now, counts each message once,
    and leaves those already due alone; the due index follows."""
    two = at("a.example", "b.example", states=(queued(60_000), queued(90_000)))
    mixed = at("a.example", "c.example", states=(queued(1_000), queued(70_000)))
    due = at("a.example", states=(queued(2_000),))
    for m in (two, mixed, due):
        put(spool, wait, m)
    assert flush_all_batches(spool, wait) == [(2, 3)]
    assert next_attempts(spool, wait, two) == [NOW, NOW]
    assert next_attempts(spool, wait, mixed) == [1.0, NOW]
    assert next_attempts(spool, wait, due) == [2.0]
    assert sorted(wait(spool.due(NOW, 10))) == sorted([(1.0, mixed.id), (2.0, due.id),
                                                       (NOW, two.id)])
    assert wait(spool.next_due()) == 1.0
    assert flush_all_batches(spool, wait) == [(0, 0)]     # nothing left to flush


@pytest.mark.parametrize("asked", ["two.example", "TWO.Example"])
@pytest.mark.parametrize("stored", ["two.example", "Two.EXAMPLE"])
def test_flush_of_a_domain_touches_only_its_recipients(spool, wait, asked, stored):
    """flush(domain=D) moves only recipients at D (case ignored); other domains keep their
    time, and a message without D is not counted."""
    both = at("one.example", stored)
    other = at("one.example")
    put(spool, wait, both)
    put(spool, wait, other)
    assert flush_all_batches(spool, wait, asked) == [(1, 1)]
    assert next_attempts(spool, wait, both) == [60.0, NOW]
    assert next_attempts(spool, wait, other) == [60.0]
    assert wait(spool.due(NOW, 10)) == [(NOW, both.id)]
    assert flush_all_batches(spool, wait, "nowhere.example") == [(0, 0)]


@pytest.mark.parametrize("domain", [None, "a.example"])
def test_flush_leaves_held_recipients_held(spool, wait, domain):
    """A HELD recipient is not flushed (all or by domain); its QUEUED neighbour is."""
    held = RecipientState(HELD, 1, 60.0)
    m = at("a.example", "a.example", states=(held, queued(60_000)))
    only_held = at("a.example", states=(held,))
    put(spool, wait, m)
    put(spool, wait, only_held)
    assert flush_all_batches(spool, wait, domain) == [(1, 1)]
    assert wait(spool.get(m.id)).recipients == (held, queued(NOW * 1000))
    assert wait(spool.get(only_held.id)).recipients == (held,)
    assert wait(spool.due(NOW, 10)) == [(NOW, m.id)]


@pytest.mark.parametrize("domain", [None, "a.example"])
def test_flush_touches_only_the_spools_own_partitions(spool_factory, tmp_path, wait, domain):
    """A spool of partition 0 flushes partition 0's mail and leaves partition 1's (another
    worker's) as it was."""
    mine, theirs = at("a.example", partition=0), at("a.example", partition=1)
    if spool_factory is MemorySpool:
        spool = MemorySpool({0})
        for m in (mine, theirs):
            put(spool, wait, m)
    else:
        everyone = spool_factory(tmp_path / "shared")
        for m in (mine, theirs):
            put(everyone, wait, m)
        wait(everyone.close())
        spool = spool_factory(tmp_path / "shared", partitions=(0,))
    assert flush_all_batches(spool, wait, domain) == [(1, 1)]
    assert next_attempts(spool, wait, mine) == [NOW]
    assert next_attempts(spool, wait, theirs) == [60.0]


@pytest.mark.parametrize("domain", [None, "a.example"])
def test_flush_in_batches_of_one_counts_each_message_once(spool, wait, domain):
    """With limit=1 every batch ends between messages and the next goes on after it: each
    message is flushed once, whatever the batch size, and the flush ends."""
    messages = [at("a.example", "a.example", "b.example",
                   states=(queued(60_000 + i), queued(90_000 - i), queued(80_000)))
                for i in range(3)]
    for m in messages:
        put(spool, wait, m)
    batches = flush_all_batches(spool, wait, domain, limit=1)
    assert all(n <= 1 for n, _ in batches) and len(batches) >= 3
    assert sum(n for n, _ in batches) == 3
    assert sum(r for _, r in batches) == (9 if domain is None else 6)
    for m in messages:
        assert next_attempts(spool, wait, m) == [NOW, NOW, NOW if domain is None else 80.0]
    assert flush_all_batches(spool, wait, domain, limit=1)[-1] == (0, 0)


def domains_index(spool: Any, wait: Any) -> list[bytes]:
    """The keys of an LMDB spool's domains index, read on its writer thread."""
    def read(txn: Any) -> list[bytes]:
        with txn.cursor(db=spool._db[b"domains"]) as cur:
            return [bytes(k) for k in cur.iternext(keys=True, values=False)]
    return wait(spool._submit(_Op(read, read=True)))


def test_finished_recipients_are_no_longer_flushed(spool, wait):
    """Delivered, bounced, deleted and removed recipients leave the domains index: a flush
    of their domain finds nothing; once the queue is empty, so is the index (LMDB)."""
    delivered = RecipientState(DELIVERED, 1, 0.0)
    bounced = RecipientState(BOUNCED, 1, 0.0, Reply(550, "5.1.1", "unknown user"))
    deleted = RecipientState(DELETED, 0, 0.0)
    m = at("d.example", "b.example", "x.example", "q.example")
    removed = at("r.example", "q.example")
    put(spool, wait, m)
    put(spool, wait, removed)
    wait(spool.update(replace(m, recipients=(delivered, bounced, deleted, queued(60_000)))))
    wait(spool.remove(removed.id))
    for domain in ("d.example", "b.example", "x.example", "r.example"):
        assert flush_all_batches(spool, wait, domain) == [(0, 0)]
    if isinstance(spool, LmdbSpool):
        assert domains_index(spool, wait) == [domain_key("q.example", m.id, 3)]
    assert flush_all_batches(spool, wait, "q.example") == [(1, 1)]
    wait(spool.update(replace(m, recipients=(delivered, bounced, deleted, delivered))))
    assert wait(spool.count()) == 0
    if isinstance(spool, LmdbSpool):
        assert domains_index(spool, wait) == []


# -- the outbox ---------------------------------------------------------------------------------

def _eid(n: int, at: float = 1000.0) -> bytes:
    return events.event_id(events.EventIds(1).base(at), n)


def test_put_writes_its_outbox_entries_in_the_same_commit(spool, wait, make_message):
    """The events put() is given are in the outbox after the commit, in id order, readable
    back as records; a failed put (a duplicate id) leaves none."""
    m = make_message(n_rcpts=2)
    base = events.EventIds(1).base(m.arrival)
    told = [events.Received(events.event_id(base, 0), m), events.Suppressed(events.event_id(base, 1), m, 1)]
    writer = spool.body_writer(m.id)
    writer.write(b"x")
    wait(spool.put(m, writer, told))
    assert wait(spool.outbox_read(None, 10)) == [(e.event_id, e.record()) for e in told]
    again = replace(make_message(), id=m.id)
    writer = spool.body_writer(m.id)
    with pytest.raises(CommitFailed):
        wait(spool.put(again, writer, [events.Received(_eid(9, 2000.0), again)]))
    assert [k for k, _ in wait(spool.outbox_read(None, 10))] == [e.event_id for e in told]


def test_apply_writes_the_changes_outbox_entries(spool, wait, make_message):
    """apply() commits a Change's outbox entries with its recipient states."""
    m = make_message(states=(queued(1000),))
    put(spool, wait, m)

    def change(current: StoredMessage) -> Change:
        done = current.with_recipient_state(0, RecipientState(DELIVERED, 1, 0.0))
        return Change(done, finished_at=2.0,
                      outbox=(events.Delivered(_eid(0), done, 0, O.Delivered(OK), 2.0),))
    wait(spool.apply(m.id, change))
    ((key, record),) = wait(spool.outbox_read(None, 10))
    assert key == _eid(0) and record.kind == "delivered" and record.message_id == m.id
    assert wait(spool.get(m.id)) is None


def test_a_change_whose_outbox_entry_exists_fails_whole(spool, wait, make_message):
    """An event id already in the outbox fails the commit: states unchanged, no entry added."""
    m = make_message(states=(queued(1000),))
    put(spool, wait, m, b"x")
    first = events.AdminAction(_eid(0), m, "held", 1.0)
    wait(spool.apply(m.id, lambda cur: Change(cur, outbox=(first,))))

    def change(current: StoredMessage) -> Change:
        done = current.with_recipient_state(0, RecipientState(DELIVERED, 1, 0.0))
        return Change(done, outbox=(events.AdminAction(_eid(1), done, "x", 1.0),
                                    events.Delivered(_eid(0), done, 0, O.Delivered(OK), 1.0)))
    with pytest.raises(CommitFailed):
        wait(spool.apply(m.id, change))
    assert wait(spool.get(m.id)) == m
    assert wait(spool.outbox_read(None, 10)) == [(first.event_id, first.record())]


def test_outbox_read_pages_after_a_key(spool, wait, make_message):
    """outbox_read(after, limit) gives the next `limit` entries above `after`."""
    m = make_message()
    told = [events.AdminAction(_eid(i, 1000.0 + i), m, "held", 1000.0 + i) for i in range(5)]
    put(spool, wait, m)
    wait(spool.apply(m.id, lambda cur: Change(cur, outbox=tuple(reversed(told)))))
    first = wait(spool.outbox_read(None, 2))
    assert [k for k, _ in first] == [e.event_id for e in told[:2]]
    rest = wait(spool.outbox_read(first[-1][0], 10))
    assert [k for k, _ in rest] == [e.event_id for e in told[2:]]
    assert wait(spool.outbox_read(rest[-1][0], 10)) == []


def test_outbox_trim_forgets_older_entries_up_to_the_limit(spool, wait, make_message):
    """outbox_trim(before, limit) removes the oldest entries before `before`, at most `limit`."""
    m = make_message()
    told = [events.AdminAction(_eid(0, at), m, "held", at) for at in (10.0, 20.0, 30.0, 40.0)]
    put(spool, wait, m)
    wait(spool.apply(m.id, lambda cur: Change(cur, outbox=tuple(told))))
    assert wait(spool.outbox_trim(35.0, 2)) == 2
    assert wait(spool.outbox_trim(35.0, 2)) == 1
    assert wait(spool.outbox_trim(35.0, 2)) == 0
    assert [k for k, _ in wait(spool.outbox_read(None, 10))] == [told[3].event_id]
    assert wait(spool.outbox_trim(1e9, 10)) == 1 and wait(spool.outbox_read(None, 10)) == []


# -- the state machine -------------------------------------------------------------------------

TIMES_MS = st.integers(min_value=0, max_value=20_000)


class SpoolMachine(RuleBasedStateMachine):
    """Random puts, recipient updates, removals and clock advances, checked against a model.

    The model maps each stored message id to its recipient states; what is due is computed
    from it directly.  Times are whole milliseconds (see the module docstring).
    """

    def __init__(self, factory: Any, wait: Any) -> None:
        super().__init__()
        self.spool = factory()
        self.wait = wait
        self.now_ms = 0
        self.model: dict[str, StoredMessage] = {}
        self.finished: set[str] = set()

    def teardown(self) -> None:
        self.wait(self.spool.close())

    def model_due(self, limit: int, classes: Any = None) -> list[tuple[float, str]]:
        """By class (priority, then fresh before retries), then time: each message where
        its first due recipient is."""
        entries = sorted((due_class(m.priority, r.attempts), r.next_attempt, mid)
                         for mid, m in self.model.items() for r in m.recipients
                         if r.state == QUEUED and r.next_attempt <= self.now_ms / 1000
                         and (classes is None or due_class(m.priority, r.attempts) in classes))
        out: list[tuple[float, str]] = []
        for _, when, mid in entries:
            if mid not in {m for _, m in out}:
                out.append((when, mid))
        return out[:limit]

    @rule(states=st.lists(st.one_of(TIMES_MS.map(queued),
                                    st.just(RecipientState(HELD, 0, 0.0))),
                          min_size=1, max_size=3),
          priority=st.sampled_from([0, 10, 99]))
    def put(self, states: list[RecipientState], priority: int) -> None:
        m = StoredMessage(new_message_id(), Envelope(
            Address("s", "example.com"),
            tuple(Recipient(Address(f"r{i}", "example.org")) for i in range(len(states)))),
            1.0, 3, tuple(states), {}, priority=priority)
        writer = self.spool.body_writer(m.id)
        writer.write(b"abc")
        self.wait(self.spool.put(m, writer))
        self.model[m.id] = m

    @precondition(lambda self: self.model)
    @rule(data=st.data(), new=st.one_of(
        TIMES_MS.map(lambda ms: queued(ms, attempts=1)),
        st.sampled_from([RecipientState(HELD, 1, 0.0), RecipientState(DELIVERED, 1, 0.0),
                         RecipientState(BOUNCED, 1, 0.0, Reply(550, "5.1.1", "unknown user"))])))
    def update_recipient(self, data: st.DataObject, new: RecipientState) -> None:
        mid = data.draw(st.sampled_from(sorted(self.model)))
        m = self.model[mid]
        m = m.with_recipient_state(data.draw(st.integers(0, len(m.recipients) - 1)), new)
        self.wait(self.spool.update(m))
        if m.unfinished:
            self.model[mid] = m
        else:
            del self.model[mid]
            self.finished.add(mid)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        mid = data.draw(st.sampled_from(sorted(self.model)))
        self.wait(self.spool.remove(mid))
        del self.model[mid]

    @rule(ms=st.integers(min_value=0, max_value=5_000))
    def advance(self, ms: int) -> None:
        self.now_ms += ms

    @invariant()
    def due_matches_the_model(self) -> None:
        now = self.now_ms / 1000
        assert self.wait(self.spool.due(now, 1000)) == self.model_due(1000)
        assert self.wait(self.spool.due(now, 2)) == self.model_due(2)
        queued_times = [r.next_attempt for m in self.model.values() for r in m.recipients
                        if r.state == QUEUED]
        assert self.wait(self.spool.next_due()) == (min(queued_times) if queued_times else None)
        # the classes of one priority level (lanes.level_classes), as the dispatcher reads them
        top = level_classes(level(99))
        assert [(m.id) for m in self.wait(self.spool.load_due(now, 1000, classes=top))] == [
            mid for _, mid in self.model_due(1000, top)]
        top_times = [r.next_attempt for m in self.model.values() for r in m.recipients
                     if r.state == QUEUED and due_class(m.priority, r.attempts) in top]
        assert self.wait(self.spool.next_due(classes=top)) == (min(top_times) if top_times
                                                                else None)
        rest = frozenset(range(256)) - frozenset(top)
        first, second = self.wait(self.spool.load_due_groups(now, [(top, 1000), (rest, 2)]))
        assert [m.id for m in first] == [mid for _, mid in self.model_due(1000, top)]
        assert [m.id for m in second] == [mid for _, mid in self.model_due(1000, rest)][:2]

    @invariant()
    def count_matches_the_model(self) -> None:
        assert self.wait(self.spool.count()) == len(self.model)

    @invariant()
    def finished_messages_are_gone(self) -> None:
        for mid in self.finished:
            assert self.wait(self.spool.get(mid)) is None


def test_spool_state_machine_matches_the_model(spool_factory, wait):
    """Under any sequence of puts, updates, removals and time, due/next_due/count match a model."""
    run_state_machine_as_test(
        lambda: SpoolMachine(spool_factory, wait),
        settings=settings(max_examples=100, stateful_step_count=30, deadline=None,
                          suppress_health_check=list(HealthCheck)))
