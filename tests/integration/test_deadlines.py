"""Deadlines with a real twistd: mail that cannot be delivered in time ends "expired", with
a DSN that says it was not delivered in time, and its address is not suppressed.

The test zone (tests/dnsserver.py on 127.0.0.53) has sender.test, whose MX on 127.0.0.31 is a
bounce sink receiving the DSNs; dead.test, whose MX on 127.0.0.35 has nothing listening
(every attempt is refused at once); and dest.test, whose MX on 127.0.0.32 is a sink that
defers every recipient as "user unknown" (a temporary failure whose category would suppress
the address if it were permanent).  Every wait is bounded; loopback only.
"""

from __future__ import annotations

import json
import smtplib
import sys
import time
from typing import Any, Callable, Iterator

import pytest

from itlib import (REPO, Daemon, common_free_port, delivery_sections, maillog_events,
                   queued_id, statuses, txmta_cli, wait_until)
from sinks import SmtpSink
from test_bounces import Report, check_envelope_and_head

sys.path.insert(0, str(REPO / "tests"))
from dnsserver import running  # noqa: E402

pytestmark = pytest.mark.integration

SENDER = "sender@sender.test"
BOUNCE_IP = "127.0.0.31"        # MX of sender.test: receives the DSNs
DEST_IP = "127.0.0.32"          # MX of dest.test: defers everyone
DEAD_IP = "127.0.0.35"          # MX of dead.test: nothing listens there
MX = {"sender.test": ("mx.sender.test", BOUNCE_IP), "dest.test": ("mx.dest.test", DEST_IP),
      "dead.test": ("mx.dead.test", DEAD_IP)}
UNKNOWN_LATER = "450 4.1.1 <{}>: Recipient address rejected: User unknown in local recipient table"


@pytest.fixture(scope="module")
def dns() -> Iterator[tuple[str, int]]:
    zone: dict[str, Any] = {}
    for domain, (host, ip) in MX.items():
        zone[domain + "."] = {"MX": [[10, host + "."]]}
        zone[host + "."] = {"A": [ip]}
    with running(zone) as hostport:
        yield hostport


@pytest.fixture
def port() -> int:
    """A port free on every address of this module (so nothing listens on DEAD_IP)."""
    return common_free_port(BOUNCE_IP, DEST_IP, DEAD_IP)


def start(start_daemon: Callable[..., Daemon], dns: tuple[str, int], port: int,
          **sections: Any) -> Daemon:
    conf: dict[str, Any] = delivery_sections(port, dns, schedule=("2s",))
    conf.update(sections)
    return start_daemon(**conf)


def send(d: Daemon, rcpt: str, body: bytes) -> tuple[int, bytes]:
    """One message over SMTP from 127.0.0.1 (in relay.networks: a trusted client); the reply
    to the end of its data."""
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        s.ehlo("client.test.invalid")
        assert s.mail(SENDER)[0] == 250
        assert s.rcpt(rcpt)[0] == 250
        s.putcmd("data")
        assert s.getreply()[0] == 354
        s.send(body + b".\r\n")
        return s.getreply()


def body(tag: str, extra: str = "") -> bytes:
    return (f"Message-ID: <{tag}@client.test.invalid>\r\nFrom: <{SENDER}>\r\n{extra}"
            f"Subject: {tag}\r\n\r\nyour code is 123456\r\n").encode()


def wait_expired(d: Daemon, qid: str, timeout: float) -> None:
    wait_until(lambda: "expired" in statuses(d, qid), timeout, f"status=expired for {qid}",
               diagnose=d.maillog)


def the_report(bounces: SmtpSink) -> Report:
    bounces.wait(lambda s: len(s.transactions) >= 1, 15, "the DSN at the sender's sink")
    time.sleep(1.0)                                   # and no second one
    [t] = bounces.snapshot()
    return Report(t)


