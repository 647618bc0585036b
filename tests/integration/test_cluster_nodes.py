"""Several nodes with a real redis-server and real txmta daemons (loopback only).

* suppression: a hard bounce on node A puts the address on node B's list within a second
  (B, with two workers, refuses it at RCPT on every connection);
* Redis stopped in the middle: both nodes keep accepting and delivering, and a bounce A
  saw while Redis was down reaches B once Redis is back;
* the shared rate: two daemons with one [[shaping]] rule (rate "120/m" for the provider's
  MX hosts) deliver to the provider for a minute, together at most at the shared rate; and
  the same budget drawn directly by two processes that build the cluster's parts as a
  worker does.

Each test starts its own redis-server (tests/redisserver.py) on a free loopback port.
"""

from __future__ import annotations

import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from itlib import REPO, Daemon, common_free_port, delivery_sections, free_port, wait_until
from sinks import SmtpSink

sys.path.insert(0, str(REPO / "tests"))
from dnsserver import running  # noqa: E402
from redisserver import RedisServer  # noqa: E402

pytestmark = pytest.mark.integration

SINK_IP = "127.0.0.45"
GONE = "gone@dest.test"
NO_SUCH_USER = "550 5.1.1 <gone@dest.test>: Recipient address rejected: no such user here"


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir=tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    bounced: list[float] = []

    def rcpt_gone(sink: Any, session: Any, arg: str) -> str:
        bounced.append(time.time())
        return NO_SUCH_USER
    with SmtpSink(SINK_IP, common_free_port(SINK_IP),
                  replies={f"RCPT:{GONE}": rcpt_gone}) as s:
        s.bounced = bounced          # type: ignore[attr-defined]
        yield s


@pytest.fixture
def node(start_daemon: Callable[..., Daemon], redis: RedisServer,
         sink: SmtpSink) -> Callable[..., Daemon]:
    def start(name: str, workers: int = 1) -> Daemon:
        conf = delivery_sections(free_port(), None, schedule=("1s", "2s"),
                                 relayhost=f"{SINK_IP}:{sink.port}")
        conf["server"] = {"workers": workers}
        conf["cluster"] = {"redis": redis.url, "node": name, "nodes": 2, "timeout": "500ms"}
        return start_daemon(**conf)
    return start


def send(d: Daemon, rcpt: str, body: bytes = b"Subject: t\r\n\r\nhello\r\n") -> tuple[int, bytes]:
    """One message to `rcpt` through daemon `d`: the RCPT reply (and the message if taken)."""
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        s.ehlo("client.test.invalid")
        s.mail("sender@sender.test")
        code, text = s.rcpt(rcpt)
        if code == 250:
            code2, text2 = s.data(body)
            assert code2 == 250, (code2, text2)
        return code, text


def rcpt_code(d: Daemon, rcpt: str) -> int:
    with smtplib.SMTP(d.host, d.port, timeout=10) as s:
        s.ehlo("client.test.invalid")
        s.mail("sender@sender.test")
        code, _ = s.rcpt(rcpt)
        s.rset()
        return code


def connected(d: Daemon, times: int = 1) -> bool:
    return d.log().count("connected to redis://") >= times


def test_a_bounce_on_one_node_suppresses_on_the_other_within_a_second(
        node: Callable[..., Daemon], sink: SmtpSink) -> None:
    a = node("node-a")
    b = node("node-b", workers=2)
    wait_until(lambda: connected(a, 2) and connected(b, 3), 20, "both nodes connected to Redis")
    assert rcpt_code(b, GONE) == 250
    assert send(a, GONE)[0] == 250
    wait_until(lambda: sink.bounced, 20, "the next hop refused gone@dest.test")   # type: ignore[attr-defined]
    t0 = sink.bounced[0]                                                           # type: ignore[attr-defined]
    wait_until(lambda: rcpt_code(b, GONE) == 550, 5, "node B refuses gone@dest.test",
               interval=0.02)
    latency = time.time() - t0
    print(f"bounce at node A's next hop -> refused at node B: {latency * 1000:.0f} ms")
    assert latency < 1.0
    # on both of B's workers (the kernel spreads connections over them)
    assert [rcpt_code(b, GONE) for _ in range(8)] == [550] * 8
    assert rcpt_code(b, "other@dest.test") == 250


