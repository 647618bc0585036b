"""Bounces with a real twistd: delivery status notifications (RFC 3461/3464) and the
suppression list, end to end.

A DSN is a new message from <> to the original sender, delivered like any other mail: the
sender's domain (sender.test) is in the test zone with an MX on 127.0.0.31, where a "bounce
sink" (`sinks.SmtpSink`) receives the reports; the destinations are sinks on 127.0.0.32..34.
One DNS server (tests/dnsserver.py on 127.0.0.53) serves the zone for the module; each test
starts its own daemon (see test_delivery.py for the set-up).  Every wait is bounded;
loopback only.
"""

from __future__ import annotations

import email
import email.policy
import json
import smtplib
import sys
import time
from email.message import EmailMessage
from typing import Any, Callable, Iterator

import pytest

from itlib import (REPO, Daemon, common_free_port, delivery_sections, maillog_events,
                   queued_id, statuses, submit, txmta_cli, wait_until)
from sinks import DEFAULT_EXTENSIONS, SmtpSink, Transaction

sys.path.insert(0, str(REPO / "tests"))
from dnsserver import running  # noqa: E402

pytestmark = pytest.mark.integration

SENDER = "sender@sender.test"
BOUNCE_IP = "127.0.0.31"       # MX of sender.test: receives the DSNs
DEST_IP = "127.0.0.32"         # MX of dest.test
DSNHOP_IP = "127.0.0.33"       # MX of dsnhop.test: a next hop that offers DSN
PLAINHOP_IP = "127.0.0.34"     # MX of plainhop.test: a next hop without DSN
MX = {
    "sender.test": ("mx.sender.test", BOUNCE_IP),
    "dest.test": ("mx.dest.test", DEST_IP),
    "dsnhop.test": ("mx.dsnhop.test", DSNHOP_IP),
    "plainhop.test": ("mx.plainhop.test", PLAINHOP_IP),
}
NO_SUCH_USER = "550 5.1.1 <{}>: Recipient address rejected: no such user here"
TEMP = "451 4.3.0 mailbox temporarily unavailable"   # not greylisting (outcome.classify): the schedule applies


def make_zone() -> dict[str, Any]:
    zone: dict[str, Any] = {}
    for domain, (host, ip) in MX.items():
        zone[domain + "."] = {"MX": [[10, host + "."]]}
        zone[host + "."] = {"A": [ip]}
    return zone


@pytest.fixture(scope="module")
def dns() -> Iterator[tuple[str, int]]:
    with running(make_zone()) as hostport:
        yield hostport


@pytest.fixture
def port() -> int:
    """A port free on every sink address of this module."""
    return common_free_port(BOUNCE_IP, DEST_IP, DSNHOP_IP, PLAINHOP_IP)


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon], dns: tuple[str, int],
           port: int) -> Callable[..., Daemon]:
    """`daemon(schedule=..., max_lifetime=..., **sections)`: a daemon delivering to the zone;
    extra keywords are config sections merged over the delivery ones."""
    def start(schedule: tuple[str, ...] = ("1s",), max_lifetime: str = "1h",
              **sections: dict[str, Any]) -> Daemon:
        conf = delivery_sections(port, dns, schedule=schedule)
        conf["retry"]["max_lifetime"] = max_lifetime
        for name, table in sections.items():
            conf.setdefault(name, {}).update(table)
        return start_daemon(**conf)
    return start


# -- helpers --------------------------------------------------------------------------------

def body_for(tag: str) -> bytes:
    return (f"Message-ID: <{tag}@client.test.invalid>\r\n"
            "Date: Sat, 28 Nov 2026 07:00:00 +0000\r\n"
            f"From: <{SENDER}>\r\n"
            f"Subject: {tag}\r\n\r\n"
            f"body of {tag}\r\n").encode()


def send(d: Daemon, sender: str, rcpts: list[str], body: bytes, mail_options: tuple[str, ...] = (),
         rcpt_options: dict[str, list[str]] | None = None) -> str:
    """Like itlib.submit, with per-recipient RCPT parameters; the queue id."""
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        s.ehlo("client.test.invalid")
        code, resp = s.mail(sender, list(mail_options))
        assert code == 250, (code, resp)
        for r in rcpts:
            code, resp = s.rcpt(r, (rcpt_options or {}).get(r, []))
            assert code == 250, (r, code, resp)
        code, resp = s.data(body)
        assert code == 250, (code, resp)
    return queued_id(resp)


