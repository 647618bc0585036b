"""The suppression list shared by every node through Valkey/Redis.

Each node keeps its own list (the spool's, in LMDB, and the queue's mirror in memory): the
check at RCPT never waits on Redis.  This module only carries changes between nodes:

* out: every change committed on this node (a bounce's `SuppressionAdded`, an admin's
  `SuppressionChanged`, and those of the node's other workers, which the master relays to
  worker 0, where this runs) is published by one Lua script that writes the shared list (a
  hash, address -> entry) and appends the change to a log (a stream, trimmed to about
  MAXLEN entries) with this process's origin.  While Redis is down the changes wait in
  memory and go out, in order, when it is back.
* in: a blocking read of the log (XREAD BLOCK, on a connection of its own) hears the
  other nodes' changes within a moment; they are stored in the spool with their own times
  and reasons and put in the mirror (`Queue.suppress_merge`), then passed to the node's
  other workers (`relay`).  The position in the log is kept in a file beside the spool.
  After a reconnect or a restart, reading goes on from that position; when the log no
  longer reaches back to it (trimmed), or there is none, the shared list is read whole
  (HSCAN) and every entry newer than the local one is taken.  A Redis that comes back
  empty (restarted without persistence) is given this node's list again.

Entries removed on another node while this one could not read the log for longer than the
log reaches back are not removed here (the shared list no longer names them).
"""
# test: tests/test_cluster.py, tests/integration/test_cluster_nodes.py

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

from twisted.internet import defer, task
from twisted.logger import Logger

from txmta import events
from txmta.cluster.redis import Connection, Unavailable
from txmta.message import Suppression

log = Logger(namespace="txmta.cluster")

MAXLEN = 100_000          # about this many changes stay in the log
BATCH = 500               # changes per script call, per read

# KEYS[1]: the shared list (hash), KEYS[2]: the log (stream); ARGV: origin, maxlen, then
# (op, address, entry) for each change, op "add" or "remove".
PUBLISH = """
for i = 3, #ARGV, 3 do
  local op, address, entry = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if op == 'add' then
    redis.call('HSET', KEYS[1], address, entry)
  else
    redis.call('HDEL', KEYS[1], address)
  end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'op', op, 'address', address,
             'entry', entry, 'origin', ARGV[1])
end
return (#ARGV - 2) / 3
"""


def encode(entry: Suppression) -> str:
    return json.dumps([entry.reason, entry.since, entry.expires, entry.reply],
                      separators=(",", ":"))


def decode(address: str, text: str) -> Suppression:
    reason, since, expires, reply = json.loads(text)
    return Suppression(address, str(reason), float(since), float(expires), str(reply))


def id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def net_changes(changes: Sequence[tuple[str, str, Suppression | None]]
                ) -> tuple[list[Suppression], list[str]]:
    """(added, removed) after applying `changes` (op, address, entry) in order: an address
    added then removed is only removed, and the other way round."""
    last: dict[str, Suppression | None] = {}
    for op, address, entry in changes:
        last.pop(address, None)        # the latest change goes last
        last[address] = entry if op == "add" else None
    added = [e for e in last.values() if e is not None]
    removed = [a for a, e in last.items() if e is None]
    return added, removed


