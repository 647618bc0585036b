"""REQUIRETLS (RFC 8689) on the inbound side: advertised and accepted only under TLS, and
kept on the envelope the receiver stores.  Dialogues over StringTransport (tests/smtpdialog.py);
TLS is the harness's stand-in (`complete_tls()`, `connect(tls=True)`), real handshakes are in
tests/test_tlscontext.py and tests/integration/test_tls_reload.py."""

from __future__ import annotations

import pytest

from smtpdialog import RELAY_IP, Client, Harness, Listener

BODY = b"Subject: t\r\n\r\nhello\r\n.\r\n"


def starttls_client(h: Harness | None = None) -> tuple[Harness, Client]:
    """A relay client on a STARTTLS listener that said EHLO, STARTTLS, and EHLO again."""
    h = h or Harness(listener=Listener(tls="starttls"), tls_options=object())
    c = h.connect(RELAY_IP)
    c.ehlo()
    assert c.send(b"STARTTLS\r\n") == ["220 2.0.0"]
    c.complete_tls()
    return h, c


def implicit_client() -> tuple[Harness, Client]:
    h = Harness(listener=Listener(tls="implicit"), tls_options=object())
    return h, h.connect(RELAY_IP, tls=True)


# -- the EHLO keyword (RFC 8689) -----------------------------------------------------------

def test_requiretls_not_advertised_in_the_clear():
    """Before STARTTLS, EHLO lists STARTTLS but not REQUIRETLS."""
    h = Harness(listener=Listener(tls="starttls"), tls_options=object())
    keywords = h.connect(RELAY_IP).ehlo()
    assert "STARTTLS" in keywords
    assert "REQUIRETLS" not in keywords


def test_requiretls_not_advertised_on_a_plain_listener():
    """A listener without TLS never offers REQUIRETLS."""
    assert "REQUIRETLS" not in Harness().connect(RELAY_IP).ehlo()


def test_requiretls_advertised_after_starttls():
    """The EHLO after a completed STARTTLS handshake lists REQUIRETLS (and no STARTTLS)."""
    _, c = starttls_client()
    keywords = c.ehlo()
    assert "REQUIRETLS" in keywords
    assert "STARTTLS" not in keywords


def test_requiretls_advertised_on_implicit_tls_listener():
    """On an implicit-TLS (SMTPS) listener REQUIRETLS is listed from the first EHLO."""
    _, c = implicit_client()
    assert "REQUIRETLS" in c.ehlo()


# -- the MAIL parameter (RFC 8689) ----------------------------------------------------------

@pytest.mark.parametrize("param", [b"REQUIRETLS", b"requiretls", b"RequireTLS"])
def test_mail_requiretls_under_tls_is_stored_on_the_envelope(param):
    """MAIL ... REQUIRETLS after STARTTLS is accepted, and the stored envelope says so."""
    h, c = starttls_client()
    c.ehlo()
    assert c.send(b"MAIL FROM:<s@example.com> " + param + b"\r\n") == ["250 2.1.0"]
    assert c.send(b"RCPT TO:<r@example.org>\r\n") == ["250 2.1.5"]
    assert c.send(b"DATA\r\n") == ["354"]
    assert c.send(BODY) == ["250 2.0.0"]
    [(stored, _)] = h.stored()
    assert stored.envelope.requiretls is True
    assert stored.client["tls"].startswith("TLSv1.3 ")


def test_mail_requiretls_on_implicit_listener_with_bdat_is_stored():
    """REQUIRETLS goes with BDAT too, here on an SMTPS listener."""
    h, c = implicit_client()
    c.ehlo()
    chunk = b"Subject: t\r\n\r\nhi\r\n"
    assert c.send(b"MAIL FROM:<s@example.com> SIZE=20 REQUIRETLS\r\n") == ["250 2.1.0"]
    assert c.send(b"RCPT TO:<r@example.org>\r\n") == ["250 2.1.5"]
    assert c.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk) == ["250 2.0.0"]
    [(stored, _)] = h.stored()
    assert stored.envelope.requiretls is True
    assert stored.envelope.size == 20


def test_mail_without_requiretls_under_tls_is_not_marked():
    """TLS alone does not make a message REQUIRETLS: only the client's parameter does."""
    h, c = starttls_client()
    c.ehlo()
    assert c.send(b"MAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.org>\r\nDATA\r\n") == [
        "250 2.1.0", "250 2.1.5", "354"]
    assert c.send(BODY) == ["250 2.0.0"]
    [(stored, _)] = h.stored()
    assert stored.envelope.requiretls is False


def test_requiretls_is_per_transaction():
    """The flag belongs to one MAIL transaction: the next message on the session starts clean."""
    h, c = implicit_client()
    c.ehlo()
    assert c.send(b"MAIL FROM:<a@example.com> REQUIRETLS\r\nRCPT TO:<r@example.org>\r\nDATA\r\n") == [
        "250 2.1.0", "250 2.1.5", "354"]
    assert c.send(BODY) == ["250 2.0.0"]
    assert c.send(b"MAIL FROM:<b@example.com>\r\nRCPT TO:<r@example.org>\r\nDATA\r\n") == [
        "250 2.1.0", "250 2.1.5", "354"]
    assert c.send(BODY) == ["250 2.0.0"]
    flags = {m.envelope.sender.local: m.envelope.requiretls for m, _ in h.stored()}
    assert flags == {"a": True, "b": False}


@pytest.mark.parametrize("listener,tls_options,hint", [
    ("none", None, False),          # no TLS at all
    ("starttls", object(), True),   # TLS offered but not started: the reply says so
])
def test_mail_requiretls_without_tls_is_refused(listener, tls_options, hint):
    """Without TLS, REQUIRETLS is an unadvertised parameter: 555 5.5.4 (RFC 5321 4.1.1.11),
    permanent, since RFC 8689 forbids sending the message in the clear; no transaction starts."""
    h = Harness(listener=Listener(tls=listener), tls_options=tls_options)
    c = h.connect(RELAY_IP)
    c.ehlo()
    c.raw()
    c.proto.dataReceived(b"MAIL FROM:<s@example.com> REQUIRETLS\r\n")
    out = c.raw()
    assert out.startswith(b"555 5.5.4 REQUIRETLS "), out
    assert (b"use STARTTLS" in out) is hint
    assert c.send(b"RCPT TO:<r@example.org>\r\n") == ["503 5.5.1"]
    assert h.stored() == []


def test_mail_requiretls_pipelined_before_starttls_is_not_carried_over():
    """A MAIL REQUIRETLS sent in the clear is refused, and STARTTLS afterwards forgets the
    session (RFC 3207 4.2): the first MAIL under TLS decides."""
    h = Harness(listener=Listener(tls="starttls"), tls_options=object())
    c = h.connect(RELAY_IP)
    c.ehlo()
    assert c.send(b"MAIL FROM:<s@example.com> REQUIRETLS\r\n") == ["555 5.5.4"]
    assert c.send(b"STARTTLS\r\n") == ["220 2.0.0"]
    c.complete_tls()
    assert c.send(b"MAIL FROM:<s@example.com>\r\n") == ["503 5.5.1"]   # EHLO needed again
    c.ehlo()
    assert c.send(b"MAIL FROM:<s@example.com> REQUIRETLS\r\n") == ["250 2.1.0"]


def test_mail_requiretls_with_a_value_is_malformed_even_under_tls():
    """REQUIRETLS takes no value (RFC 8689): 501 5.5.4."""
    _, c = implicit_client()
    c.ehlo()
    assert c.send(b"MAIL FROM:<s@example.com> REQUIRETLS=YES\r\n") == ["501 5.5.4"]