def wait_status(d: Daemon, qid: str, status: str, rcpt: str | None = None,
                timeout: float = 15.0) -> None:
    wait_until(lambda: status in statuses(d, qid, rcpt), timeout,
               f"status={status} for {qid} {rcpt or ''} in the mail log",
               diagnose=lambda: d.maillog())


def dsn_lines(d: Daemon, qid: str | None = None) -> list[str]:
    """The mail log's "sender delivery status notification" lines (of one message)."""
    return [line for line in d.maillog().splitlines()
            if "sender delivery status notification:" in line
            and (qid is None or f" {qid}: sender delivery" in f" {line.partition(' ')[2]}")]


def wait_dsns(sink: SmtpSink, n: int, timeout: float = 15.0) -> list[Transaction]:
    sink.wait(lambda s: len(s.transactions) >= n, timeout, f"{n} DSN(s) at the bounce sink")
    return sink.snapshot()



class Report:
    """A received DSN, parsed: the message, its per-message fields, its recipient blocks."""

    def __init__(self, t: Transaction) -> None:
        self.transaction = t
        self.msg: EmailMessage = email.message_from_bytes(t.data, policy=email.policy.default)  # type: ignore[assignment]
        assert self.msg.get_content_type() == "multipart/report", self.msg["Content-Type"]
        assert self.msg.get_param("report-type") == "delivery-status", self.msg["Content-Type"]
        parts = self.msg.get_payload()
        assert isinstance(parts, list) and len(parts) in (2, 3), parts
        self.parts: list[EmailMessage] = parts
        assert parts[0].get_content_type() == "text/plain"
        status = parts[1]
        assert status.get_content_type() == "message/delivery-status"
        blocks = status.get_payload()
        assert isinstance(blocks, list) and len(blocks) >= 2, blocks
        self.fields: EmailMessage = blocks[0]
        self.blocks: list[EmailMessage] = blocks[1:]

    def block(self, rcpt: str) -> EmailMessage:
        found = [b for b in self.blocks if b["Final-Recipient"] == f"rfc822; {rcpt}"]
        assert len(found) == 1, (rcpt, [b.items() for b in self.blocks])
        return found[0]

    @property
    def recipients(self) -> list[str]:
        return [str(b["Final-Recipient"]).partition(";")[2].strip() for b in self.blocks]

    @property
    def queue_id(self) -> str:
        return str(self.fields["X-Txmta-Queue-ID"])

    @property
    def original(self) -> EmailMessage | None:
        return self.parts[2] if len(self.parts) == 3 else None


def check_envelope_and_head(r: Report, mta: str = "mx.test.invalid") -> None:
    """What every DSN has: from <> to the sender, Auto-Submitted, Reporting-MTA,
    Arrival-Date."""
    t = r.transaction
    assert t.mail_from == "", t.mail_from           # MAIL FROM:<>
    assert t.rcpt_to == [SENDER]
    assert r.msg["Auto-Submitted"] == "auto-replied"
    assert [a.addr_spec for a in r.msg["To"].addresses] == [SENDER]
    assert [a.addr_spec for a in r.msg["From"].addresses] == [f"MAILER-DAEMON@{mta}"]
    assert r.msg["Message-ID"]
    assert r.fields["Reporting-MTA"] == f"dns; {mta}"
    assert r.fields["Arrival-Date"]
    assert email.utils.parsedate_to_datetime(str(r.fields["Arrival-Date"])) is not None


def assert_no_more(sink: SmtpSink, n: int, wait: float = 1.5) -> None:
    """No DSN beyond the first `n` arrives within `wait` seconds."""
    time.sleep(wait)
    got = sink.snapshot()
    assert len(got) == n, [Report(t).recipients for t in got]


# -- the tests ------------------------------------------------------------------------------

