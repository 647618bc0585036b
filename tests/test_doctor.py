"""`txmta doctor`: every check against the real test DNS server on 127.0.0.53, one domain
per defect (no SPF, too many SPF lookups, an address SPF does not authorise, a wrong or
revoked DKIM key, no DMARC, DMARC p=none, no PTR, a PTR that does not match, ...) and one
healthy domain where everything passes; then the command itself, as a subprocess with
--json, a configuration file and the DNS server as a separate process.  DKIM keys are made
at test time."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import dns.reversename
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from dnsserver import running
from livedns import serving
from txmta import config, doctor
from txmta.config import DkimKey
from txmta.doctor import FAIL, INFO, PASS, WARN, Row, Setup

# -- keys ---------------------------------------------------------------------------------


def _pem(key: Any, fmt: Any = serialization.PrivateFormat.PKCS8) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Private key files and their public keys: an RSA key (PKCS#1 PEM), an Ed25519 key
    (PKCS#8 PEM) and another RSA key for the wrong-key zone."""
    d = tmp_path_factory.mktemp("keys")
    rsa_key = rsa.generate_private_key(65537, 2048)
    other = rsa.generate_private_key(65537, 1024)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    (d / "rsa.pem").write_bytes(_pem(rsa_key, serialization.PrivateFormat.TraditionalOpenSSL))
    (d / "ed.pem").write_bytes(_pem(ed_key))

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return {
        "rsa": str(d / "rsa.pem"), "ed": str(d / "ed.pem"),
        "rsa_p": b64(rsa_key.public_key().public_bytes(der, spki)),
        "rsa_pkcs1_p": b64(rsa_key.public_key().public_bytes(
            der, serialization.PublicFormat.PKCS1)),
        "other_p": b64(other.public_key().public_bytes(der, spki)),
        "ed_p": b64(ed_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                       serialization.PublicFormat.Raw)),
    }


def _txt(text: str) -> str:
    """`text` as one TXT record of strings of at most 255 characters (zone-file syntax)."""
    return " ".join('"' + text[i:i + 255] + '"' for i in range(0, len(text), 255))


def _ptr(ip: str) -> str:
    return dns.reversename.from_address(ip).to_text()


# -- the zone: one domain per case ------------------------------------------------------

# domain → its outbound address (each case its own, so that PTRs do not collide)
IPS = {
    "healthy.test": "127.0.1.1", "nospf.test": "127.0.1.2", "manyspf.test": "127.0.1.3",
    "unauth.test": "127.0.1.4", "wrongdkim.test": "127.0.1.5", "revoked.test": "127.0.1.6",
    "nodmarc.test": "127.0.1.7", "dmarcnone.test": "127.0.1.8", "noptr.test": "127.0.1.9",
    "ptrother.test": "127.0.1.10", "ptrliar.test": "127.0.1.11", "twospf.test": "127.0.1.12",
    "plusall.test": "127.0.1.13", "ptrmech.test": "127.0.1.14", "nullmx.test": "127.0.1.15",
    "nomx.test": "127.0.1.16", "pkcs1.test": "127.0.1.17", "badsts.test": "127.0.1.18",
    "sub.org.test": "127.0.1.19", "broken.test": "127.0.1.20", "nodkim.test": "127.0.1.21",
    "unaligned.test": "127.0.1.22", "badspf.test": "127.0.1.23", "v6.test": "::1",
}


