"""One worker: build every part from the configuration and wire them (DESIGN "Processes").

A worker is the daemon minus listening and supervising: protocol, receiver, queue,
dispatcher, pool, client and its own spool writer thread.  With `[server] workers = 1`
`tap.py` builds one in the twistd process itself; with more, the master (tap.py) starts
each as `python -m txmta.worker --config FILE --index K --workers N --fds FD,... --master PID`
with the listening sockets it bound as inherited file descriptors (adopted here, not bound),
its AMP channel as file descriptor 3, and its log lines on stdout for the master to re-log.
A worker whose master died before it asked for the parent-death signal does not start.

Worker K of N owns the spool partitions `partition.owned(K, N)`: a replacement of a dead
worker K owns the same ones and delivers their mail.  The per-destination and connection
limits are divided among the workers (`divide_limits`).  The spool is opened only here,
after the process started (never across fork); privileges are dropped before that.
"""
# test: tests/integration/test_daemon.py, tests/integration/test_workers.py, tests/test_worker.py

from __future__ import annotations

import dataclasses
import math
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.protocols.tls import TLSMemoryBIOFactory

from txmta import config as C
from txmta import events
from txmta.inbound.policy import ServerPolicy
from txmta.inbound.protocol import SMTPFactory
from txmta.inbound.receiver import Receiver
from txmta.maillog import FileSink, MailLog, SyslogSink, open_file
from txmta.queue import Queue
from txmta.spool.lmdb import LmdbSpool
from txmta.tcp import AcceptBalance, AdoptedServerEndpoint, TCPServerEndpoint


