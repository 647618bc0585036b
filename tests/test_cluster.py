"""[cluster]: the Redis URL and configuration, and the shared parts against a real
redis-server on a loopback port (tests/redisserver.py): the Lua GCRA gives the waits of
`txmta.limits.Gcra`, leases expire and are renewed, the fallback to this process's share
while Redis is down, and the suppression list carried between two nodes' queues.

The Redis connections run on a private epoll reactor that the test iterates (`pump`); the
times the limiter and the leases are given come from a `task.Clock`.  Never the global
reactor.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from twisted.internet import defer
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from txmta import cluster
from txmta import config as C
from txmta.cluster.limits import RedisConnectionLeases, RedisRateLimiter
from txmta.cluster.redis import Connection, RedisAddress, parse_url
from txmta.cluster.suppression import SuppressionSync, net_changes
from txmta.limits import Gcra, LocalConnectionLeases, LocalRateLimiter
from txmta.message import Suppression
from txmta.queue import Queue
from txmta.spool.memory import MemorySpool

sys.path.insert(0, str(Path(__file__).parent))
from redisserver import RedisServer  # noqa: E402


# -- the URL and the configuration ----------------------------------------------------------

@pytest.mark.parametrize("url,expected", [
    ("redis://127.0.0.1:6379/0", RedisAddress("127.0.0.1", 6379, 0)),
    ("redis://localhost", RedisAddress("localhost", 6379, 0)),
    ("redis://:s3cret@10.0.0.5:7000/3", RedisAddress("10.0.0.5", 7000, 3, None, "s3cret")),
    ("redis://mta:p%40ss@h/1", RedisAddress("h", 6379, 1, "mta", "p@ss")),
    ("rediss://cache.example:6380/0", RedisAddress("cache.example", 6380, 0, tls=True)),
    ("redis://[::1]:6379/2", RedisAddress("::1", 6379, 2)),
])
def test_redis_urls(url: str, expected: RedisAddress) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize("url", ["http://h:6379", "redis://", "redis://h:99999/0",
                                 "redis://h/zero", "redis://h/0?timeout=3", "127.0.0.1:6379"])
def test_bad_redis_urls(url: str) -> None:
    with pytest.raises(ValueError):
        parse_url(url)


def test_the_url_in_logs_has_no_password() -> None:
    assert str(parse_url("redis://:s3cret@h:7000/3")) == "redis://h:7000/3"


def test_cluster_section_defaults_and_node_name() -> None:
    cfg = C.load_text('[server]\nhostname = "a.example"\n')
    assert (cfg.cluster.redis, cfg.cluster.node, cfg.cluster.nodes) == ("", "a.example", 1)
    cfg = C.load_text('[server]\nhostname = "a.example"\n[cluster]\nredis = "redis://h/1"\n'
                      'node = "mta-2"\nnodes = 3\nlease_ttl = "10s"\ntimeout = "500ms"\n')
    c = cfg.cluster
    assert (c.redis, c.node, c.nodes, c.lease_ttl, c.timeout) == ("redis://h/1", "mta-2", 3, 10.0, 0.5)


@pytest.mark.parametrize("line,key", [('redis = "http://h"', "cluster.redis"),
                                      ("nodes = 0", "cluster.nodes"),
                                      ('lease_ttl = "0"', "cluster.lease_ttl"),
                                      ('ca_file = "/nonexistent/ca.pem"', "cluster.ca_file")])
def test_cluster_section_errors_name_the_key(line: str, key: str) -> None:
    with pytest.raises(C.ConfigError) as e:
        C.load_text(f"[cluster]\n{line}\n", "t.toml")
    assert e.value.key == key


def test_without_redis_the_parts_are_local() -> None:
    shared = cluster.build(C.load_text(""), Clock())
    assert isinstance(shared.rate_limiter, LocalRateLimiter)
    assert isinstance(shared.leases, LocalConnectionLeases)
    assert shared.suppression is None and shared.service is None


def test_net_changes_keep_the_last_change_per_address() -> None:
    e = Suppression("a@x", "manual", 1.0, 2.0, "")
    f = Suppression("b@x", "manual", 1.0, 2.0, "")
    assert net_changes([("add", "a@x", e), ("remove", "a@x", None), ("add", "b@x", f)]) \
        == ([f], ["a@x"])
    assert net_changes([("remove", "a@x", None), ("add", "a@x", e)]) == ([e], [])


# -- against a real redis-server ----------------------------------------------------------

@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir=tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def reactor() -> Iterator[EPollReactor]:
    r = EPollReactor()
    yield r
    for call in r.getDelayedCalls():
        call.cancel()
    r.removeAll()


def pump(reactor: EPollReactor, until: Callable[[], Any], timeout: float = 10.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        # txredisapi reads each bulk reply in a call of its own (callLater(0)): no waiting
        # while calls are due
        due = reactor.timeout()
        reactor.iterate(0.01 if due is None else min(0.01, due))


def result(reactor: EPollReactor, d: defer.Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    pump(reactor, lambda: box)
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def connect(reactor: EPollReactor, redis: RedisServer, **kw: Any) -> Connection:
    c = Connection(parse_url(redis.url), reactor, **kw)
    c.start()
    pump(reactor, lambda: c.up)
    return c


def test_lua_gcra_gives_the_same_waits_as_gcra(reactor: EPollReactor, redis: RedisServer) -> None:
    """Several keys, rates and bursts, arrivals at random times: every wait is the one
    txmta.limits.Gcra computes, to the last bit."""
    limiter = RedisRateLimiter(connect(reactor, redis))
    rng = random.Random(12)
    local: dict[str, Gcra] = {}
    now = 1_790_000_000.0
    for _ in range(300):
        key = rng.choice(["gmail.com", "outlook.com", "yahoo.com"])
        rate = {"gmail.com": 2.0, "outlook.com": 1 / 3, "yahoo.com": 17.5}[key]
        burst = {"gmail.com": 1, "outlook.com": 3, "yahoo.com": 10}[key]
        now += rng.choice([0.0, 0.001, 0.05, 0.3, 1.7, 20.0])
        expected = local.setdefault(key, Gcra()).take(now, rate, burst)
        assert result(reactor, limiter.acquire(key, rate, burst, now)) == expected
    assert not limiter.fallback.active


def test_two_limiters_on_one_redis_share_the_budget(reactor: EPollReactor,
                                                    redis: RedisServer) -> None:
    a = RedisRateLimiter(connect(reactor, redis))
    b = RedisRateLimiter(connect(reactor, redis))
    waits = [result(reactor, (a if i % 2 else b).acquire("k", 10.0, 1, 100.0)) for i in range(6)]
    assert waits == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5])


def test_leases_count_across_nodes_and_are_released(reactor: EPollReactor,
                                                    redis: RedisServer) -> None:
    clock = Clock()
    a = RedisConnectionLeases(connect(reactor, redis), clock, owner="a/0", ttl=30.0)
    b = RedisConnectionLeases(connect(reactor, redis), clock, owner="b/0", ttl=30.0)
    assert result(reactor, a.acquire("gmail", 3))
    assert result(reactor, b.acquire("gmail", 3))
    assert result(reactor, a.acquire("gmail", 3))
    assert not result(reactor, b.acquire("gmail", 3))
    assert result(reactor, b.acquire("other", 3))          # per key
    a.release("gmail")
    pump(reactor, lambda: redis.cli("ZCARD", "txmta:lease:gmail") == 2)
    assert result(reactor, b.acquire("gmail", 3))


def test_a_dead_nodes_leases_lapse_a_renewed_lease_does_not(reactor: EPollReactor,
                                                             redis: RedisServer) -> None:
    clock = Clock()
    clock.advance(1000.0)
    dead = RedisConnectionLeases(connect(reactor, redis), clock, owner="dead/0", ttl=30.0)
    alive = RedisConnectionLeases(connect(reactor, redis), clock, owner="alive/0", ttl=30.0)
    other = RedisConnectionLeases(connect(reactor, redis), clock, owner="other/0", ttl=30.0)
    alive.start()
    assert result(reactor, dead.acquire("k", 2))
    assert result(reactor, alive.acquire("k", 2))
    clock.advance(25.0)          # alive renews every 10 s; dead never does
    pump(reactor, lambda: True)
    result(reactor, alive.renew())
    assert not result(reactor, other.acquire("k", 2))     # both still held
    clock.advance(6.0)           # 31 s: the dead node's lease lapsed, alive's was renewed at 25
    assert result(reactor, other.acquire("k", 2))
    assert not result(reactor, other.acquire("k", 2))
    alive.stop()                 # a clean stop gives its lease back at once
    pump(reactor, lambda: redis.cli("ZCARD", "txmta:lease:k") == 1)
    assert result(reactor, other.acquire("k", 2))


def test_redis_down_falls_back_to_a_share_then_catches_up(reactor: EPollReactor,
                                                          redis: RedisServer) -> None:
    """Redis stopped: the limiter gives this process rate / divisor (3 nodes: 3/s -> 1/s)
    and the leases limit / divisor; when it is back, the limiter is shared again and the
    leases taken meanwhile are in Redis."""
    clock = Clock()
    conn = connect(reactor, redis, timeout=0.5)
    limiter = RedisRateLimiter(conn, divisor=3)
    leases = RedisConnectionLeases(conn, clock, owner="n/0", ttl=30.0, divisor=3)
    assert result(reactor, limiter.acquire("k", 3.0, 1, 10.0)) == 0.0
    redis.stop()
    pump(reactor, lambda: not conn.up)
    waits = [result(reactor, limiter.acquire("k", 3.0, 1, 10.0)) for _ in range(3)]
    assert waits == [0.0, 1.0, 2.0] and limiter.fallback.active
    assert result(reactor, leases.acquire("k", 6))         # 6 / 3 = 2 while down
    assert result(reactor, leases.acquire("k", 6))
    assert not result(reactor, leases.acquire("k", 6))
    redis.start()
    pump(reactor, lambda: conn.up, timeout=15.0)
    pump(reactor, lambda: redis.cli("ZCARD", "txmta:lease:k") == 2)   # caught up
    assert result(reactor, limiter.acquire("k", 3.0, 1, 20.0)) == 0.0
    assert not limiter.fallback.active
    assert redis.cli("EXISTS", "txmta:rate:k") == 1
    assert result(reactor, leases.acquire("k", 6))          # shared again: 6 in all


# -- the suppression list between two nodes ----------------------------------------------

def entry(address: str, since: float = 1000.0) -> Suppression:
    return Suppression(address, "invalid-recipient", since, since + 86400.0,
                       "550 5.1.1 no such user")


class Node:
    """One node: a queue on a memory spool, its sync, the changes relayed to its other
    workers."""

    def __init__(self, reactor: EPollReactor, redis: RedisServer, name: str,
                 position_path: str | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(2000.0)
        self.queue = Queue(MemorySpool(), self.clock)
        self.relayed: list[tuple[list[Suppression], list[str]]] = []
        address = parse_url(redis.url)
        self.sync = SuppressionSync(
            Connection(address, reactor, timeout=0.5, name=name),
            Connection(address, reactor, timeout=0.5, reply_timeout=1.0, name=name + " log"),
            reactor, node=name, position_path=position_path, block=0.2)
        self.sync.attach(self.queue, self.relay)
        self.sync.start()

    def relay(self, added: Any, removed: Any) -> defer.Deferred[None]:
        self.relayed.append((list(added), list(removed)))
        return defer.succeed(None)

    def listed(self, address: str) -> bool:
        return self.queue.suppression_entry(address) is not None


@pytest.fixture
def nodes(reactor: EPollReactor, redis: RedisServer) -> Iterator[Callable[..., Node]]:
    made: list[Node] = []

    def make(name: str, **kw: Any) -> Node:
        n = Node(reactor, redis, name, **kw)
        made.append(n)
        return n
    yield make
    for n in made:
        result(reactor, n.sync.stop())


def test_a_bounce_on_one_node_suppresses_on_the_other(reactor: EPollReactor,
                                                       nodes: Callable[..., Node]) -> None:
    from txmta import events
    a, b = nodes("a"), nodes("b")
    pump(reactor, lambda: a.sync.commands.up and b.sync.reader.up)
    a.queue.events.publish(events.SuppressionAdded(b"x" * 15, entry("gone@dest.test")))
    pump(reactor, lambda: b.listed("gone@dest.test"))
    got = b.queue.suppression_entry("gone@dest.test")
    assert got == entry("gone@dest.test")                  # its own times and reason
    assert b.queue.spool.suppressions["gone@dest.test"] == got   # in the spool too
    assert b.relayed == [([got], [])]                       # and to the other workers
    assert not a.relayed                                    # its own change is not re-applied


def test_admin_adds_and_removes_travel(reactor: EPollReactor, nodes: Callable[..., Node]) -> None:
    a, b = nodes("a"), nodes("b")
    pump(reactor, lambda: a.sync.commands.up and b.sync.reader.up)
    result(reactor, a.queue.suppress_add("x@dest.test", "manual"))
    pump(reactor, lambda: b.listed("x@dest.test"))
    result(reactor, b.queue.suppress_remove("x@dest.test"))
    pump(reactor, lambda: not a.listed("x@dest.test"))
    assert "x@dest.test" not in a.queue.spool.suppressions


def test_a_node_started_later_reads_the_whole_list(reactor: EPollReactor, redis: RedisServer,
                                                   nodes: Callable[..., Node]) -> None:
    a = nodes("a")
    pump(reactor, lambda: a.sync.commands.up)
    a.sync.local_changes([entry(f"u{i}@dest.test") for i in range(1200)], [])
    pump(reactor, lambda: redis.cli("HLEN", "txmta:suppression") == 1200)
    b = nodes("b")
    pump(reactor, lambda: all(b.listed(f"u{i}@dest.test") for i in range(1200)))


def test_changes_made_while_redis_is_down_go_out_when_it_is_back(
        reactor: EPollReactor, redis: RedisServer, nodes: Callable[..., Node]) -> None:
    a, b = nodes("a"), nodes("b")
    pump(reactor, lambda: a.sync.commands.up and b.sync.reader.up)
    result(reactor, a.queue.suppress_add("before@dest.test"))
    pump(reactor, lambda: b.listed("before@dest.test"))
    redis.stop()
    pump(reactor, lambda: not a.sync.commands.up and not b.sync.reader.up)
    result(reactor, a.queue.suppress_add("during@dest.test"))      # intake goes on locally
    assert a.listed("during@dest.test") and a.sync.pending
    redis.start()          # empty: both nodes give it their lists again
    pump(reactor, lambda: b.listed("during@dest.test"), timeout=20.0)
    pump(reactor, lambda: redis.cli("HEXISTS", "txmta:suppression", "before@dest.test") == 1)
    # node b may have put "before" back first (it republishes its list to an empty Redis):
    # a's own publication ends when Redis answers it
    pump(reactor, lambda: not a.sync.pending)


def test_the_log_position_survives_a_restart(reactor: EPollReactor, redis: RedisServer,
                                             nodes: Callable[..., Node], tmp_path: Path) -> None:
    pos = str(tmp_path / "position")
    a, b = nodes("a"), nodes("b", position_path=pos)
    pump(reactor, lambda: a.sync.commands.up and b.sync.reader.up)
    result(reactor, a.queue.suppress_add("one@dest.test"))
    pump(reactor, lambda: not a.sync.pending and b.listed("one@dest.test") and b.sync.position
         == redis.cli("XREVRANGE", "txmta:suppression:log", "+", "-", "COUNT", "1")[0][0])
    result(reactor, b.sync.stop())
    assert Path(pos).read_text().strip() == b.sync.position
    c = Node(reactor, redis, "b", position_path=pos)      # b again, with an empty mirror
    try:
        assert c.sync.position == b.sync.position
        result(reactor, a.queue.suppress_add("two@dest.test"))
        pump(reactor, lambda: c.listed("two@dest.test"))
        assert not c.listed("one@dest.test")     # read from its position, not from the start
    finally:
        result(reactor, c.sync.stop())


TLS_CLIENT = """
import sys
from twisted.internet import defer, task
from txmta.cluster.redis import Connection, parse_url

