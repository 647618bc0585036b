"""Source addresses: IP pools (`[[pool]]`) and which address an attempt leaves from.

A pool is a named set of source addresses, each with its own HELO name (what its reverse
DNS names; `txmta doctor` checks it) and weight.  A message uses the first pool whose
selectors all match it: its lane (`lanes`), its sender's domain (`sender_domains`), the API
token it came with (`tokens`); a pool without selectors is the default one.  With no pool
at all, or none that matches, mail leaves from `[delivery] source_address` with
`[delivery] helo_name` (the `fallback`).

`SourceSelector.pick(selectors, provider)` chooses the address of one connection: in turn
("round-robin"), or in proportion to the weights ("weighted", smooth weighted round-robin:
with weights 3 and 1, a a b a, a a b a, ...).  An address that a provider blocked
(`block()`, after a reply `outcome.classify` judged `blocked`) is skipped for that provider
until its cool-down has passed; the provider is a plain string the caller chooses (the MX
host).  When every address of the pool is blocked for a provider, they are used all the
same (mail never stops) and that is logged.  A `pinned` address (the one a greylisted
recipient was first tried from: its retry must come from the same address, RFC 6647) is
used while it is in the pool and not blocked.

Pure apart from the injected clock: no I/O; the state (turns, blocks) lives in one worker's
memory and starts afresh with it.
"""
# test: tests/test_ippool.py

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from twisted.logger import Logger

log = Logger()

ROUND_ROBIN = "round-robin"
WEIGHTED = "weighted"
METHODS = (ROUND_ROBIN, WEIGHTED)
DEFAULT_COOLDOWN = 3600.0       # seconds an address stays out of rotation for a provider


@dataclass(frozen=True)
class PoolAddress:
    address: str                # an IP address of this host
    helo: str = ""              # its HELO name; "" = the default ([delivery] helo_name)
    weight: int = 1


@dataclass(frozen=True)
class IPPool:
    name: str
    addresses: tuple[PoolAddress, ...]
    method: str = ROUND_ROBIN
    lanes: tuple[str, ...] = ()             # selectors; all empty: the default pool
    sender_domains: tuple[str, ...] = ()    # lower-case
    tokens: tuple[str, ...] = ()            # API token names
    cooldown: float = DEFAULT_COOLDOWN

    @property
    def is_default(self) -> bool:
        return not (self.lanes or self.sender_domains or self.tokens)

    def matches(self, selectors: "Selectors") -> bool:
        return ((not self.lanes or selectors.lane in self.lanes)
                and (not self.sender_domains or selectors.sender_domain in self.sender_domains)
                and (not self.tokens or selectors.token in self.tokens))


@dataclass(frozen=True)
class Selectors:
    """What chooses a message's pool."""
    lane: str = ""
    sender_domain: str = ""     # lower-case; "" for the null sender
    token: str = ""             # the API token's name; "" for SMTP


@dataclass(frozen=True)
class Source:
    """Where one connection comes from."""
    address: str                # "" = the system's choice
    helo: str
    pool: str = ""              # the pool it belongs to; "" = [delivery]


def choose_pool(pools: Sequence[IPPool], selectors: Selectors) -> IPPool | None:
    """The first pool with selectors that all match, else the default pool, else None."""
    for pool in pools:
        if not pool.is_default and pool.matches(selectors):
            return pool
    return next((pool for pool in pools if pool.is_default), None)


