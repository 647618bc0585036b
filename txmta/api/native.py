"""The native submission API, `POST /v1/messages`: its JSON into a `NativeRequest`.

Pure: no I/O, no clock, no Twisted.

A request is either structured, fields in lower-case snake names that become a `Submission`
(built by `txmta.api.mime`):

    {"from": "Name <a@example.com>", "to": ["x@example.net", ...], "cc": [...], "bcc": [...],
     "reply_to": [...], "subject": "...", "text": "...", "html": "...",
     "headers": {"X-Name": "value", ...},
     "attachments": [{"filename": ..., "content": <base64>, "content_type": ...,
                      "content_id": ...}, ...],
     "tag": "...", "metadata": {"key": "value"}, "stream": "...",
     "expires_at": "2026-12-06T08:00:00Z", "ttl": 600}

or raw, a finished RFC 5322 message and its envelope:

    {"raw": <base64 message>, "envelope": {"from": "a@example.com" or "" (the null sender),
     "to": ["x@example.net", ...]}, "tag": ..., "metadata": ..., "stream": ...,
     "expires_at": ..., "ttl": ...}

`expires_at` (an ISO 8601 timestamp) and `ttl` (seconds) are the message's deadline, the
earlier of the two (Postmark's ExpiresAt and TTL); the server refuses one already past (422).

The raw message is kept byte for byte (line endings included: the spool and the next hop see
what the client sent); it is refused only when it contains NUL or has no empty line between
header and body.

The checks are those of the Postmark-compatible API (`txmta.api.submission`: mailboxes, 50
recipients, header fields, tag and metadata limits) with these differences: lists are JSON
arrays, not comma-separated strings; unknown fields are refused (400), as is a request that
mixes "raw" with structured fields; Postmark's forbidden attachment extensions are not
applied.  Errors are `InvalidRequest` with error_code 300, status 400 for a malformed request
(wrong JSON type, unknown field) and 422 for a value we refuse; the server renders
`InvalidRequest.to_json()`: {"error": "invalid_request", "field": "to[2]", "message": ...}.
"""
# test: tests/test_api_native.py

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from txmta.api.submission import (
    Attachment,
    InvalidRequest,
    MAX_RECIPIENTS,
    Submission,
    check_addr_spec,
    check_attachment_name,
    check_expires_at,
    check_header_field,
    check_recipient_count,
    check_stream,
    check_tag,
    check_text,
    check_ttl,
    decode_base64,
    make_attachment,
    metadata_values,
    parse_mailbox,
    render_mailbox,
)

__all__ = ["NativeRequest", "parse_native"]

_COMMON = frozenset({"tag", "metadata", "stream", "expires_at", "ttl"})
_STRUCTURED = frozenset({"from", "to", "cc", "bcc", "reply_to", "subject", "text", "html",
                         "headers", "attachments"}) | _COMMON
_RAW = frozenset({"raw", "envelope"}) | _COMMON
_ATTACHMENT = frozenset({"filename", "content", "content_type", "content_id"})


@dataclass(frozen=True)
class NativeRequest:
    """A parsed request.  Structured: `submission` is set and `raw` is None; raw: `raw`
    holds the message.  Either way `sender` (the reverse-path, "" for the null sender) and
    `recipients` are the envelope, and `tag`, `metadata`, `stream` are filled in."""

    submission: Submission | None = None
    raw: bytes | None = None
    sender: str = ""
    recipients: tuple[str, ...] = ()
    tag: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    stream: str = ""
    expires_at: float | None = None     # epoch seconds
    ttl: float | None = None            # seconds from submission

    @property
    def needs_smtputf8(self) -> bool:
        """Whether an envelope address (or, structured, a header address) is not ASCII."""
        if self.submission is not None:
            return self.submission.needs_smtputf8()
        return not all(a.isascii() for a in (self.sender,) + self.recipients)


def _malformed(where: str, what: str) -> InvalidRequest:
    return InvalidRequest(300, f"'{where}' must be {what}.", where, status=400)


def _string(obj: dict[str, Any], name: str, where: str | None = None) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _malformed(where or name, "a string")
    return check_text(value, where or name)


def _strings(obj: dict[str, Any], name: str) -> list[str]:
    value = obj.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _malformed(name, "a list of strings")
    return value


def _unknown(obj: dict[str, Any], known: frozenset[str], prefix: str = "") -> None:
    for key in obj:
        if key not in known:
            raise InvalidRequest(300, f"Unknown field '{prefix}{key}'.", f"{prefix}{key}",
                                 status=400)


def _mailboxes(obj: dict[str, Any], name: str) -> tuple[str, ...]:
    return tuple(render_mailbox(*parse_mailbox(text, f"{name}[{i}]"))
                 for i, text in enumerate(_strings(obj, name)))


