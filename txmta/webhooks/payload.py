"""The JSON bodies of webhook requests: txmta's own shape, and Postmark's record shapes.

Pure: no I/O, no clock (times come from the outbox record).  Both functions take the event
id, the `OutboxRecord` the spool kept (txmta.message) and the `MessageFacts` of its message
(what the submission said: tag, metadata, stream, token, ...), and return the body as bytes:
compact JSON, ASCII only, the same bytes for the same arguments.

**txmta format** (`txmta_payload`), after the Standard Webhooks convention of `type`,
`timestamp` and `data`::

    {"type": "message.delivered",          # "message." + the event kind
     "id": "msg_...",                      # the webhook-id (sign.msg_id_for), stable
     "timestamp": "2026-12-06T03:51:20.123456Z",   # the event's time, ISO 8601 UTC
     "data": {
        "message_id": "...",               # the queue id
        "recipient": "rcpt@example.org",   # "" for `received`
        "sender": "bounces@example.com",
        "tag": "", "metadata": {},         # as submitted
        "stream": "", "token": "",         # the MessageStream and the API token's name
        "subject": "",
        "reply": {"code": 250, "enhanced": "2.0.0", "text": "OK"},   # or null
        "remote": "mx.example.org[192.0.2.7]",
        "tls": "TLSv1.3 TLS_AES_256_GCM_SHA384",   # "" when the attempt was in clear
        "category": "",                    # txmta.categories for a failure, else ""
        "attempts": 1,
        "header_message_id": "<...@example.com>"}}

**postmark format** (`postmark_payload`): the records Postmark posts to its Delivery and
Bounce webhooks, field for field (names, JSON types, ISO 8601 times), so that a handler
written for Postmark works unchanged:

* `delivered` -> a Delivery record: RecordType "Delivery", ServerID, MessageStream,
  MessageID, Recipient, Tag, DeliveredAt, Details, Metadata.
* `bounced`, `expired`, `suppressed` -> a Bounce record: RecordType "Bounce", ID, Type,
  TypeCode, Name, Tag, MessageID, ServerID, MessageStream, Description, Details, Email,
  From, BouncedAt, DumpAvailable, Inactive, CanActivate, Subject, Content, Metadata.
* `received`, `deferred` and every other kind -> None: not sent in this format.  Postmark
  has no record for an accepted message, and none for a delay: its "Transient" type would
  make a Bounce record of a recipient that may still be delivered, and Postmark handlers
  take every Bounce record as a failure (our `deferred` goes to txmta-format endpoints).

What differs from Postmark, deliberately: ServerID is 0 (no servers here); ID is a number
derived from the event id (63 bits of its BLAKE2b hash: stable across retries, but there is
no bounce API to look it up in); DumpAvailable is false and Content "" (no bounce message
is kept: the failure is the SMTP reply); Details is the reply in the "smtp;" form of a
delivery status notification ("smtp;550 5.1.1 No such user"); MessageStream is "outbound"
when the message named none; CanActivate is true (an administrator can take an address off
the suppression list).  MessageID is whatever `message_id_form` makes of the queue id (the
caller passes the UUID form the Postmark-compatible API answers with).

Bounce types, from the event kind and the bounce category (txmta.categories):

    =================  =========================  ======================  ========
    category           bounced (permanent)        expired (gave up)       TypeCode
    =================  =========================  ======================  ========
    invalid-recipient  HardBounce                 SoftBounce              1 / 4096
    bad-domain         HardBounce                 DnsError                1 / 256
    mailbox-full       SoftBounce                 SoftBounce              4096
    policy             Blocked                    Blocked                 100006
    spam-block         Blocked                    Blocked                 100006
    rate-limited       SoftBounce                 SoftBounce              4096
    greylisted         SoftBounce                 SoftBounce              4096
    tls-failure        SoftBounce                 SoftBounce              4096
    dns-failure        DnsError                   DnsError                256
    other, none        Unknown                    SoftBounce              2048 / 4096
    =================  =========================  ======================  ========

`suppressed` (refused at intake: the address is on the suppression list) takes the
`bounced` type of the category that listed the address, and ManuallyDeactivated (100002)
when an administrator listed it (reason "manual", or any reason that is not a category).
Postmark's codes: HardBounce 1, Transient 2, DnsError 256, Unknown 2048, SoftBounce 4096,
ManuallyDeactivated 100002, Blocked 100006 (its other types do not arise from an SMTP reply).

Inactive says whether the address is now on the suppression list: always for `suppressed`;
for `bounced` when the caller says so, or else when the category is one of the suppression
categories it passes (`[suppression] categories`; by default invalid-recipient and
bad-domain); never for `expired` unless the caller says so.
"""
# test: tests/test_webhooks_payload.py

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Collection

