"""Dialogues with the ESMTP server (txmta/inbound/protocol.py) over StringTransport.

Each test is a short script: client bytes in, exact reply codes and enhanced codes out
(RFC 5321, RFC 2034/3463), and, where mail is accepted, what the MemorySpool holds.
AUTH lives in test_server_auth.py, raw-byte attacks in test_smuggling.py.
"""

from __future__ import annotations

import dataclasses

import pytest

from txmta.message import Address, Recipient
from txmta.spool.interface import CommitFailed, SpoolFull

from smtpdialog import (HOSTNAME, LOOPBACK_IP, RELAY_IP, REMOTE_IP, DelayedSpool, Harness,
                        Listener, ehlo_keywords)

MAIL = b"MAIL FROM:<sender@example.com>\r\n"
RCPT = b"RCPT TO:<rcpt@example.org>\r\n"


def relay_client(h: Harness | None = None, **kw: object):
    """A client from a relay_networks address that already said EHLO."""
    h = h or Harness(**kw)  # type: ignore[arg-type]
    c = h.connect(RELAY_IP)
    c.ehlo()
    return h, c


def with_policy(**changes: object) -> Harness:
    h = Harness()
    return Harness(policy=dataclasses.replace(h.policy, **changes))


# -- greeting and EHLO (RFC 5321 4.1.1.1, 4.3.1) -----------------------------------------

def test_greeting_is_220_with_hostname():
    """The server opens with 220 naming itself (RFC 5321 4.3.1)."""
    c = Harness().connect()
    assert c.transport.value() == f"220 {HOSTNAME} ESMTP txmta\r\n".encode()


def test_ehlo_lists_the_supported_extensions():
    """EHLO answers 250 with the hostname and the extension keywords (RFC 5321 4.1.1.1)."""
    c = Harness().connect()
    c.raw()
    c.proto.dataReceived(b"EHLO client.example\r\n")
    assert c.raw() == (
        f"250-{HOSTNAME} Hello client.example [{REMOTE_IP}]\r\n"
        "250-PIPELINING\r\n"           # RFC 2920
        "250-SIZE 36700160\r\n"        # RFC 1870
        "250-8BITMIME\r\n"             # RFC 6152
        "250-SMTPUTF8\r\n"             # RFC 6531
        "250-ENHANCEDSTATUSCODES\r\n"  # RFC 2034
        "250-DSN\r\n"                  # RFC 3461
        "250-CHUNKING\r\n"             # RFC 3030
        "250 HELP\r\n").encode()


def test_ehlo_size_advertises_the_configured_limit():
    """The SIZE keyword carries max_message_size (RFC 1870 4)."""
    c = with_policy(max_message_size=1234).connect()
    assert "SIZE 1234" in c.ehlo()


@pytest.mark.parametrize("tls,options,offered", [
    ("starttls", object(), True),
    ("starttls", None, False),     # no certificate configured
    ("none", object(), False),
    ("implicit", object(), False),
])
def test_starttls_offered_only_on_starttls_listener_with_tls_options(tls, options, offered):
    """STARTTLS is listed only on a starttls listener that has TLS options (RFC 3207 4)."""
    h = Harness(listener=Listener(tls=tls), tls_options=options)
    c = h.connect(tls=(tls == "implicit"))
    assert ("STARTTLS" in c.ehlo()) is offered


def test_starttls_not_offered_once_tls_is_active():
    """After the handshake STARTTLS is no longer listed (RFC 3207 4.2)."""
    h = Harness(listener=Listener(tls="starttls"), tls_options=object())
    c = h.connect()
    c.ehlo()
    assert c.send(b"STARTTLS\r\n") == ["220 2.0.0"]
    c.complete_tls()
    assert "STARTTLS" not in c.ehlo()
    assert c.send(b"STARTTLS\r\n") == ["503 5.5.1"]


@pytest.mark.parametrize("checker,auth,ip,tls,offered", [
    (True, "optional", LOOPBACK_IP, False, True),    # loopback: cleartext allowed
    (True, "required", LOOPBACK_IP, False, True),
    (True, "optional", REMOTE_IP, True, True),       # TLS
    (True, "optional", REMOTE_IP, False, False),     # RFC 4954 4: no cleartext passwords
    (True, "none", LOOPBACK_IP, False, False),
    (False, "optional", LOOPBACK_IP, False, False),  # no users file
])
def test_auth_offered_only_with_checker_auth_listener_and_tls_or_loopback(checker, auth, ip, tls,
                                                                          offered):
    """AUTH PLAIN LOGIN is listed only with a checker, auth != none, and TLS or loopback."""
    from smtpdialog import FakeChecker
    h = Harness(listener=Listener(tls="implicit" if tls else "none", auth=auth),
                checker=FakeChecker() if checker else None)
    kws = h.connect(ip, tls=tls).ehlo()
    assert ("AUTH PLAIN LOGIN" in kws) is offered


def test_helo_answers_250_without_extensions():
    """HELO gets a single-line 250 (RFC 5321 4.1.1.1) and allows a transaction."""
    h = Harness()
    c = h.connect(RELAY_IP)
    assert c.send(b"HELO old.example\r\n") == ["250"]
    assert c.transport.value().endswith(
        f"250 {HOSTNAME} Hello old.example [{RELAY_IP}]\r\n".encode())
    assert c.send(MAIL + RCPT) == ["250 2.1.0", "250 2.1.5"]


