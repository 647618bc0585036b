"""A real authoritative-style DNS server for tests, on loopback, UDP and TCP on one port.

It answers from a zone given as a dict (or the same as JSON), built on dnspython messages
carried by Twisted UDP/TCP (twisted.names cannot set the AD bit).  Knobs make chosen names
misbehave: SERVFAIL, REFUSED, no reply at all (the client times out), the AD bit set, or a
truncated (TC) reply over UDP so the client must retry over TCP.  It is not a full server:
no wildcards, no delegations, no DNSSEC records; CNAMEs inside the zone are followed.

Zone format (names with or without the trailing dot, any case):

    {"example.test.": {"MX": [[10, "mx1.example.test."], [20, "mx2.example.test."]],
                       "A": ["127.0.0.21"], "AAAA": ["::1"], "TXT": ["v=spf1 -all"],
                       "TLSA": ["3 1 1 ab12..."], "CNAME": "other.test."},
     "_servfail": ["broken.test."], "_refused": [...], "_drop": [...], "_ad": [...],
     "_truncate": [...], "_ttl": 300, "_negative_ttl": 60}

Keys starting with "_" without a dot are knobs; "_dmarc.example.test." and
"s1._domainkey.example.test." are names.  A TXT value starting with '"' is taken as
zone-file text, so '"v=DKIM1; p=AB" "CD"' is one record of two strings; PTR records live
at their reverse names ("9.0.0.127.in-addr.arpa.").

Negative answers carry an SOA owned by the queried name's top-level label whose TTL and
minimum are `_negative_ttl`.

In a test process: `server = listen(reactor, zone)`; `server.host`, `server.port`,
`server.queries` (a list of (name, type, "udp"|"tcp")), `server.stop()`.
As a process: `python tests/dnsserver.py --listen 127.0.0.53:0 --zone zone.json` prints
`ready 127.0.0.53:PORT` on stdout once listening and serves until killed; `running(zone)`
is a context manager doing exactly that and yielding (host, port).
Traffic stays on 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import struct
import subprocess
import sys
import tempfile
from typing import Any, Iterator

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol

DEFAULT_HOST = "127.0.0.53"
KNOBS = ("_servfail", "_refused", "_drop", "_ad", "_truncate")


def _norm(name: str) -> str:
    name = name.strip().lower()
    return name if name.endswith(".") else name + "."


class Zone:
    """The records and the knobs; `respond(wire, tcp)` is the whole server logic."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.ttl = int(spec.get("_ttl", 300))
        self.negative_ttl = int(spec.get("_negative_ttl", 60))
        self.knobs = {k: {_norm(n) for n in spec.get(k, ())} for k in KNOBS}
        self.names: dict[str, dict[str, list[str]]] = {}
        for name, entry in spec.items():
            if name.startswith("_") and "." not in name:   # a knob; "_dmarc.x.test." is a name
                continue
            self.names[_norm(name)] = {t.upper(): self._texts(t.upper(), v)
                                       for t, v in entry.items()}

    @staticmethod
    def _texts(rdtype: str, values: Any) -> list[str]:
        if isinstance(values, str) or (rdtype == "MX" and values and isinstance(values[0], int)):
            values = [values]
        out = []
        for v in values:
            if rdtype == "MX" and not isinstance(v, str):
                v = f"{int(v[0])} {v[1]}"
            elif rdtype == "TXT" and not v.startswith('"'):
                v = '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
            out.append(v)
        return out

    def _exists(self, name: str) -> bool:
        return name in self.names or any(n.endswith("." + name) for n in self.names)

    def _rrset(self, name: str, rdtype: str) -> dns.rrset.RRset | None:
        texts = self.names.get(name, {}).get(rdtype)
        if not texts:
            return None
        return dns.rrset.from_text_list(name, self.ttl, "IN", rdtype, texts)

    def respond(self, wire: bytes, tcp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        if not query.question:
            return None
        question = query.question[0]
        qname = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        if qname in self.knobs["_drop"]:
            return None
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.RA
        reply.flags &= ~dns.flags.AD
        if qname in self.knobs["_servfail"]:
            reply.set_rcode(dns.rcode.SERVFAIL)
            return reply.to_wire()
        if qname in self.knobs["_refused"]:
            reply.set_rcode(dns.rcode.REFUSED)
            return reply.to_wire()
        if qname in self.knobs["_ad"]:
            reply.flags |= dns.flags.AD
        if not tcp and qname in self.knobs["_truncate"]:
            reply.flags |= dns.flags.TC
            return reply.to_wire()
        reply.flags |= dns.flags.AA
        name = qname
        for _ in range(8):   # follow CNAMEs inside the zone
            rrset = self._rrset(name, rdtype)
            if rrset is not None:
                reply.answer.append(rrset)
                break
            cname = self._rrset(name, "CNAME") if rdtype != "CNAME" else None
            if cname is None:
                break
            reply.answer.append(cname)
            name = cname[0].target.to_text().lower()
        if not reply.answer or reply.answer[-1].rdtype != question.rdtype:
            if not self._exists(name):
                reply.set_rcode(dns.rcode.NXDOMAIN)
            tld = dns.name.from_text(name).split(2)[1] if name != "." else dns.name.root
            soa = dns.rdata.from_text(
                "IN", "SOA", f"ns.{tld.to_text()} hostmaster.{tld.to_text()} 1 3600 600 "
                f"86400 {self.negative_ttl}".replace("..", "."))
            rr = dns.rrset.RRset(tld, dns.rdataclass.IN, dns.rdatatype.SOA)
            rr.add(soa, self.negative_ttl)
            reply.authority.append(rr)
        if tcp:
            return reply.to_wire()
        limit = max(512, query.payload if query.edns >= 0 else 512)
        try:
            return reply.to_wire(max_size=limit)
        except dns.exception.TooBig:
            reply.answer.clear()
            reply.authority.clear()
            reply.flags |= dns.flags.TC
            return reply.to_wire()


class _UDPServer(DatagramProtocol):
    def __init__(self, server: "DNSServer") -> None:
        self.server = server

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.server._log(data, "udp")
        out = self.server.zone.respond(data, tcp=False)
        if out is not None and self.transport is not None:
            self.transport.write(out, addr)


class _TCPServer(Protocol):
    def __init__(self, server: "DNSServer") -> None:
        self.server = server
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 2:
            (n,) = struct.unpack("!H", self.buffer[:2])
            if len(self.buffer) < 2 + n:
                return
            wire, self.buffer = self.buffer[2:2 + n], self.buffer[2 + n:]
            self.server._log(wire, "tcp")
            out = self.server.zone.respond(wire, tcp=True)
            if out is not None and self.transport is not None:
                self.transport.write(struct.pack("!H", len(out)) + out)


class DNSServer:
    def __init__(self, reactor: Any, zone: Zone, host: str, port: int) -> None:
        self.zone = zone
        self.host = host
        self.queries: list[tuple[str, str, str]] = []
        factory = Factory.forProtocol(lambda: _TCPServer(self))
        last: Exception | None = None
        for _ in range(50):   # port 0: find one free for both UDP and TCP
            udp = reactor.listenUDP(port, _UDPServer(self), interface=host)
            chosen = udp.getHost().port
            try:
                tcp = reactor.listenTCP(chosen, factory, interface=host)
            except Exception as e:
                last = e
                udp.stopListening()
                if port:
                    raise
                continue
            self.port, self._udp, self._tcp = chosen, udp, tcp
            return
        raise RuntimeError(f"no free port for UDP and TCP on {host}: {last}")

    def _log(self, wire: bytes, via: str) -> None:
        try:
            q = dns.message.from_wire(wire).question[0]
            self.queries.append((q.name.to_text(True).lower(),
                                 dns.rdatatype.to_text(q.rdtype), via))
        except Exception:
            pass

    def stop(self) -> Any:
        from twisted.internet.defer import gatherResults, maybeDeferred
        return gatherResults([maybeDeferred(self._udp.stopListening),
                              maybeDeferred(self._tcp.stopListening)])


def listen(reactor: Any, zone: dict[str, Any] | Zone, host: str = DEFAULT_HOST,
           port: int = 0) -> DNSServer:
    """Serve `zone` on host:port (0: a free port) with `reactor`; returns the server."""
    return DNSServer(reactor, zone if isinstance(zone, Zone) else Zone(zone), host, port)


@contextlib.contextmanager
def running(zone: dict[str, Any], host: str = DEFAULT_HOST,
            timeout: float = 10.0) -> Iterator[tuple[str, int]]:
    """Run the server as a separate process for the duration; yields (host, port)."""
    fd, path = tempfile.mkstemp(suffix=".json", prefix="dnszone")
    with os.fdopen(fd, "w") as f:
        json.dump(zone, f)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--listen", f"{host}:0",
                             "--zone", path], stdout=subprocess.PIPE, text=True)
    try:
        import select
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("ready "):
            raise RuntimeError(f"dnsserver did not start: {line!r}")
        h, _, p = line.split()[1].rpartition(":")
        yield h.strip("[]"), int(p)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.unlink(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default=f"{DEFAULT_HOST}:0", help="HOST:PORT (0: any port)")
    parser.add_argument("--zone", required=True, help="zone JSON file")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    host = host.strip("[]")
    with open(args.zone, encoding="utf-8") as f:
        spec = json.load(f)
    from twisted.internet import reactor
    server = listen(reactor, spec, host, int(port))
    shown = f"[{host}]" if ":" in host else host
    print(f"ready {shown}:{server.port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
