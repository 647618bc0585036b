"""Collects one message's DATA into the spool: Received header, Message-ID, Date, commit.

The protocol hands each accepted transaction to `Receiver.begin()` and streams the
un-stuffed body into the returned `Intake`.  The Intake prepends our Received header
(RFC 5321 4.4; with the TLS version and cipher, never credentials), adds Message-ID and
Date when the header section lacks them (RFC 5322 3.6, as Postfix's cleanup does), and
streams the rest into the spool's body writer, so memory does not grow with message size.
`finish()` fires with 250 only after `queue.put()` committed (DESIGN invariant 1; the queue's
intake face, txmta/faces.py: this module never sees the spool);
a full spool gives 452 4.3.1, any other failure 451 4.3.0, and nothing is left behind.
With `dedupe_window`, an SMTP message with a Message-ID of its own is put with its
duplicate-check key (inbound/dedupe.py); a repeat within the window is refused by the
commit and answered 250 with the first message's queue id and "(duplicate)".

With a DKIM signer (txmta/dkim.py), the keys are chosen when the header section ends (by its
From: domain), and `finish()` first runs the signing on the signing thread pool: the body is
read back from the body writer (memory, or the body file in 64 KiB pieces) and hashed, the
header fields we added are signed too, and the signature is put in front of the stored
message (`BodyWriter.prepend`); then the commit.  A failed signing is logged and the message
stored unsigned.  Without a signer nothing of this runs.

Two header fields are controls for us, not part of the message: `X-Txmta-Expires` (the
message's deadline: an RFC 5322 date-time, an ISO 8601 timestamp or a duration from now,
deadline.py) and `X-Txmta-Lane` (the lane asked for; its raw value is kept in
`Intake.lane_request` for the lane selection, lanes.py).  Both are removed from the header
section before it is stored (and before DKIM signs it).  The deadline is taken only from a
trusted client (`Session.trusted`: authenticated, or in relay.networks) and when it can be
read; otherwise it is ignored (and logged).  A message whose deadline has passed by the end
of its data is refused with 554 5.4.7 and nothing is stored.  A header section longer than
MAX_HEADER_SCAN is passed on unchanged, control fields included.
"""
# test: tests/test_receiver.py

from __future__ import annotations

import re
from dataclasses import replace
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from txmta import deadline
from txmta import reply as R
from txmta.faces import IntakeQueue
from txmta.inbound.dedupe import client_identity, dedupe, duplicate_reply, log_duplicate
from txmta.lanes import Lanes
from txmta.message import NO_LABELS, AlreadySubmitted, Envelope, Idempotency
from txmta.inbound.session import Session
from txmta.reply import Reply
from txmta.message import SpoolFull

log = Logger()

_HEADER_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")
_HAS_MSGID = re.compile(rb"^message-id[ \t]*:", re.I | re.M)
_MSGID_VALUE = re.compile(rb"^message-id[ \t]*:[ \t]*(?:\r?\n[ \t]+)?(<[^>\r\n]{1,500}>)", re.I | re.M)
_HAS_DATE = re.compile(rb"^date[ \t]*:", re.I | re.M)
_TLS_REQUIRED_NO = re.compile(rb"^tls-required[ \t]*:[ \t]*no[ \t]*\r?$", re.I | re.M)
_UNSAFE = re.compile(r"[^\x21-\x7e]")
LANE_HEADER = "X-Txmta-Lane"
CONTROL_FIELDS = (deadline.EXPIRES_HEADER.lower(), LANE_HEADER.lower())
_CONTROL_FIELD = re.compile(rb"^x-txmta-(?:expires|lane)[ \t]*:", re.I | re.M)
MAX_HEADER_SCAN = 1024 * 1024   # past this, the header section is passed on unchanged


def take_fields(header: bytes, names: tuple[str, ...]) -> tuple[bytes, dict[str, str]]:
    """`header` (a header section, CRLF or LF lines) without the fields called `names`
    (lower-case), and the first value of each of them, unfolded and stripped."""
    kept: list[bytes] = []
    found: dict[str, str] = {}
    field: list[bytes] = []

    def end_field() -> None:
        if not field:
            return
        name, _, value = field[0].partition(b":")
        key = name.strip().decode("ascii", "replace").lower()
        if key in names:
            text = b"".join(field)[len(name) + 1:].decode("utf-8", "replace")
            found.setdefault(key, " ".join(text.split()))
        else:
            kept.extend(field)
        field.clear()

    for line in header.splitlines(keepends=True):
        if line[:1] not in (b" ", b"\t"):
            end_field()
        field.append(line)
    end_field()
    return b"".join(kept), found


