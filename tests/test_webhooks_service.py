"""The webhook service over the spool's delivery entries: written with the events, sent
signed, removed after a 2xx only, retried with the same webhook-id, 410 disables, deferrals
collapsed, Postmark's format skips what it has no record for.  Time is a task.Clock; the
requests go to a stand-in that records them and answers as told."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pytest
from standardwebhooks import Webhook
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from txmta import outcome as O
from txmta.message import Address, Envelope, Labels, Recipient
from txmta.queue import Queue
from txmta.reply import Reply
from txmta.spool.memory import MemorySpool
from txmta.webhooks import sign
from txmta.webhooks.post import Result
from txmta.webhooks.service import Endpoint, WebhookService

T0 = 1_800_000_000.0
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OK = Reply(250, "2.0.0", "OK")
LATER = Reply(451, "4.3.0", "try later")
NO = Reply(550, "5.1.1", "no such user")


class Receiver:
    """Answers requests from a script (default 200) and keeps them."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self.script: list[Result] = []

    def __call__(self, client: Any, url: str, body: bytes, headers: Any, timeout: float,
                 reactor: Any = None) -> Any:
        # the library's own signature of the request (its verify() also wants the
        # timestamp near the machine's clock, which the task.Clock of these tests is not)
        when = datetime.fromtimestamp(int(headers["webhook-timestamp"]), timezone.utc)
        expected = Webhook(SECRET).sign(headers["webhook-id"], when, body.decode())
        assert headers["webhook-signature"] == expected
        self.requests.append((url, json.loads(body), dict(headers)))
        return succeed(self.script.pop(0) if self.script else Result("ok", 200))

    def kinds(self) -> list[str]:
        return [r[1].get("type") or r[1].get("RecordType") for r in self.requests]


def setup(kinds=("received", "delivered", "deferred", "bounced"), fmt="txmta"):
    clock = Clock()
    clock.advance(T0)
    spool = MemorySpool()
    endpoint = Endpoint("https://hooks.example.net/x", frozenset(kinds), fmt,
                        sign.parse_secret(SECRET), 10.0)
    spool.set_hooks([(endpoint.id, endpoint.kinds)])
    queue = Queue(spool, clock, schedule=(60.0,), max_lifetime=3600.0, jitter=lambda: 0.0)
    receiver = Receiver()
    svc = WebhookService(clock, spool, [endpoint], post=receiver, poll=1.0)
    queue.events.subscribe(svc.heard)
    svc.startService()
    return clock, spool, queue, svc, receiver


def put(queue: Queue, clock: Clock, n: int = 1, labels=Labels()) -> Any:
    mid = queue.new_message_id(clock.seconds())
    body = queue.body_writer(mid)
    body.write(b"Subject: x\r\n\r\nhi\r\n")
    env = Envelope(Address("app", "example.com"),
                   tuple(Recipient(Address(f"u{i}", "dest.test")) for i in range(n)))
    out = []
    queue.put(mid, env, body, {"address": "192.0.2.1", "token": "billing"}, clock.seconds(),
              labels=labels).addCallback(out.append)
    return out[0]


def settle(clock: Clock) -> None:
    for _ in range(5):
        clock.advance(0.05)


def test_events_are_sent_signed_once_and_leave_after_2xx():
    clock, spool, queue, svc, receiver = setup()
    m = put(queue, clock, labels=Labels("receipts", (("order", "42"),), "outbound"))
    settle(clock)
    queue.record(m, {0: O.Delivered(OK)})
    settle(clock)
    assert receiver.kinds() == ["message.received", "message.delivered"]
    first = receiver.requests[1][1]
    assert first["data"]["recipient"] == "u0@dest.test" and first["data"]["tag"] == "receipts"
    assert first["data"]["metadata"] == {"order": "42"} and first["data"]["token"] == "billing"
    assert len(spool.hook_entries) == 0 and svc.sent == 2
    clock.advance(3600)
    assert len(receiver.requests) == 2           # nothing sent twice


def test_a_failure_is_retried_later_with_the_same_webhook_id():
    clock, spool, queue, svc, receiver = setup(kinds=("delivered",))
    receiver.script = [Result("retry", 500, None, "HTTP 500"), Result("retry", 503, "120", "x")]
    m = put(queue, clock)
    queue.record(m, {0: O.Delivered(OK)})
    settle(clock)
    assert len(receiver.requests) == 1 and len(spool.hook_entries) == 1
    clock.advance(4)
    assert len(receiver.requests) == 1           # the first retry waits 5 s
    clock.advance(1.5)
    settle(clock)
    assert len(receiver.requests) == 2           # answered 503, Retry-After 120
    clock.advance(100)
    settle(clock)
    assert len(receiver.requests) == 2
    clock.advance(30)
    settle(clock)
    assert len(receiver.requests) == 3 and len(spool.hook_entries) == 0
    ids = {r[2]["webhook-id"] for r in receiver.requests}
    assert len(ids) == 1                         # the same event every time
    stamps = [int(r[2]["webhook-timestamp"]) for r in receiver.requests]
    assert stamps == sorted(stamps) and stamps[0] < stamps[-1]   # signed at each attempt


