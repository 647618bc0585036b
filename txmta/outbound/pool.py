"""Per-destination pools of SMTP connections: reuse, limits, slow start, waiting in line.

A `PoolKey` holds everything that makes two connections interchangeable (STYLE habit 6):
MX host, address, port, TLS policy, source address and HELO name; the destination (a
recipient domain or the relayhost) is what the limits count.  `transaction()` takes an idle
connection of the same key (after RSET), or opens one if the destination's limit and the
global cap allow, or waits in the destination's FIFO line; then it sends and puts the
connection back for reuse (or closes it after `max_messages_per_connection`, or after
`idle_timeout` unused).  When the global cap is reached, idle connections of other keys are
closed to make room for waiting work.

Lanes (lanes.py): the lane is in the key, and each lane with a `share` has that part of the
destination's window reserved (at least one connection, even past the window): other lanes
open connections only within what the window leaves beyond the unused reservations.  A lane
also uses the unreserved part, and may close idle connections of others to open its own.
Waiters are served by lane priority, then in order of arrival, so fresh transactional mail
does not queue behind a backlog of bulk mail at a slow destination.

Slow start (Postfix qmgr's "concurrency window"): a destination starts with
`initial_per_destination` connections; each successful transaction raises its window by one
up to `per_destination`; a failure to set up a session (connect, greeting, EHLO, STARTTLS,
AUTH) halves it, never below one.  Messages and recipients refused by a working server do not
touch the window.

`transaction()` never errbacks for remote behaviour: a failed connection comes back as a
`TransactionResult` whose `failure` says at which stage (DESIGN invariant 4).

With [cluster] (`leases`): before opening a connection to a provider whose shaping rule
limits connections, the pool takes one of the cluster's leases for that provider (the rule's
`connections` shared by every node); a refused lease gives the slot back and asks again
every `lease_retry` seconds, and the lease is returned when the connection closes.

Not here: the SMTP dialogue (client.py), building endpoints and TLS options (the caller's
`connect`), deciding what a result means (outcome.py).
"""
# test: tests/test_pool.py

from __future__ import annotations

from collections import OrderedDict
from itertools import count
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol as TypingProtocol, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from txmta import outcome as O
from txmta.lanes import Lanes
from txmta.limits import ConnectionLeases
from txmta.message import Envelope, Recipient
from txmta.outbound.shaping import Shaper
from txmta.outbound.client import SessionFailure, SessionFailureError, TransactionResult
from txmta.reply import Reply

log = Logger()

SHUTTING_DOWN = Reply(451, "4.3.2", "delivery stopped: shutting down")


@dataclass(frozen=True)
class PoolKey:
    destination: str     # what the limits count: the domain or the relayhost
    mx: str
    address: str
    port: int
    tls: Any             # a level name, or the tlspolicy.HostTLS the connection must satisfy
    source: str
    helo: str
    lane: str = ""       # the lane whose share of the destination's connections it uses

    def __post_init__(self) -> None:
        # hashed once: the pool looks keys up for every waiter at every dispatch
        object.__setattr__(self, "_hash", hash((self.destination, self.mx, self.address,
                                                self.port, self.tls, self.source, self.helo,
                                                self.lane)))

    def __hash__(self) -> int:
        return self._hash       # type: ignore[attr-defined,no-any-return]


class PooledClient(TypingProtocol):
    """What the pool needs of a connection (`SMTPClient` provides it)."""

    @property
    def usable(self) -> bool: ...
    def send(self, envelope: Envelope, recipients: Sequence[Recipient],
             body: bytes) -> Deferred[TransactionResult]: ...
    def reset(self) -> Deferred[bool]: ...
    def quit(self) -> None: ...


@dataclass(eq=False)
class _Connection:
    key: PoolKey
    client: PooledClient
    messages: int = 0
    idle_timer: IDelayedCall | None = None
    lease: str = ""      # the provider whose shared connection lease it holds, if any


@dataclass(eq=False)
class _Waiter:
    key: PoolKey
    # fires with a connection to reuse, None for "a slot is reserved: connect", or
    # SHUTTING_DOWN when the pool closes
    deferred: Deferred[Any] = field(default_factory=Deferred)
    seq: int = field(default_factory=count().__next__)      # order of arrival