class Connector:
    """Opens a connection for a pool key; fires with the client once its session is ready
    (greeting, EHLO, STARTTLS, AUTH), or errbacks SessionFailureError."""

    def __init__(self, reactor: Any, settings_for: Any, connect_timeout: float,
                 metrics: Any = None) -> None:
        self.reactor = reactor
        self.settings_for = settings_for
        self.connect_timeout = connect_timeout
        self.metrics = metrics

    def __call__(self, key: Any) -> Any:
        from twisted.internet.protocol import Factory

        from txmta.outbound.client import SessionFailure, SessionFailureError, SMTPClient
        from txmta.outcome import CONNECT
        from txmta.reply import Reply
        from txmta.tcp import connect
        bind = (key.source, 0) if key.source else None
        settings = self.settings_for(key)
        factory = Factory.forProtocol(lambda: SMTPClient(settings, self.reactor, key.mx, key.address))
        factory.noisy = False
        d = connect(self.reactor, key.address, key.port, factory, self.connect_timeout, bind)

        def connected(client: Any) -> Any:
            if self.metrics is not None:
                level = str(getattr(key.tls, "level", key.tls) or "none")
                self.metrics.outbound_opened(level)
                client.on_lost = lambda: self.metrics.outbound_closed(level)
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
                 tls_policy: Any = None, relays: Any = None) -> None:
        self.dispatcher = dispatcher
        self.pool = pool
        self.reactor = reactor
        self.grace = grace
        self.tls_policy = tls_policy     # reloaded on SIGHUP (TLSPolicyReload)
        self.relays = relays             # the RelayDeliverer, with relayhosts (for status)

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
                   cache_store: Any = None, metrics: Any = None,
                   limiter: Any = None, leases: Any = None) -> DeliveryService:
    """`limiter`: where the [[shaping]] rates are drawn from (the cluster's shared one), or
    None for this process's own; `leases`: the cluster's connection leases for the
    [[shaping]] rules' connections, or None for this process's own count."""
    from txmta.categories import Classifier
    from txmta.dispatch import Dispatcher
    from txmta.outbound.client import ClientSettings, session_timeouts
    from txmta.outbound.deliverer import Deliverer
    from txmta.outbound.dns import Resolver, parse_nameserver
    from txmta.outbound.ippool import Source, SourceSelector
    from txmta.outbound.shaping import Shaper
    from txmta.outbound.pool import ConnectionPool
    from txmta.outbound.route import Router
    from txmta.outbound.tlspolicy import MayFallback
    d = cfg.delivery
    resolver = Resolver(reactor, [parse_nameserver(n) for n in cfg.dns.nameservers] or None)
    # an MX at one of our own listening addresses (on the SMTP port) is a loop
    local_addresses = {lst.host for lst in cfg.listen
                       if lst.port == d.smtp_port and lst.host not in ("0.0.0.0", "::")}

    def router(relayhost: str = "") -> Router:
        return Router(resolver, relayhost=relayhost, local_names={cfg.server.hostname},
                      local_addresses=local_addresses, port=d.smtp_port)

    helo = d.helo_name or cfg.server.hostname
    # each relayhost's AUTH, by the destination of its pool keys ("relay:<relayhost>")
    relay_auth: dict[str, tuple[tuple[str, str] | None, bool]] = {}
    for relay in d.relayhosts:
        auth = None
        if relay.username and relay.password_file:
            with open(relay.password_file, encoding="utf-8") as f:
                auth = (relay.username, f.readline().rstrip("\r\n"))
        # a password goes over plaintext only when the relay's tls = "none" says so
        relay_auth[f"relay:{relay.spec}"] = (auth, relay.tls == "none")

    tls_policy = build_tls_policy(cfg, reactor, resolver, cache_store)

    timeouts = session_timeouts(d.command_timeout, d.data_init_timeout, d.data_xfer_timeout,
                                d.data_done_timeout)

    def settings_for(key: Any) -> ClientSettings:
        if key.destination in relay_auth:
            auth, plaintext_auth = relay_auth[key.destination]
            base = ClientSettings(helo_name=key.helo, auth=auth,
                                  allow_plaintext_auth=plaintext_auth, timeouts=timeouts)
        else:
            base = ClientSettings(helo_name=key.helo, timeouts=timeouts)
        return tls_policy.client_settings(key.tls, key.mx, base, connect.plaintext(key))

    connect = MayFallback(reactor, Connector(reactor, settings_for, d.connect_timeout, metrics))
    shaper = (Shaper(cfg.shaping, reactor.seconds, limiter=limiter, metrics=metrics)
              if cfg.shaping else None)
    if shaper is not None:
        queue.add_status("providers", shaper.status)
    pool = ConnectionPool(reactor, connect,
                          per_destination=d.max_per_destination, total=d.max_connections,
                          max_messages_per_connection=d.max_messages_per_connection,
                          idle_timeout=d.idle_timeout,
                          initial_per_destination=d.initial_per_destination, lanes=cfg.lanes,
                          shaper=shaper, leases=leases)
    rules = Classifier(extra=cfg.bounce.rules)
    # where connections come from: the [[pool]] addresses, else [delivery] source_address
    sources = SourceSelector(reactor, cfg.pools, fallback=Source(d.source_address, helo))
    by_mx = Deliverer(router(), pool, helo=helo, source=d.source_address,
                      tls_level="may", tls_policy=tls_policy, rules=rules, sources=sources,
                      shaper=shaper)
    deliverer: Any = by_mx
    relays = None
    if len(d.relayhosts) > 1 or (d.relayhosts and d.fallback == "mx"):
        # failover: circuits where there is somewhere else to go
        relays = build_relays(cfg, reactor, router, pool, helo, rules, metrics,
                              fallback=by_mx if d.fallback == "mx" else None,
                              sources=sources, shaper=shaper)
        queue.events.subscribe(relays.heard, events.RetryNow)
        deliverer = relays
    elif d.relayhosts:     # one relayhost: all mail to it, as it always was
        from txmta.outbound.relays import RelayTLS
        [relay] = d.relayhosts
        deliverer = Deliverer(router(relay.spec), pool, helo=helo, source=d.source_address,
                              relay_tls=relay.tls, tls_policy=RelayTLS(relay.tls), rules=rules,
                              sources=sources, shaper=shaper)
    dispatcher = Dispatcher(queue, deliverer, reactor, max_inflight=d.max_inflight,
                            metrics=metrics, lanes=cfg.lanes)
    queue.events.subscribe(dispatcher.heard, *Dispatcher.HEARS)
    return DeliveryService(dispatcher, pool, reactor, tls_policy=tls_policy, relays=relays)


