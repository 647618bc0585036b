"""post_event against a real twisted.web server on 127.0.0.1: what each answer comes to.

A private epoll reactor carries the sockets and is iterated by hand (as in test_tcp.py);
the request's deadline runs on a `task.Clock`, so a timeout is `clock.advance`, not a wait.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Iterator

import pytest
from treq.client import HTTPClient
from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, wrapClientTLS
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import Clock
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer
from twisted.web.iweb import IAgentEndpointFactory

from txmta.webhooks.post import Result, post_event

BODY = b'{"type":"message.delivered"}'
HEADERS = {"webhook-id": "msg_0123", "webhook-timestamp": "1700000000",
           "webhook-signature": "v1,abc=", "content-type": "application/json"}


class Answer(Resource):
    """Answers a POST with a status, headers and a body; records what it was sent."""
    isLeaf = True

    def __init__(self, seen: list[Any], status: int, body: bytes = b"",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__()
        self.seen, self.status, self.body, self.headers = seen, status, body, headers or {}

    def render_POST(self, request: Any) -> bytes:
        self.seen.append((request.uri, dict(request.requestHeaders.getAllRawHeaders()),
                          request.content.read()))
        request.setResponseCode(self.status)
        for k, v in self.headers.items():
            request.setHeader(k, v)
        return self.body


class Hang(Resource):
    """Never answers (or answers the head and a little of the body, then nothing)."""
    isLeaf = True

    def __init__(self, seen: list[Any], head: bool = False) -> None:
        super().__init__()
        self.seen, self.head = seen, head

    def render_POST(self, request: Any) -> Any:
        self.seen.append((request.uri, {}, b""))
        if self.head:
            request.setResponseCode(200)
            request.setHeader("content-length", "1000")
            request.write(b"x" * 10)
        return NOT_DONE_YET


class Endless:
    """A push producer writing 64 KiB after 64 KiB for ever, unless paused."""

    def __init__(self, reactor: Any, request: Any, state: dict[str, int]) -> None:
        self.reactor, self.request, self.state = reactor, request, state
        self.paused = False
        self.call = reactor.callLater(0, self.write)

    def write(self) -> None:
        if not self.paused and not self.state["stopped"]:
            self.state["written"] += 65536
            self.request.write(b"y" * 65536)
        if not self.state["stopped"]:
            self.call = self.reactor.callLater(0.001, self.write)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.state["stopped"] += 1


class EndlessAnswer(Resource):
    isLeaf = True

    def __init__(self, reactor: Any, state: dict[str, int]) -> None:
        super().__init__()
        self.reactor, self.state = reactor, state

    def render_POST(self, request: Any) -> Any:
        request.setResponseCode(200)
        request.registerProducer(Endless(self.reactor, request, self.state), True)
        return NOT_DONE_YET


@implementer(IAgentEndpointFactory)
class Loopback:
    """Connects by address (no name resolution, no thread pool); https wraps TLS."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def endpointForURI(self, uri: Any) -> Any:
        tcp = TCP4ClientEndpoint(self.reactor, uri.host.decode(), uri.port)
        if uri.scheme == b"https":
            return wrapClientTLS(optionsForClientTLS("localhost"), tcp)
        return tcp


