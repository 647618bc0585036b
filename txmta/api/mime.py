"""Builds the RFC 5322 message of a `Submission`, with the standard library's `email` package.

Pure: no I/O, no clock (the caller passes the date, the id and the host name).

Structure (RFC 2046): text only → text/plain; HTML only → text/html; both →
multipart/alternative (text first); inline attachments (with a Content-ID) →
multipart/related around the HTML part, each with "Content-Disposition: inline" and
"Content-ID: <cid>" (without an HTML body they are ordinary attachments); other
attachments → multipart/mixed around all that.  Bodies are UTF-8, encoded quoted-printable
or base64 as the email package picks whenever they are not short-lined ASCII, so every line
stays within 998 octets (RFC 5322 2.1.1) and the body is 7-bit; attachments are base64,
except a message/rfc822 that is 7-bit clean, which is kept as it is (RFC 2046 5.2.1 allows no
other encoding).

Header (in this order): From, To, Cc (never Bcc), Reply-To, Subject (when not empty), Date
(RFC 5322 3.3, in UTC, from `date`) and Message-ID `<message_id@hostname>` unless the
submission's extra headers carry their own (then theirs are kept, and must parse),
the extra headers in their order, MIME-Version.  Non-ASCII text in Subject and display
names is RFC 2047-encoded, non-ASCII file names RFC 2231-encoded, by the email package.
Address fields carry one mailbox a line, each folded by the package on its own.  Line
breaks in bodies (LF, CR or CRLF) become CRLF.

SMTPUTF8: when any address of the submission has a non-ASCII addr-spec
(`Submission.needs_smtputf8`), the whole header is written in UTF-8 (RFC 6532, the package's
SMTPUTF8 policy): addresses, display names and Subject stay UTF-8 instead of being encoded,
since RFC 2047 may not encode an addr-spec.  Such a message must travel with SMTPUTF8 and
8BITMIME (`is_8bit` says whether it has any 8-bit octet).

Extra headers whose value is ASCII (or, in an SMTPUTF8 message, any value) are written as
given, folded only at white space: the package's refolding would turn a long URL or
msg-id (List-Unsubscribe, References) into encoded-words, which RFC 2047 5 forbids there.
Other values are unstructured text, RFC 2047-encoded.  Extra headers may not set From, To,
Cc, Bcc, Subject, Reply-To or the MIME structure (`InvalidRequest`, 300), nor give Date or
Message-ID twice or unparsable.
"""
# test: tests/test_api_mime.py

from __future__ import annotations

import re
from datetime import datetime, timezone
from email import policy
from email.headerregistry import Address, HeaderRegistry, UnstructuredHeader
from email.message import MIMEPart
from email.utils import format_datetime, parsedate_to_datetime

from txmta.api.submission import (
    Attachment,
    InvalidRequest,
    Submission,
    check_header_field,
    simple_mailbox,
    parse_mailbox,
)

__all__ = ["build_message", "message_id_header", "is_8bit"]

class _Registry(HeaderRegistry):
    """The standard header registry, making each header class once: Python 3.11's makes a
    new class with type() for every header field set (a tenth of the time a message took)."""

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        key = name.lower()
        made = self._made.get(key)
        if made is None:
            made = self._made[key] = super().__getitem__(name)
        return made


_REGISTRY = _Registry()
# 7-bit bodies; strings given with set_raw are written as they are (we fold them).
_ASCII = policy.SMTP.clone(cte_type="7bit", refold_source="none", header_factory=_REGISTRY)
_UTF8 = policy.SMTPUTF8.clone(cte_type="7bit", refold_source="none", header_factory=_REGISTRY)
_UNSTRUCTURED = HeaderRegistry(default_class=UnstructuredHeader, use_default_map=False)
_MSG_ID = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]+@[\x21-\x3b\x3d\x3f-\x7e]+>\Z")
_WSP_RUN = re.compile(r"(?<![ \t])(?=[ \t])")
_FOLD_AT = 78           # RFC 5322 2.1.1: SHOULD
_LINE_MAX = 998         # RFC 5322 2.1.1: MUST


def is_8bit(data: bytes) -> bool:
    """Whether a message has any octet above 127 (then it needs 8BITMIME or SMTPUTF8)."""
    return not data.isascii()


