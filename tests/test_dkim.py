"""DKIM signing (txmta/dkim.py), at intake (inbound/receiver.py) and in DSNs (queue.py).

Every signature is checked with dkimpy's verifier, with a `dnsfunc` that serves the public
keys as a DNS zone would (RFC 6376 3.6.2.2: selector._domainkey.domain TXT).  Messages are
signed as the spool stores them: with our Received, Message-ID and Date header fields.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from txmta import cli, config
from txmta import outcome as O
from txmta.config import ConfigError
from txmta.dkim import (ED25519, OVERSIGNED, RSA, BodyHash, Signer, SigningKey, body_hash,
                        from_domain, private_pem, split_message, txt_value, zone_record)
from txmta.message import Address, Envelope, Recipient
from txmta.inbound.receiver import Receiver
from txmta.inbound.session import Session
from txmta.queue import Queue
from txmta.reply import Reply
from txmta.spool.memory import MemorySpool

NOW = 1_700_000_000.0
HOST = "mx.example.com"


@pytest.fixture(scope="module")
def rsa_key() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_key() -> Any:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def other_key() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


class Zone:
    """The DNS as a verifier sees it: name -> TXT text (dkimpy's dnsfunc)."""

    def __init__(self) -> None:
        self.records: dict[bytes, bytes] = {}
        self.asked: list[bytes] = []

    def publish(self, key: SigningKey) -> None:
        name = f"{key.selector}._domainkey.{key.domain}.".encode()
        self.records[name] = txt_value(key.private).encode()

    def __call__(self, name: bytes, timeout: int = 5) -> bytes | None:
        self.asked.append(name)
        return self.records.get(name)


def signer_with(*keys: SigningKey, default: str = "") -> tuple[Signer, Zone]:
    zone = Zone()
    for k in keys:
        zone.publish(k)
    return Signer(keys, default), zone


def verify(message: bytes, zone: Zone, index: int = 0) -> bool:
    """dkimpy's verdict on the `index`th signature (a failure it raises counts as False)."""
    try:
        return bool(dkimpy.DKIM(message).verify(idx=index, dnsfunc=zone))
    except dkimpy.DKIMException:
        return False


def signature_tags(message: bytes, index: int = 0) -> dict[str, str]:
    fields = re.findall(rb"^DKIM-Signature:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", message, re.M | re.I)
    value = re.sub(rb"\s+", b"", fields[index]).decode()
    return dict(tag.split("=", 1) for tag in value.split(";") if tag)


MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: hello\r\n"
           b"Date: Tue, 14 Nov 2023 22:13:20 +0000\r\nMessage-ID: <1@example.com>\r\n\r\n"
           b"Hello  Bob,\t \r\n\r\nbye\r\n\r\n\r\n")


def signed(signer: Signer, message: bytes = MESSAGE) -> bytes:
    return signer.headers_for(message, NOW) + message


# -- signatures verify -------------------------------------------------------------------

def test_rsa_signature_verifies_with_dkimpy(rsa_key: Any) -> None:
    """An RSA-SHA256 signature is relaxed/relaxed, names our d= and s=, and verifies."""
    signer, zone = signer_with(SigningKey("example.com", "r2026", RSA, rsa_key))
    out = signed(signer)
    assert verify(out, zone)
    tags = signature_tags(out)
    assert (tags["a"], tags["c"], tags["d"], tags["s"], tags["t"]) == (
        "rsa-sha256", "relaxed/relaxed", "example.com", "r2026", str(int(NOW)))
    assert zone.asked == [b"r2026._domainkey.example.com."]


def test_ed25519_signature_verifies_with_dkimpy(ed_key: Any) -> None:
    """An Ed25519-SHA256 signature (RFC 8463) verifies with the raw public key in DNS."""
    signer, zone = signer_with(SigningKey("example.com", "e2026", ED25519, ed_key))
    out = signed(signer)
    assert signature_tags(out)["a"] == "ed25519-sha256"
    assert verify(out, zone)


