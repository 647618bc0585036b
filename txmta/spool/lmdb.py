"""The LMDB spool: crash-safe storage of messages, recipient states and the due index.

One environment at `spool.path` (sync and metasync on, no writemap), with named databases:
messages (id -> envelope record), bodies (id -> small body), recipients (id/idx -> state),
due (partition/time/id/idx -> "", the time-ordered index of recipients to try), domains
(partition/domain/id/idx -> "", the unfinished recipients of each domain, for `flush
--domain`), events (timelines), outbox (event id -> the record of one `txmta.events` event,
written in the transaction of the change it describes; read and trimmed by
`outbox_read`/`outbox_trim`), lookup (recipient address or tag / arrival / id -> "", written
with each message and removed with its history: the HTTP API's searches; mail stored before
it existed has no entries), idempotency (key -> time and result: the HTTP API's
Idempotency-Key and the SMTP intake's duplicate check, written with the message they
name), idemtime (stored time / key -> "", the time index that expires them) and meta
(format version).  Bodies above `inline_limit` are
streamed to files under `bodies/` and fsynced (file, then directory) before the commit that
references them; a body file no message references is removed at start.

**One writer thread** owns every transaction of the daemon: callers queue operations, the
thread takes everything pending, runs it in one write transaction, commits once (natural
group commit: sessions that arrive during a commit share the next one), then fires the
callers' Deferreds in the reactor thread.  Read-only operations of a batch run first, in a
read transaction, and are answered before the batch's commit: they see the last commit, not
writes queued beside them, so a caller that needs its own write must wait for it first.  A full map is grown live between transactions,
up to `max_map_size`; past that, or on a full disk, operations fail with `SpoolFull`.  New
mail keeps out of a reserve of the map (`intake_reserve`), and writes without new mail may
grow it past `max_map_size` (DRAIN_GROWTH): recording the delivery of a full spool needs
pages too, so a full spool always drains.

The layout (databases, keys, readers) and `LmdbView`, the read-only view other processes use
while the daemon runs, are in view.py; `MemoryBody`, the body writer, in bodies.py.
"""
# test: tests/test_spool_contract.py, tests/test_spool_lmdb.py

from __future__ import annotations

import errno
import heapq
import os
import struct
import threading
import time
from itertools import islice
from dataclasses import replace
from typing import Any, Callable, Collection, Iterable, Iterator, Sequence

import lmdb
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

from txmta.events import time_key
from txmta.message import (QUEUED, UNFINISHED, Change, OutboxEntry, OutboxRecord,
                           RecipientState, StoredMessage, Suppression, intake_events,
                           received_event, AlreadySubmitted, Idempotency, message_id_time)
from txmta.partition import ALL, partition_of
from txmta.spool import codec, maptrim
from txmta.spool.bodies import MemoryBody, fsync_dir
from txmta.spool.hooks import HookDeliveries
from txmta.spool.interface import CommitFailed, SpoolError, SpoolFormatError, SpoolFull
from txmta.spool.view import (DB_NAMES, FORMAT, MAX_READERS, domain_key, domain_prefix,
                              lane_count_key, lane_stats,
                              due_id, due_key, event_key, finished_key, load_message,
                              load_messages, rcpt_key, read_outbox, read_suppressions,
                              split_rcpt_key, encode_idempotent, decode_idempotent,
                              idempotent_time_key, lookup_keys, recipient_due_key)
from txmta.lanes import MAX_PRIORITY, due_class

READER_CHECK = 60.0   # seconds between sweeps of the reader slots dead processes left (and
                      # trims of the map's pages from the resident set: maptrim.py)
# An I/O error of a commit counts as a full disk when less than this is left free: LMDB
# reports a short write (the filesystem filled during it) as EIO
NEARLY_FULL = 16 * 1024 * 1024


