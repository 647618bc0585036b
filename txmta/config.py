"""Reads the txmta configuration: one TOML file -> frozen dataclasses.

Every option, its default and its converter sit in ONE table (`_TABLE`); the file
overrides the defaults; everything is validated here, at load, so the daemon never
meets a bad value later.  Unknown sections or keys, wrong types, bad values, unreadable
files and TOML syntax errors raise `ConfigError`, whose text names the file, the dotted
key and the value, e.g.::

    etc/txmta.toml: listen[0].tls = "tls13": must be one of "none", "starttls", "implicit"

Sizes ("35MiB") and durations ("5m", "1h30m") are strings with units.  Paths stay as
written (relative paths are relative to the working directory).

Pure apart from reading the configuration file and checking that the files it names
(TLS certificate and key, CA file, AUTH users) can be opened for reading.  It does not
parse those files, bind sockets or open the spool.  Each option is documented once in
`man/txmta.toml.5` and in the sample `etc/txmta.toml`.
"""
# test: tests/test_config.py

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable

from txmta.hostport import split_host_port  # noqa: E402,F401 (also public here)
from txmta.lanes import DSN_POLICIES, Lane, Lanes
from txmta.outbound.ippool import METHODS, IPPool, PoolAddress

ShapingRule = Any    # txmta.outbound.shaping.Rule (imported where used: config stays light)

DEFAULT_PATH = "/etc/txmta/txmta.toml"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_MISSING: Any = object()


class ConfigError(Exception):
    """A configuration that cannot be used.  `str()` names the file, the key and the value."""

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None,
                 value: Any = _MISSING, reason: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.key = key
        self.value = None if value is _MISSING else value
        self.reason = reason

    @classmethod
    def bad_value(cls, path: str, key: str, value: Any, reason: str) -> "ConfigError":
        if value is _MISSING:
            message = f"{path}: {key}: {reason}"
        else:
            message = f"{path}: {key} = {_toml_repr(value)}: {reason}"
        return cls(message, path=path, key=key, value=value, reason=reason)


def _toml_repr(value: Any) -> str:
    """The value as it would be written in TOML, so the message matches the file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_repr(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_repr(v)}" for k, v in value.items()) + "}"
    return str(value)


# -- sizes and durations --------------------------------------------------------------

_SIZE_UNITS = {"": 1, "b": 1,
               "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
               "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from "35MiB", "10MB", "512KiB", "1GiB", "100" (bytes) or "100B".

    KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB powers of 1000; units are
    case-insensitive.  Raises ValueError for anything else.
    """
    m = _SIZE_RE.match(text)
    if m is None or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (write e.g. \"35MiB\", \"10MB\", \"512KiB\", \"100\")")
    try:
        return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    except OverflowError:
        raise ValueError(f"size too large: {text!r}") from None


_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds from "30s", "5m", "1h", "5d", "1w", "1h30m", "0" or a bare number of seconds.

    Raises ValueError for anything else.
    """
    s = text.strip()
    try:
        value = float(s)
    except ValueError:
        pass
    else:
        if value < 0 or value != value or value == float("inf"):
            raise ValueError(f"not a duration: {text!r}")
        return value
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
        pos = m.end()
    if pos == 0 or pos != len(s):
        raise ValueError(f"not a duration: {text!r} (write e.g. \"30s\", \"5m\", \"1h30m\", \"5d\")")
    return total


# -- converters: TOML value -> Python value, raising ValueError with the reason ---------

Convert = Callable[[Any], Any]


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _optional_path(value: Any) -> str | None:
    return _string(value) or None


def _category(value: Any) -> str:
    from txmta.categories import CATEGORIES
    text = _string(value)
    if text not in CATEGORIES:
        raise ValueError("must be one of " + ", ".join(f'"{c}"' for c in CATEGORIES))
    return text


# [suppression] ttl_by_category: a "bad-domain" failure often comes from our own resolver,
# so it suppresses for a short time only
_TTL_BY_CATEGORY = {"bad-domain": "1d", "invalid-recipient": "90d"}


def _ttls(value: Any) -> tuple[tuple[str, float], ...]:
    """A table category = duration, merged over the default one: ((category, seconds), ...)."""
    if not isinstance(value, dict):
        raise ValueError('must be a table of category = duration, e.g. { "bad-domain" = "1d" }')
    out: dict[str, float] = {}
    for category, duration in {**_TTL_BY_CATEGORY, **value}.items():
        try:
            _category(category)
            seconds = _duration(positive=True)(duration)
        except ValueError as e:
            raise ValueError(f'"{category}": {e}') from None
        out[category] = seconds
    return tuple(sorted(out.items()))


def _bounce_rules(value: Any) -> tuple[Any, ...]:
    from txmta.categories import parse_rules
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError("must be an array of tables, written [[bounce.rules]]")
    return tuple(parse_rules(value))


def _source_address(value: Any) -> str:
    text = _string(value)
    if text:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise ValueError("must be an IP address of this host") from None
    return text


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a cpuset or `taskset` narrows it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _workers(value: Any) -> int:
    """[server] workers: "auto" (one per CPU core) or 1..PARTITIONS (a worker owns at least
    one partition of the spool)."""
    from txmta.partition import PARTITIONS
    if value == "auto":
        return max(1, min(usable_cpus(), PARTITIONS))
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= PARTITIONS:
        raise ValueError(f'must be "auto" or an integer 1-{PARTITIONS}')
    return value


def _user(value: Any) -> str:
    """A user name (or number) of this system, "" for none."""
    import pwd
    text = _string(value)
    if text:
        try:
            pwd.getpwnam(text) if not text.isdigit() else pwd.getpwuid(int(text))
        except KeyError:
            raise ValueError("no such user on this system") from None
    return text


def _group(value: Any) -> str:
    """A group name (or number) of this system, "" for the user's primary group."""
    import grp
    text = _string(value)
    if text:
        try:
            grp.getgrnam(text) if not text.isdigit() else grp.getgrgid(int(text))
        except KeyError:
            raise ValueError("no such group on this system") from None
    return text


