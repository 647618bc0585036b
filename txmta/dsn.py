"""Builds delivery status notifications (RFC 3464) as message bytes ready to be spooled.

Pure: no I/O, no clock; the caller passes the times and the ids.  It does not decide whether a
report is owed beyond the sender's NOTIFY request (`owed`, RFC 3461 4.1), nor which recipients
go into one report: the queue passes every recipient of one round of one kind together, so a
message that fails for ten recipients gets one report, not ten.

A report is a multipart/report; report-type=delivery-status (RFC 6522) with three parts: a
human-readable text/plain explanation, the machine-readable message/delivery-status (RFC 3464
2.2 per-message fields, 2.3 one block per recipient), and the original message (RFC 3461 4.3
RET: message/rfc822 for FULL, text/rfc822-headers for HDRS; without RET the whole message
when small and not a success or delay report).  A message sent with SMTPUTF8, or with a
non-ASCII address, gets the RFC 6533 types instead: message/global-delivery-status with
"utf-8" address types, message/global or message/global-headers.

Lines end in CRLF and none is longer than 998 octets (RFC 5322 2.1.1): long diagnostic texts
are folded at spaces and cut into pieces when a word alone is too long.  Everything but the
original is 7bit unless the report is a global one; the original part is 8bit when it has
8-bit octets.  References: RFC 3461, 3463, 3464, 3834 (Auto-Submitted), 6522, 6533.
"""
# test: tests/test_dsn.py

from __future__ import annotations

import email.quoprimime
import email.utils
import re
import textwrap
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence

from txmta.message import NULL_ADDRESS, Address, Envelope, Recipient
from txmta.reply import Reply

FAILED = "failed"
DELAYED = "delayed"
DELIVERED = "delivered"
RELAYED = "relayed"
EXPANDED = "expanded"
ACTIONS = (FAILED, DELAYED, DELIVERED, RELAYED, EXPANDED)     # RFC 3464 2.3.3

EXPIRED_STATUS = "4.4.7"        # RFC 3463 3.5 X.4.7 "delivery time expired"
_DEFAULT_STATUS = {FAILED: "5.0.0", DELAYED: "4.0.0", DELIVERED: "2.0.0", RELAYED: "2.0.0",
                   EXPANDED: "2.0.0"}
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")               # RFC 3464 2.3.4

# Which NOTIFY keyword asks for which action (RFC 3461 4.1; "relayed" and "expanded" are
# success notices, RFC 3461 6.2.1).
_NOTIFY_FOR = {FAILED: "FAILURE", DELAYED: "DELAY", DELIVERED: "SUCCESS", RELAYED: "SUCCESS",
               EXPANDED: "SUCCESS"}

SUBJECTS = {
    FAILED: "Undelivered Mail Returned to Sender",
    DELAYED: "Delayed Mail (still being retried)",
    DELIVERED: "Successful Mail Delivery Report",
    EXPANDED: "Successful Mail Delivery Report",
    RELAYED: "Delivery Status Notification (relayed)",
}
SUBJECT_NOT_IN_TIME = "Undelivered Mail: not delivered in time"     # every failure a deadline
# The report's kind is the first action present in this order: a report with any failure
# is a failure report (and returns the message as one), then delays, then successes.
_KIND_ORDER = (FAILED, DELAYED, DELIVERED, EXPANDED, RELAYED)

MAX_LINE = 998          # octets, without CRLF (RFC 5322 2.1.1)
_FOLD_AT = 78           # RFC 5322 2.1.1 SHOULD
_MAX_DIAGNOSTIC = 4000  # characters of a reply's text kept in a report
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_HOST_AND_LITERAL = re.compile(r"^(?P<name>[^\[\]\s]+)\s*\[[^\]]*\]$")


@dataclass(frozen=True)
class RecipientReport:
    """What happened to one recipient, as the report tells it.

    `status` is the RFC 3463 code to report: the reply's enhanced code, "4.4.7" for an
    expiry; an empty or malformed one is replaced by `status_for(action, reply)`.
    `deadline` (epoch seconds) is set for an expiry by a deadline (the message's or its
    lane's, not the lifetime's): the report says it was not delivered in time.  `reply` is
    None when there was none (it expired before any attempt).
    """

    recipient: Recipient
    action: str
    status: str
    reply: Reply | None
    remote_mta: str = ""
    last_attempt: float | None = None
    will_retry_until: float | None = None
    deadline: float | None = None


