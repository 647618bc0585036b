"""SMTP AUTH credentials: a twisted.cred checker over the `auth.users` file.

The file holds `user:hash` lines made by `txmta passwd` (hashlib.scrypt).  Verifying a
scrypt hash costs tens of milliseconds of CPU, so it runs on a thread pool, never on the
reactor thread (DESIGN invariant 5).  Unknown users cost the same as wrong passwords.
"""
# test: tests/test_server_auth.py

from __future__ import annotations

from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from txmta.passwords import hash_password, verify_password

_DUMMY = None


def _dummy_hash() -> str:
    global _DUMMY
    if _DUMMY is None:
        _DUMMY = hash_password("not a password of anyone")
    return _DUMMY


@implementer(ICredentialsChecker)
class UsersFileChecker:
    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: dict[str, str], reactor: Any, threadpool: Any) -> None:
        self._users = users
        self._reactor = reactor
        self._pool = threadpool

    def _check(self, username: str, password: str) -> bool:
        encoded = self._users.get(username)
        ok = verify_password(password, encoded if encoded is not None else _dummy_hash())
        return ok and encoded is not None

    def requestAvatarId(self, credentials: Any) -> Deferred[str]:
        username = credentials.username
        password = credentials.password
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        d = deferToThreadPool(self._reactor, self._pool, self._check, username, password)

        def done(ok: bool) -> str:
            if not ok:
                raise UnauthorizedLogin()
            return username
        return d.addCallback(done)
