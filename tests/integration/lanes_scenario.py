"""The lane scenario (issue 11): a bulk backlog at a slow destination, transactional mail
sent meanwhile.  Shared by tests/integration/test_lanes_delivery.py (which asserts what must
hold) and bench/lanes.py (which reports the figures).

A real twistd with two listeners: the first in the default lane (transactional), the second
with `lane = "bulk"`; it relays every message to one scripted SMTP sink on loopback, which
takes `bulk_delay` seconds to accept each bulk message (sender bulk@...) and answers
transactional mail at once.  `n_bulk` bulk messages are queued first with smtp-source (20
sessions over kept connections), then `n_trans` transactional messages are sent one after
the other with smtplib; for each, the time from its 250 to its arrival at the sink.
"""

from __future__ import annotations

import smtplib
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itlib import common_free_port, delivery_sections, free_port, make_daemon, queued_id, wait_until
from sinks import SmtpSink

SINK_IP = "127.0.0.41"
BULK_SENDER = "bulk@bulk.test"
SMTP_SOURCE = "/usr/sbin/smtp-source"


@dataclass
class Result:
    n_bulk: int
    n_trans: int
    intake_s: float                                   # smtp-source's wall time for the bulk
    trans_latency: list[float] = field(default_factory=list)   # 250 -> at the sink, seconds
    bulk_delivered_before_last_trans: int = 0
    bulk_rate: float = 0.0     # bulk messages/s at the sink while the transactional went
    order_ok: bool = True      # every transactional message arrived before the bulk backlog

    def summary(self) -> dict[str, Any]:
        def pct(xs: list[float], p: float) -> float | None:
            if not xs:
                return None
            xs = sorted(xs)
            return round(1000 * xs[min(len(xs) - 1, int(p * len(xs)))], 1)
        return {
            "bulk_queued": self.n_bulk, "transactional": self.n_trans,
            "bulk_intake_msg_s": round(self.n_bulk / self.intake_s, 1) if self.intake_s else None,
            "transactional_ms": {"p50": pct(self.trans_latency, 0.50),
                                 "p99": pct(self.trans_latency, 0.99),
                                 "max": pct(self.trans_latency, 1.0)},
            "bulk_delivered_meanwhile": self.bulk_delivered_before_last_trans,
            "bulk_msg_s_meanwhile": round(self.bulk_rate, 1),
        }


def run(base: Path, *, n_bulk: int = 10_000, n_trans: int = 100, bulk_delay: float = 2.0,
        workers: int = 1) -> Result:
    port = free_port(SINK_IP)
    sink = SmtpSink(SINK_IP, port, accept_delay=lambda sender, rcpts:
                    bulk_delay if sender == BULK_SENDER else 0.0, timeout=600.0)
    sink.start()
    bulk_port = common_free_port("127.0.0.1")
    daemon = make_daemon(
        base, listeners=[{"tls": "none"},
                         {"address": f"127.0.0.1:{bulk_port}", "tls": "none", "lane": "bulk"}],
        server={"workers": workers, "max_connections_per_ip": 1000},
        **delivery_sections(free_port(), None, relayhost=f"{SINK_IP}:{port}",
                            max_per_destination=20, initial_per_destination=20,
                            idle_timeout="30s"))
    daemon.start()
    try:
        started = time.monotonic()
        subprocess.run([SMTP_SOURCE, "-d", "-s", "20", "-m", str(n_bulk), "-l", "1024",
                        "-f", BULK_SENDER, "-t", "someone@slow.test", "-M", "source.test",
                        f"127.0.0.1:{bulk_port}"], check=True, timeout=600,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        result = Result(n_bulk, n_trans, time.monotonic() - started)
        wait_until(lambda: len(sink.transactions) > 0, 30, "the first bulk delivery")
        accepted: dict[str, float] = {}
        for i in range(n_trans):
            token = f"trans-{i:04d}"
            body = (f"From: app@app.test\r\nTo: user@slow.test\r\nSubject: {token}\r\n"
                    f"Message-ID: <{token}@app.test>\r\n\r\nYour code is {i:06d}.\r\n").encode()
            with smtplib.SMTP(daemon.host, daemon.port, timeout=30) as s:
                s.ehlo("app.test")
                s.mail("app@app.test")
                s.rcpt("user@slow.test")
                code, resp = s.data(body)
                assert code == 250, (code, resp)
                accepted[token] = time.time()
                queued_id(resp)

        def arrived() -> dict[str, float]:
            out = {}
            with sink.lock:
                for t in sink.transactions:
                    if t.mail_from != BULK_SENDER:
                        token = t.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
                        out[token] = t.time
            return out

        wait_until(lambda: len(arrived()) == n_trans, 60, "every transactional message")
        at = arrived()
        result.trans_latency = [at[k] - accepted[k] for k in accepted]
        last = max(at.values())
        with sink.lock:
            bulk = [t for t in sink.transactions if t.mail_from == BULK_SENDER]
        meanwhile = [t for t in bulk if t.time <= last]
        result.bulk_delivered_before_last_trans = len(meanwhile)
        first = min(accepted.values())
        window = [t for t in meanwhile if t.time >= first]
        result.bulk_rate = len(window) / max(last - first, 1e-3)
        result.order_ok = len(meanwhile) < n_bulk
        return result
    finally:
        daemon.stop(timeout=30)
        sink.stop()
