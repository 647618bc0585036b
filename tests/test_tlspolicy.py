"""tlspolicy: TLSA matching, the certificate checks, MTA-STS parsing and MX patterns, the level
decision per MX host, the MTA-STS cache, and the "may" plaintext fallback.

Pure parts are tested with tables and hypothesis; the decision with a resolver answering from
a dict (the AD bit per answer) and a `task.Clock`.  Certificates are made at test time
(tests/tlscerts.py).  Real handshakes are tests/integration/test_tls_policy.py's job.
"""

from __future__ import annotations

import datetime
import hashlib
from typing import Any

import dns.rdata
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from txmta.outbound import tlspolicy as T
from txmta.outbound.client import ClientSettings, SessionFailure, SessionFailureError
from txmta.outbound.dns import Answer, DNSError
from txmta.outbound.pool import PoolKey
from txmta.outbound.route import Hop, Route
from txmta.reply import Reply
from txmta.spool.memory import MemorySpool
from tests.tlscerts import CA, NOW, self_signed


def result_of(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


@pytest.fixture(scope="module")
def pki() -> dict[str, Any]:
    ca = CA()
    return {"ca": ca, "good": ca.issue("mx.example.org"), "wrong": ca.issue("other.example.net"),
            "wild": ca.issue("*.example.org"), "expired": ca.issue("mx.example.org", expired=True),
            "self": self_signed("mx.example.org"), "other_ca": CA("another CA")}


def chain(issued: Any) -> list[Any]:
    return [issued.cert, *issued.chain]


def der(cert: Any) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def spki(cert: Any) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


# -- TLSA records ---------------------------------------------------------------------------------

@pytest.mark.parametrize("usage, selector, mtype, length, usable", [
    (3, 1, 1, 32, True),      # RFC 7672 3.1.1: DANE-EE(3) SPKI(1) SHA2-256(1), the common one
    (3, 0, 1, 32, True),
    (2, 0, 1, 32, True),      # RFC 7672 3.1.2: DANE-TA(2)
    (2, 1, 2, 64, True),      # SHA2-512
    (3, 1, 0, 91, True),      # Full(0): any length
    (0, 0, 1, 32, False),     # RFC 7672 3.1.3: PKIX-TA(0) and PKIX-EE(1) are not for SMTP
    (1, 1, 1, 32, False),
    (3, 2, 1, 32, False),     # unknown selector
    (3, 1, 3, 32, False),     # unknown matching type
    (3, 1, 1, 31, False),     # SHA-256 of the wrong length
    (3, 1, 2, 32, False),
])
def test_tlsa_usable(usage: int, selector: int, mtype: int, length: int, usable: bool) -> None:
    """Which TLSA records SMTP can use (RFC 7672 3.1, RFC 6698 2.1)."""
    assert T.TLSARecord(usage, selector, mtype, b"\x01" * length).usable is usable


@pytest.mark.parametrize("selector, mtype", [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)])
def test_tlsa_matches_every_selector_and_matching_type(pki: dict[str, Any], selector: int,
                                                      mtype: int) -> None:
    """RFC 6698 2.1.2-2.1.3: the certificate or its SPKI, in full or hashed, matches; another
    certificate does not."""
    cert, other = pki["good"].cert, pki["wrong"].cert
    content = der(cert) if selector == 0 else spki(cert)
    data = {0: content, 1: hashlib.sha256(content).digest(),
            2: hashlib.sha512(content).digest()}[mtype]
    record = T.TLSARecord(3, selector, mtype, data)
    assert T.tlsa_matches(record, cert)
    assert not T.tlsa_matches(record, other)


# -- the peer checks --------------------------------------------------------------------------

def host(level: str, **kw: Any) -> T.HostTLS:
    return T.HostTLS(level, kw.pop("name", "mx.example.org"), **kw)


