"""The [[http]] listeners of one worker: a twisted.web site each, on the socket the master
bound (or bound here when the worker is the whole daemon), HTTPS with the reloadable [tls]
context when `tls = "implicit"`."""
# test: tests/integration/test_api.py

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

from twisted.application.service import IService

from txmta import config as C
from txmta.api.server import ApiResource, build_site
from txmta.api.status import StatusApi
from txmta.api.submit import Submitter
from txmta.api.tokens import RateLimiter, TokenFileError, TokenStore


class SpoolReader:
    """What dashboard.collect() reads through (`_read(fn)`, `_db`): short read transactions
    on the worker's own spool environment, on the calling thread (collect runs in a thread of
    the reactor's pool, so the page never holds up the reactor or the spool's writer)."""

    def __init__(self, spool: Any) -> None:
        self._spool = spool
        self._db = spool._db

    def _read(self, fn: Callable[[Any], Any]) -> Any:
        from txmta.spool.view import read_retrying
        return read_retrying(self._spool._env, fn)


class Watch:
    """The dashboard's and /metrics' data: the per-minute history of the metrics' totals,
    sampled every `interval` seconds, and the last totals."""

    def __init__(self, reactor: Any, metrics_dir: str, interval: float = 10.0) -> None:
        from twisted.internet.task import LoopingCall

        from txmta.dashboard import History
        self.reactor = reactor
        self.metrics_dir = metrics_dir
        self.history = History()
        self.last: dict[str, float] = {}
        self._loop = LoopingCall(self.sample)
        self._loop.clock = reactor
        reactor.callWhenRunning(self._loop.start, interval, True)

    def sample(self) -> None:
        from txmta import metrics
        try:
            self.last = metrics.totals(self.metrics_dir)
        except Exception:
            return
        self.history.sample(self.reactor.seconds(), self.last)


def viewer_check(tokens: TokenStore, networks: Sequence[Any]) -> Callable[[Any], bool]:
    """Who may see /metrics and the dashboard: a client in relay.networks, or a token with
    the admin or dashboard scope (as a Bearer token, X-Postmark-Server-Token, or the password
    of HTTP Basic authentication, which a browser asks for)."""
    import base64
    import ipaddress

    from txmta.api.server import presented_token

    def allowed(request: Any) -> bool:
        try:
            ip = ipaddress.ip_address(getattr(request.getClientAddress(), "host", ""))
            if any(ip in n for n in networks):
                return True
        except ValueError:
            pass
        token = presented_token(request)
        auth = request.getHeader("authorization") or ""
        if token is None and auth[:6].lower() == "basic ":
            try:
                token = base64.b64decode(auth[6:].strip()).decode("utf-8").partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                token = None
        found = tokens.check(token)
        return found is not None and bool(found.scopes & {"admin", "dashboard"})
    return allowed


def page_routes(h: Any, cfg: C.Config, reactor: Any, allowed: Callable[[Any], bool],
                metrics_dir: str, watch: Watch, spool: Any
                ) -> dict[tuple[bytes, bytes], Callable[[Any], Any]]:
    """GET /metrics and GET / for a listener that serves them."""
    from twisted.internet.threads import deferToThread

    import txmta
    from txmta import dashboard, metrics

    def refused(request: Any) -> bytes:
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", b'Basic realm="txmta"')
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"a token with the admin or dashboard scope is needed\n"

    routes: dict[tuple[bytes, bytes], Callable[[Any], Any]] = {}
    if "metrics" in h.serve:
        page = metrics.MetricsResource(metrics_dir)

        def metrics_page(request: Any) -> Any:
            return page.render_GET(request) if allowed(request) else refused(request)
        routes[(b"GET", b"/metrics")] = metrics_page
    if "dashboard" in h.serve and spool is not None:
        reader = SpoolReader(spool)

        def snapshot() -> Any:
            # sampled now too: each worker keeps its own history, and a page must not show
            # an older sample than the one a moment ago from another worker
            watch.sample()

            def made(snap: Any) -> Any:
                for key in ("queue_depth", "oldest_age", "webhook_backlog"):
                    if key in watch.last:
                        setattr(snap, key, type(getattr(snap, key))(watch.last[key]))
                return snap
            return deferToThread(dashboard.collect, reader, watch.history, reactor.seconds(),
                                 None, hostname=cfg.server.hostname,
                                 version=txmta.__version__).addCallback(made)
        page_d = dashboard.DashboardResource(snapshot)

        def dashboard_page(request: Any) -> Any:
            return page_d.render_GET(request) if allowed(request) else refused(request)
        routes[(b"GET", b"/")] = dashboard_page
    return routes


def http_services(cfg: C.Config, reactor: Any, receiver: Any, queue: Any, tls: Any,
                  workers: int, inherited: Sequence[int] | None, *, metrics: Any = None,
                  metrics_dir: str | None = None, spool: Any = None,
                  balances: Sequence[Any] = ()) -> list[IService]:
    """One service per [[http]] table; `inherited`: their sockets, in order, or None;
    `balances`: the AcceptBalance of each one's shared socket (or None), in order."""
    from txmta.worker import listening, share
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
                       control_caller(reactor, cfg.spool.path), reactor, limiter)
    services: list[IService] = []
    allowed = viewer_check(tokens, cfg.relay.networks)
    watch = Watch(reactor, metrics_dir) if metrics_dir is not None else None
    for i, h in enumerate(cfg.http):
        extra = (page_routes(h, cfg, reactor, allowed, metrics_dir, watch, spool)
                 if watch is not None and metrics_dir is not None else {})
        resource = ApiResource(submitter, tokens, limiter, listener=h.name,
                               hostname=cfg.server.hostname, clock=reactor,
                               serve_api="api" in h.serve, extra=extra, metrics=metrics,
                               idempotency_window=cfg.api.idempotency_window,
                               status=status)
        services.append(listening(reactor, build_site(resource, cfg.spool.max_message_size,
                                                      reactor),
                                  h, tls, inherited[i] if inherited is not None else None,
                                  workers, balances[i] if balances else None))
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