def test_two_keys_of_one_domain_both_sign(rsa_key: Any, ed_key: Any) -> None:
    """Dual signing: one DKIM-Signature per key of the domain, in configuration order, each
    verifying on its own."""
    signer, zone = signer_with(SigningKey("example.com", "r", RSA, rsa_key),
                               SigningKey("example.com", "e", ED25519, ed_key))
    out = signed(signer)
    assert [signature_tags(out, i)["a"] for i in range(2)] == [RSA, ED25519]
    assert verify(out, zone, 0) and verify(out, zone, 1)


def test_a_wrong_public_key_fails_verification(rsa_key: Any, other_key: Any) -> None:
    """The verification in these tests can fail: another key in DNS does not verify."""
    signer, zone = signer_with(SigningKey("example.com", "r", RSA, rsa_key))
    zone.publish(SigningKey("example.com", "r", RSA, other_key))
    assert not verify(signed(signer), zone)


# -- which messages, which keys ----------------------------------------------------------

@pytest.mark.parametrize("header, domain", [
    (b"From: a@example.com\r\n", "example.com"),
    (b"from :  \"Smith, J\" <j@EXAMPLE.Com>\r\n", "example.com"),
    (b"From:\r\n\tJ <j@example.org>, k@example.net\r\n", "example.org"),   # folded; the first
    (b"Subject: x\r\nFrom: =?utf-8?q?J=C3=B6rg?= <j@b\xc3\xbccher.example>\r\n",
     "xn--bcher-kva.example"),                                            # IDN as A-label
    (b"Subject: no from\r\n", ""),
    (b"From: undisclosed\r\n", ""),
])
def test_from_domain_is_the_first_address_of_from(header: bytes, domain: str) -> None:
    """The signing domain is looked up by the first From: address's domain (RFC 5322.From)."""
    assert from_domain(header) == domain


def test_keys_chosen_by_from_domain_case_insensitively(rsa_key: Any, other_key: Any) -> None:
    """Each domain's mail is signed with that domain's key, whatever the case of From:."""
    signer, zone = signer_with(SigningKey("example.com", "a", RSA, rsa_key),
                               SigningKey("example.net", "b", RSA, other_key))
    out = signed(signer, MESSAGE.replace(b"alice@example.com", b"alice@EXAMPLE.NET"))
    assert signature_tags(out)["d"] == "example.net" and verify(out, zone)
    assert len(re.findall(rb"^DKIM-Signature:", out, re.M)) == 1


def test_no_key_for_the_from_domain_leaves_the_message_unsigned(rsa_key: Any) -> None:
    """Without a key for the From: domain and without default_domain: no signature."""
    signer, _ = signer_with(SigningKey("example.com", "a", RSA, rsa_key))
    assert signer.headers_for(MESSAGE.replace(b"@example.com>", b"@elsewhere.test>"), NOW) == b""
    assert signer.sign_message(MESSAGE.replace(b"@example.com>", b"@x.test>"), NOW) \
        == MESSAGE.replace(b"@example.com>", b"@x.test>")


def test_default_domain_signs_everything_else(rsa_key: Any, other_key: Any) -> None:
    """With default_domain, mail from any other domain is signed with its keys."""
    signer, zone = signer_with(SigningKey("example.com", "a", RSA, rsa_key),
                               SigningKey("relay.example", "b", RSA, other_key),
                               default="Relay.Example.")
    out = signed(signer, MESSAGE.replace(b"@example.com>", b"@customer.test>"))
    assert signature_tags(out)["d"] == "relay.example" and verify(out, zone)
    assert signature_tags(signed(signer))["d"] == "example.com"   # its own key first


# -- header list and oversigning (RFC 6376 5.4, 8.15) ---------------------------------------