def test_redis_stopped_in_the_middle(node: Callable[..., Daemon], sink: SmtpSink,
                                     redis: RedisServer) -> None:
    """Both nodes keep accepting and delivering while Redis is down; a bounce node A saw
    meanwhile reaches node B when Redis is back."""
    a = node("node-a")
    b = node("node-b")
    wait_until(lambda: connected(a, 2) and connected(b, 2), 20, "both nodes connected to Redis")
    for d in (a, b):
        assert send(d, "before@dest.test")[0] == 250
    wait_until(lambda: len(sink.transactions) >= 2, 20, "delivered before the stop")
    redis.stop()
    wait_until(lambda: "lost the connection" in a.log() and "lost the connection" in b.log(),
               10, "both nodes saw Redis go")
    for i in range(5):
        for d in (a, b):
            assert send(d, f"during{i}@dest.test")[0] == 250
    wait_until(lambda: len(sink.transactions) >= 12, 30, "delivered while Redis is down")
    assert send(a, GONE)[0] == 250                    # bounced while Redis is down
    wait_until(lambda: sink.bounced, 20, "the next hop refused gone@dest.test")   # type: ignore[attr-defined]
    wait_until(lambda: rcpt_code(a, GONE) == 550, 10, "node A suppressed it locally")
    assert rcpt_code(b, GONE) == 250                  # B cannot know yet
    redis.start()
    wait_until(lambda: rcpt_code(b, GONE) == 550, 20, "node B hears of it after Redis is back",
               interval=0.1)
    for d in (a, b):
        assert send(d, "after@dest.test")[0] == 250
    wait_until(lambda: sum(1 for t in sink.transactions
                           if any("after@" in r for r in t.rcpt_to)) == 2, 30,
               "delivered after Redis came back")


