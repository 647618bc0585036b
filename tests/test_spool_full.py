"""A full disk or a full map (issue 14): new mail gets SpoolFull (452 4.3.1) and leaves
nothing behind; mail already accepted can still be recorded, so a full spool drains; an
attempt whose outcomes cannot be committed changes nothing and is not retried at once."""

from __future__ import annotations

import errno
import os
from typing import Any

import lmdb
import pytest
from twisted.internet.task import Clock

from txmta import outcome as O
from txmta.dispatch import RECORD_RETRY, SCAN_COALESCE, Dispatcher
from txmta.message import BOUNCED, QUEUED, Address, Envelope, Recipient
from txmta.outbound.deliverer import AttemptResult
from txmta.queue import Queue
from txmta.reply import Reply
from txmta.spool import lmdb as spool_lmdb
from txmta.spool.bodies import MemoryBody
from txmta.spool.interface import SpoolFull
from txmta.spool.memory import MemorySpool

from test_dispatch import FakeDeliverer

OK = Reply(250, "2.0.0", "OK")
MAP = 256 * 1024     # max_map_size of the full-map tests: small, so they fill fast
_open = open
NO = Reply(550, "5.1.1", "no such user")


class FullDisk:
    """Stands in for a file on a full disk: writes past `room` octets fail with ENOSPC."""

    def __init__(self, path: str, room: int) -> None:
        self.real = _open(path, "xb")
        self.room = room

    def write(self, data: bytes) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.real.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def full_disk_after(room: int) -> Any:
    def opener(path: str, mode: str) -> FullDisk:
        assert mode == "xb"
        return FullDisk(path, room)
    return opener


# -- the body writer --------------------------------------------------------------------------

@pytest.mark.parametrize("room", [0, 6000], ids=["at-spill", "while-streaming"])
def test_a_body_file_that_fills_the_disk_is_refused_at_put_and_leaves_nothing(
        open_lmdb, wait, make_message, inline_limit, monkeypatch, room):
    """ENOSPC while a big body streams into its file is not raised to the session: the
    writer keeps it, removes the file, ignores the rest, and put() fails with SpoolFull
    (the client gets 452 4.3.1 after its dot); nothing is stored."""
    spool = open_lmdb()
    m = make_message()
    writer = spool.body_writer(m.id)
    monkeypatch.setattr("builtins.open", full_disk_after(room))
    for _ in range(8):
        writer.write(b"x" * inline_limit)     # never raises
    monkeypatch.undo()
    assert isinstance(writer.error, OSError) and writer.error.errno == errno.ENOSPC
    assert os.listdir(spool.bodies) == []
    with pytest.raises(SpoolFull):
        wait(spool.put(m, writer))
    assert wait(spool.get(m.id)) is None and wait(spool.count()) == 0
    ok = make_message()
    writer = spool.body_writer(ok.id)
    writer.write(b"y" * (2 * inline_limit))
    wait(spool.put(ok, writer))
    assert wait(spool.read_body(ok.id)) == b"y" * (2 * inline_limit)


def test_abort_removes_a_body_file_whose_buffered_rest_cannot_be_written(tmp_path):
    """abort() after a failed sync (ENOSPC at the flush of the last buffered bytes) still
    removes the file and raises nothing."""
    body = MemoryBody(str(tmp_path / "b"), 10)
    body.write(b"z" * 20)

    class Failing:
        def close(self) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    body.file.close()
    body.file = Failing()
    body.abort()
    assert not (tmp_path / "b").exists()


# -- what counts as full ----------------------------------------------------------------------

class Statvfs:
    def __init__(self, free: int) -> None:
        self.f_bavail, self.f_frsize = free // 4096, 4096


@pytest.mark.parametrize("free, full", [(1 << 20, True), (1 << 30, False)])
def test_a_short_write_of_a_commit_on_a_nearly_full_disk_is_a_full_spool(monkeypatch, free,
                                                                            full):
    """LMDB reports a commit's short write (the filesystem filled during it) as EIO: that
    is SpoolFull when the spool's filesystem is nearly full, an I/O error otherwise."""
    monkeypatch.setattr(spool_lmdb.os, "statvfs", lambda path: Statvfs(free))
    eio = lmdb.Error("mdb_txn_commit: Input/output error")
    assert spool_lmdb._is_disk_full(eio, "/spool") is full
    assert spool_lmdb._is_disk_full(eio) is False
    assert spool_lmdb._is_disk_full(lmdb.DiskError("mdb_txn_commit: No space left on device"))
    assert spool_lmdb._is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not spool_lmdb._is_disk_full(OSError(errno.EACCES, "Permission denied"), "/spool")


# -- a full map drains ------------------------------------------------------------------------

def fill(queue: Queue, clock: Clock, wait: Any, size: int) -> list[str]:
    """Put messages of `size` octets until the spool refuses one; their ids."""
    ids = []
    while True:
        env = Envelope(Address("app", "example.com"), (Recipient(Address("a", "example.net")),))
        mid = queue.new_message_id()
        body = queue.body_writer(mid)
        body.write(b"Subject: x\r\n\r\n" + os.urandom(size))
        try:
            wait(queue.put(mid, env, body, {}, clock.seconds()))
        except SpoolFull:
            return ids
        ids.append(mid)


