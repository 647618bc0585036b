"""Parses "host:port" as written in the configuration: "host:port", "[host or v6]:port",
"host", "[host]".  Pure; the one parser behind listen addresses, nameservers and the
relayhost, so a value the configuration accepts is one the daemon can use.
"""
# test: tests/test_config.py, tests/test_dns.py, tests/test_route.py

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HostPort:
    host: str               # without brackets
    port: int
    bracketed: bool         # written "[host]" (for a relayhost: no MX lookup, as in Postfix)
    explicit_port: bool


def parse_host_port(text: str, default_port: int | None = None, *,
                    bare_ipv6: bool = False) -> HostPort:
    """Raises ValueError.  A bare IPv6 address (several colons, no brackets) is taken as a
    host without a port only with `bare_ipv6`; otherwise it must be bracketed."""
    bracketed = text.startswith("[")
    if bracketed:
        end = text.find("]")
        if end < 0:
            raise ValueError("missing \"]\"")
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError("expected \":port\" after \"]\"")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        if not bare_ipv6:
            raise ValueError("write IPv6 addresses in brackets, e.g. \"[::1]:25\"")
        host, port_text = text, None
    elif ":" in text:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None
    if not host:
        raise ValueError("empty host")
    if port_text is None:
        if default_port is None:
            raise ValueError("missing \":port\"")
        return HostPort(host, default_port, bracketed, False)
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError("port must be 1-65535")
    return HostPort(host, int(port_text), bracketed, True)


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """("host", port); see parse_host_port."""
    hp = parse_host_port(text, default_port)
    return hp.host, hp.port