@pytest.mark.parametrize("cert, ok, reason", [
    ("good", True, ""),
    ("wild", True, ""),                                    # RFC 6125 6.4.3: one left label
    ("wrong", False, "certificate does not match mx.example.org"),
    ("self", False, "certificate not trusted"),
    ("expired", False, "certificate not trusted"),
])
def test_verify_checks_chain_and_name(pki: dict[str, Any], cert: str, ok: bool,
                                      reason: str) -> None:
    """"verify": the chain up to a trusted CA, valid now, and the MX name in the certificate."""
    check = T.check_peer(host("verify"), chain(pki[cert]), [pki["ca"].cert], NOW)
    assert (check.ok, check.authenticated) == (ok, ok)
    assert check.label == ("verified" if ok else "unverified")
    assert check.reason.startswith(reason)


def test_verify_with_another_ca_fails(pki: dict[str, Any]) -> None:
    """A certificate from a CA not in ca_file is not trusted."""
    check = T.check_peer(host("verify"), chain(pki["good"]), [pki["other_ca"].cert], NOW)
    assert not check.ok and "not trusted" in check.reason


def test_verify_without_a_certificate_fails() -> None:
    assert not T.check_peer(host("verify"), [], [], NOW).ok


@pytest.mark.parametrize("level", ["may", "encrypt"])
def test_unchecked_levels_are_unverified(pki: dict[str, Any], level: str) -> None:
    check = T.check_peer(host(level), chain(pki["self"]), [], NOW)
    assert check == T.PeerCheck(True, "unverified")


def dane(*records: T.TLSARecord, name: str = "mx.example.org") -> T.HostTLS:
    return T.HostTLS("dane", name, tuple(records))


def test_dane_ee_accepts_a_self_signed_certificate(pki: dict[str, Any]) -> None:
    """RFC 7672 3.1.1: with DANE-EE the TLSA record is the trust; no CA, no name, no expiry."""
    record = T.TLSARecord(3, 1, 1, hashlib.sha256(spki(pki["self"].cert)).digest())
    check = T.check_peer(dane(record, name="any.name.example"), chain(pki["self"]), [], NOW)
    assert (check.ok, check.label, check.authenticated) == (True, "dane-ee", True)


def test_dane_ta_checks_chain_and_name(pki: dict[str, Any]) -> None:
    """RFC 7672 3.1.2, 3.2.2: DANE-TA matches the CA the server sends; the leaf must chain to
    it and carry the MX name."""
    record = T.TLSARecord(2, 0, 1, hashlib.sha256(der(pki["ca"].cert)).digest())
    ok = T.check_peer(dane(record), chain(pki["good"]), [], NOW)
    assert (ok.ok, ok.label) == (True, "dane-ta")
    wrong = T.check_peer(dane(record), chain(pki["wrong"]), [], NOW)
    assert not wrong.ok and "does not match mx.example.org" in wrong.reason


@pytest.mark.parametrize("cert", ["good", "self", "wrong"])
def test_dane_mismatch_fails(pki: dict[str, Any], cert: str) -> None:
    """No TLSA record matching the chain: refused (the caller defers)."""
    record = T.TLSARecord(3, 1, 1, b"\x00" * 32)
    check = T.check_peer(dane(record), chain(pki[cert]), [pki["ca"].cert], NOW)
    assert not check.ok and check.label == "dane-fail"
    assert "matches the certificate chain" in check.reason


def test_mta_sts_enforce_and_testing(pki: dict[str, Any]) -> None:
    """RFC 8461 4.2: enforce needs a verified certificate; testing reports and goes on."""
    anchors = [pki["ca"].cert]
    enforce, testing = host("mta-sts", sts_mode="enforce"), host("mta-sts", sts_mode="testing")
    assert T.check_peer(enforce, chain(pki["good"]), anchors, NOW) == \
        T.PeerCheck(True, "sts-enforce", "", True)
    bad = T.check_peer(enforce, chain(pki["self"]), anchors, NOW)
    assert not bad.ok
    assert T.check_peer(testing, chain(pki["good"]), anchors, NOW).label == "sts-testing"
    tested = T.check_peer(testing, chain(pki["self"]), anchors, NOW)
    assert tested.ok and not tested.authenticated and tested.label == "sts-testing unverified"


def test_host_tls_client_levels() -> None:
    """What the SMTP client does for each level."""
    assert [host(level).client_level for level in T.LEVELS[:5]] == \
        ["none", "may", "encrypt", "verify", "verify"]
    assert host("mta-sts", sts_mode="enforce").client_level == "verify"
    assert host("mta-sts", sts_mode="testing").client_level == "may"


