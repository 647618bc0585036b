"""SPF, RFC 7208: the record parser, macro expansion, check_host() and the lookup count.

What it does: `parse()` turns a `v=spf1` TXT string into a `Record` or raises
`SpfSyntaxError` naming the bad term (RFC 7208 12, the ABNF; 4.6.1: a term is a modifier
when it starts with `name=`).  `expand()` expands macros (7).  Both are pure.
`check_host()` evaluates a domain's policy for one client address the way a receiver does
(4, 5, 6): DNS-querying terms are counted and more than 10 is a permerror (4.6.4), more
than 2 void lookups too, `include` and `redirect` recurse.  `count_lookups()` walks the
include/redirect tree without an address and says how many DNS-querying terms a receiver
may have to evaluate, and where they come from: what `txmta doctor` reports.

What it doesn't: fetch or expand `exp=` explanations (only a rejecting receiver does), or
validate the `p` macro (it expands to "unknown", which 7.3 allows).  Remote behaviour never
raises: every DNS failure becomes a temperror/permerror `Result` or a note in a `Count`.
The resolver is injected (DESIGN invariant 9): anything with `query(name, rdtype)` like
`txmta.outbound.dns.Resolver`.
"""
# test: tests/test_spf.py

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Protocol

import dns.reversename
from twisted.internet.defer import Deferred

from txmta.outbound.dns import Answer, DNSError

MAX_LOOKUPS = 10          # 4.6.4: DNS-querying terms per check_host() evaluation
MAX_VOID = 2              # 4.6.4: lookups answered NXDOMAIN or NODATA
MAX_NAMES = 10            # 4.6.4: MX names per "mx", PTR names per "ptr"

QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
DNS_TERMS = ("include", "a", "mx", "ptr", "exists", "redirect")   # 4.6.4

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class SpfSyntaxError(ValueError):
    """A record that does not follow the RFC 7208 grammar (a receiver's permerror)."""


class TXTResolver(Protocol):
    def query(self, name: str, rdtype: str) -> Deferred[Answer]: ...


# -- the record ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Mechanism:
    qualifier: str              # "+", "-", "~" or "?"
    name: str                   # lower-case, one of MECHANISMS
    domain: str | None = None   # the domain-spec as written; None: the current domain
    network: str | None = None  # ip4/ip6: the address as written
    cidr4: int | None = None    # a/mx/ip4 prefix length, as written
    cidr6: int | None = None    # a/mx/ip6 prefix length, as written
    text: str = ""              # the term as written

    @property
    def result(self) -> str:
        return QUALIFIERS[self.qualifier]


@dataclass(frozen=True)
class Record:
    text: str
    mechanisms: tuple[Mechanism, ...]
    redirect: str | None = None
    exp: str | None = None
    modifiers: tuple[tuple[str, str], ...] = ()     # every modifier, unknown ones too

    @property
    def has_all(self) -> bool:
        return any(m.name == "all" for m in self.mechanisms)

    def dns_terms(self) -> list[str]:
        """The terms that cost a DNS lookup (4.6.4), as written; `redirect` only when it
        applies (6.1: ignored when the record has an "all")."""
        terms = [m.text for m in self.mechanisms if m.name in DNS_TERMS]
        if self.redirect is not None and not self.has_all:
            terms.append(f"redirect={self.redirect}")
        return terms


def is_spf(text: str) -> bool:
    """Whether a TXT string is an SPF record: "v=spf1" alone or followed by a space (4.5)."""
    return text[:6].lower() == "v=spf1" and (len(text) == 6 or text[6] == " ")


_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9._-]*)=(.*)\Z", re.S)
_DIRECTIVE = re.compile(r"([-+~?]?)([A-Za-z][A-Za-z0-9._-]*)(.*)\Z", re.S)
_DOMAIN_CIDR = re.compile(r"(?::(?P<domain>.+?))?(?:/(?P<c4>0|[1-9][0-9]*))?"
                          r"(?://(?P<c6>0|[1-9][0-9]*))?\Z", re.S)
