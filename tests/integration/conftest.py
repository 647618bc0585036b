"""Fixtures for the integration tests (the helpers live in itlib.py).

`start_daemon(**overrides)` / `module_daemons(...)`: running twistd daemons, stopped with
SIGTERM (then SIGKILL) at teardown, their logs printed when a test failed.
`tls_cert`: a self-signed certificate for mx.test.invalid made at test time.
`users_file`: an AUTH users file made with txmta.passwords.hash_password (itlib.USERS).
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from itlib import HOSTNAME, USERS, Cert, Daemon, DaemonPool  # noqa: E402


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep


def _failed(node: Any) -> bool:
    return any(getattr(getattr(node, "rep_" + w, None), "failed", False) for w in ("setup", "call"))


@pytest.fixture
def start_daemon(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Daemon]]:
    """`start_daemon(listeners=[...], **sections)`: a running daemon, stopped at teardown."""
    pool = DaemonPool(tmp_path / "daemons")
    yield pool
    pool.teardown(_failed(request.node))


@pytest.fixture(scope="module")
def module_daemons(tmp_path_factory: pytest.TempPathFactory,
                   request: pytest.FixtureRequest) -> Iterator[DaemonPool]:
    """Like start_daemon, for daemons shared by the tests of a module."""
    pool = DaemonPool(tmp_path_factory.mktemp("daemons"))
    yield pool
    failed = any(_failed(item) for item in request.session.items
                 if item.module is request.module)
    pool.teardown(failed)


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    """A self-signed certificate for mx.test.invalid, made now."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTNAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOSTNAME)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    d = tmp_path_factory.mktemp("tls")
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    os.chmod(d / "key.pem", 0o600)
    return Cert(d / "cert.pem", d / "key.pem")

@pytest.fixture(scope="session")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from txmta.passwords import hash_password
    p = tmp_path_factory.mktemp("auth") / "users"
    p.write_text("# test users\n" + "".join(f"{u}:{hash_password(pw)}\n" for u, pw in USERS.items()),
                 encoding="utf-8")
    return p
