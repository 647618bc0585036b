"""The AMP channel between the master and each worker, and the master's fan-out.

The master (tap.py) keeps one AMP connection to each worker over a socketpair (the worker
has it as file descriptor 3).  Over it the master asks the admin commands of
`control/amp.py` (the worker answers them with the same `ControlProtocol` as the admin
socket, on its own queue), and two more:

    MirrorSuppressions(added, removed)   suppression entries changed in the spool.  From a
                                         worker: "I committed these" (a bounce, or an admin
                                         add/remove/import); the master passes them on to
                                         every other worker, which updates its in-memory
                                         mirror (the spool already holds them).
    Reload()                             run the worker's SIGHUP reload.

`FanOut` is the master's `IQueueControl` for the admin socket: a command naming a message
goes to the worker that owns the message's partition (`partition.owner_of`); flush of all
or of a domain and status go to every worker and the answers are added up; a suppression
change goes to one worker, which writes the spool and, before it answers, has the master
update the other workers' mirrors.

A worker whose channel closes (the master died, even by SIGKILL) stops: nothing runs
unsupervised.  So neither end may let AMP close a channel for anything less: a request that
fails is answered with the declared INTERNAL error (AMP answers an undeclared one with
"Unknown Error" and drops the connection), and the master's relay of suppression changes
does not fail because one of the other workers cannot be told (it died: it reads the list
from the spool when it starts again).  This module decides nothing about the queue; it
carries requests and answers.
"""
# test: tests/test_channel.py

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from txmta import events, partition, suppression
from txmta.control.amp import (_ERRORS, ControlProtocol, Delete, Flush, Hold, InternalError,
                               Pickup, Release, Requeue, WebhookReplay,
                               Status, SuppressionAdd, SuppressionImport, SuppressionRemove)
from txmta.faces import AdminQueue
from txmta.message import Suppression

_log = Logger()

CHANNEL_FD = 3          # the worker's end of the socketpair
MAX_BATCH = 60000       # octets of JSON per MirrorSuppressions value (AMP's limit is 65535)


class MirrorSuppressions(amp.Command):
    """Suppression entries changed in the spool (JSON: `added` a list of
    [address, reason, since, expires, reply], `removed` a list of addresses)."""
    arguments = [(b"added", amp.Unicode()), (b"removed", amp.Unicode())]
    response: list[tuple[bytes, amp.Argument]] = []
    errors = _ERRORS


class Reload(amp.Command):
    """Reload what can change live (the worker's SIGHUP)."""
    arguments: list[tuple[bytes, amp.Argument]] = []
    response: list[tuple[bytes, amp.Argument]] = []
    errors = _ERRORS


def encode_entry(s: Suppression) -> list[Any]:
    return [s.address, s.reason, s.since, s.expires, s.reply]


def decode_entry(v: list[Any]) -> Suppression:
    return Suppression(str(v[0]), str(v[1]), float(v[2]), float(v[3]), str(v[4]))


def _dumps(value: Any) -> str:
    # the length counted is the length sent: AMP's limit is on the UTF-8 octets of the value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def mirror_batches(added: Sequence[Suppression], removed: Sequence[str]
                   ) -> Iterator[dict[str, str]]:
    """The MirrorSuppressions arguments for these changes, in as many requests as the AMP
    value limit needs (at least one)."""
    batch_added: list[list[Any]] = []
    batch_removed: list[str] = []
    size = 0
    for item, target in ([(encode_entry(s), batch_added) for s in added]
                         + [(a, batch_removed) for a in removed]):
        n = len(_dumps(item).encode("utf-8")) + 1
        if size + n > MAX_BATCH and (batch_added or batch_removed):
            yield {"added": _dumps(batch_added), "removed": _dumps(batch_removed)}
            batch_added.clear()
            batch_removed.clear()
            size = 0
        target.append(item)   # type: ignore[attr-defined]
        size += n
    yield {"added": _dumps(batch_added), "removed": _dumps(batch_removed)}


class Caller(Protocol):
    """What the master needs of a worker's channel (an AMP protocol; a fake in tests)."""

    def callRemote(self, command: type[amp.Command], **kwargs: Any) -> "defer.Deferred[Any]": ...


