"""Per-provider traffic shaping: limits by mailbox provider, and backing off when told to.

A `Rule` (one `[[shaping]]` table) names a provider by the suffixes of its MX host names
(`.google.com`, `.outlook.com`, ...): every domain whose mail goes to those hosts shares the
rule's budget, however many domains that is.  Its limits: `connections` open at once to the
provider (from this node), `messages_per_connection`, `rate` (messages per second, drawn
from a `limits.RateLimiter`: this node's, or one shared by the nodes of a cluster), and
`recipients_per_message`.  0 means no limit of the rule's own (the destination's limits in
pool.py still hold).

Backoff (`Backoff`, pure: the caller passes the time): a reply that means "slow down"
(`outcome.Verdict.slow_down`: 421/451 with 4.7.0 or 4.7.28, rate-limit and too-many-
connections texts) halves the provider's factor (down to 1/16) and suspends new connections
for a cool-down, which doubles while slow-downs repeat (up to `max_cooldown`).  Once a
cool-down has passed without another slow-down, the factor doubles again after each further
quiet cool-down, step by step, until it is 1.  The factor scales the provider's connections
(at least one) and its rate; a provider with a rule but no connection limit or rate gets
them from what was open when it was told to slow down.

`Shaper` holds the rules and each provider's backoff, and answers the connection pool
(pool.py: how many connections, until when suspended, how many messages per connection),
the deliverer (recipients per transaction; a slow-down seen) and the rate waits.
"""
# test: tests/test_shaping.py

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from txmta.limits import LocalRateLimiter, RateLimiter

log = Logger()

MIN_FACTOR = 1.0 / 16


@dataclass(frozen=True)
class Rule:
    name: str
    mx: tuple[str, ...]                 # suffixes of MX host names, lower case
    connections: int = 0
    messages_per_connection: int = 0
    rate: float = 0.0                   # messages per second; 0 = none
    recipients_per_message: int = 0
    cooldown: float = 60.0              # the first suspension after a slow-down
    max_cooldown: float = 3600.0

    def matches(self, mx: str) -> int:
        """The length of the longest suffix of this rule that `mx` ends with (0: none)."""
        host = mx.lower().rstrip(".")
        best = 0
        for suffix in self.mx:
            bare = suffix.lstrip(".")
            if host == bare or host.endswith("." + bare):
                best = max(best, len(bare) + 1)
        return best


@dataclass
class Backoff:
    """One provider's response-driven backoff (see the module docstring)."""
    cooldown: float = 60.0
    max_cooldown: float = 3600.0
    factor: float = 1.0
    current: float = 0.0                # the cool-down in force (0: never slowed down)
    suspended_until: float = 0.0
    quiet_since: float = 0.0            # the last slow-down or recovery step
    slowdowns: int = 0

    def slow_down(self, now: float) -> None:
        if now < self.suspended_until:
            return      # the same burst: replies of connections opened before the suspension
        repeated = self.current and now < self.quiet_since + 2 * self.current
        self.current = min(self.max_cooldown, self.current * 2 if repeated else self.cooldown)
        self.factor = max(MIN_FACTOR, self.factor / 2)
        self.suspended_until = now + self.current
        self.quiet_since = now
        self.slowdowns += 1

    def at(self, now: float) -> float:
        """The factor at `now`, after the recovery steps due by then."""
        if self.factor < 1.0 and self.current:
            step = self.current
            while self.factor < 1.0 and now >= self.quiet_since + step + self.current:
                # one quiet cool-down after the suspension ended: a step back up
                self.quiet_since += step
                self.factor = min(1.0, self.factor * 2)
            if self.factor >= 1.0:
                self.current = 0.0
        return self.factor

    def suspended(self, now: float) -> bool:
        return now < self.suspended_until


@dataclass
class _Provider:
    rule: Rule
    backoff: Backoff
    open_at_slowdown: int = 0           # connections open when first told to slow down
    wake: Any = None                    # the pool's wake-up at the end of a suspension


