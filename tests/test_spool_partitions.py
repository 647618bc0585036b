"""The spool's partitions: a spool reads due mail and clears orphan bodies only in the
partitions it owns, whatever other workers store in the same environment; format 1 spools
(due keys without the partition byte) are migrated when opened."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from typing import Any

import lmdb

from txmta import partition as P
from txmta.message import MessageIds, RecipientState, StoredMessage
from txmta.spool.view import domain_key
from txmta.spool.memory import MemorySpool


def message_in(part: int, when: float, make_message: Any) -> StoredMessage:
    m = make_message(states=(RecipientState(next_attempt=when),))
    return replace(m, id=MessageIds({part})(when))


def store(spool: Any, wait: Any, m: StoredMessage, body: bytes = b"x\r\n") -> None:
    w = spool.body_writer(m.id)
    w.write(body)
    wait(spool.put(m, w))


def test_due_mail_comes_only_from_the_owned_partitions(open_lmdb: Any, tmp_path: Any,
                                                       wait: Any, make_message: Any) -> None:
    """Worker 0 of 2 and worker 1 of 2 see disjoint due mail that together is all of it,
    in time order, from one environment."""
    path = tmp_path / "spool"
    everyone = open_lmdb(path)
    messages = [message_in(p, 1000.0 + i, make_message) for i, p in
                enumerate([0, 1, 2, 3, 5, 8, 13, 21, 31, 30])]
    for m in messages:
        store(everyone, wait, m)
    assert [m.id for m in wait(everyone.load_due(5000.0, 100))] == [m.id for m in messages]
    wait(everyone.close())
    seen: list[str] = []
    for k in range(2):
        mine = P.owned(k, 2)
        spool = open_lmdb(path, partitions=mine)
        due = [m.id for m in wait(spool.load_due(5000.0, 100))]
        assert due == [m.id for m in messages if P.partition_of(m.id) in mine]
        assert wait(spool.next_due()) == min(m.recipients[0].next_attempt for m in messages
                                             if P.partition_of(m.id) in mine)
        seen += due
        wait(spool.close())
    assert sorted(seen) == sorted(m.id for m in messages)


def test_memory_spool_reads_only_its_partitions(wait: Any, make_message: Any) -> None:
    spool = MemorySpool({4})
    a, b = message_in(4, 10.0, make_message), message_in(5, 5.0, make_message)
    store(spool, wait, a)
    store(spool, wait, b)
    assert [m.id for m in wait(spool.load_due(100.0, 10))] == [a.id]
    assert wait(spool.next_due()) == 10.0


def test_next_due_skips_excluded_messages_across_partitions(open_lmdb: Any, wait: Any,
                                                            make_message: Any) -> None:
    spool = open_lmdb()
    a = message_in(2, 10.0, make_message)
    b = message_in(9, 20.0, make_message)
    store(spool, wait, a)
    store(spool, wait, b)
    assert wait(spool.next_due()) == 10.0
    assert wait(spool.next_due(frozenset({a.id}))) == 20.0
    assert wait(spool.next_due(frozenset({a.id, b.id}))) is None
    assert [m.id for m in wait(spool.load_due(15.0, 10))] == [a.id]


def test_orphan_bodies_are_removed_only_in_owned_partitions(open_lmdb: Any, tmp_path: Any,
                                                            wait: Any) -> None:
    """A body file without a message is a leftover of a crash, unless another worker is
    still writing it: a spool removes only those of its own partitions."""
    path = tmp_path / "spool"
    wait(open_lmdb(path).close())
    mine, theirs = MessageIds({0})(1.0), MessageIds({1})(1.0)
    for mid in (mine, theirs):
        (path / "bodies" / mid).write_bytes(b"partial")
    spool = open_lmdb(path, partitions=P.owned(0, 2))
    assert not (path / "bodies" / mine).exists()
    assert (path / "bodies" / theirs).exists()
    wait(spool.close())


def test_a_format_1_spool_is_migrated_and_its_mail_stays_due(open_lmdb: Any, tmp_path: Any,
                                                             wait: Any, make_message: Any) -> None:
    path = tmp_path / "spool"
    spool = open_lmdb(path)
    messages = [message_in(p, 100.0 + p, make_message) for p in (0, 7, 19)]
    for m in messages:
        store(spool, wait, m)
    wait(spool.close())
    env = lmdb.open(str(path), max_dbs=20)   # rewrite it as format 1 wrote it
    due, meta = env.open_db(b"due"), env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"domains", txn=txn), delete=True)    # format 3 added it
        keys = [k for k, _ in txn.cursor(db=due)]
        assert len(keys) == 3 and all(k[0] == P.partition_of(k[10:].split(b"/")[0].decode())
                                      for k in keys)
        for k in keys:                          # no partition byte, no class byte (format 4)
            txn.delete(k, db=due)
            txn.put(k[2:], b"", db=due)
        txn.put(b"format", b"1", db=meta)
    env.close()
    spool = open_lmdb(path)
    assert [m.id for m in wait(spool.load_due(1000.0, 10))] == [m.id for m in messages]
    wait(spool.close())
    env = lmdb.open(str(path), max_dbs=20)
    due, meta, domains = env.open_db(b"due"), env.open_db(b"meta"), env.open_db(b"domains")
    with env.begin() as txn:
        assert txn.get(b"format", db=meta) == b"6"      # 1 -> 2 -> 3 -> 4 -> 5 -> 6
        assert sorted(k for k, _ in txn.cursor(db=due)) == sorted(keys)
        assert sorted(k for k, _ in txn.cursor(db=domains)) == sorted(
            domain_key("example.org", m.id, 0) for m in messages)
    env.close()


def test_a_map_grown_by_another_process_is_adopted(open_lmdb: Any, tmp_path: Any, wait: Any,
                                                   make_message: Any) -> None:
    """Another worker grew the map and wrote (MDB_MAP_RESIZED here): reads and writes go on
    and see its commit."""
    path = tmp_path / "spool"
    spool = open_lmdb(path, map_size=1 << 20)
    store(spool, wait, message_in(0, 1.0, make_message))
    other = MessageIds({0})(1.5)
    subprocess.run([sys.executable, "-c", GROW_AND_WRITE, str(path), other], check=True,
                   timeout=60)
    assert [m.id for m in wait(spool.load_due(10.0, 10))][1:] == [other]
    store(spool, wait, message_in(0, 2.0, make_message), b"y" * 3000)
    assert wait(spool.count()) == 3


GROW_AND_WRITE = """
import sys, threading
from txmta.message import Address, Envelope, Recipient, RecipientState, StoredMessage
from txmta.spool.lmdb import LmdbSpool

class Now:
    def callFromThread(self, f, *a, **kw):
        f(*a, **kw)

path, other = sys.argv[1], sys.argv[2]
spool = LmdbSpool(path, Now(), map_size=1 << 20, inline_limit=1 << 24)
m = StoredMessage(other, Envelope(Address("s", "example.com"), (Recipient(Address("r", "example.org")),)),
                  1.5, 0, (RecipientState(next_attempt=1.5),), {})
body = spool.body_writer(other)
body.write(b"z" * (3 << 20))          # more than the map holds: this process grows it
done = threading.Event()
spool.put(m, body).addBoth(lambda r: (print(r), done.set()))
assert done.wait(30)
spool.close()
"""
