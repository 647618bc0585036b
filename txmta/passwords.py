"""Password hashes for SMTP AUTH and the users file that holds them.

A hash is `scrypt$<log2 N>$<r>$<p>$<salt, base64>$<key, base64>` (hashlib.scrypt with
N=2**14, r=8, p=1, a 16-byte random salt and a 32-byte key).  `verify_password` compares
in constant time and answers False, never raises, for a malformed or over-expensive
hash.  The users file has one `user:hash` per line; blank lines and lines starting
with `#` are skipped; a bad line is a `ConfigError` naming the file and line number.

Does not decide who may log in (inbound.policy and twisted.cred do) and does not watch
the file for changes; the daemon loads it once at start.
"""
# test: tests/test_passwords.py

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

from txmta.config import ConfigError

_LOG2_N, _R, _P = 14, 8, 1
_SALT_BYTES = 16
_KEY_BYTES = 32
_MAX_MEMORY = 256 * 1024 * 1024     # refuse hashes that would need more scrypt memory


def hash_password(password: str) -> str:
    """A new salted scrypt hash of `password`, in the users-file format."""
    salt = os.urandom(_SALT_BYTES)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=2 ** _LOG2_N, r=_R, p=_P,
                         dklen=_KEY_BYTES)
    return "$".join(("scrypt", str(_LOG2_N), str(_R), str(_P),
                     base64.b64encode(salt).decode("ascii"), base64.b64encode(key).decode("ascii")))


def _parse(encoded: str) -> tuple[int, int, int, bytes, bytes] | None:
    """(log2 N, r, p, salt, key) of a well-formed, affordable hash; None otherwise."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return None
    if not all(p.isascii() and p.isdigit() for p in parts[1:4]):
        return None
    log2_n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
    if not (1 <= log2_n <= 24 and 1 <= r <= 64 and 1 <= p <= 16):
        return None
    if 128 * r * (2 ** log2_n) * p > _MAX_MEMORY:
        return None
    try:
        salt = base64.b64decode(parts[4], validate=True)
        key = base64.b64decode(parts[5], validate=True)
    except (binascii.Error, ValueError):
        return None
    if not salt or len(key) < 16:
        return None
    return log2_n, r, p, salt, key


def verify_password(password: str, encoded: str) -> bool:
    """True when `password` matches `encoded`; False when it does not or `encoded` is malformed."""
    parsed = _parse(encoded)
    if parsed is None:
        return False
    log2_n, r, p, salt, key = parsed
    try:
        candidate = hashlib.scrypt(password.encode("utf-8", "surrogatepass"), salt=salt,
                                   n=2 ** log2_n, r=r, p=p, dklen=len(key),
                                   maxmem=_MAX_MEMORY + 16 * 1024 * 1024)
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(candidate, key)


def load_users(path: str) -> dict[str, str]:
    """user -> hash from the users file at `path`.  Raises ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}", path=path) from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8: {e}", path=path) from e
    users: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        user, sep, encoded = text.partition(":")
        where = f"{path}:{number}"
        if not sep or not user:
            raise ConfigError(f"{where}: expected \"user:hash\"", path=path, key=f"line {number}")
        if any(c.isspace() for c in user):
            raise ConfigError(f"{where}: user name {user!r} contains white space", path=path,
                              key=f"line {number}")
        if _parse(encoded) is None:
            raise ConfigError(f"{where}: user {user!r}: not a scrypt hash from `txmta passwd`",
                              path=path, key=f"line {number}")
        if user in users:
            raise ConfigError(f"{where}: user {user!r} is listed twice", path=path,
                              key=f"line {number}")
        users[user] = encoded
    return users