_IP_CIDR = re.compile(r":(?P<ip>[^/]+)(?:/(?P<cidr>0|[1-9][0-9]*))?\Z", re.S)
_MACRO = re.compile(r"%\{([slodiphcrtvSLODIPHCRTV])([0-9]*)([rR]?)([-.+,/_=]*)\}")
_TOPLABEL = re.compile(r"(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*"
                       r"|[A-Za-z0-9]+-[A-Za-z0-9-]*[A-Za-z0-9])\Z")


def _check_macro_string(text: str, where: str) -> bool:
    """7.1: "%" starts "%{...}", "%%", "%_" or "%-"; other characters are visible ASCII.
    c, r and t are for explanations only (7.3), so not in a record.  Returns whether
    `text` ends with a macro-expand."""
    i = 0
    ends_with_macro = False
    while i < len(text):
        c = text[i]
        ends_with_macro = c == "%"
        if c == "%":
            if text[i + 1:i + 2] in ("%", "_", "-"):
                i += 2
                continue
            m = _MACRO.match(text, i)
            if m is None:
                raise SpfSyntaxError(f"{where}: bad macro at {text[i:i + 8]!r}")
            if m.group(1).lower() in "crt":
                raise SpfSyntaxError(f"{where}: macro %{{{m.group(1)}}} is for explanations only")
            if m.group(2) and int(m.group(2)) == 0:
                raise SpfSyntaxError(f"{where}: a macro's digit transformer must not be 0")
            i = m.end()
            continue
        if not "\x21" <= c <= "\x7e":
            raise SpfSyntaxError(f"{where}: character {c!r} not allowed")
        i += 1
    return ends_with_macro


def _check_domain_spec(spec: str, where: str) -> None:
    """domain-spec = macro-string domain-end; domain-end is "." toplabel ["."] or a macro."""
    if not spec:
        raise SpfSyntaxError(f"{where}: empty domain")
    if _check_macro_string(spec, where):
        return
    body = spec[:-1] if spec.endswith(".") else spec
    _, dot, top = body.rpartition(".")
    if not dot or not _TOPLABEL.match(top):
        raise SpfSyntaxError(f"{where}: {spec!r} does not end in a top-level domain label")


def _directive(term: str) -> Mechanism:
    m = _DIRECTIVE.match(term)
    if m is None:
        raise SpfSyntaxError(f"{term!r}: not a mechanism or modifier")
    qualifier, name, rest = m.group(1) or "+", m.group(2).lower(), m.group(3)
    if name not in MECHANISMS:
        raise SpfSyntaxError(f"{term!r}: unknown mechanism {m.group(2)!r}")
    if name == "all":
        if rest:
            raise SpfSyntaxError(f"{term!r}: \"all\" takes no argument")
        return Mechanism(qualifier, name, text=term)
    if name in ("include", "exists"):
        if not rest.startswith(":"):
            raise SpfSyntaxError(f"{term!r}: {name} needs \":domain\"")
        _check_domain_spec(rest[1:], repr(term))
        return Mechanism(qualifier, name, rest[1:], text=term)
    if name == "ptr":
        domain = None
        if rest:
            if not rest.startswith(":"):
                raise SpfSyntaxError(f"{term!r}: ptr takes \":domain\"")
            domain = rest[1:]
            _check_domain_spec(domain, repr(term))
        return Mechanism(qualifier, name, domain, text=term)
    if name in ("a", "mx"):
        dm = _DOMAIN_CIDR.match(rest)
        if dm is None:
            raise SpfSyntaxError(f"{term!r}: expected {name}[:domain][/cidr4][//cidr6]")
        domain = dm.group("domain")
        if domain is not None:
            _check_domain_spec(domain, repr(term))
        c4 = int(dm.group("c4")) if dm.group("c4") else None
        c6 = int(dm.group("c6")) if dm.group("c6") else None
        if c4 is not None and c4 > 32 or c6 is not None and c6 > 128:
            raise SpfSyntaxError(f"{term!r}: prefix length out of range")
        return Mechanism(qualifier, name, domain, None, c4, c6, term)
    im = _IP_CIDR.match(rest)          # ip4, ip6
    if im is None:
        raise SpfSyntaxError(f"{term!r}: expected {name}:address[/prefix]")
    version = 4 if name == "ip4" else 6
    try:
        address = ipaddress.ip_address(im.group("ip"))
    except ValueError:
        raise SpfSyntaxError(f"{term!r}: {im.group('ip')!r} is not an IPv{version} address") from None
    if address.version != version:
        raise SpfSyntaxError(f"{term!r}: {im.group('ip')!r} is not an IPv{version} address")
    cidr = int(im.group("cidr")) if im.group("cidr") else None
    if cidr is not None and cidr > (32 if version == 4 else 128):
        raise SpfSyntaxError(f"{term!r}: prefix length out of range")
    return Mechanism(qualifier, name, None, im.group("ip"),
                     cidr if version == 4 else None, cidr if version == 6 else None, term)