@pytest.mark.parametrize("verb", [b"EHLO", b"HELO"])
@pytest.mark.parametrize("name", ["b" * 500, "\u00fc" * 250, "x" * 440])
def test_hello_reply_lines_stay_within_512_octets(verb, name):
    """A long EHLO/HELO name is echoed shortened: no reply line is longer than 512 octets
    with its CRLF (RFC 5321 4.5.3.1.5), and the extension lines are unchanged."""
    c = Harness().connect(RELAY_IP)
    c.raw()
    c.proto.dataReceived(verb + b" " + name.encode() + b"\r\n")
    out = c.raw()
    lines = out.split(b"\r\n")[:-1]
    assert all(len(line) + 2 <= 512 for line in lines), [len(line) for line in lines]
    first = lines[0].decode()
    assert first.startswith(f"250{'-' if verb == b'EHLO' else ' '}{HOSTNAME} Hello ")
    assert first.endswith(f" [{RELAY_IP}]")
    assert name[:100] in first
    if len(name.encode()) > 440:
        assert "... [" in first
    if verb == b"EHLO":
        assert ehlo_keywords(out)[0] == "PIPELINING" and ehlo_keywords(out)[-1] == "HELP"


@pytest.mark.parametrize("line", [b"EHLO\r\n", b"EHLO \r\n", b"HELO\r\n", b"EHLO a b\r\n"])
def test_hello_without_a_single_name_is_501(line):
    """EHLO/HELO need exactly one domain argument (RFC 5321 4.1.1.1)."""
    c = Harness().connect()
    assert c.send(line) == ["501 5.5.4"]


# -- command sequencing (RFC 5321 4.1.4, 3.3) ---------------------------------------------

def test_mail_before_ehlo_is_503():
    """MAIL needs a prior EHLO/HELO (RFC 5321 4.1.4)."""
    c = Harness().connect(RELAY_IP)
    assert c.send(MAIL) == ["503 5.5.1"]


def test_nested_mail_is_503():
    """A second MAIL inside a transaction is refused (RFC 5321 4.1.4)."""
    h, c = relay_client()
    assert c.send(MAIL + MAIL) == ["250 2.1.0", "503 5.5.1"]


def test_rcpt_before_mail_is_503():
    """RCPT needs a MAIL first (RFC 5321 3.3)."""
    h, c = relay_client()
    assert c.send(RCPT) == ["503 5.5.1"]


def test_data_without_recipients_is_554():
    """DATA with no accepted RCPT gets 554 5.5.1 (RFC 5321 3.3, RFC 2920 3.1)."""
    h, c = relay_client()
    assert c.send(MAIL + b"DATA\r\n") == ["250 2.1.0", "554 5.5.1"]


def test_pipelined_data_after_rejected_rcpt_is_554_and_body_is_commands():
    """When every RCPT failed, a pipelined DATA gets 554 and no 354 (RFC 2920 3.1)."""
    h = Harness()
    c = h.connect(REMOTE_IP)   # not allowed to relay
    c.ehlo()
    assert c.send(MAIL + RCPT + b"DATA\r\nNOOP\r\n") == [
        "250 2.1.0", "554 5.7.1", "554 5.5.1", "250 2.0.0"]
    assert h.stored() == []


def test_data_with_argument_is_501():
    """DATA takes no argument (RFC 5321 4.1.1.4)."""
    h, c = relay_client()
    assert c.send(MAIL + RCPT + b"DATA now\r\n") == ["250 2.1.0", "250 2.1.5", "501 5.5.4"]


def test_rset_clears_the_transaction():
    """RSET drops sender and recipients (RFC 5321 4.1.1.5): RCPT then needs a new MAIL."""
    h, c = relay_client()
    assert c.send(MAIL + RCPT + b"RSET\r\n" + RCPT + b"DATA\r\n") == [
        "250 2.1.0", "250 2.1.5", "250 2.0.0", "503 5.5.1", "503 5.5.1"]


def test_ehlo_clears_the_transaction():
    """A new EHLO resets the transaction like RSET (RFC 5321 4.1.4)."""
    h, c = relay_client()
    c.send(MAIL + RCPT)
    c.ehlo()
    assert c.send(RCPT) == ["503 5.5.1"]


def test_noop_vrfy_help():
    """NOOP 250 (4.1.1.9), VRFY 252 (4.1.1.6, 7.3), HELP 214 (4.1.1.8), EXPN 502."""
    h, c = relay_client()
    assert c.send(b"NOOP\r\nVRFY postmaster\r\nHELP\r\nEXPN list\r\nVRFY\r\n") == [
        "250 2.0.0", "252 2.5.0", "214 2.0.0", "502 5.5.1", "501 5.5.4"]


@pytest.mark.parametrize("line", [b"FOO\r\n", b"MAIL2 FROM:<a@b.c>\r\n", b"\r\n",
                                  b"_hello x\r\n"])
