"""Disk full (issue 14): a full spool filesystem, and a full LMDB map at `max_map_size`.

The spool lives on a small ext4 image the test makes and loop-mounts (root is needed: CI runs
as root; without it the test fails, it does not skip).  A filler file on the same filesystem
leaves only a few MiB free; deleting it is how "space returns".  Delivery goes to a
`sinks.SmtpSink` relayhost that refuses every MAIL (451) until the test opens it, so the mail
stays queued while the disk fills.

CLIENTS threads send messages (small ones stored in LMDB, big ones streamed to body files),
each with a unique X-Torture-Token header, until the spool is full.  Every reply is recorded:

* at the final dot, each reply is 250 or 452 4.3.1 (RFC 3463 "mail system full"); nothing
  else, no dropped connection;
* while full, the daemon still answers (EHLO, NOOP) and refuses new mail with 452 4.3.1;
* no traceback in the daemon log;
* space returns (filler deleted; for the map: the spool drains once the relayhost accepts):
  new mail is accepted again without a restart, and every message that got a 250 reaches
  the relayhost exactly as sent; none that got a 452 does.

A third test bounces mail while the disk is full (the relayhost answers 550): a bounce is
committed with its DSN or not at all, and once space returns every accepted message has
exactly one DSN.

The figures (250s, 452s, seconds until intake recovers, messages delivered) are printed: run
with -s to see them.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import smtplib
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from itlib import Daemon, delivery_sections, free_port, split_received, wait_until
from sinks import SmtpSink, Transaction
from torturelib import size

CLIENTS = 20
SINK_IP = "127.0.0.41"
MiB = 1024 * 1024
TOKEN_RE = re.compile(rb"^X-Torture-Token: ([\w.-]+)\r?$", re.M)
MESSAGE_ID_RE = re.compile(rb"^Message-ID: (<[^>]+>)\r?$", re.M | re.I)
FULL = "452 4.3.1"


# -- the filesystem ------------------------------------------------------------------------

@dataclass
class LoopFs:
    image: Path
    mountpoint: Path
    filler: Path

    def free(self) -> int:
        st = os.statvfs(self.mountpoint)
        return st.f_bfree * st.f_frsize

    def fill(self, leave: int) -> None:
        """A filler file that leaves about `leave` bytes free."""
        size = self.free() - leave
        assert size > 0, f"only {self.free()} bytes free on {self.mountpoint}"
        subprocess.run(["fallocate", "-l", str(size), str(self.filler)], check=True)
        os.sync()

    def unfill(self) -> None:
        self.filler.unlink()


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True)


@pytest.fixture
def loopfs(tmp_path: Path) -> Iterator[LoopFs]:
    """A fresh ext4 filesystem of 64 MiB on a loop device, mounted under tmp_path (no blocks
    reserved for root: the daemon runs as root here)."""
    if os.geteuid() != 0:
        pytest.fail("the disk-full test mounts a loop filesystem and must run as root "
                    "(CI does); it is not skipped")
    for tool in ("mkfs.ext4", "mount", "umount", "fallocate"):
        if shutil.which(tool) is None:
            pytest.fail(f"the disk-full test needs {tool}")
    image, mnt = tmp_path / "spool.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    p = _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
    assert p.returncode == 0, f"mkfs.ext4 failed: {p.stderr}"
    p = _run("mount", "-o", "loop", str(image), str(mnt))
    if p.returncode != 0:
        pytest.fail(f"cannot loop-mount {image} (the test needs root and loop devices): "
                    f"{p.stderr.strip()}")
    try:
        yield LoopFs(image, mnt, mnt / "filler")
    finally:
        p = _run("umount", str(mnt))
        if p.returncode != 0:
            _run("umount", "-l", str(mnt))


# -- mail --------------------------------------------------------------------------------------

def message(token: str, body_size: int, rng: random.Random) -> bytes:
    """A message with its own Message-ID and Date (so the daemon adds nothing but its
    Received header), the token in a header, and `body_size` octets of text lines."""
    line = 76
    n = max(1, body_size // (line + 2))
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/"
    seed = "".join(rng.choice(alphabet) for _ in range(4096))
    lines = []
    for i in range(n):
        start = (i * 37) % (len(seed) - line)
        lines.append(seed[start:start + line])
    head = (f"From: sender@client.test.invalid\r\nTo: rcpt@dest.test.invalid\r\n"
            f"Subject: disk full {token}\r\nMessage-ID: <{token}@client.test.invalid>\r\n"
            f"Date: Sun, 06 Dec 2026 09:00:00 +0000\r\nX-Torture-Token: {token}\r\n\r\n")
    return (head + "\r\n".join(lines) + "\r\n").encode()


@dataclass
class Ledger:
    """What every client was told, per token."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: dict[str, bytes] = field(default_factory=dict)       # token -> the message
    replies: dict[str, str] = field(default_factory=dict)      # token -> the final reply
    errors: list[str] = field(default_factory=list)            # anything unexpected

    def acked(self) -> set[str]:
        with self.lock:
            return {t for t, r in self.replies.items() if r.startswith("250")}

    def full(self) -> set[str]:
        with self.lock:
            return {t for t, r in self.replies.items() if r.startswith(FULL)}


