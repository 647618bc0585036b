"""The spool's layout on disk and its read side.

The named databases of the LMDB environment and their keys (the writer, `LmdbSpool` in
lmdb.py, and every reader share them), the readers of messages, timelines, suppressions and
the outbox, and `LmdbView`: the read-only view other processes (`txmta queue list`, `txmta
queue show`, tests) open while the daemon runs, with short read transactions that retry when
the daemon grows the map.
"""
# test: tests/test_spool_lmdb.py, tests/test_spool_flush.py

from __future__ import annotations

import hashlib
import heapq
import os
import struct
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator

import lmdb
from twisted.logger import Logger

from txmta.events import id_time, time_key
from txmta.message import (Event, OutboxRecord, Search, format_message_id, RecipientState,
                           StoredMessage, Suppression, message_id_time)
from txmta.lanes import due_class
from txmta.partition import partition_of
from txmta.spool import codec
from txmta.spool.interface import SpoolError, SpoolFormatError

log = Logger()

# 2: due keys start with the partition byte (1 had none); 3: the domains index (2 had none);
# 4: due keys have the class byte after the partition (lanes.due_class); 5: the idempotency
# keys' time index (4 had none); older formats are migrated at open
FORMAT = b"6"
MAX_READERS = 512     # every worker's threads and every `txmta queue` read share the table
DB_NAMES = (b"messages", b"bodies", b"recipients", b"due", b"events", b"meta",
            b"history", b"finished", b"msgids", b"suppression", b"cache", b"domains",
            b"outbox", b"hooks", b"idempotency", b"lookup", b"idemtime")
LOOKUP_RECIPIENT = b"r"
LOOKUP_TAG = b"t"
LOOKUP_SENDER = b"s"


def rcpt_key(message_id: str, index: int) -> bytes:
    return b"%s/%04x" % (message_id.encode("ascii"), index)


def due_key(when: float, message_id: str, index: int, klass: int = 0) -> bytes:
    """partition (1 byte) / class (1 byte: lanes.due_class, the message's priority, then
    fresh before retries) / due time in ms (8 bytes, big-endian) / recipient key: each
    partition's recipients by class, then in time order, so a worker reads only its own
    partitions and the dispatcher reads the classes it has room for."""
    return (bytes((partition_of(message_id), klass)) + struct.pack(">Q", max(0, round(when * 1000)))
            + rcpt_key(message_id, index))


def recipient_due_key(m: StoredMessage, index: int, st: RecipientState | None = None) -> bytes:
    """The due key of recipient `index` of `m` (in state `st`, its current one if None)."""
    if st is None:
        st = m.recipients[index]
    return due_key(st.next_attempt, m.id, index, due_class(m.priority, st.attempts))


def domain_prefix(partition: int, domain: str) -> bytes:
    """partition (1 byte) / recipient domain (lower case; a name too long for a key by its
    SHA-256) / "/": where a partition's unfinished recipients at `domain` are listed."""
    name = domain.lower().encode("utf-8", "surrogatepass")
    if len(name) > 200:         # a U-label domain may pass LMDB's 511-octet key limit
        name = b"#" + hashlib.sha256(name).hexdigest().encode("ascii")
    return bytes((partition,)) + name + b"/"


def domain_key(domain: str, message_id: str, index: int) -> bytes:
    return domain_prefix(partition_of(message_id), domain) + rcpt_key(message_id, index)


def lookup_prefix(kind: bytes, value: str) -> bytes:
    """kind (b"r": a recipient address, lower-cased; b"t": a tag) / the value / NUL: where
    the messages to one address, or with one tag, are listed in arrival order.  A value too
    long for a key (LMDB's limit is 511 octets), or one that holds a NUL or starts with
    0x01, is replaced by 0x01 and its SHA-256, so every prefix is unambiguous."""
    name = value.encode("utf-8", "surrogatepass")
    if len(name) > 200 or b"\0" in name or name[:1] == b"\1":
        name = b"\1" + hashlib.sha256(name).digest()
    return kind + name + b"\0"


