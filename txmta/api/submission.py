"""What an HTTP submission asks for, as values: `Submission` (a message described by fields,
built into RFC 5322 by `txmta.api.mime`), `Attachment`, and `InvalidRequest` (why a request
was refused, with what each API answers).  Shared checks for both APIs live here too:
mailboxes, header fields, tags, metadata, message streams, recipient counts.

Pure: no I/O, no clock, no Twisted.  `txmta.api.postmark` and `txmta.api.native` turn JSON
into these values, each naming fields in its own way ("To", "to[2]").

Addresses (RFC 5322 3.4 mailboxes, split with the standard library's `email.headerregistry`):
one addr-spec with exactly one "@", a dot-atom local part of atext (RFC 5322 3.2.3) or of
UTF-8 characters (RFC 6531/6532: SMTPUTF8), and a domain that is a syntactically valid host
name (LDH labels or U-labels, `txmta.inbound.grammar.is_valid_domain`; no address literals).
The domain is kept as given, lower-cased (U-labels are not converted to A-labels; a message
with a non-ASCII address needs SMTPUTF8, see `Submission.needs_smtputf8`).  Quoted local
parts, source routes and groups are refused.  Display names may be any text without control
characters; they are kept decoded (an RFC 2047 encoded-word in the input is decoded).

A message may carry a deadline (`ExpiresAt`, an ISO 8601 timestamp, and/or `TTL`, seconds
from submission; the earlier counts): past it, it is not tried again and ends "expired"
(deadline.py).  `check_expires_at` and `check_ttl` read them; `deadline_of` (given the
time) refuses one already past with 422.

Postmark's limits are applied to both APIs: at most 50 recipients over To, Cc and Bcc; a tag
of at most 1000 characters; metadata of at most 10 fields, names of at most 20 characters,
values of at most 80.  Unlike Postmark we also refuse local parts with misplaced dots
("a..b", ".a"), which SMTP servers (ours included) refuse.
"""
# test: tests/test_api_postmark.py, tests/test_api_native.py, tests/test_api_mime.py

from __future__ import annotations

import base64
import binascii
import re
import string
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable
from email.headerregistry import Address, HeaderRegistry
from email.errors import HeaderDefect, InvalidHeaderDefect

from txmta.deadline import parse_iso8601
from txmta.inbound.grammar import is_valid_domain

__all__ = [
    "Attachment",
    "Submission",
    "InvalidRequest",
    "MAX_RECIPIENTS",
    "MAX_TAG",
    "MAX_METADATA_FIELDS",
    "MAX_METADATA_NAME",
    "MAX_METADATA_VALUE",
    "parse_mailbox",
    "parse_mailbox_list",
    "render_mailbox",
    "check_addr_spec",
    "check_header_field",
    "check_text",
    "check_recipient_count",
    "check_tag",
    "check_metadata",
    "check_stream",
    "check_expires_at",
    "check_ttl",
    "deadline_of",
    "check_attachment_name",
    "content_id",
    "content_type",
    "decode_base64",
    "make_attachment",
    "metadata_values",
    "simple_mailbox",
]

MAX_RECIPIENTS = 50         # To + Cc + Bcc of one message (Postmark)
MAX_TAG = 1000              # characters (Postmark)
MAX_METADATA_FIELDS = 10    # Postmark custom metadata limits
MAX_METADATA_NAME = 20
MAX_METADATA_VALUE = 80
MAX_STREAM = 100

_ATEXT = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~")   # RFC 5322 3.2.3
# Control characters, and everything str.splitlines() breaks on (the email package refuses
# header values containing any of them).
_HEADER_BREAKS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_FIELD_NAME = re.compile("[\x21-\x39\x3b-\x7e]+\\Z")    # RFC 5322 2.2 ftext
_STREAM = re.compile("[A-Za-z0-9_.-]+\\Z")
_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+\Z")   # RFC 6838 4.2
_CONTENT_ID = re.compile(r"[\x21-\x3b\x3d\x3f-\x7e]+\Z")    # printable ASCII but "<", ">"
_BASE64_SPACE = re.compile(r"[ \t\r\n]+")
_REGISTRY = HeaderRegistry()


