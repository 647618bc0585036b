"""Postmark-compatible submission: the JSON of `POST /email` and `POST /email/batch` into
`Submission` values, Postmark's errors, and the replies.

Pure: no I/O, no clock (the caller passes the time), no Twisted.

Mirrored from Postmark's API:
  * the fields and their JSON types: From, To, Cc, Bcc and ReplyTo as comma-separated
    strings ("Name <a@b>" allowed; a comma inside a quoted display name does not split),
    Subject, TextBody, HtmlBody, Headers as [{"Name", "Value"}], Attachments as
    [{"Name", "Content" (base64), "ContentType", "ContentID"}], Tag, Metadata, MessageStream;
    TrackOpens, TrackLinks and InlineCss are checked for their type and ignored;
  * field names match without regard to case, as Postmark's JSON reader is taken to do; an
    exact match wins; a JSON null is an absent field; unknown fields are ignored;
  * the errors: ErrorCode 300 (invalid email request) with a sentence naming the field,
    402 (invalid JSON), 403 (a known field of the wrong JSON type), 406 (inactive
    recipients), 409 (not JSON), 410 (more than 500 messages in a batch), 411 (forbidden
    attachment type, Postmark's list of extensions), 10 (bad token, HTTP 401); every reply,
    errors and batch items included, carries ErrorCode, Message, MessageID, SubmittedAt, To;
  * the limits: 50 recipients, 500 messages a batch, tag 1000 characters, metadata 10 fields
    of 20/80 characters;
  * MessageID is a UUID (client libraries parse it as one): `queue_id_to_uuid`.

Deliberately different:
  * sender signatures are not checked (the server's policy decides who may send as whom);
  * an attachment without ContentType is application/octet-stream; multipart/* is refused;
  * ContentID may be given as "cid:x", "<x>" or "x" (clients send all three);
  * Headers may not set From, To, Cc, Bcc, Subject, Reply-To or the MIME structure: the
    message's own fields do (Postmark lets a duplicate through);
  * two fields of our own: ExpiresAt (an ISO 8601 timestamp) and TTL (seconds): the
    message's deadline, the earlier of the two; one already past is refused (ErrorCode 300,
    HTTP 422, naming the field; the server checks it, knowing the time);
  * templates (`/email/withTemplate`) are not supported: `templates_unsupported` answers
    with ErrorCode 1101 (Postmark's "template not found");
  * the sentences of 402, 403, 409 and 411 are ours where Postmark's are not documented;
  * SubmittedAt is in UTC ("+00:00"), with Postmark's seven fractional digits; an error reply
    with no time gives "0001-01-01T00:00:00.0000000+00:00", the zero time of .NET and Go,
    which their clients parse.
"""
# test: tests/test_api_postmark.py

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

from txmta.api.submission import (
    Attachment,
    InvalidRequest,
    Submission,
    check_attachment_name,
    check_expires_at,
    check_header_field,
    check_recipient_count,
    check_stream,
    check_tag,
    check_text,
    check_ttl,
    make_attachment,
    metadata_values,
    parse_mailbox,
    parse_mailbox_list,
    render_mailbox,
)
from txmta.partition import ALPHABET as _ALPHABET

__all__ = [
    "MAX_BATCH",
    "FORBIDDEN_EXTENSIONS",
    "parse_email",
    "parse_batch",
    "to_field",
    "ok_response",
    "error_response",
    "format_submitted_at",
    "invalid_json",
    "json_required",
    "too_many_messages",
    "too_large",
    "inactive_recipients",
    "bad_token",
    "templates_unsupported",
    "queue_id_to_uuid",
    "uuid_to_queue_id",
]

MAX_BATCH = 500

# Postmark refuses attachments with these extensions (ErrorCode 411).
FORBIDDEN_EXTENSIONS = frozenset(
    "vbs exe bin bat chm com cpl crt hlp hta inf ins isp jse lnk mdb pcd pif reg scr sct shs "
    "vbe vba wsf wsh wsl msc msi msp mst".split())



# --- errors ----------------------------------------------------------------------------------

