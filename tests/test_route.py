"""Router: recipient domain → ordered hops, or a reply saying why not (RFC 5321 5.1,
RFC 7505, Postfix relayhost syntax).  A fake resolver with the real method names answers
from a table; a seeded rng makes the shuffle of equal preferences repeatable."""

from __future__ import annotations

import random
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed

from txmta.outbound.dns import DNSError
from txmta.outbound.route import Hop, Route, Router, Unroutable, parse_relayhost

NX = DNSError("NXDOMAIN", False)
SERVFAIL = DNSError("SERVFAIL", True)
TIMEOUT = DNSError("TIMEOUT", True)


class FakeResolver:
    """`mx()` and `addresses()` like `txmta.outbound.dns.Resolver`, from two tables.
    A name missing from a table is NXDOMAIN; a DNSError value errbacks with it."""

    def __init__(self, mx: dict[str, Any] | None = None,
                 addresses: dict[str, Any] | None = None) -> None:
        self.mx_table = mx or {}
        self.addr_table = addresses or {}
        self.asked: list[tuple[str, str]] = []

    def _answer(self, table: dict[str, Any], key: str) -> Deferred[Any]:
        value = table.get(key, NX)
        return fail(value) if isinstance(value, DNSError) else succeed(list(value))

    def mx(self, domain: str) -> Deferred[list[tuple[int, str]]]:
        self.asked.append(("MX", domain))
        return self._answer(self.mx_table, domain)

    def addresses(self, host: str) -> Deferred[list[str]]:
        self.asked.append(("ADDR", host))
        return self._answer(self.addr_table, host)


def route_of(router: Router, domain: str) -> Route | Unroutable:
    box: list[Any] = []
    router.route(domain).addBoth(box.append)
    assert box, "route() did not fire with a synchronous resolver"
    if not isinstance(box[0], (Route, Unroutable)):
        box[0].raiseException()
    return box[0]


def hops(result: Route | Unroutable) -> list[tuple[str, str, int, int]]:
    assert isinstance(result, Route), result
    return [(h.mx, h.address, h.port, h.preference) for h in result.hops]


def reply_of(result: Route | Unroutable) -> tuple[int, str]:
    assert isinstance(result, Unroutable), result
    return result.reply.code, result.reply.enhanced


ADDRS = {"mx1.example.test": ["2001:db8::1", "192.0.2.1"], "mx2.example.test": ["192.0.2.2"],
         "mx3.example.test": ["192.0.2.3"], "example.test": ["192.0.2.9"]}


def router(mx: dict[str, Any], addresses: dict[str, Any] | None = None, **kw: Any) -> Router:
    return Router(FakeResolver(mx, ADDRS if addresses is None else addresses),
                  rng=random.Random(7), **kw)


# --- MX routing: the table ---------------------------------------------------------------

