"""A small non-blocking DNS stub resolver: dnspython builds and parses, Twisted carries.

What it does: sends one question at a time to the configured recursive nameservers over
UDP (one socket per resolver, replies matched by id, question and source address), retries
over TCP when a reply is truncated (RFC 1035 4.2.2, RFC 7766), follows CNAMEs as the server
returned them, caches positive and negative answers by TTL (RFC 2308; negative TTL from the
SOA, capped at an hour, 60 s without one) on the injected reactor's clock, and shares one
network query among concurrent identical questions.  It asks with EDNS0 and DO, sets AD in
the query (RFC 6840 5.7), and reports the AD bit only when the nameserver is on loopback
(DESIGN "Protocols and DNS": a validating resolver on another host is reached over a path
nobody authenticated).

What it doesn't: recursion, DNSSEC validation, search lists, /etc/hosts, threads.  Nothing
here blocks the reactor (DESIGN invariant 5); the reactor and the nameservers are passed in
(invariant 9, STYLE habit 1).  Only `tap.py` decides which reactor.
"""
# test: tests/test_dns.py

from __future__ import annotations

import ipaddress
import secrets
import struct
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ClientFactory, DatagramProtocol, Protocol
from twisted.python.failure import Failure

from txmta.hostport import parse_host_port

RESOLV_CONF = "/etc/resolv.conf"
NEGATIVE_TTL_DEFAULT = 60.0    # no SOA in a negative answer
NEGATIVE_TTL_MAX = 3600.0      # RFC 2308 5 suggests 1-3 hours; Postfix-like caution
EDNS_PAYLOAD = 1232            # DNS flag day 2020: avoids IP fragmentation


class DNSError(Exception):
    """A lookup that produced no answer.  `temporary` says whether asking later may help:
    True for SERVFAIL, REFUSED, timeouts and network errors; False for NXDOMAIN."""

    def __init__(self, rcode: str, temporary: bool, name: str = "", rdtype: str = "",
                 detail: str = "") -> None:
        self.rcode = rcode
        self.temporary = temporary
        self.name = name
        self.rdtype = rdtype
        self.detail = detail
        text = f"{name}/{rdtype}: {rcode}" if name else rcode
        super().__init__(f"{text} ({detail})" if detail else text)


@dataclass(frozen=True)
class Answer:
    """A NOERROR answer; `records` empty means NODATA (the name exists, the type doesn't)."""

    name: str               # the name asked, lower-case, without the trailing dot
    rdtype: str             # "MX", "A", ...
    rcode: str              # "NOERROR"
    records: tuple[Any, ...]  # dnspython rdata of `rdtype`, at the end of any CNAME chain
    ttl: float              # seconds this answer may be cached
    authenticated: bool     # AD bit, and only from a loopback nameserver


def parse_nameserver(text: str) -> tuple[str, int]:
    """'192.0.2.1', '192.0.2.1:5353', '2001:db8::1', '[2001:db8::1]:5353' → (ip, port)."""
    try:
        hp = parse_host_port(text.strip(), 53, bare_ipv6=True)
        ipaddress.ip_address(hp.host.split("%", 1)[0])
    except ValueError as e:
        raise ValueError(f"bad nameserver {text!r}: {e}") from None
    return hp.host, hp.port


def system_nameservers(path: str = RESOLV_CONF) -> list[tuple[str, int]]:
    """The `nameserver` lines of resolv.conf; 127.0.0.1 when there are none."""
    found: list[tuple[str, int]] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                words = line.split()
                if len(words) >= 2 and words[0] == "nameserver":
                    try:
                        found.append((parse_nameserver(words[1])[0], 53))
                    except ValueError:
                        continue
    except OSError:
        pass
    return found or [("127.0.0.1", 53)]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _same_host(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a.split("%", 1)[0]) == ipaddress.ip_address(b.split("%", 1)[0])
    except ValueError:
        return a == b


class _UDP(DatagramProtocol):
    def __init__(self, received: Callable[[bytes, tuple[str, int]], None]) -> None:
        self.received = received

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received(datagram, (addr[0], addr[1]))


