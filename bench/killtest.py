"""Kill -9 at random moments under mixed load, then check what the clients were told against
what the next hop received and what bounced.  The durability test of docs/durability.md.

One real twistd daemon (`[server] workers = 2`, switched to 1 and back now and then between
restarts) on one spool, with at once:

* intake over SMTP (SMTP_CLIENTS smtplib threads) and over the HTTP API (API_CLIENTS threads:
  POST /v1/messages with a raw message, and Postmark's POST /email);
* delivery to a relayhost sink (tests/integration/sinks.py) on 127.0.0.47, which accepts
  `ok-T@dest.test`, refuses `bad-T@dest.test` with 550 (a bounce: the DSN goes to the sender
  `snd-T@src.test`, through the same sink) and answers 450 twice to `defer-T@dest.test`
  before it accepts it (deferrals); T is the message's token, also in an X-Kill-Token header;
* admin commands (`txmta queue list/hold/release/flush`) from one more thread;
* webhooks (`[[webhook]]`: delivered, bounced, expired, suppressed) to a receiver on 127.0.0.1.

KILLS times, after a random delay, the test SIGKILLs one of: the master (its workers die by
their parent-death signal), the master and every worker at the same moment, or (with two
workers) one worker, which the master restarts.  After the master's death the daemon is
started again on the same spool.  After the last kill the load stops, held messages are
released, the queue is flushed, and everything drains.  Then the checker compares:

* lost: a recipient of an acked message (250 after DATA, 200 from the API) that never reached
  the sink (`ok-`, `defer-`), or whose bounce has no DSN at the sink (`bad-`): must be 0;
* duplicates: arrivals of a recipient beyond the first.  DESIGN invariant 3: the only window is
  between the next hop's 250 and our commit of it, so every duplicate's first copy must have
  arrived close to a kill (at most WINDOW_BEFORE seconds before it, or SINK_LAG after: the
  sink reads what the killed process wrote just before it died) and its second after it,
  and per kill at most the messages in flight (max_inflight per priority level) come twice;
* terminal events (webhooks, each with a stable webhook-id): every recipient of an acked
  message has exactly one, of the right kind (delivered, or bounced for `bad-`), and no
  recipient anywhere has two distinct ones; the mail log shows no recipient with two
  terminal lines either;
* the spool is empty at the end: no message, recipient, due or domain entry, no body file
  (BIG_SHARE of the messages are large enough for one), no webhook delivery waiting;
* no worker stopped unasked (the master's log): a kill takes down what it kills, nothing else.

Run it on its own (from the repository root, with the virtualenv's Python):

    .venv/bin/python bench/killtest.py --kills 100 [--seed N] [--out FILE] [--workdir DIR] [--keep]

It prints a summary and writes every figure (and each kill: when, what, the load then) as JSON
to bench/results/<date>-killtest.json (or --out), and exits 1 when the checker found a
violation.  tests/torture/test_kill_random.py runs it with 5 kills in `make test` and 100 in
`make torture`.  Loopback only.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import random
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(REPO / "tests" / "integration")):
    if p not in sys.path:
        sys.path.insert(0, p)

from itlib import (Daemon, delivery_sections, free_port, maillog_events,  # noqa: E402
                   make_daemon, txmta_cli)
from sinks import SmtpSink, Transaction  # noqa: E402

SINK_IP = "127.0.0.47"
SMTP_CLIENTS = 4
API_CLIENTS = 2
PACE = 0.02                 # seconds each client waits after a message
MAX_INFLIGHT = 50           # [delivery] max_inflight: messages in flight per priority level
PRIORITY_LEVELS = 2         # the default lanes: transactional and bulk
WINDOW_BEFORE = 5.0         # seconds: a duplicate's first copy arrived at most this long before
SINK_LAG = 2.0              # or this long after the kill that explains it
BIG_SHARE = 0.03            # messages of 300 KB (a body file, not an LMDB value)
DEFERRALS = 2               # 450s before a defer- recipient is accepted
SECRET = "whsec_" + "a2lsbHRlc3Qta2lsbHRlc3Qta2lsbHRlc3Q="
TERMINAL = {"message.delivered", "message.bounced", "message.expired", "message.suppressed"}
TOKEN_RE = re.compile(rb"^X-Kill-Token: (\w+)\r?$", re.M)
KINDS = ("master", "all", "worker")


# -- the ledgers ------------------------------------------------------------------------------

@dataclass
class Plan:
    """One message a client tries to send: its token, channel, sender and recipients."""
    token: str
    channel: str                    # "smtp", "api" (native) or "postmark"
    sender: str
    rcpts: list[str]
    big: bool = False
    acked: bool = False


def plan(token: str, channel: str, rng: random.Random) -> Plan:
    rcpts = [f"ok-{token}@dest.test"]
    if rng.random() < 0.25:
        rcpts.append(f"bad-{token}@dest.test")
    if rng.random() < 0.25:
        rcpts.append(f"defer-{token}@dest.test")
    rng.shuffle(rcpts)
    return Plan(token, channel, f"snd-{token}@src.test", rcpts, big=rng.random() < BIG_SHARE)


def token_of(address: str) -> str:
    """The token of ok-T@dest.test, bad-T@..., defer-T@..., snd-T@src.test."""
    return address.split("@", 1)[0].split("-", 1)[1]


class Intake:
    """What the clients tried and what they were told."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.plans: dict[str, Plan] = {}
        self.errors: collections.Counter[str] = collections.Counter()
        self.samples: dict[str, str] = {}         # the first error of each kind, with its time
        self.last_ack = 0.0
        self.stop = threading.Event()

    def tried(self, p: Plan) -> None:
        with self.lock:
            self.plans[p.token] = p

    def acked(self, p: Plan) -> None:
        with self.lock:
            p.acked = True
            self.last_ack = time.monotonic()

    def failed(self, channel: str, error: BaseException | str) -> None:
        """Count a failed attempt by channel and cause: "refused" (no connection), "cut" (the
        connection died), or the reply code the server answered with."""
        if isinstance(error, str):
            why = error
        elif isinstance(error, urllib.error.HTTPError):
            why = str(error.code)
        elif isinstance(error, smtplib.SMTPRecipientsRefused):
            why = ",".join(sorted({str(c) for c, _ in error.recipients.values()}))
        elif isinstance(error, smtplib.SMTPResponseException):
            why = str(error.smtp_code)
        elif isinstance(error, ConnectionRefusedError) or (
                isinstance(error, urllib.error.URLError)
                and isinstance(error.reason, ConnectionRefusedError)):
            why = "refused"
        else:
            why = "cut"
        with self.lock:
            self.errors[f"{channel} {why}"] += 1
            self.samples.setdefault(f"{channel} {why}", f"{time.time():.3f} {error}"[:300])

    def forget(self, p: Plan) -> None:
        """A message never sent (no connection)."""
        with self.lock:
            self.plans.pop(p.token, None)

    def acked_count(self) -> int:
        with self.lock:
            return sum(1 for p in self.plans.values() if p.acked)