class InvalidRequest(Exception):
    """A request we refuse, and how to answer it.

    `error_code` is Postmark's ErrorCode (300 invalid email request, 403 incompatible JSON,
    ...), `message` the sentence for the client, naming the field; `field` the field's name
    in the API that was used ("To", "Attachments[0].Name", "to[2]"), "" for the whole
    request; `status` the HTTP status (422 for Postmark's errors, 400 for malformed native
    requests, 401 for a bad token, 413 for too large)."""

    def __init__(self, error_code: int, message: str, field: str = "", status: int = 422) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.message = message
        self.field = field
        self.status = status

    def to_json(self) -> dict[str, str]:
        """The native API's error body: {"error": ..., "field": ..., "message": ...}."""
        kind = {401: "unauthorized", 413: "too_large"}.get(self.status, "invalid_request")
        return {"error": kind, "field": self.field, "message": self.message}

    def __repr__(self) -> str:
        return (f"InvalidRequest({self.error_code}, {self.message!r}, field={self.field!r}, "
                f"status={self.status})")


@dataclass(frozen=True)
class Attachment:
    """One attached file; with a `content_id` it is an inline part (an image the HTML body
    refers to as "cid:<content_id>")."""

    name: str
    content: bytes
    content_type: str
    content_id: str = ""


@dataclass(frozen=True)
class Submission:
    """A message described by fields.  Mailboxes are strings as `render_mailbox` writes them
    ("Name <a@example.com>", "\\"Doe, J\\" <j@example.com>" or a bare address); every one
    has been checked by the parser that made the Submission."""

    sender: str
    to: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    subject: str = ""
    text: str | None = None
    html: str | None = None
    reply_to: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    attachments: tuple[Attachment, ...] = ()
    tag: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    stream: str = ""
    expires_at: float | None = None     # ExpiresAt, epoch seconds
    ttl: float | None = None            # TTL, seconds from submission

    def envelope_sender(self) -> str:
        """The addr-spec of From: the reverse-path."""
        return parse_mailbox(self.sender, "From")[1]

    def envelope_recipients(self) -> tuple[str, ...]:
        """The addr-specs of To, Cc and Bcc in that order, each once (compared without
        regard to case; the first spelling stays)."""
        seen: set[str] = set()
        out: list[str] = []
        for mailbox in self.to + self.cc + self.bcc:
            addr = parse_mailbox(mailbox, "To")[1]
            if addr.lower() not in seen:
                seen.add(addr.lower())
                out.append(addr)
        return tuple(out)

    def needs_smtputf8(self) -> bool:
        """Whether an address (envelope or header) is not ASCII: then the message travels
        with SMTPUTF8 (RFC 6531) and its header carries UTF-8 (RFC 6532)."""
        mailboxes = (self.sender,) + self.to + self.cc + self.bcc + self.reply_to
        if all(m.isascii() for m in mailboxes):
            return False
        return any(not parse_mailbox(m, "From")[1].isascii() for m in mailboxes)


# --- addresses ------------------------------------------------------------------------------

def _bad_address(field_name: str, text: str) -> InvalidRequest:
    return InvalidRequest(300, f"Invalid '{field_name}' address: '{text}'.", field_name)


def _local_ok(local: str) -> bool:
    if not local:
        return False
    for atom in local.split("."):
        if not atom:
            return False
        for c in atom:
            if c in _ATEXT:
                continue
            if ord(c) < 0x80 or unicodedata.category(c)[0] in "CZ":
                return False
    return True


def check_addr_spec(addr: str, field_name: str) -> str:
    """`addr` as a bare addr-spec (no display name, no angle brackets), its domain
    lower-cased; raises InvalidRequest (300) naming `field_name`."""
    local, at, domain = addr.rpartition("@")
    if (not at or "@" in local or not _local_ok(local) or domain.startswith("[")
            or not is_valid_domain(domain, utf8=True)):
        raise _bad_address(field_name, addr)
    return f"{local}@{domain.lower()}"


