"""Long soak: steady SMTP load with deferrals and bounces; are memory and latency flat?

Runs a real `twistd txmta` (a master and `--workers` workers) relaying to a sink of our own
on 127.0.0.3 that answers RCPT TO with a 4xx for `--defer` (5 %) of recipients and a 5xx
for `--reject` (1 %: bounces, whose DSNs go back through the same sink), and feeds it
`--rate` (200) messages a second over SMTP from `--sessions` connections (each QUITs
and reconnects after `--per-session` messages) for `--duration` (2h).  Every `--interval`
(10 s) it samples:

* RSS (VmRSS, MiB) and CPU seconds of the master and of each worker;
* end of data -> 250 latency of the messages accepted in the interval: p50, p99, max;
* the queue depth (messages in the spool, from its statistics) and the sink's counts.

Writes bench/results/<date>-soak.csv (one row per sample), -soak.svg (RSS, latency and
queue depth against time) and -soak.json (the summary: least-squares slopes per hour of
RSS and latency after the first `--warmup` minutes, the send rate achieved).  As root, from
the repository root:

    PYTHONPATH=. .venv/bin/python bench/soak.py [--rate 200] [--duration 2h] [--workers 2]

`--sink HOST:PORT --stats FILE` runs the sink alone (the soak starts it so).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from run import children  # noqa: E402  (bench/run.py: the master's worker processes)

SINK_HOST = "127.0.0.3"
HOST = "127.0.0.1"


def duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 10m, 2h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


# -- the sink: 250, or 4xx / 5xx at RCPT for a share of recipients ----------------------------

class SinkCounts:
    def __init__(self) -> None:
        self.c = {"sessions": 0, "messages": 0, "rcpt_ok": 0, "rcpt_deferred": 0,
                  "rcpt_rejected": 0, "dsns": 0}


async def sink_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       counts: SinkCounts, defer: float, reject: float, rng: random.Random) -> None:
    c = counts.c
    c["sessions"] += 1
    writer.write(b"220 sink.soak.test ESMTP\r\n")
    accepted, null_sender = 0, False
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(b"250-sink.soak.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                accepted, null_sender = 0, b"<>" in line
                writer.write(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                roll = rng.random()
                if roll < reject:
                    c["rcpt_rejected"] += 1
                    writer.write(b"550 5.1.1 no such user here\r\n")
                elif roll < reject + defer:
                    c["rcpt_deferred"] += 1
                    writer.write(b"451 4.2.0 mailbox busy, try again later\r\n")
                else:
                    c["rcpt_ok"] += 1
                    accepted += 1
                    writer.write(b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                if not accepted:
                    writer.write(b"554 5.5.1 no valid recipients\r\n")
                    continue
                writer.write(b"354 go ahead\r\n")
                while True:
                    data = await reader.readline()
                    if not data or data == b".\r\n":
                        break
                c["messages"] += 1
                c["dsns"] += null_sender
                writer.write(b"250 2.0.0 ok: queued\r\n")
            elif verb == b"RSET":
                accepted = 0
                writer.write(b"250 2.0.0 ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"250 2.0.0 ok\r\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def run_sink(host: str, port: int, stats: Path, defer: float, reject: float) -> None:
    counts, rng = SinkCounts(), random.Random(4)
    server = await asyncio.start_server(
        lambda r, w: sink_session(r, w, counts, defer, reject, rng), host, port, backlog=512)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        while not stop.is_set():
            tmp = stats.with_suffix(".tmp")
            tmp.write_text(json.dumps(counts.c))
            os.replace(tmp, stats)
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
    stats.write_text(json.dumps(counts.c))


# -- the load: `rate` messages a second over `sessions` connections -----------------------------

class Load:
    def __init__(self, port: int, rate: float, sessions: int, per_session: int, size: int) -> None:
        self.port, self.rate, self.sessions, self.per_session = port, rate, sessions, per_session
        self.body_fill = (b"x" * 76 + b"\r\n") * max(1, size // 78)
        self.latencies: list[float] = []      # taken (and emptied) by each sample
        self.sent = self.accepted = self.refused = self.errors = 0
        self.late = 0                         # messages started later than due by > 1 s
        self.queue: asyncio.Queue[float] = asyncio.Queue()
        self.running = True

    async def ticker(self, until: float) -> None:
        start = time.monotonic()
        k = 0
        while self.running and time.monotonic() < until:
            due = start + k / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.queue.put_nowait(due)
            k += 1
        self.running = False
        for _ in range(self.sessions):
            self.queue.put_nowait(-1.0)

    async def client(self, index: int) -> None:
        seq = 0
        while True:
            try:
                reader, writer = await asyncio.open_connection(HOST, self.port)
            except OSError:
                self.errors += 1
                await asyncio.sleep(0.5)
                if not self.running:
                    return
                continue

            async def reply() -> int:
                while True:
                    line = await asyncio.wait_for(reader.readline(), 60)
                    if not line:
                        raise ConnectionError("closed")
                    if line[3:4] != b"-":
                        return int(line[:3])

            try:
                await reply()
                writer.write(b"EHLO load.soak.test\r\n")
                await writer.drain()
                await reply()
                for _ in range(self.per_session):
                    due = await self.queue.get()
                    if due < 0:
                        writer.write(b"QUIT\r\n")
                        await writer.drain()
                        writer.close()
                        return
                    if time.monotonic() - due > 1.0:
                        self.late += 1
                    seq += 1
                    n = f"{index}.{seq}.{time.time():.6f}"
                    writer.write(b"MAIL FROM:<app@shop.example>\r\n")
                    await writer.drain()
                    if await reply() != 250:
                        self.refused += 1
                        continue
                    writer.write(b"RCPT TO:<user%d.%d@dest%d.example>\r\n" % (index, seq, seq % 50))
                    await writer.drain()
                    if await reply() != 250:
                        self.refused += 1
                        writer.write(b"RSET\r\n")
                        await writer.drain()
                        await reply()
                        continue
                    writer.write(b"DATA\r\n")
                    await writer.drain()
                    await reply()
                    writer.write(b"From: <app@shop.example>\r\nSubject: soak %s\r\nMessage-ID: "
                                 b"<soak.%s@shop.example>\r\n\r\n" % (n.encode(), n.encode())
                                 + self.body_fill)
                    await writer.drain()
                    self.sent += 1
                    t0 = time.monotonic()
                    writer.write(b".\r\n")
                    await writer.drain()
                    code = await reply()
                    if code == 250:
                        self.accepted += 1
                        self.latencies.append(time.monotonic() - t0)
                    else:
                        self.refused += 1
                writer.write(b"QUIT\r\n")
                await writer.drain()
                await reply()
                writer.close()
            except (OSError, ConnectionError, asyncio.TimeoutError, ValueError):
                self.errors += 1
                writer.close()
                if not self.running and self.queue.empty():
                    return


# -- the daemon and its processes ---------------------------------------------------------------

def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def proc_sample(pid: int) -> tuple[float, float, float]:
    """(VmRSS MiB, its anonymous part MiB, CPU seconds) of `pid`.  VmRSS counts the pages
    of the spool's memory map a process has touched (the page cache, shared, reclaimable);
    RssAnon is its own memory."""
    rss = anon = cpu = 0.0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) / 1024
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        pass
    return round(rss, 1), round(anon, 1), round(cpu, 2)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def start_daemon(rundir: Path, port: int, sink_port: int, workers: int) -> subprocess.Popen[bytes]:
    spool = rundir / "spool"
    (rundir / "txmta.toml").write_text("\n".join([
        "[server]", 'hostname = "soak.txmta.test"', f"workers = {workers}", "",
        "[relay]", 'networks = ["127.0.0.1/32"]', "",
        "[spool]", f'path = "{spool}"', "",
        "[delivery]", f'relayhost = "{SINK_HOST}:{sink_port}"', 'relayhost_tls = "none"', "",
        "[dns]", f'nameservers = ["{HOST}:9"]', "",
        "[log]", f'maillog = "{rundir / "mail.log"}"', 'format = "text"', "",
        "[[listen]]", f'address = "{HOST}:{port}"', 'tls = "none"', ""]))
    twistd = Path(sys.executable).with_name("twistd")
    with open(rundir / "twistd.out", "wb") as out:
        proc = subprocess.Popen([str(twistd), "-n", "--pidfile=", "-l", str(rundir / "twistd.log"),
                                 "txmta", "--config", str(rundir / "txmta.toml")],
                                cwd=rundir, env=env(), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=1) as s:
                if s.recv(100).startswith(b"220"):
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("txmta did not start:\n" + (rundir / "twistd.log").read_text()[-3000:])
        time.sleep(0.1)
    time.sleep(2)       # every worker up
    return proc


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least squares slope of ys over xs (per unit of x), None with fewer than 3 points."""
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if len(pts) < 3:
        return None
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else None