def lookup_key(kind: bytes, value: str, when: float, message_id: str) -> bytes:
    """`lookup_prefix` / arrival in ms (8 bytes, big-endian) / queue id."""
    return (lookup_prefix(kind, value) + struct.pack(">Q", max(0, round(when * 1000)))
            + message_id.encode("ascii"))


def lookup_keys(m: StoredMessage) -> set[bytes]:
    """The lookup index entries of a message: one per distinct recipient address (lower
    case), one for its tag if it has one, one for its sender (lower case) unless that is
    the null sender.  (Mail stored before the sender entries existed has none.)"""
    keys = {lookup_key(LOOKUP_RECIPIENT, str(r.address).lower(), m.arrival, m.id)
            for r in m.envelope.recipients}
    if m.labels.tag:
        keys.add(lookup_key(LOOKUP_TAG, m.labels.tag, m.arrival, m.id))
    if not m.envelope.sender.is_null:
        keys.add(lookup_key(LOOKUP_SENDER, str(m.envelope.sender).lower(), m.arrival, m.id))
    return keys


def lookup_recent(txn: Any, dbs: dict[bytes, Any], kind: bytes, value: str, limit: int
                  ) -> list[tuple[StoredMessage, float | None]]:
    """The newest `limit` messages (queued, or finished and still in the history) of the
    lookup index entries of `value` (LOOKUP_RECIPIENT: lower-cased; LOOKUP_SENDER:
    lower-cased), newest first: `txmta history --recipient / --sender`.  Reads at most
    `limit` + MAX_LOOKED_AT entries."""
    if b"lookup" not in dbs:
        return []
    prefix = lookup_prefix(kind, value.lower() if kind != LOOKUP_TAG else value)
    out: list[tuple[StoredMessage, float | None]] = []
    looked = 0
    with txn.cursor(db=dbs[b"lookup"]) as cur:
        # the last entry under the prefix: the first key past it, then one back
        if cur.set_range(prefix[:-1] + b"\1"):
            found = cur.prev()
        else:
            found = cur.last()
        while found and len(out) < limit and looked < limit + MAX_LOOKED_AT:
            key = bytes(cur.key())
            if not key.startswith(prefix):
                break
            looked += 1
            stored = _stored(txn, dbs, key[len(prefix) + 8:])
            if stored is not None:
                out.append(stored)
            found = cur.prev()
    return out


LANE_COUNT = b"lane:"        # meta keys: lane:<name> -> messages of that lane (8 bytes)
OLDEST_WALK = 2000          # messages read from the oldest on, to find each lane's oldest


def lane_count_key(lane: str) -> bytes:
    return LANE_COUNT + lane.encode("utf-8")


def lane_stats(txn: Any, dbs: dict[bytes, Any], now: float,
               walk: int = OLDEST_WALK) -> dict[str, tuple[int, float]]:
    """{lane: (messages, age of the oldest)}.  The counts are kept with every put and
    delete; the oldest are found by reading messages from the oldest id on (ids sort by
    arrival) until each counted lane has been seen, at most `walk` of them: a lane not seen
    by then gets the age of the last one read, which its oldest message is younger than."""
    counts: dict[str, int] = {}
    with txn.cursor(db=dbs[b"meta"]) as cur:
        if cur.set_range(LANE_COUNT):
            for key, value in cur:
                if not bytes(key).startswith(LANE_COUNT):
                    break
                counts[bytes(key)[len(LANE_COUNT):].decode("utf-8", "replace")] = \
                    int.from_bytes(value, "big")
    oldest: dict[str, float] = {}
    last = 0.0
    with txn.cursor(db=dbs[b"messages"]) as cur:
        read = 0
        for key, raw in cur:
            if len(oldest) == len(counts) or read >= walk:
                break
            read += 1
            arrival = message_id_time(bytes(key).decode("ascii", "replace"))
            last = max(0.0, now - arrival) if arrival else last
            try:
                lane = codec.message_lane(bytes(raw))
            except codec.CorruptRecord:
                continue
            oldest.setdefault(lane, last)
    return {lane: (n, oldest.get(lane, last)) for lane, n in counts.items()}


