"""TCP listening sockets whose connections write at once.

Twisted's TCP transport never sends inside `write()`: it buffers the bytes, registers the
socket for writing, and sends them on the reactor's next iteration.  An SMTP server answers
one short reply at a time, and most clients (smtp-source, smtplib, every application that
relays through us) wait for each reply before they send the next command, so every reply paid
a full reactor iteration of latency plus two epoll_ctl calls.  `EagerServer.write` sends
straight away when nothing is queued before it and the socket takes all of it; anything else
(a partial send, EAGAIN, an error, TLS) takes Twisted's ordinary buffered path, which keeps
ordering, flow control (producers) and error reporting exactly as they were.

`TCPServerEndpoint` listens with such connections; it is the IStreamServerEndpoint that
tap.py gives each [[listen]] table.
"""
# test: tests/test_tcp.py

from __future__ import annotations

from typing import Any

from twisted.internet import defer, tcp
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer


class EagerServer(tcp.Server):
    """A server-side TCP connection that sends in `write()` when it can."""

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
        super().write(data)


class EagerPort(tcp.Port):
    transport = EagerServer


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
