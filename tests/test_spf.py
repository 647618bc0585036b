"""SPF (RFC 7208): the parser (tables and hypothesis), macro expansion (the RFC's own
examples), check_host() and the lookup count against the real test DNS server on
127.0.0.53 (tests/livedns.py)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livedns import serving
from txmta import spf
from txmta.spf import MacroContext, SpfSyntaxError, expand, parse

# -- the parser ---------------------------------------------------------------------------

VALID = [
    # (record, mechanism texts, redirect, DNS-querying terms)
    ("v=spf1", [], None, 0),                                                    # 4.5
    ("v=spf1 -all", ["-all"], None, 0),
    ("V=SPF1 +MX ~ALL", ["+MX", "~ALL"], None, 1),                              # 4.6.1 case
    ("v=spf1  ip4:192.0.2.0/24   ip6:2001:db8::/32  ", ["ip4:192.0.2.0/24",
                                                        "ip6:2001:db8::/32"], None, 0),
    ("v=spf1 a mx/24//64 a:mail.example.com/28 ?ptr -all",
     ["a", "mx/24//64", "a:mail.example.com/28", "?ptr", "-all"], None, 4),    # 5.3, 5.4, 5.5
    ("v=spf1 include:_spf.example.com redirect=_spf2.example.com",
     ["include:_spf.example.com"], "_spf2.example.com", 2),                     # 5.2, 6.1
    ("v=spf1 redirect=x.example.com -all", ["-all"], "x.example.com", 0),      # 6.1: ignored
    ("v=spf1 exists:%{ir}.%{l1r+-}._spf.%{d} -all",
     ["exists:%{ir}.%{l1r+-}._spf.%{d}", "-all"], None, 1),                     # 7.4
    ("v=spf1 a:%{d} exp=explain.%{d} moo=cow%%%_%- -all", ["a:%{d}", "-all"], None, 1),
    ("v=spf1 include:example.com.", ["include:example.com."], None, 1),
    ("v=spf1 ip4:0.0.0.0/0 ip6:::1", ["ip4:0.0.0.0/0", "ip6:::1"], None, 0),
    ("v=spf1 a:foo.123-4", ["a:foo.123-4"], None, 1),                          # 12 toplabel
]


@pytest.mark.parametrize("text,mechanisms,redirect,lookups", VALID)
def test_valid_records_parse(text: str, mechanisms: list[str], redirect: str | None,
                             lookups: int) -> None:
    """Records following the RFC 7208 12 grammar parse into their terms, in order."""
    record = parse(text)
    assert [m.text for m in record.mechanisms] == mechanisms
    assert record.redirect == redirect
    assert len(record.dns_terms()) == lookups


INVALID = [
    ("v=spf10 -all", "v=spf1"),                         # 4.5: not an SPF record
    ("spf1 -all", "v=spf1"),
    ("v=spf1 -all\t", "not allowed"),                   # only SP separates terms
    ("v=spf1 foo", "unknown mechanism"),
    ("v=spf1 all:x.example", "no argument"),
    ("v=spf1 include", "needs"),                        # 5.2: domain-spec required
    ("v=spf1 include:localhost", "top-level"),          # 12: domain-end
    ("v=spf1 include:example.1", "top-level"),
    ("v=spf1 ip4:192.0.2.1/33", "out of range"),
    ("v=spf1 ip6:2001:db8::/129", "out of range"),
    ("v=spf1 ip4:2001:db8::1", "IPv4"),
    ("v=spf1 ip6:192.0.2.1", "IPv6"),
    ("v=spf1 ip4:192.0.2.256", "IPv4"),
    ("v=spf1 ip4:192.0.2.1/024", "expected"),           # no leading zero in a prefix
    ("v=spf1 a:example.com/33", "out of range"),
    ("v=spf1 redirect=a.example redirect=b.example", "more than once"),   # 6
    ("v=spf1 exp=a.example exp=b.example", "more than once"),
    ("v=spf1 exists:%{x}.example.com", "bad macro"),    # 7.1
    ("v=spf1 exists:%{c}.example.com", "explanations"),  # 7.3: c, r, t only in exp text
    ("v=spf1 exists:%{d0}.example.com", "must not be 0"),
    ("v=spf1 a:ex%ample.com", "bad macro"),
    ("v=spf1 a:exämple.com", "not allowed"),
    ("v=spf1 -", "not a mechanism"),
    ("v=spf1 1a", "not a mechanism"),
]


@pytest.mark.parametrize("text,error", INVALID)
def test_invalid_records_are_syntax_errors(text: str, error: str) -> None:
    """A record breaking the grammar raises SpfSyntaxError naming what is wrong (a
    receiver's permerror)."""
    with pytest.raises(SpfSyntaxError, match=error):
        parse(text)


def test_is_spf_needs_a_space_or_the_end_after_the_version() -> None:
    """4.5: "v=spf1" then a space or nothing selects an SPF record."""
    assert spf.is_spf("v=spf1") and spf.is_spf("v=spf1 -all") and spf.is_spf("V=SPF1 mx")
    assert not spf.is_spf("v=spf10") and not spf.is_spf("v=spf1-all") and not spf.is_spf("")


# strategies building valid terms from the grammar
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_top = st.from_regex(r"[a-z][a-z0-9]{1,5}", fullmatch=True)
_domain = st.builds(lambda labels, top: ".".join(labels + [top]),
                    st.lists(_label, min_size=1, max_size=3), _top)
_macro = st.builds(lambda letter, digits, rev, delims: f"%{{{letter}{digits}{rev}{delims}}}",
                   st.sampled_from("slodiphvSLODIPHV"),
                   st.sampled_from(["", "1", "2", "12"]), st.sampled_from(["", "r"]),
                   st.sampled_from(["", ".", "-+", "_=,/"]))
_domain_spec = st.one_of(_domain, st.builds(lambda m, d: f"{m}.{d}", _macro, _domain),
                         st.builds(lambda d, m: f"{d}.{m}", _domain, _macro))
_qualifier = st.sampled_from(["", "+", "-", "~", "?"])
_cidr4 = st.one_of(st.just(""), st.integers(0, 32).map(lambda n: f"/{n}"))
_cidr6 = st.one_of(st.just(""), st.integers(0, 128).map(lambda n: f"//{n}"))
_ip4 = st.ip_addresses(v=4).map(str)
_ip6 = st.ip_addresses(v=6).map(str)
_mechanism = st.one_of(
    st.just("all"),
    _domain_spec.map(lambda d: f"include:{d}"),
    _domain_spec.map(lambda d: f"exists:{d}"),
    st.builds(lambda name, d, c4, c6: f"{name}{':' + d if d else ''}{c4}{c6}",
              st.sampled_from(["a", "mx", "A", "Mx"]), st.one_of(st.just(""), _domain_spec),
              _cidr4, _cidr6),
    st.one_of(st.just("ptr"), _domain_spec.map(lambda d: f"ptr:{d}")),
    st.builds(lambda ip, c: f"ip4:{ip}{c}", _ip4, _cidr4),
    st.builds(lambda ip, c: f"ip6:{ip}{c[1:]}", _ip6, _cidr6),
)
_directive = st.builds(lambda q, m: q + m, _qualifier, _mechanism)
_unknown_modifier = st.builds(lambda n, v: f"{n}={v}",
                              st.from_regex(r"x[a-z0-9._-]{0,6}", fullmatch=True),
                              st.from_regex(r"[!-$&-~]{0,10}", fullmatch=True))


@settings(max_examples=300)
@given(st.lists(_directive, max_size=8), st.one_of(st.none(), _domain_spec),
       st.lists(_unknown_modifier, max_size=2), st.integers(1, 3))
def test_generated_records_parse_to_their_terms(directives: list[str], redirect: str | None,
                                               unknown: list[str], spaces: int) -> None:
    """Any record built from the grammar parses, keeping each directive as written, the
    qualifier (default "+") and the redirect target."""
    terms = directives + ([f"redirect={redirect}"] if redirect else []) + unknown
    record = parse("v=spf1" + "".join(" " * spaces + t for t in terms))
    assert [m.text for m in record.mechanisms] == directives
    assert [m.qualifier for m in record.mechanisms] == [
        d[0] if d[0] in "+-~?" else "+" for d in directives]
    assert record.redirect == redirect
    assert len(record.modifiers) == len(unknown) + (1 if redirect else 0)


@settings(max_examples=500)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=60))
def test_arbitrary_text_parses_or_is_a_syntax_error(tail: str) -> None:
    """Whatever follows "v=spf1 ", parse() returns a Record or raises SpfSyntaxError:
    nothing else escapes."""
    try:
        parse("v=spf1 " + tail)
    except SpfSyntaxError:
        pass