def parse(text: str) -> Record:
    """The record in `text` (one TXT record's strings, joined); `SpfSyntaxError` if bad."""
    if not is_spf(text):
        raise SpfSyntaxError("does not start with \"v=spf1\"")
    mechanisms: list[Mechanism] = []
    modifiers: list[tuple[str, str]] = []
    redirect = exp = None
    for term in text[6:].split(" "):
        if not term:
            continue
        bad = next((c for c in term if not "\x21" <= c <= "\x7e"), None)
        if bad is not None:      # 12: terms are visible ASCII, separated by SP only
            raise SpfSyntaxError(f"{term!r}: character {bad!r} not allowed")
        mod = _MODIFIER.match(term)
        if mod is None:
            mechanisms.append(_directive(term))
            continue
        name, value = mod.group(1).lower(), mod.group(2)
        if name in ("redirect", "exp"):
            if any(n == name for n, _ in modifiers):
                raise SpfSyntaxError(f"{name}= appears more than once")   # 6
            _check_domain_spec(value, repr(term))
            if name == "redirect":
                redirect = value
            else:
                exp = value
        else:
            _check_macro_string(value, repr(term))
        modifiers.append((name, value))
    return Record(text, tuple(mechanisms), redirect, exp, tuple(modifiers))


# -- macros -------------------------------------------------------------------------------

@dataclass(frozen=True)
class MacroContext:
    sender: str                 # the envelope sender, "local@domain"
    domain: str                 # the current domain (<domain> of check_host)
    ip: str                     # the client address
    helo: str = ""              # the HELO/EHLO name


def _ip_macro(ip: IPAddress) -> str:
    if ip.version == 4:
        return str(ip)
    return ".".join(ip.exploded.replace(":", ""))     # 7.3: nibbles, dot-separated


def expand(spec: str, ctx: MacroContext) -> str:
    """`spec` with its macros expanded (7.3, 7.4); `spec` passed parse()."""
    ip = _client_ip(ctx.ip)
    local, _, sender_domain = ctx.sender.rpartition("@")
    values = {"s": ctx.sender, "l": local or "postmaster", "o": sender_domain,
              "d": ctx.domain, "i": _ip_macro(ip), "p": "unknown",
              "v": "in-addr" if ip.version == 4 else "ip6", "h": ctx.helo or "unknown"}
    out: list[str] = []
    i = 0
    while i < len(spec):
        if spec[i] != "%":
            out.append(spec[i])
            i += 1
            continue
        two = spec[i:i + 2]
        if two in ("%%", "%_", "%-"):
            out.append({"%%": "%", "%_": " ", "%-": "%20"}[two])
            i += 2
            continue
        m = _MACRO.match(spec, i)
        if m is None:          # not from parse(); keep the text as it is
            out.append(spec[i])
            i += 1
            continue
        letter, digits, reverse, delimiters = m.groups()
        value = values.get(letter.lower(), "")
        parts = re.split("[" + re.escape(delimiters or ".") + "]", value)
        if reverse:
            parts.reverse()
        if digits:
            parts = parts[-int(digits):]
        value = ".".join(parts)
        if letter.isupper():
            value = urllib.parse.quote(value, safe="-._~")
        out.append(value)
        i = m.end()
    result = "".join(out)
    while len(result.rstrip(".")) > 253 and "." in result:     # 4.8: drop left labels
        result = result.split(".", 1)[1]
    return result


