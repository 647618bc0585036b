#!/usr/bin/env python3
"""The HTTP API beside SMTP intake, and webhook throughput, in one run.

    .venv/bin/python bench/api.py                     # workers 1 and 2, 3 runs each (~3 min)
    .venv/bin/python bench/api.py --workers 2 --repeat 1 -n 2000

For each repetition and each txmta variant (`[server] workers`), a fresh spool, then in
alternating order:

  * SMTP intake: smtp-source, 20 sessions over kept connections (-d), N messages of 4 KB;
    accepted msg/s = N / its wall time (as bench/run.py's "reuse" mode);
  * API intake: wrk (Debian package wrk; HTTP/1.1) with 20 keep-alive connections on 1
    threads POSTing Postmark /email requests with a 4 KB TextBody for as long as smtp-source
    needed for its N messages (at least 5 s); accepted msg/s = its requests per second
    (non-2xx answers are counted and reported as errors).  (ApacheBench speaks HTTP/1.0,
    whose keep-alive twisted.web does not offer: every request would be a new connection.)

Both go to the same daemon, which relays to smtp-sink meanwhile, as in bench/run.py.  Then the
webhook run: a [[webhook]] for received and delivered events to a receiver process on
127.0.0.1 (twisted.web, answering 200 and counting), smtp-source sends N messages, and
events/s = the events received / the time from the first to the last (2 per message).

Targets (issue 10): API >= 70 % of SMTP intake; webhooks keep up with 500 events/s.
Results: a Markdown table on stdout and bench/results/<date>-api.json.  Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import run as R  # noqa: E402  (bench/run.py: the daemon, the sink, smtp-source)

WRK = "/usr/bin/wrk"
WRK_SCRIPT = """
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json"
wrk.headers["X-Postmark-Server-Token"] = os.getenv("BENCH_TOKEN")
"""
API_PORT = 2580
HOOK_PORT = 2590

RECEIVER = r"""
import sys, time
from twisted.internet import reactor
from twisted.web import resource, server
count, first, last = [0], [0.0], [0.0]
class Hook(resource.Resource):
    isLeaf = True
    def render_POST(self, request):
        now = time.monotonic()
        if not count[0]:
            first[0] = now
        count[0] += 1
        last[0] = now
        request.content.read()
        return b""
def report():
    sys.stdout.write("%d %.6f %.6f\n" % (count[0], first[0], last[0]))
    sys.stdout.flush()
    reactor.callLater(0.2, report)
