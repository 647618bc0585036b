"""EagerServer: replies leave in write() when nothing is queued, and order is kept otherwise.

Real sockets on loopback and a private epoll reactor that the test iterates by hand, so
"sent without a reactor iteration" is observable."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from typing import Any, Iterator

import pytest
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Factory, Protocol

from txmta.tcp import EagerServer, TCPServerEndpoint


class Keep(Protocol):
    def __init__(self, made: list[Any]) -> None:
        self.made = made

    def connectionMade(self) -> None:
        self.made.append(self)


@pytest.fixture
def served():
    reactor = EPollReactor()
    made: list[Any] = []
    factory = Factory.forProtocol(lambda: Keep(made))
    ports: list[Any] = []
    TCPServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory).addCallback(ports.append)
    port = ports[0]
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    for _ in range(100):
        if made:
            break
        reactor.iterate(0.05)
    assert made, "the connection was not accepted"
    yield reactor, made[0], client
    client.close()
    made[0].transport.abortConnection()
    port.stopListening()
    for _ in range(5):
        reactor.iterate(0)


def test_connections_are_eager(served):
    _, proto, _ = served
    assert isinstance(proto.transport, EagerServer)


def test_a_reply_leaves_inside_write(served):
    _, proto, client = served
    proto.transport.write(b"220 ready\r\n")
    # no reactor iteration between the write and the read
    assert client.recv(100) == b"220 ready\r\n"
    assert not proto.transport.dataBuffer and not proto.transport._tempDataBuffer


def test_a_write_the_socket_cannot_take_is_buffered_and_order_is_kept(served):
    reactor, proto, client = served
    big = bytes(range(256)) * (64 * 1024)          # 16 MiB: more than the socket buffers hold
    proto.transport.write(big)
    assert proto.transport._tempDataBuffer, "expected part of the write to wait for the reactor"
    proto.transport.write(b"END")                   # queued behind, never sent ahead
    client.settimeout(0.01)
    got = bytearray()
    while len(got) < len(big) + 3:
        reactor.iterate(0)
        try:
            chunk = client.recv(1 << 20)
        except socket.timeout:
            continue
        assert chunk
        got += chunk
    assert bytes(got) == big + b"END"
    reactor.iterate(0)
    proto.transport.write(b"again")                 # the buffer drained: eager again
    client.settimeout(5)
    assert client.recv(100) == b"again"


def test_writes_after_lose_connection_take_the_normal_path(served):
    reactor, proto, client = served
    proto.transport.write(b"221 bye\r\n")
    proto.transport.loseConnection()
    proto.transport.write(b"late\r\n")              # buffered path: sent before the close
    client.settimeout(0.01)
    got = b""
    for _ in range(200):
        reactor.iterate(0)
        try:
            chunk = client.recv(100)
        except socket.timeout:
            continue
        if not chunk:
            break
        got += chunk
    assert got == b"221 bye\r\nlate\r\n"


# -- outgoing connections -----------------------------------------------------------------

def _pump(reactor: Any, until: Any, rounds: int = 200) -> None:
    for _ in range(rounds):
        if until():
            return
        reactor.iterate(0.01)
    raise AssertionError("condition not reached")


def _listening_socket(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.bind((host, 0))
    srv.listen(5)
    return srv


def test_connect_gives_an_eager_client_with_the_source_address():
    from txmta.tcp import EagerClient, connect
    reactor = EPollReactor()
    srv = _listening_socket()
    made: list[Any] = []
    results: list[Any] = []
    d = connect(reactor, "127.0.0.1", srv.getsockname()[1],
                Factory.forProtocol(lambda: Keep(made)), timeout=5, bind_address=("127.0.0.5", 0))
    d.addBoth(results.append)
    _pump(reactor, lambda: results and made)
    proto = results[0]
    assert proto is made[0] and isinstance(proto.transport, EagerClient)
    peer, addr = srv.accept()
    assert addr[0] == "127.0.0.5"
    proto.transport.write(b"EHLO x\r\n")            # out without a reactor iteration
    peer.settimeout(5)
    assert peer.recv(100) == b"EHLO x\r\n"
    proto.transport.abortConnection()
    peer.close()
    srv.close()
    reactor.iterate(0)


def test_connect_refused_errbacks():
    from twisted.internet.error import ConnectionRefusedError

    from txmta.tcp import connect
    reactor = EPollReactor()
    srv = _listening_socket()
    port = srv.getsockname()[1]
    srv.close()                                      # nothing listens there now
    results: list[Any] = []
    connect(reactor, "127.0.0.1", port, Factory.forProtocol(Protocol), timeout=5).addBoth(results.append)
    _pump(reactor, lambda: results)
    assert results[0].check(ConnectionRefusedError)


def test_connect_over_ipv6():
    from txmta.tcp import connect
    try:
        srv = _listening_socket("::1")
    except OSError:
        pytest.fail("no IPv6 loopback on this machine: the test needs ::1")
    reactor = EPollReactor()
    results: list[Any] = []
    connect(reactor, "::1", srv.getsockname()[1], Factory.forProtocol(Protocol), timeout=5
            ).addBoth(results.append)
    _pump(reactor, lambda: results)
    assert results[0].transport.getPeer().host == "::1"
    results[0].transport.abortConnection()
    srv.close()
    reactor.iterate(0)


def test_cancelling_a_connect_errbacks_once():
    from twisted.internet.defer import CancelledError

    from txmta.tcp import connect
    reactor = EPollReactor()
    srv = _listening_socket()
    results: list[Any] = []
    d = connect(reactor, "127.0.0.1", srv.getsockname()[1], Factory.forProtocol(Protocol), timeout=5)
    d.addBoth(results.append)
    d.cancel()                                       # before the reactor ever ran
    for _ in range(5):
        reactor.iterate(0)
    assert len(results) == 1 and results[0].check(CancelledError)
    srv.close()


def test_outgoing_connections_do_not_log_factory_start_and_stop():
    """One outgoing connection per delivery must not put two lines in the daemon's log."""
    from twisted.logger import capturedLogs

    from txmta.tcp import connect
    reactor = EPollReactor()
    srv = _listening_socket()
    results: list[Any] = []
    with capturedLogs() as events:
        connect(reactor, "127.0.0.1", srv.getsockname()[1], Factory.forProtocol(Protocol),
                timeout=5).addBoth(results.append)
        _pump(reactor, lambda: results)
        results[0].transport.loseConnection()
        for _ in range(10):
            reactor.iterate(0.01)
    assert not [e for e in events if "factory" in str(e.get("log_format", "")).lower()]
    srv.close()


