"""Where a recipient domain's mail goes: an ordered list of (MX host, address, port) hops.

Follows RFC 5321 5.1 (MX lookup, preference order, equal preferences shuffled, implicit MX
from the domain's own address records, dropping ourselves and every MX no better than us),
RFC 7505 (null MX: the domain accepts no mail) and Postfix's relayhost syntax
(`[host]:port` skips the MX lookup, `host:port` does it, an IP literal is used as is).

What it doesn't: connect, keep state, or decide what a reply means (`outcome.classify`).
It never errbacks for DNS trouble: a lookup that fails now gives an `Unroutable` with a 4xx
reply (retry later), and only answers that say the mail can never go give a 5xx (bounce).
Relayhost lookups that fail are always 4xx (4.4.3 for DNS trouble, 4.3.5 when the relayhost
has no address): a mistyped relayhost is the operator's to fix, not a reason to bounce all
mail (Postfix does the same).  Only a relayhost that is ourselves bounces (5.4.6).  The resolver is injected
(DESIGN invariant 9); anything with `mx(domain)` and `addresses(host)` like
`txmta.outbound.dns.Resolver` will do.
"""
# test: tests/test_route.py

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass
from typing import Iterable, Protocol

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.python.failure import Failure

from txmta.hostport import parse_host_port
from txmta.outbound.dns import DNSError
from txmta.reply import Reply


class MXResolver(Protocol):
    def mx(self, domain: str) -> Deferred[list[tuple[int, str]]]: ...
    def addresses(self, host: str) -> Deferred[list[str]]: ...


@dataclass(frozen=True)
class Hop:
    mx: str            # MX host name (or the relayhost's name, or the literal)
    address: str       # IP to connect to
    port: int
    preference: int


@dataclass(frozen=True)
class Route:
    destination: str           # the batching/throttling key: the domain, or "relay:<relayhost>"
    hops: tuple[Hop, ...]      # in the order to try them


@dataclass(frozen=True)
class Unroutable:
    destination: str
    reply: Reply               # reply.permanent → bounce; otherwise retry later


@dataclass(frozen=True)
class _Relayhost:
    host: str        # name or IP, without brackets
    port: int
    lookup_mx: bool  # False for "[host]" (Postfix) and for IP literals
    literal: bool    # host is an IP address
    explicit_port: bool


