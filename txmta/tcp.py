"""TCP connections that write at once: listening sockets and outgoing connections.

Twisted's TCP transport never sends inside `write()`: it buffers the bytes, registers the
socket for writing, and sends them on the reactor's next iteration.  An SMTP server answers
one short reply at a time, and most clients (smtp-source, smtplib, every application that
relays through us) wait for each reply before they send the next command, so every reply paid
a full reactor iteration of latency plus two epoll_ctl calls.  `EagerServer.write` sends
straight away when nothing is queued before it and the socket takes all of it; anything else
(a partial send, EAGAIN, an error, TLS) takes Twisted's ordinary buffered path, which keeps
ordering, flow control (producers) and error reporting exactly as they were.

`TCPServerEndpoint` listens with such connections (tap.py gives one to each [[listen]]
table); `connect()` opens an outgoing one (the delivery side: the pipelined MAIL/RCPT/DATA
group and the message content leave in the same reactor turn that produced them).
"""
# test: tests/test_tcp.py

from __future__ import annotations

from typing import Any

from twisted.internet import defer, tcp
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import ClientFactory
from zope.interface import implementer


class _EagerWrite:
    """Mixed in before a tcp.Connection class: sends in `write()` when it can."""

    def write(self, data: bytes) -> None:
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
