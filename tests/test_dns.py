"""The stub resolver: unit tests with a fake UDP transport and `Clock` (cache, sharing,
matching, AD trust, timeouts), then the same resolver against tests/dnsserver.py run as a
separate process on 127.0.0.53, over real UDP and TCP (MX, addresses, NODATA, NXDOMAIN,
SERVFAIL, timeout, TC → TCP, AD).  Traffic stays on 127.0.0.0/8."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from dnsserver import running
from txmta.outbound.dns import Answer, DNSError, Resolver, parse_nameserver, system_nameservers

# --- a fake reactor: Clock + a UDP port that records what is sent -------------------------


class FakePort:
    def __init__(self, proto: Any) -> None:
        self.proto = proto
        self.sent: list[tuple[dns.message.Message, tuple[str, int]]] = []
        self.listening = True

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((dns.message.from_wire(data), addr))

    def stopListening(self) -> None:
        self.listening = False


class FakeConnector:
    def __init__(self, factory: Any) -> None:
        self.factory = factory

    def disconnect(self) -> None:
        pass


class FakeReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakePort] = []
        self.tcp: list[tuple[str, int, Any]] = []

    def listenUDP(self, port: int, proto: Any, interface: str = "", maxPacketSize: int = 8192) -> FakePort:
        p = FakePort(proto)
        proto.makeConnection(p)
        self.ports.append(p)
        return p

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30,
                   bindAddress: Any = None) -> FakeConnector:
        self.tcp.append((host, port, factory))
        return FakeConnector(factory)


NS = ("127.0.0.53", 53)


def make_reply(query: dns.message.Message, *records: str, rcode: int = dns.rcode.NOERROR,
               soa: tuple[int, int] | None = None, flags: int = 0) -> dns.message.Message:
    """A reply to `query` with answer records in zone-file text ('name ttl IN A 1.2.3.4')."""
    r = dns.message.make_response(query)
    r.set_rcode(rcode)
    r.flags |= flags
    for text in records:
        name, ttl, cls, rdtype, *data = text.split()
        r.answer.append(dns.rrset.from_text(name, int(ttl), cls, rdtype, " ".join(data)))
    if soa is not None:
        ttl, minimum = soa
        r.authority.append(dns.rrset.from_text(
            "test.", ttl, "IN", "SOA", f"ns.test. h.test. 1 3600 600 86400 {minimum}"))
    return r


def deliver(reactor: FakeReactor, reply: dns.message.Message, addr: tuple[str, int] = NS) -> None:
    reactor.ports[0].proto.datagramReceived(reply.to_wire(), addr)


def result_of(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    return box[0]


def error_of(d: Deferred[Any]) -> DNSError:
    r = result_of(d)
    assert isinstance(r, Failure), r
    assert isinstance(r.value, DNSError)
    return r.value


@pytest.fixture
def fake() -> tuple[FakeReactor, Resolver]:
    reactor = FakeReactor()
    return reactor, Resolver(reactor, [NS], timeout=3.0, tries=2)


def test_query_asks_with_edns_do_and_ad(fake: tuple[FakeReactor, Resolver]) -> None:
    """Queries carry EDNS0 with DO (RFC 3225) and AD (RFC 6840 5.7) and go to the nameserver."""
    reactor, resolver = fake
    resolver.query("Example.Test.", "MX")
    (q, addr), = reactor.ports[0].sent
    assert addr == NS
    assert q.question[0].name.to_text() == "example.test."
    assert q.edns == 0 and q.ednsflags & dns.flags.DO and q.flags & dns.flags.AD


def test_positive_answer_is_cached_for_its_ttl(fake: tuple[FakeReactor, Resolver]) -> None:
    """RFC 1035 3.2.1: an answer is reused until the smallest TTL in it runs out."""
    reactor, resolver = fake
    d = resolver.query("example.test", "A")
    q, _ = reactor.ports[0].sent[0]
    deliver(reactor, make_reply(q, "example.test. 300 IN A 192.0.2.1",
                                "example.test. 100 IN A 192.0.2.2"))
    answer = result_of(d)
    assert isinstance(answer, Answer) and answer.ttl == 100
    assert sorted(rd.address for rd in answer.records) == ["192.0.2.1", "192.0.2.2"]
    reactor.advance(99)
    assert result_of(resolver.query("EXAMPLE.test.", "a")) is answer
    assert len(reactor.ports[0].sent) == 1
    reactor.advance(2)
    resolver.query("example.test", "A")
    assert len(reactor.ports[0].sent) == 2


def test_nxdomain_is_cached_by_soa_minimum(fake: tuple[FakeReactor, Resolver]) -> None:
    """RFC 2308 5: NXDOMAIN is cached for min(SOA TTL, SOA minimum), and is permanent."""
    reactor, resolver = fake
    d = resolver.query("nope.test", "MX")
    q, _ = reactor.ports[0].sent[0]
    deliver(reactor, make_reply(q, rcode=dns.rcode.NXDOMAIN, soa=(600, 120)))
    e = error_of(d)
    assert (e.rcode, e.temporary) == ("NXDOMAIN", False)
    reactor.advance(119)
    assert error_of(resolver.query("nope.test", "MX")).rcode == "NXDOMAIN"
    assert len(reactor.ports[0].sent) == 1
    reactor.advance(2)
    resolver.query("nope.test", "MX")
    assert len(reactor.ports[0].sent) == 2


def test_nodata_ttl_is_capped_at_an_hour_and_defaults_to_60s(fake: tuple[FakeReactor, Resolver]) -> None:
    """RFC 2308 5: NODATA is cached by the SOA (at most 1 h here); 60 s without an SOA."""
    reactor, resolver = fake
    d = resolver.query("big.test", "MX")
    deliver(reactor, make_reply(reactor.ports[0].sent[-1][0], soa=(86400, 86400)))
    answer = result_of(d)
    assert answer.records == () and answer.ttl == 3600
    d = resolver.query("nosoa.test", "MX")
    deliver(reactor, make_reply(reactor.ports[0].sent[-1][0]))
    assert result_of(d).ttl == 60


def test_servfail_is_temporary_and_not_cached(fake: tuple[FakeReactor, Resolver]) -> None:
    """SERVFAIL is trouble, not an answer: after every try it errbacks temporary, uncached."""
    reactor, resolver = fake
    d = resolver.query("broken.test", "MX")
    for _ in range(2):   # tries=2 rounds over one nameserver
        deliver(reactor, make_reply(reactor.ports[0].sent[-1][0], rcode=dns.rcode.SERVFAIL))
    e = error_of(d)
    assert (e.rcode, e.temporary) == ("SERVFAIL", True)
    assert len(reactor.ports[0].sent) == 2
    resolver.query("broken.test", "MX")
    assert len(reactor.ports[0].sent) == 3


def test_concurrent_identical_queries_share_one_network_query(fake: tuple[FakeReactor, Resolver]) -> None:
    """Two callers asking the same question at once cause one query on the wire."""
    reactor, resolver = fake
    d1, d2 = resolver.query("example.test", "MX"), resolver.mx("EXAMPLE.test.")
    assert len(reactor.ports[0].sent) == 1
    deliver(reactor, make_reply(reactor.ports[0].sent[0][0],
                                "example.test. 60 IN MX 10 MX1.Example.Test."))
    assert len(result_of(d1).records) == 1
    assert result_of(d2) == [(10, "mx1.example.test")]


def test_reply_from_wrong_address_id_or_question_is_ignored(fake: tuple[FakeReactor, Resolver]) -> None:
    """A spoofed or stale reply (other source, id or question) does not answer the query."""
    reactor, resolver = fake
    d = resolver.query("example.test", "A")
    q = reactor.ports[0].sent[0][0]
    good = make_reply(q, "example.test. 60 IN A 192.0.2.1")
    deliver(reactor, good, ("127.0.0.54", 53))
    deliver(reactor, good, ("127.0.0.53", 5353))
    other = dns.message.make_query("evil.test", "A", id=q.id)
    deliver(reactor, make_reply(other, "evil.test. 60 IN A 192.0.2.66"))
    wrong_id = make_reply(q, "example.test. 60 IN A 192.0.2.66")
    wrong_id.id = (q.id + 1) % 65536
    deliver(reactor, wrong_id)
    reactor.ports[0].proto.datagramReceived(b"\x00garbage", NS)
    assert not d.called
    deliver(reactor, good)
    assert [rd.address for rd in result_of(d).records] == ["192.0.2.1"]


def test_timeout_tries_every_nameserver_each_round() -> None:
    """No reply in `timeout`: the next nameserver, `tries` rounds, then TIMEOUT (temporary)."""
    reactor = FakeReactor()
    resolver = Resolver(reactor, [("127.0.0.53", 53), ("127.0.0.54", 53)], timeout=2.0, tries=2)
    d = resolver.query("slow.test", "A")
    for _ in range(4):
        reactor.advance(2.0)
    assert [addr[0] for _, addr in reactor.ports[0].sent] == ["127.0.0.53", "127.0.0.54"] * 2
    e = error_of(d)
    assert (e.rcode, e.temporary) == ("TIMEOUT", True)


def test_second_nameserver_answers_after_first_refuses() -> None:
    """REFUSED from one nameserver moves on to the next, whose answer counts."""
    reactor = FakeReactor()
    resolver = Resolver(reactor, [("127.0.0.53", 53), ("127.0.0.54", 53)])
    d = resolver.query("example.test", "A")
    deliver(reactor, make_reply(reactor.ports[0].sent[-1][0], rcode=dns.rcode.REFUSED))
    deliver(reactor, make_reply(reactor.ports[0].sent[-1][0], "example.test. 60 IN A 192.0.2.1"),
            ("127.0.0.54", 53))
    assert result_of(d).records[0].address == "192.0.2.1"


def test_ad_bit_trusted_only_from_loopback() -> None:
    """DESIGN: the AD bit counts only when the validating resolver is on loopback."""
    for server, expected in [(("127.0.0.53", 53), True), (("::1", 53), True),
                             (("192.0.2.53", 53), False)]:
        reactor = FakeReactor()
        resolver = Resolver(reactor, [server])
        d = resolver.query("secure.test", "TLSA")
        deliver(reactor, make_reply(reactor.ports[0].sent[0][0], flags=dns.flags.AD), server)
        assert result_of(d).authenticated is expected, server


def test_truncated_udp_reply_retries_over_tcp(fake: tuple[FakeReactor, Resolver]) -> None:
    """RFC 7766 / RFC 1035 4.2.2: TC set → the same question over TCP, length-prefixed."""
    reactor, resolver = fake
    d = resolver.query("big.test", "TXT")
    q = reactor.ports[0].sent[0][0]
    deliver(reactor, make_reply(q, flags=dns.flags.TC))
    (host, port, factory), = reactor.tcp
    assert (host, port) == NS
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    sent = transport.value()
    assert dns.message.from_wire(sent[2:]).question == q.question
    wire = make_reply(q, 'big.test. 60 IN TXT "hello"').to_wire()
    framed = len(wire).to_bytes(2, "big") + wire
    proto.dataReceived(framed[:5])
    assert not d.called
    proto.dataReceived(framed[5:])
    assert result_of(d).records[0].strings == (b"hello",)


def test_cname_chain_is_followed_and_ttl_is_the_minimum(fake: tuple[FakeReactor, Resolver]) -> None:
    """Records are those at the end of the CNAME chain; the TTL is the chain's minimum."""
    reactor, resolver = fake
    d = resolver.addresses("alias.test")
    for q, _ in list(reactor.ports[0].sent):
        t = dns.rdatatype.to_text(q.question[0].rdtype)
        recs = ["alias.test. 30 IN CNAME real.test."]
        recs.append("real.test. 300 IN A 192.0.2.5" if t == "A" else "real.test. 300 IN AAAA ::1")
        deliver(reactor, make_reply(q, *recs))
    assert result_of(d) == ["::1", "192.0.2.5"]
    reactor.advance(31)
    resolver.addresses("alias.test")
    assert len(reactor.ports[0].sent) == 4


