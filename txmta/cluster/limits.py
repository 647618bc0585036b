"""Rate limits and connection counts shared by every node, in Valkey/Redis.

`RedisRateLimiter` is the `txmta.limits.RateLimiter` of a cluster: each `acquire` runs the
GCRA step of `txmta.limits.Gcra` in one Lua script (EVALSHA), on the key's theoretical
arrival time kept in Redis, so every node draws from one budget; the arithmetic is the same,
step for step, in IEEE doubles (the numbers go as `repr` strings and come back as "%.17g").
The time is the caller's (`now`): the nodes' clocks must agree (NTP), as for any shared
schedule.  A key Redis holds expires once its arrival time has passed: it then means "no
debt", as an absent key does.

`RedisConnectionLeases` is the `txmta.limits.ConnectionLeases` of a cluster: a connection
is a lease, a member of a sorted set per key whose score is its expiry; the script drops
expired members, counts the rest against the limit and adds one.  The holder renews its
leases every third of `ttl` and removes one on `release`; a node that dies stops renewing,
and its leases lapse after `ttl` at most.

While Redis is down (not connected, no answer within the connection's timeout, or an error
such as a read-only replica or a full memory), both
fall back to this process's own state with its share of each limit: the rate and the
connection limit divided by `divisor` (the configured node count times the workers of this
node), never below one connection or one unit of burst.  They log when that starts and
ends.  When Redis is back the limiter uses it again, and the leases held meanwhile are
added to Redis at once (the renewal), so the counts catch up.
"""
# test: tests/test_cluster.py, tests/integration/test_cluster_nodes.py

from __future__ import annotations

import itertools
import math
import os
from typing import Any

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from txmta.cluster.redis import Connection
from txmta.limits import LocalRateLimiter

log = Logger(namespace="txmta.cluster")

# KEYS[1]: the key's theoretical arrival time; ARGV: now, rate (units/s), burst.
# The steps of txmta.limits.Gcra.take.
GCRA = """
local now = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
if rate <= 0 then return '0' end
local interval = 1.0 / rate
local tolerance = interval * math.max(0, burst - 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if now > tat then tat = now end
local wait = tat - tolerance - now
if wait < 0 then wait = 0.0 end
local new = tat + interval
redis.call('SET', KEYS[1], string.format('%.17g', new), 'PX',
           math.ceil((new - now) * 1000) + 1000)
return string.format('%.17g', wait)
"""

# KEYS[1]: the key's leases (member -> expiry); ARGV: now, expiry, limit (0: none), member,
# ttl in ms.  1: the lease is taken; 0: the limit is reached.
LEASE_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local limit = tonumber(ARGV[3])
if limit > 0 and redis.call('ZCARD', KEYS[1]) >= limit then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

# KEYS[1]: the key's leases; ARGV: expiry, ttl in ms, then the members to renew (or add back).
LEASE_RENEW = """
for i = 3, #ARGV do redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return #ARGV - 2
"""


class Fallback:
    """Logs, once each way, when a shared budget falls back to this process's share."""

    def __init__(self, what: str, divisor: int) -> None:
        self.what = what
        self.divisor = divisor
        self.active = False

    def start(self, why: str) -> None:
        if not self.active:
            self.active = True
            log.warn("Redis unavailable ({why}): {what} fall back to this process's share "
                     "(1/{n} of each limit)", why=why, what=self.what, n=self.divisor)

    def end(self) -> None:
        if self.active:
            self.active = False
            log.info("Redis is back: {what} are shared again", what=self.what)


class RedisRateLimiter:
    """`RateLimiter` over Redis; `local` (rate / divisor) while Redis is down."""

    def __init__(self, connection: Connection, *, prefix: str = "txmta:", divisor: int = 1) -> None:
        self.connection = connection
        self.prefix = prefix
        self.divisor = max(1, divisor)
        self.local = LocalRateLimiter()
        self.fallback = Fallback("rate limits", self.divisor)

    def acquire(self, key: str, rate: float, burst: int, now: float) -> defer.Deferred[float]:
        if not self.connection.up:
            self.fallback.start("not connected")
            return defer.succeed(self._local(key, rate, burst, now))
        d = self.connection.eval(GCRA, [f"{self.prefix}rate:{key}"],
                                 [repr(float(now)), repr(float(rate)), str(int(burst))])

        def shared(wait: Any) -> float:
            self.fallback.end()
            return float(wait)

        def failed(f: Any) -> float:
            self.fallback.start(f.getErrorMessage())
            return self._local(key, rate, burst, now)
        return d.addCallbacks(shared, failed)

    def _local(self, key: str, rate: float, burst: int, now: float) -> float:
        """This process's share: rate / divisor, burst / divisor (at least 1)."""
        return self.local.wait(key, rate / self.divisor, max(1, math.ceil(burst / self.divisor)),
                               now)


