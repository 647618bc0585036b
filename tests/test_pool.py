"""Connection pools with a Clock, a scripted connector and fake clients (STYLE habits 1, 9)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from txmta import outcome as O
from txmta.message import Address, Envelope, Recipient
from txmta.outbound.client import SessionFailure, SessionFailureError, TransactionResult
from txmta.outbound.pool import ConnectionPool, PoolKey
from txmta.reply import Reply

OK = Reply(250, "2.0.0", "OK")
A = PoolKey("a.example", "mx1.a.example", "192.0.2.1", 25, "may", "", "out.example")
A2 = PoolKey("a.example", "mx2.a.example", "192.0.2.2", 25, "may", "", "out.example")
B = PoolKey("b.example", "mx.b.example", "192.0.2.9", 25, "may", "", "out.example")
RCPTS = (Recipient(Address("r", "a.example")),)


class FakeClient:
    """Provides what the pool uses of `SMTPClient`; the test decides when sends finish."""

    def __init__(self, key: PoolKey) -> None:
        self.key = key
        self.usable = True
        self.reset_ok = True
        self.sent: list[str] = []
        self.pending: list[Deferred[TransactionResult]] = []
        self.resets = 0
        self.quits = 0

    def send(self, envelope: Envelope, recipients: Any, body: bytes) -> Deferred[TransactionResult]:
        assert self.usable and not self.pending
        self.sent.append(envelope.sender.local)
        d: Deferred[TransactionResult] = Deferred()
        self.pending.append(d)
        return d

    def finish(self, failure: SessionFailure | None = None) -> None:
        d = self.pending.pop(0)
        d.callback(TransactionResult(failure, (OK,), None if failure else OK,
                                     self.key.mx, self.key.address))

    def reset(self) -> Deferred[bool]:
        self.resets += 1
        return succeed(self.reset_ok)

    def quit(self) -> None:
        self.quits += 1
        self.usable = False


class Connector:
    """The pool's `connect`: connections open when the test says so."""

    def __init__(self) -> None:
        self.pending: list[tuple[PoolKey, Deferred[Any]]] = []
        self.clients: list[FakeClient] = []

    def __call__(self, key: PoolKey) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((key, d))
        return d

    def open(self) -> FakeClient:
        key, d = self.pending.pop(0)
        client = FakeClient(key)
        self.clients.append(client)
        d.callback(client)
        return client

    def fail(self, error: Exception) -> None:
        _, d = self.pending.pop(0)
        d.errback(error)


def make(**kw: Any) -> tuple[ConnectionPool, Connector, Clock]:
    clock, connector = Clock(), Connector()
    return ConnectionPool(clock, connector, **kw), connector, clock


def start(pool: ConnectionPool, key: PoolKey, name: str = "m") -> list[Any]:
    out: list[Any] = []
    pool.transaction(key, Envelope(Address(name, "example.com"), RCPTS), RCPTS, b"x\r\n").addBoth(out.append)
    return out


def test_idle_connection_is_reused_with_rset() -> None:
    pool, connector, _ = make()
    first = start(pool, A, "m1")
    client = connector.open()
    client.finish()
    assert first[0].final == OK
    second = start(pool, A, "m2")
    assert connector.pending == []            # no new connection
    assert client.resets == 1
    client.finish()
    assert second[0].final == OK
    assert client.sent == ["m1", "m2"]
    assert pool.active("a.example") == 1


def test_per_destination_window_and_fifo_waiting() -> None:
    pool, connector, _ = make(per_destination=2, initial_per_destination=2)
    outs = [start(pool, A, f"m{i}") for i in range(1, 6)]
    assert len(connector.pending) == 2 and pool.waiting("a.example") == 3
    c1, c2 = connector.open(), connector.open()
    c1.finish()
    c2.finish()
    c1.finish()
    assert c1.sent == ["m1", "m3", "m5"] and c2.sent == ["m2", "m4"]
    c2.finish()
    c1.finish()
    assert all(o[0].final == OK for o in outs)
    assert pool.active("a.example") == 2 and connector.pending == []