class Web:
    def __init__(self) -> None:
        self.reactor = EPollReactor()
        self.clock = Clock()
        self.seen: list[Any] = []
        self.endless = {"written": 0, "stopped": 0}
        root = Resource()
        for name, res in {
            b"ok": Answer(self.seen, 200, b"fine"),
            b"nocontent": Answer(self.seen, 204),
            b"fail": Answer(self.seen, 500, b"oops"),
            b"gone": Answer(self.seen, 410, b"bye"),
            b"busy": Answer(self.seen, 429, b"slow down", {"Retry-After": "120"}),
            b"unavailable": Answer(self.seen, 503, b"",
                                   {"Retry-After": "Sat, 06 Dec 2025 05:56:40 GMT"}),
            b"moved": Answer(self.seen, 302, b"", {"Location": "/ok"}),
            b"missing": Answer(self.seen, 404, b"no such hook"),
            b"big": Answer(self.seen, 200, b"z" * (1 << 20)),
            b"hang": Hang(self.seen),
            b"stall": Hang(self.seen, head=True),
            b"endless": EndlessAnswer(self.reactor, self.endless),
        }.items():
            root.putChild(name, res)
        self.site = Site(root)
        ports: list[Any] = []
        TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1").listen(self.site) \
            .addCallback(ports.append)
        self.port = ports[0]
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        self.pool = HTTPConnectionPool(self.reactor, persistent=False)
        self.client = HTTPClient(Agent.usingEndpointFactory(self.reactor, Loopback(self.reactor),
                                                            pool=self.pool))

    def post(self, path: str, timeout: float = 5.0, **kw: Any) -> defer.Deferred[Result]:
        return post_event(self.client, self.base + path, BODY, HEADERS, timeout,
                          reactor=self.clock, **kw)

    def run(self, d: defer.Deferred[Any], until: Any = None, limit: float = 10.0) -> Any:
        """Iterates the reactor until `d` fired (or `until()` is true); its result, or None."""
        box = _box(d)
        end = time.monotonic() + limit
        while not box and not (until and until()) and time.monotonic() < end:
            self.reactor.iterate(0.01)
        return box[0] if box else None

    def close(self) -> None:
        self.port.stopListening()
        for s in set(self.reactor.getReaders()) | set(self.reactor.getWriters()):
            if hasattr(s, "abortConnection"):
                s.abortConnection()
        for _ in range(20):
            self.reactor.iterate(0)


def _box(d: defer.Deferred[Any]) -> list[Any]:
    """A list that gets `d`'s result when it fires (once per Deferred)."""
    box = getattr(d, "_test_box", None)
    if box is None:
        box = []
        d._test_box = box  # type: ignore[attr-defined]
        d.addBoth(lambda r: (box.append(r), r)[1])
    return box


@pytest.fixture
def web() -> Iterator[Web]:
    w = Web()
    yield w
    w.close()


def _result(web: Web, path: str, **kw: Any) -> Result:
    r = web.run(web.post(path, **kw))
    assert isinstance(r, Result), r
    return r


@pytest.mark.parametrize("path, outcome, status", [
    ("/ok", "ok", 200),
    ("/nocontent", "ok", 204),
    ("/fail", "retry", 500),
    ("/gone", "gone", 410),
    ("/moved", "retry", 302),          # never followed: a POST must not become a GET
    ("/missing", "retry", 404),
])
def test_status_decides(web: Web, path: str, outcome: str, status: int) -> None:
    r = _result(web, path)
    assert (r.outcome, r.status) == (outcome, status)
    assert (r.error == "") == (outcome == "ok")
    assert [s[0] for s in web.seen] == [path.encode()]


def test_the_request_carries_body_and_headers(web: Web) -> None:
    assert _result(web, "/ok").outcome == "ok"
    [(uri, headers, body)] = web.seen
    assert body == BODY
    got = {k.decode().lower(): v[0].decode() for k, v in headers.items()}
    assert {k: got[k] for k in HEADERS} == HEADERS
    assert got["content-length"] == str(len(BODY))


def test_error_names_the_status(web: Web) -> None:
    assert _result(web, "/fail").error == "HTTP 500 Internal Server Error"
    assert _result(web, "/gone").error == "HTTP 410 Gone"


def test_retry_after_comes_back_as_sent(web: Web) -> None:
    r = _result(web, "/busy")
    assert (r.outcome, r.status, r.retry_after_header) == ("retry", 429, "120")
    r = _result(web, "/unavailable")
    assert r.retry_after_header == "Sat, 06 Dec 2025 05:56:40 GMT"
    assert _result(web, "/ok").retry_after_header is None


def test_a_silent_server_times_out(web: Web) -> None:
    d = web.post("/hang", timeout=5)
    web.run(d, until=lambda: web.seen)
    assert web.seen and not _box(d)
    web.clock.advance(4.9)
    assert not _box(d)
    web.clock.advance(0.2)
    r = web.run(d)
    assert r == Result("retry", None, None, "no answer within 5 s")


def test_a_stalled_answer_body_is_cut_at_the_deadline(web: Web) -> None:
    """The head said 200: the event went through, whatever the body does after."""
    d = web.post("/stall", timeout=5)
    web.run(d, until=lambda: web.seen)
    for _ in range(20):
        web.reactor.iterate(0.01)
    assert not _box(d)
    web.clock.advance(5)
    r = web.run(d)
    assert (r.outcome, r.status) == ("ok", 200)
    assert not web.clock.getDelayedCalls()


def test_an_answer_longer_than_the_limit_still_counts(web: Web) -> None:
    r = _result(web, "/big", answer_limit=1024)
    assert (r.outcome, r.status) == ("ok", 200)