def build_relays(cfg: C.Config, reactor: Any, router: Any, pool: Any, helo: str, rules: Any,
                 metrics: Any, fallback: Any = None, sources: Any = None,
                 shaper: Any = None) -> Any:
    """The relayhosts of [delivery] relayhost, in order, each with its own router, TLS level
    and circuit ([delivery] relay_failures, relay_failure_window, relay_cooldown,
    relay_max_cooldown), behind one `RelayDeliverer`."""
    from txmta.outbound.circuit import Circuit
    from txmta.outbound.deliverer import Deliverer
    from txmta.outbound.relays import Relay, RelayDeliverer, RelayTLS
    d = cfg.delivery
    relays = [Relay(r.name, r.spec,
                    Deliverer(router(r.spec), pool, helo=helo, source=d.source_address,
                              relay_tls=r.tls, tls_policy=RelayTLS(r.tls), rules=rules,
                              sources=sources, shaper=shaper),
                    Circuit(reactor, failures=d.relay_failures, window=d.relay_failure_window,
                            cooldown=d.relay_cooldown, max_cooldown=d.relay_max_cooldown))
              for r in d.relayhosts]
    return RelayDeliverer(relays, reactor, fallback=fallback, rules=rules, metrics=metrics)


class WithRelayStatus:
    """The queue's admin face, whose `status` also has each relayhost's circuit ("relays":
    this worker's, in order; see outbound/relays.py)."""

    def __init__(self, queue: Any, relays: Any) -> None:
        self.queue = queue
        self.relays = relays

    def __getattr__(self, name: str) -> Any:
        return getattr(self.queue, name)

    def status(self) -> Any:
        return self.queue.status().addCallback(
            lambda status: {**status, "relays": self.relays.snapshot()})


class QueueService(service.Service):
    """Loads the suppression list at start; every 10 minutes forgets finished messages and
    outbox entries past the retention, and idempotency keys (the HTTP API's and the SMTP
    intake's duplicate check, one index) past the longer of their windows."""

    def __init__(self, queue: Queue, reactor: Any, retention: float,
                 idempotency_window: float = 86400.0) -> None:
        self.queue = queue
        self.reactor = reactor
        self.retention = retention
        self.idempotency_window = idempotency_window
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
        before = self.reactor.seconds() - self.idempotency_window
        self.queue.idempotent_trim(before).addErrback(lambda f: None)
        return self.queue.expire_history(self.retention).addErrback(lambda f: None)

    def stopService(self) -> Any:
        service.Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()