def test_550_at_rcpt_failure_dsn(daemon: Callable[..., Daemon], port: int) -> None:
    replies = {"RCPT:nobody@dest.test": NO_SUCH_USER.format("nobody@dest.test")}
    with SmtpSink(BOUNCE_IP, port) as bounces, SmtpSink(DEST_IP, port, replies=replies) as dest:
        d = daemon()
        qid = submit(d, SENDER, ["nobody@dest.test", "dave@dest.test"], body_for("rcpt550"))
        [t] = wait_dsns(bounces, 1)
        wait_status(d, qid, "sent", "dave@dest.test")
        assert_no_more(bounces, 1, 1.0)
    assert dest.delivered_to() == ["dave@dest.test"]
    r = Report(t)
    check_envelope_and_head(r)
    assert r.queue_id == qid
    assert r.fields["Original-Envelope-Id"] is None            # no ENVID given
    assert r.recipients == ["nobody@dest.test"]
    b = r.block("nobody@dest.test")
    assert b["Action"] == "failed"
    assert b["Status"] == "5.1.1"
    assert b["Remote-MTA"] == "dns; mx.dest.test"
    assert str(b["Diagnostic-Code"]).startswith("smtp; 550 5.1.1 "), b["Diagnostic-Code"]
    assert "no such user here" in str(b["Diagnostic-Code"])
    assert b["Original-Recipient"] is None                     # no ORCPT given
    assert r.msg["Subject"] == "Undelivered Mail Returned to Sender"
    # no RET, small, a failure: the whole original comes back
    orig = r.original
    assert orig is not None and orig.get_content_type() == "message/rfc822"
    assert orig.get_payload()[0]["Subject"] == "rcpt550"
    # the mail log
    [e] = [e for e in maillog_events(d) if e["to"] == "nobody@dest.test"]
    assert e["status"] == "bounced" and e["category"] == "invalid-recipient", e
    assert e["reply"].startswith("550 5.1.1"), e
    [line] = dsn_lines(d, qid)
    assert line.endswith(f"to=<{SENDER}>"), line
    # the DSN itself was delivered and logged as sent (to the sender's MX)
    dsn_id = line.split("notification: ")[1].split(" ")[0]
    wait_status(d, dsn_id, "sent", SENDER)


def test_554_at_end_of_data_one_dsn_for_all(daemon: Callable[..., Daemon], port: int) -> None:
    rcpts = ["ann@dest.test", "ben@dest.test", "cid@dest.test"]
    with SmtpSink(BOUNCE_IP, port) as bounces, \
            SmtpSink(DEST_IP, port, replies={"DOT": "554 5.6.0 message content rejected"}) as dest:
        d = daemon()
        qid = submit(d, SENDER, rcpts, body_for("dot554"))
        [t] = wait_dsns(bounces, 1)
        for rc in rcpts:
            wait_status(d, qid, "bounced", rc)
        assert_no_more(bounces, 1)
    assert dest.transactions == []
    r = Report(t)
    check_envelope_and_head(r)
    assert sorted(r.recipients) == rcpts, "one block per recipient"
    for rc in rcpts:
        b = r.block(rc)
        assert b["Action"] == "failed" and b["Status"] == "5.6.0", b.items()
        assert b["Remote-MTA"] == "dns; mx.dest.test"
        assert "554 5.6.0 message content rejected" in str(b["Diagnostic-Code"])
    assert len(dsn_lines(d, qid)) == 1


def test_expiry_failure_dsn_and_no_suppression(daemon: Callable[..., Daemon], port: int) -> None:
    with SmtpSink(BOUNCE_IP, port) as bounces, \
            SmtpSink(DEST_IP, port, replies={"RCPT": TEMP}) as dest:
        d = daemon(schedule=("1s",), max_lifetime="4s")
        t0 = time.monotonic()
        qid = submit(d, SENDER, ["slow@dest.test"], body_for("expiry"))
        wait_status(d, qid, "expired", timeout=20)
        assert time.monotonic() - t0 >= 3.5, "expired before its lifetime"
        [t] = wait_dsns(bounces, 1)
        sts = statuses(d, qid)
        assert sts[-1] == "expired" and set(sts[:-1]) == {"deferred"} and len(sts) >= 3, sts
        # expired recipients are never suppressed: txmta still takes mail for the address
        # (and it reaches the sink again)
        n_before = len([x for x in dest.rcpt_log if x[2] == "slow@dest.test"])
        qid2 = submit(d, SENDER, ["slow@dest.test"], body_for("expiry-again"))
        dest.wait(lambda s: len([x for x in s.rcpt_log if x[2] == "slow@dest.test"]) > n_before, 10,
                  "a new attempt at the expired address")
        assert qid2 != qid
    r = Report(t)
    check_envelope_and_head(r)
    b = r.block("slow@dest.test")
    assert b["Action"] == "failed"
    assert b["Status"] == "4.4.7", b.items()
    assert str(b["Diagnostic-Code"]).startswith("smtp; 451 4.3.0"), b["Diagnostic-Code"]
    assert b["Remote-MTA"] == "dns; mx.dest.test"
    assert json.loads(txmta_cli(d, "suppression", "list", "--json").stdout) == []


