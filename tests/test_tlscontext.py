"""The inbound TLS context (txmta/inbound/tlscontext.py): versions, ciphers, certificate
material and its replacement, checked with real handshakes over loopback TCP.

The server side is `ServerTLS.serverConnectionForTLS()`, the very call Twisted's TLS layer
makes, pumped over a socket by a thread (memory BIOs, as Twisted does); the client is
Python's `ssl`.  Refusals are asserted on the *server's* error (e.g. "unsupported protocol"),
and each refusal has a control: the same client against a permissive server succeeds, so the
test shows that our server refused, not that the system's OpenSSL stopped the client.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from txmta.config import ConfigError, TLSConfig, load_text
from txmta.inbound.tlscontext import DEFAULT_CIPHERS, ServerTLS, load_server_context

HOST = "mx.test.invalid"


# -- certificates made at test time --------------------------------------------------------------

@dataclass
class Pem:
    cert: Path
    key: Path
    fingerprint: bytes     # SHA-256 of the leaf, as the client sees it


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(directory: Path, label: str, *, rsa_key: bool = False, issuer: Any = None,
              key_password: bytes | None = None) -> tuple[Pem, Any, Any]:
    """A certificate for HOST (self-signed, or signed by `issuer` = (cert, key)) in
    directory/label.{crt,key}; returns (Pem, certificate, private key)."""
    key: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048) if rsa_key \
        else ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(f"{label}.{HOST}" if issuer is None else HOST))
            .issuer_name(issuer_cert.subject if issuer_cert is not None else _name(f"{label}.{HOST}"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
            .sign(issuer_key, hashes.SHA256()))
    encryption: Any = (serialization.BestAvailableEncryption(key_password) if key_password
                       else serialization.NoEncryption())
    crt, kf = directory / f"{label}.crt", directory / f"{label}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kf.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     encryption))
    return Pem(crt, kf, cert.fingerprint(hashes.SHA256())), cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pem]:
    d = tmp_path_factory.mktemp("tlsctx")
    a, _, _ = make_cert(d, "a")
    b, _, _ = make_cert(d, "b", rsa_key=True)
    ca, ca_cert, ca_key = make_cert(d, "ca")
    leaf, _, _ = make_cert(d, "leaf", issuer=(ca_cert, ca_key))
    chain = d / "chain.crt"
    chain.write_bytes(leaf.cert.read_bytes() + ca.cert.read_bytes())
    enc, _, _ = make_cert(d, "enc", key_password=b"secret")
    return {"a": a, "b": b, "ca": ca, "chain": Pem(chain, leaf.key, leaf.fingerprint), "enc": enc}


def server_for(pem: Pem, **kw: Any) -> ServerTLS:
    return ServerTLS(load_server_context(TLSConfig(cert=str(pem.cert), key=str(pem.key), **kw), "test.toml"))


# -- one handshake over loopback ------------------------------------------------------------------

@dataclass
class Result:
    server_version: str | None = None
    server_cipher: str | None = None
    server_error: str | None = None
    client_version: str | None = None
    client_cipher: str | None = None
    client_error: str | None = None
    peer_fingerprint: bytes | None = None
    peer_chain_length: int = 0


def _server_side(listener: socket.socket, make_connection: Any, result: Result) -> None:
    sock, _ = listener.accept()
    sock.settimeout(5)
    conn = make_connection()
    conn.set_accept_state()

    def flush() -> None:
        while True:
            try:
                out = conn.bio_read(65536)
            except SSL.WantReadError:
                return
            sock.sendall(out)
    try:
        while True:
            try:
                conn.do_handshake()
                flush()
                result.server_version = conn.get_protocol_version_name()
                result.server_cipher = conn.get_cipher_name()
                return
            except SSL.WantReadError:
                flush()
                data = sock.recv(65536)
                if not data:
                    result.server_error = "client closed the connection"
                    return
                conn.bio_write(data)
    except SSL.Error as e:
        result.server_error = "; ".join(str(x[2]) for x in e.args[0]) if e.args and e.args[0] else repr(e)
        try:
            flush()     # the alert
        except OSError:
            pass
    except OSError as e:
        result.server_error = repr(e)
    finally:
        sock.close()


def handshake(make_connection: Any, client: ssl.SSLContext) -> Result:
    """Connect `client` over 127.0.0.1 to a one-shot server whose connection comes from
    `make_connection()`; what each side saw."""
    result = Result()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        t = threading.Thread(target=_server_side, args=(listener, make_connection, result))
        t.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=5) as raw:
                with client.wrap_socket(raw, server_hostname=HOST) as tls:
                    result.client_version = tls.version()
                    result.client_cipher = tls.cipher()[0]  # type: ignore[index]
                    der = tls.getpeercert(binary_form=True)
                    result.peer_fingerprint = x509.load_der_x509_certificate(der).fingerprint(hashes.SHA256())
                    chain = tls.get_unverified_chain() if hasattr(tls, "get_unverified_chain") else None
                    result.peer_chain_length = len(chain) if chain else 0
        except (ssl.SSLError, OSError) as e:
            result.client_error = repr(e)
        finally:
            t.join(10)
        assert not t.is_alive(), "server side did not finish"
    return result


def ours(server: ServerTLS) -> Any:
    return lambda: server.serverConnectionForTLS(None)


def permissive(pem: Pem) -> Any:
    """A server that takes anything the client can do: TLS 1.0 and up, every cipher."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_VERSION)
    ctx.set_cipher_list(b"ALL:@SECLEVEL=0")
    ctx.use_certificate_file(str(pem.cert))
    ctx.use_privatekey_file(str(pem.key))
    return lambda: SSL.Connection(ctx, None)


