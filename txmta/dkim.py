"""DKIM signing (RFC 6376) with RSA-SHA256 and Ed25519-SHA256 (RFC 8463) keys.

A `Signer` is built once at start from the [[dkim]] keys and [signing] default_domain;
every key file is read and checked then, so a bad key is a start-up error naming
`dkim[i].key` and the file.  Which keys sign a message: those of the domain of the first
address in its From: header field (case-insensitive), else those of default_domain, else
none.  Several keys of one domain sign together, one DKIM-Signature each, in the order of
the configuration (RSA and Ed25519 dual signing).

Every signature is relaxed/relaxed (RFC 6376 3.4.2, 3.4.4), has no l= and no x=, and signs
each present header field of `SIGNED` plus `OVERSIGNED` once more than present, so nobody
can add a second From, To, Subject, Date or Message-ID later (RFC 6376 8.15).

Pure but for reading the key files at start, and thread-safe: the receiver's signing
threads and the spool writer call it.  dkimpy parses the header section and computes the
header hash (`hash_headers`, the code its verifier runs); the body hash is computed here in
pieces (`BodyHash`: dkimpy's relaxed canonicalisation, proven equal by tests/test_dkim.py),
so a 35 MB body is never whole in memory and no call holds the GIL for long; the
private-key operation is OpenSSL's through `cryptography` (dkimpy's RSA is a pure-Python
pow() that holds the GIL, and so stalls the reactor, for several milliseconds per
signature; OpenSSL takes a fraction of one).  Not here: deciding
which sessions may have their mail signed (every accepted message was relayed for a
trusted client, inbound/policy.py), verification (the next hop's job).
"""
# test: tests/test_dkim.py

from __future__ import annotations

import base64
import email.utils
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import dkim as dkimpy
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from dkim.canonicalization import CanonicalizationPolicy
from twisted.logger import Logger

from txmta.config import Config, ConfigError, DkimKey

log = Logger()

RSA = "rsa-sha256"
ED25519 = "ed25519-sha256"
MIN_RSA_BITS = 1024         # RFC 8301 3.2: verifiers MUST NOT accept less

# Signed when present (RFC 6376 5.4.1, RFC 8058 List-Unsubscribe-Post).
SIGNED = ("from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id",
          "in-reply-to", "references", "mime-version", "content-type",
          "content-transfer-encoding", "content-id", "content-description",
          "resent-date", "resent-from", "resent-sender", "resent-to", "resent-cc",
          "resent-message-id", "list-id", "list-help", "list-unsubscribe",
          "list-unsubscribe-post", "list-subscribe", "list-post", "list-owner",
          "list-archive")
# Signed once more than present: a second instance added later breaks the signature.
OVERSIGNED = ("from", "to", "subject", "date", "message-id")

_RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
_FROM = re.compile(rb"^from[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.I | re.M)
_EOL = re.compile(rb"\r?\n")
_WIDTH = 78


@dataclass(frozen=True)
class SigningKey:
    domain: str             # ASCII (A-label) form, lower-case: the d= tag
    selector: str
    algorithm: str          # RSA | ED25519
    private: Any            # a cryptography private key of the algorithm's type

    def sign_digest(self, digest: bytes) -> bytes:
        """The signature of the SHA-256 `digest` of the canonical header fields: RSASSA-PKCS1
        v1.5 (RFC 6376 3.3.1) or PureEdDSA over the digest (RFC 8463 3)."""
        if self.algorithm == RSA:
            return bytes(self.private.sign(digest, padding.PKCS1v15(),
                                           utils.Prehashed(hashes.SHA256())))
        return bytes(self.private.sign(digest))


def ascii_domain(domain: str) -> str:
    domain = domain.strip().rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def load_private_key(data: bytes, algorithm: str) -> Any:
    """The private key in `data` (PEM: PKCS#8, or PKCS#1 "RSA PRIVATE KEY" as opendkim-genkey
    writes; for Ed25519 also dkimpy's base64 seed); ValueError says what is wrong."""
    text = data.strip()
    if algorithm == ED25519 and b"-----" not in text:
        try:
            seed = base64.b64decode(text, validate=True)
        except ValueError:
            seed = b""
        if len(seed) != 32:
            raise ValueError("not a PEM private key, nor a base64 Ed25519 seed of 32 octets")
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError("the private key is encrypted; txmta needs it without a passphrase") \
            from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a PEM private key ({e})") from None
    if algorithm == RSA:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"not an RSA key (algorithm = \"{RSA}\")")
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {key.key_size} bits; DKIM needs at least "
                             f"{MIN_RSA_BITS} (RFC 8301), 2048 recommended")
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"not an Ed25519 key (algorithm = \"{ED25519}\")")
    return key