class _TCPQuery(Protocol):
    """One query over one TCP connection (RFC 1035 4.2.2: two-byte length prefix)."""

    def __init__(self, wire: bytes, done: Deferred[bytes]) -> None:
        self.wire = wire
        self.done = done
        self.buffer = b""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(struct.pack("!H", len(self.wire)) + self.wire)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= 2:
            (n,) = struct.unpack("!H", self.buffer[:2])
            if len(self.buffer) >= 2 + n:
                if not self.done.called:
                    self.done.callback(self.buffer[2:2 + n])
                assert self.transport is not None
                self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.done.called:
            self.done.errback(DNSError("NETWORK", True, detail="TCP connection closed early"))


class _TCPFactory(ClientFactory):
    def __init__(self, wire: bytes, done: Deferred[bytes]) -> None:
        self.wire = wire
        self.done = done

    def buildProtocol(self, addr: Any) -> Protocol:
        p = _TCPQuery(self.wire, self.done)
        p.factory = self
        return p

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.done.called:
            self.done.errback(DNSError("NETWORK", True, detail=reason.getErrorMessage()))


class Resolver:
    """Asks recursive nameservers; see the module docstring.  `close()` releases the socket."""

    def __init__(self, reactor: Any, nameservers: Sequence[tuple[str, int]] | None = None,
                 timeout: float = 3.0, tries: int = 2, edns: bool = True,
                 dnssec_ok: bool = True) -> None:
        self.reactor = reactor
        self.nameservers = list(nameservers) if nameservers else system_nameservers()
        self.timeout = timeout
        self.tries = max(1, tries)
        self.edns = edns
        self.dnssec_ok = dnssec_ok and edns
        # (name, rdtype) → (expiry, Answer or DNSError)
        self._cache: dict[tuple[str, str], tuple[float, Answer | DNSError]] = {}
        self._inflight: dict[tuple[str, str], list[Deferred[Answer]]] = {}
        # (query id, family) → (query, server, Deferred of the reply message)
        self._pending: dict[tuple[int, int], tuple[dns.message.Message, tuple[str, int],
                                                   Deferred[dns.message.Message]]] = {}
        self._ports: dict[int, Any] = {}   # address family (4/6) → listening UDP port

    # --- public API -------------------------------------------------------------------

    def query(self, name: str, rdtype: str) -> Deferred[Answer]:
        """NOERROR answers (NODATA has no records); errbacks `DNSError` otherwise."""
        key = (name.lower().rstrip("."), rdtype.upper())
        now = self.reactor.seconds()
        cached = self._cache.get(key)
        if cached is not None:
            expiry, value = cached
            if expiry > now:
                return fail(value) if isinstance(value, DNSError) else succeed(value)
            del self._cache[key]
        waiter: Deferred[Answer] = Deferred()
        waiters = self._inflight.get(key)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._inflight[key] = [waiter]
        d = self._resolve(key[0], key[1], 0, 0, None)
        d.addBoth(self._finished, key)
        return waiter

    def mx(self, domain: str) -> Deferred[list[tuple[int, str]]]:
        """[(preference, host)] as the server listed them; [] for NODATA; null MX → (0, "")."""
        def hosts(answer: Answer) -> list[tuple[int, str]]:
            out = []
            for rd in answer.records:
                host = "" if rd.exchange == dns.name.root else rd.exchange.to_text(True).lower()
                out.append((int(rd.preference), host))
            return out
        return self.query(domain, "MX").addCallback(hosts)

    def addresses(self, host: str) -> Deferred[list[str]]:
        """IPv6 then IPv4 addresses of `host`; [] when it has neither.  NXDOMAIN errbacks
        (temporary=False).  When one family fails temporarily and the other has addresses,
        those are returned; when it fails and the other has none, the failure errbacks."""
        both = DeferredList([self.query(host, "AAAA"), self.query(host, "A")],
                            consumeErrors=True)

        def combine(results: list[tuple[bool, Any]]) -> list[str]:
            out: list[str] = []
            errors: list[DNSError] = []
            for ok, value in results:
                if ok:
                    out.extend(rd.address for rd in value.records)
                elif isinstance(value.value, DNSError):
                    errors.append(value.value)
                else:
                    value.raiseException()
            permanent = [e for e in errors if not e.temporary]
            if permanent:
                raise permanent[0]
            if errors and not out:
                raise errors[0]
            return out
        return both.addCallback(combine)

    def close(self) -> None:
        """Stop listening; pending queries time out as usual."""
        for port in self._ports.values():
            port.stopListening()
        self._ports.clear()

    # --- one question -----------------------------------------------------------------

    def _finished(self, result: Answer | Failure, key: tuple[str, str]) -> None:
        waiters = self._inflight.pop(key, [])
        if isinstance(result, Failure):
            if isinstance(result.value, DNSError):
                error = result.value
                if not error.temporary:   # NXDOMAIN is cached (RFC 2308); trouble is not
                    ttl = getattr(error, "ttl", NEGATIVE_TTL_DEFAULT)
                    self._remember(key, ttl, error)
            for w in waiters:
                w.errback(result)
            return
        self._remember(key, result.ttl, result)
        for w in waiters:
            w.callback(result)

    def _remember(self, key: tuple[str, str], ttl: float, value: Answer | DNSError) -> None:
        if ttl > 0:
            self._cache[key] = (self.reactor.seconds() + ttl, value)

    def _resolve(self, name: str, rdtype: str, round_: int, index: int,
                 last: DNSError | None) -> Deferred[Answer]:
        """Try nameserver `index` of round `round_`; move on when it fails temporarily."""
        if round_ >= self.tries:
            return fail(last or DNSError("TIMEOUT", True, name, rdtype))
        server = self.nameservers[index]
        d = self._ask(name, rdtype, server)

        def next_server(f: Failure) -> Deferred[Answer]:
            f.trap(DNSError)
            error = f.value
            if not error.temporary:
                return fail(f)
            nxt, rnd = index + 1, round_
            if nxt >= len(self.nameservers):
                nxt, rnd = 0, round_ + 1
            return self._resolve(name, rdtype, rnd, nxt, error)
        return d.addErrback(next_server)

    def _make_query(self, name: str, rdtype: str) -> dns.message.Message:
        q = dns.message.make_query(
            dns.name.from_text(name), dns.rdatatype.from_text(rdtype),
            use_edns=0 if self.edns else False, want_dnssec=self.dnssec_ok,
            payload=EDNS_PAYLOAD, id=secrets.randbits(16))
        if self.edns:
            q.flags |= dns.flags.AD   # RFC 6840 5.7: tell me what you validated
        return q

    def _ask(self, name: str, rdtype: str, server: tuple[str, int]) -> Deferred[Answer]:
        q = self._make_query(name, rdtype)
        d = self._udp(q, server)

        def maybe_tcp(reply: dns.message.Message) -> Any:
            if reply.flags & dns.flags.TC:
                return self._tcp(q, server)
            return reply
        d.addCallback(maybe_tcp)
        d.addCallback(self._interpret, name, rdtype, server)
        return d

    def _interpret(self, reply: dns.message.Message, name: str, rdtype: str,
                   server: tuple[str, int]) -> Answer:
        rcode = reply.rcode()
        text = dns.rcode.to_text(rcode)
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            # SERVFAIL, REFUSED, FORMERR, NOTIMP...: this server can't help now
            raise DNSError(text, True, name, rdtype, f"from {server[0]}")
        try:
            chain = reply.resolve_chaining()
        except dns.exception.DNSException as e:
            raise DNSError("FORMERR", True, name, rdtype, f"{server[0]}: {e}") from None
        ttl = float(chain.minimum_ttl)
        if chain.answer is None:   # RFC 2308 5: the SOA says how long "no" lasts
            has_soa = any(rr.rdtype == dns.rdatatype.SOA for rr in reply.authority)
            ttl = min(ttl, NEGATIVE_TTL_MAX if has_soa else NEGATIVE_TTL_DEFAULT)
        if rcode == dns.rcode.NXDOMAIN:
            error = DNSError(text, False, name, rdtype)
            error.ttl = ttl   # type: ignore[attr-defined]
            raise error
        records = tuple(chain.answer) if chain.answer is not None else ()
        authenticated = bool(reply.flags & dns.flags.AD) and _is_loopback(server[0])
        return Answer(name, rdtype, text, records, ttl, authenticated)

    # --- transports -------------------------------------------------------------------

    def _port_for(self, host: str) -> Any:
        family = 6 if ":" in host else 4
        port = self._ports.get(family)
        if port is None:
            proto = _UDP(self._datagram)
            port = self.reactor.listenUDP(0, proto, interface="::" if family == 6 else "0.0.0.0")
            self._ports[family] = port
        return port, family

    def _udp(self, q: dns.message.Message, server: tuple[str, int]
             ) -> Deferred[dns.message.Message]:
        d: Deferred[dns.message.Message] = Deferred()
        try:
            port, family = self._port_for(server[0])
        except Exception as e:   # CannotListenError and friends: network trouble
            return fail(DNSError("NETWORK", True, detail=str(e)))
        while (q.id, family) in self._pending:   # another question uses this id right now
            q.id = secrets.randbits(16)
        key = (q.id, family)
        self._pending[key] = (q, server, d)
        timer = self.reactor.callLater(self.timeout, self._udp_timeout, key, d)
        d.addBoth(self._cancel_timer, timer)
        try:
            port.write(q.to_wire(), server)
        except Exception as e:
            self._pending.pop(key, None)
            d.errback(DNSError("NETWORK", True, detail=str(e)))
        return d

    def _udp_timeout(self, key: tuple[int, int], d: Deferred[dns.message.Message]) -> None:
        entry = self._pending.get(key)
        if entry is not None and entry[2] is d:
            del self._pending[key]
            q = entry[0]
            d.errback(DNSError("TIMEOUT", True, q.question[0].name.to_text(True).lower(),
                               dns.rdatatype.to_text(q.question[0].rdtype),
                               f"no reply from {entry[1][0]} in {self.timeout:g}s"))

    @staticmethod
    def _cancel_timer(result: Any, timer: IDelayedCall) -> Any:
        if timer.active():
            timer.cancel()
        return result

    def _datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            reply = dns.message.from_wire(data)
        except dns.message.Truncated as e:
            reply = e.message()
        except Exception:
            return   # garbage: ignore, the timer still runs
        family = 6 if ":" in addr[0] else 4
        entry = self._pending.get((reply.id, family))
        if entry is None:
            return
        q, server, d = entry
        # a spoofed or stale reply must come from the server we asked, to the question we asked
        if addr[1] != server[1] or not _same_host(addr[0], server[0]) or not q.is_response(reply):
            return
        del self._pending[(reply.id, family)]
        d.callback(reply)

    def _tcp(self, q: dns.message.Message, server: tuple[str, int]
             ) -> Deferred[dns.message.Message]:
        raw: Deferred[bytes] = Deferred()
        connector = self.reactor.connectTCP(server[0], server[1], _TCPFactory(q.to_wire(), raw),
                                            timeout=self.timeout)

        def too_slow() -> None:
            if not raw.called:
                raw.errback(DNSError("TIMEOUT", True, detail=f"no TCP reply from {server[0]}"))
                connector.disconnect()
        timer = self.reactor.callLater(self.timeout, too_slow)
        raw.addBoth(self._cancel_timer, timer)

        def parse(data: bytes) -> dns.message.Message:
            try:
                reply = dns.message.from_wire(data)
            except Exception as e:
                raise DNSError("FORMERR", True, detail=f"{server[0]}: {e}") from None
            if not q.is_response(reply):
                raise DNSError("FORMERR", True, detail=f"{server[0]}: reply to another question")
            return reply
        return raw.addCallback(parse)