def healthy(domain: str, ip: str, keys: dict[str, Any]) -> dict[str, Any]:
    """The records of a domain where every check passes."""
    family = "AAAA" if ":" in ip else "A"
    return {
        f"{domain}.": {"TXT": [f"v=spf1 ip{6 if ':' in ip else 4}:{ip} include:_spf.{domain} -all"],
                       "MX": [[10, f"mx.{domain}."]]},
        f"_spf.{domain}.": {"TXT": ["v=spf1 ip4:127.0.0.250 -all"]},
        f"mx.{domain}.": {"A": ["127.0.0.200"]},
        f"mail.{domain}.": {family: [ip]},
        _ptr(ip): {"PTR": [f"mail.{domain}."]},
        f"s1._domainkey.{domain}.": {"TXT": [_txt(f"v=DKIM1; k=rsa; p={keys['rsa_p']}")]},
        f"e1._domainkey.{domain}.": {"TXT": [f"v=DKIM1; k=ed25519; p={keys['ed_p']}"]},
        f"_dmarc.{domain}.": {"TXT": [f"v=DMARC1; p=reject; rua=mailto:dmarc@{domain}"]},
        f"_mta-sts.{domain}.": {"TXT": ["v=STSv1; id=20260101T000000"]},
        f"_smtp._tls.{domain}.": {"TXT": [f"v=TLSRPTv1; rua=mailto:tls@{domain}"]},
    }


def build_zone(keys: dict[str, Any]) -> dict[str, Any]:
    zone: dict[str, Any] = {}
    for domain, ip in IPS.items():
        zone.update(healthy(domain, ip, keys))

    def records(name: str) -> dict[str, Any]:
        return zone.setdefault(name, {})
    del records("nospf.test.")["TXT"]
    # 1 + 4 + 4 + 3 = 12 DNS-querying terms through nested includes
    records("manyspf.test.")["TXT"] = ["v=spf1 ip4:127.0.1.3 include:i1.manyspf.test -all"]
    records("i1.manyspf.test.")["TXT"] = ["v=spf1 a mx include:i2.manyspf.test "
                                          "include:i3.manyspf.test -all"]
    records("i1.manyspf.test.")["A"] = ["127.0.0.251"]
    records("i1.manyspf.test.")["MX"] = [[10, "mx.manyspf.test."]]
    records("i2.manyspf.test.")["TXT"] = ["v=spf1 a:mx.manyspf.test a:mail.manyspf.test "
                                          "mx:manyspf.test exists:mx.manyspf.test -all"]
    records("i3.manyspf.test.")["TXT"] = ["v=spf1 a:mx.manyspf.test mx:manyspf.test "
                                          "a:mail.manyspf.test -all"]
    records("unauth.test.")["TXT"] = ["v=spf1 ip4:127.0.9.9 -all"]
    records("s1._domainkey.wrongdkim.test.")["TXT"] = [f"v=DKIM1; k=rsa; p={keys['other_p']}"]
    records("s1._domainkey.revoked.test.")["TXT"] = ["v=DKIM1; k=rsa; p="]
    del zone["_dmarc.nodmarc.test."]
    records("_dmarc.dmarcnone.test.")["TXT"] = ["v=DMARC1; p=none; rua=mailto:d@dmarcnone.test"]
    del zone[_ptr(IPS["noptr.test"])]
    # a PTR that resolves back, but to another name than ours
    records(_ptr(IPS["ptrother.test"]))["PTR"] = ["host-10.isp.test."]
    records("host-10.isp.test.")["A"] = [IPS["ptrother.test"]]
    # a PTR whose name does not resolve back to the address
    records(_ptr(IPS["ptrliar.test"]))["PTR"] = ["elsewhere.isp.test."]
    records("elsewhere.isp.test.")["A"] = ["127.0.0.99"]
    records("twospf.test.")["TXT"] = ["v=spf1 ip4:127.0.1.12 -all", "v=spf1 mx -all"]
    records("plusall.test.")["TXT"] = ["v=spf1 ip4:127.0.1.13 +all"]
    records("ptrmech.test.")["TXT"] = ["v=spf1 ip4:127.0.1.14 ptr -all"]
    records("nullmx.test.")["MX"] = [[0, "."]]
    del records("nomx.test.")["MX"]
    records("nomx.test.")["A"] = ["127.0.0.201"]
    records("s1._domainkey.pkcs1.test.")["TXT"] = [_txt(f"v=DKIM1; p={keys['rsa_pkcs1_p']}")]
    records("_mta-sts.badsts.test.")["TXT"] = ["v=STSv1; id=not-alnum!"]
    records("_smtp._tls.badsts.test.")["TXT"] = ["v=TLSRPTv1; rua=ftp://x.test"]
    del zone["_dmarc.sub.org.test."]
    records("_dmarc.org.test.")["TXT"] = ["v=DMARC1; p=none; sp=quarantine; adkim=s"]
    records("unaligned.test.")["TXT"] = ["v=spf1 -all"]
    records("badspf.test.")["TXT"] = ["v=spf1 ip4:127.0.1.23 include -all"]
    zone["_servfail"] = ["broken.test.", "_dmarc.broken.test.", "s1._domainkey.broken.test."]
    # an IP pool: .24 named mta1.pool.test both ways, .25 named mta2.pool.test (its helo
    # is mta9.pool.test in the configuration), both authorised by SPF
    records("pool.test.")["TXT"] = ["v=spf1 ip4:127.0.1.24 ip4:127.0.1.25 -all"]
    for ip, host in (("127.0.1.24", "mta1.pool.test."), ("127.0.1.25", "mta2.pool.test.")):
        records(_ptr(ip))["PTR"] = [host]
        records(host)["A"] = [ip]
    return zone


