"""outcome.classify: what a reply at a stage of a client session means for the recipients it
concerns (DESIGN invariant 4; STYLE habit 2).  Two tables: (stage, code, last MX?) ->
(kind, next_mx, site_failure), each row citing the RFC 5321 section (or the Postfix
practice) it checks; and real replies, from greylisters (postgrey, sqlgrey, milter-greylist,
greylistd, ...) and from big providers (Gmail, Microsoft, Yahoo), (stage, code, enhanced,
text, last MX?) -> the whole verdict (kind, site failure, greylisting, the wait asked for,
category).  Then the operator's rules, the outcome values a verdict makes, and hypothesis:
classify is total, and "try again later" without a greylister's word or delay is never
greylisting."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txmta import outcome
from txmta.categories import (BAD_DOMAIN, CATEGORIES, DNS_FAILURE, GREYLISTED, INVALID_RECIPIENT,
                              MAILBOX_FULL, OTHER, POLICY, RATE_LIMITED, SPAM_BLOCK, TLS_FAILURE,
                              Classifier, Rule)
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


T, P, D = TempFailed, PermFailed, Delivered
GREY_DEFAULT = 300.0   # postgrey's --delay default, for greylisting that names no delay

MEANING = [
    # (stage, code, enhanced, text, last_mx) -> (kind, site_failure, greylisted, retry_after, category)

    # -- greylisting (RFC 6647): replies of real greylisters that say so ---------------------
    # postgrey's default text: 450 4.2.0, the word and its help link, no delay named: 300 s
    # (postgrey's --delay default).
    (RCPT, 450, "4.2.0", "<bob@example.com>: Recipient address rejected: Greylisted, see "
     "http://postgrey.schweikert.ch/help/example.com.html", LAST,
     T, False, True, GREY_DEFAULT, GREYLISTED),
    # postgrey --greylist-text="Greylisted for %s seconds" (%s: the seconds left).
    (RCPT, 450, "4.2.0", "<bob@example.com>: Recipient address rejected: Greylisted for 246 "
     "seconds", LAST, T, False, True, 246.0, GREYLISTED),
    # sqlgrey: "Greylisted for N minutes" (its reconnect_delay), 450 or 451 4.7.1.
    (RCPT, 450, "4.7.1", "<bob@example.com>: Recipient address rejected: Greylisted for 5 "
     "minutes", LAST, T, False, True, 300.0, GREYLISTED),
    (RCPT, 451, "4.7.1", "<bob@example.com>: Recipient address rejected: Greylisted for 1 "
     "minutes", LAST, T, False, True, 60.0, GREYLISTED),
    # milter-greylist: "please come back in %R" (the time left, hh:mm:ss), at RCPT or, with a
    # DATA stage ACL, after the message; "please come back later" when it is told to be quiet.
    (RCPT, 451, "4.7.1", "Greylisting in action, please come back in 00:05:00", LAST,
     T, False, True, 300.0, GREYLISTED),
    (DOT, 451, "4.7.1", "Greylisting in action, please come back in 01:02:03", LAST,
     T, False, True, 3723.0, GREYLISTED),
    (RCPT, 451, "4.7.1", "Greylisting in action, please come back later", LAST,
     T, False, True, GREY_DEFAULT, GREYLISTED),
    # greylistd behind the Exim ACL of its documentation: no enhanced code, not the word, but
    # a text only it uses.
    (RCPT, 451, "", "192.0.2.1 is not yet authorized to deliver mail from <alice@example.org> "
     "to <bob@example.com>. Please try later.", LAST, T, False, True, GREY_DEFAULT, GREYLISTED),
    # Exim's greylisting recipes, MailEnable, Stalwart's greylisting script: the word, in any
    # code of the 4xx class.
    (RCPT, 451, "4.7.1", "Greylisting in progress, please try again later", LAST,
     T, False, True, GREY_DEFAULT, GREYLISTED),
    (RCPT, 451, "", "This server employs greylisting as a means of reducing spam. Please resend "
     "e-mail shortly", LAST, T, False, True, GREY_DEFAULT, GREYLISTED),
    (RCPT, 422, "4.2.2", "Greylisted, please try again in a few moments.", LAST,
     T, False, True, GREY_DEFAULT, GREYLISTED),
    (RCPT, 451, "", "Gray-listed, try again in 10 minutes", LAST, T, False, True, 600.0, GREYLISTED),
    # Without the word, a 450/451 with a greylister's code (4.2.0, 4.7.1) that names the
    # delay (a custom --greylist-text, rspamd's greylist module given a message with its
    # timeout).
    (RCPT, 450, "4.2.0", "Temporarily deferred, please retry in 300 seconds", LAST,
     T, False, True, 300.0, GREYLISTED),
    (RCPT, 451, "4.7.1", "Try again in 5 min", LAST, T, False, True, 300.0, GREYLISTED),
    # The delay the text names: seconds, minutes, hours, hh:mm:ss; after the word, a number
    # without a unit is seconds, and an address is no delay.
    (RCPT, 451, "4.7.1", "Greylisted, please retry in 1 hour", LAST,
     T, False, True, 3600.0, GREYLISTED),
    (RCPT, 450, "4.2.0", "Greylisted, retry after 60s", LAST, T, False, True, 60.0, GREYLISTED),
    (RCPT, 451, "4.7.1", "Greylisted, please retry in 90", LAST, T, False, True, 90.0, GREYLISTED),
    (RCPT, 450, "4.2.0", "Greylisted for 192.0.2.1", LAST, T, False, True, GREY_DEFAULT,
     GREYLISTED),
    # At MAIL and even at the greeting (there it is a site failure as well).
    (MAIL, 451, "4.7.1", "Greylisted", NOT_LAST, T, False, True, GREY_DEFAULT, GREYLISTED),
    (GREETING, 451, "4.7.1", "Greylisted", LAST, T, True, True, GREY_DEFAULT, GREYLISTED),

    # -- not greylisting: generic temporary failures follow the retry schedule ---------------
    # "Try again later" is what every temporary failure says.
    (RCPT, 451, "4.3.0", "try again later", LAST, T, False, False, None, OTHER),
    (DOT, 451, "4.3.0", "try again later", LAST, T, False, False, None, OTHER),
    (RCPT, 451, "4.3.2", "server busy", LAST, T, False, False, None, RATE_LIMITED),
    # Microsoft 365 throttling a sender it does not know yet.
    (DOT, 451, "4.7.500", "Server busy. Please try again later from [192.0.2.1]. (S77719)",
     LAST, T, False, False, None, RATE_LIMITED),
    # Gmail: the recipient receives too fast; unusual rate (421: a site failure as well);
    # its generic deferral.
    (RCPT, 450, "4.2.1", "The user you are trying to contact is receiving mail at a rate that\n"
     "prevents additional messages from being delivered. Please resend your\nmessage at a "
     "later time. If the user is able to receive mail at that\ntime, your message will be "
     "delivered.", LAST, T, False, False, None, RATE_LIMITED),
    (DOT, 421, "4.7.28", "Gmail has detected an unusual rate of unsolicited mail originating "
     "from your IP address. To protect our users from spam, mail sent from your IP address "
     "has been temporarily rate limited.", LAST, T, True, False, None, RATE_LIMITED),
    (DOT, 451, "4.3.0", "Mail server temporarily rejected message.", LAST,
     T, False, False, None, OTHER),
    # Yahoo: deferred for volume or complaints (421), or without a reason.
    (MAIL, 421, "4.7.0", "[TSS04] Messages from 192.0.2.1 temporarily deferred due to "
     "unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/"
     "error-codes", LAST, T, True, False, None, RATE_LIMITED),
    (DOT, 451, "", "Message temporarily deferred - [160]", LAST, T, False, False, None, OTHER),
    # A greylister's code without a delay or the word: not enough.
    (RCPT, 450, "4.7.1", "Service unavailable", LAST, T, False, False, None, POLICY),
    (RCPT, 451, "4.2.0", "Mailbox busy", LAST, T, False, False, None, OTHER),
    (RCPT, 451, "4.7.1", "please retry in 90", LAST, T, False, False, None, POLICY),
    (MAIL, 451, "4.7.1", "Service unavailable; Client host [192.0.2.1] blocked using "
     "zen.spamhaus.org, try again later", LAST, T, False, False, None, SPAM_BLOCK),
    # Greylisters whose reply does not say so look like any temporary failure and get the
    # schedule, whose first retry (1 minute by default) their delay soon lets through:
    # rspamd's greylist module (its default message, through its milter), Plesk's greylisting
    # filter, ASSP's delaying, OpenBSD spamd, Mimecast (its greylisting holds a triplet for
    # 60 s; the same reply is also its reputation deferral).
    (RCPT, 451, "4.7.1", "Try again later", LAST, T, False, False, None, POLICY),
    (DOT, 451, "4.7.1", "Service unavailable - try again later", LAST,
     T, False, False, None, POLICY),
    (RCPT, 451, "4.7.1", "Please try again later", LAST, T, False, False, None, POLICY),
    (RCPT, 451, "", "Temporary failure, please try again later.", LAST,
     T, False, False, None, OTHER),
    (RCPT, 451, "", "Internal resource temporarily unavailable - "
     "https://community.mimecast.com/docs/DOC-1369#451", LAST, T, False, False, None, OTHER),
    # RFC 5321 3.8: 421 closes the session; a site failure, never greylisting.
    (RCPT, 421, "4.7.0", "Try again later, closing connection.", LAST,
     T, True, False, None, POLICY),
    (RCPT, 421, "4.7.1", "Greylisted", LAST, T, True, False, None, GREYLISTED),
    (DOT, 421, "4.4.2", "mx.example.net Error: timeout exceeded", LAST, T, True, False, None, OTHER),
    (RCPT, 450, "4.2.1", "Mailbox busy", LAST, T, False, False, None, OTHER),  # other 4.2.x
    (RCPT, 451, "4.3.0", "Local error in processing", LAST, T, False, False, None, OTHER),
    (RCPT, 452, "4.2.2", "Mailbox full", LAST, T, False, False, None, MAILBOX_FULL),
    (STARTTLS, 454, "4.7.0", "TLS not available due to temporary reason", LAST,
     T, True, False, None, TLS_FAILURE),
    (RCPT, 550, "5.7.1", "Greylisted forever", LAST, P, False, False, None, POLICY),  # 5xx

    # -- not greylisting, but naming a wait: retried no earlier (retry.py) --------------------
    (DOT, 451, "4.3.0", "Temporarily deferred, please retry in 10 MINUTES", LAST,
     T, False, False, 600.0, OTHER),
    (RCPT, 450, "4.2.1", "Mailbox busy, try again in 00:02:00", LAST,
     T, False, False, 120.0, OTHER),

    # -- rate limits: the wait they ask for --------------------------------------------------
    (MAIL, 421, "4.7.0", "Too many connections from your IP, try again in 10 minutes", LAST,
     T, True, False, 600.0, RATE_LIMITED),
    (GREETING, 421, "4.7.0", "Too many concurrent SMTP connections; please try again in 60 "
     "seconds", LAST, T, True, False, 60.0, RATE_LIMITED),
    (DOT, 421, "4.7.28", "Gmail has detected an unusual rate of unsolicited mail. Try again "
     "in 1 hour.", LAST, T, True, False, 3600.0, RATE_LIMITED),
    # Without a wait in a form we read ("for 10.0.0.1" is not one), nothing is asked.
    (RCPT, 451, "4.7.0", "Rate limit exceeded for 10.0.0.1", LAST, T, False, False, None,
     RATE_LIMITED),
    (RCPT, 450, "4.2.1", "The user you are trying to contact is receiving mail at a rate that "
     "prevents additional messages from being delivered. Please resend your message later.",
     LAST, T, False, False, None, RATE_LIMITED),
    # A permanent failure asks for no wait, whatever its text says.
    (RCPT, 550, "5.7.1", "Blocked, try again in 10 minutes", LAST, P, False, False, None,
     SPAM_BLOCK),

    # -- categories of permanent failures and of the session ------------------------------
    (RCPT, 550, "5.1.1", "No such user", LAST, P, False, False, None, INVALID_RECIPIENT),
    (DOT, 554, "5.7.1", "Message rejected as spam", LAST, P, False, False, None, SPAM_BLOCK),
    (CONNECT, 451, "4.4.1", "cannot connect to mx.example.net [192.0.2.1]:25: Connection "
     "refused", LAST, T, True, False, None, OTHER),
    (STARTTLS, 451, "4.7.0", "TLS handshake failed: certificate verify failed", LAST,
     T, True, False, None, TLS_FAILURE),
    (GREETING, 554, "5.7.1", "No SMTP service here", LAST, T, True, False, None, POLICY),
    (GREETING, 521, "5.3.2", "mx.example.net does not accept mail", LAST,   # RFC 7504
     P, True, False, None, BAD_DOMAIN),
    # Routing (route.py's own replies).
    (ROUTE, 451, "4.4.3", "DNS lookup of MX for example.net failed: SERVFAIL", LAST,
     T, True, False, None, DNS_FAILURE),
    (ROUTE, 550, "5.1.2", "Recipient domain example.invalid does not exist (NXDOMAIN)", LAST,
     P, True, False, None, BAD_DOMAIN),
    (ROUTE, 556, "5.1.10", "Recipient domain example.net does not accept mail (null MX, "
     "RFC 7505)", LAST, P, True, False, None, BAD_DOMAIN),
    # Delivered: no category, nothing asked.
    (DOT, 250, "2.0.0", "Ok: queued as 4F3", LAST, D, False, False, None, ""),
]


@pytest.mark.parametrize("stage, code, enhanced, text, last_mx, kind, site_failure, greylisted, "
                         "retry_after, category", MEANING)
def test_classify_says_all_a_reply_means(stage, code, enhanced, text, last_mx, kind, site_failure,
                                         greylisted, retry_after, category):
    """Each reply gives the outcome kind, whether the destination is failing, whether it is
    greylisting, the seconds it asked us to wait and its bounce category."""
    v = classify(Reply(code, enhanced, text), stage, last_mx)
    assert (v.kind, v.site_failure, v.greylisted, v.retry_after, v.category) == (
        kind, site_failure, greylisted, retry_after, category)


@pytest.mark.parametrize("stage, code, expected", [
    (RCPT, 452, True),    # RFC 5321 4.5.3.1.10: too many recipients: the rest in another transaction
    (RCPT, 451, False),
    (MAIL, 452, False),   # 4.5.3.1.10 is about RCPT only
    (DOT, 452, False),
])
def test_only_a_452_at_rcpt_asks_for_another_transaction(stage, code, expected):
    assert classify(reply(code), stage).next_transaction is expected


def test_the_operators_rules_name_the_category_and_change_nothing_else():
    """`rules` ([[bounce.rules]] before the defaults) decide the category only."""
    r = Reply(451, "4.7.1", "Greylisted by policy, please retry in 120 seconds")
    rules = Classifier(extra=[Rule("451", r"by policy", POLICY)])
    mine, default = classify(r, RCPT, rules=rules), classify(r, RCPT)
    assert (mine.category, default.category) == (POLICY, GREYLISTED)
    assert mine.kind is default.kind is TempFailed
    assert (mine.greylisted, mine.retry_after) == (default.greylisted, default.retry_after) == (
        True, 120.0)


def test_a_verdict_makes_the_outcome_value():
    """Verdict.outcome carries what delivery, the queue and the retry need; Delivered has no
    category."""
    grey = Reply(451, "4.7.1", "Greylisted, please retry in 120 seconds")
    o = classify(grey, RCPT).outcome(grey, RCPT, "mx.example.net", "192.0.2.1", "TLSv1.3")
    assert o == TempFailed(grey, "mx.example.net", "192.0.2.1", "TLSv1.3", RCPT,
                           greylisted=True, retry_after=120.0, category=GREYLISTED)
    gone = Reply(550, "5.1.1", "no such user")
    assert classify(gone, RCPT).outcome(gone, RCPT) == PermFailed(gone, stage=RCPT,
                                                                  category=INVALID_RECIPIENT)
    ok = Reply(250, "2.0.0", "Ok")
    assert classify(ok, DOT).outcome(ok, DOT, "mx", remote_dsn=True) == Delivered(
        ok, "mx", remote_dsn=True)


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


# -- greylisting or not, by property ----------------------------------------------------------

GENERIC = ["try again later", "Please try again later", "Server busy", "Service unavailable",
           "Recipient temporarily deferred", "please retry later", "Temporary failure",
           "Please resend your message at a later time", "come back later", "[TSS04]",
           "rate limited for 192.0.2.1"]
WAITS = {"try again in 5 minutes": 300.0, "retry after 60 seconds": 60.0,
         "please come back in 00:10:00": 600.0, "Please try again in 2 hours": 7200.0}


@given(st.integers(400, 499), st.sampled_from(["", "4.0.0", "4.2.1", "4.3.0", "4.3.2", "4.4.5",
                                               "4.7.0", "4.7.28", "4.7.500", "4.7.650"]),
       st.lists(st.sampled_from(GENERIC + list(WAITS)), min_size=1, max_size=4),
       st.sampled_from(STAGES))
def test_a_generic_temporary_failure_is_never_greylisting(code, enhanced, phrases, stage):
    """A 4xx without the word, a greylister's text or a greylister's enhanced code is not
    greylisting, whatever it asks ("try again later", "try again in 5 minutes"): its retry
    follows the schedule, no earlier than a wait it names."""
    v = classify(Reply(code, enhanced, ". ".join(phrases)), stage)
    assert not v.greylisted
    waits = [WAITS[p] for p in phrases if p in WAITS]
    assert v.retry_after == (waits[0] if waits else None)


@given(st.sampled_from([450, 451]), st.sampled_from(["4.2.0", "4.7.1"]),
       st.lists(st.sampled_from(GENERIC + list(WAITS)), min_size=1, max_size=4),
       st.sampled_from([MAIL, RCPT, DATA, DOT]))
def test_a_greylisters_code_is_greylisting_only_with_a_delay(code, enhanced, phrases, stage):
    """450/451 with 4.2.0 or 4.7.1 (postgrey's, milter-greylist's, sqlgrey's codes) and no
    word is greylisting when it names the delay to wait, and then waits that delay."""
    v = classify(Reply(code, enhanced, ". ".join(phrases)), stage)
    waits = [WAITS[p] for p in phrases if p in WAITS]
    assert v.greylisted is bool(waits)
    assert v.retry_after == (waits[0] if waits else None)


# -- totality ----------------------------------------------------------------------------------

@given(st.integers(200, 599), st.sampled_from(STAGES), st.booleans(),
       st.one_of(st.sampled_from(["", "2.0.0", "4.2.0", "4.7.1", "5.1.1", "5.7.10"]),
                 st.text(max_size=12)),
       st.one_of(st.text(max_size=60),
                 st.sampled_from(["Greylisted", "please retry in 300 seconds", "try again later",
                                  "try again in 5 minutes", "retry after 9999999 hours",
                                  "4.7.1 Greylisted for 120 seconds",
                                  "Greylisting in action, please come back in 99:59:59",
                                  "192.0.2.1 is not yet authorized to deliver mail from <a@b>"])))
def test_classify_is_total(code, stage, last_mx, enhanced, text):
    """Every code 200-599 at every stage, with any enhanced code and text, yields a Verdict
    whose kind agrees with the code's class: a 2xx or 3xx is delivered, a 4xx is never
    permanent nor delivered, a 5xx never delivered (RFC 5321 4.2.1); only a failure may move to the next MX; only a
    temporary failure is greylisting (never a 421) or asks for a wait; every failure has a
    category and a delivery none; the outcome it makes is of its kind."""
    r = Reply(code, enhanced, text)
    v = classify(r, stage, last_mx)
    assert isinstance(v, Verdict)
    assert v.kind in (Delivered, TempFailed, PermFailed)
    if code < 400 and stage != ROUTE:      # routing only ever fails: it makes no 2xx
        assert v.kind is Delivered
    elif 400 <= code < 500:
        assert v.kind is TempFailed
    elif code >= 500:
        assert v.kind in (TempFailed, PermFailed)
    if v.next_mx:
        assert v.kind in (TempFailed, PermFailed) and not last_mx
    if v.kind is Delivered:
        assert not v.site_failure and not v.next_mx and v.category == ""
    else:
        assert v.category in CATEGORIES
    if v.greylisted:
        assert v.kind is TempFailed and 400 <= code < 500 and code != 421
        assert v.retry_after is not None
    if v.retry_after is not None:
        assert v.kind is TempFailed and v.retry_after >= 0.0
    if v.next_transaction:
        assert v.kind is TempFailed and stage == RCPT
    o = v.outcome(r, stage)
    assert isinstance(o, v.kind) and o.reply == r and o.stage == stage


@pytest.mark.parametrize("stage, code, enhanced, text, blocked", [
    # Postfix reject_rbl_client, at the greeting or at RCPT
    (GREETING, 554, "5.7.1", "Service unavailable; Client host [192.0.2.1] blocked using "
     "zen.spamhaus.org; https://www.spamhaus.org/query/ip/192.0.2.1", True),
    (RCPT, 550, "5.7.1", "Service unavailable; Client host [192.0.2.1] blocked using "
     "bl.spamcop.net", True),
    (CONNECT, 554, "", "mx.example.net ESMTP not accepting messages: 192.0.2.1 is blocklisted", True),
    (MAIL, 550, "", "Rejected: 192.0.2.1 listed at b.barracudacentral.org", True),
    # Microsoft
    (RCPT, 550, "5.7.1", "Unfortunately, messages from [192.0.2.1] weren't sent. Please contact "
     "your Internet service provider since part of their network is on our block list (S3150).",
     True),
    (MAIL, 550, "5.7.606", "Access denied, banned sending IP [192.0.2.1]", True),
    # Gmail
    (DOT, 421, "4.7.0", "This message is suspicious due to the very low reputation of the "
     "sending IP address. To protect our users from spam, mail sent from your IP address has "
     "been temporarily rate limited.", True),
    (DOT, 550, "5.7.1", "Our system has detected that this message is likely unsolicited mail. "
     "To reduce the amount of spam sent to Gmail, this message has been blocked.", False),
    (DOT, 421, "4.7.28", "Gmail has detected an unusual rate of unsolicited mail originating "
     "from your IP address.", True),
    # Yahoo
    (MAIL, 421, "4.7.0", "[TSS04] Messages from 192.0.2.1 temporarily deferred due to "
     "unexpected volume or user complaints", True),
    (GREETING, 554, "", "[TS03] All messages from 192.0.2.1 will be permanently deferred", True),
    # lists of domains or of content: not our address
    (DOT, 554, "5.7.1", "Service unavailable; Sender address [a@example.com] blocked using "
     "dbl.spamhaus.org", False),
    (DOT, 554, "5.7.1", "message rejected: URL listed in multi.uribl.com blocklist", False),
    # other failures
    (RCPT, 550, "5.1.1", "no such user", False),
    (RCPT, 450, "4.2.0", "Greylisted for 300 seconds", False),
    (DOT, 250, "2.0.0", "ok: queued, not blocklisted", False),
])
def test_a_reply_refusing_our_sending_address_is_blocked(stage, code, enhanced, text, blocked):
    """Block lists and providers' texts about our IP make `blocked` (ippool takes the address
    out of rotation); the verdict's kind is what it would be anyway."""
    v = classify(Reply(code, enhanced, text), stage)
    assert v.blocked is blocked
    if code >= 400:
        assert v.kind is (PermFailed if code >= 500 and stage not in outcome.SESSION_STAGES
                          else TempFailed) or (code in (521, 556))


def test_a_temporary_failure_names_the_source_address_it_came_from():
    grey = Reply(450, "4.2.0", "Greylisted")
    o = classify(grey, RCPT).outcome(grey, RCPT, "mx", "192.0.2.1", source="198.51.100.7")
    assert isinstance(o, TempFailed) and o.source == "198.51.100.7"
