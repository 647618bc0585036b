#!/usr/bin/env python3
"""SMTP intake with [cluster] (Valkey/Redis) on and off, in the same run.

    .venv/bin/python bench/cluster.py                     # workers 1 and 2, 3 runs each (~5 min)
    .venv/bin/python bench/cluster.py --workers 1 --repeat 1 -n 2000

One redis-server (Debian package redis-server) is started for the run on a free loopback
port, without persistence.  For each repetition, the two variants in alternating order,
each with a fresh spool: txmta relaying to smtp-sink as in bench/run.py, with and without
`[cluster] redis = ...` (nodes = 2); smtp-source sends N messages of 4 KB over 20 kept
sessions; accepted msg/s = N / its wall time; then the queue is left to drain.

With [cluster] on, each worker keeps its connections to Redis and worker 0 waits in XREAD
on the suppression log; intake itself checks the local suppression mirror, never Redis.
Target (issue 12): intake with [cluster] within 10 % of intake without it.  With several
workers the kernel hands smtp-source's 20 kept sessions to whichever worker accepts first,
and how evenly it spreads them moves a run's figure by more than 10 % either way (the log
lines say how many messages each worker received): the one-worker figures compare best.
Results: a Markdown table on stdout and bench/results/<date>-cluster.json.  Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import run as R  # noqa: E402  (bench/run.py: the daemon, the sink, smtp-source)

if not os.path.exists(R.TWISTD):     # run with a virtualenv's python: its twistd
    R.TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
    R.VENV_PY = sys.executable
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port():
    with socket.socket() as s:
        s.bind((R.HOST, 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self, workdir):
        self.port = free_port()
        self.workdir = workdir
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([REDIS_SERVER, "--port", str(self.port), "--bind", R.HOST,
                                      "--save", "", "--appendonly", "no"], cwd=self.workdir,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((R.HOST, self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)

    @property
    def url(self):
        return "redis://%s:%d/0" % (R.HOST, self.port)


class ClusterTxMTA(R.TxMTA):
    """txmta with `[cluster] redis` set (when `redis_url` is given)."""

    def __init__(self, *a, redis_url=None, **kw):
        super().__init__(*a, **kw)
        self.redis_url = redis_url

    @staticmethod
    def env():
        extra = os.environ.get("PYTHONPATH")
        return dict(os.environ, PYTHONPATH=R.REPO + (os.pathsep + extra if extra else ""))

    def configure(self):
        super().configure()
        if self.redis_url:
            with open(self.conf, "a") as f:
                f.write('\n[cluster]\nredis = "%s"\nnode = "bench-a"\nnodes = 2\n' % self.redis_url)


def wait_empty(mta, timeout=300):
    deadline = time.monotonic() + timeout
    while mta.queue_len() and time.monotonic() < deadline:
        time.sleep(0.2)


def intake_round(args, workers, workdir, redis_url):
    name = "on" if redis_url else "off"
    rundir = tempfile.mkdtemp(prefix="cluster-%s-w%d-" % (name, workers), dir=workdir)
    cg = R.CpuGroup("cluster-%s-w%d" % (name, workers))
    sink = R.Sink(2501, rundir, cg)
    sink.start()
    mta = ClusterTxMTA(rundir, 2525, 2501, workers=workers, redis_url=redis_url)
    mta.configure()
    mta.start(cg)
    R.wait_banner(2525, 30, mta.proc)
    # Before the clock starts: with [cluster] each worker's connections to Redis are up,
    # and in both variants every worker has had the time to start listening (the master's
    # socket answers as soon as one does, and smtp-source's kept sessions would all stay
    # with the first).
    log = os.path.join(rundir, "twistd.log")
    deadline = time.monotonic() + 30
    while redis_url and time.monotonic() < deadline and \
            R.read_text(log, "").count("connected to redis://") < workers + 1:
        time.sleep(0.1)
    time.sleep(3.0 if workers > 1 else 1.0)
    try:
        t0 = time.monotonic()
        subprocess.run(R.smtp_source_argv(2525, args.messages, args.sessions, args.size, True),
                       check=True, timeout=600, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        rate = args.messages / (time.monotonic() - t0)
        wait_empty(mta)
    finally:
        mta.stop()
        sink.stop()
    # how the kernel spread smtp-source's kept sessions: messages received by each worker
    text = R.read_text(os.path.join(rundir, "maillog"), "")
    spread = [text.count("worker=%d" % k) // 2 for k in range(workers)] if workers > 1 else []
    return rate, spread


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", default="1,2")
    p.add_argument("-n", "--messages", type=int, default=5000)
    p.add_argument("-s", "--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", default=os.path.join(BENCH, "work"))
    args = p.parse_args()
    if not os.path.exists(REDIS_SERVER):
        sys.exit("bench/cluster.py needs redis-server (Debian package redis-server)")
    os.makedirs(args.workdir, exist_ok=True)
    redis = Redis(args.workdir).start()
    variants = [int(w) for w in args.workers.split(",")]
    results = {w: {"on": [], "off": []} for w in variants}
    try:
        for rep in range(args.repeat):
            for w in variants:
                order = ["off", "on"] if rep % 2 == 0 else ["on", "off"]
                for kind in order:
                    rate, spread = intake_round(args, w, args.workdir,
                                                redis.url if kind == "on" else None)
                    results[w][kind].append(rate)
                    results[w][kind + "_spread"] = results[w].get(kind + "_spread", []) + [spread]
                    R.log("w%d rep %d: [cluster] %s: %.0f msg/s%s" % (
                        w, rep + 1, kind, rate,
                        " (messages per worker: %s)" % "/".join(map(str, spread)) if spread else ""))
    finally:
        redis.stop()
    print("| txmta | intake msg/s, [cluster] off | intake msg/s, [cluster] on | on / off |")
    print("|---|---|---|---|")
    summary = {}
    for w in variants:
        off, on = statistics.median(results[w]["off"]), statistics.median(results[w]["on"])
        summary[w] = {"off": off, "on": on, "ratio": on / off}
        print("| w%d | %.0f (%s) | %.0f (%s) | %.2f %s |" % (
            w, off, ", ".join("%.0f" % x for x in results[w]["off"]),
            on, ", ".join("%.0f" % x for x in results[w]["on"]), on / off,
            "ok" if on / off >= 0.9 else "NOT met"))
    path = os.path.join(BENCH, "results", time.strftime("%Y-%m-%d-%H%M%S") + "-cluster.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"args": vars(args), "results": {str(k): v for k, v in results.items()},
                   "summary": {str(k): v for k, v in summary.items()},
                   "version": R.TxMTA.version()}, f, indent=2)
    print("\nJSON: " + os.path.relpath(path, R.REPO))


if __name__ == "__main__":
    main()