def setup_for(domain: str, keys: dict[str, Any], dkim: bool = True) -> Setup:
    dkim_keys = (DkimKey(domain, "s1", keys["rsa"]),
                 DkimKey(domain, "e1", keys["ed"], "ed25519-sha256")) if dkim else ()
    return Setup(domain, f"mail.{domain}", f"mail.{domain}", ((IPS[domain], "--address"),),
                 dkim_keys)


@pytest.fixture(scope="module")
def ask(keys: dict[str, Any]) -> Any:
    with serving(build_zone(keys)) as run:
        yield run


@pytest.fixture
def check(ask: Any, keys: dict[str, Any]) -> Any:
    """`check(domain, dkim=True)`: the doctor's rows for `domain`, as a dict by check name."""
    def run(domain: str, dkim: bool = True, setup: Setup | None = None) -> dict[str, Row]:
        rows = ask(lambda r: doctor.diagnose(r, setup or setup_for(domain, keys, dkim)))
        assert isinstance(rows, list), rows
        by_name = {row.check: row for row in rows}
        assert len(by_name) == len(rows), "check names are unique"
        return by_name
    return run


def statuses(rows: dict[str, Row]) -> dict[str, str]:
    return {name: row.status for name, row in rows.items()}


# -- the healthy domain ---------------------------------------------------------------------

@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_healthy_domain_passes_every_check(check: Any) -> None:
    """A domain with SPF, both DKIM keys, DMARC p=reject, MX, FCrDNS, MTA-STS and TLS-RPT
    passes everything: no warn, no fail."""
    rows = check("healthy.test")
    assert statuses(rows) == {
        "outbound addresses": INFO, "SPF record": PASS, "SPF lookups": PASS, "SPF terms": PASS,
        "SPF 127.0.1.1": PASS, "DKIM s1": PASS, "DKIM e1": PASS, "DMARC": PASS, "MX": PASS,
        "FCrDNS 127.0.1.1": PASS, "MTA-STS": PASS, "TLS-RPT": PASS}
    assert not doctor.failed(list(rows.values()))
    assert "1 of at most 10" in rows["SPF lookups"].detail
    assert "rsa 2048 bits" in rows["DKIM s1"].detail and "ed25519" in rows["DKIM e1"].detail
    assert rows["FCrDNS 127.0.1.1"].detail == "127.0.1.1 -> mail.healthy.test -> 127.0.1.1"


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_healthy_ipv6_address(check: Any) -> None:
    """An IPv6 outbound address is checked with ip6: and an ip6.arpa PTR."""
    rows = check("v6.test")
    assert rows["SPF ::1"].status == PASS and rows["FCrDNS ::1"].status == PASS


# -- SPF ------------------------------------------------------------------------------------

