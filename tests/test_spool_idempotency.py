"""Idempotency keys stored with a message in its commit: a second put with a fresh key
stores nothing and fails with the first result; an old one is replaced; trimming forgets
old keys, oldest first, through a time index (LMDB: walking only the expired ones).  The
same on the LMDB spool and the in-memory one."""

from __future__ import annotations

import lmdb
import pytest

from txmta.spool import lmdb as spool_lmdb
from txmta.spool.view import LmdbView, idempotent_time_key

from txmta.message import (AlreadySubmitted, Address, Envelope, Idempotency, Recipient,
                           RecipientState, StoredMessage, new_message_id)
from txmta.spool.memory import MemorySpool

T0 = 1_800_000_000.0


def message(at: float) -> StoredMessage:
    env = Envelope(Address("a", "example.com"), (Recipient(Address("b", "dest.test")),))
    return StoredMessage(new_message_id(at), env, at, 3, (RecipientState(next_attempt=at),), {})


@pytest.fixture(params=["memory", "lmdb"])
def spool(request, open_lmdb):
    return MemorySpool() if request.param == "memory" else open_lmdb()


def put(spool, wait, m, idem):
    body = spool.body_writer(m.id)
    body.write(b"x\r\n")
    return wait(spool.put(m, body, (), idem))


def test_a_fresh_key_refuses_a_second_message(spool, wait):
    first, second = message(T0), message(T0 + 10)
    put(spool, wait, first, Idempotency(b"k1", b'{"id": "first"}', T0 - 86400))
    with pytest.raises(AlreadySubmitted) as e:
        put(spool, wait, second, Idempotency(b"k1", b'{"id": "second"}', T0 + 10 - 86400))
    assert e.value.result == b'{"id": "first"}'
    assert wait(spool.get(second.id)) is None and wait(spool.get(first.id)) is not None
    assert wait(spool.idempotent_get(b"k1", T0 - 1)) == b'{"id": "first"}'
    assert wait(spool.idempotent_get(b"k1", T0 + 1)) is None       # older than asked
    assert wait(spool.idempotent_get(b"k2", 0)) is None


def test_an_old_key_is_replaced_and_trim_forgets(spool, wait):
    put(spool, wait, message(T0), Idempotency(b"k", b"old", 0))
    later = message(T0 + 90000)
    put(spool, wait, later, Idempotency(b"k", b"new", T0 + 1))       # the first is past the window
    assert wait(spool.idempotent_get(b"k", T0 + 1)) == b"new"
    put(spool, wait, message(T0 + 5), Idempotency(b"j", b"j", 0))
    assert wait(spool.idempotent_trim(T0 + 100)) == 1                # "j" (stored at T0 + 5)
    assert wait(spool.idempotent_get(b"j", 0)) is None
    assert wait(spool.idempotent_get(b"k", 0)) == b"new"


def test_trim_forgets_the_oldest_first_whatever_the_key_order(spool, wait):
    """Trimming goes by the time a key was stored, not by the key: with a limit of one, the
    old key "z" goes before the fresh "a" is even looked at; "a" stays."""
    put(spool, wait, message(T0 + 100), Idempotency(b"a", b"fresh", 0))
    put(spool, wait, message(T0), Idempotency(b"z", b"old", 0))
    put(spool, wait, message(T0 + 1), Idempotency(b"y", b"old too", 0))
    assert wait(spool.idempotent_trim(T0 + 50, limit=1)) == 1
    assert wait(spool.idempotent_get(b"z", 0)) is None
    assert wait(spool.idempotent_get(b"y", 0)) == b"old too"
    assert wait(spool.idempotent_trim(T0 + 50, limit=1)) == 1
    assert wait(spool.idempotent_trim(T0 + 50, limit=1)) == 0
    assert wait(spool.idempotent_get(b"a", 0)) == b"fresh"


def test_trim_keeps_a_key_stored_at_its_limit(spool, wait):
    """A key stored exactly at `before` is not older than it: it stays."""
    put(spool, wait, message(T0), Idempotency(b"k", b"v", 0))
    assert wait(spool.idempotent_trim(T0)) == 0
    assert wait(spool.idempotent_trim(T0 + 0.001)) == 1


def idemtime(spool):
    with spool._env.begin() as txn:
        return [bytes(k) for k, _ in txn.cursor(db=spool._db[b"idemtime"])]


