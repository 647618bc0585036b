"""Deadlines: until when a recipient is tried, when its last attempt happens, and what a
client's deadline says.

Pure: no I/O, no clock (the caller passes the time).  A message may carry a deadline of its
own (`StoredMessage.expires`: the API's `ExpiresAt`/`TTL` or the `X-Txmta-Expires` header
field, absolute epoch seconds) and its lane may have one (`Lane.deadline`, seconds after
arrival, looked up when it is needed, so that a new configuration applies to mail already
queued).  `limit()` combines them with the lifetime cap (`[retry] max_lifetime`) into a
`Limit`: the moment the recipient's tries end, whether that is a deadline or the lifetime,
and the time of its last attempt.

The lifetime ends as it always did: one last attempt at its very end, and a failure after
that expires the recipient.  A deadline is a promise to the sender ("not after this"), so
the last attempt is placed a little before it: `margin()` is 10 % of the time the deadline
allowed, at most 30 s (a 10 s deadline is last tried at 9 s, a 15 min one at 14 min 30 s).
The margin is fixed by the deadline alone, not by the time left, so there is exactly one
last attempt and not ever shorter steps towards the deadline.  retry.next_delay does the
clamping (`Limit.last` is its end of the lifetime); `past_deadline()` tells the dispatcher
that a due recipient must not be tried at all (its deadline passed while it waited, e.g.
behind a throttled destination): it expires without an attempt.

A deadline expiry is not a bounce: the recipient ends as "expired", the DSN says it was
not delivered in time (RFC 3464 Action: failed, RFC 3463 X.4.7 "delivery time expired"),
and the address is never put on the suppression list (queue.py).

`parse_expires()` reads `X-Txmta-Expires`: an RFC 5322 date-time, an ISO 8601 timestamp
(UTC when it names no offset) or a duration from now ("10m", "1h30m", "600").
"""
# test: tests/test_deadline.py

from __future__ import annotations

import email.utils
from dataclasses import dataclass
from datetime import datetime, timezone

from txmta.config import parse_duration

EXPIRES_HEADER = "X-Txmta-Expires"
MARGIN = 30.0               # seconds: the most a last attempt is placed before a deadline
MARGIN_FRACTION = 0.1       # ... and at most this part of the time the deadline allowed


@dataclass(frozen=True)
class Limit:
    """When a recipient's tries end.  `end`: the deadline or the end of the lifetime (epoch
    seconds); `last`: the time of the last attempt (`end` for the lifetime, a margin before
    it for a deadline); `deadline`: whether `end` is a deadline (the message's or its
    lane's) rather than `[retry] max_lifetime`."""
    end: float
    last: float
    deadline: bool = False


def margin(allowed: float) -> float:
    """How long before a deadline the last attempt happens, for a deadline that allowed
    `allowed` seconds after arrival."""
    return max(0.0, min(MARGIN, MARGIN_FRACTION * allowed))


def limit(arrival: float, max_lifetime: float, expires: float | None = None,
          lane_deadline: float | None = None) -> Limit:
    """The Limit of a message that arrived at `arrival`: the earliest of its own deadline
    (`expires`, epoch seconds), its lane's (`lane_deadline` seconds after arrival) and the
    end of its lifetime.  A deadline at or before the end of the lifetime wins."""
    lifetime_end = arrival + max_lifetime
    deadlines = [t for t in (expires, None if lane_deadline is None else arrival + lane_deadline)
                 if t is not None]
    if not deadlines or min(deadlines) > lifetime_end:
        return Limit(lifetime_end, lifetime_end, deadline=False)
    end = min(deadlines)
    return Limit(end, end - margin(end - arrival), deadline=True)


def past_deadline(limit_: Limit, now: float) -> bool:
    """Whether a due recipient must expire without being tried: its deadline has passed.
    (The end of the lifetime is not a reason: its last attempt is at that very moment.)"""
    return limit_.deadline and now >= limit_.end


def parse_expires(text: str, now: float) -> float:
    """The deadline that an `X-Txmta-Expires` value names, as epoch seconds: an RFC 5322
    date-time ("Sun, 06 Dec 2026 08:00:00 +0000"), an ISO 8601 timestamp
    ("2026-12-06T08:00:00Z"; without an offset: UTC) or a duration from `now` ("10m",
    "600").  Raises ValueError for anything else."""
    value = " ".join(text.split())      # unfolded, white space collapsed
    if not value:
        raise ValueError("empty deadline")
    try:
        return now + parse_duration(value)
    except ValueError:
        pass
    try:
        return parse_iso8601(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"not a date-time or a duration: {value!r} (write e.g. "
                         f"\"2026-12-06T08:00:00Z\" or \"10m\")") from None
    if when.tzinfo is None:                 # "-0000": UTC, its offset unknown (RFC 5322 3.3)
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def parse_iso8601(text: str) -> float:
    """An ISO 8601 timestamp ("2026-12-06T08:00:00Z", "2026-12-06T09:00:00+01:00"; UTC when
    it names no offset) as epoch seconds; ValueError for anything else."""
    value = text.strip()
    if not value[:4].isdigit():             # fromisoformat also reads forms nobody writes
        raise ValueError(f"not an ISO 8601 timestamp: {text!r}")
    when = datetime.fromisoformat(value)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()