def send_one(s: smtplib.SMTP, token: str, msg: bytes, rcpt: str = "rcpt@dest.test.invalid") -> str:
    """MAIL, RCPT, DATA of one message; the reply that ended the transaction."""
    code, text = s.mail("sender@client.test.invalid")
    if code != 250:
        s.rset()
        return f"{code} {text.decode(errors='replace')} (MAIL)"
    code, text = s.rcpt(rcpt)
    if code != 250:
        s.rset()
        return f"{code} {text.decode(errors='replace')} (RCPT)"
    try:
        code, text = s.data(msg)
    except smtplib.SMTPDataError as e:
        return f"{e.smtp_code} {e.smtp_error.decode(errors='replace')} (DATA)"
    return f"{code} {text.decode(errors='replace')}"


def client(d: Daemon, ledger: Ledger, n: int, sizes: Callable[[random.Random], int],
           stop: threading.Event, full_enough: int, rcpt: str) -> None:
    """Send until `full_enough` refusals in a row (or `stop`), one connection."""
    rng = random.Random(n)
    refused = 0
    i = 0
    try:
        s = smtplib.SMTP(d.host, d.port, timeout=60)
        s.ehlo("client.test.invalid")
    except (OSError, smtplib.SMTPException) as e:
        with ledger.lock:
            ledger.errors.append(f"client {n}: connect: {e!r}")
        return
    try:
        while not stop.is_set() and refused < full_enough:
            token = f"t{n}-{i}"
            i += 1
            msg = message(token, sizes(rng), rng)
            with ledger.lock:
                ledger.sent[token] = msg
            try:
                reply = send_one(s, token, msg, rcpt)
            except (OSError, smtplib.SMTPException) as e:
                reply = f"error {e!r}"
            with ledger.lock:
                ledger.replies[token] = reply
                if not (reply.startswith("250 ") or reply.startswith(FULL)):
                    ledger.errors.append(f"{token}: {reply}")
            if reply.startswith("error"):
                return
            refused = refused + 1 if reply.startswith(FULL) else 0
        s.quit()
    except (OSError, smtplib.SMTPException) as e:
        with ledger.lock:
            ledger.errors.append(f"client {n}: {e!r}")


def flood(d: Daemon, ledger: Ledger, sizes: Callable[[random.Random], int], timeout: float,
          full_enough: int = 3, rcpt: str = "rcpt@dest.test.invalid") -> float:
    """CLIENTS concurrent sessions until every one was refused `full_enough` times in a row;
    the seconds it took."""
    stop = threading.Event()
    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(d, ledger, n, sizes, stop, full_enough, rcpt),
                                daemon=True) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.1, started + timeout - time.monotonic()))
    stop.set()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a client is stuck"
    return time.monotonic() - started


