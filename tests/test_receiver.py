"""The receiver (txmta/inbound/receiver.py): trace and identity headers, and the commit.

What the spool holds after a message: our Received header first (RFC 5321 4.4, RFC 3848,
RFC 6531 4.3), Message-ID and Date added only when missing (RFC 5322 3.6), and a 250 only
after the commit (DESIGN invariant 1).  Tests drive `Intake` directly and through dialogues.
"""

from __future__ import annotations

from typing import Any

import pytest

from txmta.message import Address, Envelope, Recipient
from txmta.inbound.receiver import Receiver, protocol_name, received_header
from txmta.inbound.session import Session
from txmta.queue import Queue
from txmta.reply import Reply
from txmta.spool.interface import CommitFailed, SpoolFull
from txmta.spool.memory import MemorySpool

from smtpdialog import HOSTNAME, LOOPBACK_IP, RELAY_IP, FakeChecker, Harness, Listener
from twisted.internet.task import Clock

NOW = 1_700_000_000.0
DATE = "Tue, 14 Nov 2023 22:13:20 +0000"
ONE = (Recipient(Address("r", "example.org")),)
TWO = ONE + (Recipient(Address("s", "example.org")),)


def session(**kw: Any) -> Session:
    s = Session("192.0.2.10", 5555, "0.0.0.0:25", helo="client.example", esmtp=True)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def envelope(rcpts=ONE, **kw: Any) -> Envelope:
    return Envelope(Address("a", "example.com"), rcpts, **kw)


def store(body_pieces: list[bytes], sess: Session | None = None, env: Envelope | None = None,
          spool: MemorySpool | None = None) -> tuple[Reply, str, bytes | None]:
    """Feed `body_pieces` to a fresh Intake; return (reply, message id, stored body)."""
    clock = Clock()
    clock.advance(NOW)
    spool = spool or MemorySpool()
    receiver = Receiver(Queue(spool, clock), HOSTNAME, clock)
    intake = receiver.begin(sess or session(), env or envelope())
    for piece in body_pieces:
        intake.write(piece)
    replies: list[Reply] = []
    intake.finish().addCallback(replies.append)
    [reply] = replies
    return reply, intake.message_id, spool.bodies.get(intake.message_id)


def trace(mid: str, with_: str = "ESMTP", ip: str = "192.0.2.10", helo: str = "client.example",
          for_: str | None = "r@example.org") -> bytes:
    end = f"\r\n\tfor <{for_}>; {DATE}\r\n" if for_ else f";\r\n\t{DATE}\r\n"
    return (f"Received: from {helo} ([{ip}])\r\n"
            f"\tby {HOSTNAME} (txmta) with {with_} id {mid}" + end).encode()


def added(mid: str) -> bytes:
    return f"Message-ID: <{mid}@{HOSTNAME}>\r\nDate: {DATE}\r\n".encode()


# -- Received (RFC 5321 4.4) ------------------------------------------------------------

def test_received_header_is_first_and_names_helo_ip_host_and_the_one_recipient():
    """The stored body starts with Received: from helo ([ip]) by host with ESMTP id ... for."""
    reply, mid, body = store([b"Subject: x\r\nMessage-ID: <m@x>\r\nDate: d\r\n\r\nhi\r\n"])
    assert reply == Reply(250, "2.0.0", f"Ok: queued as {mid}")
    assert body == trace(mid) + b"Subject: x\r\nMessage-ID: <m@x>\r\nDate: d\r\n\r\nhi\r\n"


def test_received_header_has_no_for_clause_with_several_recipients():
    """With more than one recipient the Received header names none (privacy, RFC 5321 7.2)."""
    reply, mid, body = store([b"Message-ID: <m@x>\r\nDate: d\r\n\r\nhi\r\n"], env=envelope(TWO))
    assert body == trace(mid, for_=None) + b"Message-ID: <m@x>\r\nDate: d\r\n\r\nhi\r\n"