def test_signed_header_list_with_oversigning(rsa_key: Any) -> None:
    """h= lists each present signed field, then From/To/Subject/Date/Message-ID once more;
    Received and unknown fields are not signed."""
    signer, _ = signer_with(SigningKey("example.com", "a", RSA, rsa_key))
    out = signed(signer, b"Received: from x\r\nX-Mailer: y\r\nCc: c@example.org\r\n" + MESSAGE)
    assert signature_tags(out)["h"].split(":") == [
        "cc", "from", "to", "subject", "date", "message-id", *OVERSIGNED]


@pytest.mark.parametrize("added", [b"Subject: buy now\r\n", b"From: ceo@example.com\r\n",
                                   b"To: victim@example.org\r\n", b"Date: Mon, 1 Jan 2024\r\n",
                                   b"Message-ID: <2@example.com>\r\n"])
def test_a_second_oversigned_field_added_later_breaks_the_signature(rsa_key: Any,
                                                                    added: bytes) -> None:
    """Adding another instance of an oversigned field, above or below, fails verification."""
    signer, zone = signer_with(SigningKey("example.com", "a", RSA, rsa_key))
    out = signed(signer)
    assert verify(out, zone)
    header, start = split_message(out)
    assert not verify(added + out, zone)
    assert not verify(header + added + out[len(header):], zone)


def test_an_absent_to_cannot_be_added_but_an_unsigned_field_can(rsa_key: Any) -> None:
    """To is oversigned even when absent; an X- field added in transit does no harm."""
    signer, zone = signer_with(SigningKey("example.com", "a", RSA, rsa_key))
    out = signed(signer, MESSAGE.replace(b"To: bob@example.org\r\n", b""))
    assert not verify(b"To: someone@example.org\r\n" + out, zone)
    assert verify(b"X-Spam-Score: 0\r\nReceived: by relay\r\n" + out, zone)


def test_changed_body_breaks_the_signature(rsa_key: Any) -> None:
    signer, zone = signer_with(SigningKey("example.com", "a", RSA, rsa_key))
    out = signed(signer)
    assert not verify(out.replace(b"bye", b"BYE"), zone)


# -- bodies: 8-bit, long lines, dots, and the streamed body hash -----------------------------

BODIES = {
    "8bit": "Grüße aus Köln, ¡olé! 日本語\r\n".encode() * 20 + b"\xff\xfe raw octets\r\n",
    "long lines": (b"x" * 990 + b"\r\n") * 5 + b"y" * 998 + b"\r\n",
    "dot lines": b".\r\n..\r\n.hidden\r\n. \r\nend\r\n.",
    "white space": b" \t lead\r\ntrail \t\r\n\t\r\n  \r\n",
    "empty": b"",
    "no final CRLF": b"last line  ",
}


@pytest.mark.parametrize("name", BODIES)
@pytest.mark.parametrize("algorithm", [RSA, ED25519])
def test_bodies_verify(name: str, algorithm: str, rsa_key: Any, ed_key: Any) -> None:
    """8-bit octets, 990-octet lines, lines starting with "." and odd white space verify."""
    key = rsa_key if algorithm == RSA else ed_key
    signer, zone = signer_with(SigningKey("example.com", "k", algorithm, key))
    header, _ = split_message(MESSAGE)
    assert verify(signed(signer, header + b"\r\n" + BODIES[name]), zone)


def dkimpy_body_hash(body: bytes) -> bytes:
    """The body hash as dkimpy computes it: its parser's lines, its relaxed canonicalisation."""
    _, parsed = dkimpy.rfc822_parse(b"From: a@b\r\n\r\n" + body)
    return hashlib.sha256(Relaxed.canonicalize_body(parsed)).digest()


@settings(max_examples=300, deadline=None)
@given(body=st.lists(st.sampled_from([b"a", b"b", b" ", b"\t", b"\r", b"\n", b"\r\n", b".",
                                      b"\xff", b"  \r\n", b"\r\n\r\n"]), max_size=40)
       .map(b"".join),
       cuts=st.lists(st.integers(0, 200), max_size=6))