def _client_ip(text: str) -> IPAddress:
    ip = ipaddress.ip_address(text)
    if ip.version == 6 and ip.ipv4_mapped is not None:     # 5: IPv4-mapped is IPv4
        return ip.ipv4_mapped
    return ip


# -- check_host() -------------------------------------------------------------------------

@dataclass(frozen=True)
class Result:
    """What check_host() decided: one of none, neutral, pass, fail, softfail, temperror,
    permerror (2.6); the term that decided it and in which domain's record ("" when the
    default applied); `reason` explains errors and the default."""
    result: str
    term: str = ""
    domain: str = ""
    reason: str = ""
    lookups: int = 0


class _Stop(Exception):
    """Ends an evaluation early with a result (a temperror or a permerror)."""

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


def _valid_domain(name: str) -> bool:
    labels = name.rstrip(".").split(".")
    return (len(labels) >= 2 and len(name.rstrip(".")) <= 253
            and all(0 < len(label) <= 63 for label in labels))


def _strings(rdata: Any) -> str:
    """One TXT record's character-strings, concatenated without spaces (3.3)."""
    return b"".join(rdata.strings).decode("utf-8", "replace")


async def spf_records(resolver: TXTResolver, domain: str) -> list[str]:
    """The SPF records at `domain` (4.5): [] when it has none or does not exist.
    A temporary DNS failure raises `DNSError`."""
    try:
        answer = await resolver.query(domain, "TXT")
    except DNSError as e:
        if not e.temporary:
            return []
        raise
    return [t for t in (_strings(r) for r in answer.records) if is_spf(t)]