def status_for(action: str, reply: Reply | None) -> str:
    """The status to report: the reply's enhanced code when it has a valid one, else the
    default of the action's class (5.0.0, 4.0.0, 2.0.0)."""
    if reply is not None and _STATUS.match(reply.enhanced.strip()):
        return reply.enhanced.strip()
    return _DEFAULT_STATUS[action]


def owed(recipient: Recipient, action: str) -> bool:
    """Whether the sender asked to hear about `action` for `recipient` (RFC 3461 4.1).

    Without NOTIFY, failures and delays are reported and successes are not; NOTIFY=NEVER
    asks for nothing; otherwise only the kinds listed (SUCCESS covers delivered, relayed and
    expanded).
    """
    if action not in _NOTIFY_FOR:
        raise ValueError(f"unknown DSN action {action!r}")
    notify = {n.upper() for n in recipient.notify}
    if not notify:
        return action in (FAILED, DELAYED)
    if "NEVER" in notify:
        return False
    return _NOTIFY_FOR[action] in notify


def envelope_for_report(envelope: Envelope, report: bytes | None = None) -> Envelope | None:
    """The report's own envelope: from <> to the original sender; None when the original
    sender is <> (never a bounce for a bounce, DESIGN invariant 7).

    SMTPUTF8 is asked for when the original was sent with it or its sender is non-ASCII.
    BODY=8BITMIME when the original was 8BITMIME or SMTPUTF8, or when `report` (the built
    report, if the caller passes it) has 8-bit octets.  A report on a REQUIRETLS message
    (RFC 8689) is sent with REQUIRETLS too: it quotes the original's header section.
    """
    sender = envelope.sender
    if sender.is_null:
        return None
    smtputf8 = envelope.smtputf8 or not sender.is_ascii
    eight = (envelope.body.upper() == "8BITMIME" or smtputf8
             or (report is not None and not report.isascii()))
    return Envelope(NULL_ADDRESS, (Recipient(sender),), size=None if report is None else len(report),
                    body="8BITMIME" if eight else "7BIT", smtputf8=smtputf8,
                    requiretls=envelope.requiretls)


# --- building -----------------------------------------------------------------------------

def build_report(*, envelope: Envelope, message_id: str, arrival: float,
                 reports: Sequence[RecipientReport], original: bytes, reporting_mta: str,
                 now: float, dsn_message_id: str, headers_only_above: int = 256 * 1024) -> bytes:
    """The report on `reports` (recipients of the message `message_id`) as bytes, CRLF lines.

    `original` is the message as stored (header and body); `arrival`, `now` and the reports'
    times are POSIX times; `dsn_message_id` becomes the report's Message-ID
    `<dsn_message_id@reporting_mta>`.
    """
    if not reports:
        raise ValueError("a delivery status notification needs at least one recipient report")
    for r in reports:
        if r.action not in ACTIONS:
            raise ValueError(f"unknown DSN action {r.action!r} (one of {', '.join(ACTIONS)})")
    kind = next(a for a in _KIND_ORDER if any(r.action == a for r in reports))
    mta = _clean(reporting_mta, ascii_only=True) or "localhost"
    utf8 = (envelope.smtputf8 or not envelope.sender.is_ascii
            or any(not _recipient_ascii(r.recipient) for r in reports))

    original = _crlf(original)
    returned, full = _returned_content(envelope.ret, kind, original, headers_only_above)

    human = _human_part(kind, mta, message_id, arrival, reports, returned)
    status = _status_part(envelope, message_id, arrival, reports, mta, utf8)
    parts = [human, status]
    if returned is not None:
        parts.append(_original_part(returned, full=full, utf8=utf8))

    boundary = _boundary(dsn_message_id, parts)
    eight_bit = any(not p.isascii() for p in parts)
    sender = _clean(str(envelope.sender), ascii_only=False)
    head = [
        _field("From", f"Mail Delivery System <MAILER-DAEMON@{mta}>"),
        _field("To", f"<{sender}>"),
        _field("Subject", SUBJECT_NOT_IN_TIME
               if kind == FAILED and all(r.deadline is not None for r in reports
                                         if r.action == FAILED) else SUBJECTS[kind]),
        _field("Date", _date(now)),
        _field("Message-ID", f"<{_clean(dsn_message_id, ascii_only=True)}@{mta}>"),
        _field("MIME-Version", "1.0"),
        _field("Auto-Submitted", "auto-replied"),                   # RFC 3834 5; RFC 3464 2
        _field("Content-Type", f'multipart/report; report-type=delivery-status;'
                               f' boundary="{boundary}"'),
        _field("Content-Transfer-Encoding", "8bit" if eight_bit else "7bit"),
    ]
    out = [b"".join(head), b"\r\n",
           b"This is a MIME-encapsulated message.\r\n"]
    delimiter = b"--" + boundary.encode("ascii")
    for part in parts:
        out.append(b"\r\n" + delimiter + b"\r\n")
        out.append(part)
    out.append(b"\r\n" + delimiter + b"--\r\n")
    return b"".join(out)


