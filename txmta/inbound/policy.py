"""Who may do what on an inbound session: relay access, AUTH availability, limits.

Pure: decisions from the session's facts and the configured values, no I/O.
txmta has no local mailboxes, so every recipient is relayed: RCPT is accepted only from
clients in `relay.networks` or after AUTH (RFC 5321 3.6.2 relaying; RFC 4954).
"""
# test: tests/test_policy.py

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field

from txmta.reply import Reply

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")


@functools.lru_cache(maxsize=4096)      # a client's address is asked about several times
def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_loopback(text: str) -> bool:
    ip = parse_ip(text)
    return bool(ip is not None and ip.is_loopback)


def in_networks(text: str, networks: tuple[Network, ...]) -> bool:
    ip = parse_ip(text)
    if ip is None:
        return False
    return any(ip.version == net.version and ip in net for net in networks)


@dataclass(frozen=True)
class ServerPolicy:
    """The values an inbound session needs, built once from the configuration."""

    hostname: str
    relay_networks: tuple[Network, ...] = ()
    max_message_size: int = 35 * 1024 * 1024
    max_recipients: int = 1000
    max_errors: int = 20
    junk_command_limit: int = 100        # NOOP/VRFY/RSET/HELP before each counts as an error
    command_timeout: float = 300.0       # idle: silence allowed while a command is awaited
    data_timeout: float = 300.0          # idle: silence allowed inside DATA/BDAT
    command_time_limit: float = 60.0     # total: one command line (or a TLS handshake)
    data_time_limit: float = 1200.0      # total: one message's data, 354 (or BDAT) to its end
    tls_available: bool = False          # cert and key configured
    auth_available: bool = False         # a users file is configured
    extra: dict[str, str] = field(default_factory=dict)


def may_relay(client_ip: str, authenticated: bool, policy: ServerPolicy) -> bool:
    return authenticated or in_networks(client_ip, policy.relay_networks)


def auth_offered(listener_auth: str, tls_active: bool, client_ip: str) -> bool:
    """AUTH PLAIN/LOGIN send passwords in the clear: offer them only over TLS or on loopback."""
    return listener_auth != "none" and (tls_active or is_loopback(client_ip))


def reject_bare_newlines(mode: str, client_ip: str) -> bool:
    """Whether a bare CR or LF in DATA rejects the message (else it is converted to CRLF)."""
    if mode == "reject":
        return True
    if mode == "fix":
        return False
    return not is_loopback(client_ip)  # "reject-remote"
