"""SMTP AUTH (RFC 4954) in dialogues: PLAIN (RFC 4616), LOGIN, refusals, and relaying.

The checker is a `FakeChecker` (answers at once or when the test fires it); one test
goes through the real `UsersFileChecker` with a thread pool that runs in the caller.
"""

from __future__ import annotations

import base64
import ipaddress
from typing import Any, Callable

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse

from txmta.inbound.auth import UsersFileChecker
from txmta.inbound.policy import ServerPolicy
from txmta.passwords import hash_password

from smtpdialog import HOSTNAME, LOOPBACK_IP, REMOTE_IP, FakeChecker, Harness, Listener

MAIL = b"MAIL FROM:<sender@example.com>\r\n"
RCPT = b"RCPT TO:<rcpt@example.org>\r\n"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def plain(user: bytes = b"alice", password: bytes = b"secret", authzid: bytes = b"") -> bytes:
    return b64(authzid + b"\0" + user + b"\0" + password)


def auth_client(ip: str = LOOPBACK_IP, auth: str = "optional", tls: bool = False,
                checker: Any = None, **kw: Any):
    checker = checker if checker is not None else FakeChecker({"alice": "secret"})
    h = Harness(listener=Listener(tls="implicit" if tls else "none", auth=auth),
                checker=checker, **kw)
    c = h.connect(ip, tls=tls)
    c.ehlo()
    return h, c


# -- mechanisms ------------------------------------------------------------------------------

def test_auth_plain_with_initial_response():
    """AUTH PLAIN with an initial response succeeds with 235 2.7.0 (RFC 4954 4, RFC 4616)."""
    h, c = auth_client()
    c.proto.dataReceived(b"AUTH PLAIN " + plain() + b"\r\n")
    assert c.raw() == b"235 2.7.0 Authentication successful\r\n"
    assert c.proto.session.auth_user == "alice"
    assert "AUTH PLAIN LOGIN" not in c.ehlo()        # not offered once authenticated


def test_auth_plain_with_continuation():
    """AUTH PLAIN without a response gets an empty 334 challenge (RFC 4954 4)."""
    h, c = auth_client()
    c.proto.dataReceived(b"AUTH PLAIN\r\n")
    assert c.raw() == b"334 \r\n"
    assert c.send(plain() + b"\r\n") == ["235 2.7.0"]


def test_auth_plain_with_matching_authzid():
    """An authorization identity equal to the user is accepted (RFC 4616 2)."""
    h, c = auth_client()
    assert c.send(b"AUTH PLAIN " + plain(authzid=b"alice") + b"\r\n") == ["235 2.7.0"]


def test_auth_plain_with_other_authzid_is_535():
    """Acting as someone else is refused with 535 5.7.8."""
    h, c = auth_client()
    assert c.send(b"AUTH PLAIN " + plain(authzid=b"bob") + b"\r\n") == ["535 5.7.8"]
    assert c.proto.session.auth_user is None


def test_auth_login():
    """AUTH LOGIN asks Username: then Password: in base64 334 challenges."""
    h, c = auth_client()
    c.proto.dataReceived(b"AUTH LOGIN\r\n")
    assert c.raw() == b"334 VXNlcm5hbWU6\r\n"
    c.proto.dataReceived(b64(b"alice") + b"\r\n")
    assert c.raw() == b"334 UGFzc3dvcmQ6\r\n"
    assert c.send(b64(b"secret") + b"\r\n") == ["235 2.7.0"]
    assert c.proto.session.auth_user == "alice"


def test_auth_login_with_initial_username():
    """AUTH LOGIN may carry the username as initial response."""
    h, c = auth_client()
    c.proto.dataReceived(b"AUTH LOGIN " + b64(b"alice") + b"\r\n")
    assert c.raw() == b"334 UGFzc3dvcmQ6\r\n"
    assert c.send(b64(b"secret") + b"\r\n") == ["235 2.7.0"]