def test_streamed_body_hash_equals_dkimpys_in_any_pieces(body: bytes, cuts: list[int]) -> None:
    """BodyHash fed in arbitrary pieces equals dkimpy's whole-body relaxed hash (RFC 6376
    3.4.4): white space, bare CR and LF, trailing empty lines, split anywhere."""
    points = sorted({min(c, len(body)) for c in cuts})
    pieces = [body[a:b] for a, b in zip([0] + points, points + [len(body)])]
    h = BodyHash()
    for piece in pieces:
        h.update(piece)
    assert h.digest() == dkimpy_body_hash(body)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_body_hash_of_any_octets_equals_dkimpys(body: bytes) -> None:
    assert body_hash([body]) == dkimpy_body_hash(body)


# -- intake: the receiver signs the message as stored ------------------------------------------

ENV = Envelope(Address("alice", "example.com"), (Recipient(Address("bob", "example.org")),))


def session() -> Session:
    return Session("127.0.0.1", 5555, "127.0.0.1:25", helo="client.example", esmtp=True)


class Runner:
    """A stand-in for the signing thread pool: records each call, runs it at once."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, f: Any, *args: Any) -> Any:
        self.calls += 1
        return maybeDeferred(f, *args)


def intake(signer: Signer | None, pieces: list[bytes], runner: Runner | None = None,
           clock: Clock | None = None) -> tuple[Reply, bytes]:
    """Feed `pieces` to an Intake over a memory spool: (the reply, the stored message)."""
    if clock is None:
        clock = Clock()
        clock.advance(NOW)
    spool = MemorySpool()
    receiver = Receiver(Queue(spool, clock), HOST, clock, signer, runner)
    i = receiver.begin(session(), ENV)
    for p in pieces:
        i.write(p)
    replies: list[Reply] = []
    i.finish().addCallback(replies.append)
    return replies[0], spool.bodies[i.message_id]


def test_intake_signs_the_stored_message_with_our_added_fields(rsa_key: Any) -> None:
    """The signature covers the message as stored: our Message-ID and Date are signed."""
    signer, zone = signer_with(SigningKey("example.com", "a", RSA, rsa_key))
    runner = Runner()
    reply, body = intake(signer, [b"From: alice@example.com\r\nSubject: hi\r\n\r\n",
                                  b"line one\r\n", b".dot\r\n"], runner=runner)
    assert reply.code == 250 and runner.calls == 1
    assert body.startswith(b"DKIM-Signature: ")
    assert re.search(rb"^Received: from client.example", body, re.M)
    assert "message-id" in signature_tags(body)["h"].split(":")[:4]
    assert verify(body, zone)


def test_intake_signs_the_header_without_our_control_fields(rsa_key: Any) -> None:
    """X-Txmta-Expires and X-Txmta-Lane are removed before signing: the stored message has
    neither, the signature does not name them, and it verifies."""
    signer, zone = signer_with(SigningKey("example.com", "a", RSA, rsa_key))
    reply, body = intake(signer, [b"From: alice@example.com\r\nX-Txmta-Expires: 10m\r\n"
                                  b"X-Txmta-Lane:\r\n bulk\r\nSubject: hi\r\n\r\n", b"body\r\n"])
    assert reply.code == 250 and b"X-Txmta" not in body
    assert not {"x-txmta-expires", "x-txmta-lane"} & set(signature_tags(body)["h"].split(":"))
    assert verify(body, zone)


def test_intake_without_signer_or_key_does_not_sign_nor_use_the_pool(rsa_key: Any) -> None:
    """No signer: the stored message has no signature; a signer without a key for the From
    domain never runs the signing thread."""
    reply, body = intake(None, [b"From: alice@example.com\r\n\r\nhi\r\n"])
    assert reply.code == 250 and b"DKIM-Signature" not in body
    signer, _ = signer_with(SigningKey("example.com", "a", RSA, rsa_key))
    runner = Runner()
    reply, body = intake(signer, [b"From: x@other.test\r\n\r\nhi\r\n"], runner=runner)
    assert reply.code == 250 and b"DKIM-Signature" not in body and runner.calls == 0


def test_intake_signs_a_message_without_body_or_blank_line(ed_key: Any) -> None:
    signer, zone = signer_with(SigningKey("example.com", "e", ED25519, ed_key))
    reply, body = intake(signer, [b"From: alice@example.com\r\nSubject: only header"])
    assert reply.code == 250 and verify(body, zone)


def test_intake_signs_when_the_header_section_ends_without_a_blank_line(ed_key: Any) -> None:
    """A body line that is not a header field ends the header section; we insert the empty
    line, and the signature covers the body after it."""
    signer, zone = signer_with(SigningKey("example.com", "e", ED25519, ed_key))
    reply, body = intake(signer, [b"From: alice@example.com\r\nno colon here\r\nmore\r\n"])
    assert reply.code == 250 and verify(body, zone)
    assert b"\r\n\r\nno colon here\r\n" in body


def test_signing_failure_stores_the_message_unsigned(rsa_key: Any) -> None:
    """A header section the signer cannot parse (white space before the colon) is logged
    and stored unsigned: a message is never lost for want of a signature."""
    signer, _ = signer_with(SigningKey("example.com", "a", RSA, rsa_key))
    reply, body = intake(signer, [b"From: alice@example.com\r\nSubject : odd\r\n\r\nhi\r\n"])
    assert reply.code == 250 and b"DKIM-Signature" not in body and body.endswith(b"\r\nhi\r\n")


def test_t_tag_is_the_clock_at_the_end_of_data(ed_key: Any) -> None:
    signer, _ = signer_with(SigningKey("example.com", "e", ED25519, ed_key))
    clock = Clock()
    clock.advance(NOW + 42.9)
    _, body = intake(signer, [b"From: alice@example.com\r\n\r\nhi\r\n"], clock=clock)
    assert signature_tags(body)["t"] == str(int(NOW + 42))


def test_big_body_in_a_file_is_signed_and_stays_in_a_file(open_lmdb: Any, wait: Any,
                                                            rsa_key: Any, ed_key: Any) -> None:
    """A body over the inline limit is streamed to a file; signing reads it back in pieces
    and rewrites the file with the signatures in front; the stored bytes verify."""
    signer, zone = signer_with(SigningKey("example.com", "r", RSA, rsa_key),
                               SigningKey("example.com", "e", ED25519, ed_key))
    spool = open_lmdb(inline_limit=4096)
    clock = Clock()
    clock.advance(NOW)
    receiver = Receiver(Queue(spool, clock), HOST, clock, signer, Runner())
    i = receiver.begin(session(), ENV)
    i.write(b"From: alice@example.com\r\nSubject: big\r\n\r\n")
    for n in range(300):
        i.write(b"." + bytes([0x41 + n % 26]) * 989 + b"\r\n\xc3\xa9t\xc3\xa9  \r\n")
    reply = wait(i.finish())
    assert reply.code == 250
    stored = wait(spool.get(i.message_id))
    assert stored.body_in_file and os.path.exists(os.path.join(spool.bodies, i.message_id))
    assert sorted(os.listdir(spool.bodies)) == [i.message_id]
    body = wait(spool.read_body(i.message_id))
    assert stored.size == len(body)
    assert verify(body, zone, 0) and verify(body, zone, 1)


# -- DSNs are signed in the transaction that commits them --------------------------------------

def test_dsn_is_signed_by_the_key_of_the_mailer_daemon_domain(rsa_key: Any, other_key: Any) -> None:
    """A bounce from MAILER-DAEMON@mx.example.com is signed with mx.example.com's key."""
    signer, zone = signer_with(SigningKey("example.com", "a", RSA, rsa_key),
                               SigningKey(HOST, "mta", RSA, other_key))
    clock = Clock()
    clock.advance(NOW)
    spool = MemorySpool()
    q = Queue(spool, clock, hostname=HOST, sign_report=signer.sign_message)
    mid = q.new_message_id()
    body = q.body_writer(mid)
    body.write(signed(signer))
    done: list[Any] = []
    q.put(mid, ENV, body, {}, NOW).addCallback(done.append)
    q.record(done[0], {0: O.PermFailed(Reply(550, "5.1.1", "no such user"))})
    [report] = [m for m in spool.messages.values() if m.envelope.sender.is_null]
    dsn = spool.bodies[report.id]
    assert signature_tags(dsn)["d"] == HOST
    assert report.size == len(dsn) and report.envelope.size == len(dsn)
    assert verify(dsn, zone)


