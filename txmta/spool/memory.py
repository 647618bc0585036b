"""An in-memory spool for tests: the same interface and contract as the LMDB spool, outbox
included (`outbox`: event id -> the encoded record, as LMDB keeps it).

`fail_next` makes the next write fail with the given error, to test the 4xx paths
(DESIGN invariant 1: a failed commit leaves nothing behind).
"""
# test: tests/test_spool_contract.py

from __future__ import annotations

import bisect
from dataclasses import replace
from itertools import islice
from typing import Any, Callable, Collection, Iterable, Iterator, Sequence

from twisted.internet.defer import Deferred, fail, succeed

from txmta.events import time_key
from txmta.message import AlreadySubmitted, Idempotency
from txmta.message import (QUEUED, UNFINISHED, Change, Event, OutboxEntry, OutboxRecord,
                           StoredMessage, Suppression, intake_events, received_event)
from txmta.lanes import due_class
from txmta.spool import codec
from txmta.partition import ALL, partition_of

from txmta.spool.interface import CommitFailed, SpoolError
from txmta.spool.view import decode_hook, encode_hook, hook_key, split_hook_key, with_attempts


class MemoryBodyWriter:
    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self.aborted = False

    @property
    def size(self) -> int:
        return self._size

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)

    def value(self) -> bytes:
        return b"".join(self._chunks)

    def read_chunks(self, offset: int = 0) -> Iterator[bytes]:
        yield self.value()[offset:]

    def prepend(self, data: bytes) -> None:
        self._chunks.insert(0, data)
        self._size += len(data)

    def abort(self) -> None:
        self._chunks = []
        self.aborted = True