def _integer(low: int, high: int | None = None) -> Convert:
    def convert(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError("must be an integer")
        if value < low or (high is not None and value > high):
            raise ValueError(f"must be at least {low}" if high is None else f"must be {low}-{high}")
        return value
    return convert


def _size(minimum: int = 0) -> Convert:
    def convert(value: Any) -> int:
        if not isinstance(value, str):
            raise ValueError("must be a string with a unit, e.g. \"35MiB\"")
        n = parse_size(value)
        if n < minimum:
            raise ValueError("must be greater than 0" if minimum == 1 else f"must be at least {minimum}")
        return n
    return convert


def _duration(positive: bool = False) -> Convert:
    def convert(value: Any) -> float:
        if not isinstance(value, str):
            raise ValueError("must be a string with a unit, e.g. \"5m\"")
        seconds = parse_duration(value)
        if positive and seconds <= 0:
            raise ValueError("must be greater than 0")
        return seconds
    return convert


def _choice(*options: str) -> Convert:
    def convert(value: Any) -> str:
        if value not in options:
            raise ValueError("must be one of " + ", ".join(f'"{o}"' for o in options))
        return str(value)
    return convert


def _list_of(item: Convert, non_empty: bool = False) -> Convert:
    def convert(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ValueError("must be an array")
        if non_empty and not value:
            raise ValueError("must not be empty")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(item(v))
            except ValueError as e:
                raise ValueError(f"entry {i} ({_toml_repr(v)}): {e}") from e
        return tuple(out)
    return convert


def _network(value: Any) -> IPNetwork:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise ValueError(f"not a CIDR network: {e}") from e


def _nameserver(value: Any) -> str:
    text = _string(value)
    host, _ = split_host_port(text, 53)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("must be an IP address, \"ip:port\" or \"[v6]:port\"") from None
    return text


def _relayhost_text(value: Any) -> str:
    text = _string(value)
    if text:
        from txmta.outbound.route import parse_relayhost
        split_host_port(text, 25)  # the configuration's grammar (IPv6 in brackets)
        parse_relayhost(text)      # and the daemon's own checks: what passes here, routes
    return text


def _relayhost(value: Any) -> str | list[dict[str, Any]]:
    """[delivery] relayhost: one relayhost in Postfix syntax (a string), or the failover list
    (an array of tables, checked by `_relay_list`)."""
    if isinstance(value, list):
        if not value or not all(isinstance(v, dict) for v in value):
            raise ValueError("must be a string, or a non-empty array of tables written "
                             "[[delivery.relayhost]]")
        return value
    if not isinstance(value, str):
        raise ValueError("must be a string, or an array of tables written [[delivery.relayhost]]")
    return _relayhost_text(value)


@dataclass(frozen=True)
class RelayHost:
    """One relayhost: where (Postfix syntax, as route.parse_relayhost reads it), its name in
    `txmta status` and the metrics, its AUTH and its TLS level."""
    spec: str                       # "[host]:port", "host", "192.0.2.1:587", "[::1]:25"
    name: str                       # e.g. "relay0"
    username: str = ""
    password_file: str | None = None
    tls: str = "may"                # none | may | encrypt | verify


RELAY_KEYS = ("name", "host", "port", "username", "password_file", "tls")
_RELAY_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")


def _relay_list(entries: list[dict[str, Any]], bad: Callable[[str, Any, str], "ConfigError"]
                ) -> tuple[RelayHost, ...]:
    """The tables of `relayhost = [{host = ..., port = ...}, ...]` (or [[delivery.relayhost]])."""
    from txmta.outbound.route import parse_relayhost
    out: list[RelayHost] = []
    for i, entry in enumerate(entries):
        prefix = f"delivery.relayhost[{i}]"
        for k in entry:
            if k not in RELAY_KEYS:
                raise bad(f"{prefix}.{k}", entry[k], "unknown key (known: " + ", ".join(RELAY_KEYS) + ")")
        if "host" not in entry:
            raise bad(f"{prefix}.host", _MISSING, "required")
        host = entry["host"]
        try:
            spec = _relayhost_text(host)
            if not spec:
                raise ValueError("must not be empty")
        except ValueError as e:
            raise bad(f"{prefix}.host", host, str(e)) from None
        if "port" in entry:
            try:
                port = _integer(1, 65535)(entry["port"])
            except ValueError as e:
                raise bad(f"{prefix}.port", entry["port"], str(e)) from None
            if parse_relayhost(spec).explicit_port:
                raise bad(f"{prefix}.port", port, "the host already names a port")
            bare = spec.strip()
            if ":" in bare and not bare.startswith("["):   # an IPv6 literal
                bare = f"[{bare}]"
            spec = f"{bare}:{port}"
        values: dict[str, Any] = {}
        for k, convert, default in (("name", _string, f"relay{i}"), ("username", _string, ""),
                                    ("password_file", _optional_path, ""),
                                    ("tls", _choice("none", "may", "encrypt", "verify"), "may")):
            try:
                values[k] = convert(entry.get(k, default))
            except ValueError as e:
                raise bad(f"{prefix}.{k}", entry[k], str(e)) from None
        if not _RELAY_NAME.fullmatch(values["name"]):
            raise bad(f"{prefix}.name", values["name"],
                      "must be a letter, then letters, digits, '_' or '-' (up to 32)")
        if values["username"] and not values["password_file"]:
            raise bad(f"{prefix}.password_file", _MISSING, f"required with {prefix}.username")
        if values["password_file"]:
            _check_readable(values["password_file"], lambda reason, k=f"{prefix}.password_file",
                            f=values["password_file"]: bad(k, f, reason))
        for other in out:
            if other.name == values["name"]:
                raise bad(f"{prefix}.name", values["name"], "listed twice")
            a, b = parse_relayhost(other.spec), parse_relayhost(spec)
            if (a.host, a.port, a.lookup_mx) == (b.host, b.port, b.lookup_mx):
                raise bad(f"{prefix}.host", host, f"listed twice (also {other.name})")
        out.append(RelayHost(spec, values["name"], values["username"], values["password_file"],
                             values["tls"]))
    return tuple(out)


TLS_LEVELS = ("none", "may", "encrypt", "verify", "dane", "mta-sts")
DKIM_ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
HTTP_SERVES = ("api", "metrics", "dashboard")
WEBHOOK_EVENTS = ("received", "deferred", "delivered", "bounced", "expired", "suppressed")


def _domain(value: Any) -> str:
    text = _string(value).strip().rstrip(".").lower()
    try:
        ascii_form = text.encode("idna").decode("ascii")
    except UnicodeError:
        ascii_form = ""
    if not re.fullmatch(r"[a-z0-9-]{1,63}(\.[a-z0-9-]{1,63})*", ascii_form):
        raise ValueError("must be a domain name, e.g. \"example.org\"")
    return text


@dataclass(frozen=True)
class TLSPolicyEntry:
    domain: str             # lower-case, no trailing dot
    level: str              # one of TLS_LEVELS


def _tls_policies(value: Any) -> tuple[TLSPolicyEntry, ...]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ValueError("must be an array of tables, written [[tls.policy]]")
    out: list[TLSPolicyEntry] = []
    seen: set[str] = set()
    for i, entry in enumerate(value):
        unknown = set(entry) - {"domain", "level"}
        if unknown:
            raise ValueError(f"entry {i}: unknown key {sorted(unknown)[0]!r} (known: domain, level)")
        if "domain" not in entry or "level" not in entry:
            raise ValueError(f"entry {i}: needs domain and level")
        try:
            domain = _domain(entry["domain"])
            level = _choice(*TLS_LEVELS)(entry["level"])
        except ValueError as e:
            raise ValueError(f"entry {i} ({_toml_repr(entry)}): {e}") from None
        if domain in seen:
            raise ValueError(f"entry {i}: domain {domain!r} listed twice")
        seen.add(domain)
        out.append(TLSPolicyEntry(domain, level))
    return tuple(out)


def _webhook_url(value: Any) -> str:
    from urllib.parse import urlsplit
    text = _string(value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return text


def _lane_name(value: Any) -> str:
    text = _string(value)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", text):
        raise ValueError("must be a name of letters, digits, '.', '_' or '-' (up to 64)")
    return text


def _mx_suffix(value: Any) -> str:
    text = _string(value).strip().lower().rstrip(".")
    if not re.fullmatch(r"\.?[a-z0-9-]+(\.[a-z0-9-]+)*", text):
        raise ValueError("must be a host name suffix, e.g. \".google.com\"")
    return text if text.startswith(".") else "." + text


def _rate(value: Any) -> float:
    from txmta.outbound.shaping import parse_rate
    return parse_rate(_string(value))


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a number between 0 and 1, e.g. 0.5")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError("must be between 0 and 1")
    return float(value)


def _pool_addresses(value: Any) -> tuple[PoolAddress, ...]:
    """A [[pool]]'s addresses: [{address = "192.0.2.10", helo = "mta1.example.com",
    weight = 1}, ...]."""
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        raise ValueError('must be a non-empty array of tables, e.g. [{address = "192.0.2.10", '
                         'helo = "mta1.example.com"}]')
    out: list[PoolAddress] = []
    for i, entry in enumerate(value):
        unknown = set(entry) - {"address", "helo", "weight"}
        if unknown:
            raise ValueError(f"entry {i}: unknown key {sorted(unknown)[0]!r} "
                             "(known: address, helo, weight)")
        if "address" not in entry:
            raise ValueError(f"entry {i}: needs address")
        try:
            address = _source_address(entry["address"])
            if not address:
                raise ValueError("must be an IP address of this host")
            address = str(ipaddress.ip_address(address))
            helo = _domain(entry["helo"]) if entry.get("helo", "") else ""
            weight = _integer(1, 1000)(entry.get("weight", 1))
        except ValueError as e:
            raise ValueError(f"entry {i} ({_toml_repr(entry)}): {e}") from None
        if any(a.address == address for a in out):
            raise ValueError(f"entry {i}: address {address} listed twice")
        out.append(PoolAddress(address, helo, weight))
    return tuple(out)


def _listen_address(value: Any) -> str:
    text = _string(value)
    host, _ = split_host_port(text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("host must be an IP address, e.g. \"127.0.0.1:25\" or \"[::1]:25\"") from None
    return text


def _redis_url(value: Any) -> str:
    text = _string(value)
    if text:
        from txmta.cluster.redis import parse_url
        parse_url(text)
    return text


@dataclass(frozen=True)
class _Key:
    default: Any            # as written in TOML; _MISSING = required
    convert: Convert


# THE table of options and defaults.  Defaults are written as in the TOML file and go
# through the same converters as the file's values.  `listen` and `dkim` are arrays of
# tables: their entries give the keys of one [[listen]] or [[dkim]] table;
# _DEFAULT_LISTEN is the default array of listeners (there are no default DKIM keys).
_TABLE: dict[str, dict[str, _Key]] = {
    "server": {
        "hostname": _Key("", _string),                      # "" = socket.getfqdn()
        "workers": _Key("auto", _workers),                  # "auto" = one per CPU core
        "user": _Key("", _user),                            # "" = stay who started us
        "group": _Key("", _group),                          # "" = the user's primary group
        "cpu_affinity": _Key("auto", _choice("none", "auto")),  # "auto": worker k on CPU k
        "max_connections": _Key(1000, _integer(1)),
        "max_connections_per_ip": _Key(50, _integer(1)),
        "max_recipients": _Key(1000, _integer(1)),
        "max_errors": _Key(20, _integer(1)),
        "junk_command_limit": _Key(100, _integer(0)),
        "command_timeout": _Key("5m", _duration(positive=True)),
        "data_timeout": _Key("5m", _duration(positive=True)),
        "command_time_limit": _Key("1m", _duration(positive=True)),
        "data_time_limit": _Key("20m", _duration(positive=True)),
    },
    "listen": {
        "address": _Key(_MISSING, _listen_address),
        "tls": _Key("none", _choice("none", "starttls", "implicit")),
        "auth": _Key("none", _choice("none", "optional", "required")),
        "bare_newlines": _Key("reject-remote", _choice("reject", "reject-remote", "fix")),
        "lane": _Key("", _string),                       # "" = chosen per message (lanes.py)
    },
    "lane": {
        "name": _Key(_MISSING, _lane_name),
        "priority": _Key(0, _integer(0, 99)),
        "share": _Key(0.0, _fraction),
        "deadline": _Key("0", _duration()),            # "0" = none: only [retry] max_lifetime
        "dsn": _Key("all", _choice(*DSN_POLICIES)),
        "retry": _Key([], _list_of(_duration())),       # [] = the [retry] schedule
        "streams": _Key([], _list_of(_string)),
        "users": _Key([], _list_of(_string)),
    },
    "shaping": {
        "name": _Key(_MISSING, _lane_name),
        "mx": _Key(_MISSING, _list_of(_mx_suffix, non_empty=True)),
        "connections": _Key(0, _integer(0)),             # 0 = no limit of its own
        "messages_per_connection": _Key(0, _integer(0)),
        "rate": _Key("", _rate),                          # "100/m", "3600/h"; "" = none
        "recipients_per_message": _Key(0, _integer(0)),
        "cooldown": _Key("1m", _duration(positive=True)),
        "max_cooldown": _Key("1h", _duration(positive=True)),
    },
    "intake": {
        "dedupe_window": _Key("24h", _duration()),     # "0" = off
    },
    "pool": {
        "name": _Key(_MISSING, _lane_name),
        "addresses": _Key(_MISSING, _pool_addresses),   # [{address, helo, weight}, ...]
        "method": _Key("round-robin", _choice(*METHODS)),
        "lanes": _Key([], _list_of(_string)),           # selectors; none: the default pool
        "sender_domains": _Key([], _list_of(_domain)),
        "tokens": _Key([], _list_of(_string)),
        "cooldown": _Key("1h", _duration(positive=True)),   # a blocked address rests this long
    },
    "http": {
        "address": _Key(_MISSING, _listen_address),
        "tls": _Key("none", _choice("none", "implicit")),
        "serve": _Key(["api", "metrics", "dashboard"],
                      _list_of(_choice(*HTTP_SERVES), non_empty=True)),
        "name": _Key("", _string),                      # "" = "http" + its place, e.g. "http0"
    },
    "webhook": {
        "url": _Key(_MISSING, _webhook_url),
        "events": _Key(list(WEBHOOK_EVENTS), _list_of(_choice(*WEBHOOK_EVENTS), non_empty=True)),
        "format": _Key("txmta", _choice("txmta", "postmark")),
        "secret": _Key(_MISSING, _string),               # a file with the whsec_ secret
        "timeout": _Key("10s", _duration(positive=True)),
    },
    "api": {
        "tokens": _Key("", _optional_path),             # "" = no tokens (only the test token)
        "rate_limit": _Key(100, _integer(0)),           # requests/s per token; 0 = no limit
        "idempotency_window": _Key("24h", _duration()),
    },
    "tls": {
        "cert": _Key("", _optional_path),
        "key": _Key("", _optional_path),
        "ca_file": _Key("", _optional_path),
        "min_version": _Key("TLSv1.2", _choice("TLSv1.2", "TLSv1.3")),
        "ciphers": _Key("", _string),                   # "" = the built-in modern list
        "policy": _Key([], _tls_policies),              # [[tls.policy]] domain, level
    },
    "auth": {
        "users": _Key("", _optional_path),
    },
    "relay": {
        "networks": _Key(["127.0.0.0/8", "::1/128"], _list_of(_network)),
    },
    "spool": {
        "path": _Key("spool", _string),
        "max_message_size": _Key("35MiB", _size(minimum=1)),
        "map_size": _Key("1GiB", _size(minimum=1024 * 1024)),
        "max_map_size": _Key("64GiB", _size(minimum=1024 * 1024)),
        "inline_body_limit": _Key("256KiB", _size()),
    },
    "delivery": {
        "relayhost": _Key("", _relayhost),
        "relayhost_username": _Key("", _string),
        "relayhost_password_file": _Key("", _optional_path),
        "relayhost_tls": _Key("may", _choice("none", "may", "encrypt", "verify")),
        "fallback": _Key("none", _choice("none", "mx")),  # every relayhost's circuit open
        "relay_failures": _Key(5, _integer(1)),           # relay faults that open its circuit
        "relay_failure_window": _Key("1m", _duration(positive=True)),
        "relay_cooldown": _Key("1m", _duration(positive=True)),
        "relay_max_cooldown": _Key("10m", _duration(positive=True)),
        "tls_level": _Key("auto", _choice("auto", *TLS_LEVELS)),  # domains without [[tls.policy]]
        "helo_name": _Key("", _string),                  # "" = server.hostname
        "source_address": _Key("", _source_address),     # "" = the system's choice
        "max_per_destination": _Key(20, _integer(1)),
        "initial_per_destination": _Key(5, _integer(1)),
        "max_connections": _Key(500, _integer(1)),
        "max_messages_per_connection": _Key(100, _integer(1)),
        "idle_timeout": _Key("30s", _duration()),
        "connect_timeout": _Key("30s", _duration(positive=True)),
        # RFC 5321 4.5.3.2: the replies to the greeting, EHLO, STARTTLS, AUTH, MAIL, RCPT;
        # to DATA; the content's writes; the reply after the content
        "command_timeout": _Key("5m", _duration(positive=True)),
        "data_init_timeout": _Key("2m", _duration(positive=True)),
        "data_xfer_timeout": _Key("3m", _duration(positive=True)),
        "data_done_timeout": _Key("10m", _duration(positive=True)),
        "max_inflight": _Key(1000, _integer(1)),
        "shaping": _Key("", _optional_path),             # a file of [[shaping]] tables
        "smtp_port": _Key(25, _integer(1, 65535)),
    },
    "retry": {
        "schedule": _Key(["1m", "5m", "15m", "30m", "1h", "2h", "4h"],
                         _list_of(_duration(), non_empty=True)),
        "max_lifetime": _Key("5d", _duration(positive=True)),
    },
    "dns": {
        "nameservers": _Key([], _list_of(_nameserver)),
    },
    "dsn": {
        "delay_warning": _Key("4h", _duration()),          # "0" = no delay warnings
    },
    "suppression": {
        "ttl": _Key("90d", _duration(positive=True)),
        "ttl_by_category": _Key(_TTL_BY_CATEGORY, _ttls),
        "categories": _Key(["invalid-recipient", "bad-domain"], _list_of(_category)),
        "action": _Key("reject", _choice("reject", "drop")),
    },
    "history": {
        "retention": _Key("7d", _duration()),
    },
    "bounce": {
        "rules": _Key([], _bounce_rules),
    },
    "dkim": {
        "domain": _Key(_MISSING, _domain),
        "selector": _Key(_MISSING, _string),
        "key": _Key(_MISSING, _string),
        "algorithm": _Key("rsa-sha256", _choice(*DKIM_ALGORITHMS)),
    },
    "signing": {
        "default_domain": _Key("", _string),    # "" = sign only mail whose From domain has a key
    },
    "cluster": {
        "redis": _Key("", _redis_url),                  # "" = one node: nothing shared
        "node": _Key("", _string),                      # "" = server.hostname
        "nodes": _Key(1, _integer(1)),
        "lease_ttl": _Key("30s", _duration(positive=True)),
        "timeout": _Key("1s", _duration(positive=True)),
        "ca_file": _Key("", _optional_path),            # "" = the system's trust store
    },
    "log": {
        "maillog": _Key("", _string),
        "format": _Key("text", _choice("text", "json")),
    },
}
_DEFAULT_LISTEN: list[dict[str, Any]] = [{"address": "127.0.0.1:25", "tls": "starttls"}]
_ARRAYS = ("listen", "dkim", "http", "webhook", "lane", "shaping", "pool")


def _default(section: str, key: str) -> Any:
    return _TABLE[section][key].convert(_TABLE[section][key].default)


# -- the values -----------------------------------------------------------------------

@dataclass(frozen=True)
class ListenConfig:
    address: str            # as written, e.g. "127.0.0.1:25" or "[::1]:25"
    host: str               # "127.0.0.1" / "::1"
    port: int
    tls: str = _default("listen", "tls")                        # none | starttls | implicit
    auth: str = _default("listen", "auth")                      # none | optional | required
    bare_newlines: str = _default("listen", "bare_newlines")    # reject | reject-remote | fix
    lane: str = ""                                              # "" = chosen per message


@dataclass(frozen=True)
class HttpConfig:
    """One [[http]] listener: the API, /metrics and the dashboard, as `serve` says."""
    address: str
    host: str
    port: int
    tls: str = _default("http", "tls")                          # none | implicit
    serve: tuple[str, ...] = _default("http", "serve")
    name: str = ""                                              # label in metrics and logs


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = field(default_factory=socket.getfqdn)
    max_connections: int = _default("server", "max_connections")
    max_connections_per_ip: int = _default("server", "max_connections_per_ip")
    max_recipients: int = _default("server", "max_recipients")
    max_errors: int = _default("server", "max_errors")
    command_timeout: float = _default("server", "command_timeout")
    data_timeout: float = _default("server", "data_timeout")
    command_time_limit: float = _default("server", "command_time_limit")
    data_time_limit: float = _default("server", "data_time_limit")
    junk_command_limit: int = _default("server", "junk_command_limit")
    workers: int = _default("server", "workers")       # resolved: "auto" is the core count
    user: str = ""
    group: str = ""
    cpu_affinity: str = _default("server", "cpu_affinity")   # "auto": worker k on one CPU


@dataclass(frozen=True)
class TLSConfig:
    cert: str | None = None
    key: str | None = None
    ca_file: str | None = None
    min_version: str = _default("tls", "min_version")     # TLSv1.2 | TLSv1.3 (inbound)
    ciphers: str = _default("tls", "ciphers")             # OpenSSL list; "" = built-in
    policy: tuple[TLSPolicyEntry, ...] = ()               # per-domain outbound levels

    def level_for(self, domain: str) -> str | None:
        """The configured [[tls.policy]] level of `domain` (exact match), or None."""
        domain = domain.rstrip(".").lower()
        return next((p.level for p in self.policy if p.domain == domain), None)


@dataclass(frozen=True)
class AuthConfig:
    users: str | None = None


@dataclass(frozen=True)
class RelayConfig:
    networks: tuple[IPNetwork, ...] = _default("relay", "networks")


@dataclass(frozen=True)
class SpoolConfig:
    path: str = _default("spool", "path")
    max_message_size: int = _default("spool", "max_message_size")
    map_size: int = _default("spool", "map_size")
    max_map_size: int = _default("spool", "max_map_size")
    inline_body_limit: int = _default("spool", "inline_body_limit")


@dataclass(frozen=True)
class DeliveryConfig:
    # "" = MX delivery; with the list form, the first relayhost (`relayhosts` has them all)
    relayhost: str = _default("delivery", "relayhost")
    relayhost_username: str = _default("delivery", "relayhost_username")
    relayhost_password_file: str | None = _default("delivery", "relayhost_password_file")
    relayhost_tls: str = _default("delivery", "relayhost_tls")   # none | may | encrypt | verify
    fallback: str = _default("delivery", "fallback")             # none | mx
    relay_failures: int = _default("delivery", "relay_failures")
    relay_failure_window: float = _default("delivery", "relay_failure_window")
    relay_cooldown: float = _default("delivery", "relay_cooldown")
    relay_max_cooldown: float = _default("delivery", "relay_max_cooldown")
    tls_level: str = _default("delivery", "tls_level")           # auto | one of TLS_LEVELS
    helo_name: str = _default("delivery", "helo_name")
    source_address: str = _default("delivery", "source_address")
    max_per_destination: int = _default("delivery", "max_per_destination")
    initial_per_destination: int = _default("delivery", "initial_per_destination")
    max_connections: int = _default("delivery", "max_connections")
    max_messages_per_connection: int = _default("delivery", "max_messages_per_connection")
    idle_timeout: float = _default("delivery", "idle_timeout")
    connect_timeout: float = _default("delivery", "connect_timeout")
    command_timeout: float = _default("delivery", "command_timeout")
    data_init_timeout: float = _default("delivery", "data_init_timeout")
    data_xfer_timeout: float = _default("delivery", "data_xfer_timeout")
    data_done_timeout: float = _default("delivery", "data_done_timeout")
    max_inflight: int = _default("delivery", "max_inflight")
    smtp_port: int = _default("delivery", "smtp_port")
    shaping: str | None = None                          # a file of [[shaping]] tables
    relay_list: tuple[RelayHost, ...] = ()      # the list form of `relayhost`, in order

    @property
    def relayhosts(self) -> tuple[RelayHost, ...]:
        """Every relayhost, in the order to try them: the list form's tables, or the one
        string with the relayhost_* keys; () for MX delivery."""
        if self.relay_list:
            return self.relay_list
        if not self.relayhost:
            return ()
        return (RelayHost(self.relayhost, "relay0", self.relayhost_username,
                          self.relayhost_password_file, self.relayhost_tls),)


@dataclass(frozen=True)
class RetryConfig:
    schedule: tuple[float, ...] = _default("retry", "schedule")
    max_lifetime: float = _default("retry", "max_lifetime")


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[str, ...] = _default("dns", "nameservers")


@dataclass(frozen=True)
class DsnConfig:
    delay_warning: float = _default("dsn", "delay_warning")


@dataclass(frozen=True)
class SuppressionConfig:
    ttl: float = _default("suppression", "ttl")             # manual entries, other categories
    ttl_by_category: tuple[tuple[str, float], ...] = _default("suppression", "ttl_by_category")
    categories: tuple[str, ...] = _default("suppression", "categories")
    action: str = _default("suppression", "action")          # reject | drop


@dataclass(frozen=True)
class HistoryConfig:
    retention: float = _default("history", "retention")


@dataclass(frozen=True)
class BounceConfig:
    rules: tuple[Any, ...] = _default("bounce", "rules")


@dataclass(frozen=True)
class DkimKey:
    domain: str             # lower-case, no trailing dot
    selector: str
    key: str                # path of the PEM private key
    algorithm: str = "rsa-sha256"


@dataclass(frozen=True)
class SigningConfig:
    default_domain: str = _default("signing", "default_domain")


@dataclass(frozen=True)
class WebhookConfig:
    """One [[webhook]] endpoint."""
    url: str
    events: tuple[str, ...] = _default("webhook", "events")
    format: str = _default("webhook", "format")       # txmta | postmark
    secret: str = ""                                  # the secret's file
    timeout: float = _default("webhook", "timeout")


@dataclass(frozen=True)
class ApiConfig:
    tokens: str | None = _default("api", "tokens")      # the tokens file (txmta api-token)
    rate_limit: int = _default("api", "rate_limit")     # requests per second per token, 0 = none
    idempotency_window: float = _default("api", "idempotency_window")


@dataclass(frozen=True)
class IntakeConfig:
    dedupe_window: float = _default("intake", "dedupe_window")   # 0 = off


@dataclass(frozen=True)
class ClusterConfig:
    """[cluster]: several nodes sharing rate limits, connection counts and the suppression
    list in Valkey/Redis (txmta/cluster/)."""
    redis: str = _default("cluster", "redis")           # "" = off
    node: str = ""                                      # this node's name ("" = off)
    nodes: int = _default("cluster", "nodes")           # for the fallback while Redis is down
    lease_ttl: float = _default("cluster", "lease_ttl")
    timeout: float = _default("cluster", "timeout")
    ca_file: str | None = _default("cluster", "ca_file")


@dataclass(frozen=True)
class LogConfig:
    maillog: str = _default("log", "maillog")       # "" = into the daemon's log
    format: str = _default("log", "format")         # text | json


@dataclass(frozen=True)
class Config:
    path: str | None        # the file it came from; None for built-in defaults
    server: ServerConfig
    listen: tuple[ListenConfig, ...]
    tls: TLSConfig
    auth: AuthConfig
    relay: RelayConfig
    spool: SpoolConfig
    delivery: DeliveryConfig
    retry: RetryConfig
    dns: DnsConfig
    log: LogConfig
    dsn: DsnConfig = field(default_factory=DsnConfig)
    suppression: SuppressionConfig = field(default_factory=SuppressionConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    bounce: BounceConfig = field(default_factory=BounceConfig)
    dkim: tuple[DkimKey, ...] = ()
    signing: SigningConfig = field(default_factory=SigningConfig)
    http: tuple[HttpConfig, ...] = ()
    api: ApiConfig = field(default_factory=ApiConfig)
    webhooks: tuple[WebhookConfig, ...] = ()
    lanes: Lanes = field(default_factory=Lanes)
    shaping: tuple[ShapingRule, ...] = ()
    intake: IntakeConfig = field(default_factory=IntakeConfig)
    pools: tuple[IPPool, ...] = ()          # [[pool]]: source addresses (outbound/ippool.py)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


# -- loading --------------------------------------------------------------------------

def load(path: str | None) -> Config:
    """The configuration in `path`; with None, DEFAULT_PATH if it exists, else defaults()."""
    if path is None:
        if not os.path.exists(DEFAULT_PATH):
            return defaults()
        path = DEFAULT_PATH
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}", path=path) from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8: {e}", path=path) from e
    return load_text(text, path)


def all_errors(path: str) -> tuple[Config | None, list[ConfigError]]:
    """Every error of the configuration in `path`, not only the first: each key found bad is
    left out (its default used) and the rest checked again.  (the configuration, if it
    loads, else None; the errors in the order found)."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        try:
            return load(path), []
        except ConfigError as e:
            return None, [e]
    errors: list[ConfigError] = []
    for _ in range(100):
        try:
            return _build(doc, path), errors
        except ConfigError as e:
            if any(str(e) == str(seen) for seen in errors) or not _leave_out(doc, e.key or ""):
                errors.append(e)
                return None, errors
            errors.append(e)
    return None, errors


def _leave_out(doc: dict[str, Any], key: str) -> bool:
    """Remove `key` ("section.key", "section[3].key", "section[3]", "section") from `doc`;
    False when it names nothing there.  A required key that is missing takes its table
    with it."""
    m = re.fullmatch(r"([a-z_]+)(?:\[(\d+)\])?(?:\.([A-Za-z_]+))?(?:.*)", key)
    if m is None or m.group(1) not in doc:
        return False
    section, index, name = m.group(1), m.group(2), m.group(3)
    table: Any = doc[section]
    if index is not None:
        if not isinstance(table, list) or int(index) >= len(table):
            return False
        if name is None or name not in table[int(index)]:
            del table[int(index)]          # the whole entry (a required key is missing)
            return True
        del table[int(index)][name]
        return True
    if name is None or not isinstance(table, dict) or name not in table:
        del doc[section]
        return True
    del table[name]
    return True


def defaults() -> Config:
    """The built-in configuration (no file)."""
    return _build({}, None)


def load_text(text: str, path: str = "<string>") -> Config:
    """The configuration in TOML `text`; `path` names it in error messages."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}", path=path) from e
    return _build(doc, path)


def _build(doc: dict[str, Any], path: str | None) -> Config:
    where = path if path is not None else "<defaults>"

    def bad(key: str, value: Any, reason: str) -> ConfigError:
        return ConfigError.bad_value(where, key, value, reason)

    for name, value in doc.items():
        if name not in _TABLE:
            raise bad(name, _MISSING, "unknown section (known: "
                      + ", ".join(_TABLE) + ")")
        if name in _ARRAYS:
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise bad(name, value, f"must be an array of tables, written [[{name}]]")
        elif not isinstance(value, dict):
            raise bad(name, value, f"must be a table, written [{name}]")

    def section(name: str, table: dict[str, Any], prefix: str) -> dict[str, Any]:
        return _section(name, table, prefix, bad)

    s = {name: section(name, doc.get(name, {}), name) for name in _TABLE if name not in _ARRAYS}
    if not s["server"]["hostname"]:
        s["server"]["hostname"] = socket.getfqdn()
    server = ServerConfig(**s["server"])
    tls = TLSConfig(**s["tls"])
    auth = AuthConfig(**s["auth"])
    relay = RelayConfig(**s["relay"])
    spool = SpoolConfig(**s["spool"])
    relay_list: tuple[RelayHost, ...] = ()
    if isinstance(s["delivery"]["relayhost"], list):
        relay_list = _relay_list(s["delivery"]["relayhost"], bad)
        s["delivery"]["relayhost"] = relay_list[0].spec
        for key in ("relayhost_username", "relayhost_password_file"):
            if s["delivery"][key]:
                raise bad(f"delivery.{key}", s["delivery"][key], "only with a relayhost string; "
                          "give each relayhost table its own username and password_file")
        if "relayhost_tls" in doc.get("delivery", {}):
            raise bad("delivery.relayhost_tls", s["delivery"]["relayhost_tls"],
                      "only with a relayhost string; give each relayhost table its own tls")
    delivery = DeliveryConfig(**s["delivery"], relay_list=relay_list)
    retry = RetryConfig(**s["retry"])
    dns = DnsConfig(**s["dns"])
    log = LogConfig(**s["log"])
    dsn_cfg = DsnConfig(**s["dsn"])
    suppression = SuppressionConfig(**s["suppression"])
    history = HistoryConfig(**s["history"])
    bounce = BounceConfig(**s["bounce"])
    signing = SigningConfig(**s["signing"])
    api = ApiConfig(**s["api"])
    intake = IntakeConfig(**s["intake"])
    cluster = ClusterConfig(**dict(s["cluster"], node=s["cluster"]["node"] or server.hostname))
    if cluster.ca_file:
        _check_readable(cluster.ca_file, lambda reason: bad("cluster.ca_file", cluster.ca_file, reason))
    lanes = _lanes(doc.get("lane"), section, bad)
    pools = _pools(doc.get("pool"), section, bad, lanes)

    dkim_keys: list[DkimKey] = []
    for i, entry in enumerate(doc.get("dkim", [])):
        v = section("dkim", entry, f"dkim[{i}]")
        if not v["selector"] or not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", v["selector"]):
            raise bad(f"dkim[{i}].selector", v["selector"], "must be a DNS label, e.g. \"mail2026\"")
        if any((k.domain, k.selector, k.algorithm) == (v["domain"], v["selector"], v["algorithm"])
               for k in dkim_keys):
            raise bad(f"dkim[{i}].selector", v["selector"],
                      f"listed twice for {v['domain']} with {v['algorithm']}")
        _check_readable(v["key"], lambda reason, i=i, file=v["key"]: bad(f"dkim[{i}].key", file, reason))
        dkim_keys.append(DkimKey(v["domain"], v["selector"], v["key"], v["algorithm"]))
    if signing.default_domain:
        wanted = signing.default_domain.rstrip(".").lower()
        if not any(k.domain == wanted for k in dkim_keys):
            raise bad("signing.default_domain", signing.default_domain,
                      "no [[dkim]] key for this domain")
        signing = SigningConfig(wanted)

    listen_doc = doc.get("listen", _DEFAULT_LISTEN)
    listeners: list[ListenConfig] = []
    seen: dict[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int], str] = {}
    for i, entry in enumerate(listen_doc):
        prefix = f"listen[{i}]"
        v = section("listen", entry, prefix)
        host, port = split_host_port(v["address"])
        ip = ipaddress.ip_address(host)
        if (ip, port) in seen:
            raise bad(f"{prefix}.address", v["address"],
                      f"listed twice (also {seen[(ip, port)]})")
        seen[(ip, port)] = prefix
        if v["tls"] == "implicit" and not (tls.cert and tls.key):
            raise bad(f"{prefix}.tls", v["tls"], "requires tls.cert and tls.key")
        if v["auth"] != "none" and not auth.users:
            raise bad(f"{prefix}.auth", v["auth"], "requires auth.users")
        if v["lane"] and v["lane"] not in lanes:
            raise bad(f"{prefix}.lane", v["lane"], "no [[lane]] of this name (known: "
                      + ", ".join(lane.name for lane in lanes) + ")")
        listeners.append(ListenConfig(v["address"], host, port, v["tls"], v["auth"],
                                      v["bare_newlines"], v["lane"]))

    http: list[HttpConfig] = []
    for i, entry in enumerate(doc.get("http", [])):
        prefix = f"http[{i}]"
        v = section("http", entry, prefix)
        host, port = split_host_port(v["address"])
        ip = ipaddress.ip_address(host)
        if (ip, port) in seen:
            raise bad(f"{prefix}.address", v["address"], f"listed twice (also {seen[(ip, port)]})")
        seen[(ip, port)] = prefix
        if v["tls"] == "implicit" and not (tls.cert and tls.key):
            raise bad(f"{prefix}.tls", v["tls"], "requires tls.cert and tls.key")
        http.append(HttpConfig(v["address"], host, port, v["tls"], tuple(dict.fromkeys(v["serve"])),
                               v["name"] or f"http{i}"))

    webhooks: list[WebhookConfig] = []
    for i, entry in enumerate(doc.get("webhook", [])):
        v = section("webhook", entry, f"webhook[{i}]")
        if any(w.url == v["url"] for w in webhooks):
            raise bad(f"webhook[{i}].url", v["url"], "listed twice")
        _check_readable(v["secret"], lambda reason, i=i, file=v["secret"]:
                        bad(f"webhook[{i}].secret", file, reason))
        from txmta.webhooks.sign import load_secret
        try:
            load_secret(v["secret"])
        except ValueError as e:
            raise bad(f"webhook[{i}].secret", v["secret"], str(e).removeprefix(v["secret"] + ": "))
        webhooks.append(WebhookConfig(v["url"], tuple(dict.fromkeys(v["events"])), v["format"],
                                      v["secret"], v["timeout"]))

    if delivery.relayhost_username and not delivery.relayhost_password_file:
        raise bad("delivery.relayhost_password_file", _MISSING,
                  "required with delivery.relayhost_username")
    if delivery.relayhost_username and not delivery.relayhost:
        raise bad("delivery.relayhost_username", delivery.relayhost_username,
                  "requires delivery.relayhost")
    if delivery.fallback != "none" and not delivery.relayhost:
        raise bad("delivery.fallback", delivery.fallback, "requires delivery.relayhost")
    if delivery.relay_max_cooldown < delivery.relay_cooldown:
        raise bad("delivery.relay_max_cooldown",
                  doc.get("delivery", {}).get("relay_max_cooldown", "10m"),
                  "must not be shorter than delivery.relay_cooldown")
    if delivery.initial_per_destination > delivery.max_per_destination:
        raise bad("delivery.initial_per_destination", delivery.initial_per_destination,
                  "must not exceed delivery.max_per_destination")
    if server.group and not server.user:
        raise bad("server.group", server.group, "requires server.user")
    if tls.cert and not tls.key:
        raise bad("tls.cert", tls.cert, "tls.key must be set too")
    if tls.key and not tls.cert:
        raise bad("tls.key", tls.key, "tls.cert must be set too")
    for key, file in (("tls.cert", tls.cert), ("tls.key", tls.key),
                      ("tls.ca_file", tls.ca_file), ("auth.users", auth.users),
                      ("delivery.relayhost_password_file", delivery.relayhost_password_file)):
        if file:
            _check_readable(file, lambda reason, key=key, file=file: bad(key, file, reason))
    if spool.map_size > spool.max_map_size:
        raise bad("spool.map_size", doc.get("spool", {}).get("map_size", _TABLE["spool"]["map_size"].default),
                  "must not exceed spool.max_map_size")

    return Config(path, server, tuple(listeners), tls, auth, relay, spool, delivery, retry,
                  dns, log, dsn_cfg, suppression, history, bounce, tuple(dkim_keys), signing,
                  tuple(http), api, tuple(webhooks), lanes,
                  _shaping(doc.get("shaping", []), delivery.shaping, bad), intake, pools,
                  cluster=cluster)


def _shaping(entries: list[dict[str, Any]], file: str,
             bad: Callable[[str, Any, str], ConfigError]) -> tuple[ShapingRule, ...]:
    """The [[shaping]] tables of the configuration, then those of `delivery.shaping`'s file
    that the configuration does not name (its own tables win)."""
    from txmta.outbound.shaping import Rule
    rules: list[Rule] = []

    def add(table: dict[str, Any], prefix: str, bad_here: Callable[..., ConfigError]) -> None:
        v = _section("shaping", table, prefix, bad_here)
        if any(r.name == v["name"] for r in rules):
            if bad_here is bad:
                raise bad_here(f"{prefix}.name", v["name"], "listed twice")
            return      # the configuration's own rule of this name wins
        rules.append(Rule(v["name"], tuple(v["mx"]), v["connections"],
                          v["messages_per_connection"], v["rate"],
                          v["recipients_per_message"], v["cooldown"], v["max_cooldown"]))

    for i, entry in enumerate(entries):
        add(entry, f"shaping[{i}]", bad)
    if file:
        try:
            with open(file, "rb") as f:
                doc = tomllib.load(f)
        except OSError as e:
            raise bad("delivery.shaping", file, f"cannot read: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise bad("delivery.shaping", file, f"TOML syntax error: {e}") from None
        unknown = [k for k in doc if k != "shaping"]
        if unknown or not isinstance(doc.get("shaping", []), list):
            raise ConfigError.bad_value(file, unknown[0] if unknown else "shaping", _MISSING,
                                        "a shaping file holds only [[shaping]] tables")

        def bad_in_file(key: str, value: Any, reason: str) -> ConfigError:
            return ConfigError.bad_value(file, key, value, reason)
        for i, entry in enumerate(doc.get("shaping", [])):
            add(entry, f"shaping[{i}]", bad_in_file)
    return tuple(rules)


def _lanes(entries: list[dict[str, Any]] | None, section: Callable[..., dict[str, Any]],
           bad: Callable[[str, Any, str], ConfigError]) -> Lanes:
    """The [[lane]] tables; without any, the default lanes (transactional, bulk)."""
    if not entries:
        return Lanes()
    lanes: list[Lane] = []
    total = 0.0
    for i, entry in enumerate(entries):
        prefix = f"lane[{i}]"
        v = section("lane", entry, prefix)
        if any(lane.name == v["name"] for lane in lanes):
            raise bad(f"{prefix}.name", v["name"], "listed twice")
        total += v["share"]
        if total > 1.0 + 1e-9:
            raise bad(f"{prefix}.share", v["share"],
                      "the shares of all lanes add up to more than 1")
        lanes.append(Lane(v["name"], v["priority"], v["share"], v["deadline"] or None, v["dsn"],
                          v["retry"] or None, v["streams"], v["users"]))
    return Lanes(lanes)


def _section(name: str, table: Any, prefix: str, bad: Callable[..., ConfigError]
             ) -> dict[str, Any]:
    """The keys of one table of section `name` (named `prefix` in errors), converted."""
    keys = _TABLE[name]
    if not isinstance(table, dict):
        raise bad(prefix, table, f"must be a table, written [[{name}]]")
    for k in table:
        if k not in keys:
            raise bad(f"{prefix}.{k}", table[k], "unknown key (known: " + ", ".join(keys) + ")")
    out = {}
    for k, spec in keys.items():
        raw = table[k] if k in table else spec.default
        if raw is _MISSING:
            raise bad(f"{prefix}.{k}", _MISSING, "required")
        try:
            out[k] = spec.convert(raw)
        except ValueError as e:
            raise bad(f"{prefix}.{k}", raw, str(e)) from None
    return out


def _pools(entries: list[dict[str, Any]] | None, section: Callable[..., dict[str, Any]],
           bad: Callable[[str, Any, str], ConfigError], lanes: Lanes) -> tuple[IPPool, ...]:
    """The [[pool]] tables: unique names, lanes that exist, at most one default pool (the
    one without selectors)."""
    pools: list[IPPool] = []
    for i, entry in enumerate(entries or []):
        prefix = f"pool[{i}]"
        v = section("pool", entry, prefix)
        if any(p.name == v["name"] for p in pools):
            raise bad(f"{prefix}.name", v["name"], "listed twice")
        for lane in v["lanes"]:
            if lane not in lanes:
                raise bad(f"{prefix}.lanes", entry["lanes"], f"no [[lane]] named {lane!r} "
                          "(known: " + ", ".join(x.name for x in lanes) + ")")
        pool = IPPool(v["name"], v["addresses"], v["method"], tuple(v["lanes"]),
                      tuple(v["sender_domains"]), tuple(v["tokens"]), v["cooldown"])
        if pool.is_default and any(p.is_default for p in pools):
            raise bad(f"{prefix}.name", v["name"], "a second pool without lanes, sender_domains "
                      "or tokens (only one default pool)")
        pools.append(pool)
    return tuple(pools)


def named_listeners(cfg: Config) -> list[tuple[str, Any]]:
    """Every listener with the name errors give it: ("listen[0]", its ListenConfig), ...,
    then ("http[0]", its HttpConfig), ..., in the order the master binds them."""
    return ([(f"listen[{i}]", lst) for i, lst in enumerate(cfg.listen)]
            + [(f"http[{i}]", h) for i, h in enumerate(cfg.http)])


def _check_readable(file: str, bad: Callable[[str], ConfigError]) -> None:
    """Open and close `file`, so a missing or unreadable file fails at load, not at use.

    (Opening a directory fails too: IsADirectoryError.)"""
    try:
        with open(file, "rb"):
            pass
    except OSError as e:
        raise bad(f"cannot read: {e.strerror or e}") from None
