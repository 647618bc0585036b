"""Outbound TLS policy: which TLS each MX host (or the relayhost) gets, decided before connecting,
and the check of the peer's certificate once the handshake is done.

Levels (man txmta.toml(5), TLS LEVELS): "none"; "may" (STARTTLS when offered, plaintext
otherwise, and after a failed handshake the host is tried in plaintext and remembered as such
for `MAY_PLAINTEXT_TTL`); "encrypt" (TLS required, nothing verified); "verify" (TLS required,
the chain checked against `[tls] ca_file` or the system CA store, the MX name matched with
service-identity); "dane" (RFC 7672: DANE-EE(3) and DANE-TA(2) TLSA records, full certificate
or SPKI, exact/SHA-256/SHA-512, looked up at `_<port>._tcp.<MX host>` only when both the MX
and the TLSA answers carry the AD bit of a validating resolver on loopback; a host without
them is "may"; a TLSA lookup that fails, or a TLSA RRset of which no record is usable, makes
the host unusable until later); "mta-sts" (RFC 8461: `_mta-sts` TXT, the policy fetched over
HTTPS and cached for its max_age in the spool; "enforce" skips MX hosts the policy does not
list and requires a verified certificate, "testing" checks and logs but delivers anyway).
"auto" (the default of `[delivery] tls_level`) is DANE when some MX host has validated TLSA
records, else MTA-STS when the domain publishes a policy, else "may".

`TLSPolicy.plan(route)` gives, per MX host, a `HostTLS` (hashable: it goes into the pool key,
so connections checked against different requirements never mix) or a 4xx `Reply` saying why
the host must not be used now.  `TLSPolicy.client_settings()` turns a `HostTLS` into the
client's level and TLS options; `VerifiedTLS.verify_peer()` judges the peer after the
handshake with `check_peer()`, which is pure.  Remote behaviour never raises here: lookups and
fetches that fail are values (DESIGN invariant 4).

What it doesn't: speak SMTP (client.py), route (route.py), or know the spool: the MTA-STS
cache gets any object with `cache_get(key)` / `cache_put(key, value)` (tap.py passes the
spool).  Time and DNS are injected (invariant 9).
"""
# test: tests/test_tlspolicy.py, tests/integration/test_tls_policy.py

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import re
import ssl as stdlib_ssl
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Sequence

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification as xv
from OpenSSL import SSL
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.interfaces import (IOpenSSLClientConnectionCreator, IReactorTime,
                                         IStreamClientEndpoint)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from txmta.outbound.client import ClientSettings, PeerCheck, SessionFailureError
from txmta.outbound.dns import DNSError
from txmta.reply import Reply

log = Logger()

LEVELS = ("none", "may", "encrypt", "verify", "dane", "mta-sts")
MAY_PLAINTEXT_TTL = 3600.0       # a host whose handshake failed at "may" gets plaintext this long
STS_MAX_AGE = 31557600           # RFC 8461 3.2: at most a year
STS_FETCH_TIMEOUT = 30.0         # seconds for the whole HTTPS fetch (RFC 8461 3.3: "a minute")
STS_MAX_SIZE = 64 * 1024         # RFC 8461 3.3: "64 kilobytes"
STS_FAILURE_TTL = 300.0          # a failed fetch is not tried again for this long
STS_MEMORY = 10000               # policies kept in memory (the spool keeps all)
CACHE_PREFIX = "mta-sts:"        # keys of the spool cache


# -- what a host gets -----------------------------------------------------------------------

