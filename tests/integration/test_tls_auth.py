"""STARTTLS, implicit TLS and AUTH PLAIN/LOGIN against a running daemon, with a certificate
made at test time; swaks and smtplib clients on loopback."""

from __future__ import annotations

import base64
import re
import smtplib
import ssl
import uuid
from typing import Any

import pytest

from itlib import (HOSTNAME, USERS, Cert, Daemon, Raw, find_by_token, split_received, swaks,
                   swaks_queue_id)

pytestmark = pytest.mark.integration


def token() -> str:
    return uuid.uuid4().hex


@pytest.fixture(scope="module")
def tls_daemon(module_daemons, tls_cert: Cert) -> Daemon:
    """listener 0: STARTTLS; listener 1: implicit TLS; listener 2: no TLS (cert configured).
    Relays for 127.0.0.1; no AUTH."""
    return module_daemons(
        listeners=[{"tls": "starttls"}, {"tls": "implicit"}, {"tls": "none"}],
        tls={"cert": str(tls_cert.cert), "key": str(tls_cert.key)})


@pytest.fixture(scope="module")
def auth_daemon(module_daemons, tls_cert: Cert, users_file) -> Daemon:
    """relay.networks excludes every client used here, so only AUTH allows relaying.
    listener 0: STARTTLS, auth optional; listener 1: implicit TLS, auth required."""
    return module_daemons(
        listeners=[{"tls": "starttls", "auth": "optional"},
                   {"tls": "implicit", "auth": "required"}],
        tls={"cert": str(tls_cert.cert), "key": str(tls_cert.key)},
        auth={"users": str(users_file)},
        relay={"networks": ["127.0.0.200/32"]})


def verifying_context(cert: Cert) -> ssl.SSLContext:
    """Trusts only the generated certificate.  smtplib checks the name it connected to
    ("127.0.0.1"), so the host name is compared separately (peer_name_ok)."""
    ctx = ssl.create_default_context(cafile=str(cert.cert))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_name_ok(sock: Any) -> bool:
    peer = sock.getpeercert()
    return ("DNS", HOSTNAME) in peer.get("subjectAltName", ())


def check_tls_stored(daemon: Daemon, qid: str, tls_version: str, proto: str = "ESMTPS") -> bytes:
    m, body = daemon.stored(qid)
    rec, rest = split_received(body)
    assert rec["proto"].decode() == proto, body[:300]
    assert re.search(rb"\(using " + re.escape(tls_version.encode()) + rb" with cipher [\w-]+ \(\d+ bits\)\)",
                     rec.group(0)), rec.group(0)
    assert m.client.get("tls", "").startswith(tls_version + " "), m.client
    return rest


def send(s: smtplib.SMTP, sender: str, rcpt: str, body: bytes) -> str:
    code, resp = s.mail(sender)
    assert code == 250, resp
    code, resp = s.rcpt(rcpt)
    assert code == 250, resp
    code, resp = s.data(body)
    assert code == 250, resp
    m = re.search(rb"queued as (\w+)", resp)
    assert m, resp
    return m.group(1).decode()


# -- TLS -----------------------------------------------------------------------------------

def test_starttls_smtplib(tls_daemon: Daemon, tls_cert: Cert) -> None:
    t = token()
    with smtplib.SMTP("127.0.0.1", tls_daemon.ports[0], timeout=10) as s:
        s.ehlo("tls.test.invalid")
        assert s.has_extn("starttls")
        code, _ = s.starttls(context=verifying_context(tls_cert))
        assert code == 220
        assert peer_name_ok(s.sock)
        version = s.sock.version()
        assert version in ("TLSv1.2", "TLSv1.3")
        s.ehlo("tls.test.invalid")
        assert not s.has_extn("starttls"), "STARTTLS must not be offered again inside TLS"
        code, resp = s.docmd("STARTTLS")
        assert code == 503, resp
        qid = send(s, "tls@example.com", "r@example.org", f"Subject: {t}\r\n\r\n{t}\r\n".encode())
    rest = check_tls_stored(tls_daemon, qid, version)
    assert t.encode() in rest


def test_starttls_drops_pipelined_plaintext(tls_daemon: Daemon, tls_cert: Cert) -> None:
    """RFC 3207 4.2 / CVE-2011-0411: commands sent in the clear after STARTTLS, in the same
    packet, must be thrown away, not executed inside the TLS session."""
    c = Raw(tls_daemon.ports[0])
    try:
        assert c.cmd(b"EHLO inject.test.invalid").startswith(b"250")
        c.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\n")
        assert c.reply().startswith(b"220")
        assert not c.buf
        tls = verifying_context(tls_cert).wrap_socket(c.sock, server_hostname=HOSTNAME)
        c.sock = tls
        # the injected MAIL must not have been answered nor have started a transaction
        assert c.cmd(b"EHLO inject.test.invalid").startswith(b"250")
        r = c.cmd(b"RCPT TO:<r@example.org>")
        assert r.startswith(b"503"), r
        assert c.cmd(b"MAIL FROM:<ok@example.com>").startswith(b"250")
    finally:
        c.close()


