"""The [[http]] listeners of one worker: a twisted.web site each, on the socket the master
bound (or bound here when the worker is the whole daemon), HTTPS with the reloadable [tls]
context when `tls = "implicit"`."""
# test: tests/integration/test_api.py

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.protocols.tls import TLSMemoryBIOFactory

from txmta import config as C
from txmta.api.server import ApiResource, build_site
from txmta.api.status import StatusApi
from txmta.api.submit import Submitter
from txmta.api.tokens import RateLimiter, TokenFileError, TokenStore
from txmta.tcp import AdoptedServerEndpoint, TCPServerEndpoint


def http_services(cfg: C.Config, reactor: Any, receiver: Any, queue: Any, tls: Any,
                  workers: int, inherited: Sequence[int] | None) -> list[IService]:
    """One service per [[http]] table; `inherited`: their sockets, in order, or None."""
    from txmta.worker import family_of, share
    try:
        tokens = TokenStore(cfg.api.tokens, reactor.seconds)
    except TokenFileError as e:
        raise C.ConfigError(f"{cfg.path or '<defaults>'}: api.tokens = \"{cfg.api.tokens}\": "
                            f"{e}") from None
    rate = share(cfg.api.rate_limit, workers) if cfg.api.rate_limit else 0
    limiter = RateLimiter(rate)    # one per worker, shared by its listeners
    submitter = Submitter(receiver, suppressed=queue.suppression.check,
                          reject_suppressed=cfg.suppression.action == "reject",
                          max_message_size=cfg.spool.max_message_size)
    from txmta.spool.view import SpoolReads
    status = StatusApi(tokens, SpoolReads(queue.spool.read),
                       control_caller(reactor, cfg.spool.path), reactor)
    services: list[IService] = []
    for i, h in enumerate(cfg.http):
        resource = ApiResource(submitter, tokens, limiter, listener=h.name,
                               hostname=cfg.server.hostname, clock=reactor,
                               serve_api="api" in h.serve,
                               idempotency_window=cfg.api.idempotency_window,
                               status=status)
        factory: Any = build_site(resource, cfg.spool.max_message_size, reactor)
        if h.tls == "implicit":
            factory = TLSMemoryBIOFactory(tls, False, factory)
        endpoint: Any
        if inherited is not None:
            endpoint = AdoptedServerEndpoint(reactor, inherited[i], family_of(h.host))
        else:
            endpoint = TCPServerEndpoint(reactor, h.port, backlog=1024, interface=h.host)
        services.append(StreamServerEndpointService(endpoint, factory))
    return services


def control_caller(reactor: Any, spool_path: str) -> Any:
    """`call(command_name, **kwargs)`: one command to the daemon's control socket (served by
    the master with several workers, by this process with one), as the `txmta` command
    sends it."""
    from txmta.control import amp as control

    def call(command_name: str, **kwargs: Any) -> Any:
        return control.call_async(reactor, control.control_socket_path(spool_path),
                                  getattr(control, command_name), **kwargs)
    return call