def test_a_lane_deadline_of_10s_to_an_unreachable_destination_ends_expired(
        start_daemon: Callable[..., Daemon], dns: tuple[str, int], port: int) -> None:
    """The default lane has deadline = "10s" and its own 2 s retry schedule; dead.test refuses
    every connection.  The message is retried until its last attempt at 9 s, then expires
    (not bounced) with a DSN that says it was not delivered in time, and the address is not
    on the suppression list."""
    with SmtpSink(BOUNCE_IP, port) as bounces:
        d = start(start_daemon, dns, port,
                  lane=[{"name": "transactional", "deadline": "10s", "retry": ["2s"]}])
        t0 = time.monotonic()
        code, reply = send(d, "user@dead.test", body("deadline-lane"))
        assert code == 250, reply
        qid = queued_id(reply)
        wait_expired(d, qid, 25)
        took = time.monotonic() - t0
        r = the_report(bounces)
    sts = statuses(d, qid)
    assert sts[-1] == "expired" and set(sts[:-1]) == {"deferred"}, sts
    assert len(sts) >= 4, f"retried on the lane's 2 s schedule: {sts}"
    assert 8.0 <= took <= 20.0, f"expired after {took:.1f} s, the last attempt is at 9 s"
    [last] = [e for e in maillog_events(d) if e["id"] == qid and e["status"] == "expired"]
    assert float(last["delay"]) < 10.0, last         # the last attempt came before the deadline
    check_envelope_and_head(r)
    assert r.queue_id == qid
    assert r.msg["Subject"] == "Undelivered Mail: not delivered in time"
    block = r.block("user@dead.test")
    assert block["Action"] == "failed" and block["Status"] == "4.4.7", block.items()
    human = " ".join(r.parts[0].get_content().split())
    assert "<user@dead.test>: delivery failed not delivered in time (deadline" in human, human
    assert "bounced" not in statuses(d)
    assert json.loads(txmta_cli(d, "suppression", "list", "--json").stdout) == []


def test_x_txmta_expires_ends_expired_without_suppression_and_a_past_one_is_refused(
        start_daemon: Callable[..., Daemon], dns: tuple[str, int], port: int) -> None:
    """X-Txmta-Expires from a trusted client: a message already past it is refused with 554
    5.4.7; one with 6 s left, deferred as "user unknown" (a category that would suppress a
    hard bounce), expires after its last attempt without being suppressed, and the field is
    not in the message as stored (nor in the copy the DSN returns)."""
    replies = {"RCPT": UNKNOWN_LATER.format("ann@dest.test")}
    with SmtpSink(BOUNCE_IP, port) as bounces, SmtpSink(DEST_IP, port, replies=replies) as dest:
        d = start(start_daemon, dns, port)
        code, reply = send(d, "ann@dest.test",
                           body("too-late", "X-Txmta-Expires: Sat, 01 Jan 2000 00:00:00 +0000\r\n"))
        assert (code, reply[:5]) == (554, b"5.4.7"), reply
        code, reply = send(d, "ann@dest.test", body("deadline-header", "X-Txmta-Expires: 6s\r\n"))
        assert code == 250, reply
        qid = queued_id(reply)
        wait_expired(d, qid, 20)
        r = the_report(bounces)
        assert len(dest.rcpt_log) >= 2               # tried, then tried again before 6 s
    events = [e for e in maillog_events(d) if e["id"] == qid]
    assert [e["status"] for e in events][-1] == "expired"
    assert events[-1]["category"] == "invalid-recipient", events[-1]
    assert float(events[-1]["delay"]) < 6.0, events[-1]
    assert json.loads(txmta_cli(d, "suppression", "list", "--json").stdout) == []
    block = r.block("ann@dest.test")
    assert block["Action"] == "failed" and block["Status"] == "4.4.7", block.items()
    assert "450 4.1.1" in str(block["Diagnostic-Code"])
    assert "not delivered in time" in " ".join(r.parts[0].get_content().split())
    original = r.original
    assert original is not None
    assert b"X-Txmta-Expires" not in original.as_bytes() and b"deadline-header" in original.as_bytes()
    # the refused message left nothing behind: one message received in all
    assert sum(1 for line in d.maillog().splitlines() if ": received " in line) == 1
