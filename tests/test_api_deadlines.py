"""Deadlines through the HTTP API: Postmark's ExpiresAt (ISO 8601) and TTL (seconds), the
native API's expires_at and ttl, the earlier of the two kept as the message's deadline; one
already past is refused with 422 naming the field, and nothing is stored.  Parsing is pure
(tables); the requests go through ApiResource over a memory spool with a Clock."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from txmta.api import native as N
from txmta.api import postmark as P
from txmta.api.server import ApiResource
from txmta.api.submission import InvalidRequest, deadline_of
from txmta.api.submit import Submitter
from txmta.api.tokens import RateLimiter, Token
from txmta.inbound.receiver import Receiver
from txmta.queue import Queue
from txmta.spool.memory import MemorySpool

NOW = 1_796_540_400.0           # 2026-12-06T07:00:00Z
LATER = "2026-12-06T08:00:00Z"  # NOW + 1 h
EARLIER = "2026-12-06T06:00:00Z"


def email(**extra: Any) -> dict[str, Any]:
    return dict({"From": "app@example.com", "To": "bob@example.org", "Subject": "code",
                 "TextBody": "123456"}, **extra)


def native(**extra: Any) -> dict[str, Any]:
    return dict({"from": "app@example.com", "to": ["bob@example.org"], "subject": "code",
                 "text": "123456"}, **extra)


# -- parsing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, expires_at, ttl", [
    ({}, None, None),
    ({"ExpiresAt": LATER}, NOW + 3600.0, None),
    ({"expiresat": "2026-12-06T09:00:00+01:00"}, NOW + 3600.0, None),   # any case; an offset
    ({"TTL": 600}, None, 600.0),
    ({"TTL": 0.5}, None, 0.5),
    ({"ExpiresAt": LATER, "TTL": 60}, NOW + 3600.0, 60.0),
    ({"ExpiresAt": None, "TTL": None}, None, None),                     # null: absent
])
def test_postmark_expires_at_and_ttl_are_read(fields, expires_at, ttl):
    sub = P.parse_email(email(**fields))
    assert (sub.expires_at, sub.ttl) == (expires_at, ttl)


@pytest.mark.parametrize("fields, code, field", [
    ({"ExpiresAt": 1796540400}, 403, "ExpiresAt"),          # a number: the wrong JSON type
    ({"TTL": "600"}, 403, "TTL"),
    ({"TTL": True}, 403, "TTL"),
    ({"ExpiresAt": "tomorrow"}, 300, "ExpiresAt"),
    ({"ExpiresAt": "06 Dec 2026"}, 300, "ExpiresAt"),
    ({"TTL": 0}, 300, "TTL"),
    ({"TTL": -5}, 300, "TTL"),
    ({"TTL": 1e20}, 300, "TTL"),
])
def test_postmark_bad_expires_at_or_ttl_is_refused_naming_the_field(fields, code, field):
    with pytest.raises(InvalidRequest) as e:
        P.parse_email(email(**fields))
    assert (e.value.error_code, e.value.field) == (code, field)
    assert field in e.value.message and e.value.status == 422


@pytest.mark.parametrize("fields, expires_at, ttl", [
    ({"expires_at": LATER}, NOW + 3600.0, None),
    ({"ttl": 600}, None, 600.0),
    ({"expires_at": LATER, "ttl": 60}, NOW + 3600.0, 60.0),
])
def test_native_expires_at_and_ttl_are_read_in_both_forms(fields, expires_at, ttl):
    parsed = N.parse_native(native(**fields))
    assert (parsed.expires_at, parsed.ttl) == (expires_at, ttl)
    assert (parsed.submission.expires_at, parsed.submission.ttl) == (expires_at, ttl)
    raw = N.parse_native(dict({"raw": base64.b64encode(b"Subject: x\r\n\r\nhi\r\n").decode(),
                               "envelope": {"from": "app@example.com",
                                            "to": ["bob@example.org"]}}, **fields))
    assert (raw.expires_at, raw.ttl) == (expires_at, ttl)


@pytest.mark.parametrize("fields, status, field", [
    ({"ttl": "600"}, 400, "ttl"),                           # malformed: the wrong JSON type
    ({"expires_at": 5}, 400, "expires_at"),
    ({"ExpiresAt": LATER}, 400, "ExpiresAt"),               # Postmark's name is unknown here
    ({"expires_at": "soon"}, 422, "expires_at"),            # a value we refuse
    ({"ttl": 0}, 422, "ttl"),
])
def test_native_bad_expires_at_or_ttl(fields, status, field):
    with pytest.raises(InvalidRequest) as e:
        N.parse_native(native(**fields))
    assert (e.value.status, e.value.field) == (status, field)


@pytest.mark.parametrize("expires_at, ttl, expected", [
    (None, None, None),
    (NOW + 3600.0, None, NOW + 3600.0),
    (None, 600.0, NOW + 600.0),
    (NOW + 3600.0, 600.0, NOW + 600.0),                     # the earlier counts
    (NOW + 60.0, 600.0, NOW + 60.0),
])
def test_deadline_of_is_the_earlier(expires_at, ttl, expected):
    assert deadline_of(expires_at, ttl, NOW) == expected


@pytest.mark.parametrize("expires_at, ttl, field", [
    (NOW - 1.0, None, "ExpiresAt"),
    (NOW, None, "ExpiresAt"),                               # at the deadline: too late
    (NOW - 1.0, 600.0, "ExpiresAt"),                        # the earlier one is named
])
def test_deadline_of_refuses_a_deadline_already_past(expires_at, ttl, field):
    with pytest.raises(InvalidRequest) as e:
        deadline_of(expires_at, ttl, NOW)
    assert (e.value.error_code, e.value.status, e.value.field) == (300, 422, field)
    assert "already passed" in e.value.message


# -- through the API ----------------------------------------------------------------------------

class Tokens:
    def check(self, presented: str | None) -> Token | None:
        return Token("app") if presented == "secret" else None


def api() -> tuple[ApiResource, MemorySpool, Clock]:
    clock = Clock()
    clock.advance(NOW)
    spool = MemorySpool()
    receiver = Receiver(Queue(spool, clock), "mta.example.net", clock)
    submitter = Submitter(receiver, suppressed=None, reject_suppressed=False,
                          max_message_size=1 << 20)
    return (ApiResource(submitter, Tokens(), RateLimiter(0), listener="api",  # type: ignore[arg-type]
                        hostname="mta.example.net", clock=clock), spool, clock)


def post(resource: ApiResource, path: bytes, body: Any) -> tuple[int, Any]:
    req = DummyRequest([])
    req.method, req.path, req.uri = b"POST", path, path
    req._disconnected = False
    req.too_large = False
    req.isSecure = lambda: False
    req.requestHeaders.setRawHeaders(b"authorization", [b"Bearer secret"])
    req.requestHeaders.setRawHeaders(b"content-type", [b"application/json"])
    req.content = io.BytesIO(json.dumps(body).encode())
    out = resource.render(req)
    data = b"".join(req.written) if out is NOT_DONE_YET else out
    return req.responseCode or 200, json.loads(data)


def stored(spool: MemorySpool) -> list[Any]:
    return list(spool.messages.values())


@pytest.mark.parametrize("path, body, expires", [
    (b"/email", email(TTL=600), NOW + 600.0),
    (b"/email", email(ExpiresAt=LATER), NOW + 3600.0),
    (b"/email", email(ExpiresAt=LATER, TTL=60), NOW + 60.0),
    (b"/email", email(), None),
    (b"/email", email(Headers=[{"Name": "X-Txmta-Expires", "Value": "5m"}]), NOW + 300.0),
    (b"/v1/messages", native(ttl=600), NOW + 600.0),
    (b"/v1/messages", native(expires_at=LATER), NOW + 3600.0),
    (b"/v1/messages", {"raw": base64.b64encode(b"X-Txmta-Expires: 2m\r\n\r\nhi\r\n").decode(),
                       "envelope": {"from": "app@example.com", "to": ["bob@example.org"]},
                       "ttl": 600}, NOW + 120.0),
])
def test_the_deadline_is_stored_with_the_message(path, body, expires):
    """The message's deadline is the earliest of the fields and its X-Txmta-Expires header
    field (an API token is a trusted client), which is not stored."""
    resource, spool, _ = api()
    status, answer = post(resource, path, body)
    assert status == 200, answer
    [message] = stored(spool)
    assert message.expires == expires
    assert b"X-Txmta-Expires" not in spool.bodies[message.id]


@pytest.mark.parametrize("body, named", [
    (email(ExpiresAt=EARLIER), "'ExpiresAt'"),
    (email(TTL=600, ExpiresAt=EARLIER), "'ExpiresAt'"),
    (email(Headers=[{"Name": "X-Txmta-Expires", "Value": EARLIER}]), "X-Txmta-Expires"),
])
def test_postmark_refuses_a_past_deadline_with_422_error_code_300(body, named):
    """Postmark's error format: ErrorCode 300 and a Message naming the field."""
    resource, spool, _ = api()
    status, answer = post(resource, b"/email", body)
    assert status == 422 and answer["ErrorCode"] == 300 and answer["MessageID"] == ""
    assert "already passed" in answer["Message"] and named in answer["Message"]
    assert stored(spool) == [] and spool.bodies == {}


def test_postmark_batch_refuses_only_the_late_message():
    resource, spool, _ = api()
    status, answers = post(resource, b"/email/batch", [email(TTL=60), email(ExpiresAt=EARLIER)])
    assert status == 200
    assert [a["ErrorCode"] for a in answers] == [0, 300]
    assert len(stored(spool)) == 1


@pytest.mark.parametrize("body, field", [
    (native(expires_at=EARLIER), "expires_at"),
    ({"raw": base64.b64encode(f"X-Txmta-Expires: {EARLIER}\r\n\r\nhi\r\n".encode()).decode(),
      "envelope": {"from": "app@example.com", "to": ["bob@example.org"]}}, "raw"),
])
def test_native_refuses_a_past_deadline_with_422_naming_the_field(body, field):
    resource, spool, _ = api()
    status, answer = post(resource, b"/v1/messages", body)
    assert status == 422
    assert answer["error"] == "invalid_request" and answer["field"] == field
    assert "already passed" in answer["message"]
    assert stored(spool) == [] and spool.bodies == {}
