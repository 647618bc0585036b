"""The ESMTP client against `ScriptedRemote` over iosim (STYLE habit 8): no sockets, a Clock.

STARTTLS is exercised with iosim's pretend TLS (negotiation, handshake failure, the
RFC 3207 reset of extensions); real OpenSSL handshakes are the integration tests' job.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given, settings as hsettings, strategies as st
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.internet.testing import StringTransport
from twisted.test import iosim

from txmta import outcome as O
from txmta.message import Address, Envelope, Recipient
from txmta.outbound.client import (
    CHUNK, CLEAN_REUSE, DEFAULT_TIMEOUTS, MAX_REPLY, MAX_REPLY_LINE, ClientSettings, DotStuffer,
    PeerCheck, ReplyParser, SessionFailureError,
    SMTPClient,
    TransactionResult, dot_stuff, session_timeouts)
from txmta.reply import Reply
from tests.scripted_remote import (
    Delay, Drop, FakeTLSOptions, Pair, ScriptedRemote, Silent)

SENDER = Address("sender", "example.com")
BODY = b"Subject: hi\r\n\r\nHello.\r\n"
PLAIN = ClientSettings("client.example", tls="none")


def rcpt(local: str, domain: str = "example.org", **kw: Any) -> Recipient:
    return Recipient(Address(local, domain), **kw)


def start(table: dict[str, Any] | None = None, *, settings: ClientSettings = PLAIN,
          transport: type = iosim.FakeTransport, **remote_kw: Any) -> Pair:
    clock = Clock()
    remote = ScriptedRemote(table, clock=clock, **remote_kw)
    client = SMTPClient(settings, clock, "mx.example.net", "192.0.2.25")
    server_io = iosim.FakeTransport(remote, isServer=True)
    client_io = transport(client, isServer=False)
    pump = iosim.connect(remote, server_io, client, client_io, greet=True, clock=clock)
    p = Pair(client, remote, pump, clock)
    client.ready.addBoth(p.results.append)
    p.flush()
    return p


def ready_failure(p: Pair) -> Any:
    """The SessionFailure `ready` errbacked with."""
    assert len(p.results) == 1 and isinstance(p.results[0], Failure), p.results
    return p.results[0].check(SessionFailureError) and p.results[0].value.failure


def send(p: Pair, recipients: tuple[Recipient, ...] = (rcpt("a"),), content: bytes = BODY,
         **envelope: Any) -> TransactionResult:
    assert p.results == [None], p.results
    out: list[Any] = []
    p.client.send(Envelope(SENDER, recipients, **envelope), recipients, content).addBoth(out.append)
    p.flush()
    assert len(out) == 1, "transaction did not finish"
    assert isinstance(out[0], TransactionResult), out[0]
    return out[0]


def codes(replies: tuple[Reply | None, ...]) -> list[int | None]:
    return [r.code if r is not None else None for r in replies]


# -- greeting and EHLO --------------------------------------------------------------------

def test_ready_after_ehlo_with_extensions() -> None:
    """EHLO keywords are kept upper case with their parameters."""
    p = start()
    assert p.results == [None]
    assert p.client.usable
    assert p.client.extensions["SIZE"] == "10240000"
    assert "PIPELINING" in p.client.extensions
    assert p.remote.lines == ["EHLO client.example"]


def test_tcp_nodelay_set_on_connect() -> None:
    calls: list[bool] = []

    class Transport(iosim.FakeTransport):
        def setTcpNoDelay(self, enabled: bool) -> None:
            calls.append(enabled)

    start(transport=Transport)
    assert calls == [True]


def test_ehlo_refused_falls_back_to_helo() -> None:
    """RFC 5321 3.2: a 5xx to EHLO means an SMTP-only server: HELO, no extensions."""
    p = start({"EHLO": "502 5.5.2 Command not implemented"})
    assert p.results == [None]
    assert p.remote.lines == ["EHLO client.example", "HELO client.example"]
    assert p.client.extensions == {}
    result = send(p)
    assert result.failure is None and result.final is not None and result.final.code == 250
    # no PIPELINING: one command per batch, no parameters without extensions
    assert ["MAIL FROM:<sender@example.com>"] in p.remote.batches
    assert ["RCPT TO:<a@example.org>"] in p.remote.batches
    assert ["DATA"] in p.remote.batches


def test_ehlo_and_helo_refused_fail_at_ehlo() -> None:
    p = start({"EHLO": "500 5.5.1 no", "HELO": "550 5.7.1 go away"})
    failure = ready_failure(p)
    assert failure.stage == O.EHLO and failure.reply.code == 550
    assert p.remote.lines[-1] == "QUIT"


def test_ehlo_4xx_fails_without_helo() -> None:
    p = start({"EHLO": "451 4.3.0 try later"})
    failure = ready_failure(p)
    assert failure.stage == O.EHLO and failure.reply.code == 451
    assert "HELO client.example" not in p.remote.lines


def test_greeting_554_fails_at_greeting_and_quits() -> None:
    """RFC 5321 3.1: after a 554 greeting the client sends QUIT."""
    p = start({"GREETING": "554 5.7.1 No SMTP service here"})
    failure = ready_failure(p)
    assert failure.stage == O.GREETING
    assert failure.reply == Reply(554, "5.7.1", "No SMTP service here")
    assert p.remote.lines == ["QUIT"]
    assert not p.client.usable


def test_multiline_reply_keeps_lines_and_enhanced_code() -> None:
    p = start({"DOT": "250-2.0.0 first\n250-2.0.0 second\n250 2.0.0 third"})
    result = send(p)
    assert result.final == Reply(250, "2.0.0", "first\nsecond\nthird")


def test_reply_parser_table() -> None:
    """RFC 5321 4.2.1: code, "-" continues, " " ends; a text-less line is allowed."""
    parser = ReplyParser()
    assert parser.line(b"250") == Reply(250, "", "")
    assert parser.line(b"451 4.7.1 Greylisted") == Reply(451, "4.7.1", "Greylisted")
    assert parser.line(b"550 4.7.1 class mismatch stays text") == Reply(
        550, "", "4.7.1 class mismatch stays text")
    assert parser.line(b"250-one") is None
    assert parser.line(b"250 two") == Reply(250, "", "one\ntwo")


@pytest.mark.parametrize("garbage", [b"hello there\r\n", b"250-a\r\n251 b\r\n", b"99 x\r\n"])
def test_malformed_reply_fails_with_451_4_5_0(garbage: bytes) -> None:
    p = start({"MAIL": garbage})
    result = send(p)
    assert result.failure is not None
    assert result.failure.stage == O.MAIL
    assert (result.failure.reply.code, result.failure.reply.enhanced) == (451, "4.5.0")
    assert "malformed reply from mx.example.net [192.0.2.25]" in result.failure.reply.text
    assert not p.client.usable


@pytest.mark.parametrize("reply,text", [
    (b"250 " + b"x" * MAX_REPLY_LINE + b"\r\n",
     f"reply line too long (over {MAX_REPLY_LINE} bytes)"),
    (b"250 " + b"x" * (MAX_REPLY_LINE + 10), f"reply line too long (over {MAX_REPLY_LINE} bytes)"),
    ((b"250-" + b"x" * 1000 + b"\r\n") * (MAX_REPLY // 1000 + 1) + b"250 end\r\n",
     f"reply too long (over {MAX_REPLY} bytes)"),
])
def test_a_reply_past_the_limits_fails_with_451_4_5_0(reply: bytes, text: str) -> None:
    """RFC 5321 4.5.3.1.5 gives a reply line 512 octets; a line past MAX_REPLY_LINE (ended
    or not), or a reply whose lines add up past MAX_REPLY, is a broken peer: dropped."""
    p = start({"MAIL": reply})
    result = send(p)
    assert result.failure is not None and result.failure.stage == O.MAIL
    assert result.failure.reply == Reply(451, "4.5.0", f"{text} from mx.example.net [192.0.2.25]")
    assert not p.client.usable
    assert p.pump.clientIO.disconnecting


@pytest.mark.parametrize("first,unit", [(b"250 ", b"x" * 4096),
                                        (b"", (b"250-" + b"y" * 60 + b"\r\n") * 64)])
def test_an_endless_reply_is_cut_at_a_bounded_size(first: bytes, unit: bytes) -> None:
    """A peer that streams one reply line that never ends (or continuation lines that never
    end) is cut off once it passes the bound: the client never holds more than about
    MAX_REPLY_LINE + one read of it, and closes the connection."""
    p = start({"MAIL": Silent()})
    out: list[Any] = []
    client = p.client
    client.send(Envelope(SENDER, (rcpt("a"),)), (rcpt("a"),), BODY).addBoth(out.append)
    p.flush()
    # the remote says nothing to MAIL: its reply is the flood, fed straight to the client
    assert out == []
    fed = 0
    held = 0
    client.dataReceived(first)
    while not out and fed < 10 * 1024 * 1024:
        client.dataReceived(unit)
        fed += len(unit)
        held = max(held, len(client._buffer), sum(map(len, client._parser._lines)))
    [result] = out
    assert result.failure.reply.enhanced == "4.5.0"
    assert "too long" in result.failure.reply.text
    assert fed <= max(MAX_REPLY, MAX_REPLY_LINE) + len(unit)
    assert held <= max(MAX_REPLY, MAX_REPLY_LINE) + len(unit)
    assert not client.usable


@given(st.lists(st.integers(0, 400), max_size=12))
@hsettings(max_examples=200, deadline=None)
def test_replies_read_the_same_however_the_bytes_are_split(cuts: list[int]) -> None:
    """The greeting and a multi-line EHLO reply, cut into pieces anywhere (a CR and its LF
    apart, one byte at a time...), give the same session as when they come whole."""
    wire = (b"220 mx.example.net ESMTP\r\n"
            b"250-mx.example.net hello\r\n250-PIPELINING\r\n250-SIZE 1000\n"
            b"250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n")
    client = SMTPClient(PLAIN, Clock(), "mx.example.net", "192.0.2.25")
    transport = StringTransport()
    client.makeConnection(transport)
    ready: list[Any] = []
    client.ready.addBoth(ready.append)
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    for a, b in zip(points, points[1:]):
        client.dataReceived(wire[a:b])
    assert ready == [None]
    assert client.extensions == {"PIPELINING": "", "SIZE": "1000", "8BITMIME": "",
                                 "ENHANCEDSTATUSCODES": ""}
    assert transport.value() == b"EHLO client.example\r\n"
    assert client.usable



# -- transactions -------------------------------------------------------------------------

def test_pipelining_sends_mail_rcpts_and_data_in_one_batch() -> None:
    """RFC 2920 3.1: MAIL, every RCPT and DATA in one write; replies read in order."""
    p = start()
    result = send(p, (rcpt("a"), rcpt("b"), rcpt("c")))
    assert ["MAIL FROM:<sender@example.com> SIZE=%d" % len(BODY),
            "RCPT TO:<a@example.org>", "RCPT TO:<b@example.org>", "RCPT TO:<c@example.org>",
            "DATA"] in p.remote.batches
    assert codes(result.rcpt_replies) == [250, 250, 250]
    assert result.final == Reply(250, "2.0.0", "Queued as 4711")
    assert result.failure is None
    assert (result.host, result.address, result.tls) == ("mx.example.net", "192.0.2.25", "")
    assert p.remote.messages == [BODY]


def test_per_recipient_replies() -> None:
    p = start({"RCPT TO:<BAD@": "550 5.1.1 No such user", "RCPT TO:<SLOW@": "450 4.2.1 Busy"})
    result = send(p, (rcpt("good"), rcpt("bad"), rcpt("slow"), rcpt("also")))
    assert codes(result.rcpt_replies) == [250, 550, 450, 250]
    assert result.rcpt_replies[1] == Reply(550, "5.1.1", "No such user")
    assert result.failure is None and result.final is not None and result.final.code == 250
    assert p.remote.messages == [BODY]


def test_452_at_rcpt_is_recorded_for_a_later_transaction() -> None:
    """RFC 5321 4.5.3.1.10: 452 "too many recipients"; the rest go in another transaction."""
    p = start({"RCPT": ["250 2.1.5 OK", "250 2.1.5 OK", "452 4.5.3 Too many recipients"]})
    result = send(p, (rcpt("a"), rcpt("b"), rcpt("c"), rcpt("d")))
    assert codes(result.rcpt_replies) == [250, 250, 452, 452]
    assert result.failure is None and result.final is not None and result.final.code == 250


def test_mail_rejected_fails_the_transaction_and_keeps_the_connection() -> None:
    p = start({"MAIL": "550 5.7.1 Sender refused", "RCPT": "503 5.5.1 Need MAIL",
               "DATA": "503 5.5.1 Need MAIL"})
    result = send(p, (rcpt("a"), rcpt("b")))
    assert result.failure is not None
    assert result.failure.stage == O.MAIL and result.failure.reply.code == 550
    assert result.rcpt_replies == (None, None)
    assert result.final is None
    assert p.remote.messages == []
    assert p.client.usable


def test_mail_rejected_without_pipelining_sends_no_rcpt() -> None:
    p = start({"MAIL": "451 4.3.0 later"}, extensions=())
    result = send(p)
    assert result.failure is not None and result.failure.stage == O.MAIL
    assert not any(line.startswith("RCPT") for line in p.remote.lines)


def test_data_rejected_fails_at_data() -> None:
    p = start({"DATA": "554 5.5.1 No valid recipients"})
    result = send(p)
    assert result.failure is not None
    assert result.failure.stage == O.DATA and result.failure.reply.code == 554
    assert codes(result.rcpt_replies) == [250]
    assert p.remote.messages == []


@pytest.mark.parametrize("final", ["554 5.7.1 Spam", "451 4.3.0 Try later"])
def test_final_reply_is_returned(final: str) -> None:
    p = start({"DOT": final})
    result = send(p)
    assert result.failure is None
    assert result.final is not None and str(result.final.code) == final[:3]
    assert p.client.usable


def test_no_recipient_accepted_but_354_sends_an_empty_message() -> None:
    """RFC 2920 3.1: DATA accepted with no valid recipient: "." alone, no content."""
    p = start({"RCPT": "550 5.1.1 No such user"})
    result = send(p, (rcpt("a"), rcpt("b")))
    assert codes(result.rcpt_replies) == [550, 550]
    assert result.failure is None and result.final is None
    assert p.remote.messages == [b""]
    assert b"Hello." not in p.remote.raw
    assert p.client.usable


def test_no_recipient_accepted_without_pipelining_sends_no_data() -> None:
    p = start({"RCPT": "550 5.1.1 No such user"}, extensions=())
    result = send(p)
    assert codes(result.rcpt_replies) == [550]
    assert "DATA" not in p.remote.lines


def test_421_at_rcpt_ends_the_session() -> None:
    p = start({"RCPT": ["250 2.1.5 OK", "421 4.3.2 Shutting down"]})
    result = send(p, (rcpt("a"), rcpt("b"), rcpt("c")))
    assert result.failure is not None
    assert result.failure.stage == O.RCPT and result.failure.reply.code == 421
    assert codes(result.rcpt_replies) == [250, None, None]
    assert not p.client.usable


# -- parameters ---------------------------------------------------------------------------

def test_parameters_sent_when_offered() -> None:
    """SIZE (RFC 1870), BODY (6152), SMTPUTF8 (6531), RET/ENVID/NOTIFY/ORCPT (3461)."""
    p = start()
    r = rcpt("a", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;a+b=c@example.org")
    send(p, (r,), content=b"caf\xc3\xa9\r\n", body="8BITMIME", smtputf8=True, ret="HDRS",
         envid="id 1+2")
    assert "MAIL FROM:<sender@example.com> SIZE=7 BODY=8BITMIME SMTPUTF8 RET=HDRS "\
           "ENVID=id+201+2B2" in p.remote.lines
    assert "RCPT TO:<a@example.org> NOTIFY=SUCCESS,FAILURE "\
           "ORCPT=rfc822;a+2Bb+3Dc@example.org" in p.remote.lines


def test_parameters_left_out_when_not_offered() -> None:
    p = start(extensions=("PIPELINING",))
    r = rcpt("a", notify=("NEVER",), orcpt="rfc822;a@example.org")
    result = send(p, (r,), content=b"caf\xc3\xa9\r\n", body="8BITMIME", smtputf8=True, ret="FULL",
                  envid="x")
    assert "MAIL FROM:<sender@example.com>" in p.remote.lines
    assert "RCPT TO:<a@example.org>" in p.remote.lines
    assert any("8BITMIME" in note for note in result.notes)   # sent anyway (RFC 6152 3)
    assert p.remote.messages == [b"caf\xc3\xa9\r\n"]


def test_smtputf8_needed_but_not_offered_fails_without_sending() -> None:
    p = start(extensions=("PIPELINING", "8BITMIME"))
    result = send(p, (rcpt("a"), Recipient(Address("jösé", "example.org"))), smtputf8=True)
    assert result.failure is not None
    assert result.failure.stage == O.MAIL
    assert (result.failure.reply.code, result.failure.reply.enhanced) == (553, "5.6.7")
    assert "does not support SMTPUTF8" in result.failure.reply.text
    assert not any(line.startswith("MAIL") for line in p.remote.lines)
    assert p.client.usable


def test_smtputf8_address_sent_when_offered() -> None:
    p = start()
    send(p, (Recipient(Address("jösé", "exämple.org")),), smtputf8=True)
    assert "MAIL FROM:<sender@example.com> SIZE=%d SMTPUTF8" % len(BODY) in p.remote.lines
    assert "RCPT TO:<jösé@exämple.org>" in p.remote.lines


# -- AUTH ---------------------------------------------------------------------------------

AUTH_PLAINTEXT = ClientSettings("client.example", tls="none", auth=("user", "sécret"),
                                allow_plaintext_auth=True)


def test_auth_plain_with_initial_response() -> None:
    p = start(extensions=("PIPELINING", "AUTH LOGIN PLAIN"), settings=AUTH_PLAINTEXT)
    assert p.results == [None]
    token = base64.b64encode("\0user\0sécret".encode()).decode()
    assert p.remote.lines == ["EHLO client.example", f"AUTH PLAIN {token}"]


def test_auth_login_when_plain_is_not_offered() -> None:
    p = start({"AUTH": "334 VXNlcm5hbWU6", "AUTH-CONTINUE": ["334 UGFzc3dvcmQ6", "235 2.7.0 OK"]},
              extensions=("AUTH LOGIN",), settings=AUTH_PLAINTEXT)
    assert p.results == [None]
    assert p.remote.lines == ["EHLO client.example", "AUTH LOGIN", "dXNlcg==",
                              base64.b64encode("sécret".encode()).decode()]


def test_auth_rejected_fails_at_auth() -> None:
    p = start({"AUTH": "535 5.7.8 Authentication credentials invalid"},
              extensions=("AUTH PLAIN",), settings=AUTH_PLAINTEXT)
    failure = ready_failure(p)
    assert failure.stage == O.AUTH and failure.reply.code == 535
    assert p.remote.lines[-1] == "QUIT"


def test_auth_refused_over_plaintext() -> None:
    """Credentials never travel without TLS unless allow_plaintext_auth."""
    settings = ClientSettings("client.example", tls="may", auth=("user", "pw"))
    p = start(extensions=("AUTH PLAIN LOGIN",), settings=settings)
    failure = ready_failure(p)
    assert failure.stage == O.AUTH
    assert (failure.reply.code, failure.reply.enhanced) == (451, "4.7.0")
    assert not any(line.startswith("AUTH") for line in p.remote.lines)


def test_auth_not_offered_goes_on_without() -> None:
    p = start(extensions=("PIPELINING",), settings=AUTH_PLAINTEXT)
    assert p.results == [None]
    assert p.remote.lines == ["EHLO client.example"]


# -- STARTTLS (iosim's pretend TLS) -------------------------------------------------------

def test_starttls_when_offered_then_ehlo_again() -> None:
    """RFC 3207 4.2: after TLS the client forgets what it learned and says EHLO again."""
    settings = ClientSettings("client.example", tls="may", tls_options=FakeTLSOptions(),
                              auth=("user", "pw"))
    p = start(extensions=("STARTTLS", "PIPELINING", "SIZE 100"),
              tls_extensions=("PIPELINING", "AUTH PLAIN"), settings=settings)
    assert p.results == [None]
    assert p.remote.tls
    assert p.remote.lines[:3] == ["EHLO client.example", "STARTTLS", "EHLO client.example"]
    assert p.remote.lines[3].startswith("AUTH PLAIN ")    # allowed: now over TLS
    assert "SIZE" not in p.client.extensions
    result = send(p)
    assert result.tls == "TLS" and result.final is not None and result.final.code == 250


def test_tls_none_does_not_starttls() -> None:
    p = start(extensions=("STARTTLS", "PIPELINING"))
    assert p.results == [None] and "STARTTLS" not in p.remote.lines


def test_tls_may_without_starttls_is_plaintext() -> None:
    p = start(extensions=("PIPELINING",), settings=ClientSettings("client.example", tls="may"))
    assert p.results == [None]
    assert send(p).tls == ""


def test_tls_encrypt_without_starttls_fails_at_starttls() -> None:
    p = start(extensions=("PIPELINING",), settings=ClientSettings("client.example", tls="encrypt"))
    failure = ready_failure(p)
    assert failure.stage == O.STARTTLS
    assert failure.reply == Reply(451, "4.7.0", "TLS required but not offered by "
                                                "mx.example.net [192.0.2.25]")
    assert p.remote.lines[-1] == "QUIT"


@pytest.mark.parametrize("policy", ["may", "encrypt"])
def test_tls_handshake_failure_fails_at_starttls(policy: str) -> None:
    settings = ClientSettings("client.example", tls=policy, tls_options=FakeTLSOptions(ok=False))
    p = start(extensions=("STARTTLS",), settings=settings)
    failure = ready_failure(p)
    assert failure.stage == O.STARTTLS
    assert (failure.reply.code, failure.reply.enhanced) == (451, "4.7.0")
    assert failure.reply.text.startswith("TLS handshake failed")


def test_starttls_refused_with_may_goes_on_in_plaintext() -> None:
    settings = ClientSettings("client.example", tls="may", tls_options=FakeTLSOptions())
    p = start({"STARTTLS": "454 4.7.0 TLS not available"}, extensions=("STARTTLS",),
              settings=settings)
    assert p.results == [None] and not p.remote.tls


def test_starttls_refused_with_encrypt_is_temporary() -> None:
    settings = ClientSettings("client.example", tls="encrypt", tls_options=FakeTLSOptions())
    p = start({"STARTTLS": "502 5.5.1 no"}, extensions=("STARTTLS",), settings=settings)
    failure = ready_failure(p)
    assert failure.stage == O.STARTTLS and failure.reply.code == 451


def test_plaintext_after_starttls_reply_is_refused() -> None:
    """CVE-2011-0411 on the client side: nothing may follow the 220 in plaintext."""
    settings = ClientSettings("client.example", tls="may", tls_options=FakeTLSOptions())
    p = start({"STARTTLS": b"220 2.0.0 Go\r\n250-injected\r\n250 AUTH PLAIN\r\n"},
              extensions=("STARTTLS",), settings=settings)
    failure = ready_failure(p)
    assert failure.stage == O.STARTTLS and failure.reply.code == 451


# -- timeouts and lost connections --------------------------------------------------------

def test_greeting_timeout() -> None:
    """RFC 5321 4.5.3.2.1: 5 minutes for the greeting."""
    p = start({"GREETING": Silent()})
    p.advance(299)
    assert p.results == []
    p.advance(1)
    failure = ready_failure(p)
    assert failure.stage == O.GREETING
    assert (failure.reply.code, failure.reply.enhanced) == (451, "4.4.2")
    assert failure.reply.text == "timeout waiting for greeting from mx.example.net [192.0.2.25]"


@pytest.mark.parametrize("key,stage,seconds", [("MAIL", O.MAIL, 300), ("RCPT", O.RCPT, 300),
                                               ("DATA", O.DATA, 120), ("DOT", O.DOT, 600)])
def test_reply_timeouts(key: str, stage: str, seconds: float) -> None:
    """RFC 5321 4.5.3.2: MAIL 5 min, RCPT 5 min, DATA initiation 2 min, DATA termination 10."""
    p = start({key: Delay(seconds + 1, "250 2.0.0 too late")})
    out: list[Any] = []
    p.client.send(Envelope(SENDER, (rcpt("a"),)), (rcpt("a"),), BODY).addBoth(out.append)
    p.flush()
    p.advance(seconds - 1)
    assert out == []
    p.advance(1)
    [result] = out
    assert result.failure.stage == stage
    assert result.failure.reply.code == 451 and result.failure.reply.enhanced == "4.4.2"
    assert "timeout waiting for" in result.failure.reply.text
    assert not p.client.usable


def test_session_timeouts_come_from_the_delivery_settings() -> None:
    """`[delivery] command_timeout` covers the greeting to RCPT (RSET and QUIT keep their
    shorter waits), the data timeouts DATA, the content's writes and the final reply."""
    t = session_timeouts(7, 3, 5, 11)
    assert t == {"greeting": 7, "ehlo": 7, "starttls": 7, "auth": 7, "mail": 7, "rcpt": 7,
                 "data": 3, "block": 5, "dot": 11, "rset": 7, "quit": 7}
    assert session_timeouts() == DEFAULT_TIMEOUTS
    assert session_timeouts(600)["rset"] == DEFAULT_TIMEOUTS["rset"]
    settings = ClientSettings("client.example", tls="none", timeouts=t)
    p = start({"GREETING": Silent()}, settings=settings)
    p.advance(6.9)
    assert p.results == []
    p.advance(0.1)
    assert ready_failure(p).stage == O.GREETING
    for key, stage, seconds in (("EHLO", O.EHLO, 7), ("DATA", O.DATA, 3), ("DOT", O.DOT, 11)):
        p = start({key: Silent()}, settings=settings)
        out: list[Any] = []
        if stage == O.EHLO:
            p.advance(seconds - 0.1)
            assert p.results == []
            p.advance(0.1)
            assert ready_failure(p).stage == O.EHLO
            continue
        p.client.send(Envelope(SENDER, (rcpt("a"),)), (rcpt("a"),), BODY).addBoth(out.append)
        p.flush()
        p.advance(seconds - 0.1)
        assert out == []
        p.advance(0.1)
        assert out[0].failure.stage == stage
        assert out[0].failure.reply.text.startswith("timeout waiting for")


