"""IP pools with a real twistd (the set-up is test_delivery.py's: the module's DNS zone, the
per-test smtp_port, sinks on 127.0.0.2x): a `[[pool]]` of two source addresses, 127.0.0.61
and 127.0.0.62, each with its own HELO name, taken in turn; an address the next hop refuses
with a block list reply leaves the rotation (the mail it carried goes from the other one);
a greylisted recipient's retry comes from the address of its first try.

The sinks record the peer address of every connection, RCPT and transaction.  Loopback only.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import pytest

from itlib import Daemon, delivery_sections, statuses, submit
from sinks import SmtpSink
from test_delivery import body_for, dns, port, wait_status  # noqa: F401

pytestmark = pytest.mark.integration

A, B = "127.0.0.61", "127.0.0.62"
HELO = {A: "mta61.test.invalid", B: "mta62.test.invalid"}
POOL = {"name": "main", "addresses": [{"address": A, "helo": HELO[A]},
                                      {"address": B, "helo": HELO[B]}]}


@pytest.fixture
def pooled(start_daemon: Callable[..., Daemon], dns: tuple[str, int],  # noqa: F811
           port: int) -> Callable[..., Daemon]:  # noqa: F811
    """`pooled()`: a running daemon delivering to the test zone from the pool A, B."""
    def start(**pool: Any) -> Daemon:
        return start_daemon(pool=[{**POOL, **pool}],
                            **delivery_sections(port, dns, schedule=("1s",)))
    return start


def test_round_robin_uses_both_addresses_with_their_helo_names(pooled: Callable[..., Daemon],
                                                               port: int) -> None:  # noqa: F811
    """Four messages, one attempt each: two from each address, each greeting with its own
    HELO name."""
    with SmtpSink("127.0.0.21", port) as sink:
        d = pooled()
        ids = [submit(d, "sender@client.test", ["alice@happy.test"], body_for(f"rr{n}"))
               for n in range(4)]
        for qid in ids:
            wait_status(d, qid, "sent")
    seen = Counter((t.client_ip, t.helo) for t in sink.snapshot())
    assert seen == {(A, HELO[A]): 2, (B, HELO[B]): 2}, seen


def test_an_address_refused_by_a_block_list_leaves_the_rotation(pooled: Callable[..., Daemon],
                                                                port: int) -> None:  # noqa: F811
    """The next hop refuses 127.0.0.61 with a block list 550: that message is deferred (not
    bounced) and delivered from 127.0.0.62, and so is every message after it."""
    def rcpt(sink: SmtpSink, session: Any, arg: str) -> str | None:
        if session.client_ip == A:
            return (f"550 5.7.1 Service unavailable; Client host [{A}] blocked using "
                    "zen.spamhaus.org")
        return None

    with SmtpSink("127.0.0.21", port, replies={"RCPT": rcpt}) as sink:
        d = pooled()
        first = submit(d, "sender@client.test", ["alice@happy.test"], body_for("blocked"))
        wait_status(d, first, "sent", timeout=20)
        later = [submit(d, "sender@client.test", ["alice@happy.test"], body_for(f"after{n}"))
                 for n in range(3)]
        for qid in later:
            wait_status(d, qid, "sent")
    assert statuses(d, first) == ["deferred", "sent"]
    assert [ip for ip, *_ in sink.rcpt_log].count(A) == 1, sink.rcpt_log
    assert [t.client_ip for t in sink.snapshot()] == [B] * 4
    assert all(statuses(d, qid) == ["sent"] for qid in later)


def test_a_greylisted_recipient_is_retried_from_the_address_of_its_first_try(
        pooled: Callable[..., Daemon], port: int) -> None:  # noqa: F811
    """Three recipients, each greylisted at its first try (from A, B, A in turn): each retry
    comes from the same address as its first try, so the greylister lets each through at
    the second attempt.  (Without it the turn would send two of the three retries from the
    other address.)"""
    rcpts = ["carol1@grey.test", "carol2@grey.test", "carol3@grey.test"]
    with SmtpSink("127.0.0.23", port, greylist=True, greylist_delay=2) as sink:
        d = pooled()
        ids = [submit(d, "grey-sender@client.test", [r], body_for(f"grey{n}"))
               for n, r in enumerate(rcpts)]
        for qid in ids:
            wait_status(d, qid, "sent", timeout=30)
    tries = {r: [(ip, code) for ip, _, rcpt, code in sink.rcpt_log if rcpt == r] for r in rcpts}
    for r, seen in tries.items():
        assert len(seen) == 2 and seen[0][1] == 451 and seen[1][1] == 250, (r, seen)
        assert seen[0][0] == seen[1][0], f"{r} retried from another address: {seen}"
    assert {seen[0][0] for seen in tries.values()} == {A, B}
    assert all(statuses(d, qid) == ["deferred", "sent"] for qid in ids)