class _Line:
    """One lane's waiters at a destination: in order of arrival, and by key, so that handing
    a connection on and serving the line cost the same with ten waiters or a thousand."""

    __slots__ = ("rank", "order", "by_key")

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.order: OrderedDict[_Waiter, None] = OrderedDict()
        self.by_key: dict[PoolKey, OrderedDict[_Waiter, None]] = {}

    def __len__(self) -> int:
        return len(self.order)

    def add(self, w: _Waiter) -> None:
        self.order[w] = None
        self.by_key.setdefault(w.key, OrderedDict())[w] = None

    def remove(self, w: _Waiter) -> None:
        del self.order[w]
        same = self.by_key[w.key]
        del same[w]
        if not same:
            del self.by_key[w.key]

    def first(self, key: PoolKey | None = None) -> _Waiter | None:
        """The first to arrive (of `key`, if given), or None."""
        waiters = self.order if key is None else self.by_key.get(key)
        return next(iter(waiters)) if waiters else None


@dataclass(eq=False)
class _Destination:
    limit: int
    connections: int = 0            # open, opening or idle
    lines: dict[str, _Line] = field(default_factory=dict)     # the waiters of each lane
    by_lane: dict[str, int] = field(default_factory=dict)     # connections of each lane

    def waiting(self) -> int:
        return sum(len(line) for line in self.lines.values())

    def in_rank_order(self) -> list[tuple[str, _Line]]:
        """Its lines, higher lanes first."""
        return sorted(self.lines.items(), key=lambda item: item[1].rank)