@settings(max_examples=300)
@given(st.lists(st.one_of(_directive, st.text(max_size=12)), max_size=6))
def test_arbitrary_terms_parse_or_are_syntax_errors(terms: list[str]) -> None:
    """Mixing valid terms and arbitrary text (any Unicode) never raises anything but
    SpfSyntaxError."""
    try:
        parse("v=spf1 " + " ".join(terms))
    except SpfSyntaxError:
        pass


# -- macros -------------------------------------------------------------------------------

RFC_7208_7_4 = MacroContext("strong-bad@email.example.com", "email.example.com", "192.0.2.3")
RFC_7208_7_4_V6 = MacroContext("strong-bad@email.example.com", "email.example.com",
                               "2001:db8::cb01")


@pytest.mark.parametrize("spec,expanded", [
    # RFC 7208 7.4, with <sender> strong-bad@email.example.com and IP 192.0.2.3
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
    ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
    ("%%%_%-", "% %20"),
    ("%{S}", "strong-bad%40email.example.com"),           # 7.3: upper case is URL-escaped
])
def test_macro_expansion_follows_the_rfc_examples(spec: str, expanded: str) -> None:
    """RFC 7208 7.4's examples expand as the RFC says."""
    assert expand(spec, RFC_7208_7_4) == expanded