def invalid_json() -> InvalidRequest:
    """The body is not valid JSON."""
    return InvalidRequest(402, "Received invalid JSON input.")


def json_required() -> InvalidRequest:
    """The request does not say it carries JSON (Content-Type)."""
    return InvalidRequest(409, "JSON data required.")


def too_many_messages() -> InvalidRequest:
    """A batch of more than 500 messages."""
    return InvalidRequest(410, f"You may not send more than {MAX_BATCH} messages in a batch "
                               f"request.")


def too_large(limit: int) -> InvalidRequest:
    """The request body is over the server's limit (HTTP 413)."""
    return InvalidRequest(300, f"The request is larger than the limit of {limit} bytes.",
                          status=413)


def inactive_recipients(addresses: list[str]) -> InvalidRequest:
    """Every recipient is suppressed (hard bounce, complaint or manual suppression)."""
    return InvalidRequest(
        406, "You tried to send to recipient(s) that have been marked as inactive. Found "
             f"inactive addresses: {', '.join(addresses)}. Inactive recipients are ones that "
             "have generated a hard bounce, a spam complaint, or a manual suppression.", "To")


def bad_token() -> InvalidRequest:
    """No X-Postmark-Server-Token, or one the server does not know (HTTP 401)."""
    return InvalidRequest(10, "Request does not contain a valid Server token.", status=401)


def templates_unsupported() -> InvalidRequest:
    """The template endpoints: this server keeps no templates (Postmark's "template not
    found" code, so clients treat it as a request error)."""
    return InvalidRequest(
        1101, "Templates are not supported by this server: render the message and send it "
              "to /email.", "TemplateId")


def _incompatible(field: str, what: str) -> InvalidRequest:
    return InvalidRequest(403, f"Incompatible JSON input: '{field}' must be {what}.", field)


# --- fields ----------------------------------------------------------------------------------

class _Fields:
    """A JSON object's fields by name, matched as Postmark does: exact name first, then
    without regard to case; null counts as absent."""

    def __init__(self, obj: dict[str, Any]) -> None:
        self._obj = obj
        self._folded: dict[str, Any] = {}
        for key, value in obj.items():
            if isinstance(key, str):
                self._folded.setdefault(key.lower(), value)

    def get(self, name: str) -> Any:
        if name in self._obj:
            return self._obj[name]
        return self._folded.get(name.lower())

    def string(self, name: str, where: str | None = None) -> str | None:
        value = self.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise _incompatible(where or name, "a string")
        return check_text(value, where or name)

    def number(self, name: str) -> float | None:
        value = self.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _incompatible(name, "a number")
        return float(value)

    def boolean(self, name: str) -> None:
        value = self.get(name)
        if value is not None and not isinstance(value, bool):
            raise _incompatible(name, "true or false")


def to_field(obj: Any) -> str:
    """The To field of a request as given, for the reply ("" when there is none)."""
    if isinstance(obj, dict):
        value = _Fields(obj).get("To")
        if isinstance(value, str):
            return value
    return ""


def _mailboxes(fields: _Fields, name: str) -> tuple[str, ...]:
    text = fields.string(name)
    return parse_mailbox_list(text, name) if text else ()


def _headers(fields: _Fields) -> tuple[tuple[str, str], ...]:
    value = fields.get("Headers")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _incompatible("Headers", 'a list of {"Name": ..., "Value": ...} objects')
    out = []
    for i, item in enumerate(value):
        where = f"Headers[{i}]"
        if not isinstance(item, dict):
            raise _incompatible(where, 'an object {"Name": ..., "Value": ...}')
        one = _Fields(item)
        name = one.string("Name", f"{where}.Name")
        header_value = one.string("Value", f"{where}.Value") or ""
        if not name:
            raise InvalidRequest(300, f"Invalid header in 'Headers': '{where}.Name' is empty.",
                                 f"{where}.Name")
        check_header_field(name, header_value, "Headers")
        out.append((name, header_value))
    return tuple(out)


def _extension(name: str) -> str:
    base = name.rstrip(". ")     # Windows ignores trailing dots and spaces
    _, dot, ext = base.rpartition(".")
    return ext.lower() if dot else ""