def test_a_reply_that_trickles_in_gets_no_more_time() -> None:
    """The timeout counts for the whole reply: a peer that sends a byte now and then, and
    never the line end, is left when the timeout is up, as one that says nothing."""
    p = start({"MAIL": Silent()})
    out: list[Any] = []
    p.client.send(Envelope(SENDER, (rcpt("a"),)), (rcpt("a"),), BODY).addBoth(out.append)
    p.flush()
    for byte in b"250 2.1.0 Ok":
        p.client.dataReceived(bytes([byte]))
        p.advance(20)
    assert out == []
    p.advance(300 - 20 * len(b"250 2.1.0 Ok"))
    [result] = out
    assert result.failure.stage == O.MAIL
    assert result.failure.reply.text.startswith("timeout waiting for reply to MAIL")


def test_a_slow_reply_within_the_timeout_is_fine() -> None:
    p = start({"MAIL": Delay(200, "250 2.1.0 OK")})
    out: list[Any] = []
    p.client.send(Envelope(SENDER, (rcpt("a"),)), (rcpt("a"),), BODY).addBoth(out.append)
    p.flush()
    p.advance(200)
    assert out[0].failure is None and out[0].final.code == 250


def test_connection_lost_mid_data() -> None:
    p = start(drop_after_data_bytes=100_000)
    result = send(p, content=b"x" * 998 + b"\r\n" * 1 + (b"y" * 998 + b"\r\n") * 300)
    assert result.failure is not None
    assert result.failure.stage == O.DOT
    assert (result.failure.reply.code, result.failure.reply.enhanced) == (451, "4.4.2")
    assert "connection lost" in result.failure.reply.text
    assert codes(result.rcpt_replies) == [250]
    assert not p.client.usable


