"""One webhook request: POST a signed body with treq, and say what the answer means.

`post_event` sends one request and fires with a `Result`, never with an error:

* a 2xx answer: `ok` (the event may leave the outbox);
* 410 Gone: `gone` (the endpoint asks to be sent nothing more: the caller disables it and
  logs it, as Standard Webhooks senders do);
* anything else: `retry`: any other status (3xx included: redirects are not followed, a
  webhook URL is configured to its final address and a POST must not turn into a GET),
  connection refused, DNS failure, TLS failure, no answer within `timeout`.  The answer's
  `Retry-After` header is returned as it came (`schedule.retry_after_seconds` reads it).

The answer's body is read and discarded, at most `answer_limit` bytes (past that the
connection is closed), so that a connection can go back to the pool and a receiver cannot
make us hold or wait for an endless answer.  `timeout` bounds the whole exchange, from
connecting to the end of the answer, when the caller passes its `reactor` (the daemon always
does); without one, treq's own timer (on the global reactor) bounds only the wait for the
answer's head.

The request is whatever the caller built: body and headers from `payload` and `sign`.
`treq_like` is the `treq` module or a `treq.client.HTTPClient` (`http_client` makes one
with a persistent connection pool); tests pass their own.
"""
# test: tests/test_webhooks_post.py

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping

from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

ANSWER_LIMIT = 64 * 1024

Outcome = Literal["ok", "retry", "gone"]


@dataclass(frozen=True)
class Result:
    """What one request came to: `outcome`, the HTTP `status` (None when no answer came),
    the answer's Retry-After header as sent (or None), and a short `error` for logs ("" for
    ok)."""
    outcome: Outcome
    status: int | None = None
    retry_after_header: str | None = None
    error: str = ""


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False


def http_client(reactor: Any, *, max_per_host: int = 4,
                idle_timeout: float = 120.0) -> HTTPClient:
    """A `treq.client.HTTPClient` on `reactor`, keeping connections for reuse."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietFactory      # no "Starting factory" line per connection
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = idle_timeout
    return HTTPClient(Agent(reactor, pool=pool))


@implementer(IBodyProducer)
class Body:
    """A request body written at once.  (treq would wrap bytes in a FileBodyProducer, whose
    cooperator runs on the global reactor, not on the one passed in.)"""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Discard(Protocol):
    """Reads an answer's body and forgets it; closes the connection past `limit` bytes.
    `done` fires when the body ended, however it ended."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen = 0
        self.stopped = False
        self.done: Deferred[None] = Deferred(lambda _: self._stop())

    def dataReceived(self, data: bytes) -> None:
        self.seen += len(data)
        if self.seen > self.limit:
            self._stop()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.callback(None)

    def _stop(self) -> None:
        if not self.stopped and self.transport is not None:
            self.stopped = True
            self.transport.stopProducing()  # type: ignore[attr-defined]


def _header(response: Any, name: bytes) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


def _result(response: Any) -> Result:
    code = int(response.code)
    retry_after = _header(response, b"retry-after")
    if 200 <= code < 300:
        return Result("ok", code, retry_after)
    phrase = (response.phrase or b"").decode("latin-1", "replace")[:80]
    text = f"HTTP {code} {phrase}".strip()
    return Result("gone" if code == 410 else "retry", code, retry_after, text)


def _leaves(f: Failure) -> Iterator[Failure]:
    """The failure, or the failures it wraps (treq/Agent's ResponseNeverReceived & co.)."""
    reasons = getattr(f.value, "reasons", None)
    if reasons:
        for r in reasons:
            if isinstance(r, Failure):
                yield from _leaves(r)
    else:
        yield f


def describe(f: Failure, timeout: float, timed_out: bool = False) -> str:
    """A short text for a request that got no answer."""
    leaves = list(_leaves(f))
    if timed_out or any(x.check(CancelledError, error.ConnectingCancelledError,
                                error.TimeoutError) for x in leaves):
        return f"no answer within {timeout:g} s"
    leaf = leaves[0] if leaves else f
    if leaf.check(error.ConnectionRefusedError):
        return "connection refused"
    if leaf.check(error.DNSLookupError):          # its text says "DNS lookup failed: ..."
        return leaf.getErrorMessage()[:200]
    if leaf.check(SSL.Error):
        return f"TLS failed: {leaf.getErrorMessage()}"[:200]
    return f"{leaf.type.__name__}: {leaf.getErrorMessage()}"[:200]  # type: ignore[union-attr]


def post_event(treq_like: Any, url: str, body: bytes, headers: Mapping[str, str],
               timeout: float, *, reactor: IReactorTime | None = None,
               answer_limit: int = ANSWER_LIMIT) -> Deferred[Result]:
    """POST `body` with `headers` to `url`; fire with the `Result` (see the module
    docstring), within `timeout` seconds when `reactor` is given."""
    kwargs: dict[str, Any] = {"data": Body(body), "headers": dict(headers), "timeout": timeout,
                              "allow_redirects": False, "unbuffered": True}
    if reactor is not None:
        kwargs["reactor"] = reactor
    try:
        requested: Deferred[Any] = treq_like.post(url, **kwargs)
    except Exception:
        return succeed(Result("retry", error=describe(Failure(), timeout)))

    pending: list[Deferred[Any]] = [requested]
    timed_out = [False]
    timer: IDelayedCall | None = None
    if reactor is not None:
        def expire() -> None:
            timed_out[0] = True
            pending[0].cancel()
        timer = reactor.callLater(timeout, expire)

    def answered(response: Any) -> Deferred[Result]:
        result = _result(response)
        reader = _Discard(answer_limit)
        pending[0] = reader.done
        response.deliverBody(reader)
        return reader.done.addBoth(lambda _: result)

    def failed(f: Failure) -> Result:
        return Result("retry", error=describe(f, timeout, timed_out[0]))

    def finished(result: Result) -> Result:
        if timer is not None and timer.active():
            timer.cancel()
        return result

    return requested.addCallback(answered).addErrback(failed).addCallback(finished)
