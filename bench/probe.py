#!/usr/bin/env python3
"""SMTP end-of-data latency probe (stdlib only).

Opens ONE SMTP connection and sends messages sequentially over it at a fixed target rate
(default 20/s).  For each message it records the time from sending the final ".\\r\\n" (the end
of the client's "\\r\\n.\\r\\n") to reading the complete 250 reply: that is the time the server
needs to take responsibility for the message (for Postfix and txmta: write and fsync it to the
spool).  The body is sent first, then the clock starts, then ".\\r\\n" goes out in its own
write (TCP_NODELAY is set, so Nagle does not delay it).

Used by bench/run.py (as a subprocess, alongside smtp-source or alone), but also usable by hand:

    python3 bench/probe.py --port 2525 --rate 100 --seconds 10

Every loop is bounded: --count messages at most, --seconds of wall time at most, and a
socket timeout on every read.  SIGTERM/SIGINT end the run after the current message; the
result (JSON) is written to --out (or stdout) in every case.
"""

import argparse
import json
import math
import signal
import socket
import statistics
import sys
import time

HOST = "127.0.0.1"      # the probe only ever talks to loopback


class SMTPError(Exception):
    pass


class Conn:
    """A minimal blocking SMTP client that can read multi-line replies."""

    def __init__(self, port, timeout):
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def reply(self):
        """Read one (possibly multi-line) reply; return (code, text)."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                data = self.sock.recv(65536)
                if not data:
                    raise SMTPError("connection closed by server")
                self.buf += data
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                break
        code = int(lines[-1][:3])
        return code, b"\n".join(lines).decode("latin-1")

    def cmd(self, line, expect):
        self.sock.sendall(line + b"\r\n")
        code, text = self.reply()
        if code // 100 != expect:
            raise SMTPError("%s -> %s" % (line.decode("latin-1"), text))
        return code

    def close(self):
        try:
            self.sock.sendall(b"QUIT\r\n")
            self.reply()
        except (OSError, SMTPError, ValueError):
            pass
        self.sock.close()


def make_body(size, seq, helo, bench_id=None):
    """An RFC 5322 message of about `size` payload bytes, CRLF line endings, ending in CRLF.
    With bench_id, it carries an `X-Bench-Id: <bench_id>` header (see bench/pysink.py)."""
    head = ("From: <bench@example.com>\r\nTo: <probe@example.net>\r\n"
            "Subject: latency probe %d\r\nMessage-ID: <probe.%d.%f@%s>\r\n%s\r\n"
            % (seq, seq, time.time(), helo,
               "X-Bench-Id: %s\r\n" % bench_id if bench_id else "")).encode()
    line = b"x" * 78 + b"\r\n"
    nlines = max(1, size // len(line))
    return head + line * nlines


def percentile(sorted_vals, p):
    """Nearest-rank percentile of an already sorted list (p in 0..100)."""
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, math.ceil(p / 100.0 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def summarize(samples_s):
    s = sorted(samples_s)
    if not s:
        return {"n": 0}
    return {"n": len(s), "p50_ms": 1000 * percentile(s, 50), "p90_ms": 1000 * percentile(s, 90),
            "p99_ms": 1000 * percentile(s, 99), "max_ms": 1000 * s[-1], "min_ms": 1000 * s[0],
            "mean_ms": 1000 * statistics.fmean(s)}


def run_probe(port, rate, count, seconds, size=4096, timeout=30.0, helo="probe.bench.invalid",
              stop=lambda: False, id_prefix=None):
    """Send up to `count` messages at `rate`/s for at most `seconds`; return a result dict.
    With id_prefix, message i carries the header `X-Bench-Id: <id_prefix>.<i>` and the result
    has "ids" and "t250" (time.monotonic() when its 250 was read) for every accepted message."""
    samples = []
    ids, t250 = [], []
    errors = []
    t_start = time.monotonic()
    deadline = t_start + seconds
    conn = None
    sent = 0
    try:
        conn = Conn(port, timeout)
        code, banner = conn.reply()
        if code != 220:
            raise SMTPError("banner: %s" % banner)
        conn.cmd(b"EHLO " + helo.encode(), 2)
        interval = 1.0 / rate
        next_at = time.monotonic()
        while sent < count and not stop():
            now = time.monotonic()
            if now >= deadline:
                break
            if now < next_at:
                time.sleep(min(next_at - now, deadline - now))
                continue
            # fixed schedule; if we fall behind, do not burst to catch up
            next_at = max(next_at + interval, now)
            bid = "%s.%d" % (id_prefix, sent) if id_prefix else None
            body = make_body(size, sent, helo, bid)
            conn.cmd(b"MAIL FROM:<bench@example.com>", 2)
            conn.cmd(b"RCPT TO:<probe%d@example.net>" % sent, 2)
            conn.cmd(b"DATA", 3)
            conn.sock.sendall(body)
            t0 = time.perf_counter()
            conn.sock.sendall(b".\r\n")
            code, text = conn.reply()
            t1 = time.perf_counter()
            tm = time.monotonic()
            sent += 1
            if code == 250:
                samples.append(t1 - t0)
                if id_prefix:
                    ids.append(bid)
                    t250.append(tm)
            else:
                errors.append(text)
                if len(errors) >= 10:
                    break
                conn.cmd(b"RSET", 2)
    except (OSError, SMTPError, ValueError) as e:
        errors.append("%s: %s" % (type(e).__name__, e))
    finally:
        if conn is not None:
            conn.close()
    wall = time.monotonic() - t_start
    res = {"target_rate": rate, "sent": sent, "ok": len(samples), "wall_s": wall,
           "achieved_rate": len(samples) / wall if wall > 0 else 0.0,
           "errors": errors[:10], "samples_ms": [round(1000 * x, 3) for x in samples]}
    res.update(summarize(samples))
    if id_prefix:
        res.update(ids=ids, t250=t250)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True, help="SMTP port on 127.0.0.1")
    ap.add_argument("--rate", type=float, default=20.0, help="target messages per second")
    ap.add_argument("--count", type=int, default=100000, help="maximum number of messages")
    ap.add_argument("--seconds", type=float, default=60.0, help="maximum wall time")
    ap.add_argument("--size", type=int, default=4096, help="payload bytes per message")
    ap.add_argument("--timeout", type=float, default=30.0, help="socket timeout per read")
    ap.add_argument("--out", help="write the JSON result here (default: stdout)")
    ap.add_argument("--id-prefix", help="add X-Bench-Id: PREFIX.<seq> to each message and record "
                                        "the monotonic time of each 250 (end-to-end latency test)")
    args = ap.parse_args()

    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    res = run_probe(args.port, args.rate, args.count, args.seconds, args.size, args.timeout,
                    stop=lambda: bool(stopping), id_prefix=args.id_prefix)
    text = json.dumps(res)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    if not args.out:
        s = {k: v for k, v in res.items() if k not in ("samples_ms", "ids", "t250")}
        print(json.dumps(s, indent=1), file=sys.stderr)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