def answered(what: str, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    """`f(*args)` as a responder's answer: a failure (our bug) is logged and answered as the
    declared INTERNAL error, which keeps the channel open."""
    def internal(failure: Failure) -> None:
        _log.failure("{what} failed", failure, what=what)
        raise InternalError(f"{failure.type.__name__}: {failure.getErrorMessage()}")
    return defer.maybeDeferred(f, *args).addErrback(internal)


def send_mirror(channel: Caller, added: Sequence[Suppression], removed: Sequence[str]
                ) -> defer.Deferred[None]:
    """Tell `channel` of suppression changes, in one or more requests; fires when all are
    answered."""
    ds = [channel.callRemote(MirrorSuppressions, **args) for args in mirror_batches(added, removed)]
    return defer.gatherResults(ds, consumeErrors=True).addCallback(lambda _: None)


# -- the worker side ------------------------------------------------------------------------

class WorkerControl:
    """The worker's `IQueueControl` on its channel: its queue's, except that a suppression
    change, once committed, is passed to the master (which updates the other workers'
    mirrors) before the command is answered."""

    def __init__(self, queue: AdminQueue, tell: Callable[[Sequence[Suppression], Sequence[str]],
                                                         "defer.Deferred[None]"]) -> None:
        self.queue = queue
        self.tell = tell

    def flush(self, message_id: str | None, domain: str | None) -> Any:
        # a domain's recipients are counted, then made due after the answer (Queue.flush)
        return self.queue.flush(message_id, domain, background=domain is not None)

    def pickup(self, message_id: str) -> Any:
        return self.queue.pickup(message_id)

    def hold(self, message_id: str) -> Any:
        return self.queue.hold(message_id)

    def release(self, message_id: str) -> Any:
        return self.queue.release(message_id)

    def delete(self, message_id: str) -> Any:
        return self.queue.delete(message_id)

    def requeue(self, message_id: str) -> Any:
        return self.queue.requeue(message_id)

    def status(self) -> Any:
        return self.queue.status()

    def _entries(self, addresses: Sequence[str]) -> list[Suppression]:
        """The mirror's entries for `addresses` (the queue put them there with the commit)."""
        out = []
        for a in addresses:
            entry = self.queue.suppression_entry(a)
            if entry is not None:
                out.append(entry)
        return out

    @defer.inlineCallbacks
    def suppress_add(self, address: str, reason: str) -> Any:
        ok = yield self.queue.suppress_add(address, reason)
        yield self.tell(self._entries([address]), [])
        return ok

    @defer.inlineCallbacks
    def suppress_import(self, entries: list[tuple[str, str]]) -> Any:
        n = yield self.queue.suppress_import(entries)
        yield self.tell(self._entries([a for a, _ in entries]), [])
        return n

    def webhook_replay(self, message_id: str | None, event_id: str | None) -> Any:
        return self.queue.webhook_replay(message_id, event_id)

    @defer.inlineCallbacks
    def suppress_remove(self, address: str) -> Any:
        found = yield self.queue.suppress_remove(address)
        yield self.tell([], [suppression.key(address)])
        return found


class WorkerChannel(ControlProtocol):
    """The worker's end: answers the master's control commands on this worker's queue,
    updates the suppression mirror, reloads; `on_lost` runs when the master goes away.

    `worker.build()` fills in `queue_control` (a WorkerControl), `mirror` (the queue's
    SuppressionList) and `reload` once the parts exist."""

    def __init__(self, on_lost: Callable[[], Any] | None = None) -> None:
        super().__init__(None)  # type: ignore[arg-type]
        self.on_lost = on_lost
        self.mirror: Any = None
        self.reload: Callable[[], Any] | None = None
        # told of the other workers' changes once mirrored (the cluster's suppression
        # sharing, on the worker that runs it)
        self.heard: Callable[[list[Suppression], list[str]], Any] | None = None

    def tell_master(self, added: Sequence[Suppression], removed: Sequence[str]
                    ) -> defer.Deferred[None]:
        return send_mirror(self, added, removed)

    def suppressed(self, event: events.SuppressionAdded) -> None:
        """A suppression committed by this worker's bounce (an event of its queue's stream):
        tell the master (no answer awaited)."""
        entry = event.entry
        self.tell_master([entry], []).addErrback(
            lambda f: _log.failure("could not pass suppression of {address} to the master", f,
                                   address=entry.address))

    @MirrorSuppressions.responder
    def mirror_suppressions(self, added: str, removed: str) -> defer.Deferred[dict[str, Any]]:
        return answered("mirroring suppression changes", self._mirror, added, removed)

    def _mirror(self, added: str, removed: str) -> dict[str, Any]:
        entries = [decode_entry(v) for v in json.loads(added)]
        addresses = [str(a) for a in json.loads(removed)]
        if self.mirror is not None:
            for e in entries:
                self.mirror.add(e)
            for a in addresses:
                self.mirror.remove(a)
        if self.heard is not None:
            self.heard(entries, addresses)
        return {}

    @Reload.responder
    def do_reload(self) -> Any:
        if self.reload is None:
            return {}
        return defer.maybeDeferred(self.reload).addCallback(lambda _: {})

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        if self.on_lost is not None:
            self.on_lost()


# -- the master side ------------------------------------------------------------------------

class MasterChannel(amp.AMP):
    """The master's end of worker `index`'s channel: passes the suppression changes the
    worker reports to `relay(index, added, removed)`, which tells the other workers."""

    def __init__(self, index: int,
                 relay: Callable[[int, list[Suppression], list[str]], "defer.Deferred[None]"],
                 on_lost: Callable[["MasterChannel"], Any] | None = None) -> None:
        super().__init__()
        self.index = index
        self.relay = relay
        self.on_lost = on_lost

    @MirrorSuppressions.responder
    def mirror_suppressions(self, added: str, removed: str) -> defer.Deferred[dict[str, Any]]:
        def relay() -> defer.Deferred[dict[str, Any]]:
            entries = [decode_entry(v) for v in json.loads(added)]
            return self.relay(self.index, entries, list(json.loads(removed))).addCallback(
                lambda _: {})
        return answered(f"relaying worker {self.index}'s suppression changes", relay)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        if self.on_lost is not None:
            self.on_lost(self)


class WorkerNotRunning(Exception):
    """A command needs a worker that is not running (it is being restarted)."""


# status fields that describe the one spool all workers share: taken from one answer, not added
SPOOL_WIDE = frozenset({"messages"})


class FanOut:
    """The master's `IQueueControl`: each command goes to the worker(s) it concerns.

    `channels` is a list with one entry per worker index: its channel (a `Caller`), or
    None while that worker is not running."""

    def __init__(self, channels: list[Caller | None]) -> None:
        self.channels = channels

    @property
    def workers(self) -> int:
        return len(self.channels)

    def _channel(self, index: int) -> Caller:
        channel = self.channels[index]
        if channel is None:
            raise WorkerNotRunning(f"worker {index} is not running (it is being restarted); "
                                   f"try again in a moment")
        return channel

    def _owner(self, message_id: str) -> Caller:
        return self._channel(partition.owner_of(message_id, self.workers))

    def _all(self, command: type[amp.Command], **kwargs: Any) -> defer.Deferred[list[Any]]:
        try:
            channels = [self._channel(k) for k in range(self.workers)]
        except WorkerNotRunning as e:
            return defer.fail(e)
        return defer.gatherResults([c.callRemote(command, **kwargs) for c in channels],
                                   consumeErrors=True).addErrback(lambda f: f.value.subFailure)

    def _by_id(self, command: type[amp.Command], message_id: str) -> defer.Deferred[bool]:
        d = defer.maybeDeferred(lambda: self._owner(message_id).callRemote(
            command, message_id=message_id))
        return d.addCallback(lambda r: bool(r["found"]))

    def flush(self, message_id: str | None, domain: str | None) -> defer.Deferred[int]:
        if message_id is not None:
            d = defer.maybeDeferred(lambda: self._owner(message_id).callRemote(
                Flush, message_id=message_id))
            return d.addCallback(lambda r: int(r["count"]))
        return self._all(Flush, domain=domain).addCallback(
            lambda rs: sum(int(r["count"]) for r in rs))

    def pickup(self, message_id: str) -> defer.Deferred[bool]:
        return self._by_id(Pickup, message_id)

    def hold(self, message_id: str) -> defer.Deferred[bool]:
        return self._by_id(Hold, message_id)

    def release(self, message_id: str) -> defer.Deferred[bool]:
        return self._by_id(Release, message_id)

    def delete(self, message_id: str) -> defer.Deferred[bool]:
        return self._by_id(Delete, message_id)

    def requeue(self, message_id: str) -> defer.Deferred[bool]:
        return self._by_id(Requeue, message_id)

    def status(self) -> defer.Deferred[dict[str, Any]]:
        """Every running worker's status, added up (numbers), as one; each worker's own under
        "worker" (a worker being restarted shows as not running)."""
        running = [(k, c) for k, c in enumerate(self.channels) if c is not None]
        ds = [c.callRemote(Status).addCallback(lambda r: json.loads(r["json"])) for _, c in running]

        def combine(answers: list[dict[str, Any]]) -> dict[str, Any]:
            by_index = dict(zip((k for k, _ in running), answers))
            out: dict[str, Any] = {"workers": self.workers, "workers_running": len(answers)}
            for answer in answers:
                for key, value in answer.items():
                    if key in ("pid", "version") or isinstance(value, bool) \
                            or not isinstance(value, (int, float)):
                        continue
                    if key in SPOOL_WIDE:
                        out[key] = value
                    else:
                        out[key] = out.get(key, 0) + value
            out["worker"] = [dict(by_index[k], index=k, running=True) if k in by_index
                             else {"index": k, "running": False} for k in range(self.workers)]
            return out
        return defer.gatherResults(ds, consumeErrors=True).addCallback(combine)

    def _writer(self) -> Caller:
        """The worker that writes a suppression change to the spool: the first running one."""
        for channel in self.channels:
            if channel is not None:
                return channel
        raise WorkerNotRunning("no worker is running")

    def webhook_replay(self, message_id: str | None, event_id: str | None) -> defer.Deferred[int]:
        """Any worker can queue deliveries (they land in the event's partition, whose owner
        sends them): the owner of the message, else worker 0."""
        channel = self._owner(message_id) if message_id else self._channel(0)
        d = channel.callRemote(WebhookReplay, message_id=message_id, event_id=event_id)
        return d.addCallback(lambda r: int(r["count"]))

    def suppress_add(self, address: str, reason: str) -> defer.Deferred[bool]:
        d = defer.maybeDeferred(lambda: self._writer().callRemote(
            SuppressionAdd, address=address, reason=reason))
        return d.addCallback(lambda r: bool(r["ok"]))

    def suppress_remove(self, address: str) -> defer.Deferred[bool]:
        d = defer.maybeDeferred(lambda: self._writer().callRemote(
            SuppressionRemove, address=address))
        return d.addCallback(lambda r: bool(r["found"]))

    def suppress_import(self, entries: list[tuple[str, str]]) -> defer.Deferred[int]:
        lines = "\n".join(f"{a},{r}" if r else a for a, r in entries)
        d = defer.maybeDeferred(lambda: self._writer().callRemote(SuppressionImport, lines=lines))
        return d.addCallback(lambda r: int(r["count"]))

    def relay(self, source: int, added: list[Suppression], removed: list[str]
              ) -> defer.Deferred[None]:
        """Suppression changes worker `source` committed: update every other running worker's
        mirror; fires when each has answered or could not be told.  Never fails: a worker
        being restarted, or whose channel closed as it died, loads the list from the spool
        when it starts, and `source`, whose change is committed, could do nothing about it."""
        def not_told(failure: Failure, index: int) -> None:
            if failure.check(defer.FirstError):         # send_mirror's: the request's own
                failure = failure.value.subFailure
            if failure.check(error.ConnectionClosed):
                _log.info("worker {index} was not told of a suppression change: its channel "
                          "closed (it reads the list from the spool when it starts)", index=index)
            else:
                _log.failure("worker {index} was not told of a suppression change", failure,
                             index=index)
        ds = [send_mirror(c, added, removed).addErrback(not_told, k)
              for k, c in enumerate(self.channels) if c is not None and k != source]
        return defer.gatherResults(ds).addCallback(lambda _: None)

