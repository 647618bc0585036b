"""A big backlog of deferred mail: does txmta start, hold memory and take mail as with none?

Loads N messages (default 1,000,000) into a fresh spool through the spool interface
(`LmdbSpool.put()`, big groups of puts so the writer commits thousands at a time), not over
SMTP: a realistic backlog of deferred mail, arrived over the last two days, one recipient
each (5 % with a second one at another domain), spread over a few hundred destination
domains with a long tail, one of them (`big.example`) holding `--big` messages; every
recipient was tried 1-6 times, got a 4xx and is due again between 30 minutes and 4 days from
now, so the daemon has nothing to deliver until a flush.

Then starts a real `twistd txmta` (a master and `--workers` workers) on that spool, and one on
an empty spool beside it, both relaying to smtp-sink on loopback, and measures:

* start-up: process start -> the SMTP listener's 220, -> the master's "worker N started"
  lines, -> every worker answering (the control socket's status from each);
* RSS of the master and each worker (VmRSS, and its anonymous part: the spool's mapped file
  pages are counted in VmRSS as they are touched, but they are the page cache, not the heap)
  after the start, after all measurements and a minute later (each process drops the map's
  pages from its resident set once a minute: txmta/spool/maptrim.py);
* intake: smtp-source (`--intake` messages, `--sessions` sessions) into the big-queue daemon
  and into the empty one, alternating, `--rounds` times each; accepted msg/s;
* `txmta queue list --limit 100` (the first page), `txmta queue show ID`, `txmta queue flush
  --domain big.example` and a GET of the dashboard, each timed as a command (Python start-up
  included) `--repeat` times; the flush once, and then how long until every recipient it
  counted is due (its batches run after the command's answer: `not_yet_due` polls the spool).

Targets (issue 14): start < 5 s, RSS < 500 MB, intake within 10 % of the empty spool's, each
command under 1 s.  Writes a Markdown table to stdout and everything to
bench/results/<date>-queue-scale-<N>.json.  As root, from the repository root:

    PYTHONPATH=. .venv/bin/python bench/queue_scale.py [-n 1000000] [--keep] [--spool DIR]

`--spool DIR` reuses a spool loaded earlier (with `--keep`: it is left in the work directory;
a run flushes big.example, whose mail is then delivered, so a reused spool has less of it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from run import children  # noqa: E402  (bench/run.py: the master's worker processes)
from txmta.message import (Address, Envelope, MessageIds, Recipient,  # noqa: E402
                           RecipientState, StoredMessage)
from txmta.partition import ALL  # noqa: E402
from txmta.reply import Reply  # noqa: E402

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
HOST = "127.0.0.1"
BIG = "big.example"
TARGETS = {"start_s": 5.0, "rss_mb": 500.0, "intake_loss": 0.10, "command_s": 1.0}


# -- loading ---------------------------------------------------------------------------------

class Now:
    """The spool's reactor: answers are handled at once, in the writer thread."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        f(*args, **kw)


def domain_names(n: int) -> list[str]:
    return [f"d{k:03d}.example" for k in range(n)]