def test_unknown_command_is_500(line):
    """An unrecognised verb gets 500 5.5.1 (RFC 5321 4.2.4)."""
    c = Harness().connect()
    assert c.send(line) == ["500 5.5.1"]


def test_verbs_are_case_insensitive():
    """Command verbs are case-insensitive (RFC 5321 2.4)."""
    h = Harness()
    c = h.connect(RELAY_IP)
    assert c.send(b"ehlo x.example\r\nmail FROM:<a@b.example>\r\nNoOp\r\n") == [
        "250", "250 2.1.0", "250 2.0.0"]


def test_quit_answers_221_and_closes():
    """QUIT gets 221 and the connection is closed (RFC 5321 4.1.1.10)."""
    c = Harness().connect()
    assert c.send(b"QUIT\r\nNOOP\r\n") == ["221 2.0.0"]
    assert c.closed
    assert c.send(b"NOOP\r\n") == []


# -- MAIL and RCPT parameters ------------------------------------------------------------

def test_mail_size_over_limit_is_552():
    """A declared SIZE above the limit is refused at MAIL (RFC 1870 6.1)."""
    h = with_policy(max_message_size=1000)
    c = h.connect(RELAY_IP)
    c.ehlo()
    assert c.send(b"MAIL FROM:<a@b.example> SIZE=1001\r\nMAIL FROM:<a@b.example> SIZE=1000\r\n") == [
        "552 5.3.4", "250 2.1.0"]