@pytest.mark.parametrize("size", [300, 3000, 5000], ids=["small", "inline", "in-files"])
def test_a_spool_full_at_max_map_size_records_its_deliveries_and_takes_mail_again(
        open_lmdb, wait, size):
    """Filled to max_map_size (small bodies, inline ones, bodies in files: the map then
    holds envelopes only), the spool refuses new mail, yet the delivery of every message
    commits: a full spool can always drain, though history and events are written before
    LMDB can reuse pages (a write without new mail may grow the map past max_map_size).
    New mail is accepted again once the history kept in the map allows (at once when the
    bodies drained were big enough; else when history expires)."""
    clock = Clock()
    clock.advance(1_700_000_000)
    spool = open_lmdb(map_size=MAP, max_map_size=MAP)
    queue = Queue(spool, clock, schedule=(60.0,), max_lifetime=3600.0, jitter=lambda: 0.0)
    ids = fill(queue, clock, wait, size)
    assert len(ids) > 20
    for mid in ids:
        m = wait(spool.get(mid))
        wait(queue.record(m, {0: O.Delivered(OK)}))
    assert wait(spool.count()) == 0
    assert spool._env.info()["map_size"] <= spool_lmdb.DRAIN_GROWTH * MAP
    if size != 3000:
        clock.advance(3600)
        wait(queue.expire_history(60))
    assert len(fill(queue, clock, wait, size)) > len(ids) // 2


def test_new_mail_keeps_out_of_the_room_kept_for_delivery(open_lmdb, wait):
    """After every accepted put, the databases leave at least the reserve of max_map_size
    free, even once delivery has grown the map past max_map_size."""
    clock = Clock()
    clock.advance(1_700_000_000)
    spool = open_lmdb(map_size=MAP, max_map_size=MAP)
    queue = Queue(spool, clock, schedule=(60.0,), max_lifetime=3600.0, jitter=lambda: 0.0)
    reserve = spool_lmdb.intake_reserve(MAP)
    grown = False
    for _ in range(3):
        ids = fill(queue, clock, wait, 5000)     # bodies in files: the map fills with envelopes
        with spool._env.begin() as txn:
            assert spool._room(txn) >= reserve
        for mid in ids:
            wait(queue.record(wait(spool.get(mid)), {0: O.Delivered(OK)}))
        grown = grown or spool._env.info()["map_size"] > MAP
        clock.advance(3600)
        wait(queue.expire_history(60))
    assert grown


# -- delivery while the spool is full ---------------------------------------------------------

def setup_dispatch() -> tuple[Clock, MemorySpool, Queue, FakeDeliverer, Dispatcher]:
    clock = Clock()
    clock.advance(1_700_000_000)
    spool = MemorySpool()
    queue = Queue(spool, clock, schedule=(60.0,), max_lifetime=3600.0, jitter=lambda: 0.0)
    deliverer = FakeDeliverer()
    dispatcher = Dispatcher(queue, deliverer, clock)
    queue.events.subscribe(dispatcher.heard, *Dispatcher.HEARS)
    dispatcher.start()
    return clock, spool, queue, deliverer, dispatcher


def put(queue: Queue, clock: Clock) -> str:
    env = Envelope(Address("app", "example.com"), (Recipient(Address("a", "example.net")),))
    mid = queue.new_message_id()
    body = queue.body_writer(mid)
    body.write(b"Subject: x\r\n\r\nhi\r\n")
    queue.put(mid, env, body, {}, clock.seconds())
    return mid


@pytest.mark.parametrize("reply", [OK, NO], ids=["delivered", "bounced"])
def test_an_attempt_the_full_spool_cannot_record_changes_nothing_and_waits(reply):
    """Outcomes refused with SpoolFull: the recipient stays QUEUED and due (a bounce stays
    owed: no DSN, no BOUNCED without it), the message is not tried again at once but after
    RECORD_RETRY, and then its outcome is recorded."""
    clock, spool, queue, deliverer, dispatcher = setup_dispatch()
    outcome = O.Delivered(OK) if reply.code == 250 else O.PermFailed(reply)
    deliverer.answer = lambda env, idx: AttemptResult({i: outcome for i in idx}, "d")
    mid = put(queue, clock)
    spool.fail_next = SpoolFull("mdb_txn_commit: No space left on device")
    clock.advance(SCAN_COALESCE)
    assert len(deliverer.calls) == 1
    state = spool.messages[mid].recipients[0]
    assert state.state == QUEUED and state.attempts == 0
    assert list(spool.messages) == [mid]            # no DSN
    assert dispatcher.unrecorded == {mid: clock.seconds() + RECORD_RETRY}
    for _ in range(int(RECORD_RETRY) - 1):
        clock.advance(1)
    assert len(deliverer.calls) == 1                # no hot loop
    clock.advance(1)
    assert deliverer.calls[:2] == [["a@example.net"], ["a@example.net"]]
    assert not dispatcher.unrecorded
    if reply.code == 250:
        assert spool.messages == {}
    else:
        assert spool.history[mid][0].recipients[0].state == BOUNCED
        assert deliverer.calls[2:] == [["app@example.com"]]     # the DSN, committed with it
