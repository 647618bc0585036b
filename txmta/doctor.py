"""`txmta doctor DOMAIN`: check a sending domain's DNS the way receivers will.

What it does: asks DNS (through the injected resolver, `txmta.outbound.dns.Resolver` in the
command, so `dns.nameservers` applies) what a receiving MTA asks about mail from DOMAIN sent
by this installation, and returns one `Row` per check: pass, warn, fail or info, what was
found, and how to fix it.  The checks:

  outbound addresses  delivery.source_address, every [[pool]] address and --address, else
                      server.hostname's addresses
  SPF                 one v=spf1 record, its syntax (RFC 7208 12), at most 10 DNS-querying
                      terms through includes and redirects (4.6.4), void lookups, ptr and
                      +all, and check_host() passing for every outbound address (`txmta.spf`)
  DKIM                every [[dkim]] key of DOMAIN: selector._domainkey TXT present, valid
                      (RFC 6376 3.6.1), not revoked, its p= equal to the configured key's
  DMARC               _dmarc TXT (else the organizational domain's), policy, alignment
                      (RFC 7489 6.3, 3.1)
  MX                  present, null MX (RFC 7505), implicit MX
  FCrDNS              PTR of every outbound address, resolving back to it, equal to its HELO
                      name (a pool address's own helo, else delivery.helo_name/server.hostname)
  MTA-STS, TLS-RPT    the TXT records, when published (RFC 8461 3.1, RFC 8460 3)

What it doesn't: fetch the MTA-STS policy over HTTPS, validate DNSSEC, or send mail.
Remote behaviour never raises: a DNS failure is a row saying which lookup failed.
"""
# test: tests/test_doctor.py

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Sequence

import dns.reversename
from twisted.internet.defer import Deferred, gatherResults

from txmta import spf
from txmta.config import Config, DkimKey
from txmta.outbound.dns import DNSError
from txmta.outbound.tlspolicy import parse_sts_txt

PASS, WARN, FAIL, INFO = "pass", "warn", "fail", "info"
STATUSES = (PASS, WARN, FAIL, INFO)


@dataclass(frozen=True)
class Row:
    status: str         # pass | warn | fail | info
    check: str          # "SPF record", "DKIM mail2026", "FCrDNS 192.0.2.1", ...
    detail: str         # what was found
    fix: str = ""       # what to do about it ("" when nothing)


@dataclass(frozen=True)
class Setup:
    """What the doctor knows of our side, from the configuration and the command line."""
    domain: str                                 # lower-case A-labels, no trailing dot
    hostname: str                               # server.hostname
    helo_name: str                              # delivery.helo_name, else server.hostname
    addresses: tuple[tuple[str, str], ...] = ()     # (IP, where it comes from)
    dkim: tuple[DkimKey, ...] = ()              # the [[dkim]] keys of `domain`
    relayhost: str = ""                         # delivery.relayhost
    helos: tuple[tuple[str, str, str], ...] = ()    # (IP, its own HELO name, where it is set)

    def helo_for(self, ip: str) -> tuple[str, str]:
        """The HELO name mail from `ip` gives, and the setting that names it."""
        for address, name, where in self.helos:
            if address == ip:
                return name, where
        return self.helo_name, ("server.hostname" if self.helo_name == self.hostname
                                else "delivery.helo_name")

    @classmethod
    def from_config(cls, cfg: Config, domain: str, addresses: Sequence[str] = ()) -> "Setup":
        """ValueError for a bad domain or address (a usage error)."""
        name = check_domain(domain)
        found: list[tuple[str, str]] = []
        if cfg.delivery.source_address:
            found.append((cfg.delivery.source_address, "delivery.source_address"))
        helos: list[tuple[str, str, str]] = []
        for n, pool in enumerate(cfg.pools):
            for a in pool.addresses:
                if a.address not in [f[0] for f in found]:
                    found.append((a.address, f"pool {pool.name}"))
                if a.helo and a.address not in [h[0] for h in helos]:
                    helos.append((a.address, a.helo.rstrip(".").lower(),
                                  f"the helo of {a.address} in pool[{n}] ({pool.name})"))
        for a in addresses:
            try:
                ip = str(ipaddress.ip_address(a.strip()))
            except ValueError:
                raise ValueError(f"--address {a!r}: not an IP address") from None
            if ip not in [f[0] for f in found]:
                found.append((ip, "--address"))
        hostname = cfg.server.hostname.rstrip(".").lower()
        return cls(name, hostname, (cfg.delivery.helo_name or hostname).rstrip(".").lower(),
                   tuple(found), tuple(k for k in cfg.dkim if k.domain == name),
                   cfg.delivery.relayhost, tuple(helos))


