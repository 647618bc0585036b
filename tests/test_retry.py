"""retry: the delay before the next attempt at a deferred recipient, greylisting-aware,
bounded by the recipient's lifetime.  Pure arithmetic over what outcome.classify found in the
reply (greylisted, retry_after; tests/test_outcome.py checks those), so tables and
hypothesis; every table passes `jitter=lambda: 0.0` (STYLE habit 5)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txmta import retry
from txmta.retry import Expired, next_delay, startup_delay

SCHEDULE = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)   # the default [retry] schedule
DAY = 86400.0
LIFETIME = 5 * DAY


def no_jitter() -> float:
    return 0.0


# -- next_delay: the schedule ----------------------------------------------------------------

@pytest.mark.parametrize("attempts, age, expected", [
    (1, 0.0, 60.0),
    (1, 5.0, 60.0),
    (2, 65.0, 300.0),
    (3, 400.0, 900.0),
    (7, 30000.0, 14400.0),
    (8, 45000.0, 14400.0),                        # the last delay repeats
    (100, 2 * DAY, 14400.0),
])
def test_next_delay_follows_the_schedule_and_repeats_its_last_delay(attempts, age, expected):
    """Non-greylisting failures wait schedule[attempts-1]; past its end, the last delay
    (RFC 5321 4.5.4.1: retry with a sender-chosen strategy; Postfix maximal_backoff_time)."""
    assert next_delay(attempts, age, SCHEDULE, LIFETIME, jitter=no_jitter) == expected


@pytest.mark.parametrize("attempts, retry_after, expected", [
    (1, 600.0, 600.0),          # "try again in 10 minutes": longer than schedule[0]
    (3, 600.0, 900.0),          # the schedule's delay is longer: it stands
    (1, 0.0, 60.0),
    (1, None, 60.0),            # the reply asked for nothing
])
def test_next_delay_waits_at_least_what_the_reply_asked(attempts, retry_after, expected):
    """A reply that asked for a wait (a rate limiter's "try again in N minutes") is waited at
    least that long; the schedule still applies when it is longer."""
    assert next_delay(attempts, 0.0, SCHEDULE, LIFETIME, retry_after=retry_after,
                      jitter=no_jitter) == expected


# -- next_delay: greylisting -----------------------------------------------------------------

@pytest.mark.parametrize("attempts, age, retry_after, greylisted_before, expected", [
    (1, 1.0, 180.0, False, 180.0),         # first greylisting: the delay it asks for
    (1, 1.0, 300.0, False, 300.0),         # none named: classify's default, 300 s
    (3, 1000.0, 180.0, False, 180.0),      # greylisted for the first time on a later attempt
    (1, 1.0, 20.0, False, 20.0),           # shorter than the schedule: still what it asked
    (2, 181.0, 180.0, True, 300.0),        # greylisted again: back to the schedule (schedule[1])
    (1, 1.0, 180.0, True, 60.0),           # ... even when the schedule is shorter than it asks
    (1, 1.0, 3600.0, True, 60.0),
])
def test_next_delay_waits_once_for_greylisting(attempts, age, retry_after, greylisted_before,
                                               expected):
    """The first greylisting reply gets its own delay (RFC 6647: the retry must come after the
    greylisting period); later failures follow the normal schedule."""
    assert next_delay(attempts, age, SCHEDULE, LIFETIME, greylisted=True, retry_after=retry_after,
                      greylisted_before=greylisted_before, jitter=no_jitter) == expected


def test_greylisting_without_a_delay_follows_the_schedule():
    """classify always gives a greylisting reply a delay; without one, the schedule applies."""
    assert next_delay(1, 0.0, SCHEDULE, LIFETIME, greylisted=True, jitter=no_jitter) == 60.0


def test_greylisting_retry_is_never_earlier_than_asked():
    """Negative jitter lengthens a greylisting retry instead of shortening it."""
    assert next_delay(1, 0.0, SCHEDULE, LIFETIME, greylisted=True, retry_after=180.0,
                      jitter=lambda: -0.1) == pytest.approx(198.0)
    assert next_delay(1, 0.0, SCHEDULE, LIFETIME, greylisted=True, retry_after=180.0,
                      jitter=lambda: 0.1) == pytest.approx(198.0)


def test_scheduled_delay_is_jittered_both_ways():
    """Scheduled delays get +/- jitter so a burst of deferrals does not retry in step."""
    assert next_delay(2, 0.0, SCHEDULE, LIFETIME, jitter=lambda: -0.1) == pytest.approx(270.0)
    assert next_delay(2, 0.0, SCHEDULE, LIFETIME, jitter=lambda: 0.1) == pytest.approx(330.0)


def test_default_jitter_stays_within_ten_percent():
    """default_jitter is uniform in [-0.1, 0.1]."""
    values = [retry.default_jitter() for _ in range(2000)]
    assert all(-0.1 <= v <= 0.1 for v in values)
    assert min(values) < -0.05 and max(values) > 0.05


# -- next_delay: the lifetime ----------------------------------------------------------------

@pytest.mark.parametrize("attempts, age, greylisted, retry_after, expected", [
    (5, LIFETIME - 100.0, False, None, 100.0),     # the next try would be past the end: one last try AT it
    (5, LIFETIME - 3600.0, False, None, 3600.0),   # exactly at the end: same
    (1, LIFETIME - 10.0, True, 180.0, 10.0),       # greylisting delays are clamped too
    (1, LIFETIME - 100.0, False, 3600.0, 100.0),   # and so are asked-for waits
    (6, LIFETIME, False, None, Expired()),         # the lifetime is over
    (6, LIFETIME + 30.0, False, None, Expired()),
    (1, LIFETIME + 1.0, True, 180.0, Expired()),
    (1, LIFETIME + 1.0, False, 3600.0, Expired()),
])
def test_next_delay_ends_with_one_attempt_at_the_end_of_the_lifetime(attempts, age, greylisted,
                                                                     retry_after, expected):
    """No attempt is scheduled after max_lifetime; the last one happens at it, and a failure
    after that is Expired (Postfix maximal_queue_lifetime; RFC 5321 4.5.4.1 "give-up time")."""
    assert next_delay(attempts, age, SCHEDULE, LIFETIME, greylisted=greylisted,
                      retry_after=retry_after, jitter=no_jitter) == expected


def test_expired_is_not_a_delay():
    """Expired is a value of its own, not a number a caller could sleep on."""
    assert not isinstance(next_delay(1, LIFETIME, SCHEDULE, LIFETIME), (int, float))


@pytest.mark.parametrize("attempts, schedule", [(0, SCHEDULE), (-1, SCHEDULE), (1, ())])
def test_next_delay_refuses_impossible_arguments(attempts, schedule):
    """attempts counts the one that just failed, so it is >= 1; the schedule is never empty."""
    with pytest.raises(ValueError):
        next_delay(attempts, 0.0, schedule, LIFETIME)


# -- startup_delay -----------------------------------------------------------------------------

@pytest.mark.parametrize("fraction, expected", [(0.0, 0.0), (0.5, 15.0), (1.0, 30.0), (2.0, 30.0),
                                                (-1.0, 0.0)])
def test_startup_delay_spreads_first_retries_over_30_seconds(fraction, expected):
    """After a restart, due recipients are spread over 0..30 s instead of all at once."""
    assert startup_delay(lambda: fraction) == expected


def test_startup_delay_default_is_within_the_spread():
    assert all(0.0 <= startup_delay() <= 30.0 for _ in range(500))


# -- properties --------------------------------------------------------------------------------

schedules = st.lists(st.floats(0.0, 30 * DAY, allow_nan=False), min_size=1, max_size=10)
lifetimes = st.floats(1.0, 30 * DAY, allow_nan=False)
ages = st.floats(0.0, 40 * DAY, allow_nan=False)
jitters = st.floats(-0.1, 0.1, allow_nan=False)
asked = st.one_of(st.none(), st.floats(0.0, 40 * DAY, allow_nan=False))


@given(st.integers(1, 1000), ages, schedules, lifetimes, st.booleans(), asked, st.booleans(),
       jitters)
def test_next_delay_is_never_negative_nor_past_the_lifetime(
        attempts, age, schedule, lifetime, greylisted, retry_after, greylisted_before, j):
    """Whatever the inputs, the answer is Expired (only once the lifetime is over) or a delay
    >= 0 whose attempt falls no later than max_lifetime."""
    d = next_delay(attempts, age, schedule, lifetime, greylisted=greylisted,
                   retry_after=retry_after, greylisted_before=greylisted_before,
                   jitter=lambda: j)
    if isinstance(d, Expired):
        assert age >= lifetime
    else:
        assert age < lifetime
        assert d >= 0.0
        assert age + d <= lifetime * (1 + 1e-12)


@given(st.integers(1, 50), ages, st.lists(st.floats(0.0, 30 * DAY, allow_nan=False),
                                          min_size=1, max_size=10).map(sorted),
       lifetimes, asked)
def test_next_delay_is_monotone_in_attempts_for_non_greylisting_replies(
        attempts, age, schedule, lifetime, retry_after):
    """With an ascending schedule, one more failed attempt never shortens the wait."""
    a = next_delay(attempts, age, schedule, lifetime, retry_after=retry_after, jitter=no_jitter)
    b = next_delay(attempts + 1, age, schedule, lifetime, retry_after=retry_after,
                   jitter=no_jitter)
    if isinstance(a, Expired):
        assert isinstance(b, Expired)
    else:
        assert not isinstance(b, Expired) and b >= a