# -- the SVG plot ---------------------------------------------------------------------------------

COLOURS = ["#1565c0", "#c62828", "#2e7d32", "#ef8f00", "#6a1b9a", "#00838f"]


def svg_panel(title: str, unit: str, xs: list[float], series: dict[str, list[Any]],
              top: int, width: int = 760, height: int = 200) -> list[str]:
    left, right, pad_top, pad_bottom = 60, 140, 24, 28
    w, h = width - left - right, height - pad_top - pad_bottom
    values = [v for ys in series.values() for v in ys if v is not None]
    ymax = max(values, default=1.0) or 1.0
    ymax *= 1.1
    xmax = max(xs, default=1.0) or 1.0
    out = [f'<g transform="translate(0,{top})">',
           f'<text x="{left}" y="16" font-size="13" font-weight="bold">{title}</text>',
           f'<rect x="{left}" y="{pad_top}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    for k in range(5):
        y = pad_top + h - h * k / 4
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
                   f'{ymax * k / 4:.4g}</text>')
    for k in range(6):
        x = left + w * k / 5
        out.append(f'<text x="{x:.1f}" y="{pad_top + h + 14}" font-size="10" '
                   f'text-anchor="middle">{xmax * k / 5:.3g}</text>')
    out.append(f'<text x="{left + w}" y="{pad_top + h + 26}" font-size="10" '
               f'text-anchor="end">minutes</text>')
    out.append(f'<text x="12" y="{pad_top + h / 2:.0f}" font-size="10" '
               f'transform="rotate(-90 12 {pad_top + h / 2:.0f})" text-anchor="middle">{unit}</text>')
    for i, (name, ys) in enumerate(series.items()):
        dashed = name.endswith(" anon")
        colour = COLOURS[(i - len(series) // 2 if dashed else i) % len(COLOURS)]
        pts = " ".join(f"{left + w * x / xmax:.1f},{pad_top + h - h * y / ymax:.1f}"
                       for x, y in zip(xs, ys) if y is not None)
        dash = ' stroke-dasharray="4 3"' if dashed else ""
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.5"'
                   f'{dash}/>')
        out.append(f'<text x="{left + w + 8}" y="{pad_top + 12 + 14 * i}" font-size="11" '
                   f'fill="{colour}">{name}</text>')
    out.append("</g>")
    return out


def svg(rows: list[dict[str, Any]], title: str) -> str:
    xs = [r["t_s"] / 60 for r in rows]
    procs = [k[:-7] for k in rows[0] if k.endswith("_rss_mb")] if rows else []
    panels = [
        ("RSS (VmRSS; dashed: its anonymous part)", "MiB",
         {**{p: [r[f"{p}_rss_mb"] for r in rows] for p in procs},
          **{f"{p} anon": [r[f"{p}_anon_mb"] for r in rows] for p in procs}}),
        ("end of data -> 250 latency", "ms", {"p50": [r["p50_ms"] for r in rows],
                                              "p99": [r["p99_ms"] for r in rows]}),
        ("queue depth", "messages", {"spool": [r["queue_depth"] for r in rows]}),
    ]
    height = 200
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="760" '
           f'height="{30 + height * len(panels)}" font-family="sans-serif">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="10" y="18" font-size="14">{title}</text>']
    for k, (name, unit, series) in enumerate(panels):
        out += svg_panel(name, unit, xs, series, 26 + k * height)
    out.append("</svg>")
    return "\n".join(out)