def parse_relayhost(text: str, default_port: int = 25) -> _Relayhost:
    """'[host]:port', '[host]', 'host:port', 'host', '127.0.0.1:2501', '[::1]:25'."""
    try:
        hp = parse_host_port(text.strip(), default_port, bare_ipv6=True)
    except ValueError as e:
        raise ValueError(f"bad relayhost {text!r}: {e}") from None
    host = hp.host[5:] if hp.host.lower().startswith("ipv6:") else hp.host
    literal = _ip(host) is not None
    if not host or (":" in host and not literal):
        raise ValueError(f"bad relayhost {text!r}")
    return _Relayhost(host.lower().rstrip(".") if not literal else str(_ip(host)), hp.port,
                      not hp.bracketed and not literal, literal, hp.explicit_port)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def domain_literal(domain: str) -> str | None:
    """The IP of an address literal domain ('[192.0.2.1]', '[IPv6:2001:db8::1]'; RFC 5321
    4.1.3), '' when it is bracketed but no valid literal, None when it is a name."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        ip = _ip(inner[5:])
        return str(ip) if isinstance(ip, ipaddress.IPv6Address) else ""
    ip = _ip(inner)
    return str(ip) if isinstance(ip, ipaddress.IPv4Address) else ""


class Router:
    """Turns a recipient domain into a `Route` or an `Unroutable`; see the module docstring."""

    def __init__(self, resolver: MXResolver, *, relayhost: str = "",
                 local_names: Iterable[str] = (), local_addresses: Iterable[str] = (),
                 port: int = 25, max_hops: int = 10, rng: random.Random | None = None) -> None:
        self.resolver = resolver
        self.relayhost = relayhost.strip()
        self._relay = parse_relayhost(self.relayhost, port) if self.relayhost else None
        self.local_names = {n.lower().rstrip(".") for n in local_names}
        self.local_addresses = {str(_ip(a) or a) for a in local_addresses}
        self.port = port
        self.max_hops = max_hops
        self.rng = rng or random.Random()

    def destination(self, domain: str) -> str:
        """The batching/throttling key, without DNS."""
        if self._relay is not None:
            return f"relay:{self.relayhost}"
        return domain.lower().rstrip(".")

    def route(self, domain: str) -> Deferred[Route | Unroutable]:
        return ensureDeferred(self._route(domain))

    # --- the two cases ----------------------------------------------------------------

    async def _route(self, domain: str) -> Route | Unroutable:
        dest = self.destination(domain)
        if self._relay is not None:
            return await self._route_relay(dest, self._relay)
        domain = dest
        literal = domain_literal(domain)
        if literal == "":
            return Unroutable(dest, Reply(550, "5.1.3", f"Invalid address literal {domain}"))
        if literal is not None:    # RFC 5321 5.1: "[...]": no MX lookup
            return self._finish(dest, domain, [(0, domain, [literal])], [], self.port)
        try:
            mxs = await self.resolver.mx(domain)
        except DNSError as e:
            if e.temporary:
                return Unroutable(dest, Reply(451, "4.4.3",
                                              f"DNS lookup of MX for {domain} failed: {e}"))
            return Unroutable(dest, Reply(550, "5.1.2", f"Recipient domain {domain} does not "
                                                        "exist (NXDOMAIN)"))
        return await self._route_mx(dest, domain, mxs, self.port, relay=False)

    async def _route_relay(self, dest: str, relay: _Relayhost) -> Route | Unroutable:
        loop_check = not relay.explicit_port or relay.port == self.port
        if relay.literal:
            return self._finish(dest, relay.host, [(0, relay.host, [relay.host])], [],
                                relay.port, loop_check)
        mxs: list[tuple[int, str]] = []
        if relay.lookup_mx:   # Postfix: "host" is looked up as a domain, "[host]" is not
            try:
                mxs = await self.resolver.mx(relay.host)
            except DNSError as e:   # 4.4.3 for DNS trouble, 4.3.5 for a relayhost that
                return Unroutable(dest, Reply(  # doesn't exist: deferred either way
                    451, "4.4.3" if e.temporary else "4.3.5",
                    f"relayhost {self.relayhost}: DNS lookup of MX for {relay.host} failed: {e}"))
        if not mxs:
            mxs = [(0, relay.host)]
        return await self._route_mx(dest, relay.host, mxs, relay.port, relay=True,
                                    loop_check=loop_check)

    # --- MX set → hops ----------------------------------------------------------------

    async def _route_mx(self, dest: str, domain: str, mxs: list[tuple[int, str]], port: int,
                        relay: bool, loop_check: bool = True) -> Route | Unroutable:
        if len(mxs) == 1 and mxs[0][1] == "":     # RFC 7505 3: a single "." MX
            if relay:
                return Unroutable(dest, Reply(451, "4.3.5", f"relayhost {self.relayhost} "
                                                            "has a null MX"))
            return Unroutable(dest, Reply(556, "5.1.10", f"Recipient domain {domain} does not "
                                                         "accept mail (null MX, RFC 7505)"))
        mxs = [(p, h) for p, h in mxs if h]        # "." among others: unusable, skip it
        if not mxs:    # RFC 5321 5.1: no MX → the domain itself, preference 0
            mxs = [(0, domain)]
        ordered = self._order(mxs)
        results = await DeferredList([self.resolver.addresses(h) for _, h in ordered],
                                     consumeErrors=True)
        resolved: list[tuple[int, str, list[str]]] = []
        errors: list[tuple[str, DNSError]] = []
        for (pref, host), (ok, value) in zip(ordered, results):
            if ok:
                resolved.append((pref, host, list(value)))
            elif isinstance(value, Failure) and isinstance(value.value, DNSError):
                errors.append((host, value.value))
                resolved.append((pref, host, []))
            else:
                value.raiseException()   # not DNS trouble: our bug, let it errback
        route = self._finish(dest, domain, resolved, errors, port, loop_check)
        if relay and isinstance(route, Unroutable) and route.reply.enhanced != "5.4.6":
            enhanced = "4.3.5" if route.reply.permanent else route.reply.enhanced
            return Unroutable(dest, Reply(451, enhanced,
                                          f"relayhost {self.relayhost}: {route.reply.text}"))
        return route

    def _order(self, mxs: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """By preference; equal preferences in random order (RFC 5321 5.1)."""
        groups: dict[int, list[str]] = {}
        for pref, host in mxs:
            if host not in groups.setdefault(pref, []):
                groups[pref].append(host)
        out: list[tuple[int, str]] = []
        for pref in sorted(groups):
            hosts = groups[pref]
            self.rng.shuffle(hosts)
            out.extend((pref, h) for h in hosts)
        return out

    def _is_self(self, host: str, addresses: list[str]) -> bool:
        return host.lower() in self.local_names or any(
            str(_ip(a) or a) in self.local_addresses for a in addresses)

    def _finish(self, dest: str, domain: str, resolved: list[tuple[int, str, list[str]]],
                errors: list[tuple[str, DNSError]], port: int,
                loop_check: bool = True) -> Route | Unroutable:
        """Drop ourselves and every MX no better (RFC 5321 5.1), make the hops, or explain
        why there are none."""
        cut: int | None = None
        if loop_check:
            selves = [p for p, h, addrs in resolved if self._is_self(h, addrs)]
            cut = min(selves) if selves else None
        kept = [(p, h, a) for p, h, a in resolved if cut is None or p < cut]
        hops: list[Hop] = []
        for pref, host, addrs in kept:
            for a in addrs:
                hops.append(Hop(host, a, port, pref))
        if hops:
            return Route(dest, tuple(hops[:self.max_hops]))
        kept_hosts = {h for _, h, _ in kept}
        temporary = [(h, e) for h, e in errors if e.temporary and h in kept_hosts]
        if temporary:
            host, e = temporary[0]
            return Unroutable(dest, Reply(451, "4.4.3", f"DNS lookup of {host} for {domain} "
                                                        f"failed: {e}"))
        if cut is not None:
            return Unroutable(dest, Reply(554, "5.4.6", f"mail for {domain} loops back to "
                                                        "myself"))
        return Unroutable(dest, Reply(550, "5.4.4", f"Recipient domain {domain}: no usable MX "
                                                    "host (no address found)"))