def _mailbox(address: Address, field_name: str) -> tuple[str, str]:
    # Unicode white space at the ends goes too: a parser reading a UTF-8 header drops it.
    return address.display_name.strip(), check_addr_spec(f"{address.username}@{address.domain}",
                                                         field_name)


def _addresses(text: str, field_name: str) -> list[Address]:
    if _HEADER_BREAKS.search(text) or _SURROGATE.search(text):
        raise _bad_address(field_name, text)
    try:
        header = _REGISTRY("To", text)
    except Exception:       # the standard library's parser still trips on some input ("a@")
        raise _bad_address(field_name, text) from None
    defects: tuple[HeaderDefect, ...] = header.defects
    if any(isinstance(d, InvalidHeaderDefect) for d in defects):
        for address in header.addresses:    # name the first bad one, if it can be found
            try:
                _mailbox(address, field_name)
            except InvalidRequest:
                raise _bad_address(field_name, str(address).strip() or text) from None
        raise _bad_address(field_name, text)
    if any(group.display_name is not None for group in header.groups):
        raise _bad_address(field_name, text)
    return list(header.addresses)


def render_mailbox(display_name: str, addr: str) -> str:
    """The mailbox string a Submission keeps: the email package's own rendering."""
    local, _, domain = addr.rpartition("@")
    return str(Address(display_name=display_name, username=local, domain=domain))


# The common forms, "a@b" and "Plain Name <a@b>" in ASCII (letters, digits, spaces, dots,
# hyphens, apostrophes, underscores in the name), read without the email package's parser,
# which costs a third of a millisecond an address; anything else goes through it.
_SIMPLE_MAILBOX = re.compile(r"(?:([A-Za-z0-9][A-Za-z0-9 ._'-]*?) *<)?"
                             r"([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+)(?(1)>)\Z")


def simple_mailbox(text: str) -> tuple[str, str] | None:
    """(display name, addr-spec) of a mailbox in one of the common forms, else None.  The
    addr-spec is checked as parse_mailbox checks it; a name with a dot goes the long way
    (RFC 5322 wants it quoted)."""
    m = _SIMPLE_MAILBOX.match(text.strip())
    if m is None or "." in (m.group(1) or ""):
        return None
    local, _, domain = m.group(2).rpartition("@")
    if not _local_ok(local) or not is_valid_domain(domain, utf8=False):
        return None
    return (m.group(1) or "").strip(), f"{local}@{domain.lower()}"


def parse_mailbox(text: str, field_name: str) -> tuple[str, str]:
    """One mailbox ("Name <a@b>", "\\"Name\\" <a@b>", "a@b") → (display name, addr-spec).
    Raises InvalidRequest (300) naming `field_name`."""
    simple = simple_mailbox(text)
    if simple is not None:
        return simple
    addresses = _addresses(text, field_name)
    if len(addresses) != 1:
        raise _bad_address(field_name, text)
    return _mailbox(addresses[0], field_name)


def parse_mailbox_list(text: str, field_name: str) -> tuple[str, ...]:
    """A comma-separated list of mailboxes (commas inside quoted display names do not
    split; empty entries are skipped) → the rendered mailboxes."""
    parts = text.split(",")
    if all(simple_mailbox(p) is not None or not p.strip() for p in parts):
        return tuple(render_mailbox(*simple_mailbox(p)) for p in parts  # type: ignore[misc]
                     if p.strip())
    out = []
    for address in _addresses(text, field_name):
        name, addr = _mailbox(address, field_name)
        out.append(render_mailbox(name, addr))
    return tuple(out)


def check_recipient_count(to: tuple[str, ...], cc: tuple[str, ...], bcc: tuple[str, ...],
                          field_name: str = "To") -> None:
    """Postmark's limit: at most MAX_RECIPIENTS over To, Cc and Bcc."""
    if len(to) + len(cc) + len(bcc) > MAX_RECIPIENTS:
        raise InvalidRequest(
            300, f"Maximum of {MAX_RECIPIENTS} recipients allowed per email message "
                 f"(To, Cc and Bcc together).", field_name)


