"""One worker: build every part from the configuration and wire them (DESIGN "Processes").

A worker is the daemon minus listening and supervising: protocol, receiver, queue,
dispatcher, pool, client and its own spool writer thread.  `tap.py` (the master) runs it.
"""
# test: tests/integration/test_daemon.py

from __future__ import annotations

import sys
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.protocols.tls import TLSMemoryBIOFactory

from txmta import config as C
from txmta.inbound.policy import ServerPolicy
from txmta.inbound.protocol import SMTPFactory
from txmta.inbound.receiver import Receiver
from txmta.maillog import FileSink, MailLog
from txmta.queue import Queue
from txmta.spool.lmdb import LmdbSpool
from txmta.tcp import TCPServerEndpoint


class Connector:
    """Opens a connection for a pool key; fires with the client once its session is ready
    (greeting, EHLO, STARTTLS, AUTH), or errbacks SessionFailureError."""

    def __init__(self, reactor: Any, settings_for: Any, connect_timeout: float) -> None:
        self.reactor = reactor
        self.settings_for = settings_for
        self.connect_timeout = connect_timeout

    def __call__(self, key: Any) -> Any:
        from twisted.internet.protocol import Factory

        from txmta.outbound.client import SessionFailure, SessionFailureError, SMTPClient
        from txmta.outcome import CONNECT
        from txmta.reply import Reply
        from txmta.tcp import connect
        bind = (key.source, 0) if key.source else None
        settings = self.settings_for(key)
        factory = Factory.forProtocol(lambda: SMTPClient(settings, self.reactor, key.mx, key.address))
        d = connect(self.reactor, key.address, key.port, factory, self.connect_timeout, bind)

        def connected(client: Any) -> Any:
            return client.ready.addCallback(lambda _: client)

        def failed(f: Any) -> Any:
            if f.check(SessionFailureError):
                return f
            reason = f.getErrorMessage().strip() or f.type.__name__
            raise SessionFailureError(SessionFailure(CONNECT, Reply(
                451, "4.4.1", f"connect to {key.mx}[{key.address}]:{key.port} failed: {reason}")))

        return d.addCallback(connected).addErrback(failed)


class DeliveryService(service.Service):
    """Starts the dispatcher; on stop, lets busy connections finish for up to `grace`
    seconds (what is still in flight then is simply due again at the next start)."""

    def __init__(self, dispatcher: Any, pool: Any, reactor: Any, grace: float = 10.0,
                 tls_policy: Any = None) -> None:
        self.dispatcher = dispatcher
        self.pool = pool
        self.reactor = reactor
        self.grace = grace
        self.tls_policy = tls_policy     # reloaded on SIGHUP (TLSPolicyReload)

    def startService(self) -> None:
        service.Service.startService(self)
        self.dispatcher.start()

    def stopService(self) -> Any:
        from twisted.internet.defer import gatherResults
        service.Service.stopService(self)
        d = gatherResults([self.dispatcher.stop(), self.pool.close()])
        d.addTimeout(self.grace, self.reactor)
        return d.addErrback(lambda _: None)


def build_tls_policy(cfg: C.Config, reactor: Any, resolver: Any, cache_store: Any) -> Any:
    """The outbound TLS policy: [[tls.policy]], [delivery] tls_level and relayhost_tls, the CA
    certificates of [tls] ca_file (or the system's), MTA-STS cached in the spool."""
    from txmta.outbound import tlspolicy as T
    trust = T.Trust(cfg.tls.ca_file)
    sts = T.STSResolver(reactor, resolver, T.STSFetcher(reactor, resolver, trust.web_trust_root()),
                        T.STSCache(reactor, cache_store))
    return T.TLSPolicy(reactor, resolver, trust=trust, sts=sts, level_for=cfg.tls.level_for,
                       default=cfg.delivery.tls_level, relay_level=cfg.delivery.relayhost_tls)


