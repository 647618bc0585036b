"""dsn: delivery status notifications (RFC 3464) built as bytes, parsed back with the stdlib
`email` package and checked field by field: the multipart/report structure (RFC 6522), the
per-message and per-recipient fields (RFC 3464 2.2, 2.3), the returned content (RFC 3461 4.3
RET), the SMTPUTF8 types (RFC 6533), NOTIFY (RFC 3461 4.1), the report's own envelope
(DESIGN invariant 7), and, by hypothesis, the line limit of RFC 5322 2.1.1 for any
recipients and reply texts."""

import email
import email.policy
import email.utils
import re
from email.message import EmailMessage
from email.parser import BytesHeaderParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txmta import dsn
from txmta.dsn import (DELAYED, DELIVERED, EXPANDED, EXPIRED_STATUS, FAILED, RELAYED,
                       RecipientReport, build_report, envelope_for_report, owed)
from txmta.message import NULL_ADDRESS, Address, Envelope, Recipient
from txmta.reply import Reply

ARRIVAL = 1_700_000_000.0
LAST = ARRIVAL + 600
NOW = ARRIVAL + 700
UNTIL = ARRIVAL + 5 * 86400
MTA = "mta.example.org"

ALICE = Address("alice", "example.org")
BOB = Recipient(Address("bob", "example.com"), orcpt="rfc822;Bob@Example.COM")
CAROL = Recipient(Address("carol", "example.net"))

ORIGINAL = (b"Received: from client.example.org by mta.example.org; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
            b"From: Alice <alice@example.org>\r\n"
            b"To: bob@example.com, carol@example.net\r\n"
            b"Subject: lunch\r\n"
            b"Message-ID: <lunch@example.org>\r\n"
            b"\r\n"
            b"Shall we have lunch?\r\n")
HEADERS = ORIGINAL[:ORIGINAL.index(b"\r\n\r\n") + 2]

USER_UNKNOWN = Reply(550, "5.1.1", "The email account that you tried to reach does not exist.")
MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox full, try again later")
OK = Reply(250, "2.0.0", "OK queued as 12345")


def envelope(*recipients: Recipient, **kw) -> Envelope:
    return Envelope(kw.pop("sender", ALICE), recipients or (BOB, CAROL), **kw)


def report(*reports: RecipientReport, env: Envelope | None = None, original: bytes = ORIGINAL,
           **kw) -> bytes:
    return build_report(envelope=env or envelope(), message_id="QID123", arrival=ARRIVAL,
                        reports=reports, original=original, reporting_mta=MTA, now=NOW,
                        dsn_message_id=kw.pop("dsn_message_id", "dsn1"), **kw)


def failed(rcpt: Recipient = BOB, reply: Reply | None = USER_UNKNOWN, status: str | None = None,
           remote: str = "mx.example.com[192.0.2.1]") -> RecipientReport:
    return RecipientReport(rcpt, FAILED, reply.enhanced if status is None and reply else status or "",
                           reply, remote, LAST)


def parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def raw_parts(raw: bytes) -> list[tuple[bytes, bytes]]:
    """The (header, body) bytes of each part, split by the boundary, without the email package."""
    boundary = parse(raw).get_boundary().encode()
    body = raw.split(b"\r\n\r\n", 1)[1]
    chunks = re.split(rb"(?:^|\r\n)--" + re.escape(boundary) + rb"(?:--)?[ \t]*\r\n", body)
    parts = []
    for chunk in chunks[1:]:
        if not chunk:
            continue
        head, _, content = chunk.partition(b"\r\n\r\n")
        parts.append((head + b"\r\n", content))
    return parts


def status_fields(raw: bytes) -> list[EmailMessage]:
    """The delivery-status (or global-delivery-status) part as blocks of fields: the
    per-message block first, then one per recipient (RFC 3464 2.1)."""
    for head, content in raw_parts(raw):
        if b"delivery-status" in head.lower():
            blocks = [b for b in content.split(b"\r\n\r\n") if b.strip()]
            return [BytesHeaderParser(policy=email.policy.default).parsebytes(b + b"\r\n")
                    for b in blocks]
    raise AssertionError("no delivery-status part")


def when(value: str) -> float:
    return email.utils.parsedate_to_datetime(value).timestamp()


# --- the structure (RFC 6522, RFC 3464 2) ---------------------------------------------------