def _attachments(fields: _Fields) -> tuple[Attachment, ...]:
    value = fields.get("Attachments")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _incompatible("Attachments", "a list of objects")
    out = []
    for i, item in enumerate(value):
        where = f"Attachments[{i}]"
        if not isinstance(item, dict):
            raise _incompatible(where, "an object")
        one = _Fields(item)
        name = check_attachment_name(one.string("Name", f"{where}.Name"), f"{where}.Name")
        if _extension(name) in FORBIDDEN_EXTENSIONS:
            raise InvalidRequest(411, f"Forbidden attachment type: '{name}'.", f"{where}.Name")
        content = one.string("Content", f"{where}.Content")
        if content is None:
            raise InvalidRequest(300, f"Invalid attachment: '{where}.Content' is missing.",
                                 f"{where}.Content")
        out.append(make_attachment(
            name, content, f"{where}.Content",
            one.string("ContentType", f"{where}.ContentType"), f"{where}.ContentType",
            one.string("ContentID", f"{where}.ContentID"), f"{where}.ContentID"))
    return tuple(out)


def _metadata(fields: _Fields) -> dict[str, str]:
    value = fields.get("Metadata")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _incompatible("Metadata", "an object of strings")
    return metadata_values(value, "Metadata", _incompatible)


def parse_email(obj: Any) -> Submission:
    """The JSON object of `POST /email` (already decoded) → a Submission; raises
    InvalidRequest."""
    if not isinstance(obj, dict):
        raise InvalidRequest(403, "Incompatible JSON input: the message must be a JSON "
                                  "object.")
    fields = _Fields(obj)
    # Types first, so a wrong type is a 403 whatever else is wrong.
    for name in ("From", "To", "Cc", "Bcc", "ReplyTo", "Subject", "TextBody", "HtmlBody",
                 "Tag", "MessageStream", "TrackLinks", "ExpiresAt"):
        fields.string(name)
    fields.number("TTL")
    for name in ("TrackOpens", "InlineCss"):
        fields.boolean(name)

    sender_text = fields.string("From")
    if not sender_text or not sender_text.strip():
        raise InvalidRequest(300, "Invalid 'From' value.", "From")
    sender = render_mailbox(*parse_mailbox(sender_text, "From"))
    to = _mailboxes(fields, "To")
    cc = _mailboxes(fields, "Cc")
    bcc = _mailboxes(fields, "Bcc")
    reply_to = _mailboxes(fields, "ReplyTo")
    if not (to or cc or bcc):
        raise InvalidRequest(300, "Zero recipients specified", "To")
    check_recipient_count(to, cc, bcc)

    text = fields.string("TextBody") or None
    html = fields.string("HtmlBody") or None
    if text is None and html is None:
        raise InvalidRequest(300, "Provide either email TextBody or HtmlBody or both.",
                             "TextBody")
    subject = check_text(fields.string("Subject") or "", "Subject", header=True)
    expires_at = fields.string("ExpiresAt")
    ttl = fields.number("TTL")
    return Submission(
        expires_at=None if expires_at is None else check_expires_at(expires_at, "ExpiresAt"),
        ttl=None if ttl is None else check_ttl(ttl, "TTL"),
        sender=sender, to=to, cc=cc, bcc=bcc, subject=subject, text=text, html=html,
        reply_to=reply_to, headers=_headers(fields), attachments=_attachments(fields),
        tag=check_tag(fields.string("Tag") or "", "Tag"), metadata=_metadata(fields),
        stream=check_stream(fields.string("MessageStream") or "", "MessageStream"))


def parse_batch(obj: Any) -> list[Submission | InvalidRequest]:
    """The JSON array of `POST /email/batch` → one Submission or InvalidRequest per message,
    in order (a bad message does not fail the others).  Raises InvalidRequest for the whole
    request: 403 when it is not an array, 410 for more than 500 messages."""
    if not isinstance(obj, list):
        raise InvalidRequest(403, "Incompatible JSON input: a batch must be a JSON array of "
                                  "messages.")
    if len(obj) > MAX_BATCH:
        raise too_many_messages()
    out: list[Submission | InvalidRequest] = []
    for item in obj:
        try:
            out.append(parse_email(item))
        except InvalidRequest as err:
            out.append(err)
    return out