def test_dsn_without_a_key_for_its_domain_uses_default_domain(rsa_key: Any) -> None:
    signer, zone = signer_with(SigningKey("example.com", "a", RSA, rsa_key), default="example.com")
    report = signer.sign_message(b"From: Mail Delivery System <MAILER-DAEMON@" + HOST.encode()
                                 + b">\r\nSubject: Undelivered\r\n\r\nsorry\r\n", NOW)
    assert signature_tags(report)["d"] == "example.com" and verify(report, zone)


# -- keys: loading and keygen -----------------------------------------------------------------

def write_config(tmp_path: Path, key_file: Path, algorithm: str = RSA) -> config.Config:
    text = (f'[[dkim]]\ndomain = "example.com"\nselector = "s"\nkey = "{key_file}"\n'
            f'algorithm = "{algorithm}"\n')
    return config.load_text(text, str(tmp_path / "txmta.toml"))


@pytest.mark.parametrize("content, algorithm, reason", [
    (b"not a key\n", RSA, "not a PEM private key"),
    (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", RSA, "not a PEM"),
    ("ed", RSA, "not an RSA key"),
    ("rsa", ED25519, "not an Ed25519 key"),
    ("small", RSA, "RSA key of 512 bits"),
])
def test_a_bad_key_file_is_a_start_up_error_naming_key_and_file(tmp_path: Path, content: Any,
                                                                algorithm: str, reason: str,
                                                                rsa_key: Any, ed_key: Any) -> None:
    keys = {"ed": ed_key, "rsa": rsa_key}
    if content == "small":   # too small for cryptography's generator: openssl makes it
        data = subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt",
                               "rsa_keygen_bits:512"], capture_output=True, check=True).stdout
    else:
        data = private_pem(keys[content]) if isinstance(content, str) else content
    key_file = tmp_path / "k.pem"
    key_file.write_bytes(data)
    cfg = write_config(tmp_path, key_file, algorithm)
    with pytest.raises(ConfigError) as e:
        Signer.from_config(cfg)
    assert e.value.key == "dkim[0].key" and e.value.value == str(key_file)
    assert str(tmp_path / "txmta.toml") in str(e.value) and reason in str(e.value)