def test_delay_warning_once_per_recipient(daemon: Callable[..., Daemon], port: int) -> None:
    rcpts = ["late1@dest.test", "late2@dest.test"]
    with SmtpSink(BOUNCE_IP, port) as bounces, SmtpSink(DEST_IP, port, replies={"RCPT": TEMP}):
        d = daemon(schedule=("1s",), max_lifetime="1h", dsn={"delay_warning": "2s"})
        qid = submit(d, SENDER, rcpts, body_for("delay"))
        wait_dsns(bounces, 1)
        # more retries after the warning: no second one
        n = len(statuses(d, qid))
        wait_until(lambda: len(statuses(d, qid)) >= n + 3 * len(rcpts), 15,
                   "three more deferrals after the delay warning", diagnose=d.maillog)
        time.sleep(0.5)
        got = bounces.snapshot()
    assert set(statuses(d, qid)) == {"deferred"}
    reports = [Report(t) for t in got]
    warned = sorted(rc for r in reports for rc in r.recipients)
    assert warned == rcpts, f"each recipient warned exactly once: {warned}"
    assert len(dsn_lines(d, qid)) == len(reports)
    for r in reports:
        check_envelope_and_head(r)
        assert r.queue_id == qid
        assert r.msg["Subject"] == "Delayed Mail (still being retried)"
        for rc in r.recipients:
            b = r.block(rc)
            assert b["Action"] == "delayed", b.items()
            assert b["Status"] == "4.3.0", b.items()
            assert b["Will-Retry-Until"], b.items()
            until = email.utils.parsedate_to_datetime(str(b["Will-Retry-Until"]))
            arrival = email.utils.parsedate_to_datetime(str(r.fields["Arrival-Date"]))
            assert 3590 <= (until - arrival).total_seconds() <= 3610, (until, arrival)
            assert "451 4.3.0" in str(b["Diagnostic-Code"])
        # a delay report returns the header section only
        assert r.original is not None and r.original.get_content_type() == "text/rfc822-headers"