def test_client_settings_per_level(pki: dict[str, Any]) -> None:
    """Verified levels get VerifiedTLS; "may" falls back to plaintext when told."""
    policy = T.TLSPolicy(Clock(), None, trust=trust(pki))
    base = ClientSettings("client.example")
    assert policy.client_settings(host("none"), "mx", base).tls == "none"
    assert policy.client_settings(host("may"), "mx", base, plaintext=True).tls == "none"
    may = policy.client_settings("may", "mx", base)
    assert (may.tls, may.tls_options) == ("may", None)
    verify = policy.client_settings(host("dane"), "mx", base)
    assert verify.tls == "verify" and isinstance(verify.tls_options, T.VerifiedTLS)
    testing = policy.client_settings(host("mta-sts", sts_mode="testing"), "mx", base)
    assert testing.tls == "may" and isinstance(testing.tls_options, T.VerifiedTLS)


def trust(pki: dict[str, Any], tmp: Any = None) -> T.Trust:
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".pem") as f:
        f.write(pki["ca"].pem)
        f.flush()
        return T.Trust(f.name)


def test_trust_reads_ca_file(pki: dict[str, Any]) -> None:
    t = trust(pki)
    assert list(t.anchors) == [pki["ca"].cert]


# -- MTA-STS parsing --------------------------------------------------------------------------------

@pytest.mark.parametrize("records, expected", [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),     # RFC 8461 3.1 example
    (["v=STSv1; id=abc"], "abc"),
    (["v=STSv1;id=abc;ext=value"], "abc"),                      # extensions are allowed
    (["v=spf1 -all", "v=STSv1; id=x1"], "x1"),                  # other TXT records ignored
    (["v=STSv1; id=a", "v=STSv1; id=b"], None),                 # two records: no policy
    (["v=STSv1;"], None),                                       # no id
    (["v=STSv1; id=has-dash"], None),                           # id is letters and digits
    (["v=STSv1; id=" + "a" * 33], None),                        # at most 32
    (["v=STSv2; id=a"], None),
    (["id=a; v=STSv1"], None),                                  # v first
    ([], None),
])
def test_parse_sts_txt(records: list[str], expected: str | None) -> None:
    assert T.parse_sts_txt(records) == expected


ids = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1,
              max_size=32)


@given(ids, st.sampled_from([";", "; ", " ;"]), st.booleans())
def test_sts_txt_id_round_trips(sts_id: str, delim: str, trailing: bool) -> None:
    """Any valid id is read back whatever the spacing around the delimiters."""
    record = f"v=STSv1{delim}id={sts_id}" + (delim if trailing else "")
    assert T.parse_sts_txt([record]) == sts_id


@given(st.lists(st.text(max_size=60), max_size=3))
def test_sts_txt_never_raises(records: list[str]) -> None:
    result = T.parse_sts_txt(records)
    assert result is None or (1 <= len(result) <= 32 and result.isalnum())


EXAMPLE_POLICY = ("version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\n"
                  "mx: *.example.net\r\nmx: backupmx.example.com\r\nmax_age: 604800\r\n")


def test_parse_sts_policy_rfc_example() -> None:
    """RFC 8461 3.2's example policy."""
    assert T.parse_sts_policy(EXAMPLE_POLICY) == T.STSPolicy(
        "enforce", ("mail.example.com", "*.example.net", "backupmx.example.com"), 604800)


@pytest.mark.parametrize("text, error", [
    ("mode: enforce\nmx: a.example\nmax_age: 1\n", "version"),
    ("version: STSv1\nmode: block\nmx: a.example\nmax_age: 1\n", "mode"),
    ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n", "max_age"),
    ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n", "max_age"),
    ("version: STSv1\nmode: enforce\nmax_age: 1\n", "no mx"),
    ("version: STSv1\nmode: enforce\nmx: bad_host!\nmax_age: 1\n", "mx pattern"),
    ("version: STSv1\nmode: enforce\nmx: a.*.example\nmax_age: 1\n", "mx pattern"),
    ("<html>not a policy</html>\n", "policy line"),
])
def test_parse_sts_policy_errors(text: str, error: str) -> None:
    with pytest.raises(T.STSPolicyError, match=error):
        T.parse_sts_policy(text)