class _Evaluation:
    """One check_host() run: the shared lookup and void counters of 4.6.4."""

    def __init__(self, resolver: TXTResolver, ip: str, sender: str, helo: str) -> None:
        self.resolver = resolver
        self.ip = _client_ip(ip)
        self.ip_text = ip
        self.sender = sender
        self.helo = helo
        self.lookups = 0
        self.voids = 0

    def count(self, term: str) -> None:
        self.lookups += 1
        if self.lookups > MAX_LOOKUPS:
            raise _Stop("permerror", f"more than {MAX_LOOKUPS} DNS lookups (at {term})")

    async def query(self, name: str, rdtype: str, void: bool = True) -> tuple[Any, ...]:
        """The records; [] for NXDOMAIN/NODATA (a void lookup); _Stop on DNS trouble."""
        try:
            records = (await self.resolver.query(name, rdtype)).records
        except DNSError as e:
            if e.temporary:
                raise _Stop("temperror", f"DNS lookup failed: {e}") from None
            records = ()
        if not records and void:
            self.voids += 1
            if self.voids > MAX_VOID:
                raise _Stop("permerror", f"more than {MAX_VOID} void DNS lookups "
                                         f"(the last: {name}/{rdtype})")
        return records

    def target(self, mech: Mechanism, domain: str) -> str:
        if mech.domain is None:
            return domain
        return expand(mech.domain, MacroContext(self.sender, domain, self.ip_text, self.helo))

    async def addresses(self, name: str, void: bool = True) -> list[IPAddress]:
        rdtype = "A" if self.ip.version == 4 else "AAAA"
        return [ipaddress.ip_address(r.address) for r in await self.query(name, rdtype, void)]

    def within(self, address: IPAddress, mech: Mechanism) -> bool:
        prefix = mech.cidr4 if self.ip.version == 4 else mech.cidr6
        if prefix is None:
            return address == self.ip
        return self.ip in ipaddress.ip_network(f"{address}/{prefix}", strict=False)

    async def matches(self, mech: Mechanism, domain: str) -> bool:
        name = mech.name
        if name == "all":
            return True
        if name in ("ip4", "ip6"):
            if self.ip.version != (4 if name == "ip4" else 6):
                return False
            prefix = mech.cidr4 if name == "ip4" else mech.cidr6
            suffix = f"/{prefix}" if prefix is not None else ""
            return self.ip in ipaddress.ip_network(f"{mech.network}{suffix}", strict=False)
        self.count(mech.text)
        target = self.target(mech, domain)
        if not _valid_domain(target):
            return False
        if name == "include":
            result = await self.check_host(target)
            if result.result == "pass":
                return True
            if result.result in ("fail", "softfail", "neutral"):
                return False
            if result.result == "temperror":
                raise _Stop("temperror", f"include:{target}: {result.reason}")
            raise _Stop("permerror", f"include:{target}: "
                                     f"{result.reason or 'no SPF record there'}")
        if name == "a":
            return any(self.within(a, mech) for a in await self.addresses(target))
        if name == "mx":
            hosts = [r.exchange.to_text(True) for r in await self.query(target, "MX")
                     if r.exchange.to_text(True) not in ("", ".")]
            if len(hosts) > MAX_NAMES:
                raise _Stop("permerror", f"{mech.text}: {target} has more than "
                                         f"{MAX_NAMES} MX hosts")
            for host in hosts:
                if any(self.within(a, mech) for a in await self.addresses(host, void=False)):
                    return True
            return False
        if name == "ptr":
            return await self.ptr_matches(target)
        if name == "exists":
            return bool(await self.query(target, "A"))
        raise AssertionError(name)      # parse() allows no other mechanism

    async def ptr_matches(self, target: str) -> bool:
        """5.5: a validated PTR name (its addresses include the client's) equal to or
        under `target`."""
        reverse = dns.reversename.from_address(str(self.ip)).to_text(True)
        names = [r.target.to_text(True).lower() for r in await self.query(reverse, "PTR")]
        target = target.rstrip(".").lower()
        for name in names[:MAX_NAMES]:
            if not (name == target or name.endswith("." + target)):
                continue
            try:
                if self.ip in await self.addresses(name, void=False):
                    return True
            except _Stop:      # 5.5: a failed lookup of a PTR name just skips that name
                continue
        return False

    async def check_host(self, domain: str) -> Result:
        domain = domain.rstrip(".").lower()
        if not _valid_domain(domain):
            return Result("none", domain=domain, reason=f"{domain!r} is not a domain name")
        try:
            found = await spf_records(self.resolver, domain)
        except DNSError as e:
            return Result("temperror", domain=domain, reason=f"DNS lookup failed: {e}")
        if not found:
            return Result("none", domain=domain, reason=f"no SPF record at {domain}")
        if len(found) > 1:
            return Result("permerror", domain=domain,
                          reason=f"{len(found)} SPF records at {domain}")
        try:
            record = parse(found[0])
        except SpfSyntaxError as e:
            return Result("permerror", domain=domain, reason=f"{domain}: {e}")
        for mech in record.mechanisms:
            if await self.matches(mech, domain):
                return Result(mech.result, mech.text, domain)
        if record.redirect is not None:
            self.count(f"redirect={record.redirect}")
            target = expand(record.redirect,
                            MacroContext(self.sender, domain, self.ip_text, self.helo))
            result = await self.check_host(target)
            if result.result == "none":
                return Result("permerror", domain=domain,
                              reason=f"redirect={target}: {result.reason}")
            return result
        return Result("neutral", domain=domain, reason="no term matched (default neutral)")


async def _check_host(resolver: TXTResolver, ip: str, domain: str, sender: str,
                      helo: str) -> Result:
    ev = _Evaluation(resolver, ip, sender, helo)
    try:
        result = await ev.check_host(domain)
    except _Stop as stop:
        result = Result(stop.result, reason=stop.reason)
    return Result(result.result, result.term, result.domain, result.reason, ev.lookups)


