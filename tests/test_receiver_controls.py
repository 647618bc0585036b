"""The receiver's control header fields: X-Txmta-Expires (the message's deadline) and
X-Txmta-Lane (the lane asked for) are taken out of the header section before it is stored;
the deadline counts only from a trusted client; a message already past its deadline is
refused at the end of data with 554 5.4.7 (RFC 3463 X.4.7) and nothing is stored."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from txmta import reply as R
from txmta.inbound.receiver import Receiver, take_fields
from txmta.inbound.session import Session
from txmta.message import Address, Envelope, Recipient
from txmta.queue import Queue
from txmta.spool.memory import MemorySpool

from smtpdialog import HOSTNAME, RELAY_IP, Harness

NOW = 1_796_540_400.0           # 2026-12-06T07:00:00Z
ENV = Envelope(Address("a", "example.com"), (Recipient(Address("r", "example.org")),))


def session(**kw: Any) -> Session:
    s = Session("198.51.100.7", 5555, "0.0.0.0:25", helo="client.example", esmtp=True,
                relay_client=True)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def intake(pieces: list[bytes], sess: Session | None = None, expires: float | None = None,
           clock: Clock | None = None) -> tuple[Any, Any, MemorySpool]:
    """Feed `pieces` to an Intake: (its reply, the intake, the spool)."""
    if clock is None:
        clock = Clock()
        clock.advance(NOW)
    spool = MemorySpool()
    i = Receiver(Queue(spool, clock), HOSTNAME, clock).begin(sess or session(), ENV)
    i.expires = expires
    for p in pieces:
        i.write(p)
    replies: list[Any] = []
    i.finish().addCallback(replies.append)
    return replies[0], i, spool


def stored_header(spool: MemorySpool, mid: str) -> bytes:
    body = spool.bodies[mid]
    return body[:body.index(b"\r\n\r\n") + 2]


# -- removal -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fields", [
    b"X-Txmta-Expires: 10m\r\nX-Txmta-Lane: bulk\r\n",
    b"x-txmta-expires:10m\r\nx-TXMTA-lane:   bulk  \r\n",                 # any case, spaces
    b"X-Txmta-Expires:\r\n 10m\r\nX-Txmta-Lane:\r\n\tbulk\r\n",            # folded (RFC 5322 2.2.3)
    b"X-Txmta-Expires : 10m\r\nX-Txmta-Lane : bulk\r\n",                  # obsolete WSP (4.5)
    b"X-Txmta-Expires: 10m\nX-Txmta-Lane: bulk\n",                        # bare LF lines
])
def test_control_fields_are_removed_and_noted(fields):
    """Both fields leave the stored header section wherever they are; the other fields stay
    byte for byte, in order; the deadline and the lane asked for are kept with the intake."""
    head = b"From: a@example.com\r\n" + fields + b"Subject: s\r\nMessage-ID: <m@x>\r\nDate: d\r\n"
    reply, i, spool = intake([head[:25], head[25:], b"\r\nX-Txmta-Lane: body text\r\n"])
    assert reply.code == 250
    header = stored_header(spool, i.message_id)
    assert b"txmta-expires" not in header.lower() and b"txmta-lane" not in header.lower()
    assert header.endswith(b"From: a@example.com\r\nSubject: s\r\nMessage-ID: <m@x>\r\n"
                           b"Date: d\r\n")
    assert spool.bodies[i.message_id].endswith(b"\r\n\r\nX-Txmta-Lane: body text\r\n")
    assert i.lane_request == "bulk"
    assert spool.messages[i.message_id].expires == NOW + 600.0


def test_only_the_first_of_each_field_counts_and_all_are_removed():
    head = (b"X-Txmta-Expires: 1h\r\nX-Txmta-Expires: 1m\r\nX-Txmta-Lane: a\r\n"
            b"X-Txmta-Lane: b\r\nSubject: s\r\n\r\nhi\r\n")
    reply, i, spool = intake([head])
    assert reply.code == 250 and i.lane_request == "a" and i.expires == NOW + 3600.0
    assert b"X-Txmta" not in spool.bodies[i.message_id]


def test_fields_that_only_look_alike_stay():
    """X-Txmta-Expires-At, a Subject that mentions the field, a body line: all kept."""
    head = (b"X-Txmta-Expires-At: 1m\r\nSubject: X-Txmta-Expires: 1m\r\n"
            b"X-Txmta-Lanes: x\r\nMessage-ID: <m@x>\r\nDate: d\r\n\r\nX-Txmta-Expires: 1m\r\n")
    reply, i, spool = intake([head])
    assert reply.code == 250 and i.expires is None and i.lane_request == ""
    assert spool.bodies[i.message_id].endswith(head)


def test_a_message_that_ends_in_its_header_loses_its_control_fields_too():
    """No empty line, no body (BDAT LAST right after the fields)."""
    reply, i, spool = intake([b"Subject: s\r\nX-Txmta-Expires: 5m\r\nX-Txmta-Lane: bulk"])
    assert reply.code == 250 and i.expires == NOW + 300.0 and i.lane_request == "bulk"
    assert b"X-Txmta" not in spool.bodies[i.message_id]


@given(st.lists(st.sampled_from([b"Subject: s\r\n", b"X-Txmta-Expires: 10m\r\n",
                                 b"X-Txmta-Lane: l\r\n", b" folded\r\n", b"To: r@x\r\n",
                                 b"x-txmta-lane:\r\n"]), max_size=12))
def test_take_fields_keeps_every_other_line_in_order(lines):
    """take_fields removes exactly the named fields with their continuation lines."""
    header = b"".join(lines)
    kept, found = take_fields(header, ("x-txmta-expires", "x-txmta-lane"))
    # rebuild what should stay: a field is a line plus the folded lines after it
    expected, keep = [], True
    for line in lines:
        if not line.startswith(b" "):
            keep = not line.lower().startswith((b"x-txmta-expires:", b"x-txmta-lane:"))
        if keep:
            expected.append(line)
    assert kept == b"".join(expected)
    assert set(found) <= {"x-txmta-expires", "x-txmta-lane"}


# -- trust ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("trust, counts", [
    ({"relay_client": True}, True),                               # in relay.networks
    ({"relay_client": False, "auth_user": "app"}, True),          # SMTP AUTH
    ({"relay_client": False, "api_token": "tok"}, True),          # the HTTP API
    ({"relay_client": False}, False),                             # anyone else
])
def test_the_deadline_counts_only_from_a_trusted_client(trust, counts):
    """From an untrusted client the field is removed and ignored; the lane asked for is
    noted either way (the lane selection weighs trust itself)."""
    reply, i, spool = intake([b"X-Txmta-Expires: 10m\r\nX-Txmta-Lane: bulk\r\n\r\nhi\r\n"],
                             session(**trust))
    assert reply.code == 250 and b"X-Txmta" not in spool.bodies[i.message_id]
    assert spool.messages[i.message_id].expires == (NOW + 600.0 if counts else None)
    assert i.lane_request == "bulk"


@pytest.mark.parametrize("value", [b"whenever", b"-5m", b"", b"2026-02-30T00:00:00Z"])
def test_an_unreadable_deadline_is_ignored_and_removed(value):
    reply, i, spool = intake([b"X-Txmta-Expires: " + value + b"\r\n\r\nhi\r\n"])
    assert reply.code == 250 and i.expires is None
    assert b"X-Txmta" not in spool.bodies[i.message_id]


def test_the_earlier_of_the_apis_deadline_and_the_header_counts():
    reply, i, spool = intake([b"X-Txmta-Expires: 1h\r\n\r\nhi\r\n"], expires=NOW + 60.0)
    assert spool.messages[i.message_id].expires == NOW + 60.0
    reply, i, spool = intake([b"X-Txmta-Expires: 1m\r\n\r\nhi\r\n"], expires=NOW + 3600.0)
    assert spool.messages[i.message_id].expires == NOW + 60.0


# -- a deadline already past ----------------------------------------------------------------------

@pytest.mark.parametrize("value", [b"Sun, 06 Dec 2026 06:59:59 +0000", b"2026-12-06T06:00:00Z",
                                   b"0", b"2026-12-06T07:00:00Z"])
def test_a_message_past_its_deadline_is_refused_with_554_5_4_7(value):
    """A deadline at or before the end of data: 554 5.4.7, the body writer aborted, nothing
    stored (RFC 3463 3.5 X.4.7 "delivery time expired")."""
    reply, i, spool = intake([b"X-Txmta-Expires: " + value + b"\r\n\r\nhi\r\n"])
    assert reply == R.DEADLINE_PASSED
    assert (reply.code, reply.enhanced) == (554, "5.4.7") and "deadline" in reply.text
    assert i.body.aborted and spool.messages == {} and spool.bodies == {}


def test_a_deadline_that_passes_during_data_refuses_at_the_end():
    """The deadline is checked when the data ends, not when the header was read."""
    clock = Clock()
    clock.advance(NOW)
    spool = MemorySpool()
    i = Receiver(Queue(spool, clock), HOSTNAME, clock).begin(session(), ENV)
    i.write(b"X-Txmta-Expires: 30s\r\n\r\n")
    clock.advance(31)
    i.write(b"a slow body\r\n")
    replies: list[Any] = []
    i.finish().addCallback(replies.append)
    assert replies == [R.DEADLINE_PASSED] and spool.messages == {}


def test_dialogue_refuses_an_expired_message_and_goes_on():
    """Through the server: 554 5.4.7 at the end of DATA, the session stays usable, the next
    message (with a deadline ahead) is stored without the field."""
    h = Harness()
    c = h.connect(RELAY_IP)
    c.ehlo()
    assert c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<r@example.org>\r\nDATA\r\n"
                  b"X-Txmta-Expires: 2000-01-01T00:00:00Z\r\nSubject: late\r\n\r\nb\r\n.\r\n"
                  ) == ["250 2.1.0", "250 2.1.5", "354", "554 5.4.7"]
    assert h.stored() == []
    assert c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<r@example.org>\r\nDATA\r\n"
                  b"X-Txmta-Expires: 10m\r\nSubject: soon\r\n\r\nb\r\n.\r\n")[-1] == "250 2.0.0"
    [(msg, body)] = h.stored()
    assert msg.expires == h.clock.seconds() + 600.0 and b"X-Txmta" not in body


def test_an_untrusted_clients_past_deadline_is_ignored():
    """From an untrusted client even a past X-Txmta-Expires is ignored: the message is
    stored, without the field."""
    reply, i, spool = intake([b"X-Txmta-Expires: 2000-01-01T00:00:00Z\r\n\r\nhi\r\n"],
                             session(relay_client=False))
    assert reply.code == 250 and i.expires is None and len(spool.messages) == 1
    assert b"X-Txmta" not in spool.bodies[i.message_id]
