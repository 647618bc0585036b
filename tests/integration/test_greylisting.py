"""Greylisting or not, with a real twistd (the set-up is test_delivery.py's: the module's DNS
zone, the per-test smtp_port, sinks on 127.0.0.2x): a next hop that answers a generic 451
once is retried at the retry schedule's first step, not at a greylisting delay; a greylister
(a postgrey-style text naming its delay) gets exactly one retry at that delay, from the same
source address, and a second greylisting reply follows the schedule.

The scripted next hop records, for every RCPT, the time it came and the peer address it came
from.  The only timing asserted is a bound per gap between attempts.  Loopback only.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import pytest

from itlib import Daemon, statuses, submit
from sinks import SmtpSink
from test_delivery import body_for, deliverer, dns, port, wait_status  # noqa: F401

pytestmark = pytest.mark.integration

SOURCE = "127.0.0.9"      # [delivery] source_address; not the kernel's default 127.0.0.1
GREYLIST_DELAY = 6        # seconds, named in the greylister's reply
SCHEDULE = ("2s",)        # [retry] schedule: 2 s after every failure


class Script:
    """Replies to one command, one per attempt in order (then `ok`), and what each attempt
    looked like: (time it came, peer address, the reply given)."""

    def __init__(self, *replies: str, ok: str = "250 2.1.5 Ok") -> None:
        self.replies, self.ok = list(replies), ok
        self.attempts: list[tuple[float, str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, sink: SmtpSink, session: Any, arg: str) -> str:
        with self.lock:
            n = len(self.attempts)
            reply = self.replies[n] if n < len(self.replies) else self.ok
            self.attempts.append((time.monotonic(), session.client_ip, reply))
        return reply

    def gaps(self) -> list[float]:
        times = [t for t, _, _ in self.attempts]
        return [b - a for a, b in zip(times, times[1:])]

    def peers(self) -> set[str]:
        return {ip for _, ip, _ in self.attempts}


@pytest.mark.parametrize("stage, reply", [
    ("RCPT", "451 4.3.0 try again later"),
    # Microsoft 365's throttling of an unknown sender, at the end of the data
    ("DOT", "451 4.7.500 Server busy. Please try again later from [127.0.0.9]. (S77719)"),
])
def test_generic_451_is_retried_at_the_schedules_first_step(deliverer: Callable[..., Daemon],
                                                            port: int, stage: str,
                                                            reply: str) -> None:  # noqa: F811
    """A generic temporary failure is not greylisting: the retry comes at the schedule's
    first step (2 s, +/- 10 %), far from the 300 s a greylisting retry without a named delay
    would wait."""
    script = Script(reply, ok="250 2.1.5 Ok" if stage == "RCPT" else "250 2.0.0 Ok: queued")
    with SmtpSink("127.0.0.23", port, replies={stage: script}) as sink:
        d = deliverer(schedule=SCHEDULE, source_address=SOURCE)
        qid = submit(d, "sender@client.test", ["carol@grey.test"], body_for("generic" + stage))
        wait_status(d, qid, "sent", timeout=20)
    assert statuses(d, qid) == ["deferred", "sent"]
    assert len(script.attempts) == 2, script.attempts
    [gap] = script.gaps()
    assert 1.5 <= gap < 10.0, f"retried {gap:.1f} s after a generic 451; the schedule says 2 s"
    assert script.peers() == {SOURCE}
    assert [t.rcpt_to for t in sink.snapshot()] == [["carol@grey.test"]]


def test_greylister_gets_one_retry_at_its_delay_from_the_same_address(
        deliverer: Callable[..., Daemon], port: int) -> None:  # noqa: F811
    """A postgrey-style reply naming its delay: the first retry waits at least that delay and
    comes from the same source address (the greylister's triplet); when that retry is
    greylisted again, the next one follows the schedule (2 s), not the greylisting delay."""
    grey = (f"450 4.2.0 <carol@grey.test>: Recipient address rejected: Greylisted for "
            f"{GREYLIST_DELAY} seconds")
    script = Script(grey, grey)
    with SmtpSink("127.0.0.23", port, replies={"RCPT": script}) as sink:
        d = deliverer(schedule=SCHEDULE, source_address=SOURCE)
        qid = submit(d, "grey-sender@client.test", ["carol@grey.test"], body_for("greylister"))
        wait_status(d, qid, "sent", timeout=40)
    assert statuses(d, qid) == ["deferred", "deferred", "sent"]
    assert [r[:3] for *_, r in script.attempts] == ["450", "450", "250"], script.attempts
    assert script.peers() == {SOURCE}, f"attempts from other addresses: {script.attempts}"
    first, second = script.gaps()
    assert first >= GREYLIST_DELAY, f"retried {first:.1f} s after greylisting for {GREYLIST_DELAY} s"
    assert second < GREYLIST_DELAY, f"a second greylisting reply waited {second:.1f} s again"
    [t] = sink.snapshot()
    assert (t.client_ip, t.mail_from, t.rcpt_to) == (SOURCE, "grey-sender@client.test",
                                                     ["carol@grey.test"])