def test_a_released_connection_goes_to_a_waiter_of_its_key_first() -> None:
    pool, connector, _ = make(per_destination=1, initial_per_destination=1)
    start(pool, A, "m1")
    c1 = connector.open()
    other = start(pool, A2, "other")           # same destination, another MX: waits
    same = start(pool, A, "same")              # behind it, but c1 fits it
    c1.finish()
    assert c1.sent == ["m1", "same"]
    c1.finish()
    assert same[0].final == OK
    # now c1 is idle and in the way of A2's waiter: it is closed for a new connection
    assert c1.quits == 1
    assert [k for k, _ in connector.pending] == [A2]
    connector.open().finish()
    assert other[0].final == OK


def test_global_cap_closes_idle_connections_for_waiting_work() -> None:
    pool, connector, _ = make(total=2)
    start(pool, A, "a1")
    start(pool, A, "a2")
    b = start(pool, B, "b1")
    assert [k for k, _ in connector.pending] == [A, A]
    assert pool.waiting("b.example") == 1
    c1, c2 = connector.open(), connector.open()
    c1.finish()                                 # no A waiter: idle, then closed for B
    assert c1.quits == 1
    assert [k for k, _ in connector.pending] == [B]
    assert pool.active("a.example") == 1 and pool.active("b.example") == 1
    connector.open().finish()
    assert b[0].final == OK


def test_global_cap_waits_while_every_connection_is_busy() -> None:
    pool, connector, _ = make(total=1)
    start(pool, A, "a1")
    start(pool, B, "b1")
    assert len(connector.pending) == 1
    connector.open()
    assert pool.waiting("b.example") == 1 and connector.pending == []


def test_max_messages_per_connection() -> None:
    pool, connector, _ = make(max_messages_per_connection=2)
    start(pool, A, "m1")
    c1 = connector.open()
    c1.finish()
    start(pool, A, "m2")
    c1.finish()
    assert c1.quits == 1 and pool.active("a.example") == 0
    start(pool, A, "m3")
    c2 = connector.open()
    assert c2.sent == ["m3"]


def test_idle_connection_closed_after_idle_timeout() -> None:
    pool, connector, clock = make(idle_timeout=30.0)
    start(pool, A)
    client = connector.open()
    client.finish()
    clock.advance(29)
    assert client.quits == 0 and pool.active("a.example") == 1
    clock.advance(1)
    assert client.quits == 1 and pool.active("a.example") == 0


def test_reuse_restarts_the_idle_timer() -> None:
    pool, connector, clock = make(idle_timeout=30.0)
    start(pool, A)
    client = connector.open()
    client.finish()
    clock.advance(20)
    start(pool, A)
    clock.advance(20)
    client.finish()
    clock.advance(29)
    assert client.quits == 0


def test_slow_start_grows_by_one_per_success() -> None:
    pool, connector, _ = make(per_destination=4, initial_per_destination=2)
    for i in range(8):
        start(pool, A, f"m{i}")
    assert len(connector.pending) == 2 and pool.limit("a.example") == 2
    c1, _c2 = connector.open(), connector.open()
    c1.finish()
    assert pool.limit("a.example") == 3
    assert len(connector.pending) == 1          # the grown window opens one more
    c3 = connector.open()
    c3.finish()
    c1.finish()
    assert pool.limit("a.example") == 4         # capped at per_destination
    assert pool.active("a.example") == 4
    c3.finish()
    assert pool.limit("a.example") == 4


def test_a_rejected_message_does_not_grow_the_window() -> None:
    pool, connector, _ = make(initial_per_destination=2)
    start(pool, A)
    connector.open().finish(SessionFailure(O.MAIL, Reply(550, "5.7.1", "no")))
    assert pool.limit("a.example") == 2


def test_connect_failure_halves_the_window_and_is_a_result() -> None:
    pool, connector, _ = make(per_destination=8, initial_per_destination=8)
    outs = [start(pool, A) for _ in range(3)]
    greeting = SessionFailure(O.GREETING, Reply(554, "5.7.1", "go away"))
    connector.fail(SessionFailureError(greeting))
    assert pool.limit("a.example") == 4
    assert outs[0] == [TransactionResult(greeting, (None,), None, A.mx, A.address)]
    connector.fail(ConnectionRefusedError("refused"))
    assert pool.limit("a.example") == 2
    failure = outs[1][0].failure
    assert failure.stage == O.CONNECT and (failure.reply.code, failure.reply.enhanced) == (451, "4.4.1")
    connector.fail(SessionFailureError(greeting))
    assert pool.limit("a.example") == 1
    assert pool.active("a.example") == 0
    start(pool, A)
    connector.fail(SessionFailureError(greeting))
    assert pool.limit("a.example") == 1          # never below one


