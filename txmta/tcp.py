"""TCP connections that write at once: listening sockets and outgoing connections.

Twisted's TCP transport never sends inside `write()`: it buffers the bytes, registers the
socket for writing, and sends them on the reactor's next iteration.  An SMTP server answers
one short reply at a time, and most clients (smtp-source, smtplib, every application that
relays through us) wait for each reply before they send the next command, so every reply paid
a full reactor iteration of latency plus two epoll_ctl calls.  `EagerServer.write` sends
straight away when nothing is queued before it and the socket takes all of it; anything else
(a partial send, EAGAIN, an error, TLS) takes Twisted's ordinary buffered path, which keeps
ordering, flow control (producers) and error reporting exactly as they were.  `corked()`
gathers several writes into one (the HTTP API's responses: header lines, then the body).

`TCPServerEndpoint` listens with such connections (the worker gives one to each [[listen]]
table); `AdoptedServerEndpoint` does the same on a socket the master bound and passed down
(`listening_socket()` makes it); `connect()` opens an outgoing one (the delivery side: the pipelined MAIL/RCPT/DATA
group and the message content leave in the same reactor turn that produced them).
"""
# test: tests/test_tcp.py

from __future__ import annotations

import mmap
import os
import socket
import struct
from contextlib import contextmanager
from typing import Any, Iterator

from twisted.internet import defer, tcp
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import ClientFactory
from zope.interface import implementer


class _EagerWrite:
    """Mixed in before a tcp.Connection class: sends in `write()` when it can."""

    _held: list[bytes] | None = None

    @contextmanager
    def corked(self) -> Iterator[None]:
        """Everything written inside the block leaves together at its end, in one `write()`:
        an HTTP response's header lines (which twisted.web writes with `writeSequence`) and
        its body go out in one send instead of waiting for the reactor's next turn."""
        if self._held is not None:
            yield
            return
        self._held = held = []
        try:
            yield
        finally:
            self._held = None
            if held:
                self.write(b"".join(held))

    def writeSequence(self, seq: Any) -> None:
        if self._held is not None:
            self._held.extend(seq)
            return
        super().writeSequence(seq)  # type: ignore[misc]

    def write(self, data: bytes) -> None:
        if self._held is not None:
            self._held.append(data)
            return
        if (not self.TLS and self.connected and not self.disconnecting
                and not self._writeDisconnected and not self.dataBuffer
                and not self._tempDataBuffer and type(data) is bytes):
            try:
                sent = self.socket.send(data)
            except OSError:          # EAGAIN, ENOBUFS, a reset: the buffered path sorts it out
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        super().write(data)  # type: ignore[misc]


class EagerServer(_EagerWrite, tcp.Server):
    """A server-side TCP connection that sends in `write()` when it can."""


class EagerClient(_EagerWrite, tcp.Client):
    """A client-side TCP connection that sends in `write()` when it can."""


class EagerPort(tcp.Port):
    transport = EagerServer


class AcceptBalance:
    """The connections each worker holds on one shared listening socket, counted in memory
    the workers share (`shared_counts`: a memfd the master made, one 8-byte slot per
    listener and worker), so that a worker ahead of another lets it take the next one.
    Each worker writes only its own slot; a replacement worker starts it again at zero."""

    def __init__(self, counts: Any, listener: int, index: int, workers: int) -> None:
        self._counts = counts
        self._slot = 8 * (listener * workers + index)
        self._others = [8 * (listener * workers + k) for k in range(workers) if k != index]
        self.held = 0
        self._store()

    def _store(self) -> None:
        struct.pack_into("<q", self._counts, self._slot, self.held)

    def opened(self) -> None:
        self.held += 1
        self._store()

    def closed(self) -> None:
        self.held -= 1
        self._store()

    def ahead(self) -> bool:
        """Whether this worker holds clearly more connections than another one: more than
        one above it, and more than a tenth of the two together (connections that come and
        go all the time, one per message, vary that much without any imbalance)."""
        held = self.held
        for o in self._others:
            other = struct.unpack_from("<q", self._counts, o)[0]
            if held - other > 1 + (held + other) // 10:
                return True
        return False


def shared_counts(listeners: int, workers: int) -> int | None:
    """A file descriptor of zeroed memory for the AcceptBalance slots of `listeners` x
    `workers`, to pass to every worker (None where memfd_create is missing: no balancing)."""
    create = getattr(os, "memfd_create", None)
    if create is None:
        return None
    fd = create("txmta-accept-balance", 0)         # not close-on-exec: the workers inherit it
    os.ftruncate(fd, max(8, 8 * listeners * workers))
    return fd


def map_counts(fd: int) -> Any:
    """The shared slots of `shared_counts`, mapped in this process."""
    return mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


GONE = 1 << 62      # the count of a worker that is not running: nobody waits for it