@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_no_spf_record_fails_with_a_record_to_publish(check: Any) -> None:
    """No v=spf1 record: one failing SPF row suggesting a record with our address."""
    rows = check("nospf.test")
    row = rows["SPF record"]
    assert row.status == FAIL and "no v=spf1 TXT record" in row.detail
    assert "v=spf1 ip4:127.0.1.2 -all" in row.fix
    assert "SPF lookups" not in rows and "SPF 127.0.1.2" not in rows


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_too_many_spf_lookups_fail_with_count_and_chain(check: Any) -> None:
    """12 DNS-querying terms through nested includes: fail, with the count and each
    record's share (RFC 7208 4.6.4)."""
    row = check("manyspf.test")["SPF lookups"]
    assert row.status == FAIL
    assert row.detail.startswith("12 DNS-querying terms, more than 10")
    for part in ("manyspf.test: 1 (include:i1.manyspf.test)", "i1.manyspf.test: 4",
                 "i2.manyspf.test: 4", "i3.manyspf.test: 3"):
        assert part in row.detail
    assert "ip4:/ip6:" in row.fix


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_spf_not_authorising_the_address_fails(check: Any) -> None:
    """check_host() gives fail for our address: the row says so and what to add."""
    row = check("unauth.test")["SPF 127.0.1.4"]
    assert row.status == FAIL and row.detail.startswith("fail (matched -all in unauth.test)")
    assert "add ip4:127.0.1.4" in row.fix


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_two_spf_records_fail(check: Any) -> None:
    """RFC 7208 3.2: two v=spf1 records are a permerror."""
    row = check("twospf.test")["SPF record"]
    assert row.status == FAIL and "2 v=spf1 records" in row.detail and "merge" in row.fix


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_spf_syntax_error_fails(check: Any) -> None:
    """A record that does not parse fails and names the bad term."""
    row = check("badspf.test")["SPF record"]
    assert row.status == FAIL and "syntax error" in row.detail and "'include'" in row.detail


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_plus_all_fails_and_ptr_warns(check: Any) -> None:
    """+all authorises the whole internet (fail); ptr is discouraged (warn)."""
    assert check("plusall.test")["SPF terms"].status == FAIL
    row = check("ptrmech.test")["SPF terms"]
    assert row.status == WARN and "ptr" in row.detail


# -- DKIM -----------------------------------------------------------------------------------

@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_wrong_dkim_key_fails_with_the_record_to_publish(check: Any, keys: dict[str, Any]) -> None:
    """The published p= is another key: fail, and the fix is the record of our key."""
    rows = check("wrongdkim.test")
    row = rows["DKIM s1"]
    assert row.status == FAIL and "not the one in" in row.detail
    assert keys["rsa_p"] in row.fix and "s1._domainkey.wrongdkim.test." in row.fix
    assert rows["DKIM e1"].status == PASS


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_revoked_dkim_key_fails(check: Any) -> None:
    """An empty p= revokes the key (RFC 6376 3.6.1)."""
    row = check("revoked.test")["DKIM s1"]
    assert row.status == FAIL and "revoked" in row.detail


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_pkcs1_rsa_public_key_is_accepted(check: Any) -> None:
    """A p= holding the PKCS#1 RSAPublicKey (without k=) still matches our key."""
    assert check("pkcs1.test")["DKIM s1"].status == PASS


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_no_dkim_key_configured_warns(check: Any) -> None:
    """Without a [[dkim]] key for the domain, mail is not signed: warn."""
    row = check("nodkim.test", dkim=False)["DKIM"]
    assert row.status == WARN and "not signed" in row.detail


# -- DMARC ----------------------------------------------------------------------------------

@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_no_dmarc_record_fails(check: Any) -> None:
    """No _dmarc record: fail, with a p=none record to start from."""
    row = check("nodmarc.test")["DMARC"]
    assert row.status == FAIL and "no v=DMARC1 record at _dmarc.nodmarc.test" in row.detail
    assert "v=DMARC1; p=none" in row.fix


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_dmarc_p_none_warns(check: Any) -> None:
    """p=none is monitoring only: warn, with the alignment reported."""
    row = check("dmarcnone.test")["DMARC"]
    assert row.status == WARN and "monitoring only" in row.detail
    assert "adkim=r (relaxed), aspf=r (relaxed)" in row.detail


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_dmarc_from_organizational_domain_uses_sp(check: Any) -> None:
    """sub.org.test has no record: org.test's applies, with its sp= and adkim=s, and the
    row says where it came from."""
    row = check("sub.org.test")["DMARC"]
    assert row.status == PASS, row
    assert "p=quarantine (from the organizational domain org.test" in row.detail
    assert "adkim=s (strict)" in row.detail


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_dmarc_warns_when_nothing_aligned_passes(check: Any) -> None:
    """No DKIM key and an SPF record that fails our address: p=reject hits our own mail."""
    row = check("unaligned.test", dkim=False)["DMARC"]
    assert row.status == WARN and "neither DKIM nor SPF passes" in row.detail


