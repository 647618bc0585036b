"""Webhook bodies: txmta's own shape, and Postmark's Delivery and Bounce records field for
field (names and JSON types as Postmark documents its webhooks)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given, strategies as st

from txmta import categories as C
from txmta.message import OutboxRecord
from txmta.reply import Reply
from txmta.webhooks.payload import MessageFacts, bounce_type, postmark_payload, txmta_payload
from txmta.webhooks.sign import msg_id_for

EID = bytes(range(15))
FACTS = MessageFacts(sender="app@example.com", header_id="<abc@example.com>", tag="welcome",
                     metadata={"user": "42"}, stream="outbound", token="web", subject="Hi")
T = 1765000000.25          # 2025-12-06T05:46:40.250000Z


def _record(kind: str = "delivered", **kw: Any) -> OutboxRecord:
    base: dict[str, Any] = dict(kind=kind, time=T, message_id="Q123", index=0,
                                rcpt="rcpt@example.org",
                                reply=Reply(250, "2.0.0", "OK queued").as_dict(),
                                remote="mx.example.org[192.0.2.7]", category="",
                                tls="TLSv1.3 TLS_AES_256_GCM_SHA384", attempts=1)
    base.update(kw)
    return OutboxRecord(**base)


# Postmark's documented webhook records: field -> JSON type.
DELIVERY_SHAPE = {
    "RecordType": str, "ServerID": int, "MessageStream": str, "MessageID": str,
    "Recipient": str, "Tag": str, "DeliveredAt": str, "Details": str, "Metadata": dict,
}
BOUNCE_SHAPE = {
    "RecordType": str, "ID": int, "Type": str, "TypeCode": int, "Name": str, "Tag": str,
    "MessageID": str, "ServerID": int, "MessageStream": str, "Description": str,
    "Details": str, "Email": str, "From": str, "BouncedAt": str, "DumpAvailable": bool,
    "Inactive": bool, "CanActivate": bool, "Subject": str, "Content": str, "Metadata": dict,
}
TXMTA_DATA_SHAPE = {
    "message_id": str, "recipient": str, "sender": str, "tag": str, "metadata": dict,
    "stream": str, "token": str, "subject": str, "reply": (dict, type(None)), "remote": str,
    "tls": str, "category": str, "attempts": int, "header_message_id": str,
}


def _shape(obj: dict[str, Any], shape: dict[str, Any]) -> None:
    assert set(obj) == set(shape)
    for key, kind in shape.items():
        assert isinstance(obj[key], kind) and not (kind is int and isinstance(obj[key], bool)), key


def _iso(text: str) -> float:
    assert text.endswith("Z")
    return datetime.fromisoformat(text).timestamp()


# -- txmta ------------------------------------------------------------------------------------

def test_txmta_payload_shape() -> None:
    body = json.loads(txmta_payload(EID, _record(), FACTS))
    assert set(body) == {"type", "id", "timestamp", "data"}
    assert body["type"] == "message.delivered"
    assert body["id"] == msg_id_for(EID)
    assert body["timestamp"] == "2025-12-06T05:46:40.250000Z"
    _shape(body["data"], TXMTA_DATA_SHAPE)
    assert body["data"]["reply"] == {"code": 250, "enhanced": "2.0.0", "text": "OK queued"}
    assert body["data"]["header_message_id"] == "<abc@example.com>"
    assert body["data"]["metadata"] == {"user": "42"}


def test_txmta_payload_without_reply_has_null() -> None:
    body = json.loads(txmta_payload(EID, _record("received", index=-1, rcpt="", reply=None), FACTS))
    assert body["type"] == "message.received" and body["data"]["reply"] is None


# -- postmark ---------------------------------------------------------------------------------

def test_delivered_is_a_postmark_delivery_record() -> None:
    body = json.loads(postmark_payload(EID, _record(), FACTS, message_id_form=lambda q: "uuid-" + q))
    _shape(body, DELIVERY_SHAPE)
    assert body["RecordType"] == "Delivery" and body["ServerID"] == 0
    assert body["MessageID"] == "uuid-Q123" and body["Recipient"] == "rcpt@example.org"
    assert body["Tag"] == "welcome" and body["Metadata"] == {"user": "42"}
    assert body["Details"] == "smtp;250 2.0.0 OK queued"
    assert _iso(body["DeliveredAt"]) == T


def test_bounced_is_a_postmark_bounce_record() -> None:
    rec = _record("bounced", reply=Reply(550, "5.1.1", "No such user").as_dict(),
                  category=C.INVALID_RECIPIENT)
    body = json.loads(postmark_payload(EID, rec, FACTS))
    _shape(body, BOUNCE_SHAPE)
    assert (body["RecordType"], body["Type"], body["TypeCode"]) == ("Bounce", "HardBounce", 1)
    assert body["Email"] == "rcpt@example.org" and body["From"] == "app@example.com"
    assert body["Details"] == "smtp;550 5.1.1 No such user"
    assert body["Inactive"] is True and body["CanActivate"] is True
    assert body["DumpAvailable"] is False and body["Content"] == ""
    assert body["Subject"] == "Hi" and body["MessageID"] == "Q123"
    assert _iso(body["BouncedAt"]) == T
    assert 0 <= body["ID"] < 2**63
    assert body["ID"] == json.loads(postmark_payload(EID, rec, FACTS))["ID"]   # stable


@pytest.mark.parametrize("kind, category, type_, code", [
    ("bounced", C.INVALID_RECIPIENT, "HardBounce", 1),
    ("bounced", C.BAD_DOMAIN, "HardBounce", 1),
    ("bounced", C.MAILBOX_FULL, "SoftBounce", 4096),
    ("bounced", C.POLICY, "Blocked", 100006),
    ("bounced", C.SPAM_BLOCK, "Blocked", 100006),
    ("bounced", C.RATE_LIMITED, "SoftBounce", 4096),
    ("bounced", C.GREYLISTED, "SoftBounce", 4096),
    ("bounced", C.TLS_FAILURE, "SoftBounce", 4096),
    ("bounced", C.DNS_FAILURE, "DnsError", 256),
    ("bounced", C.OTHER, "Unknown", 2048),
    ("bounced", "", "Unknown", 2048),
    ("expired", C.DNS_FAILURE, "DnsError", 256),
    ("expired", C.BAD_DOMAIN, "DnsError", 256),
    ("expired", C.SPAM_BLOCK, "Blocked", 100006),
    ("expired", C.GREYLISTED, "SoftBounce", 4096),
    ("expired", C.OTHER, "SoftBounce", 4096),
    ("expired", C.INVALID_RECIPIENT, "SoftBounce", 4096),
    ("suppressed", C.INVALID_RECIPIENT, "HardBounce", 1),
    ("suppressed", "manual", "ManuallyDeactivated", 100002),
    ("suppressed", "unsubscribed via the form", "ManuallyDeactivated", 100002),
])
def test_bounce_types(kind: str, category: str, type_: str, code: int) -> None:
    t = bounce_type(kind, category)
    assert (t.type, t.code) == (type_, code)
    body = json.loads(postmark_payload(EID, _record(kind, category=category), FACTS))
    assert (body["Type"], body["TypeCode"]) == (type_, code)


@pytest.mark.parametrize("kind, category, given_, expected", [
    ("bounced", C.INVALID_RECIPIENT, None, True),
    ("bounced", C.MAILBOX_FULL, None, False),
    ("bounced", C.MAILBOX_FULL, True, True),           # the caller knows better
    ("bounced", C.INVALID_RECIPIENT, False, False),
    ("expired", C.INVALID_RECIPIENT, None, False),
    ("suppressed", "manual", False, True),             # on the list by definition
])
def test_inactive(kind: str, category: str, given_: bool | None, expected: bool) -> None:
    body = json.loads(postmark_payload(EID, _record(kind, category=category), FACTS,
                                       inactive=given_))
    assert body["Inactive"] is expected


def test_inactive_follows_the_given_suppression_categories() -> None:
    rec = _record("bounced", category=C.MAILBOX_FULL)
    body = json.loads(postmark_payload(EID, rec, FACTS,
                                       suppression_categories={C.MAILBOX_FULL}))
    assert body["Inactive"] is True


@pytest.mark.parametrize("kind", ["received", "deferred", "deleted", "dsn", "held",
                                  "suppression-added"])
def test_kinds_postmark_has_no_record_for_are_not_sent(kind: str) -> None:
    assert postmark_payload(EID, _record(kind), FACTS) is None


def test_no_stream_is_outbound_for_postmark() -> None:
    body = json.loads(postmark_payload(EID, _record(), MessageFacts()))
    assert body["MessageStream"] == "outbound" and body["Tag"] == "" and body["Metadata"] == {}


def test_multiline_reply_is_one_line_in_details() -> None:
    rec = _record("bounced", reply=Reply(550, "5.7.1", "Blocked\nsee https://x").as_dict())
    assert json.loads(postmark_payload(EID, rec, FACTS))["Details"] == \
        "smtp;550 5.7.1 Blocked see https://x"


# -- any record -------------------------------------------------------------------------------

texts = st.text(max_size=40)
replies = st.one_of(st.none(), st.builds(
    lambda c, e, t: Reply(c, e, t).as_dict(),
    st.integers(200, 599), st.sampled_from(["", "2.0.0", "4.2.0", "5.1.1"]), texts))
records = st.builds(
    OutboxRecord,
    kind=st.sampled_from(["received", "deferred", "delivered", "bounced", "expired",
                          "suppressed"]),
    time=st.floats(min_value=0, max_value=4e9),
    message_id=texts, index=st.integers(-1, 1000), rcpt=texts, reply=replies, remote=texts,
    category=st.one_of(st.sampled_from(C.CATEGORIES + ("", "manual")), texts),
    tls=texts, attempts=st.integers(0, 1000), text=texts)
facts = st.builds(MessageFacts, sender=texts, header_id=texts, tag=texts,
                  metadata=st.dictionaries(texts, texts, max_size=5), stream=texts,
                  token=texts, subject=texts)


@given(eid=st.binary(min_size=15, max_size=15), record=records, f=facts)
def test_any_record_gives_ascii_json_of_the_documented_shapes(eid, record, f) -> None:
    raw = txmta_payload(eid, record, f)
    assert raw == txmta_payload(eid, record, f) and raw.isascii()
    body = json.loads(raw)
    assert body["type"] == "message." + record.kind
    _shape(body["data"], TXMTA_DATA_SHAPE)
    assert abs(_iso(body["timestamp"]) - record.time) < 1e-5
    pm = postmark_payload(eid, record, f)
    if record.kind in ("received", "deferred"):
        assert pm is None
        return
    assert pm is not None and pm.isascii()
    p = json.loads(pm)
    if record.kind == "delivered":
        _shape(p, DELIVERY_SHAPE)
        assert p["Recipient"] == record.rcpt
    else:
        _shape(p, BOUNCE_SHAPE)
        assert p["Email"] == record.rcpt and p["Metadata"] == f.metadata
        assert p["TypeCode"] in (1, 256, 2048, 4096, 100002, 100006)