def test_notify_success_relayed_only_without_remote_dsn(daemon: Callable[..., Daemon],
                                                        port: int) -> None:
    mail_options = ("RET=HDRS", "ENVID=abc123")
    with SmtpSink(BOUNCE_IP, port) as bounces, \
            SmtpSink(DSNHOP_IP, port, extensions=list(DEFAULT_EXTENSIONS) + ["DSN"]) as dsnhop, \
            SmtpSink(PLAINHOP_IP, port) as plainhop:
        assert "DSN" not in DEFAULT_EXTENSIONS
        d = daemon()
        qa = send(d, SENDER, ["bob@dsnhop.test"], body_for("notify-a"),
                  mail_options,
                  rcpt_options={"bob@dsnhop.test": ["NOTIFY=SUCCESS", "ORCPT=rfc822;bob@x.test"]})
        qb = send(d, SENDER, ["carol@plainhop.test"], body_for("notify-b"),
                  mail_options,
                  rcpt_options={"carol@plainhop.test": ["NOTIFY=SUCCESS",
                                                        "ORCPT=rfc822;carol@x.test"]})
        wait_status(d, qa, "sent")
        wait_status(d, qb, "sent")
        [t] = wait_dsns(bounces, 1)
        assert_no_more(bounces, 1)
    assert dsnhop.delivered_to() == ["bob@dsnhop.test"]
    assert plainhop.delivered_to() == ["carol@plainhop.test"]
    # the DSN parameters went on to the hop that offers DSN ...
    cmds = [c for conn in dsnhop.connections for c in conn.commands]
    [mail] = [c for c in cmds if c.upper().startswith("MAIL ")]
    [rcpt] = [c for c in cmds if c.upper().startswith("RCPT ")]
    assert "RET=HDRS" in mail.split() and "ENVID=abc123" in mail.split(), mail
    assert "NOTIFY=SUCCESS" in rcpt.split() and "ORCPT=rfc822;bob@x.test" in rcpt.split(), rcpt
    # ... and not to the one that does not
    cmds = [c for conn in plainhop.connections for c in conn.commands]
    assert not any("NOTIFY=" in c or "ORCPT=" in c or "ENVID=" in c or "RET=" in c for c in cmds), cmds
    # txmta reports "relayed" for the hop without DSN only
    assert dsn_lines(d, qa) == []
    r = Report(t)
    check_envelope_and_head(r)
    assert r.queue_id == qb
    assert r.fields["Original-Envelope-Id"] == "abc123"
    assert r.recipients == ["carol@plainhop.test"]
    b = r.block("carol@plainhop.test")
    assert b["Action"] == "relayed", b.items()
    assert b["Status"] == "2.0.0", b.items()
    assert b["Original-Recipient"] == "rfc822; carol@x.test"
    assert b["Remote-MTA"] == "dns; mx.plainhop.test"
    assert str(b["Diagnostic-Code"]).startswith("smtp; 250 "), b.items()
    # RET=HDRS: the header section only
    assert r.original is not None and r.original.get_content_type() == "text/rfc822-headers"
    assert "body of notify-b" not in r.original.get_content()
    assert "Subject: notify-b" in r.original.get_content()


def test_notify_never_no_dsn(daemon: Callable[..., Daemon], port: int) -> None:
    replies = {"RCPT": lambda sink, session, rcpt: NO_SUCH_USER.format(rcpt)}
    with SmtpSink(BOUNCE_IP, port) as bounces, SmtpSink(DEST_IP, port, replies=replies):
        d = daemon()
        q1 = send(d, SENDER, ["never@dest.test"], body_for("never"),
                  rcpt_options={"never@dest.test": ["NOTIFY=NEVER"]})
        wait_status(d, q1, "bounced")
        # a canary with no NOTIFY, sent afterwards: its DSN shows the path to the sender works
        q2 = submit(d, SENDER, ["canary@dest.test"], body_for("canary"))
        [t] = wait_dsns(bounces, 1)
        assert_no_more(bounces, 1)
    assert Report(t).queue_id == q2
    assert Report(t).recipients == ["canary@dest.test"]
    assert dsn_lines(d, q1) == []
    [e] = [e for e in maillog_events(d) if e["id"] == q1]
    assert e["status"] == "bounced" and e["category"] == "invalid-recipient", e


def test_null_sender_never_gets_a_dsn(daemon: Callable[..., Daemon], port: int) -> None:
    replies = {"RCPT": lambda sink, session, rcpt: NO_SUCH_USER.format(rcpt)}
    with SmtpSink(BOUNCE_IP, port) as bounces, SmtpSink(DEST_IP, port, replies=replies) as dest:
        d = daemon()
        q1 = submit(d, "", ["nobody@dest.test"], body_for("null-sender"))
        wait_status(d, q1, "bounced")
        q2 = submit(d, SENDER, ["canary@dest.test"], body_for("canary"))
        [t] = wait_dsns(bounces, 1)
        assert_no_more(bounces, 1)
    assert ("", "nobody@dest.test", 550) in [(s, r, c) for _, s, r, c in dest.rcpt_log]
    assert Report(t).queue_id == q2
    assert dsn_lines(d, q1) == []
    assert statuses(d, q1) == ["bounced"]


