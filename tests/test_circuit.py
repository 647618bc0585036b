"""outbound/circuit.py: a relayhost's circuit breaker, driven by task.Clock (STYLE habit 1).
Closed -> open after `failures` faults within the window -> half-open after the cool-down,
one trial -> closed on a success, open again with a doubled (capped) cool-down on a fault.
Then hypothesis: any sequence of events keeps the breaker's promises."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from txmta.outbound.circuit import CLOSED, HALF_OPEN, OPEN, STATES, Circuit


def circuit(clock: Clock, **kw: Any) -> Circuit:
    kw.setdefault("failures", 3)
    kw.setdefault("window", 60.0)
    kw.setdefault("cooldown", 10.0)
    kw.setdefault("max_cooldown", 35.0)
    return Circuit(clock, **kw)


def fail(c: Circuit, n: int) -> list[bool]:
    return [c.failed() for _ in range(n)]


def test_a_new_circuit_is_closed_and_lets_every_attempt_through() -> None:
    """Closed: every attempt may use the relay."""
    c = circuit(Clock())
    assert c.state == CLOSED and all(c.allow() for _ in range(5))
    assert c.snapshot() == {"state": CLOSED, "failures": 0, "open_until": None,
                            "cooldown": 10.0, "opened": 0}


def test_failures_within_the_window_open_the_circuit_for_the_cooldown() -> None:
    """The third fault within the window opens it until now + cool-down; no attempt then."""
    clock = Clock()
    clock.advance(1000)
    c = circuit(clock)
    assert fail(c, 3) == [False, False, True]
    assert c.state == OPEN and not c.allow()
    assert c.open_until == 1010.0 and c.retry_in() == 10.0 and c.opened == 1
    clock.advance(9.9)
    assert c.state == OPEN and not c.allow()


def test_faults_older_than_the_window_do_not_count() -> None:
    """Two faults, then a minute's quiet: the next fault is the first of a new count."""
    clock = Clock()
    c = circuit(clock)
    fail(c, 2)
    clock.advance(60.5)
    assert c.failures == 0
    assert fail(c, 2) == [False, False] and c.state == CLOSED
    assert c.failed() and c.state == OPEN


def test_a_success_clears_the_count() -> None:
    """Faults count only since the last success: a relay that mostly works stays closed."""
    c = circuit(Clock())
    for _ in range(5):
        fail(c, 2)
        c.succeeded()
    assert c.state == CLOSED and c.failures == 0


def test_after_the_cooldown_one_trial_goes_through() -> None:
    """Half-open: the first attempt is the trial; others wait for its result."""
    clock = Clock()
    c = circuit(clock)
    fail(c, 3)
    clock.advance(10)
    assert c.state == HALF_OPEN
    assert c.allow() and not c.allow() and not c.allow()


def test_a_successful_trial_closes_the_circuit_and_resets_the_cooldown() -> None:
    clock = Clock()
    c = circuit(clock)
    fail(c, 3)
    clock.advance(10)
    assert c.allow()
    c.failed()                     # the trial fails: 20 s now
    clock.advance(20)
    assert c.allow()
    c.succeeded()
    assert c.state == CLOSED and c.allow() and c.allow()
    assert c.cooldown == 10.0 and c.open_until is None and c.failures == 0
    assert fail(c, 3)[-1] and c.open_until == clock.seconds() + 10.0


def test_a_failed_trial_reopens_with_a_doubled_capped_cooldown() -> None:
    """10 s, then 20, then 35 (the cap), then 35 again."""
    clock = Clock()
    c = circuit(clock)
    fail(c, 3)
    waits = []
    for _ in range(4):
        waits.append(c.retry_in())
        clock.advance(c.retry_in())
        assert c.allow()
        assert c.failed()
    waits.append(c.retry_in())
    assert waits == [10.0, 20.0, 35.0, 35.0, 35.0]
    assert c.opened == 5


def test_a_released_trial_lets_the_next_attempt_try() -> None:
    """A trial that said nothing about the relay (e.g. shutting down) frees the slot."""
    clock = Clock()
    c = circuit(clock)
    fail(c, 3)
    clock.advance(10)
    assert c.allow() and not c.allow()
    c.released()
    assert c.allow()


def test_results_of_older_attempts_while_open_change_nothing() -> None:
    """Attempts in flight when the circuit opened: their faults do not lengthen the
    cool-down, their successes do not close it."""
    clock = Clock()
    c = circuit(clock)
    fail(c, 3)
    until = c.open_until
    clock.advance(5)
    assert c.failed() is False
    c.succeeded()
    assert c.state == OPEN and c.open_until == until and c.opened == 1


def test_every_change_of_state_is_told() -> None:
    """on_change hears open, half-open (when found), closed."""
    clock = Clock()
    seen: list[str] = []
    c = circuit(clock, on_change=lambda circ: seen.append(circ.state))
    fail(c, 3)
    clock.advance(10)
    assert c.allow()
    c.succeeded()
    assert seen == [OPEN, HALF_OPEN, CLOSED]


def test_retry_now_ends_the_cooldown() -> None:
    """An admin's flush: an open circuit is half-open at once, and its trial decides."""
    clock = Clock()
    c = circuit(clock)
    fail(c, 3)
    c.retry_now()
    assert c.state == HALF_OPEN and c.open_until == 0.0
    assert c.allow() and not c.allow()
    c.failed()
    assert c.state == OPEN and c.retry_in() == 20.0
    c.retry_now()
    c.allow()
    c.succeeded()
    assert c.state == CLOSED
    c.retry_now()                 # closed: nothing to do
    assert c.state == CLOSED and c.open_until is None


def test_one_failure_may_be_enough() -> None:
    """failures = 1: the first fault opens it."""
    c = circuit(Clock(), failures=1)
    assert c.failed() and c.state == OPEN


EVENTS = st.lists(st.one_of(
    st.tuples(st.just("advance"), st.floats(min_value=0, max_value=50)),
    st.tuples(st.sampled_from(["allow", "ok", "fault", "release", "retry-now"]), st.just(0.0))),
    max_size=60)


@given(EVENTS, st.integers(min_value=1, max_value=4))
def test_any_sequence_keeps_the_promises(events: list[tuple[str, float]], failures: int) -> None:
    """Whatever happens: a known state; open lets nothing through; half-open lets one trial
    through until a result; closed has no open_until; the cool-down stays between the first
    one and the cap."""
    clock = Clock()
    c = circuit(clock, failures=failures)
    trial_out = False
    for kind, value in events:
        if kind == "advance":
            clock.advance(value)
        elif kind == "allow":
            state = c.state
            allowed = c.allow()
            if state == OPEN:
                assert not allowed
            elif state == CLOSED:
                assert allowed
            else:
                assert allowed == (not trial_out)
                trial_out = trial_out or allowed
        elif kind == "ok":
            c.succeeded()
            trial_out = False
        elif kind == "fault":
            c.failed()
            trial_out = False
        elif kind == "retry-now":
            trial_out = trial_out and c.state == HALF_OPEN
            c.retry_now()
        else:
            c.released()
            trial_out = False
        assert c.state in STATES
        assert (c.open_until is None) == (c.state == CLOSED)
        assert 10.0 <= c.cooldown <= 35.0
        assert c.failures < failures or c.state != CLOSED
        if c.state == OPEN:
            assert 0 < c.retry_in() <= c.cooldown + 1e-9