class ConnectionPool:
    def __init__(self, reactor: IReactorTime, connect: Callable[[PoolKey], Deferred[Any]], *,
                 per_destination: int = 20, total: int = 500,
                 max_messages_per_connection: int = 100, idle_timeout: float = 30.0,
                 initial_per_destination: int = 5, lanes: Lanes | None = None,
                 shaper: Shaper | None = None, leases: ConnectionLeases | None = None,
                 lease_retry: float = 1.0) -> None:
        self.clock = reactor
        self.lanes = lanes          # None: one lane, no reserved shares
        self.shaper = shaper        # per-provider limits and backoff (shaping.py), or None
        # [cluster]: a provider's connections are leases shared by every node (the rule's
        # `connections` in all); a refused lease is asked again every `lease_retry` seconds
        self.leases = leases
        self.lease_retry = lease_retry
        self._provider_open: dict[str, int] = {}     # connections by provider (shaping rule)
        self._connect = connect
        self.per_destination = per_destination
        self.total = total
        self.max_messages = max_messages_per_connection
        self.idle_timeout = idle_timeout
        self.initial = max(1, min(initial_per_destination, per_destination))
        self._destinations: dict[str, _Destination] = {}
        self._open = 0                                   # all connections, all destinations
        self._idle: OrderedDict[_Connection, None] = OrderedDict()   # oldest first
        self._idle_by_key: dict[PoolKey, list[_Connection]] = {}     # most recent last
        self._waiting: OrderedDict[str, None] = OrderedDict()        # destinations with waiters
        self._closing = False
        self._closed: list[Deferred[None]] = []
        self._dispatching = False
        self._dispatch_again = False

    # -- public ---------------------------------------------------------------------------

    def transaction(self, key: PoolKey, envelope: Envelope, recipients: Sequence[Recipient],
                    body: bytes) -> Deferred[TransactionResult]:
        """Send one transaction to `key`; fires with its result, failures included."""
        return Deferred.fromCoroutine(self._transaction(key, envelope, tuple(recipients), body))

    def active(self, destination: str) -> int:
        """Connections of `destination`: busy, idle or being opened."""
        d = self._destinations.get(destination)
        return d.connections if d is not None else 0

    def limit(self, destination: str) -> int:
        """The destination's current slow-start window."""
        d = self._destinations.get(destination)
        return d.limit if d is not None else self.initial

    def waiting(self, destination: str) -> int:
        d = self._destinations.get(destination)
        return d.waiting() if d is not None else 0

    def close(self) -> Deferred[None]:
        """QUIT idle connections, refuse new work, close the rest as they finish; fires when
        no connection is left."""
        self._closing = True
        for conn in list(self._idle):
            self._discard(conn)
        for name in list(self._waiting):
            dest = self._destinations[name]
            lines = dest.in_rank_order()
            dest.lines = {}
            for _, line in lines:
                for w in line.order:
                    w.deferred.callback(SHUTTING_DOWN)
        self._waiting.clear()
        d: Deferred[None] = Deferred()
        if self._open == 0:
            d.callback(None)
        else:
            self._closed.append(d)
        return d

    # -- one transaction ------------------------------------------------------------------

    async def _transaction(self, key: PoolKey, envelope: Envelope,
                           recipients: tuple[Recipient, ...],
                           body: bytes | Callable[[], Deferred[bytes]]) -> TransactionResult:
        def failed(failure: SessionFailure) -> TransactionResult:
            return TransactionResult(failure, (None,) * len(recipients), None, key.mx, key.address,
                                     failure.tls)

        if self.shaper is not None:
            wait = await self.shaper.rate_wait(key.mx)
            if wait > 0 and not self._closing:
                await deferLater(self.clock, wait)
        retried = False
        while True:
            got = await self._acquire(key)
            if got is SHUTTING_DOWN:
                return failed(SessionFailure(O.CONNECT, SHUTTING_DOWN))
            if got is None:
                lease = await self._lease(key)
                if lease is None:           # the cluster's connections are all taken
                    self._forget(self._destination(key.destination), key.lane, key)
                    self._dispatch()
                    if not self._closing:
                        await deferLater(self.clock, self.lease_retry)
                    continue
                try:
                    conn = _Connection(key, await self._connect(key), lease=lease)
                except Exception as e:
                    if lease:
                        self.leases.release(lease)
                    return failed(self._connect_failed(key, e))
            else:
                conn = got
                if not await conn.client.reset():
                    self._discard(conn)       # a stale idle connection: no one's fault
                    continue
            conn.messages += 1
            try:
                if callable(body):
                    body = await body()
                assert isinstance(body, bytes)
                result = await conn.client.send(envelope, recipients, body)
            except Exception:            # a bug: send() fails only with values
                self._discard(conn)
                raise
            if (got is not None and result.failure is not None and result.failure.stage == O.MAIL
                    and not conn.client.usable and all(r is None for r in result.rcpt_replies)
                    and result.failure.reply.code != 421 and not retried):
                # a reused connection the server had closed: nobody's fault, use a new one
                retried = True
                self._discard(conn)
                continue
            self._release(conn, result)
            return result

    def _acquire(self, key: PoolKey) -> Deferred[Any]:
        if self._closing:
            return succeed(SHUTTING_DOWN)
        dest = self._destination(key.destination)
        line = dest.lines.get(key.lane)
        if not line:
            # nobody of this lane waits (higher lanes' waiters are blocked by their share)
            conn = self._take_idle(key)
            if conn is not None:
                return succeed(conn)
            if self._reserve(dest, key.lane, key):
                return succeed(None)
            line = dest.lines[key.lane] = _Line(self._rank(key.lane))
        # behind the waiters of its lane and of higher lanes, ahead of lower lanes'
        w = _Waiter(key)
        line.add(w)
        self._waiting.setdefault(key.destination, None)
        return w.deferred

    def _served(self, dest: _Destination, lane: str, w: _Waiter) -> None:
        """Take `w` out of the line (it is about to be granted)."""
        line = dest.lines[lane]
        line.remove(w)
        if not line:
            del dest.lines[lane]
            if not dest.lines:
                self._waiting.pop(w.key.destination, None)

    async def _lease(self, key: PoolKey) -> str | None:
        """Before a new connection to a provider whose rule limits connections: take one
        of the cluster's leases.  The provider's name when taken, "" when no lease is
        needed, None when the limit is reached (or the pool closed meanwhile)."""
        provider = self._provider(key)
        if self.leases is None or not provider:
            return ""
        limit = self.shaper.shared_connection_limit(provider)
        if not limit:
            return ""
        if self._closing:
            return None
        if not await self.leases.acquire(provider, limit):
            return None
        if self._closing:
            self.leases.release(provider)
            return None
        return provider

    def _connect_failed(self, key: PoolKey, error: Exception) -> SessionFailure:
        dest = self._destination(key.destination)
        dest.limit = max(1, dest.limit // 2)
        self._forget(dest, key.lane, key)
        if isinstance(error, SessionFailureError):
            failure = error.failure
        else:   # an endpoint error (refused, unreachable, timeout) the caller did not wrap
            failure = SessionFailure(O.CONNECT, Reply(
                451, "4.4.1", f"cannot connect to {key.mx} [{key.address}]:{key.port}: {error}"))
        self._dispatch()
        return failure

    def _release(self, conn: _Connection, result: TransactionResult) -> None:
        dest = self._destination(conn.key.destination)
        if result.failure is None:
            dest.limit = min(self.per_destination, dest.limit + 1)
        if (self._closing or not conn.client.usable
                or conn.messages >= self._max_messages(conn.key)):
            self._discard(conn)
            return
        line = dest.lines.get(conn.key.lane)
        # a higher lane waits: the slot is for it (_grants); else the same key first (FIFO)
        w = line.first(conn.key) if line else None
        if w is not None and not any(other.rank < line.rank for other in dest.lines.values()):
            self._served(dest, conn.key.lane, w)
            w.deferred.callback(conn)
            self._dispatch()        # the window may have grown
            return
        self._make_idle(conn)
        self._dispatch()

    # -- bookkeeping ----------------------------------------------------------------------

    def _destination(self, name: str) -> _Destination:
        dest = self._destinations.get(name)
        if dest is None:
            dest = self._destinations[name] = _Destination(self.initial)
        return dest

    def _rank(self, lane: str) -> int:
        return self.lanes.rank(lane) if self.lanes is not None else 0

    def _may_open(self, dest: _Destination, lane: str, without: str | None = None) -> bool:
        """Whether `lane` may have one more connection to `dest` (after closing one of the
        lane `without`, if given): within its reserved share (at least one, for a lane with
        a share, even past the slow-start window), or within the window without touching
        the unused reservations of other lanes."""
        connections = dest.connections - (without is not None)

        def count(name: str) -> int:
            return dest.by_lane.get(name, 0) - (name == without)

        if self.lanes is None:
            return connections < dest.limit
        reserved = {other.name: int(other.share * dest.limit) for other in self.lanes
                    if other.share > 0}
        if lane in reserved and count(lane) < max(1, reserved[lane]):
            return True
        held = sum(max(0, r - count(name)) for name, r in reserved.items() if name != lane)
        return connections + held < dest.limit

    def _max_messages(self, key: PoolKey) -> int:
        provider = self._provider(key)
        if provider:
            return self.shaper.messages_per_connection(provider, self.max_messages)
        return self.max_messages

    def _provider(self, key: PoolKey) -> str:
        return self.shaper.provider(key.mx) if self.shaper is not None else ""

    def _provider_may_open(self, provider: str, without: int = 0) -> bool:
        """The provider's shaping allows one more connection: not suspended after a
        slow-down, and below its (backed-off) connection limit."""
        assert self.shaper is not None
        until = self.shaper.suspended_until(provider)
        if until is not None:
            # wake the line when the suspension ends
            self.shaper.set_wake(provider, lambda: self.clock.callLater(
                max(0.0, until - self.clock.seconds()) + 0.001, self._dispatch))
            return False
        open_now = self._provider_open.get(provider, 0) - without
        limit = self.shaper.connection_limit(provider, open_now)
        return not limit or open_now < limit

    def _reserve(self, dest: _Destination, lane: str = "", key: PoolKey | None = None) -> bool:
        """Count a new connection of `lane` for `dest` (to `key`'s host) if its window, the
        lanes' shares, the provider's shaping and the global cap allow, closing an idle
        connection that is in the way."""
        provider = self._provider(key) if key is not None else ""
        if provider and not self._provider_may_open(provider):
            victim = next((c for c in self._idle if self._provider(c.key) == provider), None)
            if victim is None or not self._provider_may_open(provider, without=1):
                return False
            self._discard(victim, dispatch=False)
        if not self._may_open(dest, lane):
            victim = next((c for c in self._idle if self._destinations[c.key.destination] is dest
                           and self._may_open(dest, lane, without=c.key.lane)), None)
            if victim is None:
                return False
            self._discard(victim, dispatch=False)
        if self._open >= self.total:
            if not self._idle:
                return False
            self._discard(next(iter(self._idle)), dispatch=False)
        dest.connections += 1
        dest.by_lane[lane] = dest.by_lane.get(lane, 0) + 1
        if provider:
            self._provider_open[provider] = self._provider_open.get(provider, 0) + 1
        self._open += 1
        return True

    def _forget(self, dest: _Destination, lane: str = "", key: PoolKey | None = None) -> None:
        dest.connections -= 1
        dest.by_lane[lane] = dest.by_lane.get(lane, 0) - 1
        provider = self._provider(key) if key is not None else ""
        if provider:
            self._provider_open[provider] = self._provider_open.get(provider, 0) - 1
        self._open -= 1
        if self._open == 0 and self._closed:
            waiting, self._closed = self._closed, []
            for d in waiting:
                d.callback(None)

    def provider_connections(self, provider: str) -> int:
        """Connections open (or opening, or idle) to a shaping rule's provider."""
        return self._provider_open.get(provider, 0)

    def _take_idle(self, key: PoolKey) -> _Connection | None:
        conns = self._idle_by_key.get(key)
        while conns:
            conn = conns.pop()
            self._unidle(conn)
            if conn.client.usable:
                return conn
            self._discard(conn, dispatch=False)
        return None

    def _make_idle(self, conn: _Connection) -> None:
        self._idle[conn] = None
        self._idle_by_key.setdefault(conn.key, []).append(conn)
        conn.idle_timer = self.clock.callLater(self.idle_timeout, self._discard, conn)

    def _unidle(self, conn: _Connection) -> None:
        self._idle.pop(conn, None)
        conns = self._idle_by_key.get(conn.key)
        if conns is not None:
            if conn in conns:
                conns.remove(conn)
            if not conns:
                del self._idle_by_key[conn.key]
        if conn.idle_timer is not None:
            if conn.idle_timer.active():
                conn.idle_timer.cancel()
            conn.idle_timer = None

    def _discard(self, conn: _Connection, dispatch: bool = True) -> None:
        """Close `conn` (QUIT when it can) and free its slot."""
        self._unidle(conn)
        try:
            conn.client.quit()
        except Exception:
            log.failure("closing connection to {mx}", Failure(), mx=conn.key.mx)
        if conn.lease:
            self.leases.release(conn.lease)
            conn.lease = ""
        self._forget(self._destination(conn.key.destination), conn.key.lane, conn.key)
        if dispatch:
            self._dispatch()

    def _dispatch(self) -> None:
        """Serve waiters: idle connections of their key first, then new connections, in
        order of arrival.  Grants are fired after the bookkeeping, and re-entry is queued."""
        if self._dispatching:
            self._dispatch_again = True
            return
        self._dispatching = True
        try:
            while True:
                self._dispatch_again = False
                grants = self._grants()
                for w, conn in grants:
                    w.deferred.callback(conn)
                if not grants and not self._dispatch_again:
                    return
        finally:
            self._dispatching = False

    def _grants(self) -> list[tuple[_Waiter, _Connection | None]]:
        grants: list[tuple[_Waiter, _Connection | None]] = []
        if self._closing:
            return grants
        for name in list(self._waiting):
            dest = self._destinations[name]
            for lane, line in dest.in_rank_order():     # higher lanes first
                reused: list[tuple[_Waiter, _Connection | None]] = []
                for key in [k for k in line.by_key if k in self._idle_by_key]:
                    while key in line.by_key:           # idle connections of their key first
                        conn = self._take_idle(key)
                        if conn is None:
                            break
                        w = line.first(key)
                        assert w is not None
                        line.remove(w)
                        reused.append((w, conn))
                reused.sort(key=lambda grant: grant[0].seq)     # in order of arrival
                grants.extend(reused)
                while line:                             # then new ones, while the lane may
                    w = line.first()
                    assert w is not None
                    if not self._reserve(dest, lane, w.key):
                        break
                    line.remove(w)
                    grants.append((w, None))
                if not line:
                    del dest.lines[lane]
            if not dest.lines:
                del self._waiting[name]
        return grants
