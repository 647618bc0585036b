#!/usr/bin/env python3
"""Does LMDB's one write lock limit two worker processes?  Commit-heavy loads like the spool's.

Each configuration runs for --seconds and is measured on a fresh environment:

  1 proc          one process committing
  2 procs shared  two processes committing into ONE environment (the spool as it is: every
                  worker's writer thread takes the same write lock, held until the commit's
                  fsyncs are done)
  2 procs separate two processes, each with ITS OWN environment (the fallback: one environment
                  per worker), on the same disk

Every process opens its environment after the fork, with the spool's flags (sync and metasync
on, no writemap, lock on), and loops: begin a write transaction, write k messages, commit.  A
message is what the spool writes at intake: an envelope record (~200 B), the body (--size,
4096 B), a recipient record, a due key, an event and a Message-ID key; and, once the loop has
run --backlog transactions, the delete of a message written --backlog transactions earlier (the
end of a delivery), so the database stays the same size.  k (--ks 1,8,32) stands for the
natural group commit: the messages that arrive during one commit share the next.

Per process it times (time.perf_counter):
  wait    env.begin(write=True): waiting for the write lock (the other process's transaction,
          including its fsyncs), plus LMDB's own begin
  txn     the puts and deletes inside the transaction
  commit  txn.commit(): writing the pages and the two fsyncs (data, then meta page)
and reports commits/s and messages/s of all processes, and per transaction the mean wait, txn
and commit times and the 99th percentile of the wait.

Run from the repository root with the virtualenv's Python (py-lmdb):
    .venv/bin/python bench/lmdb_lock.py [--seconds 3] [--ks 1,8,32] [--repeat 3]
The environments go to --dir (default bench/work/lmdb-lock, the file system of the benchmark's
spools) and are removed afterwards.  Results: a table on stdout, JSON in
bench/results/<date>-lmdb-lock.json.
"""

import argparse
import datetime
import json
import multiprocessing
import os
import shutil
import statistics
import struct
import sys
import time

import lmdb

BENCH = os.path.dirname(os.path.abspath(__file__))
DBS = (b"messages", b"bodies", b"recipients", b"due", b"events", b"msgids")
CONFIGS = (("1 proc", 1, False), ("2 procs shared", 2, False), ("2 procs separate", 2, True))


def open_env(path):
    """The spool's flags (txmta/spool/lmdb.py LmdbSpool)."""
    os.makedirs(path, exist_ok=True)
    return lmdb.open(path, map_size=1 << 30, max_dbs=len(DBS) + 2, subdir=True, sync=True,
                     metasync=True, writemap=False, map_async=False, lock=True, readahead=False,
                     max_readers=512)


def message_keys(proc, seq):
    mid = b"%011d%d%03d" % (seq, proc, seq % 1000)
    return mid, mid + b"/0000", b"\x00" + struct.pack(">Q", seq) + mid + b"/0000", mid + b"/e"


