"""Webhook retry schedule, Retry-After, and the collapsing of deferral events."""

from __future__ import annotations

import email.utils

import pytest
from hypothesis import given, strategies as st

from txmta.message import OutboxRecord
from txmta.webhooks.schedule import (GIVE_UP_AFTER, Collapser, next_retry,
                                     retry_after_seconds)

NOW = 1765000000.0


@pytest.mark.parametrize("attempts, wait", [
    (1, 5), (2, 30), (3, 120), (4, 300), (5, 900), (6, 1800), (7, 3600), (8, 7200),
    (9, 14400), (10, 28800), (11, 28800), (17, 28800), (18, None), (100, None),
])
def test_schedule(attempts: int, wait: float | None) -> None:
    assert next_retry(attempts, None) == wait


def test_the_schedule_lasts_about_three_days() -> None:
    total, attempts = 0.0, 1
    while (wait := next_retry(attempts, None)) is not None:
        total += wait
        attempts += 1
    assert attempts == 18
    assert 71 * 3600 < total <= GIVE_UP_AFTER


@pytest.mark.parametrize("attempts, retry_after, wait", [
    (1, 120.0, 120),          # longer than the step: honoured
    (3, 10.0, 120),           # shorter: the step stands
    (1, 0.0, 5),
    (1, 7 * 86400.0, 86400),  # capped at a day
    (1, float("nan"), 5),
    (17, 1.0, 28800),
    (18, 60.0, None),         # the schedule is over: a Retry-After does not extend it
])
def test_retry_after_is_honoured_within_bounds(attempts, retry_after, wait) -> None:
    assert next_retry(attempts, retry_after) == wait


def test_age_gives_up_after_three_days() -> None:
    assert next_retry(3, None, age=3600) == 120
    assert next_retry(3, None, age=GIVE_UP_AFTER - 100) is None
    assert next_retry(3, 86400.0, age=2.5 * 86400) is None


@given(attempts=st.integers(-5, 200), ra=st.one_of(st.none(), st.floats(allow_nan=False)))
def test_a_wait_is_never_shorter_than_the_step_nor_longer_than_a_day(attempts, ra) -> None:
    wait = next_retry(attempts, ra)
    plain = next_retry(attempts, None)
    assert (wait is None) == (plain is None)
    if wait is not None:
        assert plain is not None and plain <= wait <= max(plain, 86400)


@pytest.mark.parametrize("header, seconds", [
    ("120", 120.0), (" 0 ", 0.0), ("", None), (None, None), ("-5", None), ("1.5", None),
    ("soon", None), ("\u0661\u0662", None),
])
def test_retry_after_seconds(header, seconds) -> None:
    assert retry_after_seconds(header, NOW) == seconds


def test_retry_after_dates_in_every_form() -> None:
    later = NOW + 600
    fixdate = email.utils.formatdate(later, usegmt=True)
    assert retry_after_seconds(fixdate, NOW) == 600
    assert retry_after_seconds("Saturday, 06-Dec-25 05:56:40 GMT", NOW) == 600
    assert retry_after_seconds("Sat Dec  6 05:56:40 2025", NOW) == 600
    assert retry_after_seconds(email.utils.formatdate(NOW - 600, usegmt=True), NOW) == 0


@given(delay=st.integers(0, 10**7))
def test_retry_after_date_round_trip(delay: int) -> None:
    assert retry_after_seconds(email.utils.formatdate(NOW + delay, usegmt=True), NOW) == delay
    assert retry_after_seconds(str(delay), NOW) == delay


# -- Collapser --------------------------------------------------------------------------------

def _rec(kind: str, t: float, message_id: str = "Q1", index: int = 0) -> OutboxRecord:
    return OutboxRecord(kind, t, message_id, index, "r@example.org")


def test_one_deferral_per_recipient_per_hour() -> None:
    c = Collapser()
    assert c.should_send(_rec("deferred", 0))
    assert not c.should_send(_rec("deferred", 60))
    assert not c.should_send(_rec("deferred", 3599))
    assert c.should_send(_rec("deferred", 3600))
    assert not c.should_send(_rec("deferred", 3700))


def test_recipients_are_collapsed_apart() -> None:
    c = Collapser()
    assert c.should_send(_rec("deferred", 0, "Q1", 0))
    assert c.should_send(_rec("deferred", 1, "Q1", 1))
    assert c.should_send(_rec("deferred", 2, "Q2", 0))
    assert not c.should_send(_rec("deferred", 3, "Q1", 1))


@pytest.mark.parametrize("kind", ["received", "delivered", "bounced", "expired", "suppressed",
                                  "deleted"])
def test_other_kinds_always_pass(kind: str) -> None:
    c = Collapser()
    c.should_send(_rec("deferred", 0))
    assert c.should_send(_rec(kind, 1)) and c.should_send(_rec(kind, 2))


def test_memory_forgets_after_the_window() -> None:
    c = Collapser()
    for i in range(1000):
        c.should_send(_rec("deferred", i, f"Q{i}"))
    assert len(c) == 1000
    c.should_send(_rec("deferred", 5000, "Qlast"))
    assert len(c) == 1
    assert c._order and len(c._order) == 1


def test_a_terminal_event_forgets_its_recipient() -> None:
    c = Collapser()
    c.should_send(_rec("deferred", 0))
    c.should_send(_rec("delivered", 1))
    assert len(c) == 0


def test_memory_is_capped() -> None:
    c = Collapser(max_entries=10)
    for i in range(100):
        assert c.should_send(_rec("deferred", i, f"Q{i}"))
    assert len(c) <= 10 and len(c._order) <= 10
    assert not c.should_send(_rec("deferred", 100, "Q99"))    # the newest are kept


@given(st.lists(st.tuples(st.sampled_from(["deferred", "delivered"]), st.integers(0, 3),
                          st.floats(0, 20000, allow_nan=False)), max_size=60))
def test_never_two_deferrals_of_a_recipient_within_an_hour(events) -> None:
    c = Collapser(max_entries=1000)
    sent: dict[int, list[float]] = {}
    for kind, rcpt, t in sorted(events, key=lambda e: e[2]):
        ok = c.should_send(_rec(kind, t, "Q", rcpt))
        if kind != "deferred":
            assert ok
            sent.pop(rcpt, None)
        elif ok:
            assert all(t - s >= 3600 for s in sent.get(rcpt, []))
            sent.setdefault(rcpt, []).append(t)
        else:
            assert any(t - s < 3600 for s in sent.get(rcpt, []))