def load_key(entry: DkimKey, where: str, index: int) -> SigningKey:
    """One [[dkim]] entry with its key read and checked; ConfigError names dkim[i].key."""
    def bad(reason: str) -> ConfigError:
        return ConfigError.bad_value(where, f"dkim[{index}].key", entry.key, reason)
    try:
        with open(entry.key, "rb") as f:
            data = f.read()
    except OSError as e:
        raise bad(f"cannot read: {e.strerror or e}") from None
    try:
        private = load_private_key(data, entry.algorithm)
    except ValueError as e:
        raise bad(str(e)) from None
    return SigningKey(ascii_domain(entry.domain), entry.selector, entry.algorithm, private)


# -- the body hash ------------------------------------------------------------------------

class BodyHash:
    """SHA-256 of the relaxed canonical body (RFC 6376 3.4.4, 3.7), fed in pieces of any size.

    Lines are taken as a verifier's parser reads them (a bare LF ends a line like CRLF);
    trailing white space is removed, runs of white space become one space, and empty lines
    at the end are ignored: they are counted and written only when a non-empty line follows.
    Memory: one partial line."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._carry = b""       # the last, unfinished line
        self._empty = 0         # CRLFs held back: they may be trailing empty lines
        self._any = False       # something but empty lines was hashed

    def update(self, data: bytes) -> None:
        if self._carry:
            data = self._carry + data
        cut = data.rfind(b"\n") + 1
        self._carry = data[cut:]
        if cut:
            self._lines(data[:cut] if cut < len(data) else data)

    def _lines(self, block: bytes) -> None:
        block = _relaxed(block.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        if b" \r\n" in block:        # after _relaxed, trailing white space is one space
            block = block.replace(b" \r\n", b"\r\n")
        end, n = len(block), 0
        while end >= 2 and block[end - 2] == 0x0D and block[end - 1] == 0x0A:
            end -= 2
            n += 1
        if end:
            self._emit(block[:end])
            self._empty = n
        else:
            self._empty += n

    def _emit(self, data: bytes) -> None:
        if self._empty:
            self._hash.update(b"\r\n" * self._empty)
            self._empty = 0
        self._hash.update(data)
        self._any = True

    def digest(self) -> bytes:
        """The hash; call once, after the last update()."""
        if self._carry:
            last = _relaxed(self._carry)
            self._carry = b""
            self._emit(last)
        if self._any:
            self._hash.update(b"\r\n")
        return self._hash.digest()


def _relaxed(data: bytes) -> bytes:
    """Each run of spaces and tabs as one space.  bytes.replace, not a regular expression:
    several times faster, and each call holds the GIL (and so the reactor) only briefly."""
    if b"\t" in data:
        data = data.replace(b"\t", b" ")
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data


def body_hash(pieces: Iterable[bytes]) -> bytes:
    h = BodyHash()
    for piece in pieces:
        h.update(piece)
    return h.digest()


def split_message(message: bytes) -> tuple[bytes, int]:
    """(the header section with its last line end, where the body starts): the body starts
    after the first empty line; without one the whole message is header."""
    for blank in (b"\r\n", b"\n"):
        if message.startswith(blank):
            return b"", len(blank)
    m = re.search(rb"\n\r?\n", message)
    if m is None:
        return message, len(message)
    return message[:m.start() + 1], m.end()


def from_domain(header: bytes) -> str:
    """The domain of the first address of the first From: header field, lower-case ASCII;
    "" when there is none."""
    m = _FROM.search(header)
    if m is None:
        return ""
    value = _EOL.sub(b"", m.group(1)).strip().decode("utf-8", "replace")
    for _, address in email.utils.getaddresses([value]):
        if "@" in address:
            return ascii_domain(address.rsplit("@", 1)[1].rstrip(">"))
    return ""


# -- signing ------------------------------------------------------------------------------

def _fold(tokens: Sequence[tuple[bytes, bytes]], start: int) -> bytes:
    """Tokens joined into lines of at most _WIDTH columns where possible; each token is
    (separator when on the same line, text); a new line starts with a tab."""
    out = b""
    column = start
    for sep, text in tokens:
        if column + len(sep) + len(text) > _WIDTH and column > 1:
            out += b"\r\n\t"
            column = 1
        else:
            out += sep
            column += len(sep)
        out += text
        column += len(text)
    return out


class Signer:
    """The DKIM keys by domain, and the signatures they make (thread-safe)."""

    def __init__(self, keys: Sequence[SigningKey], default_domain: str = "") -> None:
        self.keys = tuple(keys)
        self.by_domain: dict[str, tuple[SigningKey, ...]] = {}
        for k in self.keys:
            self.by_domain[k.domain] = self.by_domain.get(k.domain, ()) + (k,)
        self.default_domain = ascii_domain(default_domain) if default_domain else ""
        if self.default_domain and self.default_domain not in self.by_domain:
            raise ValueError(f"no key for the default domain {default_domain}")

    @classmethod
    def from_config(cls, cfg: Config) -> "Signer | None":
        """The signer of `cfg`, None without [[dkim]] keys; ConfigError for a bad key file."""
        if not cfg.dkim:
            return None
        where = cfg.path if cfg.path is not None else "<defaults>"
        return cls([load_key(k, where, i) for i, k in enumerate(cfg.dkim)],
                   cfg.signing.default_domain)

    def keys_for(self, header: bytes) -> tuple[SigningKey, ...]:
        """The keys that sign a message with this header section (see the module doc)."""
        found = self.by_domain.get(from_domain(header))
        if found:
            return found
        return self.by_domain.get(self.default_domain, ()) if self.default_domain else ()

    def signatures(self, header: bytes, body: Iterable[bytes], keys: Sequence[SigningKey],
                   now: float) -> bytes:
        """The DKIM-Signature header fields (CRLF-terminated) of `keys` for a message with
        this header section (CRLF lines, no empty line) and body (in pieces, after the empty
        line); raises on a header section dkimpy cannot parse (the caller then leaves the
        message unsigned).  `now` is the t= tag."""
        if not keys:
            return b""
        body_digest = body_hash(body)
        headers, _ = dkimpy.rfc822_parse(header + b"\r\n")
        canonical = _RELAXED.canonicalize_headers(headers)
        present = [name.lower().decode("ascii") for name, _ in headers]
        names = [n for n in present if n in SIGNED] + list(OVERSIGNED)
        include = tuple(n.encode("ascii") for n in names)
        bh = base64.b64encode(body_digest)
        out = b""
        # each key signs the fields above it too, as a verifier of it sees them; the order
        # does not change what the others sign: DKIM-Signature is never in h=
        for key in keys:
            tags = [(b"", b"v=1;"), (b" ", f"a={key.algorithm};".encode()),
                    (b" ", b"c=relaxed/relaxed;"), (b" ", f"d={key.domain};".encode()),
                    (b" ", f"s={key.selector};".encode()), (b" ", f"t={int(now)};".encode())]
            tags += [(b" " if i == 0 else b"", (b"h=" if i == 0 else b"") + n +
                      (b":" if i < len(include) - 1 else b";"))
                     for i, n in enumerate(include)]
            tags += [(b" ", b"bh=" + bh + b";"), (b" ", b"b=")]
            value = b" " + _fold(tags, len(b"DKIM-Signature: "))
            hasher = hashlib.sha256()
            dkimpy.hash_headers(hasher, _RELAXED, canonical, include,
                                (b"DKIM-Signature", value), {})
            b = base64.b64encode(key.sign_digest(hasher.digest()))
            field = b"DKIM-Signature:" + value
            first = max(_WIDTH - len(field.rsplit(b"\n", 1)[-1]), 0)
            rest = [b[i:i + _WIDTH - 1] for i in range(first, len(b), _WIDTH - 1)]
            out += field + b"\r\n\t".join([b[:first]] + rest) + b"\r\n"
        return out

    def headers_for(self, message: bytes, now: float) -> bytes:
        """The DKIM-Signature header fields to put in front of `message` (b"" when no key
        applies); raises when the message cannot be signed."""
        header, body_start = split_message(message)
        keys = self.keys_for(header)
        if not keys:
            return b""
        return self.signatures(header, [message[body_start:]], keys, now)

    def sign_message(self, message: bytes, now: float) -> bytes:
        """`message` with its signatures in front; unchanged when no key applies or signing
        fails (logged): a message is never lost for want of a signature."""
        try:
            return self.headers_for(message, now) + message
        except Exception:
            log.failure("DKIM signing failed; the message goes out unsigned")
            return message


# -- keys for `txmta dkim keygen` --------------------------------------------------------------

def generate_key(algorithm: str, bits: int = 2048) -> Any:
    if algorithm == RSA:
        if bits < MIN_RSA_BITS:
            raise ValueError(f"an RSA key needs at least {MIN_RSA_BITS} bits (RFC 8301)")
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    if algorithm == ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown algorithm {algorithm!r} (one of {RSA}, {ED25519})")


def private_pem(key: Any) -> bytes:
    """The key file: PEM, PKCS#8, unencrypted."""
    return bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


def txt_value(key: Any) -> str:
    """The DNS TXT record's text (RFC 6376 3.6.1): the RSA public key as base64 DER
    SubjectPublicKeyInfo; the Ed25519 one as its 32 raw octets (RFC 8463 4.2)."""
    public = key.public_key()
    if isinstance(key, rsa.RSAPrivateKey):
        der = public.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode("ascii")


def zone_record(domain: str, selector: str, text: str, piece: int = 255) -> str:
    """The record in zone-file syntax, its text cut into strings of at most `piece` octets
    (a TXT character-string holds 255, RFC 1035 3.3.14)."""
    strings = [text[i:i + piece] for i in range(0, len(text), piece)]
    name = f"{selector}._domainkey.{ascii_domain(domain)}."
    if len(strings) == 1:
        return f'{name} IN TXT "{strings[0]}"'
    return f"{name} IN TXT ( " + "\n\t".join(f'"{s}"' for s in strings) + " )"