def test_actual_size_over_limit_is_552_and_nothing_is_stored():
    """A message longer than the limit is refused after the final dot (RFC 1870 6.3)."""
    h = with_policy(max_message_size=100)
    c = h.connect(RELAY_IP)
    c.ehlo()
    body = b"x" * 60 + b"\r\n" + b"y" * 60 + b"\r\n"
    assert c.send(MAIL + RCPT + b"DATA\r\n" + body + b".\r\nNOOP\r\n") == [
        "250 2.1.0", "250 2.1.5", "354", "552 5.3.4", "250 2.0.0"]
    assert h.stored() == []
    # the session continues with a message that fits
    assert c.send(MAIL + RCPT + b"DATA\r\nshort\r\n.\r\n") == [
        "250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]
    assert len(h.stored()) == 1


@pytest.mark.parametrize("line,reply", [
    (b"MAIL FROM:<a@b.example> FOO=1\r\n", "555 5.5.4"),          # RFC 5321 4.1.1.11
    (b"MAIL FROM:<a@b.example> REQUIRETLS\r\n", "555 5.5.4"),     # RFC 8689 not offered
    (b"MAIL FROM:<a@@b.example>\r\n", "501 5.1.7"),               # RFC 3463 bad sender
    (b"MAIL FROM:a@b.example\r\n", "501 5.5.2"),                  # RFC 5321 4.1.2 brackets
    (b"MAIL FROM:<a@b.example> SIZE=x\r\n", "501 5.5.4"),
])
def test_bad_mail_arguments(line, reply):
    """Malformed MAIL arguments get the RFC 3463 code naming the problem."""
    h, c = relay_client()
    assert c.send(line) == [reply]


@pytest.mark.parametrize("line,reply", [
    (b"RCPT TO:<x@y.example> FOO=1\r\n", "555 5.5.4"),
    (b"RCPT TO:<>\r\n", "501 5.1.3"),
    (b"RCPT TO:<x@-y.example>\r\n", "501 5.1.3"),
    (b"RCPT TO:<x@y.example> NOTIFY=NEVER,SUCCESS\r\n", "501 5.5.4"),   # RFC 3461 4.1
])
def test_bad_rcpt_arguments(line, reply):
    """Malformed RCPT arguments get the RFC 3463 code naming the problem."""
    h, c = relay_client()
    assert c.send(MAIL + line) == ["250 2.1.0", reply]


def test_dsn_body_and_smtputf8_parameters_are_kept_in_the_stored_envelope():
    """NOTIFY/ORCPT/RET/ENVID (RFC 3461), BODY (6152) and SMTPUTF8 (6531) reach the spool."""
    h, c = relay_client()
    assert c.send(
        b"MAIL FROM:<s@example.com> RET=HDRS ENVID=abc+2Bdef BODY=8BITMIME SMTPUTF8 SIZE=50\r\n"
        b"RCPT TO:<a@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+40example.org\r\n"
        b"RCPT TO:<postmaster>\r\n"
        b"RCPT TO:<\xc3\xa9@example.org> NOTIFY=NEVER\r\n"
        b"DATA\r\nhi\r\n.\r\n") == [
        "250 2.1.0", "250 2.1.5", "250 2.1.5", "250 2.1.5", "354", "250 2.0.0"]
    [(msg, _)] = h.stored()
    env = msg.envelope
    assert (env.sender, env.ret, env.envid, env.body, env.smtputf8, env.size) == (
        Address("s", "example.com"), "HDRS", "abc+def", "8BITMIME", True, 50)
    assert env.recipients == (
        Recipient(Address("a", "example.org"), ("SUCCESS", "FAILURE"), "rfc822;a@example.org"),
        Recipient(Address("postmaster", HOSTNAME), (), None),       # RFC 5321 4.5.1
        Recipient(Address("\u00e9", "example.org"), ("NEVER",), None))
    assert msg.client == {"address": RELAY_IP, "helo": "client.example", "listener": "0.0.0.0:25"}


def test_null_sender_is_accepted():
    """MAIL FROM:<> is the null reverse-path used by bounces (RFC 5321 4.5.5)."""
    h, c = relay_client()
    assert c.send(b"MAIL FROM:<>\r\n" + RCPT + b"DATA\r\nx\r\n.\r\n")[-1] == "250 2.0.0"
    [(msg, _)] = h.stored()
    assert msg.envelope.sender.is_null


def test_too_many_recipients_is_452():
    """Past max_recipients RCPT gets 452 4.5.3 and the accepted ones still get the mail
    (RFC 5321 4.5.3.1.10)."""
    h = with_policy(max_recipients=2)
    c = h.connect(RELAY_IP)
    c.ehlo()
    assert c.send(MAIL + b"RCPT TO:<a@x.example>\r\nRCPT TO:<b@x.example>\r\n"
                  b"RCPT TO:<c@x.example>\r\nDATA\r\nx\r\n.\r\n") == [
        "250 2.1.0", "250 2.1.5", "250 2.1.5", "452 4.5.3", "354", "250 2.0.0"]
    [(msg, _)] = h.stored()
    assert [str(r.address) for r in msg.envelope.recipients] == ["a@x.example", "b@x.example"]


# -- relay and AUTH=required ---------------------------------------------------------------

def test_relay_denied_for_a_client_outside_relay_networks():
    """RCPT from an unauthenticated client outside relay.networks gets 554 5.7.1."""
    h = Harness()
    c = h.connect(REMOTE_IP)
    c.ehlo()
    assert c.send(MAIL + RCPT) == ["250 2.1.0", "554 5.7.1"]


def test_relay_allowed_for_a_client_in_relay_networks():
    """RCPT from a relay.networks client is accepted."""
    h = Harness()
    c = h.connect(RELAY_IP)
    c.ehlo()
    assert c.send(MAIL + RCPT) == ["250 2.1.0", "250 2.1.5"]


def test_auth_required_listener_refuses_mail_before_auth():
    """On an auth=required listener MAIL gets 530 5.7.0 until AUTH (RFC 4954 6)."""
    from smtpdialog import FakeChecker
    h = Harness(listener=Listener(auth="required"), checker=FakeChecker())
    c = h.connect(RELAY_IP)   # even a relay_networks client
    c.ehlo()
    assert c.send(MAIL) == ["530 5.7.0"]


# -- line length, errors, limits, timeouts ------------------------------------------------

def test_line_over_512_octets_is_500_and_the_session_continues():
    """A command line over 512 octets gets 500 5.5.2 (RFC 5321 4.5.3.1.4, 4.2.4)."""
    h, c = relay_client()
    assert c.send(b"NOOP " + b"x" * 505 + b"\r\n") == ["250 2.0.0"]      # 512 with CRLF
    assert c.send(b"NOOP " + b"x" * 506 + b"\r\n") == ["500 5.5.2"]      # 513
    assert c.send(MAIL) == ["250 2.1.0"]


def test_endless_line_is_discarded_and_answered_500_once_it_ends():
    """A line without end is not buffered without bound; its end gets 500 5.5.2."""
    h, c = relay_client()
    for _ in range(5):
        assert c.send(b"x" * 10000) == []
    assert len(c.proto._buffer) <= 12288
    assert c.send(b"yyy\r\nNOOP\r\n") == ["500 5.5.2", "250 2.0.0"]


def test_mail_line_may_exceed_512_for_its_extensions():
    """MAIL may be longer than 512 octets to carry ESMTP parameters (RFC 5321 4.5.3.1.4)."""
    h, c = relay_client()
    envid = b"e" * 100
    local = b"l" * 64
    assert c.send(b"MAIL FROM:<" + local + b"@" + b"d" * 60 + b".example> ENVID=" + envid +
                  b" AUTH=<> SIZE=10 " + b" " * 300 + b"\r\n") == ["250 2.1.0"]


def test_max_errors_closes_with_421():
    """After max_errors failed commands the server says 421 and disconnects."""
    h = with_policy(max_errors=3)
    c = h.connect()
    assert c.send(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n") == [
        "500 5.5.1", "500 5.5.1", "500 5.5.1", "421 4.7.0"]
    assert c.closed


def test_per_ip_connection_limit_is_421():
    """A client over max_per_ip connections gets 421 4.7.0; other clients are admitted."""
    h = Harness(max_per_ip=2)
    a, b = h.connect(), h.connect()
    assert a.greeting == b.greeting == ["220"]
    third = h.connect()
    assert third.greeting == ["421 4.7.0"]
    assert third.closed
    third.disconnect()                      # a refused connection frees no slot
    assert h.connect(RELAY_IP).greeting == ["220"]
    a.disconnect()
    assert h.connect().greeting == ["220"]
    assert h.connect().greeting == ["421 4.7.0"]


def test_total_connection_limit_is_421():
    """Over max_connections, every new client gets 421 4.7.0 until one leaves."""
    h = Harness(max_connections=2)
    a = h.connect("192.0.2.1")
    h.connect("192.0.2.2")
    late = h.connect("192.0.2.3")
    assert late.greeting == ["421 4.7.0"]
    assert late.closed
    a.disconnect()
    assert h.connect("192.0.2.3").greeting == ["220"]
    assert h.factory.counts == {"": 2, "192.0.2.2": 1, "192.0.2.3": 1}


def test_shutting_down_factory_refuses_new_connections_with_421():
    """While the daemon shuts down, new clients get 421 4.3.2 (RFC 5321 3.8)."""
    h = Harness()
    h.factory.accepting = False
    c = h.connect()
    assert c.greeting == ["421 4.3.2"]
    assert c.closed
    assert h.factory.counts == {"": 0}


def test_command_timeout_is_421_and_closes():
    """An idle client is told 421 4.4.2 and disconnected (RFC 5321 4.5.3.2.7)."""
    h = Harness()
    c = h.connect()
    h.clock.advance(h.policy.command_timeout - 1)
    assert c.send(b"NOOP\r\n") == ["250 2.0.0"]        # activity restarts the timer
    h.clock.advance(h.policy.command_timeout - 1)
    assert c.replies() == []
    h.clock.advance(1)
    assert c.replies() == ["421 4.4.2"]
    assert c.closed


def test_data_timeout_aborts_the_message():
    """A client silent inside DATA times out with 421 and nothing is stored."""
    h = with_policy(data_timeout=30.0)
    c = h.connect(RELAY_IP)
    c.ehlo()
    c.send(MAIL + RCPT + b"DATA\r\nhalf a mess")
    h.clock.advance(30)
    assert c.replies() == ["421 4.4.2"]
    c.disconnect()
    assert h.stored() == []


# -- PIPELINING (RFC 2920) -----------------------------------------------------------------

def test_a_client_that_does_not_read_its_replies_stops_being_read():
    """While the transport's write buffer is full (it pauses the server's producer), the
    server parses no more commands and stops reading; when the client catches up, the rest
    is answered in order.  A client pipelining commands without reading cannot make the
    server buffer replies without bound."""
    h, c = relay_client(with_policy(junk_command_limit=0))     # 1,000 NOOPs: not junk here
    gate = c.transport.producer
    assert gate is not None and c.transport.streaming
    gate.pauseProducing()                      # the client's receive window is full
    assert c.transport.producerState == "paused"
    assert c.send(b"NOOP\r\n" * 1000 + MAIL) == []
    assert len(c.proto._buffer) == 6 * 1000 + len(MAIL)
    gate.resumeProducing()                     # it read: parsing goes on, in order
    assert c.transport.producerState == "producing"
    assert c.replies() == ["250 2.0.0"] * 1000 + ["250 2.1.0"]


def test_output_pause_and_a_pending_commit_release_input_only_together():
    """Input resumes only when both the commit's reply and the client's reading allow."""
    spool = DelayedSpool()
    h = Harness(spool=spool)
    c = h.connect(RELAY_IP)
    c.ehlo()
    assert c.send(MAIL + RCPT + b"DATA\r\nx\r\n.\r\nNOOP\r\n") == ["250 2.1.0", "250 2.1.5", "354"]
    c.transport.producer.pauseProducing()
    spool.commit()
    assert c.replies() == ["250 2.0.0"]            # written (into the full buffer) ...
    assert c.transport.producerState == "paused"   # ... but no more input yet
    c.transport.producer.resumeProducing()
    assert c.replies() == ["250 2.0.0"] and c.transport.producerState == "producing"


def test_a_closed_session_whose_client_does_not_read_is_aborted():
    """After 421 or QUIT the connection closes once its last replies are out; a client that
    never reads them is aborted after command_time_limit instead of being kept."""
    h, c = relay_client()
    c.send(b"QUIT\r\n")
    assert c.closed and c.transport.producer is None    # unregistered: TLS may close
    h.clock.advance(h.policy.command_time_limit - 1)
    assert not c.transport.disconnected
    h.clock.advance(1)
    assert c.transport.disconnected
    h2, c2 = relay_client()
    c2.send(b"QUIT\r\n")
    c2.disconnect()                                   # gone in time: nothing more happens
    h2.clock.advance(h2.policy.command_time_limit)
    assert not c2.transport.disconnected


def test_whole_pipelined_transaction_is_answered_in_order():
    """EHLO..QUIT in one packet get their replies in command order (RFC 2920 3.1)."""
    h = Harness()
    c = h.connect(RELAY_IP)
    assert c.send(b"EHLO c.example\r\n" + MAIL + RCPT + b"RCPT TO:<two@example.org>\r\n"
                  b"DATA\r\nSubject: t\r\n\r\nbody\r\n.\r\nQUIT\r\n") == [
        "250", "250 2.1.0", "250 2.1.5", "250 2.1.5", "354", "250 2.0.0", "221 2.0.0"]
    [(msg, body)] = h.stored()
    assert len(msg.envelope.recipients) == 2
    assert body.endswith(b"\r\n\r\nbody\r\n")


def test_pipelined_commands_wait_for_a_delayed_commit():
    """No reply after 354 is written and the transport stays paused until the spool commit
    fires; then the 250 and the pipelined replies follow in order (RFC 2920 3.1, invariant 1)."""
    spool = DelayedSpool()
    h = Harness(spool=spool)
    c = h.connect(RELAY_IP)
    c.ehlo()
    assert c.send(MAIL + RCPT + b"DATA\r\nx\r\n.\r\nNOOP\r\n" + MAIL + b"QUIT\r\n") == [
        "250 2.1.0", "250 2.1.5", "354"]
    assert c.transport.producerState == "paused"
    assert c.send(b"RSET\r\n") == []            # more input is buffered, not answered
    assert spool.messages == {}
    spool.commit()
    assert c.replies() == ["250 2.0.0", "250 2.0.0", "250 2.1.0", "221 2.0.0"]
    assert c.transport.producerState == "producing"
    assert len(spool.messages) == 1


def test_failed_delayed_commit_answers_451_then_pipelined_commands():
    """A commit failing late still answers 451 4.3.0 before the pipelined commands."""
    spool = DelayedSpool()
    h = Harness(spool=spool)
    c = h.connect(RELAY_IP)
    c.ehlo()
    c.send(MAIL + RCPT + b"DATA\r\nx\r\n.\r\nNOOP\r\n")
    spool.fail_next = CommitFailed("disk on fire")
    spool.commit()
    assert c.replies() == ["451 4.3.0", "250 2.0.0"]
    assert spool.messages == {}


def test_disconnect_while_commit_pending_writes_nothing_more():
    """If the client leaves while the commit is pending, its late reply is not written."""
    spool = DelayedSpool()
    h = Harness(spool=spool)
    c = h.connect(RELAY_IP)
    c.ehlo()
    c.send(MAIL + RCPT + b"DATA\r\nx\r\n.\r\n")
    c.disconnect()
    spool.commit()
    assert c.replies() == []
    assert len(spool.messages) == 1    # accepted by the spool; the client will retry


# -- invariant 1: no 250 before a durable commit ------------------------------------------

@pytest.mark.parametrize("error,reply", [
    (CommitFailed("x"), "451 4.3.0"),
    (SpoolFull("map full"), "452 4.3.1"),   # RFC 3463 4.3.1 mail system full
])
def test_failed_commit_is_4xx_nothing_stored_and_session_continues(error, reply):
    """A failed spool commit answers 4xx, leaves nothing, and the next mail goes through."""
    h, c = relay_client()
    h.spool.fail_next = error
    assert c.send(MAIL + RCPT + b"DATA\r\nfirst\r\n.\r\n") == [
        "250 2.1.0", "250 2.1.5", "354", reply]
    assert h.stored() == []
    assert c.send(MAIL + RCPT + b"DATA\r\nsecond\r\n.\r\n") == [
        "250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]
    [(_, body)] = h.stored()
    assert body.endswith(b"\r\nsecond\r\n")


def test_queued_reply_names_the_stored_message_id():
    """The 250 after DATA carries the queue id under which the message was committed."""
    h, c = relay_client()
    c.send(MAIL + RCPT + b"DATA\r\n")
    c.proto.dataReceived(b"x\r\n.\r\n")
    out = c.raw()
    [(msg, _)] = h.stored()
    assert out == f"250 2.0.0 Ok: queued as {msg.id}\r\n".encode()


# -- BDAT (RFC 3030) -----------------------------------------------------------------------

def test_bdat_chunks_then_last():
    """Each BDAT chunk gets 250 and BDAT LAST gets the queued 250 (RFC 3030 2)."""
    h, c = relay_client()
    assert c.send(MAIL + RCPT + b"BDAT 12\r\nSubject: a\r\nBDAT 9\r\n\r\nhello\r\nBDAT 5 LAST\r\n"
                  b"world") == ["250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0", "250 2.0.0"]
    [(_, body)] = h.stored()
    assert body.endswith(b"Subject: a\r\nMessage-ID: <%s@%s>\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000"
                         b"\r\n\r\nhello\r\nworld" % (h.stored()[0][0].id.encode(), HOSTNAME.encode()))


def test_bdat_reports_octets_received_per_chunk():
    """A non-last chunk's 250 states the octets received so far."""
    h, c = relay_client()
    c.send(MAIL + RCPT)
    c.proto.dataReceived(b"BDAT 3\r\nabcBDAT 4\r\ndefg")
    assert c.raw() == b"250 2.0.0 3 octets received\r\n250 2.0.0 7 octets received\r\n"


def test_bdat_zero_last_ends_the_message():
    """BDAT 0 LAST ends a message whose data came in earlier chunks (RFC 3030 3)."""
    h, c = relay_client()
    assert c.send(MAIL + RCPT + b"BDAT 6\r\nx: y\r\n" + b"BDAT 0 LAST\r\nNOOP\r\n") == [
        "250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0", "250 2.0.0"]
    assert len(h.stored()) == 1


def test_bdat_without_mail_is_503_after_consuming_the_chunk():
    """BDAT without MAIL is refused, but its octets are read so the next command parses
    (RFC 3030 3)."""
    h, c = relay_client()
    assert c.send(b"BDAT 12 LAST\r\nNOOP\r\nQUIT\r\nNOOP\r\n") == ["503 5.5.1", "250 2.0.0"]
    assert not c.closed
    assert h.stored() == []


def test_bdat_without_recipients_is_554_after_consuming_the_chunk():
    """BDAT after MAIL but no accepted RCPT is refused after the chunk (RFC 3030 3)."""
    h = Harness()
    c = h.connect(REMOTE_IP)
    c.ehlo()
    assert c.send(MAIL + RCPT + b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n") == [
        "250 2.1.0", "554 5.7.1", "554 5.5.1", "250 2.0.0"]


@pytest.mark.parametrize("arg", [b"BDAT\r\n", b"BDAT x\r\n", b"BDAT 3 FIRST\r\n", b"BDAT -1\r\n",
                                 "BDAT \u00b2\r\n".encode(), b"BDAT 1 LAST x\r\n"])
def test_bdat_syntax_error_is_501(arg):
    """A malformed BDAT size is 501 5.5.4 and no octets are consumed."""
    h, c = relay_client()
    assert c.send(MAIL + RCPT + arg + b"NOOP\r\n") == ["250 2.1.0", "250 2.1.5", "501 5.5.4",
                                                       "250 2.0.0"]


def test_data_after_bdat_in_one_transaction_is_503():
    """DATA cannot follow BDAT in the same transaction (RFC 3030 3)."""
    h, c = relay_client()
    assert c.send(MAIL + RCPT + b"BDAT 3\r\nabcDATA\r\nBDAT 3 LAST\r\ndef") == [
        "250 2.1.0", "250 2.1.5", "250 2.0.0", "503 5.5.1", "250 2.0.0"]
    [(_, body)] = h.stored()
    assert body.endswith(b"\r\n\r\nabcdef\r\n")   # header-less: blank line, CRLF added


def test_bdat_chunk_boundary_inside_crlf_is_not_a_bare_cr():
    """A CRLF split across two chunks is a line end, not a bare CR (RFC 3030 2)."""
    h, c = relay_client()
    assert c.send(MAIL + RCPT + b"BDAT 8\r\nSubj: a\r" + b"BDAT 4 LAST\r\n\nb\r\n") == [
        "250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0"]
    [(_, body)] = h.stored()
    assert body.startswith(b"Received:")
    assert body.endswith(b"Subj: a\r\nMessage-ID: <%s@%s>\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000"
                         b"\r\n\r\nb\r\n" % (h.stored()[0][0].id.encode(), HOSTNAME.encode()))


def test_bdat_over_size_limit_is_552_and_nothing_stored():
    """BDAT data past max_message_size is refused with 552 5.3.4 (RFC 1870, RFC 3030)."""
    h = with_policy(max_message_size=10)
    c = h.connect(RELAY_IP)
    c.ehlo()
    assert c.send(MAIL + RCPT + b"BDAT 20 LAST\r\n" + b"x" * 20 + b"NOOP\r\n") == [
        "250 2.1.0", "250 2.1.5", "552 5.3.4", "250 2.0.0"]
    assert h.stored() == []


def test_rset_between_bdat_chunks_discards_the_message():
    """RSET in the middle of a BDAT transaction drops the chunks received (RFC 3030 2)."""
    h, c = relay_client()
    assert c.send(MAIL + RCPT + b"BDAT 3\r\nabcRSET\r\n" + MAIL + RCPT + b"BDAT 3 LAST\r\nxyz") == [
        "250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.0.0", "250 2.1.0", "250 2.1.5", "250 2.0.0"]
    [(_, body)] = h.stored()
    assert body.endswith(b"\r\n\r\nxyz\r\n")


def test_ehlo_between_bdat_chunks_discards_the_message():
    """EHLO resets the transaction (RFC 5321 4.1.4), so chunks sent before it are dropped
    and a later transaction does not inherit them or their envelope."""
    h, c = relay_client()
    assert c.send(MAIL + b"RCPT TO:<old@example.org>\r\nBDAT 3\r\nabc") == [
        "250 2.1.0", "250 2.1.5", "250 2.0.0"]
    c.ehlo()
    assert c.send(MAIL + b"RCPT TO:<new@example.org>\r\nBDAT 3 LAST\r\nxyz") == [
        "250 2.1.0", "250 2.1.5", "250 2.0.0"]
    [(msg, body)] = h.stored()
    assert [str(r.address) for r in msg.envelope.recipients] == ["new@example.org"]
    assert b"abc" not in body
    assert body.endswith(b"\r\n\r\nxyz\r\n")


# -- STARTTLS (RFC 3207) -------------------------------------------------------------------

def starttls_client(ip: str = REMOTE_IP):
    h = Harness(listener=Listener(tls="starttls"), tls_options=object())
    c = h.connect(ip)
    c.ehlo()
    return h, c


def test_starttls_answers_220_and_starts_tls():
    """STARTTLS gets 220 and the transport switches to TLS with the factory's options."""
    h, c = starttls_client()
    c.proto.dataReceived(b"STARTTLS\r\n")
    assert c.raw() == b"220 2.0.0 Ready to start TLS\r\n"
    assert c.transport.tls_started == [h.tls_options]


def test_commands_pipelined_after_starttls_are_discarded():
    """Anything sent after STARTTLS in the same packet is not executed (RFC 3207 4.2,
    CVE-2011-0411 command injection)."""
    h, c = starttls_client(RELAY_IP)
    assert c.send(b"STARTTLS\r\n" + MAIL + RCPT + b"DATA\r\nx\r\n.\r\nQUIT\r\n") == ["220 2.0.0"]
    assert not c.closed
    c.complete_tls()
    assert c.send(RCPT) == ["503 5.5.1"]          # no MAIL was remembered
    assert h.stored() == []


def test_starttls_resets_the_session_so_ehlo_is_needed_again():
    """After STARTTLS the client must say EHLO again (RFC 3207 4.2)."""
    h, c = starttls_client(RELAY_IP)
    c.send(b"STARTTLS\r\n")
    c.complete_tls()
    assert c.send(MAIL) == ["503 5.5.1"]
    c.ehlo()
    assert c.send(MAIL + RCPT + b"DATA\r\nx\r\n.\r\n")[-1] == "250 2.0.0"
    [(msg, body)] = h.stored()
    assert msg.client["tls"] == "TLSv1.3 TLS_AES_256_GCM_SHA384"
    assert b" with ESMTPS id " in body
    assert b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256 bits))\r\n" in body