# -- MX -------------------------------------------------------------------------------------

@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_null_mx_and_implicit_mx_warn(check: Any) -> None:
    """RFC 7505 null MX: warn (bounces cannot come back); no MX but an address: warn."""
    row = check("nullmx.test")["MX"]
    assert row.status == WARN and "null MX" in row.detail
    row = check("nomx.test")["MX"]
    assert row.status == WARN and "implicit MX" in row.detail and "127.0.0.201" in row.detail


# -- FCrDNS ---------------------------------------------------------------------------------

@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_no_ptr_fails(check: Any) -> None:
    """An outbound address without a PTR record fails."""
    row = check("noptr.test")["FCrDNS 127.0.1.9"]
    assert row.status == FAIL and "no PTR record" in row.detail
    assert "mail.noptr.test" in row.fix


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_ptr_for_another_name_warns(check: Any) -> None:
    """A forward-confirmed PTR naming another host than server.hostname: warn."""
    row = check("ptrother.test")["FCrDNS 127.0.1.10"]
    assert row.status == WARN
    assert row.detail == ("127.0.1.10 -> host-10.isp.test -> 127.0.1.10, but server.hostname "
                          "is mail.ptrother.test")


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_ptr_not_resolving_back_fails(check: Any) -> None:
    """A PTR whose name does not have the address: not forward-confirmed, fail."""
    row = check("ptrliar.test")["FCrDNS 127.0.1.11"]
    assert row.status == FAIL and "does not resolve back" in row.detail


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_every_pool_address_is_checked_with_its_own_helo_name(check: Any, tmp_path: Path,
                                                              keys: dict[str, Any]) -> None:
    """Each [[pool]] address is an outbound address: SPF and FCrDNS are checked for it,
    FCrDNS against the HELO name that address gives; a mismatch names the pool setting."""
    path = tmp_path / "txmta.toml"
    path.write_text("""
[server]
hostname = "mail.pool.test"
[[pool]]
name = "bulk"
addresses = [{address = "127.0.1.24", helo = "mta1.pool.test"},
             {address = "127.0.1.25", helo = "mta9.pool.test"}]
""")
    setup = Setup.from_config(config.load(str(path)), "pool.test")
    rows = check("pool.test", setup=setup)
    assert rows["outbound addresses"].detail == "127.0.1.24 (pool bulk), 127.0.1.25 (pool bulk)"
    assert rows["SPF 127.0.1.24"].status == PASS and rows["SPF 127.0.1.25"].status == PASS
    assert rows["FCrDNS 127.0.1.24"].status == PASS
    assert rows["FCrDNS 127.0.1.24"].detail == "127.0.1.24 -> mta1.pool.test -> 127.0.1.24"
    row = rows["FCrDNS 127.0.1.25"]
    assert row.status == WARN
    assert row.detail == ("127.0.1.25 -> mta2.pool.test -> 127.0.1.25, but the helo of "
                          "127.0.1.25 in pool[0] (bulk) is mta9.pool.test")
    assert row.fix.endswith("or set the helo of 127.0.1.25 in pool[0] (bulk) to mta2.pool.test")


# -- MTA-STS, TLS-RPT -----------------------------------------------------------------------

