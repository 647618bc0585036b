"""outcome.classify: what a reply at a stage of a client session means for the recipients it
concerns (DESIGN invariant 4; STYLE habit 2).  One table, (stage, code, last MX?) ->
(kind, next_mx, site_failure), each row citing the RFC 5321 section (or the Postfix
practice) it checks; and a hypothesis test that classify is total."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txmta import outcome
from txmta.outcome import (AUTH, CONNECT, DATA, DOT, EHLO, GREETING, MAIL, RCPT, ROUTE, STAGES,
                           STARTTLS, Delivered, PermFailed, TempFailed, Verdict, classify)
from txmta.reply import Reply

ENHANCED = {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}


def reply(code: int) -> Reply:
    return Reply(code, ENHANCED.get(code // 100, ""), "text")


LAST, NOT_LAST = True, False

TABLE = [
    # -- before any session: DNS and routing -----------------------------------------------
    # RFC 5321 5.1: a domain that does not resolve is a permanent failure, a lookup that
    # fails temporarily is retried; either way it concerns the whole destination.
    (ROUTE, 550, LAST, PermFailed, False, True),
    (ROUTE, 556, LAST, PermFailed, False, True),       # RFC 7505 null MX
    (ROUTE, 451, LAST, TempFailed, False, True),
    (ROUTE, 451, NOT_LAST, TempFailed, False, True),   # routing has no "next MX"

    # -- connecting: never permanent --------------------------------------------------------
    # RFC 5321 5.1: "the SMTP client SHOULD try ... the next" address when one fails.
    (CONNECT, 421, NOT_LAST, TempFailed, True, True),
    (CONNECT, 421, LAST, TempFailed, False, True),
    (CONNECT, 554, LAST, TempFailed, False, True),     # a synthetic 5xx at connect stays temporary
    (CONNECT, 554, NOT_LAST, TempFailed, True, True),

    # -- greeting (RFC 5321 3.1, 4.2: 220, or 554 "no SMTP service here"; RFC 7504 521) -------
    (GREETING, 220, LAST, Delivered, False, False),
    (GREETING, 421, NOT_LAST, TempFailed, True, True),  # RFC 5321 3.8: 421 = closing; try next
    (GREETING, 421, LAST, TempFailed, False, True),
    (GREETING, 554, NOT_LAST, TempFailed, True, True),  # another MX may accept (RFC 5321 5.1)
    # At the last MX a 5xx greeting defers, as Postfix does (smtp_skip_5xx_greeting = yes);
    # only RFC 7504's 521 and 556 ("does not accept mail") are permanent.
    (GREETING, 554, LAST, TempFailed, False, True),
    (GREETING, 521, LAST, PermFailed, False, True),
    (GREETING, 556, LAST, PermFailed, False, True),
    (GREETING, 521, NOT_LAST, TempFailed, True, True),

    # -- EHLO / STARTTLS / AUTH: still nothing said about a recipient -----------------------
    (EHLO, 250, LAST, Delivered, False, False),
    (EHLO, 421, NOT_LAST, TempFailed, True, True),
    (EHLO, 451, LAST, TempFailed, False, True),
    (EHLO, 550, NOT_LAST, TempFailed, True, True),
    (EHLO, 550, LAST, TempFailed, False, True),         # the session failed, not the mail
    (STARTTLS, 454, NOT_LAST, TempFailed, True, True),  # RFC 3207 4: 454 TLS not available
    (STARTTLS, 454, LAST, TempFailed, False, True),
    (STARTTLS, 501, LAST, TempFailed, False, True),
    (AUTH, 454, LAST, TempFailed, False, True),          # RFC 4954 6: 454 4.7.0 temporary auth failure
    # RFC 4954 6: 535 5.7.8 bad credentials: our configuration's fault, so the mail waits
    # (as with Postfix's smtp_sasl_auth_soft_bounce = yes).
    (AUTH, 535, LAST, TempFailed, False, True),
    (AUTH, 535, NOT_LAST, TempFailed, True, True),

    # -- MAIL FROM (RFC 5321 4.1.1.2, 4.2.5) ------------------------------------------------
    (MAIL, 250, LAST, Delivered, False, False),
    (MAIL, 451, LAST, TempFailed, False, False),        # temporary for this message, not the site
    (MAIL, 451, NOT_LAST, TempFailed, False, False),    # a 4xx at MAIL does not go to the next MX
    (MAIL, 452, LAST, TempFailed, False, False),
    (MAIL, 550, NOT_LAST, PermFailed, False, False),    # 5xx: permanent, whichever MX said it
    (MAIL, 553, LAST, PermFailed, False, False),
    (MAIL, 421, NOT_LAST, TempFailed, True, True),      # RFC 5321 3.8: 421 at any command = closing
    (MAIL, 421, LAST, TempFailed, False, True),

    # -- RCPT TO (RFC 5321 4.1.1.3, 4.2.5, 4.5.3.1.10) ---------------------------------------
    (RCPT, 250, LAST, Delivered, False, False),
    (RCPT, 251, LAST, Delivered, False, False),         # RFC 5321 3.4: will forward
    (RCPT, 450, LAST, TempFailed, False, False),        # mailbox busy / greylisted
    (RCPT, 451, NOT_LAST, TempFailed, False, False),
    (RCPT, 452, LAST, TempFailed, False, False),        # 4.5.3.1.10: too many recipients
    (RCPT, 550, NOT_LAST, PermFailed, False, False),    # no such user: bounce this recipient only
    (RCPT, 551, LAST, PermFailed, False, False),
    # 4.5.3.1.10: "Clients SHOULD treat a 552 code in this case as a temporary ... failure".
    # classify keeps it permanent, as Postfix does (smtp_proto.c, "I'll stick with RFC 821").
    (RCPT, 552, LAST, PermFailed, False, False),
    (RCPT, 421, NOT_LAST, TempFailed, True, True),

    # -- DATA command (RFC 5321 4.1.1.4: 354, or 4xx/5xx for every accepted recipient) -------
    (DATA, 354, LAST, Delivered, False, False),
    (DATA, 451, LAST, TempFailed, False, False),
    (DATA, 554, NOT_LAST, PermFailed, False, False),
    (DATA, 421, NOT_LAST, TempFailed, True, True),

    # -- end of data (RFC 5321 4.1.1.4, 6.1: the 250 here takes responsibility) ---------------
    (DOT, 250, LAST, Delivered, False, False),
    (DOT, 250, NOT_LAST, Delivered, False, False),
    (DOT, 451, LAST, TempFailed, False, False),
    (DOT, 452, NOT_LAST, TempFailed, False, False),
    (DOT, 552, LAST, PermFailed, False, False),         # 4.2.2: exceeded storage allocation
    (DOT, 554, NOT_LAST, PermFailed, False, False),     # content rejected: not worth another MX
    (DOT, 421, NOT_LAST, TempFailed, True, True),
    (DOT, 421, LAST, TempFailed, False, True),
]


@pytest.mark.parametrize("stage, code, last_mx, kind, next_mx, site_failure", TABLE)
def test_classify_table(stage, code, last_mx, kind, next_mx, site_failure):
    """Each (stage, code, last MX?) gives the outcome kind, whether to try the next MX host,
    and whether the destination itself is failing."""
    v = classify(reply(code), stage, last_mx)
    assert (v.kind, v.next_mx, v.site_failure) == (kind, next_mx, site_failure)


def test_table_covers_every_stage():
    """The table has rows for every stage classify knows."""
    assert {row[0] for row in TABLE} == set(STAGES)


def test_session_stages_are_those_before_mail():
    """Failures before MAIL FROM say nothing about a recipient (Postfix smtp_site_fail)."""
    assert outcome.SESSION_STAGES == {CONNECT, GREETING, EHLO, STARTTLS, AUTH}


@pytest.mark.parametrize("last_mx, kind, next_mx", [(NOT_LAST, PermFailed, True),
                                                    (LAST, PermFailed, False)])
def test_requiretls_refusal_tries_the_next_mx_then_bounces(last_mx, kind, next_mx):
    """RFC 8689 4.2.1: 5.7.10 (REQUIRETLS not met) at MAIL moves on to the next MX host, and
    bounces at the last one."""
    v = classify(Reply(550, "5.7.10", "REQUIRETLS: not verified"), MAIL, last_mx)
    assert (v.kind, v.next_mx) == (kind, next_mx)


def test_last_mx_defaults_to_true():
    """Without last_mx the reply is judged as if no other host remained."""
    assert classify(reply(521), GREETING).kind is PermFailed
    assert classify(reply(521), GREETING, last_mx=False).kind is TempFailed


# -- totality ----------------------------------------------------------------------------------

@given(st.integers(200, 599), st.sampled_from(STAGES), st.booleans(),
       st.sampled_from(["", "2.0.0", "4.7.1", "5.1.1"]), st.text(max_size=40))
def test_classify_is_total(code, stage, last_mx, enhanced, text):
    """Every code 200-599 at every stage yields a Verdict whose kind agrees with the code's
    class: a 4xx is never permanent nor delivered, a 5xx never delivered (RFC 5321 4.2.1),
    and only a failure may move to the next MX."""
    v = classify(Reply(code, enhanced, text), stage, last_mx)
    assert isinstance(v, Verdict)
    assert v.kind in (Delivered, TempFailed, PermFailed)
    if 400 <= code < 500:
        assert v.kind is TempFailed
    elif code >= 500:
        assert v.kind in (TempFailed, PermFailed)
    if v.next_mx:
        assert v.kind is TempFailed and not last_mx
    if v.kind is Delivered:
        assert not v.site_failure and not v.next_mx