def _recipient_ascii(recipient: Recipient) -> bool:
    return recipient.address.is_ascii and (recipient.orcpt or "").isascii()


def _returned_content(ret: str | None, kind: str, original: bytes,
                      limit: int) -> tuple[bytes | None, bool]:
    """What to return of the original (RFC 3461 4.3; RFC 3464 2 "SHOULD" return only the
    headers in a report of successes) and whether it is the whole message: the message, its
    header section, or None when even that has a line too long to carry (RFC 5322 2.1.1).
    A whole message with a line too long is returned as its header section."""
    ret = (ret or "").upper()
    if ret == "FULL":
        full = True
    elif ret == "HDRS":
        full = False
    else:
        full = kind == FAILED and len(original) <= limit
    if full and _lines_fit(original):
        return original, True
    headers = _header_section(original)
    return (headers, False) if _lines_fit(headers) else (None, False)


def _human_part(kind: str, mta: str, message_id: str, arrival: float,
                reports: Sequence[RecipientReport], returned: bytes | None) -> bytes:
    intro = {
        FAILED: "Your message could not be delivered to one or more recipients. It is "
                "returned below together with the reasons.",
        DELAYED: "Your message has not been delivered yet to one or more recipients. The mail "
                 "system will keep trying; you do not need to send it again. You will be told "
                 "if it gives up.",
        DELIVERED: "Your message was delivered to the recipients listed below, as you "
                   "requested.",
        EXPANDED: "Your message was delivered to the recipients listed below, as you "
                  "requested.",
        RELAYED: "Your message was passed on to a mail system that does not send delivery "
                 "notifications; no further notification should be expected for the "
                 "recipients listed below.",
    }[kind]
    paras = [f"This is the mail system at host {mta}.", intro,
             f"Queue id {message_id}, received {_date(arrival)}."]
    for r in reports:
        lines = [f"<{_clean(str(r.recipient.address), ascii_only=False)}>: {_VERB[r.action]}"]
        if r.deadline is not None:
            lines.append(f"not delivered in time (deadline {_date(r.deadline)}); it will "
                         f"not be tried again")
        elif r.status == EXPIRED_STATUS:
            lines.append("it could not be delivered within the time allowed")
        if r.reply is not None:
            where = f"host {_remote_name(r.remote_mta)} said" if r.remote_mta else "the reply was"
            lines.append(f"{where}: {_diagnostic_text(r.reply, ascii_only=False)}")
        if r.action == DELAYED and r.will_retry_until is not None:
            lines.append(f"delivery will be tried until {_date(r.will_retry_until)}")
        paras.append("\n".join(lines))
    if returned is None:
        paras.append("The original message is not included: its lines are too long.")
    text = "\r\n\r\n".join(_wrap(p, indent=i >= 3) for i, p in enumerate(paras)) + "\r\n"
    raw = text.encode("utf-8")
    if raw.isascii():
        head = (_field("Content-Type", 'text/plain; charset="us-ascii"')
                + _field("Content-Description", "Notification")
                + _field("Content-Transfer-Encoding", "7bit"))
        return head + b"\r\n" + raw
    # Non-ASCII (an address or a reply text): quoted-printable keeps this part 7bit.
    body = email.quoprimime.body_encode(raw.decode("latin-1"), eol="\r\n")
    head = (_field("Content-Type", 'text/plain; charset="utf-8"')
            + _field("Content-Description", "Notification")
            + _field("Content-Transfer-Encoding", "quoted-printable"))
    return head + b"\r\n" + body.encode("ascii") + (b"" if body.endswith("\r\n") else b"\r\n")