def test_bounced_dsn_is_not_reported(daemon: Callable[..., Daemon], port: int) -> None:
    """The sender's own MX refuses the DSN: the DSN (from <>) bounces, and that is the end."""
    replies = {"RCPT": lambda sink, session, rcpt: NO_SUCH_USER.format(rcpt)}
    with SmtpSink(BOUNCE_IP, port, replies=replies) as bounces, \
            SmtpSink(DEST_IP, port, replies=replies):
        d = daemon()
        qid = submit(d, SENDER, ["nobody@dest.test"], body_for("dsn-bounce"))
        wait_status(d, qid, "bounced")
        [line] = dsn_lines(d, qid)
        dsn_id = line.split("notification: ")[1].split(" ")[0]
        wait_status(d, dsn_id, "bounced", SENDER)
        time.sleep(1.0)
        assert [(s, r, c) for _, s, r, c in bounces.rcpt_log] == [("", SENDER, 550)]
        assert bounces.transactions == []
    assert dsn_lines(d) == [line], "a report on a report"
    assert statuses(d, dsn_id) == ["bounced"]
    assert d.spool_ids() == []


def _bounce_once(d: Daemon, rcpt: str) -> str:
    qid = submit(d, SENDER, [rcpt], body_for("hard"))
    wait_status(d, qid, "bounced")
    return qid


def test_hard_bounce_suppresses_then_rejects(daemon: Callable[..., Daemon], port: int) -> None:
    replies = {"RCPT:gone@dest.test": NO_SUCH_USER.format("gone@dest.test")}
    with SmtpSink(BOUNCE_IP, port), SmtpSink(DEST_IP, port, replies=replies) as dest:
        d = daemon()
        _bounce_once(d, "gone@dest.test")
        listed = json.loads(txmta_cli(d, "suppression", "list", "--json").stdout)
        assert [(x["address"], x["reason"]) for x in listed] == [("gone@dest.test", "invalid-recipient")]
        assert "no such user here" in (listed[0]["reply"] or "")
        with smtplib.SMTP(d.host, d.port, timeout=10) as s:
            s.ehlo("client.test.invalid")
            with pytest.raises(smtplib.SMTPRecipientsRefused) as exc:
                s.sendmail(SENDER, ["gone@dest.test"], body_for("again"))
        code, text = exc.value.recipients["gone@dest.test"]
        assert code == 550, (code, text)
        assert text.startswith(b"5.1.1 "), text
        assert b"suppressed" in text, text
        assert b"invalid-recipient" in text, text
        # other addresses are still taken
        q = submit(d, SENDER, ["fine@dest.test"], body_for("fine"))
        wait_status(d, q, "sent")
    assert [r for _, _, r, _ in dest.rcpt_log].count("gone@dest.test") == 1


def test_hard_bounce_suppresses_then_drops(daemon: Callable[..., Daemon], port: int) -> None:
    replies = {"RCPT:gone@dest.test": NO_SUCH_USER.format("gone@dest.test")}
    with SmtpSink(BOUNCE_IP, port) as bounces, SmtpSink(DEST_IP, port, replies=replies) as dest:
        d = daemon(suppression={"action": "drop"})
        _bounce_once(d, "gone@dest.test")
        # only the suppressed recipient: accepted, ended at intake
        q1 = submit(d, SENDER, ["gone@dest.test"], body_for("dropped"))
        # with another recipient: that one is delivered, the suppressed one is not tried
        q2 = submit(d, SENDER, ["gone@dest.test", "fine@dest.test"], body_for("mixed"))
        wait_status(d, q2, "sent", "fine@dest.test")
        view = d.view()
        try:
            h1 = wait_until(lambda: view.history(q1), 10, f"{q1} in the history")
            h2 = wait_until(lambda: view.history(q2), 10, f"{q2} in the history")
        finally:
            view.close()
        time.sleep(0.5)
    assert [r for _, _, r, _ in dest.rcpt_log].count("gone@dest.test") == 1, dest.rcpt_log
    assert dest.delivered_to() == ["fine@dest.test"]
    m1, _ = h1
    assert [r.state for r in m1.recipients] == ["suppressed"], m1.recipients
    assert m1.recipients[0].last_reply is not None and m1.recipients[0].last_reply.code == 550
    assert "suppressed" in m1.recipients[0].last_reply.text
    assert m1.recipients[0].category == "invalid-recipient"
    m2, _ = h2
    assert [r.state for r in m2.recipients] == ["suppressed", "delivered"], m2.recipients
    assert q1 not in d.spool_ids() and q2 not in d.spool_ids()
    # the drop is in the mail log (status=suppressed), and no delivery line follows it
    assert statuses(d, q1) == ["suppressed"]
    assert statuses(d, q2, "gone@dest.test") == ["suppressed"]
