"""The server's total time limits (txmta/inbound/protocol.py): `command_time_limit` for one
command line or a TLS handshake, `data_time_limit` for one message's data.

The idle timeouts (`command_timeout`, `data_timeout`) close a silent client; these close a
client that keeps the line busy with a byte now and then (slowloris), which the idle timers
never see.  Time is a `task.Clock`; the idle timeouts are set far above the limits so that
only the limits can fire.
"""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings, strategies as st

from smtpdialog import RELAY_IP, DelayedSpool, Harness, Listener

MAIL = b"MAIL FROM:<sender@example.com>\r\n"
RCPT = b"RCPT TO:<rcpt@example.org>\r\n"
COMMAND_LIMIT = 60.0
DATA_LIMIT = 600.0
IDLE = 3600.0


def limited(**kw: object) -> Harness:
    """A harness whose limits are COMMAND_LIMIT and DATA_LIMIT, its idle timeouts an hour,
    recording the timeout lines the mail log would get in `h.timeouts`."""
    base = Harness(**kw)  # type: ignore[arg-type]
    h = Harness(policy=dataclasses.replace(
        base.policy, command_timeout=IDLE, data_timeout=IDLE,
        command_time_limit=COMMAND_LIMIT, data_time_limit=DATA_LIMIT),
        **kw)  # type: ignore[arg-type]
    h.timeouts = []  # type: ignore[attr-defined]
    h.factory.note_timeout = lambda *a: h.timeouts.append(a)  # type: ignore[attr-defined]
    return h


def last_line(c) -> bytes:  # type: ignore[no-untyped-def]
    return c.transport.value().rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]


# -- command_time_limit ---------------------------------------------------------------------

def test_drip_fed_command_is_421_at_the_limit_from_its_first_byte():
    """A command line sent a byte at a time, each well inside command_timeout, gets
    421 4.4.2 once command_time_limit has passed since its first byte."""
    h = limited()
    c = h.connect(RELAY_IP)
    h.clock.advance(COMMAND_LIMIT * 3)          # silence before the line counts for nothing
    for byte in b"NOOP"[:3]:
        assert c.send(bytes([byte])) == []
        h.clock.advance(COMMAND_LIMIT / 3 - 1)
    assert c.replies() == [] and not c.closed
    h.clock.advance(3)
    assert c.replies() == ["421 4.4.2"]
    assert last_line(c).startswith(b"421 4.4.2 Command not completed within the time limit")
    assert c.closed and not c.transport.disconnected     # a clean close, the 421 goes out
    assert h.timeouts == [(RELAY_IP, "CONNECT", "command_time_limit", COMMAND_LIMIT, None)]


def test_each_command_line_gets_its_own_limit():
    """The clock restarts with every line: a slow but steady client is never cut off."""
    h = limited()
    c = h.connect(RELAY_IP)
    c.send(b"NO")
    for _ in range(5):
        h.clock.advance(COMMAND_LIMIT - 1)
        assert c.send(b"OP\r\nNO") == ["250 2.0.0"]
    h.clock.advance(COMMAND_LIMIT)
    assert c.replies() == ["421 4.4.2"]
    assert h.timeouts[0][1] == "NOOP"           # after the last command it completed