def test_addresses_keeps_one_family_when_the_other_fails(fake: tuple[FakeReactor, Resolver]) -> None:
    """AAAA SERVFAIL and A answered: the IPv4 addresses are used; both failing errbacks."""
    reactor, resolver = fake
    d = resolver.addresses("half.test")
    for q, _ in list(reactor.ports[0].sent):
        if q.question[0].rdtype == dns.rdatatype.A:
            deliver(reactor, make_reply(q, "half.test. 60 IN A 192.0.2.7"))
        else:
            deliver(reactor, make_reply(q, rcode=dns.rcode.SERVFAIL))
            deliver(reactor, make_reply(reactor.ports[0].sent[-1][0], rcode=dns.rcode.SERVFAIL))
    assert result_of(d) == ["192.0.2.7"]


def test_close_stops_listening(fake: tuple[FakeReactor, Resolver]) -> None:
    """close() releases the resolver's UDP socket."""
    reactor, resolver = fake
    resolver.query("example.test", "A")
    resolver.close()
    assert not reactor.ports[0].listening


@pytest.mark.parametrize("text,expected", [
    ("192.0.2.1", ("192.0.2.1", 53)),
    ("192.0.2.1:5353", ("192.0.2.1", 5353)),
    ("2001:db8::1", ("2001:db8::1", 53)),
    ("[2001:db8::1]:5353", ("2001:db8::1", 5353)),
    ("[::1]", ("::1", 53)),
])
def test_parse_nameserver(text: str, expected: tuple[str, int]) -> None:
    """Nameservers are 'ip', 'ip:port' or '[v6]:port'."""
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize("text", ["ns.example", "192.0.2.1:x", "[::1", "192.0.2.1:0"])
def test_parse_nameserver_rejects_garbage(text: str) -> None:
    """Names, bad ports and unclosed brackets are configuration errors."""
    with pytest.raises(ValueError):
        parse_nameserver(text)


