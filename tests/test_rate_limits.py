"""The local rate limiter (GCRA) and connection counts (txmta/limits.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from txmta.limits import Gcra, LocalConnectionLeases, LocalRateLimiter, take


def test_a_burst_goes_at_once_then_one_per_interval():
    g = Gcra()
    waits = [g.take(100.0, rate=2.0, burst=3) for _ in range(6)]
    assert waits == [0.0, 0.0, 0.0, 0.5, 1.0, 1.5]


def test_an_idle_key_refills_up_to_its_burst_only():
    g = Gcra()
    for _ in range(3):
        g.take(0.0, rate=1.0, burst=3)
    assert [g.take(1000.0, 1.0, 3) for _ in range(4)] == [0.0, 0.0, 0.0, 1.0]


@given(st.floats(0.1, 1000.0), st.integers(1, 50), st.lists(st.floats(0.0, 10.0), max_size=60))
def test_never_more_than_burst_plus_rate_times_span(rate, burst, gaps):
    """Whatever the arrival pattern, the units used (at now + wait) within any span from the
    first use respect the rate: at most burst + rate x span."""
    g, now, used = Gcra(), 0.0, []
    for gap in gaps:
        now += gap
        used.append(now + g.take(now, rate, burst))
    used.sort()
    for i, start in enumerate(used):
        for j in range(i, len(used)):
            span = used[j] - start
            assert j - i + 1 <= burst + rate * span + 1e-6


def test_the_function_form_matches():
    assert take(0.0, 10.0, 1.0, 1) == (11.0, 0.0)
    assert take(11.0, 10.0, 1.0, 1) == (12.0, 1.0)


def test_limiter_keys_are_separate_and_leases_count():
    limiter = LocalRateLimiter()
    assert limiter.wait("a", 1.0, 1, 0.0) == 0.0
    assert limiter.wait("a", 1.0, 1, 0.0) == 1.0
    assert limiter.wait("b", 1.0, 1, 0.0) == 0.0
    got: list[float] = []
    limiter.acquire("b", 1.0, 1, 0.0).addCallback(got.append)
    assert got == [1.0]
    leases = LocalConnectionLeases()
    answers: list[bool] = []
    for _ in range(3):
        leases.acquire("google", 2).addCallback(answers.append)
    assert answers == [True, True, False]
    leases.release("google")
    leases.acquire("google", 2).addCallback(answers.append)
    assert answers[-1] is True and leases.held == {"google": 2}