# --- replies ---------------------------------------------------------------------------------

_ZERO_TIME = "0001-01-01T00:00:00.0000000+00:00"


def format_submitted_at(when: float) -> str:
    """ISO 8601 in UTC with seven fractional digits, the shape of Postmark's SubmittedAt:
    "2014-02-17T12:25:01.4178645+00:00"."""
    ticks = round(when * 10_000_000)
    seconds, fraction = divmod(ticks, 10_000_000)
    moment = datetime.fromtimestamp(seconds, timezone.utc)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{fraction:07d}+00:00"


def ok_response(message_id: str, to: str, submitted_at: float) -> dict[str, Any]:
    """The reply to an accepted message; `message_id` as the client sees it
    (`queue_id_to_uuid`)."""
    return {"To": to, "SubmittedAt": format_submitted_at(submitted_at),
            "MessageID": message_id, "ErrorCode": 0, "Message": "OK"}


def error_response(err: InvalidRequest, to: str = "",
                   submitted_at: float | None = None) -> dict[str, Any]:
    """The reply to a refused message (or batch item), with the same five keys."""
    when = _ZERO_TIME if submitted_at is None else format_submitted_at(submitted_at)
    return {"To": to, "SubmittedAt": when, "MessageID": "", "ErrorCode": err.error_code,
            "Message": err.message}


# --- message ids -----------------------------------------------------------------------------
#
# A queue id is 15 digits of the ids' alphabet (`txmta.partition.ALPHABET`, base 49): a number
# below 49**15 < 2**85.  A UUID has 128 bits, 6 of them fixed: the version, 8 (RFC 9562 5.8,
# bits 48-51) and the variant, 0b10 (bits 64-65).  The other 122 carry the id's number shifted
# to the top, so the UUIDs sort as the ids do (by time); the 37 bits below it are zero.  A
# UUID with any of them set, another version or variant, or a number of 49**15 or more is not
# one of ours.

_BASE = len(_ALPHABET)
_ID_LENGTH = 15
_ID_LIMIT = _BASE ** _ID_LENGTH
_SHIFT = 122 - _ID_LIMIT.bit_length()
_DIGIT = {c: i for i, c in enumerate(_ALPHABET)}
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


def queue_id_to_uuid(qid: str) -> str:
    """A queue id as a UUID string (8-4-4-4-12 lower-case hex, version 8); ValueError if
    `qid` is not a queue id."""
    if len(qid) != _ID_LENGTH or any(c not in _DIGIT for c in qid):
        raise ValueError(f"not a queue id: {qid!r}")
    number = 0
    for c in qid:
        number = number * _BASE + _DIGIT[c]
    payload = number << _SHIFT                       # 122 bits
    high = payload >> 74                             # 48 bits before the version
    middle = (payload >> 62) & 0xFFF                 # 12 bits after it
    low = payload & ((1 << 62) - 1)                  # 62 bits after the variant
    value = (high << 80) | (0x8 << 76) | (middle << 64) | (0b10 << 62) | low
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def uuid_to_queue_id(text: str) -> str | None:
    """The queue id a `queue_id_to_uuid` string stands for (any case), or None."""
    text = text.strip().lower()
    if not _UUID.match(text):
        return None
    value = int(text.replace("-", ""), 16)
    if (value >> 76) & 0xF != 0x8 or (value >> 62) & 0b11 != 0b10:
        return None
    payload = ((value >> 80) << 74) | (((value >> 64) & 0xFFF) << 62) | (value & ((1 << 62) - 1))
    if payload & ((1 << _SHIFT) - 1):
        return None
    number = payload >> _SHIFT
    if number >= _ID_LIMIT:
        return None
    digits = []
    for _ in range(_ID_LENGTH):
        number, r = divmod(number, _BASE)
        digits.append(_ALPHABET[r])
    return "".join(reversed(digits))