def test_system_nameservers_from_resolv_conf(tmp_path: Any) -> None:
    """No nameservers given → resolv.conf's, falling back to 127.0.0.1."""
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch example\nnameserver 127.0.0.9\nnameserver ::1\n")
    assert system_nameservers(str(conf)) == [("127.0.0.9", 53), ("::1", 53)]
    assert system_nameservers(str(tmp_path / "missing")) == [("127.0.0.1", 53)]


# --- against a real server process on loopback --------------------------------------------

ZONE = {
    "example.test.": {"MX": [[20, "mx2.example.test."], [10, "MX1.example.test."]],
                      "A": ["127.0.0.20"], "TXT": ["v=spf1 -all"]},
    "mx1.example.test.": {"A": ["127.0.0.21"], "AAAA": ["::1"]},
    "mx2.example.test.": {"A": ["127.0.0.22", "127.0.0.23"]},
    "nullmx.test.": {"MX": [[0, "."]]},
    "alias.test.": {"CNAME": "mx1.example.test."},
    "broken.test.": {"A": ["127.0.0.30"]},
    "slow.test.": {"A": ["127.0.0.31"]},
    "secure.test.": {"TLSA": ["3 1 1 " + "ab" * 32], "A": ["127.0.0.32"]},
    "big.test.": {"TXT": ["x" * 200, "y" * 200, "z" * 200], "A": ["127.0.0.33"]},
    "_servfail": ["broken.test."],
    "_drop": ["slow.test."],
    "_ad": ["secure.test."],
    "_truncate": ["big.test."],
}


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    with running(ZONE, host="127.0.0.53") as hostport:
        yield hostport