def client(version: ssl.TLSVersion | None = None, ciphers: str | None = None) -> ssl.SSLContext:
    """An unverifying client limited to `version`, at security level 0 when it is an old one
    (the system OpenSSL would otherwise refuse TLS 1.0/1.1 itself)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if version is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)   # TLSv1 and TLSv1_1 are deprecated
            ctx.minimum_version = version
            ctx.maximum_version = version
    if version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    return ctx


# -- versions (RFC 8996, RFC 9325 3.1.1) ----------------------------------------------------------

@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1],
                         ids=["TLSv1.0", "TLSv1.1"])
def test_tls_1_0_and_1_1_clients_are_refused(certs, version):
    """A client that can only do TLS 1.0 or 1.1 fails the handshake: our server refuses the
    version; the same client succeeds against a permissive server."""
    control = handshake(permissive(certs["a"]), client(version))
    assert control.client_error is None and control.server_version in ("TLSv1", "TLSv1.1"), control
    r = handshake(ours(server_for(certs["a"])), client(version))
    assert r.client_version is None, r
    assert r.server_error is not None and "unsupported protocol" in r.server_error, r


@pytest.mark.parametrize("version,name", [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"),
                                          (ssl.TLSVersion.TLSv1_3, "TLSv1.3")])
def test_tls_1_2_and_1_3_clients_succeed(certs, version, name):
    """TLS 1.2 and 1.3 clients complete the handshake and see our certificate."""
    r = handshake(ours(server_for(certs["a"])), client(version))
    assert r.client_error is None, r
    assert (r.client_version, r.server_version) == (name, name)
    assert r.peer_fingerprint == certs["a"].fingerprint


def test_min_version_tls13_refuses_tls12(certs):
    """min_version = "TLSv1.3": a TLS 1.2 client is refused by the server, a 1.3 client is served."""
    server = server_for(certs["a"], min_version="TLSv1.3")
    r = handshake(ours(server), client(ssl.TLSVersion.TLSv1_2))
    assert r.client_version is None
    assert r.server_error is not None and "unsupported protocol" in r.server_error, r
    ok = handshake(ours(server), client(ssl.TLSVersion.TLSv1_3))
    assert ok.server_version == "TLSv1.3", ok


# -- ciphers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("weak", [
    "ECDHE-ECDSA-AES128-SHA",      # CBC with SHA-1 MAC
    "ECDHE-ECDSA-AES256-SHA384",   # CBC
])
def test_weak_cipher_offered_alone_is_refused(certs, weak):
    """A TLS 1.2 client offering only a non-AEAD cipher gets no shared cipher from us;
    a server with OpenSSL's own defaults would have accepted it."""
    control = handshake(permissive(certs["a"]), client(ssl.TLSVersion.TLSv1_2, weak))
    assert control.server_cipher == weak, control
    r = handshake(ours(server_for(certs["a"])), client(ssl.TLSVersion.TLSv1_2, weak))
    assert r.client_version is None
    assert r.server_error is not None and "no shared cipher" in r.server_error, r


def test_static_rsa_key_exchange_is_refused(certs):
    """No forward secrecy, no service: an RSA key exchange suite alone is refused (RSA cert)."""
    weak = "AES128-GCM-SHA256"
    control = handshake(permissive(certs["b"]), client(ssl.TLSVersion.TLSv1_2, weak))
    assert control.server_cipher == weak, control
    r = handshake(ours(server_for(certs["b"])), client(ssl.TLSVersion.TLSv1_2, weak))
    assert r.server_error is not None and "no shared cipher" in r.server_error, r


@pytest.mark.parametrize("pem,expected", [("a", "ECDHE-ECDSA-AES256-GCM-SHA384"),
                                          ("b", "ECDHE-RSA-AES256-GCM-SHA384")])