@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_mta_sts_and_tls_rpt(check: Any) -> None:
    """Malformed records warn; absent ones are an info row, not a failure."""
    rows = check("badsts.test")
    assert rows["MTA-STS"].status == WARN and rows["TLS-RPT"].status == WARN
    rows = check("nodmarc.test", setup=Setup("absent.test", "mail.absent.test",
                                             "mail.absent.test", (("127.0.1.1", "--address"),)))
    assert (rows["MTA-STS"].status, rows["MTA-STS"].detail) == (INFO, "not published")
    assert (rows["TLS-RPT"].status, rows["TLS-RPT"].detail) == (INFO, "not published")


# -- DNS trouble and our side -------------------------------------------------------------

@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_servfail_gives_rows_not_exceptions(check: Any) -> None:
    """SERVFAIL on the domain's names: rows saying which lookup failed."""
    rows = check("broken.test")
    for name in ("SPF record", "DKIM s1", "DMARC", "MX"):
        assert rows[name].status == FAIL and "DNS lookup failed" in rows[name].detail, name
        assert "SERVFAIL" in rows[name].detail


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_timeout_gives_rows(keys: dict[str, Any]) -> None:
    """A nameserver that never answers: every lookup row fails or warns; none raises."""
    zone = healthy("slow.test", "127.0.1.30", keys)
    zone["_drop"] = list(zone)
    with serving(zone, timeout=0.2) as ask:
        rows = ask(lambda r: doctor.diagnose(r, Setup("slow.test", "mail.slow.test",
                                                      "mail.slow.test")))
    assert isinstance(rows, list)
    by_name = {r.check: r for r in rows}
    assert by_name["outbound addresses"].status == FAIL
    assert "TIMEOUT" in by_name["outbound addresses"].detail
    assert by_name["SPF record"].status == FAIL and by_name["MTA-STS"].status == WARN


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_addresses_default_to_server_hostname(check: Any) -> None:
    """Without source_address or --address, the addresses of server.hostname are checked,
    and the row says so."""
    rows = check("healthy.test", setup=Setup("healthy.test", "mail.healthy.test",
                                             "mail.healthy.test"))
    assert "the addresses of server.hostname mail.healthy.test" in rows["outbound addresses"].detail
    assert rows["SPF 127.0.1.1"].status == PASS and rows["FCrDNS 127.0.1.1"].status == PASS


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_relayhost_without_address_warns(check: Any) -> None:
    """With a relayhost, receivers see its addresses: warn unless --address names them."""
    rows = check("healthy.test", setup=Setup("healthy.test", "mail.healthy.test",
                                             "mail.healthy.test", relayhost="[127.0.0.2]:587"))
    assert rows["relayhost"].status == WARN and "--address" in rows["relayhost"].fix


def test_setup_from_config(tmp_path: Path, keys: dict[str, Any]) -> None:
    """source_address first, then each --address once; only DOMAIN's [[dkim]] keys; the
    HELO name is delivery.helo_name when set.  A bad domain or address is a ValueError."""
    path = tmp_path / "txmta.toml"
    path.write_text(f"""
[server]
hostname = "Mail.Example.TEST."
[delivery]
source_address = "127.0.0.9"
helo_name = "out.example.test"
[[dkim]]
domain = "example.test"
selector = "s1"
key = "{keys['rsa']}"
[[dkim]]
domain = "other.test"
selector = "s1"
key = "{keys['rsa']}"
""")
    cfg = config.load(str(path))
    s = Setup.from_config(cfg, "Example.Test.", ["127.0.0.10", "127.0.0.9", "::1"])
    assert s.domain == "example.test" and s.hostname == "mail.example.test"
    assert s.helo_name == "out.example.test"
    assert s.addresses == (("127.0.0.9", "delivery.source_address"),
                           ("127.0.0.10", "--address"), ("::1", "--address"))
    assert [k.domain for k in s.dkim] == ["example.test"]
    assert s.helo_for("127.0.0.9") == ("out.example.test", "delivery.helo_name")
    for bad_domain in ("localhost", "a..b", "-x.test", ""):
        with pytest.raises(ValueError):
            Setup.from_config(cfg, bad_domain)
    with pytest.raises(ValueError, match="not an IP address"):
        Setup.from_config(cfg, "example.test", ["300.1.1.1"])


# -- keys and records without DNS ---------------------------------------------------------