def test_failed_report_is_a_multipart_report_with_three_parts():
    """A failure report is multipart/report; report-type=delivery-status with a text/plain
    explanation, a message/delivery-status and the original as message/rfc822 (RFC 6522 3)."""
    msg = parse(report(failed(BOB), failed(CAROL)))
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain", "message/delivery-status", "message/rfc822"]
    assert not msg.defects and not any(p.defects for p in msg.walk())


def test_report_headers():
    """From MAILER-DAEMON at the reporting MTA, to the envelope sender, dated, with our
    Message-ID and Auto-Submitted: auto-replied (RFC 3834 5)."""
    msg = parse(report(failed()))
    assert msg["From"].addresses[0].addr_spec == f"MAILER-DAEMON@{MTA}"
    assert msg["From"].addresses[0].display_name == "Mail Delivery System"
    assert msg["To"].addresses[0].addr_spec == "alice@example.org"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert when(msg["Date"]) == NOW
    assert msg["Message-ID"] == f"<dsn1@{MTA}>"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Auto-Submitted"] == "auto-replied"


@pytest.mark.parametrize("action, subject", [
    (FAILED, "Undelivered Mail Returned to Sender"),
    (DELAYED, "Delayed Mail (still being retried)"),
    (DELIVERED, "Successful Mail Delivery Report"),
    (RELAYED, "Delivery Status Notification (relayed)"),
    (EXPANDED, "Successful Mail Delivery Report"),
])
def test_every_kind_has_its_subject_and_action(action, subject):
    """Each kind of report (RFC 3464 2.3.3 Action values) parses with its subject and action."""
    rr = RecipientReport(BOB, action, "", None, "mx.example.com", LAST,
                         UNTIL if action == DELAYED else None)
    raw = report(rr)
    msg = parse(raw)
    assert msg["Subject"] == subject
    blocks = status_fields(raw)
    assert len(blocks) == 2
    assert blocks[1]["Action"] == action
    assert blocks[1]["Status"] == {FAILED: "5.0.0", DELAYED: "4.0.0"}.get(action, "2.0.0")


def test_a_report_with_failures_is_a_failure_report():
    """Failures and delays reported together: the failure kind names the report."""
    rr = RecipientReport(CAROL, DELAYED, "4.2.2", MAILBOX_FULL, "mx.example.net", LAST, UNTIL)
    raw = report(failed(BOB), rr)
    assert parse(raw)["Subject"] == "Undelivered Mail Returned to Sender"
    assert [b["Action"] for b in status_fields(raw)[1:]] == [FAILED, DELAYED]


# --- per-message fields (RFC 3464 2.2) -----------------------------------------------------

def test_per_message_fields():
    """Reporting-MTA (required, 2.2.2), Original-Envelope-Id from ENVID (2.2.1), Arrival-Date
    (2.2.5), and our queue id as an extension field (2.2.4)."""
    raw = report(failed(), env=envelope(envid="ENV-42"))
    head = status_fields(raw)[0]
    assert head["Reporting-MTA"] == f"dns; {MTA}"
    assert head["Original-Envelope-Id"] == "ENV-42"
    assert when(head["Arrival-Date"]) == ARRIVAL
    assert head["X-Txmta-Queue-ID"] == "QID123"
    # The email package sees the same: the first block of the part's payload.
    ds = list(parse(raw).iter_parts())[1]
    assert ds.get_payload()[0]["Reporting-MTA"] == f"dns; {MTA}"


def test_no_envid_no_original_envelope_id():
    """Original-Envelope-Id appears only when the sender gave ENVID (RFC 3464 2.2.1)."""
    assert "Original-Envelope-Id" not in status_fields(report(failed()))[0]


# --- per-recipient fields (RFC 3464 2.3) ---------------------------------------------------

def test_one_block_per_recipient_with_required_fields():
    """Every reported recipient gets one block with Final-Recipient, Action and Status (the
    required fields of 2.3), Status being the reply's enhanced code (2.3.4)."""
    other = Reply(550, "5.7.1", "Message rejected as spam")
    raw = report(failed(BOB), failed(CAROL, other))
    blocks = status_fields(raw)[1:]
    assert len(blocks) == 2
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; bob@example.com",
                                                       "rfc822; carol@example.net"]
    assert [b["Action"] for b in blocks] == [FAILED, FAILED]
    assert [b["Status"] for b in blocks] == ["5.1.1", "5.7.1"]
    # The email package's own view of message/delivery-status agrees.
    payload = list(parse(raw).iter_parts())[1].get_payload()
    assert [b["Final-Recipient"] for b in payload[1:]] == ["rfc822; bob@example.com",
                                                           "rfc822; carol@example.net"]


