"""When to try a deferred recipient again, or that its time is up.

Pure: no I/O, no clock, no randomness of its own.  The caller passes the number of attempts
made, the recipient's age (seconds since the message arrived) and the last reply, and gets
back a delay in seconds or `Expired`; randomness comes in through `jitter` so that tests
pass `jitter=lambda: 0.0` (STYLE habit 5).  It does not decide what a reply means
(`outcome.classify` does) and it does not schedule anything (the dispatch `callLater`s).

The schedule is the configured `[retry] schedule`; its last delay repeats (Postfix's
`maximal_backoff_time`, OpenSMTPD's `scheduler_backoff`).  Two refinements:

* Greylisting (RFC 6647): a greylisting server defers the first attempt from an
  unknown (client, sender, recipient) triplet and accepts a retry after some minutes.  The
  first time a recipient is greylisted we retry after the delay the reply names, or after
  `GREYLISTING_DEFAULT` (postgrey's and most greylisters' 300 s), instead of the schedule;
  later failures follow the schedule.  Jitter there only lengthens the wait: a retry before
  the asked delay would just be greylisted again.
* The lifetime (`[retry] max_lifetime`, Postfix's `maximal_queue_lifetime`): a delay that
  would carry the next attempt past the end of the lifetime is shortened so that one last
  attempt happens exactly at the end; a failure after that is `Expired`.  Expiry is not a
  permanent failure of the reply: the caller fails the recipient as "expired" (RFC 3464
  Action: failed, with the last reply as diagnostic; RFC 3463 3.5, X.4.7 "delivery time
  expired").
"""
# test: tests/test_retry.py

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from txmta.reply import Reply

GREYLISTING_DEFAULT = 300.0   # seconds; postgrey's --delay default, and what most greylisters use
JITTER = 0.1                  # +/- 10 % on scheduled delays, so retries of a burst do not stay in step
STARTUP_SPREAD = 30.0         # seconds over which the first retries after a restart are spread


@dataclass(frozen=True)
class Expired:
    """The recipient's lifetime is over: fail it as expired (not as a hard bounce)."""


def default_jitter() -> float:
    """A uniform factor in [-JITTER, JITTER]."""
    return random.uniform(-JITTER, JITTER)


# Codes and enhanced codes greylisters use: Postfix policy servers (postgrey) answer
# "450 4.2.0 ... Greylisted", milter-greylist and sqlgrey "451 4.7.1 ...", Exim's
# greylistd "451 4.7.1 ..." (RFC 3463 3.3 X.2.0 "other mailbox status", 3.8 X.7.1
# "delivery not authorized").
_GREYLISTING_CODES = frozenset({450, 451})
_GREYLISTING_ENHANCED = frozenset({"4.2.0", "4.7.1"})
_GREYLISTING_WORDS = re.compile(
    r"grey\s*list|gray\s*list|try again later|please retry in|temporarily deferred|retry later",
    re.IGNORECASE)
# "please retry in 300 seconds", "try again in 5 minutes", "retry after 60s",
# "greylisted for 300 seconds" (postgrey's --greylist-text example).
_DELAY = re.compile(
    r"\b(?:in|after|for)\s+(\d{1,7})\s*"
    r"(seconds?|secs?|s|minutes?|mins?|m|hours?|hrs?|h)?(?![a-z])",
    re.IGNORECASE)
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0}
_LEADING_ENHANCED = re.compile(r"^\s*([245]\.\d{1,3}\.\d{1,3})\b")


def _enhanced(reply: Reply) -> str:
    """The enhanced status code, also when a client left it at the start of the text."""
    if reply.enhanced:
        return reply.enhanced
    m = _LEADING_ENHANCED.match(reply.text)
    return m.group(1) if m else ""


def looks_like_greylisting(reply: Reply) -> bool:
    """450/451 with 4.2.0 or 4.7.1, or any 4xx but 421 whose text says greylisting."""
    if not reply.transient or reply.code == 421:   # 421: the server is closing; not a greylister
        return False
    if reply.code in _GREYLISTING_CODES and _enhanced(reply) in _GREYLISTING_ENHANCED:
        return True
    return _GREYLISTING_WORDS.search(reply.text) is not None


def greylisting_delay(reply: Reply) -> float | None:
    """None unless `reply` looks like greylisting; else the delay it names, or 300 s."""
    if not looks_like_greylisting(reply):
        return None
    m = _DELAY.search(reply.text)
    if m is None:
        return GREYLISTING_DEFAULT
    unit = (m.group(2) or "s")[0].lower()
    return float(m.group(1)) * _UNIT[unit]


def next_delay(attempts: int, age: float, reply: Reply | None, schedule: Sequence[float],
               max_lifetime: float, greylisted_before: bool = False,
               jitter: Callable[[], float] = default_jitter) -> float | Expired:
    """Seconds until the next attempt at a recipient, or `Expired`.

    `attempts` counts the attempts made so far, including the one that just failed (>= 1);
    `age` is the seconds since the message arrived; `reply` is the last reply (None when
    there was none: no connection, a timeout).  `greylisted_before` says whether this
    recipient already got its greylisting retry (the caller keeps it, e.g. from
    `TempFailed.greylisted`); if it did, the schedule applies.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, not {attempts}")
    if not schedule:
        raise ValueError("empty retry schedule")
    if age >= max_lifetime:
        return Expired()
    grey = None if greylisted_before or reply is None else greylisting_delay(reply)
    if grey is not None:
        delay = grey * (1.0 + abs(jitter()))         # never earlier than the greylister asked
    else:
        delay = schedule[min(attempts - 1, len(schedule) - 1)] * (1.0 + jitter())
    delay = max(0.0, delay)
    if age + delay >= max_lifetime:
        delay = max_lifetime - age                   # one final attempt at the end of the lifetime
    return delay


def startup_delay(jitter: Callable[[], float] = random.random) -> float:
    """How long after a restart to make a due recipient's first retry: uniform in
    [0, STARTUP_SPREAD] s, so a restart does not retry the whole queue at once.
    `jitter` returns a fraction in [0, 1]."""
    return STARTUP_SPREAD * min(max(jitter(), 0.0), 1.0)