def worker(path, proc, k, size, backlog, start, stop_at, results, rate=None):
    """One committing process (runs after fork; opens its environment itself).  With `rate`
    (msg/s): messages "arrive" at that steady rate, and each transaction takes every message
    that arrived until it began (at least one; the natural group commit of the spool's writer
    thread); `latency` is each message's arrival -> its commit returned."""
    env = open_env(path)
    db = {name: env.open_db(name) for name in DBS}
    body = os.urandom(size // 2).hex().encode()[:size]
    envelope = b"e" * 200
    recipient = b"r" * 48
    event = b"v" * 64
    waits, txns, commits, batches, latency = [], [], [], [], []
    seq = 0
    start.wait()
    deadline = stop_at.value
    began = time.perf_counter()
    while time.time() < deadline:
        if rate is not None:
            arrived = int((time.perf_counter() - began) * rate)
            if arrived <= seq:
                time.sleep(max(0.0, (seq + 1) / rate - (time.perf_counter() - began)))
                continue
            k = arrived - seq
            first = seq
        t0 = time.perf_counter()
        txn = env.begin(write=True)
        t1 = time.perf_counter()
        for _ in range(k):
            mid, rkey, dkey, ekey = message_keys(proc, seq)
            txn.put(mid, envelope, db=db[b"messages"])
            txn.put(mid, body, db=db[b"bodies"])
            txn.put(rkey, recipient, db=db[b"recipients"])
            txn.put(dkey, b"", db=db[b"due"])
            txn.put(ekey, event, db=db[b"events"])
            txn.put(b"<%s@bench.invalid>" % mid, mid, db=db[b"msgids"])
            old = seq - backlog * k
            if old >= 0:
                mid, rkey, dkey, ekey = message_keys(proc, old)
                txn.delete(mid, db=db[b"messages"])
                txn.delete(mid, db=db[b"bodies"])
                txn.delete(rkey, db=db[b"recipients"])
                txn.delete(dkey, db=db[b"due"])
                txn.delete(ekey, db=db[b"events"])
                txn.delete(b"<%s@bench.invalid>" % mid, db=db[b"msgids"])
            seq += 1
        t2 = time.perf_counter()
        txn.commit()
        t3 = time.perf_counter()
        waits.append(t1 - t0)
        txns.append(t2 - t1)
        commits.append(t3 - t2)
        batches.append(k)
        if rate is not None:
            latency += [t3 - began - i / rate for i in range(first, seq)]
    env.close()
    results.put({"proc": proc, "commits": len(commits), "messages": sum(batches),
                 "wait": waits, "txn": txns, "commit": commits, "latency": latency})


def p99(values):
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


def run(base, label, procs, separate, k, args, rate=None):
    """k messages per transaction; or, with `rate` (msg/s of all processes together, split
    evenly), as many as arrived at that steady rate."""
    shutil.rmtree(base, ignore_errors=True)
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    stop_at = ctx.Value("d", 0.0)
    paths = [os.path.join(base, "env%d" % i if separate else "env") for i in range(procs)]
    ps = [ctx.Process(target=worker, args=(paths[i], i, k, args.size, args.backlog, start,
                                           stop_at, results, rate and rate / procs))
          for i in range(procs)]
    for p in ps:
        p.start()
    time.sleep(0.5)                      # every process has opened its environment
    stop_at.value = time.time() + args.seconds
    start.set()
    out = [results.get(timeout=args.seconds + 60) for _ in ps]
    for p in ps:
        p.join(10)
    shutil.rmtree(base, ignore_errors=True)
    out.sort(key=lambda r: r["proc"])
    commits = sum(r["commits"] for r in out)
    messages = sum(r["messages"] for r in out)
    latency = sorted(x for r in out for x in r["latency"])
    per = []
    for r in out:
        n = max(1, r["commits"])
        per.append({"proc": r["proc"], "commits": r["commits"],
                    "wait_ms": 1000 * sum(r["wait"]) / n, "wait_p99_ms": 1000 * (p99(r["wait"]) or 0),
                    "txn_ms": 1000 * sum(r["txn"]) / n, "commit_ms": 1000 * sum(r["commit"]) / n,
                    "wait_share": sum(r["wait"]) / args.seconds})
    return {"config": label, "procs": procs, "separate": separate, "k": k, "rate": rate,
            "seconds": args.seconds, "commits_per_s": commits / args.seconds,
            "messages_per_s": messages / args.seconds, "per_process": per,
            "messages_per_commit": messages / max(1, commits),
            "latency_p50_ms": 1000 * latency[len(latency) // 2] if latency else None,
            "latency_p99_ms": 1000 * p99(latency) if latency else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.path.join(BENCH, "work", "lmdb-lock"))
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each run")
    ap.add_argument("--ks", default="1,8,32", help="messages per transaction (comma list)")
    ap.add_argument("--size", type=int, default=4096, help="body bytes per message")
    ap.add_argument("--backlog", type=int, default=16,
                    help="a message is deleted this many transactions after its put")
    ap.add_argument("--rates", default="1000,2000",
                    help="steady offered loads, msg/s of all processes together (comma list; "
                         "empty: none): messages arrive at that rate and each transaction takes "
                         "all that arrived; reports arrival -> commit latency")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration (median)")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    base = os.path.abspath(args.dir)
    os.makedirs(os.path.dirname(base), exist_ok=True)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    loadavg = open("/proc/loadavg").read().strip()
    runs = []
    for i in range(args.repeat):
        for k in ks:
            for label, procs, separate in CONFIGS[i % 3:] + CONFIGS[:i % 3]:   # rotated
                r = run(base, label, procs, separate, k, args)
                r["run"] = i + 1
                runs.append(r)
                print("k=%-3d %-17s #%d: %6.0f commits/s %7.0f msg/s, wait %s ms/txn" % (
                    k, label, i + 1, r["commits_per_s"], r["messages_per_s"],
                    " / ".join("%.2f" % p["wait_ms"] for p in r["per_process"])),
                    file=sys.stderr, flush=True)
        for rate in rates:
            for label, procs, separate in CONFIGS[i % 3:] + CONFIGS[:i % 3]:
                r = run(base, label, procs, separate, None, args, rate)
                r["run"] = i + 1
                runs.append(r)
                print("%5.0f msg/s offered %-17s #%d: %6.0f msg/s, %5.1f msg/commit, latency "
                      "p50 %.1f p99 %.1f ms" % (rate, label, i + 1, r["messages_per_s"],
                                                r["messages_per_commit"], r["latency_p50_ms"] or 0,
                                                r["latency_p99_ms"] or 0), file=sys.stderr, flush=True)

    rows = []
    for k, rate in [(k, None) for k in ks] + [(None, rate) for rate in rates]:
        single = None
        for label, procs, separate in CONFIGS:
            rs = [r for r in runs if r["k"] == k and r["rate"] == rate and r["config"] == label]
            m = statistics.median
            row = {"k": k, "rate": rate, "config": label, "runs": len(rs),
                   "messages_per_commit": m([r["messages_per_commit"] for r in rs]),
                   "latency_p50_ms": m([r["latency_p50_ms"] or 0 for r in rs]),
                   "latency_p99_ms": m([r["latency_p99_ms"] or 0 for r in rs]),
                   "commits_per_s": m([r["commits_per_s"] for r in rs]),
                   "messages_per_s": m([r["messages_per_s"] for r in rs]),
                   "commits_per_s_all": [round(r["commits_per_s"]) for r in rs],
                   "wait_ms": m([p["wait_ms"] for r in rs for p in r["per_process"]]),
                   "wait_p99_ms": m([p["wait_p99_ms"] for r in rs for p in r["per_process"]]),
                   "txn_ms": m([p["txn_ms"] for r in rs for p in r["per_process"]]),
                   "commit_ms": m([p["commit_ms"] for r in rs for p in r["per_process"]]),
                   "wait_share": m([p["wait_share"] for r in rs for p in r["per_process"]])}
            if single is None:
                single = row
            row["vs_1_proc"] = row["messages_per_s"] / single["messages_per_s"]
            rows.append(row)

    fs = os.popen("df -T %s 2>/dev/null" % os.path.dirname(base)).read().splitlines()
    info = {"started": started, "loadavg_before": loadavg,
            "loadavg_after": open("/proc/loadavg").read().strip(),
            "nproc": os.cpu_count(), "fs": fs[-1].split()[1] if len(fs) > 1 else "?",
            "lmdb": lmdb.version(), "py-lmdb": lmdb.__version__, "settings": vars(args)}
    d = os.path.join(BENCH, "results")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "%s-lmdb-lock.json" % datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S"))
    with open(path, "w") as f:
        json.dump({"info": info, "summary": rows, "runs": runs}, f, indent=1)

    print("## LMDB write lock: 1 vs 2 processes, %s\n" % started)
    print("%d CPUs, %s, LMDB %s; %g s per run, median of %d; a message = %d B body + 5 small "
          "keys, deleted %d transactions later; sync and metasync on. Load average before: %s\n"
          % (info["nproc"], info["fs"], ".".join(map(str, info["lmdb"])), args.seconds,
             args.repeat, args.size, args.backlog, loadavg))
    print("| k msgs/txn | processes | commits/s | msg/s | x 1 proc | wait for lock ms/txn (p99) "
          "| in txn ms/txn | commit+fsync ms/txn | share of time waiting |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["k"] is None:
            continue
        print("| %d | %s | %.0f %s | %.0f | %.2f | %.3f (%.2f) | %.3f | %.3f | %.0f%% |" % (
            r["k"], r["config"], r["commits_per_s"],
            "[%s]" % ", ".join(map(str, r["commits_per_s_all"])) if r["runs"] > 1 else "",
            r["messages_per_s"], r["vs_1_proc"], r["wait_ms"], r["wait_p99_ms"], r["txn_ms"],
            r["commit_ms"], 100 * r["wait_share"]))
    print("\nPer process (median over processes and runs).\n")
    if rates:
        print("Steady offered load (all processes together; each transaction takes every message "
              "that arrived, like the spool's writer thread): latency = arrival -> commit "
              "returned, pooled per run, median of the runs.\n")
        print("| offered msg/s | processes | msg/s | msgs/commit | commits/s | latency p50 ms "
              "| p99 ms | wait for lock ms/txn (p99) | commit+fsync ms/txn |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if r["rate"] is None:
                continue
            print("| %.0f | %s | %.0f | %.1f | %.0f | %.1f | %.1f | %.3f (%.2f) | %.3f |" % (
                r["rate"], r["config"], r["messages_per_s"], r["messages_per_commit"],
                r["commits_per_s"], r["latency_p50_ms"], r["latency_p99_ms"], r["wait_ms"],
                r["wait_p99_ms"], r["commit_ms"]))
        print()
    print("JSON: %s" % os.path.relpath(path))


if __name__ == "__main__":
    main()