@dataclass(frozen=True)
class TLSARecord:
    """One TLSA record (RFC 6698 2.1): usage, selector, matching type, association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """RFC 7672 3.1: SMTP uses DANE-TA(2) and DANE-EE(3) only; selectors Cert(0) and
        SPKI(1); matching types Full(0), SHA2-256(1), SHA2-512(2) with the right length."""
        if self.usage not in (2, 3) or self.selector not in (0, 1):
            return False
        return {0: len(self.data) > 0, 1: len(self.data) == 32,
                2: len(self.data) == 64}.get(self.mtype, False)

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


@dataclass(frozen=True)
class HostTLS:
    """The TLS requirement of one MX host (or the relayhost): what goes into the pool key."""

    level: str                       # one of LEVELS
    name: str = ""                   # the name the certificate must match (MX host, relayhost)
    tlsa: tuple[TLSARecord, ...] = ()   # level "dane": the usable records
    sts_mode: str = ""               # level "mta-sts": "enforce" or "testing"

    @property
    def label(self) -> str:
        return f"mta-sts {self.sts_mode}" if self.level == "mta-sts" else self.level

    @property
    def client_level(self) -> str:
        """What the SMTP client does: none | may | encrypt | verify."""
        if self.level in ("none", "may", "encrypt"):
            return self.level
        if self.level == "mta-sts" and self.sts_mode != "enforce":
            return "may"            # testing: deliver whatever happens, but check and log
        return "verify"

    def __str__(self) -> str:
        return self.label


def opportunistic(planned: "HostTLS | Reply", mx: str) -> HostTLS:
    """A message with "TLS-Required: No" (RFC 8689 5): the recipient domain's policy (DANE,
    MTA-STS, a configured checked level, or a host it rules out) gives way to opportunistic
    TLS, so that the message is delivered even where the policy would hold it; a configured
    "none" stays none."""
    if isinstance(planned, HostTLS) and planned.level in ("none", "may"):
        return planned
    return HostTLS("may", mx)


# -- checking the peer (pure) --------------------------------------------------------------------

def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def tlsa_matches(record: TLSARecord, cert: x509.Certificate) -> bool:
    """Does `cert` match the record's selector and matching type (RFC 6698 2.1.2-2.1.3)?"""
    if record.selector == 0:
        content = cert.public_bytes(serialization.Encoding.DER)
    elif record.selector == 1:
        content = _spki(cert)
    else:
        return False
    if record.mtype == 0:
        return content == record.data
    if record.mtype == 1:
        return hashlib.sha256(content).digest() == record.data
    if record.mtype == 2:
        return hashlib.sha512(content).digest() == record.data
    return False


def _name_matches(cert: x509.Certificate, name: str) -> str:
    """"" when `cert` is valid for `name` (RFC 6125, with service-identity), else why not."""
    from service_identity import CertificateError, VerificationError
    from service_identity.cryptography import (verify_certificate_hostname,
                                               verify_certificate_ip_address)
    try:
        if _is_ip(name):
            verify_certificate_ip_address(cert, name)
        else:
            verify_certificate_hostname(cert, name)
    except VerificationError:
        return f"certificate does not match {name}"
    except CertificateError as e:
        return f"certificate does not match {name} ({_short(e)})"
    return ""


def _chain_error(chain: Sequence[x509.Certificate], name: str, anchors: Sequence[x509.Certificate],
                 now: datetime.datetime) -> str:
    """"" when chain[0] chains up to one of `anchors` (through chain[1:]), else why not."""
    if not anchors:
        return "no trusted CA certificates"
    if len(chain) == 1 and chain[0].issuer == chain[0].subject and chain[0] not in anchors:
        return "certificate not trusted: self-signed"
    subject: Any = xv.IPAddress(ipaddress.ip_address(name)) if _is_ip(name) else xv.DNSName(name)
    try:
        verifier = (xv.PolicyBuilder().store(xv.Store(list(anchors))).time(now)
                    .build_server_verifier(subject))
        verifier.verify(chain[0], list(chain[1:]))
    except (xv.VerificationError, ValueError) as e:
        return f"certificate not trusted: {_short(e)}"
    return ""


def check_peer(host: HostTLS, chain: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate],
               now: datetime.datetime) -> PeerCheck:
    """Judge a peer's certificate chain (leaf first) against the host's requirement."""
    if host.client_level not in ("verify",) and host.level != "mta-sts":
        return PeerCheck(True, "unverified")
    if not chain:
        return _verdict(host, False, "no certificate from the server")
    if host.level == "dane":
        return _check_dane(host, chain, now)
    why = _name_matches(chain[0], host.name) or _chain_error(chain, host.name, anchors, now)
    return _verdict(host, not why, why)


def _verdict(host: HostTLS, ok: bool, why: str) -> PeerCheck:
    if host.level == "mta-sts":
        if host.sts_mode == "enforce":
            return PeerCheck(ok, "sts-enforce" if ok else "unverified", why, authenticated=ok)
        # testing (RFC 8461 5): report, deliver anyway
        return PeerCheck(True, "sts-testing" if ok else "sts-testing unverified",
                         f"MTA-STS testing: {why}" if why else "")
    if host.level == "dane":
        return PeerCheck(ok, "dane-fail" if not ok else "dane", why, authenticated=ok)
    return PeerCheck(ok, "verified" if ok else "unverified", why, authenticated=ok)


