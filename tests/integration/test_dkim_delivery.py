"""DKIM signing with a real twistd: what the next hop receives verifies.

The keys are made by `txmta dkim keygen` (a real process); the TXT records it prints are
served by the test DNS server (tests/dnsserver.py on 127.0.0.53), and the signatures are
checked with dkimpy's verifier asking that server.  The daemon has RSA and Ed25519 keys
for example.com (dual signing) and an RSA key for its own host name (DSNs come from
MAILER-DAEMON@mx.test.invalid); its relayhost is a sink on 127.0.0.41 that records the
octets of each message exactly as received (after SMTP dot-unstuffing).  Mail goes in with
smtplib: 8-bit bodies, 990-octet lines, lines starting with dots, and a body big enough to
be spooled in a file.  Every wait is bounded; loopback only.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import dkim as dkimpy
import dns.message
import dns.query
import dns.rdatatype
import pytest

from itlib import (HOSTNAME, REPO, Daemon, free_port, make_daemon, queued_id, statuses,
                   wait_until)
from sinks import SmtpSink, Transaction

sys.path.insert(0, str(REPO / "tests"))
from dnsserver import running  # noqa: E402

pytestmark = pytest.mark.integration

SINK_IP = "127.0.0.41"
KEYS = [("example.com", "rsa2026", "rsa-sha256"), ("example.com", "ed2026", "ed25519-sha256"),
        (HOSTNAME, "mta", "rsa-sha256")]
NO_SUCH_USER = "550 5.1.1 <nobody@dest.test>: Recipient address rejected: no such user"


def keygen(directory: Path, domain: str, selector: str, algorithm: str) -> tuple[str, str, Path]:
    """Run `txmta dkim keygen`; (owner name, zone-file TXT data, key file) from its output."""
    key = directory / f"{domain}.{selector}.pem"
    out = subprocess.run([sys.executable, "-m", "txmta.cli", "dkim", "keygen", "--domain", domain,
                          "--selector", selector, "--algorithm", algorithm, "--key", str(key)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    m = re.search(r"^(\S+) IN TXT (?:\( )?((?:\"[^\"]*\"\s*)+)", out, re.M)
    assert m is not None, out
    return m.group(1), " ".join(re.findall(r'"[^"]*"', m.group(2))), key


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str, str, str, Path]]:
    directory = tmp_path_factory.mktemp("dkim")
    return [(domain, selector, algorithm, *keygen(directory, domain, selector, algorithm))
            for domain, selector, algorithm in KEYS]


@pytest.fixture(scope="module")
def dns_server(keys: list[Any]) -> Iterator[tuple[str, int]]:
    zone = {owner: {"TXT": [txt]} for _, _, _, owner, txt, _ in keys}
    with running(zone) as hostport:
        yield hostport


def dnsfunc(server: tuple[str, int]) -> Callable[..., bytes | None]:
    """dkimpy's key lookup, asking the test DNS server (TXT strings joined, RFC 6376 3.6.2.2)."""
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        query = dns.message.make_query(name.decode(), dns.rdatatype.TXT)
        answer = dns.query.udp(query, server[0], port=server[1], timeout=timeout)
        for rrset in answer.answer:
            for rdata in rrset:
                return b"".join(rdata.strings)
        return None
    return lookup


def verified(data: bytes, server: tuple[str, int]) -> list[tuple[str, str, bool]]:
    """(d=, a=, verdict) of every DKIM-Signature in `data`, top first."""
    found = []
    d = dkimpy.DKIM(data)
    n = len([1 for name, _ in d.headers if name.lower() == b"dkim-signature"])
    for i in range(n):
        try:
            ok = bool(d.verify(idx=i, dnsfunc=dnsfunc(server)))
        except dkimpy.DKIMException:
            ok = False
        found.append((d.domain.decode() if d.domain else "", d.signature_fields.get(b"a", b"").decode(), ok))
    return found


def send(d: Daemon, sender: str, rcpts: list[str], body: bytes) -> str:
    with smtplib.SMTP(d.host, d.port, timeout=30) as s:
        s.ehlo("client.test.invalid")
        code, resp = s.mail(sender, ["BODY=8BITMIME"])
        assert code == 250, resp
        for r in rcpts:
            code, resp = s.rcpt(r)
            assert code == 250, resp
        code, resp = s.data(body)
        assert code == 250, resp
    return queued_id(resp)


def message(tag: str, body: bytes, sender: str = "Alice <alice@Example.COM>") -> bytes:
    return (f"From: {sender}\r\nTo: bob@dest.test\r\nSubject: {tag}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n").encode() + body


BODIES = {
    "eightbit": "Grüße aus Köln — ¡olé! 日本語のテキスト\r\n".encode() * 10 + b"\xe9t\xe9\r\n",
    "longlines": (b"L" * 990 + b"\r\n") * 20 + b"x " * 494 + b"\r\n",
    "dots": b".\r\n..\r\n.leading dot\r\n...three\r\n. \r\ntext\r\n.\r\n",
    "big": b"".join(b"." + bytes([65 + i % 26]) * 900 + b" \xc3\xa9\r\n" for i in range(400)),
}


