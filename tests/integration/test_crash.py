"""Crash test: SIGKILL the daemon while many clients send, restart it, and prove that every
message that got its 250 survived whole, and that nothing half-written appears.

Each round starts the daemon on a spool directory kept across rounds, runs THREADS client
threads sending messages in a loop (smtplib; each body unique: its X-Crash-Token header
names it, its sha256 is recorded before it is sent, and the queue id from the 250 reply
only when the 250 arrived), SIGKILLs the daemon 0.2-1.5 s after the sending started,
restarts it and checks the spool through LmdbView:

* acked-but-missing: a message that got 250 but is not in the spool (must be 0);
* broken: a stored message whose envelope or body differs from what was sent, a body that
  cannot be read, or a body file no message references after the restart (must be 0);
* unacked-but-stored: stored although the client did not see the 250 (fine, when whole).

The stored body must be exactly our Received header + the bytes the client sent (the
messages carry Message-ID and Date, so nothing else is added).  Bodies are a mix of
small ones (inline in LMDB) and large ones (over spool.inline_body_limit: body files).

Environment: TXMTA_CRASH_ROUNDS (default 20), TXMTA_CRASH_THREADS (20),
TXMTA_CRASH_SEED (random; printed so a failing run can be repeated).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import smtplib
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from itlib import Daemon, make_daemon, split_received

pytestmark = pytest.mark.integration

ROUNDS = int(os.environ.get("TXMTA_CRASH_ROUNDS", "20"))
THREADS = int(os.environ.get("TXMTA_CRASH_THREADS", "20"))
KILL_AFTER = (0.2, 1.5)
INLINE_LIMIT = 16 * 1024
TOKEN_RE = re.compile(rb"^X-Crash-Token: ([\w.-]+)\r$", re.M)


@dataclass
class Sent:
    sha256: str
    size: int
    sender: str
    rcpts: tuple[str, ...]


@dataclass
class Ledger:
    """What the clients sent (by token) and which of those got their 250 (by queue id)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    attempted: dict[str, Sent] = field(default_factory=dict)
    acked: dict[str, str] = field(default_factory=dict)          # queue id -> token
    early_errors: list[str] = field(default_factory=list)        # failures before the kill
    round_acked: int = 0


def make_body(rng: random.Random, tok: str) -> bytes:
    lines = [f"Message-ID: <{tok}@crash.test.invalid>", "Date: Sat, 28 Nov 2026 07:00:00 +0000",
             "From: <crash@example.com>", f"Subject: crash {tok}", f"X-Crash-Token: {tok}", ""]
    big = rng.random() < 0.2
    target = rng.randint(20_000, 80_000) if big else rng.randint(100, 4000)
    size = sum(len(x) + 2 for x in lines)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 .,-:"
    while size < target:
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 76)))
        if rng.random() < 0.05:
            line = "." + line          # dot-stuffed on the wire, unstuffed by the server
        lines.append(line)
        size += len(line) + 2
    lines.append(f"end of {tok}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def client(port: int, ledger: Ledger, stop: threading.Event, killed_at: list[float],
           seed: int, prefix: str) -> None:
    rng = random.Random(seed)
    n = 0
    while not stop.is_set():
        s = None
        try:
            s = smtplib.SMTP("127.0.0.1", port, timeout=10)
            s.ehlo("crash.test.invalid")
            for _ in range(rng.randint(1, 8)):
                if stop.is_set():
                    break
                n += 1
                tok = f"{prefix}-{n}-{uuid.uuid4().hex[:8]}"
                body = make_body(rng, tok)
                sender = f"s{n}@example.com"
                rcpts = tuple(f"r{n}.{i}@example.org" for i in range(rng.choice((1, 1, 1, 2, 3))))
                with ledger.lock:
                    ledger.attempted[tok] = Sent(hashlib.sha256(body).hexdigest(), len(body),
                                                 sender, rcpts)
                code, resp = s.mail(sender)
                if code != 250:
                    raise smtplib.SMTPResponseException(code, resp)
                for r in rcpts:
                    code, resp = s.rcpt(r)
                    if code != 250:
                        raise smtplib.SMTPResponseException(code, resp)
                code, resp = s.data(body)
                if code != 250:
                    raise smtplib.SMTPResponseException(code, resp)
                m = re.fullmatch(rb"2\.0\.0 Ok: queued as (\w+)", resp)
                if m is None:
                    raise AssertionError(f"unexpected 250 text {resp!r}")
                with ledger.lock:
                    qid = m.group(1).decode()
                    if qid in ledger.acked:
                        ledger.early_errors.append(f"queue id {qid} given twice")
                    ledger.acked[qid] = tok
                    ledger.round_acked += 1
            s.quit()
        except (OSError, smtplib.SMTPException, AssertionError) as e:
            if not killed_at:           # the daemon was still alive: a real failure
                ledger.early_errors.append(f"{prefix}: {type(e).__name__}: {e}")
            if s is not None:
                s.close()
            if killed_at:
                return
            time.sleep(0.05)