def _check_dane(host: HostTLS, chain: Sequence[x509.Certificate],
                now: datetime.datetime) -> PeerCheck:
    """RFC 7672 3.1: DANE-EE matches the leaf and nothing else is checked (no name, no
    expiry); DANE-TA matches a certificate the server sent above the leaf, which then is the
    trust anchor of an ordinary chain check with the MX name (RFC 7672 3.2.2)."""
    leaf = chain[0]
    for r in host.tlsa:
        if r.usage == 3 and tlsa_matches(r, leaf):
            return PeerCheck(True, "dane-ee", authenticated=True)
    why = f"no TLSA record of {host.name} matches the certificate chain"
    for r in host.tlsa:
        if r.usage != 2:
            continue
        for i, cert in enumerate(chain[1:], 1):
            if tlsa_matches(r, cert):
                err = _name_matches(leaf, host.name) or _chain_error(chain[:i], host.name,
                                                                    [cert], now)
                if not err:
                    return PeerCheck(True, "dane-ta", authenticated=True)
                why = f"DANE-TA: {err}"
    return PeerCheck(False, "dane-fail", why)


def _short(e: BaseException) -> str:
    text = str(e).split(" (encountered processing", 1)[0].strip()
    return text[:200] or type(e).__name__


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


# -- trust: CA certificates and the OpenSSL context ------------------------------------------------

def _pem_certs(data: bytes) -> list[x509.Certificate]:
    out = []
    for block in re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", data,
                            re.S):
        try:
            with warnings.catch_warnings():
                # a few roots in system bundles have a non-positive serial number: cryptography
                # warns (RFC 5280) on every start, about certificates the operator cannot change
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                out.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            continue   # one odd certificate in a system bundle is not a reason to stop
    return out


def system_ca_file() -> str:
    paths = stdlib_ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate:
            try:
                with open(candidate, "rb"):
                    return candidate
            except OSError:
                continue
    return ""


class Trust:
    """The CA certificates outbound TLS trusts (`[tls] ca_file`, else the system store) and
    the shared OpenSSL client context of the checked levels.  Built once, at start: reading a
    CA bundle is file I/O the reactor must not do per connection."""

    def __init__(self, ca_file: str | None = None) -> None:
        self.ca_file = ca_file or system_ca_file()
        data = b""
        if self.ca_file:
            with open(self.ca_file, "rb") as f:
                data = f.read()
        self.anchors: tuple[x509.Certificate, ...] = tuple(_pem_certs(data))
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)   # RFC 8461 4.2, and what "verify" means today
        ctx.set_options(SSL.OP_NO_COMPRESSION)
        # OpenSSL verifies nothing: check_peer() judges the chain after the handshake, so the
        # mail log can show which TLS was negotiated with a peer we then refused.
        ctx.set_verify(SSL.VERIFY_NONE)
        self.context = ctx

    def web_trust_root(self) -> Any:
        """For the MTA-STS HTTPS fetch (Twisted's own verification)."""
        from twisted.internet import ssl
        if not self.anchors:
            return ssl.platformTrust()
        return ssl.trustRootFromCertificates([
            ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
            for c in self.anchors])


@implementer(IOpenSSLClientConnectionCreator)
class VerifiedTLS:
    """TLS options for the checked levels: SNI, the shared context, and `verify_peer()`."""

    def __init__(self, trust: Trust, host: HostTLS, clock: IReactorTime) -> None:
        self.trust = trust
        self.host = host
        self.clock = clock

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.trust.context, None)
        connection.set_app_data(tlsProtocol)
        if self.host.name and not _is_ip(self.host.name):
            try:
                connection.set_tlsext_host_name(self.host.name.encode("idna"))
            except UnicodeError:
                pass
        connection.set_connect_state()
        return connection

    def verify_peer(self, connection: Any) -> PeerCheck:
        try:
            chain = connection.get_peer_cert_chain(as_cryptography=True) or []
        except Exception:
            chain = []
        now = datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.timezone.utc)
        return check_peer(self.host, chain, self.trust.anchors, now)


