"""The HTTP API's way into the queue: the same path as mail that comes in over SMTP.

A request's addresses are checked with the SMTP grammar (`inbound.grammar`, as MAIL FROM and
RCPT TO would be), its recipients against the suppression list, and the message then goes
through the receiver (`inbound/receiver.py`) like DATA does: our Received header (naming the
token instead of a HELO, `with HTTP` or `HTTPS`), Message-ID and Date when missing, DKIM
signing, and the durable commit.  Only the commit's 250 makes the API answer 200 (DESIGN
invariant 1); a refused request stores nothing.

Pure of HTTP: `server.py` turns what this returns into responses.
"""
# test: tests/test_api_submit.py

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred

from txmta.inbound.grammar import GrammarError, parse_mail, parse_rcpt
from txmta.inbound.receiver import Intake, Receiver
from txmta.inbound.session import Session
from txmta.message import NO_LABELS, Envelope, Labels, Recipient
from txmta.reply import Reply

_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")


class BadAddress(ValueError):
    """An address the SMTP grammar refuses; `field` names where it was given."""

    def __init__(self, field: str, address: str, why: str) -> None:
        super().__init__(f"Invalid '{field}' address: '{address}' ({why}).")
        self.field = field
        self.address = address
        self.why = why


def envelope_for(sender: str, recipients: Sequence[str], data: bytes,
                 sender_field: str = "From", rcpt_field: str = "To") -> Envelope:
    """The envelope of an API message, its addresses checked as MAIL FROM and RCPT TO would
    be; SMTPUTF8 when an address is not ASCII, BODY=8BITMIME when the message is not."""
    utf8 = not (sender.isascii() and all(r.isascii() for r in recipients))
    try:
        mail = parse_mail(f"FROM:<{sender}>" + (" SMTPUTF8" if utf8 else ""))
    except GrammarError as e:
        raise BadAddress(sender_field, sender, e.reply.text) from None
    envelope = Envelope(mail.sender, body="8BITMIME" if not data.isascii() else "7BIT",
                        smtputf8=utf8)
    for address in recipients:
        try:
            rcpt = parse_rcpt(f"TO:<{address}>", utf8)
        except GrammarError as e:
            raise BadAddress(rcpt_field, address, e.reply.text) from None
        envelope = envelope.with_recipient(Recipient(rcpt.address, rcpt.notify, rcpt.orcpt))
    return envelope


def crlf(data: bytes) -> bytes:
    """Lines ending in a bare LF or CR get CRLF, as SMTP carries them."""
    return _BARE_CR.sub(b"\r\n", _BARE_LF.sub(b"\r\n", data))


@dataclass(frozen=True)
class Client:
    """Who sent the request: the address, the listener's name, the token's name, TLS."""
    ip: str
    port: int
    listener: str
    token: str
    tls_version: str | None = None
    tls_cipher: str | None = None
    tls_bits: int | None = None

    def session(self) -> Session:
        return Session(self.ip, self.port, self.listener, esmtp=True, tls_version=self.tls_version,
                       tls_cipher=self.tls_cipher, tls_bits=self.tls_bits, api_token=self.token)


class Submitter:
    """`suppressed(address, now)` is the suppression entry of an address or None;
    `reject_suppressed`: such recipients refuse the request ([suppression] action = "reject"),
    else they are taken and end at intake (the queue's drop mode)."""

    def __init__(self, receiver: Receiver, *, suppressed: Callable[[str, float], Any] | None,
                 reject_suppressed: bool, max_message_size: int) -> None:
        self.receiver = receiver
        self.suppressed = suppressed
        self.reject_suppressed = reject_suppressed
        self.max_message_size = max_message_size

    def now(self) -> float:
        return self.receiver.clock.seconds()

    def inactive(self, envelope: Envelope) -> list[str]:
        """The recipients that refuse the request: on the suppression list, in reject mode."""
        if self.suppressed is None or not self.reject_suppressed:
            return []
        now = self.now()
        return [str(r.address) for r in envelope.recipients
                if self.suppressed(str(r.address), now) is not None]

    def begin(self, client: Client, envelope: Envelope) -> Intake:
        """The intake of one message: its queue id is `intake.message_id` (for the
        Message-ID header of a message still to be built); then `finish()`."""
        return self.receiver.begin(client.session(), envelope)

    def finish(self, intake: Intake, data: bytes, labels: Labels = NO_LABELS) -> Deferred[Reply]:
        """Store `data` (a whole RFC 5322 message, CRLF line endings; BODY=8BITMIME when it
        is not ASCII): fires with 250 once committed, 452 when the spool is full, 451 when
        the commit failed."""
        intake.labels = labels
        if not data.isascii() and intake.envelope.body != "8BITMIME":
            intake.envelope = replace(intake.envelope, body="8BITMIME")
        intake.write(data)
        return intake.finish()