def test_corked_writes_leave_together_at_the_end_of_the_block(served):
    _, proto, client = served
    with proto.transport.corked():
        proto.transport.writeSequence([b"HTTP/1.1 200 OK\r\n", b"Content-Length: 2\r\n\r\n"])
        proto.transport.write(b"{}")
        client.setblocking(False)
        with pytest.raises(BlockingIOError):
            client.recv(100)                        # nothing left inside the block
    client.settimeout(5)
    # no reactor iteration: the three pieces were one write at the end of the block
    assert client.recv(100) == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    assert not proto.transport.dataBuffer and not proto.transport._tempDataBuffer


def test_a_sequence_written_outside_a_cork_still_waits_for_the_reactor(served):
    """Uncorked, writeSequence stays buffered: sent at once, header lines and a body written
    just after them would leave as two segments, and the second could wait for Nagle."""
    reactor, proto, client = served
    proto.transport.writeSequence([b"a", b"b"])
    proto.transport.write(b"c")
    assert proto.transport._tempDataBuffer or proto.transport.dataBuffer
    reactor.iterate(0)
    client.settimeout(5)
    assert client.recv(100) == b"abc"


def slots(listeners: int, workers: int) -> Any:
    """Shared connection counts as the master makes them, mapped here."""
    from txmta.tcp import map_counts, shared_counts

    fd = shared_counts(listeners, workers)
    assert fd is not None
    try:
        return map_counts(fd)
    finally:
        os.close(fd)


@contextmanager
def shared_port(waiting: int, balance: Any = None) -> Iterator[tuple[Any, Any, list[Any]]]:
    """A worker's port on a listening socket shared with others (a private reactor the test
    drives by calling doRead), with `waiting` clients already connected: (reactor, port,
    the protocols it made)."""
    from txmta.tcp import AdoptedServerEndpoint, listening_socket

    reactor = EPollReactor()
    made: list[Any] = []
    sock = listening_socket("127.0.0.1", 0)
    ports: list[Any] = []
    AdoptedServerEndpoint(reactor, sock.fileno(), socket.AF_INET, shared=True,
                          balance=balance).listen(
        Factory.forProtocol(lambda: Keep(made))).addCallback(ports.append)
    port = ports[0]
    clients = [socket.create_connection(sock.getsockname(), timeout=5) for _ in range(waiting)]
    try:
        yield reactor, port, made
    finally:
        for c in clients:
            c.close()
        for p in made:
            p.transport.abortConnection()
        port.stopListening()
        sock.close()
        for _ in range(5):
            reactor.iterate(0)