def test_starttls_with_argument_or_not_offered():
    """STARTTLS takes no argument (501) and is refused where not offered (502)."""
    h, c = starttls_client()
    assert c.send(b"STARTTLS now\r\n") == ["501 5.5.4"]
    c2 = Harness().connect()
    c2.ehlo()
    assert c2.send(b"STARTTLS\r\n") == ["502 5.5.1"]
    assert c2.transport.tls_started == []


def test_ehlo_keywords_helper_reads_last_reply():
    """(helper) ehlo_keywords picks the extension lines out of the EHLO reply."""
    data = b"220 x\r\n250-h Hello a [1.2.3.4]\r\n250-PIPELINING\r\n250 HELP\r\n"
    assert ehlo_keywords(data) == ["PIPELINING", "HELP"]


def test_slow_commit_does_not_time_the_client_out():
    """Time spent waiting on our own commit never counts against the client: no 421 while
    the commit is pending, and the command timer starts again once the 250 is written."""
    spool = DelayedSpool()
    h = Harness(spool=spool)
    c = h.connect(RELAY_IP)
    c.ehlo()
    c.send(MAIL + RCPT + b"DATA\r\nx\r\n.\r\n")
    h.clock.advance(h.policy.command_timeout * 3)
    assert c.replies() == [] and not c.closed
    spool.commit()
    assert c.replies() == ["250 2.0.0"]
    h.clock.advance(h.policy.command_timeout)
    assert c.replies() == ["421 4.4.2"] and c.closed


