"""Relay access by source address, and bare-LF SMTP smuggling, over real sockets.

Clients bind to 127.0.0.66: on Linux all of 127.0.0.0/8 is loopback, so this needs no
setup, but it is a different source address than 127.0.0.1.  Note that 127.x is loopback
for txmta too, so `bare_newlines = "reject-remote"` is lenient with it ("fix")."""

from __future__ import annotations

import smtplib
import uuid

import pytest

from itlib import OTHER_IP, Daemon, Raw, find_by_token, queued_id, split_received, swaks, swaks_queue_id

pytestmark = pytest.mark.integration


def token() -> str:
    return uuid.uuid4().hex


@pytest.fixture(scope="module")
def relay_daemon(module_daemons) -> Daemon:
    return module_daemons(listeners=[{"tls": "none"}], relay={"networks": ["127.0.0.1/32"]})


@pytest.fixture(scope="module")
def smuggle_daemon(module_daemons) -> Daemon:
    """Trusts all of 127/8; listener 0 bare_newlines = "reject", 1 = "reject-remote", 2 = "fix"."""
    return module_daemons(
        listeners=[{"tls": "none", "bare_newlines": "reject"},
                   {"tls": "none", "bare_newlines": "reject-remote"},
                   {"tls": "none", "bare_newlines": "fix"}],
        relay={"networks": ["127.0.0.0/8"]})


# -- relay access ----------------------------------------------------------------------------

def test_relay_denied_from_untrusted_source_smtplib(relay_daemon: Daemon) -> None:
    t = token()
    with smtplib.SMTP("127.0.0.1", relay_daemon.port, timeout=10, source_address=(OTHER_IP, 0)) as s:
        code, msg = s.ehlo("other.test.invalid")
        assert f"[{OTHER_IP}]".encode() in msg, msg     # the server sees the bound address
        assert s.mail("a@example.com")[0] == 250
        code, resp = s.rcpt("r@example.org")
        assert (code, resp[:5]) == (554, b"5.7.1"), resp
        code, resp = s.rcpt("postmaster")
        assert code == 554, resp
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            s.rset()
            s.sendmail("a@example.com", ["r@example.org", "q@example.net"], f"Subject: {t}\r\n\r\n{t}\r\n")
        assert {v[0] for v in e.value.recipients.values()} == {554}
    assert find_by_token(relay_daemon, t) == []


def test_relay_allowed_from_trusted_source_smtplib(relay_daemon: Daemon) -> None:
    t = token()
    with smtplib.SMTP("127.0.0.1", relay_daemon.port, timeout=10, source_address=("127.0.0.1", 0)) as s:
        assert s.sendmail("a@example.com", ["r@example.org"], f"Subject: {t}\r\n\r\n{t}\r\n") == {}
    ids = find_by_token(relay_daemon, t)
    assert len(ids) == 1
    m, body = relay_daemon.stored(ids[0])
    assert m.client["address"] == "127.0.0.1"


def test_relay_swaks_local_interface(relay_daemon: Daemon) -> None:
    t = token()
    r = swaks("--server", f"127.0.0.1:{relay_daemon.port}", "--local-interface", OTHER_IP,
              "--from", "a@example.com", "--to", "r@example.org", "--body", t)
    assert r.returncode != 0, r.stdout
    assert "<** 554 5.7.1" in r.stdout, r.stdout
    assert find_by_token(relay_daemon, t) == []
    r = swaks("--server", f"127.0.0.1:{relay_daemon.port}", "--local-interface", "127.0.0.1",
              "--from", "a@example.com", "--to", "r@example.org", "--body", t)
    assert r.returncode == 0, r.stdout
    qid = swaks_queue_id(r.stdout)
    assert find_by_token(relay_daemon, t) == [qid]


# -- bare LF smuggling -------------------------------------------------------------------------