def split_rcpt_key(key: bytes) -> tuple[str, int]:
    mid, index = key.rsplit(b"/", 1)
    return mid.decode("ascii"), int(index, 16)


_event_seq = [0]


def event_key(message_id: str, when: float) -> bytes:
    _event_seq[0] = (_event_seq[0] + 1) & 0xFFFF
    return message_id.encode("ascii") + b"/" + struct.pack(">QH", max(0, int(when * 1e6)),
                                                           _event_seq[0])


def hook_key(event_id: bytes, endpoint: bytes, when: float) -> bytes:
    """partition of the event (1 byte, from its id) / due time in ms (8 bytes) / endpoint id
    (4 bytes) / event id (15 bytes): a webhook delivery to make, each partition's in time
    order, so a worker sends for its own partitions."""
    return event_id[8:9] + struct.pack(">Q", max(0, round(when * 1000))) + endpoint + event_id


def split_hook_key(key: bytes) -> tuple[float, bytes, bytes]:
    """(due time, endpoint id, event id) of a hook key."""
    return struct.unpack(">Q", key[1:9])[0] / 1000, key[9:13], key[13:]


def encode_hook(attempts: int, record: OutboxRecord) -> bytes:
    return struct.pack(">H", min(attempts, 0xFFFF)) + codec.encode_outbox(record)


def with_attempts(value: bytes, attempts: int) -> bytes:
    """A stored delivery entry with another count of failed attempts."""
    return struct.pack(">H", min(attempts, 0xFFFF)) + value[2:]


def decode_hook(value: bytes) -> tuple[int, OutboxRecord]:
    return struct.unpack(">H", value[:2])[0], codec.decode_outbox(value[2:])


def hook_stats(txn: Any, dbs: dict[bytes, Any]) -> dict[bytes, tuple[int, int, float]]:
    """endpoint id -> (entries, entries tried at least once, oldest event time)."""
    out: dict[bytes, tuple[int, int, float]] = {}
    if b"hooks" not in dbs:
        return out
    with txn.cursor(db=dbs[b"hooks"]) as cur:
        for k, v in cur:
            _, endpoint, eid = split_hook_key(bytes(k))
            n, failing, oldest = out.get(endpoint, (0, 0, float("inf")))
            tried = struct.unpack(">H", bytes(v[:2]))[0] > 0
            out[endpoint] = (n + 1, failing + tried, min(oldest, id_time(eid)))
    return out


def encode_idempotent(when: float, result: bytes) -> bytes:
    return struct.pack(">d", when) + result


def decode_idempotent(value: bytes) -> tuple[float, bytes]:
    return struct.unpack(">d", value[:8])[0], value[8:]


def idempotent_time_key(when: float, key: bytes) -> bytes:
    """The time index of idempotency keys (db `idemtime`): when it was stored, in µs (8
    bytes, big-endian, as `events.time_key`) / the key.  Trimming walks only the prefix
    of keys older than its limit, oldest first, and decodes no value it keeps."""
    return time_key(when) + key


def finished_key(when: float, message_id: str) -> bytes:
    return struct.pack(">Q", max(0, int(when * 1000))) + message_id.encode("ascii")


def due_time(key: bytes) -> float:
    return struct.unpack(">Q", key[2:10])[0] / 1000.0


def due_id(key: bytes) -> str:
    return key[10:].rsplit(b"/", 1)[0].decode("ascii")