@defer.inlineCallbacks
def main(reactor, url, ca_file):
    c = Connection(parse_url(url), reactor, ca_file=ca_file)
    c.start()
    d = c.when_up()
    timeout = reactor.callLater(5, d.cancel)
    try:
        yield d
    except defer.CancelledError:
        print("not up")
        return
    timeout.cancel()
    print((yield c.call("SET", "k", "v")))
    info = yield c.call("CLIENT", "INFO")
    print("db=" + info.split(" db=")[1].split()[0])
    yield c.stop()

task.react(main, sys.argv[1:])
"""


def test_tls_password_and_database(tmp_path: Path) -> None:
    """rediss:// with a password and a database number: the server's certificate is checked
    against ca_file (and must name the host), AUTH and SELECT are sent before any command.
    (The client runs in a process of its own, on a running reactor: the TLS handshake does
    not complete on a reactor iterated by hand.)"""
    import datetime
    import ipaddress
    import os
    import subprocess

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from tlscerts import CA, Issued
    ca = CA()
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "redis")]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca.key, hashes.SHA256()))
    cert_file, key_file = Issued(cert, key).write(tmp_path, "redis")
    ca_file, other_ca = tmp_path / "ca.pem", tmp_path / "other-ca.pem"
    ca_file.write_bytes(ca.pem)
    other_ca.write_bytes(CA().pem)
    port = RedisServer().port
    server = RedisServer(workdir=tmp_path, extra=(
        "--tls-port", str(port), "--tls-cert-file", str(cert_file), "--tls-key-file",
        str(key_file), "--tls-auth-clients", "no", "--requirepass", "s3cret"))
    server.start()           # (its plain port answers the harness's PING)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).parents[1]) + os.pathsep + env.get("PYTHONPATH", "")

    def client(ca: Path) -> list[str]:
        out = subprocess.run([sys.executable, "-c", TLS_CLIENT,
                              f"rediss://:s3cret@127.0.0.1:{port}/5", str(ca)],
                             env=env, capture_output=True, text=True, timeout=30)
        return out.stdout.split()
    try:
        assert client(ca_file) == ["OK", "db=5"]
        assert server.cli("EXISTS", "k", password="s3cret") == 0     # not in db 0
        assert client(other_ca) == ["not", "up"]     # a certificate not from ca_file
    finally:
        server.stop()


def test_a_redis_error_falls_back_too(reactor: EPollReactor, redis: RedisServer) -> None:
    """A Redis that answers with an error (here: a key of the wrong type) is no budget to
    draw from: that call gets this process's share instead of failing delivery."""
    limiter = RedisRateLimiter(connect(reactor, redis), divisor=2)
    redis.cli("HSET", "txmta:rate:k", "x", "1")
    assert result(reactor, limiter.acquire("k", 4.0, 1, 50.0)) == 0.0
    assert result(reactor, limiter.acquire("k", 4.0, 1, 50.0)) == 0.5     # 2/s: its half
    assert limiter.fallback.active