class QueueSamplerService(service.Service):
    """Runs the metrics' queue sampler (depth and oldest age, every 15 s) while running."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler

    def startService(self) -> None:
        service.Service.startService(self)
        self.sampler.start()

    def stopService(self) -> Any:
        service.Service.stopService(self)
        self.sampler.stop()


class SpoolService(service.Service):
    def __init__(self, spool: LmdbSpool) -> None:
        self.spool = spool

    def stopService(self) -> Any:
        service.Service.stopService(self)
        return self.spool.close()


def maillog_for(cfg: C.Config, reactor: Any, worker: int | None = None) -> MailLog:
    """The mail log: into the daemon's log, syslog (facility mail), standard output or its
    own file (text or JSON lines; reopened by `MailLog.reopen`); with several workers each
    worker appends to it and each line names its `worker`."""
    where = cfg.log.maillog
    if not where:
        return MailLog()
    if where == "syslog":
        return MailLog(SyslogSink(worker, cfg.log.format))
    if where == "-":
        sink = FileSink(sys.stdout, reactor, cfg.log.format, worker=worker)
    else:
        try:
            out = open_file(where)
        except OSError as e:
            raise C.ConfigError(f"{cfg.path or '<defaults>'}: log.maillog = \"{where}\": "
                                f"cannot open: {e.strerror or e}") from None
        sink = FileSink(out, reactor, cfg.log.format, worker=worker, path=where)
    reactor.addSystemEventTrigger("after", "shutdown", sink.close)
    return MailLog(sink)


class ReopenService(service.Service):
    """SIGUSR1: `reopen()` (the mail log file, after logrotate renamed it), then whatever
    handled SIGUSR1 before (twistd's own log file rotation, when it has one)."""

    def __init__(self, reactor: Any, reopen: Callable[[], None]) -> None:
        self.reactor = reactor
        self.reopen = reopen
        self._previous: Any = None
        self._installed = False

    def startService(self) -> None:
        service.Service.startService(self)
        self.reactor.callWhenRunning(self._install)   # after twistd's handlers

    def _install(self) -> None:
        if self.running and not self._installed:
            self._previous = signal.signal(signal.SIGUSR1, self._on_signal)
            self._installed = True

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reopen)
        if callable(self._previous):
            self._previous(signum, frame)

    def stopService(self) -> Any:
        service.Service.stopService(self)
        if self._installed:
            signal.signal(signal.SIGUSR1, self._previous if self._previous is not None
                          else signal.SIG_DFL)
            self._installed = False
        return None


def build_reload(cfg: C.Config, reactor: Any, parts: list[Any],
                 reopen: Callable[[], None] | None = None) -> service.Service:
    """SIGHUP re-reads cfg.path and offers it to `parts`: the inbound TLS context, the DKIM
    keys, the outbound TLS policy tables; first it calls `reopen` (the mail log file)."""
    from twisted.internet.threads import deferToThreadPool

    from txmta.reload import ReloadService
    return ReloadService(reactor, cfg.path, parts,
                         run_in_thread=lambda f: deferToThreadPool(reactor, reactor.getThreadPool(), f),
                         reopen=reopen)


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
            self.queue.set_sign_report(signer.sign_message if signer is not None else None)
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


def share(value: int, workers: int) -> int:
    """One worker's share of a limit: ceil(value / workers), at least 1."""
    return max(1, math.ceil(value / workers))


def divide_limits(cfg: C.Config, workers: int) -> C.Config:
    """`cfg` with the limits that hold for the whole daemon divided among `workers`:
    [server] max_connections; [delivery] max_per_destination, initial_per_destination,
    max_connections, max_inflight; each [[shaping]] rule's connections and rate (not with
    [cluster] redis: every worker of every node draws from one shared budget of units and
    of connection leases, and while Redis is down the limiter and the leases themselves
    give each worker 1 / (nodes x workers) of the limit).

    Not [server] max_connections_per_ip: each worker holds it for its own connections.  The
    kernel gives a new connection to whichever worker accepts first, so one client's
    connections are not spread evenly; a divided share refused a client with 20
    connections (a share of 25 of 50) when most of them landed on one worker."""
    if workers == 1:
        return cfg
    server = dataclasses.replace(
        cfg.server, max_connections=share(cfg.server.max_connections, workers))
    d = cfg.delivery
    delivery = dataclasses.replace(
        d, max_per_destination=share(d.max_per_destination, workers),
        initial_per_destination=share(d.initial_per_destination, workers),
        max_connections=share(d.max_connections, workers),
        max_inflight=share(d.max_inflight, workers))
    shaping = tuple(dataclasses.replace(
        rule, connections=(rule.connections if cfg.cluster.redis or not rule.connections
                           else share(rule.connections, workers)),
        rate=rule.rate if cfg.cluster.redis else rule.rate / workers) for rule in cfg.shaping)
    return dataclasses.replace(cfg, server=server, delivery=delivery, shaping=shaping)


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listening(reactor: Any, factory: Any, listener: Any, tls: Any, fd: int | None,
              workers: int = 1, balance: Any = None) -> StreamServerEndpointService:
    """The service of one [[listen]] or [[http]] listener: `factory` on the socket `fd` the
    master bound (None: bound here, at the listener's host and port), inside TLS from the
    first byte when the listener's tls is "implicit".  With several `workers` sharing the
    socket, each accepts one connection per wakeup, and `balance` (a tcp.AcceptBalance)
    keeps their numbers of connections even (txmta.tcp.SharedPort)."""
    if listener.tls == "implicit":
        factory = TLSMemoryBIOFactory(tls, False, factory)
    endpoint: Any
    if fd is not None:
        endpoint = AdoptedServerEndpoint(reactor, fd, family_of(listener.host),
                                         shared=workers > 1, balance=balance)
    else:
        endpoint = TCPServerEndpoint(reactor, listener.port, backlog=1024,
                                     interface=listener.host)
    return StreamServerEndpointService(endpoint, factory)


