"""Suppressed addresses are refused at RCPT (or ended at intake), until their entry expires."""

from twisted.internet.task import Clock

from smtpdialog import RELAY_IP, Harness
from txmta.message import Address, Envelope, Recipient
from txmta.queue import Queue
from txmta.message import SUPPRESSED, Suppression
from txmta.spool.memory import MemorySpool
from txmta.suppression import SuppressionList, rejection

T0 = 1_700_000_000.0


def entry(address="bob@example.net", since=T0, ttl=3600.0):
    return Suppression(address, "invalid-recipient", since, since + ttl, "550 5.1.1 no such user")


def test_check_is_case_insensitive_and_ignores_expired_entries():
    """An address matches whatever its case; past its expiry it no longer does."""
    s = SuppressionList([entry("Bob@Example.NET")])
    assert s.check("bob@example.net", T0 + 10) is not None
    assert s.check("BOB@example.net", T0 + 3600) is None
    assert s.remove("bob@EXAMPLE.net") and len(s) == 0


def test_rejection_says_suppressed_since_when_and_why():
    """The RCPT reply is 550 5.1.1 and names the date and the bounce that caused it."""
    r = rejection("bob@example.net", entry())
    assert (r.code, r.enhanced) == (550, "5.1.1")
    assert "suppressed since 2023-11-14" in r.text and "invalid-recipient" in r.text


def test_rejection_is_one_reply_line_of_at_most_512_octets():
    """A long address and a stored reply holding CR, LF, NUL or many UTF-8 octets still
    give one well-formed reply line (RFC 5321 4.2, 4.5.3.1.5): the next hop's text never
    reaches the client raw."""
    for address, reply in [("a" * 1500 + "@example.org", "550 5.1.1 " + "y" * 300),
                           ("bob@example.net", "550 5.1.1 no\r\nsuch\ruser\x00\nhere"),
                           ("\u00fc" * 700 + "@example.org", "550 5.1.1 " + "\u00e9" * 400)]:
        r = rejection(address, Suppression(address, "invalid-recipient", T0, T0 + 60, reply))
        wire = r.to_bytes()
        assert wire.startswith(b"550 5.1.1 <") and wire.endswith(b")\r\n")
        assert wire.count(b"\r") == 1 and wire.count(b"\n") == 1 and b"\x00" not in wire
        assert len(wire) <= 512, len(wire)
        assert "suppressed since 2023-11-14" in r.text


def test_rcpt_to_a_suppressed_address_is_refused_and_others_accepted():
    """With action = reject, RCPT of a suppressed address gets 550 5.1.1; nothing else changes."""
    h = Harness()
    h.factory.suppression = SuppressionList([entry(since=h.clock.seconds())])
    c = h.connect(RELAY_IP)
    c.ehlo()
    replies = c.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<Bob@example.net>\r\n"
                     b"RCPT TO:<carol@example.net>\r\n")
    assert replies == ["250 2.1.0", "550 5.1.1", "250 2.1.5"]
    assert b"suppressed since" in c.transport.value()


def test_drop_mode_ends_suppressed_recipients_at_intake():
    """With action = drop, the message is accepted and the suppressed recipient is final at once."""
    clock = Clock()
    clock.advance(T0)
    spool = MemorySpool()
    q = Queue(spool, clock, drop_suppressed=True)
    q.suppression.add(entry())
    env = Envelope(Address("app", "example.com"),
                   (Recipient(Address("bob", "example.net")), Recipient(Address("c", "example.net"))))
    mid = q.new_message_id()
    q.put(mid, env, q.body_writer(mid), {}, T0)
    states = spool.messages[mid].recipients
    assert states[0].state == SUPPRESSED and states[0].last_reply.code == 550
    assert states[1].state == "queued"
    only = Envelope(Address("app", "example.com"), (Recipient(Address("bob", "example.net")),))
    mid2 = q.new_message_id()
    q.put(mid2, only, q.body_writer(mid2), {}, T0)
    assert mid2 not in spool.messages and spool.history[mid2][0].recipients[0].state == SUPPRESSED


def test_admin_add_remove_import_update_the_spool_and_the_mirror():
    """suppression add/remove/import change the LMDB list and the in-memory check together."""
    clock = Clock()
    clock.advance(T0)
    spool = MemorySpool()
    q = Queue(spool, clock)
    out = []
    q.suppress_add("X@Example.com").addCallback(out.append)
    q.suppress_import([("a@example.com", "complaint"), ("b@example.com", "")]).addCallback(out.append)
    q.suppress_remove("x@example.com").addCallback(out.append)
    assert out == [True, 2, True]
    assert sorted(spool.suppressions) == ["a@example.com", "b@example.com"]
    assert q.suppression.check("A@example.com", T0) is not None
    assert q.suppression.check("x@example.com", T0) is None
    assert spool.suppressions["b@example.com"].reason == "manual"


def test_a_dropped_recipient_is_in_the_mail_log_and_the_timeline():
    """With action = drop, the drop is visible: a status=suppressed line and a timeline event."""
    from twisted.logger import Logger

    from txmta.maillog import MailLog
    clock = Clock()
    clock.advance(T0)
    spool = MemorySpool()
    events = []
    q = Queue(spool, clock, drop_suppressed=True)
    maillog = MailLog(Logger(namespace="txmta.maillog", observer=events.append))
    q.events.subscribe(maillog.heard, *maillog.HEARS)
    q.suppression.add(entry())
    env = Envelope(Address("app", "example.com"), (Recipient(Address("bob", "example.net")),))
    mid = q.new_message_id()
    q.put(mid, env, q.body_writer(mid), {}, T0)
    assert [e["event"] for e in events] == ["received", "suppressed"]
    assert "status=suppressed" in events[1]["line"]
    assert [e.kind for e in spool.events[mid]] == ["received", "suppressed"]
