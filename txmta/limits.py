"""Rate limits and connection counts that may be shared by several nodes.

Two interfaces, each with a local implementation here (one node; pure arithmetic, the
caller passes the time); txmta/cluster/ implements them over Valkey/Redis so that every node
of a cluster draws from one budget:

* `RateLimiter.acquire(key, rate, burst, now)`: take one unit of `key`'s budget (`rate`
  units per second, up to `burst` at once) and fire with the seconds to wait before it may
  be used (0.0: at once).  The unit is taken either way: a caller that is told to wait
  `w` seconds waits and then goes, without asking again (GCRA, the generic cell rate
  algorithm: one number per key, the theoretical arrival time).
* `ConnectionLeases.acquire(key, limit)`: whether one more connection of `key` may open
  (at most `limit` at once); `release(key)` gives it back.  The shared implementation gives
  each lease an expiry, so that a node that dies gives its connections back by timeout.

`Gcra` is the arithmetic, shared by both implementations of the rate limiter (the Redis one
runs the same steps in a Lua script).
"""
# test: tests/test_rate_limits.py

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred, succeed


@dataclass
class Gcra:
    """One key's state: `tat`, the theoretical arrival time of the next unit."""
    tat: float = 0.0

    def take(self, now: float, rate: float, burst: int = 1) -> float:
        """Take one unit at `now`; the seconds to wait before using it (0.0: at once)."""
        if rate <= 0:
            return 0.0
        interval = 1.0 / rate
        tolerance = interval * max(0, burst - 1)
        tat = max(self.tat, now)
        wait = max(0.0, tat - tolerance - now)
        self.tat = tat + interval
        return wait


def take(tat: float, now: float, rate: float, burst: int = 1) -> tuple[float, float]:
    """The GCRA step as a function: (new tat, seconds to wait)."""
    g = Gcra(tat)
    wait = g.take(now, rate, burst)
    return g.tat, wait


class RateLimiter(Protocol):
    def acquire(self, key: str, rate: float, burst: int, now: float) -> "Deferred[float]": ...


class ConnectionLeases(Protocol):
    def acquire(self, key: str, limit: int) -> "Deferred[bool]": ...

    def release(self, key: str) -> None: ...


class LocalRateLimiter:
    """This node's budgets only."""

    def __init__(self) -> None:
        self._keys: dict[str, Gcra] = {}

    def wait(self, key: str, rate: float, burst: int, now: float) -> float:
        """`acquire` without the Deferred (for callers on this node)."""
        g = self._keys.get(key)
        if g is None:
            g = self._keys[key] = Gcra()
        return g.take(now, rate, burst)

    def acquire(self, key: str, rate: float, burst: int, now: float) -> Deferred[float]:
        return succeed(self.wait(key, rate, burst, now))


class LocalConnectionLeases:
    """This node's connection counts only."""

    def __init__(self) -> None:
        self.held: dict[str, int] = {}

    def acquire(self, key: str, limit: int) -> Deferred[bool]:
        n = self.held.get(key, 0)
        if limit > 0 and n >= limit:
            return succeed(False)
        self.held[key] = n + 1
        return succeed(True)

    def release(self, key: str) -> None:
        n = self.held.get(key, 0) - 1
        if n > 0:
            self.held[key] = n
        else:
            self.held.pop(key, None)