def test_remote_mta_diagnostic_code_last_attempt():
    """Remote-MTA names the host (2.3.5), Diagnostic-Code carries the SMTP reply (2.3.6),
    Last-Attempt-Date the time of the attempt (2.3.7)."""
    block = status_fields(report(failed()))[1]
    assert block["Remote-MTA"] == "dns; mx.example.com"
    assert block["Diagnostic-Code"] == ("smtp; 550 5.1.1 The email account that you tried to "
                                        "reach does not exist.")
    assert when(block["Last-Attempt-Date"]) == LAST
    assert "Will-Retry-Until" not in block


def test_optional_fields_absent_when_unknown():
    """Without a remote host, a reply or an attempt time those fields are left out."""
    block = status_fields(report(RecipientReport(CAROL, FAILED, "5.0.0", None)))[1]
    assert set(block.keys()) == {"Final-Recipient", "Action", "Status"}


def test_original_recipient_from_orcpt():
    """Original-Recipient carries ORCPT (2.3.1) as given; without ORCPT it is absent."""
    blocks = status_fields(report(failed(BOB), failed(CAROL)))[1:]
    assert blocks[0]["Original-Recipient"] == "rfc822; Bob@Example.COM"
    assert "Original-Recipient" not in blocks[1]


def test_multiline_reply_becomes_one_diagnostic():
    """A multi-line reply's lines are joined into one Diagnostic-Code (2.3.6)."""
    reply = Reply(550, "5.7.1", "Our system has detected\nthat this message is\nlikely spam")
    block = status_fields(report(failed(reply=reply)))[1]
    assert block["Diagnostic-Code"] == ("smtp; 550 5.7.1 Our system has detected that this "
                                        "message is likely spam")


def test_reply_without_enhanced_code():
    """A reply without an enhanced code: Diagnostic-Code has the basic code only, and the
    status falls back to the class default (5.0.0)."""
    block = status_fields(report(failed(reply=Reply(554, "", "delivery error: dd no user"))))[1]
    assert block["Diagnostic-Code"] == "smtp; 554 delivery error: dd no user"
    assert block["Status"] == "5.0.0"


def test_expiry_is_failed_with_4_4_7():
    """A recipient whose lifetime ran out is reported as failed with status 4.4.7 (RFC 3463
    3.5 "delivery time expired") and the last reply as diagnostic."""
    rr = RecipientReport(BOB, FAILED, EXPIRED_STATUS, MAILBOX_FULL, "mx.example.com", LAST)
    raw = report(rr)
    block = status_fields(raw)[1]
    assert (block["Action"], block["Status"]) == ("failed", "4.4.7")
    assert block["Diagnostic-Code"] == "smtp; 452 4.2.2 Mailbox full, try again later"
    text = list(parse(raw).iter_parts())[0].get_content()
    assert "within the time allowed" in text


def test_a_deadline_expiry_says_not_delivered_in_time():
    """A recipient whose deadline passed is failed with 4.4.7 like a lifetime expiry, but the
    human part says it was not delivered in time, naming the deadline, and so does the
    Subject when every failure is one."""
    deadline = ARRIVAL + 600
    rr = RecipientReport(BOB, FAILED, EXPIRED_STATUS, MAILBOX_FULL, "mx.example.com", LAST,
                         deadline=deadline)
    raw = report(rr)
    block = status_fields(raw)[1]
    assert (block["Action"], block["Status"]) == ("failed", "4.4.7")
    assert block["Diagnostic-Code"] == "smtp; 452 4.2.2 Mailbox full, try again later"
    text = list(parse(raw).iter_parts())[0].get_content()
    assert "not delivered in time (deadline Tue, 14 Nov 2023 22:23:20 +0000)" in " ".join(
        text.split())
    assert "within the time allowed" not in text
    assert parse(raw)["Subject"] == "Undelivered Mail: not delivered in time"
    # with a hard bounce beside it, the report keeps the usual subject
    mixed = report(rr, failed(CAROL))
    assert parse(mixed)["Subject"] == "Undelivered Mail Returned to Sender"


