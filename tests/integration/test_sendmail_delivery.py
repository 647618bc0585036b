"""txmta-sendmail end to end: real processes over one spool, the daemon relaying to a sink on
loopback.  The daemon down (the message waits in the spool, delivered once the daemon
starts), the daemon up (delivered within seconds, woken through the pickup socket), -t with
Bcc, a -bs dialogue, -bp and mailq, and the exit codes callers see."""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from itlib import REPO, Daemon, free_port, make_daemon, wait_until
from sinks import SmtpSink

pytestmark = pytest.mark.integration

SINK = "127.0.0.29"


def sendmail(d: Daemon, *args: str, stdin: bytes = b"", timeout: float = 30.0
             ) -> subprocess.CompletedProcess[bytes]:
    """Run txmta-sendmail (as `python -m txmta.sendmail`) with the daemon's configuration."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "txmta.sendmail", "-C", str(d.config_path), *args],
                          input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=env, timeout=timeout, cwd=str(d.dir))


def relaying(tmp_path: Path, port: int, workers: int = 1) -> Daemon:
    """A daemon (not started) that relays everything to the sink at SINK:port."""
    return make_daemon(tmp_path / "daemons", server={"workers": workers}, delivery={
        "relayhost": f"{SINK}:{port}", "relayhost_tls": "none", "connect_timeout": "5s"},
        retry={"schedule": ["1s", "2s"], "max_lifetime": "1h"})


@pytest.fixture
def port() -> int:
    return free_port(SINK)


@pytest.fixture
def daemons(tmp_path: Path) -> Any:
    made: list[Daemon] = []

    def make(port: int, workers: int = 1) -> Daemon:
        d = relaying(tmp_path, port, workers)
        made.append(d)
        return d
    yield make
    for d in made:
        d.stop()


def message(tag: str, headers: str = "") -> bytes:
    # LF line ends, as applications write them
    return (f"Subject: {tag}\n{headers}\nbody of {tag}\n..a line starting with a dot\n").encode()


def queue_id(stderr: bytes) -> str:
    m = re.search(rb"queued as (\w+)", stderr)
    assert m is not None, stderr
    return m.group(1).decode()


def test_daemon_down_then_started_delivers(daemons: Any, port: int) -> None:
    """With the daemon down, sendmail exits 0 and the message waits in the spool; the daemon
    delivers it once it starts."""
    d = daemons(port)
    tag = uuid.uuid4().hex
    r = sendmail(d, "-v", "-i", "-f", "app@client.test", "rcpt@example.org", stdin=message(tag))
    assert r.returncode == 0, r.stderr
    qid = queue_id(r.stderr)
    assert b"delivered when the daemon runs" in r.stderr
    m, body = d.stored(qid)
    assert [str(x.address) for x in m.envelope.recipients] == ["rcpt@example.org"]
    assert m.client["listener"] == "sendmail" and m.client["user"]
    assert body.startswith(b"Received: from ") and b" with local id " + qid.encode() in body
    assert f"body of {tag}\r\n..a line starting with a dot\r\n".encode() in body
    with SmtpSink(SINK, port) as sink:
        d.start()
        sink.wait(lambda s: len(s.transactions) >= 1, 20, "the message at the sink")
        wait_until(lambda: qid not in d.spool_ids(), 10, f"{qid} to leave the spool")
    [t] = sink.snapshot()
    assert t.mail_from == "app@client.test" and t.rcpt_to == ["rcpt@example.org"]
    assert f"Subject: {tag}\r\n".encode() in t.data


@pytest.mark.parametrize("workers", [1, 2])
def test_daemon_up_delivers_within_seconds(daemons: Any, port: int, workers: int) -> None:
    """With the daemon running, the message is delivered at once: sendmail wakes it (with
    several workers, the master passes the wake-up to the owner of the message's partition)."""
    d = daemons(port, workers)
    with SmtpSink(SINK, port) as sink:
        d.start()
        tag = uuid.uuid4().hex
        r = sendmail(d, "-v", "-oi", "rcpt@example.org", stdin=message(tag))
        assert r.returncode == 0, r.stderr
        assert b"the daemon was told" in r.stderr
        sink.wait(lambda s: len(s.transactions) >= 1, 5, "the message at the sink")
        qid = queue_id(r.stderr)
        # the owner worker told its mail log, as for mail it received itself
        wait_until(lambda: f"{qid}: received client= helo= from=<" in d.maillog(), 5,
                   "the received line in the mail log", diagnose=d.maillog)
        assert d.maillog().count(f"{qid}: received") == 1
    [t] = sink.snapshot()
    assert f"Subject: {tag}\r\n".encode() in t.data
    assert re.search(rb"\r\nFrom: .*@mx\.test\.invalid>?\r\n", t.data), t.data[:600]


def test_t_with_bcc(daemons: Any, port: int) -> None:
    """-t takes To, Cc and Bcc; the Bcc recipient gets the message, which has no Bcc field."""
    d = daemons(port)
    with SmtpSink(SINK, port) as sink:
        d.start()
        tag = uuid.uuid4().hex
        headers = ("To: Alice <alice@example.org>\nCc: carol@example.org\n"
                   "Bcc: hidden@example.net\nFrom: App <app@client.test>\n")
        r = sendmail(d, "-t", "-i", stdin=message(tag, headers))
        assert r.returncode == 0, r.stderr
        sink.wait(lambda s: sum(len(t.rcpt_to) for t in s.transactions) >= 3, 10,
                  "three recipients at the sink")
    got = sorted(rc for t in sink.snapshot() for rc in t.rcpt_to)
    assert got == ["alice@example.org", "carol@example.org", "hidden@example.net"]
    for t in sink.snapshot():
        header = t.data.split(b"\r\n\r\n", 1)[0]
        assert b"\r\nBcc:" not in header and b"hidden@example.net" not in header
        assert b"\r\nFrom: App <app@client.test>\r\n" in header


def test_bs_dialogue_and_bp(daemons: Any, port: int) -> None:
    """-bs speaks the daemon's ESMTP on stdin/stdout; the message is stored (daemon down)
    and -bp lists it as mailq does."""
    d = daemons(port)
    dialogue = (b"EHLO app.test\r\nMAIL FROM:<app@client.test>\r\nRCPT TO:<bob@example.org>\r\n"
                b"DATA\r\nSubject: bs\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    r = sendmail(d, "-bs", stdin=dialogue)
    assert r.returncode == 0, r.stderr
    replies = [line[:3] for line in r.stdout.split(b"\r\n") if line[3:4] == b" "]
    assert replies == [b"220", b"250", b"250", b"250", b"354", b"250", b"221"], r.stdout
    qid = re.search(rb"queued as (\w+)", r.stdout).group(1).decode()    # type: ignore[union-attr]
    _, body = d.stored(qid)
    assert b" with local-esmtp id " + qid.encode() in body
    listing = sendmail(d, "-bp")
    assert listing.returncode == 0
    assert qid.encode() in listing.stdout and b"bob@example.org" in listing.stdout
    env = dict(os.environ, PYTHONPATH=str(REPO))
    mailq = subprocess.run([sys.executable, "-c", "import sys; from txmta.sendmail import mailq; "
                            "sys.exit(mailq())", "--config", str(d.config_path)],
                           stdout=subprocess.PIPE, env=env, timeout=30)
    assert mailq.stdout == listing.stdout


@pytest.mark.parametrize("args, stdin, code", [
    (["-bx"], b"", 64),                                     # EX_USAGE
    (["-t"], b"Subject: no recipients\n\nx\n", 67),        # EX_NOUSER
    (["not an address@@x"], b"Subject: x\n\nx\n", 64),
])
def test_exit_codes(daemons: Any, port: int, args: list[str], stdin: bytes, code: int) -> None:
    d = daemons(port)
    r = sendmail(d, *args, stdin=stdin)
    assert r.returncode == code, r.stderr
    assert r.stderr.startswith(b"txmta-sendmail: ")


def test_unwritable_spool_is_cantcreat(daemons: Any, port: int, tmp_path: Path) -> None:
    """A spool the user cannot create (here under a plain file, which stops root as well as
    anyone): EX_CANTCREAT, saying the spool must be writable."""
    d = daemons(port)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    text = d.config_path.read_text().replace(str(d.spool_path), str(blocker / "spool"))
    d.config_path.write_text(text)
    r = sendmail(d, "rcpt@example.org", stdin=b"Subject: x\n\nx\n")
    assert r.returncode == 73, r.stderr
    assert b"writable" in r.stderr


# (caller, argv, its message, expected sender, recipients, From field, BODY)
CALLERS = [
    ("php mail()", ["-t", "-i"],
     "To: customer@example.net\nSubject: Your order\nX-PHP-Originating-Script: 33:shop.php\n"
     "\nThanks.\n.\nStill the message: -i.\n",
     "root@mx.test.invalid", ["customer@example.net"], None, "7BIT"),
    ("cron", ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
     "To: root\nSubject: Cron <root@host> backup\nContent-Type: text/plain; charset=UTF-8\n"
     "\nbackup done \u2713\n",
     "root@mx.test.invalid", ["root@mx.test.invalid"],
     b"From: CronDaemon <root@mx.test.invalid>", "8BITMIME"),
    ("git send-email", ["-i", "maintainer@example.org", "list@example.org"],
     "From: Dev <dev@example.com>\nTo: maintainer@example.org\nCc: list@example.org\n"
     "Subject: [PATCH] fix\nMessage-ID: <20261206.1@example.com>\n\n---\n.\n",
     "root@mx.test.invalid", ["maintainer@example.org", "list@example.org"],
     b"From: Dev <dev@example.com>", "7BIT"),
]


@pytest.mark.parametrize("caller, argv, text, sender, rcpts, from_field, body_type", CALLERS,
                         ids=[c[0] for c in CALLERS])
def test_real_callers_store_what_they_mean(daemons: Any, port: int, caller: str,
                                           argv: list[str], text: str, sender: str,
                                           rcpts: list[str], from_field: bytes | None,
                                           body_type: str) -> None:
    """The command lines of PHP's mail(), cron and git send-email, with the daemon down: the
    envelope and the stored message are what the caller meant (the default sender is the
    login of the user running the tests)."""
    from txmta.sendmail import from_field as make_from
    user = pwd.getpwuid(os.getuid())
    sender = sender.replace("root@", f"{user.pw_name}@")
    rcpts = [r.replace("root@", f"{user.pw_name}@") if caller != "cron" else r for r in rcpts]
    if from_field is None:      # the user's full name from the password database
        gecos = user.pw_gecos.split(",", 1)[0].strip()
        from_field = b"From: " + make_from(sender, gecos or None).encode()
    else:
        from_field = from_field.replace(b"<root@", f"<{user.pw_name}@".encode())
    d = daemons(port)
    r = sendmail(d, "-v", *argv, stdin=text.encode())
    assert r.returncode == 0, r.stderr
    m, body = d.stored(queue_id(r.stderr))
    assert str(m.envelope.sender) == sender
    assert [str(x.address) for x in m.envelope.recipients] == rcpts
    assert m.envelope.body == body_type
    header = body.split(b"\r\n\r\n", 1)[0]
    assert from_field + b"\r\n" in header + b"\r\n"
    assert b"\r\nMessage-ID: <" in header and b"\r\nDate: " in header
    if "\n.\n" in text:
        assert b"\r\n.\r\n" in body          # -i: a lone dot does not end the message


def suppress(d: Daemon, address: str) -> None:
    """Put `address` on the spool's suppression list (the daemon is down)."""
    import threading
    import time

    from txmta.message import Suppression
    from txmta.spool.lmdb import LmdbSpool

    class Immediate:
        def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:
            f(*args, **kw)

    def wait(deferred: Any) -> Any:
        done = threading.Event()
        deferred.addBoth(lambda r: done.set())
        assert done.wait(10)

    d.spool_path.mkdir(parents=True, exist_ok=True)
    spool = LmdbSpool(str(d.spool_path), Immediate())
    now = time.time()
    wait(spool.suppression_put([Suppression(address, "invalid-recipient", now, now + 3600)]))
    wait(spool.close())


@pytest.mark.parametrize("action", ["reject", "drop"])
def test_suppressed_recipients(tmp_path: Path, port: int, action: str) -> None:
    """As at RCPT: with "reject" a suppressed recipient is refused (said on stderr, the
    message stored for the others; none left: exit 67); with "drop" it ends suppressed."""
    d = make_daemon(tmp_path / "daemons", suppression={"action": action})
    suppress(d, "gone@example.org")
    r = sendmail(d, "-v", "gone@example.org", "ok@example.org", stdin=b"Subject: s\n\nx\n")
    assert r.returncode == 0, r.stderr
    m, _ = d.stored(queue_id(r.stderr))
    states = {str(x.address): st.state for x, st in zip(m.envelope.recipients, m.recipients)}
    if action == "reject":
        assert b"<gone@example.org>: recipient address suppressed" in r.stderr
        assert states == {"ok@example.org": "queued"}
        alone = sendmail(d, "gone@example.org", stdin=b"Subject: s\n\nx\n")
        assert alone.returncode == 67 and b"every one is suppressed" in alone.stderr
    else:
        assert states == {"gone@example.org": "suppressed", "ok@example.org": "queued"}