def test_parse_sts_policy_none_mode_needs_no_mx_and_ignores_unknown_keys() -> None:
    policy = T.parse_sts_policy("version: STSv1\nmode: none\nmax_age: 86400\nfuture: yes\n")
    assert policy == T.STSPolicy("none", (), 86400)


labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)
hostnames = st.lists(labels, min_size=2, max_size=4).map(".".join)


@given(st.sampled_from(["enforce", "testing"]),
       st.lists(st.tuples(st.booleans(), hostnames), min_size=1, max_size=4),
       st.integers(0, T.STS_MAX_AGE), st.sampled_from(["\n", "\r\n"]),
       st.permutations(range(4)))
def test_sts_policy_round_trips(mode: str, mx: list[tuple[bool, str]], age: int, eol: str,
                                order: list[int]) -> None:
    """Any valid policy is read back whatever the line ends and the order of the fields."""
    patterns = [("*." if wild else "") + h for wild, h in mx]
    lines = [f"version: STSv1", f"mode: {mode}", f"max_age: {age}",
             eol.join(f"mx: {p}" for p in patterns)]
    text = eol.join(lines[i] for i in order) + eol
    assert T.parse_sts_policy(text) == T.STSPolicy(mode, tuple(patterns), age)


@given(st.text(max_size=300))
def test_sts_policy_parser_raises_only_policy_errors(text: str) -> None:
    try:
        T.parse_sts_policy(text)
    except T.STSPolicyError:
        pass


@pytest.mark.parametrize("pattern, host, matches", [
    ("mail.example.com", "mail.example.com", True),
    ("mail.example.com", "MAIL.Example.COM.", True),
    ("mail.example.com", "mx.example.com", False),
    ("*.example.net", "mx1.example.net", True),          # RFC 8461 4.1
    ("*.example.net", "example.net", False),             # the wildcard is one whole label
    ("*.example.net", "a.b.example.net", False),
    ("*.example.net", "mx1.example.net.evil.test", False),
])
def test_mx_matches(pattern: str, host: str, matches: bool) -> None:
    assert T.mx_matches(pattern, host) is matches


# -- the decision ----------------------------------------------------------------------------------

class ZoneResolver:
    """`query(name, rdtype)` from a dict {(name, type): ([rdata text], authenticated)} or a
    DNSError; anything else is NXDOMAIN."""

    def __init__(self, zone: dict[tuple[str, str], Any]) -> None:
        self.zone = zone
        self.asked: list[tuple[str, str]] = []

    def query(self, name: str, rdtype: str) -> Deferred[Answer]:
        self.asked.append((name, rdtype))
        entry = self.zone.get((name, rdtype))
        if entry is None:
            return fail(DNSError("NXDOMAIN", False, name, rdtype))
        if isinstance(entry, DNSError):
            return fail(entry)
        texts, ad = entry
        records = tuple(dns.rdata.from_text("IN", rdtype, t) for t in texts)
        return succeed(Answer(name, rdtype, "NOERROR", records, 300.0, ad))


TLSA_EE = "3 1 1 " + "ab" * 32


def route(domain: str = "example.org", *mxs: str) -> Route:
    mxs = mxs or ("mx1.example.org", "mx2.example.org")
    return Route(domain, tuple(Hop(m, f"192.0.2.{i + 1}", 25, 10 * i) for i, m in enumerate(mxs)))


def plan(zone: dict[tuple[str, str], Any], r: Route | None = None, sts: Any = None,
         **kw: Any) -> T.TLSPlan:
    policy = T.TLSPolicy(Clock(), ZoneResolver(zone), sts=sts, **kw)
    return result_of(policy.plan(r or route()))


SECURE_MX = {("example.org", "MX"): (["10 mx1.example.org.", "20 mx2.example.org."], True)}