@pytest.mark.parametrize("esmtp,tls,auth,utf8,word", [
    (False, False, False, False, "SMTP"),          # RFC 5321 4.4
    (True, False, False, False, "ESMTP"),          # RFC 3848 2
    (True, True, False, False, "ESMTPS"),
    (True, False, True, False, "ESMTPA"),
    (True, True, True, False, "ESMTPSA"),
    (True, False, False, True, "UTF8SMTP"),        # RFC 6531 4.3
    (True, True, True, True, "UTF8SMTPSA"),
])
def test_received_with_keyword(esmtp, tls, auth, utf8, word):
    """The "with" keyword follows the session: EHLO, TLS, AUTH and SMTPUTF8."""
    s = session(esmtp=esmtp, tls_version="TLSv1.3" if tls else None, auth_user="u" if auth else None)
    assert protocol_name(s, envelope(smtputf8=utf8)) == word


def test_received_header_under_tls_names_version_and_cipher_not_credentials():
    """Under TLS the header adds the version and cipher; an AUTH user is never named."""
    s = session(tls_version="TLSv1.3", tls_cipher="TLS_AES_128_GCM_SHA256", tls_bits=128,
                auth_user="secretuser")
    header = received_header(s, envelope(), HOSTNAME, "ID1", NOW)
    assert header == (
        f"Received: from client.example ([192.0.2.10])\r\n"
        f"\tby {HOSTNAME} (txmta) with ESMTPSA id ID1\r\n"
        f"\t(using TLSv1.3 with cipher TLS_AES_128_GCM_SHA256 (128 bits))\r\n"
        f"\tfor <r@example.org>; {DATE}\r\n").encode()
    assert b"secretuser" not in header


def test_received_header_ipv6_literal_and_unsafe_helo():
    """An IPv6 client is written as [IPv6:...] (RFC 5321 4.1.3); unsafe HELO bytes become '?'."""
    s = session(client_ip="2001:db8::1", helo="bad\x01h\u00e9lo")
    header = received_header(s, envelope(), HOSTNAME, "ID1", NOW)
    assert header.startswith(b"Received: from bad?h?lo ([IPv6:2001:db8::1])\r\n")


# -- Message-ID and Date (RFC 5322 3.6) ---------------------------------------------------

def test_message_id_and_date_are_added_when_missing():
    """A header section without Message-ID and Date gets both, before the blank line."""
    reply, mid, body = store([b"Subject: x\r\n\r\nbody\r\n"])
    assert body == trace(mid) + b"Subject: x\r\n" + added(mid) + b"\r\nbody\r\n"


def test_message_id_and_date_are_not_duplicated_when_present():
    """Existing Message-ID and Date (any case) are kept and nothing is added."""
    msg = b"message-ID: <a@b>\r\nDATE: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nbody\r\n"
    reply, mid, body = store([msg])
    assert body == trace(mid) + msg


def test_only_the_missing_one_is_added():
    """With Date present only Message-ID is added, and the other way round."""
    _, mid, body = store([b"Date: d\r\n\r\nx\r\n"])
    assert body == trace(mid) + b"Date: d\r\n" + f"Message-ID: <{mid}@{HOSTNAME}>\r\n".encode() + b"\r\nx\r\n"
    _, mid, body = store([b"Message-ID: <m@x>\r\n\r\nx\r\n"])
    assert body == trace(mid) + b"Message-ID: <m@x>\r\n" + f"Date: {DATE}\r\n".encode() + b"\r\nx\r\n"


def test_message_id_in_the_body_does_not_count():
    """A Message-ID: line after the blank line is body text; the header still gets one."""
    _, mid, body = store([b"Subject: x\r\n\r\nMessage-ID: <no@x>\r\nDate: no\r\n"])
    assert body == trace(mid) + b"Subject: x\r\n" + added(mid) + b"\r\nMessage-ID: <no@x>\r\nDate: no\r\n"


def test_folded_header_continuation_is_part_of_the_header():
    """A folded header line (RFC 5322 2.2.3) does not end the header section."""
    msg = b"Subject: a\r\n  long one\r\nMessage-ID: <m@x>\r\nDate: d\r\n\r\nb\r\n"
    _, mid, body = store([msg])
    assert body == trace(mid) + msg