def test_connection_dropped_at_mail() -> None:
    p = start({"MAIL": Drop()})
    result = send(p)
    assert result.failure is not None and result.failure.stage == O.MAIL
    assert result.failure.reply.text.startswith("connection lost during reply to MAIL")


def test_send_on_a_dead_connection_is_a_failure_value() -> None:
    p = start()
    p.client.quit()
    p.flush()
    out: list[Any] = []
    p.client.send(Envelope(SENDER, (rcpt("a"),)), (rcpt("a"),), BODY).addBoth(out.append)
    assert out[0].failure.stage == O.MAIL and out[0].failure.reply.code == 451


# -- the body -----------------------------------------------------------------------------

def unstuff(content: bytes) -> bytes:
    assert content.endswith(b"\r\n.\r\n") or content == b".\r\n"
    lines = content[:-3].split(b"\r\n")
    return b"\r\n".join(l[1:] if l.startswith(b".") else l for l in lines)


@pytest.mark.parametrize("offset", [-3, -2, -1, 0, 1])
def test_dot_line_on_a_chunk_boundary_is_stuffed(offset: int) -> None:
    """DESIGN: twisted.mail ends DATA early when "." starts a chunk; we must not."""
    head = b"a" * (CHUNK + offset - 2) + b"\r\n"
    body = head + b".\r\n" + b"..x\r\n" + b".\r\nafter the dot\r\n"
    p = start()
    result = send(p, content=body)
    assert result.final is not None and result.final.code == 250
    assert p.remote.messages == [body]