def build(cfg: C.Config, reactor: Any, *, worker: int = 0, workers: int = 1,
          inherited: Sequence[int] | None = None, channel: Any = None,
          accept_counts: Any = None) -> service.MultiService:
    """Every part of worker `worker` of `workers`, as one service.  `inherited`: the
    listening sockets (file descriptors, one per [[listen]] table, then one per [[http]]
    table, in order) the master bound; without them the worker binds its listeners itself.  `channel`: its
    `control.channel.WorkerChannel` to the master, which then answers the admin commands
    (the master serves the control socket) and hears of this worker's suppressions.
    `accept_counts`: the workers' shared connection counts (tcp.map_counts), to balance the
    listening sockets they share."""
    from txmta import metrics as M
    from txmta import partition
    cfg = divide_limits(cfg, workers)
    # Prometheus series: every process writes its own files into one directory of the
    # spool, which the master (or, alone, this process) empties at start
    metrics_dir = os.path.join(cfg.spool.path, "metrics")
    if workers == 1:
        M.prepare_directory(metrics_dir)
    M.setup_multiprocess(metrics_dir, worker)
    metrics = M.Metrics(listeners=M.listener_labels(cfg.listen, cfg.http),
                        endpoints=M.API_ENDPOINTS, lanes=[lane.name for lane in cfg.lanes],
                        providers=[rule.name for rule in cfg.shaping],
                        relays=[r.name for r in cfg.delivery.relayhosts])
    # the partitions this worker takes new ids from and delivers
    owned_partitions = partition.owned(worker, workers)
    tls = None
    if cfg.tls.cert and cfg.tls.key:   # one reloadable context for STARTTLS and implicit TLS
        from txmta.inbound.tlscontext import ServerTLS, load_server_context
        tls = ServerTLS(load_server_context(cfg.tls, cfg.path))   # ConfigError before the spool opens
    top = service.MultiService()
    signer, run_signing = signing_for(cfg, reactor)
    spool = LmdbSpool(cfg.spool.path, reactor, map_size=cfg.spool.map_size,
                      max_map_size=cfg.spool.max_map_size,
                      inline_limit=cfg.spool.inline_body_limit, partitions=owned_partitions)
    spool.on_commit = metrics.observe_commit
    SpoolService(spool).setServiceParent(top)
    queue = Queue(spool, reactor, schedule=cfg.retry.schedule,
                  max_lifetime=cfg.retry.max_lifetime, hostname=cfg.server.hostname,
                  delay_warning=cfg.dsn.delay_warning,
                  suppress_categories=cfg.suppression.categories,
                  suppression_ttl=cfg.suppression.ttl,
                  suppression_ttls=dict(cfg.suppression.ttl_by_category),
                  partitions=owned_partitions,
                  sign_report=signer.sign_message if signer is not None else None,
                  drop_suppressed=cfg.suppression.action == "drop", lanes=cfg.lanes)
    # the event stream's subscribers: the mail log here, the dispatcher in build_delivery,
    # the worker's channel below (the queue's suppression mirror subscribes itself)
    maillog = maillog_for(cfg, reactor, worker if workers > 1 else None)
    queue.events.subscribe(maillog.heard, *maillog.HEARS)
    queue.events.subscribe(metrics.heard, *M.Metrics.HEARS)
    QueueSamplerService(M.QueueSampler(metrics, reactor, spool.stats, 15.0)).setServiceParent(top)
    QueueService(queue, reactor, cfg.history.retention,
                 max(cfg.api.idempotency_window, cfg.intake.dedupe_window)).setServiceParent(top)
    if cfg.webhooks:   # deliveries written with the events; sent for this worker's partitions
        from txmta.webhooks import service as webhooks
        hooks = webhooks.build(cfg, reactor, spool, metrics)
        hooks.setServiceParent(top)
        queue.events.subscribe(hooks.heard, events.Received, *events.ATTEMPTED,
                               events.Suppressed)
    # [cluster]: the rate limiter and connection leases delivery may draw from (shared in
    # Redis, or this process's own), and the sharing of the suppression list (worker 0)
    from txmta import cluster
    shared = cluster.build(cfg, reactor, worker=worker, workers=workers)
    if shared.service is not None:
        shared.service.setServiceParent(top)
    if shared.suppression is not None:
        shared.suppression.attach(queue, channel.tell_master if channel is not None else None)
        if channel is not None:
            channel.heard = shared.suppression.local_changes
    top.shared = shared                   # type: ignore[attr-defined]
    receiver = Receiver(queue, cfg.server.hostname, reactor, signer, run_signing,
                        lanes=cfg.lanes,
                        listener_lanes={l.address: l.lane for l in cfg.listen if l.lane},
                        dedupe_window=cfg.intake.dedupe_window, note_duplicate=maillog.duplicate)
    checker = None
    if cfg.auth.users:
        from txmta.inbound.auth import UsersFileChecker
        from txmta.passwords import load_users
        checker = UsersFileChecker(load_users(cfg.auth.users), reactor, reactor.getThreadPool())
    policy = ServerPolicy(
        hostname=cfg.server.hostname, relay_networks=tuple(cfg.relay.networks),
        max_message_size=cfg.spool.max_message_size, max_recipients=cfg.server.max_recipients,
        max_errors=cfg.server.max_errors, junk_command_limit=cfg.server.junk_command_limit,
        command_timeout=cfg.server.command_timeout,
        data_timeout=cfg.server.data_timeout, command_time_limit=cfg.server.command_time_limit,
        data_time_limit=cfg.server.data_time_limit, tls_available=tls is not None,
        auth_available=checker is not None)
    delivery = build_delivery(cfg, reactor, queue, spool, metrics,
                              limiter=shared.rate_limiter if cfg.cluster.redis else None,
                              leases=shared.leases if cfg.cluster.redis else None)
    delivery.setServiceParent(top)
    parts: list[Any] = [tls] if tls is not None else []
    parts += [SigningReload(receiver, queue), TLSPolicyReload(delivery.tls_policy)]
    reload = build_reload(cfg, reactor, parts, reopen=maillog.reopen)
    reload.setServiceParent(top)
    admin: Any = queue if delivery.relays is None else WithRelayStatus(queue, delivery.relays)
    ReopenService(reactor, maillog.reopen).setServiceParent(top)
    if channel is None:
        from txmta.control.amp import ControlService, control_socket_path, pickup_socket_path
        ControlService(reactor, control_socket_path(cfg.spool.path), admin).setServiceParent(top)
        ControlService(reactor, pickup_socket_path(cfg.spool.path), queue,
                       pickup=True).setServiceParent(top)
    else:
        from txmta.control.channel import WorkerControl
        channel.queue_control = WorkerControl(admin, channel.tell_master)
        channel.mirror = queue.suppression
        channel.reload = reload.reload
        queue.events.subscribe(channel.suppressed, events.SuppressionAdded)
    top.partitions = owned_partitions     # type: ignore[attr-defined]
    top.queue = queue                     # type: ignore[attr-defined]
    listeners = len(cfg.listen) + len(cfg.http)
    balances: list[AcceptBalance | None] = (
        [AcceptBalance(accept_counts, i, worker, workers) for i in range(listeners)]
        if accept_counts is not None and workers > 1 else [None] * listeners)
    counts: dict[str, int] = {}
    for i, lst in enumerate(cfg.listen):
        factory: Any = SMTPFactory(policy, lst, receiver, reactor, checker=checker, tls_options=tls,
                                   max_connections=cfg.server.max_connections,
                                   max_per_ip=cfg.server.max_connections_per_ip, counts=counts,
                                   suppression=queue.suppression,
                                   reject_suppressed=cfg.suppression.action == "reject",
                                   metrics=metrics, note_auth_failure=maillog.auth_failed,
                                   note_timeout=maillog.timeout)
        listening(reactor, factory, lst, tls, inherited[i] if inherited is not None else None,
                  workers, balances[i]).setServiceParent(top)
    if cfg.http:
        from txmta.api.build import http_services
        first = len(cfg.listen)
        for svc in http_services(cfg, reactor, receiver, queue, tls, workers,
                                 inherited[first:] if inherited is not None else None,
                                 metrics=metrics, metrics_dir=metrics_dir, spool=spool,
                                 balances=balances[first:]):
            svc.setServiceParent(top)
    return top


