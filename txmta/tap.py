"""`twistd txmta`: load the configuration, build every part, wire them, start listening.

The only module that imports the global reactor and knows every part (DESIGN "Layout").
Parts get plain values and the reactor as their clock; nothing else reads the config.
"""
# test: tests/integration/test_daemon.py

from __future__ import annotations

import gc
import os
import sys
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.logger import (FileLogObserver, FilteringLogObserver, PredicateResult,
                            formatEventAsClassicLogText, globalLogPublisher,
                            jsonFileLogObserver)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from txmta import config as C
from txmta.inbound.policy import ServerPolicy
from txmta.inbound.protocol import SMTPFactory
from txmta.inbound.receiver import Receiver
from txmta.maillog import MailLog
from txmta.queue import Queue
from txmta.spool.lmdb import LmdbSpool


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = ("Runs the txmta mail transfer agent.  Without --config it reads "
                f"{C.DEFAULT_PATH} if present, else built-in defaults.")
    optParameters = [["config", "c", None, "the configuration file (TOML)"]]


def tls_options(cert_path: str, key_path: str) -> Any:
    """Server TLS: TLS 1.2 or newer, Twisted's modern cipher list, the full chain from the PEM."""
    from twisted.internet import ssl
    from twisted.internet.ssl import TLSVersion
    with open(cert_path, "rb") as f:
        cert_pem = f.read()
    with open(key_path, "rb") as f:
        key_pem = f.read()
    certs = [b"-----BEGIN CERTIFICATE-----" + part for part in
             cert_pem.split(b"-----BEGIN CERTIFICATE-----")[1:]]
    leaf = ssl.PrivateCertificate.loadPEM(certs[0] + b"\n" + key_pem)
    chain = [ssl.Certificate.loadPEM(c).original for c in certs[1:]]
    return ssl.CertificateOptions(privateKey=leaf.privateKey.original, certificate=leaf.original,
                                  extraCertChain=chain, raiseMinimumTo=TLSVersion.TLSv1_2)


class SpoolService(service.Service):
    def __init__(self, spool: LmdbSpool) -> None:
        self.spool = spool

    def stopService(self) -> Any:
        service.Service.stopService(self)
        return self.spool.close()


def _maillog_observer(cfg: C.Config) -> Any:
    if not cfg.log.maillog:
        return None
    out = sys.stdout if cfg.log.maillog == "-" else open(cfg.log.maillog, "a", encoding="utf-8")
    if cfg.log.format == "json":
        obs = jsonFileLogObserver(out, recordSeparator="")  # one JSON object per line
    else:
        obs = FileLogObserver(out, lambda e: (formatEventAsClassicLogText(e) or ""))

    def only_maillog(event: dict[str, Any]) -> Any:
        if event.get("log_namespace") == "txmta.maillog":
            return PredicateResult.yes
        return PredicateResult.no
    return FilteringLogObserver(obs, [only_maillog])


def build(cfg: C.Config, reactor: Any) -> service.MultiService:
    top = service.MultiService()
    spool = LmdbSpool(cfg.spool.path, reactor, map_size=cfg.spool.map_size,
                      max_map_size=cfg.spool.max_map_size,
                      inline_limit=cfg.spool.inline_body_limit)
    SpoolService(spool).setServiceParent(top)
    queue = Queue(spool, reactor, MailLog())
    receiver = Receiver(queue, cfg.server.hostname, reactor)
    checker = None
    if cfg.auth.users:
        from txmta.inbound.auth import UsersFileChecker
        from txmta.passwords import load_users
        checker = UsersFileChecker(load_users(cfg.auth.users), reactor, reactor.getThreadPool())
    tls = tls_options(cfg.tls.cert, cfg.tls.key) if cfg.tls.cert and cfg.tls.key else None
    policy = ServerPolicy(
        hostname=cfg.server.hostname, relay_networks=tuple(cfg.relay.networks),
        max_message_size=cfg.spool.max_message_size, max_recipients=cfg.server.max_recipients,
        max_errors=cfg.server.max_errors, command_timeout=cfg.server.command_timeout,
        data_timeout=cfg.server.data_timeout, tls_available=tls is not None,
        auth_available=checker is not None)
    counts: dict[str, int] = {}
    for lst in cfg.listen:
        factory: Any = SMTPFactory(policy, lst, receiver, reactor, checker=checker, tls_options=tls,
                                   max_connections=cfg.server.max_connections,
                                   max_per_ip=cfg.server.max_connections_per_ip, counts=counts)
        if lst.tls == "implicit":
            factory = TLSMemoryBIOFactory(tls, False, factory)
        endpoint_class = TCP6ServerEndpoint if ":" in lst.host else TCP4ServerEndpoint
        endpoint = endpoint_class(reactor, lst.port, backlog=1024, interface=lst.host)
        StreamServerEndpointService(endpoint, factory).setServiceParent(top)
    return top


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor
    try:
        cfg = C.load(options["config"])
    except C.ConfigError as e:
        raise SystemExit(f"txmta: {e}")
    observer = _maillog_observer(cfg)
    if observer is not None:
        globalLogPublisher.addObserver(observer)
    os.makedirs(cfg.spool.path, exist_ok=True)
    top = build(cfg, reactor)
    # The objects built at start live as long as the daemon: keep the cyclic collector from
    # walking them again and again, and let it run less often (a full collection under load
    # was a visible share of the end-of-data -> 250 tail latency).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20000, 20, 20)
    return top