@dataclass
class Counts:
    acked: int = 0
    in_spool: int = 0
    acked_missing: int = 0
    unacked_stored: int = 0
    broken: int = 0
    problems: list[str] = field(default_factory=list)


def check_spool(d: Daemon, ledger: Ledger, verified: set[str], full: bool) -> Counts:
    """Compare the spool with the ledger.  Bodies of ids in `verified` were already checked
    and are only checked for presence, unless `full`."""
    c = Counts(acked=len(ledger.acked))
    v = d.view()
    try:
        ids = v.ids()
        c.in_spool = len(ids)
        present = set(ids)
        if len(present) != len(ids):
            c.broken += 1
            c.problems.append("duplicate ids in the spool")
        for qid in ledger.acked:
            if qid not in present:
                c.acked_missing += 1
                c.problems.append(f"acked {qid} ({ledger.acked[qid]}) is not in the spool")
        token_of_id = {qid: tok for qid, tok in ledger.acked.items()}
        seen_tokens: dict[str, str] = {}
        for qid in ids:
            if qid not in ledger.acked:
                c.unacked_stored += 1
            if qid in verified and not full:
                continue
            problem = verify_one(v, qid, ledger, token_of_id.get(qid), seen_tokens)
            if problem:
                c.broken += 1
                c.problems.append(f"{qid}: {problem}")
            else:
                verified.add(qid)
        bodies_dir = Path(d.spool_path) / "bodies"
        for name in os.listdir(bodies_dir) if bodies_dir.exists() else ():
            if name not in present:
                c.broken += 1
                c.problems.append(f"body file {name} belongs to no message")
    finally:
        v.close()
    return c


def verify_one(v: Any, qid: str, ledger: Ledger, acked_token: str | None,
               seen_tokens: dict[str, str]) -> str | None:
    try:
        m = v.get(qid)
        body = v.read_body(qid)
    except Exception as e:
        return f"unreadable: {type(e).__name__}: {e}"
    if m is None:
        return "vanished"
    try:
        rec, rest = split_received(body)
    except AssertionError as e:
        return str(e)
    if rec["id"].decode() != qid:
        return f"Received header names id {rec['id']!r}"
    found = TOKEN_RE.search(rest)
    if found is None:
        return f"no X-Crash-Token in {rest[:200]!r}"
    tok = found.group(1).decode()
    if acked_token is not None and tok != acked_token:
        return f"holds {tok}, but the 250 for it was given to {acked_token}"
    if tok in seen_tokens:
        return f"the message {tok} is stored twice (also {seen_tokens[tok]})"
    seen_tokens[tok] = qid
    sent = ledger.attempted.get(tok)
    if sent is None:
        return f"unknown token {tok}"
    if len(rest) != sent.size or hashlib.sha256(rest).hexdigest() != sent.sha256:
        return f"body of {tok} differs: {len(rest)} octets stored, {sent.size} sent"
    if m.size != len(body):
        return f"size {m.size} != body length {len(body)}"
    if str(m.envelope.sender) != sent.sender:
        return f"sender {m.envelope.sender} != {sent.sender}"
    if tuple(str(r.address) for r in m.envelope.recipients) != sent.rcpts:
        return f"recipients {m.envelope.recipients} != {sent.rcpts}"
    if len(m.recipients) != len(sent.rcpts) or any(r.state != "queued" for r in m.recipients):
        return f"recipient states {m.recipients}"
    return None