def test_body_line_ends_become_crlf_and_a_final_crlf_is_added() -> None:
    p = start()
    send(p, content=b"a\nb\rc\r\n.d\n.")
    assert p.remote.messages == [b"a\r\nb\r\nc\r\n.d\r\n.\r\n"]


def test_empty_body() -> None:
    p = start()
    send(p, content=b"")
    assert p.remote.messages == [b""]


crlf_lines = st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                      max_size=30).map(lambda ls: b"".join(l + b"\r\n" for l in ls))


@hsettings(max_examples=200, deadline=None)
@given(body=crlf_lines, cuts=st.lists(st.integers(min_value=0, max_value=1500), max_size=8))
def test_stuffing_is_undone_whatever_the_chunking(body: bytes, cuts: list[int]) -> None:
    """For any body of CRLF lines cut anywhere, un-stuffing the content gives the body."""
    stuffer = DotStuffer()
    points = sorted({c for c in cuts if c < len(body)} | {0, len(body)})
    content = b"".join(stuffer.feed(body[a:b]) for a, b in zip(points, points[1:])) + stuffer.end()
    assert unstuff(content) == body
    assert content == dot_stuff(body)
    assert b"\r\n.\r\n" not in content[:-3]


@hsettings(max_examples=25, deadline=None)
@given(body=crlf_lines, pad=st.integers(min_value=0, max_value=200))
def test_remote_receives_the_body(body: bytes, pad: int) -> None:
    """End to end, near the 64 KiB boundary: what the remote un-stuffs equals the body."""
    body = b"z" * (CHUNK - pad - 2) + b"\r\n" + body
    p = start()
    result = send(p, content=body)
    assert result.final is not None and result.final.code == 250
    assert p.remote.messages == [body]


