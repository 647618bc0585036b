"""Per-provider shaping with a real twistd: a provider that says "rate limited".

A scripted provider (one sink on 127.0.0.71, the MX of two domains through the test DNS
server) accepts N messages per window and answers `421 4.7.28 rate limited` past that.  With
a [[shaping]] rule for its MX suffix, txmta backs off: after the first 421 it opens no new
connection to the provider for the cool-down, and every message is delivered in the end,
none bounced.  Loopback only.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from itlib import REPO, Daemon, delivery_sections, free_port, make_daemon, statuses, wait_until
from sinks import SmtpSink

sys.path.insert(0, str(REPO / "tests"))
from dnsserver import running  # noqa: E402

pytestmark = pytest.mark.integration

SINK_IP = "127.0.0.71"
ZONE = {
    "provider.test.": {"MX": [[10, "mx1.provider.test."]]},
    "hosted.test.": {"MX": [[10, "mx2.provider.test."]]},
    "mx1.provider.test.": {"A": [SINK_IP]},
    "mx2.provider.test.": {"A": [SINK_IP]},
}
PER_WINDOW, WINDOW = 8, 3.0


@pytest.fixture(scope="module")
def dns() -> Iterator[tuple[str, int]]:
    with running(ZONE) as hostport:
        yield hostport


class RateLimitedProvider:
    """MAIL is refused with 421 4.7.28 past PER_WINDOW messages in a WINDOW."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.window_start = 0.0
        self.count = 0
        self.refusals: list[float] = []

    def __call__(self, sink: Any, session: Any, arg: str) -> str | None:
        now = time.time()
        with self.lock:
            if now - self.window_start >= WINDOW:
                self.window_start, self.count = now, 0
            if self.count >= PER_WINDOW:
                self.refusals.append(now)
                return "421 4.7.28 [192.0.2.1] Our system has detected an unusual rate of mail; rate limited"
            self.count += 1
        return None


def test_a_rate_limited_provider_is_backed_off_and_gets_everything(tmp_path: Path, dns):
    provider = RateLimitedProvider()
    sink = SmtpSink(SINK_IP, free_port(SINK_IP), replies={"MAIL": provider}).start()
    d: Daemon = make_daemon(
        tmp_path, shaping=[{"name": "provider", "mx": [".provider.test"],
                            "cooldown": "2s", "max_cooldown": "4s"}],
        **delivery_sections(sink.port, dns, schedule=("1s", "2s", "3s")))
    d.start()
    try:
        import smtplib
        n = 40
        with smtplib.SMTP(d.host, d.port, timeout=10) as s:
            for i in range(n):
                domain = "provider.test" if i % 2 else "hosted.test"
                s.sendmail("app@app.test", [f"u{i}@{domain}"],
                           f"Subject: m{i}\r\nMessage-ID: <m{i}@app.test>\r\n\r\nhi\r\n")
        wait_until(lambda: len(sink.transactions) >= n, 120, f"{n} deliveries",
                   diagnose=lambda: f"got {len(sink.transactions)}, "
                                    f"{len(provider.refusals)} refusals")
        assert sorted(int(t.rcpt_to[0].split("@")[0][1:]) for t in sink.transactions) == \
            list(range(n))
        assert "bounced" not in statuses(d) and "expired" not in statuses(d)
        assert provider.refusals, "the provider never pushed back: the test proves nothing"
        assert "provider provider asked us to slow down" in d.log()
        # after the first refusal no new connection for the cool-down (2 s), but for those
        # that were being opened when it came
        first = provider.refusals[0]
        opened = [c.time for c in sink.connections if first + 0.25 < c.time < first + 1.9]
        assert opened == [], (opened, first)
    finally:
        d.stop()
        sink.stop()
