"""When to post a webhook again, and which deferral events to leave out.

Pure: no I/O, no clock of its own (times are passed in, STYLE habit 5).

**Retries.**  An event is posted until its endpoint answers 2xx, on a backoff schedule of
5 s, 30 s, 2 min, 5 min, 15 min, 30 min, 1 h, 2 h, 4 h, 8 h, then every 8 h, and given up
(`next_retry` returns None) once the attempts would span more than three days: 18 attempts,
the last about 72 hours after the first.  The steps are those of common webhook senders
(Standard Webhooks recommends exponential backoff lasting days, and receivers expect to be
able to be down for a deploy or a night); no jitter, because one endpoint's events are
posted one after the other anyway.

An answer's `Retry-After` (RFC 9110 10.2.3: a number of seconds or an HTTP date;
`retry_after_seconds` reads both, the current time passed in) is honoured but capped at
24 hours, and never makes the wait shorter than the schedule's step: a busy receiver may slow
us down, not speed us up.  When the caller also passes the event's age, the event is given
up once the next attempt would fall more than three days after the event, so that long
Retry-After waits do not stretch the three days.

**Deferrals.**  A recipient may be deferred many times in an hour (greylisting, rate
limits); `Collapser` lets at most one `deferred` event per recipient (message id and
recipient index) through per hour, and never holds back any other kind.  It remembers only
the last hour (and at most `max_entries` recipients: past that, the oldest are forgotten,
which can only let an extra event through), so its memory is bounded.  It lives in memory:
after a restart a recipient's next deferral is sent again.
"""
# test: tests/test_webhooks_schedule.py

from __future__ import annotations

import email.utils
from collections import deque
from datetime import timezone

from txmta.message import OutboxRecord

SCHEDULE: tuple[float, ...] = (5, 30, 120, 300, 900, 1800, 3600, 7200, 14400, 28800)
THEN_EVERY = 28800.0                 # after the schedule: every 8 hours
GIVE_UP_AFTER = 3 * 86400.0          # attempts span at most three days
RETRY_AFTER_CAP = 86400.0            # a Retry-After longer than a day counts as a day


def step(attempts: int) -> float:
    """The schedule's wait after `attempts` failed attempts (1 for the first failure)."""
    n = max(1, attempts)
    return float(SCHEDULE[n - 1]) if n <= len(SCHEDULE) else THEN_EVERY


def _span(attempts: int) -> float:
    """The schedule's time from the first attempt to attempt `attempts` + 1."""
    n = max(1, attempts)
    head = sum(SCHEDULE[:n])
    return float(head) + max(0, n - len(SCHEDULE)) * THEN_EVERY


def next_retry(attempts: int, retry_after: float | None = None, *,
               age: float | None = None) -> float | None:
    """Seconds to wait before attempt `attempts` + 1, or None to give up.

    `attempts` counts the attempts made (all failed); `retry_after` is the answer's
    Retry-After in seconds (`retry_after_seconds`), or None; `age` is how long ago the
    event happened, when the caller knows it."""
    if _span(attempts) > GIVE_UP_AFTER:
        return None
    wait = step(attempts)
    if retry_after is not None and retry_after == retry_after:       # not NaN
        wait = max(wait, min(retry_after, RETRY_AFTER_CAP))
    if age is not None and age + wait > GIVE_UP_AFTER:
        return None
    return wait


def retry_after_seconds(header: str | None, now: float) -> float | None:
    """A Retry-After value in seconds from `now`: delay-seconds ("120") or an HTTP date
    (IMF-fixdate, RFC 850 or asctime form; RFC 9110 5.6.7).  None when it is absent or
    unreadable; 0 for a date in the past."""
    if header is None:
        return None
    text = header.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:                  # asctime carries no zone: it is GMT
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now)


class Collapser:
    """At most one `deferred` event per recipient per `window` seconds; every other kind
    passes.  Times are the records' own."""

    def __init__(self, window: float = 3600.0, max_entries: int = 100_000) -> None:
        self.window = window
        self.max_entries = max_entries
        self._last: dict[tuple[str, int], float] = {}     # recipient -> last deferral sent
        self._order: deque[tuple[float, tuple[str, int]]] = deque()

    def __len__(self) -> int:
        return len(self._last)

    def should_send(self, record: OutboxRecord) -> bool:
        """Whether to post `record`: false only for a deferral of a recipient whose last
        deferral went out less than `window` seconds before."""
        key = (record.message_id, record.index)
        if record.kind != "deferred":
            if record.index >= 0:
                self._last.pop(key, None)    # a terminal event: nothing more to collapse
            return True
        self._forget(record.time - self.window)
        last = self._last.get(key)
        if last is not None and record.time - last < self.window:
            return False
        self._last[key] = record.time
        self._order.append((record.time, key))
        while len(self._order) > self.max_entries:
            self._drop_oldest()
        return True

    def _forget(self, before: float) -> None:
        while self._order and self._order[0][0] <= before:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        at, key = self._order.popleft()
        if self._last.get(key) == at:
            del self._last[key]
