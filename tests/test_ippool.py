"""IP pools: which pool a message uses, which address of it a connection leaves from, and
addresses a provider blocked taken out of rotation for the pool's cool-down (Clock)."""

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from txmta.outbound.ippool import (ROUND_ROBIN, WEIGHTED, IPPool, PoolAddress, Selectors,
                                   Source, SourceSelector, choose_pool)

A = PoolAddress("192.0.2.10", "mta1.example.com")
B = PoolAddress("192.0.2.11", "mta2.example.com")
C = PoolAddress("192.0.2.12", "")          # no HELO of its own: the default
FALLBACK = Source("192.0.2.1", "mail.example.com")
ANY = Selectors()


def selector(*pools, clock=None):
    return SourceSelector(clock or Clock(), pools, fallback=FALLBACK)


def picks(sel, n, selectors=ANY, provider="mx.example.net", pinned=""):
    return [sel.pick(selectors, provider, pinned).address for _ in range(n)]


def test_without_pools_the_delivery_source_and_helo_are_used():
    """No [[pool]]: [delivery] source_address and helo_name, as before pools existed."""
    sel = selector()
    assert sel.pick(ANY, "mx.example.net") == FALLBACK


def test_round_robin_takes_the_addresses_in_turn_with_their_helo_names():
    sel = selector(IPPool("main", (A, B, C)))
    got = [sel.pick(ANY, "mx.example.net") for _ in range(4)]
    assert [s.address for s in got] == [A.address, B.address, C.address, A.address]
    assert [s.helo for s in got[:3]] == ["mta1.example.com", "mta2.example.com",
                                         "mail.example.com"]
    assert {s.pool for s in got} == {"main"}


def test_round_robin_ignores_weights():
    sel = selector(IPPool("main", (PoolAddress("192.0.2.10", weight=5), B), ROUND_ROBIN))
    assert picks(sel, 4) == [A.address, B.address, A.address, B.address]


def test_weighted_spreads_in_proportion_and_interleaves():
    """Weights 3 and 1: of every 4 connections 3 from the first address, never 3 in a row
    from one address when the other is due (smooth weighted round-robin)."""
    sel = selector(IPPool("main", (PoolAddress(A.address, weight=3), PoolAddress(B.address)),
                          WEIGHTED))
    got = picks(sel, 8)
    assert got == [A.address, A.address, B.address, A.address] * 2


@given(st.lists(st.integers(1, 9), min_size=1, max_size=5))
def test_weighted_gives_each_address_its_weight_per_cycle(weights):
    """Over sum(weights) picks, each address is chosen exactly `weight` times."""
    addresses = tuple(PoolAddress(f"192.0.2.{10 + i}", weight=w) for i, w in enumerate(weights))
    sel = selector(IPPool("main", addresses, WEIGHTED))
    counts = Counter(picks(sel, sum(weights) * 2))
    assert counts == {a.address: 2 * a.weight for a in addresses}


def test_the_first_pool_whose_selectors_all_match_is_used():
    default = IPPool("default", (C,))
    bulk = IPPool("bulk", (A,), lanes=("bulk",))
    news = IPPool("news", (B,), lanes=("bulk",), sender_domains=("news.example.com",))
    api = IPPool("api", (B,), tokens=("shop",))
    pools = (default, news, bulk, api)
    assert choose_pool(pools, Selectors("bulk", "news.example.com")) is news
    assert choose_pool(pools, Selectors("bulk", "example.com")) is bulk
    assert choose_pool(pools, Selectors("transactional", "news.example.com")) is default
    assert choose_pool(pools, Selectors("transactional", "", "shop")) is api
    assert choose_pool(pools, Selectors("transactional", "", "other")) is default
    assert choose_pool((bulk,), Selectors("transactional")) is None


def test_a_message_no_pool_matches_leaves_from_the_delivery_address():
    sel = selector(IPPool("bulk", (A, B), lanes=("bulk",)))
    assert sel.pick(Selectors("transactional"), "mx.example.net") == FALLBACK
    assert sel.pick(Selectors("bulk"), "mx.example.net").address == A.address


def test_pools_keep_their_own_turns():
    sel = selector(IPPool("one", (A, B), lanes=("one",)), IPPool("two", (A, B)))
    assert picks(sel, 1, Selectors("one")) == [A.address]
    assert picks(sel, 1, Selectors("two")) == [A.address]
    assert picks(sel, 1, Selectors("one")) == [B.address]


def test_a_blocked_address_is_skipped_for_that_provider_until_the_cooldown_ends():
    clock = Clock()
    sel = selector(IPPool("main", (A, B), cooldown=3600), clock=clock)
    first = sel.pick(ANY, "mx.blocker.example")
    assert first.address == A.address
    assert sel.block(first, "mx.blocker.example", "554 blocked using zen") is True
    assert picks(sel, 3, provider="mx.blocker.example") == [B.address] * 3
    # other providers still get both
    assert sorted(picks(sel, 2, provider="mx.other.example")) == [A.address, B.address]
    clock.advance(3599)
    assert picks(sel, 2, provider="mx.blocker.example") == [B.address] * 2
    clock.advance(1)
    assert sorted(picks(sel, 2, provider="mx.blocker.example")) == [A.address, B.address]
    assert sel.blocked() == []


def test_blocking_again_restarts_the_cooldown():
    clock = Clock()
    sel = selector(IPPool("main", (A, B), cooldown=60), clock=clock)
    a = Source(A.address, A.helo, "main")
    sel.block(a, "mx")
    clock.advance(50)
    sel.block(a, "mx")
    clock.advance(50)
    assert sel.is_blocked(A.address, "mx")
    assert sel.blocked() == [(A.address, "mx", 110.0)]
    clock.advance(10)
    assert not sel.is_blocked(A.address, "mx")


def test_when_every_address_is_blocked_they_are_used_all_the_same():
    """Mail never stops: a pool blocked everywhere keeps sending from its addresses, and
    block() says no other address is left (the caller keeps the reply's verdict)."""
    sel = selector(IPPool("main", (A, B)))
    assert sel.block(Source(A.address, A.helo, "main"), "mx") is True
    assert sel.block(Source(B.address, B.helo, "main"), "mx") is False
    assert sorted(picks(sel, 2, provider="mx")) == [A.address, B.address]


def test_blocking_the_delivery_address_changes_nothing():
    sel = selector()
    assert sel.block(FALLBACK, "mx") is False
    assert sel.pick(ANY, "mx") == FALLBACK


def test_weighted_skips_blocked_addresses():
    sel = selector(IPPool("main", (PoolAddress(A.address, weight=3), B), WEIGHTED))
    sel.block(Source(A.address, "", "main"), "mx")
    assert picks(sel, 3, provider="mx") == [B.address] * 3


def test_a_pinned_address_is_used_while_usable():
    """A greylisted recipient's retry leaves from the address of its first try, without
    moving the pool's turn; if that address is blocked or left the pool, the turn decides."""
    sel = selector(IPPool("main", (A, B, C)))
    assert picks(sel, 3, pinned=B.address) == [B.address] * 3
    assert picks(sel, 1) == [A.address]
    sel.block(Source(B.address, B.helo, "main"), "mx.example.net")
    assert picks(sel, 1, pinned=B.address) == [C.address]
    assert picks(sel, 1, pinned="192.0.2.99") == [A.address]


@pytest.mark.parametrize("method", [ROUND_ROBIN, WEIGHTED])
def test_a_single_address_pool_always_gives_it(method):
    sel = selector(IPPool("one", (A,), method))
    assert picks(sel, 3) == [A.address] * 3