def build_delivery(cfg: C.Config, reactor: Any, queue: Queue,
                   cache_store: Any = None) -> DeliveryService:
    from txmta.dispatch import Dispatcher
    from txmta.outbound.client import ClientSettings
    from txmta.outbound.deliverer import Deliverer
    from txmta.outbound.dns import Resolver, parse_nameserver
    from txmta.outbound.pool import ConnectionPool
    from txmta.outbound.route import Router
    from txmta.outbound.tlspolicy import MayFallback
    d = cfg.delivery
    resolver = Resolver(reactor, [parse_nameserver(n) for n in cfg.dns.nameservers] or None)
    # an MX at one of our own listening addresses (on the SMTP port) is a loop
    local_addresses = {lst.host for lst in cfg.listen
                       if lst.port == d.smtp_port and lst.host not in ("0.0.0.0", "::")}
    router = Router(resolver, relayhost=d.relayhost, local_names={cfg.server.hostname},
                    local_addresses=local_addresses, port=d.smtp_port)
    helo = d.helo_name or cfg.server.hostname
    auth = None
    if d.relayhost_username and d.relayhost_password_file:
        with open(d.relayhost_password_file, encoding="utf-8") as f:
            auth = (d.relayhost_username, f.readline().rstrip("\r\n"))
    relay_key = f"relay:{d.relayhost}"

    tls_policy = build_tls_policy(cfg, reactor, resolver, cache_store)

    def settings_for(key: Any) -> ClientSettings:
        if key.destination == relay_key:
            # a password goes over plaintext only when relayhost_tls = "none" says so
            base = ClientSettings(helo_name=key.helo, auth=auth,
                                  allow_plaintext_auth=d.relayhost_tls == "none")
        else:
            base = ClientSettings(helo_name=key.helo)
        return tls_policy.client_settings(key.tls, key.mx, base, connect.plaintext(key))

    connect = MayFallback(reactor, Connector(reactor, settings_for, d.connect_timeout))
    pool = ConnectionPool(reactor, connect,
                          per_destination=d.max_per_destination, total=d.max_connections,
                          max_messages_per_connection=d.max_messages_per_connection,
                          idle_timeout=d.idle_timeout,
                          initial_per_destination=d.initial_per_destination)
    deliverer = Deliverer(router, pool, helo=helo, source=d.source_address,
                          tls_level="may", relay_tls=d.relayhost_tls, tls_policy=tls_policy)
    dispatcher = Dispatcher(queue, deliverer, reactor, max_inflight=d.max_inflight)
    return DeliveryService(dispatcher, pool, reactor, tls_policy=tls_policy)


class QueueService(service.Service):
    """Loads the suppression list at start; forgets finished messages past the retention."""

    def __init__(self, queue: Queue, reactor: Any, retention: float) -> None:
        self.queue = queue
        self.reactor = reactor
        self.retention = retention
        self._loop: Any = None

    def startService(self) -> None:
        from twisted.internet.task import LoopingCall
        service.Service.startService(self)
        self.queue.load_suppressions().addErrback(
            lambda f: f.printTraceback() if f else None)
        self._loop = LoopingCall(self._expire)
        self._loop.clock = self.reactor
        self._loop.start(600, now=False)

    def _expire(self) -> Any:
        return self.queue.expire_history(self.retention).addErrback(lambda f: None)

    def stopService(self) -> Any:
        service.Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()


class SpoolService(service.Service):
    def __init__(self, spool: LmdbSpool) -> None:
        self.spool = spool

    def stopService(self) -> Any:
        service.Service.stopService(self)
        return self.spool.close()


def maillog_for(cfg: C.Config, reactor: Any) -> MailLog:
    """The mail log: into the daemon's log, or its own file (text or JSON lines)."""
    if not cfg.log.maillog:
        return MailLog()
    out = sys.stdout if cfg.log.maillog == "-" else open(cfg.log.maillog, "a", encoding="utf-8")
    sink = FileSink(out, reactor, cfg.log.format)
    reactor.addSystemEventTrigger("after", "shutdown", sink.close)
    return MailLog(sink)


def build_reload(cfg: C.Config, reactor: Any, parts: list[Any]) -> service.Service:
    """SIGHUP re-reads cfg.path and offers it to `parts`: the inbound TLS context, the DKIM
    keys, the outbound TLS policy tables."""
    from twisted.internet.threads import deferToThreadPool

    from txmta.reload import ReloadService
    return ReloadService(reactor, cfg.path, parts,
                         run_in_thread=lambda f: deferToThreadPool(reactor, reactor.getThreadPool(), f))


def signing_for(cfg: C.Config, reactor: Any) -> tuple[Any, Any]:
    """DKIM: the signer (keys read now: a bad key file is a ConfigError; None without
    [[dkim]]) and the function that runs intake signing on its own thread pool (DSNs are
    signed on the spool's writer thread, in the transaction that commits them).  The pool
    exists even without keys (no thread runs until one is needed), so that a SIGHUP that adds
    [[dkim]] tables has somewhere to sign."""
    from functools import partial

    from twisted.internet.threads import deferToThreadPool
    from twisted.python.threadpool import ThreadPool

    signer = None
    if cfg.dkim:
        from txmta.dkim import Signer
        signer = Signer.from_config(cfg)
    pool = ThreadPool(minthreads=0, maxthreads=2, name="txmta-dkim")
    reactor.callWhenRunning(pool.start)
    reactor.addSystemEventTrigger("after", "shutdown", pool.stop)
    return signer, partial(deferToThreadPool, reactor, pool)


