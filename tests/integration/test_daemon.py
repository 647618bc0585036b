"""The daemon end to end over plain TCP on loopback: swaks and smtplib clients, the spool
read back through LmdbView, the mail log, raw BDAT, graceful stop and restart."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from itlib import (HOSTNAME, REPO, Daemon, Raw, find_by_token, make_daemon, queued_id,
                   split_received, swaks, swaks_queue_id, wait_until)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def daemon(module_daemons) -> Daemon:
    """A plain (no TLS, no AUTH) daemon that relays for 127.0.0.1 only."""
    return module_daemons(listeners=[{"tls": "none", "bare_newlines": "reject-remote"}])


def token() -> str:
    return uuid.uuid4().hex


def test_banner_and_ehlo(daemon: Daemon) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as s:
        code, msg = s.ehlo("client.test.invalid")
        assert code == 250
        assert msg.startswith(f"{HOSTNAME} Hello client.test.invalid [127.0.0.1]".encode())
        for kw in ("pipelining", "8bitmime", "smtputf8", "enhancedstatuscodes", "chunking", "size", "dsn"):
            assert s.has_extn(kw), f"EHLO lacks {kw}: {msg!r}"
        # no certificate and no users file: neither STARTTLS nor AUTH
        assert not s.has_extn("starttls")
        assert not s.has_extn("auth")


def check_stored(daemon: Daemon, qid: str, sender: str, rcpts: list[str], *,
                 proto: str = "ESMTP", helo: str | None = None, ip: str = "127.0.0.1") -> bytes:
    """Assert the envelope and our Received header of message `qid`; return the body after it."""
    m, body = daemon.stored(qid)
    assert m.id == qid
    assert str(m.envelope.sender) == sender
    assert [str(r.address) for r in m.envelope.recipients] == rcpts
    assert all(st.state == "queued" for st in m.recipients)
    assert m.size == len(body)
    rec, rest = split_received(body)
    assert rec["id"].decode() == qid
    assert rec["proto"].decode() == proto
    assert rec["ip"].decode() == ip
    if helo is not None:
        assert rec["helo"].decode() == helo
    if len(rcpts) == 1:
        assert f"for <{rcpts[0]}>;".encode() in rec["rest"]
    assert m.client["address"] == ip
    return rest


@pytest.mark.parametrize("extra", [[], ["--pipeline"]], ids=["plain", "pipeline"])
def test_swaks_send(daemon: Daemon, extra: list[str]) -> None:
    t = token()
    r = swaks("--server", f"127.0.0.1:{daemon.port}", "--ehlo", "swaks.test.invalid",
              "--from", "sender@example.com", "--to", "rcpt@example.org",
              "--header", f"Subject: swaks {t}", "--body", f"Hello from swaks {t}", *extra)
    assert r.returncode == 0, r.stdout
    if extra:
        # with --pipeline swaks sends MAIL and RCPT without waiting in between
        assert re.search(r" -> MAIL FROM:<sender@example.com>\n -> RCPT TO:<rcpt@example.org>", r.stdout), r.stdout
    qid = swaks_queue_id(r.stdout)
    rest = check_stored(daemon, qid, "sender@example.com", ["rcpt@example.org"],
                        helo="swaks.test.invalid")
    assert f"Subject: swaks {t}\r\n".encode() in rest
    assert f"\r\n\r\nHello from swaks {t}\r\n".encode() in rest
    assert rest.count(b"Message-Id:") + rest.count(b"Message-ID:") == 1   # swaks wrote one; none added


def test_swaks_8bit_body_and_attachment(daemon: Daemon, tmp_path: Path) -> None:
    t = token()
    att = tmp_path / "blob.bin"
    payload = bytes(range(256)) * 8 + t.encode()
    att.write_bytes(payload)
    body = f"Grüße aus Köln, ½ € — {t}"
    r = swaks("--server", f"127.0.0.1:{daemon.port}", "--from", "sender@example.com",
              "--to", "rcpt@example.org", "--body", body, "--attach", f"@{att}",
              "--attach-type", "application/octet-stream")
    assert r.returncode == 0, r.stdout
    qid = swaks_queue_id(r.stdout)
    rest = check_stored(daemon, qid, "sender@example.com", ["rcpt@example.org"])
    assert body.encode("utf-8") in rest, "the 8-bit body was not stored byte for byte"
    import base64
    import email
    import email.policy
    msg = email.message_from_bytes(rest, policy=email.policy.compat32)
    assert msg.is_multipart()
    parts = [p.get_payload(decode=True) for p in msg.walk() if not p.is_multipart()]
    assert payload in parts, "the attachment did not survive"
    assert base64.b64encode(payload)[:60] in rest


def test_smtplib_several_recipients(daemon: Daemon) -> None:
    t = token()
    rcpts = ["one@example.org", "Two.Mixed@Example.NET", "three+tag@example.com"]
    msg = (f"From: a@example.com\r\nTo: undisclosed-recipients:;\r\nSubject: {t}\r\n\r\n"
           f"body {t}\r\n.starts with a dot\r\n..two dots\r\n").encode()
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as s:
        s.ehlo("multi.test.invalid")
        code, resp = s.mail("a@example.com", ["BODY=8BITMIME"])
        assert code == 250, resp
        for r in rcpts:
            code, resp = s.rcpt(r)
            assert (code, resp[:5]) == (250, b"2.1.5"), resp
        code, resp = s.data(msg)
        assert code == 250, resp
        qid = queued_id(resp)
    # the domain is lower-cased, the local part kept as sent
    stored_rcpts = ["one@example.org", "Two.Mixed@example.net", "three+tag@example.com"]
    rest = check_stored(daemon, qid, "a@example.com", stored_rcpts, helo="multi.test.invalid")
    m, _ = daemon.stored(qid)
    assert m.envelope.body == "8BITMIME"
    # dot-stuffing undone, nothing else touched; Message-ID and Date added at the header end
    head, _, tail = rest.partition(b"\r\n\r\n")
    assert tail == f"body {t}\r\n.starts with a dot\r\n..two dots\r\n".encode()
    assert re.search(rb"^Message-ID: <" + qid.encode() + rb"@" + HOSTNAME.encode() + rb">\r?$", head, re.M), head
    assert re.search(rb"^Date: ", head, re.M), head


def test_smtplib_sendmail(daemon: Daemon) -> None:
    t = token()
    msg = f"Subject: sendmail {t}\r\nMessage-ID: <{t}@client>\r\n\r\nline {t}\r\n"
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as s:
        refused = s.sendmail("a@example.com", ["x@example.org", "y@example.org"], msg)
    assert refused == {}
    found = find_by_token(daemon, t)
    assert len(found) == 1, "sendmail's message must be stored exactly once"
    rest = check_stored(daemon, found[0], "a@example.com", ["x@example.org", "y@example.org"])
    # msg has a Message-ID but no Date: a Date is added at the end of the header section,
    # nothing else changes
    head, _, tail = msg.encode().partition(b"\r\n\r\n")
    m = re.fullmatch(re.escape(head + b"\r\n") + rb"Date: [^\r\n]+\r\n" + re.escape(b"\r\n" + tail), rest)
    assert m is not None, rest


def test_smtputf8(daemon: Daemon) -> None:
    t = token()
    sender = "jörg@bücher.example"
    rcpt = "δοκιμή@παράδειγμα.example"
    msg = f"From: {sender}\r\nSubject: ünïcödé {t}\r\n\r\nκείμενο {t}\r\n".encode("utf-8")
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as s:
        s.ehlo("utf8.test.invalid")
        assert s.has_extn("smtputf8")
        # without SMTPUTF8 a UTF-8 address is refused (smtplib would not even send it)
        s.command_encoding = "utf-8"
        code, resp = s.docmd("MAIL", f"FROM:<{sender}>")
        assert code >= 500, (code, resp)
        code, resp = s.docmd("MAIL", "FROM:<plain@example.com>")
        assert code == 250, (code, resp)
        code, resp = s.docmd("RCPT", f"TO:<{rcpt}>")
        assert code >= 500, (code, resp)
        s.rset()
        refused = s.sendmail(sender, [rcpt], msg, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        assert refused == {}
    hits = find_by_token(daemon, t)
    assert len(hits) == 1
    qid = hits[0]
    rest = check_stored(daemon, qid, sender, [rcpt], proto="UTF8SMTP")
    m, _ = daemon.stored(qid)
    assert m.envelope.smtputf8 is True
    assert f"κείμενο {t}".encode("utf-8") in rest


def test_bdat_raw(daemon: Daemon) -> None:
    t = token().encode()
    chunk1 = b"Subject: bdat " + t + b"\r\nMessage-ID: <" + t + b"@c>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"
    chunk2 = b".a line starting with a dot stays as is in BDAT\r\n\xc3\xa9 8-bit " + t + b"\r\n.\r\n"
    c = Raw(daemon.port)
    try:
        assert c.cmd(b"EHLO bdat.test.invalid").startswith(b"250")
        assert c.cmd(b"MAIL FROM:<b@example.com> BODY=8BITMIME").startswith(b"250 2.1.0")
        assert c.cmd(b"RCPT TO:<r@example.org>").startswith(b"250 2.1.5")
        c.send(b"BDAT %d\r\n" % len(chunk1) + chunk1)
        assert c.reply() == b"250 2.0.0 %d octets received" % len(chunk1)
        c.send(b"BDAT %d LAST\r\n" % len(chunk2) + chunk2)
        r = c.reply()
        assert r.startswith(b"250 2.0.0 Ok: queued as "), r
        qid = queued_id(r)
        # pipelined: a whole transaction with BDAT in one write
        chunk3 = b"Subject: pipelined " + t + b"\r\n\r\nx\r\n"
        c.send(b"MAIL FROM:<c@example.com>\r\nRCPT TO:<r2@example.org>\r\n"
               b"BDAT %d LAST\r\n" % len(chunk3) + chunk3 + b"NOOP\r\n")
        assert c.reply().startswith(b"250 2.1.0")
        assert c.reply().startswith(b"250 2.1.5")
        r2 = c.reply()
        assert r2.startswith(b"250 2.0.0 Ok: queued as "), r2
        assert c.reply().startswith(b"250 2.0.0 OK")
        # BDAT without a transaction: the chunk is read and refused
        c.send(b"BDAT 5 LAST\r\nabcde")
        assert c.reply().startswith(b"503 5.5.1")
        assert c.cmd(b"NOOP").startswith(b"250")
    finally:
        c.close()
    rest = check_stored(daemon, qid, "b@example.com", ["r@example.org"], helo="bdat.test.invalid")
    assert rest == chunk1 + chunk2, "BDAT content must be stored byte for byte"
    rest2 = check_stored(daemon, queued_id(r2), "c@example.com", ["r2@example.org"])
    assert rest2.startswith(chunk3.split(b"\r\n\r\n")[0] + b"\r\n")
    assert rest2.endswith(b"\r\n\r\nx\r\n")


def test_rset_noop_vrfy_help(daemon: Daemon) -> None:
    c = Raw(daemon.port)
    try:
        assert c.cmd(b"MAIL FROM:<a@example.com>").startswith(b"503 5.5.1")   # no EHLO yet
        assert c.cmd(b"EHLO cmds.test.invalid").startswith(b"250")
        assert c.cmd(b"NOOP").startswith(b"250 2.0.0")
        assert c.cmd(b"VRFY someone@example.org").startswith(b"252 2.5.0")
        assert c.cmd(b"VRFY").startswith(b"501")
        help_reply = c.cmd(b"HELP")
        assert help_reply.startswith(b"214"), help_reply
        for verb in (b"EHLO", b"MAIL", b"RCPT", b"DATA", b"BDAT", b"RSET", b"NOOP", b"QUIT"):
            assert verb in help_reply
        assert c.cmd(b"EXPN list").startswith(b"502")
        assert c.cmd(b"FROBNICATE").startswith(b"500")
        assert c.cmd(b"MAIL FROM:<a@example.com>").startswith(b"250")
        assert c.cmd(b"MAIL FROM:<a@example.com>").startswith(b"503")   # nested
        assert c.cmd(b"RCPT TO:<r@example.org>").startswith(b"250")
        assert c.cmd(b"RSET").startswith(b"250 2.0.0")
        # RSET ended the transaction
        assert c.cmd(b"RCPT TO:<r@example.org>").startswith(b"503 5.5.1")
        assert c.cmd(b"DATA").startswith(b"503")
        assert c.cmd(b"MAIL FROM:<>").startswith(b"250")                 # null sender
        assert c.cmd(b"DATA").startswith(b"554")                         # no recipients
    finally:
        c.close()
    # smtplib's own wrappers
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as s:
        s.ehlo("x.test.invalid")
        assert s.noop()[0] == 250
        assert s.verify("x@example.org")[0] == 252
        assert b"RCPT" in s.help()
        assert s.rset()[0] == 250


def test_queue_list_json(daemon: Daemon) -> None:
    """`txmta queue list --json` (run as `python -c 'txmta.cli.main()'` when the console
    script is missing) lists the messages, also while the daemon runs."""
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as s:
        s.ehlo("q.test.invalid")
        s.mail("q@example.com")
        s.rcpt("r@example.org")
        code, resp = s.data(b"Subject: queue list\r\n\r\nx\r\n")
        assert code == 250
    qid = queued_id(resp)
    script = Path(sys.executable).with_name("txmta")
    cmd = ([str(script)] if script.exists() else
           [sys.executable, "-c", "import sys; from txmta.cli import main; sys.exit(main())"])
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run(cmd + ["queue", "list", "--json", "--config", str(daemon.config_path)],
                       capture_output=True, text=True, timeout=30, env=env, cwd=str(daemon.dir))
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)
    assert isinstance(listed, list)
    assert len(listed) == len(daemon.spool_ids())
    entry = [e for e in listed if e.get("id") == qid]
    assert len(entry) == 1, r.stdout
    assert "q@example.com" in json.dumps(entry[0], ensure_ascii=False)
    assert "r@example.org" in json.dumps(entry[0], ensure_ascii=False)


def send_n(port: int, n: int, tag: str) -> list[str]:
    ids = []
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("log.test.invalid")
        for i in range(n):
            s.mail(f"s{i}@example.com")
            s.rcpt(f"r{i}@example.org")
            code, resp = s.data(f"Subject: {tag} {i}\r\n\r\n{tag} {i}\r\n".encode())
            assert code == 250, resp
            ids.append(queued_id(resp))
    return ids


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_maillog(start_daemon, fmt: str) -> None:
    d = start_daemon(log={"format": fmt})
    n = 7
    ids = send_n(d.port, n, token())
    wait_until(lambda: d.maillog().count("received") >= n, 10, f"{n} received lines",
               diagnose=d.maillog)
    # split on "\n" only: str.splitlines() would also split on \x1e and friends
    lines = [line for line in d.maillog().split("\n") if line]
    if fmt == "text":
        received = [line for line in lines if ": received " in line]
        assert len(received) == n, d.maillog()
        for qid, line in zip(ids, received):
            assert re.search(rf"\b{qid}: received client=127\.0\.0\.1 helo=log\.test\.invalid "
                             rf"from=<s\d+@example\.com> nrcpt=1 size=\d+ tls=none", line), line
    else:
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except ValueError as e:
                pytest.fail(f"mail log line is not one JSON object ({e}): {line[:80]!r}...")
        received = [e for e in events if e.get("event") == "received"]
        assert len(received) == n, d.maillog()
        assert [e["id"] for e in received] == ids
        for e in received:
            assert e["client"] == "127.0.0.1" and e["nrcpt"] == 1 and e["tls"] == "none"
    # the mail log has only mail events; the daemon's own log has none of them twice
    assert "Starting factory" not in d.maillog()


def test_sigterm_then_restart_keeps_mail(start_daemon) -> None:
    d = start_daemon()
    ids = send_n(d.port, 3, token())
    bodies = {qid: d.stored(qid)[1] for qid in ids}
    assert d.stop() in (0, -signal.SIGTERM), d.diagnostics()
    assert "Traceback" not in d.log(), d.log()
    # the spool is consistent after a clean stop, with or without the daemon
    for qid, body in bodies.items():
        assert d.stored(qid)[1] == body
    d.start()
    assert sorted(d.spool_ids()) == sorted(ids)
    more = send_n(d.port, 2, token())
    assert not set(more) & set(ids), "queue ids must not repeat across restarts"
    assert sorted(d.spool_ids()) == sorted(ids + more)
    for qid, body in bodies.items():
        assert d.stored(qid)[1] == body
    assert d.stop() in (0, -signal.SIGTERM)


def test_bad_config_fails_fast(tmp_path: Path) -> None:
    """A bad configuration: twistd exits non-zero, naming the key, and binds nothing."""
    d = make_daemon(tmp_path, listeners=[{"tls": "tls13"}])
    with pytest.raises(RuntimeError) as e:
        d.start(timeout=20)
    assert 'listen[0].tls = "tls13"' in str(e.value)
    assert d.proc is not None and d.proc.returncode != 0


def test_sigterm_with_open_sessions(start_daemon) -> None:
    """SIGTERM while one client is idle and another is in the middle of DATA: the daemon
    exits promptly (no SIGKILL needed), the half-sent message is not stored, the
    spool opens again."""
    import time
    d = start_daemon()
    t = token()
    idle = Raw(d.port)
    busy = Raw(d.port)
    assert busy.cmd(b"EHLO busy.test.invalid").startswith(b"250")
    assert busy.cmd(b"MAIL FROM:<a@example.com>").startswith(b"250")
    assert busy.cmd(b"RCPT TO:<r@example.org>").startswith(b"250")
    assert busy.cmd(b"DATA").startswith(b"354")
    busy.send(f"Subject: {t}\r\n\r\nhalf a message".encode())
    time.sleep(0.2)
    start = time.monotonic()
    status = d.stop(timeout=15)
    assert status in (0, -signal.SIGTERM), f"exit status {status}\n" + d.diagnostics()
    assert time.monotonic() - start < 10
    for c in (idle, busy):
        c.sock.close()
    assert "Traceback" not in d.log(), d.log()
    d.start()
    assert find_by_token(d, t) == []