def test_an_expiry_before_any_attempt_has_no_diagnostic_code():
    """Never tried (its deadline passed while it waited, with no reply seen): no
    Diagnostic-Code, no Remote-MTA, no Last-Attempt-Date."""
    rr = RecipientReport(BOB, FAILED, EXPIRED_STATUS, None, "", None, deadline=ARRIVAL + 10)
    block = status_fields(report(rr))[1]
    assert block["Status"] == "4.4.7"
    assert not {"Diagnostic-Code", "Remote-MTA", "Last-Attempt-Date"} & set(block)


def test_delayed_report_has_will_retry_until():
    """A delay report says until when delivery will be tried (2.3.9)."""
    rr = RecipientReport(BOB, DELAYED, "4.2.2", MAILBOX_FULL, "mx.example.com", LAST, UNTIL)
    block = status_fields(report(rr))[1]
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.2.2"
    assert when(block["Will-Retry-Until"]) == UNTIL


@pytest.mark.parametrize("status, reply, action, expected", [
    ("", USER_UNKNOWN, FAILED, "5.1.1"),               # from the reply
    ("", None, FAILED, "5.0.0"),                       # class defaults
    ("", None, DELAYED, "4.0.0"),
    ("", None, DELIVERED, "2.0.0"),
    ("", OK, DELIVERED, "2.0.0"),
    ("bogus", USER_UNKNOWN, FAILED, "5.1.1"),          # malformed: replaced
    ("5.7.1", USER_UNKNOWN, FAILED, "5.7.1"),          # given: kept
])
def test_status_defaults(status, reply, action, expected):
    """An empty or malformed status becomes the reply's enhanced code or the class default."""
    block = status_fields(report(RecipientReport(BOB, action, status, reply)))[1]
    assert block["Status"] == expected


def test_human_part_names_recipients_and_replies():
    """The text part says which recipients failed and what the server said."""
    raw = report(failed(BOB), failed(CAROL, Reply(550, "5.7.1", "Blocked by policy")))
    text = list(parse(raw).iter_parts())[0].get_content()
    assert "<bob@example.com>" in text and "<carol@example.net>" in text
    assert "host mx.example.com said: 550 5.1.1 The email account" in text
    assert "550 5.7.1 Blocked by policy" in text
    assert "QID123" in text


# --- the returned content (RFC 3461 4.3, RFC 3464 2) ---------------------------------------

BIG = ORIGINAL + b"x" * 70 + b"\r\n"


@pytest.mark.parametrize("ret, action, original, limit, expected", [
    ("FULL", FAILED, ORIGINAL, 256 * 1024, "message/rfc822"),
    ("FULL", DELAYED, ORIGINAL, 256 * 1024, "message/rfc822"),      # RET=FULL asks always
    ("FULL", FAILED, BIG, 10, "message/rfc822"),                    # ... whatever the size
    ("HDRS", FAILED, ORIGINAL, 256 * 1024, "text/rfc822-headers"),
    (None, FAILED, ORIGINAL, 256 * 1024, "message/rfc822"),         # small: all of it
    (None, FAILED, BIG, len(BIG), "message/rfc822"),
    (None, FAILED, BIG, len(BIG) - 1, "text/rfc822-headers"),       # large: headers only
    (None, DELAYED, ORIGINAL, 256 * 1024, "text/rfc822-headers"),   # RFC 3464 2: successes
    (None, DELIVERED, ORIGINAL, 256 * 1024, "text/rfc822-headers"), # and delays, headers
    (None, RELAYED, ORIGINAL, 256 * 1024, "text/rfc822-headers"),
])
def test_returned_content_follows_ret(ret, action, original, limit, expected):
    """RET=FULL returns the message, RET=HDRS its header section; without RET the whole
    message only in a failure report and when it is not larger than the limit."""
    rr = RecipientReport(BOB, action, "", None)
    raw = report(rr, env=envelope(ret=ret), original=original, headers_only_above=limit)
    third = list(parse(raw).iter_parts())[2]
    assert third.get_content_type() == expected
    head, content = raw_parts(raw)[2]
    if expected == "message/rfc822":
        assert content == original
        assert third.get_payload()[0]["Subject"] == "lunch"
    else:
        assert content == HEADERS
        assert b"Shall we have lunch" not in raw