def test_two_nodes_together_use_at_most_the_shared_rate(redis: RedisServer,
                                                        tmp_path: Path) -> None:
    """Rate 2/s, burst 1, shared by two processes for 60 s: at most 2 x 60 + 1 units in
    all (each alone would use 120), and both get a share."""
    rate, burst, seconds = 2.0, 1, 60.0
    import os
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    script = str(Path(__file__).with_name("cluster_rate.py"))
    procs = [subprocess.Popen([sys.executable, script, redis.url, "2", "gmail.com", str(rate),
                               str(burst), str(seconds)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs: list[str] = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
        assert p.returncode == 0 and "done" in out, err
        outs.append(out)
    uses = [[float(x) for x in out.split() if x not in ("ready", "done")] for out in outs]
    every = sorted(uses[0] + uses[1])
    span = every[-1] - every[0]
    print(f"units used: {len(uses[0])} + {len(uses[1])} = {len(every)} in {span:.1f} s "
          f"(shared rate {rate:g}/s)")
    assert span < seconds + 1
    assert len(every) <= rate * seconds + burst
    assert len(every) >= 0.9 * rate * seconds         # the budget is used, not lost
    assert min(len(u) for u in uses) >= 0.3 * len(every)
    # and no window of 10 s holds more than the rate allows
    for i, t in enumerate(every):
        within = sum(1 for u in every[i:] if u - t <= 10.0)
        assert within <= rate * 10.0 + burst + 1


PROVIDER_IP = "127.0.0.46"
PROVIDER_ZONE = {
    "provider.test.": {"MX": [[10, "mx1.provider.test."]]},
    "hosted.test.": {"MX": [[10, "mx2.provider.test."]]},
    "mx1.provider.test.": {"A": [PROVIDER_IP]},
    "mx2.provider.test.": {"A": [PROVIDER_IP]},
}


def test_two_daemons_deliver_at_most_the_shared_rate(start_daemon: Callable[..., Daemon],
                                                     redis: RedisServer) -> None:
    """One [[shaping]] rule, rate 120/min, on two nodes sharing Redis (node B with two
    workers): 150 messages queued on each for the provider, one to each node in turn, and
    in the first minute of delivery the provider receives at most 120 + 1 of them (each
    node alone would send 120), from both nodes."""
    seconds = 60.0
    with running(PROVIDER_ZONE) as dns, \
            SmtpSink(PROVIDER_IP, common_free_port(PROVIDER_IP)) as provider:
        nodes = []
        for name in ("node-a", "node-b"):
            conf = delivery_sections(provider.port, dns, schedule=("1s", "2s"),
                                     helo_name=f"{name}.test.invalid")
            conf["server"] = {"workers": 2 if name == "node-b" else 1}
            conf["cluster"] = {"redis": redis.url, "node": name, "nodes": 2}
            conf["shaping"] = [{"name": "provider", "mx": [".provider.test"],
                                "rate": "120/m"}]        # type: ignore[dict-item]
            nodes.append(start_daemon(**conf))
        a, b = nodes
        wait_until(lambda: connected(a, 2) and connected(b, 3), 20, "both nodes connected")
        # one message to each node in turn: each takes its units as its mail arrives (a
        # unit is reserved when asked for), so both nodes get a share of the one budget
        with smtplib.SMTP(a.host, a.port, timeout=10) as sa, \
                smtplib.SMTP(b.host, b.port, timeout=10) as sb:
            for i in range(150):
                domain = "provider.test" if i % 2 else "hosted.test"
                for s in (sa, sb):
                    s.sendmail("app@app.test", [f"u{i}@{domain}"],
                               f"Subject: m{i}\r\n\r\nhi\r\n")
        wait_until(lambda: provider.transactions, 20, "the first delivery")
        first = provider.transactions[0].time
        time.sleep(max(0.0, first + seconds + 1.0 - time.time()))
        times = sorted(t.time for t in provider.transactions)
        within = [t for t in times if t - first <= seconds]
        by_node = {name: sum(1 for t in provider.transactions
                             if t.time - first <= seconds and t.helo.startswith(name))
                   for name in ("node-a", "node-b")}
        print(f"delivered to the provider in {seconds:.0f} s: {len(within)} {by_node} "
              f"(one rule of 120/min shared)")
        assert len(within) <= 120 + 1
        assert len(within) >= 100            # the shared budget is used, not lost
        assert min(by_node.values()) >= 20   # by both nodes


def test_two_daemons_hold_at_most_the_rules_connections_together(
        start_daemon: Callable[..., Daemon], redis: RedisServer) -> None:
    """One [[shaping]] rule, connections = 2, on two nodes sharing Redis (node B with two
    workers; alone, each node and each of B's workers may open 2): 20 messages queued on
    each node for the provider, which takes 0.3 s per message.  At no moment are more than
    2 transactions open at the provider (each needs its own connection), every message
    arrives, and both nodes deliver some of them."""
    lock = threading.Lock()
    now = [0]
    peak = [0]

    def slow(sender: str, rcpts: list[str]) -> float:
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.3)
        with lock:
            now[0] -= 1
        return 0.0

    with running(PROVIDER_ZONE) as dns, \
            SmtpSink(PROVIDER_IP, common_free_port(PROVIDER_IP), accept_delay=slow) as provider:
        nodes = []
        for name in ("node-a", "node-b"):
            conf = delivery_sections(provider.port, dns, schedule=("1s", "2s"),
                                     helo_name=f"{name}.test.invalid", idle_timeout="1s")
            conf["server"] = {"workers": 2 if name == "node-b" else 1}
            conf["cluster"] = {"redis": redis.url, "node": name, "nodes": 2}
            conf["shaping"] = [{"name": "provider", "mx": [".provider.test"],
                                "connections": 2}]        # type: ignore[dict-item]
            nodes.append(start_daemon(**conf))
        a, b = nodes
        wait_until(lambda: connected(a, 2) and connected(b, 3), 20, "both nodes connected")
        for d in nodes:
            with smtplib.SMTP(d.host, d.port, timeout=10) as s:
                for i in range(20):
                    domain = "provider.test" if i % 2 else "hosted.test"
                    s.sendmail("app@app.test", [f"u{i}@{domain}"], f"Subject: m{i}\r\n\r\nhi\r\n")
        wait_until(lambda: len(provider.transactions) >= 40, 90, "all 40 messages delivered")
        by_node = {name: sum(1 for t in provider.transactions if t.helo.startswith(name))
                   for name in ("node-a", "node-b")}
        print(f"provider: at most {peak[0]} transactions at once (rule: 2 connections), "
              f"{by_node}")
        assert peak[0] == 2
        assert by_node == {"node-a": 20, "node-b": 20}