site = server.Site(Hook())
site.log = lambda request: None
reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1", backlog=1024)
reactor.callLater(0.2, report)
reactor.run()
"""


class ApiTxMTA(R.TxMTA):
    """txmta with an [[http]] listener, a token, and optionally a [[webhook]]."""

    def __init__(self, *a, webhook_url=None, **kw):
        super().__init__(*a, **kw)
        self.webhook_url = webhook_url
        self.token = None

    def configure(self):
        super().configure()
        tokens = os.path.join(self.rundir, "api-tokens")
        out = subprocess.run([R.VENV_PY, "-m", "txmta.cli", "api-token", "bench", "--file", tokens],
                             capture_output=True, text=True, check=True, env=self.env(), cwd=R.REPO)
        self.token = out.stdout.strip()
        extra = ["", "[[http]]", 'address = "%s:%d"' % (R.HOST, API_PORT),
                 "", "[api]", 'tokens = "%s"' % tokens, "rate_limit = 0", ""]
        if self.webhook_url:
            secret = os.path.join(self.rundir, "webhook.secret")
            with open(secret, "w") as f:
                f.write("whsec_" + "QmVuY2htYXJrU2VjcmV0S2V5MTIzNDU2Nzg5MA==" + "\n")
            extra += ["[[webhook]]", 'url = "%s"' % self.webhook_url,
                      'events = ["received", "delivered"]', 'secret = "%s"' % secret, ""]
        with open(self.conf, "a") as f:
            f.write("\n".join(extra))


def body_file(directory, size):
    text = ("x" * 75 + "\n") * (size // 76)
    doc = {"From": R.SENDER, "To": R.RCPT, "Subject": "bench", "TextBody": text}
    path = os.path.join(directory, "email.json")
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


def run_wrk(token, body, seconds, sessions, directory):
    script = os.path.join(directory, "post.lua")
    with open(script, "w") as f:
        f.write(WRK_SCRIPT)
    argv = [WRK, "-t1", "-c%d" % sessions, "-d%ds" % max(5, round(seconds)), "-s", script,
            "http://%s:%d/email" % (R.HOST, API_PORT)]
    env = dict(os.environ, BENCH_BODY=body, BENCH_TOKEN=token)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*?(\d+) timeout", out)
    return rate, (int(non2xx.group(1)) if non2xx else 0) + (int(errors.group(1)) if errors else 0)


def run_smtp(n, sessions, size):
    t0 = time.monotonic()
    subprocess.run(R.smtp_source_argv(2525, n, sessions, size, True), check=True, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return n / (time.monotonic() - t0)


def wait_empty(mta, timeout=300):
    deadline = time.monotonic() + timeout
    while mta.queue_len() and time.monotonic() < deadline:
        time.sleep(0.2)


def intake_round(args, workers, workdir, order):
    rundir = tempfile.mkdtemp(prefix="api-w%d-" % workers, dir=workdir)
    cg = R.CpuGroup("api-w%d" % workers)
    sink = R.Sink(2501, rundir, cg)
    sink.start()
    mta = ApiTxMTA(rundir, 2525, 2501, workers=workers)
    mta.configure()
    mta.start(cg)
    R.wait_banner(2525, 30, mta.proc)
    body = body_file(rundir, args.size)
    out = {}
    seconds = 10.0
    try:
        for kind in order:
            if kind == "smtp":
                t0 = time.monotonic()
                out["smtp"] = run_smtp(args.messages, args.sessions, args.size)
                seconds = time.monotonic() - t0
            else:
                out["api"], out["api_errors"] = run_wrk(mta.token, body, seconds,
                                                        args.sessions, rundir)
            wait_empty(mta)
    finally:
        mta.stop()
        sink.stop()
    return out


def webhook_round(args, workers, workdir):
    rundir = tempfile.mkdtemp(prefix="hooks-w%d-" % workers, dir=workdir)
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(HOOK_PORT)],
                                stdout=subprocess.PIPE, text=True)
    cg = R.CpuGroup("hooks-w%d" % workers)
    sink = R.Sink(2501, rundir, cg)
    sink.start()
    mta = ApiTxMTA(rundir, 2525, 2501, workers=workers,
                   webhook_url="http://%s:%d/hook" % (R.HOST, HOOK_PORT))
    mta.configure()
    mta.start(cg)
    want = 2 * args.webhook_messages
    line = "0 0 0"
    try:
        run_smtp(args.webhook_messages, args.sessions, args.size)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = receiver.stdout.readline().strip() or line
            if int(line.split()[0]) >= want:
                break
    finally:
        mta.stop()
        sink.stop()
        receiver.terminate()
        receiver.wait(10)
    count, first, last = line.split()
    count, first, last = int(count), float(first), float(last)
    return {"events": count, "wanted": want,
            "events_per_s": count / (last - first) if last > first else 0.0}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", default="1,2")
    p.add_argument("-n", "--messages", type=int, default=5000)
    p.add_argument("-s", "--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--webhook-messages", type=int, default=5000)
    p.add_argument("--workdir", default=os.path.join(BENCH, "work"))
    args = p.parse_args()
    if not os.path.exists(WRK):
        sys.exit("bench/api.py needs wrk (Debian package wrk)")
    os.makedirs(args.workdir, exist_ok=True)
    variants = [int(w) for w in args.workers.split(",")]
    results = {w: {"smtp": [], "api": [], "api_errors": 0, "hooks": []} for w in variants}
    for rep in range(args.repeat):
        for w in variants:
            order = ["smtp", "api"] if rep % 2 == 0 else ["api", "smtp"]
            r = intake_round(args, w, args.workdir, order)
            results[w]["smtp"].append(r["smtp"])
            results[w]["api"].append(r["api"])
            results[w]["api_errors"] += r["api_errors"]
            R.log("w%d rep %d: smtp %.0f msg/s, api %.0f msg/s (%d errors)"
                  % (w, rep + 1, r["smtp"], r["api"], r["api_errors"]))
    for w in variants:
        h = webhook_round(args, w, args.workdir)
        results[w]["hooks"].append(h)
        R.log("w%d webhooks: %d/%d events, %.0f events/s" % (w, h["events"], h["wanted"],
                                                            h["events_per_s"]))
    print("| txmta | SMTP intake msg/s (reuse) | API msg/s (keep-alive) | API / SMTP | "
          "API errors | webhook events/s |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for w in variants:
        smtp, api = statistics.median(results[w]["smtp"]), statistics.median(results[w]["api"])
        hooks = results[w]["hooks"][0]
        summary[w] = {"smtp": smtp, "api": api, "ratio": api / smtp, "hooks": hooks}
        print("| w%d | %.0f | %.0f | %.2f %s | %d | %.0f (%d/%d) %s |" % (
            w, smtp, api, api / smtp, "ok" if api / smtp >= 0.7 else "NOT met",
            results[w]["api_errors"], hooks["events_per_s"], hooks["events"], hooks["wanted"],
            "ok" if hooks["events_per_s"] >= 500 and hooks["events"] == hooks["wanted"]
            else "NOT met"))
    path = os.path.join(BENCH, "results", time.strftime("%Y-%m-%d-%H%M%S") + "-api.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"args": vars(args), "results": {str(k): v for k, v in results.items()},
                   "summary": {str(k): v for k, v in summary.items()},
                   "version": R.TxMTA.version()}, f, indent=2)
    print("\nJSON: " + os.path.relpath(path, R.REPO))


if __name__ == "__main__":
    main()