def test_headerless_body_gets_headers_and_a_blank_line():
    """A body whose first line is not a header gets Message-ID, Date and a blank line first."""
    _, mid, body = store([b"just text\r\nmore: text\r\n"])
    assert body == trace(mid) + added(mid) + b"\r\njust text\r\nmore: text\r\n"


def test_body_starting_with_blank_line_gets_headers_before_it():
    """An empty header section gets Message-ID and Date before its blank line."""
    _, mid, body = store([b"\r\nbody\r\n"])
    assert body == trace(mid) + added(mid) + b"\r\nbody\r\n"


def test_empty_message_gets_headers():
    """An empty message is stored as trace plus Message-ID and Date."""
    _, mid, body = store([])
    assert body == trace(mid) + added(mid)


def test_header_only_message_gets_headers_appended():
    """A message that ends inside its header section gets the missing fields at its end."""
    _, mid, body = store([b"Subject: x\r\n"])
    assert body == trace(mid) + b"Subject: x\r\n" + added(mid)


def test_last_line_without_crlf_that_is_not_a_header_becomes_body():
    """A final text line without CRLF (possible with BDAT) is body, not header: it follows
    the added fields and a blank line."""
    _, mid, body = store([b"hello"])
    assert body == trace(mid) + added(mid) + b"\r\nhello\r\n"
    _, mid, body = store([b"Subject: x\r\nhello"])
    assert body == trace(mid) + b"Subject: x\r\n" + added(mid) + b"\r\nhello\r\n"


def test_last_header_line_without_crlf_is_completed():
    """A final header line without CRLF is ended with CRLF before the added fields."""
    _, mid, body = store([b"Subject: x"])
    assert body == trace(mid) + b"Subject: x\r\n" + added(mid)


@pytest.mark.parametrize("cut", range(1, 40))
def test_header_split_across_writes_gives_the_same_body(cut):
    """How the DATA stream is chunked never changes what is stored."""
    msg = b"Subject: x\r\nMessage-ID: <m@x>\r\n\r\nbody line\r\n"
    _, mid, whole = store([msg])
    _, mid2, split = store([msg[:cut], msg[cut:]])
    assert whole is not None and split is not None
    assert split.replace(mid2.encode(), mid.encode()) == whole


# -- commit (invariant 1) ---------------------------------------------------------------

def test_failed_commit_is_451_and_nothing_is_stored():
    """A failed commit answers 451 4.3.0 (RFC 3463 4.3.0) and the spool stays empty."""
    spool = MemorySpool()
    spool.fail_next = CommitFailed("x")
    reply, _, body = store([b"x\r\n"], spool=spool)
    assert (reply.code, reply.enhanced) == (451, "4.3.0")
    assert body is None and spool.messages == {}


def test_full_spool_is_452():
    """A full spool answers 452 4.3.1 (RFC 3463 4.3.1)."""
    spool = MemorySpool()
    spool.fail_next = SpoolFull("x")
    reply, _, body = store([b"x\r\n"], spool=spool)
    assert (reply.code, reply.enhanced) == (452, "4.3.1")
    assert body is None and spool.messages == {}


def test_stored_envelope_and_client_info():
    """The committed message carries the envelope, arrival time and client facts."""
    spool = MemorySpool()
    s = session(auth_user="u", tls_version="TLSv1.3", tls_cipher="C")
    _, mid, _ = store([b"x\r\n"], sess=s, spool=spool)
    msg = spool.messages[mid]
    assert msg.envelope == envelope()
    assert msg.arrival == NOW
    assert msg.client == {"address": "192.0.2.10", "helo": "client.example",
                          "listener": "0.0.0.0:25", "tls": "TLSv1.3 C", "auth": "u"}
    assert msg.size == len(spool.bodies[mid])


def test_abort_discards_the_body():
    """abort() drops the body writer; finish is never called and nothing is stored."""
    clock = Clock()
    spool = MemorySpool()
    intake = Receiver(Queue(spool, clock), HOSTNAME, clock).begin(session(), envelope())
    intake.write(b"Subject: x\r\n\r\nbody\r\n")
    intake.abort()
    assert intake.body.aborted
    assert spool.messages == {}