def test_ipv6_macro_is_dotted_nibbles() -> None:
    """7.4: %{i} of an IPv6 address is its 32 nibbles, dot-separated; %{v} is "ip6"."""
    assert expand("%{ir}.%{v}._spf.%{d2}", RFC_7208_7_4_V6) == (
        "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com")


def test_long_expansion_drops_left_labels() -> None:
    """4.8: an expansion longer than 253 characters loses labels from the left."""
    ctx = MacroContext(("a" * 60 + ".") * 5 + "x@example.com", "example.com", "192.0.2.3")
    out = expand("%{l}.example.com", ctx)
    assert len(out) <= 253 and out.endswith(".example.com")


# -- check_host() against the test DNS server ----------------------------------------------

ZONE: dict[str, Any] = {
    "ip.test.": {"TXT": ["v=spf1 ip4:127.0.0.0/29 ip6:::1 -all"]},
    "soft.test.": {"TXT": ["v=spf1 ~all"]},
    "neutral.test.": {"TXT": ["v=spf1 ip4:127.0.0.99"]},
    "nospf.test.": {"TXT": ["google-site-verification=abc"]},
    "two.test.": {"TXT": ["v=spf1 -all", "v=spf1 +all"]},
    "bad.test.": {"TXT": ["v=spf1 ip4:300.1.1.1 -all"]},
    "split.test.": {"TXT": ['"v=spf1 ip4:127.0.0.9" " -all"']},        # 3.3: no space added
    "inc.test.": {"TXT": ["v=spf1 include:fails.test include:ip.test -all"]},
    "fails.test.": {"TXT": ["v=spf1 -all"]},
    "incnone.test.": {"TXT": ["v=spf1 include:nospf.test -all"]},
    "a.test.": {"TXT": ["v=spf1 a a:host.a.test/30 -all"], "A": ["127.0.1.1"]},
    "host.a.test.": {"A": ["127.0.2.1"]},
    "mx.test.": {"TXT": ["v=spf1 mx/31 -all"], "MX": [[10, "mx1.mx.test."], [20, "mx2.mx.test."]]},
    "mx1.mx.test.": {"A": ["127.0.3.1"]},
    "mx2.mx.test.": {"A": ["127.0.3.4"], "AAAA": ["::1"]},
    "ptr.test.": {"TXT": ["v=spf1 ptr -all"]},
    "host.ptr.test.": {"A": ["127.0.4.1"]},
    "1.4.0.127.in-addr.arpa.": {"PTR": ["host.ptr.test."]},
    "2.4.0.127.in-addr.arpa.": {"PTR": ["liar.ptr.test."]},     # not forward-confirmed
    "exists.test.": {"TXT": ["v=spf1 exists:%{ir}.allow.exists.test -all"]},
    "1.5.0.127.allow.exists.test.": {"A": ["127.0.0.2"]},
    "redir.test.": {"TXT": ["v=spf1 ip4:127.0.6.1 redirect=ip.test"]},
    "redirnone.test.": {"TXT": ["v=spf1 redirect=nospf.test"]},
    "voids.test.": {"TXT": ["v=spf1 a:v1.voids.test a:v2.voids.test a:v3.voids.test +all"]},
    "deep.test.": {"TXT": ["v=spf1 include:d1.deep.test -all"]},
    **{f"d{i}.deep.test.": {"TXT": [f"v=spf1 include:d{i + 1}.deep.test -all"]}
       for i in range(1, 11)},
    "d11.deep.test.": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
    "loop.test.": {"TXT": ["v=spf1 include:loop2.test -all"]},
    "loop2.test.": {"TXT": ["v=spf1 include:loop.test -all"]},
    "broken.test.": {"TXT": ["v=spf1 include:servfail.test -all"]},
    "servfail.test.": {"TXT": ["v=spf1 -all"]},
    "macroinc.test.": {"TXT": ["v=spf1 include:%{d}.x.macroinc.test redirect=ip.test ~all"]},
    "_servfail": ["servfail.test."],
}