def test_server_cipher_order_wins(certs, pem, expected):
    """The client lists AES128 first; the server's order (AES256-GCM first) decides."""
    offer = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
             "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384")
    r = handshake(ours(server_for(certs[pem])), client(ssl.TLSVersion.TLSv1_2, offer))
    assert r.server_cipher == expected, r


def test_chacha20_is_served_to_a_client_without_aes_gcm(certs):
    """A client that offers only ChaCha20-Poly1305 is served (the built-in list has it)."""
    r = handshake(ours(server_for(certs["a"])),
                  client(ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-CHACHA20-POLY1305"))
    assert r.server_cipher == "ECDHE-ECDSA-CHACHA20-POLY1305", r


def test_configured_cipher_list_is_used(certs):
    """[tls] ciphers replaces the built-in list for TLS 1.2."""
    server = server_for(certs["a"], ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    r = handshake(ours(server), client(ssl.TLSVersion.TLSv1_2))
    assert r.server_cipher == "ECDHE-ECDSA-AES128-GCM-SHA256", r
    refused = handshake(ours(server), client(ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES256-GCM-SHA384"))
    assert refused.server_error is not None and "no shared cipher" in refused.server_error


def test_default_cipher_list_is_ecdhe_aead_only():
    """The built-in list: every suite ECDHE, every suite AES-GCM or ChaCha20-Poly1305."""
    for suite in DEFAULT_CIPHERS.split(":"):
        assert suite.startswith("ECDHE-"), suite
        assert "GCM" in suite or "CHACHA20-POLY1305" in suite, suite


@pytest.mark.parametrize("ciphers,named", [
    ("NOPE", "NOPE"),
    ("ECDHE-ECDSA-AES128-GCM-SHA256:TYPO-CIPHER", "TYPO-CIPHER"),
    ("!aNULL", None),              # excludes only: selects nothing
    ("RC4-MD5", "RC4-MD5"),        # gone from OpenSSL 3
    ("ECDHE-ECDSA-AES128-GCM-SHA256\n", None),
])
def test_bad_cipher_string_is_a_config_error_naming_tls_ciphers(certs, ciphers, named):
    """A cipher list that selects nothing, or has an element that matches no cipher, is a
    ConfigError naming the file, tls.ciphers and the value."""
    with pytest.raises(ConfigError) as e:
        server_for(certs["a"], ciphers=ciphers)
    assert e.value.key == "tls.ciphers"
    assert e.value.value == ciphers
    assert str(e.value).startswith("test.toml: tls.ciphers = ")
    if named:
        assert repr(named) in str(e.value)


def test_cipher_aliases_and_exclusions_are_accepted(certs):
    """OpenSSL's own grammar (aliases, +, !) stays usable."""
    server = server_for(certs["a"], ciphers="ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:@STRENGTH")
    r = handshake(ours(server), client(ssl.TLSVersion.TLSv1_2))
    assert r.server_cipher is not None and r.server_cipher.startswith("ECDHE-ECDSA-"), r


# -- certificate material ------------------------------------------------------------------------

def test_full_chain_is_served(certs):
    """A cert file holding leaf + intermediate serves both; the leaf is the peer certificate."""
    r = handshake(ours(server_for(certs["chain"])), client())
    assert r.peer_fingerprint == certs["chain"].fingerprint
    if hasattr(ssl.SSLSocket, "get_unverified_chain"):   # Python 3.13+
        assert r.peer_chain_length == 2


def _bad(tls: TLSConfig) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        load_server_context(tls, "test.toml")
    return e.value


def test_key_not_matching_the_certificate_is_refused(certs):
    e = _bad(TLSConfig(cert=str(certs["a"].cert), key=str(certs["b"].key)))
    assert e.key == "tls.key" and "does not match" in str(e) and str(certs["a"].cert) in str(e)


def test_garbage_key_is_refused(certs, tmp_path):
    junk = tmp_path / "junk.key"
    junk.write_text("-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    e = _bad(TLSConfig(cert=str(certs["a"].cert), key=str(junk)))
    assert (e.key, e.value) == ("tls.key", str(junk))
    assert "no PEM private key" in str(e)


def test_garbage_certificate_is_refused(certs, tmp_path):
    junk = tmp_path / "junk.crt"
    junk.write_bytes(b"hello\n")
    e = _bad(TLSConfig(cert=str(junk), key=str(certs["a"].key)))
    assert (e.key, e.value) == ("tls.cert", str(junk))


def test_encrypted_key_is_refused_without_prompting(certs):
    """A passphrase-protected key is an error, not a prompt on the daemon's terminal."""
    e = _bad(TLSConfig(cert=str(certs["enc"].cert), key=str(certs["enc"].key)))
    assert e.key == "tls.key" and "encrypted" in str(e)


def test_unreadable_file_is_refused(certs, tmp_path):
    e = _bad(TLSConfig(cert=str(tmp_path / "gone.crt"), key=str(certs["a"].key)))
    assert e.key == "tls.cert" and "cannot read" in str(e)


def test_describe_names_the_certificate(certs):
    loaded = load_server_context(TLSConfig(cert=str(certs["a"].cert), key=str(certs["a"].key)), None)
    text = loaded.describe()
    assert f"CN=a.{HOST}" in text and certs["a"].fingerprint.hex()[:16] in text
    assert "TLSv1.2 or newer" in text and "ciphers built-in" in text


# -- replacement (the SIGHUP path, without the signal) ------------------------------------------

def _config(pem: Pem, extra: str = "") -> Any:
    return load_text(f'[tls]\ncert = "{pem.cert}"\nkey = "{pem.key}"\n{extra}\n'
                     '[[listen]]\naddress = "127.0.0.1:2525"\ntls = "implicit"\n', "reload.toml")


def test_replace_serves_new_connections_with_the_new_certificate(certs):
    """After prepare()+install, new handshakes get the new certificate; a connection made
    before keeps the old context."""
    server = server_for(certs["a"])
    before = server.serverConnectionForTLS(None)
    assert handshake(ours(server), client()).peer_fingerprint == certs["a"].fingerprint
    install = server.prepare(_config(certs["b"]))
    assert handshake(ours(server), client()).peer_fingerprint == certs["a"].fingerprint  # not yet
    line = install()
    assert f"CN=b.{HOST}" in line
    assert handshake(ours(server), client()).peer_fingerprint == certs["b"].fingerprint
    r = handshake(lambda: before, client())
    assert r.peer_fingerprint == certs["a"].fingerprint


def test_prepare_applies_new_version_and_ciphers(certs):
    server = server_for(certs["a"])
    server.prepare(_config(certs["a"], 'min_version = "TLSv1.3"'))()
    r = handshake(ours(server), client(ssl.TLSVersion.TLSv1_2))
    assert r.server_error is not None and "unsupported protocol" in r.server_error


@pytest.mark.parametrize("change", ["garbage key", "mismatched key", "bad ciphers"])
def test_failed_prepare_keeps_the_current_context(certs, tmp_path, change):
    server = server_for(certs["a"])
    junk = tmp_path / "junk.key"
    junk.write_text("garbage\n")
    cfg = {"garbage key": lambda: _config(Pem(certs["b"].cert, junk, b"")),
           "mismatched key": lambda: _config(Pem(certs["b"].cert, certs["a"].key, b"")),
           "bad ciphers": lambda: _config(certs["b"], 'ciphers = "NOPE"')}[change]()
    with pytest.raises(ConfigError) as e:
        server.prepare(cfg)
    assert str(e.value).startswith("reload.toml: tls.")
    assert handshake(ours(server), client()).peer_fingerprint == certs["a"].fingerprint


def test_prepare_without_certificate_is_refused(certs):
    """Dropping [tls] cert from the file does not turn TLS off under running listeners."""
    server = server_for(certs["a"])
    with pytest.raises(ConfigError) as e:
        server.prepare(load_text("", "reload.toml"))
    assert e.value.key == "tls.cert" and "restart" in str(e.value)


# -- check-config ---------------------------------------------------------------------------------

def test_check_config_reports_bad_tls_material(certs, tmp_path, capsys):
    """`txmta check-config` builds the TLS context too: a bad cipher list or a key that does
    not match exits 1 with the file, key and value, as the daemon would refuse to start."""
    from txmta import cli
    f = tmp_path / "t.toml"
    f.write_text(f'[tls]\ncert = "{certs["a"].cert}"\nkey = "{certs["a"].key}"\nciphers = "NOPE"\n')
    assert cli.main(["check-config", str(f)]) == 1
    assert capsys.readouterr().err.startswith(f'{f}: tls.ciphers = "NOPE": ')
    f.write_text(f'[tls]\ncert = "{certs["a"].cert}"\nkey = "{certs["b"].key}"\n')
    assert cli.main(["check-config", str(f)]) == 1
    assert f'{f}: tls.key = "{certs["b"].key}": does not match' in capsys.readouterr().err
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    f.write_text(f'[tls]\ncert = "{certs["a"].cert}"\nkey = "{certs["a"].key}"\n'
                 f'[[listen]]\naddress = "127.0.0.1:{port}"\n')
    assert cli.main(["check-config", str(f)]) == 0
    assert capsys.readouterr().out.startswith(f"{f}: OK")    # (a hostname warning here)
