"""Inbound policy decisions (txmta/inbound/policy.py) as tables.

Relaying is allowed only from relay.networks or after AUTH (RFC 5321 3.6.2, RFC 4954);
AUTH is offered only over TLS or on loopback (RFC 4954 4); bare CR/LF handling
(RFC 5321 2.3.8) depends on the mode and on whether the client is local.
"""

from __future__ import annotations

import ipaddress

import pytest

from txmta.inbound.policy import (ServerPolicy, auth_offered, in_networks, is_loopback, may_relay,
                                  reject_bare_newlines)

POLICY = ServerPolicy("mx.example.net", relay_networks=(
    ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("2001:db8:1::/48")))


@pytest.mark.parametrize("ip,authenticated,allowed", [
    ("198.51.100.7", False, True),          # in relay.networks
    ("198.51.100.255", False, True),
    ("198.51.101.1", False, False),         # just outside
    ("192.0.2.10", False, False),
    ("192.0.2.10", True, True),             # AUTH (RFC 4954 6)
    ("::ffff:198.51.100.7", False, True),   # IPv4-mapped client of a dual-stack socket
    ("2001:db8:1::25", False, True),
    ("2001:db8:2::25", False, False),
    ("127.0.0.1", False, False),            # loopback is not a relay network by itself
    ("not an ip", False, False),
    ("", False, False),
])
def test_may_relay(ip, authenticated, allowed):
    """Relay only from relay.networks or after AUTH (RFC 5321 3.6.2)."""
    assert may_relay(ip, authenticated, POLICY) is allowed


def test_may_relay_with_no_relay_networks_needs_auth():
    """With no relay networks configured, only authenticated clients relay."""
    p = ServerPolicy("mx.example.net")
    assert may_relay("198.51.100.7", False, p) is False
    assert may_relay("198.51.100.7", True, p) is True


@pytest.mark.parametrize("ip,loopback", [
    ("127.0.0.1", True),
    ("127.255.255.254", True),               # all of 127/8 (RFC 1122 3.2.1.3)
    ("::1", True),
    ("::ffff:127.0.0.1", True),              # IPv4-mapped (RFC 4291 2.5.5.2)
    ("::ffff:192.0.2.1", False),
    ("fe80::1%eth0", False),                 # scope id tolerated
    ("::1%lo", True),
    ("192.0.2.1", False),
    ("0.0.0.0", False),
    ("localhost", False),                    # names are not addresses
    ("", False),
])
def test_is_loopback(ip, loopback):
    """Loopback covers 127/8, ::1 and their IPv4-mapped form."""
    assert is_loopback(ip) is loopback


def test_ipv4_network_does_not_match_ipv6_client_and_back():
    """An IPv4 network never matches an IPv6 address that is not IPv4-mapped, and back."""
    v4 = (ipaddress.ip_network("0.0.0.0/0"),)
    v6 = (ipaddress.ip_network("::/0"),)
    assert in_networks("2001:db8::1", v4) is False
    assert in_networks("192.0.2.1", v6) is False
    assert in_networks("::ffff:192.0.2.1", v4) is True


@pytest.mark.parametrize("mode,ip,reject", [
    ("reject", "192.0.2.1", True),
    ("reject", "127.0.0.1", True),
    ("fix", "192.0.2.1", False),
    ("fix", "127.0.0.1", False),
    ("reject-remote", "192.0.2.1", True),
    ("reject-remote", "127.0.0.1", False),      # local submission tools send bare LF
    ("reject-remote", "::1", False),
    ("reject-remote", "::ffff:127.0.0.1", False),
    ("reject-remote", "::ffff:192.0.2.1", True),
])
def test_reject_bare_newlines(mode, ip, reject):
    """Bare CR/LF reject or fix by mode; reject-remote fixes only for loopback clients
    (RFC 5321 2.3.8, SMTP smuggling)."""
    assert reject_bare_newlines(mode, ip) is reject


@pytest.mark.parametrize("listener_auth,tls,ip,offered", [
    ("none", True, "127.0.0.1", False),
    ("optional", False, "127.0.0.1", True),
    ("optional", False, "::1", True),
    ("optional", False, "192.0.2.1", False),    # RFC 4954 4: no cleartext passwords
    ("optional", True, "192.0.2.1", True),
    ("required", True, "192.0.2.1", True),
    ("required", False, "192.0.2.1", False),
])
def test_auth_offered(listener_auth, tls, ip, offered):
    """AUTH PLAIN/LOGIN only when enabled and over TLS or on loopback (RFC 4954 4)."""
    assert auth_offered(listener_auth, tls, ip) is offered