def rfc5322_date(when: float) -> str:
    return format_datetime(datetime.fromtimestamp(when, timezone.utc))


def protocol_name(session: Session, envelope: Envelope) -> str:
    """The "with" keyword of the Received header (RFC 3848, RFC 6531 4.3); HTTP or HTTPS
    for a message from the HTTP API; "local" for a message txmta-sendmail read from its
    standard input, "local-esmtp" / "local-smtp" for one it took with -bs (Exim's words)."""
    if session.api_token is not None:
        return "HTTPS" if session.tls else "HTTP"
    if session.local_user is not None:
        if session.helo is None:
            return "local"
        return "local-esmtp" if session.esmtp else "local-smtp"
    if not session.esmtp:
        return "SMTP"
    base = "UTF8SMTP" if envelope.smtputf8 else "ESMTP"
    return base + ("S" if session.tls else "") + ("A" if session.auth_user else "")


def received_header(session: Session, envelope: Envelope, hostname: str, message_id: str,
                    when: float) -> bytes:
    ip = session.client_ip
    literal = f"IPv6:{ip}" if ":" in ip else ip
    if session.api_token is not None:   # no HELO: the client's address, the token in a comment
        token = _UNSAFE.sub("?", session.api_token)[:64]
        lines = [f"Received: from [{literal}] (token {token})"]
    elif session.local_user is not None:    # no address: the local user who submitted it
        user = _UNSAFE.sub("?", session.local_user)[:64] or "unknown"
        lines = [f"Received: from {user} (local user)"]
    else:
        helo = _UNSAFE.sub("?", session.helo or "unknown")[:255]
        lines = [f"Received: from {helo} ([{literal}])"]
    lines.append(f"\tby {hostname} (txmta) with {protocol_name(session, envelope)} id {message_id}")
    if session.tls:
        lines.append(f"\t(using {session.tls_version} with cipher {session.tls_cipher}"
                     f" ({session.tls_bits} bits))")
    when_text = rfc5322_date(when)
    if len(envelope.recipients) == 1:
        lines.append(f"\tfor <{envelope.recipients[0].address}>; {when_text}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{when_text}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


class Intake:
    def __init__(self, receiver: "Receiver", session: Session, envelope: Envelope) -> None:
        self._receiver = receiver
        self._queue = receiver.queue
        self.session = session
        self.envelope = envelope
        self.arrival = receiver.clock.seconds()
        self.message_id = self._queue.new_message_id(self.arrival)
        self.body = self._queue.body_writer(self.message_id)
        received = received_header(session, envelope, receiver.hostname, self.message_id,
                                   self.arrival)
        self.body.write(received)
        self._head = b""        # the header section while it is being read
        self._scan = 0          # where the next unread line of _head starts
        self._in_header = True
        self._done = False
        self.header_id = ""     # the message's Message-ID header (ours if it had none)
        self.own_header_id = False  # header_id came from the client (the duplicate check)
        self.labels = NO_LABELS  # tag, metadata, stream: set by the HTTP API
        self.lane = ""          # the message's lane (lanes.py); "" = the default lane
        self.lane_request = ""  # the X-Txmta-Lane header field's value, if it had one
        self.token_lane = ""    # the HTTP API token's lane, if it has one
        self.priority = 0       # the lane's priority (the due order)
        self.expires: float | None = None   # its deadline (epoch seconds), if it has one
        # the HTTP API's Idempotency-Key: made into what the put stores under it
        self.idempotency: Callable[["Intake"], Idempotency] | None = None
        # DKIM (only with a signer): the stored header section, where the body starts, the keys
        self._signer = receiver.signer   # this message keeps the signer it started with
        self._signed_head = received if self._signer is not None else b""
        self._body_start = 0
        self._keys: tuple[Any, ...] = ()

    def write(self, data: bytes) -> None:
        if not self._in_header:
            self.body.write(data)
            return
        self._head += data
        self._scan_header()

    def _scan_header(self) -> None:
        head = self._head
        pos = self._scan
        while True:
            nl = head.find(b"\n", pos)
            if nl < 0:
                break
            line = head[pos:nl + 1]
            if line in (b"\r\n", b"\n"):
                return self._end_header(pos, blank=True)
            if line[:1] in (b" ", b"\t"):
                if pos == 0:
                    return self._end_header(pos, blank=False)
            elif not _HEADER_LINE.match(line):
                return self._end_header(pos, blank=False)
            pos = nl + 1
        self._scan = pos
        if len(head) > MAX_HEADER_SCAN:
            log.info("header section of {id} over {n} octets: passed on unchanged",
                     id=self.message_id, n=MAX_HEADER_SCAN)
            self._in_header = False
            self._head = b""
            self.body.write(head)

    def _end_header(self, end: int, blank: bool) -> None:
        head = self._head
        header, rest = head[:end], head[end:]
        self._in_header = False
        self._head = b""
        if header and not header.endswith(b"\n"):
            header += b"\r\n"
        header = self._controls(header)
        missing = self._missing(header)
        if self._signed_head:
            separator = (2 if rest.startswith(b"\r\n") else 1) if blank else 2
            self._choose_keys(header + missing, len(header) + len(missing) + separator)
        self.body.write(header + missing + (b"" if blank else b"\r\n") + rest)

    def _choose_keys(self, header: bytes, separator_end: int) -> None:
        """The header section is complete: which keys sign, and where the body starts."""
        self._signed_head += header
        self._body_start = self.body.size + separator_end
        self._keys = self._signer.keys_for(header)

    def _controls(self, header: bytes) -> bytes:
        """The header section without our control fields, whose values are noted."""
        if not _CONTROL_FIELD.search(header):
            return header
        header, found = take_fields(header, CONTROL_FIELDS)
        self.lane_request = found.get(LANE_HEADER.lower(), self.lane_request)
        value = found.get(deadline.EXPIRES_HEADER.lower())
        if value is None:
            return header
        if not self.session.trusted:
            log.info("{id}: {field} from an untrusted client ignored", id=self.message_id,
                     field=deadline.EXPIRES_HEADER)
            return header
        try:
            when = deadline.parse_expires(value, self.arrival)
        except ValueError as e:
            log.info("{id}: {field} ignored: {e}", id=self.message_id,
                     field=deadline.EXPIRES_HEADER, e=e)
            return header
        self.expires = when if self.expires is None else min(self.expires, when)
        return header

    def _missing(self, header: bytes) -> bytes:
        """The header fields to add (Message-ID, Date); notes what the header section says."""
        if not self.envelope.requiretls and _TLS_REQUIRED_NO.search(header):
            # RFC 8689 5: the sender prefers delivery to TLS policy; REQUIRETLS would win
            self.envelope = replace(self.envelope, tls_optional=True)
        add = b""
        found = _MSGID_VALUE.search(header)
        if found is not None:
            self.header_id = found.group(1).decode("utf-8", "replace")
            self.own_header_id = True
        if not _HAS_MSGID.search(header):
            self.header_id = f"<{self.message_id}@{self._receiver.hostname}>"
            add += f"Message-ID: {self.header_id}\r\n".encode()
        if not _HAS_DATE.search(header):
            add += f"Date: {rfc5322_date(self.arrival)}\r\n".encode()
        return add

    def finish(self) -> Deferred[Reply]:
        self._done = True
        if self._in_header and self._head and not self._head.endswith(b"\n"):
            # a last line without CRLF (BDAT): scan it too, it may not be a header line
            self._head += b"\r\n"
            self._scan_header()
        if self._in_header:  # the message ended inside its header section
            head, self._head = self._head, b""
            self._in_header = False
            head = self._controls(head)
            missing = self._missing(head)
            if self._signed_head:
                self._choose_keys(head + missing, len(head) + len(missing))
            self.body.write(head + missing)
        if self.expires is not None and self.expires <= self._receiver.clock.seconds():
            log.info("{id} refused: its deadline passed before it was accepted",
                     id=self.message_id)
            self.body.abort()
            return succeed(R.DEADLINE_PASSED)
        if self._keys:
            d = self._receiver.run_signing(self._sign, self._receiver.clock.seconds())
            d.addErrback(self._unsigned)
            d.addCallback(lambda _: self._put())
            return d
        return self._put()

    def _sign(self, now: float) -> None:
        """On the signing thread: hash the body as stored, sign, put the signature in front."""
        self.body.prepend(self._signer.signatures(
            self._signed_head, self.body.read_chunks(self._body_start), self._keys, now))

    def _unsigned(self, f: Failure) -> None:
        log.failure("DKIM signing of {id} failed; stored unsigned", f, id=self.message_id)

    def _choose_lane(self) -> None:
        """The message's lane and its priority (lanes.py), unless the caller set the lane."""
        lanes = self._receiver.lanes
        if lanes is None:
            return
        if not self.lane:
            session = self.session
            self.lane = lanes.select(
                header=self.lane_request, trusted=session.trusted,
                token_lane=self.token_lane, stream=self.labels.stream,
                user=session.auth_user or "",
                listener_lane=self._receiver.listener_lanes.get(session.listener, ""))
        self.priority = lanes.get(self.lane).priority

    def _put(self) -> Deferred[Reply]:
        self._choose_lane()
        extra: dict[str, Any] = {}
        if self.idempotency is not None:
            extra["idempotency"] = self.idempotency(self)
        elif self.session.api_token is None:    # SMTP: the duplicate check, if on
            check = self._receiver.duplicate_check(self)
            if check is not None:
                extra["idempotency"] = check
        if self.lane:
            extra["lane"] = self.lane
        if self.priority:
            extra["priority"] = self.priority
        if self.expires is not None:
            extra["expires"] = self.expires
        d = self._queue.put(self.message_id, self.envelope, self.body,
                            self.session.client_info(), self.arrival, header_id=self.header_id,
                            labels=self.labels, **extra)

        def stored(_: Any) -> Reply:
            return Reply(250, "2.0.0", f"Ok: queued as {self.message_id}")

        def failed(f: Failure) -> Reply | Failure:
            if f.check(AlreadySubmitted):
                if self.idempotency is not None:    # the HTTP API answers it
                    return f
                return self._receiver.duplicate(self, f.value.result)
            if f.check(SpoolFull):
                log.warn("spool full, message refused: {e}", e=f.getErrorMessage())
                return R.SPOOL_FULL
            log.failure("commit failed for {id}", f, id=self.message_id)
            return R.COMMIT_FAILED

        return d.addCallbacks(stored, failed)

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self.body.abort()


class Receiver:
    """`signer`: the DKIM signer, or None (nothing is signed).  `run_signing(f, *args)` runs
    `f` on the signing thread pool and fires with its result (tap.py passes
    deferToThreadPool); without one, `f` runs at once (tests)."""

    def __init__(self, queue: IntakeQueue, hostname: str, clock: IReactorTime, signer: Any = None,
                 run_signing: Callable[..., Deferred[Any]] | None = None, *,
                 lanes: Lanes | None = None, listener_lanes: dict[str, str] | None = None,
                 dedupe_window: float = 0.0,
                 note_duplicate: Callable[[str, dict[str, str], str, int, str], None] | None = None
                 ) -> None:
        self.lanes = lanes              # None: every message in the default lane, priority 0
        self.listener_lanes = listener_lanes or {}    # listen address -> its `lane`
        self.queue = queue
        self.hostname = hostname
        self.clock = clock
        self.signer = signer
        self.run_signing = run_signing or maybeDeferred
        self.dedupe_window = dedupe_window      # [intake] dedupe_window; 0 = off
        # the mail log's line (MailLog.duplicate); without one, the daemon log's
        self.note_duplicate = note_duplicate or log_duplicate

    def begin(self, session: Session, envelope: Envelope) -> Intake:
        return Intake(self, session, envelope)

    def duplicate_check(self, intake: Intake) -> Idempotency | None:
        """The duplicate-check key an SMTP message is put with (None: not checked)."""
        if not intake.own_header_id:
            return None
        s = intake.session
        return dedupe(client_identity(s.auth_user, s.client_ip), intake.header_id,
                      intake.envelope, intake.message_id, intake.arrival, self.dedupe_window)

    def duplicate(self, intake: Intake, first: bytes) -> Reply:
        """A repeat of the message stored as `first`: nothing was stored; one log line."""
        self.note_duplicate(first.decode("ascii", "replace"), intake.session.client_info(),
                            str(intake.envelope.sender), len(intake.envelope.recipients),
                            intake.header_id)
        return duplicate_reply(first)