SMUGGLE_ENDS = [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r"]


def smuggling_payload(t: str, end: bytes) -> bytes:
    """A message whose body holds a fake end of data, then a whole second transaction."""
    return (f"Subject: outer {t}\r\n\r\nouter body {t}".encode() + end
            + b"MAIL FROM:<smuggled@evil.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
            + f"Subject: smuggled {t}\r\n\r\nsmuggled body {t}\r\n".encode()
            + b".\r\n")


@pytest.mark.parametrize("end", SMUGGLE_ENDS, ids=[e.decode().replace("\r", "CR").replace("\n", "LF")
                                                   for e in SMUGGLE_ENDS])
@pytest.mark.parametrize("source", [OTHER_IP, "127.0.0.1"])
def test_smuggling_rejected(smuggle_daemon: Daemon, end: bytes, source: str) -> None:
    t = token()
    c = Raw(smuggle_daemon.ports[0], source=source)
    try:
        assert c.cmd(b"EHLO smuggler.test.invalid").startswith(b"250")
        assert c.cmd(b"MAIL FROM:<outer@example.com>").startswith(b"250")
        assert c.cmd(b"RCPT TO:<r@example.org>").startswith(b"250")
        assert c.cmd(b"DATA").startswith(b"354")
        c.send(smuggling_payload(t, end))
        r = c.reply()
        assert r.startswith(b"550 5.5.2"), r
        # exactly one reply: the smuggled MAIL/RCPT/DATA were not executed as commands;
        # the session is still usable and has no transaction open
        r = c.cmd(b"NOOP")
        assert r.startswith(b"250 "), r
        r = c.cmd(b"RCPT TO:<x@example.org>")
        assert r.startswith(b"503"), r
    finally:
        c.close()
    assert find_by_token(smuggle_daemon, t) == [], "nothing of a rejected message is stored"


def test_smuggling_in_bdat_rejected(smuggle_daemon: Daemon) -> None:
    t = token()
    chunk = smuggling_payload(t, b"\n.\n")
    c = Raw(smuggle_daemon.ports[0], source=OTHER_IP)
    try:
        assert c.cmd(b"EHLO smuggler.test.invalid").startswith(b"250")
        assert c.cmd(b"MAIL FROM:<outer@example.com>").startswith(b"250")
        assert c.cmd(b"RCPT TO:<r@example.org>").startswith(b"250")
        c.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
        r = c.reply()
        assert r.startswith(b"550 5.5.2"), r
        assert c.cmd(b"NOOP").startswith(b"250 ")
    finally:
        c.close()
    assert find_by_token(smuggle_daemon, t) == []


@pytest.mark.parametrize("listener", [1, 2], ids=["reject-remote-from-loopback", "fix"])
def test_bare_lf_fixed(smuggle_daemon: Daemon, listener: int) -> None:
    """reject-remote (127.0.0.66 is loopback) and fix: ONE message is stored, the bare line
    ends became CRLF, and the smuggled commands are plain content."""
    t = token()
    c = Raw(smuggle_daemon.ports[listener], source=OTHER_IP)
    try:
        assert c.cmd(b"EHLO smuggler.test.invalid").startswith(b"250")
        assert c.cmd(b"MAIL FROM:<outer@example.com>").startswith(b"250")
        assert c.cmd(b"RCPT TO:<r@example.org>").startswith(b"250")
        assert c.cmd(b"DATA").startswith(b"354")
        c.send(smuggling_payload(t, b"\n.\n"))
        r = c.reply()
        assert r.startswith(b"250 2.0.0 Ok: queued as"), r
        qid = queued_id(r)
        assert c.cmd(b"NOOP").startswith(b"250 ")
        assert c.cmd(b"RCPT TO:<x@example.org>").startswith(b"503")
    finally:
        c.close()
    assert find_by_token(smuggle_daemon, t) == [qid]
    m, body = smuggle_daemon.stored(qid)
    assert str(m.envelope.sender) == "outer@example.com"
    assert [str(r.address) for r in m.envelope.recipients] == ["r@example.org"]
    _, rest = split_received(body)
    assert body.count(b"\n") == body.count(b"\r\n") and body.count(b"\r") == body.count(b"\r\n"), \
        "a bare CR or LF was stored"
    assert f"outer body {t}\r\n.\r\nMAIL FROM:<smuggled@evil.example>\r\n".encode() in rest
    assert rest.endswith(f"smuggled body {t}\r\n".encode())