class Arrivals:
    """What reached the relayhost, per token; closed (451 at MAIL) until `open` is set."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.data: dict[str, list[bytes]] = {}
        # token of a bounced message -> the Message-ID of each DSN copy that quotes it
        self.dsns: dict[str, list[bytes]] = {}
        self.bad = 0
        self.open = threading.Event()

    def mail(self, sink: Any, session: Any, arg: str) -> str | None:
        return None if self.open.is_set() else "451 4.3.0 relayhost closed for now"

    def __call__(self, t: Transaction) -> None:
        m = TOKEN_RE.search(t.data)
        with self.lock:
            if m is None:
                self.bad += 1
            elif t.mail_from in ("", "<>"):
                dsn_id = MESSAGE_ID_RE.search(t.data)
                self.dsns.setdefault(m.group(1).decode(), []).append(
                    dsn_id.group(1) if dsn_id else b"")
            else:
                self.data.setdefault(m.group(1).decode(), []).append(t.data)

    def tokens(self) -> set[str]:
        with self.lock:
            return set(self.data)


def check_arrived(ledger: Ledger, arrivals: Arrivals) -> int:
    """Every acked message arrived exactly as sent, no refused one did; how many arrived."""
    acked = ledger.acked()
    with arrivals.lock:
        data = dict(arrivals.data)
    assert arrivals.bad == 0
    for token in sorted(acked):
        copies = data.get(token)
        assert copies, f"{token} got a 250 and never arrived"
        for copy in copies:
            _, rest = split_received(copy)
            assert hashlib.sha256(rest).digest() == hashlib.sha256(ledger.sent[token]).digest(), \
                f"{token} arrived changed"
    refused = set(data) - acked
    assert not refused, f"refused or unknown messages arrived: {sorted(refused)[:20]}"
    return len(acked)


def still_serving(d: Daemon) -> None:
    """A fresh session gets its banner, EHLO and NOOP, and 452 4.3.1 for new mail."""
    with smtplib.SMTP(d.host, d.port, timeout=20) as s:
        code, _ = s.ehlo("probe.test.invalid")
        assert code == 250
        assert s.noop()[0] == 250
        reply = send_one(s, "probe-full", message("probe-full", 200 * 1024, random.Random(1)))
        assert reply.startswith(FULL), reply


def probe_until_accepted(d: Daemon, ledger: Ledger, timeout: float) -> tuple[float, str]:
    """Send a small message every 0.1 s until it gets a 250 (noted in `ledger`): (seconds,
    its token)."""
    started = time.monotonic()
    n = 0
    while True:
        token = f"recover-{n}"
        with smtplib.SMTP(d.host, d.port, timeout=20) as s:
            s.ehlo("probe.test.invalid")
            msg = message(token, 2000, random.Random(n))
            reply = send_one(s, token, msg)
        if reply.startswith("250 "):
            with ledger.lock:
                ledger.sent[token], ledger.replies[token] = msg, reply
            return time.monotonic() - started, token
        assert reply.startswith(FULL), reply
        if time.monotonic() - started > timeout:
            raise AssertionError(f"intake did not recover within {timeout}s: {reply}")
        n += 1
        time.sleep(0.1)


def assert_clean_log(d: Daemon) -> None:
    log = d.log()
    assert "Traceback" not in log, "traceback in the daemon log:\n" + log[-6000:]
    assert d.running, "the daemon died"


def report(name: str, ledger: Ledger, **figures: Any) -> None:
    with ledger.lock:
        replies = dict(ledger.replies)
    acked = sum(r.startswith("250") for r in replies.values())
    full = sum(r.startswith(FULL) for r in replies.values())
    print(f"\n{name}: sessions {CLIENTS}, messages {len(replies)}, 250 {acked}, "
          f"452 4.3.1 {full}, " + ", ".join(f"{k} {v}" for k, v in figures.items()))


def daemon_sections(sink: SmtpSink, **spool: Any) -> dict[str, Any]:
    sections = delivery_sections(free_port(), None, schedule=("1s",), relayhost_tls="none",
                                 relayhost=f"{SINK_IP}:{sink.port}")
    sections["spool"] = spool
    return sections


# -- the tests ----------------------------------------------------------------------------------

def open_and_drain(ledger: "Ledger", arrivals: "Arrivals") -> float:
    """Let the relayhost accept; the seconds until every acked message has arrived."""
    arrivals.open.set()
    opened = time.monotonic()
    wait_until(lambda: ledger.acked() <= arrivals.tokens(), size(60, 300),
               "every acked message at the relayhost", interval=0.2,
               diagnose=lambda: f"missing {sorted(ledger.acked() - arrivals.tokens())[:20]}")
    return time.monotonic() - opened


def test_full_disk(loopfs: LoopFs, start_daemon: Callable[..., Daemon]) -> None:
    free = size(6 * MiB, 24 * MiB)
    arrivals = Arrivals()
    sink = SmtpSink(SINK_IP, 0, on_message=arrivals, replies={"MAIL": arrivals.mail}).start()
    d: Daemon | None = None
    try:
        # big bodies go to files past 64 KiB, smaller ones into LMDB
        d = start_daemon(spool_path=loopfs.mountpoint / "spool",
                         **daemon_sections(sink, map_size="4MiB", inline_body_limit="64KiB"))
        loopfs.fill(free)
        ledger = Ledger()

        def sizes(rng: random.Random) -> int:
            return rng.choice((1000, 5000, 30_000, 100_000, 400_000, 1_000_000))

        took = flood(d, ledger, sizes, timeout=size(60.0, 300.0))
        assert not ledger.errors, ledger.errors[:20]
        assert ledger.acked() and ledger.full(), "the disk never filled, or nothing fit"
        still_serving(d)
        assert_clean_log(d)

        loopfs.unfill()
        recovered, _ = probe_until_accepted(d, ledger, timeout=20)
        drained = open_and_drain(ledger, arrivals)
        wait_until(lambda: not d.spool_ids(), 30, "the spool to drain", interval=0.2)
        delivered = check_arrived(ledger, arrivals)
        assert_clean_log(d)
        report("disk full", ledger, flood_s=round(took, 1), recovered_s=round(recovered, 2),
               delivered=delivered, drained_s=round(drained, 1))
    finally:
        if d is not None:
            d.stop()
        sink.stop()


def test_full_map(tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    arrivals = Arrivals()
    sink = SmtpSink(SINK_IP, 0, on_message=arrivals, replies={"MAIL": arrivals.mail}).start()
    try:
        d = start_daemon(**daemon_sections(sink, map_size="1MiB",
                                           max_map_size=size("4MiB", "32MiB")))
        ledger = Ledger()

        def sizes(rng: random.Random) -> int:
            return rng.choice((500, 2000, 10_000, 50_000, 120_000))

        took = flood(d, ledger, sizes, timeout=size(60.0, 300.0))
        assert not ledger.errors, ledger.errors[:20]
        assert ledger.acked() and ledger.full(), "the map never filled, or nothing fit"
        still_serving(d)
        assert_clean_log(d)

        drained = open_and_drain(ledger, arrivals)
        recovered, token = probe_until_accepted(d, ledger, timeout=30)
        wait_until(lambda: token in arrivals.tokens(), 30, "the probe at the relayhost")
        delivered = check_arrived(ledger, arrivals)
        assert_clean_log(d)
        report("map full", ledger, flood_s=round(took, 1), drained_s=round(drained, 1),
               recovered_after_drain_s=round(recovered, 2), delivered=delivered)
    finally:
        sink.stop()


def test_bounces_while_the_disk_is_full(loopfs: LoopFs, start_daemon: Callable[..., Daemon]) -> None:
    """Mail for a recipient the relayhost refuses (550), accepted until the disk is full,
    then bounced while it is still full: a bounce commits with its DSN or not at all (the
    recipient stays queued and is tried again); once space returns, every message that got a
    250 has exactly one DSN (which may arrive more than once: a DSN delivered while its
    delivery cannot be recorded is sent again, DESIGN invariant 3) and the spool drains."""
    arrivals = Arrivals()
    refused = "bounce@dest.test.invalid"
    sink = SmtpSink(SINK_IP, 0, on_message=arrivals, replies={
        "MAIL": arrivals.mail, "RCPT:" + refused: "550 5.1.1 no such user"}).start()
    d: Daemon | None = None
    try:
        d = start_daemon(spool_path=loopfs.mountpoint / "spool",
                         **daemon_sections(sink, map_size="4MiB", inline_body_limit="64KiB"))
        loopfs.fill(size(4 * MiB, 16 * MiB))
        ledger = Ledger()

        def sizes(rng: random.Random) -> int:
            return rng.choice((2000, 20_000, 100_000, 300_000))

        flood(d, ledger, sizes, timeout=size(60.0, 300.0), rcpt=refused)
        assert not ledger.errors, ledger.errors[:20]
        acked = ledger.acked()
        assert acked and ledger.full()
        arrivals.open.set()            # the relayhost answers: 550 for every recipient
        wait_until(lambda: sum(1 for _, _, r, code in sink.rcpt_log if code == 550) >= len(acked),
                   30, "as many refused attempts as accepted messages, the disk still full",
                   diagnose=lambda: f"daemon running: {d.running} (exit {d.proc.poll()})")
        full_attempts = sum(1 for _, _, r, code in sink.rcpt_log if code == 550)
        unrecorded = d.log().count("outcome not recorded")
        assert_clean_log(d)
        loopfs.unfill()
        freed = time.monotonic()
        wait_until(lambda: acked <= set(arrivals.dsns) and not d.spool_ids(), size(60, 300),
                   "a DSN for every accepted message and an empty spool", interval=0.2,
                   diagnose=lambda: f"no DSN yet for {sorted(acked - set(arrivals.dsns))[:20]}")
        drained = time.monotonic() - freed
        with arrivals.lock:
            dsns = dict(arrivals.dsns)
            assert not arrivals.data and arrivals.bad == 0
        assert set(dsns) == acked
        for token, ids in dsns.items():
            assert len(set(ids)) == 1 and ids[0], f"{token}: DSNs {ids}"
        assert_clean_log(d)
        report("bounces while full", ledger, attempts_while_full=full_attempts,
               outcomes_not_recorded=unrecorded, dsns=len(dsns),
               dsn_copies=sum(len(ids) for ids in dsns.values()), drained_s=round(drained, 1))
    finally:
        if d is not None:
            d.stop()
        sink.stop()