def test_starttls_swaks(tls_daemon: Daemon, tls_cert: Cert) -> None:
    t = token()
    r = swaks("--server", f"127.0.0.1:{tls_daemon.ports[0]}", "--tls", "--tls-verify",
              "--tls-ca-path", str(tls_cert.cert), "--tls-sni", HOSTNAME,
              "--from", "swaks@example.com", "--to", "r@example.org", "--body", t)
    assert r.returncode == 0, r.stdout
    assert "TLS started" in r.stdout, r.stdout
    m = re.search(r"TLS started with cipher (TLSv1\.[23])", r.stdout)
    assert m, r.stdout
    check_tls_stored(tls_daemon, swaks_queue_id(r.stdout), m.group(1))


def test_implicit_tls_smtplib(tls_daemon: Daemon, tls_cert: Cert) -> None:
    t = token()
    with smtplib.SMTP_SSL("127.0.0.1", tls_daemon.ports[1], timeout=10,
                          context=verifying_context(tls_cert)) as s:
        assert peer_name_ok(s.sock)
        version = s.sock.version()
        s.ehlo("implicit.test.invalid")
        assert not s.has_extn("starttls")
        qid = send(s, "imp@example.com", "r@example.org", f"Subject: {t}\r\n\r\n{t}\r\n".encode())
    check_tls_stored(tls_daemon, qid, version)


def test_implicit_tls_swaks(tls_daemon: Daemon, tls_cert: Cert) -> None:
    t = token()
    r = swaks("--server", f"127.0.0.1:{tls_daemon.ports[1]}", "--tlsc", "--tls-verify",
              "--tls-ca-path", str(tls_cert.cert), "--tls-sni", HOSTNAME,
              "--from", "swaks@example.com", "--to", "r@example.org", "--body", t)
    assert r.returncode == 0, r.stdout
    m = re.search(r"TLS started with cipher (TLSv1\.[23])", r.stdout)
    assert m, r.stdout
    check_tls_stored(tls_daemon, swaks_queue_id(r.stdout), m.group(1))


def test_plaintext_on_implicit_listener_fails(tls_daemon: Daemon) -> None:
    """A client speaking plain SMTP to the implicit-TLS port gets no SMTP banner."""
    import socket
    with socket.create_connection(("127.0.0.1", tls_daemon.ports[1]), timeout=5) as s:
        s.settimeout(1.0)
        s.sendall(b"EHLO plain.test.invalid\r\n")
        try:
            data = s.recv(4096)
        except (socket.timeout, ConnectionError):
            data = b""
        assert not data.startswith(b"220 ") and b"250" not in data


def test_no_starttls_on_plain_listener(tls_daemon: Daemon) -> None:
    with smtplib.SMTP("127.0.0.1", tls_daemon.ports[2], timeout=10) as s:
        s.ehlo("plain.test.invalid")
        assert not s.has_extn("starttls")
        code, _ = s.docmd("STARTTLS")
        assert code == 502
        qid = send(s, "p@example.com", "r@example.org", b"Subject: plain\r\n\r\nx\r\n")
    m, body = tls_daemon.stored(qid)
    rec, _ = split_received(body)
    assert rec["proto"] == b"ESMTP" and b"using" not in rec.group(0)
    assert "tls" not in m.client


# -- AUTH ----------------------------------------------------------------------------------

def test_auth_plain_and_login_swaks(auth_daemon: Daemon, tls_cert: Cert) -> None:
    for mech, user in (("PLAIN", "alice"), ("LOGIN", "bob@example.org")):
        t = token()
        r = swaks("--server", f"127.0.0.1:{auth_daemon.ports[0]}", "--tls",
                  "--auth", mech, "--auth-user", user, "--auth-password", USERS[user],
                  "--from", "auth@example.com", "--to", "far@example.org", "--body", t)
        assert r.returncode == 0, r.stdout
        assert "235 2.7.0" in r.stdout, r.stdout
        qid = swaks_queue_id(r.stdout)
        m, body = auth_daemon.stored(qid)
        rec, _ = split_received(body)
        assert rec["proto"] == b"ESMTPSA", rec.group(0)
        assert m.client.get("auth") == user
        # the credentials are never stored or logged
        assert USERS[user].encode() not in body
        assert USERS[user] not in auth_daemon.log() and USERS[user] not in auth_daemon.maillog()
        assert user.encode() not in rec.group(0), "the Received header must not name the AUTH user"


def test_auth_wrong_password_535(auth_daemon: Daemon) -> None:
    for mech in ("PLAIN", "LOGIN"):
        r = swaks("--server", f"127.0.0.1:{auth_daemon.ports[0]}", "--tls",
                  "--auth", mech, "--auth-user", "alice", "--auth-password", "wrong password",
                  "--from", "auth@example.com", "--to", "far@example.org")
        assert r.returncode != 0, r.stdout
        assert re.search(r"<[~*]\*? +535 5\.7\.8", r.stdout), r.stdout
        assert "queued as" not in r.stdout
    # unknown user: the same answer
    r = swaks("--server", f"127.0.0.1:{auth_daemon.ports[0]}", "--tls", "--auth", "PLAIN",
              "--auth-user", "mallory", "--auth-password", "x",
              "--from", "auth@example.com", "--to", "far@example.org")
    assert re.search(r"<[~*]\*? +535 5\.7\.8", r.stdout), r.stdout