def test_auto_uses_dane_when_mx_and_tlsa_are_validated() -> None:
    """RFC 7672 2.2: a secure MX RRset and a validated TLSA RRset: DANE for that host; the
    host without TLSA records is "may"."""
    p = plan({**SECURE_MX, ("_25._tcp.mx1.example.org", "TLSA"): ([TLSA_EE], True)})
    assert p.source == "dane"
    assert p.for_host("mx1.example.org") == T.HostTLS(
        "dane", "mx1.example.org", (T.TLSARecord(3, 1, 1, b"\xab" * 32),))
    assert p.for_host("mx2.example.org") == T.HostTLS("may", "mx2.example.org")


@pytest.mark.parametrize("mx_ad, tlsa_ad", [(False, True), (True, False)])
def test_auto_ignores_tlsa_without_ad(mx_ad: bool, tlsa_ad: bool) -> None:
    """An MX or TLSA answer the resolver did not validate gives no DANE: "may"."""
    p = plan({("example.org", "MX"): (["10 mx1.example.org."], mx_ad),
              ("_25._tcp.mx1.example.org", "TLSA"): ([TLSA_EE], tlsa_ad)})
    assert p.for_host("mx1.example.org") == T.HostTLS("may", "mx1.example.org")


def test_dane_tlsa_lookup_failure_rules_the_host_out() -> None:
    """RFC 7672 2.2: a TLSA lookup that fails for a host of a secure MX set makes it unusable
    now (no downgrade to plaintext); the reply is 4.7.5 and names the lookup."""
    p = plan({**SECURE_MX, ("_25._tcp.mx1.example.org", "TLSA"): DNSError("SERVFAIL", True)})
    reply = p.for_host("mx1.example.org")
    assert isinstance(reply, Reply) and (reply.code, reply.enhanced) == (451, "4.7.5")
    assert "_25._tcp.mx1.example.org" in reply.text
    assert p.for_host("mx2.example.org") == T.HostTLS("may", "mx2.example.org")


def test_dane_unusable_tlsa_rules_the_host_out() -> None:
    """TLSA records present but none usable (PKIX-EE here): the host waits (4.7.5)."""
    p = plan({**SECURE_MX, ("_25._tcp.mx1.example.org", "TLSA"): (["1 1 1 " + "ab" * 32], True)},
             default="dane")
    reply = p.for_host("mx1.example.org")
    assert isinstance(reply, Reply) and reply.enhanced == "4.7.5" and "usable" in reply.text


def test_tlsa_is_looked_up_at_the_hop_port() -> None:
    r = Route("example.org", (Hop("mx1.example.org", "192.0.2.1", 2525, 10),))
    zone = {**SECURE_MX, ("_2525._tcp.mx1.example.org", "TLSA"): ([TLSA_EE], True)}
    assert plan(zone, r).for_host("mx1.example.org").level == "dane"


@pytest.mark.parametrize("level", ["none", "may", "encrypt", "verify"])
def test_fixed_levels_from_tls_policy(level: str) -> None:
    """A [[tls.policy]] level applies to every MX host of the domain, without DNS."""
    resolver_zone = {**SECURE_MX, ("_25._tcp.mx1.example.org", "TLSA"): ([TLSA_EE], True)}
    p = plan(resolver_zone, level_for=lambda d: level if d == "example.org" else None)
    assert p.for_host("mx1.example.org") == T.HostTLS(level, "mx1.example.org")


def test_relayhost_uses_relayhost_tls() -> None:
    r = Route("relay:[smtp.example.net]:587", (Hop("smtp.example.net", "192.0.2.9", 587, 0),))
    p = plan({}, r, relay_level="verify", default="dane")
    assert p.for_host("smtp.example.net") == T.HostTLS("verify", "smtp.example.net")


class FixedSTS:
    def __init__(self, policy: T.STSPolicy | None) -> None:
        self.cached = T.CachedPolicy(policy, "1", 1e12) if policy else None

    def policy(self, domain: str) -> Deferred[T.CachedPolicy | None]:
        return succeed(self.cached)