@pytest.mark.parametrize("dialogue", [
    [b"AUTH PLAIN " + plain(password=b"wrong")],
    [b"AUTH PLAIN " + plain(user=b"mallory")],
    [b"AUTH LOGIN", b64(b"alice"), b64(b"wrong")],
])
def test_bad_credentials_are_535(dialogue):
    """Wrong user or password gets 535 5.7.8 (RFC 4954 6) and no authentication."""
    h, c = auth_client()
    replies = [r for line in dialogue for r in c.send(line + b"\r\n")]
    assert replies[-1] == "535 5.7.8"
    assert c.proto.session.auth_user is None
    assert c.send(MAIL + RCPT) == ["250 2.1.0", "554 5.7.1"]   # still may not relay


@pytest.mark.parametrize("start", [b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n",
                                   b"AUTH LOGIN " + b64(b"alice") + b"\r\n"])
def test_star_cancels_the_exchange_with_501(start):
    """A client "*" line cancels AUTH with 501 (RFC 4954 4); commands parse again after."""
    h, c = auth_client()
    assert c.send(start) == ["334"]
    assert c.send(b"*\r\nNOOP\r\n") == ["501 5.7.0", "250 2.0.0"]
    assert c.proto.session.auth_user is None


@pytest.mark.parametrize("line,reply", [
    (b"AUTH CRAM-MD5\r\n", "504 5.5.4"),                 # RFC 4954 4: unknown mechanism
    (b"AUTH\r\n", "501 5.5.4"),
    (b"AUTH PLAIN a b\r\n", "501 5.5.4"),
    (b"AUTH PLAIN !!!!\r\n", "501 5.5.2"),                # RFC 4954 4: bad base64
    (b"AUTH PLAIN " + b64(b"nonuls") + b"\r\n", "501 5.5.2"),
    (b"AUTH PLAIN =\r\n", "501 5.5.2"),                   # empty response
])
def test_malformed_auth_is_refused(line, reply):
    """Malformed AUTH commands and responses are refused with the matching code."""
    h, c = auth_client()
    assert c.send(line) == [reply]


@pytest.mark.parametrize("packets,reply", [
    ([b"A" * 13000, b"\r\n"], "500 5.5.2"),   # discarded while it grows past the buffer limit
    ([b"A" * 12300 + b"\r\n"], "500 5.5.6"),  # arrives whole, over 12288 octets (RFC 4954 4)
])
def test_over_long_auth_response_ends_the_exchange(packets, reply):
    """An AUTH response line over 12288 octets is refused and the exchange is over: the
    next line is a command again."""
    h, c = auth_client()
    assert c.send(b"AUTH PLAIN\r\n") == ["334"]
    replies = [r for p in packets for r in c.send(p)]
    assert replies == [reply]
    assert c.send(b"NOOP\r\n") == ["250 2.0.0"]
    assert h.checker.requests == []


def test_auth_sequencing_errors_are_503():
    """AUTH needs EHLO, is refused twice and inside a transaction (RFC 4954 4)."""
    h = Harness(listener=Listener(auth="optional"), checker=FakeChecker({"alice": "secret"}))
    c = h.connect(LOOPBACK_IP)
    assert c.send(b"AUTH PLAIN " + plain() + b"\r\n") == ["503 5.5.1"]        # no EHLO
    assert c.send(b"HELO x.example\r\nAUTH PLAIN " + plain() + b"\r\n") == ["250", "503 5.5.1"]
    c.ehlo()
    assert c.send(MAIL + b"AUTH PLAIN " + plain() + b"\r\n") == ["250 2.1.0", "503 5.5.1"]
    assert c.send(b"RSET\r\nAUTH PLAIN " + plain() + b"\r\nAUTH PLAIN " + plain() + b"\r\n") == [
        "250 2.0.0", "235 2.7.0", "503 5.5.1"]


# -- where AUTH is offered ----------------------------------------------------------------------

