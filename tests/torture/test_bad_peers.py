"""Peers misbehaving (issue 14): the next hop resets, splits, floods or says nothing.

One twistd daemon for the module relays everything to one scripted next hop
(badpeer.BadPeer on 127.0.0.78) with short timeouts (`[delivery] command_timeout` and the
data timeouts: 1 s) and a short retry schedule (1 s, then an hour).  Each case sets the
peer's mode, submits one message, and checks:

* the right retry: the first attempt is deferred (never bounced) with the reply the case
  makes (a lost connection or a timeout: 451 4.4.2; a reply line that never ends: 451
  4.5.0), the scheduled retry comes about a second later and is deferred again, for an hour;
* no loss: with the peer switched to `GOOD`, `txmta queue flush ID` delivers the message,
  byte for byte as submitted after our Received header, and it leaves the spool;
* no stuck connection: every connection of the bad mode was closed by our side, within the
  timeout where the peer said nothing;
* bounded memory: the daemon's RSS, and its peak, while 10 MB replies come in.

A reset after the final dot, before its reply (RFC 5321 6.1), is retried: the peer then has
the message twice (a duplicate, never a loss).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import badpeer as B
import torturelib
from itlib import (Daemon, DaemonPool, free_port, maillog_events, split_received, statuses,
                   submit, txmta_cli, wait_until)

PEER_IP = "127.0.0.78"
TIMEOUT = 1.0          # [delivery] command_timeout and the data timeouts, seconds
FIRST_RETRY = 1.0      # [retry] schedule: 1 s, then an hour
SLACK = 1.5            # scheduling and process start-up allowance, seconds

PIPELINING = torturelib.size([False], [False, True])
# attempts at a peer flooding us with a 10 MB reply, past the two of the schedule
EXTRA_FLOODS = torturelib.size(0, 8)


@pytest.fixture(scope="module")
def peer() -> Iterator[B.BadPeer]:
    with B.BadPeer(PEER_IP, free_port(PEER_IP)) as p:
        yield p


@pytest.fixture(scope="module")
def daemon(module_daemons: DaemonPool, peer: B.BadPeer) -> Daemon:
    host, port = peer.address
    t = f"{TIMEOUT:g}s"
    return module_daemons(
        delivery={"relayhost": f"[{host}]:{port}", "connect_timeout": "2s",
                  "idle_timeout": "5s",
                  # one message per connection: each attempt opens a connection of the
                  # peer's current mode
                  "max_messages_per_connection": 1,
                  "command_timeout": t, "data_init_timeout": t, "data_xfer_timeout": t,
                  "data_done_timeout": t},
        retry={"schedule": [f"{FIRST_RETRY:g}s", "1h"], "max_lifetime": "2h"})


@pytest.fixture
def good_peer(daemon: Daemon, peer: B.BadPeer,
              request: pytest.FixtureRequest) -> Iterator[B.BadPeer]:
    """The peer, set back to GOOD (and lockstep) after the test; what a failed test left
    queued is flushed (which lifts the destination's throttle for the next test)."""
    yield peer
    peer.mode = B.GOOD
    peer.pipelining = False
    if getattr(getattr(request.node, "rep_call", None), "failed", True):
        txmta_cli(daemon, "queue", "flush", check=False)


def body_for(tag: str, size: int = 150_000) -> bytes:
    """A message of about `size` bytes: headers, lines of every length up to 998, lines
    starting with a dot, a lone dot line."""
    head = (f"Message-ID: <{tag}@client.test.invalid>\r\n"
            "Date: Sun, 06 Dec 2026 09:00:00 +0000\r\n"
            "From: <sender@client.test>\r\nTo: <rcpt@peer.test>\r\n"
            f"Subject: {tag}\r\n\r\n").encode()
    lines = [head, f"token {tag}\r\n".encode(), b".\r\n", b"..two dots\r\n"]
    n, total = 0, len(head)
    while total < size:
        line = (f"{n:08d} " + "abcdefghij" * (n % 99)).encode()[:998] + b"\r\n"
        if n % 7 == 0:
            line = b"." + line[:997]
        lines.append(line)
        total += len(line)
        n += 1
    return b"".join(lines)


def events_for(d: Daemon, qid: str) -> list[dict[str, str]]:
    return [e for e in maillog_events(d) if e["id"] == qid]


def wait_events(d: Daemon, qid: str, count: int, timeout: float) -> list[dict[str, str]]:
    def enough() -> list[dict[str, str]] | None:
        events = events_for(d, qid)
        return events if len(events) >= count else None
    return wait_until(enough, timeout, f"{count} delivery lines for {qid} in the mail log",
                      diagnose=d.maillog)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def reset_peak(pid: int) -> bool:
    """Reset the process's peak RSS (VmHWM) to its RSS now (Linux 4.0+)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def show(d: Daemon, qid: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(txmta_cli(d, "queue", "show", qid, "--json").stdout)
    return out


def deliver_after_recovery(d: Daemon, peer: B.BadPeer, qid: str, tag: str,
                           body: bytes) -> B.Received:
    """Switch the peer to GOOD, flush the message: it is delivered (once), byte for byte as
    submitted after our Received header, and leaves the spool.  The delivered copy."""
    peer.mode = B.GOOD
    assert txmta_cli(d, "queue", "flush", qid).stdout.strip() == "1"
    wait_until(lambda: "sent" in statuses(d, qid), 10, f"{qid} sent after the flush",
               diagnose=d.maillog)
    wait_until(lambda: qid not in d.spool_ids(), 10, f"{qid} to leave the spool")
    good = [m for m in peer.snapshot()[1]
            if m.answered and tag.encode() in m.data]
    assert len(good) == 1, f"{len(good)} answered copies of {tag} at the peer"
    _, rest = split_received(good[0].data)
    assert rest == body
    assert good[0].mail_from == "sender@client.test"
    assert good[0].rcpt_to == [f"{tag}@peer.test"]
    assert "bounced" not in statuses(d, qid)
    return good[0]


def failing_case(d: Daemon, peer: B.BadPeer, mode: str, reply: str, tag: str, *,
                 body: bytes | None = None, extra: int = 0,
                 before_recovery: Any = None) -> tuple[list[B.Conn], list[dict[str, str]]]:
    """Submit one message while the peer is in `mode`; check the attempt and the scheduled
    retry are both deferred with `reply` (a regular expression), the second for the hour
    of the schedule, then `extra` more attempts made by flushing; every connection of the
    mode is closed; `before_recovery()` runs then; then the peer recovers and the message
    is delivered.  (The connections, the mail log's lines.)"""
    body = body if body is not None else body_for(tag)
    peer.mode = mode
    start = len(peer.snapshot()[0])
    qid = submit(d, "sender@client.test", [f"{tag}@peer.test"], body)
    t0 = time.monotonic()
    events = wait_events(d, qid, 2, 2 * TIMEOUT + FIRST_RETRY + 3 * SLACK)
    took = time.monotonic() - t0
    assert [e["status"] for e in events] == ["deferred", "deferred"], events
    assert [e["attempts"] for e in events] == ["1", "2"]
    for e in events:
        assert re.fullmatch(reply, e["reply"]), e["reply"]
        assert e["relay"] == f"{PEER_IP}[{PEER_IP}]"
    # the schedule: 1 s (+-10 % jitter, rounded), then an hour
    assert int(events[0]["next"]) in (0, 1, 2)
    assert 3000 <= int(events[1]["next"]) <= 4000
    assert took < 2 * TIMEOUT + FIRST_RETRY + 3 * SLACK
    shown = show(d, qid)
    [rcpt] = shown["recipients"]
    assert rcpt["state"] == "queued" and rcpt["attempts"] == 2
    assert rcpt["last_reply"]["code"] == int(reply[:3])
    for n in range(extra):
        assert txmta_cli(d, "queue", "flush", qid).stdout.strip() == "1"
        events = wait_events(d, qid, 3 + n, TIMEOUT + 2 * SLACK)
        assert events[-1]["status"] == "deferred" and re.fullmatch(reply, events[-1]["reply"])

    def all_closed(p: B.BadPeer) -> list[B.Conn] | None:
        conns = [c for c in p.snapshot()[0][start:] if c.mode == mode]
        return conns if len(conns) >= 2 + extra and all(c.closed for c in conns) else None
    conns = peer.wait(all_closed, TIMEOUT + SLACK, f"the {mode} connections closed")
    if before_recovery is not None:
        before_recovery()
    deliver_after_recovery(d, peer, qid, tag, body)
    return conns, events


# -- resets ------------------------------------------------------------------------------------

@pytest.mark.parametrize("pipelining", PIPELINING, ids=lambda p: "pipelined" if p else "lockstep")
@pytest.mark.parametrize("mode,reply", [
    pytest.param(B.RESET_AFTER_MAIL,
                 r"451 4\.4\.2 connection lost during reply to MAIL with .*",
                 id=B.RESET_AFTER_MAIL),
    pytest.param(B.RESET_AFTER_RCPT,
                 r"451 4\.4\.2 connection lost during reply to RCPT with .*",
                 id=B.RESET_AFTER_RCPT),
    pytest.param(B.RESET_IN_DATA,
                 r"451 4\.4\.2 connection lost during (message content|reply to end of DATA)"
                 r" with .*",
                 id=B.RESET_IN_DATA),
])
def test_reset_mid_transaction_is_deferred_and_retried(
        daemon: Daemon, good_peer: B.BadPeer, mode: str, reply: str, pipelining: bool) -> None:
    """A next hop that resets the connection after MAIL, after RCPT or in the middle of the
    content: a temporary failure (deferred, 451 4.4.2), retried on schedule, delivered
    once the peer behaves; never a bounce, never a copy at the peer before that."""
    good_peer.pipelining = pipelining
    tag = f"{mode}-{'p' if pipelining else 'l'}"
    body = body_for(tag, 2_000_000 if mode == B.RESET_IN_DATA else 150_000)
    conns, _ = failing_case(daemon, good_peer, mode, reply, tag, body=body)
    assert all(c.how == "by-peer" for c in conns)
    copies = [m for m in good_peer.snapshot()[1] if tag.encode() in m.data]
    assert [m.mode for m in copies] == [B.GOOD]


def test_reset_after_the_final_dot_is_retried_not_lost(daemon: Daemon,
                                                       good_peer: B.BadPeer) -> None:
    """RFC 5321 6.1: the peer got the whole message and reset before its reply.  We cannot
    know it took the message: the recipient is deferred and sent again (the peer ends
    with duplicates, every copy intact), never dropped and never bounced."""
    tag = "reset-after-dot"
    body = body_for(tag)
    failing_case(daemon, good_peer, B.RESET_AFTER_DOT,
                 r"451 4\.4\.2 connection lost during reply to end of DATA with .*", tag,
                 body=body)
    copies = [m for m in good_peer.snapshot()[1] if tag.encode() in m.data]
    assert [(m.mode, m.answered) for m in copies] == [
        (B.RESET_AFTER_DOT, False), (B.RESET_AFTER_DOT, False), (B.GOOD, True)]
    for m in copies:
        assert split_received(m.data)[1] == body


# -- replies in pieces -------------------------------------------------------------------------

@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
def test_replies_split_byte_by_byte_are_understood(daemon: Daemon, good_peer: B.BadPeer,
                                                   pipelining: bool) -> None:
    """Every reply, the multi-line EHLO reply too, arrives one byte per TCP segment: the
    message is delivered on the first attempt, with the extensions the EHLO reply offered
    (PIPELINING: MAIL, RCPT and DATA in one write)."""
    good_peer.pipelining = pipelining
    good_peer.mode = B.BYTE_BY_BYTE
    tag = f"byte-by-byte-{'p' if pipelining else 'l'}"
    body = body_for(tag, 20_000)
    start = len(good_peer.snapshot()[0])
    qid = submit(daemon, "sender@client.test", [f"{tag}@peer.test"], body)
    wait_until(lambda: statuses(daemon, qid), 15, f"an attempt at {qid}",
               diagnose=daemon.maillog)
    assert statuses(daemon, qid) == ["sent"], daemon.maillog()
    [copy] = [m for m in good_peer.snapshot()[1] if tag.encode() in m.data]
    assert copy.mode == B.BYTE_BY_BYTE and copy.answered
    assert split_received(copy.data)[1] == body
    conn = good_peer.snapshot()[0][copy.conn]
    assert conn.commands[0].startswith("EHLO ")
    # SIZE was understood from the split EHLO reply
    assert re.search(r"SIZE=\d+", conn.commands[1]), conn.commands
    assert len(good_peer.snapshot()[0]) - start == 1


# -- a reply line that never ends --------------------------------------------------------------

@pytest.mark.parametrize("mode,reply", [
    pytest.param(B.LONG_GREETING,
                 r"451 4\.5\.0 reply line too long \(over \d+ bytes\) from .*",
                 id=B.LONG_GREETING),
    pytest.param(B.LONG_MAIL_REPLY,
                 r"451 4\.5\.0 reply line too long \(over \d+ bytes\) from .*",
                 id=B.LONG_MAIL_REPLY),
    pytest.param(B.ENDLESS_EHLO,
                 r"451 4\.5\.0 reply too long \(over \d+ bytes\) from .*",
                 id=B.ENDLESS_EHLO),
])
def test_a_10_mb_reply_is_cut_short(daemon: Daemon, good_peer: B.BadPeer, mode: str,
                                    reply: str) -> None:
    """"250 " and 10 MB without a line end (as the greeting, or the reply to MAIL), or an
    EHLO reply of 10 MB of continuation lines: the connection is dropped once the reply
    passes the client's bound, the recipient is deferred (451 4.5.0), and the daemon's
    memory does not grow by the size of the reply."""
    assert daemon.proc is not None
    pid = daemon.proc.pid
    can_peak = reset_peak(pid)
    before = rss_kib(pid)
    seen: list[int] = []
    conns, events = failing_case(
        daemon, good_peer, mode, reply, mode, extra=EXTRA_FLOODS,
        before_recovery=lambda: seen.extend([rss_kib(pid), rss_kib(pid, "VmHWM")]))
    after, peak = seen
    sent = [c.flood_sent for c in conns]
    print(f"\n{mode}: RSS before {before} KiB, after {after} KiB, peak {peak} KiB "
          f"(peak reset: {can_peak}); flood bytes sent before the close: {sent}")
    for c in conns:
        assert c.flood_sent < good_peer.flood_size, "the whole 10 MB went out"
    assert len(conns) == 2 + EXTRA_FLOODS
    # each attempt was offered 10 MB: holding any of it would add 10 MB
    assert after - before < 5 * 1024
    if can_peak:
        assert peak - before < 5 * 1024


# -- a peer that never answers -----------------------------------------------------------------

@pytest.mark.parametrize("mode,reply", [
    pytest.param(B.SILENT_CONNECT,
                 r"451 4\.4\.2 timeout waiting for greeting from .*",
                 id=B.SILENT_CONNECT),
    pytest.param(B.SILENT_EHLO,
                 r"451 4\.4\.2 timeout waiting for reply to EHLO from .*",
                 id=B.SILENT_EHLO),
    pytest.param(B.SILENT_IN_DATA,
                 r"451 4\.4\.2 timeout sending message content to .*",
                 id=B.SILENT_IN_DATA),
    pytest.param(B.SILENT_DOT,
                 r"451 4\.4\.2 timeout waiting for reply to end of DATA from .*",
                 id=B.SILENT_DOT),
])
def test_a_silent_peer_is_left_after_the_timeout(daemon: Daemon, good_peer: B.BadPeer,
                                                 mode: str, reply: str) -> None:
    """A next hop that says nothing after the connection opens, after EHLO, or after the
    final dot, or stops reading in the middle of the content (a message bigger than the
    TCP buffers can hold): our side closes the connection once the timeout is up (and no
    later), and the recipient is deferred (451 4.4.2), retried, then delivered."""
    tag = mode
    body = body_for(tag, 8_000_000 if mode == B.SILENT_IN_DATA else 150_000)
    conns, _ = failing_case(daemon, good_peer, mode, reply, tag, body=body)
    lifetimes = [round(c.lifetime or 0, 2) for c in conns]
    print(f"\n{mode}: connection lifetimes at the peer {lifetimes} s "
          f"(timeout {TIMEOUT:g} s), closed by us with {[c.how for c in conns]}")
    for c in conns:
        assert c.how in ("eof", "reset")      # our side closed it
        assert c.lifetime is not None and TIMEOUT * 0.9 <= c.lifetime <= TIMEOUT + SLACK
    if mode == B.SILENT_DOT:   # the peer had it: sent again, a duplicate rather than a loss
        copies = [m for m in good_peer.snapshot()[1] if tag.encode() in m.data]
        assert [m.answered for m in copies] == [False, False, True]