def message_id_header(sub: Submission, *, message_id: str, hostname: str) -> str:
    """The Message-ID the built message carries: the submission's own, or ours."""
    for name, value in sub.headers:
        if name.lower() == "message-id":
            return value.strip()
    return f"<{message_id}@{hostname}>"


def _address_field(msg: MIMEPart, name: str, texts: tuple[str, ...], field_name: str) -> None:
    """An address field, each mailbox encoded and folded by the email package on its own,
    one a line.  (Folding a whole list, Python 3.11's folder can encode the comma between two
    mailboxes into an encoded-word, losing every mailbox after it.)"""
    mailboxes = []
    for text in texts:
        simple = simple_mailbox(text)
        if simple is not None and len(name) + len(text) < _FOLD_AT - 2:
            # the email package would write it as it is: "Plain Name <a@b>" or "a@b"
            mailboxes.append(f"{simple[0]} <{simple[1]}>" if simple[0] else simple[1])
            continue
        display_name, addr = parse_mailbox(text, field_name)
        local, _, domain = addr.rpartition("@")
        header = msg.policy.header_factory(
            name, [Address(display_name=display_name, username=local, domain=domain)])
        mailboxes.append(header.fold(policy=msg.policy)[len(name) + 1:].strip())
    msg.set_raw(name, ",\r\n ".join(mailboxes))


def _fold(name: str, value: str, field_name: str) -> str:
    """`value` folded before white space where its line would pass 78 characters; refused
    (naming the request's `field_name`) when a line cannot be kept within 998 octets."""
    pieces = [p for p in _WSP_RUN.split(value) if p]
    lines = [""]
    width = len(name) + 2
    for piece in pieces:
        if lines[-1] and width + len(piece) > _FOLD_AT and piece.strip(" \t"):
            lines.append("")
            width = 0
        lines[-1] += piece
        width += len(piece)
    lines[0] = f"{name}: {lines[0]}"
    if any(len(line.encode("utf-8")) > _LINE_MAX for line in lines):
        raise InvalidRequest(300, f"The header '{name}' has a word too long for a line of "
                                  f"{_LINE_MAX} octets.", field_name)
    return "\r\n".join(lines)[len(name) + 2:]


def _check_extra(sub: Submission) -> set[str]:
    """The extra headers' names (lower case), after checking them again: a Submission made
    by hand must not slip a bad header through."""
    seen: set[str] = set()
    for name, value in sub.headers:
        check_header_field(name, value, "Headers")
        key = name.lower()
        if key in ("date", "message-id"):
            if key in seen:
                raise InvalidRequest(300, f"The header '{name}' is given twice in 'Headers'.",
                                     "Headers")
            if key == "date":
                try:
                    parsedate_to_datetime(value)
                except (TypeError, ValueError, IndexError):
                    raise InvalidRequest(300, f"Invalid 'Date' header in 'Headers': '{value}'.",
                                         "Headers") from None
            elif not _MSG_ID.match(value.strip()):
                raise InvalidRequest(300, f"Invalid 'Message-ID' header in 'Headers': "
                                          f"'{value}'.", "Headers")
        seen.add(key)
    return seen


def _attach(container: MIMEPart, att: Attachment, disposition: str, related: bool) -> None:
    maintype, _, subtype = att.content_type.partition("/")
    cte = "base64"
    if (att.content_type == "message/rfc822" and att.content.isascii()
            and all(len(line) <= _LINE_MAX for line in att.content.splitlines())):
        cte = "7bit"
    add = container.add_related if related else container.add_attachment
    add(att.content, maintype, subtype, cte=cte, disposition=disposition, filename=att.name)
    if att.content_id:
        part = container.get_payload()[-1]
        assert isinstance(part, MIMEPart)
        part.set_raw("Content-ID", _fold("Content-ID", f"<{att.content_id}>", "Attachments"))


def _text_kwargs(text: str) -> dict[str, str]:
    # 7bit text must not carry NUL (RFC 2045 2.7); quoted-printable encodes it.
    return {"charset": "utf-8", "cte": "quoted-printable"} if "\0" in text else {"charset": "utf-8"}


# anything but printable ASCII, tab and LF (str.splitlines, which set_content uses, breaks
# lines at CR, VT, FF and FS/GS/RS too)
_NOT_PLAIN = re.compile(r"[^\t\n\x20-\x7e]")


