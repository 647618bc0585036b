"""API tokens: the file `[api] tokens` names, what `txmta api-token NAME` adds to it, and the
per-token rate limit.

One token per line, `name:hash`, then options separated by blanks; `#` starts a comment:

    billing:sha256:9f86d0...  domains=example.com,example.net
    ops:sha256:60303a...      scope=send,admin,dashboard
    staging:sha256:fd61a0...  test lane=bulk

The token itself is a random UUID (the form of a Postmark server token, so applications that
check the form of their token accept ours); the file keeps only its SHA-256.  A token has
122 random bits, so a plain hash is enough: nobody can guess one from its hash.

Options: `scope=` what it may do (`send`, the default; `admin`: the queue and suppression
endpoints; `dashboard`: GET / and the read-only status endpoints), `domains=` the sender
domains it may use in From (and their subdomains; default any), `lane=` the one lane its
mail goes to (default: as the request says), `test`: requests are validated and answered as
if sent, nothing is stored (like Postmark's POSTMARK_API_TEST, which always works).

The file is read again when it changes (its mtime and size, looked at no more than once a
second), so a token added with `txmta api-token` works without a reload.  A bad line is
reported with the file and line number and the file's previous contents stay in use.
"""
# test: tests/test_api_tokens.py

from __future__ import annotations

import hashlib
import math
import os
import re
import uuid
from dataclasses import dataclass
from typing import Callable

from twisted.logger import Logger

log = Logger()

SCOPES = ("send", "admin", "dashboard")
TEST_TOKEN = "POSTMARK_API_TEST"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_LANE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class TokenFileError(ValueError):
    pass


@dataclass(frozen=True)
class Token:
    name: str
    scopes: frozenset[str] = frozenset({"send"})
    domains: tuple[str, ...] = ()      # () = any sender domain
    lane: str = ""                     # "" = the request's
    test: bool = False

    def may_send_from(self, domain: str) -> bool:
        if not self.domains:
            return True
        domain = domain.rstrip(".").lower()
        return any(domain == d or domain.endswith("." + d) for d in self.domains)


# Postmark's test token: validates, never delivers, whatever the file says
TEST = Token(TEST_TOKEN, frozenset({"send"}), test=True)


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return str(uuid.uuid4())


def valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None and name != TEST_TOKEN


def format_line(name: str, digest: str, scopes: tuple[str, ...] = ("send",),
                domains: tuple[str, ...] = (), lane: str = "", test: bool = False) -> str:
    options = []
    if tuple(scopes) != ("send",):
        options.append("scope=" + ",".join(scopes))
    if domains:
        options.append("domains=" + ",".join(domains))
    if lane:
        options.append("lane=" + lane)
    if test:
        options.append("test")
    return f"{name}:{digest}" + ("  " + " ".join(options) if options else "")


def parse(text: str, path: str) -> dict[str, Token]:
    """hash -> Token for every line of a tokens file; TokenFileError names the line."""
    tokens: dict[str, Token] = {}
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue

        def bad(why: str) -> TokenFileError:
            return TokenFileError(f"{path}:{number}: {why}")

        head, *options = line.split()
        name, sep, digest = head.partition(":")
        if not sep or not valid_name(name):
            raise bad(f"{head.split(':')[0]!r} is not a token name (letters, digits, . _ -)")
        if not _HASH.fullmatch(digest):
            raise bad("the hash must be sha256: and 64 hex digits (made by txmta api-token)")
        if name in names:
            raise bad(f"token name {name!r} listed twice")
        names.add(name)
        scopes: frozenset[str] = frozenset({"send"})
        domains: tuple[str, ...] = ()
        lane, test = "", False
        for option in options:
            key, eq, value = option.partition("=")
            if key == "test" and not eq:
                test = True
            elif key == "scope" and value:
                given = value.split(",")
                unknown = [s for s in given if s not in SCOPES]
                if unknown:
                    raise bad(f"unknown scope {unknown[0]!r} (known: {', '.join(SCOPES)})")
                scopes = frozenset(given)
            elif key == "domains" and value:
                domains = tuple(d.strip().rstrip(".").lower() for d in value.split(",") if d.strip())
            elif key == "lane" and _LANE.fullmatch(value):
                lane = value
            else:
                raise bad(f"unknown option {option!r} (known: scope=, domains=, lane=, test)")
        tokens[digest] = Token(name, scopes, domains, lane, test)
    return tokens


class TokenStore:
    """The tokens of `[api] tokens`, read again when the file changes.  `clock()` gives
    seconds (the reactor's), for how often the file is looked at."""

    def __init__(self, path: str | None, clock: Callable[[], float]) -> None:
        self.path = path
        self._clock = clock
        self._tokens: dict[str, Token] = {}
        self._stamp: tuple[float, int] | None = None
        self._looked = -math.inf
        self._refresh(force=True)

    def _refresh(self, force: bool = False) -> None:
        if self.path is None:
            return
        now = self._clock()
        if not force and now - self._looked < 1.0:
            return
        stamp = None
        self._looked = now
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime, st.st_size)
            if stamp == self._stamp:
                return
            with open(self.path, encoding="utf-8") as f:
                self._tokens = parse(f.read(), self.path)
        except (OSError, UnicodeDecodeError, TokenFileError) as e:
            if force:
                raise TokenFileError(str(e)) from None
            if stamp != self._stamp:      # said once per change of the file
                log.error("API tokens not reloaded, the previous ones stay: {e}", e=e)
        self._stamp = stamp

    def check(self, presented: str | None) -> Token | None:
        """The token `presented` names, or None (missing or unknown)."""
        if not presented:
            return None
        if presented == TEST_TOKEN:
            return TEST
        self._refresh()
        return self._tokens.get(hash_token(presented))

    def __len__(self) -> int:
        return len(self._tokens)


class RateLimiter:
    """A token bucket per API token: `rate` requests a second, bursts of up to `rate`.
    `take(name, now)` is 0.0 when the request may go, else the seconds until it may."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._buckets: dict[str, tuple[float, float]] = {}   # name -> (tokens, when)

    def take(self, name: str, now: float) -> float:
        if self.rate <= 0:
            return 0.0
        level, when = self._buckets.get(name, (self.rate, now))
        level = min(self.rate, level + (now - when) * self.rate)
        if level >= 1.0:
            self._buckets[name] = (level - 1.0, now)
            return 0.0
        self._buckets[name] = (level, now)
        return (1.0 - level) / self.rate


def add_token(path: str, name: str, scopes: tuple[str, ...] = ("send",),
              domains: tuple[str, ...] = (), lane: str = "", test: bool = False) -> str:
    """Make a token, append its line to `path` (created 0600 if missing); returns the token.
    ValueError when the name is bad or taken."""
    if not valid_name(name):
        raise ValueError(f"{name!r} is not a token name (letters, digits, . _ -, at most 64)")
    for s in scopes:
        if s not in SCOPES:
            raise ValueError(f"unknown scope {s!r} (known: {', '.join(SCOPES)})")
    if lane and not _LANE.fullmatch(lane):
        raise ValueError(f"{lane!r} is not a lane name")
    existing = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            existing = f.read()
        if any(t.name == name for t in parse(existing, path).values()):
            raise ValueError(f"a token named {name!r} is already in {path}")
    token = new_token()
    line = format_line(name, hash_token(token), scopes, domains, lane, test)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        if existing and not existing.endswith("\n"):
            f.write("\n")
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    return token