def test_auth_without_tls_from_remote_is_not_offered_and_538():
    """No cleartext passwords from a non-loopback client: not listed, AUTH gets 538 5.7.11
    (RFC 4954 4, 6)."""
    h, c = auth_client(ip=REMOTE_IP)
    assert c.send(b"AUTH PLAIN " + plain() + b"\r\n") == ["538 5.7.11"]
    assert h.checker.requests == []              # the password was never checked


def test_auth_without_checker_is_502():
    """Without a users file AUTH is not a command this server offers."""
    h = Harness(listener=Listener(auth="optional"))
    c = h.connect(LOOPBACK_IP)
    c.ehlo()
    assert c.send(b"AUTH PLAIN " + plain() + b"\r\n") == ["502 5.5.1"]


def test_auth_on_auth_none_listener_is_502():
    """On a listener with auth = none AUTH is refused even with a checker."""
    h, c = auth_client(auth="none")
    assert c.send(b"AUTH PLAIN " + plain() + b"\r\n") == ["502 5.5.1"]


def test_auth_after_starttls_from_remote_client():
    """After STARTTLS a remote client sees AUTH and may use it (RFC 3207, RFC 4954 4)."""
    h = Harness(listener=Listener(tls="starttls", auth="optional"), tls_options=object(),
                checker=FakeChecker({"alice": "secret"}))
    c = h.connect(REMOTE_IP)
    assert "AUTH PLAIN LOGIN" not in c.ehlo()
    assert c.send(b"STARTTLS\r\n") == ["220 2.0.0"]
    c.complete_tls()
    assert "AUTH PLAIN LOGIN" in c.ehlo()
    assert c.send(b"AUTH PLAIN " + plain() + b"\r\n") == ["235 2.7.0"]


# -- what AUTH allows ------------------------------------------------------------------------------

def test_auth_allows_relay_from_a_non_relay_ip():
    """An authenticated client outside relay.networks may relay (RFC 4954 6)."""
    h, c = auth_client(ip=REMOTE_IP, tls=True)
    assert c.send(MAIL + RCPT) == ["250 2.1.0", "554 5.7.1"]
    assert c.send(b"RSET\r\nAUTH PLAIN " + plain() + b"\r\n" + MAIL + RCPT +
                  b"DATA\r\nx\r\n.\r\n") == [
        "250 2.0.0", "235 2.7.0", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]
    [(msg, body)] = h.stored()
    assert msg.client["auth"] == "alice"
    assert b" with ESMTPSA id " in body


def test_auth_required_listener_accepts_mail_after_auth():
    """On an auth=required listener MAIL gets 530 before AUTH and 250 after (RFC 4954 6)."""
    h, c = auth_client(auth="required")
    assert c.send(MAIL) == ["530 5.7.0"]
    assert c.send(b"AUTH PLAIN " + plain() + b"\r\n" + MAIL) == ["235 2.7.0", "250 2.1.0"]


def test_mail_auth_parameter_is_kept_only_for_authenticated_clients():
    """MAIL AUTH= is recorded only when the session is authenticated (RFC 4954 5)."""
    h = Harness(listener=Listener(auth="optional"), checker=FakeChecker({"alice": "secret"}),
                policy=ServerPolicy(HOSTNAME, relay_networks=(ipaddress.ip_network("127.0.0.0/8"),)))
    c = h.connect(LOOPBACK_IP)
    c.ehlo()
    c.send(b"MAIL FROM:<a@example.com> AUTH=forged@example.com\r\n" + RCPT + b"DATA\r\nx\r\n.\r\n")
    c.send(b"AUTH PLAIN " + plain() + b"\r\n")
    c.send(b"MAIL FROM:<a@example.com> AUTH=alice@example.com\r\n" + RCPT + b"DATA\r\nx\r\n.\r\n")
    (m1, _), (m2, _) = h.stored()
    assert (m1.envelope.auth, m2.envelope.auth) == (None, "alice@example.com")


# -- the check is asynchronous -------------------------------------------------------------------

