"""One connection to Valkey/Redis, kept open: reconnects with a growing delay when it drops.

The RESP protocol is txredisapi's `RedisProtocol` (native Twisted: no thread, no blocking
call); connecting, reconnecting, TLS, AUTH and SELECT are done here, with the reactor given
(txredisapi's own connection factories use the global reactor and queue commands while
disconnected; the callers here want an answer now: while the connection is down a command
fails at once with `Unavailable`, and the caller falls back to its local state).

`parse_url` reads `[cluster] redis`: ``redis://[[user]:password@]host[:port][/db]``, and
``rediss://`` for TLS (the server's certificate is checked against `ca_file`, or the
system's trust store, and must name the host).

Knows nothing of what the commands are for (cluster/limits.py, cluster/suppression.py).
"""
# test: tests/test_cluster.py

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.endpoints import (HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint,
                                        wrapClientTLS)
from twisted.internet.protocol import Factory
from twisted.logger import Logger

log = Logger(namespace="txmta.cluster")

DEFAULT_PORT = 6379


class Unavailable(Exception):
    """Redis cannot be asked now (not connected, or it did not answer in time)."""


@dataclass(frozen=True)
class RedisAddress:
    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    def __str__(self) -> str:
        """The address without the password, for logs."""
        scheme = "rediss" if self.tls else "redis"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{self.db}"