def test_signed_mail_verifies_at_the_next_hop(start_daemon: Callable[..., Daemon],
                                              keys: list[Any], dns_server: tuple[str, int]) -> None:
    """8-bit, long-line, dot-stuffed and file-spooled messages from example.com arrive with an
    RSA and an Ed25519 signature that both verify; mail from another domain arrives unsigned;
    a bounce from MAILER-DAEMON@<hostname> arrives signed with the host name's key."""
    port = free_port(SINK_IP)
    with SmtpSink(SINK_IP, port, replies={"RCPT:nobody@dest.test": NO_SUCH_USER}) as sink:
        d = start_daemon(
            delivery={"relayhost": f"{SINK_IP}:{port}", "relayhost_tls": "none",
                      "connect_timeout": "5s"},
            retry={"schedule": ["1s", "2s"], "max_lifetime": "1h"},
            dns={"nameservers": [f"{dns_server[0]}:{dns_server[1]}"]},
            spool={"inline_body_limit": "64KiB"},
            dkim=[{"domain": dom, "selector": sel, "key": str(key), "algorithm": alg}
                  for dom, sel, alg, _, _, key in keys])
        sent = {tag: message(tag, body) for tag, body in BODIES.items()}
        for tag, data in sent.items():
            send(d, "alice@example.com", ["bob@dest.test"], data)
        send(d, "carol@other.test", ["bob@dest.test"],
             message("unsigned", b"no key for other.test\r\n", "carol@other.test"))
        bounced = send(d, "alice@example.com", ["nobody@dest.test"],
                       message("bounce me", BODIES["eightbit"]))
        sink.wait(lambda s: len(s.transactions) >= 6, 30, "five messages and a bounce")
        wait_until(lambda: "bounced" in statuses(d, bounced), 15, "the bounce in the mail log")

        by_subject: dict[str, Transaction] = {}
        for t in sink.snapshot():
            m = re.search(rb"^Subject: (.*)\r\n", t.data, re.M)
            assert m is not None
            by_subject[m.group(1).decode()] = t
        for tag, data in sent.items():
            got = by_subject[tag].data
            header, body = data.split(b"\r\n\r\n", 1)
            assert got.endswith(b"\r\n\r\n" + body)           # the body as sent, octet for octet
            assert verified(got, dns_server) == [("example.com", "rsa-sha256", True),
                                                 ("example.com", "ed25519-sha256", True)], tag
            # the verification can fail: one changed octet of the body breaks both
            broken = got[:-3] + bytes([got[-3] ^ 1]) + got[-2:]
            assert [v[2] for v in verified(broken, dns_server)] == [False, False]
        assert verified(by_subject["unsigned"].data, dns_server) == []

        [report] = [t for t in sink.snapshot() if t.mail_from == ""]
        assert report.rcpt_to == ["alice@example.com"]
        assert re.search(rb"^From: .*MAILER-DAEMON@" + HOSTNAME.encode(), report.data, re.M)
        assert verified(report.data, dns_server) == [(HOSTNAME, "rsa-sha256", True)]
        assert "DKIM signing" not in d.log()


def test_a_bad_key_file_stops_the_daemon_naming_key_and_file(tmp_path: Path) -> None:
    """A [[dkim]] key file that is not a private key: twistd exits at start, saying which."""
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n")
    daemon = make_daemon(tmp_path / "daemons", dkim=[{"domain": "example.com", "selector": "s",
                                                      "key": str(bad)}])
    with pytest.raises(RuntimeError) as e:
        daemon.start()
    out = (daemon.dir / "twistd.stdout").read_text() + daemon.log()
    assert "exited" in str(e.value)
    assert f'dkim[0].key = "{bad}": not a PEM private key' in out


def test_sighup_loads_new_keys_and_keeps_them_when_a_reload_is_bad(
        start_daemon: Callable[..., Daemon], keys: list[Any], dns_server: tuple[str, int],
        tmp_path: Path) -> None:
    """Started without [[dkim]]: mail goes unsigned.  [[dkim]] tables added and SIGHUP: the
    next message is signed.  A broken key file and SIGHUP: the error is logged and the
    running keys go on signing."""
    import signal
    port = free_port(SINK_IP)
    with SmtpSink(SINK_IP, port) as sink:
        d = start_daemon(
            delivery={"relayhost": f"{SINK_IP}:{port}", "relayhost_tls": "none",
                      "connect_timeout": "5s"},
            dns={"nameservers": [f"{dns_server[0]}:{dns_server[1]}"]})
        assert d.proc is not None
        plain = d.config_path.read_text()
        send(d, "alice@example.com", ["bob@dest.test"], message("before", b"no keys yet\r\n"))
        sink.wait(lambda s: len(s.transactions) >= 1, 30, "the first message")

        tables = "".join(f'\n[[dkim]]\ndomain = "{dom}"\nselector = "{sel}"\nkey = "{key}"\n'
                         f'algorithm = "{alg}"\n' for dom, sel, alg, _, _, key in keys)
        d.config_path.write_text(plain + tables)
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "dkim: signing with rsa2026._domainkey.example.com" in d.log(), 15,
                   "the DKIM reload in the log", diagnose=d.log)
        send(d, "alice@example.com", ["bob@dest.test"], message("after", b"signed now\r\n"))
        sink.wait(lambda s: len(s.transactions) >= 2, 30, "the second message")

        bad = tmp_path / "bad.pem"
        bad.write_text("not a key\n")
        d.config_path.write_text(plain + tables.replace(str(keys[0][5]), str(bad), 1))
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload of dkim failed" in d.log(), 15, "the failed reload in the log",
                   diagnose=d.log)
        assert d.running
        send(d, "alice@example.com", ["bob@dest.test"], message("still", b"old keys sign\r\n"))
        sink.wait(lambda s: len(s.transactions) >= 3, 30, "the third message")

        got = {re.search(rb"^Subject: (.*)\r\n", t.data, re.M).group(1).decode(): t.data
               for t in sink.snapshot()}
        assert verified(got["before"], dns_server) == []
        both = [("example.com", "rsa-sha256", True), ("example.com", "ed25519-sha256", True)]
        assert verified(got["after"], dns_server) == both
        assert verified(got["still"], dns_server) == both