def test_public_key_of_reads_rsa_and_ed25519(keys: dict[str, Any]) -> None:
    """The DKIM p= of a PEM private key: DER SubjectPublicKeyInfo for RSA, the raw 32
    bytes for Ed25519; the base64 seed form of Ed25519 is read too; junk is a ValueError."""
    rsa_pub = doctor.public_key_of(Path(keys["rsa"]).read_bytes())
    assert (rsa_pub.k, rsa_pub.bits) == ("rsa", 2048)
    assert base64.b64encode(rsa_pub.p).decode() == keys["rsa_p"]
    ed_pub = doctor.public_key_of(Path(keys["ed"]).read_bytes())
    assert ed_pub.k == "ed25519" and base64.b64encode(ed_pub.p).decode() == keys["ed_p"]
    seed = ed25519.Ed25519PrivateKey.generate()
    raw = seed.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    assert doctor.public_key_of(base64.b64encode(raw)).p == seed.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    with pytest.raises(ValueError):
        doctor.public_key_of(b"not a key")


def test_same_key_compares_rsa_by_numbers(keys: dict[str, Any]) -> None:
    """SPKI and PKCS#1 forms of our key match; another key, another k= or junk do not."""
    ours = doctor.public_key_of(Path(keys["rsa"]).read_bytes())
    assert doctor.same_key(ours, "rsa", base64.b64decode(keys["rsa_p"]))
    assert doctor.same_key(ours, "rsa", base64.b64decode(keys["rsa_pkcs1_p"]))
    assert not doctor.same_key(ours, "rsa", base64.b64decode(keys["other_p"]))
    assert not doctor.same_key(ours, "ed25519", base64.b64decode(keys["rsa_p"]))
    assert not doctor.same_key(ours, "rsa", b"junk")


@pytest.mark.parametrize("text,tags", [
    ("v=DKIM1; k=rsa; p=AB CD", {"v": "DKIM1", "k": "rsa", "p": "AB CD"}),
    (" v = DMARC1 ;p=none;", {"v": "DMARC1", "p": "none"}),
    ("", {}),
])
def test_parse_tags(text: str, tags: dict[str, str]) -> None:
    """Tag lists (RFC 6376 3.2): white space around tags and values ignored, a trailing ";"
    allowed."""
    assert doctor.parse_tags(text) == tags


@pytest.mark.parametrize("text", ["v=DKIM1; junk", "p=a; p=b", "=x"])
def test_parse_tags_rejects_bad_lists(text: str) -> None:
    """A part without "=", a repeated tag or an empty tag name is a ValueError."""
    with pytest.raises(ValueError):
        doctor.parse_tags(text)


def test_report_text_and_json() -> None:
    """The text table aligns the columns and puts each fix under its detail; the JSON has
    the domain, a summary and every row."""
    rows = [Row(PASS, "SPF record", "v=spf1 -all"),
            Row(FAIL, "FCrDNS 127.0.0.1", "no PTR record", "ask for one")]
    text = doctor.report_text("example.test", rows).splitlines()
    assert text[0] == "STATUS  CHECK             DETAIL"
    assert text[1] == "pass    SPF record        v=spf1 -all"
    assert text[2] == "fail    FCrDNS 127.0.0.1  no PTR record"
    assert text[3] == "                          fix: ask for one"
    assert text[-1] == "example.test: 1 pass, 0 warn, 1 fail, 0 info"
    doc = doctor.report_json("example.test", rows)
    assert doc["domain"] == "example.test" and doc["ok"] is False
    assert doc["summary"] == {"pass": 1, "warn": 0, "fail": 1, "info": 0}
    assert doc["rows"][1] == {"status": "fail", "check": "FCrDNS 127.0.0.1",
                              "detail": "no PTR record", "fix": "ask for one"}


# -- the command ----------------------------------------------------------------------------

def _txmta() -> list[str]:
    exe = Path(sys.executable).with_name("txmta")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "txmta.cli"]