def test_the_receiver_needs_only_the_intake_face():
    """Over the fake intake face (tests/fakes.py): 250 naming the id once put() fired, and
    a failed commit is 451 with the body aborted."""
    from fakes import FakeQueue
    clock = Clock()
    clock.advance(NOW)
    queue = FakeQueue(clock)
    receiver = Receiver(queue, HOSTNAME, clock)
    intake = receiver.begin(session(), envelope())
    intake.write(b"Subject: x\r\n\r\nbody\r\n")
    replies: list[Reply] = []
    intake.finish().addCallback(replies.append)
    assert replies[0].code == 250 and intake.message_id in replies[0].text
    assert queue.bodies[intake.message_id].endswith(b"\r\nbody\r\n")
    queue.fail_next = CommitFailed("disk on fire")
    intake = receiver.begin(session(), envelope())
    intake.write(b"Subject: x\r\n\r\nbody\r\n")
    intake.finish().addCallback(replies.append)
    assert replies[1].code == 451 and intake.body.aborted
    assert list(queue.messages) == [replies[0].text.split()[-1]]


# -- through the server -------------------------------------------------------------------

def test_dialogue_stores_received_from_helo_and_auth_keyword():
    """Through the server: an AUTHed loopback session is recorded as ESMTPA, one for clause."""
    h = Harness(listener=Listener(auth="optional"), checker=FakeChecker({"u": "p"}))
    c = h.connect(LOOPBACK_IP)
    c.ehlo("laptop.example")
    assert c.send(b"AUTH PLAIN AHUAcA==\r\n") == ["235 2.7.0"]
    assert c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<r@example.org>\r\nDATA\r\n"
                  b"Subject: s\r\n\r\nb\r\n.\r\n")[-1] == "250 2.0.0"
    [(msg, body)] = h.stored()
    assert body == (trace(msg.id, with_="ESMTPA", ip=LOOPBACK_IP, helo="laptop.example")
                    + b"Subject: s\r\n" + added(msg.id) + b"\r\nb\r\n")


def test_dialogue_helo_utf8_and_two_recipients():
    """Through the server: HELO gives SMTP; SMTPUTF8 gives UTF8SMTP; two rcpts, no for."""
    h = Harness()
    c = h.connect(RELAY_IP)
    c.send(b"HELO old.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<r@example.org>\r\n"
           b"RCPT TO:<s@example.org>\r\nDATA\r\nx\r\n.\r\n")
    c.ehlo("new.example")
    c.send(b"MAIL FROM:<a@example.com> SMTPUTF8\r\nRCPT TO:<r@example.org>\r\nDATA\r\nx\r\n.\r\n")
    (m1, b1), (m2, b2) = h.stored()
    assert b1.startswith(trace(m1.id, with_="SMTP", ip=RELAY_IP, helo="old.example", for_=None))
    assert b2.startswith(trace(m2.id, with_="UTF8SMTP", ip=RELAY_IP, helo="new.example"))


@pytest.mark.parametrize("header, requiretls, optional", [
    (b"TLS-Required: No\r\n", False, True),
    (b"tls-required:no \r\n", False, True),
    (b"TLS-Required: No\r\n", True, False),        # REQUIRETLS wins (RFC 8689 4.1)
    (b"TLS-Required: Yes\r\n", False, False),      # "No" is the only value defined
    (b"X-TLS-Required: No\r\n", False, False),
    (b"Subject: TLS-Required: No\r\n", False, False),
])
def test_tls_required_no_is_kept_with_the_envelope(header, requiretls, optional):
    """A "TLS-Required: No" header field (RFC 8689 5) marks the stored envelope tls_optional."""
    spool = MemorySpool()
    reply, mid, _ = store([b"From: a@example.com\r\n" + header + b"\r\nbody\r\n"],
                          env=envelope(requiretls=requiretls), spool=spool)
    assert reply.code == 250
    assert spool.messages[mid].envelope.tls_optional is optional