_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)\Z")


def check_domain(domain: str) -> str:
    """`domain` as lower-case A-labels without the trailing dot; ValueError if not a name."""
    name = domain.strip().rstrip(".").lower()
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"{domain!r}: not a domain name") from None
    labels = name.split(".")
    if len(labels) < 2 or len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{domain!r}: not a domain name (e.g. example.com)")
    return name


def organizational_domain(domain: str) -> str:
    """The last two labels: an approximation of RFC 7489 3.2 without the public suffix list."""
    return ".".join(domain.split(".")[-2:])


# -- DNS helpers --------------------------------------------------------------------------

async def _records(resolver: spf.TXTResolver, name: str, rdtype: str) -> tuple[Any, ...]:
    """The records; () for NXDOMAIN and NODATA.  Temporary failures raise DNSError."""
    try:
        return (await resolver.query(name, rdtype)).records
    except DNSError as e:
        if e.temporary:
            raise
        return ()


async def _txt(resolver: spf.TXTResolver, name: str) -> list[str]:
    """Each TXT record at `name` as one string (its character-strings concatenated)."""
    return [b"".join(r.strings).decode("utf-8", "replace")
            for r in await _records(resolver, name, "TXT")]


async def _addresses(resolver: spf.TXTResolver, host: str) -> list[str]:
    out: list[str] = []
    for rdtype in ("AAAA", "A"):
        out += [str(r.address) for r in await _records(resolver, host, rdtype)]
    return out


def _lookup_failed(e: DNSError) -> str:
    return f"DNS lookup failed: {e}"


_DNS_FIX = ("make sure the domain's nameservers (and dns.nameservers) answer: receivers treat "
            "a failed lookup as a temporary error and defer or reject the mail")