class SigningReload:
    """SIGHUP part: the [[dkim]] keys and [signing] default_domain, read anew (a bad key file
    keeps the running keys).  A message already being received keeps the keys it began with."""

    name = "dkim"

    def __init__(self, receiver: Any, queue: Queue) -> None:
        self.receiver = receiver
        self.queue = queue

    def prepare(self, cfg: C.Config) -> Any:
        signer = None
        if cfg.dkim:
            from txmta.dkim import Signer
            signer = Signer.from_config(cfg)      # reads the key files: ConfigError if bad

        def install() -> str:
            self.receiver.signer = signer
            self.queue.sign_report = signer.sign_message if signer is not None else None
            keys = ", ".join(f"{k.selector}._domainkey.{k.domain} ({k.algorithm})" for k in cfg.dkim)
            return f"signing with {keys}" if keys else "no [[dkim]] keys: mail is not signed"
        return install


class TLSPolicyReload:
    """SIGHUP part: the outbound [[tls.policy]] tables and [delivery] tls_level (new
    connections use them; [tls] ca_file and relayhost_tls need a restart)."""

    name = "tls policy"

    def __init__(self, policy: Any) -> None:
        self.policy = policy

    def prepare(self, cfg: C.Config) -> Any:
        def install() -> str:
            self.policy.level_for = cfg.tls.level_for
            self.policy.default = cfg.delivery.tls_level
            return (f"tls_level {cfg.delivery.tls_level}, "
                    f"{len(cfg.tls.policy)} [[tls.policy]] table(s)")
        return install


def build(cfg: C.Config, reactor: Any) -> service.MultiService:
    tls = None
    if cfg.tls.cert and cfg.tls.key:   # one reloadable context for STARTTLS and implicit TLS
        from txmta.inbound.tlscontext import ServerTLS, load_server_context
        tls = ServerTLS(load_server_context(cfg.tls, cfg.path))   # ConfigError before the spool opens
    top = service.MultiService()
    signer, run_signing = signing_for(cfg, reactor)
    spool = LmdbSpool(cfg.spool.path, reactor, map_size=cfg.spool.map_size,
                      max_map_size=cfg.spool.max_map_size,
                      inline_limit=cfg.spool.inline_body_limit)
    SpoolService(spool).setServiceParent(top)
    from txmta.categories import Classifier
    queue = Queue(spool, reactor, maillog_for(cfg, reactor), schedule=cfg.retry.schedule,
                  max_lifetime=cfg.retry.max_lifetime, hostname=cfg.server.hostname,
                  delay_warning=cfg.dsn.delay_warning,
                  classifier=Classifier(extra=cfg.bounce.rules),
                  suppress_categories=cfg.suppression.categories,
                  suppression_ttl=cfg.suppression.ttl)
    queue.drop_suppressed = cfg.suppression.action == "drop"
    QueueService(queue, reactor, cfg.history.retention).setServiceParent(top)
    queue.sign_report = signer.sign_message if signer is not None else None
    receiver = Receiver(queue, cfg.server.hostname, reactor, signer, run_signing)
    checker = None
    if cfg.auth.users:
        from txmta.inbound.auth import UsersFileChecker
        from txmta.passwords import load_users
        checker = UsersFileChecker(load_users(cfg.auth.users), reactor, reactor.getThreadPool())
    policy = ServerPolicy(
        hostname=cfg.server.hostname, relay_networks=tuple(cfg.relay.networks),
        max_message_size=cfg.spool.max_message_size, max_recipients=cfg.server.max_recipients,
        max_errors=cfg.server.max_errors, command_timeout=cfg.server.command_timeout,
        data_timeout=cfg.server.data_timeout, tls_available=tls is not None,
        auth_available=checker is not None)
    delivery = build_delivery(cfg, reactor, queue, spool)
    delivery.setServiceParent(top)
    from txmta.control.amp import ControlService, control_socket_path
    ControlService(reactor, control_socket_path(cfg.spool.path), queue).setServiceParent(top)
    parts: list[Any] = [tls] if tls is not None else []
    parts += [SigningReload(receiver, queue), TLSPolicyReload(delivery.tls_policy)]
    build_reload(cfg, reactor, parts).setServiceParent(top)
    counts: dict[str, int] = {}
    for lst in cfg.listen:
        factory: Any = SMTPFactory(policy, lst, receiver, reactor, checker=checker, tls_options=tls,
                                   max_connections=cfg.server.max_connections,
                                   max_per_ip=cfg.server.max_connections_per_ip, counts=counts,
                                   suppression=queue.suppression,
                                   reject_suppressed=cfg.suppression.action == "reject")
        if lst.tls == "implicit":
            factory = TLSMemoryBIOFactory(tls, False, factory)
        endpoint = TCPServerEndpoint(reactor, lst.port, backlog=1024, interface=lst.host)
        StreamServerEndpointService(endpoint, factory).setServiceParent(top)
    return top
