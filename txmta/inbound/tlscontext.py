"""Inbound TLS: the server context of every STARTTLS and implicit-TLS listener.

`load_server_context(tls, path)` reads `[tls] cert` and `key` and builds an OpenSSL context
that speaks TLS 1.2 or newer only (RFC 8996 retired 1.0 and 1.1; `[tls] min_version` may
raise the floor to 1.3), offers ECDHE key exchange with AEAD ciphers for TLS 1.2 unless
`[tls] ciphers` says otherwise, prefers its own cipher order, never compresses and never
renegotiates (the recommendations of RFC 9325).  Key exchange groups are OpenSSL 3's default
list (X25519, P-256, X448, P-521, P-384, then the RFC 7919 groups); TLS 1.3 suites are OpenSSL's
defaults.  Anything wrong with the material or the settings is a `ConfigError` naming the
file, the key and the value.

`ServerTLS` is the one object the listeners and STARTTLS hand to Twisted's TLS layer
(`IOpenSSLServerConnectionCreator`).  It makes every new connection from its current
context; `prepare()` builds a replacement from a freshly loaded configuration (on SIGHUP,
see txmta/reload.py) and the step it returns swaps it in.  Connections already open keep the
context they started with, so a reload never drops a session.

Reads two small files; no sockets, no reactor.  Client certificates are not asked for.
"""
# test: tests/test_tlscontext.py, tests/integration/test_tls_reload.py

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from OpenSSL import SSL
from zope.interface import implementer

from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger

from txmta.config import Config, ConfigError, TLSConfig

__all__ = ["DEFAULT_CIPHERS", "LoadedContext", "ServerTLS", "load_server_context"]

log = Logger()

# TLS 1.2 suites when [tls] ciphers = "": forward secrecy (ECDHE) and AEAD only, strongest
# first for each certificate type (ECDSA or RSA).
DEFAULT_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
])

MIN_VERSIONS = {"TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": SSL.TLS1_3_VERSION}

# the version floor is also set with set_min_proto_version(); the OP_NO_* flags keep old
# versions off even if a system-wide OpenSSL configuration lowers that floor
_OPTIONS = (SSL.OP_NO_SSLv2 | SSL.OP_NO_SSLv3 | SSL.OP_NO_TLSv1 | SSL.OP_NO_TLSv1_1
            | SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE)


@dataclass(frozen=True)
class LoadedContext:
    """A built server context and what the log says about it."""

    context: SSL.Context
    subject: str                   # the leaf certificate's subject, RFC 4514
    not_after: datetime.datetime
    fingerprint: str               # SHA-256 of the leaf certificate, hex
    min_version: str
    ciphers: str                   # as configured; "" = DEFAULT_CIPHERS

    def describe(self) -> str:
        return (f"certificate {self.subject} sha256={self.fingerprint[:16]}... "
                f"expires {self.not_after:%Y-%m-%d %H:%M:%SZ}, {self.min_version} or newer, "
                f"ciphers {self.ciphers or 'built-in'}")


def _openssl_reason(e: SSL.Error) -> str:
    """The reason strings of an OpenSSL error queue, e.g. "no cipher match"."""
    queue = e.args[0] if e.args and isinstance(e.args[0], list) else []
    reasons = [str(item[2]) for item in queue if isinstance(item, tuple) and len(item) == 3 and item[2]]
    return "; ".join(reasons) or str(e) or "rejected by OpenSSL"