_VERB = {FAILED: "delivery failed", DELAYED: "delivery delayed", DELIVERED: "delivered",
         RELAYED: "relayed to a system that sends no notifications", EXPANDED: "delivered"}


def _wrap(paragraph: str, indent: bool) -> str:
    """Lines of at most 76 characters; a recipient's lines (`indent`) are indented after
    the first."""
    out: list[str] = []
    lines = paragraph.split("\n")
    for n, line in enumerate(lines):
        first = "    " if indent and n else ""
        out.extend(textwrap.wrap(line, width=76, initial_indent=first,
                                 subsequent_indent="    " if indent else "",
                                 break_on_hyphens=False) or [""])
    return "\r\n".join(out)


def _status_part(envelope: Envelope, message_id: str, arrival: float,
                 reports: Sequence[RecipientReport], mta: str, utf8: bool) -> bytes:
    """message/delivery-status (RFC 3464 2.1), or message/global-delivery-status (RFC 6533 6.1)."""
    ascii_only = not utf8
    fields = [_field("Reporting-MTA", f"dns; {mta}")]                              # 2.2.2
    if envelope.envid:
        fields.append(_field("Original-Envelope-Id",                                # 2.2.1
                             _clean(envelope.envid, ascii_only=ascii_only)))
    fields.append(_field("X-Txmta-Queue-ID", _clean(message_id, ascii_only=True)))  # 2.2.4 ext.
    fields.append(_field("Arrival-Date", _date(arrival)))                          # 2.2.5
    blocks = [b"".join(fields)]
    for r in reports:
        rcpt = r.recipient
        block = []
        if rcpt.orcpt:                                                              # 2.3.1
            block.append(_field("Original-Recipient", _orcpt(rcpt.orcpt, ascii_only)))
        block.append(_field("Final-Recipient", _address(rcpt.address, ascii_only)))  # 2.3.2
        block.append(_field("Action", r.action))                                   # 2.3.3
        status = r.status.strip() if _STATUS.match(r.status.strip()) else status_for(r.action, r.reply)
        block.append(_field("Status", status))                                     # 2.3.4
        if r.remote_mta:                                                            # 2.3.5
            block.append(_field("Remote-MTA", f"dns; {_clean(_remote_name(r.remote_mta), True)}"))
        if r.reply is not None:                                                     # 2.3.6
            block.append(_field("Diagnostic-Code",
                                f"smtp; {_diagnostic_text(r.reply, ascii_only=ascii_only)}"))
        if r.last_attempt is not None:                                              # 2.3.7
            block.append(_field("Last-Attempt-Date", _date(r.last_attempt)))
        if r.action == DELAYED and r.will_retry_until is not None:                  # 2.3.9
            block.append(_field("Will-Retry-Until", _date(r.will_retry_until)))
        blocks.append(b"".join(block))
    body = b"\r\n".join(blocks)
    ctype = "message/global-delivery-status" if utf8 else "message/delivery-status"
    head = (_field("Content-Type", ctype)
            + _field("Content-Description", "Delivery report")
            + _field("Content-Transfer-Encoding", "7bit" if body.isascii() else "8bit"))
    return head + b"\r\n" + body


def _original_part(content: bytes, *, full: bool, utf8: bool) -> bytes:
    if full:
        ctype = "message/global" if utf8 else "message/rfc822"
        desc = "Undelivered Message"
    else:
        ctype = "message/global-headers" if utf8 else "text/rfc822-headers"
        desc = "Undelivered Message Headers"
    head = (_field("Content-Type", ctype)
            + _field("Content-Description", desc)
            + _field("Content-Transfer-Encoding", "7bit" if content.isascii() else "8bit"))
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    return head + b"\r\n" + content


# --- fields and values ----------------------------------------------------------------------

def _date(t: float) -> str:
    """An RFC 5322 3.3 date-time in UTC."""
    return email.utils.format_datetime(datetime.fromtimestamp(t, timezone.utc))


