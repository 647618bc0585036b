"""The native API `POST /v1/messages`: structured and raw requests, their errors."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txmta.api.native import NativeRequest, parse_native
from txmta.api.submission import Attachment, InvalidRequest, Submission


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def structured(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"from": "sender@example.com", "to": ["rcpt@example.net"],
                            "subject": "Hi", "text": "Hello"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


RAW = b"From: a@example.com\r\nSubject: x\r\n\r\nbody\r\n"


def raw(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"raw": b64(RAW),
                            "envelope": {"from": "a@example.com", "to": ["b@example.net"]}}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def refused(obj: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_native(obj)
    return info.value


def test_structured_fields_map_onto_a_submission() -> None:
    req = parse_native({
        "from": "Shop <Shop@Example.com>", "to": ["Ann <ann@example.net>", "b@example.net"],
        "cc": ['"Doe, J" <j@example.org>'], "bcc": ["hidden@example.org"],
        "reply_to": ["help@example.com"], "subject": "Receipt", "text": "t", "html": "<p>h</p>",
        "headers": {"X-Order": "42", "List-Unsubscribe": "<https://example.com/u>"},
        "attachments": [{"filename": "r.pdf", "content": b64(b"%PDF"),
                         "content_type": "application/pdf"},
                        {"filename": "l.png", "content": b64(b"PNG"), "content_type": "image/png",
                         "content_id": "logo"}],
        "tag": "receipt", "metadata": {"order": "42", "n": 7}, "stream": "outbound",
    })
    assert req.submission == Submission(
        sender="Shop <Shop@example.com>", to=("Ann <ann@example.net>", "b@example.net"),
        cc=('"Doe, J" <j@example.org>',), bcc=("hidden@example.org",), subject="Receipt",
        text="t", html="<p>h</p>", reply_to=("help@example.com",),
        headers=(("X-Order", "42"), ("List-Unsubscribe", "<https://example.com/u>")),
        attachments=(Attachment("r.pdf", b"%PDF", "application/pdf"),
                     Attachment("l.png", b"PNG", "image/png", "logo")),
        tag="receipt", metadata={"order": "42", "n": "7"}, stream="outbound")
    assert req.raw is None
    assert req.sender == "Shop@example.com"
    assert req.recipients == ("ann@example.net", "b@example.net", "j@example.org",
                              "hidden@example.org")
    assert (req.tag, req.metadata, req.stream) == ("receipt", {"order": "42", "n": "7"},
                                                   "outbound")
    assert not req.needs_smtputf8


def test_raw_request_keeps_the_message_byte_for_byte() -> None:
    """Bare LF line endings and 8-bit octets are kept: the spool must see what was sent."""
    message = b"From: a@example.com\nSubject: \xc3\xa9\n\nline\nlast line without newline"
    req = parse_native(raw(raw=b64(message), envelope={
        "from": "A@Example.COM", "to": ["b@example.net", "B@example.net", "c@bücher.example"]},
        tag="t", metadata={"k": "v"}, stream="bulk"))
    assert req == NativeRequest(raw=message, sender="A@example.com",
                                recipients=("b@example.net", "c@bücher.example"), tag="t",
                                metadata={"k": "v"}, stream="bulk")
    assert req.needs_smtputf8


def test_raw_null_sender() -> None:
    """An empty envelope sender is the null reverse-path (RFC 5321 4.5.5)."""
    req = parse_native(raw(envelope={"from": "", "to": ["b@example.net"]}))
    assert req.sender == ""


@pytest.mark.parametrize("obj, field, status", [
    ([], "", 400),
    ("x", "", 400),
    (structured(sbject="typo"), "sbject", 400),
    (structured(to="a@example.com"), "to", 400),
    (structured(to=["a@example.com", 5]), "to", 400),
    (structured(subject=5), "subject", 400),
    (structured(headers=[["X-A", "b"]]), "headers", 400),
    (structured(headers={"X-A": 1}), "headers.X-A", 400),
    (structured(attachments={"filename": "a"}), "attachments", 400),
    (structured(attachments=["a"]), "attachments[0]", 400),
    (structured(attachments=[{"filename": "a", "content": "eA==", "size": 1}]),
     "attachments[0].size", 400),
    (structured(metadata={"a": None}), "metadata.a", 400),
    (structured(**{"from": ...}), "from", 422),
    (structured(to=["good@example.com", "foo", "bad"]), "to[1]", 422),
    (structured(cc=["a@b@c"]), "cc[0]", 422),
    (structured(to=[], cc=[], bcc=[]), "to", 422),
    (structured(to=[f"r{i}@example.com" for i in range(51)]), "to", 422),
    (structured(text=..., html=""), "text", 422),
    (structured(subject="a\r\nb"), "subject", 422),
    (structured(headers={"To": "x@example.com"}), "headers", 422),
    (structured(headers={"X-A": "a\nb"}), "headers", 422),
    (structured(attachments=[{"filename": "a.txt", "content": "%%%"}]),
     "attachments[0].content", 422),
    (structured(attachments=[{"content": "eA=="}]), "attachments[0].filename", 422),
    (structured(tag="t" * 1001), "tag", 422),
    (structured(metadata={str(i): "v" for i in range(11)}), "metadata", 422),
    (structured(stream="a b"), "stream", 422),
    (raw(to=["x@example.com"]), "to", 400),
    (raw(envelope=None), "envelope", 400),
    (raw(envelope={"to": ["b@example.net"]}), "envelope.from", 400),
    (raw(envelope={"from": "a@example.com", "to": "b@example.net"}), "envelope.to", 400),
    (raw(envelope={"from": "a@example.com", "to": ["b@example.net"], "x": 1}), "envelope.x",
     400),
    (raw(envelope={"from": "A <a@example.com>", "to": ["b@example.net"]}), "envelope.from",
     422),
    (raw(envelope={"from": "a@example.com", "to": []}), "envelope.to", 422),
    (raw(envelope={"from": "a@example.com", "to": ["b@example.net", "bad"]}), "envelope.to[1]",
     422),
    (raw(envelope={"from": "a@example.com", "to": [f"r{i}@example.com" for i in range(51)]}),
     "envelope.to", 422),
    (raw(raw=""), "raw", 422),
    (raw(raw="***"), "raw", 422),
    (raw(raw=b64(b"Subject: no separator\r\n")), "raw", 422),
    (raw(raw=b64(b"Subject: x\r\n\r\nNUL \0 here\r\n")), "raw", 422),
])
def test_errors_name_the_field(obj: Any, field: str, status: int) -> None:
    """Malformed requests are 400, refused values 422; always error_code 300 and the field."""
    err = refused(obj)
    assert (err.error_code, err.field, err.status) == (300, field, status)
    assert err.to_json() == {"error": "invalid_request", "field": field, "message": err.message}
    assert err.message


def test_bad_address_sentence() -> None:
    err = refused(structured(to=["ok@example.com", "foo"]))
    assert err.message == "Invalid 'to[1]' address: 'foo'."


def test_to_json_kinds() -> None:
    assert InvalidRequest(10, "m", status=401).to_json()["error"] == "unauthorized"
    assert InvalidRequest(300, "m", status=413).to_json()["error"] == "too_large"


@given(st.binary(min_size=1).filter(lambda b: b"\0" not in b))
def test_raw_content_round_trips(body: bytes) -> None:
    """Any NUL-free message with a separator comes back exactly."""
    message = b"Subject: x\r\n\r\n" + body
    assert parse_native(raw(raw=b64(message))).raw == message