def test_lmdb_trim_reads_only_expired_keys(open_lmdb, wait, monkeypatch):
    """With 40 fresh keys and 3 expired ones, trimming decodes the 3 expired values and
    nothing else: its cost grows with what expired, not with what is kept."""
    spool = open_lmdb()
    for i in range(40):
        put(spool, wait, message(T0 + 1000 + i), Idempotency(b"fresh%02d" % i, b"f", 0))
    for i in range(3):
        put(spool, wait, message(T0 + i), Idempotency(b"old%d" % i, b"o", 0))
    decoded = []
    real = spool_lmdb.decode_idempotent
    monkeypatch.setattr(spool_lmdb, "decode_idempotent",
                        lambda v: decoded.append(v) or real(v))
    assert wait(spool.idempotent_trim(T0 + 500)) == 3
    assert len(decoded) == 3
    assert len(idemtime(spool)) == 40


def test_lmdb_a_replaced_key_leaves_one_index_entry(open_lmdb, wait):
    """A key stored again past its window moves in the time index: the old entry goes, so a
    trim of the old time cannot take the new result."""
    spool = open_lmdb()
    put(spool, wait, message(T0), Idempotency(b"k", b"old", 0))
    put(spool, wait, message(T0 + 90000), Idempotency(b"k", b"new", T0 + 1))
    assert idemtime(spool) == [idempotent_time_key(T0 + 90000, b"k")]
    assert wait(spool.idempotent_trim(T0 + 100)) == 0
    assert wait(spool.idempotent_get(b"k", 0)) == b"new"


def test_a_format_4_spool_gets_its_idempotency_time_index_when_opened(open_lmdb, wait, tmp_path):
    """A spool written before the time index (format 4) is migrated at open: its keys are
    indexed by the time they were stored, and trimming forgets them.  `txmta queue` reads
    it before and after."""
    path = tmp_path / "spool"
    spool = open_lmdb(path)
    put(spool, wait, message(T0), Idempotency(b"old", b"o", 0))
    put(spool, wait, message(T0 + 1000), Idempotency(b"new", b"n", 0))
    wait(spool.close())
    env = lmdb.open(str(path), max_dbs=30)          # as format 4 left it
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"idemtime", txn=txn), delete=True)
        txn.put(b"format", b"4", db=env.open_db(b"meta", txn=txn))
    env.close()
    view = LmdbView(str(path))
    assert len(view.ids()) == 2
    view.close()
    spool = open_lmdb(path)
    assert idemtime(spool) == [idempotent_time_key(T0, b"old"),
                               idempotent_time_key(T0 + 1000, b"new")]
    assert wait(spool.idempotent_trim(T0 + 500)) == 1
    assert wait(spool.idempotent_get(b"old", 0)) is None
    assert wait(spool.idempotent_get(b"new", 0)) == b"n"
    with spool._env.begin() as txn:
        assert txn.get(b"format", db=spool._db[b"meta"]) == b"6"


def test_the_queue_trims_in_batches_until_none_is_left(wait):
    """2,500 expired keys go in three spool calls of at most 1,000; the fresh one stays."""
    from twisted.internet.task import Clock
    from txmta.queue import Queue

    spool = MemorySpool()
    calls = []
    trim = spool.idempotent_trim
    spool.idempotent_trim = lambda before, limit: calls.append(limit) or trim(before, limit)
    for i in range(2500):
        spool.idempotent[b"k%d" % i] = (T0 + i / 1000, b"")
    spool.idempotent[b"fresh"] = (T0 + 100, b"")
    assert wait(Queue(spool, Clock()).idempotent_trim(T0 + 50)) == 2500
    assert calls == [1000, 1000, 1000] and list(spool.idempotent) == [b"fresh"]


def test_the_worker_forgets_keys_past_the_window_every_10_minutes(wait):
    """QueueService trims the keys older than its window at each 10-minute pass."""
    from twisted.internet.task import Clock
    from txmta.queue import Queue
    from txmta.worker import QueueService

    clock = Clock()
    clock.advance(T0)
    spool = MemorySpool()
    put(spool, wait, message(T0), Idempotency(b"k", b"v", 0))
    service = QueueService(Queue(spool, clock), clock, retention=86400.0,
                           idempotency_window=3600.0)
    service.startService()
    clock.advance(3000)                 # the 10-minute passes up to 3600 s keep it
    assert wait(spool.idempotent_get(b"k", 0)) == b"v"
    clock.advance(600)                  # at T0 + 3600: not older than the window yet
    assert wait(spool.idempotent_get(b"k", 0)) == b"v"
    clock.advance(600)
    assert wait(spool.idempotent_get(b"k", 0)) is None
    service.stopService()
