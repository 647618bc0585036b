"""Delivery with a real twistd: MX routing through a real DNS server, scripted SMTP sinks.

Each test starts its own daemon whose `[delivery] smtp_port` is a free high port; the MX
hosts of the test zone live on 127.0.0.2x and the sinks (`sinks.SmtpSink`) listen on
127.0.0.2x:smtp_port.  One DNS server (tests/dnsserver.py, a separate process on
127.0.0.53) serves the zone for the whole module.  Mail goes in with smtplib; what happened
is read from the sinks, the mail log (`[log] maillog`, text lines), the spool (LmdbView) and
the `txmta` command.  Every wait is bounded.  Loopback only.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from itlib import (REPO, Daemon, free_port, delivery_sections, maillog_events, queue_json,
                   split_received, statuses, submit, txmta_cli, wait_until)
from sinks import SmtpSink

sys.path.insert(0, str(REPO / "tests"))
from dnsserver import running  # noqa: E402

pytestmark = pytest.mark.integration

MX = {  # domain -> (MX records, their addresses)
    "happy.test": [(10, "mx1.happy.test", "127.0.0.21")],
    "twomx.test": [(10, "mx1.twomx.test", "127.0.0.21"), (20, "mx2.twomx.test", "127.0.0.22")],
    "grey.test": [(10, "mx.grey.test", "127.0.0.23")],
    "rcpt.test": [(10, "mx.rcpt.test", "127.0.0.24")],
    "many.test": [(10, "mx.many.test", "127.0.0.25")],
    "drop.test": [(10, "mx.drop.test", "127.0.0.26")],
    "down.test": [(10, "mx.down.test", "127.0.0.27")],
    "down2.test": [(10, "mx.down2.test", "127.0.0.29")],
}


def make_zone() -> dict[str, Any]:
    zone: dict[str, Any] = {}
    for domain, mxs in MX.items():
        zone[domain + "."] = {"MX": [[pref, host + "."] for pref, host, _ in mxs]}
        for _, host, ip in mxs:
            zone[host + "."] = {"A": [ip]}
    # RFC 7505 null MX; its A record would be the implicit MX if the null MX were ignored
    zone["nullmx.test."] = {"MX": [[0, "."]], "A": ["127.0.0.21"]}
    zone["servfail.test."] = {"A": ["127.0.0.21"]}
    zone["_servfail"] = ["servfail.test."]
    return zone


@pytest.fixture(scope="module")
def dns() -> Iterator[tuple[str, int]]:
    with running(make_zone()) as hostport:
        yield hostport


@pytest.fixture
def port() -> int:
    """The smtp_port of this test: free on the sink addresses we use."""
    for _ in range(50):
        p = free_port("127.0.0.21")
        try:
            for ip in ("127.0.0.22", "127.0.0.23", "127.0.0.27"):
                free_port_at(ip, p)
        except OSError:
            continue
        return p
    raise RuntimeError("no common free port")


def free_port_at(ip: str, p: int) -> None:
    import socket
    with socket.socket() as s:
        s.bind((ip, p))


@pytest.fixture
def deliverer(start_daemon: Callable[..., Daemon], dns: tuple[str, int],
              port: int) -> Callable[..., Daemon]:
    """`deliverer(**delivery_keys)`: a running daemon delivering to the test zone."""
    def start(schedule: tuple[str, ...] = ("1s", "2s"), **delivery: Any) -> Daemon:
        return start_daemon(**delivery_sections(port, dns, schedule=schedule, **delivery))
    return start


def body_for(tag: str, extra: str = "") -> bytes:
    return (f"Message-ID: <{tag}@client.test.invalid>\r\n"
            "Date: Sat, 28 Nov 2026 07:00:00 +0000\r\n"
            "From: <sender@client.test>\r\n"
            f"Subject: {tag}\r\n\r\n"
            f"body of {tag}\r\n.a line starting with a dot\r\n{extra}").encode()


def wait_status(d: Daemon, qid: str, status: str, rcpt: str | None = None,
                timeout: float = 15.0) -> None:
    wait_until(lambda: status in statuses(d, qid, rcpt), timeout,
               f"status={status} for {qid} {rcpt or ''} in the mail log",
               diagnose=lambda: d.maillog())


def wait_gone(d: Daemon, qid: str, timeout: float = 10.0) -> None:
    wait_until(lambda: qid not in d.spool_ids(), timeout, f"{qid} to leave the spool",
               diagnose=lambda: d.maillog())


# -- the tests ----------------------------------------------------------------------------------

def test_mx_delivery_happy_path(deliverer: Callable[..., Daemon], port: int) -> None:
    with SmtpSink("127.0.0.21", port) as sink:
        d = deliverer()
        body = body_for("happy")
        qid = submit(d, "sender@client.test", ["alice@happy.test"], body)
        sink.wait(lambda s: len(s.transactions) >= 1, 15, "the message at the sink")
        wait_status(d, qid, "sent")
        wait_gone(d, qid)
        time.sleep(0.3)
    [t] = sink.snapshot()
    assert t.mail_from == "sender@client.test"
    assert t.rcpt_to == ["alice@happy.test"]
    assert t.helo == "mx.test.invalid"
    rec, rest = split_received(t.data)
    assert rec["id"].decode() == qid
    assert rest == body
    [e] = [e for e in maillog_events(d) if e["id"] == qid]
    assert e["status"] == "sent" and e["to"] == "alice@happy.test"
    assert e["relay"] == "mx1.happy.test[127.0.0.21]"
    assert e["reply"].startswith("250 ")
    assert e["attempts"] == "1"
    assert d.spool_ids() == []


def test_first_mx_down_second_takes_it(deliverer: Callable[..., Daemon], port: int) -> None:
    # nothing listens on 127.0.0.21:port
    with SmtpSink("127.0.0.22", port) as sink:
        d = deliverer()
        qid = submit(d, "sender@client.test", ["bob@twomx.test"], body_for("twomx"))
        sink.wait(lambda s: len(s.transactions) >= 1, 15, "the message at the second MX")
        wait_status(d, qid, "sent")
        wait_gone(d, qid)
    assert sink.delivered_to() == ["bob@twomx.test"]
    [e] = [e for e in maillog_events(d) if e["id"] == qid]
    assert e["relay"] == "mx2.twomx.test[127.0.0.22]" and e["status"] == "sent"


def test_greylisting_retry_from_same_ip(deliverer: Callable[..., Daemon], port: int) -> None:
    with SmtpSink("127.0.0.23", port, greylist=True, greylist_delay=2) as sink:
        d = deliverer(source_address="127.0.0.9")
        qid = submit(d, "grey-sender@client.test", ["carol@grey.test"], body_for("grey"))
        sink.wait(lambda s: len(s.transactions) >= 1, 20, "the message after greylisting")
        wait_status(d, qid, "sent")
    tries = [r for r in sink.rcpt_log if r[2] == "carol@grey.test"]
    assert [code for *_, code in tries] == [451, 250], tries
    assert {ip for ip, *_ in tries} == {"127.0.0.9"}, f"retry from another address: {tries}"
    assert {s for _, s, *_ in tries} == {"grey-sender@client.test"}
    [t] = sink.snapshot()
    assert t.client_ip == "127.0.0.9" and t.rcpt_to == ["carol@grey.test"]
    assert t.mail_from == "grey-sender@client.test"
    # the retry waited as long as the greylister asked (2 s)
    first = next(c for c in sink.connections if any(x.startswith("RCPT") or x.startswith("rcpt")
                                                      for x in c.commands))
    assert t.time - first.time >= 1.9
    assert statuses(d, qid) == ["deferred", "sent"]
    deferred = [e for e in maillog_events(d) if e["id"] == qid][0]
    assert deferred["reply"].startswith("451 4.7.1")


def test_rcpt_5xx_for_one_of_two(deliverer: Callable[..., Daemon], port: int) -> None:
    with SmtpSink("127.0.0.24", port, replies={"RCPT:nobody@rcpt.test": "550 5.1.1 no such user"}) as sink:
        d = deliverer()
        qid = submit(d, "sender@client.test", ["nobody@rcpt.test", "dave@rcpt.test"], body_for("rcpt"))
        wait_status(d, qid, "sent", "dave@rcpt.test")
        wait_status(d, qid, "bounced", "nobody@rcpt.test")
        wait_gone(d, qid)
    assert sink.delivered_to() == ["dave@rcpt.test"]
    bounced = [e for e in maillog_events(d) if e["to"] == "nobody@rcpt.test"]
    assert [e["status"] for e in bounced] == ["bounced"]
    assert bounced[0]["reply"].startswith("550 5.1.1")
    assert statuses(d, qid, "dave@rcpt.test") == ["sent"]


def test_452_too_many_recipients(deliverer: Callable[..., Daemon], port: int) -> None:
    rcpts = [f"r{i}@many.test" for i in range(5)]
    with SmtpSink("127.0.0.25", port, max_rcpts=2) as sink:
        d = deliverer()
        qid = submit(d, "sender@client.test", rcpts, body_for("many"))
        sink.wait(lambda s: len(s.delivered_to()) >= 5, 15, "all 5 recipients at the sink")
        for r in rcpts:
            wait_status(d, qid, "sent", r)
        wait_gone(d, qid)
        time.sleep(0.3)
    assert sorted(sink.delivered_to()) == rcpts, "each recipient exactly once"
    assert len(sink.transactions) >= 3
    assert all(len(t.rcpt_to) <= 2 for t in sink.transactions)
    assert all(statuses(d, qid, r) == ["sent"] for r in rcpts), maillog_events(d)


def test_connection_dropped_in_data(deliverer: Callable[..., Daemon], port: int) -> None:
    with SmtpSink("127.0.0.26", port, drop_in_data=1) as sink:
        d = deliverer()
        qid = submit(d, "sender@client.test", ["erin@drop.test"],
                     body_for("drop", "more\r\n" * 2000))
        sink.wait(lambda s: len(s.transactions) >= 1, 20, "the message after the dropped try")
        wait_status(d, qid, "sent")
        wait_gone(d, qid)
    assert sink.dropped == 1
    assert sink.delivered_to() == ["erin@drop.test"]
    assert statuses(d, qid) == ["deferred", "sent"]


def test_null_mx_bounces_without_connecting(deliverer: Callable[..., Daemon], port: int) -> None:
    with SmtpSink("127.0.0.21", port) as sink:
        d = deliverer()
        qid = submit(d, "sender@client.test", ["frank@nullmx.test"], body_for("nullmx"))
        wait_status(d, qid, "bounced")
        wait_gone(d, qid)
        time.sleep(0.5)
    [e] = [e for e in maillog_events(d) if e["id"] == qid]
    assert e["reply"].startswith("556 5.1.10"), e
    assert sink.connections == [], "a connection was made for a null MX domain"


def test_dns_servfail_defers(deliverer: Callable[..., Daemon], port: int) -> None:
    with SmtpSink("127.0.0.21", port) as sink:
        d = deliverer(schedule=("1h",))
        qid = submit(d, "sender@client.test", ["gina@servfail.test"], body_for("servfail"))
        wait_status(d, qid, "deferred", timeout=20)
        e = [e for e in maillog_events(d) if e["id"] == qid][0]
        assert " 4.4.3 " in e["reply"] or e["reply"].startswith("451 4.4.3"), e
        q = queue_json(d)
        assert qid in q, q
        [r] = q[qid]["recipients"]
        assert r["state"] == "queued" and r["attempts"] >= 1, r
        assert r["last_reply"] is not None and r["last_reply"]["enhanced"] == "4.4.3", r
        assert 400 <= r["last_reply"]["code"] < 500
    assert sink.connections == []
    assert "bounced" not in statuses(d, qid)


def _relay_sink(port: int, tls_cert: Any) -> SmtpSink:
    return SmtpSink("127.0.0.28", port, tls=(tls_cert.cert, tls_cert.key),
                    auth={"relayuser": "relay pass ünï"}, require_auth=True)


def test_relayhost_auth_over_starttls(start_daemon: Callable[..., Daemon], tls_cert: Any,
                                      port: int, tmp_path: Path) -> None:
    pw = tmp_path / "relay.pw"
    pw.write_text("relay pass ünï\n", encoding="utf-8")
    with _relay_sink(port, tls_cert) as sink:
        d = start_daemon(**delivery_sections(
            port, None, relayhost=f"127.0.0.28:{port}", relayhost_tls="encrypt",
            relayhost_username="relayuser", relayhost_password_file=str(pw)))
        qid = submit(d, "sender@client.test", ["henry@anywhere.test"], body_for("relay"))
        sink.wait(lambda s: len(s.transactions) >= 1, 15, "the message at the relayhost")
        wait_status(d, qid, "sent")
        wait_gone(d, qid)
    [t] = sink.snapshot()
    assert t.tls and t.auth_user == "relayuser"
    conn = sink.connections[t.conn]
    assert conn.tls_at is not None and conn.auth_at is not None and conn.tls_at < conn.auth_at
    assert sink.auth_attempts and all(over_tls for *_, over_tls in sink.auth_attempts)
    [e] = [e for e in maillog_events(d) if e["id"] == qid]
    assert e["tls"] != "none", e


def test_relayhost_wrong_password_defers(start_daemon: Callable[..., Daemon], tls_cert: Any,
                                         port: int, tmp_path: Path) -> None:
    pw = tmp_path / "relay.pw"
    pw.write_text("not the password\n", encoding="utf-8")
    with _relay_sink(port, tls_cert) as sink:
        d = start_daemon(**delivery_sections(
            port, None, schedule=("1h",), relayhost=f"127.0.0.28:{port}", relayhost_tls="encrypt",
            relayhost_username="relayuser", relayhost_password_file=str(pw)))
        qid = submit(d, "sender@client.test", ["ivy@anywhere.test"], body_for("badpw"))
        wait_status(d, qid, "deferred")
        time.sleep(0.5)
        assert sink.transactions == []
        assert sink.auth_attempts and all(over_tls for *_, over_tls in sink.auth_attempts)
        q = queue_json(d)
        [r] = q[qid]["recipients"]
        assert r["state"] == "queued" and r["attempts"] >= 1
        assert r["last_reply"]["code"] == 535, r
    assert "bounced" not in statuses(d, qid)


def test_queue_control_against_running_daemon(deliverer: Callable[..., Daemon], port: int) -> None:
    """hold / release / status / delete through the control socket, on a message deferred
    because its destination is down."""
    d = deliverer(schedule=("1h",))
    qid = submit(d, "sender@client.test", ["jack@down.test"], body_for("control"))
    wait_status(d, qid, "deferred")
    q = queue_json(d)
    assert q[qid]["recipients"][0]["state"] == "queued"
    assert q[qid]["recipients"][0]["attempts"] == 1
    assert json.loads(txmta_cli(d, "status", "--json").stdout)["messages"] == 1

    assert txmta_cli(d, "queue", "hold", qid).stdout.strip() == f"{qid}: held"
    assert queue_json(d)[qid]["recipients"][0]["state"] == "held"
    assert f"{qid}!" in txmta_cli(d, "queue", "list").stdout
    assert txmta_cli(d, "queue", "release", qid).stdout.strip() == f"{qid}: released"
    assert queue_json(d)[qid]["recipients"][0]["state"] == "queued"

    qid2 = submit(d, "sender@client.test", ["kate@down2.test"], body_for("delete"))
    wait_status(d, qid2, "deferred")
    assert json.loads(txmta_cli(d, "status", "--json").stdout)["messages"] == 2
    assert txmta_cli(d, "queue", "delete", qid2).stdout.strip() == f"{qid2}: deleted"
    wait_until(lambda: qid2 not in queue_json(d), 5, f"{qid2} gone after delete")
    assert qid2 not in d.spool_ids() and qid in d.spool_ids()
    assert json.loads(txmta_cli(d, "status", "--json").stdout)["messages"] == 1
    p = txmta_cli(d, "queue", "delete", qid2, check=False)
    assert p.returncode == 1 and "no such message" in p.stderr
    assert "bounced" not in statuses(d)


def test_flush_makes_a_deferred_message_due_now(deliverer: Callable[..., Daemon], port: int) -> None:
    """A recipient deferred by a 4xx at RCPT (the site itself works), due in an hour:
    `queue flush ID` delivers it at once."""
    state = {"reply": "450 4.2.1 mailbox busy, come back later"}
    replies = {"RCPT": lambda sink, session, arg: state["reply"]}
    with SmtpSink("127.0.0.27", port, replies=replies) as sink:
        d = deliverer(schedule=("1h",))
        qid = submit(d, "sender@client.test", ["jack@down.test"], body_for("flush"))
        wait_status(d, qid, "deferred")
        state["reply"] = None
        time.sleep(1.0)
        assert sink.transactions == [], "delivered before the flush"
        t0 = time.monotonic()
        assert txmta_cli(d, "queue", "flush", qid).stdout.strip() == "1"
        sink.wait(lambda s: len(s.transactions) >= 1, 10, "the flushed message at the sink")
        assert time.monotonic() - t0 < 10
        wait_status(d, qid, "sent")
        wait_gone(d, qid)
    assert statuses(d, qid) == ["deferred", "sent"]


def test_flush_after_the_destination_came_back(deliverer: Callable[..., Daemon], port: int) -> None:
    """Deferred because the only MX was down (connection refused: the destination is
    throttled until the next retry, an hour away); the MX comes back; `queue flush ID` (like
    Postfix's postqueue -f / -i) must deliver it now, not in an hour."""
    d = deliverer(schedule=("1h",))
    qid = submit(d, "sender@client.test", ["jack@down.test"], body_for("flush-down"))
    wait_status(d, qid, "deferred")
    with SmtpSink("127.0.0.27", port) as sink:
        time.sleep(0.5)
        assert txmta_cli(d, "queue", "flush", qid).stdout.strip() == "1"
        sink.wait(lambda s: len(s.transactions) >= 1, 6,
                  "the flushed message at the sink (flush should make it due now)")
        wait_status(d, qid, "sent")


def test_mail_for_a_throttled_destination_gets_a_deferred_line(
        deliverer: Callable[..., Daemon]) -> None:
    """The only MX is down: the first message is deferred (an attempt) and the destination
    throttled; the next one is postponed without an attempt, and the mail log says so too:
    status=deferred, relay=none, attempts=0, the throttle's reply."""
    d = deliverer(schedule=("1h",))
    first = submit(d, "sender@client.test", ["jack@down.test"], body_for("throttle-1"))
    wait_status(d, first, "deferred")
    second = submit(d, "sender@client.test", ["jill@down.test"], body_for("throttle-2"))
    wait_status(d, second, "deferred")
    [line] = [e for e in maillog_events(d) if e["id"] == second]
    assert (line["relay"], line["attempts"]) == ("none", "0"), line
    assert line["reply"].startswith("4"), line
    assert int(line["next"]) > 3000, line      # the throttle lasts until the hour's retry


def test_mx_delivery_to_postfix_smtp_sink(deliverer: Callable[..., Daemon], port: int,
                                          tmp_path: Path) -> None:
    """A real peer: 30 messages to happy.test's MX, Postfix's smtp-sink on 127.0.0.21,
    arrive once each (smtp-sink -d dumps each message to a file), and the spool empties."""
    import shutil
    import subprocess
    sink_bin = shutil.which("smtp-sink")
    assert sink_bin, "smtp-sink (Debian package postfix) is required; `make test` installs it"
    import tempfile
    # smtp-sink drops privileges to `nobody`, which cannot enter pytest's private tmp_path
    dump = Path(tempfile.mkdtemp(prefix="txmta-sink-", dir="/tmp"))
    dump.chmod(0o777)
    os_user = "nobody"
    proc = subprocess.Popen([sink_bin, "-u", os_user, "-d", str(dump / "%M."), f"127.0.0.21:{port}",
                             "100"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: _listening("127.0.0.21", port), 10, "smtp-sink listening")
        d = deliverer()
        ids = [submit(d, "sender@client.test", ["bob@happy.test"], body_for(f"sink{i}"))
               for i in range(30)]
        for qid in ids:
            wait_status(d, qid, "sent", timeout=30)
        wait_until(lambda: len(list(dump.iterdir())) >= 30, 15, "30 dumped messages")
        dumped = [p.read_bytes() for p in dump.iterdir()]
        assert len(dumped) == 30
        for i in range(30):
            assert sum(f"Subject: sink{i}\r\n".encode() in m or f"Subject: sink{i}\n".encode() in m
                       for m in dumped) == 1
        wait_until(lambda: queue_json(d) == {}, 15, "an empty queue")
    finally:
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(dump, ignore_errors=True)


def _listening(host: str, port: int) -> bool:
    import socket
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