class Arrivals:
    """What reached the sink: per recipient address, the times it arrived; DSNs per sender."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.times: dict[str, list[float]] = collections.defaultdict(list)
        self.dsn_for: dict[str, set[str]] = collections.defaultdict(set)   # snd- -> bad- named
        self.transactions = 0
        self.last = 0.0
        self.odd: list[str] = []        # arrivals that match no plan's shape

    def __call__(self, t: Transaction) -> None:
        with self.lock:
            self.transactions += 1
            self.last = time.monotonic()
            for rcpt in t.rcpt_to:
                self.times[rcpt.lower()].append(t.time)
            if t.mail_from == "":
                for rcpt in t.rcpt_to:
                    named = re.findall(rb"bad-(\w+)@dest\.test", t.data)
                    if not named:
                        self.odd.append(f"a DSN to {rcpt} names no bad- recipient")
                    self.dsn_for[rcpt.lower()].update(n.decode() for n in named)
            else:
                m = TOKEN_RE.search(t.data)
                if m is None or any(token_of(r) != m.group(1).decode() for r in t.rcpt_to):
                    self.odd.append(f"a message to {t.rcpt_to} with token "
                                    f"{m.group(1) if m else None!r}")

    def total(self) -> int:
        with self.lock:
            return self.transactions


def sink_script(deferrals: int) -> Callable[[Any, Any, str], str | None]:
    """The sink's RCPT replies: 550 for bad-, `deferrals` times 450 for defer-."""
    seen: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def reply(sink: Any, session: Any, rcpt: str) -> str | None:
        local = rcpt.lower().split("@", 1)[0]
        if local.startswith("bad-"):
            return f"550 5.1.1 <{rcpt}>: Recipient address rejected: no such user"
        if local.startswith("defer-"):
            with lock:
                seen[local] += 1
                if seen[local] <= deferrals:
                    return f"450 4.2.0 <{rcpt}>: mailbox busy, try again"
        return None
    return reply


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass            # a connection cut by a kill is expected