def _clean(text: str, ascii_only: bool) -> str:
    """One line of text: controls (CR, LF, TAB, NUL...) become a space; lone surrogates
    become U+FFFD; with `ascii_only` non-ASCII characters become '?'."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    text = _CONTROL.sub(" ", text).strip()
    if ascii_only:
        text = text.encode("ascii", "replace").decode("ascii")
    return text


def _address(address: Address, ascii_only: bool) -> str:
    """"rfc822; a@b", or "utf-8; ..." for a non-ASCII address (RFC 6533 3)."""
    text = _clean(str(address), ascii_only=False)
    if text.isascii():
        return f"rfc822; {text}"
    if ascii_only:                          # not reached: non-ASCII addresses make the report global
        return f"rfc822; {_clean(text, ascii_only=True)}"
    return f"utf-8; {text}"


def _orcpt(orcpt: str, ascii_only: bool) -> str:
    """ORCPT "addr-type;address" as an Original-Recipient value (RFC 3464 2.3.1)."""
    addr_type, sep, addr = orcpt.partition(";")
    if not sep:
        addr_type, addr = "rfc822", orcpt
    addr_type = _clean(addr_type, ascii_only=True) or "rfc822"
    addr = _clean(addr, ascii_only=False)
    if not addr.isascii():
        if ascii_only:
            addr = _clean(addr, ascii_only=True)
        elif addr_type.lower() == "rfc822":
            addr_type = "utf-8"
    return f"{addr_type}; {addr}"


def _remote_name(remote: str) -> str:
    """"mx.example.net[192.0.2.1]" (as the spool keeps it) -> "mx.example.net"."""
    remote = remote.strip()
    m = _HOST_AND_LITERAL.match(remote)
    return m.group("name") if m else remote


def _diagnostic_text(reply: Reply, ascii_only: bool) -> str:
    """"550 5.1.1 text" on one line (the lines of a multi-line reply joined by spaces),
    cut to a sane length."""
    text = " ".join(line.strip() for line in reply.text.split("\n") if line.strip())
    if len(text) > _MAX_DIAGNOSTIC:
        text = text[:_MAX_DIAGNOSTIC] + "..."
    head = f"{reply.code} {reply.enhanced.strip()}" if reply.enhanced.strip() else f"{reply.code}"
    return _clean(f"{head} {text}" if text else head, ascii_only=ascii_only)


def _field(name: str, value: str) -> bytes:
    """`Name: value` CRLF, folded at spaces near 78 octets (RFC 5322 2.2.3); a word longer
    than a line allows is cut into pieces, so no line exceeds 998 octets.  Runs of spaces
    in the value become one."""
    lines: list[str] = []
    cur = f"{name}:"
    empty = True                    # no word on `cur` yet
    for word in value.split(" "):
        if not word:
            continue
        for piece in _pieces(word, MAX_LINE - 1):
            size = len(f"{cur} {piece}".encode("utf-8"))
            if size <= _FOLD_AT or (empty and size <= MAX_LINE):
                cur = f"{cur} {piece}"
            else:
                lines.append(cur)
                cur = f" {piece}"
            empty = False
    lines.append(cur)
    return "".join(line + "\r\n" for line in lines).encode("utf-8")


def _pieces(word: str, limit: int) -> list[str]:
    """`word` in pieces of at most `limit` UTF-8 octets, never splitting a character."""
    if len(word.encode("utf-8")) <= limit:
        return [word]
    out: list[str] = []
    cur = ""
    size = 0
    for ch in word:
        n = len(ch.encode("utf-8"))
        if size + n > limit:
            out.append(cur)
            cur, size = "", 0
        cur += ch
        size += n
    if cur:
        out.append(cur)
    return out


def _boundary(seed: str, parts: Sequence[bytes]) -> str:
    """A multipart boundary (RFC 2046 5.1.1) that occurs in none of the parts."""
    base = "=_txmta_" + re.sub(r"[^0-9A-Za-z]", "", seed)[:40]
    n = 0
    while True:
        boundary = f"{base}_{n}" if n else base
        if not any(boundary.encode("ascii") in p for p in parts):
            return boundary
        n += 1


def _crlf(data: bytes) -> bytes:
    """Every line ending as CRLF (the spool keeps CRLF; this is for bodies that do not)."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") == crlf and data.count(b"\n") == crlf:     # the usual case, fast
        return data
    return re.sub(rb"\r?\n|\r", b"\r\n", data)


def _header_section(message: bytes) -> bytes:
    """The header section of `message` (CRLF lines), without the empty line after it."""
    end = message.find(b"\r\n\r\n")
    if message.startswith(b"\r\n"):
        return b""
    if end < 0:
        return message
    return message[:end + 2]


def _lines_fit(data: bytes) -> bool:
    return all(len(line) <= MAX_LINE for line in data.split(b"\r\n"))