@pytest.mark.parametrize("name", [b"a\rb", b"host\x1b[31m", b"a\x00b", b"two words"])
def test_helo_name_with_controls_or_spaces_is_501(name):
    """A HELO/EHLO name with control characters or spaces is refused, never echoed (RFC 5321 4.1.1.1)."""
    h = Harness()
    c = h.connect()
    assert c.send(b"EHLO " + name + b"\r\n") == ["501 5.5.4"]
    assert b"\x1b" not in c.raw() and b"\x00" not in c.raw()


def test_ipv4_mapped_client_counts_as_its_ipv4_address():
    """::ffff:192.0.2.7 and 192.0.2.7 share one per-IP connection count."""
    h = Harness(max_per_ip=1)
    assert h.connect("192.0.2.7").greeting == ["220"]
    assert h.connect("::ffff:192.0.2.7").greeting == ["421 4.7.0"]


def test_junk_commands_past_the_limit_count_as_errors():
    """NOOP/VRFY/RSET/HELP are answered as usual, but past junk_command_limit each one is an
    error, so a client that only keeps the line open is disconnected at max_errors."""
    h = with_policy(max_errors=3, junk_command_limit=4)
    c = h.connect()
    assert c.send(b"NOOP\r\nRSET\r\nVRFY x\r\nHELP\r\n") == ["250 2.0.0", "250 2.0.0", "252 2.5.0",
                                                            "214 2.0.0"]
    assert not c.closed
    assert c.send(b"NOOP\r\nNOOP\r\n") == ["250 2.0.0", "250 2.0.0"]
    assert c.send(b"NOOP\r\n") == ["250 2.0.0", "421 4.7.0"]      # the third error
    assert c.closed


def test_junk_limit_zero_means_none():
    h = with_policy(max_errors=2, junk_command_limit=0)
    c = h.connect()
    assert c.send(b"NOOP\r\n" * 50) == ["250 2.0.0"] * 50
    assert not c.closed


@pytest.mark.parametrize("request_line", [b"GET / HTTP/1.1", b"POST /email HTTP/1.1",
                                          b"CONNECT mx.example:25 HTTP/1.0", b"get / HTTP/1.0"])
def test_an_http_request_is_answered_once_and_disconnected(request_line):
    h = with_policy()
    c = h.connect()
    assert c.send(request_line + b"\r\nHost: x\r\n\r\n") == ["221 2.7.0"]
    assert c.closed
