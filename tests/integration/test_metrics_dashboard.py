"""/metrics and the dashboard of a real daemon with two workers.

Mail goes in over SMTP and the API and out to a recording sink.  /metrics is read from a
relay.networks address and parsed with prometheus_client's own parser: the counts add up
over both workers and no label carries an address.  The dashboard refuses a client outside
relay.networks without a token, takes a dashboard token as HTTP Basic password, and headless
Chromium loads it from the daemon: plots with points, no console output.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from itlib import OTHER_IP, REPO, Daemon, free_port, submit, wait_until
from sinks import SmtpSink
from test_dashboard_browser import CHROMIUM, chromium, console_lines

pytestmark = pytest.mark.integration

SINK_IP = "127.0.0.44"


def token(tokens: Path, name: str, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "txmta.cli", "api-token", name, "--file",
                           str(tokens), *args], capture_output=True, text=True, check=True,
                          timeout=60, cwd=str(REPO)).stdout.strip()


def get(url: str, headers: dict[str, str] | None = None, source: str | None = None
        ) -> tuple[int, bytes]:
    import http.client
    from urllib.parse import urlsplit
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30,
                                      source_address=(source, 0) if source else None)
    try:
        conn.request("GET", u.path or "/", headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def samples(text: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def total(found: dict[str, list[Any]], name: str, **labels: str) -> float:
    return sum(s.value for s in found.get(name, [])
               if all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_and_dashboard(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: `make debs` (run by `make test`) installs it")
    tokens = tmp_path / "tokens"
    sender = token(tokens, "app")
    viewer = token(tokens, "viewer", "--scope", "dashboard")
    port = free_port(SINK_IP)
    http_port = free_port()
    base = f"http://127.0.0.1:{http_port}"
    with SmtpSink(SINK_IP, port) as sink:
        d = start_daemon(server={"workers": 2},
                         http=[{"address": f"127.0.0.1:{http_port}", "name": "web"}],
                         api={"tokens": str(tokens)},
                         delivery={"relayhost": f"{SINK_IP}:{port}", "relayhost_tls": "none",
                                   "connect_timeout": "5s"})
        for i in range(6):
            submit(d, "app@example.com", ["bob@dest.test"], f"Subject: {i}\r\n\r\nx\r\n")
        from postmarker.core import PostmarkClient
        pm = PostmarkClient(server_token=sender, root_api_url=base + "/")
        for i in range(2):
            pm.emails.send(From="app@example.com", To="ann@dest.test", Subject=f"api {i}",
                           TextBody="x")
        sink.wait(lambda s: len(s.transactions) >= 8, 30, "8 messages delivered")

        def metrics() -> dict[str, list[Any]]:
            status, body = get(base + "/metrics")
            assert status == 200
            return samples(body.decode())

        found = wait_until(lambda: (lambda f: f if total(
            f, "txmta_recipients_total", result="delivered") >= 8 else None)(metrics()),
            20, "the delivered count")
        assert total(found, "txmta_messages_received_total", source="smtp") == 6
        assert total(found, "txmta_messages_received_total", source="api") == 2
        assert total(found, "txmta_messages_received_total", listener="web") == 2
        assert total(found, "txmta_spool_commit_batch_size_count") >= 8
        assert total(found, "txmta_eod_to_250_seconds_count") >= 8
        assert total(found, "txmta_api_requests_total", endpoint="email", status="2xx") == 2
        assert all(name.startswith("txmta_") for name in found)
        for series in found.values():
            for s in series:
                assert all("@" not in v and not re.match(r"\d+\.\d+\.\d+\.\d+", v)
                           for v in s.labels.values()), s

        # the dashboard: refused outside relay.networks without a token, a token as password
        status, _ = get(base + "/", source=OTHER_IP)
        assert status == 401
        basic = base64.b64encode(f"viewer:{viewer}".encode()).decode()
        status, page = get(base + "/", {"Authorization": "Basic " + basic}, source=OTHER_IP)
        assert status == 200 and b"<svg" in page
        status, _ = get(base + "/", {"Authorization": "Basic " +
                                     base64.b64encode(f"x:{sender}".encode()).decode()},
                        source=OTHER_IP)
        assert status == 401                  # a send-only token sees no dashboard
        # the history samples the metrics every 10 s from the start (when the counts were
        # 0): a later sample counts the 8 deliveries into the last hour, and the page says so
        delivered = rb'<div class="stat"><b>8</b><small>delivered</small></div>'
        wait_until(lambda: delivered in get(base + "/")[1], 40, "8 delivered in the last hour")
        page = get(base + "/")[1]
        stats = re.findall(rb'<b>[^<]*</b><small>[^<]*</small>', page)
        assert b'<b>100.0%</b><small>delivery rate</small>' in stats, stats
        dom, err = chromium(tmp_path, "--dump-dom", base + "/")
        assert console_lines(err) == [], err[-2000:]
        points = [int(n) for n in re.findall(r'<svg[^>]*class="plot"[^>]*data-points="(\d+)"',
                                             dom)]
        assert len(points) >= 5 and max(points) > 0, points