def test_auto_uses_mta_sts_without_dane() -> None:
    """No DANE: an MTA-STS policy applies; in enforce mode an MX it does not list is ruled
    out (RFC 8461 4.1) with 4.7.0."""
    sts = FixedSTS(T.STSPolicy("enforce", ("mx1.example.org",), 86400))
    p = plan({("example.org", "MX"): (["10 mx1.example.org."], False)}, sts=sts)
    assert p.for_host("mx1.example.org") == T.HostTLS("mta-sts", "mx1.example.org",
                                                      sts_mode="enforce")
    reply = p.for_host("mx2.example.org")
    assert isinstance(reply, Reply) and reply.enhanced == "4.7.0" and "not listed" in reply.text


def test_dane_wins_over_mta_sts() -> None:
    """RFC 8461 2: where DANE applies, MTA-STS is not used."""
    sts = FixedSTS(T.STSPolicy("enforce", ("nothing.example",), 86400))
    p = plan({**SECURE_MX, ("_25._tcp.mx1.example.org", "TLSA"): ([TLSA_EE], True)}, sts=sts)
    assert p.for_host("mx1.example.org").level == "dane"


@pytest.mark.parametrize("policy, level", [(None, "may"),
                                           (T.STSPolicy("none", (), 60), "may"),
                                           (T.STSPolicy("testing", ("x.example",), 60),
                                            "mta-sts")])
def test_mta_sts_level_without_policy_is_may(policy: Any, level: str) -> None:
    """No policy, or mode none: "may"; testing: every MX host, listed or not, checked and
    logged but never refused."""
    p = plan({}, sts=FixedSTS(policy), default="mta-sts")
    assert p.for_host("mx2.example.org").level == level


def test_dane_level_does_not_use_mta_sts() -> None:
    sts = FixedSTS(T.STSPolicy("enforce", ("nothing.example",), 86400))
    p = plan({}, sts=sts, level_for=lambda d: "dane")
    assert p.for_host("mx1.example.org") == T.HostTLS("may", "mx1.example.org")


# -- MTA-STS: resolver, fetch, cache -----------------------------------------------------------

class FakeFetcher:
    def __init__(self, text: str | Exception) -> None:
        self.text = text
        self.fetched: list[str] = []

    def fetch(self, domain: str) -> Deferred[T.STSPolicy]:
        self.fetched.append(domain)
        if isinstance(self.text, Exception):
            return fail(self.text)
        try:
            return succeed(T.parse_sts_policy(self.text))
        except T.STSPolicyError as e:
            return fail(e)


def sts_setup(txt: str | None, fetcher: FakeFetcher, store: Any = None,
              clock: Clock | None = None) -> tuple[T.STSResolver, ZoneResolver, Clock]:
    clock = clock or Clock()
    zone = {("_mta-sts.example.org", "TXT"): ([f'"{txt}"'], False)} if txt else {}
    resolver = ZoneResolver(zone)
    return T.STSResolver(clock, resolver, fetcher, T.STSCache(clock, store)), resolver, clock


POLICY_A = "version: STSv1\nmode: enforce\nmx: mx1.example.org\nmax_age: 3600\n"
POLICY_B = "version: STSv1\nmode: testing\nmx: *.example.org\nmax_age: 3600\n"


def test_sts_policy_fetched_once_and_cached_while_the_id_holds() -> None:
    fetcher = FakeFetcher(POLICY_A)
    sts, _, clock = sts_setup("v=STSv1; id=one", fetcher)
    first = result_of(sts.policy("example.org"))
    assert first.policy.mode == "enforce" and first.id == "one"
    clock.advance(1800)
    assert result_of(sts.policy("example.org")) == first
    assert fetcher.fetched == ["example.org"]


def test_sts_new_id_fetches_again() -> None:
    """RFC 8461 3.3: a changed id means a new policy."""
    fetcher = FakeFetcher(POLICY_A)
    sts, resolver, _ = sts_setup("v=STSv1; id=one", fetcher)
    result_of(sts.policy("example.org"))
    resolver.zone[("_mta-sts.example.org", "TXT")] = (['"v=STSv1; id=two"'], False)
    fetcher.text = POLICY_B
    assert result_of(sts.policy("example.org")).policy.mode == "testing"
    assert len(fetcher.fetched) == 2