class SourceSelector:
    def __init__(self, clock: Any, pools: Iterable[IPPool] = (), *,
                 fallback: Source = Source("", "")) -> None:
        self.clock = clock
        self.pools = tuple(pools)
        self.fallback = fallback
        self._turn: dict[str, int] = {}                         # round-robin: next index
        self._current: dict[tuple[str, str], int] = {}          # weighted: current weights
        self._blocked: dict[tuple[str, str], float] = {}        # (address, provider) -> until
        self._exhausted: set[tuple[str, str]] = set()           # (pool, provider) logged

    def pool_for(self, selectors: Selectors) -> IPPool | None:
        return choose_pool(self.pools, selectors)

    def pick(self, selectors: Selectors, provider: str, pinned: str = "") -> Source:
        """The source of a connection for mail of `selectors` to `provider`."""
        pool = self.pool_for(selectors)
        if pool is None:
            return self.fallback
        usable = [a for a in pool.addresses if not self.is_blocked(a.address, provider)]
        if pinned and any(a.address == pinned for a in usable):
            return self._source(pool, next(a for a in usable if a.address == pinned))
        if not usable:
            if (pool.name, provider) not in self._exhausted:
                self._exhausted.add((pool.name, provider))
                log.warn("every address of pool {pool} is blocked by {provider}; "
                         "using them all the same", pool=pool.name, provider=provider)
            usable = list(pool.addresses)
        else:
            self._exhausted.discard((pool.name, provider))
        if pool.method == WEIGHTED:
            chosen = self._weighted(pool, usable)
        else:
            chosen = self._round_robin(pool, usable)
        return self._source(pool, chosen)

    def _source(self, pool: IPPool, a: PoolAddress) -> Source:
        return Source(a.address, a.helo or self.fallback.helo, pool.name)

    def _round_robin(self, pool: IPPool, usable: list[PoolAddress]) -> PoolAddress:
        start = self._turn.get(pool.name, 0)
        n = len(pool.addresses)
        for step in range(n):
            i = (start + step) % n
            if pool.addresses[i] in usable:
                self._turn[pool.name] = (i + 1) % n
                return pool.addresses[i]
        return usable[0]    # not reached: usable is a non-empty subset of the addresses

    def _weighted(self, pool: IPPool, usable: list[PoolAddress]) -> PoolAddress:
        # smooth weighted round-robin: every candidate gains its weight, the richest is
        # chosen and pays the total; over sum(weights) picks each is chosen weight times
        total = sum(a.weight for a in usable)
        best: PoolAddress | None = None
        best_current = 0
        for a in usable:
            key = (pool.name, a.address)
            current = self._current.get(key, 0) + a.weight
            self._current[key] = current
            if best is None or current > best_current:
                best, best_current = a, current
        assert best is not None
        self._current[(pool.name, best.address)] = best_current - total
        return best

    def is_blocked(self, address: str, provider: str) -> bool:
        until = self._blocked.get((address, provider))
        if until is None:
            return False
        if until <= self.clock.seconds():
            del self._blocked[(address, provider)]
            return False
        return True

    def block(self, source: Source, provider: str, reason: Any = "") -> bool:
        """Take `source` out of rotation for `provider` for its pool's cool-down.  Returns
        whether another address of its pool is still usable for `provider` (the mail can
        go from it); False for an address of no pool."""
        pool = next((p for p in self.pools if p.name == source.pool), None)
        if pool is None or not source.address:
            return False
        now = self.clock.seconds()
        if not self.is_blocked(source.address, provider):
            log.warn("{address} (pool {pool}) blocked by {provider} for {seconds:.0f} s: "
                     "{reason}", address=source.address, pool=pool.name, provider=provider,
                     seconds=pool.cooldown, reason=reason)
        self._blocked[(source.address, provider)] = now + pool.cooldown
        if len(self._blocked) > 1024:     # blocks are rare: forget the expired ones now and then
            self._forget_expired()
        return any(not self.is_blocked(a.address, provider)
                   for a in pool.addresses if a.address != source.address)

    def _forget_expired(self) -> None:
        now = self.clock.seconds()
        self._blocked = {k: until for k, until in self._blocked.items() if until > now}

    def blocked(self) -> list[tuple[str, str, float]]:
        """(address, provider, until) of every address out of rotation now."""
        now = self.clock.seconds()
        return sorted((a, p, until) for (a, p), until in self._blocked.items() if until > now)
