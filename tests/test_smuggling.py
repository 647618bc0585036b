"""SMTP smuggling (CVE-2023-51764/51765/51766): raw-byte attacks on the end of DATA.

Only CR LF "." CR LF ends the mail data (RFC 5321 4.1.1.4, 2.3.8: CR and LF alone are not
line ends).  A fake end made of bare CR or LF must never end the message, so that commands
hidden behind it are never executed.  Depending on `bare_newlines` the message carrying
one is refused (550 5.5.2) or stored with every bare CR/LF turned into CRLF.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

import pytest

from smtpdialog import LOOPBACK_IP, RELAY_IP, Harness, Listener

# the fake ends a smuggler puts before a second, hidden transaction
FAKE_ENDS = [
    pytest.param(b"\n.\n", id="LF.LF"),
    pytest.param(b"\r.\r", id="CR.CR"),
    pytest.param(b"\r\n.\n", id="CRLF.LF"),
    pytest.param(b"\n.\r\n", id="LF.CRLF"),
    pytest.param(b"\r.\r\n", id="CR.CRLF"),
    pytest.param(b"\r\n.\r", id="CRLF.CR"),
]

HEAD = (b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
        b"Subject: hello\r\n\r\nfirst message")
HIDDEN = (b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
          b"Subject: smuggled\r\n\r\nsmuggled body")
REAL_END = b"\r\n.\r\n"
BARE_RE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def session(mode: str, ip: str = RELAY_IP, **policy: object):
    """A client that said EHLO; loopback is made a relay network so both kinds may relay."""
    base = Harness().policy
    nets = base.relay_networks + (ipaddress.ip_network("127.0.0.0/8"),)
    h = Harness(listener=Listener(bare_newlines=mode),
                policy=dataclasses.replace(base, relay_networks=nets, **policy))  # type: ignore[arg-type]
    c = h.connect(ip)
    c.ehlo()
    return h, c


@pytest.mark.parametrize("fake_end", FAKE_ENDS)
@pytest.mark.parametrize("mode,ip", [("reject", RELAY_IP), ("reject-remote", RELAY_IP),
                                     ("reject", LOOPBACK_IP)])
def test_fake_end_is_refused_and_hidden_commands_are_not_run(fake_end, mode, ip):
    """A message with a fake end is refused 550 5.5.2 as one message; the hidden MAIL/RCPT
    after it are not answered, nothing is stored, and the session goes on."""
    h, c = session(mode, ip)
    c.proto.dataReceived(HEAD + fake_end + HIDDEN + REAL_END + b"NOOP\r\n")
    assert c.raw() == (b"250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n"
                       b"354 End data with <CR><LF>.<CR><LF>\r\n"
                       b"550 5.5.2 Message contains a bare CR or LF; lines must end with CRLF\r\n"
                       b"250 2.0.0 OK\r\n")
    assert h.stored() == []


@pytest.mark.parametrize("fake_end", FAKE_ENDS)
@pytest.mark.parametrize("mode,ip", [("fix", RELAY_IP), ("reject-remote", LOOPBACK_IP)])
def test_fake_end_is_fixed_into_one_message(fake_end, mode, ip):
    """Where bare newlines are fixed, the fake end and the hidden commands are stored as body
    text of the one message, with every bare CR/LF turned into CRLF."""
    h, c = session(mode, ip)
    assert c.send(HEAD + fake_end + HIDDEN + REAL_END) == ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]
    [(msg, body)] = h.stored()
    assert [str(r.address) for r in msg.envelope.recipients] == ["bob@example.org"]
    assert BARE_RE.search(body) is None
    # a "." after a real CRLF is dot-stuffing and removed (RFC 5321 4.5.2), then fixed
    unstuffed = fake_end.replace(b"\r\n.", b"\r\n", 1) if fake_end.startswith(b"\r\n.") else fake_end
    fixed = BARE_RE.sub(b"\r\n", unstuffed)
    assert body.endswith(b"\r\n\r\nfirst message" + fixed + HIDDEN + b"\r\n")


@pytest.mark.parametrize("fake_end", FAKE_ENDS)
def test_fake_end_split_over_packets_does_not_end_data(fake_end):
    """Sending the fake end one byte per packet changes nothing: still one refused message."""
    h, c = session("reject")
    replies = c.send(HEAD)
    for i in range(len(fake_end)):
        replies += c.send(fake_end[i:i + 1])
    replies += c.send(HIDDEN)
    assert replies == ["250 2.1.0", "250 2.1.5", "354"]
    assert c.send(REAL_END) == ["550 5.5.2"]
    assert h.stored() == []


@pytest.mark.parametrize("fake_end", [b"\r\n\x00.\r\n", b"\r\n .\r\n", b"\r\n.\x00\r\n"])
def test_near_ends_without_bare_newlines_are_body_text(fake_end):
    """CRLF "." CRLF with a NUL or space in it is ordinary text: one message with the hidden
    commands as its body, and only the real recipient."""
    h, c = session("reject")
    assert c.send(HEAD + fake_end + HIDDEN + REAL_END) == ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]
    [(msg, body)] = h.stored()
    assert [str(r.address) for r in msg.envelope.recipients] == ["bob@example.org"]
    stored = fake_end.replace(b"\r\n.", b"\r\n")       # dot-stuffing removed (RFC 5321 4.5.2)
    assert body.endswith(b"first message" + stored + HIDDEN + b"\r\n")


def test_bare_lf_anywhere_refuses_the_message():
    """A single bare LF in an ordinary line is enough for 550 5.5.2 in reject mode."""
    h, c = session("reject")
    assert c.send(HEAD + b"\r\nline one\nline two" + REAL_END) == [
        "250 2.1.0", "250 2.1.5", "354", "550 5.5.2"]
    assert h.stored() == []


def test_oversized_message_with_bare_lf_reports_size_first():
    """When a message is both too large and has a bare LF, the size error is reported once."""
    h, c = session("reject", max_message_size=20)
    assert c.send(HEAD + b"\n" + b"x" * 50 + REAL_END) == [
        "250 2.1.0", "250 2.1.5", "354", "552 5.3.4"]


@pytest.mark.parametrize("chunk", [b"a\nb", b"a\rb", b"a\r"])
def test_bare_newline_in_bdat_is_refused(chunk):
    """BDAT carries no end marker, but a bare CR or LF in it is refused the same way."""
    h, c = session("reject")
    assert c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
                  b"BDAT %d LAST\r\n%sNOOP\r\n" % (len(chunk), chunk)) == [
        "250 2.1.0", "250 2.1.5", "550 5.5.2", "250 2.0.0"]
    assert h.stored() == []


def test_bare_newline_in_bdat_is_fixed():
    """In fix mode BDAT bare CR/LF become CRLF, also a CR ending the last chunk."""
    h, c = session("fix")
    assert c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
                  b"BDAT 7\r\nS: x\n\nbBDAT 4 LAST\r\n\r.\n\r") == [
        "250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0"]
    [(msg, body)] = h.stored()
    assert BARE_RE.search(body) is None
    assert body.endswith(b"S: x\r\nMessage-ID: <%s@mx.example.net>\r\nDate: Tue, 14 Nov 2023 "
                         b"22:13:20 +0000\r\n\r\nb\r\n.\r\n\r\n" % msg.id.encode())