def parse_url(url: str) -> RedisAddress:
    """A `RedisAddress` from a redis:// or rediss:// URL; ValueError says what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError('must be a redis:// or rediss:// URL, e.g. "redis://127.0.0.1:6379/0"')
    if not parts.hostname:
        raise ValueError("the URL names no host")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError("the URL's port is not a number 1-65535") from None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError("the URL's path must be a database number, e.g. /0")
    if parts.query or parts.fragment:
        raise ValueError("the URL takes no query or fragment")
    return RedisAddress(parts.hostname, port, int(path or 0),
                        unquote(parts.username) if parts.username else None,
                        unquote(parts.password) if parts.password is not None else None,
                        parts.scheme == "rediss")


def _protocol_class() -> type:
    from txredisapi import RedisProtocol     # imported when a cluster is configured

    class Protocol(RedisProtocol):  # type: ignore[misc,valid-type]
        """txredisapi's protocol on our reactor; tells its `Connection` when it is ready
        (after AUTH and SELECT) and when it is lost."""

        owner: "Connection"

        def connectionMade(self) -> Any:
            d = super().connectionMade()     # no password, no db here: ready at once
            self.owner._made(self)
            return d

        def connectionLost(self, why: Any) -> None:
            super().connectionLost(why)
            self.owner._lost(self)

    return Protocol


class Connection:
    """A connection to `address` that `start()` opens and keeps open until `stop()`.

    `up` says whether commands can be sent; `call(*args)` and `eval(script, keys, args)`
    fire with the reply, or fail with `Unavailable` (not connected; no reply within
    `timeout` seconds, which also drops the connection) or with Redis's error.  `on_up()`
    and `on_down()` run when it comes up (after AUTH and SELECT) and goes down.
    `reply_timeout`: the timeout of replies when it differs from `timeout` (a connection that
    waits in blocking reads)."""

    def __init__(self, address: RedisAddress, reactor: Any, *, timeout: float = 1.0,
                 name: str = "redis", ca_file: str | None = None,
                 reply_timeout: float | None = None,
                 on_up: Callable[[], Any] | None = None,
                 on_down: Callable[[], Any] | None = None) -> None:
        self.address = address
        self.reactor = reactor
        self.timeout = timeout
        self.reply_timeout = reply_timeout if reply_timeout is not None else timeout
        self.name = name
        self.up_listeners: list[Callable[[], Any]] = [on_up] if on_up else []
        self.down_listeners: list[Callable[[], Any]] = [on_down] if on_down else []
        self.protocol: Any = None            # the ready protocol, or None
        self._was_up = False
        self._told_down = False
        self._waiting: list[defer.Deferred[None]] = []
        endpoint: Any
        try:      # an IP address: connected to as it is (no resolver, no thread)
            family = ipaddress.ip_address(address.host).version
        except ValueError:
            endpoint = HostnameEndpoint(reactor, address.host, address.port, timeout=timeout)
        else:
            cls = TCP4ClientEndpoint if family == 4 else TCP6ClientEndpoint
            endpoint = cls(reactor, address.host, address.port, timeout=timeout)
        if address.tls:
            from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust
            if ca_file:
                with open(ca_file, "rb") as f:
                    trust: Any = Certificate.loadPEM(f.read())
            else:
                trust = platformTrust()
            endpoint = wrapClientTLS(optionsForClientTLS(address.host, trustRoot=trust), endpoint)
        protocol_class = _protocol_class()

        def build() -> Any:
            p = protocol_class(charset="utf-8", replyTimeout=self.reply_timeout,
                               convertNumbers=False)
            p.callLater = reactor.callLater      # its reply timeouts on our clock
            p.owner = self
            return p
        self.service = ClientService(endpoint, Factory.forProtocol(build),
                                     retryPolicy=backoffPolicy(initialDelay=0.2, maxDelay=5.0,
                                                               factor=2.0),
                                     clock=reactor)

    @property
    def up(self) -> bool:
        return self.protocol is not None

    def start(self) -> None:
        self.service.startService()

    def stop(self) -> defer.Deferred[None]:
        self.protocol = None
        for d in self._waiting:
            d.cancel()
        self._waiting = []
        return self.service.stopService()

    def when_up(self) -> defer.Deferred[None]:
        """Fires once the connection is (or comes) up."""
        if self.up:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        return d

    # -- commands -------------------------------------------------------------------------

    def call(self, *args: Any) -> defer.Deferred[Any]:
        p = self.protocol
        if p is None:
            return defer.fail(Unavailable(f"not connected to {self.address}"))
        return p.execute_command(*args).addErrback(self._unavailable)

    def eval(self, script: str, keys: list[str], args: list[Any]) -> defer.Deferred[Any]:
        """The Lua `script` by its SHA1 (EVALSHA), loaded with EVAL when Redis lacks it."""
        p = self.protocol
        if p is None:
            return defer.fail(Unavailable(f"not connected to {self.address}"))
        return p.eval(script, keys, args).addErrback(self._unavailable)

    @staticmethod
    def _unavailable(f: Any) -> Any:
        from txredisapi import ConnectionError as RedisConnectionError
        if f.check(RedisConnectionError):     # lost, or no reply in time (a TimeoutError)
            raise Unavailable(str(f.value))
        return f

    # -- the protocol's life ----------------------------------------------------------------

    def _made(self, p: Any) -> None:
        self._setup(p).addCallbacks(lambda _: self._ready(p), lambda f: self._refused(p, f))

    @defer.inlineCallbacks
    def _setup(self, p: Any) -> Any:
        a = self.address
        if a.password is not None:
            args = ["AUTH"] + ([a.username] if a.username else []) + [a.password]
            yield p.execute_command(*args)
        if a.db:
            yield p.execute_command("SELECT", str(a.db))

    def _ready(self, p: Any) -> None:
        if not p.connected:
            return
        self.protocol = p
        self._told_down = False
        log.info("{name}: connected to {address}{again}", name=self.name, address=str(self.address),
                 again=" again" if self._was_up else "")
        self._was_up = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
        for listener in self.up_listeners:
            listener()

    def _refused(self, p: Any, f: Any) -> None:
        log.error("{name}: {address} refused us: {why}", name=self.name,
                  address=str(self.address), why=f.getErrorMessage())
        p.transport.loseConnection()

    def _lost(self, p: Any) -> None:
        if self.protocol is not p:
            return
        self.protocol = None
        if not self._told_down:
            self._told_down = True
            log.warn("{name}: lost the connection to {address}; reconnecting",
                     name=self.name, address=str(self.address))
        for listener in self.down_listeners:
            listener()