# -- MTA-STS: the TXT record, the policy, the MX patterns (pure) -----------------------------------

_STS_ID = re.compile(r"[A-Za-z0-9]{1,32}\Z")
_STS_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
_STS_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+\Z")
_POLICY_KEY = re.compile(r"[A-Za-z0-9_-]{1,32}\Z")
_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\Z")


def parse_sts_txt(records: Iterable[str]) -> str | None:
    """The policy id of the domain's `_mta-sts` TXT RRset, or None when there is no valid
    record (RFC 8461 3.1: exactly one record starting with "v=STSv1", with an id)."""
    candidates = [r for r in records if r.startswith("v=STSv1")]
    if len(candidates) != 1:
        return None
    fields = [f.strip(" \t") for f in candidates[0].split(";")]
    if fields and fields[-1] == "":
        fields.pop()
    if not fields or fields[0] != "v=STSv1":
        return None
    sts_id = None
    for field in fields[1:]:
        name, eq, value = field.partition("=")
        if not eq:
            return None
        if name == "id":
            if not _STS_ID.match(value) or sts_id is not None:
                return None
            sts_id = value
        elif not _STS_EXT_NAME.match(name) or not _STS_EXT_VALUE.match(value):
            return None
    return sts_id


class STSPolicyError(ValueError):
    pass


@dataclass(frozen=True)
class STSPolicy:
    mode: str                        # enforce | testing | none
    mx: tuple[str, ...]              # patterns, lower case: "mail.example.com", "*.example.net"
    max_age: int                     # seconds

    def allows(self, host: str) -> bool:
        return any(mx_matches(p, host) for p in self.mx)


