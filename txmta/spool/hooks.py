"""The spool's webhook deliveries (LMDB db `hooks`), a part of `LmdbSpool`.

Each event written to the outbox gets, in the same transaction, one entry per [[webhook]]
endpoint that wants its kind (`set_hooks`); `txmta/webhooks/service.py` reads the due ones
of its worker's partitions (`hooks_due`) and settles a round's answers in one commit
(`hooks_settle`).  Key and value layout: `view.hook_key`, `view.encode_hook`.  Runs on the
spool's writer thread through `_submit`, like the rest of `LmdbSpool`.
"""
# test: tests/test_webhooks_service.py

from __future__ import annotations

import struct
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from txmta.events import time_key
from txmta.message import OutboxRecord, message_id_time
from txmta.spool import codec
from txmta.spool.view import decode_hook, encode_hook, hook_key, split_hook_key, with_attempts

log = Logger()


class HookDeliveries:
    """Mixed into LmdbSpool, whose `_env`, `_db`, `_reactor`, `partitions` and `_run_op`
    (one operation on the writer thread) it uses."""

    _env: Any
    _db: dict[bytes, Any]
    _reactor: Any
    partitions: tuple[int, ...]
    _run_op: Callable[..., Deferred[Any]]
    hooks: tuple[tuple[bytes, frozenset[str]], ...] = ()

    def set_hooks(self, hooks: Sequence[tuple[bytes, frozenset[str]]]) -> None:
        """The webhook endpoints (4-byte id, the event kinds it wants): each event committed
        from now on that one wants gets a delivery entry in the same transaction."""
        self.hooks = tuple(hooks)

    def _write_hooks(self, txn: Any, event_id: bytes, record: OutboxRecord) -> None:
        """In the transaction that writes the event to the outbox: a delivery entry, due
        now, for each endpoint that wants its kind."""
        for endpoint, kinds in self.hooks:
            if record.kind in kinds:
                txn.put(hook_key(event_id, endpoint, record.time), encode_hook(0, record),
                        db=self._db[b"hooks"])

    def hooks_due(self, now: float, limit: int, exclude: frozenset[bytes] | set[bytes] = frozenset()
                  ) -> Deferred[list[tuple[bytes, int, OutboxRecord]]]:
        """Up to `limit` deliveries due at `now` in this worker's partitions, oldest first:
        (key, failed attempts so far, record); keys in `exclude` (in flight) are passed over."""
        def fn(txn: Any) -> list[tuple[bytes, int, OutboxRecord]]:
            out: list[tuple[bytes, int, OutboxRecord]] = []
            end_ms = struct.pack(">Q", max(0, round(now * 1000)))
            with txn.cursor(db=self._db[b"hooks"]) as cur:
                for partition in self.partitions:
                    prefix = bytes((partition,))
                    if not cur.set_range(prefix):
                        continue
                    for k, v in cur:
                        key = bytes(k)
                        if key[:1] != prefix or key[1:9] > end_ms or len(out) >= limit:
                            break
                        if key in exclude:
                            continue
                        try:
                            attempts, record = decode_hook(bytes(v))
                        except codec.CorruptRecord as e:
                            log.warn("corrupt webhook entry {k} skipped: {e}", k=key.hex(), e=e)
                            continue
                        out.append((key, attempts, record))
            out.sort(key=lambda item: item[0][1:])
            return out[:limit]
        return self._run_op(fn, read=True)

    def hooks_settle(self, settled: Sequence[tuple[bytes, float | None, int]]) -> Deferred[int]:
        """One commit for finished deliveries: each (key, next attempt, attempts) is removed,
        and put again at its next attempt when that is not None.  How many were found."""
        def fn(txn: Any) -> int:
            db = self._db[b"hooks"]
            found = 0
            for key, again, attempts in settled:
                value = txn.pop(key, db=db)
                if value is None:
                    continue
                found += 1
                if again is not None:
                    _, endpoint, eid = split_hook_key(key)
                    # the record as stored, with the new count of attempts
                    txn.put(hook_key(eid, endpoint, again),
                            with_attempts(bytes(value), attempts),
                            db=db)
            return found
        return self._run_op(fn)

    def hooks_replay(self, now: float, message_id: str | None = None,
                     event_id: bytes | None = None, scan_limit: int = 500_000) -> Deferred[int]:
        """Queue the events of `message_id` (or the one event `event_id`) again for every
        endpoint that wants them, due `now`, with their ids (so their webhook-ids) unchanged.
        A message's events are looked for in the outbox from its arrival on, at most
        `scan_limit` entries, in a read transaction on a thread of its own (the writer goes
        on committing); then one commit.  How many deliveries were queued."""
        from twisted.internet.threads import deferToThreadPool

        def find() -> list[tuple[bytes, bytes]]:
            found: list[tuple[bytes, bytes]] = []
            with self._env.begin(db=self._db[b"outbox"]) as txn:
                if event_id is not None:
                    raw = txn.get(event_id)
                    return [(event_id, bytes(raw))] if raw is not None else []
                start = message_id_time(message_id or "")
                if start is None:
                    return []
                with txn.cursor() as cur:
                    if not cur.set_range(time_key(start)):
                        return []
                    for seen, (k, v) in enumerate(cur):
                        if seen >= scan_limit:
                            break
                        record = bytes(v)
                        if message_id.encode("ascii") in record:    # cheap test, then decode
                            try:
                                if codec.decode_outbox(record).message_id == message_id:
                                    found.append((bytes(k), record))
                            except codec.CorruptRecord:
                                continue
            return found

        def queue(found: list[tuple[bytes, bytes]]) -> Deferred[int]:
            def fn(txn: Any) -> int:
                n = 0
                for eid, raw in found:
                    record = codec.decode_outbox(raw)
                    for endpoint, kinds in self.hooks:
                        if record.kind in kinds:
                            txn.put(hook_key(eid, endpoint, now), encode_hook(0, record),
                                    db=self._db[b"hooks"])
                            n += 1
                return n
            return self._run_op(fn)

        d = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), find)
        return d.addCallback(queue)

    def hooks_pending(self) -> Deferred[int]:
        """How many webhook deliveries are waiting, in all partitions."""
        return self._run_op(lambda txn: txn.stat(self._db[b"hooks"])["entries"], read=True)