def test_sts_cached_policy_outlives_the_txt_record_until_max_age() -> None:
    """RFC 8461 3.3, 5.1: without the TXT record the cached policy applies until it expires."""
    sts, resolver, clock = sts_setup("v=STSv1; id=one", FakeFetcher(POLICY_A))
    result_of(sts.policy("example.org"))
    del resolver.zone[("_mta-sts.example.org", "TXT")]
    clock.advance(3599)
    assert result_of(sts.policy("example.org")) is not None
    clock.advance(2)
    assert result_of(sts.policy("example.org")) is None


def test_sts_fetch_failure_keeps_the_cached_policy_and_waits_before_retrying() -> None:
    fetcher = FakeFetcher(POLICY_A)
    sts, resolver, clock = sts_setup("v=STSv1; id=one", fetcher)
    cached = result_of(sts.policy("example.org"))
    resolver.zone[("_mta-sts.example.org", "TXT")] = (['"v=STSv1; id=two"'], False)
    fetcher.text = T.STSFetchError("HTTP 500")
    assert result_of(sts.policy("example.org")) == cached
    assert result_of(sts.policy("example.org")) == cached
    assert len(fetcher.fetched) == 2            # the failure is remembered
    clock.advance(T.STS_FAILURE_TTL + 1)
    result_of(sts.policy("example.org"))
    assert len(fetcher.fetched) == 3


def test_sts_no_policy_without_txt_or_with_a_bad_policy() -> None:
    """RFC 8461 5.1: a TXT record but no valid policy (and none cached): no MTA-STS."""
    assert result_of(sts_setup(None, FakeFetcher(POLICY_A))[0].policy("example.org")) is None
    bad = sts_setup("v=STSv1; id=one", FakeFetcher("garbage"))[0]
    assert result_of(bad.policy("example.org")) is None


def test_sts_cache_persists_in_the_spool_store() -> None:
    """A policy is written to the spool's cache and read back by a new cache (a restart)."""
    spool, clock = MemorySpool(), Clock()
    sts, _, _ = sts_setup("v=STSv1; id=one", FakeFetcher(POLICY_A), spool, clock)
    result_of(sts.policy("example.org"))
    assert set(spool.cache) == {"mta-sts:example.org"}
    again = T.STSCache(clock, spool)
    got = result_of(Deferred.fromCoroutine(again.get("example.org")))
    assert got is not None and got.policy.mx == ("mx1.example.org",) and got.id == "one"
    clock.advance(3601)
    assert result_of(Deferred.fromCoroutine(T.STSCache(clock, spool).get("example.org"))) is None


# -- the "may" fallback -----------------------------------------------------------------------

def key(level: Any = "may") -> PoolKey:
    return PoolKey("example.org", "mx1.example.org", "192.0.2.1", 25, level, "", "client")


class Connects:
    """A pool `connect` whose first calls fail as told."""

    def __init__(self, *failures: str) -> None:
        self.failures = list(failures)
        self.calls = 0

    def __call__(self, k: PoolKey) -> Deferred[Any]:
        self.calls += 1
        if self.failures:
            kind = self.failures.pop(0)
            return fail(SessionFailureError(SessionFailure(
                "starttls", Reply(451, "4.7.0", f"TLS {kind}"), tls_failure=kind)))
        return succeed("client")


def test_may_handshake_failure_retries_in_plaintext_and_remembers_for_an_hour() -> None:
    clock = Clock()
    connects = Connects("handshake")
    fallback = T.MayFallback(clock, connects)
    assert result_of(fallback(key())) == "client"
    assert connects.calls == 2 and fallback.plaintext(key())
    clock.advance(T.MAY_PLAINTEXT_TTL - 1)
    assert fallback.plaintext(key())
    clock.advance(2)
    assert not fallback.plaintext(key())


@pytest.mark.parametrize("level, kind", [("encrypt", "handshake"), ("verify", "handshake"),
                                         (T.HostTLS("dane", "mx1"), "handshake"),
                                         ("may", "verification"), ("may", "refused")])
def test_no_plaintext_retry_except_after_a_may_handshake_failure(level: Any, kind: str) -> None:
    connects = Connects(kind)
    fallback = T.MayFallback(Clock(), connects)
    with pytest.raises(SessionFailureError):
        result_of(fallback(key(level)))
    assert connects.calls == 1 and not fallback.plaintext(key(level))
