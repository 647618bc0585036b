"""Standard Webhooks signing: what we send verifies with the published `standardwebhooks`
library, and a tampered or stale request does not."""

from __future__ import annotations

import base64
import os
import time

import pytest
from hypothesis import given, settings, strategies as st
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from txmta.webhooks import sign

KEY = bytes(range(32))
SECRET = "whsec_" + base64.b64encode(KEY).decode()
event_ids = st.binary(min_size=15, max_size=15)


def _now() -> int:
    # the library checks the timestamp against its own clock: sign with the real time
    return int(time.time())


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=2000), eid=event_ids)
def test_a_signed_request_verifies_with_the_standard_library(body: bytes, eid: bytes) -> None:
    """Any body, any event id: the receiver's library accepts our headers."""
    headers = sign.headers(KEY, sign.msg_id_for(eid), _now(), body)
    Webhook(SECRET).verify(body, headers, json_parse=False)


@given(body=st.binary(min_size=1, max_size=500), flip=st.integers(min_value=0))
def test_a_tampered_body_fails(body: bytes, flip: int) -> None:
    headers = sign.headers(KEY, "msg_x", _now(), body)
    i = flip % len(body)
    tampered = body[:i] + bytes([body[i] ^ 1]) + body[i + 1:]
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(tampered, headers, json_parse=False)


def test_another_id_or_secret_fails() -> None:
    body = b'{"type":"message.delivered"}'
    headers = sign.headers(KEY, "msg_a", _now(), body)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body, {**headers, "webhook-id": "msg_b"}, json_parse=False)
    with pytest.raises(WebhookVerificationError):
        Webhook(sign.new_secret()).verify(body, headers, json_parse=False)


def test_an_old_timestamp_fails() -> None:
    """A request signed ten minutes ago is refused (the library's tolerance is five): each
    retry must be signed again with the time of the attempt."""
    body = b"{}"
    headers = sign.headers(KEY, "msg_a", _now() - 600, body)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(SECRET).verify(body, headers, json_parse=False)


def test_signature_matches_the_library_and_a_known_vector() -> None:
    """v1 + base64 of HMAC-SHA256 over "id.timestamp.body", as the library computes it."""
    from datetime import datetime, timezone
    body = b'{"a":1}'
    ours = sign.sign(KEY, "msg_p5jXN8AQM9LJsNx1", 1614265330, body)
    theirs = Webhook(SECRET).sign("msg_p5jXN8AQM9LJsNx1",
                                  datetime.fromtimestamp(1614265330, timezone.utc), body)
    assert ours == theirs and ours.startswith("v1,")
    assert len(base64.b64decode(ours[3:])) == 32


def test_headers_are_the_four_names() -> None:
    h = sign.headers(KEY, "msg_a", 1700000000, b"{}")
    assert set(h) == {"webhook-id", "webhook-timestamp", "webhook-signature", "content-type"}
    assert h["webhook-timestamp"] == "1700000000"
    assert h["content-type"] == "application/json"


@given(eid=event_ids)
def test_msg_id_is_stable_url_safe_and_reversible(eid: bytes) -> None:
    mid = sign.msg_id_for(eid)
    assert mid == sign.msg_id_for(eid)
    assert mid.startswith("msg_") and len(mid) == 4 + 24
    assert all(c in "0123456789abcdefghijklmnopqrstuv" for c in mid[4:])
    assert sign.event_id_of(mid) == eid


@given(a=event_ids, b=event_ids)
def test_msg_ids_sort_as_event_ids_do(a: bytes, b: bytes) -> None:
    assert (a < b) == (sign.msg_id_for(a) < sign.msg_id_for(b))


def test_msg_id_wants_an_event_id() -> None:
    with pytest.raises(ValueError):
        sign.msg_id_for(b"short")
    with pytest.raises(ValueError):
        sign.event_id_of("evt_abc")


def test_new_secret_is_in_standard_form_and_loads(tmp_path) -> None:
    s = sign.new_secret()
    assert s.startswith("whsec_") and len(base64.b64decode(s[6:])) == 32
    assert sign.new_secret(lambda n: b"\x01" * n) == "whsec_" + base64.b64encode(b"\x01" * 32).decode()
    p = tmp_path / "secret"
    p.write_text(s + "\n")
    assert sign.load_secret(str(p)) == base64.b64decode(s[6:])


@pytest.mark.parametrize("text", [
    SECRET, SECRET + "\n", "  " + SECRET + " \r\n",
    base64.b64encode(KEY).decode(),                      # bare base64
    SECRET.rstrip("="),                                  # padding left out
])
def test_load_secret_accepts_the_forms(tmp_path, text: str) -> None:
    p = tmp_path / "secret"
    p.write_text(text)
    assert sign.load_secret(str(p)) == KEY


@pytest.mark.parametrize("content, why", [
    (b"", "empty"),
    (b"whsec_", "empty"),
    (b"whsec_not base64!", "not base64"),
    ("whsec_" + base64.b64encode(b"x" * 16).decode(), "16 bytes"),
    ("whsec_" + base64.b64encode(b"x" * 65).decode(), "65 bytes"),
    (b"\xff\xfe", "not ASCII"),
])
def test_load_secret_refuses_a_bad_file_naming_it(tmp_path, content, why: str) -> None:
    p = tmp_path / "secret"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as e:
        sign.load_secret(str(p))
    assert str(p) in str(e.value) and why in str(e.value)
    assert "whsec_" + base64.b64encode(b"x" * 16).decode() not in str(e.value)


def test_load_secret_names_an_unreadable_file(tmp_path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=f"{missing}: cannot read"):
        sign.load_secret(str(missing))
    if os.geteuid() != 0:
        p = tmp_path / "locked"
        p.write_text(SECRET)
        p.chmod(0)
        with pytest.raises(ValueError, match="cannot read"):
            sign.load_secret(str(p))