def parse_tags(text: str) -> dict[str, str]:
    """A tag=value list (RFC 6376 3.2, also DMARC, MTA-STS, TLS-RPT); tags lower-case,
    values stripped.  ValueError for a part without "=" or a tag given twice."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        tag, eq, value = part.partition("=")
        tag = tag.strip()
        if not eq or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", tag):
            raise ValueError(f"{part.strip()!r} is not tag=value")
        if tag.lower() in tags:
            raise ValueError(f"tag {tag!r} appears twice")
        tags[tag.lower()] = value.strip()
    return tags


def _first_tag(text: str) -> str:
    return text.split(";", 1)[0].split("=", 1)[0].strip().lower()


# -- outbound addresses -------------------------------------------------------------------

async def outbound_rows(resolver: spf.TXTResolver, setup: Setup) -> tuple[list[str], list[Row]]:
    """The addresses receivers will see our mail come from, and the row that says so."""
    check = "outbound addresses"
    rows: list[Row] = []
    if setup.addresses:
        ips = [ip for ip, _ in setup.addresses]
        rows.append(Row(INFO, check, ", ".join(f"{ip} ({where})" for ip, where in setup.addresses)))
    else:
        try:
            ips = await _addresses(resolver, setup.hostname)
        except DNSError as e:
            ips = []
            rows.append(Row(FAIL, check, f"server.hostname {setup.hostname}: {_lookup_failed(e)}",
                            "set delivery.source_address or give --address IP"))
        else:
            if ips:
                rows.append(Row(INFO, check, f"{', '.join(ips)}: the addresses of server.hostname "
                                f"{setup.hostname} (no delivery.source_address or --address)"))
            else:
                rows.append(Row(FAIL, check, f"server.hostname {setup.hostname} has no A or AAAA "
                                "record, so SPF and reverse DNS cannot be checked",
                                "set delivery.source_address, or give --address IP for each "
                                "address mail leaves from"))
    if setup.relayhost and not any(where == "--address" for _, where in setup.addresses):
        rows.append(Row(WARN, "relayhost", f"delivery.relayhost is {setup.relayhost}: receivers "
                        "see the relayhost's addresses, not this host's",
                        "give the relayhost's outbound addresses with --address IP"))
    return ips, rows


# -- SPF ----------------------------------------------------------------------------------

def _spf_terms(ips: Sequence[str]) -> str:
    return " ".join(f"ip{ipaddress.ip_address(ip).version}:{ip}" for ip in ips) or "mx"


async def spf_rows(resolver: spf.TXTResolver, setup: Setup, ips: Sequence[str]) -> list[Row]:
    d = setup.domain
    try:
        found = await spf.spf_records(resolver, d)
    except DNSError as e:
        return [Row(FAIL, "SPF record", f"TXT {d}: {_lookup_failed(e)}", _DNS_FIX)]
    if not found:
        return [Row(FAIL, "SPF record", f"no v=spf1 TXT record at {d}: receivers get SPF "
                    "\"none\" and many treat the mail as suspect",
                    f"publish {d}. TXT \"v=spf1 {_spf_terms(ips)} -all\"")]
    if len(found) > 1:
        return [Row(FAIL, "SPF record", f"{len(found)} v=spf1 records at {d} (RFC 7208 3.2 "
                    "allows one; receivers return permerror): " + " | ".join(found),
                    "merge them into one record")]
    try:
        record = spf.parse(found[0])
    except spf.SpfSyntaxError as e:
        return [Row(FAIL, "SPF record", f"{found[0]}: syntax error: {e}",
                    "correct the record (RFC 7208 section 12); receivers return permerror")]
    rows = [Row(PASS, "SPF record", found[0])]

    count = await spf.count_lookups(resolver, d, record)
    chain = "; ".join(count.chain)
    if count.problems:
        rows.append(Row(FAIL, "SPF lookups", "; ".join(count.problems) + f" [{chain}]",
                        "fix or remove the include/redirect named (receivers return permerror)"))
    elif count.total > spf.MAX_LOOKUPS:
        rows.append(Row(FAIL, "SPF lookups", f"{count.total} DNS-querying terms, more than "
                        f"{spf.MAX_LOOKUPS} (RFC 7208 4.6.4; receivers return permerror): {chain}",
                        "replace include/a/mx terms with ip4:/ip6: ranges, and drop includes of "
                        "services that do not send your mail"))
    else:
        rows.append(Row(PASS, "SPF lookups", f"{count.total} of at most {spf.MAX_LOOKUPS} "
                        f"DNS-querying terms: {chain}"))
    if len(count.voids) > spf.MAX_VOID:
        rows.append(Row(WARN, "SPF void lookups", f"{len(count.voids)} terms find nothing in "
                        f"DNS: {', '.join(count.voids)} (more than {spf.MAX_VOID}: receivers may "
                        "return permerror, RFC 7208 4.6.4)", "remove the terms that find nothing"))
    if count.plus_all:
        rows.append(Row(FAIL, "SPF terms", f"+all authorises every host on the internet: "
                        f"{', '.join(count.plus_all)}", "end the record with -all or ~all"))
    elif count.ptr:
        rows.append(Row(WARN, "SPF terms", f"ptr is slow and discouraged (RFC 7208 5.5), some "
                        f"receivers ignore it: {', '.join(count.ptr)}",
                        "replace ptr with ip4:/ip6: terms for your addresses"))
    else:
        rows.append(Row(PASS, "SPF terms", "no +all, no ptr"))

    for ip in ips:
        result = await spf.check_host(resolver, ip, d, helo=setup.helo_for(ip)[0])
        rows.append(_spf_result_row(d, ip, result))
    return rows


def _spf_result_row(d: str, ip: str, result: spf.Result) -> Row:
    check = f"SPF {ip}"
    where = f" (matched {result.term} in {result.domain})" if result.term else ""
    if result.result == "pass":
        return Row(PASS, check, f"pass{where}")
    term = f"ip{ipaddress.ip_address(ip).version}:{ip}"
    if result.result in ("fail", "softfail", "neutral", "none"):
        reason = f": {result.reason}" if result.reason and not result.term else ""
        return Row(FAIL, check, f"{result.result}{where}{reason}: receivers do not see {ip} "
                   f"as authorised to send for {d}",
                   f"add {term} to the SPF record of {d}, before its \"all\"")
    if result.result == "temperror":
        return Row(FAIL, check, f"temperror: {result.reason}", _DNS_FIX)
    return Row(FAIL, check, f"permerror: {result.reason}",
               "correct the record so that receivers can evaluate it (RFC 7208)")


# -- DKIM ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PublicKey:
    k: str              # "rsa" or "ed25519", as in the DKIM k= tag
    p: bytes            # what the p= tag decodes to: DER SubjectPublicKeyInfo, or raw ed25519
    bits: int           # RSA modulus size; 256 for ed25519


def public_key_of(pem: bytes) -> PublicKey:
    """The DKIM public key of a private key file: PEM (PKCS#1 or PKCS#8, RSA or Ed25519),
    or the base64 32-byte Ed25519 seed some tools write.  ValueError if it is none of them."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    try:
        key: Any = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        try:
            raw = base64.b64decode(pem.strip(), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise ValueError(f"not a PEM private key ({e})") from None
        key = ed25519.Ed25519PrivateKey.from_private_bytes(raw)
    public = key.public_key()
    if isinstance(key, rsa.RSAPrivateKey):
        der = public.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        return PublicKey("rsa", der, key.key_size)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return PublicKey("ed25519", public.public_bytes(serialization.Encoding.Raw,
                                                        serialization.PublicFormat.Raw), 256)
    raise ValueError(f"a {type(key).__name__.lstrip('_')}, not an RSA or Ed25519 key")


def same_key(ours: PublicKey, k: str, p: bytes) -> bool:
    """Whether a published k=/p= is our key.  RSA keys are compared by modulus and exponent,
    so both the DER SubjectPublicKeyInfo of RFC 6376 and the bare PKCS#1 RSAPublicKey some
    publish are accepted (cryptography's DER loader reads both)."""
    if k != ours.k:
        return False
    if k == "ed25519":
        return p == ours.p
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    try:
        theirs = serialization.load_der_public_key(p)
        mine = serialization.load_der_public_key(ours.p)
    except (ValueError, TypeError):
        return False
    return (isinstance(theirs, rsa.RSAPublicKey) and isinstance(mine, rsa.RSAPublicKey)
            and theirs.public_numbers() == mine.public_numbers())


def dkim_record(key: PublicKey) -> str:
    return f"v=DKIM1; k={key.k}; p={base64.b64encode(key.p).decode('ascii')}"


async def dkim_rows(resolver: spf.TXTResolver, setup: Setup) -> list[Row]:
    if not setup.dkim:
        return [Row(WARN, "DKIM", f"no [[dkim]] key for {setup.domain} in the configuration: "
                    "mail is not signed, and DMARC then rests on SPF alone",
                    f"add a [[dkim]] table (domain = \"{setup.domain}\", selector, key) and "
                    "publish its public key")]
    rows = []
    for key in setup.dkim:
        rows.append(await _dkim_row(resolver, setup.domain, key))
    return rows


async def _dkim_row(resolver: spf.TXTResolver, domain: str, key: DkimKey) -> Row:
    check = f"DKIM {key.selector}"
    name = f"{key.selector}._domainkey.{domain}"
    try:
        with open(key.key, "rb") as f:
            ours = public_key_of(f.read())
    except (OSError, ValueError) as e:
        return Row(FAIL, check, f"cannot read the private key {key.key}: "
                   f"{getattr(e, 'strerror', None) or e}", "fix the [[dkim]] key file")
    wanted = "ed25519" if key.algorithm.startswith("ed25519") else "rsa"
    expected = dkim_record(ours)
    publish = f"publish {name}. TXT \"{expected}\" (in strings of at most 255 characters)"
    if ours.k != wanted:
        return Row(FAIL, check, f"{key.key} is an {ours.k} key but the algorithm is "
                   f"{key.algorithm}", "make [[dkim]] algorithm match the key")
    try:
        texts = await _txt(resolver, name)
    except DNSError as e:
        return Row(FAIL, check, f"TXT {name}: {_lookup_failed(e)}", _DNS_FIX)
    texts = [t for t in texts if t.strip()]
    if not texts:
        return Row(FAIL, check, f"no TXT record at {name}: receivers cannot verify the "
                   "signatures (dkim=permerror)", publish)
    if len(texts) > 1:
        return Row(FAIL, check, f"{len(texts)} TXT records at {name}; receivers may use any "
                   "one of them", f"keep one: {expected}")
    text = texts[0]
    try:
        tags = parse_tags(text)
    except ValueError as e:
        return Row(FAIL, check, f"{name}: not a DKIM key record ({e}): {text}", publish)
    if "v" in tags and (_first_tag(text) != "v" or tags["v"] != "DKIM1"):
        return Row(FAIL, check, f"{name}: v= must be first and DKIM1 (RFC 6376 3.6.1): {text}",
                   publish)
    if "p" not in tags:
        return Row(FAIL, check, f"{name}: no p= tag: {text}", publish)
    p_text = re.sub(r"\s+", "", tags["p"])
    if not p_text:
        return Row(FAIL, check, f"{name}: the key is revoked (empty p=)", publish)
    k = tags.get("k", "rsa").lower()
    if k != wanted:
        return Row(FAIL, check, f"{name}: k={k}, but the key is {key.algorithm}", publish)
    if "h" in tags and "sha256" not in [h.strip().lower() for h in tags["h"].split(":")]:
        return Row(FAIL, check, f"{name}: h={tags['h']} excludes sha256", publish)
    try:
        p = base64.b64decode(p_text, validate=True)
    except (binascii.Error, ValueError):
        return Row(FAIL, check, f"{name}: p= is not base64", publish)
    if not same_key(ours, k, p):
        return Row(FAIL, check, f"{name}: the published key is not the one in {key.key}: "
                   "receivers will fail the signatures (dkim=fail)", publish)
    testing = "y" in [f.strip().lower() for f in tags.get("t", "").split(":")]
    size = f"{ours.k} {ours.bits} bits" if ours.k == "rsa" else "ed25519"
    if ours.k == "rsa" and ours.bits < 1024:
        return Row(FAIL, check, f"matches {key.key}, but {size}: receivers ignore RSA keys "
                   "under 1024 bits (RFC 8301)", "make a 2048-bit key and publish it")
    if testing:
        return Row(WARN, check, f"matches {key.key} ({size}), but t=y (testing): receivers may "
                   "treat signatures as unsigned", "remove t=y from the record")
    if ours.k == "rsa" and ours.bits < 2048:
        return Row(WARN, check, f"matches {key.key}, but {size}: RFC 8301 asks for 2048",
                   "make a 2048-bit key and publish it under a new selector")
    return Row(PASS, check, f"{name} matches {key.key} ({size})")


# -- DMARC --------------------------------------------------------------------------------

_DMARC = re.compile(r"\s*v\s*=\s*DMARC1\s*(;|\Z)")     # RFC 7489 6.4: "match precisely"


@dataclass(frozen=True)
class DmarcFound:
    name: str                   # where the records were found (or last looked for)
    records: tuple[str, ...]    # the v=DMARC1 records there
    inherited: bool = False     # from the organizational domain
    error: str = ""             # a lookup failed


async def find_dmarc(resolver: spf.TXTResolver, domain: str) -> DmarcFound:
    """_dmarc.DOMAIN, else _dmarc of the organizational domain (RFC 7489 6.6.3)."""
    candidates = [domain]
    org = organizational_domain(domain)
    if org != domain:
        candidates.append(org)
    found = DmarcFound(f"_dmarc.{domain}", ())
    for i, d in enumerate(candidates):
        name = f"_dmarc.{d}"
        try:
            texts = await _txt(resolver, name)
        except DNSError as e:
            return DmarcFound(name, (), i > 0, _lookup_failed(e))
        records = tuple(t for t in texts if _DMARC.match(t))
        if records:
            return DmarcFound(name, records, i > 0)
    return found


def dmarc_row(setup: Setup, found: DmarcFound, spf_ok: bool, dkim_ok: bool) -> Row:
    """The DMARC row: the record's policy, and whether our mail aligns (RFC 7489 3.1):
    DKIM when a [[dkim]] key of DOMAIN verifies (d= is DOMAIN), SPF when it passes for every
    outbound address (taking an envelope sender @DOMAIN)."""
    d = setup.domain
    start = (f"publish _dmarc.{d}. TXT \"v=DMARC1; p=none; rua=mailto:dmarc-reports@{d}\" to "
             "start with reports, then move to p=quarantine and p=reject")
    if found.error:
        return Row(FAIL, "DMARC", f"TXT {found.name}: {found.error}", _DNS_FIX)
    if not found.records:
        org = organizational_domain(d)
        also = f" or _dmarc.{org}" if org != d else ""
        return Row(FAIL, "DMARC", f"no v=DMARC1 record at _dmarc.{d}{also}: large receivers "
                   "expect one from bulk senders", start)
    if len(found.records) > 1:
        return Row(FAIL, "DMARC", f"{len(found.records)} v=DMARC1 records at {found.name}: "
                   "receivers ignore them all (RFC 7489 6.6.3)", "keep one")
    text = found.records[0]
    try:
        tags = parse_tags(text)
    except ValueError as e:
        return Row(FAIL, "DMARC", f"{found.name}: {e}: {text}", start)
    if _first_tag(text) != "v" or tags.get("v") != "DMARC1":
        return Row(FAIL, "DMARC", f"{found.name}: v=DMARC1 must come first: {text}", start)
    policy = tags.get("p", "").lower()
    if policy not in ("none", "quarantine", "reject"):
        return Row(FAIL, "DMARC", f"{found.name}: p= must be none, quarantine or reject: {text}",
                   start)
    inherited = ""
    if found.inherited:
        inherited = (f" (from the organizational domain {found.name[len('_dmarc.'):]}, taken "
                     "as the last two labels)")
        sub = tags.get("sp", "").lower()
        if sub in ("none", "quarantine", "reject"):
            policy = sub
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    mode = {"r": "relaxed", "s": "strict"}
    parts = [f"p={policy}{inherited}",
             f"adkim={adkim} ({mode.get(adkim, 'invalid')}), aspf={aspf} ({mode.get(aspf, 'invalid')})"]
    if setup.dkim:
        parts.append(f"DKIM d={d} aligns" + ("" if dkim_ok else " but does not verify (see DKIM)"))
    else:
        parts.append("no DKIM signature to align")
    parts.append(f"SPF aligns for an envelope sender @{d}"
                 + ("" if spf_ok else " but does not pass (see SPF)"))
    if "pct" in tags and tags["pct"] != "100":
        parts.append(f"pct={tags['pct']}")
    if "rua" not in tags:
        parts.append("no rua= (no aggregate reports)")
    detail = "; ".join(parts)
    if policy == "none":
        return Row(WARN, "DMARC", f"{detail}: monitoring only, receivers do not act on failures",
                   "once reports show your mail aligns, move to p=quarantine, then p=reject")
    if not ((setup.dkim and dkim_ok) or spf_ok):
        return Row(WARN, "DMARC", f"{detail}: neither DKIM nor SPF passes aligned, so "
                   f"receivers apply p={policy} to your own mail", "fix the DKIM and SPF rows")
    return Row(PASS, "DMARC", detail)


# -- MX -----------------------------------------------------------------------------------

async def mx_rows(resolver: spf.TXTResolver, setup: Setup) -> list[Row]:
    d = setup.domain
    try:
        answer = await resolver.query(d, "MX")
        records = answer.records
    except DNSError as e:
        if e.temporary:
            return [Row(FAIL, "MX", f"MX {d}: {_lookup_failed(e)}", _DNS_FIX)]
        return [Row(FAIL, "MX", f"{d} does not exist (NXDOMAIN): receivers reject mail from it",
                    f"publish {d}. MX records pointing at your inbound servers")]
    hosts = sorted((int(r.preference), r.exchange.to_text(True).lower()) for r in records)
    if any(host in ("", ".") for _, host in hosts):
        return [Row(WARN, "MX", f"null MX (RFC 7505): {d} receives no mail, so bounces and "
                    "replies to it cannot be delivered",
                    "publish real MX records if mail to this domain should arrive")]
    if not hosts:
        try:
            own = await _addresses(resolver, d)
        except DNSError as e:
            return [Row(WARN, "MX", f"no MX record, and {_lookup_failed(e)}", _DNS_FIX)]
        if not own:
            return [Row(FAIL, "MX", f"no MX and no A/AAAA record at {d}: receivers reject "
                        "mail from a domain that cannot receive (Postfix "
                        "reject_unknown_sender_domain)", f"publish {d}. MX records")]
        return [Row(WARN, "MX", f"no MX record: mail to {d} goes to its address "
                    f"{', '.join(own)} (implicit MX, RFC 5321 5.1)",
                    f"publish {d}. MX records naming the hosts that receive its mail")]
    listed = ", ".join(f"{pref} {host}" for pref, host in hosts)
    dead = []
    for _, host in hosts:
        try:
            if not await _addresses(resolver, host):
                dead.append(host)
        except DNSError:
            dead.append(host)
    if dead:
        return [Row(WARN, "MX", f"{listed}; no address for {', '.join(dead)}",
                    "give every MX host an A or AAAA record")]
    return [Row(PASS, "MX", listed)]


# -- forward-confirmed reverse DNS --------------------------------------------------------

async def fcrdns_row(resolver: spf.TXTResolver, setup: Setup, ip: str) -> Row:
    check = f"FCrDNS {ip}"
    name, what = setup.helo_for(ip)
    ask = f"ask the owner of {ip} (your hosting provider) to set its PTR record to {name}"
    reverse = dns.reversename.from_address(ip).to_text(True)
    try:
        names = [r.target.to_text(True).lower() for r in await _records(resolver, reverse, "PTR")]
    except DNSError as e:
        return Row(FAIL, check, f"PTR {reverse}: {_lookup_failed(e)}", _DNS_FIX)
    if not names:
        return Row(FAIL, check, f"no PTR record for {ip}: many receivers reject or defer mail "
                   "from addresses without reverse DNS", ask)
    address = ipaddress.ip_address(ip)
    confirmed = []
    for n in names:
        try:
            if address in [ipaddress.ip_address(a) for a in await _addresses(resolver, n)]:
                confirmed.append(n)
        except DNSError:
            continue
    if not confirmed:
        return Row(FAIL, check, f"PTR {', '.join(names)}, which does not resolve back to {ip}",
                   f"add an A/AAAA record {names[0]} -> {ip}, or {ask}")
    if name in confirmed:
        return Row(PASS, check, f"{ip} -> {name} -> {ip}")
    return Row(WARN, check, f"{ip} -> {confirmed[0]} -> {ip}, but {what} is {name}",
               f"{ask}, or set {what} to {confirmed[0]}")


# -- MTA-STS and TLS-RPT ------------------------------------------------------------------

async def mta_sts_row(resolver: spf.TXTResolver, setup: Setup) -> Row:
    name = f"_mta-sts.{setup.domain}"
    try:
        texts = [t for t in await _txt(resolver, name) if t.startswith("v=STSv1")]
    except DNSError as e:
        return Row(WARN, "MTA-STS", f"TXT {name}: {_lookup_failed(e)}", _DNS_FIX)
    if not texts:
        return Row(INFO, "MTA-STS", "not published",
                   f"optional: serve a policy at https://mta-sts.{setup.domain}/.well-known/"
                   f"mta-sts.txt and publish {name}. TXT \"v=STSv1; id=...\" (RFC 8461)")
    if len(texts) > 1:
        return Row(WARN, "MTA-STS", f"{len(texts)} v=STSv1 records at {name}: senders ignore "
                   "them all (RFC 8461 3.1)", "keep one")
    if parse_sts_txt(texts) is None:     # what delivery itself accepts
        return Row(WARN, "MTA-STS", f"{name}: needs v=STSv1 first and an id= of 1-32 letters and "
                   f"digits: {texts[0]}", "correct the record (RFC 8461 3.1)")
    return Row(PASS, "MTA-STS", f"{texts[0]} (the HTTPS policy itself is not fetched)")


async def tls_rpt_row(resolver: spf.TXTResolver, setup: Setup) -> Row:
    name = f"_smtp._tls.{setup.domain}"
    try:
        texts = [t for t in await _txt(resolver, name) if t.startswith("v=TLSRPTv1")]
    except DNSError as e:
        return Row(WARN, "TLS-RPT", f"TXT {name}: {_lookup_failed(e)}", _DNS_FIX)
    if not texts:
        return Row(INFO, "TLS-RPT", "not published",
                   f"optional: publish {name}. TXT \"v=TLSRPTv1; rua=mailto:tls-reports@"
                   f"{setup.domain}\" (RFC 8460)")
    if len(texts) > 1:
        return Row(WARN, "TLS-RPT", f"{len(texts)} v=TLSRPTv1 records at {name}: senders "
                   "ignore them all (RFC 8460 3)", "keep one")
    try:
        tags = parse_tags(texts[0])
    except ValueError as e:
        return Row(WARN, "TLS-RPT", f"{name}: {e}: {texts[0]}", "correct the record (RFC 8460 3)")
    uris = [u.strip() for u in tags.get("rua", "").split(",") if u.strip()]
    if (_first_tag(texts[0]) != "v" or not uris
            or not all(u.lower().startswith(("mailto:", "https:")) for u in uris)):
        return Row(WARN, "TLS-RPT", f"{name}: needs v=TLSRPTv1 first and rua= with mailto: or "
                   f"https: addresses: {texts[0]}", "correct the record (RFC 8460 3)")
    return Row(PASS, "TLS-RPT", texts[0])


# -- all of it ----------------------------------------------------------------------------

def _start(coroutine: Awaitable[Any]) -> Deferred[Any]:
    return Deferred.fromCoroutine(coroutine)  # type: ignore[arg-type]


async def _diagnose(resolver: spf.TXTResolver, setup: Setup) -> list[Row]:
    ips, rows = await outbound_rows(resolver, setup)
    # the checks are independent: run them at once, so that a dead nameserver costs one
    # timeout, not one per question
    results = await gatherResults([
        _start(spf_rows(resolver, setup, ips)),
        _start(dkim_rows(resolver, setup)),
        _start(find_dmarc(resolver, setup.domain)),
        _start(mx_rows(resolver, setup)),
        gatherResults([_start(fcrdns_row(resolver, setup, ip)) for ip in ips]),
        _start(mta_sts_row(resolver, setup)),
        _start(tls_rpt_row(resolver, setup)),
    ], consumeErrors=True)
    spf_found, dkim_found, dmarc_found, mx_found, fcrdns, sts, rpt = results
    address_rows = [r for r in spf_found if r.check.startswith("SPF ") and
                    r.check[4:] in ips]
    spf_ok = bool(address_rows) and all(r.status == PASS for r in address_rows)
    dkim_ok = any(r.status == PASS for r in dkim_found)
    return (rows + spf_found + dkim_found
            + [dmarc_row(setup, dmarc_found, spf_ok, dkim_ok)]
            + mx_found + list(fcrdns) + [sts, rpt])


def diagnose(resolver: spf.TXTResolver, setup: Setup) -> Deferred[list[Row]]:
    """Every check's row, in a fixed order.  Errbacks only for our own bugs."""
    return _start(_diagnose(resolver, setup))


def failed(rows: Sequence[Row]) -> bool:
    return any(r.status == FAIL for r in rows)


# -- output -------------------------------------------------------------------------------

def report_json(domain: str, rows: Sequence[Row]) -> dict[str, Any]:
    return {"domain": domain,
            "ok": not failed(rows),
            "summary": {s: sum(r.status == s for r in rows) for s in STATUSES},
            "rows": [{"status": r.status, "check": r.check, "detail": r.detail, "fix": r.fix}
                     for r in rows]}


def report_text(domain: str, rows: Sequence[Row]) -> str:
    """An aligned table: STATUS, CHECK, DETAIL; the fix on the next line under the detail."""
    width = max([len("CHECK")] + [len(r.check) for r in rows])
    indent = " " * (8 + width + 2)
    out = [f"{'STATUS':<8}{'CHECK':<{width + 2}}DETAIL"]
    for r in rows:
        out.append(f"{r.status:<8}{r.check:<{width + 2}}{r.detail}")
        if r.fix:
            out.append(f"{indent}fix: {r.fix}")
    counts = ", ".join(f"{sum(r.status == s for r in rows)} {s}" for s in STATUSES)
    out.append("")
    out.append(f"{domain}: {counts}")
    return "\n".join(out)


def run(reactor: Any, setup: Setup, nameservers: Sequence[tuple[str, int]] | None,
        timeout: float = 3.0) -> list[Row]:
    """Run `diagnose` on `reactor` (not yet running) until it is done: the blocking entry of
    the `txmta doctor` command.  KeyboardInterrupt when interrupted."""
    from txmta.outbound.dns import Resolver
    box: list[Any] = []

    def start() -> None:
        resolver = Resolver(reactor, nameservers, timeout=timeout)
        d = diagnose(resolver, setup)
        d.addBoth(box.append)
        d.addBoth(lambda _: resolver.close())
        d.addBoth(lambda _: reactor.stop())
    reactor.callWhenRunning(start)
    reactor.run()
    if not box:
        raise KeyboardInterrupt
    if not isinstance(box[0], list):       # a bug of ours: one line, not a traceback
        raise RuntimeError(f"internal error: {box[0].getErrorMessage()}")
    return box[0]