CASES = [
    # RFC 5321 5.1: MX hosts in preference order, each address a hop, IPv6 first
    ("mx_preference_order", {"example.test": [(20, "mx2.example.test"), (10, "mx1.example.test")]},
     None, {}, [("mx1.example.test", "2001:db8::1", 25, 10), ("mx1.example.test", "192.0.2.1", 25, 10),
                ("mx2.example.test", "192.0.2.2", 25, 20)]),
    # RFC 5321 5.1: no MX records → implicit MX, the domain's own address, preference 0
    ("implicit_mx", {"example.test": []}, None, {},
     [("example.test", "192.0.2.9", 25, 0)]),
    # RFC 5321 5.1: an MX host without address is skipped, the rest still used
    ("mx_without_address_skipped", {"example.test": [(10, "gone.example.test"), (20, "mx2.example.test")]},
     None, {}, [("mx2.example.test", "192.0.2.2", 25, 20)]),
    # RFC 5321 5.1: an MX host whose lookup fails now is skipped when others work
    ("mx_servfail_skipped", {"example.test": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
     {**ADDRS, "mx1.example.test": SERVFAIL}, {}, [("mx2.example.test", "192.0.2.2", 25, 20)]),
    # RFC 5321 4.1.3 / 5.1: an address literal is used as is, no DNS
    ("ipv4_literal", {}, None, {}, [("[192.0.2.77]", "192.0.2.77", 25, 0)]),
    ("ipv6_literal", {}, None, {}, [("[ipv6:2001:db8::77]", "2001:db8::77", 25, 0)]),
    # RFC 5321 5.1: we are the best MX → drop us and everything no better → loop
    ("loop_by_name", {"example.test": [(10, "me.example.test"), (20, "mx2.example.test")]},
     {**ADDRS, "me.example.test": ["192.0.2.50"]}, {"local_names": ["ME.example.test"]},
     (554, "5.4.6")),
    # RFC 5321 5.1: we are a backup MX → deliver only to the better ones
    ("backup_mx_by_address", {"example.test": [(10, "mx1.example.test"), (20, "me.example.test"),
                                               (20, "mx3.example.test"), (30, "mx2.example.test")]},
     {**ADDRS, "me.example.test": ["192.0.2.50"]}, {"local_addresses": ["192.0.2.50"]},
     [("mx1.example.test", "2001:db8::1", 25, 10), ("mx1.example.test", "192.0.2.1", 25, 10)]),
    # RFC 5321 5.1: our MX is best; the better-preference one can't be resolved now → retry
    ("backup_mx_primary_servfail", {"example.test": [(10, "mx1.example.test"), (20, "me.example.test")]},
     {**ADDRS, "mx1.example.test": TIMEOUT, "me.example.test": ["192.0.2.50"]},
     {"local_names": ["me.example.test"]}, (451, "4.4.3")),
    # RFC 5321 5.1: the implicit MX is ourselves → loop
    ("implicit_mx_is_self", {"example.test": []}, None, {"local_addresses": ["192.0.2.9"]},
     (554, "5.4.6")),
    # RFC 7505 3: a single MX "." → the domain accepts no mail; bounce
    ("null_mx", {"example.test": [(0, "")]}, None, {}, (556, "5.1.10")),
    # RFC 7505 3: "." mixed with real MX hosts is a misconfiguration; use the real ones
    ("null_mx_mixed", {"example.test": [(0, ""), (10, "mx2.example.test")]}, None, {},
     [("mx2.example.test", "192.0.2.2", 25, 10)]),
    # RFC 5321 5.1 (and RFC 1035): NXDOMAIN for the domain → bounce
    ("domain_nxdomain", {}, None, {}, (550, "5.1.2")),
    # DNS trouble never bounces: SERVFAIL/timeout of the MX lookup → retry
    ("mx_servfail", {"example.test": SERVFAIL}, None, {}, (451, "4.4.3")),
    ("mx_timeout", {"example.test": TIMEOUT}, None, {}, (451, "4.4.3")),
    # RFC 5321 5.1: every MX host NXDOMAIN → no usable MX, bounce
    ("all_mx_nxdomain", {"example.test": [(10, "a.example.test"), (20, "b.example.test")]},
     None, {}, (550, "5.4.4")),
    # RFC 5321 5.1: no address anywhere but one lookup failed temporarily → retry, not bounce
    ("no_hop_one_temporary", {"example.test": [(10, "a.example.test"), (20, "b.example.test")]},
     {"b.example.test": SERVFAIL}, {}, (451, "4.4.3")),
    # RFC 5321 5.1: implicit MX with no address at all → no usable host, bounce
    ("implicit_mx_no_address", {"example.test": []}, {"example.test": []}, {}, (550, "5.4.4")),
    # RFC 5321 5.1: a bad bracketed literal is a bad destination
    ("bad_literal", {}, None, {}, (550, "5.1.3")),
]
DOMAINS = {"ipv4_literal": "[192.0.2.77]", "ipv6_literal": "[IPv6:2001:db8::77]",
           "bad_literal": "[example.test]"}


@pytest.mark.parametrize("name,mx,addresses,options,expected", CASES, ids=[c[0] for c in CASES])
def test_mx_routing_table(name: str, mx: dict[str, Any], addresses: Any, options: dict[str, Any],
                          expected: Any) -> None:
    """Each case of RFC 5321 5.1 / RFC 7505 routing gives these hops, or this reply."""
    result = route_of(router(mx, addresses, **options), DOMAINS.get(name, "Example.Test."))
    if isinstance(expected, tuple):
        assert reply_of(result) == expected
    else:
        assert hops(result) == expected
    assert result.destination == DOMAINS.get(name, "example.test").lower()


def test_equal_preferences_are_shuffled_with_the_rng() -> None:
    """RFC 5321 5.1: MX hosts of equal preference are tried in random order (the rng)."""
    names = [f"mx{i}.example.test" for i in range(6)]
    mx = {"example.test": [(10, n) for n in names] + [(5, "first.example.test")]}
    addrs = {n: [f"192.0.2.{i}"] for i, n in enumerate(names)}
    addrs["first.example.test"] = ["192.0.2.100"]
    orders = set()
    for seed in range(8):
        r = Router(FakeResolver(mx, addrs), rng=random.Random(seed))
        got = [h.mx for h in route_of(r, "example.test").hops]  # type: ignore[union-attr]
        assert got[0] == "first.example.test"
        assert sorted(got[1:]) == names
        orders.add(tuple(got))
    assert len(orders) > 1
    again = [h.mx for h in route_of(Router(FakeResolver(mx, addrs), rng=random.Random(3)),
                                    "example.test").hops]  # type: ignore[union-attr]
    assert tuple(again) in orders


def test_hops_are_capped_at_max_hops() -> None:
    """At most `max_hops` hops, the best first."""
    mx = {"example.test": [(i, f"mx{i}.example.test") for i in range(8)]}
    addrs = {f"mx{i}.example.test": ["2001:db8::%d" % i, f"192.0.2.{i}"] for i in range(8)}
    result = route_of(Router(FakeResolver(mx, addrs), max_hops=3), "example.test")
    assert [(h.mx, h.address) for h in result.hops] == [  # type: ignore[union-attr]
        ("mx0.example.test", "2001:db8::0"), ("mx0.example.test", "192.0.2.0"),
        ("mx1.example.test", "2001:db8::1")]


def test_unroutable_texts_name_the_domain() -> None:
    """Replies carry a human text naming the domain and the reason (DESIGN invariant 8)."""
    assert "null MX, RFC 7505" in route_of(router({"example.test": [(0, "")]}),
                                           "example.test").reply.text  # type: ignore[union-attr]
    text = route_of(router({"example.test": SERVFAIL}), "example.test").reply.text  # type: ignore[union-attr]
    assert "example.test" in text and "SERVFAIL" in text
    assert "loops back to myself" in route_of(
        router({"example.test": []}, local_addresses=["192.0.2.9"]),
        "example.test").reply.text  # type: ignore[union-attr]


def test_destination_is_cheap_and_lower_case() -> None:
    """destination() needs no DNS: the domain lower-cased, or relay:<relayhost>."""
    r = router({})
    assert r.destination("Example.TEST") == "example.test"
    assert r.resolver.asked == []  # type: ignore[attr-defined]
    assert router({}, relayhost="[smart.test]:587").destination("a.test") == "relay:[smart.test]:587"


def test_route_errbacks_only_for_bugs() -> None:
    """An exception that is not DNSError from the resolver is our bug: it errbacks."""
    class Broken(FakeResolver):
        def mx(self, domain: str) -> Deferred[list[tuple[int, str]]]:
            return fail(ZeroDivisionError())
    errors: list[Any] = []
    Router(Broken()).route("example.test").addErrback(errors.append)
    assert errors and errors[0].check(ZeroDivisionError)


# --- relayhost (Postfix syntax) ----------------------------------------------------------

RELAY_MX = {"smart.test": [(10, "out1.smart.test"), (20, "out2.smart.test")],
            "nomx.test": []}
RELAY_ADDRS = {"out1.smart.test": ["192.0.2.31"], "out2.smart.test": ["192.0.2.32"],
               "smart.test": ["192.0.2.30"], "nomx.test": ["192.0.2.40", "::1"]}

RELAY_CASES = [
    # Postfix relayhost "[host]:port": no MX lookup, the host's own addresses
    ("[smart.test]:587", [("smart.test", "192.0.2.30", 587, 0)]),
    ("[smart.test]", [("smart.test", "192.0.2.30", 25, 0)]),
    # Postfix relayhost "host": MX lookup of host first (RFC 5321 5.1 on the relay's name)
    ("smart.test", [("out1.smart.test", "192.0.2.31", 25, 10), ("out2.smart.test", "192.0.2.32", 25, 20)]),
    ("smart.test:2525", [("out1.smart.test", "192.0.2.31", 2525, 10),
                         ("out2.smart.test", "192.0.2.32", 2525, 20)]),
    # no MX for the relay's name → its own addresses
    ("nomx.test:2525", [("nomx.test", "192.0.2.40", 2525, 0), ("nomx.test", "::1", 2525, 0)]),
    # IP literals go straight there
    ("127.0.0.1:2501", [("127.0.0.1", "127.0.0.1", 2501, 0)]),
    ("[::1]:25", [("::1", "::1", 25, 0)]),
    ("[IPv6:::1]:26", [("::1", "::1", 26, 0)]),
    ("192.0.2.8", [("192.0.2.8", "192.0.2.8", 25, 0)]),
]


@pytest.mark.parametrize("relayhost,expected", RELAY_CASES, ids=[c[0] for c in RELAY_CASES])
def test_relayhost_table(relayhost: str, expected: list[tuple[str, str, int, int]]) -> None:
    """With a relayhost every domain goes there, looked up as Postfix does."""
    resolver = FakeResolver(RELAY_MX, RELAY_ADDRS)
    result = route_of(Router(resolver, relayhost=relayhost, rng=random.Random(1)), "any.example")
    assert hops(result) == expected
    assert result.destination == f"relay:{relayhost}"
    assert ("MX", "any.example") not in resolver.asked
    if relayhost.startswith("["):
        assert not any(kind == "MX" for kind, _ in resolver.asked)


@pytest.mark.parametrize("relayhost,mx,addrs,enhanced", [
    ("missing.test", {}, {}, "4.3.5"),                                # NXDOMAIN
    ("[missing.test]", {}, {}, "4.3.5"),
    ("[smart.test]", {}, {"smart.test": []}, "4.3.5"),                # no address
    ("smart.test", {"smart.test": [(0, "")]}, {}, "4.3.5"),           # null MX on the relay
    ("smart.test", {"smart.test": SERVFAIL}, {}, "4.4.3"),            # SERVFAIL
    ("[smart.test]", {}, {"smart.test": TIMEOUT}, "4.4.3"),           # timeout
])
def test_relayhost_dns_failure_defers(relayhost: str, mx: Any, addrs: Any, enhanced: str) -> None:
    """A relayhost that can't be resolved defers, never bounces: it is the operator's
    configuration, not the recipient's fault (as Postfix); 4.3.5 when it has no address,
    4.4.3 for DNS trouble."""
    result = route_of(Router(FakeResolver(mx, addrs), relayhost=relayhost), "any.example")
    assert reply_of(result) == (451, enhanced)
    assert relayhost in result.reply.text  # type: ignore[union-attr]


def test_relayhost_that_is_ourselves_loops() -> None:
    """RFC 5321 5.1: a relayhost on our own address and SMTP port loops → 554 5.4.6."""
    r = Router(FakeResolver({}, {"me.test": ["192.0.2.50"]}), relayhost="[me.test]",
               local_addresses=["192.0.2.50"])
    assert reply_of(route_of(r, "any.example")) == (554, "5.4.6")
    r = Router(FakeResolver(), relayhost="192.0.2.50", local_addresses=["192.0.2.50"])
    assert reply_of(route_of(r, "any.example")) == (554, "5.4.6")


def test_relayhost_on_own_address_other_port_is_no_loop() -> None:
    """A relayhost on our address but another port (a content filter) is not a loop."""
    r = Router(FakeResolver(), relayhost="127.0.0.1:10025", local_addresses=["127.0.0.1"])
    assert hops(route_of(r, "any.example")) == [("127.0.0.1", "127.0.0.1", 10025, 0)]


@pytest.mark.parametrize("text", ["[smart.test", "smart.test:x", "[smart.test]587", "", "a:b:c",
                                  "[smart.test]:70000"])
def test_bad_relayhost_is_rejected_at_construction(text: str) -> None:
    """A malformed relayhost is a configuration error, raised when the Router is built."""
    with pytest.raises(ValueError):
        parse_relayhost(text)


def test_hop_is_a_value() -> None:
    """Hops compare by value (pool keys are built from them)."""
    assert Hop("a", "192.0.2.1", 25, 10) == Hop("a", "192.0.2.1", 25, 10)