class RedisConnectionLeases:
    """`ConnectionLeases` over Redis: expiring leases, renewed while held.

    `owner` names this process in the lease members (node and worker); a random part keeps
    a restarted process's members apart from its predecessor's, which lapse by expiry."""

    def __init__(self, connection: Connection, reactor: Any, *, owner: str, ttl: float = 30.0,
                 prefix: str = "txmta:", divisor: int = 1) -> None:
        self.connection = connection
        self.reactor = reactor
        self.owner = f"{owner}/{os.urandom(4).hex()}"
        self.ttl = ttl
        self.prefix = prefix
        self.divisor = max(1, divisor)
        self.held: dict[str, list[str]] = {}      # key -> the members of this process's leases
        self._serial = itertools.count(1)
        self.fallback = Fallback("connection limits", self.divisor)
        self._renewal = LoopingCall(self.renew)
        self._renewal.clock = reactor
        connection.up_listeners.append(self.renew)     # catch up at once when Redis is back

    def start(self) -> None:
        self._renewal.start(self.ttl / 3.0, now=False)

    def stop(self) -> None:
        """Stop renewing and give back what is still held (lapsing by expiry otherwise)."""
        if self._renewal.running:
            self._renewal.stop()
        if self.connection.up:
            for key, members in self.held.items():
                self.connection.call("ZREM", self._key(key), *members).addErrback(lambda f: None)
        self.held = {}

    def _key(self, key: str) -> str:
        return f"{self.prefix}lease:{key}"

    def acquire(self, key: str, limit: int) -> defer.Deferred[bool]:
        member = f"{self.owner}/{next(self._serial)}"
        if not self.connection.up:
            self.fallback.start("not connected")
            return defer.succeed(self._local(key, limit, member))
        now = self.reactor.seconds()
        d = self.connection.eval(LEASE_ACQUIRE, [self._key(key)],
                                 [repr(now), repr(now + self.ttl), str(int(limit)), member,
                                  str(int(self.ttl * 1000))])

        def shared(taken: Any) -> bool:
            self.fallback.end()
            if int(taken):
                self.held.setdefault(key, []).append(member)
                return True
            return False

        def failed(f: Any) -> bool:
            self.fallback.start(f.getErrorMessage())
            return self._local(key, limit, member)
        return d.addCallbacks(shared, failed)

    def _local(self, key: str, limit: int, member: str) -> bool:
        """This process's share of `limit` (at least 1), counting the leases it holds."""
        held = self.held.setdefault(key, [])
        if limit > 0 and len(held) >= max(1, math.ceil(limit / self.divisor)):
            if not held:
                del self.held[key]
            return False
        held.append(member)
        return True

    def release(self, key: str) -> None:
        held = self.held.get(key)
        if not held:
            return
        member = held.pop()
        if not held:
            del self.held[key]
        if self.connection.up:
            self.connection.call("ZREM", self._key(key), member).addErrback(lambda f: None)
        # else: it lapses in Redis by its expiry

    def renew(self) -> defer.Deferred[None]:
        """Push every held lease's expiry forward (and add back those Redis lost)."""
        if not self.connection.up or not self.held:
            return defer.succeed(None)
        expiry = repr(self.reactor.seconds() + self.ttl)
        ds = [self.connection.eval(LEASE_RENEW, [self._key(key)],
                                   [expiry, str(int(self.ttl * 1000))] + list(members))
              for key, members in self.held.items()]
        return defer.gatherResults(ds, consumeErrors=True).addCallbacks(
            lambda _: None, lambda f: None)
