"""Per-destination pools of SMTP connections: reuse, limits, slow start, waiting in line.

A `PoolKey` holds everything that makes two connections interchangeable (STYLE habit 6):
MX host, address, port, TLS policy, source address and HELO name; the destination (a
recipient domain or the relayhost) is what the limits count.  `transaction()` takes an idle
connection of the same key (after RSET), or opens one if the destination's limit and the
global cap allow, or waits in the destination's FIFO line; then it sends and puts the
connection back for reuse (or closes it after `max_messages_per_connection`, or after
`idle_timeout` unused).  When the global cap is reached, idle connections of other keys are
closed to make room for waiting work.

Slow start (Postfix qmgr's "concurrency window"): a destination starts with
`initial_per_destination` connections; each successful transaction raises its window by one
up to `per_destination`; a failure to set up a session (connect, greeting, EHLO, STARTTLS,
AUTH) halves it, never below one.  Messages and recipients refused by a working server do not
touch the window.

`transaction()` never errbacks for remote behaviour: a failed connection comes back as a
`TransactionResult` whose `failure` says at which stage (DESIGN invariant 4).

Not here: the SMTP dialogue (client.py), building endpoints and TLS options (the caller's
`connect`), deciding what a result means (outcome.py).
"""
# test: tests/test_pool.py

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol as TypingProtocol, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from txmta import outcome as O
from txmta.message import Envelope, Recipient
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


@dataclass(eq=False)
class _Waiter:
    key: PoolKey
    # fires with a connection to reuse, None for "a slot is reserved: connect", or
    # SHUTTING_DOWN when the pool closes
    deferred: Deferred[Any] = field(default_factory=Deferred)


@dataclass(eq=False)
class _Destination:
    limit: int
    connections: int = 0            # open, opening or idle
    waiters: deque[_Waiter] = field(default_factory=deque)


class ConnectionPool:
    def __init__(self, reactor: IReactorTime, connect: Callable[[PoolKey], Deferred[Any]], *,
                 per_destination: int = 20, total: int = 500,
                 max_messages_per_connection: int = 100, idle_timeout: float = 30.0,
                 initial_per_destination: int = 5) -> None:
        self.clock = reactor
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
        return len(d.waiters) if d is not None else 0

    def close(self) -> Deferred[None]:
        """QUIT idle connections, refuse new work, close the rest as they finish; fires when
        no connection is left."""
        self._closing = True
        for conn in list(self._idle):
            self._discard(conn)
        for name in list(self._waiting):
            dest = self._destinations[name]
            waiters, dest.waiters = dest.waiters, deque()
            for w in waiters:
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

        retried = False
        while True:
            got = await self._acquire(key)
            if got is SHUTTING_DOWN:
                return failed(SessionFailure(O.CONNECT, SHUTTING_DOWN))
            if got is None:
                try:
                    conn = _Connection(key, await self._connect(key))
                except Exception as e:
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
        if not dest.waiters:
            conn = self._take_idle(key)
            if conn is not None:
                return succeed(conn)
            if self._reserve(dest):
                return succeed(None)
        w = _Waiter(key)
        dest.waiters.append(w)
        self._waiting.setdefault(key.destination, None)
        return w.deferred

    def _connect_failed(self, key: PoolKey, error: Exception) -> SessionFailure:
        dest = self._destination(key.destination)
        dest.limit = max(1, dest.limit // 2)
        self._forget(dest)
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
        if self._closing or not conn.client.usable or conn.messages >= self.max_messages:
            self._discard(conn)
            return
        for w in dest.waiters:          # the same key first (FIFO among them)
            if w.key == conn.key:
                dest.waiters.remove(w)
                if not dest.waiters:
                    self._waiting.pop(conn.key.destination, None)
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

    def _reserve(self, dest: _Destination) -> bool:
        """Count a new connection for `dest` if its window and the global cap allow, closing
        idle connections that are in the way."""
        if dest.connections >= dest.limit:
            victim = next((c for c in self._idle if self._destinations[c.key.destination] is dest), None)
            if victim is None:
                return False
            self._discard(victim, dispatch=False)
        if self._open >= self.total:
            if not self._idle:
                return False
            self._discard(next(iter(self._idle)), dispatch=False)
        dest.connections += 1
        self._open += 1
        return True

    def _forget(self, dest: _Destination) -> None:
        dest.connections -= 1
        self._open -= 1
        if self._open == 0 and self._closed:
            waiting, self._closed = self._closed, []
            for d in waiting:
                d.callback(None)

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
        self._forget(self._destination(conn.key.destination))
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
            for w in list(dest.waiters):
                conn = self._take_idle(w.key)
                if conn is not None:
                    dest.waiters.remove(w)
                    grants.append((w, conn))
            while dest.waiters and self._reserve(dest):
                grants.append((dest.waiters.popleft(), None))
            if not dest.waiters:
                del self._waiting[name]
        return grants
