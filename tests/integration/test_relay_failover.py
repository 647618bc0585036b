"""Relayhost failover with a real twistd: two relayhosts (scripted SMTP sinks on 127.0.0.51 and
127.0.0.52, one port), the circuit of each, and fallback = "mx" through the test DNS server.

`primary_fails_then_returns`: the first relay takes the mail; then it answers 421 (at the
greeting and at MAIL, so a pooled connection fails too) and the mail goes on through the
second within seconds; after two faults its circuit opens (`txmta status` says so) and mail
goes straight to the second; once the first is healthy again and its cool-down (3 s) is over,
new mail goes to the first again and its circuit closes.
`each_relay_gets_its_own_credentials_and_tls`: AUTH as alice at the first, as bob at the
second (after the first stopped listening), both over STARTTLS.
`every_relay_down_goes_by_mx`: both relays refuse connections; with fallback = "mx" the mail
is delivered to the recipient domain's MX host once both circuits are open.
Loopback only; every wait is bounded.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable, Iterator

import pytest

from itlib import (REPO, Daemon, common_free_port, delivery_sections, maillog_events, submit,
                   txmta_cli, wait_until)
from sinks import SmtpSink

sys.path.insert(0, str(REPO / "tests"))
from dnsserver import running  # noqa: E402

pytestmark = pytest.mark.integration

PRIMARY, SECONDARY, MX_HOST = "127.0.0.51", "127.0.0.52", "127.0.0.55"
DOWN = "421 4.3.2 primary relay in maintenance, closing"


def body_for(tag: str) -> bytes:
    return (f"Message-ID: <{tag}@client.test.invalid>\r\nFrom: <sender@client.test>\r\n"
            f"Subject: {tag}\r\n\r\nbody of {tag}\r\n").encode()


def relays(d: Daemon) -> dict[str, dict[str, Any]]:
    """The relayhost circuits of `txmta status --json`, by name."""
    status = json.loads(txmta_cli(d, "status", "--json").stdout)
    return {r["name"]: r for r in status["relays"]}


def delivered_at(sink: SmtpSink, tag: str) -> bool:
    return any(f"Subject: {tag}".encode() in t.data for t in sink.snapshot())


def test_primary_fails_then_returns_after_its_cooldown(
        start_daemon: Callable[..., Daemon]) -> None:
    port = common_free_port(PRIMARY, SECONDARY)
    down = {"on": False}

    def maybe_down(sink: Any, session: Any, arg: str) -> str | None:
        return DOWN if down["on"] else None

    with SmtpSink(PRIMARY, port, replies={"GREETING": maybe_down, "MAIL": maybe_down}) as primary, \
            SmtpSink(SECONDARY, port) as secondary:
        d = start_daemon(**delivery_sections(
            port, None, schedule=("1h",),
            relayhost=[{"host": PRIMARY, "port": port, "tls": "none", "name": "primary"},
                       {"host": SECONDARY, "port": port, "tls": "none", "name": "secondary"}],
            relay_failures=2, relay_cooldown="3s", relay_max_cooldown="3s"))

        submit(d, "sender@client.test", ["a@one.test"], body_for("m1"))
        wait_until(lambda: delivered_at(primary, "m1"), 15, "m1 at the primary relay")
        assert relays(d)["primary"]["state"] == "closed"

        # the primary starts refusing: each message goes on to the secondary at once
        down["on"] = True
        for tag in ("m2", "m3"):
            started = time.monotonic()
            submit(d, "sender@client.test", [f"{tag}@two.test"], body_for(tag))
            wait_until(lambda: delivered_at(secondary, tag), 10, f"{tag} at the secondary")
            assert time.monotonic() - started < 5.0
        state = relays(d)
        assert state["primary"]["state"] == "open" and state["primary"]["opened"] == 1
        assert state["secondary"]["state"] == "closed"

        # open: the primary is not even tried
        connections = len(primary.connections)
        submit(d, "sender@client.test", ["b@three.test"], body_for("m4"))
        wait_until(lambda: delivered_at(secondary, "m4"), 10, "m4 at the secondary")
        assert len(primary.connections) == connections

        # healthy again; after the cool-down new mail goes back to the primary
        down["on"] = False
        wait_until(lambda: relays(d)["primary"]["state"] == "half-open", 10,
                   "the primary's cool-down to end")
        submit(d, "sender@client.test", ["c@four.test"], body_for("m5"))
        wait_until(lambda: delivered_at(primary, "m5"), 10, "m5 at the primary again")
        assert relays(d)["primary"]["state"] == "closed"
        submit(d, "sender@client.test", ["d@five.test"], body_for("m6"))
        wait_until(lambda: delivered_at(primary, "m6"), 10, "m6 at the primary")

    assert sorted(t.rcpt_to[0] for t in primary.snapshot()) == ["a@one.test", "c@four.test",
                                                                "d@five.test"]
    assert sorted(t.rcpt_to[0] for t in secondary.snapshot()) == ["b@three.test", "m2@two.test",
                                                                  "m3@two.test"]
    sent = wait_until(lambda: [e for e in maillog_events(d) if e["status"] == "sent"][5:] and
                      [e for e in maillog_events(d) if e["status"] == "sent"], 10,
                      "six messages sent in the mail log", diagnose=d.maillog)
    assert len(sent) == 6 and all(e["attempts"] == "1" for e in sent), sent
    assert "bounced" not in d.maillog() and "deferred" not in d.maillog()
    metrics_dir = d.spool_path / "metrics"
    from txmta import metrics
    text = metrics.render(str(metrics_dir))[0].decode()
    assert 'txmta_relay_opened_total{relay="primary"} 1.0' in text
    assert 'txmta_relay_failures_total{relay="primary"} 2.0' in text
    assert 'txmta_relay_state{relay="primary"} 0.0' in text


def test_each_relay_gets_its_own_credentials_and_tls(start_daemon: Callable[..., Daemon],
                                                     tls_cert: Any, tmp_path: Any) -> None:
    """The primary requires AUTH as alice over STARTTLS, the secondary as bob; when the
    primary stops answering, the secondary gets the mail with bob's password, over TLS."""
    port = common_free_port(PRIMARY, SECONDARY)
    passwords = {}
    for user, password in (("alice", "alice's pass"), ("bob", "bob's pass")):
        passwords[user] = tmp_path / f"{user}.pw"
        passwords[user].write_text(password + "\n")
    tls = (tls_cert.cert, tls_cert.key)
    primary = SmtpSink(PRIMARY, port, tls=tls, auth={"alice": "alice's pass"},
                       require_auth=True).start()
    try:
        with SmtpSink(SECONDARY, port, tls=tls, auth={"bob": "bob's pass"},
                      require_auth=True) as secondary:
            d = start_daemon(**delivery_sections(
                port, None, schedule=("1h",), relayhost=[
                    {"host": PRIMARY, "port": port, "tls": "encrypt", "username": "alice",
                     "password_file": str(passwords["alice"])},
                    {"host": SECONDARY, "port": port, "tls": "encrypt", "username": "bob",
                     "password_file": str(passwords["bob"])}]))
            submit(d, "sender@client.test", ["a@one.test"], body_for("p1"))
            wait_until(lambda: delivered_at(primary, "p1"), 15, "p1 at the primary")
            primary.stop()                         # refused from now on
            submit(d, "sender@client.test", ["b@two.test"], body_for("p2"))
            wait_until(lambda: delivered_at(secondary, "p2"), 15, "p2 at the secondary")
    finally:
        primary.stop()
    [t1] = primary.snapshot()
    [t2] = secondary.snapshot()
    assert (t1.auth_user, t1.tls, t2.auth_user, t2.tls) == ("alice", True, "bob", True)
    assert [u for u, *_ in primary.auth_attempts] == ["alice"]
    assert [u for u, *_ in secondary.auth_attempts] == ["bob"]