# -- the run ----------------------------------------------------------------------------------------

async def soak(args: argparse.Namespace, proc: subprocess.Popen[bytes], port: int, spool: Path,
               stats: Path) -> list[dict[str, Any]]:
    from txmta.spool.view import LmdbView
    load = Load(port, args.rate, args.sessions, args.per_session, args.size)
    start = time.monotonic()
    until = start + args.duration
    tasks = [asyncio.create_task(load.ticker(until))]
    tasks += [asyncio.create_task(load.client(i)) for i in range(args.sessions)]
    view = LmdbView(str(spool))
    rows: list[dict[str, Any]] = []
    pids = {"master": proc.pid}
    pids.update({f"worker{k}": pid for k, pid in enumerate(children(proc.pid))})
    last_accepted = 0
    try:
        next_at = start + args.interval
        while time.monotonic() < until:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += args.interval
            lat, load.latencies = load.latencies, []
            row: dict[str, Any] = {"t_s": round(time.monotonic() - start, 1)}
            for name, pid in pids.items():
                row[f"{name}_rss_mb"], row[f"{name}_anon_mb"], row[f"{name}_cpu_s"] = \
                    proc_sample(pid)
            row["accepted"] = load.accepted
            row["rate"] = round((load.accepted - last_accepted) / args.interval, 1)
            last_accepted = load.accepted
            p50, p99 = percentile(lat, 50), percentile(lat, 99)
            row["p50_ms"] = round(p50 * 1000, 2) if p50 is not None else None
            row["p99_ms"] = round(p99 * 1000, 2) if p99 is not None else None
            row["max_ms"] = round(max(lat) * 1000, 2) if lat else None
            row["queue_depth"] = view.count()
            try:
                sink = json.loads(stats.read_text())
            except (OSError, ValueError):
                sink = {}
            for key in ("messages", "rcpt_deferred", "rcpt_rejected", "dsns"):
                row[f"sink_{key}"] = sink.get(key)
            row["late"], row["refused"], row["errors"] = load.late, load.refused, load.errors
            rows.append(row)
            print(f"  {row['t_s']:7.0f} s  {row['rate']:6.1f} msg/s  p50 {row['p50_ms']} ms  "
                  f"p99 {row['p99_ms']} ms  depth {row['queue_depth']}  RSS "
                  + " ".join(f"{p} {row[p + '_rss_mb']}" for p in pids), file=sys.stderr, flush=True)
            if proc.poll() is not None:
                raise RuntimeError(f"txmta exited with {proc.returncode}")
    finally:
        load.running = False
        await asyncio.wait(tasks, timeout=30)
        view.close()
    return rows