def worker_gone(counts: Any, index: int, workers: int) -> None:
    """The master's call when worker `index` exited: until its replacement starts (and
    zeroes its slots), the others do not leave connections to it."""
    for slot in range(index, len(counts) // 8, workers):
        struct.pack_into("<q", counts, 8 * slot, GONE)


class BalancedServer(EagerServer):
    """A connection accepted on a SharedPort: counted in its worker's slot while open."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._balance = self.server.balance
        if self._balance is not None:
            self._balance.opened()

    def connectionLost(self, reason: Any) -> None:
        if self._balance is not None:
            self._balance.closed()
            self._balance = None
        super().connectionLost(reason)


class SharedPort(EagerPort):
    """A listening socket that several worker processes accept on, taking connections only
    while this worker does not hold clearly more than another.

    Twisted's port accepts up to a hundred (and more) whenever it wakes, so the first worker
    to wake took every connection of a burst; with kept connections one worker could serve
    most of the clients while the other idled (the worker on the CPU the clients did not use
    won nearly every race).  Now a worker accepts while it is not ahead (`AcceptBalance`, up
    to `BURST` a wakeup); once ahead, it stops listening for `YIELD` seconds so that the
    others, woken by the same connection, take it, and if the connection still waits when
    the pause ends (the others are busy), it takes it after all.  Without a balance (no
    shared memory) it takes one connection a wakeup (nginx's `multi_accept off`)."""

    transport = BalancedServer
    balance: AcceptBalance | None = None
    YIELD = 0.001
    BURST = 50
    _force = False

    @property
    def numberAccepts(self) -> int:
        return 1

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        pass

    def doRead(self) -> None:
        force, self._force = self._force, False
        balance = self.balance
        if balance is None:
            super().doRead()
            return
        if not force and balance.ahead():
            self.stopReading()
            self.reactor.callLater(self.YIELD, self._resume)
            return
        for _ in range(self.BURST):     # more while they wait and this worker is not ahead
            before = self.sessionno
            super().doRead()
            if self.sessionno == before or balance.ahead():
                return

    def _resume(self) -> None:
        if self.connected and not self.disconnecting:
            self._force = True
            self.startReading()


class _EagerConnector(tcp.Connector):
    def _makeTransport(self) -> EagerClient:
        return EagerClient(self.host, self.port, self.bindAddress, self, self.reactor)


class _Connecting(ClientFactory):
    """Fires `connected` with the protocol once TCP is up, or errbacks with the reason."""

    noisy = False       # no "Starting factory" line in the log for every outgoing connection

    def __init__(self, factory: Any, connected: defer.Deferred[Any]) -> None:
        self.factory = factory
        self.connected = connected

    def buildProtocol(self, addr: Any) -> Any:
        proto = self.factory.buildProtocol(addr)
        if not self.connected.called:
            self.connected.callback(proto)
        return proto

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        if not self.connected.called:
            self.connected.errback(reason)


def connect(reactor: Any, host: str, port: int, factory: Any, timeout: float = 30,
            bind_address: tuple[str, int] | None = None) -> defer.Deferred[Any]:
    """Connect to the IP address `host` (IPv4 or IPv6) with an `EagerClient`; fires with the
    protocol `factory` built, or errbacks (refused, unreachable, timed out).  Cancelling the
    Deferred abandons the attempt."""
    connector: _EagerConnector | None = None

    def cancel(d: defer.Deferred[Any]) -> None:
        d.errback(defer.CancelledError(f"connection to {host}:{port} cancelled"))
        if connector is not None and connector.state == "connecting":
            connector.stopConnecting()      # its UserError finds `d` already fired

    connected: defer.Deferred[Any] = defer.Deferred(cancel)
    connector = _EagerConnector(host, port, _Connecting(factory, connected), timeout,
                                bind_address, reactor)
    connector.connect()
    return connected


@implementer(IStreamServerEndpoint)
class TCPServerEndpoint:
    """Listen on `interface:port` (IPv4 or IPv6) with `EagerServer` connections."""

    def __init__(self, reactor: Any, port: int, backlog: int = 50, interface: str = "") -> None:
        self._reactor = reactor
        self._port = port
        self._backlog = backlog
        self._interface = interface

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        def start() -> Any:
            port = EagerPort(self._port, factory, self._backlog, self._interface, self._reactor)
            port.startListening()
            return port
        return defer.execute(start)


def listening_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A non-blocking TCP socket listening on `host:port` (IPv4 or IPv6, SO_REUSEADDR set, as
    Twisted's own ports do), for the master to bind and the workers to adopt."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


@implementer(IStreamServerEndpoint)
class AdoptedServerEndpoint:
    """Accept with `EagerServer` connections on `fd`, a socket already listening (inherited
    from the master; `shared` with other workers: a `SharedPort`, balanced by `balance` if
    given); `family` is its address family (AF_INET or AF_INET6).  Like
    `reactor.adoptStreamPort`, with our eager connections."""

    def __init__(self, reactor: Any, fd: int, family: int, shared: bool = False,
                 balance: AcceptBalance | None = None) -> None:
        self._reactor = reactor
        self._fd = fd
        self._family = family
        self._port = SharedPort if shared else EagerPort
        self._balance = balance

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        def start() -> Any:
            port = self._port._fromListeningDescriptor(self._reactor, self._fd, self._family,
                                                       factory)
            if self._balance is not None:
                port.balance = self._balance
            port.startListening()
            return port
        return defer.execute(start)
