"""A circuit breaker for one relayhost: whether mail may go to it now.

A circuit is **closed** while the relay works: every attempt may use it.  A relay fault
(`outcome.relay_fault`: it could not be reached, failed before the mail transaction, closed
with 421, or answered with its own trouble) is counted; `failures` of them within `window`
seconds, with no success in between, **open** the circuit for a cool-down: no attempt uses
the relay then.  When the cool-down is over the circuit is **half-open**: one attempt (the
trial) may use the relay; a success closes the circuit, a fault opens it again with twice the
cool-down, up to `max_cooldown`; the cool-down goes back to `cooldown` once it closes.  An
allowed attempt that said nothing about the relay (`released`) frees the trial.

The results of attempts that began before the circuit opened are ignored while it is open
(they tell nothing new); in half-open, any result decides (a slow attempt started while the
circuit was closed may be the one that ends the cool-down's trial).

Pure state: no I/O.  The time comes from the injected clock (DESIGN invariant 9); tests
drive it with `twisted.internet.task.Clock`.  It decides nothing about replies
(`outcome.relay_fault` does) and routes nothing (relays.py does).
"""
# test: tests/test_circuit.py

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"
STATES = (CLOSED, HALF_OPEN, OPEN)


class Circuit:
    """One relay's circuit; see the module docstring.  `on_change(circuit)` is called after
    every change of state (also when an open circuit is found half-open)."""

    def __init__(self, clock: IReactorTime, *, failures: int = 5, window: float = 60.0,
                 cooldown: float = 60.0, max_cooldown: float = 600.0,
                 on_change: Callable[["Circuit"], Any] | None = None) -> None:
        if failures < 1:
            raise ValueError("failures must be at least 1")
        self.clock = clock
        self.threshold = failures
        self.window = window
        self.base_cooldown = cooldown
        self.max_cooldown = max(cooldown, max_cooldown)
        self.on_change = on_change
        self.cooldown = cooldown              # the cool-down of the next opening
        self.open_until: float | None = None  # while open or half-open: when the cool-down ends
        self.opened = 0                       # times the circuit opened
        self._state = CLOSED
        self._faults: deque[float] = deque()  # times of the faults since the last success
        self._trial = False                   # half-open: the trial attempt is under way

    # -- reading ----------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """closed, open or half-open, now."""
        if self._state == OPEN and self.open_until is not None \
                and self.clock.seconds() >= self.open_until:
            self._set(HALF_OPEN)
        return self._state

    @property
    def failures(self) -> int:
        """Faults counted towards opening: since the last success, within the window."""
        self._prune()
        return len(self._faults)

    def retry_in(self) -> float:
        """Seconds until an open circuit lets a trial through; 0 when it is not open."""
        if self.state != OPEN or self.open_until is None:
            return 0.0
        return max(0.0, self.open_until - self.clock.seconds())

    def snapshot(self) -> dict[str, Any]:
        """The state for `txmta status`: state, failures, open_until (epoch seconds, or None
        when closed), cooldown (of the current or next opening), opened (times)."""
        state = self.state
        return {"state": state, "failures": self.failures,
                "open_until": self.open_until if state != CLOSED else None,
                "cooldown": self.cooldown, "opened": self.opened}

    # -- deciding ---------------------------------------------------------------------------

    def allow(self) -> bool:
        """May an attempt use the relay now?  In half-open, only one at a time (the trial)."""
        state = self.state
        if state == CLOSED:
            return True
        if state == HALF_OPEN and not self._trial:
            self._trial = True
            return True
        return False

    def succeeded(self) -> None:
        """The relay took the attempt (or answered about the mail, not about itself)."""
        state = self.state
        if state == HALF_OPEN:
            self.cooldown = self.base_cooldown
            self.open_until = None
            self._trial = False
            self._faults.clear()
            self._set(CLOSED)
        elif state == CLOSED:
            self._faults.clear()

    def failed(self) -> bool:
        """A relay fault; True when it opened the circuit."""
        state = self.state
        now = self.clock.seconds()
        if state == HALF_OPEN:
            self.cooldown = min(self.cooldown * 2, self.max_cooldown)
            self._open(now)
            return True
        if state == CLOSED:
            self._faults.append(now)
            self._prune()
            if len(self._faults) >= self.threshold:
                self._open(now)
                return True
        return False

    def retry_now(self) -> None:
        """An admin asked to try now: an open circuit ends its cool-down (half-open: the
        next attempt is the trial)."""
        if self.state == OPEN:
            self.open_until = self.clock.seconds()
            self._set(HALF_OPEN)

    def released(self) -> None:
        """An allowed attempt ended without a word on the relay: free the trial."""
        if self._state == HALF_OPEN:
            self._trial = False

    # -- inside -----------------------------------------------------------------------------

    def _open(self, now: float) -> None:
        self.open_until = now + self.cooldown
        self.opened += 1
        self._trial = False
        self._faults.clear()
        self._set(OPEN)

    def _prune(self) -> None:
        horizon = self.clock.seconds() - self.window
        while self._faults and self._faults[0] <= horizon:
            self._faults.popleft()

    def _set(self, state: str) -> None:
        self._state = state
        if self.on_change is not None:
            self.on_change(self)