def _read(path: str, key: str, where: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError.bad_value(where, key, path, f"cannot read: {e.strerror or e}") from None


def _cipher_tokens(ciphers: str) -> list[str]:
    """The elements of an OpenSSL cipher string that must select something on their own:
    names and aliases, not exclusions (!X, -X), moves (+X) or directives (@STRENGTH)."""
    return [t for t in re.split(r"[:, ]+", ciphers) if t and t[0] not in "!-+@"]


def _set_ciphers(ctx: SSL.Context, ciphers: str, where: str) -> None:
    def bad(reason: str) -> ConfigError:
        return ConfigError.bad_value(where, "tls.ciphers", ciphers, reason)

    if not ciphers.isascii() or not ciphers.isprintable():
        raise bad("must be printable ASCII (an OpenSSL cipher list)")
    # OpenSSL skips names it does not know as long as one element matches; a typo then
    # silently narrows the list, so each element must match at least one cipher.
    for token in _cipher_tokens(ciphers):
        probe = SSL.Context(SSL.TLS_SERVER_METHOD)
        try:
            probe.set_cipher_list(token.encode("ascii"))
        except SSL.Error:
            raise bad(f"{token!r} matches no cipher this OpenSSL offers") from None
    try:
        ctx.set_cipher_list(ciphers.encode("ascii"))
    except SSL.Error as e:
        raise bad(f"not a usable OpenSSL cipher list ({_openssl_reason(e)})") from None


def load_server_context(tls: TLSConfig, path: str | None) -> LoadedContext:
    """Build the inbound server context from `[tls]` cert, key, min_version and ciphers.

    `path` is the configuration file, for error messages.  Raises ConfigError when a file
    cannot be read or parsed, the key is encrypted or does not match the certificate, the
    version is unknown, or the cipher list selects nothing."""
    where = path if path is not None else "<defaults>"
    if not tls.cert or not tls.key:
        raise ConfigError.bad_value(where, "tls.cert", tls.cert or "", "not set: no certificate for inbound TLS")
    if tls.min_version not in MIN_VERSIONS:
        raise ConfigError.bad_value(where, "tls.min_version", tls.min_version,
                                    'must be one of "TLSv1.2", "TLSv1.3"')
    cert_pem = _read(tls.cert, "tls.cert", where)
    key_pem = _read(tls.key, "tls.key", where)
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ConfigError.bad_value(where, "tls.cert", tls.cert,
                                    "no PEM certificate in the file") from None
    try:
        key: Any = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError.bad_value(where, "tls.key", tls.key,
                                    "the key is encrypted; txmta needs it without a passphrase "
                                    "(protect the file with its mode instead)") from None
    except Exception:  # ValueError, UnsupportedAlgorithm: not a key we can read
        raise ConfigError.bad_value(where, "tls.key", tls.key, "no PEM private key in the file") from None

    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_options(_OPTIONS)
    ctx.set_min_proto_version(MIN_VERSIONS[tls.min_version])
    _set_ciphers(ctx, tls.ciphers or DEFAULT_CIPHERS, where)
    ctx.set_session_id(b"txmta")   # lets clients resume sessions (server-side cache)
    try:
        ctx.use_certificate(chain[0])
        for extra in chain[1:]:
            ctx.add_extra_chain_cert(extra)
    except SSL.Error as e:
        raise ConfigError.bad_value(where, "tls.cert", tls.cert,
                                    f"certificate refused by OpenSSL ({_openssl_reason(e)})") from None
    try:
        ctx.use_privatekey(key)
        ctx.check_privatekey()
    except (SSL.Error, TypeError, ValueError):
        raise ConfigError.bad_value(where, "tls.key", tls.key,
                                    f"does not match the certificate in tls.cert ({tls.cert})") from None
    leaf = chain[0]
    return LoadedContext(
        context=ctx,
        subject=leaf.subject.rfc4514_string() or "(empty subject)",
        not_after=leaf.not_valid_after_utc,
        fingerprint=leaf.fingerprint(hashes.SHA256()).hex(),
        min_version=tls.min_version,
        ciphers=tls.ciphers,
    )


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """What every listener and STARTTLS give Twisted: new connections from the current context."""

    name = "tls"

    def __init__(self, loaded: LoadedContext) -> None:
        self.current = loaded
        log.info("tls: {what}", what=loaded.describe())

    def serverConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        """IOpenSSLServerConnectionCreator: a connection on the context in use now."""
        return SSL.Connection(self.current.context, None)

    def replace(self, loaded: LoadedContext) -> None:
        """Use `loaded` for every handshake from now on (connections already open keep theirs)."""
        self.current = loaded

    def prepare(self, cfg: Config) -> Callable[[], str]:
        """Build the context `cfg` asks for (may run in a worker thread); the step that
        installs it, returning a line for the log.  Raises ConfigError, and the current
        context stays, when the material or the settings are bad."""
        if not (cfg.tls.cert and cfg.tls.key):
            raise ConfigError.bad_value(cfg.path or "<defaults>", "tls.cert", cfg.tls.cert or "",
                                        "not set any more; TLS stays on (restart to turn it off)")
        loaded = load_server_context(cfg.tls, cfg.path)

        def install() -> str:
            self.replace(loaded)
            return f"reloaded {loaded.describe()}"
        return install