class PausingTransport(iosim.FakeTransport):
    """A transport whose buffer is always full after a write: the producer must wait."""

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None:
            self.producer.pauseProducing()


def test_body_is_written_with_flow_control() -> None:
    p = start(transport=PausingTransport)
    body = b"line\r\n" * (CHUNK * 3 // 6)
    out: list[Any] = []
    p.client.send(Envelope(SENDER, (rcpt("a"),)), (rcpt("a"),), body).addBoth(out.append)
    p.flush()
    client_io = p.pump.clientIO
    written = len(p.remote.raw)
    assert written < 2 * CHUNK           # one chunk, then the producer waits
    for _ in range(2):                   # two more chunks, each after the transport drains
        assert out == []
        client_io.producer.resumeProducing()
        p.flush()
        assert len(p.remote.raw) > written
        written = len(p.remote.raw)
    assert out[0].final.code == 250
    assert p.remote.messages == [body]


def test_block_timeout_when_the_transport_never_drains() -> None:
    """RFC 5321 4.5.3.2.5: 3 minutes for each write of the content."""
    p = start(transport=PausingTransport)
    out: list[Any] = []
    p.client.send(Envelope(SENDER, (rcpt("a"),)), (rcpt("a"),), b"x\r\n" * CHUNK).addBoth(out.append)
    p.flush()
    p.advance(179)
    assert out == []
    p.advance(1)
    assert out[0].failure.stage == O.DOT
    assert out[0].failure.reply.text.startswith("timeout sending message content")


# -- reuse --------------------------------------------------------------------------------

def test_reuse_right_after_a_completed_transaction_needs_no_rset() -> None:
    """After the reply to the content the server is reset (RFC 5321 4.1.1.4): reusing the
    connection at once sends no RSET, saving a round trip per message."""
    p = start()
    assert send(p).final is not None
    out: list[Any] = []
    p.client.reset().addBoth(out.append)
    p.flush()
    assert out == [True] and p.client.usable
    result = send(p, (rcpt("b"),), content=b"second\r\n")
    assert result.final is not None and result.final.code == 250
    assert p.remote.messages == [BODY, b"second\r\n"]
    assert "RSET" not in p.remote.lines
    assert p.client.transactions == 2


def test_reuse_after_idling_says_rset_first() -> None:
    """A connection idle for a while is checked with RSET before it carries another message."""
    p = start()
    assert send(p).final is not None
    p.clock.advance(CLEAN_REUSE + 1)
    out: list[Any] = []
    p.client.reset().addBoth(out.append)
    p.flush()
    assert out == [True] and p.client.usable
    assert "RSET" in p.remote.lines
    result = send(p, (rcpt("b"),), content=b"second\r\n")
    assert result.final is not None and result.final.code == 250


def test_rset_refused_makes_the_connection_unusable() -> None:
    """A 421 to RSET means the connection cannot carry another message."""
    p = start({"RSET": "421 4.3.2 bye"})
    send(p)
    p.clock.advance(CLEAN_REUSE + 1)
    out: list[Any] = []
    p.client.reset().addBoth(out.append)
    p.flush()
    assert out == [False] and not p.client.usable


def test_unsolicited_421_while_idle_closes() -> None:
    p = start()
    p.pump.serverIO.write(b"421 4.4.2 idle timeout\r\n")
    p.flush()
    assert not p.client.usable


def test_quit_says_quit_and_closes() -> None:
    p = start()
    p.client.quit()
    p.flush()
    assert p.remote.lines[-1] == "QUIT"
    assert p.remote.closed and not p.client.usable


# -- the TLS peer check and REQUIRETLS (RFC 8689) ------------------------------------------------

class CheckedTLS(FakeTLSOptions):
    """iosim's pretend TLS with a `verify_peer` giving a fixed verdict."""

    def __init__(self, check: PeerCheck) -> None:
        super().__init__()
        self.check = check
        self.asked = 0

    def verify_peer(self, connection: Any) -> PeerCheck:
        self.asked += 1
        return self.check


VERIFIED = PeerCheck(True, "verified", authenticated=True)
REFUSED = PeerCheck(False, "unverified", "certificate not trusted: self-signed")


def test_verified_peer_label_goes_into_the_tls_string() -> None:
    options = CheckedTLS(VERIFIED)
    settings = ClientSettings("client.example", tls="verify", tls_options=options)
    p = start(extensions=("STARTTLS", "PIPELINING"), settings=settings)
    assert p.results == [None] and options.asked == 1
    assert send(p).tls == "TLS verified"
    assert p.client.authenticated


def test_refused_peer_defers_with_4_7_5_before_mail() -> None:
    """A peer the TLS policy refuses: 451 4.7.5 naming the reason, QUIT, no MAIL; the
    failure carries the negotiated TLS for the mail log."""
    settings = ClientSettings("client.example", tls="verify", tls_options=CheckedTLS(REFUSED))
    p = start(extensions=("STARTTLS", "PIPELINING"), settings=settings)
    failure = ready_failure(p)
    assert failure.stage == O.STARTTLS and failure.tls_failure == "verification"
    assert (failure.reply.code, failure.reply.enhanced) == (451, "4.7.5")
    assert "certificate not trusted: self-signed" in failure.reply.text
    assert failure.tls == "TLS unverified"
    assert not any(line.startswith("MAIL") for line in p.remote.lines)


@pytest.mark.parametrize("level", ["encrypt", "verify"])
def test_required_tls_not_offered_fails_at_starttls(level: str) -> None:
    p = start(extensions=("PIPELINING",), settings=ClientSettings("client.example", tls=level))
    failure = ready_failure(p)
    assert failure.stage == O.STARTTLS and failure.tls_failure == "not-offered"
    assert failure.reply.enhanced == "4.7.0"


def test_handshake_failure_is_marked_for_the_may_fallback() -> None:
    settings = ClientSettings("client.example", tls="may", tls_options=FakeTLSOptions(ok=False))
    failure = ready_failure(start(extensions=("STARTTLS",), settings=settings))
    assert failure.tls_failure == "handshake"


def requiretls_send(p: Pair) -> TransactionResult:
    return send(p, requiretls=True)


def test_requiretls_over_verified_tls_sends_the_parameter() -> None:
    """RFC 8689 4.2.1: verified TLS and a server offering REQUIRETLS: MAIL ... REQUIRETLS."""
    settings = ClientSettings("client.example", tls="verify", tls_options=CheckedTLS(VERIFIED))
    p = start(extensions=("STARTTLS",), tls_extensions=("PIPELINING", "REQUIRETLS"),
              settings=settings)
    result = requiretls_send(p)
    assert result.failure is None and result.final is not None and result.final.code == 250
    assert "MAIL FROM:<sender@example.com> REQUIRETLS" in p.remote.lines


@pytest.mark.parametrize("settings, extensions, tls_extensions, why", [
    (ClientSettings("client.example", tls="none"), ("PIPELINING", "REQUIRETLS"), None, "no TLS"),
    (ClientSettings("client.example", tls="may", tls_options=CheckedTLS(PeerCheck(True, "unverified"))),
     ("STARTTLS",), ("PIPELINING", "REQUIRETLS"), "TLS not verified"),
    (ClientSettings("client.example", tls="verify", tls_options=CheckedTLS(VERIFIED)),
     ("STARTTLS",), ("PIPELINING",), "does not offer REQUIRETLS"),
])
def test_requiretls_refused_with_5_7_10_without_sending_mail(
        settings: ClientSettings, extensions: tuple[str, ...], tls_extensions: Any,
        why: str) -> None:
    """RFC 8689 4.2.1: without verified TLS or without the server's REQUIRETLS the message
    is not sent: 550 5.7.10 at MAIL, and the connection stays usable for other mail."""
    p = start(extensions=extensions, tls_extensions=tls_extensions, settings=settings)
    result = requiretls_send(p)
    assert result.failure is not None and result.failure.stage == O.MAIL
    assert (result.failure.reply.code, result.failure.reply.enhanced) == (550, "5.7.10")
    assert why in result.failure.reply.text
    assert not any(line.startswith("MAIL") for line in p.remote.lines)
    assert p.client.usable