class Hooks:
    """The webhook receiver: every request, kept (the signature is not checked here;
    tests/integration/test_webhooks.py does)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.got: list[tuple[str, str, str, str]] = []   # (webhook-id, type, queue id, rcpt)
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                with hooks.lock:
                    hooks.got.append((self.headers["webhook-id"], body["type"],
                                      body["data"]["message_id"], body["data"]["recipient"]))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def terminal(self) -> dict[tuple[str, str], dict[str, str]]:
        """(queue id, recipient) -> {webhook-id: type} of its terminal events."""
        out: dict[tuple[str, str], dict[str, str]] = collections.defaultdict(dict)
        with self.lock:
            for wid, kind, mid, rcpt in self.got:
                if kind in TERMINAL:
                    out[(mid, rcpt.lower())][wid] = kind
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- the load -----------------------------------------------------------------------------------

def message_bytes(p: Plan) -> bytes:
    """The message; a big one (past the spool's 256 KiB inline limit: a body file) now and then."""
    filler = ("x" * 998 + "\r\n") * (300 if p.big else 0)
    return (f"From: <{p.sender}>\r\nTo: " + ", ".join(f"<{r}>" for r in p.rcpts) + "\r\n"
            f"Message-ID: <{p.token}@killtest.invalid>\r\n"
            "Date: Sun, 06 Dec 2026 07:00:00 +0000\r\n"
            f"Subject: killtest {p.token}\r\nX-Kill-Token: {p.token}\r\n\r\n"
            f"body of {p.token}\r\n{filler}").encode()


def smtp_client(d: Daemon, intake: Intake, index: int, seed: int) -> None:
    """Send over persistent SMTP connections (a new one every few messages, or after an
    error) until told to stop; a message counts as acked only after its 250 to DATA."""
    rng = random.Random(seed)
    n = 0
    while not intake.stop.is_set():
        s = None
        try:
            s = smtplib.SMTP(d.host, d.port, timeout=15)
            s.ehlo("killtest.test.invalid")
            for _ in range(rng.randint(1, 20)):
                if intake.stop.is_set():
                    break
                n += 1
                p = plan(f"s{index}x{n}", "smtp", rng)
                intake.tried(p)
                s.sendmail(p.sender, p.rcpts, message_bytes(p))   # raises unless 250 after DATA
                intake.acked(p)
                time.sleep(PACE)
            s.quit()
        except (OSError, smtplib.SMTPException) as e:
            intake.failed("smtp", e)
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
            time.sleep(0.1)


def api_client(url: str, token: str, intake: Intake, index: int, seed: int) -> None:
    """POST /v1/messages (a raw message with its envelope) and Postmark's /email in turn;
    a message counts as acked only after a 200."""
    rng = random.Random(seed)
    n = 0
    while not intake.stop.is_set():
        n += 1
        if n % 2:
            p = plan(f"a{index}x{n}", "api", rng)
            path, body = "/v1/messages", {
                "raw": base64.b64encode(message_bytes(p)).decode(),
                "envelope": {"from": p.sender, "to": p.rcpts}}
        else:
            p = plan(f"p{index}x{n}", "postmark", rng)
            path, body = "/email", {
                "From": p.sender, "To": ", ".join(p.rcpts), "Subject": f"killtest {p.token}",
                "TextBody": f"body of {p.token}\n",
                "Headers": [{"Name": "X-Kill-Token", "Value": p.token}]}
        intake.tried(p)
        req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Accept": "application/json",
                                              "Authorization": f"Bearer {token}",
                                              "X-Postmark-Server-Token": token})
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                r.read()
                if r.status == 200:
                    intake.acked(p)
                else:
                    intake.failed(p.channel, str(r.status))
        except (OSError, ValueError) as e:
            intake.failed(p.channel, e)
            if isinstance(e, urllib.error.URLError) and isinstance(e.reason, ConnectionRefusedError):
                intake.forget(p)
            time.sleep(0.1)
        time.sleep(PACE)


class Admin:
    """`txmta queue list/hold/release/flush` at random moments during the load; the messages
    it held, so that the end can release them."""

    def __init__(self, d: Daemon, intake: Intake, seed: int) -> None:
        self.d, self.intake, self.rng = d, intake, random.Random(seed)
        self.ran: collections.Counter[str] = collections.Counter()
        self.failed: collections.Counter[str] = collections.Counter()
        self.held: set[str] = set()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str] | None:
        try:
            p = txmta_cli(self.d, *args, check=False, timeout=30)
        except subprocess.TimeoutExpired:
            p = None
        name = " ".join(a for a in args[:2])
        self.ran[name] += 1
        if p is None or p.returncode != 0:
            self.failed[name] += 1
            return None
        return p

    def run(self) -> None:
        while not self.intake.stop.wait(self.rng.uniform(0.2, 1.0)):
            self.once()

    def once(self) -> None:
        p = self.cli("queue", "list", "--json")
        if p is None:
            return
        try:
            queued = [m["id"] for m in json.loads(p.stdout)]
        except ValueError:
            self.failed["queue list (json)"] += 1
            return
        choice = self.rng.random()
        if choice < 0.4 and queued:
            mid = self.rng.choice(queued)
            if self.cli("queue", "hold", mid) is not None:
                self.held.add(mid)
        elif choice < 0.7 and self.held:
            mid = self.rng.choice(sorted(self.held))
            # released, or gone: nothing left to release (else the end releases it)
            if self.cli("queue", "release", mid) is not None or mid not in held_ids(self.d):
                self.held.discard(mid)
        else:
            self.cli("queue", "flush")