def load_message(txn: Any, dbs: dict[bytes, Any], message_id: str) -> StoredMessage | None:
    """A message with its recipients' states, read in the transaction `txn`."""
    raw = txn.get(message_id.encode("ascii", "replace"), db=dbs[b"messages"])
    if raw is None:
        return None
    message = codec.decode_message(raw)
    states = []
    for i in range(len(message.envelope.recipients)):
        rs = txn.get(rcpt_key(message_id, i), db=dbs[b"recipients"])
        states.append(codec.decode_recipient(rs) if rs is not None else RecipientState())
    return replace(message, recipients=tuple(states))


def load_messages(txn: Any, dbs: dict[bytes, Any], ids: Iterable[str],
                  limit: int | None = None) -> list[StoredMessage]:
    """The messages `ids` that exist, up to `limit`; a record that cannot be decoded is
    logged and skipped, never fatal."""
    out: list[StoredMessage] = []
    for mid in ids:
        if limit is not None and len(out) >= limit:
            break
        try:
            m = load_message(txn, dbs, mid)
        except codec.CorruptRecord as e:
            log.warn("corrupt spool record {id} skipped: {e}", id=mid, e=e)
            continue
        if m is not None:
            out.append(m)
    return out


def read_suppressions(txn: Any, dbs: dict[bytes, Any]) -> list[Suppression]:
    out = []
    with txn.cursor(db=dbs[b"suppression"]) as cur:
        for k, v in cur.iternext():
            try:
                out.append(codec.decode_suppression(bytes(k).decode("utf-8"), bytes(v)))
            except (codec.CorruptRecord, UnicodeDecodeError):
                continue
    return out


def read_outbox(txn: Any, dbs: dict[bytes, Any], after: bytes | None, limit: int
                ) -> list[tuple[bytes, OutboxRecord]]:
    out: list[tuple[bytes, OutboxRecord]] = []
    with txn.cursor(db=dbs[b"outbox"]) as cur:
        found = cur.set_range(after) if after is not None else cur.first()
        for k, v in (cur if found else ()):
            key = bytes(k)
            if after is not None and key <= after:
                continue
            if len(out) >= limit:
                break
            try:
                out.append((key, codec.decode_outbox(bytes(v))))
            except codec.CorruptRecord as e:
                log.warn("corrupt outbox record {key} skipped: {e}", key=key.hex(), e=e)
    return out


def read_events(txn: Any, dbs: dict[bytes, Any], message_id: str) -> list[Event]:
    out = []
    prefix = message_id.encode("ascii", "replace") + b"/"
    with txn.cursor(db=dbs[b"events"]) as cur:
        if cur.set_range(prefix):
            for k, v in cur:
                if not bytes(k).startswith(prefix):
                    break
                try:
                    out.append(codec.decode_event(bytes(v)))
                except codec.CorruptRecord:
                    continue
    return out


def read_retrying(env: Any, fn: Callable[[Any], Any]) -> Any:
    """`fn(txn)` in a short read transaction of `env`, on the calling thread, taken again
    with the new size when the daemon grew the map meanwhile."""
    for _ in range(20):
        try:
            with env.begin() as txn:
                return fn(txn)
        except lmdb.MapResizedError:
            env.set_mapsize(0)
    raise SpoolError("spool map kept changing size while reading")


def _ids_after(txn: Any, dbs: dict[bytes, Any], after: bytes | None, limit: int) -> list[str]:
    """Up to `limit` message ids above `after` (from the first when None), in order."""
    ids: list[str] = []
    with txn.cursor(db=dbs[b"messages"]) as cur:
        found = cur.set_range(after) if after is not None else cur.first()
        if not found:
            return ids
        for key in cur.iternext(keys=True, values=False):
            if after is not None and key == after:
                continue
            if len(ids) >= limit:
                break
            ids.append(bytes(key).decode("ascii", "replace"))
    return ids


