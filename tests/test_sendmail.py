"""txmta-sendmail's pure parts: the command lines real callers use, reading the message
(the "." rule, line ends), -t and Bcc, the From field added, the envelope."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from txmta import sendmail as S
from txmta.message import Address


# (caller, argv, what it asks for)
CALLERS = [
    # PHP's mail() with the default sendmail_path "sendmail -t -i"
    ("php mail()", ["-t", "-i"], dict(extract=True, ignore_dots=True, recipients=[])),
    # PHP with mail.force_extra_parameters / the 5th argument "-fbounce@example.org"
    ("php mail() -f", ["-t", "-i", "-fbounce@example.org"],
     dict(extract=True, ignore_dots=True, sender="bounce@example.org")),
    # cronie: sendmail -FCronDaemon -i -B8BITMIME -oem user
    ("cron", ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
     dict(full_name="CronDaemon", ignore_dots=True, body_type="8BITMIME", recipients=["root"],
          ignored=["-oem"])),
    # Debian's cron: sendmail -i -FCronDaemon -B8BITMIME -oem user
    ("debian cron", ["-i", "-FCronDaemon", "-B8BITMIME", "-oem", "alice"],
     dict(full_name="CronDaemon", recipients=["alice"])),
    # git send-email with sendemail.smtpServer = /usr/sbin/sendmail: -i and the recipients
    ("git send-email", ["-i", "a@example.org", "b@example.org"],
     dict(ignore_dots=True, recipients=["a@example.org", "b@example.org"], extract=False)),
    # git send-email with --envelope-sender
    ("git send-email -f", ["-i", "-f", "me@example.org", "a@example.org"],
     dict(sender="me@example.org", recipients=["a@example.org"])),
    # git send-email --smtp-server-option=-t
    ("git send-email -t", ["-i", "-t"], dict(extract=True, ignore_dots=True)),
    # mutt: sendmail -oem -oi -- recipients
    ("mutt", ["-oem", "-oi", "--", "a@example.org"],
     dict(ignore_dots=True, recipients=["a@example.org"])),
    # logwatch, mdadm and other scripts: sendmail -t
    ("scripts", ["-t"], dict(extract=True, ignore_dots=False)),
    # the queue, mailq style, and SMTP on stdin (e.g. msmtp-style wrappers, Perl's Mail::Sendmail)
    ("sendmail -bp", ["-bp"], dict(mode="p")),
    ("sendmail -bs", ["-bs"], dict(mode="s")),
    ("-odb -oi -v", ["-odb", "-oi", "-v", "x@example.org"],
     dict(verbose=True, ignore_dots=True, ignored=["-odb"])),
    ("option -o i apart", ["-o", "i", "x@example.org"], dict(ignore_dots=True)),
    ("-ti together", ["-ti"], dict(extract=True, ignore_dots=True)),
    ("-r is -f", ["-r", "old@example.org", "x@example.org"], dict(sender="old@example.org")),
    ("-N -R -V", ["-N", "success,failure", "-R", "hdrs", "-V", "env1", "x@example.org"],
     dict(notify=("SUCCESS", "FAILURE"), ret="HDRS", envid="env1")),
    ("-q", ["-q"], dict(flush=True)),
    ("-C config", ["-C", "/etc/txmta/other.toml", "-t"], dict(config="/etc/txmta/other.toml")),
    ("ignored -h -L -O", ["-h", "20", "-L", "label", "-OFoo=1", "-U", "x@example.org"],
     dict(recipients=["x@example.org"])),
]


@pytest.mark.parametrize("caller, argv, expected", CALLERS, ids=[c[0] for c in CALLERS])
def test_real_callers(caller: str, argv: list[str], expected: dict) -> None:
    """The command lines applications run parse into what they mean."""
    inv = S.parse(argv)
    for key, value in expected.items():
        assert getattr(inv, key) == value, (caller, key)


@pytest.mark.parametrize("argv", [["-bd"], ["-bx"], ["-Z"], ["-f"], ["-B", "9BIT"],
                                  ["-N", "never,success"], ["-R", "body"], ["-tx"], ["-I"]])
def test_bad_command_lines_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(S.UsageError):
        S.parse(argv)


def test_main_exits_ex_usage_on_a_bad_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert S.main(["-bd"]) == S.EX_USAGE == 64
    assert "usage: txmta-sendmail" in capsys.readouterr().err


def test_recipients_start_at_the_first_word_that_is_not_an_option() -> None:
    """As sendmail: options first; an argument that looks like an option after the first
    recipient is a recipient."""
    assert S.parse(["a@example.org", "-t"]).recipients == ["a@example.org", "-t"]


# -- reading the message --------------------------------------------------------------

def test_a_single_dot_ends_the_message_without_i() -> None:
    data = b"Subject: x\n\nline\n.\nnot read\n"
    assert S.read_message(data, ignore_dots=False) == b"Subject: x\r\n\r\nline\r\n"
    assert S.read_message(data, ignore_dots=True) == b"Subject: x\r\n\r\nline\r\n.\r\nnot read\r\n"


def test_input_is_read_up_to_the_lone_dot_without_i() -> None:
    """A person typing a message ends it with a lone dot: nothing after it is read."""
    import io
    stream = io.BytesIO(b"Subject: x\n\nline\n.\r\nnot read\n")
    assert S.read_input(stream, False, 1 << 20) == b"Subject: x\n\nline\n.\r\n"
    assert stream.read() == b"not read\n"
    assert S.read_input(io.BytesIO(b"a\n.\nb\n"), True, 1 << 20) == b"a\n.\nb\n"
    assert S.read_input(io.BytesIO(b"a\n.b\n."), False, 1 << 20) == b"a\n.b\n."


def test_dots_are_not_unstuffed_and_crlf_is_kept() -> None:
    assert S.read_message(b"a\r\n..b\r\n.c\n", False) == b"a\r\n..b\r\n.c\r\n"


def test_a_last_line_without_newline_gets_crlf() -> None:
    assert S.read_message(b"a\nb", True) == b"a\r\nb\r\n"


@given(st.lists(st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b),
                max_size=20))
def test_read_message_with_i_keeps_every_line(lines: list[bytes]) -> None:
    """With -i, every line is kept, each ended with CRLF, whatever its line end was."""
    data = b"".join(line + (b"\r\n" if i % 2 else b"\n") for i, line in enumerate(lines))
    assert S.read_message(data, True) == b"".join(line + b"\r\n" for line in lines)


# -- -t, Bcc, From ----------------------------------------------------------------------

def test_t_takes_to_cc_bcc_and_removes_bcc() -> None:
    msg = (b"To: Alice <alice@example.org>, bob@example.org\r\nCc: carol@example.org\r\n"
           b"Bcc: hidden@example.net,\r\n  other@example.net\r\nFrom: a@b.org\r\nSubject: s\r\n"
           b"\r\nbody Bcc: not a field\r\n")
    p = S.prepare(msg, extract=True, from_field="x@y.org")
    assert p.header_recipients == ["alice@example.org", "bob@example.org", "carol@example.org",
                                   "hidden@example.net", "other@example.net"]
    assert p.message == (b"To: Alice <alice@example.org>, bob@example.org\r\n"
                         b"Cc: carol@example.org\r\nFrom: a@b.org\r\nSubject: s\r\n"
                         b"\r\nbody Bcc: not a field\r\n")


def test_resent_fields_win_over_to_cc() -> None:
    msg = b"To: old@example.org\r\nResent-To: new@example.org\r\nResent-Bcc: b@example.org\r\n\r\nx\r\n"
    p = S.prepare(msg, extract=True, from_field="x@y.org")
    assert p.header_recipients == ["new@example.org", "b@example.org"]
    assert b"Resent-Bcc" not in p.message


def test_without_t_no_recipients_are_read_but_bcc_is_removed() -> None:
    p = S.prepare(b"To: a@example.org\r\nBcc: b@example.org\r\n\r\nx\r\n", False, "x@y.org")
    assert p.header_recipients == []
    assert b"Bcc" not in p.message


def test_from_is_added_when_missing() -> None:
    p = S.prepare(b"Subject: s\r\n\r\nbody\r\n", False, S.from_field("cron@h.test", "CronDaemon"))
    assert p.message == b"Subject: s\r\nFrom: CronDaemon <cron@h.test>\r\n\r\nbody\r\n"
    assert S.from_field("u@h.test", "Zoë") == "=?utf-8?q?Zo=C3=AB?= <u@h.test>"
    assert S.from_field("u@h.test", None) == "u@h.test"


def test_a_message_without_header_section_gets_one() -> None:
    p = S.prepare(b"just text\r\n", False, "u@h.test")
    assert p.message == b"From: u@h.test\r\n\r\njust text\r\n"
    assert S.prepare(b"", False, "u@h.test").message == b"From: u@h.test\r\n\r\n"


# -- addresses and the envelope -----------------------------------------------------------------

def test_bare_names_get_the_hostname_and_lists_are_split() -> None:
    got = S.parse_recipients(["root", "A <a@example.org>, b@example.org"], "mta.test")
    assert got == [Address("root", "mta.test"), Address("a", "example.org"),
                   Address("b", "example.org")]
    with pytest.raises(S.UsageError):
        S.parse_recipients(["a@@b"], "mta.test")


def test_sender_default_null_and_bare() -> None:
    assert S.parse_sender(None, "alice", "mta.test") == Address("alice", "mta.test")
    assert S.parse_sender("<>", "alice", "mta.test").is_null
    assert S.parse_sender("", "alice", "mta.test").is_null
    assert S.parse_sender("bounces", "alice", "mta.test") == Address("bounces", "mta.test")


def test_envelope_body_type_and_smtputf8() -> None:
    inv = S.parse(["-N", "never", "x@example.org"])
    sender = Address("a", "example.org")
    e = S.envelope_for(inv, sender, [Address("x", "example.org")], b"caf\xc3\xa9\r\n")
    assert e.body == "8BITMIME" and not e.smtputf8
    assert e.recipients[0].notify == ("NEVER",)
    e = S.envelope_for(S.parse(["-B", "7bit"]), sender, [Address("zoë", "example.org")], b"x")
    assert e.body == "7BIT" and e.smtputf8


# -- local submission through the daemon's intake ------------------------------------------

def test_bs_session_is_a_trusted_local_user_who_may_relay() -> None:
    """-bs: the daemon's ESMTP server with a local user's session (whatever address the
    transport reports): RCPT relays without relay.networks or AUTH, the message is stored
    "with local-esmtp" naming the user, and the control fields are honoured (trusted)."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from txmta.inbound.policy import ServerPolicy
    from txmta.inbound.receiver import Receiver
    from txmta.queue import Queue
    from txmta.spool.memory import MemorySpool
    clock = Clock()
    clock.advance(1_800_000_000)
    spool = MemorySpool()
    queue = Queue(spool, clock)
    factory = S._StdioFactory(ServerPolicy(hostname="mta.test"), S.LocalListener(),
                              Receiver(queue, "mta.test", clock), clock, local_user="alice")
    proto = factory.buildProtocol(None)
    transport = StringTransport()        # its peer is 10.0.0.1: not a relay client
    proto.makeConnection(transport)
    proto.dataReceived(b"EHLO app\r\nMAIL FROM:<app@example.org>\r\nRCPT TO:<b@example.net>\r\n"
                       b"DATA\r\nX-Txmta-Expires: 1h\r\nSubject: s\r\n\r\nw\nx\r\n.\r\n")
    codes = [line[:3] for line in transport.value().split(b"\r\n") if line[3:4] == b" "]
    assert codes == [b"220", b"250", b"250", b"250", b"354", b"250"], transport.value()
    [m] = spool.messages.values()
    assert m.client == {"address": "", "helo": "app", "listener": "sendmail", "user": "alice"}
    assert m.expires == 1_800_000_000 + 3600          # trusted: the deadline is taken
    body = spool.bodies[m.id]
    assert body.startswith(b"Received: from alice (local user)\r\n\tby mta.test (txmta) "
                           b"with local-esmtp id " + m.id.encode())
    assert b"X-Txmta-Expires" not in body and body.endswith(b"\r\nw\r\nx\r\n")   # bare LF made CRLF


def test_received_header_of_a_message_read_from_standard_input() -> None:
    from txmta.inbound.receiver import received_header
    from txmta.inbound.session import Session
    from txmta.message import Envelope, Recipient
    env = Envelope(Address("a", "example.org"), (Recipient(Address("b", "example.net")),))
    header = received_header(Session("", 0, "sendmail", local_user="bob"), env, "mta.test",
                             "0152sgpCT4xP9MZ", 0.0)
    assert header == (b"Received: from bob (local user)\r\n"
                      b"\tby mta.test (txmta) with local id 0152sgpCT4xP9MZ\r\n"
                      b"\tfor <b@example.net>; Thu, 01 Jan 1970 00:00:00 +0000\r\n")