def test_stale_idle_connection_is_replaced() -> None:
    pool, connector, _ = make()
    start(pool, A)
    c1 = connector.open()
    c1.finish()
    c1.usable = False                           # the server closed it meanwhile
    start(pool, A)
    assert c1.quits == 1 and len(connector.pending) == 1


def test_refused_rset_opens_a_new_connection() -> None:
    pool, connector, _ = make()
    start(pool, A)
    c1 = connector.open()
    c1.finish()
    c1.reset_ok = False
    out = start(pool, A, "again")
    c2 = connector.open()
    c2.finish()
    assert out[0].final == OK and c2.sent == ["again"] and pool.active("a.example") == 1


def test_close_quits_idle_fails_waiters_and_waits_for_busy() -> None:
    pool, connector, _ = make(per_destination=1, initial_per_destination=1)
    start(pool, B)
    idle = connector.open()
    idle.finish()
    start(pool, A, "busy")
    busy = connector.open()
    waiter = start(pool, A, "waiter")
    closed: list[Any] = []
    pool.close().addBoth(closed.append)
    assert idle.quits == 1
    assert waiter[0].failure.stage == O.CONNECT and waiter[0].failure.reply.code == 451
    assert closed == []
    busy.finish()
    assert busy.quits == 1 and closed == [None]
    late = start(pool, A, "late")
    assert late[0].failure.reply.text.endswith("shutting down")


def test_a_body_loader_is_called_only_once_a_connection_is_ready() -> None:
    """Mail for a host that cannot be reached is never read from the spool."""
    pool, connector, _ = make()
    loads: list[int] = []

    def loader() -> Deferred[bytes]:
        loads.append(1)
        return succeed(b"x\r\n")

    out: list[Any] = []
    pool.transaction(A, Envelope(Address("m", "example.com"), RCPTS), RCPTS, loader).addBoth(out.append)
    connector.fail(ConnectionRefusedError("refused"))
    assert loads == [] and out[0].failure.stage == O.CONNECT
    pool.transaction(A, Envelope(Address("m", "example.com"), RCPTS), RCPTS, loader).addBoth(out.append)
    client = connector.open()
    assert loads == [1]
    client.finish()
    assert len(out) == 2 and out[1].failure is None


# -- lanes: reserved shares, served by priority ------------------------------------------------

from dataclasses import replace as _replace   # noqa: E402

from txmta.lanes import Lane, Lanes   # noqa: E402

LANES = Lanes([Lane("transactional", 10, share=0.5), Lane("bulk", 0, share=0.2)])
T = _replace(A, lane="transactional")
BULK = _replace(A, lane="bulk")


def test_bulk_leaves_the_transactional_share_free() -> None:
    """Window 10: transactional reserves 5; bulk gets the other 5 however much it has, and a
    transactional message then connects at once instead of waiting behind bulk."""
    pool, connector, _ = make(per_destination=10, initial_per_destination=10, lanes=LANES)
    for i in range(40):
        start(pool, BULK, f"b{i}")
    assert len(connector.pending) == 5 and pool.waiting("a.example") == 35
    t = start(pool, T, "t1")
    assert [k.lane for k, _ in connector.pending] == ["bulk"] * 5 + ["transactional"]
    connector.pending.pop(0)      # the bulk connections never open (a slow destination)
    [connector.pending.pop(0) for _ in range(4)]
    connector.open().finish()
    assert t[0].final == OK


def test_a_lane_uses_unreserved_and_idle_capacity_when_alone() -> None:
    """Transactional alone may use all but bulk's unused reservation (10 - 2 = 8)."""
    pool, connector, _ = make(per_destination=10, initial_per_destination=10, lanes=LANES)
    for i in range(20):
        start(pool, T, f"t{i}")
    assert len(connector.pending) == 8
    b = start(pool, BULK, "b1")              # bulk's reservation is still there
    assert len(connector.pending) == 9 and connector.pending[-1][0].lane == "bulk"
    for _ in range(9):
        connector.open()
    assert b == [] and pool.active("a.example") == 9


