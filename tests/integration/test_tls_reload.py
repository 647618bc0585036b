"""Inbound TLS against a real twistd: the certificate is reloaded on SIGHUP without dropping
sessions, a broken replacement keeps the running certificate, TLS 1.1 is refused, and
REQUIRETLS is offered and stored only under TLS.  Certificates are made at test time;
everything is on loopback."""

from __future__ import annotations

import datetime
import signal
import smtplib
import socket
import ssl
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from itlib import HOSTNAME, Daemon, Raw, queued_id, txmta_cli, wait_until

pytestmark = pytest.mark.integration


def make_material(label: str) -> tuple[bytes, bytes, bytes]:
    """(cert PEM, key PEM, SHA-256 fingerprint) of a fresh self-signed cert for HOSTNAME."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{label}.{HOSTNAME}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOSTNAME)]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            cert.fingerprint(hashes.SHA256()))


def install(directory: Path, cert: bytes, key: bytes) -> None:
    """Put new material in place the way an ACME client does: write, then rename over."""
    for name, data in (("cert.pem", cert), ("key.pem", key)):
        tmp = directory / (name + ".new")
        tmp.write_bytes(data)
        tmp.replace(directory / name)


def client_context(version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if version is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ctx.maximum_version = version
        if version < ssl.TLSVersion.TLSv1_2:
            ctx.set_ciphers("ALL:@SECLEVEL=0")   # so that the refusal is the daemon's
    return ctx


def fingerprint(sock: Any) -> bytes:
    der = sock.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).fingerprint(hashes.SHA256())


def implicit_fingerprint(d: Daemon, version: ssl.TLSVersion | None = None) -> bytes:
    with socket.create_connection(("127.0.0.1", d.ports[1]), timeout=10) as raw:
        with client_context(version).wrap_socket(raw, server_hostname=HOSTNAME) as tls:
            return fingerprint(tls)


def starttls_fingerprint(d: Daemon) -> bytes:
    with smtplib.SMTP("127.0.0.1", d.ports[0], timeout=10) as s:
        s.ehlo("probe.test.invalid")
        code, _ = s.starttls(context=client_context())
        assert code == 220
        return fingerprint(s.sock)


def send(s: smtplib.SMTP, mail_options: tuple[str, ...] = ()) -> str:
    t = uuid.uuid4().hex
    code, resp = s.mail("tls@example.com", mail_options)
    assert code == 250, resp
    code, resp = s.rcpt("r@example.org")
    assert code == 250, resp
    code, resp = s.data(f"Subject: {t}\r\n\r\n{t}\r\n".encode())
    assert code == 250, resp
    return queued_id(resp)


def sighup_and_wait(d: Daemon, marker: str, count: int) -> None:
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: d.log().count(marker) >= count, 15, f"{count} x {marker!r} in the log",
               diagnose=d.log)
    assert d.running


@pytest.fixture
def material_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tls"
    d.mkdir()
    return d


def test_sighup_reloads_certificate_without_dropping_sessions(start_daemon, material_dir):
    """cert A served on STARTTLS and SMTPS; files replaced by cert B + SIGHUP: new
    connections get B, a session opened before keeps working; a garbage key + SIGHUP keeps
    B with an error in the log; a broken config file + SIGHUP changes nothing."""
    cert_a, key_a, fp_a = make_material("a")
    cert_b, key_b, fp_b = make_material("b")
    install(material_dir, cert_a, key_a)
    d = start_daemon(listeners=[{"tls": "starttls"}, {"tls": "implicit"}],
                     tls={"cert": str(material_dir / "cert.pem"), "key": str(material_dir / "key.pem")})
    assert starttls_fingerprint(d) == fp_a
    assert implicit_fingerprint(d) == fp_a

    # sessions opened before the reload, one per listener, mid-conversation
    old_implicit = smtplib.SMTP_SSL("127.0.0.1", d.ports[1], timeout=10, context=client_context())
    old_implicit.ehlo("old.test.invalid")
    old_starttls = smtplib.SMTP("127.0.0.1", d.ports[0], timeout=10)
    old_starttls.ehlo("old.test.invalid")
    old_starttls.starttls(context=client_context())
    old_starttls.ehlo("old.test.invalid")
    try:
        install(material_dir, cert_b, key_b)
        sighup_and_wait(d, "tls: reloaded certificate", 1)
        assert f"CN=b.{HOSTNAME}" in d.log()
        assert starttls_fingerprint(d) == fp_b
        assert implicit_fingerprint(d) == fp_b

        # the old sessions still run on cert A and still take mail
        for s in (old_implicit, old_starttls):
            assert fingerprint(s.sock) == fp_a
            qid = send(s)
            m, _ = d.stored(qid)
            assert m.client.get("tls", "").startswith("TLSv1.")

        # a broken replacement: cert of a new pair, garbage key
        cert_c, _, fp_c = make_material("c")
        install(material_dir, cert_c, b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
        sighup_and_wait(d, "reload of tls failed", 1)
        assert f'tls.key = "{material_dir / "key.pem"}": no PEM private key' in d.log()
        assert starttls_fingerprint(d) == fp_b
        assert implicit_fingerprint(d) == fp_b

        # a key that does not match the certificate
        install(material_dir, cert_c, key_a)
        sighup_and_wait(d, "reload of tls failed", 2)
        assert "does not match the certificate" in d.log()
        assert implicit_fingerprint(d) == fp_b

        # a configuration file that no longer loads: nothing changes, nothing dies
        good_config = d.config_path.read_text()
        d.config_path.write_text(good_config + "\n[oops\n")
        sighup_and_wait(d, "reload of configuration failed", 1)
        d.config_path.write_text(good_config)
        assert implicit_fingerprint(d) == fp_b
        with smtplib.SMTP("127.0.0.1", d.ports[0], timeout=10) as s:
            s.ehlo("after.test.invalid")
            s.starttls(context=client_context())
            s.ehlo("after.test.invalid")
            assert fingerprint(s.sock) == fp_b
            send(s)
        for s in (old_implicit, old_starttls):   # the old sessions lived through all of it
            send(s)
    finally:
        old_implicit.close()
        old_starttls.close()


def test_tls_versions_and_sighup_min_version(start_daemon, material_dir):
    """The daemon refuses a TLS 1.1 client and serves 1.2 and 1.3; after min_version =
    "TLSv1.3" and SIGHUP it refuses 1.2 too."""
    cert, key, fp = make_material("v")
    install(material_dir, cert, key)
    d = start_daemon(listeners=[{"tls": "starttls"}, {"tls": "implicit"}],
                     tls={"cert": str(material_dir / "cert.pem"), "key": str(material_dir / "key.pem")})
    with pytest.raises((ssl.SSLError, ConnectionError)):
        implicit_fingerprint(d, ssl.TLSVersion.TLSv1_1)
    assert implicit_fingerprint(d, ssl.TLSVersion.TLSv1_2) == fp
    assert implicit_fingerprint(d, ssl.TLSVersion.TLSv1_3) == fp

    text = d.config_path.read_text()
    assert "[tls]\n" in text
    d.config_path.write_text(text.replace("[tls]\n", '[tls]\nmin_version = "TLSv1.3"\n'))
    sighup_and_wait(d, "tls: reloaded certificate", 1)
    assert "TLSv1.3 or newer" in d.log()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        implicit_fingerprint(d, ssl.TLSVersion.TLSv1_2)
    assert implicit_fingerprint(d, ssl.TLSVersion.TLSv1_3) == fp


def test_requiretls_only_under_tls_and_stored(start_daemon, material_dir):
    """REQUIRETLS: not in the clear (not advertised, MAIL refused 555 5.5.4); after STARTTLS
    advertised, accepted, and the spooled envelope carries it."""
    cert, key, _ = make_material("r")
    install(material_dir, cert, key)
    d = start_daemon(listeners=[{"tls": "starttls"}, {"tls": "implicit"}],
                     tls={"cert": str(material_dir / "cert.pem"), "key": str(material_dir / "key.pem")})
    c = Raw(d.ports[0])
    try:
        ehlo = c.cmd(b"EHLO clear.test.invalid")
        assert b"STARTTLS" in ehlo and b"REQUIRETLS" not in ehlo
        reply = c.cmd(b"MAIL FROM:<s@example.com> REQUIRETLS")
        assert reply.startswith(b"555 5.5.4 "), reply
    finally:
        c.close()
    with smtplib.SMTP("127.0.0.1", d.ports[0], timeout=10) as s:
        s.ehlo("tls.test.invalid")
        s.starttls(context=client_context())
        s.ehlo("tls.test.invalid")
        assert s.has_extn("requiretls")
        marked = send(s, ("REQUIRETLS",))
        plain = send(s)
    with smtplib.SMTP_SSL("127.0.0.1", d.ports[1], timeout=10, context=client_context()) as s:
        s.ehlo("smtps.test.invalid")
        assert s.has_extn("requiretls")
        smtps = send(s, ("REQUIRETLS",))
    assert d.stored(marked)[0].envelope.requiretls is True
    assert d.stored(plain)[0].envelope.requiretls is False
    assert d.stored(smtps)[0].envelope.requiretls is True
    # and the operator sees it
    import json
    assert json.loads(txmta_cli(d, "queue", "show", marked, "--json").stdout)["requiretls"] is True
    assert "requiretls: no" in txmta_cli(d, "queue", "show", plain).stdout.splitlines()


def test_bad_cipher_list_stops_the_start_with_a_clear_error(tmp_path, material_dir):
    """tls.ciphers that selects nothing: twistd exits at start naming the file, key and value
    (no traceback), and no listener is opened."""
    from itlib import make_daemon
    cert, key, _ = make_material("x")
    install(material_dir, cert, key)
    d = make_daemon(tmp_path / "daemons", listeners=[{"tls": "implicit"}],
                    tls={"cert": str(material_dir / "cert.pem"), "key": str(material_dir / "key.pem"),
                         "ciphers": "ECDHE-ECDSA-AES128-GCM-SHA256:NO-SUCH-CIPHER"})
    try:
        with pytest.raises(RuntimeError, match="exited with"):
            d.start(timeout=20)
    finally:
        d.stop()      # should it have started after all
    out = (d.dir / "twistd.stdout").read_text()
    assert (f'{d.config_path}: tls.ciphers = "ECDHE-ECDSA-AES128-GCM-SHA256:NO-SUCH-CIPHER": '
            "'NO-SUCH-CIPHER' matches no cipher") in out, out
    assert "Traceback" not in out
    assert d.proc is not None and d.proc.returncode != 0
