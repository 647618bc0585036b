"""Server limits against a running daemon: message size, recipients, errors, connections
per IP, idle timeout, line length."""

from __future__ import annotations

import smtplib
import socket
import time
import uuid

import pytest

from itlib import Daemon, Raw, find_by_token, wait_until

pytestmark = pytest.mark.integration

MAX_SIZE = 10 * 1024


@pytest.fixture(scope="module")
def limited(module_daemons) -> Daemon:
    return module_daemons(
        listeners=[{"tls": "none"}],
        server={"max_recipients": 3, "max_errors": 5, "max_connections_per_ip": 3,
                "command_timeout": "2s"},
        spool={"max_message_size": f"{MAX_SIZE}B"})


def test_size_limits(limited: Daemon) -> None:
    t = uuid.uuid4().hex
    with smtplib.SMTP("127.0.0.1", limited.port, timeout=10) as s:
        s.ehlo("size.test.invalid")
        assert s.esmtp_features["size"] == str(MAX_SIZE)
        code, resp = s.mail("a@example.com", [f"SIZE={MAX_SIZE + 1}"])
        assert (code, resp[:5]) == (552, b"5.3.4"), resp
        assert s.mail("a@example.com", [f"SIZE={MAX_SIZE}"])[0] == 250
        assert s.rcpt("r@example.org")[0] == 250
        big = f"Subject: {t}\r\n\r\n".encode() + (b"x" * 70 + b"\r\n") * (MAX_SIZE // 72 + 10)
        code, resp = s.data(big)
        assert (code, resp[:5]) == (552, b"5.3.4"), resp
        # the session goes on, and a message that fits is taken
        assert s.noop()[0] == 250
        assert s.sendmail("a@example.com", ["r@example.org"], f"Subject: {t} small\r\n\r\nok\r\n") == {}
    # BDAT over the limit
    c = Raw(limited.port)
    try:
        assert c.cmd(b"EHLO size.test.invalid").startswith(b"250")
        assert c.cmd(b"MAIL FROM:<a@example.com>").startswith(b"250")
        assert c.cmd(b"RCPT TO:<r@example.org>").startswith(b"250")
        chunk = t.encode() + b"y" * (MAX_SIZE + 100)
        c.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
        r = c.reply()
        assert r.startswith(b"552 5.3.4"), r
        assert c.cmd(b"NOOP").startswith(b"250")
    finally:
        c.close()
    ids = find_by_token(limited, t)
    assert len(ids) == 1, "only the small message may be stored"


def test_max_recipients(limited: Daemon) -> None:
    with smtplib.SMTP("127.0.0.1", limited.port, timeout=10) as s:
        s.ehlo("rcpt.test.invalid")
        s.mail("a@example.com")
        for i in range(3):
            assert s.rcpt(f"r{i}@example.org")[0] == 250
        code, resp = s.rcpt("r3@example.org")
        assert (code, resp[:5]) == (452, b"4.5.3"), resp


def test_max_errors_closes(limited: Daemon) -> None:
    c = Raw(limited.port)
    try:
        for _ in range(4):
            assert c.cmd(b"BOGUS").startswith(b"500")
        r = c.cmd(b"BOGUS")
        assert r.startswith(b"500"), r
        r = c.reply()
        assert r.startswith(b"421 4.7.0"), r
        with pytest.raises((ConnectionError, OSError)):
            c.cmd(b"NOOP")
            c.cmd(b"NOOP")
    finally:
        c.sock.close()


def test_connections_per_ip(limited: Daemon) -> None:
    held = [Raw(limited.port) for _ in range(3)]
    try:
        with socket.create_connection(("127.0.0.1", limited.port), timeout=5) as s:
            data = s.recv(4096)
            assert data.startswith(b"421 4.7.0"), data
        # another source address has its own count
        other = Raw(limited.port, source="127.0.0.66")
        other.close()
    finally:
        for c in held:
            c.close()
    # the slots are released when the sessions end
    def greeting() -> bytes:
        with socket.create_connection(("127.0.0.1", limited.port), timeout=5) as s:
            return s.recv(4096)
    wait_until(lambda: greeting().startswith(b"220 "), 5, "a 220 greeting once the slots are free",
               interval=0.1)


def test_idle_timeout(limited: Daemon) -> None:
    c = Raw(limited.port)
    try:
        assert c.cmd(b"EHLO idle.test.invalid").startswith(b"250")
        start = time.monotonic()
        c.sock.settimeout(10)
        r = c.reply()
        assert r.startswith(b"421"), r
        assert 1.0 < time.monotonic() - start < 8.0
    finally:
        c.sock.close()


def test_line_too_long(limited: Daemon) -> None:
    c = Raw(limited.port)
    try:
        assert c.cmd(b"EHLO long.test.invalid").startswith(b"250")
        r = c.cmd(b"NOOP " + b"x" * 600)
        assert r.startswith(b"500"), r
        r = c.cmd(b"X" * 20000)
        assert r.startswith(b"500"), r
        assert c.cmd(b"NOOP").startswith(b"250")
    finally:
        c.close()
