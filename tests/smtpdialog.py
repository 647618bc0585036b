"""Scripted SMTP dialogues against `SMTPServer` over `StringTransport` (STYLE habit 8).

`Harness` builds the server side (policy, listener, MemorySpool, Queue, Receiver, Clock,
factory); `harness.connect(ip)` returns a `Client` whose `send(bytes)` feeds the protocol
and returns the replies written since the previous call, each as the string
"code enhanced" of its last line ("250 2.1.0"; greeting and EHLO replies carry no enhanced code, RFC 2034 3).
No sockets, no global reactor.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from txmta.inbound.policy import ServerPolicy
from txmta.inbound.protocol import SMTPFactory, SMTPServer
from txmta.inbound.receiver import Receiver
from txmta.queue import Queue
from txmta.spool.memory import MemoryBodyWriter, MemorySpool
from txmta.message import StoredMessage

HOSTNAME = "mx.example.net"
REMOTE_IP = "192.0.2.10"        # not in relay_networks
RELAY_IP = "198.51.100.7"       # in relay_networks
LOOPBACK_IP = "127.0.0.1"

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")


@dataclass
class Listener:
    """The listener settings `SMTPFactory` reads."""

    address: str = "0.0.0.0:25"
    tls: str = "none"              # none | starttls | implicit
    auth: str = "none"             # none | optional | required
    bare_newlines: str = "reject"  # reject | reject-remote | fix


class FakeTLSHandle:
    """Answers the questions `SMTPServer._note_tls` asks an OpenSSL connection."""

    def get_protocol_version_name(self) -> str:
        return "TLSv1.3"

    def get_cipher_name(self) -> str:
        return "TLS_AES_256_GCM_SHA384"

    def get_cipher_bits(self) -> int:
        return 256


class TLSStringTransport(StringTransport):
    """A StringTransport that records `startTLS` calls instead of negotiating.

    After `startTLS`, `getHandle()` returns a `FakeTLSHandle`, as Twisted's TLS layer
    returns the OpenSSL connection; the test then calls `proto.handshakeCompleted()`.
    """

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.tls_started: list[Any] = []
        self.handle: Any = None

    def startTLS(self, options: Any) -> None:
        self.tls_started.append(options)
        self.handle = FakeTLSHandle()

    def getHandle(self) -> Any:
        return self.handle


class DelayedSpool(MemorySpool):
    """A MemorySpool whose `put` commits only when the test calls `commit()`."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple[Deferred[None], StoredMessage, MemoryBodyWriter, Any]] = []

    def put(self, message: StoredMessage, body: MemoryBodyWriter,  # type: ignore[override]
            outbox: Any = ()) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.pending.append((d, message, body, outbox))
        return d

    def commit(self) -> None:
        d, message, body, outbox = self.pending.pop(0)
        inner = MemorySpool.put(self, message, body, outbox)
        inner.chainDeferred(d)


class FakeChecker:
    """A credentials checker whose answers the test fires by hand (or at once)."""

    def __init__(self, users: dict[str, str] | None = None, immediate: bool = True) -> None:
        self.users = users or {}
        self.immediate = immediate
        self.requests: list[tuple[Any, Deferred[str]]] = []

    def requestAvatarId(self, creds: Any) -> Deferred[str]:
        from twisted.cred.error import UnauthorizedLogin
        d: Deferred[str] = Deferred()
        self.requests.append((creds, d))
        if self.immediate:
            if self.users.get(creds.username) == creds.password:
                d.callback(creds.username)
            else:
                d.errback(UnauthorizedLogin())
        return d


def parse_replies(data: bytes) -> list[str]:
    """Group the server output into replies; each becomes "code enhanced" of its last line."""
    out: list[str] = []
    for line in data.decode("utf-8").split("\r\n")[:-1]:
        assert len(line) >= 3 and line[:3].isdigit(), f"not a reply line: {line!r}"
        if len(line) > 3 and line[3] == "-":
            continue
        words = line[4:].split(" ", 1)
        code = line[:3]
        out.append(f"{code} {words[0]}" if _ENHANCED.match(words[0]) else code)
    assert data.endswith(b"\r\n") or not data, f"partial reply line: {data!r}"
    return out


def ehlo_keywords(data: bytes) -> list[str]:
    """The extension lines of the last 250 EHLO reply in `data` (without the greeting line)."""
    lines = data.decode().split("\r\n")
    start = max(i for i, l in enumerate(lines) if l.startswith("250-") and " Hello " in l)
    kws = []
    for line in lines[start + 1:]:
        kws.append(line[4:])
        if line[3] == " ":
            break
    return kws


class Client:
    def __init__(self, harness: "Harness", ip: str, transport: TLSStringTransport) -> None:
        self.harness = harness
        self.ip = ip
        self.transport = transport
        self.proto: SMTPServer = harness.factory.buildProtocol(transport.getPeer())
        self._seen = 0
        self.proto.makeConnection(transport)
        self.greeting = self.replies()     # the 220 (or 421) written on connect

    def raw(self) -> bytes:
        """The output written since the previous `send`/`raw`/`replies` call."""
        value = self.transport.value()
        new, self._seen = value[self._seen:], len(value)
        return new

    def replies(self) -> list[str]:
        return parse_replies(self.raw())

    def send(self, data: bytes) -> list[str]:
        self.proto.dataReceived(data)
        return self.replies()

    def ehlo(self, name: str = "client.example") -> list[str]:
        out = self.raw()
        self.proto.dataReceived(f"EHLO {name}\r\n".encode())
        out = self.raw()
        assert parse_replies(out) == ["250"], out
        return ehlo_keywords(out)

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    def complete_tls(self) -> None:
        """Pretend the TLS handshake after STARTTLS finished."""
        assert self.transport.tls_started, "STARTTLS was not started"
        self.proto.handshakeCompleted()

    def disconnect(self) -> None:
        self.proto.connectionLost()


@dataclass
class Harness:
    listener: Listener = field(default_factory=Listener)
    policy: ServerPolicy = field(default_factory=lambda: ServerPolicy(
        hostname=HOSTNAME, relay_networks=(ipaddress.ip_network("198.51.100.0/24"),)))
    spool: MemorySpool = field(default_factory=MemorySpool)
    checker: Any = None
    tls_options: Any = None
    max_connections: int = 1000
    max_per_ip: int = 50

    def __post_init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.queue = Queue(self.spool, self.clock)
        self.receiver = Receiver(self.queue, HOSTNAME, self.clock)
        self.factory = SMTPFactory(self.policy, self.listener, self.receiver, self.clock,
                                   checker=self.checker, tls_options=self.tls_options,
                                   max_connections=self.max_connections, max_per_ip=self.max_per_ip)

    def connect(self, ip: str = REMOTE_IP, port: int = 5555, tls: bool = False,
                handshake: bool = True) -> Client:
        """A new connection from `ip`; with `tls`, as if TLS was already up (implicit TLS):
        the handshake completes at once unless `handshake` is False."""
        addr = IPv6Address("TCP", ip, port) if ":" in ip else IPv4Address("TCP", ip, port)
        transport = TLSStringTransport(peerAddress=addr)
        if tls:
            transport.handle = FakeTLSHandle()
        client = Client(self, ip, transport)
        if tls and handshake:
            client.proto.handshakeCompleted()
        return client

    def stored(self) -> list[tuple[StoredMessage, bytes]]:
        """What the spool holds, in arrival order."""
        return [(self.spool.messages[k], self.spool.bodies[k]) for k in sorted(self.spool.messages)]