def test_a_shared_listening_socket_accepts_one_connection_per_wakeup():
    """Workers share the master's socket: each wakeup takes one connection, so a burst is
    spread over the workers instead of going to the first one awake."""
    with shared_port(5) as (_, port, made):
        for n in range(1, 6):
            port.doRead()           # what the reactor calls when the socket is readable
            assert len(made) == n
        assert isinstance(made[0].transport, EagerServer)


def test_accept_balance_counts_are_shared_and_each_worker_writes_its_own_slot():
    from txmta.tcp import AcceptBalance, map_counts, shared_counts

    fd = shared_counts(listeners=2, workers=3)
    assert fd is not None
    a, b = map_counts(fd), map_counts(fd)          # two workers' mappings of the same memory
    os.close(fd)
    w0 = AcceptBalance(a, listener=1, index=0, workers=3)
    w1 = AcceptBalance(b, listener=1, index=1, workers=3)
    w2 = AcceptBalance(b, listener=1, index=2, workers=3)
    other_listener = AcceptBalance(a, listener=0, index=1, workers=3)
    assert not any(w.ahead() for w in (w0, w1, w2))
    w0.opened()
    assert not w0.ahead()                          # one more than the others: even enough
    w0.opened()
    assert w0.ahead() and not w1.ahead()           # two more: let the others take the next
    w1.opened(), w1.opened(), w2.opened(), w2.opened()
    assert not w0.ahead()
    for _ in range(9):
        other_listener.opened()                    # another socket's counts do not mix in
    assert not w1.ahead()
    w0.closed(), w0.closed()
    assert w1.ahead() and w2.ahead() and not w0.ahead()
    replacement = AcceptBalance(b, listener=1, index=1, workers=3)   # a restarted worker 1
    assert replacement.held == 0 and not replacement.ahead() and w2.ahead()


@pytest.mark.parametrize("held,other,ahead", [(2, 0, True), (3, 1, True), (11, 9, False),
                                               (12, 8, True), (25, 20, False), (26, 20, True)])
def test_ahead_means_more_than_one_and_a_tenth_above(held, other, ahead):
    from txmta.tcp import AcceptBalance

    counts = slots(1, 2)
    mine, theirs = AcceptBalance(counts, 0, 0, 2), AcceptBalance(counts, 0, 1, 2)
    for _ in range(held):
        mine.opened()
    for _ in range(other):
        theirs.opened()
    assert mine.ahead() is ahead


def test_a_worker_ahead_of_another_leaves_the_connection_then_takes_it_if_still_waiting():
    from txmta.tcp import AcceptBalance

    counts = slots(1, 2)
    mine, other = AcceptBalance(counts, 0, 0, 2), AcceptBalance(counts, 0, 1, 2)
    with shared_port(5, balance=mine) as (reactor, port, made):
        port.doRead()                       # takes connections until it is ahead: two
        assert len(made) == 2 and mine.held == 2
        port.doRead()                       # ahead of the other worker: leaves the third
        assert len(made) == 2 and port not in reactor.getReaders()
        [call] = [c for c in reactor.getDelayedCalls() if c.func == port._resume]
        assert call.getTime() - reactor.seconds() <= port.YIELD
        call.cancel()
        port._resume()                      # still waiting: taken after all, only that one
        assert port in reactor.getReaders()
        port.doRead()
        assert len(made) == 3 and mine.held == 3
        other.opened(), other.opened(), other.opened()
        port.doRead()                       # even again: the rest at once
        assert len(made) == 5
        made[0].transport.abortConnection()
        for _ in range(5):
            reactor.iterate(0)
        assert mine.held == 4               # a closed one is uncounted
        assert all(isinstance(p.transport, EagerServer) for p in made)


def test_no_connection_is_left_to_a_worker_that_is_not_running():
    from txmta.tcp import AcceptBalance, worker_gone

    counts = slots(2, 2)
    live = [AcceptBalance(counts, listener, 0, 2) for listener in (0, 1)]
    dead = [AcceptBalance(counts, listener, 1, 2) for listener in (0, 1)]
    for b in live:
        for _ in range(5):
            b.opened()
    assert all(b.ahead() for b in live)
    worker_gone(counts, 1, 2)                  # the master saw worker 1 exit
    assert not any(b.ahead() for b in live)
    AcceptBalance(counts, 0, 1, 2)             # its replacement starts on listener 0
    assert live[0].ahead() and not live[1].ahead()