def test_pipelined_commands_wait_for_the_auth_check():
    """Commands pipelined after AUTH are answered after it, in order; the transport is
    paused while the checker works (RFC 2920 3.1)."""
    checker = FakeChecker(immediate=False)
    h, c = auth_client(ip=REMOTE_IP, tls=True, checker=checker)
    assert c.send(b"AUTH PLAIN " + plain() + b"\r\n" + MAIL + RCPT) == []
    assert c.transport.producerState == "paused"
    [(creds, d)] = checker.requests
    assert (creds.username, creds.password) == ("alice", "secret")
    d.callback("alice")
    assert c.replies() == ["235 2.7.0", "250 2.1.0", "250 2.1.5"]
    assert c.transport.producerState == "producing"


def test_checker_failure_is_454():
    """A checker error other than bad credentials is a temporary 454 4.7.0 (RFC 4954 6)."""
    checker = FakeChecker(immediate=False)
    h, c = auth_client(checker=checker)
    c.send(b"AUTH PLAIN " + plain() + b"\r\n")
    checker.requests[0][1].errback(OSError("thread pool gone"))
    assert c.replies() == ["454 4.7.0"]


def test_twisted_in_memory_checker_works_with_str_credentials():
    """A twisted.cred checker fits; the server passes username and password as str
    (so Twisted's bytes-keyed toy database needs str entries)."""
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.addUser("alice", "secret")  # type: ignore[arg-type]
    h, c = auth_client(checker=checker)
    assert c.send(b"AUTH PLAIN " + plain(password=b"nope") + b"\r\n") == ["535 5.7.8"]
    assert c.send(b"AUTH PLAIN " + plain() + b"\r\n") == ["235 2.7.0"]


class InlineThreadPool:
    """Runs the 'threaded' call at once; deferToThreadPool's contract in one thread."""

    def callInThreadWithCallback(self, on_result: Callable[..., Any], f: Callable[..., Any],
                                 *a: Any, **kw: Any) -> None:
        try:
            result = f(*a, **kw)
        except BaseException as e:  # pragma: no cover - not expected here
            on_result(False, e)
        else:
            on_result(True, result)


class InlineReactor:
    def callFromThread(self, f: Callable[..., Any], *a: Any, **kw: Any) -> None:
        f(*a, **kw)


def test_users_file_checker_through_the_server():
    """The real scrypt checker accepts the right password and refuses others with 535."""
    checker = UsersFileChecker({"alice": hash_password("secret")}, InlineReactor(), InlineThreadPool())
    h, c = auth_client(checker=checker)
    assert c.send(b"AUTH PLAIN " + plain(user=b"nobody") + b"\r\n") == ["535 5.7.8"]
    assert c.send(b"AUTH PLAIN " + plain() + b"\r\n") == ["235 2.7.0"]


def test_a_failed_auth_is_told_with_the_client_the_user_and_the_mechanism_never_the_password():
    """535 from PLAIN (bad password, or acting as someone else) and from LOGIN: the mail log
    hears (client address, user name tried, mechanism); a success is not told."""
    told: list[tuple[str, str, str]] = []
    h, c = auth_client(ip=REMOTE_IP, tls=True)
    h.factory.note_auth_failure = lambda *a: told.append(a)
    assert c.send(b"AUTH PLAIN " + plain(password=b"wrong") + b"\r\n") == ["535 5.7.8"]
    assert c.send(b"AUTH PLAIN " + plain(authzid=b"bob") + b"\r\n") == ["535 5.7.8"]
    c.proto.dataReceived(b"AUTH LOGIN " + b64(b"mallory") + b"\r\n")
    c.raw()
    assert c.send(b64(b"guess") + b"\r\n") == ["535 5.7.8"]
    assert c.send(b"AUTH PLAIN " + plain() + b"\r\n") == ["235 2.7.0"]
    assert told == [(REMOTE_IP, "alice", "PLAIN"), (REMOTE_IP, "alice", "PLAIN"),
                    (REMOTE_IP, "mallory", "LOGIN")]
    assert not any("wrong" in a or "guess" in a or "secret" in a for t in told for a in t)