def _plain_7bit(text: str) -> bool:
    """Whether `text` goes as it is: printable ASCII, tabs and LFs, every line within 78
    characters (what set_content would send 7bit); then `_set_7bit` does its work."""
    return (_NOT_PLAIN.search(text) is None
            and all(len(line) <= _FOLD_AT for line in text.split("\n")))


def _set_7bit(msg: MIMEPart, text: str, subtype: str) -> None:
    """What set_content does for such a text, without its content manager's detours (a
    third of a message's building): the payload, Content-Type and Content-Transfer-Encoding
    header fields, ending in a line end as set_content's do."""
    msg.set_raw("Content-Type", f'text/{subtype}; charset="utf-8"')
    msg.set_raw("Content-Transfer-Encoding", "7bit")
    msg.set_payload(text if text.endswith("\n") else text + "\n")


def _single_7bit(sub: Submission) -> tuple[str, str] | None:
    """(text, subtype) of a message that is one part of plain 7-bit text, else None."""
    if sub.attachments or (sub.text is None) == (sub.html is None):
        return None
    text, subtype = (sub.text, "plain") if sub.text is not None else (sub.html, "html")
    return (text, subtype) if text is not None and _plain_7bit(text) else None


def _set_body(msg: MIMEPart, sub: Submission) -> None:
    single = _single_7bit(sub)
    if single is not None:
        _set_7bit(msg, *single)
        return
    if sub.text is None and sub.html is None:
        raise InvalidRequest(300, "Provide either email TextBody or HtmlBody or both.",
                             "TextBody")
    inline = [a for a in sub.attachments if a.content_id] if sub.html is not None else []
    files = [a for a in sub.attachments if not (a.content_id and sub.html is not None)]
    if sub.text is not None:
        msg.set_content(sub.text, **_text_kwargs(sub.text))
        if sub.html is not None:
            msg.add_alternative(sub.html, subtype="html", **_text_kwargs(sub.html))
    else:
        assert sub.html is not None
        msg.set_content(sub.html, subtype="html", **_text_kwargs(sub.html))
    if inline:
        html_part = msg if sub.text is None else msg.get_payload()[1]
        assert isinstance(html_part, MIMEPart)
        for att in inline:
            _attach(html_part, att, "inline", related=True)
    for att in files:
        _attach(msg, att, "attachment", related=False)


def build_message(sub: Submission, *, message_id: str, date: float, hostname: str) -> bytes:
    """The message of `sub` as bytes with CRLF line endings; raises InvalidRequest (300)
    for an extra header it refuses."""
    utf8 = sub.needs_smtputf8()
    pol = _UTF8 if utf8 else _ASCII
    extra = _check_extra(sub)
    msg = MIMEPart(policy=pol)
    _address_field(msg, "From", (sub.sender,), "From")
    for name, field_name, texts in (("To", "To", sub.to), ("Cc", "Cc", sub.cc),
                                    ("Reply-To", "ReplyTo", sub.reply_to)):
        if texts:
            _address_field(msg, name, texts, field_name)
    if sub.subject:
        if sub.subject.isascii() and sub.subject.isprintable():
            msg.set_raw("Subject", _fold("Subject", sub.subject, "Subject"))
        else:
            msg["Subject"] = sub.subject
    if "date" not in extra:    # ASCII we made: set as it is, the parser would only re-read it
        msg.set_raw("Date", format_datetime(datetime.fromtimestamp(date, timezone.utc)))
    if "message-id" not in extra:
        msg.set_raw("Message-ID", f"<{message_id}@{hostname}>")
    for name, value in sub.headers:
        if utf8 or value.isascii():
            msg.set_raw(name, _fold(name, value, "Headers"))
        else:
            msg.set_raw(name, _UNSTRUCTURED(name, value))
    msg["MIME-Version"] = "1.0"
    _set_body(msg, sub)
    if _single_7bit(sub) is not None:
        # one part of 7-bit lines: the header fields as the policy folds them, then the
        # lines with CRLF, the octets the generator writes without its line-by-line walk
        # (a fifth of an API request's time)
        head = b"".join(pol.fold_binary(name, value) for name, value in msg.raw_items())
        body = msg.get_payload()
        assert isinstance(body, str)
        return head + b"\r\n" + body.replace("\n", "\r\n").encode("ascii")
    return msg.as_bytes(policy=pol)
