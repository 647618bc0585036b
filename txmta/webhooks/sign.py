"""Standard Webhooks signatures: the secret, the id, and the three headers of a request.

Mirrored from Standard Webhooks (https://www.standardwebhooks.com, the "symmetric" scheme),
so that a receiver verifies with the published `standardwebhooks` libraries unchanged:

* a secret is `whsec_` + the base64 of 24 to 64 random bytes (`new_secret`); a file holding
  the bare base64 (without the prefix) is accepted too;
* `webhook-id` names the message and stays the same when it is sent again (ours is the
  event id: `msg_` + the 15 bytes in lower-case base32hex, 24 characters, which sort by time
  as the event ids do, are safe in URLs and never contain the "." of the signed content);
* `webhook-timestamp` is the time of the attempt in whole seconds: receivers refuse one more
  than about five minutes off their clock, so each retry is signed again with a fresh time
  (the id stays, the signature changes);
* `webhook-signature` is `v1,` + base64(HMAC-SHA256(secret, "id.timestamp.body")).

Deliberately not done: asymmetric (`v1a`, ed25519) signatures, and several signatures at
once for a secret rotation (a receiver accepts any of them; one secret per endpoint here).

Pure: no clock (the caller passes the timestamp); randomness only in `new_secret`, injectable.
"""
# test: tests/test_webhooks_sign.py

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from typing import Callable

PREFIX = "whsec_"
MIN_SECRET = 24          # bytes (Standard Webhooks: 24 to 64)
MAX_SECRET = 64
ID_PREFIX = "msg_"
EVENT_ID_SIZE = 15       # txmta.events: time, partition, counter, place


def new_secret(token_bytes: Callable[[int], bytes] = secrets.token_bytes) -> str:
    """A new secret in Standard Webhooks form: `whsec_` + base64 of 32 random bytes."""
    return PREFIX + base64.b64encode(token_bytes(32)).decode("ascii")


def parse_secret(text: str) -> bytes:
    """The key bytes of a secret written as `whsec_<base64>` or bare base64 (padding may
    be left out).  Raises ValueError saying what is wrong, never quoting the secret."""
    text = text.strip()
    if text.startswith(PREFIX):
        text = text[len(PREFIX):]
    if not text:
        raise ValueError("the secret is empty")
    padded = text + "=" * (-len(text) % 4)
    try:
        key = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the secret is not base64 (expected whsec_ followed by base64)") from None
    if not MIN_SECRET <= len(key) <= MAX_SECRET:
        raise ValueError(f"the secret has {len(key)} bytes; it must have {MIN_SECRET} to "
                         f"{MAX_SECRET} (make one with 'whsec_' + base64 of 32 random bytes)")
    return key


def load_secret(path: str) -> bytes:
    """The key bytes of the secret in the file `path` (surrounding whitespace ignored).

    Raises ValueError naming the file when it cannot be read or holds no usable secret.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(4096)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the webhook secret: {e.strerror or e}") from None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: the webhook secret is not ASCII text") from None
    try:
        return parse_secret(text)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def msg_id_for(event_id: bytes) -> str:
    """The `webhook-id` of an event: `msg_` + its id in lower-case base32hex."""
    if len(event_id) != EVENT_ID_SIZE:
        raise ValueError(f"an event id has {EVENT_ID_SIZE} bytes, not {len(event_id)}")
    return ID_PREFIX + base64.b32hexencode(event_id).decode("ascii").lower()


def event_id_of(msg_id: str) -> bytes:
    """The event id a `webhook-id` names (the inverse of `msg_id_for`)."""
    if not msg_id.startswith(ID_PREFIX):
        raise ValueError(f"{msg_id!r}: not a txmta webhook id")
    try:
        eid = base64.b32hexdecode(msg_id[len(ID_PREFIX):].upper())
    except (binascii.Error, ValueError):
        raise ValueError(f"{msg_id!r}: not a txmta webhook id") from None
    if len(eid) != EVENT_ID_SIZE:
        raise ValueError(f"{msg_id!r}: not a txmta webhook id")
    return eid


def sign(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,` + base64(HMAC-SHA256(secret, "msg_id.timestamp.body"))."""
    signed = f"{msg_id}.{int(timestamp)}.".encode("utf-8") + body
    digest = hmac.new(secret, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def headers(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one attempt: webhook-id, webhook-timestamp, webhook-signature and
    content-type.  `timestamp` is the time of this attempt (seconds since the epoch)."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
        "content-type": "application/json",
    }