class Shaper:
    """The `[[shaping]]` rules and each provider's state.  `clock` gives seconds;
    `limiter`: where rate budgets are drawn (a cluster's, or this node's); `metrics`: a
    txmta.metrics.Metrics (backoffs), or None."""

    def __init__(self, rules: Iterable[Rule], clock: Callable[[], float], *,
                 limiter: RateLimiter | None = None, metrics: Any = None) -> None:
        self.rules = tuple(rules)
        self.clock = clock
        self.limiter = limiter if limiter is not None else LocalRateLimiter()
        self.metrics = metrics
        self._providers: dict[str, _Provider] = {
            r.name: _Provider(r, Backoff(r.cooldown, r.max_cooldown)) for r in self.rules}
        self._by_mx: dict[str, Rule | None] = {}

    def rule_for(self, mx: str) -> Rule | None:
        """The rule whose MX suffix `mx` matches best, or None."""
        mx = mx.lower()
        if mx in self._by_mx:
            return self._by_mx[mx]
        best, found = 0, None
        for rule in self.rules:
            n = rule.matches(mx)
            if n > best:
                best, found = n, rule
        if len(self._by_mx) > 10_000:
            self._by_mx.clear()
        self._by_mx[mx] = found
        return found

    def provider(self, mx: str) -> str:
        """The provider's name for `mx` ("" without a rule)."""
        rule = self.rule_for(mx)
        return rule.name if rule is not None else ""

    def backoff(self, name: str) -> Backoff:
        return self._providers[name].backoff

    # -- for the pool -----------------------------------------------------------------------

    def connection_limit(self, name: str, open_now: int) -> int:
        """How many connections the provider `name` may have now (0: no limit of its own)."""
        p = self._providers[name]
        factor = p.backoff.at(self.clock())
        base = p.rule.connections
        if factor >= 1.0:
            return base
        if not base:
            base = max(1, p.open_at_slowdown or open_now)
        return max(1, int(base * factor))

    def shared_connection_limit(self, name: str) -> int:
        """The rule's `connections` as configured (0: none): with [cluster], the number of
        leases all nodes may hold together; the backoff stays each process's own."""
        return self._providers[name].rule.connections

    def suspended_until(self, name: str) -> float | None:
        """The end of the provider's suspension of new connections, or None."""
        b = self._providers[name].backoff
        return b.suspended_until if b.suspended(self.clock()) else None

    def messages_per_connection(self, name: str, default: int) -> int:
        n = self._providers[name].rule.messages_per_connection
        return min(n, default) if n else default

    def set_wake(self, name: str, call: Any) -> Any:
        """Keep the pool's wake-up call for the end of `name`'s suspension; the one kept."""
        p = self._providers[name]
        if p.wake is None or not p.wake.active():
            p.wake = call()
        return p.wake

    # -- for the deliverer ----------------------------------------------------------------

    def recipients_per_message(self, mx: str, default: int) -> int:
        rule = self.rule_for(mx)
        if rule is None or not rule.recipients_per_message:
            return default
        return min(rule.recipients_per_message, default)

    def rate_wait(self, mx: str) -> Deferred[float]:
        """Take one message of the provider's rate; fires with the seconds to wait first."""
        rule = self.rule_for(mx)
        if rule is None:
            return succeed(0.0)
        now = self.clock()
        factor = self._providers[rule.name].backoff.at(now)
        rate = rule.rate * factor
        if not rate:
            return succeed(0.0)
        return self.limiter.acquire("rate:" + rule.name, rate, 1, now)

    def slow_down(self, mx: str, reply: Any, open_now: int = 0) -> bool:
        """The provider of `mx` told us to slow down (`reply`); False without a rule."""
        rule = self.rule_for(mx)
        if rule is None:
            return False
        now = self.clock()
        p = self._providers[rule.name]
        b = p.backoff
        if b.suspended(now):
            return True
        if b.factor >= 1.0:
            p.open_at_slowdown = open_now
        b.slow_down(now)
        log.info("provider {name} asked us to slow down ({reply}): factor {f:.3g}, no new "
                 "connections for {s:.0f} s", name=rule.name, reply=str(reply), f=b.factor,
                 s=b.current)
        if self.metrics is not None:
            self.metrics.observe_backoff(rule.name, b.factor)
        return True

    def status(self) -> dict[str, dict[str, Any]]:
        """Each provider's state, for `txmta status`."""
        now = self.clock()
        out = {}
        for name, p in self._providers.items():
            b = p.backoff
            out[name] = {"factor": round(b.at(now), 4), "slowdowns": b.slowdowns,
                         "suspended_for": round(max(0.0, b.suspended_until - now), 1)}
        return out


def parse_rate(text: str) -> float:
    """Messages per second from "100/m", "3600/h", "10/s", "120/min", "" (none: 0.0)."""
    text = text.strip().lower()
    if not text:
        return 0.0
    count, sep, unit = text.partition("/")
    try:
        n = float(count)
    except ValueError:
        raise ValueError(f"{text!r}: not a rate such as \"100/m\"") from None
    per = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
           "h": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}.get(unit.strip() or "s")
    if not sep or per is None or n < 0:
        raise ValueError(f"{text!r}: not a rate such as \"100/m\" (units s, m, h, d)")
    return n / per