def test_8bit_original_is_marked_8bit():
    """An 8-bit original makes its part (and the multipart) 8bit; the rest stays 7bit."""
    original = ORIGINAL.replace(b"lunch?", "déjeuner?".encode())
    raw = report(failed(), env=envelope(body="8BITMIME"), original=original)
    msg = parse(raw)
    assert msg["Content-Transfer-Encoding"] == "8bit"
    parts = list(msg.iter_parts())
    assert [p["Content-Transfer-Encoding"] for p in parts] == ["7bit", "7bit", "8bit"]
    assert raw_parts(raw)[2][1] == original


def test_7bit_report_when_everything_is_ascii():
    """An all-ASCII report is 7bit throughout."""
    raw = report(failed())
    assert raw.isascii()
    assert parse(raw)["Content-Transfer-Encoding"] == "7bit"


def test_bare_lf_original_gets_crlf():
    """An original with LF line ends is returned with CRLF, like the rest of the report."""
    raw = report(failed(), original=ORIGINAL.replace(b"\r\n", b"\n"))
    assert raw_parts(raw)[2][1] == ORIGINAL


def test_original_with_overlong_line_is_returned_as_headers():
    """A body line longer than 998 octets cannot travel in a message/rfc822 part: the
    header section is returned instead (RFC 5322 2.1.1)."""
    raw = report(failed(), original=ORIGINAL + b"y" * 2000 + b"\r\n")
    assert list(parse(raw).iter_parts())[2].get_content_type() == "text/rfc822-headers"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


def test_original_with_overlong_header_is_left_out():
    """When even the header section has an overlong line, no original part is attached and
    the text part says so."""
    original = b"X-Long: " + b"z" * 2000 + b"\r\n\r\nbody\r\n"
    raw = report(failed(), original=original)
    msg = parse(raw)
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain",
                                                                "message/delivery-status"]
    assert "not included" in list(msg.iter_parts())[0].get_content()


def test_boundary_never_occurs_in_the_original():
    """An original that contains our boundary does not break the structure (RFC 2046 5.1.1)."""
    original = ORIGINAL + b"--=_txmta_dsn1\r\n--=_txmta_dsn1--\r\n"
    raw = report(failed(), original=original)
    msg = parse(raw)
    assert msg.get_boundary() != "=_txmta_dsn1"
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain", "message/delivery-status", "message/rfc822"]
    assert raw_parts(raw)[2][1] == original


# --- SMTPUTF8 (RFC 6533) -------------------------------------------------------------------

UTF8_RCPT = Recipient(Address("bøb", "exämple.com"), orcpt="utf-8;bøb@exämple.com")


@pytest.mark.parametrize("ret, third", [("FULL", "message/global"),
                                        ("HDRS", "message/global-headers")])
def test_smtputf8_message_gets_global_types(ret, third):
    """A message sent with SMTPUTF8 gets message/global-delivery-status and message/global or
    message/global-headers (RFC 6533 6), with "utf-8" address types (RFC 6533 3)."""
    original = "From: bøb@exämple.com\r\nSubject: hï\r\n\r\nHellö\r\n".encode()
    env = envelope(UTF8_RCPT, CAROL, smtputf8=True, ret=ret)
    raw = report(failed(UTF8_RCPT), failed(CAROL), env=env, original=original)
    msg = parse(raw)
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain", "message/global-delivery-status", third]
    blocks = status_fields(raw)
    assert blocks[0]["Reporting-MTA"] == f"dns; {MTA}"
    assert blocks[1]["Final-Recipient"] == "utf-8; bøb@exämple.com"
    assert blocks[1]["Original-Recipient"] == "utf-8; bøb@exämple.com"
    assert blocks[2]["Final-Recipient"] == "rfc822; carol@example.net"
    assert list(msg.iter_parts())[1]["Content-Transfer-Encoding"] == "8bit"
    text = list(msg.iter_parts())[0].get_content()
    assert "<bøb@exämple.com>" in text


def test_non_ascii_address_alone_makes_the_report_global():
    """A non-ASCII address makes the report global even without the SMTPUTF8 flag."""
    raw = report(failed(UTF8_RCPT), env=envelope(UTF8_RCPT))
    assert list(parse(raw).iter_parts())[1].get_content_type() == "message/global-delivery-status"