class LmdbView:
    """Read-only view of a spool for other processes, with short read transactions."""

    def __init__(self, path: str) -> None:
        if not os.path.exists(os.path.join(path, "data.mdb")):
            raise SpoolError(f"no spool at {path}")
        self.path = path
        # the daemon may grow the map at any moment: every step retries MDB_MAP_RESIZED
        for attempt in range(20):
            env = None
            try:
                env = lmdb.open(path, readonly=True, max_dbs=len(DB_NAMES) + 2, subdir=True,
                                lock=True, max_readers=256)
                # no txn= here: py-lmdb drops handles opened inside a read transaction
                dbs = {}
                for name in DB_NAMES:
                    try:
                        dbs[name] = env.open_db(name, create=False)
                    except lmdb.NotFoundError:  # a spool the newest daemon has not opened yet
                        pass
                with env.begin() as txn:
                    found = txn.get(b"format", db=dbs[b"meta"])
                break
            except lmdb.MapResizedError:
                if env is not None:
                    env.close()
                if attempt == 19:
                    raise SpoolError(f"spool {path} kept changing size while opening")
        self._env, self._db = env, dbs
        # 1 to 4 differ only in indexes not read here
        if found not in (None, b"1", b"2", b"3", b"4", FORMAT):
            raise SpoolFormatError(f"spool {path} has format {found!r}, expected {FORMAT!r}")

    def _read(self, fn: Callable[[Any], Any]) -> Any:
        return read_retrying(self._env, fn)

    def _load(self, txn: Any, message_id: str) -> StoredMessage | None:
        return load_message(txn, self._db, message_id)

    def read(self, fn: Callable[[Any, dict[bytes, Any]], Any]) -> Any:
        """`fn(txn, databases)` in one short read transaction."""
        return self._read(lambda txn: fn(txn, self._db))

    def get(self, message_id: str) -> StoredMessage | None:
        return self._read(lambda txn: self._load(txn, message_id))  # type: ignore[no-any-return]

    def ids(self) -> list[str]:
        def fn(txn: Any) -> list[str]:
            with txn.cursor(db=self._db[b"messages"]) as cur:
                return [k.decode("ascii") for k in cur.iternext(keys=True, values=False)]
        return self._read(fn)  # type: ignore[no-any-return]

    def messages(self, after: str | None = None, chunk: int = 500) -> Iterator[StoredMessage]:
        """The messages with an id above `after` (every one when None), in id (arrival) order,
        read `chunk` at a time in short transactions as the caller takes them: taking the first
        page reads that page, not the queue (DESIGN invariant 6).  A record that cannot be
        decoded is skipped."""
        start = after.encode("ascii", "replace") if after is not None else None
        while True:
            ids = self._read(lambda txn: _ids_after(txn, self._db, start, chunk))
            if not ids:
                return
            yield from self._read(lambda txn: load_messages(txn, self._db, ids))
            start = ids[-1].encode("ascii")

    def count(self) -> int:
        """Messages in the queue, from the database's statistics (no walk)."""
        return self._read(lambda txn: txn.stat(self._db[b"messages"])["entries"])  # type: ignore[no-any-return]

    def history(self, message_id: str) -> tuple[StoredMessage, float] | None:
        """A finished message with its final states and when it finished, if still kept."""
        if b"history" not in self._db:
            return None
        raw = self._read(lambda txn: txn.get(message_id.encode("ascii", "replace"),
                                             db=self._db[b"history"]))
        return codec.decode_history(bytes(raw)) if raw is not None else None

    def events(self, message_id: str) -> list[Event]:
        if b"events" not in self._db:
            return []
        return self._read(lambda txn: read_events(txn, self._db, message_id))  # type: ignore[no-any-return]

    def hook_stats(self) -> dict[bytes, tuple[int, int, float]]:
        """Webhook deliveries waiting, by endpoint id: (entries, tried before, oldest event)."""
        return self._read(lambda txn: hook_stats(txn, self._db))

    def find_by_header_id(self, header_id: str) -> str | None:
        """The queue id of the message whose Message-ID header is `header_id`."""
        if b"msgids" not in self._db:
            return None
        raw = self._read(lambda txn: txn.get(header_id.encode("utf-8")[:500],
                                             db=self._db[b"msgids"]))
        return bytes(raw).decode("ascii") if raw is not None else None

    def suppressions(self) -> list[Suppression]:
        if b"suppression" not in self._db:
            return []
        return self._read(lambda txn: read_suppressions(txn, self._db))  # type: ignore[no-any-return]

    def read_body(self, message_id: str) -> bytes:
        def fn(txn: Any) -> bytes | None:
            inline = txn.get(message_id.encode("ascii", "replace"), db=self._db[b"bodies"])
            return bytes(inline) if inline is not None else None
        inline = self._read(fn)
        if inline is not None:
            return inline  # type: ignore[no-any-return]
        with open(os.path.join(self.path, "bodies", message_id), "rb") as f:
            return f.read()

    def close(self) -> None:
        self._env.close()