@pytest.fixture
def dns() -> Iterator[tuple[str, int]]:
    zone = {"direct.test.": {"MX": [[10, "mx.direct.test."]]},
            "mx.direct.test.": {"A": [MX_HOST]}}
    with running(zone) as hostport:
        yield hostport


def test_every_relay_down_goes_by_mx_with_fallback(start_daemon: Callable[..., Daemon],
                                                    dns: tuple[str, int]) -> None:
    """Nothing listens on either relay: once both circuits are open, fallback = "mx" delivers
    to the domain's MX host."""
    port = common_free_port(PRIMARY, SECONDARY, MX_HOST)
    with SmtpSink(MX_HOST, port) as mx:
        d = start_daemon(**delivery_sections(
            port, dns, schedule=("1s",),
            relayhost=[{"host": PRIMARY, "port": port, "tls": "none"},
                       {"host": SECONDARY, "port": port, "tls": "none"}],
            fallback="mx", relay_failures=1, relay_cooldown="1m"))
        submit(d, "sender@client.test", ["erin@direct.test"], body_for("f1"))
        wait_until(lambda: delivered_at(mx, "f1"), 20, "f1 at the MX host",
                   diagnose=d.maillog)
        state = relays(d)
        assert [state[n]["state"] for n in ("relay0", "relay1")] == ["open", "open"]
        submit(d, "sender@client.test", ["frank@direct.test"], body_for("f2"))
        wait_until(lambda: delivered_at(mx, "f2"), 10, "f2 at the MX host", diagnose=d.maillog)
    events = wait_until(lambda: len([e for e in maillog_events(d) if e["status"] == "sent"]) == 2
                        and maillog_events(d), 10, "two sent in the mail log", diagnose=d.maillog)
    assert [e["status"] for e in events if e["to"] == "erin@direct.test"] == ["deferred", "sent"]
    assert [e["status"] for e in events if e["to"] == "frank@direct.test"] == ["sent"]
    assert all(e["relay"].startswith("mx.direct.test") for e in events if e["status"] == "sent")