@pytest.fixture(scope="module")
def ask() -> Any:
    with serving(ZONE) as run:
        yield run


def result(ask: Any, ip: str, domain: str) -> spf.Result:
    r = ask(lambda resolver: spf.check_host(resolver, ip, domain))
    assert isinstance(r, spf.Result), r
    return r


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
@pytest.mark.parametrize("ip,domain,expected,term", [
    ("127.0.0.5", "ip.test", "pass", "ip4:127.0.0.0/29"),             # 5.6
    ("127.0.0.8", "ip.test", "fail", "-all"),
    ("::1", "ip.test", "pass", "ip6:::1"),
    ("::ffff:127.0.0.1", "ip.test", "pass", "ip4:127.0.0.0/29"),      # 5: IPv4-mapped
    ("127.0.0.1", "soft.test", "softfail", "~all"),
    ("127.0.0.1", "neutral.test", "neutral", ""),                    # 4.7: default
    ("127.0.0.1", "nospf.test", "none", ""),                         # 4.5
    ("127.0.0.1", "nxdomain.test", "none", ""),
    ("127.0.0.1", "two.test", "permerror", ""),                      # 4.5: two records
    ("127.0.0.1", "bad.test", "permerror", ""),                      # 4.6
    ("127.0.0.9", "split.test", "pass", "ip4:127.0.0.9"),            # 3.3
    ("127.0.0.2", "inc.test", "pass", "include:ip.test"),            # 5.2
    ("127.0.0.9", "inc.test", "fail", "-all"),
    ("127.0.0.1", "incnone.test", "permerror", ""),                  # 5.2: include of none
    ("127.0.1.1", "a.test", "pass", "a"),                            # 5.3
    ("127.0.2.3", "a.test", "pass", "a:host.a.test/30"),
    ("127.0.2.4", "a.test", "fail", "-all"),
    ("127.0.3.0", "mx.test", "pass", "mx/31"),                       # 5.4
    ("127.0.3.5", "mx.test", "pass", "mx/31"),
    ("127.0.3.6", "mx.test", "fail", "-all"),
    ("::1", "mx.test", "pass", "mx/31"),                             # no //: whole address
    ("127.0.4.1", "ptr.test", "pass", "ptr"),                        # 5.5
    ("127.0.4.2", "ptr.test", "fail", "-all"),
    ("127.0.5.1", "exists.test", "pass", "exists:%{ir}.allow.exists.test"),   # 5.7
    ("127.0.5.2", "exists.test", "fail", "-all"),
    ("127.0.6.1", "redir.test", "pass", "ip4:127.0.6.1"),            # 6.1
    ("127.0.0.3", "redir.test", "pass", "ip4:127.0.0.0/29"),
    ("127.0.0.9", "redir.test", "fail", "-all"),
    ("127.0.0.1", "redirnone.test", "permerror", ""),                # 6.1: redirect to none
    ("127.0.0.1", "voids.test", "permerror", ""),                    # 4.6.4: 3 void lookups
    ("127.0.0.1", "deep.test", "permerror", ""),                     # 4.6.4: 11 lookups
    ("127.0.0.1", "loop.test", "permerror", ""),                     # a loop hits the limit
    ("127.0.0.1", "broken.test", "temperror", ""),                   # 2.6.6
    ("127.0.0.1", "servfail.test", "temperror", ""),
])
def test_check_host(ask: Any, ip: str, domain: str, expected: str, term: str) -> None:
    """check_host() gives the RFC 7208 result, and the term that decided it."""
    r = result(ask, ip, domain)
    assert (r.result, r.term) == (expected, term), r


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_errors_say_why(ask: Any) -> None:
    """permerror and temperror results carry a reason an operator can act on."""
    assert "more than 10 DNS lookups" in result(ask, "127.0.0.1", "deep.test").reason
    assert "void" in result(ask, "127.0.0.1", "voids.test").reason
    assert "SERVFAIL" in result(ask, "127.0.0.1", "broken.test").reason
    assert "2 SPF records" in result(ask, "127.0.0.1", "two.test").reason


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_count_follows_includes_and_redirects(ask: Any) -> None:
    """count_lookups() adds the DNS-querying terms of every record reached, one chain line
    per record."""
    c = ask(lambda r: spf.count_lookups(r, "deep.test"))
    assert c.total == 11 and not c.problems
    assert c.chain[0] == "deep.test: 1 (include:d1.deep.test)"
    assert c.chain[-1] == "d11.deep.test: 0"
    c = ask(lambda r: spf.count_lookups(r, "redir.test"))
    assert (c.total, c.chain) == (1, ["redir.test: 1 (redirect=ip.test)", "ip.test: 0"])


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_count_reports_loops_missing_records_and_dns_failures(ask: Any) -> None:
    """A loop, an include of a domain without SPF and a failed lookup are problems."""
    assert any("loop" in p for p in ask(lambda r: spf.count_lookups(r, "loop.test")).problems)
    assert ask(lambda r: spf.count_lookups(r, "incnone.test")).problems == [
        "nospf.test: no SPF record (included from incnone.test)"]
    assert "SERVFAIL" in ask(lambda r: spf.count_lookups(r, "broken.test")).problems[0]


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_count_notes_voids_ptr_and_plus_all(ask: Any) -> None:
    """a/mx terms finding nothing, ptr terms and +all are listed where they are."""
    c = ask(lambda r: spf.count_lookups(r, "voids.test"))
    assert len(c.voids) == 3 and c.plus_all == ["voids.test: +all"]
    assert ask(lambda r: spf.count_lookups(r, "ptr.test")).ptr == ["ptr.test: ptr"]


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_count_does_not_follow_macros(ask: Any) -> None:
    """An include target with macros is counted but not followed (it depends on the
    message); a redirect in a record with "all" is ignored (6.1)."""
    c = ask(lambda r: spf.count_lookups(r, "macroinc.test"))
    assert c.total == 1 and not c.problems
    assert any("not followed" in line for line in c.chain)