def test_non_ascii_reply_text_in_an_ascii_report():
    """In a plain report the machine part stays ASCII (RFC 3464 2.1.2): non-ASCII reply text
    is replaced there, and the text part carries it quoted-printable."""
    reply = Reply(550, "5.1.1", "Benutzer unbekannt: Grüße")
    raw = report(failed(reply=reply))
    assert raw.isascii()
    assert status_fields(raw)[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 Benutzer unbekannt: Gr??e"
    text = list(parse(raw).iter_parts())[0]
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert "Grüße" in text.get_content()


def test_sender_with_non_ascii_address():
    """The report to a non-ASCII sender is addressed to it in UTF-8 (RFC 6532 3.2)."""
    env = envelope(sender=Address("ålice", "exämple.org"), smtputf8=True)
    raw = report(failed(), env=env)
    assert b"\r\nTo: <\xc3\xa5lice@ex\xc3\xa4mple.org>\r\n" in raw
    msg = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)
    assert msg["To"].addresses[0].addr_spec == "ålice@exämple.org"


# --- safety -------------------------------------------------------------------------------

def test_reply_text_cannot_inject_fields():
    """CR, LF and other controls in a reply become spaces: no new field, no new line."""
    reply = Reply(550, "5.1.1", "bad\r\nAction: delivered\r\n\r\nFinal-Recipient: rfc822; x@y")
    raw = report(failed(reply=reply))
    blocks = status_fields(raw)
    assert len(blocks) == 2
    assert blocks[1]["Action"] == "failed"
    assert blocks[1]["Final-Recipient"] == "rfc822; bob@example.com"


def test_long_diagnostic_is_folded_within_limits():
    """A long reply is folded at spaces; a single huge word is cut so that no line passes
    998 octets (RFC 5322 2.1.1)."""
    reply = Reply(550, "5.7.1", "word " * 300 + "X" * 3000)
    raw = report(failed(reply=reply))
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    diag = status_fields(raw)[1]["Diagnostic-Code"]
    assert diag.startswith("smtp; 550 5.7.1 word word")


def test_only_crlf_line_ends():
    """Every line of the report ends in CRLF."""
    raw = report(failed(), failed(CAROL), original=ORIGINAL.replace(b"\r\n", b"\n"))
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")


def test_empty_and_unknown_are_errors():
    """A report of nobody, or of an unknown action, is a bug of the caller."""
    with pytest.raises(ValueError):
        report()
    with pytest.raises(ValueError):
        report(RecipientReport(BOB, "bounced", "5.0.0", None))


# --- NOTIFY (RFC 3461 4.1) -----------------------------------------------------------------

@pytest.mark.parametrize("notify, action, expected", [
    ((), FAILED, True),                    # no NOTIFY: FAILURE,DELAY implied
    ((), DELAYED, True),
    ((), DELIVERED, False),
    ((), RELAYED, False),
    (("NEVER",), FAILED, False),           # NEVER: nothing at all
    (("NEVER",), DELAYED, False),
    (("NEVER",), DELIVERED, False),
    (("SUCCESS",), DELIVERED, True),
    (("SUCCESS",), RELAYED, True),         # SUCCESS covers relayed
    (("SUCCESS",), EXPANDED, True),
    (("SUCCESS",), FAILED, False),
    (("SUCCESS",), DELAYED, False),
    (("FAILURE",), FAILED, True),
    (("FAILURE",), DELAYED, False),
    (("FAILURE",), DELIVERED, False),
    (("DELAY",), DELAYED, True),
    (("DELAY",), FAILED, False),
    (("SUCCESS", "FAILURE", "DELAY"), FAILED, True),
    (("SUCCESS", "FAILURE", "DELAY"), DELAYED, True),
    (("SUCCESS", "FAILURE", "DELAY"), DELIVERED, True),
    (("failure",), FAILED, True),          # keywords are case-insensitive
])
def test_owed_follows_notify(notify, action, expected):
    """A report is owed only for the kinds NOTIFY asks for (RFC 3461 4.1)."""
    assert owed(Recipient(BOB.address, notify=notify), action) is expected


def test_owed_rejects_unknown_action():
    """An unknown action is a caller bug."""
    with pytest.raises(ValueError):
        owed(BOB, "bounced")


# --- the report's envelope (DESIGN invariant 7) --------------------------------------------

def test_no_report_for_a_report():
    """Mail from <> never gets a DSN: no envelope for one."""
    assert envelope_for_report(envelope(sender=NULL_ADDRESS)) is None