def _config(tmp_path: Path, nameserver: tuple[str, int], keys: dict[str, Any],
            domain: str) -> Path:
    path = tmp_path / "txmta.toml"
    path.write_text(f"""
[server]
hostname = "mail.{domain}"
[dns]
nameservers = ["{nameserver[0]}:{nameserver[1]}"]
[delivery]
source_address = "{IPS[domain]}"
[[dkim]]
domain = "{domain}"
selector = "s1"
key = "{keys['rsa']}"
""")
    return path


@pytest.mark.integration  # real processes and sockets on loopback
def test_command_json_against_config_and_dns_server(tmp_path: Path,
                                                    keys: dict[str, Any]) -> None:
    """`txmta doctor DOMAIN --json --config FILE` asks dns.nameservers: exit 0 and every
    row passing for the healthy domain; exit 1 with the failing rows for a domain with
    defects; the text table without --json."""
    with running(build_zone(keys)) as nameserver:
        path = _config(tmp_path, nameserver, keys, "healthy.test")
        out = subprocess.run(_txmta() + ["doctor", "healthy.test", "--json", "--config",
                                         str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["domain"] == "healthy.test" and doc["ok"] is True
        assert {r["check"]: r["status"] for r in doc["rows"]}["DKIM s1"] == "pass"
        assert doc["summary"]["fail"] == doc["summary"]["warn"] == 0

        path = _config(tmp_path, nameserver, keys, "noptr.test")
        out = subprocess.run(_txmta() + ["doctor", "noptr.test", "--json", "--config",
                                         str(path), "--address", "127.0.1.1"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, out.stderr
        rows = {r["check"]: r for r in json.loads(out.stdout)["rows"]}
        assert rows["FCrDNS 127.0.1.9"]["status"] == "fail"
        assert rows["SPF 127.0.1.1"]["status"] == "fail"        # not in noptr.test's SPF
        assert "127.0.1.1 (--address)" in rows["outbound addresses"]["detail"]

        out = subprocess.run(_txmta() + ["doctor", "noptr.test", "--config", str(path)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1
        assert out.stdout.startswith("STATUS  CHECK")
        assert "fail    FCrDNS 127.0.1.9" in out.stdout


@pytest.mark.integration  # a real process
def test_command_usage_and_config_errors_exit_2(tmp_path: Path) -> None:
    """A bad domain, a bad --address, an unreadable configuration: exit 2, one line on
    stderr, no traceback."""
    path = tmp_path / "txmta.toml"
    path.write_text('[dns]\nnameservers = ["127.0.0.53:9"]\n')
    for argv, message in ((["doctor", "localhost", "--config", str(path)], "not a domain name"),
                          (["doctor", "example.test", "--address", "x", "--config", str(path)],
                           "not an IP address"),
                          (["doctor", "example.test", "--config", str(tmp_path / "missing")],
                           "cannot read")):
        out = subprocess.run(_txmta() + argv, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and message in out.stderr, out
        assert "Traceback" not in out.stderr


def test_setup_from_config_takes_every_pool_address_once_with_its_helo() -> None:
    """Pool addresses follow delivery.source_address, each once; an address without a helo of
    its own gives delivery.helo_name (else server.hostname)."""
    cfg = config.load_text("""
[server]
hostname = "mail.example.test"
[delivery]
source_address = "127.0.0.9"
[[pool]]
name = "main"
addresses = [{address = "127.0.0.61", helo = "MTA61.example.test."}, {address = "127.0.0.9"}]
[[pool]]
name = "bulk"
lanes = ["bulk"]
addresses = [{address = "127.0.0.62", helo = "mta62.example.test"},
             {address = "127.0.0.61", helo = "other.example.test"}]
""")
    s = Setup.from_config(cfg, "example.test")
    assert s.addresses == (("127.0.0.9", "delivery.source_address"),
                           ("127.0.0.61", "pool main"), ("127.0.0.62", "pool bulk"))
    assert s.helo_for("127.0.0.61") == ("mta61.example.test",
                                        "the helo of 127.0.0.61 in pool[0] (main)")
    assert s.helo_for("127.0.0.62")[0] == "mta62.example.test"
    assert s.helo_for("127.0.0.9") == ("mail.example.test", "server.hostname")