class MemorySpool:
    def __init__(self, partitions: Iterable[int] = ALL) -> None:
        self.partitions = frozenset(partitions)   # due mail is read only in these
        self.messages: dict[str, StoredMessage] = {}
        self.bodies: dict[str, bytes] = {}
        self._due: list[tuple[int, float, str, int]] = []   # class, time, id, index
        self.fail_next: SpoolError | None = None
        self.commits = 0
        self.events: dict[str, list[Event]] = {}
        self.history: dict[str, tuple[StoredMessage, float]] = {}
        self.suppressions: dict[str, Suppression] = {}
        self.cache: dict[str, bytes] = {}
        self.outbox: dict[bytes, bytes] = {}     # event id -> encoded record, as LMDB keeps it
        self.hooks: tuple[tuple[bytes, frozenset[str]], ...] = ()
        self.hook_entries: dict[bytes, bytes] = {}   # hook key -> entry, as LMDB keeps them
        self.idempotent: dict[bytes, tuple[float, bytes]] = {}

    def _failing(self) -> SpoolError | None:
        err, self.fail_next = self.fail_next, None
        return err

    def body_writer(self, message_id: str) -> MemoryBodyWriter:
        return MemoryBodyWriter()

    def _index(self, m: StoredMessage) -> None:
        if partition_of(m.id) not in self.partitions:
            return
        for i, st in enumerate(m.recipients):
            if st.state == QUEUED:
                bisect.insort(self._due, (due_class(m.priority, st.attempts), st.next_attempt,
                                          m.id, i))

    def _unindex(self, m: StoredMessage) -> None:
        self._due = [e for e in self._due if e[2] != m.id]

    def _outbox_entries(self, entries: Iterable[OutboxEntry]) -> dict[bytes, bytes] | CommitFailed:
        out: dict[bytes, bytes] = {}
        for e in entries:
            if e.event_id in self.outbox or e.event_id in out:
                return CommitFailed(f"outbox: event id {e.event_id.hex()} already written")
            out[e.event_id] = codec.encode_outbox(e.record())
        return out

    def _add_hooks(self, entries: Iterable[OutboxEntry]) -> None:
        for e in entries:
            record = e.record()
            for endpoint, kinds in self.hooks:
                if record.kind in kinds:
                    self.hook_entries[hook_key(e.event_id, endpoint, record.time)] = \
                        encode_hook(0, record)

    def set_hooks(self, hooks: Sequence[tuple[bytes, frozenset[str]]]) -> None:
        self.hooks = tuple(hooks)

    def hooks_due(self, now: float, limit: int, exclude: Any = frozenset()
                  ) -> Deferred[list[tuple[bytes, int, OutboxRecord]]]:
        out = []
        for key in sorted(self.hook_entries, key=lambda k: k[1:]):
            when, _, _ = split_hook_key(key)
            if key[0] in self.partitions and when <= now + 0.0005 and key not in exclude:
                out.append((key, *decode_hook(self.hook_entries[key])))
        return succeed(out[:limit])

    def hooks_settle(self, settled: Sequence[tuple[bytes, float | None, int]]) -> Deferred[int]:
        found = 0
        for key, again, attempts in settled:
            value = self.hook_entries.pop(key, None)
            if value is None:
                continue
            found += 1
            if again is not None:
                _, endpoint, eid = split_hook_key(key)
                self.hook_entries[hook_key(eid, endpoint, again)] = with_attempts(value, attempts)
        self.commits += 1
        return succeed(found)

    def idempotent_get(self, key: bytes, not_before: float) -> Deferred[bytes | None]:
        found = self.idempotent.get(key)
        return succeed(found[1] if found is not None and found[0] >= not_before else None)

    def idempotent_trim(self, before: float, limit: int = 1000) -> Deferred[int]:
        """As LMDB's: oldest first (by the time index's key, µs), at most `limit`."""
        end = time_key(before)
        expired = sorted((time_key(when) + k, k) for k, (when, _) in self.idempotent.items()
                         if time_key(when) < end)
        for _, k in expired[:limit]:
            del self.idempotent[k]
        return succeed(len(expired[:limit]))

    def hooks_replay(self, now: float, message_id: str | None = None,
                     event_id: bytes | None = None) -> Deferred[int]:
        n = 0
        for eid, raw in sorted(self.outbox.items()):
            record = codec.decode_outbox(raw)
            if (event_id is not None and eid != event_id) or \
                    (event_id is None and record.message_id != message_id):
                continue
            for endpoint, kinds in self.hooks:
                if record.kind in kinds:
                    self.hook_entries[hook_key(eid, endpoint, now)] = encode_hook(0, record)
                    n += 1
        return succeed(n)

    def hooks_pending(self) -> Deferred[int]:
        return succeed(len(self.hook_entries))

    def put(self, message: StoredMessage, body: MemoryBodyWriter,  # type: ignore[override]
            outbox: Sequence[OutboxEntry] = (), idempotency: Idempotency | None = None
            ) -> Deferred[None]:
        err = self._failing()
        if err is None and message.id in self.messages:
            err = CommitFailed(f"message id {message.id} already exists")
        if err is None and idempotency is not None:
            found = self.idempotent.get(idempotency.key)
            if found is not None and found[0] >= idempotency.not_before:
                err = AlreadySubmitted(found[1])
        entries = self._outbox_entries(outbox) if err is None else {}
        if isinstance(entries, CommitFailed):
            err = entries
        if err is not None:
            body.abort()
            return fail(err)
        assert isinstance(entries, dict)
        if idempotency is not None:
            self.idempotent[idempotency.key] = (message.arrival, idempotency.result)
        self.outbox.update(entries)
        self._add_hooks(outbox)
        self.events.setdefault(message.id, []).extend(intake_events(message))
        self.commits += 1
        if message.recipients and not message.unfinished:  # all ended at intake (suppressed)
            self.history[message.id] = (message, message.arrival)
            return succeed(None)
        self.messages[message.id] = message
        self.bodies[message.id] = body.value()
        self._index(message)
        return succeed(None)

    def update(self, message: StoredMessage) -> Deferred[None]:
        def missing(result: StoredMessage | None) -> None:
            if result is None:
                raise CommitFailed(f"no message {message.id}")
        return self.modify(message.id, lambda old: message).addCallback(missing)

    def modify(self, message_id: str, change: Callable[..., StoredMessage | Change],
               with_body: bool = False) -> Deferred[StoredMessage | None]:
        return self.apply(message_id, change, with_body).addCallback(
            lambda c: None if c is None else c.message)

    def apply(self, message_id: str, change: Callable[..., StoredMessage | Change],
              with_body: bool = False) -> Deferred[Change | None]:
        err = self._failing()
        if err is not None:
            return fail(err)
        old = self.messages.get(message_id)
        if old is None:
            return succeed(None)
        result = change(old, lambda: self.bodies[message_id]) if with_body else change(old)
        c = result if isinstance(result, Change) else Change(result)
        entries = self._outbox_entries(c.outbox)
        if isinstance(entries, CommitFailed):
            return fail(entries)
        self.outbox.update(entries)
        self._add_hooks(c.outbox)
        new = c.message
        self._unindex(old)
        if not any(r.state in UNFINISHED for r in new.recipients):
            del self.messages[message_id]
            del self.bodies[message_id]
            self.history[message_id] = (new, c.finished_at or 0.0)
        else:
            self.messages[message_id] = new
            self._index(new)
        self.events.setdefault(message_id, []).extend(c.events)
        for extra, body in c.new_messages:
            extra = replace(extra, size=len(body))
            self.messages[extra.id] = extra
            self.bodies[extra.id] = body
            self._index(extra)
            self.events.setdefault(extra.id, []).append(received_event(extra))
        for sup in c.suppress:
            self.suppressions[sup.address] = sup
        self.commits += 1
        return succeed(c)

    def flush(self, now: float, domain: str | None = None,
              after: tuple[int, str] | None = None, limit: int = 1000
              ) -> Deferred[tuple[int, int, tuple[int, str] | None]]:
        """As LmdbSpool.flush: whole messages, in (partition, id) order, about `limit`
        recipients a call."""
        err = self._failing()
        if err is not None:
            return fail(err)
        wanted = None if domain is None else domain.lower()
        order = sorted((partition_of(mid), mid) for mid in self.messages
                       if partition_of(mid) in self.partitions)
        messages = recipients = seen = 0
        more = False
        for key in order:
            if after is not None and key <= after:
                continue
            m = self.messages[key[1]]
            mine = [i for i, (rcpt, r) in enumerate(zip(m.envelope.recipients, m.recipients))
                    if (wanted is None or rcpt.address.domain.lower() == wanted)
                    and r.state in UNFINISHED]
            if not mine:
                continue
            if seen >= max(1, limit):
                more = True
                break
            seen += len(mine)
            after = key
            states = list(m.recipients)
            moved = [i for i in mine if states[i].state == QUEUED and states[i].next_attempt > now]
            for i in moved:
                states[i] = replace(states[i], next_attempt=now)
            if moved:
                self._unindex(m)
                self.messages[m.id] = replace(m, recipients=tuple(states))
                self._index(self.messages[m.id])
                messages += 1
                recipients += len(moved)
        self.commits += 1       # one transaction a batch, as LMDB
        return succeed((messages, recipients, after if more else None))

    def queued_at(self, domain: str) -> Deferred[int]:
        """As LmdbSpool.queued_at."""
        wanted = domain.lower()
        return succeed(sum(
            1 for mid, m in self.messages.items() if partition_of(mid) in self.partitions
            and any(r.state in UNFINISHED and rcpt.address.domain.lower() == wanted
                    for rcpt, r in zip(m.envelope.recipients, m.recipients))))

    def cache_get(self, key: str) -> Deferred[bytes | None]:
        return succeed(self.cache.get(key))

    def cache_put(self, key: str, value: bytes) -> Deferred[None]:
        err = self._failing()
        if err is not None:
            return fail(err)
        self.cache[key] = bytes(value)
        return succeed(None)

    def suppression_put(self, entries: list[Suppression]) -> Deferred[int]:
        for e in entries:
            self.suppressions[e.address] = e
        return succeed(len(entries))

    def suppression_delete(self, address: str) -> Deferred[bool]:
        return succeed(self.suppressions.pop(address, None) is not None)

    def suppression_all(self) -> Deferred[list[Suppression]]:
        return succeed(list(self.suppressions.values()))

    def expire_history(self, before: float, limit: int = 1000) -> Deferred[int]:
        gone = [mid for mid, (_, when) in self.history.items() if when < before][:limit]
        for mid in gone:
            del self.history[mid]
            self.events.pop(mid, None)
        return succeed(len(gone))

    def outbox_read(self, after: bytes | None = None, limit: int = 1000
                    ) -> Deferred[list[tuple[bytes, OutboxRecord]]]:
        keys = sorted(k for k in self.outbox if after is None or k > after)[:limit]
        return succeed([(k, codec.decode_outbox(self.outbox[k])) for k in keys])

    def outbox_trim(self, before: float, limit: int = 1000) -> Deferred[int]:
        end = time_key(before)
        gone = sorted(k for k in self.outbox if k < end)[:limit]
        for k in gone:
            del self.outbox[k]
        return succeed(len(gone))

    def remove(self, message_id: str) -> Deferred[None]:
        m = self.messages.pop(message_id, None)
        if m is not None:
            self._unindex(m)
            del self.bodies[message_id]
        return succeed(None)

    def get(self, message_id: str) -> Deferred[StoredMessage | None]:
        return succeed(self.messages.get(message_id))

    def read_body(self, message_id: str) -> Deferred[bytes]:
        return succeed(self.bodies[message_id])

    def _due_ids(self, now: float, exclude: Collection[str],
                 classes: Collection[int] | None) -> Iterator[tuple[float, str]]:
        seen: set[str] = set(exclude)
        for klass, when, mid, _ in self._due:
            if when > now or (classes is not None and klass not in classes):
                continue
            if mid not in seen:
                seen.add(mid)
                yield when, mid

    def due(self, now: float, limit: int) -> Deferred[list[tuple[float, str]]]:
        return succeed(list(islice(self._due_ids(now, (), None), limit)))

    def load_due(self, now: float, limit: int, exclude: set[str] | frozenset[str] = frozenset(),
                 classes: Collection[int] | None = None) -> Deferred[list[StoredMessage]]:
        return succeed([self.messages[mid] for _, mid in
                        islice(self._due_ids(now, exclude, classes), limit)])

    def load_due_groups(self, now: float, groups: Sequence[tuple[Collection[int], int]],
                        exclude: set[str] | frozenset[str] = frozenset()
                        ) -> Deferred[list[list[StoredMessage]]]:
        skip = set(exclude)
        out = []
        for classes, limit in groups:
            found = [self.messages[mid] for _, mid in
                     islice(self._due_ids(now, skip, classes), max(0, limit))]
            skip.update(m.id for m in found)
            out.append(found)
        return succeed(out)

    def next_due(self, exclude: set[str] | frozenset[str] = frozenset(),
                 classes: Collection[int] | None = None) -> Deferred[float | None]:
        times = [when for klass, when, mid, _ in self._due
                 if mid not in exclude and (classes is None or klass in classes)]
        return succeed(min(times) if times else None)

    def count(self) -> Deferred[int]:
        return succeed(len(self.messages))

    def close(self) -> Deferred[None]:
        return succeed(None)