def _headers(obj: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    value = obj.get("headers")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _malformed("headers", "an object of header names and values")
    out = []
    for name, header_value in value.items():
        if not isinstance(header_value, str):
            raise _malformed(f"headers.{name}", "a string")
        check_header_field(name, header_value, "headers")
        out.append((name, header_value))
    return tuple(out)


def _attachments(obj: dict[str, Any]) -> tuple[Attachment, ...]:
    value = obj.get("attachments")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _malformed("attachments", "a list of objects")
    out = []
    for i, item in enumerate(value):
        where = f"attachments[{i}]"
        if not isinstance(item, dict):
            raise _malformed(where, "an object")
        _unknown(item, _ATTACHMENT, f"{where}.")
        name = check_attachment_name(_string(item, "filename", f"{where}.filename"),
                                     f"{where}.filename")
        content = _string(item, "content", f"{where}.content")
        if content is None:
            raise InvalidRequest(300, f"'{where}.content' is missing.", f"{where}.content")
        out.append(make_attachment(
            name, content, f"{where}.content",
            _string(item, "content_type", f"{where}.content_type"), f"{where}.content_type",
            _string(item, "content_id", f"{where}.content_id"), f"{where}.content_id"))
    return tuple(out)


def _metadata(obj: dict[str, Any]) -> dict[str, str]:
    value = obj.get("metadata")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _malformed("metadata", "an object of strings")
    return metadata_values(value, "metadata", _malformed)


def _common(obj: dict[str, Any]) -> dict[str, Any]:
    """The fields both forms have, as NativeRequest keywords."""
    expires_at = _string(obj, "expires_at")
    ttl = obj.get("ttl")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float))):
        raise _malformed("ttl", "a number of seconds")
    return {"tag": check_tag(_string(obj, "tag") or "", "tag"), "metadata": _metadata(obj),
            "stream": check_stream(_string(obj, "stream") or "", "stream"),
            "expires_at": None if expires_at is None else check_expires_at(expires_at,
                                                                           "expires_at"),
            "ttl": None if ttl is None else check_ttl(ttl, "ttl")}


def _dedupe(addresses: list[str]) -> tuple[str, ...]:
    seen: set[str] = set()
    out = []
    for addr in addresses:
        if addr.lower() not in seen:
            seen.add(addr.lower())
            out.append(addr)
    return tuple(out)


def _parse_raw(obj: dict[str, Any]) -> NativeRequest:
    for key in obj:
        if key in _STRUCTURED and key not in _RAW:
            raise InvalidRequest(300, f"'{key}' cannot be given with 'raw'.", key, status=400)
    _unknown(obj, _RAW)
    raw_text = _string(obj, "raw")
    if not raw_text:
        raise InvalidRequest(300, "'raw' is empty.", "raw")
    raw = decode_base64(raw_text, "raw")
    if b"\0" in raw:
        raise InvalidRequest(300, "Invalid 'raw': the message contains a NUL octet.", "raw")
    if b"\r\n\r\n" not in raw and b"\n\n" not in raw:
        raise InvalidRequest(300, "Invalid 'raw': the message has no empty line between "
                                  "header and body.", "raw")
    envelope = obj.get("envelope")
    if not isinstance(envelope, dict):
        raise _malformed("envelope", 'an object {"from": ..., "to": [...]}')
    _unknown(envelope, frozenset({"from", "to"}), "envelope.")
    sender = _string(envelope, "from", "envelope.from")
    if sender is None:
        raise InvalidRequest(300, "'envelope.from' is missing (\"\" is the null sender).",
                             "envelope.from", status=400)
    if sender:
        sender = check_addr_spec(sender, "envelope.from")
    to = envelope.get("to")
    if not isinstance(to, list) or not all(isinstance(v, str) for v in to):
        raise _malformed("envelope.to", "a list of strings")
    if not to:
        raise InvalidRequest(300, "Zero recipients specified", "envelope.to")
    recipients = _dedupe([check_addr_spec(check_text(a, f"envelope.to[{i}]"),
                                          f"envelope.to[{i}]") for i, a in enumerate(to)])
    if len(recipients) > MAX_RECIPIENTS:
        raise InvalidRequest(300, f"Maximum of {MAX_RECIPIENTS} recipients allowed per email "
                                  f"message.", "envelope.to")
    return NativeRequest(raw=raw, sender=sender, recipients=recipients, **_common(obj))


def _parse_structured(obj: dict[str, Any]) -> NativeRequest:
    _unknown(obj, _STRUCTURED)
    for name in ("from", "subject", "text", "html", "tag", "stream"):
        _string(obj, name)
    for name in ("to", "cc", "bcc", "reply_to"):
        _strings(obj, name)
    sender_text = _string(obj, "from")
    if not sender_text:
        raise InvalidRequest(300, "'from' is missing.", "from")
    sender = render_mailbox(*parse_mailbox(sender_text, "from"))
    to, cc, bcc = _mailboxes(obj, "to"), _mailboxes(obj, "cc"), _mailboxes(obj, "bcc")
    reply_to = _mailboxes(obj, "reply_to")
    if not (to or cc or bcc):
        raise InvalidRequest(300, "Zero recipients specified", "to")
    check_recipient_count(to, cc, bcc, "to")
    text = _string(obj, "text") or None
    html = _string(obj, "html") or None
    if text is None and html is None:
        raise InvalidRequest(300, "Provide 'text' or 'html' or both.", "text")
    subject = check_text(_string(obj, "subject") or "", "subject", header=True)
    common = _common(obj)
    sub = Submission(sender=sender, to=to, cc=cc, bcc=bcc, subject=subject, text=text,
                     html=html, reply_to=reply_to, headers=_headers(obj),
                     attachments=_attachments(obj), **common)
    return NativeRequest(submission=sub, sender=sub.envelope_sender(),
                         recipients=sub.envelope_recipients(), **common)


def parse_native(obj: Any) -> NativeRequest:
    """The JSON of `POST /v1/messages` (already decoded) → a NativeRequest; raises
    InvalidRequest."""
    if not isinstance(obj, dict):
        raise InvalidRequest(300, "The request must be a JSON object.", status=400)
    if "raw" in obj:
        return _parse_raw(obj)
    return _parse_structured(obj)