def check_host(resolver: TXTResolver, ip: str, domain: str, sender: str = "",
               helo: str = "") -> Deferred[Result]:
    """The SPF result for mail from `sender` (default postmaster@`domain`) sent by `ip`,
    as a receiver computes it (RFC 7208 4).  Never errbacks for DNS trouble."""
    return Deferred.fromCoroutine(
        _check_host(resolver, ip, domain, sender or f"postmaster@{domain}", helo))


# -- the lookup count -------------------------------------------------------------------

@dataclass
class Count:
    """The DNS-querying terms a receiver may evaluate for a domain, through every
    include and redirect; `chain` has one line per record visited ("a.example: 3 (include:
    b.example, mx, a)"), `problems` what makes the tree unusable (a loop, a target with no
    record or a bad one, DNS failure), `voids` the a/mx terms whose lookup found nothing,
    `ptr` the ptr terms and `plus_all` the "+all" terms found anywhere."""
    total: int = 0
    chain: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    voids: list[str] = field(default_factory=list)
    ptr: list[str] = field(default_factory=list)
    plus_all: list[str] = field(default_factory=list)


async def _walk(resolver: TXTResolver, domain: str, count: Count, path: tuple[str, ...],
                record: Record | None = None) -> None:
    if record is None:
        if domain in path:
            count.problems.append(f"loop: {' -> '.join(path + (domain,))}")
            return
        if len(path) > 2 * MAX_LOOKUPS:
            count.problems.append(f"includes nested too deep at {domain}")
            return
        try:
            found = await spf_records(resolver, domain)
        except DNSError as e:
            count.problems.append(f"{domain}: DNS lookup failed ({e.rcode})")
            return
        if len(found) != 1:
            what = "no SPF record" if not found else f"{len(found)} SPF records"
            via = f" (included from {path[-1]})" if path else ""
            count.problems.append(f"{domain}: {what}{via}")
            return
        try:
            record = parse(found[0])
        except SpfSyntaxError as e:
            count.problems.append(f"{domain}: {e}")
            return
    terms = record.dns_terms()
    count.total += len(terms)
    count.chain.append(f"{domain}: {len(terms)}" + (f" ({', '.join(terms)})" if terms else ""))
    for mech in record.mechanisms:
        if mech.name == "ptr":
            count.ptr.append(f"{domain}: {mech.text}")
        if mech.name == "all" and mech.qualifier == "+":
            count.plus_all.append(f"{domain}: {mech.text}")
        if mech.name in ("a", "mx") and (mech.domain is None or "%" not in mech.domain):
            if await _void(resolver, mech.name, (mech.domain or domain).rstrip(".")):
                count.voids.append(f"{domain}: {mech.text}")
    targets = [m.domain for m in record.mechanisms if m.name == "include"]
    if record.redirect is not None and not record.has_all:
        targets.append(record.redirect)
    for target in targets:
        assert target is not None
        if "%" in target:
            count.chain.append(f"{target}: not followed (macros are expanded per message)")
            continue
        await _walk(resolver, target.rstrip(".").lower(), count, path + (domain,))


async def _void(resolver: TXTResolver, name: str, target: str) -> bool:
    """Whether the lookup of an a/mx term finds nothing (NXDOMAIN or NODATA)."""
    found = False
    for rdtype in (("A", "AAAA") if name == "a" else ("MX",)):
        try:
            found = found or bool((await resolver.query(target, rdtype)).records)
        except DNSError as e:
            if e.temporary:
                return False        # not known to be void; the DNS failure shows elsewhere
    return not found


def count_lookups(resolver: TXTResolver, domain: str,
                  record: Record | None = None) -> Deferred[Count]:
    """Walk `domain`'s SPF record (or `record`, already fetched) and every include and
    redirect under it.  Never errbacks for DNS trouble."""
    count = Count()

    async def run() -> Count:
        await _walk(resolver, domain.rstrip(".").lower(), count, (), record)
        return count
    return Deferred.fromCoroutine(run())
