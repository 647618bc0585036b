"""More delivery cases with a real twistd (see test_delivery.py for the set-up: the module's
DNS zone, the per-test smtp_port, sinks on 127.0.0.2x): AUTH LOGIN, no STARTTLS with
relayhost_tls = "encrypt", a 421 greeting, a 5xx after the data, a server without
PIPELINING, dot-stuffing on every 64 KiB chunk boundary, connection reuse."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import pytest

from itlib import Daemon, delivery_sections, maillog_events, queue_json, split_received, statuses, submit
from sinks import SmtpSink
from test_delivery import body_for, deliverer, dns, port, wait_gone, wait_status  # noqa: F401

pytestmark = pytest.mark.integration


def test_relayhost_auth_login_only(start_daemon: Callable[..., Daemon], tls_cert: Any,
                                   port: int, tmp_path: Path) -> None:  # noqa: F811
    pw = tmp_path / "relay.pw"
    pw.write_text("login-pass\n", encoding="utf-8")
    with SmtpSink("127.0.0.28", port, tls=(tls_cert.cert, tls_cert.key), auth={"u1": "login-pass"},
                  auth_mechanisms=("LOGIN",), require_auth=True) as sink:
        d = start_daemon(**delivery_sections(
            port, None, relayhost=f"127.0.0.28:{port}", relayhost_tls="encrypt",
            relayhost_username="u1", relayhost_password_file=str(pw)))
        qid = submit(d, "sender@client.test", ["x@anywhere.test"], body_for("login"))
        wait_status(d, qid, "sent")
    [t] = sink.snapshot()
    assert t.tls and t.auth_user == "u1"
    assert [(u, m) for u, m, _ in sink.auth_attempts] == [("u1", "LOGIN")]


def test_relayhost_encrypt_without_starttls_defers(start_daemon: Callable[..., Daemon],
                                                   port: int) -> None:  # noqa: F811
    with SmtpSink("127.0.0.28", port) as sink:       # no STARTTLS offered
        d = start_daemon(**delivery_sections(
            port, None, schedule=("1h",), relayhost=f"127.0.0.28:{port}", relayhost_tls="encrypt"))
        qid = submit(d, "sender@client.test", ["x@anywhere.test"], body_for("notls"))
        wait_status(d, qid, "deferred")
        assert sink.transactions == []
        assert not any(c.startswith("MAIL") or c.startswith("mail")
                       for conn in sink.connections for c in conn.commands), sink.connections
    [r] = queue_json(d)[qid]["recipients"]
    assert r["state"] == "queued" and 400 <= r["last_reply"]["code"] < 500, r


def test_421_greeting_at_first_mx(deliverer: Callable[..., Daemon], port: int) -> None:  # noqa: F811
    with SmtpSink("127.0.0.21", port, replies={"GREETING": "421 4.3.2 busy, go away"}) as busy, \
            SmtpSink("127.0.0.22", port) as sink:
        d = deliverer()
        qid = submit(d, "sender@client.test", ["bob@twomx.test"], body_for("421"))
        sink.wait(lambda s: len(s.transactions) >= 1, 15, "the message at the second MX")
        wait_status(d, qid, "sent")
    assert len(busy.connections) >= 1 and busy.transactions == []
    assert statuses(d, qid) == ["sent"]


def test_5xx_after_the_data_bounces_every_recipient(deliverer: Callable[..., Daemon],
                                                    port: int) -> None:  # noqa: F811
    rcpts = ["a@many.test", "b@many.test"]
    with SmtpSink("127.0.0.25", port, replies={"DOT": "554 5.6.0 content rejected"}) as sink:
        d = deliverer()
        qid = submit(d, "sender@client.test", rcpts, body_for("dot5xx"))
        for r in rcpts:
            wait_status(d, qid, "bounced", r)
        wait_gone(d, qid)
    assert sink.transactions == []
    assert all(e["reply"].startswith("554 5.6.0") for e in maillog_events(d) if e["id"] == qid)


def test_server_without_pipelining(deliverer: Callable[..., Daemon], port: int) -> None:  # noqa: F811
    with SmtpSink("127.0.0.24", port, extensions=["8BITMIME", "ENHANCEDSTATUSCODES"],
                  replies={"RCPT:nobody@rcpt.test": "550 5.1.1 no such user"}) as sink:
        d = deliverer()
        qid = submit(d, "sender@client.test", ["nobody@rcpt.test", "dave@rcpt.test"], body_for("lockstep"))
        wait_status(d, qid, "sent", "dave@rcpt.test")
        wait_status(d, qid, "bounced", "nobody@rcpt.test")
    assert sink.delivered_to() == ["dave@rcpt.test"]


def test_dot_stuffing_on_chunk_boundaries(deliverer: Callable[..., Daemon], port: int) -> None:  # noqa: F811
    """Seven ~200 KB bodies of 7-byte lines starting with "." (".abcd\\r\\n"), each shifted
    by 0..6 bytes: in one of them a line starts exactly on each 64 KiB boundary of the
    delivered content, whatever the length of our Received header."""
    with SmtpSink("127.0.0.21", port) as sink:
        d = deliverer()
        sent = {}
        for shift in range(7):
            body = (body_for(f"dots{shift}") + b"p" * shift + b"\r\n" + b".abcd\r\n" * 30000
                    + b".\r\n..\r\nend\r\n")
            sent[submit(d, "sender@client.test", ["alice@happy.test"], body)] = body
        sink.wait(lambda s: len(s.transactions) >= 7, 30, "the seven messages")
        for qid in sent:
            wait_gone(d, qid)
    for t in sink.snapshot():
        rec, rest = split_received(t.data)
        qid = rec["id"].decode()
        assert rest == sent[qid], f"{qid}: the delivered body differs from the one submitted"


def test_connections_are_reused(deliverer: Callable[..., Daemon], port: int) -> None:  # noqa: F811
    with SmtpSink("127.0.0.21", port) as sink:
        d = deliverer(max_per_destination=2, initial_per_destination=2)
        ids = [submit(d, "sender@client.test", [f"u{i}@happy.test"], body_for(f"reuse{i}"))
               for i in range(20)]
        sink.wait(lambda s: len(s.transactions) >= 20, 20, "twenty messages")
        for qid in ids:
            wait_gone(d, qid)
        time.sleep(0.3)
    assert sorted(sink.delivered_to()) == sorted(f"u{i}@happy.test" for i in range(20))
    assert len(sink.connections) <= 4, f"{len(sink.connections)} connections for 20 messages"


def test_two_destinations_in_one_message(deliverer: Callable[..., Daemon], port: int) -> None:  # noqa: F811
    with SmtpSink("127.0.0.21", port) as one, SmtpSink("127.0.0.24", port) as two:
        d = deliverer()
        qid = submit(d, "sender@client.test", ["a@happy.test", "b@rcpt.test", "c@happy.test"],
                     body_for("twodest"))
        for r in ("a@happy.test", "b@rcpt.test", "c@happy.test"):
            wait_status(d, qid, "sent", r)
        wait_gone(d, qid)
    assert [t.rcpt_to for t in one.snapshot()] == [["a@happy.test", "c@happy.test"]]
    assert [t.rcpt_to for t in two.snapshot()] == [["b@rcpt.test"]]


def test_lifetime_over_expires(start_daemon: Callable[..., Daemon], dns: Any,  # noqa: F811
                               port: int) -> None:  # noqa: F811
    sections = delivery_sections(port, dns, schedule=("1s",))
    sections["retry"]["max_lifetime"] = "4s"
    d = start_daemon(**sections)
    qid = submit(d, "sender@client.test", ["jack@down.test"], body_for("expire"))
    wait_status(d, qid, "expired", timeout=15)
    wait_gone(d, qid)
    st = statuses(d, qid)
    assert st[-1] == "expired" and set(st[:-1]) == {"deferred"} and len(st) >= 2, st