def test_gone_disables_the_endpoint_and_drops_its_entries():
    clock, spool, queue, svc, receiver = setup(kinds=("received",))
    receiver.script = [Result("gone", 410)]
    put(queue, clock)
    settle(clock)
    put(queue, clock)
    settle(clock)
    clock.advance(10)
    assert len(receiver.requests) == 1 and len(spool.hook_entries) == 0
    assert svc.endpoints[next(iter(svc.endpoints))].disabled


def test_retries_end_after_three_days():
    clock, spool, queue, svc, receiver = setup(kinds=("received",))
    receiver.script = [Result("retry", 500)] * 100
    put(queue, clock)
    for _ in range(4 * 24 * 12):
        clock.advance(300)
    assert len(spool.hook_entries) == 0
    assert 10 <= len(receiver.requests) <= 30 and svc.dropped == 1


def test_deferrals_are_collapsed_per_recipient_per_hour():
    clock, spool, queue, svc, receiver = setup(kinds=("deferred", "bounced"))
    m = put(queue, clock, n=2)
    for _ in range(3):
        m = _record(queue, m, {0: O.TempFailed(LATER), 1: O.TempFailed(LATER)})
        clock.advance(61)
        settle(clock)
    assert [r[1]["data"]["recipient"] for r in receiver.requests] == ["u0@dest.test", "u1@dest.test"]
    _record(queue, m, {0: O.PermFailed(NO)})
    settle(clock)
    assert receiver.kinds()[-1] == "message.bounced"


def _record(queue: Queue, m: Any, outcomes: Any) -> Any:
    out = []
    queue.record(m, outcomes).addCallback(out.append)
    return out[0]


def test_postmark_format_sends_delivery_records_and_skips_received():
    clock, spool, queue, svc, receiver = setup(kinds=("received", "delivered"), fmt="postmark")
    m = put(queue, clock)
    _record(queue, m, {0: O.Delivered(OK)})
    settle(clock)
    assert len(receiver.requests) == 1 and len(spool.hook_entries) == 0
    record = receiver.requests[0][1]
    assert record["RecordType"] == "Delivery" and record["Recipient"] == "u0@dest.test"
    from txmta.api.postmark import uuid_to_queue_id
    assert uuid_to_queue_id(record["MessageID"]) == m.id


def test_only_wanted_kinds_get_entries():
    clock, spool, queue, svc, receiver = setup(kinds=("bounced",))
    m = put(queue, clock)
    _record(queue, m, {0: O.Delivered(OK)})
    assert spool.hook_entries == {} and receiver.requests == []


@pytest.mark.parametrize("store", ["memory", "lmdb"])
def test_spool_hook_entries_contract(store, open_lmdb, wait):
    """hooks_due gives due entries of the worker's partitions oldest first, passing over
    those in flight; hooks_settle removes or moves them with their count of attempts."""
    from txmta import events
    from txmta.message import OutboxRecord
    spool = MemorySpool() if store == "memory" else open_lmdb()
    spool.set_hooks([(b"EP01", frozenset({"delivered"})), (b"EP02", frozenset({"delivered", "received"}))])

    class E:
        def __init__(self, eid, kind, at):
            self.event_id, self.kind, self.at = eid, kind, at

        def record(self):
            return OutboxRecord(self.kind, self.at, "m", 0, "u@dest.test")

    ids = events.EventIds(3)
    entries = [E(events.event_id(ids.base(T0 + i), 0), k, T0 + i)
               for i, k in enumerate(["delivered", "received", "bounced"])]
    run = wait if store == "lmdb" else _now
    m = _message()
    run(spool.put(m, spool.body_writer(m.id), entries))
    due = run(spool.hooks_due(T0 + 100, 10))
    assert [(r.kind, k[9:13]) for k, _, r in due] == [("delivered", b"EP01"), ("delivered", b"EP02"),
                                                      ("received", b"EP02")]
    assert all(n == 0 for _, n, _ in due)
    assert run(spool.hooks_due(T0 + 100, 10, frozenset({due[0][0]})))[0][0] == due[1][0]
    assert run(spool.hooks_settle([(due[0][0], None, 0), (due[1][0], T0 + 500, 3)])) == 2
    left = run(spool.hooks_due(T0 + 100, 10))
    assert [k for k, _, _ in left] == [due[2][0]]
    later = run(spool.hooks_due(T0 + 500, 10))
    assert [(r.kind, n) for _, n, r in later] == [("received", 0), ("delivered", 3)]
    assert run(spool.hooks_pending()) == 2


def _now(d):
    out = []
    d.addCallback(out.append)
    return out[0]


def _message():
    from txmta.message import RecipientState, StoredMessage, new_message_id
    mid = new_message_id(T0)
    env = Envelope(Address("a", "example.com"), (Recipient(Address("u", "dest.test")),))
    return StoredMessage(mid, env, T0, 10, (RecipientState(next_attempt=T0),), {})