# --- header fields, text, tags, metadata, streams --------------------------------------------

STRUCTURAL_HEADERS = frozenset({
    "from", "to", "cc", "bcc", "subject", "reply-to",
    "mime-version", "content-type", "content-transfer-encoding",
})


def check_header_field(name: str, value: str, field_name: str) -> None:
    """An extra header field: the name is an RFC 5322 field name (printable ASCII but ":"),
    not one the message's fields set (From, To, Cc, Bcc, Subject, Reply-To, the MIME
    structure); the value has no CR, LF or other control character but HTAB."""
    if not _FIELD_NAME.match(name):
        raise InvalidRequest(300, f"Invalid header name in '{field_name}': '{name}'.", field_name)
    if name.lower() in STRUCTURAL_HEADERS:
        raise InvalidRequest(
            300, f"The header '{name}' may not be set in '{field_name}': it comes from the "
                 f"message's own fields.", field_name)
    if _HEADER_BREAKS.search(value) or _SURROGATE.search(value):
        raise InvalidRequest(
            300, f"Invalid value of header '{name}' in '{field_name}': line breaks and control "
                 f"characters are not allowed.", field_name)


def check_text(value: str, field_name: str, *, header: bool = False) -> str:
    """Text that can be encoded as UTF-8 (JSON may carry lone surrogates); for a header value
    (`header`), also no line breaks or control characters."""
    if _SURROGATE.search(value):
        raise InvalidRequest(300, f"Invalid '{field_name}': it is not Unicode text.", field_name)
    if header and _HEADER_BREAKS.search(value):
        raise InvalidRequest(300, f"Invalid '{field_name}': line breaks and control characters "
                                  f"are not allowed.", field_name)
    return value


def check_tag(tag: str, field_name: str) -> str:
    check_text(tag, field_name, header=True)
    if len(tag) > MAX_TAG:
        raise InvalidRequest(300, f"'{field_name}' is too long: at most {MAX_TAG} characters.",
                             field_name)
    return tag


def metadata_values(value: dict[str, Any], field_name: str,
                    bad: Callable[[str, str], InvalidRequest]) -> dict[str, str]:
    """A decoded metadata object as strings (numbers written out), checked; `bad(field,
    what)` is the API's error for a value of the wrong type."""
    out: dict[str, str] = {}
    for key, item in value.items():
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise bad(f"{field_name}.{key}", "a string or a number")
        out[key] = item if isinstance(item, str) else str(item)
    return check_metadata(out, field_name)


def make_attachment(name: str, content: str, content_field: str, ctype: str | None,
                    ctype_field: str, cid: str | None, cid_field: str) -> Attachment:
    """An attachment from its fields as given (content in base64), each checked under the
    field name the API uses."""
    return Attachment(name, decode_base64(content, content_field),
                      content_type(ctype, ctype_field),
                      content_id(cid, cid_field) if cid else "")


def check_metadata(metadata: dict[str, str], field_name: str) -> dict[str, str]:
    """Postmark's metadata limits: at most 10 fields, names of 1 to 20 characters, values of
    at most 80, no two names differing only in case."""
    if len(metadata) > MAX_METADATA_FIELDS:
        raise InvalidRequest(
            300, f"'{field_name}' has {len(metadata)} fields: at most {MAX_METADATA_FIELDS} are "
                 f"allowed.", field_name)
    seen: set[str] = set()
    for key, value in metadata.items():
        check_text(key, field_name, header=True)
        check_text(value, field_name, header=True)
        if not key or len(key) > MAX_METADATA_NAME:
            raise InvalidRequest(
                300, f"'{field_name}' field name '{key}' must have 1 to {MAX_METADATA_NAME} "
                     f"characters.", field_name)
        if len(value) > MAX_METADATA_VALUE:
            raise InvalidRequest(
                300, f"'{field_name}' value of '{key}' is too long: at most "
                     f"{MAX_METADATA_VALUE} characters.", field_name)
        if key.lower() in seen:
            raise InvalidRequest(
                300, f"'{field_name}' has the field name '{key}' twice (names are compared "
                     f"without regard to case).", field_name)
        seen.add(key.lower())
    return metadata