from txmta import categories as C
from txmta.message import OutboxRecord
from txmta.webhooks.sign import msg_id_for


@dataclass(frozen=True)
class MessageFacts:
    """What the submission said about a message, kept beside the outbox record."""
    sender: str = ""
    header_id: str = ""                 # the Message-ID header
    tag: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    stream: str = ""                    # the MessageStream
    token: str = ""                     # the name of the API token that submitted it
    subject: str = ""


def iso8601(when: float) -> str:
    """`when` (seconds since the epoch) as ISO 8601 UTC with microseconds and a "Z"."""
    return (datetime.fromtimestamp(when, timezone.utc)
            .isoformat(timespec="microseconds").replace("+00:00", "Z"))


def _json(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _reply(record: OutboxRecord) -> dict[str, Any] | None:
    r = record.reply
    if not r:
        return None
    try:
        code = int(r.get("code", 0))  # type: ignore[call-overload]
    except (TypeError, ValueError):
        code = 0
    return {"code": code, "enhanced": str(r.get("enhanced", "")), "text": str(r.get("text", ""))}


# -- txmta format ---------------------------------------------------------------------------

def txmta_payload(event_id: bytes, record: OutboxRecord, facts: MessageFacts) -> bytes:
    """The body in txmta's own shape (see the module docstring)."""
    return _json({
        "type": f"message.{record.kind}",
        "id": msg_id_for(event_id),
        "timestamp": iso8601(record.time),
        "data": {
            "message_id": record.message_id,
            "recipient": record.rcpt,
            "sender": facts.sender,
            "tag": facts.tag,
            "metadata": dict(facts.metadata),
            "stream": facts.stream,
            "token": facts.token,
            "subject": facts.subject,
            "reply": _reply(record),
            "remote": record.remote,
            "tls": record.tls,
            "category": record.category,
            "attempts": record.attempts,
            "header_message_id": facts.header_id,
        },
    })


# -- postmark format ------------------------------------------------------------------------

@dataclass(frozen=True)
class BounceType:
    """One of Postmark's bounce types: Type, TypeCode, Name, and our Description."""
    type: str
    code: int
    name: str
    description: str


HARD_BOUNCE = BounceType("HardBounce", 1, "Hard bounce",
                         "The recipient's server refused the message for good: the "
                         "address or its domain does not exist.")
DNS_ERROR = BounceType("DnsError", 256, "DNS error",
                       "The recipient's domain could not be looked up or has no mail server.")
UNKNOWN = BounceType("Unknown", 2048, "Unknown",
                     "The recipient's server refused the message for a reason not classified.")
SOFT_BOUNCE = BounceType("SoftBounce", 4096, "Soft bounce",
                         "The message could not be delivered for a reason that may pass "
                         "(mailbox full, rate limits, temporary failures until it expired).")
MANUALLY_DEACTIVATED = BounceType("ManuallyDeactivated", 100002, "Manually deactivated",
                                  "The address was put on the suppression list by an "
                                  "administrator; the message was not sent to it.")
BLOCKED = BounceType("Blocked", 100006, "ISP block",
                     "The recipient's server refused the message by policy or as spam.")

BOUNCED_TYPES: dict[str, BounceType] = {
    C.INVALID_RECIPIENT: HARD_BOUNCE,
    C.BAD_DOMAIN: HARD_BOUNCE,
    C.MAILBOX_FULL: SOFT_BOUNCE,
    C.POLICY: BLOCKED,
    C.SPAM_BLOCK: BLOCKED,
    C.RATE_LIMITED: SOFT_BOUNCE,
    C.GREYLISTED: SOFT_BOUNCE,
    C.TLS_FAILURE: SOFT_BOUNCE,
    C.DNS_FAILURE: DNS_ERROR,
    C.OTHER: UNKNOWN,
}
EXPIRED_TYPES: dict[str, BounceType] = {
    C.BAD_DOMAIN: DNS_ERROR,
    C.DNS_FAILURE: DNS_ERROR,
    C.POLICY: BLOCKED,
    C.SPAM_BLOCK: BLOCKED,
}
DEFAULT_SUPPRESSION = frozenset({C.INVALID_RECIPIENT, C.BAD_DOMAIN})
POSTMARK_KINDS = ("delivered", "bounced", "expired", "suppressed")


def bounce_type(kind: str, category: str) -> BounceType:
    """The Postmark bounce type of a `bounced`, `expired` or `suppressed` event."""
    if kind == "expired":
        return EXPIRED_TYPES.get(category, SOFT_BOUNCE)
    if kind == "suppressed" and category not in BOUNCED_TYPES:
        return MANUALLY_DEACTIVATED
    return BOUNCED_TYPES.get(category, UNKNOWN)


def bounce_id(event_id: bytes) -> int:
    """A Postmark-like numeric bounce ID for an event: 63 bits of a hash of its id."""
    digest = hashlib.blake2b(event_id, digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def details(record: OutboxRecord) -> str:
    """The reply as a delivery status notification's diagnostic: "smtp;550 5.1.1 text"."""
    r = _reply(record)
    if r is None:
        return record.text
    text = " ".join(r["text"].splitlines())
    return "smtp;" + " ".join(str(p) for p in (r["code"] or "", r["enhanced"], text) if p)


def _identity(queue_id: str) -> str:
    return queue_id


def postmark_payload(event_id: bytes, record: OutboxRecord, facts: MessageFacts, *,
                     message_id_form: Callable[[str], str] = _identity,
                     inactive: bool | None = None,
                     suppression_categories: Collection[str] = DEFAULT_SUPPRESSION,
                     ) -> bytes | None:
    """The body as the Postmark Delivery or Bounce record (see the module docstring), or
    None for an event Postmark has no record for (`received`, `deferred`, ...).

    `message_id_form` turns the queue id into the MessageID handlers know; `inactive` says
    whether the event put the address on the suppression list (None: a `bounced` event did
    when its category is in `suppression_categories`)."""
    stream = facts.stream or "outbound"
    message_id = message_id_form(record.message_id)
    if record.kind == "delivered":
        return _json({
            "RecordType": "Delivery",
            "ServerID": 0,
            "MessageStream": stream,
            "MessageID": message_id,
            "Recipient": record.rcpt,
            "Tag": facts.tag,
            "DeliveredAt": iso8601(record.time),
            "Details": details(record),
            "Metadata": dict(facts.metadata),
        })
    if record.kind not in ("bounced", "expired", "suppressed"):
        return None
    kind = bounce_type(record.kind, record.category)
    if record.kind == "suppressed":
        now_inactive = True
    elif inactive is not None:
        now_inactive = inactive
    else:
        now_inactive = record.kind == "bounced" and record.category in suppression_categories
    return _json({
        "RecordType": "Bounce",
        "ID": bounce_id(event_id),
        "Type": kind.type,
        "TypeCode": kind.code,
        "Name": kind.name,
        "Tag": facts.tag,
        "MessageID": message_id,
        "ServerID": 0,
        "MessageStream": stream,
        "Description": kind.description,
        "Details": details(record),
        "Email": record.rcpt,
        "From": facts.sender,
        "BouncedAt": iso8601(record.time),
        "DumpAvailable": False,
        "Inactive": now_inactive,
        "CanActivate": True,
        "Subject": facts.subject,
        "Content": "",
        "Metadata": dict(facts.metadata),
    })
