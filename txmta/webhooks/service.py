"""Sends the webhook deliveries the spool keeps: at least once, signed, retried for ~3 days.

When a change of a message is committed, the spool writes, in the same transaction, one
delivery entry per [[webhook]] endpoint that wants the event's kind (`LmdbSpool.set_hooks`,
the `hooks` database: partition / due time / endpoint / event id -> attempts and the event's
record).  This service, one per worker, sends the entries of the worker's own partitions:

* each due entry is made into the endpoint's format (`payload.txmta_payload` or
  `payload.postmark_payload`), signed with Standard Webhooks headers at the time of the
  attempt (`sign.headers`; the webhook-id is the event id, the same on every attempt), and
  POSTed with treq (`post.post_event`, the endpoint's timeout);
* a 2xx removes the entry; any other answer (or none) puts it back at its next attempt
  (`schedule.next_retry`, honouring Retry-After), until three days have passed, when it is
  dropped and logged; 410 Gone disables the endpoint in this worker until the next start
  (logged, its entries dropped as they come up);
* `deferred` events go through `schedule.Collapser`: at most one per recipient per hour
  (the others are dropped: the next one or the terminal event tells the same story);
* the results of finished requests are settled in one commit per round (`hooks_settle`),
  and a request is never started twice at once (the keys in flight are passed over).

A crash loses nothing: an entry leaves the spool only after its 2xx was settled, so a
request answered just before a crash is sent again, with the same webhook-id (receivers
deduplicate on it, as Standard Webhooks asks).  The service looks for due entries every
`poll` seconds and right after each committed event that has endpoints.
"""
# test: tests/test_webhooks_service.py, tests/integration/test_webhooks.py

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Sequence

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from txmta.message import MessageFacts, OutboxRecord
from txmta.spool.view import split_hook_key
from txmta.webhooks import payload as payloads
from txmta.webhooks import schedule, sign
from txmta.webhooks.post import Result, post_event

log = Logger()


def endpoint_id(url: str) -> bytes:
    """The 4-byte id of an endpoint in the spool: its URL's, so that reordering the
    [[webhook]] tables keeps each one's deliveries."""
    return hashlib.sha256(url.encode("utf-8")).digest()[:4]


@dataclass
class Endpoint:
    url: str
    kinds: frozenset[str]
    format: str                 # txmta | postmark
    secret: bytes
    timeout: float
    disabled: bool = False

    @cached_property
    def id(self) -> bytes:
        return endpoint_id(self.url)

    @classmethod
    def from_config(cls, w: Any) -> "Endpoint":
        return cls(w.url, frozenset(w.events), w.format, sign.load_secret(w.secret), w.timeout)


def body_for(endpoint: Endpoint, event_id: bytes, record: OutboxRecord,
             suppression_categories: Sequence[str] = ()) -> bytes | None:
    """The request body of one event for `endpoint`, None when its format has no shape for
    the event (Postmark's has none for received and deferred)."""
    f = record.facts or MessageFacts()
    facts = payloads.MessageFacts(sender=f.sender, header_id=f.header_id, tag=f.tag,
                                  metadata=dict(f.metadata), stream=f.stream, token=f.token)
    if endpoint.format == "postmark":
        from txmta.api.postmark import queue_id_to_uuid
        return payloads.postmark_payload(
            event_id, record, facts, message_id_form=queue_id_to_uuid,
            suppression_categories=suppression_categories or payloads.DEFAULT_SUPPRESSION)
    return payloads.txmta_payload(event_id, record, facts)