# -- privileges -------------------------------------------------------------------------------

def user_ids(cfg: C.Config) -> tuple[str, int, int] | None:
    """(user name, uid, gid) of [server] user and group, or None when no user is set."""
    import grp
    import pwd
    if not cfg.server.user:
        return None
    u = cfg.server.user
    pw = pwd.getpwuid(int(u)) if u.isdigit() else pwd.getpwnam(u)
    gid = pw.pw_gid
    if cfg.server.group:
        g = cfg.server.group
        gid = int(g) if g.isdigit() else grp.getgrnam(g).gr_gid
    return pw.pw_name, pw.pw_uid, gid


def drop_privileges(ids: tuple[str, int, int]) -> None:
    """Become (user, uid, gid): supplementary groups of the user, then the group, then the
    user (the order matters: after setuid there is no way back)."""
    name, uid, gid = ids
    if os.getuid() == uid and os.geteuid() == uid and os.getgid() == gid:
        return
    os.initgroups(name, gid)
    os.setgid(gid)
    os.setuid(uid)


# -- CPU affinity -----------------------------------------------------------------------------

def cpu_for(worker: int, allowed: Sequence[int]) -> int:
    """The CPU worker `worker` is bound to with [server] cpu_affinity = "auto": the
    (worker mod n)-th of the `allowed` CPUs, in order."""
    cpus = sorted(allowed)
    return cpus[worker % len(cpus)]