def test_pkcs1_rsa_and_dkimpy_ed25519_seed_files_load(tmp_path: Path, rsa_key: Any,
                                                      ed_key: Any) -> None:
    """Keys made by other tools load: PKCS#1 "RSA PRIVATE KEY" PEM (openssl, opendkim-genkey)
    and dkimpy's base64 Ed25519 seed."""
    pkcs1 = tmp_path / "rsa.pem"
    pkcs1.write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.TraditionalOpenSSL,
                                            serialization.NoEncryption()))
    assert Signer.from_config(write_config(tmp_path, pkcs1)) is not None
    seed = tmp_path / "ed.key"
    seed.write_bytes(base64.b64encode(ed_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
        serialization.NoEncryption())) + b"\n")
    signer = Signer.from_config(write_config(tmp_path, seed, ED25519))
    zone = Zone()
    zone.records[b"s._domainkey.example.com."] = txt_value(ed_key).encode()
    assert verify(signed(signer), zone)


def test_no_dkim_table_means_no_signer() -> None:
    assert Signer.from_config(config.defaults()) is None


def parse_zone_record(text: str) -> tuple[str, bytes]:
    """(owner name, TXT text) of a zone-file record: the quoted strings joined."""
    owner = text.split()[0]
    strings = re.findall(r'"([^"]*)"', text)
    assert all(len(s) <= 255 for s in strings)
    return owner, "".join(strings).encode()