def test_crash_rounds(tmp_path: Path, start_daemon: Any) -> None:
    seed = int(os.environ.get("TXMTA_CRASH_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    print(f"\ncrash test: {ROUNDS} rounds x {THREADS} clients, seed {seed} (TXMTA_CRASH_SEED)")
    d = make_daemon(tmp_path / "crash", spool_path=tmp_path / "spool",
                    # a small map, so that it is grown live (and re-opened larger) under load
                    spool={"inline_body_limit": f"{INLINE_LIMIT}B", "map_size": "1MiB"},
                    server={"max_connections_per_ip": THREADS * 2})
    start_daemon.daemons.append(d)      # stopped (and its log shown on failure) at teardown
    ledger = Ledger()
    verified: set[str] = set()
    totals_unacked = 0
    started = time.monotonic()
    for rnd in range(ROUNDS):
        d.start()
        if rnd:
            c = check_spool(d, ledger, verified, full=False)
            report(rnd - 1, c, ledger)
            assert c.acked_missing == 0 and c.broken == 0, "\n".join(c.problems[:20])
            totals_unacked = c.unacked_stored
        ledger.round_acked = 0
        stop = threading.Event()
        killed_at: list[float] = []
        threads = [threading.Thread(target=client, args=(d.port, ledger, stop, killed_at,
                                                         rng.randrange(1 << 30), f"{rnd}.{i}"),
                                    daemon=True) for i in range(THREADS)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(*KILL_AFTER))
        killed_at.append(time.monotonic())
        d.kill()
        stop.set()
        for t in threads:
            t.join(30)
            assert not t.is_alive(), "a client thread hangs after the kill"
        assert not ledger.early_errors, "clients failed before the kill:\n" + "\n".join(ledger.early_errors[:20])
    d.start()
    c = check_spool(d, ledger, verified, full=True)
    report(ROUNDS - 1, c, ledger)
    print(f"crash test totals after {ROUNDS} rounds ({time.monotonic() - started:.1f} s): "
          f"attempted {len(ledger.attempted)}, acked {c.acked}, in spool {c.in_spool}, "
          f"acked-but-missing {c.acked_missing}, unacked-but-stored {c.unacked_stored}, "
          f"broken {c.broken}")
    assert c.acked_missing == 0 and c.broken == 0, "\n".join(c.problems[:20])
    assert c.acked > 0, "no message was acknowledged at all"
    assert c.in_spool == c.acked + c.unacked_stored
    assert c.unacked_stored >= totals_unacked
    assert d.stop() is not None


def report(rnd: int, c: Counts, ledger: Ledger) -> None:
    print(f"round {rnd:2d}: acked this round {ledger.round_acked:4d}; total acked {c.acked:5d}, "
          f"in spool {c.in_spool:5d}, acked-but-missing {c.acked_missing}, "
          f"unacked-but-stored {c.unacked_stored}, broken {c.broken}")


def test_checker_detects_damage(tmp_path: Path, start_daemon: Any) -> None:
    """The crash test's checker itself: it must see a missing acked message, a body that
    differs from what was sent, a wrong envelope, and an orphan body file."""
    d = start_daemon(spool={"inline_body_limit": f"{INLINE_LIMIT}B"})
    ledger = Ledger()
    stop = threading.Event()
    killed_at: list[float] = []
    t = threading.Thread(target=client, args=(d.port, ledger, stop, killed_at, 1, "self"))
    t.start()
    deadline = time.monotonic() + 10
    while len(ledger.acked) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    t.join(10)
    assert not ledger.early_errors, ledger.early_errors
    assert len(ledger.acked) >= 5
    ok = check_spool(d, ledger, set(), full=True)
    assert (ok.acked_missing, ok.broken, ok.unacked_stored) == (0, 0, 0), ok.problems
    assert ok.in_spool == ok.acked == len(ledger.acked)

    ids = list(ledger.acked)
    ledger.acked["0000000000000000"] = ids[0] + "-ghost"
    tok1 = ledger.acked[ids[1]]
    ledger.attempted[tok1] = Sent("0" * 64, ledger.attempted[tok1].size,
                                  ledger.attempted[tok1].sender, ledger.attempted[tok1].rcpts)
    tok2 = ledger.acked[ids[2]]
    old = ledger.attempted[tok2]
    ledger.attempted[tok2] = Sent(old.sha256, old.size, "someone@else.example", old.rcpts)
    (Path(d.spool_path) / "bodies" / "orphan").write_bytes(b"x")
    bad = check_spool(d, ledger, set(), full=True)
    assert bad.acked_missing == 1
    assert bad.broken == 3, bad.problems


def test_view_while_map_grows(start_daemon: Any) -> None:
    """LmdbView (what `txmta queue list` uses) opened and read again and again while the
    daemon grows its LMDB map under load: every open and every read must succeed."""
    d = start_daemon(spool={"map_size": "1MiB", "inline_body_limit": "256KiB"})
    stop = threading.Event()
    acked: list[bytes] = []
    send_errors: list[str] = []
    body = b"Subject: growth\r\n\r\n" + (b"z" * 70 + b"\r\n") * 1500     # ~108 KB, inline

    def sender() -> None:
        try:
            while not stop.is_set():
                with smtplib.SMTP("127.0.0.1", d.port, timeout=10) as s:
                    s.ehlo("growth.test.invalid")
                    for _ in range(5):
                        s.mail("a@example.com")
                        s.rcpt("b@example.org")
                        code, resp = s.data(body)
                        if code != 250:
                            raise smtplib.SMTPResponseException(code, resp)
                        acked.append(resp)
        except Exception as e:
            send_errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(10)]
    for t in threads:
        t.start()
    from txmta.spool.view import LmdbView
    errors: list[str] = []
    opens = 0
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        try:
            v = LmdbView(str(d.spool_path))
            opens += 1
            try:
                for mid in v.ids()[-5:]:
                    assert v.get(mid) is not None
                    assert v.read_body(mid).endswith(body.split(b"\r\n\r\n", 1)[1])
            finally:
                v.close()
        except Exception as e:
            import traceback
            where = traceback.extract_tb(e.__traceback__)[-1]
            errors.append(f"{type(e).__name__}: {e} (at {Path(where.filename).name}:{where.name}: {where.line})")
    stop.set()
    for t in threads:
        t.join(15)
    grown = d.log().count("spool map grown")
    print(f"\nview during growth: {len(acked)} messages, {grown} map growths, {opens} views opened, "
          f"{len(errors)} failed")
    assert not send_errors, send_errors[:5]
    assert grown >= 3, "the map did not grow: the test proves nothing"
    assert not errors, (f"{len(errors)} of {opens + len(errors)} LmdbView opens/reads failed:\n"
                        + "\n".join(sorted(set(errors))))
