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

import socket
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
    from the master); `family` is its address family (AF_INET or AF_INET6).  Like
    `reactor.adoptStreamPort`, with our eager connections."""

    def __init__(self, reactor: Any, fd: int, family: int) -> None:
        self._reactor = reactor
        self._fd = fd
        self._family = family

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        def start() -> Any:
            port = EagerPort._fromListeningDescriptor(self._reactor, self._fd, self._family,
                                                      factory)
            port.startListening()
            return port
        return defer.execute(start)