def test_report_envelope_goes_from_null_to_the_sender():
    """The report is sent from <> to the original sender, and only to it."""
    env = envelope_for_report(envelope(envid="E1", ret="FULL"))
    assert env is not None
    assert env.sender == NULL_ADDRESS
    assert env.recipients == (Recipient(ALICE),)
    assert (env.ret, env.envid, env.smtputf8, env.body) == (None, None, False, "7BIT")


def test_report_envelope_asks_for_8bit_and_smtputf8_when_needed():
    """SMTPUTF8 for a non-ASCII sender or an SMTPUTF8 original; 8BITMIME for an 8-bit report."""
    utf = envelope_for_report(envelope(sender=Address("ålice", "exämple.org")))
    assert utf is not None and utf.smtputf8 and utf.body == "8BITMIME"
    eight = envelope_for_report(envelope(), report=b"caf\xc3\xa9")
    assert eight is not None and not eight.smtputf8 and eight.body == "8BITMIME"
    assert envelope_for_report(envelope(), report=b"plain").body == "7BIT"


# --- any recipients, any reply text --------------------------------------------------------

LOCALS = st.text(alphabet=st.sampled_from("abcxyz019.-_+øé€漢"), min_size=1, max_size=30)
DOMAINS = st.sampled_from(["example.com", "example.net", "exämple.org", "mx.example"])
RECIPIENTS = st.builds(
    Recipient,
    address=st.builds(Address, LOCALS, DOMAINS),
    notify=st.just(()),
    orcpt=st.one_of(st.none(), st.builds(lambda l, d: f"rfc822;{l}@{d}", LOCALS, DOMAINS)))
REPLIES = st.one_of(st.none(), st.builds(
    Reply,
    code=st.sampled_from([250, 421, 450, 451, 452, 550, 552, 553, 554]),
    enhanced=st.sampled_from(["", "5.1.1", "4.2.2", "2.0.0", "5.7.1"]),
    text=st.one_of(st.text(max_size=400),
                   st.text(alphabet=st.characters(), min_size=900, max_size=3000),
                   st.builds(lambda w, n: (w + " ") * n, st.text(min_size=1, max_size=40),
                             st.integers(1, 200)))))
REPORTS = st.builds(
    RecipientReport,
    recipient=RECIPIENTS,
    action=st.sampled_from(dsn.ACTIONS),
    status=st.sampled_from(["", "5.1.1", "4.4.7", "2.0.0", "junk"]),
    reply=REPLIES,
    remote_mta=st.sampled_from(["", "mx.example.com", "mx.example.com[192.0.2.1]", "[192.0.2.9]"]),
    last_attempt=st.one_of(st.none(), st.floats(ARRIVAL, ARRIVAL + 10**6)),
    will_retry_until=st.one_of(st.none(), st.floats(ARRIVAL, ARRIVAL + 10**7)))


@settings(max_examples=150, deadline=None)
@given(st.lists(REPORTS, min_size=1, max_size=8), st.booleans(),
       st.sampled_from([None, "FULL", "HDRS"]), st.one_of(st.none(), st.text(max_size=100)))
def test_any_report_parses_with_one_block_per_recipient(reports, smtputf8, ret, envid):
    """Whatever the recipients and reply texts (non-ASCII, controls, long lines), the report
    parses as multipart/report, has one block per recipient with the required fields, only
    CRLF line ends and no line over 998 octets."""
    env = Envelope(ALICE, tuple(r.recipient for r in reports), smtputf8=smtputf8, ret=ret,
                   envid=envid)
    raw = report(*reports, env=env)
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert b"\n" not in raw.replace(b"\r\n", b"")
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    types = [p.get_content_type() for p in msg.iter_parts()]
    assert types[0] == "text/plain"
    assert types[1] in ("message/delivery-status", "message/global-delivery-status")
    assert len(types) == 3
    blocks = status_fields(raw)
    assert len(blocks) == 1 + len(reports)
    assert blocks[0]["Reporting-MTA"] == f"dns; {MTA}"
    for block, rr in zip(blocks[1:], reports):
        assert block["Action"] == rr.action
        assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", block["Status"])
        addr_type, _, addr = block["Final-Recipient"].partition("; ")
        assert addr == str(rr.recipient.address)
        assert addr_type == ("rfc822" if addr.isascii() else "utf-8")
        assert ("Diagnostic-Code" in block) == (rr.reply is not None)