def test_unauthenticated_relay_denied(auth_daemon: Daemon, tls_cert: Cert) -> None:
    r = swaks("--server", f"127.0.0.1:{auth_daemon.ports[0]}", "--tls",
              "--from", "anon@example.com", "--to", "far@example.org")
    assert r.returncode != 0, r.stdout
    assert re.search(r"<[~*]\*? +554 5\.7\.1", r.stdout), r.stdout
    with smtplib.SMTP("127.0.0.1", auth_daemon.ports[0], timeout=10) as s:
        s.starttls(context=verifying_context(tls_cert))
        s.ehlo("anon.test.invalid")
        assert s.has_extn("auth")
        assert s.mail("anon@example.com")[0] == 250
        code, resp = s.rcpt("far@example.org")
        assert (code, resp[:5]) == (554, b"5.7.1"), resp
        # a failed AUTH does not open the relay either
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.rset()
            s.login("alice", "not it")
        assert e.value.smtp_code == 535
        s.mail("anon@example.com")
        assert s.rcpt("far@example.org")[0] == 554
        s.rset()
        # then a good one does
        s.user, s.password = "alice", USERS["alice"]
        code, resp = s.auth("LOGIN", s.auth_login)
        assert code == 235, resp
        assert s.mail("anon@example.com")[0] == 250
        assert s.rcpt("far@example.org")[0] == 250
        code, resp = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0alice\0x").decode())
        assert code == 503, resp   # already authenticated... and inside a transaction


def test_auth_utf8_password_plain(auth_daemon: Daemon, tls_cert: Cert) -> None:
    with smtplib.SMTP("127.0.0.1", auth_daemon.ports[0], timeout=10) as s:
        s.starttls(context=verifying_context(tls_cert))
        s.ehlo("utf8.test.invalid")
        blob = base64.b64encode(b"\0bob@example.org\0" + USERS["bob@example.org"].encode("utf-8"))
        code, resp = s.docmd("AUTH", "PLAIN " + blob.decode())
        assert code == 235, resp
        t = token()
        qid = send(s, "bob@example.org", "far@example.org", f"Subject: {t}\r\n\r\n{t}\r\n".encode())
    m, _ = auth_daemon.stored(qid)
    assert m.client.get("auth") == "bob@example.org"


def test_auth_required_on_implicit_listener(auth_daemon: Daemon, tls_cert: Cert) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", auth_daemon.ports[1], timeout=10,
                          context=verifying_context(tls_cert)) as s:
        s.ehlo("sub.test.invalid")
        assert "PLAIN" in s.esmtp_features.get("auth", "") and "LOGIN" in s.esmtp_features["auth"]
        code, resp = s.mail("sub@example.com")
        assert (code, resp[:5]) == (530, b"5.7.0"), resp
        s.login("alice", USERS["alice"])
        t = token()
        qid = send(s, "sub@example.com", "far@example.org", f"Subject: {t}\r\n\r\n{t}\r\n".encode())
        version = s.sock.version()
    rest = check_tls_stored(auth_daemon, qid, version, proto="ESMTPSA")
    assert t.encode() in rest
    assert find_by_token(auth_daemon, t) == [qid]


def test_failed_handshakes_release_connection_slots(start_daemon, tls_cert: Cert) -> None:
    """Failed TLS handshakes (implicit and after STARTTLS) must not use up the per-IP
    connection limit."""
    import socket
    import time
    d = start_daemon(listeners=[{"tls": "implicit"}, {"tls": "starttls"}],
                     tls={"cert": str(tls_cert.cert), "key": str(tls_cert.key)},
                     server={"max_connections_per_ip": 2})
    for _ in range(4):
        with socket.create_connection(("127.0.0.1", d.ports[0]), timeout=5) as s:
            s.sendall(b"EHLO not-tls\r\n" * 10)
            s.settimeout(2)
            try:
                s.recv(4096)
            except OSError:
                pass
        c = Raw(d.ports[1])
        c.cmd(b"EHLO x.test.invalid")
        assert c.cmd(b"STARTTLS").startswith(b"220")
        c.send(b"\x16\x03\x01\x00\x05garbage-not-a-client-hello")
        c.sock.settimeout(2)
        try:
            c.sock.recv(4096)
        except OSError:
            pass
        c.sock.close()
    deadline = time.monotonic() + 5
    while True:
        try:
            with smtplib.SMTP_SSL("127.0.0.1", d.ports[0], timeout=5,
                                  context=verifying_context(tls_cert)) as s:
                s.ehlo("after.test.invalid")
                break
        except smtplib.SMTPConnectError as e:
            if time.monotonic() > deadline:
                pytest.fail(f"connection slots were not released: {e}")
            time.sleep(0.1)