class SuppressionSync:
    """Shares one node's suppression list; `attach(queue, relay)` before `start()`.

    `commands` publishes and reads the shared list; `reader` is the connection that waits in
    XREAD.  `origin` tells this process's own changes apart in the log.  `position_path`:
    the file that keeps the log position ("" or None: kept in memory only)."""

    def __init__(self, commands: Connection, reader: Connection, reactor: Any, *, node: str,
                 prefix: str = "txmta:", position_path: str | None = None,
                 block: float = 1.0) -> None:
        self.commands = commands
        self.reader = reader
        self.reactor = reactor
        self.node = node
        self.origin = f"{node}/{os.urandom(4).hex()}"
        self.list_key = f"{prefix}suppression"
        self.log_key = f"{prefix}suppression:log"
        self.position_path = position_path or None
        self.block_ms = int(block * 1000)
        self.position: str | None = self._load_position()
        self.pending: list[tuple[str, str, str]] = []     # (op, address, entry) not yet published
        self.queue: Any = None
        self.relay: Callable[[Sequence[Suppression], Sequence[str]], Any] | None = None
        self.running = False
        self._publishing = False
        self._seeding = False          # asking whether Redis is empty: publishing waits
        self._check = True             # after a (re)connect: is the log still continuous?
        self._saved = self.position
        self._loop: defer.Deferred[None] | None = None
        self._saver = task.LoopingCall(self._save_position)
        self._saver.clock = reactor
        commands.up_listeners.append(self._commands_up)
        reader.up_listeners.append(self._reconnected)
        self.applied = 0               # entries taken from other nodes (for status and tests)

    # -- wiring ----------------------------------------------------------------------------

    def attach(self, queue: Any, relay: Callable[[Sequence[Suppression], Sequence[str]], Any]
               | None = None) -> None:
        """Share `queue`'s list; `relay(added, removed)` tells the node's other workers."""
        self.queue = queue
        self.relay = relay
        queue.events.subscribe(lambda e: self.local_changes([e.entry], []),
                               events.SuppressionAdded)
        queue.events.subscribe(lambda e: self.local_changes(e.added, e.removed),
                               events.SuppressionChanged)

    def start(self) -> None:
        self.running = True
        self.commands.start()
        self.reader.start()
        self._saver.start(2.0, now=False)
        self._loop = self._read_loop()

    def stop(self) -> defer.Deferred[Any]:
        self.running = False
        if self._saver.running:
            self._saver.stop()
        self._save_position()
        return defer.gatherResults([self.reader.stop(), self.commands.stop()], consumeErrors=True)

    # -- out: this node's changes ----------------------------------------------------------

    def local_changes(self, added: Sequence[Suppression], removed: Sequence[str]) -> None:
        """Changes committed on this node: published now, or when Redis is back."""
        self.pending += [("add", e.address, encode(e)) for e in added]
        self.pending += [("remove", a, "") for a in removed]
        self.publish()

    def publish(self) -> None:
        if self._publishing or self._seeding or not self.pending or not self.commands.up:
            return
        self._publishing = True
        batch = self.pending[:BATCH]
        args: list[str] = [self.origin, str(MAXLEN)]
        for op, address, entry in batch:
            args += [op, address, entry]

        def done(_: Any) -> None:
            self._publishing = False
            del self.pending[:len(batch)]
            self.publish()

        def failed(f: Any) -> None:
            self._publishing = False
            if not f.check(Unavailable):
                log.failure("could not publish {n} suppression change(s); they are kept", f,
                            n=len(batch))
            # kept in `pending`: published when the connection is up again

        self.commands.eval(PUBLISH, [self.list_key, self.log_key], args).addCallbacks(done, failed)

    # -- in: the other nodes' changes ------------------------------------------------------

    def _reconnected(self) -> None:
        self._check = True

    @defer.inlineCallbacks
    def _read_loop(self) -> Any:
        while self.running:
            try:
                if not self.reader.up:
                    yield self.reader.when_up()
                    continue
                if self._check:
                    yield self._catch_up()
                    self._check = False
                reply = yield self.reader.call("XREAD", "COUNT", str(BATCH), "BLOCK",
                                               str(self.block_ms), "STREAMS", self.log_key,
                                               self.position or "0-0")
                if reply:
                    yield self._apply(reply[0][1])
            except (Unavailable, defer.CancelledError):
                if self.running and self.reader.up:   # no answer in time: the reader reconnects
                    yield task.deferLater(self.reactor, 0.2, lambda: None)
            except Exception:
                log.failure("reading the shared suppression list failed; trying again")
                if self.running:
                    yield task.deferLater(self.reactor, 1.0, lambda: None)

    @defer.inlineCallbacks
    def _apply(self, entries: list[Any]) -> Any:
        changes: list[tuple[str, str, Suppression | None]] = []
        for stream_id, fields in entries:
            f = dict(zip(fields[::2], fields[1::2]))
            if f.get("origin") != self.origin:
                address = f.get("address", "")
                if f.get("op") == "add":
                    changes.append(("add", address, decode(address, f.get("entry", ""))))
                elif f.get("op") == "remove":
                    changes.append(("remove", address, None))
        if changes:
            added, removed = net_changes(changes)
            yield self._merge(added, removed)
        self.position = entries[-1][0]

    @defer.inlineCallbacks
    def _merge(self, added: list[Suppression], removed: list[str]) -> Any:
        yield self.queue.suppress_merge(added, removed)
        self.applied += len(added) + len(removed)
        if self.relay is not None:
            try:
                yield self.relay(added, removed)
            except Exception:
                log.failure("could not pass the cluster's suppression changes to the other "
                            "workers")

    @defer.inlineCallbacks
    def _catch_up(self) -> Any:
        """After a (re)connect: read the shared list whole when the log does not reach back
        to our position (or we have none)."""
        first = yield self.reader.call("XRANGE", self.log_key, "-", "+", "COUNT", "1")
        if self.position is not None and (not first
                                          or id_key(first[0][0]) <= id_key(self.position)):
            return                              # the log goes on from our position
        last = yield self.reader.call("XREVRANGE", self.log_key, "+", "-", "COUNT", "1")
        position = last[0][0] if last else "0-0"
        taken = yield self._read_whole()
        log.info("read the shared suppression list: {n} entr(y/ies) taken", n=taken)
        self.position = position

    @defer.inlineCallbacks
    def _read_whole(self) -> Any:
        cursor, taken = "0", 0
        while True:
            cursor, flat = yield self.reader.call("HSCAN", self.list_key, cursor, "COUNT", "1000")
            newer = []
            for address, text in zip(flat[::2], flat[1::2]):
                entry = decode(address, text)
                local = self.queue.suppression_entry(address)
                if local is None or local.since < entry.since:
                    newer.append(entry)
            if newer:
                yield self._merge(newer, [])
                taken += len(newer)
            if cursor == "0":
                return taken

    def _commands_up(self) -> None:
        """Connected (again): give an empty Redis our list, then publish what waits."""
        self._seeding = True
        d = self.commands.call("EXISTS", self.list_key, self.log_key)

        def then(_: Any) -> None:
            self._seeding = False
            self.publish()
        d.addCallbacks(self._seed, lambda f: None).addBoth(then)

    def _seed(self, exists: Any) -> None:
        """Redis has no list at all (new, or restarted without its data): give it ours,
        before the changes that wait (which are newer)."""
        if int(exists or 0) or self.queue is None:
            return
        now = self.queue.clock.seconds()       # the clock the entries' times come from
        waiting = {address for _, address, _ in self.pending}
        mine = [e for e in self.queue.suppression.entries()
                if e.expires > now and e.address not in waiting]
        if mine:
            log.info("the shared suppression list is empty: publishing this node's {n} "
                     "entr(y/ies)", n=len(mine))
            self.pending[:0] = [("add", e.address, encode(e)) for e in mine]

    # -- the position file ---------------------------------------------------------------

    def _load_position(self) -> str | None:
        if not self.position_path:
            return None
        try:
            with open(self.position_path, encoding="ascii") as f:
                text = f.read().strip()
            id_key(text)
            return text
        except (OSError, ValueError):
            return None

    def _save_position(self) -> None:
        if not self.position_path or self.position is None or self.position == self._saved:
            return
        tmp = self.position_path + ".tmp"
        try:
            with open(tmp, "w", encoding="ascii") as f:
                f.write(self.position + "\n")
            os.replace(tmp, self.position_path)
            self._saved = self.position
        except OSError as e:
            log.warn("could not save the suppression log position in {path}: {e}",
                     path=self.position_path, e=e)
