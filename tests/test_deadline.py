"""deadline: a recipient's limit (its message's deadline, its lane's, the lifetime), where
its last attempt goes, and the X-Txmta-Expires values.  Pure arithmetic, so tables and
hypothesis; the retry delays come from retry.next_delay with the limit's last attempt as its
end, with `jitter=lambda: 0.0` (STYLE habit 5)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txmta.deadline import Limit, limit, margin, parse_expires, past_deadline
from txmta.retry import Expired, next_delay

T0 = 1_800_000_000.0            # an arrival time
DAY = 86400.0
LIFETIME = 5 * DAY
SCHEDULE = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)   # the default [retry] schedule
LANE = (30.0, 60.0, 120.0, 300.0)                                   # a short lane schedule


def no_jitter() -> float:
    return 0.0


# -- limit ----------------------------------------------------------------------------------

@pytest.mark.parametrize("expires, lane_deadline, expected", [
    (None, None, Limit(T0 + LIFETIME, T0 + LIFETIME, False)),         # only the lifetime
    (None, 900.0, Limit(T0 + 900.0, T0 + 870.0, True)),               # a 15 min lane: last at -30 s
    (T0 + 10.0, None, Limit(T0 + 10.0, T0 + 9.0, True)),              # 10 s: last at 9 s (10 %)
    (T0 + 600.0, 900.0, Limit(T0 + 600.0, T0 + 570.0, True)),         # the message's is earlier
    (T0 + 1200.0, 900.0, Limit(T0 + 900.0, T0 + 870.0, True)),        # the lane's is earlier
    (None, 200.0, Limit(T0 + 200.0, T0 + 180.0, True)),               # 10 % of 200 s = 20 s
    (None, 300.0, Limit(T0 + 300.0, T0 + 270.0, True)),               # 10 % = 30 s, the cap
    (T0 + 6 * DAY, None, Limit(T0 + LIFETIME, T0 + LIFETIME, False)),  # past the lifetime: lifetime
    (None, 7 * DAY, Limit(T0 + LIFETIME, T0 + LIFETIME, False)),
    (None, LIFETIME, Limit(T0 + LIFETIME, T0 + LIFETIME - 30.0, True)),  # equal: the deadline
    (T0, None, Limit(T0, T0, True)),                                  # no time at all
    (T0 - 60.0, None, Limit(T0 - 60.0, T0 - 60.0, True)),             # already past
])
def test_limit_is_the_earliest_deadline_or_the_lifetime(expires, lane_deadline, expected):
    """The message's deadline, its lane's (after arrival) and the lifetime: the earliest
    ends the tries; a deadline puts the last attempt min(30 s, 10 %) before it, the lifetime
    at its very end."""
    assert limit(T0, LIFETIME, expires, lane_deadline) == expected


@pytest.mark.parametrize("allowed, expected", [
    (0.0, 0.0), (1.0, 0.1), (10.0, 1.0), (60.0, 6.0), (300.0, 30.0), (900.0, 30.0),
    (DAY, 30.0), (-5.0, 0.0),
])
def test_margin_is_ten_percent_of_the_deadline_at_most_30_seconds(allowed, expected):
    assert margin(allowed) == pytest.approx(expected)


@pytest.mark.parametrize("lim, now, expected", [
    (Limit(T0 + 10.0, T0 + 9.0, True), T0 + 9.0, False),     # the last attempt: tried
    (Limit(T0 + 10.0, T0 + 9.0, True), T0 + 9.99, False),    # late, but before the deadline
    (Limit(T0 + 10.0, T0 + 9.0, True), T0 + 10.0, True),     # at the deadline: not tried
    (Limit(T0 + 10.0, T0 + 9.0, True), T0 + 3600.0, True),
    (Limit(T0 + LIFETIME, T0 + LIFETIME, False), T0 + LIFETIME + 5.0, False),   # the lifetime's
])                                                           # last attempt is at its end: tried
def test_past_deadline_only_for_a_deadline_that_has_passed(lim, now, expected):
    """A due recipient is not tried once its deadline has passed; the end of the lifetime
    never stops its own last attempt."""
    assert past_deadline(lim, now) is expected


# -- the retry schedule with a deadline -------------------------------------------------------

def schedule_until_expired(lim: Limit, schedule, first_failure_at: float = 0.0):
    """The attempt times (seconds after arrival) of a recipient whose every attempt fails at
    once, from the first at `first_failure_at`, until next_delay says Expired."""
    times = [first_failure_at]
    while True:
        age = times[-1]
        d = next_delay(len(times), age, schedule, lim.last - T0, jitter=no_jitter)
        if isinstance(d, Expired):
            return times
        times.append(age + d)
        assert len(times) < 100


@pytest.mark.parametrize("expires, lane_deadline, schedule, attempts", [
    # a 10 s deadline, the default schedule: the first attempt, then the last one at 9 s
    (T0 + 10.0, None, SCHEDULE, [0.0, 9.0]),
    # a 15 min lane with its own schedule: 0, 30 s, 1.5 min, 3.5 min, 8.5 min, 13.5 min, last 14.5 min
    (None, 900.0, LANE, [0.0, 30.0, 90.0, 210.0, 510.0, 810.0, 870.0]),
    # the same lane on the default schedule: fewer, longer steps, the same last attempt
    (None, 900.0, SCHEDULE, [0.0, 60.0, 360.0, 870.0]),
    # 1 h via X-Txmta-Expires, default schedule: last at 59.5 min
    (T0 + 3600.0, None, SCHEDULE, [0.0, 60.0, 360.0, 1260.0, 3060.0, 3570.0]),
])
def test_the_last_attempt_is_placed_before_the_deadline(expires, lane_deadline, schedule,
                                                        attempts):
    """Retries follow the (lane's) schedule; the attempt that would fall past the last
    attempt's time is moved to it, and a failure there expires the recipient."""
    lim = limit(T0, LIFETIME, expires, lane_deadline)
    assert schedule_until_expired(lim, schedule) == pytest.approx(attempts)
    assert all(t < lim.end - T0 for t in attempts)


def test_an_attempt_that_ends_after_the_last_attempts_time_expires():
    """An attempt that took long (a connect timeout) and failed past the last attempt's time
    is the last one."""
    lim = limit(T0, LIFETIME, T0 + 10.0)
    assert isinstance(next_delay(1, 9.5, SCHEDULE, lim.last - T0, jitter=no_jitter), Expired)
    assert isinstance(next_delay(1, 12.0, SCHEDULE, lim.last - T0, jitter=no_jitter), Expired)


deadlines = st.floats(0.5, 30 * DAY, allow_nan=False)


@given(st.one_of(st.none(), deadlines), st.one_of(st.none(), deadlines),
       st.lists(st.floats(1.0, DAY, allow_nan=False), min_size=1, max_size=8),
       st.floats(-0.1, 0.1, allow_nan=False))
def test_every_attempt_is_before_the_deadline_and_there_are_finitely_many(
        expires_in, lane_deadline, schedule, j):
    """Whatever the deadlines and the schedule, every attempt happens no later than the limit's
    last attempt, strictly before a deadline, and the recipient expires after finitely many."""
    expires = None if expires_in is None else T0 + expires_in
    lifetime = 3600.0           # short, so that a 1 s schedule stays a few thousand attempts
    lim = limit(T0, lifetime, expires, lane_deadline)
    assert lim.last <= lim.end
    if lim.deadline:
        assert lim.last < lim.end and lim.end <= T0 + lifetime
    times = [0.0]
    while True:
        d = next_delay(len(times), times[-1], schedule, lim.last - T0, jitter=lambda: j)
        if isinstance(d, Expired):
            break
        times.append(times[-1] + d)
        assert times[-1] <= (lim.last - T0) * (1 + 1e-12)
        assert len(times) < 10_000
    assert len(times) >= 1


# -- X-Txmta-Expires --------------------------------------------------------------------------

NOW = 1_796_540_400.0           # 2026-12-06T07:00:00Z


@pytest.mark.parametrize("text, expected", [
    ("10m", NOW + 600.0),                                       # a duration from now
    ("600", NOW + 600.0),
    ("1h30m", NOW + 5400.0),
    (" 45s ", NOW + 45.0),
    ("0", NOW),
    ("2026-12-06T08:00:00Z", NOW + 3600.0),                     # ISO 8601
    ("2026-12-06T08:00:00+00:00", NOW + 3600.0),
    ("2026-12-06T09:00:00+01:00", NOW + 3600.0),
    ("2026-12-06T08:00:00", NOW + 3600.0),                      # no offset: UTC
    ("2026-12-06T08:00:00.500Z", NOW + 3600.5),
    ("Sun, 06 Dec 2026 08:00:00 +0000", NOW + 3600.0),          # RFC 5322 3.3
    ("Sun, 06 Dec 2026 03:00:00 -0500", NOW + 3600.0),
    ("6 Dec 2026 08:00:00 GMT", NOW + 3600.0),                  # obsolete zone (RFC 5322 4.3)
    ("Sun, 06 Dec 2026\r\n 08:00:00 +0000", NOW + 3600.0),      # folded
])
def test_parse_expires_reads_dates_and_durations(text, expected):
    assert parse_expires(text, NOW) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "   ", "soon", "-5m", "10 minutes", "2026-13-45T00:00:00Z",
                                  "Sun, 99 Foo 2026", "inf", "nan"])
def test_parse_expires_refuses_anything_else(text):
    with pytest.raises(ValueError):
        parse_expires(text, NOW)