def test_waiters_are_served_by_lane_priority_then_in_order() -> None:
    """One connection allowed: a released slot goes to the transactional waiter that came
    after the bulk ones."""
    lanes = Lanes([Lane("transactional", 10), Lane("bulk", 0)])     # no reservations
    pool, connector, _ = make(per_destination=1, initial_per_destination=1, lanes=lanes)
    start(pool, BULK, "b0")
    first = connector.open()
    for i in range(1, 4):
        start(pool, BULK, f"b{i}")
    start(pool, T, "t1")
    start(pool, T, "t2")
    first.finish()                 # idle now, in the way of t1's key: closed for it
    assert first.quits == 1 and [k.lane for k, _ in connector.pending] == ["transactional"]
    c = connector.open()
    c.finish()
    assert c.sent == ["t1", "t2"]


def test_each_lane_with_a_share_gets_one_connection_at_a_window_of_one() -> None:
    """After connection failures the window is 1; a lane's reservation of at least one
    connection keeps one lane from locking the other out."""
    pool, connector, _ = make(per_destination=1, initial_per_destination=1, lanes=LANES)
    start(pool, BULK, "b1")
    start(pool, T, "t1")
    assert sorted(k.lane for k, _ in connector.pending) == ["bulk", "transactional"]


# -- any interleaving: everything is served, nothing waits beside an idle connection -----------

from hypothesis import given, settings   # noqa: E402
from hypothesis import strategies as st   # noqa: E402

KEYS = [T, _replace(A2, lane="transactional"), BULK, _replace(A2, lane="bulk"), B]
STEPS = st.lists(st.one_of(st.tuples(st.just("start"), st.integers(0, len(KEYS) - 1)),
                           st.tuples(st.just("open"), st.integers(0, 50)),
                           st.tuples(st.just("fail"), st.integers(0, 50)),
                           st.tuples(st.just("finish"), st.integers(0, 50))), max_size=80)


def _no_waiter_beside_an_idle_connection(pool: ConnectionPool) -> None:
    idle = {conn.key for conn in pool._idle}
    for dest in pool._destinations.values():
        for line in dest.lines.values():
            assert not (idle & line.by_key.keys())
            assert len(line) > 0                # an empty line is removed
    waiting = sum(pool.waiting(d) for d in ("a.example", "b.example"))
    assert bool(waiting) == bool(pool._waiting)


@settings(max_examples=150, deadline=None)
@given(STEPS, st.integers(1, 3), st.sampled_from([None, LANES]))
def test_any_interleaving_serves_every_transaction(steps: list[tuple[str, int]], window: int,
                                                   lanes: Lanes | None) -> None:
    """Random starts, connects, connect failures and finished sends, then a drain: every
    transaction ends with a result, connections per destination stay within the window plus
    the lanes' reserved minimum, and no waiter ever sits beside an idle connection of its key."""
    pool, connector, _ = make(per_destination=window, initial_per_destination=window,
                              lanes=lanes, max_messages_per_connection=3)
    results: list[list[Any]] = []

    def busy() -> list[FakeClient]:
        return [c for c in connector.clients if c.pending]

    def step(op: str, n: int) -> None:
        if op == "start":
            results.append(start(pool, KEYS[n], f"m{len(results)}"))
        elif op == "open" and connector.pending:
            connector.open()
        elif op == "fail" and connector.pending:
            connector.fail(SessionFailureError(SessionFailure(O.CONNECT, Reply(421, "4.4.2", "x"))))
        elif op == "finish" and busy():
            clients = busy()
            clients[n % len(clients)].finish()
        _no_waiter_beside_an_idle_connection(pool)
        for d in ("a.example", "b.example"):
            assert pool.active(d) <= window + (2 if lanes else 0)

    for op, n in steps:
        step(op, n)
    for _ in range(10 * len(results) + 10):          # drain
        if connector.pending:
            step("open", 0)
        elif busy():
            step("finish", 0)
        else:
            break
    assert all(len(r) == 1 for r in results)
    assert pool.waiting("a.example") == pool.waiting("b.example") == 0