def test_endless_line_is_421_at_the_limit():
    """A line that never ends (discarded past 12288 octets) is cut off by the limit too."""
    h = limited()
    c = h.connect(RELAY_IP)
    for _ in range(COMMAND_LIMIT.__int__() // 10 - 1):
        assert c.send(b"x" * 5000) == []
        h.clock.advance(10)
    assert len(c.proto._buffer) <= 12288
    h.clock.advance(10)
    assert c.replies() == ["421 4.4.2"] and c.closed


def test_auth_exchange_line_counts_like_a_command():
    """The reply to an AUTH challenge is a line like any other."""
    from smtpdialog import LOOPBACK_IP, FakeChecker
    h = limited(listener=Listener(auth="optional"), checker=FakeChecker())
    c = h.connect(LOOPBACK_IP)
    c.ehlo()
    assert c.send(b"AUTH LOGIN\r\n") == ["334"]
    c.send(b"YW")
    h.clock.advance(COMMAND_LIMIT)
    assert c.replies() == ["421 4.4.2"]


def test_waiting_on_our_commit_never_counts():
    """Pipelined commands held while the commit is pending do not run the command clock."""
    spool = DelayedSpool()
    h = limited(spool=spool)
    c = h.connect(RELAY_IP)
    c.ehlo()
    assert c.send(MAIL + RCPT + b"DATA\r\nx\r\n.\r\nNOO") == ["250 2.1.0", "250 2.1.5", "354"]
    h.clock.advance(COMMAND_LIMIT * 5)
    assert c.replies() == [] and not c.closed
    spool.commit()
    assert c.replies() == ["250 2.0.0"]
    h.clock.advance(COMMAND_LIMIT - 1)           # "NOO" is now being read: its clock runs
    assert c.send(b"P\r\n") == ["250 2.0.0"]


@settings(max_examples=60, deadline=None)
@given(gaps=st.lists(st.integers(0, 120).map(lambda q: q / 4), min_size=1, max_size=30))
def test_no_line_outlives_the_limit(gaps):
    """However a line without end is dripped (any pauses under the idle timeout), the client
    is closed exactly when command_time_limit has passed since its first byte."""
    h = limited()
    c = h.connect(RELAY_IP)
    c.send(b"N")
    elapsed = 0.0
    for gap in gaps:
        h.clock.advance(gap)
        elapsed += gap
        if elapsed >= COMMAND_LIMIT:
            assert c.closed and c.replies() == ["421 4.4.2"]
            return
        assert not c.closed
        c.send(b"O")
    h.clock.advance(COMMAND_LIMIT - elapsed)
    assert c.closed and c.replies() == ["421 4.4.2"]


# -- TLS handshakes ---------------------------------------------------------------------------

def test_starttls_handshake_must_finish_within_the_command_limit():
    """After STARTTLS the handshake is the next thing to finish; a client that never
    finishes it is disconnected at the limit, with no reply (TLS would hold one, and with
    it the connection, until the handshake is done)."""
    h = limited(listener=Listener(tls="starttls"), tls_options=object())
    c = h.connect(RELAY_IP)
    c.ehlo()
    assert c.send(b"STARTTLS\r\n") == ["220 2.0.0"]
    h.clock.advance(COMMAND_LIMIT - 1)
    assert not c.closed
    h.clock.advance(1)
    assert c.transport.disconnected                     # abortConnection
    assert h.timeouts == [(RELAY_IP, "TLS handshake", "command_time_limit", COMMAND_LIMIT, None)]


def test_tls_holding_the_greeting_does_not_stop_reading_the_handshake():
    """TLS buffers what we write until its handshake ends and pauses the producer meanwhile;
    the server must keep reading then, or the handshake would never end."""
    h = limited(listener=Listener(tls="implicit"))
    c = h.connect(RELAY_IP, tls=True, handshake=False)
    c.transport.producer.pauseProducing()       # the greeting is held by TLS
    assert c.transport.producerState == "producing"
    c.proto.handshakeCompleted()
    c.transport.producer.resumeProducing()
    assert c.send(b"EHLO x.example\r\n") == ["250"]


def test_finished_handshake_stops_the_clock():
    h = limited(listener=Listener(tls="starttls"), tls_options=object())
    c = h.connect(RELAY_IP)
    c.ehlo()
    c.send(b"STARTTLS\r\n")
    h.clock.advance(COMMAND_LIMIT - 1)
    c.complete_tls()
    h.clock.advance(COMMAND_LIMIT * 10)
    assert not c.closed
    assert c.send(b"EHLO again.example\r\n") == ["250"]


def test_implicit_tls_client_that_never_handshakes_is_aborted():
    """On an implicit TLS listener the greeting waits in the TLS layer for the handshake;
    a client that connects and stays silent is aborted at the limit."""
    h = limited(listener=Listener(tls="implicit"))
    c = h.connect(RELAY_IP, tls=True, handshake=False)
    h.clock.advance(COMMAND_LIMIT)
    assert c.transport.disconnected
    c.disconnect()
    assert h.factory.counts == {"": 0}                 # its slot is free again once lost


def test_refused_implicit_tls_client_is_not_waited_for_beyond_the_limit():
    """Over max_connections on an implicit TLS listener, the 421 waits in TLS for the
    handshake (loseConnection); a client that never does it is aborted at the limit."""
    h = limited(listener=Listener(tls="implicit"), max_connections=1)
    h.connect(RELAY_IP, tls=True)
    late = h.connect("192.0.2.99", tls=True, handshake=False)
    assert late.greeting == ["421 4.7.0"]
    assert late.transport.disconnecting and not late.transport.disconnected
    h.clock.advance(COMMAND_LIMIT - 1)
    assert not late.transport.disconnected
    h.clock.advance(1)
    assert late.transport.disconnected
    other = h.connect("192.0.2.98", tls=True, handshake=False)
    other.proto.handshakeCompleted()    # a handshake in time: the 421 goes out, no abort
    h.clock.advance(COMMAND_LIMIT * 2)
    assert other.transport.disconnecting and not other.transport.disconnected


def test_idle_timeout_during_a_handshake_aborts_too():
    """The idle timeout (shorter here) also aborts rather than waits on a handshake."""
    h = Harness(listener=Listener(tls="implicit"))
    h = Harness(listener=Listener(tls="implicit"),
                policy=dataclasses.replace(h.policy, command_timeout=10.0))
    c = h.connect(RELAY_IP, tls=True, handshake=False)
    h.clock.advance(10)
    assert c.transport.disconnected


def test_tls_client_hello_in_plaintext_is_421_and_closes():
    """A TLS record where a command belongs (a TLS client on a plaintext port) gets 421 at
    once instead of waiting for a line end that never comes."""
    h = limited()
    c = h.connect(RELAY_IP)
    assert c.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32)) == ["421 4.5.1"]
    assert c.closed
    h2 = limited()
    c2 = h2.connect(RELAY_IP)
    c2.ehlo()                                          # after EHLO too
    assert c2.send(b"\x16\x03\x03\x00\x10garbage") == ["421 4.5.1"]


