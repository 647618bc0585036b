"""Outbound TLS policies with a real twistd, a real DNS server and real TLS receivers.

Four receiving servers (`sinks.SmtpSink`) listen on 127.0.0.4x at one port: one with a
certificate for its MX name from a test CA made now (`good`), one with a CA certificate for
another name (`wrongname`), one self-signed (`selfsigned`), one without STARTTLS (`plain`).
Every level x server pair is a domain `<level>-<server>.test` whose MX is `<server>.mx.test`
and whose level is set by `[[tls.policy]]`; one daemon delivers a message to each and the
mail log says which were sent and which deferred (and with which TLS).

DANE: the test DNS server (tests/dnsserver.py, on 127.0.0.53) sets the AD bit for the names
in its `_ad` list, and the daemon trusts AD because its nameserver is on loopback (DESIGN
"Protocols and DNS": a validating resolver on the same host is the trust anchor; the test
server plays that resolver).  TLSA records live at `_<port>._tcp.<mx>`: DANE-TA (the CA) for
good and wrongname, DANE-EE (its key) for selfsigned, a mismatched one for plain and good2.

MTA-STS: `stsserver.py` serves the policies over HTTPS (twisted.web, a certificate from the
test CA for every mta-sts.<domain>) on 127.0.5.43:443, the port the daemon always uses; the
daemon trusts the test CA through `[tls] ca_file`.  Loopback only, every wait bounded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from itlib import (REPO, Daemon, common_free_port, delivery_sections, maillog_events, statuses,
                   submit, txmta_cli, wait_until)
from sinks import SmtpSink

sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from dnsserver import running as dns_running  # noqa: E402
from stsserver import running as sts_running  # noqa: E402
from tests.tlscerts import CA, self_signed  # noqa: E402

pytestmark = pytest.mark.integration

SERVERS = {"good": "127.0.0.41", "wrongname": "127.0.0.42", "selfsigned": "127.0.0.43",
           "plain": "127.0.0.44", "rtls": "127.0.0.46", "broken": "127.0.0.47"}
STS_LISTEN = "127.0.5.43:443"
LEVELS = ("none", "may", "encrypt", "verify", "dane", "mta-sts")
# level -> servers it delivers to (the others defer)
DELIVERS = {
    "none": {"good", "wrongname", "selfsigned", "plain"},
    "may": {"good", "wrongname", "selfsigned", "plain"},
    "encrypt": {"good", "wrongname", "selfsigned"},
    "verify": {"good"},
    "dane": {"good", "selfsigned"},          # DANE-TA for good, DANE-EE for selfsigned
    "mta-sts": {"good"},
}
LABELS = {("verify", "good"): "verified", ("dane", "good"): "dane-ta",
          ("dane", "selfsigned"): "dane-ee", ("mta-sts", "good"): "sts-enforce",
          ("may", "good"): "unverified", ("encrypt", "selfsigned"): "unverified"}


@pytest.fixture(scope="module")
def port() -> int:
    """One SMTP port free on every receiver address."""
    return common_free_port(*SERVERS.values())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("pki")
    ca = CA()
    (d / "ca.pem").write_bytes(ca.pem)
    made = {"good": ca.issue("good.mx.test", "good2.mx.test"),
            "wrongname": ca.issue("other.name.test"),
            "selfsigned": self_signed("selfsigned.mx.test"),
            "rtls": ca.issue("rtls.mx.test"),
            "sts": ca.issue(*[f"mta-sts.{d}" for d in sts_domains()])}
    files = {name: issued.write(d, name) for name, issued in made.items()}
    return {"ca": ca, "ca_file": d / "ca.pem", "certs": made, "files": files}


def sts_domains() -> list[str]:
    return [f"mta-sts-{s}.test" for s in ("good", "wrongname", "selfsigned", "plain")] + \
        ["sts-mxmismatch.test", "sts-testing.test", "auto-sts.test", "tlsno-sts.test"]


def policy(mode: str, *mx: str) -> str:
    return f"version: STSv1\r\nmode: {mode}\r\n" + "".join(f"mx: {m}\r\n" for m in mx) + \
        "max_age: 86400\r\n"


def sts_policies() -> dict[str, str]:
    out = {f"mta-sts.mta-sts-{s}.test": policy("enforce", f"{s}.mx.test")
           for s in ("good", "wrongname", "selfsigned", "plain")}
    out["mta-sts.sts-mxmismatch.test"] = policy("enforce", "*.elsewhere.test")
    out["mta-sts.tlsno-sts.test"] = policy("enforce", "*.elsewhere.test")
    out["mta-sts.sts-testing.test"] = policy("testing", "selfsigned.mx.test")
    out["mta-sts.auto-sts.test"] = policy("enforce", "*.mx.test")
    return out


def make_zone(port: int, pki: dict[str, Any]) -> dict[str, Any]:
    zone: dict[str, Any] = {}
    ad: list[str] = []
    for server, ip in SERVERS.items():
        zone[f"{server}.mx.test."] = {"A": [ip]}
    zone["good2.mx.test."] = {"A": [SERVERS["good"]]}
    for level in LEVELS:
        for server in ("good", "wrongname", "selfsigned", "plain"):
            zone[f"{level}-{server}.test."] = {"MX": [[10, f"{server}.mx.test."]]}
            if level == "dane":
                ad.append(f"{level}-{server}.test.")
    certs = pki["certs"]
    ta = "2 0 1 " + pki["ca"].issued.cert_sha256()
    tlsa = {"good": ta, "wrongname": ta,
            "selfsigned": "3 1 1 " + certs["selfsigned"].spki_sha256(),
            "plain": "3 1 1 " + "00" * 32, "good2": "3 1 1 " + "11" * 32}
    for host, record in tlsa.items():
        name = f"_{port}._tcp.{host}.mx.test."
        zone[name] = {"TLSA": [record]}
        ad.append(name)
    extra = {"sts-mxmismatch.test": "good", "sts-testing.test": "selfsigned",
             "auto-sts.test": "good", "auto-dane.test": "selfsigned", "auto-plain.test": "good",
             "dane-mismatch.test": "good2", "verify-rtls.test": "rtls",
             "may-broken.test": "broken", "encrypt-broken.test": "broken",
             "tlsno-verify.test": "selfsigned", "tlsno-dane.test": "good2",
             "tlsno-sts.test": "good"}
    for domain, server in extra.items():
        zone[f"{domain}."] = {"MX": [[10, f"{server}.mx.test."]]}
    ad += ["auto-dane.test.", "dane-mismatch.test.", "tlsno-dane.test."]
    sts_ip = STS_LISTEN.split(":")[0]
    for domain in sts_domains():
        zone[f"_mta-sts.{domain}."] = {"TXT": ["v=STSv1; id=20261128T0700;"]}
        zone[f"mta-sts.{domain}."] = {"A": [sts_ip]}
    zone["_ad"] = ad
    return zone


@pytest.fixture(scope="module")
def dns(port: int, pki: dict[str, Any]) -> Iterator[tuple[str, int]]:
    with dns_running(make_zone(port, pki)) as hostport:
        yield hostport


@pytest.fixture(scope="module")
def sts(pki: dict[str, Any]) -> Iterator[list[str]]:
    cert, key = pki["files"]["sts"]
    with sts_running(sts_policies(), str(cert), str(key), STS_LISTEN) as (_, _, requests):
        yield requests


@pytest.fixture(scope="module")
def sinks(port: int, pki: dict[str, Any]) -> Iterator[dict[str, SmtpSink]]:
    files = pki["files"]
    made = {}
    for server, ip in SERVERS.items():
        kw: dict[str, Any] = {"name": f"{server}.mx.test"}
        if server == "broken":    # offers STARTTLS, says 220, then cannot do TLS: drops
            kw["tls"] = (str(files["good"][0]), str(files["rtls"][1]))   # a key of another cert
        elif server != "plain":
            kw["tls"] = tuple(str(p) for p in files[server])
        if server == "rtls":
            kw["extensions"] = ["PIPELINING", "ENHANCEDSTATUSCODES", "STARTTLS", "REQUIRETLS"]
        made[server] = SmtpSink(ip, port, **kw).start()
    yield made
    for s in made.values():
        s.stop()


def tls_policy_table() -> list[dict[str, str]]:
    table = [{"domain": f"{level}-{server}.test", "level": level}
             for level in LEVELS for server in ("good", "wrongname", "selfsigned", "plain")]
    table += [{"domain": "sts-mxmismatch.test", "level": "mta-sts"},
              {"domain": "sts-testing.test", "level": "mta-sts"},
              {"domain": "dane-mismatch.test", "level": "dane"},
              {"domain": "verify-rtls.test", "level": "verify"},
              {"domain": "may-broken.test", "level": "may"},
              {"domain": "encrypt-broken.test", "level": "encrypt"},
              {"domain": "tlsno-verify.test", "level": "verify"},
              {"domain": "tlsno-dane.test", "level": "dane"},
              {"domain": "tlsno-sts.test", "level": "mta-sts"}]
    return table


@pytest.fixture(scope="module")
def daemon(module_daemons: Any, port: int, dns: tuple[str, int], pki: dict[str, Any],
           sinks: dict[str, SmtpSink], sts: list[str]) -> Daemon:
    sections = delivery_sections(port, dns, schedule=("1h",))
    sections["tls"] = {"ca_file": str(pki["ca_file"]), "policy": tls_policy_table()}
    return module_daemons(**sections)


def outcome_of(d: Daemon, qid: str, timeout: float = 20.0) -> dict[str, str]:
    """The first mail log line of the message (sent, deferred or bounced)."""
    wait_until(lambda: statuses(d, qid), timeout, f"a delivery line for {qid}",
               diagnose=d.maillog)
    return [e for e in maillog_events(d) if e["id"] == qid][0]


def body(tag: str) -> bytes:
    return (f"Subject: {tag}\r\nMessage-ID: <{tag}@client.test>\r\n\r\n{tag}\r\n").encode()


@pytest.fixture(scope="module")
def matrix(daemon: Daemon) -> dict[tuple[str, str], dict[str, str]]:
    """Every level x server message submitted at once; their first outcomes."""
    ids = {}
    for level in LEVELS:
        for server in ("good", "wrongname", "selfsigned", "plain"):
            ids[(level, server)] = submit(daemon, "sender@client.test",
                                          [f"rcpt@{level}-{server}.test"], body(f"{level}-{server}"))
    return {k: outcome_of(daemon, qid) for k, qid in ids.items()}


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("server", ["good", "wrongname", "selfsigned", "plain"])
def test_level_against_server(matrix: dict[tuple[str, str], dict[str, str]],
                              sinks: dict[str, SmtpSink], level: str, server: str) -> None:
    """Each level delivers to the servers it accepts and defers (never bounces) at the rest,
    with a 4.7.x reply naming the reason; the mail log shows the TLS and its verification."""
    e = matrix[(level, server)]
    rcpt = f"rcpt@{level}-{server}.test"
    delivered = [t for t in sinks[server].snapshot() if rcpt in t.rcpt_to]
    if server in DELIVERS[level]:
        assert e["status"] == "sent", e
        assert len(delivered) == 1
        assert delivered[0].tls is (level != "none" and server != "plain")
        if delivered[0].tls:
            assert e["tls"].startswith("TLSv1."), e
        else:
            assert e["tls"] == "none", e
        if (level, server) in LABELS:
            assert e["tls"].endswith(" " + LABELS[(level, server)]), e
    else:
        assert e["status"] == "deferred", e
        assert delivered == []
        assert e["reply"].startswith("451 4.7."), e
        if server == "plain":
            assert "TLS required but not offered" in e["reply"], e
        else:
            assert "TLS policy:" in e["reply"] or "TLS handshake" in e["reply"], e
            assert e["tls"] != "none", e     # the TLS we negotiated before refusing the peer


def test_verify_failure_names_the_reason(matrix: dict[tuple[str, str], dict[str, str]]) -> None:
    assert "does not match wrongname.mx.test" in matrix[("verify", "wrongname")]["reply"]
    assert "not trusted" in matrix[("verify", "selfsigned")]["reply"]
    assert "matches the certificate chain" in matrix[("dane", "plain")]["reply"] or \
        "not offered" in matrix[("dane", "plain")]["reply"]
    assert "DANE-TA" in matrix[("dane", "wrongname")]["reply"]


def test_history_has_the_tls_of_the_attempt(daemon: Daemon,
                                            matrix: dict[tuple[str, str], dict[str, str]]) -> None:
    """`txmta queue show --json` of a delivered message: its event carries the TLS line."""
    qid = matrix[("dane", "selfsigned")]["id"]
    shown = json.loads(txmta_cli(daemon, "queue", "show", qid, "--json").stdout)
    [event] = [e for e in shown["events"] if e["event"] == "delivered"]
    assert event["tls"].startswith("TLSv1.") and event["tls"].endswith("dane-ee")


@pytest.mark.parametrize("domain, server, status, expect", [
    ("auto-dane.test", "selfsigned", "sent", "dane-ee"),        # validated TLSA: DANE
    ("auto-sts.test", "good", "sent", "sts-enforce"),           # no DANE, a policy: MTA-STS
    ("auto-plain.test", "good", "sent", "unverified"),          # neither: may
    ("sts-testing.test", "selfsigned", "sent", "sts-testing unverified"),
    ("sts-mxmismatch.test", "good", "deferred", "not listed in the policy"),
    ("dane-mismatch.test", "good", "deferred", "matches the certificate chain"),
])
def test_cascade_and_policy_edges(daemon: Daemon, sinks: dict[str, SmtpSink], domain: str,
                                  server: str, status: str, expect: str) -> None:
    """"auto" picks DANE, then MTA-STS, then may; MTA-STS testing delivers despite a bad
    certificate; enforce skips an unlisted MX; a TLSA mismatch defers."""
    qid = submit(daemon, "sender@client.test", [f"x@{domain}"], body(domain))
    e = outcome_of(daemon, qid)
    assert e["status"] == status, e
    if status == "sent":
        assert e["tls"].endswith(" " + expect), e
        assert any(f"x@{domain}" in t.rcpt_to for t in sinks[server].snapshot())
    else:
        assert expect in e["reply"] and e["reply"].startswith("451 4.7."), e


def test_may_falls_back_to_plaintext_after_a_failed_handshake_and_remembers(
        daemon: Daemon, sinks: dict[str, SmtpSink]) -> None:
    """At "may" a host whose TLS handshake fails gets the mail in plaintext on a new
    connection, and later connections skip STARTTLS (remembered for an hour); at "encrypt"
    the same host defers."""
    broken = sinks["broken"]
    first = submit(daemon, "sender@client.test", ["a@may-broken.test"], body("broken1"))
    e = outcome_of(daemon, first)
    assert e["status"] == "sent" and e["tls"] == "none", e
    assert [("STARTTLS" in c.commands) for c in broken.connections] == [True, False]
    second = submit(daemon, "sender@client.test", ["b@may-broken.test"], body("broken2"))
    assert outcome_of(daemon, second)["status"] == "sent"
    assert not any("STARTTLS" in c.commands for c in broken.connections[2:])
    strict = submit(daemon, "sender@client.test", ["c@encrypt-broken.test"], body("broken3"))
    e = outcome_of(daemon, strict)
    assert e["status"] == "deferred" and e["reply"].startswith("451 4.7.0 TLS handshake"), e
    assert sorted(r for t in broken.snapshot() for r in t.rcpt_to) == \
        ["a@may-broken.test", "b@may-broken.test"]


def test_mta_sts_policy_is_fetched_once_and_cached_in_the_spool(
        daemon: Daemon, sts: list[str], sinks: dict[str, SmtpSink]) -> None:
    """Two messages to an MTA-STS domain: one HTTPS fetch; the policy is in the spool."""
    for n in range(2):
        qid = submit(daemon, "sender@client.test", [f"again{n}@mta-sts-good.test"], body("again"))
        assert outcome_of(daemon, qid)["status"] == "sent"
    fetched = [r for r in sts if "mta-sts.mta-sts-good.test" in r]
    assert fetched == ["GET mta-sts.mta-sts-good.test /.well-known/mta-sts.txt 200"]
    import lmdb
    env = lmdb.open(str(daemon.spool_path), readonly=True, lock=False, max_dbs=32)
    try:
        db = env.open_db(b"cache", create=False)
        with env.begin() as txn:
            raw = txn.get(b"mta-sts:mta-sts-good.test", db=db)
    finally:
        env.close()
    assert raw is not None and json.loads(raw)["mx"] == ["good.mx.test"]


# -- REQUIRETLS (RFC 8689): messages put into the spool before the daemon starts ----------------

class _Immediate:
    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        f(*args, **kw)


def _spool_requiretls(path: Path, domains: list[str]) -> list[str]:
    import threading

    from txmta.message import Address, Envelope, Recipient, new_message_id
    from txmta.message import RecipientState, StoredMessage
    from txmta.spool.lmdb import LmdbSpool
    spool = LmdbSpool(str(path), _Immediate())  # type: ignore[arg-type]
    ids = []

    def wait(d: Any) -> Any:
        done, box = threading.Event(), []
        d.addBoth(lambda r: (box.append(r), done.set()))
        assert done.wait(10)
        return box[0]
    try:
        for domain in domains:
            mid = new_message_id()
            env = Envelope(Address("sender", "client.test"),
                           (Recipient(Address("secret", domain)),), requiretls=True)
            m = StoredMessage(mid, env, 1.0, 0, (RecipientState(),), {"address": "127.0.0.1"})
            writer = spool.body_writer(mid)
            writer.write(body(f"requiretls-{domain}"))
            assert wait(spool.put(m, writer)) is None
            ids.append(mid)
    finally:
        wait(spool.close())
    return ids


def test_requiretls_only_over_verified_tls_to_a_server_offering_it(
        tmp_path: Path, start_daemon: Callable[..., Daemon], port: int, dns: tuple[str, int],
        pki: dict[str, Any], sinks: dict[str, SmtpSink]) -> None:
    """RFC 8689 4.2.1: a REQUIRETLS message is relayed over verified TLS to a server that
    offers REQUIRETLS (with the parameter); over "may", or to a verified server without
    REQUIRETLS, it bounces at once with 5.7.10 and a DSN."""
    spool = tmp_path / "rtls-spool"
    ok, no_verify, no_ext = _spool_requiretls(
        spool, ["verify-rtls.test", "may-good.test", "verify-good.test"])
    sections = delivery_sections(port, dns, schedule=("1h",))
    sections["tls"] = {"ca_file": str(pki["ca_file"]), "policy": tls_policy_table()}
    d = start_daemon(spool_path=spool, **sections)
    assert outcome_of(d, ok)["status"] == "sent"
    [t] = [t for t in sinks["rtls"].snapshot() if "secret@verify-rtls.test" in t.rcpt_to]
    conn = sinks["rtls"].connections[t.conn]
    assert any(c.startswith("MAIL FROM:<sender@client.test>") and c.endswith(" REQUIRETLS")
               for c in conn.commands), conn.commands
    for qid, why in ((no_verify, "not reached over verified TLS"),
                     (no_ext, "does not offer REQUIRETLS")):
        e = outcome_of(d, qid)
        assert e["status"] == "bounced" and e["reply"].startswith("550 5.7.10"), e
        assert why in e["reply"], e
    assert not any(r.endswith("@may-good.test") and "secret" in r
                   for t in sinks["good"].snapshot() for r in t.rcpt_to)
    for qid in (no_verify, no_ext):     # a DSN to the sender for each
        wait_until(lambda: f"{qid}: sender delivery status notification:" in d.maillog(), 10,
                   f"the DSN line of {qid}", diagnose=d.maillog)


@pytest.mark.parametrize("domain, server", [
    ("tlsno-verify.test", "selfsigned"),    # as verify-selfsigned.test: untrusted certificate
    ("tlsno-dane.test", "good"),            # as dane-mismatch.test: TLSA present, no match
    ("tlsno-sts.test", "good"),             # as sts-mxmismatch.test: MX not in the policy
])
def test_tls_required_no_delivers_where_the_policy_would_defer(
        daemon: Daemon, sinks: dict[str, SmtpSink], domain: str, server: str) -> None:
    """RFC 8689 5: a message with "TLS-Required: No" is sent with opportunistic TLS where the
    recipient domain's policy holds other mail (the domains named beside the cases defer
    without the header: test_level_against_server, test_cascade_and_policy_edges)."""
    tag = f"tlsno-{domain}"
    data = (f"Subject: {tag}\r\nTLS-Required: No\r\nMessage-ID: <{tag}@client.test>\r\n\r\n"
            f"{tag}\r\n").encode()
    qid = submit(daemon, "sender@client.test", [f"tlsno@{domain}"], data)
    e = outcome_of(daemon, qid)
    assert e["status"] == "sent", e
    assert e["tls"].startswith("TLSv1.") and e["tls"].endswith(" unverified"), e
    assert any(f"tlsno@{domain}" in t.rcpt_to for t in sinks[server].snapshot())