def bind_to_cpu(cfg: C.Config, worker: int) -> int | None:
    """With cpu_affinity = "auto", bind this process (all its threads) to one CPU of those it
    may run on; the CPU, or None (not asked for, or not possible here)."""
    if cfg.server.cpu_affinity != "auto" or not hasattr(os, "sched_setaffinity"):
        return None
    cpu = cpu_for(worker, tuple(os.sched_getaffinity(0)))
    os.sched_setaffinity(0, {cpu})
    return cpu


# -- the worker process -----------------------------------------------------------------------

def _die_with_parent(master: int | None = None) -> bool:
    """Linux: get SIGKILL when the master dies (a backstop for the channel's close).  False
    when the master (pid `master`) has died already: a worker spawned just before its
    master's death asks for the signal too late to get it, and would start unsupervised,
    accepting on the inherited sockets beside the next master's workers, until it noticed
    the closed channel.  Asked first, checked after: a death in between sends the signal."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        PR_SET_PDEATHSIG = 1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    return master is None or os.getppid() == master


# What Twisted says of every port and channel a worker opens or closes: the master's startup
# summary has the listeners, and the channels are ours.
_NOISE = ("{cls} connection established", "{cls} connection lost", "Main loop terminated.")


def is_noise(event: dict[str, Any]) -> bool:
    fmt = event.get("log_format") or ""
    if fmt.startswith(_NOISE):
        return True
    text = " ".join(str(m) for m in event.get("message", ()))
    return " starting on " in text or (text.startswith("(") and text.endswith(" Closed)"))


def _log_to_stdout() -> None:
    """Log events as lines on stdout, without a timestamp: the master re-logs each line,
    with its own time and "worker K", into the daemon's log."""
    from twisted.logger import eventAsText, globalLogBeginner

    out = sys.stdout

    def observer(event: dict[str, Any]) -> None:
        if is_noise(event):
            return
        text = eventAsText(event, includeTimestamp=False, includeSystem=True)
        try:
            out.write(text + "\n")
            out.flush()
        except (OSError, ValueError):
            pass

    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m txmta.worker --config FILE --index K --workers N --fds FD,FD... --master PID`:
    run worker K of N on the listening sockets FD... (one per [[listen]] table, in order),
    talking to the master (PID) over file descriptor 3, until SIGTERM or until the master
    goes."""
    import argparse

    from txmta.control.channel import CHANNEL_FD, WorkerChannel
    from txmta.tap import global_reactor, stop_once_on_sigterm, tune_runtime
    p = argparse.ArgumentParser(prog="txmta.worker")
    p.add_argument("--config", default=None)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--fds", default="")
    p.add_argument("--balance", type=int, default=None,
                   help="fd of the connection counts the workers share (tcp.shared_counts)")
    p.add_argument("--master", type=int, default=None, help="the master's pid")
    args = p.parse_args(argv)
    if not _die_with_parent(args.master):
        sys.stderr.write(f"txmta: worker {args.index}: the master (pid {args.master}) is gone; "
                         "not starting\n")
        return 1
    _log_to_stdout()
    reactor = global_reactor()
    try:
        cfg = C.load(args.config)
        ids = user_ids(cfg)
        if ids is not None and os.getuid() == 0:
            drop_privileges(ids)          # before the spool opens: its files are the user's
        fds = [int(x) for x in args.fds.split(",") if x]
        if len(fds) != len(cfg.listen) + len(cfg.http):
            raise C.ConfigError(f"worker given {len(fds)} sockets for "
                                f"{len(cfg.listen) + len(cfg.http)} listeners")

        def master_gone() -> None:
            if reactor.running:
                from twisted.logger import Logger
                Logger().info("the master closed the channel: stopping")
                reactor.stop()

        channel = WorkerChannel(on_lost=master_gone)
        bind_to_cpu(cfg, args.index)     # before any thread starts: every thread inherits it
        accept_counts = None
        if args.balance is not None:
            from txmta.tcp import map_counts
            accept_counts = map_counts(args.balance)
            os.close(args.balance)
        top = build(cfg, reactor, worker=args.index, workers=args.workers, inherited=fds,
                    channel=channel, accept_counts=accept_counts)
    except C.ConfigError as e:
        sys.stderr.write(f"txmta: {e}\n")
        return 2
    from twisted.internet.protocol import Factory
    reactor.adoptStreamConnection(CHANNEL_FD, socket.AF_UNIX, Factory.forProtocol(lambda: channel))
    os.close(CHANNEL_FD)           # adopted: Twisted holds its own duplicate
    tune_runtime()
    stop_once_on_sigterm(reactor)
    reactor.callWhenRunning(top.startService)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    from txmta.worker import main as _main     # one copy of this module, not __main__ and txmta.worker
    sys.exit(_main())