# -- data_time_limit ----------------------------------------------------------------------------

def test_drip_fed_data_is_421_at_the_limit_and_nothing_is_stored():
    """A message whose lines come steadily but too slowly is cut off at data_time_limit
    from the 354; nothing of it is stored; the mail log line has the octets received."""
    h = limited()
    c = h.connect(RELAY_IP)
    c.ehlo()
    assert c.send(MAIL + RCPT + b"DATA\r\n") == ["250 2.1.0", "250 2.1.5", "354"]
    for _ in range(int(DATA_LIMIT // 30) - 1):
        h.clock.advance(30)
        assert c.send(b"line of text\r\n") == []
    h.clock.advance(29)
    assert not c.closed
    h.clock.advance(1)
    assert c.replies() == ["421 4.4.2"]
    assert last_line(c).startswith(b"421 4.4.2 Message data not completed within the time limit")
    assert c.closed
    c.disconnect()
    assert h.stored() == []
    [(ip, after, key, seconds, octets)] = h.timeouts
    assert (ip, after, key, seconds) == (RELAY_IP, "DATA", "data_time_limit", DATA_LIMIT)
    assert octets == 14 * (int(DATA_LIMIT // 30) - 1)


def test_bdat_chunks_and_the_commands_between_share_one_limit():
    """From the first BDAT to the end of BDAT LAST: small chunks, each quick, cannot stretch
    the transfer past data_time_limit."""
    h = limited()
    c = h.connect(RELAY_IP)
    c.ehlo()
    c.send(MAIL + RCPT)
    for _ in range(int(DATA_LIMIT // 50) - 1):
        assert c.send(b"BDAT 5\r\nabcde") == ["250 2.0.0"]
        h.clock.advance(50)
    h.clock.advance(50)
    assert c.replies() == ["421 4.4.2"]
    c.disconnect()
    assert h.stored() == []
    assert h.timeouts[0][1:3] == ("BDAT", "data_time_limit")


def test_the_data_clock_stops_at_the_final_dot_and_at_rset():
    """After the message is in (or abandoned), the data limit is no longer running."""
    h = limited()
    c = h.connect(RELAY_IP)
    c.ehlo()
    h.clock.advance(1)
    assert c.send(MAIL + RCPT + b"DATA\r\n") [-1] == "354"
    h.clock.advance(DATA_LIMIT - 1)
    assert c.send(b"Subject: t\r\n\r\nbody\r\n.\r\n") == ["250 2.0.0"]
    assert c.send(MAIL + RCPT + b"BDAT 3\r\nabc") == ["250 2.1.0", "250 2.1.5", "250 2.0.0"]
    h.clock.advance(DATA_LIMIT - 1)
    assert c.send(b"RSET\r\n") == ["250 2.0.0"]
    for _ in range(3):
        h.clock.advance(DATA_LIMIT / 2)
        assert c.send(b"NOOP\r\n") == ["250 2.0.0"]
    assert not c.closed and h.timeouts == []
    assert len(h.stored()) == 1


def test_commit_after_the_data_does_not_count():
    """Data in just inside the limit, then a slow commit: 250, never 421."""
    spool = DelayedSpool()
    h = limited(spool=spool)
    c = h.connect(RELAY_IP)
    c.ehlo()
    assert c.send(MAIL + RCPT + b"DATA\r\n") == ["250 2.1.0", "250 2.1.5", "354"]
    h.clock.advance(DATA_LIMIT - 1)
    assert c.send(b"x\r\n.\r\n") == []
    h.clock.advance(DATA_LIMIT * 2)
    assert c.replies() == [] and not c.closed
    spool.commit()
    assert c.replies() == ["250 2.0.0"]


def test_idle_timeout_is_logged_with_its_key():
    """A silent client's 421 is logged too, naming the idle timeout."""
    h = limited()
    c = h.connect(RELAY_IP)
    c.ehlo()
    c.send(MAIL + RCPT + b"DATA\r\nSubject: x\r\n")
    h.clock.advance(IDLE)         # also past the data limit, which fires first
    assert c.replies() == ["421 4.4.2"]
    assert h.timeouts == [(RELAY_IP, "DATA", "data_time_limit", DATA_LIMIT, 12)]
    h2 = Harness()
    h2.timeouts = []  # type: ignore[attr-defined]
    h2.factory.note_timeout = lambda *a: h2.timeouts.append(a)  # type: ignore[attr-defined]
    c2 = h2.connect(RELAY_IP)
    c2.ehlo()
    h2.clock.advance(h2.policy.command_timeout)
    assert c2.replies() == ["421 4.4.2"]
    assert h2.timeouts == [(RELAY_IP, "EHLO", "command_timeout", h2.policy.command_timeout, None)]