def backlog(n: int, now: float, domains: int, big: int, seed: int = 14
            ) -> "Any":
    """The messages of the backlog, oldest first: (StoredMessage, body) pairs."""
    rng = random.Random(seed)
    names = domain_names(domains)
    weights = [1.0 / (k + 1) for k in range(domains)]      # a long tail, as real queues have
    cum, total = [], 0.0
    for w in weights:
        total += w
        cum.append(total)
    ids = MessageIds(ALL, random=rng.randbytes)
    span = 2 * 86400.0
    every = max(1, n // big) if big else 0
    filler = (b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod "
              b"tempor incididunt ut labore et dolore magna aliqua.\r\n") * 16
    sender = Address("noreply", "shop.example")
    for i in range(n):
        arrival = now - span + span * i / n
        mid = ids(arrival)
        domain = rng.choices(names, cum_weights=cum)[0]
        if every and i % every == 0 and i // every < big:
            domain = BIG
        rcpts = [Recipient(Address(f"user{i}", domain))]
        if rng.random() < 0.05:
            rcpts.append(Recipient(Address(f"cc{i}", rng.choices(names, cum_weights=cum)[0])))
        states = tuple(RecipientState(
            attempts=rng.randint(1, 6), next_attempt=now + rng.uniform(1800, 4 * 86400),
            last_reply=Reply(451, "4.7.1", "Try again later (deferred)"),
            remote=f"mx.{r.address.domain}[192.0.2.{k + 1}]", warned=True)
            for k, r in enumerate(rcpts))
        body = (b"Received: from app.shop.example (app.shop.example [192.0.2.9])\r\n"
                b"From: Shop <noreply@shop.example>\r\nTo: <%s>\r\nSubject: Order %d\r\n"
                b"Message-ID: <%d@shop.example>\r\n\r\n" % (str(rcpts[0].address).encode(), i, i)
                + filler[:rng.randint(600, 2400)])
        env = Envelope(sender, tuple(rcpts))
        yield StoredMessage(mid, env, arrival, len(body), states,
                            {"address": "192.0.2.9", "helo": "app.shop.example"},
                            header_id=f"<{i}@shop.example>"), body


def load(path: Path, n: int, domains: int, big: int, group: int = 20000) -> dict[str, Any]:
    """Put the backlog into a fresh LmdbSpool at `path`, `group` puts submitted at a time
    (the writer commits everything pending in one transaction)."""
    from txmta.spool.lmdb import LmdbSpool
    spool = LmdbSpool(str(path), Now(), map_size=16 << 30)   # big enough: no growing
    start = time.perf_counter()
    now = time.time()
    pending: list[Any] = []
    errors: list[Any] = []
    done = threading.Semaphore(0)

    def settle() -> None:
        for _ in pending:
            done.acquire()
        pending.clear()

    for k, (m, body) in enumerate(backlog(n, now, domains, big), 1):
        w = spool.body_writer(m.id)
        w.write(body)
        d = spool.put(m, w)
        d.addErrback(errors.append)
        d.addBoth(lambda _: done.release())
        pending.append(d)
        if len(pending) >= group:
            settle()
            if errors:
                raise RuntimeError(f"loading failed: {errors[0]}")
            if k % 100000 == 0:
                print(f"  loaded {k} messages, {time.perf_counter() - start:.0f} s",
                      file=sys.stderr, flush=True)
    settle()
    if errors:
        raise RuntimeError(f"loading failed: {errors[0]}")
    box: list[Any] = []
    spool.close().addBoth(box.append)
    while not box:
        time.sleep(0.05)
    took = time.perf_counter() - start
    return {"messages": n, "seconds": round(took, 1), "per_second": round(n / took),
            "bytes": dir_size(path)}


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- processes -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def banner(port: int, timeout: float = 2.0) -> bytes:
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            return s.recv(512)
    except OSError:
        return b""


def rss(pid: int) -> dict[str, float]:
    """VmRSS and its anonymous, file and shared parts, MiB."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


def toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


class Daemon:
    """`twistd -n txmta` with a rendered configuration in its own directory."""

    def __init__(self, name: str, rundir: Path, spool: Path, sink_port: int, workers: int,
                 extra: dict[str, dict[str, Any]] | None = None) -> None:
        self.name, self.dir, self.spool = name, rundir, spool
        rundir.mkdir(parents=True, exist_ok=True)
        self.port, self.http_port = free_port(), free_port()
        sections: dict[str, dict[str, Any]] = {
            "server": {"hostname": "scale.txmta.test", "workers": workers},
            "relay": {"networks": ["127.0.0.1/32"]},
            "spool": {"path": str(spool)},
            "delivery": {"relayhost": f"{HOST}:{sink_port}", "relayhost_tls": "none"},
            "dns": {"nameservers": [f"{HOST}:9"]},
            "log": {"maillog": str(rundir / "mail.log"), "format": "text"},
        }
        for k, v in (extra or {}).items():
            sections.setdefault(k, {}).update(v)
        lines = []
        for name_, table in sections.items():
            lines += [f"[{name_}]"] + [f"{k} = {toml(v)}" for k, v in table.items()] + [""]
        lines += ["[[listen]]", f'address = "{HOST}:{self.port}"', 'tls = "none"', "",
                  "[[http]]", f'address = "{HOST}:{self.http_port}"', 'name = "web"',
                  'serve = ["dashboard"]', ""]
        self.config = rundir / "txmta.toml"
        self.config.write_text("\n".join(lines))
        self.log = rundir / "twistd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.workers = workers

    def start(self, timeout: float = 120.0) -> dict[str, float]:
        """Start; the seconds to the first 220, to the master's "worker N started" lines and
        to every worker answering the control socket's status."""
        twistd = Path(sys.executable).with_name("twistd")
        self.log.unlink(missing_ok=True)
        t0 = time.monotonic()
        with open(self.dir / "twistd.out", "ab") as out:
            self.proc = subprocess.Popen(
                [str(twistd), "-n", "--pidfile=", "-l", str(self.log), "txmta",
                 "--config", str(self.config)], cwd=self.dir, env=env(),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        found: dict[str, float] = {}
        deadline = t0 + timeout
        while "banner_s" not in found or "workers_logged_s" not in found:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: twistd exited {self.proc.returncode}:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: not started within {timeout} s")
            if "banner_s" not in found and banner(self.port, 1.0).startswith(b"220 "):
                found["banner_s"] = time.monotonic() - t0
            if "workers_logged_s" not in found and self.log.exists():
                started = len(re.findall(r"worker \d+ started", self.log.read_text(errors="replace")))
                if started >= self.workers or self.workers == 1:
                    found["workers_logged_s"] = time.monotonic() - t0
            time.sleep(0.02)
        while True:     # every worker answers: the control socket's status has them all
            p = self.cli("status", "--json", check=False)
            if p.returncode == 0:
                try:
                    if worker_count(json.loads(p.stdout)) >= self.workers:
                        break
                except ValueError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: workers not answering: {p.stdout} {p.stderr}")
            time.sleep(0.05)
        found["workers_answer_s"] = time.monotonic() - t0
        return {k: round(v, 3) for k, v in found.items()}

    def cli(self, *args: str, check: bool = True, timeout: float = 600
            ) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([sys.executable, "-m", "txmta.cli", *args, "--config", str(self.config)],
                           env=env(), capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise RuntimeError(f"txmta {' '.join(args)}: exit {p.returncode}: {p.stderr}")
        return p

    def pids(self) -> dict[str, int]:
        assert self.proc is not None
        out = {"master": self.proc.pid}
        for k, pid in enumerate(children(self.proc.pid)):
            out[f"worker{k}"] = pid
        return out

    def memory(self) -> dict[str, dict[str, float]]:
        return {name: rss(pid) for name, pid in self.pids().items()}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def worker_count(status: Any) -> int:
    """How many workers answered in `txmta status --json` (one worker: no master's count)."""
    if not isinstance(status, dict):
        return 0
    return int(status.get("workers_running", 1 if "messages" in status else 0))


class Sink:
    def __init__(self, rundir: Path) -> None:
        self.port = free_port()
        argv = [SMTP_SINK, "-c", "-m", "1000", f"{HOST}:{self.port}", "1024"]
        if os.getuid() == 0:
            argv[1:1] = ["-u", "nobody"]
        self.out = open(rundir / "sink.out", "wb")
        self.proc = subprocess.Popen(argv, stdout=self.out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not banner(self.port, 0.5).startswith(b"220"):
            if time.monotonic() > deadline:
                raise RuntimeError("smtp-sink did not answer")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.out.close()


def intake(port: int, n: int, sessions: int, size: int) -> float:
    """smtp-source into `port`: accepted messages a second."""
    argv = [SMTP_SOURCE, "-s", str(sessions), "-m", str(n), "-l", str(size), "-r", "1", "-N",
            "-M", "client.scale.test", "-f", "app@shop.example", "-t", "rcpt@sink.example",
            f"{HOST}:{port}"]
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    return n / (time.perf_counter() - start)


def timed(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    took, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        took.append(round(time.perf_counter() - start, 5))
    return took, result


def in_process(spool: Path, some_id: str, repeat: int) -> dict[str, list[float]]:
    """The reads of `queue list --limit 100` and `queue show` without the command's start-up:
    open the view, read, close (seconds)."""
    from itertools import islice

    from txmta.spool.view import LmdbView

    def page() -> None:
        view = LmdbView(str(spool))
        try:
            assert len(list(islice(view.messages(chunk=101), 101))) == 101
            view.count()
        finally:
            view.close()

    def show() -> None:
        view = LmdbView(str(spool))
        try:
            assert view.get(some_id) is not None
            view.events(some_id)
            view.read_body(some_id)
        finally:
            view.close()
    return {"first page of 100": timed(page, repeat)[0], "one message": timed(show, repeat)[0]}


def not_yet_due(spool: Path, domain: str, when: float) -> int:
    """QUEUED recipients at `domain` due after `when` (read through the domains index, every
    partition): what a flush at `when` has still to move."""
    from txmta.message import QUEUED
    from txmta.spool import codec
    from txmta.spool.view import LmdbView, domain_prefix, rcpt_key, split_rcpt_key

    def fn(txn: Any, dbs: dict[bytes, Any]) -> int:
        left = 0
        with txn.cursor(db=dbs[b"domains"]) as cur:
            for p in range(256):
                prefix = domain_prefix(p, domain)
                if not cur.set_range(prefix):
                    break
                for key in cur.iternext(keys=True, values=False):
                    if not key.startswith(prefix):
                        break
                    mid, i = split_rcpt_key(bytes(key[len(prefix):]))
                    raw = txn.get(rcpt_key(mid, i), db=dbs[b"recipients"])
                    if raw is not None:
                        st = codec.decode_recipient(bytes(raw))
                        left += st.state == QUEUED and st.next_attempt > when
        return left

    view = LmdbView(str(spool))
    try:
        return int(view.read(fn))
    finally:
        view.close()


def flush_domain(big: "Daemon", domain: str) -> dict[str, Any]:
    """`queue flush --domain`: the command's time and count, then how long until every
    recipient it counted is due (the batches run after the answer)."""
    start = time.time()
    t0 = time.perf_counter()
    out = big.cli("queue", "flush", "--domain", domain, "--json")
    answered = time.perf_counter() - t0
    while not_yet_due(big.spool, domain, start - 1.0) and time.perf_counter() - t0 < 120:
        time.sleep(0.1)
    return {"command_s": round(answered, 3), "count": json.loads(out.stdout)["count"],
            "all_due_s": round(time.perf_counter() - t0, 2)}


def dashboard(port: int) -> int:
    with urllib.request.urlopen(f"http://{HOST}:{port}/", timeout=60) as r:
        body = r.read()
        assert r.status == 200 and b"<svg" in body, r.status
        return len(body)


# -- the run ---------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--messages", type=int, default=1_000_000, help="messages queued")
    p.add_argument("--domains", type=int, default=300, help="destination domains of the backlog")
    p.add_argument("--big", type=int, default=10_000, help=f"messages at {BIG}, the flushed one")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--flush-domain", default=BIG,
                   help="the domain flushed (with --spool: big.example was flushed and "
                        "delivered by the last run; d013.example holds ~11,000)")
    p.add_argument("--intake", type=int, default=5000, help="smtp-source messages per run")
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3, help="intake runs per daemon, alternating")
    p.add_argument("--repeat", type=int, default=3, help="runs of each command")
    p.add_argument("--workdir", default=str(BENCH / "work" / "queue-scale"))
    p.add_argument("--spool", default=None, help="reuse this loaded spool instead of loading")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--load-only", action="store_true",
                   help="only load the spool (into WORKDIR/big-spool, kept), for --spool later")
    p.add_argument("--note", default="", help="a note for the JSON (e.g. the machine's load)")
    args = p.parse_args()

    work = Path(args.workdir)
    if work.exists() and not args.keep and not args.load_only and args.spool is None:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "args": vars(args), "targets": TARGETS, "note": args.note,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": os.getloadavg()},
    }
    if args.spool:
        big_spool = Path(args.spool)
        result["load"] = {"reused": str(big_spool)}
    else:
        big_spool = work / "big-spool"
        print(f"loading {args.messages} messages into {big_spool}", file=sys.stderr)
        result["load"] = load(big_spool, args.messages, args.domains, args.big)
        print(f"  {result['load']}", file=sys.stderr)
        if args.load_only:
            return
    empty_spool = work / "empty-spool"
    shutil.rmtree(empty_spool, ignore_errors=True)

    sink = Sink(work)
    big = Daemon("big", work / "big", big_spool, sink.port, args.workers)
    empty = Daemon("empty", work / "empty", empty_spool, sink.port, args.workers)
    try:
        print("starting both daemons", file=sys.stderr)
        result["start"] = {"big": big.start(), "empty": empty.start()}
        time.sleep(2)
        result["rss_after_start"] = {"big": big.memory(), "empty": empty.memory()}
        print(f"  {result['start']}", file=sys.stderr)

        runs: dict[str, list[float]] = {"big": [], "empty": []}
        for r in range(args.rounds):
            order = [big, empty] if r % 2 == 0 else [empty, big]
            for d in order:
                rate = intake(d.port, args.intake, args.sessions, args.size)
                runs[d.name].append(round(rate, 1))
                print(f"  intake {d.name}: {rate:.0f} msg/s", file=sys.stderr)
        result["intake"] = runs

        first = json.loads(big.cli("queue", "list", "--json", "--limit", "2").stdout)
        some_id = first[-1]["id"]       # not the first: that one is at big.example
        commands: dict[str, Any] = {}
        commands["txmta --version (start-up alone)"], _ = timed(
            lambda: subprocess.run([sys.executable, "-m", "txmta.cli", "--version"], env=env(),
                                   capture_output=True, check=True), args.repeat)
        commands["queue list --limit 100"], _ = timed(
            lambda: big.cli("queue", "list", "--limit", "100"), args.repeat)
        commands["queue show ID"], _ = timed(lambda: big.cli("queue", "show", some_id),
                                             args.repeat)
        commands["dashboard GET /"], size = timed(lambda: dashboard(big.http_port), args.repeat)
        result["in_process"] = in_process(big_spool, some_id, args.repeat)
        flushed = flush_domain(big, args.flush_domain)
        commands[f"queue flush --domain {args.flush_domain}"] = [flushed["command_s"]]
        commands["flushed"] = flushed["count"]
        commands["flushed: all due after (s)"] = flushed["all_due_s"]
        commands["empty: queue list --limit 100"], _ = timed(
            lambda: empty.cli("queue", "list", "--limit", "100"), args.repeat)
        result["commands"] = commands
        time.sleep(5)
        result["rss_after"] = {"big": big.memory(), "empty": empty.memory()}
        time.sleep(61)      # each process drops the map's pages it read once a minute
        result["rss_a_minute_later"] = {"big": big.memory(), "empty": empty.memory()}
        result["status_big"] = json.loads(big.cli("status", "--json").stdout)
    finally:
        big.stop()
        empty.stop()
        sink.stop()
    result["machine"]["loadavg_after"] = os.getloadavg()
    report(result)
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    name = out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-queue-scale-{args.messages}.json"
    name.write_text(json.dumps(result, indent=2))
    print(f"\nwritten: {name}", file=sys.stderr)
    if not args.keep and args.spool is None:
        shutil.rmtree(work, ignore_errors=True)


def report(r: dict[str, Any]) -> None:
    def ok(good: bool) -> str:
        return "yes" if good else "**no**"
    rows = []
    if "seconds" in r["load"]:
        rows.append(("load (spool interface)", f"{r['load']['messages']} messages in "
                     f"{r['load']['seconds']} s ({r['load']['per_second']}/s), "
                     f"{r['load']['bytes'] / 2**30:.2f} GiB", "", ""))
    for which in ("big", "empty"):
        s = r["start"][which]
        rows.append((f"start, {which} spool: 220 / workers logged / all answer",
                     f"{s['banner_s']} / {s['workers_logged_s']} / {s['workers_answer_s']} s",
                     "< 5 s", ok(s["workers_answer_s"] < TARGETS["start_s"]) if which == "big" else ""))
    for when in ("rss_after_start", "rss_after", "rss_a_minute_later"):
        for which in ("big", "empty"):
            mem = r[when][which]
            text = ", ".join(f"{k} {v.get('VmRSS', 0):.0f} ({v.get('RssAnon', 0):.0f} anon)"
                             for k, v in mem.items())
            worst = max((v.get("VmRSS", 0) for v in mem.values()), default=0)
            rows.append((f"RSS MiB {when.replace('rss_', '').replace('_', ' ')}, {which}", text,
                         "< 500 MB", ok(worst < TARGETS["rss_mb"]) if which == "big" else ""))
    big, empty = statistics.median(r["intake"]["big"]), statistics.median(r["intake"]["empty"])
    rows.append(("intake msg/s, big vs empty (median)",
                 f"{big:.0f} vs {empty:.0f} ({(big / empty - 1) * 100:+.1f} %); runs "
                 f"{r['intake']['big']} / {r['intake']['empty']}", "within 10 %",
                 ok(big >= empty * (1 - TARGETS["intake_loss"]))))
    for name, took in r["commands"].items():
        if name.startswith("flushed"):
            continue
        baseline = name.startswith(("empty", "txmta --version"))
        rows.append((name, " / ".join(f"{t:.2f}" for t in took) + " s", "" if baseline else "< 1 s",
                     "" if baseline else ok(max(took) < TARGETS["command_s"])))
    rows.append(("messages flushed", str(r["commands"]["flushed"]), "", ""))
    if "flushed: all due after (s)" in r["commands"]:
        rows.append(("flushed: every recipient due after", f"{r['commands']['flushed: all due after (s)']:.2f} s "
                     "(the batches run after the command's answer)", "", ""))
    for name, took in r.get("in_process", {}).items():
        rows.append((f"in process: {name}", " / ".join(f"{t * 1000:.1f}" for t in took) + " ms",
                     "", ""))
    print("| measure | value | target | met |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