def summarise(rows: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    steady = [r for r in rows if r["t_s"] >= warmup_s] or rows
    hours = [r["t_s"] / 3600 for r in steady]
    out: dict[str, Any] = {"samples": len(rows), "steady_from_s": warmup_s,
                           "rate_mean": round(statistics.fmean(r["rate"] for r in steady), 1)}
    for key in [k for k in rows[0] if k.endswith(("_rss_mb", "_anon_mb"))] + [
            "p50_ms", "p99_ms", "queue_depth"]:
        ys = [r[key] for r in steady]
        s = slope(hours, ys)
        present = [y for y in ys if y is not None]
        out[key] = {"first": present[0] if present else None,
                    "last": present[-1] if present else None,
                    "min": min(present, default=None), "max": max(present, default=None),
                    "mean": round(statistics.fmean(present), 2) if present else None,
                    "slope_per_hour": round(s, 2) if s is not None else None}
    last = rows[-1]
    out["totals"] = {k: last[k] for k in last if k.startswith("sink_") or k in
                     ("accepted", "late", "refused", "errors")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=200.0, help="messages a second")
    p.add_argument("--duration", type=duration, default=duration("2h"))
    p.add_argument("--interval", type=duration, default=10.0, help="between samples")
    p.add_argument("--warmup", type=duration, default=60.0,
                   help="left out of the slopes (the first retries are still coming)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--per-session", type=int, default=100, help="messages before reconnecting")
    p.add_argument("--size", type=int, default=2048, help="body bytes")
    p.add_argument("--defer", type=float, default=0.05, help="share of RCPTs given a 4xx")
    p.add_argument("--reject", type=float, default=0.01, help="share of RCPTs given a 5xx")
    p.add_argument("--workdir", default=str(BENCH / "work" / "soak"))
    p.add_argument("--keep", action="store_true")
    p.add_argument("--sink", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stats", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.sink:
        host, port = args.sink.rsplit(":", 1)
        asyncio.run(run_sink(host, int(port), Path(args.stats), args.defer, args.reject))
        return

    sys.path.insert(0, str(REPO))
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sink_port, port = free_port(SINK_HOST), free_port(HOST)
    stats = work / "sink.json"
    sink = subprocess.Popen([sys.executable, __file__, "--sink", f"{SINK_HOST}:{sink_port}",
                             "--stats", str(stats), "--defer", str(args.defer),
                             "--reject", str(args.reject)])
    proc = None
    try:
        proc = start_daemon(work, port, sink_port, args.workers)
        print(f"soak: {args.rate:g} msg/s for {args.duration:g} s, {args.workers} workers, "
              f"sink defers {args.defer:.0%} and rejects {args.reject:.0%}", file=sys.stderr)
        rows = asyncio.run(soak(args, proc, port, work / "spool", stats))
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        sink.send_signal(signal.SIGTERM)
        sink.wait(10)
    summary = summarise(rows, args.warmup)
    summary["args"] = {k: v for k, v in vars(args).items() if k not in ("sink", "stats")}
    summary["loadavg_after"] = os.getloadavg()
    out = BENCH / "results"
    out.mkdir(exist_ok=True)
    stem = out / f"{time.strftime('%Y%m%d-%H%M%S')}-soak"
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    Path(f"{stem}.svg").write_text(svg(rows, f"txmta soak: {args.rate:g} msg/s, "
                                             f"{args.defer:.0%} deferred, {args.reject:.0%} "
                                             f"rejected, {args.workers} workers"))
    Path(f"{stem}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"written: {stem}.csv, .svg, .json", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
