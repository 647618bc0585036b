"""retry: the delay before the next attempt at a deferred recipient, greylisting-aware,
bounded by the recipient's lifetime.  Pure functions, so tables and hypothesis; every table
passes `jitter=lambda: 0.0` (STYLE habit 5)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txmta import retry
from txmta.reply import Reply
from txmta.retry import Expired, greylisting_delay, next_delay, startup_delay

SCHEDULE = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)   # the default [retry] schedule
DAY = 86400.0
LIFETIME = 5 * DAY


def no_jitter() -> float:
    return 0.0


# -- greylisting_delay ---------------------------------------------------------------------

@pytest.mark.parametrize("reply, expected", [
    # The codes greylisters use, without a delay in the text: the 300 s default (RFC 6647;
    # postgrey's --delay default).
    (Reply(450, "4.2.0", "<bob@example.com>: Recipient address rejected: Greylisted, see "
                         "http://postgrey.schweikert.ch/help/example.com.html"), 300.0),  # postgrey
    (Reply(451, "4.7.1", "Greylisting in action, please come back later"), 300.0),  # sqlgrey, greylistd
    (Reply(450, "4.7.1", "Service unavailable"), 300.0),      # 4.7.1 with 450: code + enhanced suffice
    (Reply(451, "4.2.0", "Mailbox busy"), 300.0),
    # Any other 4xx whose text says so (RFC 3463 codes vary between greylisters).
    (Reply(452, "4.3.0", "Graylisted: try again later"), 300.0),
    (Reply(450, "4.2.1", "Recipient temporarily deferred"), 300.0),
    (Reply(451, "", "GREYLISTED"), 300.0),
    (Reply(451, "", "4.7.1 Please retry later"), 300.0),     # enhanced code left in the text
    # The delay the text names.
    (Reply(451, "4.7.1", "Greylisted, please retry in 300 seconds"), 300.0),
    (Reply(451, "4.7.1", "Greylisted, try again in 5 minutes"), 300.0),
    (Reply(450, "4.2.0", "Greylisted, retry after 60s"), 60.0),
    (Reply(450, "4.2.0", "Greylisted for 120 seconds"), 120.0),      # postgrey --greylist-text
    (Reply(451, "4.7.1", "please retry in 2 min"), 120.0),
    (Reply(451, "4.7.1", "please retry in 1 hour"), 3600.0),
    (Reply(451, "4.7.1", "please retry in 90"), 90.0),               # no unit: seconds
    (Reply(451, "4.3.0", "Temporarily deferred, please retry in 10 MINUTES"), 600.0),
])
def test_greylisting_delay_reads_the_named_delay_or_defaults_to_300s(reply, expected):
    """A greylisting reply yields the delay its text names, else 300 s."""
    assert greylisting_delay(reply) == expected


@pytest.mark.parametrize("reply", [
    Reply(421, "4.7.0", "Try again later, closing connection"),  # RFC 5321 3.8: a closing server
    Reply(421, "4.7.1", "Greylisted"),
    Reply(450, "4.2.1", "Mailbox busy"),                 # another 4.2.x: a plain deferral
    Reply(451, "4.3.0", "Local error in processing"),    # RFC 5321 4.2.2 451
    Reply(452, "4.2.2", "Mailbox full"),
    Reply(454, "4.7.0", "TLS not available due to temporary reason"),
    Reply(550, "5.7.1", "Greylisted forever"),           # not a 4xx: permanent, not greylisting
    Reply(250, "2.0.0", "Ok"),
])
def test_greylisting_delay_is_none_for_other_replies(reply):
    """Only a 4xx other than 421 can be greylisting."""
    assert greylisting_delay(reply) is None


# -- next_delay: the schedule ----------------------------------------------------------------

@pytest.mark.parametrize("attempts, age, reply, expected", [
    (1, 0.0, None, 60.0),                               # no reply (connection failed): schedule
    (1, 5.0, Reply(451, "4.3.0", "Local error"), 60.0),
    (2, 65.0, Reply(451, "4.3.0", "Local error"), 300.0),
    (3, 400.0, Reply(452, "4.2.2", "Mailbox full"), 900.0),
    (7, 30000.0, None, 14400.0),
    (8, 45000.0, None, 14400.0),                        # the last delay repeats
    (100, 2 * DAY, None, 14400.0),
    (1, 0.0, Reply(421, "4.7.0", "Try again later"), 60.0),   # 421 never counts as greylisting
])
def test_next_delay_follows_the_schedule_and_repeats_its_last_delay(attempts, age, reply, expected):
    """Non-greylisting failures wait schedule[attempts-1]; past its end, the last delay
    (RFC 5321 4.5.4.1: retry with a sender-chosen strategy; Postfix maximal_backoff_time)."""
    assert next_delay(attempts, age, reply, SCHEDULE, LIFETIME, jitter=no_jitter) == expected


# -- next_delay: greylisting -----------------------------------------------------------------

GREY = Reply(451, "4.7.1", "Greylisted, please retry in 180 seconds")


@pytest.mark.parametrize("attempts, age, reply, greylisted_before, expected", [
    (1, 1.0, GREY, False, 180.0),          # first greylisting: the delay it asks for
    (1, 1.0, Reply(450, "4.2.0", "Greylisted"), False, 300.0),   # none named: 300 s
    (3, 1000.0, GREY, False, 180.0),       # greylisted for the first time on a later attempt
    (2, 181.0, GREY, True, 300.0),         # greylisted again: back to the schedule (schedule[1])
    (1, 1.0, GREY, True, 60.0),
])
def test_next_delay_waits_once_for_greylisting(attempts, age, reply, greylisted_before, expected):
    """The first greylisting reply gets its own delay (RFC 6647: the retry must come after the
    greylisting period); later failures follow the normal schedule."""
    assert next_delay(attempts, age, reply, SCHEDULE, LIFETIME,
                      greylisted_before=greylisted_before, jitter=no_jitter) == expected


def test_greylisting_retry_is_never_earlier_than_asked():
    """Negative jitter lengthens a greylisting retry instead of shortening it."""
    assert next_delay(1, 0.0, GREY, SCHEDULE, LIFETIME, jitter=lambda: -0.1) == pytest.approx(198.0)
    assert next_delay(1, 0.0, GREY, SCHEDULE, LIFETIME, jitter=lambda: 0.1) == pytest.approx(198.0)


def test_scheduled_delay_is_jittered_both_ways():
    """Scheduled delays get +/- jitter so a burst of deferrals does not retry in step."""
    assert next_delay(2, 0.0, None, SCHEDULE, LIFETIME, jitter=lambda: -0.1) == pytest.approx(270.0)
    assert next_delay(2, 0.0, None, SCHEDULE, LIFETIME, jitter=lambda: 0.1) == pytest.approx(330.0)


def test_default_jitter_stays_within_ten_percent():
    """default_jitter is uniform in [-0.1, 0.1]."""
    values = [retry.default_jitter() for _ in range(2000)]
    assert all(-0.1 <= v <= 0.1 for v in values)
    assert min(values) < -0.05 and max(values) > 0.05


# -- next_delay: the lifetime ----------------------------------------------------------------

@pytest.mark.parametrize("attempts, age, reply, expected", [
    (5, LIFETIME - 100.0, None, 100.0),       # the next try would be past the end: one last try AT it
    (5, LIFETIME - 3600.0, None, 3600.0),     # exactly at the end: same
    (1, LIFETIME - 10.0, GREY, 10.0),         # greylisting delays are clamped too
    (6, LIFETIME, None, Expired()),           # the lifetime is over
    (6, LIFETIME + 30.0, None, Expired()),
    (1, LIFETIME + 1.0, GREY, Expired()),
])
def test_next_delay_ends_with_one_attempt_at_the_end_of_the_lifetime(attempts, age, reply, expected):
    """No attempt is scheduled after max_lifetime; the last one happens at it, and a failure
    after that is Expired (Postfix maximal_queue_lifetime; RFC 5321 4.5.4.1 "give-up time")."""
    assert next_delay(attempts, age, reply, SCHEDULE, LIFETIME, jitter=no_jitter) == expected


def test_expired_is_not_a_delay():
    """Expired is a value of its own, not a number a caller could sleep on."""
    assert not isinstance(next_delay(1, LIFETIME, None, SCHEDULE, LIFETIME), (int, float))


@pytest.mark.parametrize("attempts, schedule", [(0, SCHEDULE), (-1, SCHEDULE), (1, ())])
def test_next_delay_refuses_impossible_arguments(attempts, schedule):
    """attempts counts the one that just failed, so it is >= 1; the schedule is never empty."""
    with pytest.raises(ValueError):
        next_delay(attempts, 0.0, None, schedule, LIFETIME)


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
codes = st.integers(200, 599)
texts = st.sampled_from(["", "Greylisted", "please retry in 300 seconds", "try again in 5 minutes",
                         "retry after 60s", "Local error", "Mailbox full", "try again later"])
enhanced = st.sampled_from(["", "4.2.0", "4.7.1", "4.3.0", "5.1.1", "2.0.0"])
replies = st.one_of(st.none(), st.builds(Reply, codes, enhanced, texts))


@given(st.integers(1, 1000), ages, replies, schedules, lifetimes, st.booleans(), jitters)
def test_next_delay_is_never_negative_nor_past_the_lifetime(
        attempts, age, reply, schedule, lifetime, greylisted_before, j):
    """Whatever the inputs, the answer is Expired (only once the lifetime is over) or a delay
    >= 0 whose attempt falls no later than max_lifetime."""
    d = next_delay(attempts, age, reply, schedule, lifetime, greylisted_before, jitter=lambda: j)
    if isinstance(d, Expired):
        assert age >= lifetime
    else:
        assert age < lifetime
        assert d >= 0.0
        assert age + d <= lifetime * (1 + 1e-12)


@given(st.integers(1, 50), ages, st.lists(st.floats(0.0, 30 * DAY, allow_nan=False),
                                          min_size=1, max_size=10).map(sorted),
       lifetimes, st.one_of(st.none(), st.builds(Reply, st.integers(400, 599),
                                                 st.just("4.3.0"), st.just("Local error"))))
def test_next_delay_is_monotone_in_attempts_for_non_greylisting_replies(
        attempts, age, schedule, lifetime, reply):
    """With an ascending schedule, one more failed attempt never shortens the wait."""
    a = next_delay(attempts, age, reply, schedule, lifetime, jitter=no_jitter)
    b = next_delay(attempts + 1, age, reply, schedule, lifetime, jitter=no_jitter)
    if isinstance(a, Expired):
        assert isinstance(b, Expired)
    else:
        assert not isinstance(b, Expired) and b >= a


@given(st.builds(Reply, codes, enhanced, st.text(max_size=80)))
def test_greylisting_delay_is_total_and_non_negative(reply):
    """Any reply text yields None or a delay >= 0; never an exception."""
    d = greylisting_delay(reply)
    assert d is None or d >= 0.0
    if d is not None:
        assert reply.transient and reply.code != 421