# -- the HTTP API's status reads: one message, and messages found by the indexes --------------

MAX_LOOKED_AT = 5000      # index entries (or ids) one search looks at, at most


@dataclass(frozen=True)
class Found:
    """A message as `find_message` reads it: queued (finished None) or kept in the history."""
    message: StoredMessage
    finished: float | None
    events: list[Event]


def find_message(txn: Any, dbs: dict[bytes, Any], message_id: str) -> Found | None:
    """The message `message_id` from the queue, else from the history, with its timeline."""
    finished = None
    m = load_message(txn, dbs, message_id)
    if m is None:
        raw = txn.get(message_id.encode("ascii", "replace"), db=dbs[b"history"])
        if raw is None:
            return None
        m, finished = codec.decode_history(bytes(raw))
    return Found(m, finished, read_events(txn, dbs, message_id))


def _stored(txn: Any, dbs: dict[bytes, Any], mid: bytes) -> tuple[StoredMessage, float | None] | None:
    try:
        raw = txn.get(mid, db=dbs[b"messages"])
        if raw is not None:
            m = load_message(txn, dbs, mid.decode("ascii"))
            return (m, None) if m is not None else None
        raw = txn.get(mid, db=dbs[b"history"])
        return codec.decode_history(bytes(raw)) if raw is not None else None
    except codec.CorruptRecord as e:
        log.warn("corrupt spool record {id} skipped: {e}", id=mid, e=e)
        return None


def matches(q: Search, m: StoredMessage) -> bool:
    """Whether a message found by the walk is one `q` asks for."""
    if q.token is not None and m.client.get("token") != q.token:
        return False
    if q.tag is not None and m.labels.tag != q.tag:
        return False
    pairs = list(zip(m.envelope.recipients, m.recipients))
    if q.recipient is not None:
        pairs = [(r, st) for r, st in pairs if str(r.address).lower() == q.recipient.lower()]
        if not pairs:
            return False
    return q.state is None or any(st.state == q.state for _, st in pairs)


def search(txn: Any, dbs: dict[bytes, Any], q: Search, looked_max: int = MAX_LOOKED_AT
           ) -> tuple[list[tuple[StoredMessage, float | None]], bytes | None]:
    """The messages `q` asks for, oldest first, and the cursor to go on from (None when the
    walk reached the end).  Looks at most `looked_max` index entries: a walk that stops
    there answers what it found with a cursor, so no request costs more than a bound."""
    if q.recipient is not None or q.tag is not None:
        walk = _walk_lookup(txn, dbs, q)
    else:
        walk = _walk_ids(txn, dbs, q)
    out: list[tuple[StoredMessage, float | None]] = []
    looked = 0
    for cursor, mid in walk:
        looked += 1
        found = _stored(txn, dbs, mid)
        if found is not None and matches(q, found[0]):
            out.append(found)
            if len(out) >= q.limit:
                return out, cursor
        if looked >= looked_max:
            return out, cursor
    return out, None