def check_stream(stream: str, field_name: str) -> str:
    """A message stream id: letters, digits, "_", "-", "." (the server decides whether it
    exists)."""
    if stream and (len(stream) > MAX_STREAM or not _STREAM.match(stream)):
        raise InvalidRequest(300, f"Invalid '{field_name}': '{stream}'.", field_name)
    return stream


# --- deadlines --------------------------------------------------------------------------------

MAX_TTL = 10 * 365 * 86400.0    # seconds: a TTL beyond any lifetime is surely a mistake


def check_expires_at(value: str, field_name: str) -> float:
    """An ISO 8601 timestamp ("2026-12-06T08:00:00Z"; UTC without an offset) as epoch
    seconds; InvalidRequest (300) naming `field_name` otherwise."""
    try:
        return parse_iso8601(value)
    except (ValueError, OverflowError):
        raise InvalidRequest(300, f"Invalid '{field_name}': '{value}' is not an ISO 8601 "
                                  f"timestamp such as 2026-12-06T08:00:00Z.",
                             field_name) from None


def check_ttl(value: float, field_name: str) -> float:
    """A number of seconds > 0 (the type is the caller's to check)."""
    if not value == value or not 0 < value <= MAX_TTL:      # NaN fails the first test
        raise InvalidRequest(300, f"Invalid '{field_name}': it must be a number of seconds "
                                  f"greater than 0 (at most {MAX_TTL:.0f}).", field_name)
    return float(value)


def deadline_of(expires_at: float | None, ttl: float | None, now: float,
                names: tuple[str, str] = ("ExpiresAt", "TTL")) -> float | None:
    """The message's deadline (epoch seconds) from `expires_at` and `ttl` (the earlier), or
    None without either; InvalidRequest (300, HTTP 422) naming the field when it has already
    passed at `now`."""
    candidates = [(t, name) for t, name in ((expires_at, names[0]),
                                            (None if ttl is None else now + ttl, names[1]))
                  if t is not None]
    if not candidates:
        return None
    when, name = min(candidates)
    if when <= now:
        raise InvalidRequest(300, f"'{name}' has already passed: the message would never be "
                                  f"delivered in time.", name)
    return when


# --- attachments -----------------------------------------------------------------------------

def decode_base64(text: str, where: str) -> bytes:
    """Base64 as clients send it: line breaks and spaces allowed, nothing else outside the
    alphabet."""
    try:
        return base64.b64decode(_BASE64_SPACE.sub("", text), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(300, f"Invalid '{where}': it is not base64.", where) from None


def content_id(value: str, where: str) -> str:
    """A Content-ID as given ("cid:x", "<x>", "x") → "x"; refuses spaces, "<", ">",
    non-ASCII, and more than 900 characters (the header line must fit in 998)."""
    cid = value.strip()
    if cid[:4].lower() == "cid:":
        cid = cid[4:]
    if cid.startswith("<") and cid.endswith(">"):
        cid = cid[1:-1]
    if not _CONTENT_ID.match(cid) or len(cid) > 900:
        raise InvalidRequest(300, f"Invalid '{where}': '{value}'.", where)
    return cid


def content_type(value: str | None, where: str) -> str:
    """A MIME type "type/subtype" (lower-cased); application/octet-stream when absent;
    multipart/* refused (an attachment is one part)."""
    if value is None or value == "":
        return "application/octet-stream"
    value = value.strip().lower()
    if not _CONTENT_TYPE.match(value) or value.startswith("multipart/"):
        raise InvalidRequest(300, f"Invalid '{where}': '{value}'.", where)
    return value


def check_attachment_name(name: str | None, where: str) -> str:
    """A file name, without white space at its ends (MUAs drop it); no control characters."""
    if not name or not name.strip():
        raise InvalidRequest(300, f"Invalid attachment: '{where}' is missing or empty.", where)
    check_text(name, where, header=True)
    return name.strip()