def held_ids(d: Daemon) -> set[str]:
    """The queued messages with a held recipient."""
    v = d.view()
    try:
        return {m.id for m in v.messages() if any(st.state == "held" for st in m.recipients)}
    finally:
        v.close()


# -- processes ----------------------------------------------------------------------------------

def children(pid: int) -> list[int]:
    """The live child processes of `pid` (zombies excluded), from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != b"Z":
            out.append(int(entry))
    return sorted(out)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Target:
    """The daemon under test: its worker count, its processes, the ways to kill it."""

    def __init__(self, d: Daemon, workers: int, rng: random.Random) -> None:
        self.d = d
        self.workers = workers
        self.rng = rng

    def set_workers(self, n: int) -> None:
        """Rewrite [server] workers (the daemon is down)."""
        text = self.d.config_path.read_text()
        text = re.sub(r"(?m)^workers = \d+$", f"workers = {n}", text, count=1)
        tmp = self.d.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.d.config_path)
        self.workers = n

    def worker_pids(self, timeout: float = 45.0) -> list[int]:
        """The workers once all of them run (none with workers = 1)."""
        assert self.d.proc is not None
        if self.workers == 1:
            return []
        master = self.d.proc.pid
        return wait_for(lambda: (lambda c: c if len(c) == self.workers else None)(children(master)),
                        timeout, f"{self.workers} workers under the master {master}")

    def kill(self, kind: str) -> dict[str, Any]:
        """SIGKILL the master, everything, or one worker (then wait for its replacement);
        "time" in the answer: when the signal went out."""
        assert self.d.proc is not None
        workers = self.worker_pids()
        if kind == "worker":
            victim = self.rng.choice(workers)
            when = time.time()
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: not alive(victim), 10, f"worker {victim} to die")
            replaced = self.worker_pids()
            assert victim not in replaced
            return {"pid": victim, "time": when}
        master = self.d.proc.pid
        when = time.time()
        os.kill(master, signal.SIGKILL)
        if kind == "all":
            for w in workers:
                try:
                    os.kill(w, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.d.proc.wait(10)
        try:
            # the parent-death signal is immediate: a worker still alive after a moment
            # runs unsupervised (e.g. one that asked for the signal after the death)
            wait_for(lambda: not any(alive(w) for w in workers), 3,
                     "the workers to exit after their master's death")
        except RuntimeError:
            for w in workers:           # noted as a failure; cleaned up so the run goes on
                if alive(w):
                    os.kill(w, signal.SIGKILL)
            return {"pid": master, "time": when, "orphans": list(workers)}
        return {"pid": master, "time": when}

    def start(self) -> None:
        self.d.start(timeout=60.0)
        self.worker_pids()


# -- the run ------------------------------------------------------------------------------------

def api_token(tokens: Path, name: str) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = subprocess.run([sys.executable, "-m", "txmta.cli", "api-token", name, "--file",
                          str(tokens)], capture_output=True, text=True, check=True, timeout=60,
                         cwd=str(REPO), env=env)
    return out.stdout.strip()


def spool_leftovers(d: Daemon) -> dict[str, int]:
    """What is left of queued mail once everything drained: entries of the spool's tables of
    queued messages (messages, bodies, recipients, due, domains) and of waiting webhook
    deliveries (hooks), and files under bodies/; every count must be 0."""
    def fn(txn: Any, dbs: dict[bytes, Any]) -> dict[str, int]:
        return {name.decode(): txn.stat(dbs[name])["entries"]
                for name in (b"messages", b"bodies", b"recipients", b"due", b"domains", b"hooks")
                if name in dbs}
    v = d.view()
    try:
        left = v.read(fn)
    finally:
        v.close()
    left["body files"] = len(os.listdir(d.spool_path / "bodies"))
    return left


def hook_pending(d: Daemon) -> int:
    v = d.view()
    try:
        return sum(n for n, _, _ in v.hook_stats().values())
    finally:
        v.close()


def run(kills: int, seed: int, workdir: Path, log: Callable[[str], None] = print,
        drain_timeout: float = 300.0) -> dict[str, Any]:
    """The whole test: load, `kills` SIGKILLs, drain, check.  The figures (a dict; its
    "violations" list is empty when every promise held)."""
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    tokens_file = workdir / "api-tokens"
    token = api_token(tokens_file, "killtest")
    secret_file = workdir / "webhook.secret"
    secret_file.write_text(SECRET + "\n")
    hooks = Hooks()
    arrivals = Arrivals()
    sink = SmtpSink(SINK_IP, 0, on_message=arrivals, replies={"RCPT": sink_script(DEFERRALS)},
                    timeout=30).start()
    http_port = free_port()
    sections = delivery_sections(
        free_port(), None, schedule=("1s", "2s"), relayhost=f"{SINK_IP}:{sink.port}",
        relayhost_tls="none", max_inflight=MAX_INFLIGHT, max_per_destination=20,
        initial_per_destination=20, idle_timeout="5s")
    d = make_daemon(workdir / "daemon", server={"workers": 2},
                    http=[{"address": f"127.0.0.1:{http_port}", "name": "api"}],
                    api={"tokens": str(tokens_file), "rate_limit": 0},
                    webhook=[{"url": hooks.url, "secret": str(secret_file),
                              "events": ["delivered", "bounced", "expired", "suppressed"]}],
                    **sections)
    target = Target(d, 2, rng)
    intake = Intake()
    admin = Admin(d, intake, seed + 1)
    t0 = time.time()
    threads: list[threading.Thread] = []
    kill_log: list[dict[str, Any]] = []
    try:
        target.start()
        threads = ([threading.Thread(target=smtp_client, args=(d, intake, i, seed + 10 + i),
                                     daemon=True) for i in range(SMTP_CLIENTS)]
                   + [threading.Thread(target=api_client,
                                       args=(f"http://127.0.0.1:{http_port}", token, intake, i,
                                             seed + 100 + i), daemon=True)
                      for i in range(API_CLIENTS)]
                   + [threading.Thread(target=admin.run, daemon=True)])
        for t in threads:
            t.start()
        # every kind of kill early on (a short run sees each), then at random
        order = list(KINDS)
        rng.shuffle(order)
        for k in range(kills):
            # now and then soon after the start (recovery, the first deliveries), else later
            time.sleep(rng.uniform(0.0, 0.3) if rng.random() < 0.2 else rng.uniform(0.3, 2.5))
            kind = order[k] if k < len(order) else rng.choice(KINDS)
            if kind == "worker" and target.workers == 1:
                kind = "master"
            now = time.monotonic()
            entry = {"n": k + 1, "t": round(time.time() - t0, 2), "kind": kind,
                     "workers": target.workers, "acked": intake.acked_count(),
                     "arrived": arrivals.total(),
                     "delivering": now - arrivals.last < 0.2,
                     "receiving": now - intake.last_ack < 0.2}
            entry.update(target.kill(kind))
            if kind != "worker":
                # between restarts, now and then the other worker count: the partitions of
                # the spool are mapped onto one worker or two
                if k >= len(KINDS) and rng.random() < (0.15 if target.workers == 2 else 0.5):
                    target.set_workers(3 - target.workers)
                time.sleep(rng.uniform(0.0, 0.3))
                target.start()
            entry["whole_again_s"] = round(time.time() - entry["time"], 2)
            kill_log.append(entry)
            log(f"kill {k + 1}/{kills}: {kind} (workers={entry['workers']}) at "
                f"{entry['t']}s, acked {entry['acked']}, arrived {entry['arrived']}, "
                f"whole again after {entry['whole_again_s']}s")
        intake.stop.set()
        for t in threads:
            t.join(60)
        t_load = time.time() - t0
        figures = drain(d, target, intake, arrivals, hooks, admin, log, drain_timeout)
        t_total = time.time() - t0
        time.sleep(1.0)             # anything still arriving would be a late duplicate
        exit_status = d.stop(timeout=60)
    finally:
        intake.stop.set()
        if d.running:
            d.stop(timeout=20)
        sink.stop()
        hooks.close()
    result = check(observed(intake, arrivals, hooks, kill_log, maillog_events(d)))
    result.update(figures)
    result.update({
        "sink_transactions": arrivals.transactions, "webhook_requests": len(hooks.got),
        "seed": seed, "kills": len(kill_log),
        "kills_by_kind": dict(collections.Counter(k["kind"] for k in kill_log)),
        "kills_while_delivering": sum(1 for k in kill_log if k["delivering"]),
        "kills_while_receiving": sum(1 for k in kill_log if k["receiving"]),
        "orphaned_workers": sum(len(k.get("orphans", [])) for k in kill_log),
        "client_errors": dict(intake.errors), "client_error_samples": intake.samples,
        "admin_commands": dict(admin.ran), "admin_failed": dict(admin.failed),
        "load_s": round(t_load, 1), "total_s": round(t_total, 1),
        "final_exit_status": exit_status,
        "kill_log": [{k: v for k, v in e.items() if k != "time"} for e in kill_log],
    })
    # a worker that stopped on its own (not killed here, not at the final stop) is a fault:
    # e.g. one that lost its channel to the master when another worker died
    stopped = [line for line in d.log().splitlines()
               if "[txmta.master#error] worker" in line and " exited with status " in line]
    result["workers_stopped_unasked"] = len(stopped)
    if stopped:
        result["violations"].append(f"{len(stopped)} workers stopped unasked: {stopped[:3]}")
    if result["orphaned_workers"]:
        result["violations"].append(f"{result['orphaned_workers']} workers outlived their master")
    if figures["spool_left"]:
        result["violations"].append(f"{figures['spool_left']} messages left in the spool")
    if any(figures["spool_leftovers"].values()):
        result["violations"].append(f"orphaned spool entries: {figures['spool_leftovers']}")
    if figures["hooks_pending"]:
        result["violations"].append(f"{figures['hooks_pending']} webhook deliveries left")
    return result


def drain(d: Daemon, target: Target, intake: Intake, arrivals: Arrivals, hooks: Hooks,
          admin: Admin, log: Callable[[str], None], timeout: float) -> dict[str, Any]:
    """Release what the admin thread held, flush, and wait (bounded) until the spool is empty,
    every acked recipient arrived (or its DSN did), and every webhook was sent."""
    t = time.monotonic()
    target.worker_pids()
    released = 0
    for mid in sorted(held_ids(d)):
        if admin.cli("queue", "release", mid) is not None:
            released += 1
    admin.cli("queue", "flush")
    deadline = time.monotonic() + timeout
    last_flush = time.monotonic()
    while True:
        missing = missing_arrivals(intake, arrivals)
        spool, pending = len(d.spool_ids()), hook_pending(d)
        unheard = missing_terminal(intake, hooks)
        if not missing and not spool and not pending and not unheard:
            break
        if time.monotonic() > deadline:
            log(f"drain: gave up after {timeout}s: {len(missing)} arrivals missing, "
                f"{spool} messages in the spool, {pending} webhooks pending, "
                f"{len(unheard)} terminal events missing")
            break
        if time.monotonic() - last_flush > 5:
            for mid in sorted(held_ids(d)):
                admin.cli("queue", "release", mid)
                released += 1
            admin.cli("queue", "flush")
            last_flush = time.monotonic()
        time.sleep(0.2)
    return {"drain_s": round(time.monotonic() - t, 1), "released_at_end": released,
            "spool_left": len(d.spool_ids()), "hooks_pending": hook_pending(d),
            "spool_leftovers": spool_leftovers(d)}


def expected(p: Plan) -> list[tuple[str, str]]:
    """(address that must arrive at the sink, terminal event kind of the recipient)."""
    out = []
    for r in p.rcpts:
        if r.startswith("bad-"):
            out.append((p.sender, "message.bounced"))
        else:
            out.append((r, "message.delivered"))
    return out


def missing_arrivals(intake: Intake, arrivals: Arrivals) -> list[str]:
    with intake.lock:
        plans = [p for p in intake.plans.values() if p.acked]
    with arrivals.lock:
        return [addr for p in plans for addr, _ in expected(p) if not arrivals.times.get(addr)]


def missing_terminal(intake: Intake, hooks: Hooks) -> list[str]:
    heard = {rcpt for _, rcpt in hooks.terminal()}
    with intake.lock:
        plans = [p for p in intake.plans.values() if p.acked]
    return [r for p in plans for r in p.rcpts if r not in heard]


@dataclass
class Observed:
    """Everything the checker compares, gathered after the run."""
    plans: list[Plan]                                       # what the clients tried; .acked
    arrivals: dict[str, list[float]]                        # address -> times at the sink
    dsn_for: dict[str, set[str]]                            # snd- address -> bad- tokens named
    terminal: dict[tuple[str, str], dict[str, str]]         # (queue id, rcpt) -> {hook id: type}
    kill_times: list[float]
    maillog: list[dict[str, str]] = dataclass_field(default_factory=list)
    odd: list[str] = dataclass_field(default_factory=list)   # arrivals of no plan's shape


def observed(intake: Intake, arrivals: Arrivals, hooks: Hooks, kill_log: list[dict[str, Any]],
             maillog: list[dict[str, str]]) -> Observed:
    with arrivals.lock:
        return Observed(list(intake.plans.values()), {a: list(t) for a, t in arrivals.times.items()},
                        {a: set(t) for a, t in arrivals.dsn_for.items()}, hooks.terminal(),
                        [k["time"] for k in kill_log], maillog, list(arrivals.odd))


def check(o: Observed) -> dict[str, Any]:
    """Compare what the clients were told with what the sink got, what bounced and which
    terminal events were sent: the figures, and the broken promises in "violations"."""
    violations: list[str] = []
    plans = o.plans
    acked = [p for p in plans if p.acked]
    times = {a: sorted(ts) for a, ts in o.arrivals.items()}
    kill_times = sorted(o.kill_times)

    # lost: an acked recipient that never arrived, or a bounce whose DSN never did
    lost = []
    for p in acked:
        for r in p.rcpts:
            if r.startswith("bad-"):
                if token_of(r) not in o.dsn_for.get(p.sender, set()):
                    lost.append(r)
            elif not times.get(r):
                lost.append(r)
    if lost:
        violations.append(f"{len(lost)} acked recipients lost: {lost[:10]}")

    # duplicates: each must straddle a kill; per kill at most what was in flight
    # The sink records a copy when it has read the final dot: a copy the killed process wrote
    # just before its death is still read (from the kernel's buffers) a little after it.
    dup_rcpts = 0
    unexplained = []
    offsets = []            # copy's arrival - kill, for each duplicate explained
    # kill index -> the messages (tokens) with a recipient that arrived before it and again after
    across: dict[int, set[str]] = collections.defaultdict(set)
    for addr, ts in times.items():
        for earlier, later in zip(ts, ts[1:]):
            dup_rcpts += 1
            near = [(abs(earlier - k), i) for i, k in enumerate(kill_times)
                    if k - WINDOW_BEFORE <= earlier <= k + SINK_LAG and k <= later]
            if not near:
                unexplained.append(addr)
            else:
                i = min(near)[1]
                across[i].add(token_of(addr))
                offsets.append(earlier - kill_times[i])
    bound = MAX_INFLIGHT * PRIORITY_LEVELS
    if unexplained:
        start = min(kill_times + [t for ts in times.values() for t in ts[:1]], default=0.0)
        violations.append(f"{len(unexplained)} duplicates outside the window of a kill: " + "; ".join(
            f"{a} at {[round(t - start, 3) for t in times[a]]}" for a in unexplained[:10])
            + f" (kills at {[round(k - start, 3) for k in kill_times]})")
    worst = max((len(t) for t in across.values()), default=0)
    if worst > bound:
        violations.append(f"{worst} messages duplicated across one kill (bound {bound})")

    # terminal events: one per recipient, of the right kind
    terminal = o.terminal
    double = {k: v for k, v in terminal.items() if len(v) > 1}
    if double:
        violations.append(f"{len(double)} recipients with two terminal events: "
                          f"{list(double.items())[:5]}")
    by_rcpt: dict[str, list[tuple[str, dict[str, str]]]] = collections.defaultdict(list)
    for (mid, rcpt), ev in terminal.items():
        by_rcpt[rcpt].append((mid, ev))
    stored_twice = [r for r, evs in by_rcpt.items() if not r.startswith("snd-") and len(evs) > 1]
    if stored_twice:
        violations.append(f"{len(stored_twice)} recipients in two messages: {stored_twice[:10]}")
    wrong, missing_events = [], []
    for p in acked:
        for r in p.rcpts:
            got = by_rcpt.get(r)
            if not got:
                missing_events.append(r)
                continue
            want = "message.bounced" if r.startswith("bad-") else "message.delivered"
            if any(set(ev.values()) != {want} for _, ev in got):
                wrong.append((r, [sorted(ev.values()) for _, ev in got]))
    if missing_events:
        violations.append(f"{len(missing_events)} acked recipients without a terminal event: "
                          f"{missing_events[:10]}")
    if wrong:
        violations.append(f"{len(wrong)} recipients with the wrong terminal event: {wrong[:10]}")
    # a DSN per bounced message, delivered: its own terminal event to snd-
    bounced_msgs = {p.sender for p in acked if any(r.startswith("bad-") for r in p.rcpts)}
    dsn_events = {r: evs for r, evs in by_rcpt.items() if r.startswith("snd-")}
    dsn_undelivered = [s for s in bounced_msgs
                       if not any(set(ev.values()) == {"message.delivered"}
                                  for _, ev in dsn_events.get(s, []))]
    if dsn_undelivered:
        violations.append(f"{len(dsn_undelivered)} DSNs without a delivered event: "
                          f"{dsn_undelivered[:10]}")
    dsns_per_sender = collections.Counter({s: len(evs) for s, evs in dsn_events.items()})
    extra_dsns = [s for s, n in dsns_per_sender.items() if n > 1]
    if extra_dsns:
        violations.append(f"{len(extra_dsns)} messages with two DSNs: {extra_dsns[:10]}")

    # the mail log: no recipient with two terminal lines
    lines: collections.Counter[tuple[str, str]] = collections.Counter()
    statuses: collections.Counter[str] = collections.Counter()
    for e in o.maillog:
        statuses[e["status"]] += 1
        if e["status"] in ("sent", "bounced", "expired"):
            lines[(e["id"], e["to"].lower())] += 1
    maillog_double = [k for k, n in lines.items() if n > 1]
    if maillog_double:
        violations.append(f"{len(maillog_double)} recipients with two terminal mail log lines: "
                          f"{maillog_double[:10]}")
    if o.odd:
        violations.append(f"{len(o.odd)} odd arrivals at the sink: {o.odd[:5]}")

    acked_rcpts = [r for p in acked for r in p.rcpts]
    delivered = sum(1 for p in acked for r in p.rcpts if not r.startswith("bad-") and times.get(r))
    return {
        "attempted": len(plans), "acked": len(acked),
        "acked_by_channel": dict(collections.Counter(p.channel for p in acked)),
        "acked_recipients": len(acked_rcpts),
        "delivered": delivered,
        "bounced": sum(1 for r in acked_rcpts if r.startswith("bad-") and any(
            set(ev.values()) == {"message.bounced"} for _, ev in by_rcpt.get(r, []))),
        "deferred_first": sum(1 for r in acked_rcpts if r.startswith("defer-")),
        "dsns_delivered": len(bounced_msgs) - len(dsn_undelivered),
        "unacked_but_delivered": sum(1 for p in plans if not p.acked
                                     and any(times.get(r) for r in p.rcpts)),
        "lost": len(lost),
        "duplicate_deliveries": dup_rcpts,
        "duplicated_messages_max_per_kill": worst,
        "duplicate_bound_per_kill": bound,
        "duplicate_bound": bound * len(kill_times),
        "duplicates_without_kill": len(unexplained),
        "duplicate_first_copy_s": ([round(min(offsets), 3), round(max(offsets), 3)]
                                   if offsets else None),
        "terminal_events": sum(len(v) for v in terminal.values()),
        "double_terminal": len(double) + len(maillog_double),
        "maillog_statuses": dict(statuses),
        "violations": violations,
    }


def summary(r: dict[str, Any]) -> str:
    return "\n".join([
        f"killtest: seed {r['seed']}, {r['kills']} kills {r['kills_by_kind']} "
        f"({r['kills_while_delivering']} while delivering, {r['kills_while_receiving']} while "
        f"receiving), load {r['load_s']} s, total {r['total_s']} s",
        f"  acked {r['acked']} messages {r['acked_by_channel']} of {r['attempted']} tried, "
        f"{r['acked_recipients']} recipients",
        f"  delivered {r['delivered']} recipients ({r['deferred_first']} after 450s), "
        f"bounced {r['bounced']} (DSNs delivered {r['dsns_delivered']}), "
        f"unacked but delivered {r['unacked_but_delivered']} messages",
        f"  lost {r['lost']}, duplicates {r['duplicate_deliveries']} recipient deliveries "
        f"(at most {r['duplicated_messages_max_per_kill']} messages per kill; bound "
        f"{r['duplicate_bound_per_kill']} per kill, {r['duplicate_bound']} in all; "
        f"{r['duplicates_without_kill']} outside a kill's window; first copies "
        f"{r['duplicate_first_copy_s']} s from their kill), "
        f"double terminal events {r['double_terminal']}",
        f"  spool left {r['spool_left']} {r['spool_leftovers']}, webhooks pending "
        f"{r['hooks_pending']}, "
        f"webhook requests {r['webhook_requests']}, drain {r['drain_s']} s",
        f"  admin commands {r['admin_commands']} (failed: the daemon down or the message gone: "
        f"{r['admin_failed']}), client errors {r['client_errors']}",
        "  violations: " + ("none" if not r["violations"] else "\n    " + "\n    ".join(r["violations"])),
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    ap.add_argument("--out", default=None,
                    help="the JSON results (default bench/results/<date>-killtest.json)")
    ap.add_argument("--workdir", default=None, help="default: a fresh directory under bench/work")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--drain-timeout", type=float, default=300.0)
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    if args.workdir:
        workdir = Path(args.workdir)
    else:
        (BENCH / "work").mkdir(exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="killtest-", dir=BENCH / "work"))
    print(f"killtest: {args.kills} kills, seed {seed}, in {workdir}", file=sys.stderr)
    try:
        result = run(args.kills, seed, workdir, lambda s: print(s, file=sys.stderr),
                     args.drain_timeout)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    out = Path(args.out) if args.out else (
        BENCH / "results" / (time.strftime("%Y-%m-%d-%H%M%S") + "-killtest.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    print(f"results: {out}")
    return 1 if result["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