def search_prefix(q: Search) -> bytes:
    """The lookup index prefix a search by recipient (else tag) walks."""
    if q.recipient is not None:
        return lookup_prefix(LOOKUP_RECIPIENT, q.recipient.lower())
    return lookup_prefix(LOOKUP_TAG, q.tag or "")


def check_cursor(q: Search) -> None:
    """ValueError when `q.after` is not a cursor of this search (another recipient or tag,
    or an index cursor for a walk by id and the other way round)."""
    if q.after is None:
        return
    if q.recipient is not None or q.tag is not None:
        ok = q.after.startswith(search_prefix(q)) and len(q.after) > len(search_prefix(q)) + 8
    else:
        ok = q.after.isascii() and q.after.isalnum()
    if not ok:
        raise ValueError("after: the cursor belongs to another search")


def _walk_lookup(txn: Any, dbs: dict[bytes, Any], q: Search) -> Iterator[tuple[bytes, bytes]]:
    """(index key, queue id) of the recipient's (else the tag's) entries, in time order."""
    if b"lookup" not in dbs:
        return
    prefix = search_prefix(q)
    start = prefix + struct.pack(">Q", max(0, round((q.since or 0) * 1000)))
    if q.after is not None:
        start = max(start, q.after)
    with txn.cursor(db=dbs[b"lookup"]) as cur:
        if not cur.set_range(start):
            return
        for key in cur.iternext(keys=True, values=False):
            key = bytes(key)
            if not key.startswith(prefix):
                return
            if key == q.after:
                continue
            yield key, key[len(prefix) + 8:]


def _walk_ids(txn: Any, dbs: dict[bytes, Any], q: Search) -> Iterator[tuple[bytes, bytes]]:
    """(queue id, queue id) of queued and finished messages merged in id (arrival) order."""
    start = b""
    if q.since is not None:
        start = format_message_id(max(0, int(q.since * 1e6)), 0, 0)[:11].encode("ascii")
    if q.after is not None:
        start = max(start, q.after)

    def keys(db: bytes) -> Iterator[bytes]:
        if db not in dbs:
            return
        with txn.cursor(db=dbs[db]) as cur:
            if not cur.set_range(start):
                return
            for key in cur.iternext(keys=True, values=False):
                yield bytes(key)

    for key in heapq.merge(keys(b"messages"), keys(b"history")):
        if key != q.after:
            yield key, key


def suppressions_page(txn: Any, dbs: dict[bytes, Any], after: str | None, limit: int
                      ) -> tuple[list[Suppression], str | None]:
    """Up to `limit` suppression entries in address order after `after`, and the cursor of
    the next page (None at the end)."""
    out: list[Suppression] = []
    if b"suppression" not in dbs:
        return out, None
    first = after.encode("utf-8") if after is not None else b""
    with txn.cursor(db=dbs[b"suppression"]) as cur:
        if not cur.set_range(first):
            return out, None
        for k, v in cur:
            key = bytes(k)
            if after is not None and key == first:
                continue
            if len(out) >= limit:
                return out, out[-1].address if out else None
            try:
                out.append(codec.decode_suppression(key.decode("utf-8"), bytes(v)))
            except (codec.CorruptRecord, UnicodeDecodeError):
                continue
    return out, None


class SpoolReads:
    """The status reads of the HTTP API over `read(fn)` (`LmdbSpool.read`, run on the
    writer thread, or `LmdbView.read`): each fires with (or returns) its result."""

    def __init__(self, read: Callable[[Callable[[Any, dict[bytes, Any]], Any]], Any]) -> None:
        self._read = read

    def find(self, message_id: str) -> Any:
        return self._read(lambda txn, dbs: find_message(txn, dbs, message_id))

    def search(self, q: Search) -> Any:
        """Raises ValueError at once for a cursor of another search."""
        check_cursor(q)
        return self._read(lambda txn, dbs: search(txn, dbs, q))

    def suppressions(self, after: str | None, limit: int) -> Any:
        return self._read(lambda txn, dbs: suppressions_page(txn, dbs, after, limit))