def parse_sts_policy(text: str) -> STSPolicy:
    """RFC 8461 3.2: "key: value" lines (LF or CRLF); version STSv1, mode, max_age, one or
    more mx (not needed with mode none); unknown keys ignored; a repeated key other than mx:
    the first counts.  Raises STSPolicyError."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.split("\n"):
        line = line[:-1] if line.endswith("\r") else line
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon or not _POLICY_KEY.match(key):
            raise STSPolicyError(f"bad policy line {line[:60]!r}")
        value = value.strip(" \t")
        if key == "mx":
            pattern = value.lower().rstrip(".")
            host = pattern[2:] if pattern.startswith("*.") else pattern
            if not _HOSTNAME.match(host) or "." not in host and pattern.startswith("*."):
                raise STSPolicyError(f"bad mx pattern {value[:60]!r}")
            mx.append(pattern)
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise STSPolicyError("version is not STSv1")
    mode = fields.get("mode", "")
    if mode not in ("enforce", "testing", "none"):
        raise STSPolicyError(f"bad mode {mode[:20]!r}")
    age = fields.get("max_age", "")
    if not re.fullmatch(r"[0-9]{1,10}", age) or int(age) > STS_MAX_AGE:
        raise STSPolicyError(f"bad max_age {age[:20]!r}")
    if mode != "none" and not mx:
        raise STSPolicyError("no mx")
    return STSPolicy(mode, tuple(mx), int(age))


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: an exact name, or "*." and one more label on the left of the rest."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern


@dataclass(frozen=True)
class CachedPolicy:
    policy: STSPolicy
    id: str                          # of the TXT record it was fetched for
    expires: float                   # fetched + max_age

    def encode(self) -> bytes:
        return json.dumps({"v": 1, "mode": self.policy.mode, "mx": list(self.policy.mx),
                           "max_age": self.policy.max_age, "id": self.id,
                           "expires": self.expires}).encode()

    @classmethod
    def decode(cls, data: bytes) -> "CachedPolicy | None":
        try:
            d = json.loads(data)
            return cls(STSPolicy(str(d["mode"]), tuple(str(m) for m in d["mx"]),
                                 int(d["max_age"])), str(d["id"]), float(d["expires"]))
        except (ValueError, KeyError, TypeError):
            return None


# -- MTA-STS: cache, fetch, resolve ----------------------------------------------------------------

class STSCache:
    """Policies by domain: in memory (the most recent STS_MEMORY) over a persistent `store`
    (the spool's cache database: `cache_get(key)` / `cache_put(key, value)`), so policies
    survive restarts as RFC 8461 3.3 wants.  Expired entries are not returned."""

    def __init__(self, clock: IReactorTime, store: Any = None, size: int = STS_MEMORY) -> None:
        self.clock = clock
        self.store = store
        self.size = size
        self._memory: OrderedDict[str, CachedPolicy] = OrderedDict()

    async def get(self, domain: str) -> CachedPolicy | None:
        cached = self._memory.get(domain)
        if cached is None and self.store is not None:
            try:
                raw = await self.store.cache_get(CACHE_PREFIX + domain)
            except Exception as e:   # our own disk trouble: go on without the cache
                log.warn("reading the MTA-STS cache for {domain}: {e}", domain=domain, e=e)
                raw = None
            cached = CachedPolicy.decode(raw) if raw is not None else None
            if cached is not None:
                self._remember(domain, cached)
        if cached is None or cached.expires <= self.clock.seconds():
            return None
        return cached

    async def put(self, domain: str, cached: CachedPolicy) -> None:
        self._remember(domain, cached)
        if self.store is not None:
            try:
                await self.store.cache_put(CACHE_PREFIX + domain, cached.encode())
            except Exception as e:
                log.warn("writing the MTA-STS cache for {domain}: {e}", domain=domain, e=e)

    def _remember(self, domain: str, cached: CachedPolicy) -> None:
        self._memory[domain] = cached
        self._memory.move_to_end(domain)
        while len(self._memory) > self.size:
            self._memory.popitem(last=False)


class STSFetchError(Exception):
    pass


class _BodyReader(Protocol):
    def __init__(self, limit: int, done: Deferred[bytes]) -> None:
        self.limit = limit
        self.done = done
        self.data: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            if not self.done.called:
                self.done.errback(STSFetchError(f"policy larger than {self.limit} octets"))
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        self.data.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if self.done.called:
            return
        from twisted.web.client import ResponseDone
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.data))
        else:
            self.done.errback(STSFetchError(f"policy body: {reason.getErrorMessage()}"))


@implementer(IStreamClientEndpoint)
class _Endpoint:
    """Connects to `host`:`port` with TLS, resolving `host` through our own resolver."""

    def __init__(self, fetcher: "STSFetcher", host: str, port: int) -> None:
        self.fetcher = fetcher
        self.host = host
        self.port = port

    def connect(self, factory: Any) -> Deferred[Any]:
        return ensureDeferred(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        from twisted.internet import ssl
        from twisted.internet.endpoints import (TCP4ClientEndpoint, TCP6ClientEndpoint,
                                                wrapClientTLS)
        f = self.fetcher
        try:
            addresses = await f.resolver.addresses(self.host)
        except DNSError as e:
            raise STSFetchError(f"cannot resolve {self.host}: {e}") from None
        if not addresses:
            raise STSFetchError(f"{self.host} has no address")
        options = ssl.optionsForClientTLS(self.host, trustRoot=f.trust_root)
        last: Exception | None = None
        for address in addresses:
            cls = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            endpoint = wrapClientTLS(options, cls(f.reactor, address, self.port,
                                                  timeout=f.timeout))
            try:
                return await endpoint.connect(factory)
            except Exception as e:
                last = e
        raise STSFetchError(f"cannot connect to {self.host}:{self.port}: {last}")


@implementer(IAgentEndpointFactory)
class STSFetcher:
    """GETs https://mta-sts.<domain>/.well-known/mta-sts.txt (RFC 8461 3.3): the name resolved
    by our resolver, the certificate verified (`trust_root`), no redirects, 200 and text/plain
    only, at most `max_size` octets within `timeout` seconds.  `port` is 443; tests change it."""

    def __init__(self, reactor: Any, resolver: Any, trust_root: Any, *, port: int = 443,
                 timeout: float = STS_FETCH_TIMEOUT, max_size: int = STS_MAX_SIZE) -> None:
        self.reactor = reactor
        self.resolver = resolver
        self.trust_root = trust_root
        self.port = port
        self.timeout = timeout
        self.max_size = max_size

    def endpointForURI(self, uri: Any) -> _Endpoint:
        return _Endpoint(self, uri.host.decode("ascii"), uri.port)

    def fetch(self, domain: str) -> Deferred[STSPolicy]:
        """The policy; errbacks STSFetchError (or STSPolicyError) with the reason."""
        d = ensureDeferred(self._fetch(domain))
        d.addTimeout(self.timeout, self.reactor,
                     onTimeoutCancel=lambda *_: Failure(STSFetchError(
                         f"no policy from mta-sts.{domain} within {self.timeout:g}s")))
        return d

    async def _fetch(self, domain: str) -> STSPolicy:
        from twisted.web.client import Agent, HTTPConnectionPool
        from twisted.web.http_headers import Headers
        agent = Agent.usingEndpointFactory(self.reactor, self,
                                           pool=HTTPConnectionPool(self.reactor, persistent=False))
        port = "" if self.port == 443 else f":{self.port}"
        url = f"https://mta-sts.{domain}{port}/.well-known/mta-sts.txt".encode("ascii")
        try:
            response = await agent.request(b"GET", url, Headers({b"User-Agent": [b"txmta"]}))
        except STSFetchError:
            raise
        except Exception as e:
            raise STSFetchError(f"fetching {url.decode()}: {_failure_text(e)}") from None
        if response.code != 200:
            response.deliverBody(_Discard())
            raise STSFetchError(f"{url.decode()}: HTTP {response.code}")
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if ctype.split(b";")[0].strip().lower() != b"text/plain":
            response.deliverBody(_Discard())
            raise STSFetchError(f"{url.decode()}: content type {ctype.decode('latin-1')!r}, "
                                "not text/plain")
        if response.length is not None and isinstance(response.length, int) \
                and response.length > self.max_size:
            response.deliverBody(_Discard())
            raise STSFetchError(f"policy larger than {self.max_size} octets")
        done: Deferred[bytes] = Deferred()
        response.deliverBody(_BodyReader(self.max_size, done))
        body = await done
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise STSPolicyError("policy is not UTF-8") from None
        return parse_sts_policy(text)


class _Discard(Protocol):
    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        pass


def _failure_text(e: BaseException) -> str:
    reasons = getattr(e, "reasons", None)   # twisted.web's ResponseNeverReceived and friends
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return str(e) or type(e).__name__


class STSResolver:
    """The MTA-STS policy that applies to a domain now (RFC 8461 3.3, 5.1): the cached one
    while its TXT id is unchanged; a new fetch when the id changed; the cached one (until it
    expires) when the TXT record is gone or the fetch fails; None when there is neither."""

    def __init__(self, clock: IReactorTime, resolver: Any, fetcher: STSFetcher | None,
                 cache: STSCache, failure_ttl: float = STS_FAILURE_TTL) -> None:
        self.clock = clock
        self.resolver = resolver
        self.fetcher = fetcher
        self.cache = cache
        self.failure_ttl = failure_ttl
        self._failed: dict[tuple[str, str], float] = {}     # (domain, id) → retry after
        self._inflight: dict[str, list[Deferred[CachedPolicy | None]]] = {}

    def policy(self, domain: str) -> Deferred[CachedPolicy | None]:
        waiters = self._inflight.get(domain)
        d: Deferred[CachedPolicy | None] = Deferred()
        if waiters is not None:
            waiters.append(d)
            return d
        self._inflight[domain] = [d]

        def done(result: Any) -> None:
            if isinstance(result, Failure):
                log.failure("MTA-STS for {domain}", result, domain=domain)
                result = None
            for w in self._inflight.pop(domain, []):
                w.callback(result)
        ensureDeferred(self._policy(domain)).addBoth(done)
        return d

    async def _policy(self, domain: str) -> CachedPolicy | None:
        cached = await self.cache.get(domain)
        try:
            answer = await self.resolver.query(f"_mta-sts.{domain}", "TXT")
            texts = [b"".join(rd.strings).decode("ascii", "replace") for rd in answer.records]
        except DNSError:
            texts = []          # NXDOMAIN, or DNS trouble: what we have cached still holds
        sts_id = parse_sts_txt(texts)
        if sts_id is None or self.fetcher is None:
            return cached
        if cached is not None and cached.id == sts_id:
            return cached
        now = self.clock.seconds()
        if self._failed.get((domain, sts_id), 0.0) > now:
            return cached
        try:
            policy = await self.fetcher.fetch(domain)
        except (STSFetchError, STSPolicyError) as e:
            log.info("MTA-STS policy of {domain} (id {id}) not fetched: {e}; {what}",
                     domain=domain, id=sts_id, e=e,
                     what="using the cached one" if cached else "no policy applies")
            self._failed = {k: t for k, t in self._failed.items() if t > now}
            self._failed[(domain, sts_id)] = now + self.failure_ttl
            return cached
        fresh = CachedPolicy(policy, sts_id, self.clock.seconds() + policy.max_age)
        await self.cache.put(domain, fresh)
        log.info("MTA-STS policy of {domain} (id {id}): mode {mode}, mx {mx}, max_age {age}",
                 domain=domain, id=sts_id, mode=policy.mode, mx=" ".join(policy.mx),
                 age=policy.max_age)
        return fresh


# -- the decision ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TLSPlan:
    """Per MX host name: the `HostTLS` to connect with, or the 4xx `Reply` why not now."""

    hosts: dict[str, HostTLS | Reply]
    source: str                      # how it was decided, for the debug log

    def for_host(self, mx: str) -> HostTLS | Reply:
        return self.hosts.get(mx, HostTLS("may", mx))


class TLSPolicy:
    """Decides the TLS of every hop of a route; see the module docstring.

    `level_for(domain)`: the `[[tls.policy]]` level of a domain or None; `default`: `[delivery]
    tls_level` ("auto" or a level); `relay_level`: `[delivery] relayhost_tls`."""

    def __init__(self, clock: IReactorTime, resolver: Any, *, trust: Trust | None = None,
                 sts: STSResolver | None = None,
                 level_for: Callable[[str], str | None] = lambda domain: None,
                 default: str = "auto", relay_level: str = "may") -> None:
        self.clock = clock
        self.resolver = resolver
        self.trust = trust
        self.sts = sts
        self.level_for = level_for
        self.default = default
        self.relay_level = relay_level

    def level(self, domain: str) -> str:
        return self.level_for(domain) or self.default

    def plan(self, route: Any) -> Deferred[TLSPlan]:
        """Never errbacks: DNS and HTTPS trouble become `Reply` values or a weaker level."""
        d = ensureDeferred(self._plan(route))

        def bug(f: Failure) -> TLSPlan:
            log.failure("TLS policy for {dest}", f, dest=route.destination)
            reply = Reply(451, "4.3.0", f"internal error deciding TLS for {route.destination}")
            return TLSPlan({h.mx: reply for h in route.hops}, "error")
        return d.addErrback(bug)

    async def _plan(self, route: Any) -> TLSPlan:
        hosts = list(dict.fromkeys(h.mx for h in route.hops))
        if route.destination.startswith("relay:"):
            return TLSPlan({h: HostTLS(self.relay_level, h) for h in hosts}, "relayhost")
        domain = route.destination
        level = self.level(domain)
        if level in ("none", "may", "encrypt", "verify"):
            return TLSPlan({h: HostTLS(level, h) for h in hosts}, level)
        if level in ("auto", "dane"):
            dane = await self._dane(domain, route)
            if dane is not None:
                return dane
        if level in ("auto", "mta-sts") and self.sts is not None:
            sts = await self._mta_sts(domain, hosts)
            if sts is not None:
                return sts
        return TLSPlan({h: HostTLS("may", h) for h in hosts}, f"{level}: may")

    async def _dane(self, domain: str, route: Any) -> TLSPlan | None:
        """RFC 7672 2.2: DANE applies when the MX RRset is authenticated and some host has an
        authenticated TLSA RRset; hosts without one are "may"."""
        try:
            mx = await self.resolver.query(domain, "MX")
        except DNSError:
            return None
        if not mx.authenticated:
            return None
        ports = {h.mx: h.port for h in route.hops}
        names = list(ports)
        results = await DeferredList(
            [self.resolver.query(f"_{ports[h]}._tcp.{h}", "TLSA") for h in names],
            consumeErrors=True)
        hosts: dict[str, HostTLS | Reply] = {}
        secure = False
        for host, (ok, value) in zip(names, results):
            qname = f"_{ports[host]}._tcp.{host}"
            if not ok:
                error = value.value
                if isinstance(error, DNSError) and not error.temporary:
                    hosts[host] = HostTLS("may", host)      # NXDOMAIN: no TLSA
                elif isinstance(error, DNSError):
                    secure = True   # RFC 7672 2.2: a failed TLSA lookup makes the host unusable
                    hosts[host] = Reply(451, "4.7.5", f"DANE: TLSA lookup of {qname} failed: "
                                                      f"{error}")
                else:
                    value.raiseException()
                continue
            if not value.records or not value.authenticated:
                hosts[host] = HostTLS("may", host)
                continue
            secure = True
            records = tuple(TLSARecord(int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert))
                            for r in value.records)
            usable = tuple(r for r in records if r.usable)
            if not usable:
                hosts[host] = Reply(451, "4.7.5", f"DANE: no usable TLSA record at {qname} "
                                                  f"({', '.join(str(r) for r in records)[:200]})")
            else:
                hosts[host] = HostTLS("dane", host, usable)
        return TLSPlan(hosts, "dane") if secure else None

    async def _mta_sts(self, domain: str, hosts: list[str]) -> TLSPlan | None:
        assert self.sts is not None
        cached = await self.sts.policy(domain)
        if cached is None or cached.policy.mode == "none":
            return None
        policy = cached.policy
        out: dict[str, HostTLS | Reply] = {}
        for host in hosts:
            if policy.allows(host):
                out[host] = HostTLS("mta-sts", host, sts_mode=policy.mode)
            elif policy.mode == "enforce":   # RFC 8461 4.1: never deliver to an unlisted MX
                out[host] = Reply(451, "4.7.0", f"MTA-STS: MX host {host} is not listed in the "
                                                f"policy of {domain} (mx: {' '.join(policy.mx)})")
            else:
                log.info("MTA-STS testing: MX host {host} is not listed in the policy of "
                         "{domain}", host=host, domain=domain)
                out[host] = HostTLS("mta-sts", host, sts_mode="testing")
        return TLSPlan(out, f"mta-sts {policy.mode}")

    # -- connections ----------------------------------------------------------------------

    def client_settings(self, host: HostTLS | str, mx: str, base: ClientSettings,
                        plaintext: bool = False) -> ClientSettings:
        """`base` with the client level and TLS options `host` asks for; `plaintext`: the
        host failed a handshake at an opportunistic level recently (see MayFallback)."""
        if isinstance(host, str):
            host = HostTLS(host, mx)
        level = host.client_level
        if level == "may" and plaintext:
            return replace(base, tls="none", tls_options=None)
        if level in ("none", "may", "encrypt") and host.level != "mta-sts":
            return replace(base, tls=level, tls_options=None)
        if self.trust is None:
            self.trust = Trust()   # the system CA store (tap.py builds it at start)
        return replace(base, tls=level, tls_options=VerifiedTLS(self.trust, host, self.clock))


class MayFallback:
    """The pool's `connect(key)` around another one: when the handshake with a host fails at
    an opportunistic level ("may", MTA-STS testing), connect again in plaintext and keep doing
    so for `ttl` seconds (Postfix-like; see `plaintext()`).  Other levels keep their failure."""

    def __init__(self, clock: IReactorTime, connect: Callable[[Any], Deferred[Any]],
                 ttl: float = MAY_PLAINTEXT_TTL) -> None:
        self.clock = clock
        self.connect = connect
        self.ttl = ttl
        self._until: dict[tuple[str, int], float] = {}

    def plaintext(self, key: Any) -> bool:
        """Does the host of `key` get plaintext now?"""
        until = self._until.get((key.address, key.port))
        if until is None:
            return False
        if until <= self.clock.seconds():
            del self._until[(key.address, key.port)]
            return False
        return True

    def __call__(self, key: Any) -> Deferred[Any]:
        d = self.connect(key)
        tls = key.tls if isinstance(key.tls, HostTLS) else HostTLS(str(key.tls), key.mx)
        if tls.client_level != "may" or self.plaintext(key):
            return d

        def failed(f: Failure) -> Any:
            if f.check(SessionFailureError) and f.value.failure.tls_failure == "handshake":
                now = self.clock.seconds()
                self._until = {k: t for k, t in self._until.items() if t > now}
                self._until[(key.address, key.port)] = now + self.ttl
                log.info("TLS handshake with {mx}[{address}] failed ({reason}); plaintext to it "
                         "for {ttl:g}s", mx=key.mx, address=key.address,
                         reason=f.value.failure.reply.text, ttl=self.ttl)
                return self.connect(key)
            return f
        return d.addErrback(failed)