def test_an_endless_answer_is_cut(web: Web) -> None:
    r = _result(web, "/endless", answer_limit=256 * 1024)
    assert (r.outcome, r.status) == ("ok", 200)
    assert web.endless["written"] < 64 << 20      # we did not wait for a lot of it


def test_connection_refused(web: Web) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    r = web.run(post_event(web.client, f"http://127.0.0.1:{port}/", BODY, HEADERS, 5,
                           reactor=web.clock))
    assert r == Result("retry", None, None, "connection refused")


class Plain(Protocol):
    """Answers whatever comes in clear text, and hangs up."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.transport.loseConnection()


def test_tls_failure(web: Web) -> None:
    """An https URL whose server does not speak TLS."""
    ports: list[Any] = []
    TCP4ServerEndpoint(web.reactor, 0, interface="127.0.0.1") \
        .listen(Factory.forProtocol(Plain)).addCallback(ports.append)
    try:
        url = f"https://127.0.0.1:{ports[0].getHost().port}/"
        r = web.run(post_event(web.client, url, BODY, HEADERS, 5, reactor=web.clock))
    finally:
        ports[0].stopListening()
    assert (r.outcome, r.status) == ("retry", None)
    assert r.error.startswith("TLS failed"), r.error


def test_http_client_posts() -> None:
    """The client the daemon uses: a persistent pool on the reactor given."""
    from txmta.webhooks.post import http_client
    from twisted.internet.testing import MemoryReactorClock
    reactor = MemoryReactorClock()
    client = http_client(reactor)
    d = post_event(client, "http://127.0.0.1:9/", BODY, HEADERS, 5, reactor=reactor)
    reactor.advance(0)
    assert reactor.tcpClients and reactor.tcpClients[0][:2] == ("127.0.0.1", 9)
    reactor.advance(5)
    assert _box(d)[0] == Result("retry", None, None, "no answer within 5 s")


def test_no_timer_is_left_behind(web: Web) -> None:
    _result(web, "/ok")
    _result(web, "/fail")
    assert not web.clock.getDelayedCalls()


# -- with a stand-in for treq -----------------------------------------------------------------

class FakeTreq:
    def __init__(self, answer: defer.Deferred[Any] | Exception) -> None:
        self.answer = answer
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def post(self, url: str, **kw: Any) -> defer.Deferred[Any]:
        self.calls.append((url, kw))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_what_treq_is_asked() -> None:
    clock = Clock()
    fake = FakeTreq(defer.Deferred())
    post_event(fake, "https://hooks.example/x", BODY, HEADERS, 7.5, reactor=clock)
    [(url, kw)] = fake.calls
    assert url == "https://hooks.example/x"
    assert kw.pop("data").data == BODY
    assert kw == {"headers": HEADERS, "timeout": 7.5, "allow_redirects": False,
                  "unbuffered": True, "reactor": clock}


@pytest.mark.parametrize("failure, text", [
    (error.DNSLookupError("nx.example"), "DNS lookup failed: nx.example"),
    (error.ConnectionRefusedError(), "connection refused"),
    (defer.CancelledError(), "no answer within 5 s"),
    (error.ConnectingCancelledError(None), "no answer within 5 s"),
    (ValueError("weird"), "ValueError: weird"),
])
def test_failures_are_retries(failure: Exception, text: str) -> None:
    fake = FakeTreq(defer.fail(failure))
    box: list[Result] = []
    post_event(fake, "http://h/", BODY, HEADERS, 5).addCallback(box.append)
    assert box[0].outcome == "retry" and box[0].status is None
    assert box[0].error.startswith(text)


def test_wrapped_failures_are_described_by_their_cause() -> None:
    from twisted.python.failure import Failure
    from twisted.web._newclient import ResponseNeverReceived
    fake = FakeTreq(defer.fail(ResponseNeverReceived([Failure(error.ConnectionRefusedError())])))
    box: list[Result] = []
    post_event(fake, "http://h/", BODY, HEADERS, 5).addCallback(box.append)
    assert box[0].error == "connection refused"


def test_a_url_treq_refuses_is_a_retry() -> None:
    box: list[Result] = []
    post_event(FakeTreq(ValueError("bad url")), "::", BODY, HEADERS, 5).addCallback(box.append)
    assert box[0] == Result("retry", None, None, "ValueError: bad url")
