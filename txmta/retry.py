"""When to try a deferred recipient again, or that its time is up.

Pure: no I/O, no clock, no randomness of its own, and no reading of replies.  The caller
passes the number of attempts made, the recipient's age (seconds since the message arrived)
and what `outcome.classify` found in the last reply (greylisting, the wait it asked for), and
gets back a delay in seconds or `Expired`; randomness comes in through `jitter` so that tests
pass `jitter=lambda: 0.0` (STYLE habit 5).  It does not decide what a reply means
(`outcome.classify` does) and it does not schedule anything (the dispatch `callLater`s).

The schedule is the configured `[retry] schedule`; its last delay repeats (Postfix's
`maximal_backoff_time`, OpenSMTPD's `scheduler_backoff`).  Three refinements:

* Greylisting (RFC 6647): the first time a recipient is greylisted (a reply that says so;
  `outcome.classify` decides, and a mere "try again later" is not) we retry after the delay
  the greylister asked for (`retry_after`: the delay its reply names, or 300 s) instead of the
  schedule; later failures follow the schedule, whatever they ask.  Jitter there only
  lengthens the wait: a retry before the asked delay would just be greylisted again.
* Any other reply that asked for a wait (`retry_after`, e.g. a rate limiter's "try again in
  10 minutes") is waited at least that long: the delay is the longer of the schedule's and
  the asked one.
* The lifetime (`[retry] max_lifetime`, Postfix's `maximal_queue_lifetime`): a delay that
  would carry the next attempt past the end of the lifetime is shortened so that one last
  attempt happens exactly at the end; a failure after that is `Expired`.  With a deadline
  (deadline.py) the queue passes the time of the last attempt before it as the end of the
  lifetime, and the lane's schedule as the schedule.  Expiry is not a
  permanent failure of the reply: the caller fails the recipient as "expired" (RFC 3464
  Action: failed, with the last reply as diagnostic; RFC 3463 3.5, X.4.7 "delivery time
  expired").
"""
# test: tests/test_retry.py

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

JITTER = 0.1                  # +/- 10 % on scheduled delays, so retries of a burst do not stay in step
STARTUP_SPREAD = 30.0         # seconds over which the first retries after a restart are spread


@dataclass(frozen=True)
class Expired:
    """The recipient's lifetime is over: fail it as expired (not as a hard bounce)."""


def default_jitter() -> float:
    """A uniform factor in [-JITTER, JITTER]."""
    return random.uniform(-JITTER, JITTER)


def next_delay(attempts: int, age: float, schedule: Sequence[float], max_lifetime: float, *,
               greylisted: bool = False, retry_after: float | None = None,
               greylisted_before: bool = False,
               jitter: Callable[[], float] = default_jitter) -> float | Expired:
    """Seconds until the next attempt at a recipient, or `Expired`.

    `attempts` counts the attempts made so far, including the one that just failed (>= 1);
    `age` is the seconds since the message arrived.  `greylisted` and `retry_after` are the
    last attempt's (`TempFailed.greylisted`, `.retry_after`: whether its reply was
    greylisting, the seconds it asked for; None when it did not say, or there was no reply).
    `greylisted_before` says whether this recipient already got its greylisting retry (the
    caller keeps it, `RecipientState.greylisted`); if it did, the schedule applies.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, not {attempts}")
    if not schedule:
        raise ValueError("empty retry schedule")
    if age >= max_lifetime:
        return Expired()
    if greylisted and not greylisted_before and retry_after is not None:
        delay = retry_after * (1.0 + abs(jitter()))   # never earlier than the greylister asked
    else:
        delay = schedule[min(attempts - 1, len(schedule) - 1)] * (1.0 + jitter())
        if retry_after is not None and not greylisted:
            delay = max(delay, retry_after)           # at least the wait the reply asked for
    delay = max(0.0, delay)
    if age + delay >= max_lifetime:
        delay = max_lifetime - age                    # one final attempt at the end of the lifetime
    return delay


def startup_delay(jitter: Callable[[], float] = random.random) -> float:
    """How long after a restart to make a due recipient's first retry: uniform in
    [0, STARTUP_SPREAD] s, so a restart does not retry the whole queue at once.
    `jitter` returns a fraction in [0, 1]."""
    return STARTUP_SPREAD * min(max(jitter(), 0.0), 1.0)