@pytest.mark.parametrize("algorithm", [RSA, ED25519])
def test_keygen_writes_a_private_key_and_prints_a_record_that_verifies(
        tmp_path: Path, capsys: Any, algorithm: str) -> None:
    """`txmta dkim keygen` writes a 0600 PEM key; its printed TXT record and [[dkim]] table,
    parsed back, give a configuration whose signatures verify."""
    key_file = tmp_path / "keys" / "example.com.s.pem"
    key_file.parent.mkdir()
    assert cli.main(["dkim", "keygen", "--domain", "Example.COM.", "--selector", "s",
                     "--algorithm", algorithm, "--key", str(key_file)]) == 0
    out = capsys.readouterr().out
    assert os.stat(key_file).st_mode & 0o777 == 0o600
    record = out[out.index("s._domainkey"):out.index("[[dkim]]")]
    owner, text = parse_zone_record(record)
    assert owner == "s._domainkey.example.com."
    assert text.startswith(b"v=DKIM1; k=" + (b"rsa" if algorithm == RSA else b"ed25519"))
    table = out[out.index("[[dkim]]"):]
    cfg = config.load_text(table, str(tmp_path / "txmta.toml"))
    signer = Signer.from_config(cfg)
    zone = Zone()
    zone.records[owner.encode()] = text
    assert verify(signed(signer), zone)


def test_keygen_never_overwrites_a_key(tmp_path: Path, capsys: Any) -> None:
    key_file = tmp_path / "k.pem"
    key_file.write_text("precious")
    assert cli.main(["dkim", "keygen", "--domain", "example.com", "--selector", "s",
                     "--key", str(key_file)]) == 1
    assert key_file.read_text() == "precious" and "not overwritten" in capsys.readouterr().err


def test_keygen_rejects_a_bad_selector_and_small_rsa(tmp_path: Path, capsys: Any) -> None:
    assert cli.main(["dkim", "keygen", "--domain", "example.com", "--selector", "a b",
                     "--key", str(tmp_path / "a")]) == 1
    assert cli.main(["dkim", "keygen", "--domain", "example.com", "--selector", "s",
                     "--bits", "512", "--key", str(tmp_path / "b")]) == 1
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_zone_record_cuts_long_text_into_255_octet_strings() -> None:
    text = "v=DKIM1; k=rsa; p=" + "A" * 600
    record = zone_record("example.com", "s", text)
    assert record.startswith("s._domainkey.example.com. IN TXT ( ")
    owner, joined = parse_zone_record(record)
    assert joined.decode() == text and len(re.findall('"', record)) == 6


def test_check_config_reads_the_key_files(tmp_path: Path, capsys: Any) -> None:
    """`txmta check-config` reports a key file that is not a key, as the daemon would."""
    key_file = tmp_path / "k.pem"
    key_file.write_text("garbage")
    conf = tmp_path / "txmta.toml"
    conf.write_text(f'[[dkim]]\ndomain = "example.com"\nselector = "s"\nkey = "{key_file}"\n')
    assert cli.main(["check-config", str(conf)]) == 1
    assert "dkim[0].key" in capsys.readouterr().err