def intake_reserve(max_map_size: int) -> int:
    """The part of the map at `max_map_size` that new mail may not use: kept for the writes
    that drain a full spool (delivery outcomes, bounces with their DSN, admin changes), which
    need free pages too (LMDB copies every page it changes).  1/16 of the map, at most 64 MiB."""
    return min(max_map_size // 16, 64 * 1024 * 1024)


# How far past max_map_size a write without new mail may grow the map.  The map is address
# space, not disk: the file grows with the pages used, and what draining writes is bounded
# by the mail already accepted.
DRAIN_GROWTH = 4
log = Logger()


def _migrate_due_1_to_2(txn: Any, due: Any) -> int:
    """Format 1 due keys (time/id/idx) get their partition byte in front."""
    with txn.cursor(db=due) as cur:
        old = list(cur.iternext(keys=True, values=False))
    for key in old:
        txn.delete(key, db=due)
    for key in old:
        mid, index = key[8:].rsplit(b"/", 1)
        txn.put(bytes((partition_of(mid.decode("ascii")),)) + key, b"", db=due)
    return len(old)


def _migrate_domains_2_to_3(txn: Any, dbs: dict[bytes, Any]) -> int:
    """Format 2 had no domains index: list every unfinished recipient in it."""
    n = 0
    with txn.cursor(db=dbs[b"messages"]) as cur:
        ids = [bytes(k).decode("ascii") for k in cur.iternext(keys=True, values=False)]
    for mid in ids:
        try:
            m = load_message(txn, dbs, mid)
        except codec.CorruptRecord as e:
            log.warn("corrupt spool record {id} left out of the domains index: {e}", id=mid, e=e)
            continue
        if m is None:
            continue
        for i, (rcpt, st) in enumerate(zip(m.envelope.recipients, m.recipients)):
            if st.state in UNFINISHED:
                txn.put(domain_key(rcpt.address.domain, mid, i), b"", db=dbs[b"domains"])
                n += 1
    return n


def _migrate_due_3_to_4(txn: Any, dbs: dict[bytes, Any]) -> int:
    """Format 3 due keys (partition/time/id/idx) get the class byte after the partition: the
    mail of that time had no priority (0), so only fresh vs retry tells (lanes.due_class)."""
    due = dbs[b"due"]
    with txn.cursor(db=due) as cur:
        old = [bytes(k) for k in cur.iternext(keys=True, values=False)]
    for key in old:
        txn.delete(key, db=due)
    for key in old:
        mid, index = key[9:].rsplit(b"/", 1)
        raw = txn.get(key[9:], db=dbs[b"recipients"])
        attempts = 0
        if raw is not None:
            try:
                attempts = codec.decode_recipient(bytes(raw)).attempts
            except codec.CorruptRecord:
                pass
        txn.put(key[:1] + bytes((due_class(0, attempts),)) + key[1:], b"", db=due)
    return len(old)


def _migrate_idemtime_4_to_5(txn: Any, dbs: dict[bytes, Any]) -> int:
    """Format 4 had no time index of idempotency keys: list every stored key in it."""
    n = 0
    with txn.cursor(db=dbs[b"idempotency"]) as cur:
        entries = [(bytes(k), bytes(v)) for k, v in cur]
    for key, value in entries:
        when, _ = decode_idempotent(value)
        txn.put(idempotent_time_key(when, key), b"", db=dbs[b"idemtime"])
        n += 1
    return n


def _migrate_lanes_5_to_6(txn: Any, dbs: dict[bytes, Any]) -> int:
    """Format 5 kept no message counts by lane: count the stored messages."""
    counts: dict[str, int] = {}
    with txn.cursor(db=dbs[b"messages"]) as cur:
        for raw in cur.iternext(keys=False, values=True):
            try:
                lane = codec.message_lane(bytes(raw))
            except codec.CorruptRecord:
                lane = ""
            counts[lane] = counts.get(lane, 0) + 1
    for lane, n in counts.items():
        txn.put(lane_count_key(lane), n.to_bytes(8, "big"), db=dbs[b"meta"])
    return len(counts)


# Each older format, migrated one step at a time when a spool of it is opened: (format,
# migration (txn, databases) -> entries written, what they are, for the log line).
_MIGRATIONS: tuple[tuple[bytes, Callable[[Any, dict[bytes, Any]], int], str], ...] = (
    (b"1", lambda txn, dbs: _migrate_due_1_to_2(txn, dbs[b"due"]),
     "due entries keyed by partition"),
    (b"2", _migrate_domains_2_to_3, "recipients in the domains index"),
    (b"3", _migrate_due_3_to_4, "due entries keyed by class"),
    (b"4", _migrate_idemtime_4_to_5, "idempotency keys in the time index"),
    (b"5", _migrate_lanes_5_to_6, "lanes counted"),
)


def _count_lane(txn: Any, meta: Any, lane: str, delta: int) -> None:
    """Add `delta` to the count of messages in `lane` (kept in the meta database)."""
    key = lane_count_key(lane)
    raw = txn.get(key, db=meta)
    n = max(0, (int.from_bytes(raw, "big") if raw else 0) + delta)
    if n:
        txn.put(key, n.to_bytes(8, "big"), db=meta)
    elif raw is not None:
        txn.delete(key, db=meta)


def _is_disk_full(e: BaseException, path: str | None = None) -> bool:
    """Whether `e` means the map or the disk is full; with `path` (the spool), an I/O error
    too when the filesystem there is nearly full (LMDB's short write)."""
    if isinstance(e, (lmdb.MapFullError, lmdb.DiskError)):
        return True
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left" in str(e) or "MDB_MAP_FULL" in str(e):
        return True
    io_error = (isinstance(e, OSError) and e.errno == errno.EIO) or \
        (isinstance(e, lmdb.Error) and "Input/output error" in str(e))
    if io_error and path is not None:
        try:
            st = os.statvfs(path)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < NEARLY_FULL
    return False


class _Op:
    __slots__ = ("fn", "deferred", "pre", "post", "on_fail", "result", "failure", "read",
                 "intake")

    def __init__(self, fn: Callable[[Any], Any], pre: Callable[[], None] | None = None,
                 post: Callable[[], None] | None = None,
                 on_fail: Callable[[], None] | None = None, read: bool = False,
                 intake: bool = False) -> None:
        self.fn = fn
        self.read = read      # read-only: answered from the last commit, without waiting for one
        self.intake = intake  # new mail: may not grow the map past max_map_size
        self.pre = pre
        self.post = post
        self.on_fail = on_fail
        self.deferred: Deferred[Any] = Deferred()
        self.result: Any = None
        self.failure: BaseException | None = None


class _OneFailed(Exception):
    """An operation of a group run without child transactions failed: run it again with."""


class LmdbSpool(HookDeliveries):
    def __init__(self, path: str, reactor: IReactorFromThreads, *, map_size: int = 1 << 30,
                 max_map_size: int = 1 << 36, inline_limit: int = 256 * 1024,
                 partitions: Iterable[int] = ALL) -> None:
        self.path = path
        # due mail and orphan bodies are read only in these: other workers own the rest
        self.partitions = tuple(sorted(partitions))
        self.bodies = os.path.join(path, "bodies")
        self._reactor = reactor
        self._inline_limit = inline_limit
        # told (on the writer thread) the duration and size of each commit: the metrics
        self.on_commit: Callable[[float, int], None] | None = None
        self._max_map_size = max(max_map_size, map_size)
        self._reserve = intake_reserve(self._max_map_size)
        os.makedirs(self.bodies, exist_ok=True)
        self._env = lmdb.open(path, map_size=map_size, max_dbs=len(DB_NAMES) + 2, subdir=True,
                              sync=True, metasync=True, writemap=False, map_async=False,
                              lock=True, readahead=False, max_readers=MAX_READERS)
        try:
            self._check_readers()
            self._db = {name: self._env.open_db(name) for name in DB_NAMES}
            self._main = self._env.open_db(None)
            self._check_format()
            self._remove_orphan_bodies()
        except BaseException:
            self._env.close()  # py-lmdb refuses a second open in this process while it lives
            raise
        self._pending: list[_Op] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._closed: Deferred[None] | None = None
        self._thread = threading.Thread(target=self._run, name="txmta-spool-writer", daemon=True)
        self._thread.start()

    # -- start ------------------------------------------------------------------------

    def _check_readers(self) -> None:
        """Free the reader slots of processes that died (a killed worker keeps its slot)."""
        stale = self._env.reader_check()
        if stale:
            log.info("spool: freed {n} reader slots of dead processes", n=stale)

    def _check_format(self) -> None:
        # in one write transaction: of workers starting together, one migrates, the others
        # then see the new format
        with self._env.begin(write=True, db=self._db[b"meta"]) as txn:
            found = txn.get(b"format")
            if found is None:
                txn.put(b"format", FORMAT)
                return
            found = original = bytes(found)
            for before, migrate, what in _MIGRATIONS:
                if found == before:
                    n = migrate(txn, self._db)
                    after = b"%d" % (int(before) + 1)
                    log.info("spool {path}: format {a} -> {b}, {n} {what}", path=self.path,
                             a=before.decode(), b=after.decode(), n=n, what=what)
                    found = after
            if found != FORMAT:
                raise SpoolFormatError(
                    f"spool {self.path} has format {found.decode(errors='replace')}, this txmta "
                    f"reads format {FORMAT.decode()}; use the txmta version that wrote it")
            if found != original:
                txn.put(b"format", FORMAT)

    def _remove_orphan_bodies(self) -> None:
        with self._env.begin(db=self._db[b"messages"]) as txn:
            owned = set(self.partitions)
            for name in os.listdir(self.bodies):
                # another worker may be writing the body of a message it has not committed
                if partition_of(name) in owned and txn.get(name.encode("ascii", "replace")) is None:
                    log.info("removing unreferenced body file {name}", name=name)
                    os.unlink(os.path.join(self.bodies, name))

    # -- writer thread --------------------------------------------------------------------

    def _run_op(self, fn: Callable[[Any], Any], read: bool = False) -> Deferred[Any]:
        """`fn(txn)` on the writer thread: in the next commit, or (`read`) in a read
        transaction answered from the last one."""
        return self._submit(_Op(fn, read=read))

    def _submit(self, op: _Op) -> Deferred[Any]:
        with self._cond:
            if self._stopping:
                op.deferred.errback(CommitFailed("spool is closed"))
                return op.deferred
            self._pending.append(op)
            self._cond.notify()
        return op.deferred

    def _run(self) -> None:
        checked = time.monotonic()
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait(READER_CHECK)
                    if time.monotonic() - checked >= READER_CHECK:
                        break
                batch, self._pending = self._pending, []
                if not batch and self._stopping:
                    break
            if time.monotonic() - checked >= READER_CHECK:
                checked = time.monotonic()
                try:
                    self._check_readers()
                except lmdb.Error:
                    log.failure("spool reader check")
                self.trim_map()
            if not batch:
                continue
            reads = [op for op in batch if op.read]
            if reads:
                # reads see the last commit and are answered at once: a delivery waiting for
                # a body or for due mail never waits for the fsyncs of other sessions' writes
                self._run_reads(reads)
                self._reactor.callFromThread(self._fire, reads)
                batch = [op for op in batch if not op.read]
            if batch:
                self._run_batch(batch)
                self._reactor.callFromThread(self._fire, batch)
        self._reactor.callFromThread(self._exit)

    def trim_map(self) -> bool:
        """Drop the pages of the data file this process has read from its resident set (the
        writer thread does it every READER_CHECK seconds, between its transactions; a read
        on another thread meanwhile faults its page back in, unchanged); see
        txmta/spool/maptrim.py."""
        return maptrim.trim(os.path.join(self.path, "data.mdb"))

    def _adopt_map_size(self) -> None:
        """Another worker grew the map: take its size (MDB_MAP_RESIZED)."""
        self._env.set_mapsize(0)

    def _run_reads(self, reads: list[_Op]) -> None:
        for attempt in range(10):
            try:
                with self._env.begin(write=False) as txn:
                    for op in reads:
                        op.failure = None
                        try:
                            op.result = op.fn(txn)
                        except lmdb.MapResizedError:
                            raise
                        except Exception as e:
                            op.failure = e if isinstance(e, SpoolError) else CommitFailed(repr(e))
                return
            except lmdb.MapResizedError:
                self._adopt_map_size()
            except Exception as e:
                for op in reads:
                    op.failure = CommitFailed(repr(e))
                return
        for op in reads:
            op.failure = CommitFailed("spool map kept changing size")

    def _run_batch(self, batch: list[_Op]) -> None:
        synced_dir = False
        for op in batch:
            if op.pre is not None:
                try:
                    op.pre()
                    synced_dir = True
                except BaseException as e:
                    op.failure = SpoolFull(str(e)) if _is_disk_full(e, self.path) \
                        else CommitFailed(str(e))
        if synced_dir:
            try:
                fsync_dir(self.bodies)
            except OSError as e:
                for op in batch:
                    if op.pre is not None and op.failure is None:
                        op.failure = CommitFailed(f"fsync of {self.bodies}: {e}")
        groups = [[op for op in batch if op.failure is None]]
        resized = 0

        def more() -> list[_Op]:
            """Writes submitted since `batch` was taken that need nothing before their commit
            (no body file to sync): they join it.  `_commit` asks once it holds the write
            lock, so what arrived while another worker's commit held it is in this commit,
            not the next one (fewer, larger commits when workers share the spool)."""
            with self._cond:
                taken = [op for op in self._pending if not op.read and op.pre is None]
                if taken:
                    self._pending = [op for op in self._pending
                                     if op.read or op.pre is not None]
            batch.extend(taken)
            return taken

        first = True
        while groups:
            group = groups.pop(0)
            if not group:
                continue
            # only the first try takes more: a retry or a split (a full map) must end
            error = self._commit(group, more if first else None)
            first = False
            if error is None:
                continue
            if isinstance(error, lmdb.MapResizedError) and resized < 10:
                resized += 1
                self._adopt_map_size()
                groups.insert(0, group)
                continue
            if isinstance(error, lmdb.MapFullError):
                if self._grow(any(op.intake for op in group)):
                    groups.insert(0, group)
                    continue
                if len(group) > 1:  # find the operations that do fit, one by one
                    groups[0:0] = [[op] for op in group]
                    continue
                group[0].failure = SpoolFull("spool map is full (spool.max_map_size reached)")
                continue
            full = _is_disk_full(error, self.path)
            for op in group:
                op.failure = SpoolFull(str(error)) if full else CommitFailed(repr(error))
        for op in batch:
            try:
                if op.failure is not None:
                    if op.on_fail is not None:
                        op.on_fail()
                elif op.post is not None:
                    op.post()
            except Exception:
                log.failure("spool cleanup after commit")

    def _commit(self, group: list[_Op], more: Callable[[], list[_Op]] | None = None,
                nested: bool = False) -> BaseException | None:
        """Run `group` in one write transaction.  Returns the error that prevented the
        commit (the whole group then failed), or None.  `more()`, asked once the write lock
        is held, gives operations that join `group` (new ones: nothing to reset; they stay
        in `group` for a retry).

        The operations first run straight in the transaction.  If one of them fails, the
        transaction is abandoned and the group runs again with each operation in a child
        transaction (`nested`), so that the error fails only that operation (operations may
        run more than once: see `apply`).  A child transaction for every operation cost the
        writer thread about 6 % of its CPU (0.38 -> 0.36 ms a message) while nothing failed."""
        for op in group:
            op.failure = None
            op.result = None
        started = time.perf_counter()
        try:
            with self._env.begin(write=True) as txn:
                if more is not None:
                    group.extend(more())
                if not nested:
                    try:
                        for op in group:
                            op.result = op.fn(txn)
                    except (lmdb.MapFullError, lmdb.MapResizedError):
                        raise
                    except Exception:
                        raise _OneFailed() from None
                else:
                    for op in group:
                        child = self._env.begin(write=True, parent=txn)
                        try:
                            op.result = op.fn(child)
                            child.commit()
                        except (lmdb.MapFullError, lmdb.MapResizedError):
                            child.abort()
                            raise
                        except Exception as e:
                            child.abort()
                            op.failure = e if isinstance(e, SpoolError) else CommitFailed(repr(e))
        except _OneFailed:
            return self._commit(group, nested=True)
        except Exception as e:
            return e
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started, len(group))
        return None

    def _room(self, txn: Any) -> int:
        """Bytes of the map at `max_map_size` that no database of `txn` uses.  An estimate:
        pages freed by a transaction that a reader still sees count as free."""
        used = 2    # the meta pages
        for db in (self._main, *self._db.values()):
            st = txn.stat(db)
            used += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        return self._max_map_size - used * self._env.stat()["psize"]

    def _check_intake_room(self, txn: Any) -> None:
        """SpoolFull if new mail would eat into the reserve (`intake_reserve`): a spool full
        of mail must keep room to record its delivery.  Cheap while the map's high-water
        mark is far from `max_map_size`."""
        info = self._env.info()
        if (info["last_pgno"] + 1) * self._env.stat()["psize"] + 2 * self._reserve \
                <= self._max_map_size:
            return
        if self._room(txn) < self._reserve:
            raise SpoolFull(f"spool map is full (the last {self._reserve} bytes of "
                            "spool.max_map_size are kept for delivery)")

    def _grow(self, intake: bool = True) -> bool:
        """Double the map, up to max_map_size; a group without new mail (delivery outcomes,
        bounces, admin changes) up to DRAIN_GROWTH times that: draining a full spool writes
        history, events and DSNs before LMDB can reuse the pages of what left
        (`_check_intake_room` keeps new mail out of the extra room)."""
        current = self._env.info()["map_size"]
        limit = self._max_map_size if intake else DRAIN_GROWTH * self._max_map_size
        if current >= limit:
            return False
        new = min(current * 2, limit)
        try:
            self._env.set_mapsize(new)
        except lmdb.Error:
            return False
        log.info("spool map grown from {old} to {new} bytes", old=current, new=new)
        return True

    def _fire(self, batch: list[_Op]) -> None:
        for op in batch:
            if op.failure is not None:
                op.deferred.errback(Failure(op.failure))
            else:
                op.deferred.callback(op.result)

    # -- writing ----------------------------------------------------------------------------

    def body_writer(self, message_id: str) -> MemoryBody:
        return MemoryBody(os.path.join(self.bodies, message_id), self._inline_limit)

    def _write_recipients(self, txn: Any, m: StoredMessage, old: tuple[RecipientState, ...] | None) -> None:
        rdb, ddb, xdb = self._db[b"recipients"], self._db[b"due"], self._db[b"domains"]
        for i, st in enumerate(m.recipients):
            was_unfinished = False
            if old is not None:
                prev = old[i]
                if prev.state == QUEUED:
                    txn.delete(recipient_due_key(m, i, prev), db=ddb)
                was_unfinished = prev.state in UNFINISHED
            txn.put(rcpt_key(m.id, i), codec.encode_recipient(st), db=rdb)
            if st.state == QUEUED:
                txn.put(recipient_due_key(m, i, st), b"", db=ddb)
            if (st.state in UNFINISHED) != was_unfinished:     # the domains index: unfinished only
                key = domain_key(m.envelope.recipients[i].address.domain, m.id, i)
                if was_unfinished:
                    txn.delete(key, db=xdb)
                else:   # the value: the message's priority (flush --domain keeps its class)
                    txn.put(key, bytes((m.priority,)) if m.priority else b"", db=xdb)

    def put(self, message: StoredMessage, body: MemoryBody,
            outbox: Sequence[OutboxEntry] = (), idempotency: Idempotency | None = None
            ) -> Deferred[None]:
        if body.error is not None:  # its file could not be written: nothing was stored
            e = body.error
            return fail(SpoolFull(str(e)) if _is_disk_full(e) else CommitFailed(str(e)))
        in_file = body.in_file
        if in_file != message.body_in_file:
            message = replace(message, body_in_file=in_file)
        key = message.id.encode("ascii")
        inline = None if in_file else body.value()

        def fn(txn: Any) -> None:
            if txn.get(key, db=self._db[b"messages"]) is not None:
                raise CommitFailed(f"message id {message.id} already exists")
            if idempotency is not None:
                self._write_idempotent(txn, idempotency, message.arrival)
            txn.put(key, codec.encode_message(message), db=self._db[b"messages"])
            _count_lane(txn, self._db[b"meta"], message.lane, +1)
            if inline is not None:
                txn.put(key, inline, db=self._db[b"bodies"])
            self._write_recipients(txn, message, None)
            self._write_events(txn, message.id, intake_events(message))
            self._write_outbox(txn, outbox)
            if message.header_id:
                txn.put(message.header_id.encode("utf-8")[:500], key, db=self._db[b"msgids"])
            self._write_lookup(txn, message)
            if message.recipients and not message.unfinished:  # all ended at intake (suppressed)
                self._finish(txn, message, message, message.arrival)
            self._check_intake_room(txn)

        return self._submit(_Op(fn, pre=body.sync if in_file else None, intake=True,
                                on_fail=body.abort if in_file else None))

    def _load(self, txn: Any, message_id: str) -> StoredMessage | None:
        return load_message(txn, self._db, message_id)

    def _write_lookup(self, txn: Any, m: StoredMessage, delete: bool = False) -> None:
        """The message's entries in the lookup index (by recipient, by tag): put with the
        message, deleted when it leaves without history or its history expires."""
        db = self._db[b"lookup"]
        for k in lookup_keys(m):
            if delete:
                txn.delete(k, db=db)
            else:
                txn.put(k, b"", db=db)

    def _delete(self, txn: Any, m: StoredMessage) -> None:
        key = m.id.encode("ascii")
        for i, st in enumerate(m.recipients):
            if st.state == QUEUED:
                txn.delete(recipient_due_key(m, i, st), db=self._db[b"due"])
            if st.state in UNFINISHED:
                txn.delete(domain_key(m.envelope.recipients[i].address.domain, m.id, i),
                           db=self._db[b"domains"])
            txn.delete(rcpt_key(m.id, i), db=self._db[b"recipients"])
        txn.delete(key, db=self._db[b"bodies"])
        if txn.delete(key, db=self._db[b"messages"]):
            _count_lane(txn, self._db[b"meta"], m.lane, -1)

    def _unlink_body(self, message_id: str) -> None:
        try:
            os.unlink(os.path.join(self.bodies, message_id))
        except FileNotFoundError:
            pass

    def update(self, message: StoredMessage) -> Deferred[None]:
        def change(old: StoredMessage) -> StoredMessage:
            return message

        def missing(result: StoredMessage | None) -> None:
            if result is None:
                raise CommitFailed(f"no message {message.id}")
        return self.modify(message.id, change).addCallback(missing)

    def modify(self, message_id: str,
               change: Callable[..., StoredMessage | Change], with_body: bool = False
               ) -> Deferred[StoredMessage | None]:
        """`apply()`, firing with the new message only (None if there was none)."""
        return self.apply(message_id, change, with_body).addCallback(
            lambda c: None if c is None else c.message)

    def apply(self, message_id: str,
              change: Callable[..., StoredMessage | Change], with_body: bool = False
              ) -> Deferred[Change | None]:
        """Read a message, let `change` (pure, run on the writer thread) give its new recipient
        states (and the events, new messages and suppressions to commit with them), and write
        all of it in one transaction.  A message with no unfinished recipient leaves the
        spool for the history (kept until `expire_history`).  Fires with the Change that was
        committed (None if there was no such message).

        The writer may run `change` more than once (after growing the map, or alone after a
        shared commit failed): only the last run is committed, and what an earlier run wrote
        outside the transaction (DSN body files) is removed before the next."""
        gone = [False]
        written: list[str] = []

        def fn(txn: Any) -> Change | None:
            gone[0] = False
            for mid in written:     # files of a run whose transaction was aborted
                self._unlink_body(mid)
            written.clear()
            old = self._load(txn, message_id)
            if old is None:
                return None
            if with_body:
                result = change(old, lambda: self._body_in(txn, message_id))
            else:
                result = change(old)
            c = result if isinstance(result, Change) else Change(result)
            new = c.message
            if not any(r.state in UNFINISHED for r in new.recipients):
                self._finish(txn, old, new, c.finished_at)
                gone[0] = old.body_in_file
            else:
                self._write_recipients(txn, new, old.recipients)
            self._write_events(txn, message_id, c.events)
            for extra, body in c.new_messages:
                self._put_new(txn, extra, body, written)
            for sup in c.suppress:
                txn.put(sup.address.encode("utf-8"), codec.encode_suppression(sup),
                        db=self._db[b"suppression"])
            self._write_outbox(txn, c.outbox)
            return c

        def undo() -> None:  # the commit failed: files written for new messages go
            for mid in written:
                self._unlink_body(mid)

        return self._submit(_Op(fn, post=lambda: gone[0] and self._unlink_body(message_id),
                                on_fail=undo))

    def _body_in(self, txn: Any, message_id: str) -> bytes:
        inline = txn.get(message_id.encode("ascii"), db=self._db[b"bodies"])
        if inline is not None:
            return bytes(inline)
        with open(os.path.join(self.bodies, message_id), "rb") as f:
            return f.read()

    def _write_events(self, txn: Any, message_id: str, events: Any) -> None:
        for e in events:
            txn.put(event_key(message_id, e.time), codec.encode_event(e), db=self._db[b"events"])

    def _write_outbox(self, txn: Any, entries: Iterable[OutboxEntry]) -> None:
        db = self._db[b"outbox"]
        for e in entries:
            record = e.record()
            # overwrite=False: two writers never make the same id; if one ever did, the
            # commit fails rather than lose an event
            if not txn.put(e.event_id, codec.encode_outbox(record), db=db, overwrite=False):
                raise CommitFailed(f"outbox: event id {e.event_id.hex()} already written")
            self._write_hooks(txn, e.event_id, record)

    def _write_idempotent(self, txn: Any, idempotency: Idempotency, when: float) -> None:
        """Store an idempotency key with its time index entry; AlreadySubmitted if the key
        holds a result stored at or after its `not_before` (an older one is replaced)."""
        db, key = self._db[b"idempotency"], idempotency.key
        value = encode_idempotent(when, idempotency.result)
        if not txn.put(key, value, db=db, overwrite=False):    # one descent for a new key
            stored, result = decode_idempotent(bytes(txn.get(key, db=db)))
            if stored >= idempotency.not_before:
                raise AlreadySubmitted(result)     # the operation's transaction is aborted
            txn.delete(idempotent_time_key(stored, key), db=self._db[b"idemtime"])
            txn.put(key, value, db=db)
        txn.put(idempotent_time_key(when, key), b"", db=self._db[b"idemtime"])

    def idempotent_get(self, key: bytes, not_before: float) -> Deferred[bytes | None]:
        """The result stored for an idempotency key at or after `not_before`, or None."""
        def fn(txn: Any) -> bytes | None:
            found = txn.get(key, db=self._db[b"idempotency"])
            if found is None:
                return None
            when, result = decode_idempotent(bytes(found))
            return result if when >= not_before else None
        return self._submit(_Op(fn, read=True))

    def idempotent_trim(self, before: float, limit: int = 1000) -> Deferred[int]:
        """Forget idempotency keys stored before `before`, oldest first, at most `limit` per
        call: walks only the expired start of the time index (no scan of the keys kept)."""
        def fn(txn: Any) -> int:
            end = time_key(before)
            keys, idb = self._db[b"idemtime"], self._db[b"idempotency"]
            gone = 0
            with txn.cursor(db=keys) as cur:
                cur.first()
                while gone < limit:
                    index = cur.key()           # b"" past the last entry
                    if not index or index[:8] >= end:
                        break
                    index = bytes(index)
                    key = index[8:]
                    found = txn.get(key, db=idb)
                    # an entry of a key replaced since has no key of its own left to delete
                    if found is not None and \
                            idempotent_time_key(decode_idempotent(bytes(found))[0], key) == index:
                        txn.delete(key, db=idb)
                    gone += 1
                    if not cur.delete():
                        break
            return gone
        return self._submit(_Op(fn))

    def stats(self) -> Deferred[dict[str, tuple[int, float]]]:
        """{lane: (messages queued, age of the oldest)} over every partition (see
        `lane_stats`)."""
        return self._submit(_Op(lambda txn: lane_stats(txn, self._db, time.time()), read=True))

    def outbox_read(self, after: bytes | None = None, limit: int = 1000
                    ) -> Deferred[list[tuple[bytes, OutboxRecord]]]:
        """Up to `limit` outbox entries with an id above `after` (from the first if None),
        in id (time) order; a record that cannot be decoded is logged and skipped."""
        return self._submit(_Op(lambda txn: read_outbox(txn, self._db, after, limit), read=True))

    def outbox_trim(self, before: float, limit: int = 1000) -> Deferred[int]:
        """Forget outbox entries of events older than `before`, oldest first, at most
        `limit` per call."""
        def fn(txn: Any) -> int:
            end = time_key(before)
            done = 0
            with txn.cursor(db=self._db[b"outbox"]) as cur:
                cur.first()
                while done < limit:
                    key = cur.key()         # b"" past the last entry
                    if not key or key >= end or not cur.delete():
                        break
                    done += 1
            return done
        return self._submit(_Op(fn))

    def _put_new(self, txn: Any, message: StoredMessage, body: bytes, written: list[str]) -> None:
        """A message made by the daemon (a DSN), in the transaction of the change that owes it."""
        key = message.id.encode("ascii")
        if len(body) > self._inline_limit:
            path = os.path.join(self.bodies, message.id)
            with open(path, "xb") as f:
                written.append(message.id)
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(self.bodies)
            message = replace(message, body_in_file=True, size=len(body))
        else:
            txn.put(key, body, db=self._db[b"bodies"])
            message = replace(message, body_in_file=False, size=len(body))
        txn.put(key, codec.encode_message(message), db=self._db[b"messages"])
        _count_lane(txn, self._db[b"meta"], message.lane, +1)
        self._write_recipients(txn, message, None)
        self._write_events(txn, message.id, (received_event(message),))
        self._write_lookup(txn, message)
        if message.header_id:
            txn.put(message.header_id.encode("utf-8")[:500], key, db=self._db[b"msgids"])

    def _finish(self, txn: Any, old: StoredMessage, new: StoredMessage,
                finished_at: float | None) -> None:
        when = time.time() if finished_at is None else finished_at
        self._delete(txn, old)
        key = new.id.encode("ascii")
        txn.put(key, codec.encode_history(new, when), db=self._db[b"history"])
        txn.put(finished_key(when, new.id), b"", db=self._db[b"finished"])

    def expire_history(self, before: float, limit: int = 1000) -> Deferred[int]:
        """Forget finished messages (history, timeline, Message-ID index) that finished
        before `before`, oldest first, at most `limit` per call."""
        def fn(txn: Any) -> int:
            end = struct.pack(">Q", max(0, int(before * 1000)))
            done = 0
            with txn.cursor(db=self._db[b"finished"]) as cur:
                keys = []
                for key in cur.iternext(keys=True, values=False):
                    if key[:8] >= end or len(keys) >= limit:
                        break
                    keys.append(key)
            for key in keys:
                mid = key[8:]
                raw = txn.get(mid, db=self._db[b"history"])
                if raw is not None:
                    try:
                        m, _ = codec.decode_history(raw)
                        self._write_lookup(txn, m, delete=True)
                        if m.header_id:
                            hkey = m.header_id.encode("utf-8")[:500]
                            if txn.get(hkey, db=self._db[b"msgids"]) == mid:
                                txn.delete(hkey, db=self._db[b"msgids"])
                    except codec.CorruptRecord:
                        pass
                    txn.delete(mid, db=self._db[b"history"])
                with txn.cursor(db=self._db[b"events"]) as ec:
                    prefix = mid + b"/"
                    if ec.set_range(prefix):
                        while ec.key().startswith(prefix):
                            if not ec.delete():
                                break
                txn.delete(key, db=self._db[b"finished"])
                done += 1
            return done
        return self._submit(_Op(fn))

    # -- suppression list ---------------------------------------------------------------------

    def suppression_put(self, entries: list[Suppression]) -> Deferred[int]:
        def fn(txn: Any) -> int:
            for e in entries:
                txn.put(e.address.encode("utf-8"), codec.encode_suppression(e),
                        db=self._db[b"suppression"])
            return len(entries)
        return self._submit(_Op(fn))

    def suppression_delete(self, address: str) -> Deferred[bool]:
        return self._submit(_Op(lambda txn: bool(txn.delete(address.encode("utf-8"),
                                                            db=self._db[b"suppression"]))))

    def suppression_all(self) -> Deferred[list[Suppression]]:
        return self._submit(_Op(lambda txn: read_suppressions(txn, self._db), read=True))

    # -- the small cache other parts keep here (MTA-STS policies) -----------------------------

    def cache_get(self, key: str) -> Deferred[bytes | None]:
        def fn(txn: Any) -> bytes | None:
            raw = txn.get(key.encode("utf-8")[:500], db=self._db[b"cache"])
            return bytes(raw) if raw is not None else None
        return self._submit(_Op(fn, read=True))

    def cache_put(self, key: str, value: bytes) -> Deferred[None]:
        def fn(txn: Any) -> None:
            txn.put(key.encode("utf-8")[:500], value, db=self._db[b"cache"])
        return self._submit(_Op(fn))

    def remove(self, message_id: str) -> Deferred[None]:
        had_file = [False]

        def fn(txn: Any) -> None:
            old = self._load(txn, message_id)
            if old is not None:
                self._delete(txn, old)
                self._write_lookup(txn, old, delete=True)
                had_file[0] = old.body_in_file

        return self._submit(_Op(fn, post=lambda: had_file[0] and self._unlink_body(message_id)))

    # -- flush: due now, in batches, from the indexes alone ------------------------------------

    def flush(self, now: float, domain: str | None = None, after: bytes | None = None,
              limit: int = 1000) -> Deferred[tuple[int, int, bytes | None]]:
        """Make the QUEUED recipients of this spool's partitions that are due after `now` due
        at `now`: all of them, or those at `domain`.  One batch per call, in one write
        transaction: about `limit` index entries, whole messages; fires with (messages,
        recipients) made due and where to go on (`after` of the next call), None at the end.

        Reads only index keys and recipient records, never a message record: all walks the
        due index from `now` on, a domain walks its entries in the domains index."""
        def fn(txn: Any) -> tuple[int, int, bytes | None]:
            if domain is None:
                return self._flush_due(txn, now, after, max(1, limit))
            return self._flush_domain(txn, now, domain, after, max(1, limit))
        return self._submit(_Op(fn))

    def queued_at(self, domain: str) -> Deferred[int]:
        """Messages of this spool's partitions with a recipient at `domain` (case ignored)
        still in the queue: deferred, due or held.  A read of the domains index's keys alone,
        no record: what an admin's flush of the domain counts before it answers."""
        def fn(txn: Any) -> int:
            count = 0
            with txn.cursor(db=self._db[b"domains"]) as cur:
                for p in self.partitions:
                    prefix = domain_prefix(p, domain)
                    if not cur.set_range(prefix):
                        break           # nothing at or after this partition's prefix
                    last = b""
                    for key in cur.iternext(keys=True, values=False):
                        if not key.startswith(prefix):
                            break
                        mid = bytes(key[len(prefix):]).rsplit(b"/", 1)[0]
                        count += mid != last
                        last = mid
            return count
        return self._submit(_Op(fn, read=True))

    def _index_walk(self, txn: Any, db: bytes, after: bytes | None, limit: int,
                    start: Callable[[int], bytes], inside: Callable[[int, bytes], bool]
                    ) -> tuple[list[bytes], bytes | None]:
        """Up to `limit` keys of `db` after `after`, partition by partition (each from
        `start(p)` while `inside(p, key)`), and the last one (None if no key is left)."""
        keys: list[bytes] = []
        with txn.cursor(db=self._db[db]) as cur:
            for p in self.partitions:
                if after is not None and p < after[0]:
                    continue
                first = after if after is not None and after[0] == p else start(p)
                if not cur.set_range(first):
                    break
                for key in cur.iternext(keys=True, values=False):
                    if not inside(p, key):
                        break
                    if key == after:
                        continue
                    if len(keys) >= limit:
                        return keys, keys[-1]
                    keys.append(bytes(key))
        return keys, None

    def _make_due(self, txn: Any, message_id: str, index: int, raw: bytes | None, now: float,
                  priority: int) -> bool:
        """Move one recipient (its record `raw`; its message's `priority`) due after `now` to
        `now`; False if it is not QUEUED, already due, or gone."""
        if raw is None:
            return False
        try:
            st = codec.decode_recipient(raw)
        except codec.CorruptRecord as e:
            log.warn("corrupt recipient record {id}/{i} not flushed: {e}", id=message_id,
                     i=index, e=e)
            return False
        if st.state != QUEUED or st.next_attempt <= now:
            return False
        klass = due_class(priority, st.attempts)
        txn.delete(due_key(st.next_attempt, message_id, index, klass), db=self._db[b"due"])
        txn.put(due_key(now, message_id, index, klass), b"", db=self._db[b"due"])
        txn.put(rcpt_key(message_id, index), codec.encode_recipient(replace(st, next_attempt=now)),
                db=self._db[b"recipients"])
        return True

    def _flush_due(self, txn: Any, now: float, after: bytes | None, limit: int
                   ) -> tuple[int, int, bytes | None]:
        """Every recipient of a message met in the due index at once: its later entries
        leave the walk's range, so each message is counted once.  The walk covers every class
        of the partition; recipients due already are passed over."""
        keys, last = self._index_walk(txn, b"due", after, limit,
                                      lambda p: bytes((p,)),
                                      lambda p, key: key[0] == p)
        done: set[str] = set()
        messages = recipients = 0
        for key in keys:
            mid = due_id(key)
            if mid in done:
                continue
            done.add(mid)
            prefix = mid.encode("ascii") + b"/"
            with txn.cursor(db=self._db[b"recipients"]) as cur:
                states = []
                if cur.set_range(prefix):
                    for k, v in cur:
                        if not k.startswith(prefix):
                            break
                        states.append((int(k[len(prefix):], 16), bytes(v)))
            priority = MAX_PRIORITY - (key[1] >> 1)    # the class byte: lanes.due_class
            moved = sum(self._make_due(txn, mid, i, raw, now, priority) for i, raw in states)
            messages += moved > 0
            recipients += moved
        return messages, recipients, last

    def _flush_domain(self, txn: Any, now: float, domain: str, after: bytes | None, limit: int
                      ) -> tuple[int, int, bytes | None]:
        """A domain's entries are in message order: a batch ends between two messages."""
        prefixes = {p: domain_prefix(p, domain) for p in self.partitions}
        keys, last = self._index_walk(txn, b"domains", after, limit, prefixes.__getitem__,
                                      lambda p, key: key.startswith(prefixes[p]))
        if last is not None:        # finish the last message: the next batch starts after it
            message = last.rsplit(b"/", 1)[0] + b"/"
            with txn.cursor(db=self._db[b"domains"]) as cur:
                if cur.set_range(last):
                    for key in cur.iternext(keys=True, values=False):
                        if not key.startswith(message):
                            break
                        if key != last:
                            keys.append(bytes(key))
            last = keys[-1]
        messages = recipients = 0
        current, moved, priority = "", 0, 0
        for key in keys:
            mid, index = split_rcpt_key(key[len(prefixes[key[0]]):])
            if mid != current:
                messages += moved > 0
                current, moved = mid, 0
                value = txn.get(key, db=self._db[b"domains"])
                priority = value[0] if value else 0
            raw = txn.get(rcpt_key(mid, index), db=self._db[b"recipients"])
            if self._make_due(txn, mid, index, None if raw is None else bytes(raw), now, priority):
                moved += 1
                recipients += 1
        messages += moved > 0
        return messages, recipients, last

    # -- reading (on the writer thread too: one thread, no map resize races) -----------------

    def read(self, fn: Callable[[Any, dict[bytes, Any]], Any]) -> Deferred[Any]:
        """`fn(txn, databases)` in a read transaction on the writer thread (answered before
        the next commit, never on the reactor): the HTTP API's status reads (view.py)."""
        return self._submit(_Op(lambda txn: fn(txn, self._db), read=True))

    def get(self, message_id: str) -> Deferred[StoredMessage | None]:
        return self._submit(_Op(lambda txn: self._load(txn, message_id), read=True))

    def read_body(self, message_id: str) -> Deferred[bytes]:
        def fn(txn: Any) -> bytes:
            inline = txn.get(message_id.encode("ascii"), db=self._db[b"bodies"])
            if inline is not None:
                return bytes(inline)
            with open(os.path.join(self.bodies, message_id), "rb") as f:
                return f.read()
        return self._submit(_Op(fn, read=True))

    def _due_keys(self, txn: Any, partition: int, end_ms: int,
                  classes: Collection[int] | None = None) -> Iterator[bytes]:
        """The partition's due keys (without the partition byte) of `classes` (all if None),
        each class's up to `end_ms`, class by class: a class is left by seeking to the next."""
        end = struct.pack(">Q", end_ms)
        with txn.cursor(db=self._db[b"due"]) as cur:
            klass = 0
            while klass < 256 and cur.set_range(bytes((partition, klass))):
                key = cur.key()
                if key[0] != partition:
                    return
                klass = key[1]
                if classes is not None and klass not in classes:
                    klass += 1
                    continue
                for key in cur.iternext(keys=True, values=False):
                    if key[0] != partition or key[1] != klass or key[2:10] >= end:
                        break
                    yield key[1:]       # class, time first: partitions' streams merge in order
                klass += 1

    def _due_ids(self, txn: Any, now: float, exclude: set[str] | frozenset[str],
                 classes: Collection[int] | None = None) -> Iterator[tuple[float, str]]:
        """(time, id) of messages with a recipient due by `now` in this spool's partitions,
        by class, then oldest first, each once."""
        seen: set[str] = set(exclude)
        end_ms = max(0, round(now * 1000)) + 1
        streams = [self._due_keys(txn, p, end_ms, classes) for p in self.partitions]
        for key in heapq.merge(*streams):
            mid = key[9:].rsplit(b"/", 1)[0].decode("ascii")
            if mid not in seen:
                seen.add(mid)
                yield struct.unpack(">Q", key[1:9])[0] / 1000.0, mid

    def due(self, now: float, limit: int) -> Deferred[list[tuple[float, str]]]:
        def fn(txn: Any) -> list[tuple[float, str]]:
            return list(islice(self._due_ids(txn, now, frozenset()), limit))
        return self._submit(_Op(fn, read=True))

    def load_due(self, now: float, limit: int, exclude: set[str] | frozenset[str] = frozenset(),
                 classes: Collection[int] | None = None) -> Deferred[list[StoredMessage]]:
        def fn(txn: Any) -> list[StoredMessage]:
            ids = (mid for _, mid in self._due_ids(txn, now, exclude, classes))
            return load_messages(txn, self._db, ids, limit)
        return self._submit(_Op(fn, read=True))

    def load_due_groups(self, now: float, groups: Sequence[tuple[Collection[int], int]],
                        exclude: set[str] | frozenset[str] = frozenset()
                        ) -> Deferred[list[list[StoredMessage]]]:
        """`load_due` for several groups of classes, each with its own limit, in one read."""
        def fn(txn: Any) -> list[list[StoredMessage]]:
            skip = set(exclude)
            out = []
            for classes, limit in groups:
                found = load_messages(txn, self._db, (mid for _, mid in self._due_ids(
                    txn, now, skip, classes)), limit) if limit > 0 else []
                skip.update(m.id for m in found)
                out.append(found)
            return out
        return self._submit(_Op(fn, read=True))

    def next_due(self, exclude: set[str] | frozenset[str] = frozenset(),
                 classes: Collection[int] | None = None) -> Deferred[float | None]:
        """The earliest due time of a recipient of `classes` (all if None) whose message is
        not in `exclude`: the first such key of each class."""
        def fn(txn: Any) -> float | None:
            first = None
            with txn.cursor(db=self._db[b"due"]) as cur:
                for p in self.partitions:
                    klass = 0
                    while klass < 256 and cur.set_range(bytes((p, klass))):
                        key = cur.key()
                        if key[0] != p:
                            break
                        klass = key[1]
                        if classes is None or klass in classes:
                            for key in cur.iternext(keys=True, values=False):
                                if key[0] != p or key[1] != klass:
                                    break
                                if not exclude or due_id(key) not in exclude:
                                    when = struct.unpack(">Q", key[2:10])[0] / 1000.0
                                    first = when if first is None else min(first, when)
                                    break
                        klass += 1
            return first
        return self._submit(_Op(fn, read=True))

    def count(self) -> Deferred[int]:
        return self._submit(_Op(lambda txn: txn.stat(self._db[b"messages"])["entries"],
                                read=True))

    def close(self) -> Deferred[None]:
        """Finish what is pending, stop the writer thread and close the environment.

        Never blocks the reactor: the Deferred fires (in the reactor thread) after the writer
        thread has committed and answered everything it had, so the sessions waiting on
        those commits still get their replies during a clean shutdown.
        """
        if self._closed is not None:
            return self._closed
        self._closed = Deferred()
        with self._cond:
            self._stopping = True
            self._cond.notify()
        return self._closed

    def _exit(self) -> None:
        if threading.current_thread() is not self._thread:
            self._thread.join()
        self._env.close()
        assert self._closed is not None
        self._closed.callback(None)