class WebhookService(service.Service):
    """`spool`: hooks_due / hooks_settle / hooks_pending (LmdbSpool or MemorySpool, set_hooks
    already called); `post(client, url, body, headers, timeout, reactor=)` fires with a
    `post.Result` (post_event by default); `client`: what post_event sends with (a treq
    HTTPClient, `post.http_client`)."""

    def __init__(self, reactor: Any, spool: Any, endpoints: Sequence[Endpoint], *,
                 client: Any = None, post: Callable[..., Deferred[Result]] = post_event,
                 poll: float = 1.0, batch: int = 500, max_inflight: int = 64,
                 per_endpoint: int = 16, suppression_categories: Sequence[str] = (),
                 metrics: Any = None) -> None:
        self.reactor = reactor
        self.spool = spool
        self.endpoints = {e.id: e for e in endpoints}
        self.client = client
        self.post = post
        self.poll = poll
        self.batch = batch
        self.max_inflight = max_inflight
        self.suppression_categories = tuple(suppression_categories)
        self.metrics = metrics      # txmta.metrics.Metrics: sent, failures, backlog
        self.collapser = schedule.Collapser()
        self.inflight: set[bytes] = set()
        self._limits = {eid: DeferredSemaphore(per_endpoint) for eid in self.endpoints}
        self._settle: list[tuple[bytes, float | None, int]] = []
        self._settling: Deferred[Any] | None = None
        self._round: Deferred[Any] | None = None
        self._again = False
        self._loop: LoopingCall | None = None
        self.sent = 0           # 2xx answers
        self.failed = 0         # other answers (each retried or given up)
        self.dropped = 0        # entries dropped: gone, given up, collapsed, no shape

    # -- the loop -----------------------------------------------------------------------------

    def startService(self) -> None:
        service.Service.startService(self)
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(self.poll, now=True)

    def _tick(self) -> None:
        self.kick()
        self._backlog()

    def stopService(self) -> Any:
        service.Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        # what is in flight is sent again after the restart (at least once)
        return self._settling

    def heard(self, event: Any) -> None:
        """A committed event (subscriber of the queue's stream): look for work now."""
        if self.running:
            self.kick()

    def _backlog(self) -> None:
        if self.metrics is not None:
            self.spool.hooks_pending().addCallbacks(self.metrics.webhook_backlog,
                                                    lambda f: None)

    def kick(self) -> None:
        if self._round is not None:
            self._again = True
            return
        self._again = False
        self._round = self._run_round()

        def done(_: Any) -> None:
            self._round = None
            if self._again and self.running:
                self.kick()

        self._round.addErrback(lambda f: log.failure("webhook round failed", f))
        self._round.addBoth(done)

    def _run_round(self) -> Deferred[Any]:
        room = self.max_inflight - len(self.inflight)
        if room <= 0:
            return succeed(None)
        return self.spool.hooks_due(self.reactor.seconds(), min(room, self.batch),
                                    frozenset(self.inflight)).addCallback(self._start)

    def _start(self, due: list[tuple[bytes, int, OutboxRecord]]) -> None:
        for key, attempts, record in due:
            if key in self.inflight:
                continue
            _, eid_endpoint, event_id = split_hook_key(key)
            endpoint = self.endpoints.get(eid_endpoint)
            if endpoint is None or endpoint.disabled or not self.collapser.should_send(record):
                self._drop(key)         # no longer configured, 410 Gone, or collapsed
                continue
            try:
                body = body_for(endpoint, event_id, record, self.suppression_categories)
            except Exception:
                log.failure("webhook body of a {kind} event of {id} failed: dropped",
                            kind=record.kind, id=record.message_id)
                body = None
            if body is None:            # the format has no shape for the event
                self._drop(key)
                continue
            self.inflight.add(key)
            self._limits[endpoint.id].run(self._send, endpoint, key, attempts, record,
                                          event_id, body)

    def _send(self, endpoint: Endpoint, key: bytes, attempts: int, record: OutboxRecord,
              event_id: bytes, body: bytes) -> Deferred[None]:
        stamp = int(self.reactor.seconds())
        headers = sign.headers(endpoint.secret, sign.msg_id_for(event_id), stamp, body)
        d = self.post(self.client, endpoint.url, body, headers, endpoint.timeout,
                      reactor=self.reactor)
        return d.addCallback(self._answered, endpoint, key, attempts, record)

    def _answered(self, result: Result, endpoint: Endpoint, key: bytes, attempts: int,
                  record: OutboxRecord) -> None:
        now = self.reactor.seconds()
        if self.metrics is not None:
            if result.outcome == "ok":
                self.metrics.webhook_success()
            else:
                from txmta.metrics import webhook_reason
                self.metrics.webhook_failure(webhook_reason(result.status, result.error))
        if result.outcome == "ok":
            self.sent += 1
            self._settled(key, None, 0)
            return
        self.failed += 1
        if result.outcome == "gone":
            if not endpoint.disabled:
                log.warn("webhook {url} answered 410 Gone: disabled until the next start",
                         url=endpoint.url)
            endpoint.disabled = True
            self.dropped += 1
            self._settled(key, None, 0)
            return
        wait = schedule.next_retry(attempts, schedule.retry_after_seconds(
            result.retry_after_header, now), age=max(0.0, now - record.time))
        if wait is None:
            log.warn("webhook {url}: {kind} event of {id} given up after {n} attempts "
                     "(last: {error})", url=endpoint.url, kind=record.kind,
                     id=record.message_id, n=attempts + 1, error=result.error)
            self.dropped += 1
            self._settled(key, None, 0)
            return
        self._settled(key, now + wait, attempts + 1)

    def _drop(self, key: bytes) -> None:
        self.dropped += 1
        self.inflight.add(key)
        self._settled(key, None, 0)

    def _settled(self, key: bytes, again: float | None, attempts: int) -> None:
        self._settle.append((key, again, attempts))
        if self._settling is None:
            self._settling = Deferred()
            self.reactor.callLater(0.02, self._flush)

    def _flush(self) -> None:
        batch, self._settle = self._settle, []
        waiting, self._settling = self._settling, None

        def done(_: Any) -> None:
            for key, _again, _n in batch:
                self.inflight.discard(key)
            assert waiting is not None
            waiting.callback(None)
            if self.running:
                self.kick()

        def failed(f: Any) -> None:
            log.failure("webhook results not stored; they are sent again", f)
            for key, _again, _n in batch:
                self.inflight.discard(key)
            assert waiting is not None
            waiting.callback(None)

        self.spool.hooks_settle(batch).addCallbacks(done, failed)


def build(cfg: Any, reactor: Any, spool: Any, metrics: Any = None) -> WebhookService:
    """The worker's webhook service for the [[webhook]] tables of `cfg`; tells the spool
    which events get deliveries."""
    from txmta.webhooks.post import http_client
    endpoints = [Endpoint.from_config(w) for w in cfg.webhooks]
    spool.set_hooks([(e.id, e.kinds) for e in endpoints])
    return WebhookService(reactor, spool, endpoints, client=http_client(reactor),
                          suppression_categories=cfg.suppression.categories, metrics=metrics)