@pytest.fixture
def live(server: tuple[str, int]) -> Iterator[Callable[..., Any]]:
    """`live(call, **resolver_options)`: make a Resolver on the real reactor, run
    `call(resolver)` and spin the reactor until its Deferred fires (5 s at most)."""
    from twisted.internet import reactor
    made: list[Resolver] = []

    def run(call: Callable[[Resolver], Deferred[Any]], **options: Any) -> Any:
        options.setdefault("timeout", 1.0)
        resolver = Resolver(reactor, [server], **options)
        made.append(resolver)
        box: list[Any] = []
        call(resolver).addBoth(box.append)
        deadline = time.monotonic() + 5.0
        while not box and time.monotonic() < deadline:
            reactor.iterate(0.01)  # type: ignore[attr-defined]
        assert box, "no result within 5 s"
        return box[0]
    yield run
    for r in made:
        r.close()
    for _ in range(3):
        reactor.iterate(0)  # type: ignore[attr-defined]


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_live_mx_lower_case_without_trailing_dot(live: Callable[..., Any]) -> None:
    """mx() lists (preference, host) with host lower-case and without the trailing dot."""
    assert sorted(live(lambda r: r.mx("example.test"))) == [(10, "mx1.example.test"),
                                                            (20, "mx2.example.test")]


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_live_null_mx(live: Callable[..., Any]) -> None:
    """RFC 7505: a null MX comes back as (0, "")."""
    assert live(lambda r: r.mx("nullmx.test")) == [(0, "")]


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_live_addresses_ipv6_first(live: Callable[..., Any]) -> None:
    """addresses() gives AAAA then A results."""
    assert live(lambda r: r.addresses("mx1.example.test")) == ["::1", "127.0.0.21"]
    assert sorted(live(lambda r: r.addresses("mx2.example.test"))) == ["127.0.0.22", "127.0.0.23"]


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_live_nodata(live: Callable[..., Any]) -> None:
    """NODATA (the name exists, the type doesn't) is an empty answer, not an error."""
    assert live(lambda r: r.mx("mx1.example.test")) == []
    answer = live(lambda r: r.query("mx2.example.test", "AAAA"))
    assert answer.records == () and answer.rcode == "NOERROR" and answer.ttl == 60


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_live_nxdomain(live: Callable[..., Any]) -> None:
    """NXDOMAIN errbacks DNSError(temporary=False), for queries and addresses()."""
    for call in (lambda r: r.mx("nope.test"), lambda r: r.addresses("nope.test")):
        f = live(call)
        assert isinstance(f, Failure) and f.value.rcode == "NXDOMAIN" and not f.value.temporary


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_live_servfail(live: Callable[..., Any]) -> None:
    """SERVFAIL errbacks DNSError(temporary=True)."""
    f = live(lambda r: r.query("broken.test", "A"))
    assert f.value.rcode == "SERVFAIL" and f.value.temporary


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_live_timeout(live: Callable[..., Any]) -> None:
    """No reply: after tries × timeout, DNSError TIMEOUT (temporary)."""
    start = time.monotonic()
    f = live(lambda r: r.query("slow.test", "A"), timeout=0.2, tries=2)
    assert f.value.rcode == "TIMEOUT" and f.value.temporary
    assert 0.35 < time.monotonic() - start < 3.0


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_live_truncated_reply_retries_over_tcp(live: Callable[..., Any]) -> None:
    """A TC reply over UDP is retried over TCP and the full answer comes back."""
    answer = live(lambda r: r.query("big.test", "TXT"))
    assert sorted(b"".join(rd.strings)[:1] for rd in answer.records) == [b"x", b"y", b"z"]


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_live_ad_bit_from_loopback(live: Callable[..., Any]) -> None:
    """The AD bit from a loopback nameserver is reported; absent AD is False."""
    assert live(lambda r: r.query("secure.test", "TLSA")).authenticated is True
    assert live(lambda r: r.query("mx2.example.test", "A")).authenticated is False


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_live_cname_followed(live: Callable[..., Any]) -> None:
    """A CNAME is followed as the server returned it."""
    assert live(lambda r: r.addresses("alias.test")) == ["::1", "127.0.0.21"]


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_live_no_edns(live: Callable[..., Any]) -> None:
    """edns=False asks a plain RFC 1035 question and still gets the answer."""
    assert sorted(live(lambda r: r.mx("example.test"), edns=False))[0] == (10, "mx1.example.test")


@pytest.mark.integration  # real sockets on loopback (STYLE habit 8 exception, by design)
def test_live_router_over_the_resolver(live: Callable[..., Any]) -> None:
    """The Router and the real Resolver together: MX order, IPv6 first, null MX bounces."""
    from txmta.outbound.route import Route, Router, Unroutable
    route = live(lambda r: Router(r, port=2525).route("Example.Test"))
    assert isinstance(route, Route)
    assert [(h.mx, h.address, h.port) for h in route.hops[:2]] == [
        ("mx1.example.test", "::1", 2525), ("mx1.example.test", "127.0.0.21", 2525)]
    assert {h.address for h in route.hops[2:]} == {"127.0.0.22", "127.0.0.23"}
    unroutable = live(lambda r: Router(r).route("nullmx.test"))
    assert isinstance(unroutable, Unroutable) and unroutable.reply.code == 556
    deferred = live(lambda r: Router(r).route("broken.test"))
    assert isinstance(deferred, Unroutable) and deferred.reply.code == 451
