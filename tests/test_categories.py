"""categories: which kind of trouble a failure reply describes.  A table of realistic replies
(paraphrased from what big providers and common MTAs send) -> category, each with a comment
saying whose reply it imitates and which rule should catch it; the code pattern grammar;
extra rules from the config; parse_rules' errors; and hypothesis: the classifier is total and
stable."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txmta.categories import (BAD_DOMAIN, CATEGORIES, DEFAULT_RULES, DNS_FAILURE, GREYLISTED,
                              INVALID_RECIPIENT, MAILBOX_FULL, OTHER, POLICY, RATE_LIMITED,
                              SPAM_BLOCK, TLS_FAILURE, Classifier, Rule, category, enhanced_of,
                              parse_rules)
from txmta.outcome import DOT, MAIL, RCPT, ROUTE, STAGES, STARTTLS
from txmta.reply import Reply

TABLE = [
    # -- Gmail-style ------------------------------------------------------------------------
    # No such account: the classic 5.1.1 (RFC 3463 X.1.1 bad destination mailbox).
    (RCPT, 550, "5.1.1", "The email account that you tried to reach does not exist. Please try "
     "double-checking the recipient's email address for typos or unnecessary spaces.",
     INVALID_RECIPIENT),
    # A disabled account (X.2.1 mailbox disabled).
    (RCPT, 550, "5.2.1", "The email account that you tried to reach is disabled.",
     INVALID_RECIPIENT),
    # Out of storage, permanent and temporary (X.2.2 mailbox full).
    (RCPT, 552, "5.2.2", "The recipient's inbox is out of storage space. Please direct the "
     "recipient to the help center.", MAILBOX_FULL),
    (RCPT, 452, "4.2.2", "The email account that you tried to reach is over quota.",
     MAILBOX_FULL),
    # The recipient receives too fast: our rate, not the mailbox.
    (RCPT, 450, "4.2.1", "The user you are trying to contact is receiving mail at a rate that "
     "prevents additional messages from being delivered. Please resend your message later.",
     RATE_LIMITED),
    # Rate limited for unsolicited mail: "rate" wins over "spam" and over "DKIM" in a 4xx.
    (DOT, 421, "4.7.28", "Gmail has detected an unusual rate of unsolicited mail originating "
     "from your DKIM domain. To protect our users from spam, mail sent from your domain has "
     "been temporarily rate limited.", RATE_LIMITED),
    # Likely unsolicited mail, blocked.
    (DOT, 550, "5.7.1", "Our system has detected that this message is likely unsolicited mail. "
     "To reduce the amount of spam sent to Gmail, this message has been blocked.", SPAM_BLOCK),
    # Unauthenticated sender (RFC 7372 X.7.26): policy although the text says "blocked".
    (DOT, 550, "5.7.26", "This mail has been blocked because the sender is unauthenticated. "
     "Gmail requires all senders to authenticate with either SPF or DKIM.", POLICY),
    # Temporary authentication failure that also mentions spam: still policy.
    (DOT, 421, "4.7.0", "This message does not have authentication information or fails to "
     "pass authentication checks (SPF or DKIM). To best protect our users from spam, the "
     "message has been blocked.", POLICY),
    # Reverse DNS missing (RFC 7372 X.7.25): policy, not a DNS failure.
    (MAIL, 550, "5.7.25", "The IP address sending this message does not have a PTR record "
     "setup, or the corresponding forward DNS entry does not point to the sending IP.",
     POLICY),
    # STARTTLS required before MAIL (RFC 3207).
    (MAIL, 530, "5.7.0", "Must issue a STARTTLS command first.", TLS_FAILURE),
    # Direct-to-MX from an address they want to see relay: policy.
    (MAIL, 550, "5.7.1", "The IP you're using to send mail is not authorized to send email "
     "directly to our servers. Please use the SMTP relay at your service provider instead.",
     POLICY),
    # Our relayhost's daily sending quota: rate, not anyone's mailbox quota.
    (MAIL, 550, "5.4.5", "Daily user sending limit exceeded. For more information on Gmail "
     "sending limits go to the help center.", RATE_LIMITED),
    # Content refused for an attachment: policy, although "blocked".
    (DOT, 552, "5.7.0", "This message was blocked because its content presents a potential "
     "security issue. Please review our message content and attachment content guidelines.",
     POLICY),

    # -- Outlook / Microsoft 365-style --------------------------------------------------------
    # Recipient not found under 5.1.10 (which RFC 7505 gives to null MX): the text wins.
    (RCPT, 550, "5.1.10", "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address "
     "lookup", INVALID_RECIPIENT),
    # Directory based edge blocking: the tenant has no such recipient.
    (RCPT, 550, "5.4.1", "Recipient address rejected: Access denied. For more information see "
     "https://aka.ms/EXOSmtpErrors [AS(201806281)]", INVALID_RECIPIENT),
    # Sending network on their block list.
    (MAIL, 550, "5.7.1", "Unfortunately, messages from [192.0.2.1] weren't sent. Please contact "
     "your Internet service provider since part of their network is on our block list "
     "(S3150).", SPAM_BLOCK),
    # Banned sending IP (5.7.606-608).
    (MAIL, 550, "5.7.606", "Access denied, banned sending IP [192.0.2.1]. To request removal "
     "from this list please visit the sender support portal.", SPAM_BLOCK),
    # Temporarily rate limited for reputation: rate wins in a 4xx.
    (MAIL, 451, "4.7.650", "The mail server [192.0.2.1] has been temporarily rate limited due "
     "to IP reputation.", RATE_LIMITED),
    # Traffic refused from this IP: a policy refusal without block list words.
    (MAIL, 550, "5.7.708", "Service unavailable. Access denied, traffic not accepted from this "
     "IP.", POLICY),
    # Quota exceeded in the store driver.
    (DOT, 554, "5.2.2", "mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException",
     MAILBOX_FULL),
    # DMARC reject: policy.
    (DOT, 550, "5.7.509", "Access denied, sending domain example.org does not pass DMARC "
     "verification and has a DMARC policy of reject.", POLICY),
    # Too many connections.
    (MAIL, 421, "4.3.2", "The maximum number of concurrent server connections has exceeded a "
     "limit, closing transmission channel", RATE_LIMITED),
    # External forwarding forbidden by the recipient organization.
    (DOT, 550, "5.7.520", "Access denied, Your organization does not allow external "
     "forwarding.", POLICY),

    # -- Yahoo / AOL-style (often without an enhanced code) ---------------------------------
    (RCPT, 554, "", "delivery error: dd This user doesn't have a yahoo.com account "
     "(bob@yahoo.com) [0] - mta1234.mail.example.yahoo.com", INVALID_RECIPIENT),
    (RCPT, 554, "", "delivery error: dd Sorry your message to bob@yahoo.com cannot be "
     "delivered. This mailbox is disabled (554.30).", INVALID_RECIPIENT),
    (RCPT, 552, "", "1 Requested mail action aborted, mailbox not found", INVALID_RECIPIENT),
    # TSS04: deferred for volume or complaints: throttling.
    (MAIL, 421, "4.7.0", "[TSS04] Messages from 192.0.2.1 temporarily deferred due to "
     "unexpected volume or user complaints - 4.16.55.1; see the postmaster error codes",
     RATE_LIMITED),
    # BL21: the IP is on Spamhaus.
    (MAIL, 553, "5.7.1", "[BL21] Connections will not be accepted from 192.0.2.1, because the "
     "ip is in Spamhaus's list; see the postmaster error codes", SPAM_BLOCK),
    (DOT, 554, "5.7.9", "Message not accepted for policy reasons.  See the postmaster error "
     "codes", POLICY),
    (RCPT, 452, "4.2.2", "Mailbox is full", MAILBOX_FULL),

    # -- Postfix, Exim and friends ---------------------------------------------------------
    # Greylisters that say so (RFC 6647): postgrey, sqlgrey, milter-greylist, greylistd's
    # Exim ACL text; or a greylister's code (450 4.2.0, 451 4.7.1) naming the delay.
    (RCPT, 450, "4.2.0", "<bob@example.com>: Recipient address rejected: Greylisted, see "
     "http://postgrey.schweikert.ch/help/example.com.html", GREYLISTED),
    (RCPT, 450, "4.7.1", "<bob@example.com>: Recipient address rejected: Greylisted for 5 "
     "minutes", GREYLISTED),
    (RCPT, 451, "4.7.1", "Greylisting in action, please come back later", GREYLISTED),
    (RCPT, 451, "4.7.1", "Greylisting in action, please come back in 00:05:00", GREYLISTED),
    (RCPT, 451, "", "192.0.2.1 is not yet authorized to deliver mail from <alice@example.org> "
     "to <bob@example.com>. Please try later.", GREYLISTED),
    (RCPT, 450, "4.2.0", "Temporarily deferred, please retry in 300 seconds", GREYLISTED),
    # "Try again later" is no greylisting, whoever says it (rspamd's greylist module, ASSP,
    # OpenBSD spamd, a busy server): the code decides (X.7.1: policy), else "other".
    (RCPT, 451, "4.7.1", "Please try again later", POLICY),
    (RCPT, 451, "4.7.1", "Try again later", POLICY),
    (RCPT, 451, "4.3.0", "try again later", OTHER),
    (RCPT, 451, "", "Temporary failure, please try again later.", OTHER),
    (RCPT, 451, "", "Internal resource temporarily unavailable - "
     "https://community.mimecast.com/docs/DOC-1369#451", OTHER),
    (RCPT, 450, "4.7.1", "Service unavailable", POLICY),
    # A busy server is congested: rate, whatever its code (Microsoft's 4.7.500).
    (DOT, 451, "4.7.500", "Server busy. Please try again later from [192.0.2.1]. (S77719)",
     RATE_LIMITED),
    (RCPT, 451, "4.3.2", "server busy", RATE_LIMITED),
    # A DNSBL rejection, permanent and temporary: never greylisting.
    (MAIL, 554, "5.7.1", "Service unavailable; Client host [192.0.2.1] blocked using "
     "zen.spamhaus.org; https://www.spamhaus.org/query/ip/192.0.2.1", SPAM_BLOCK),
    (MAIL, 451, "4.7.1", "Service unavailable; Client host [192.0.2.1] blocked using "
     "zen.spamhaus.org, try again later", SPAM_BLOCK),
    (RCPT, 550, "5.1.1", "<bob@example.com>: Recipient address rejected: User unknown in "
     "virtual mailbox table", INVALID_RECIPIENT),
    (RCPT, 554, "5.7.1", "<bob@example.com>: Relay access denied", POLICY),
    # Our sender's domain does not resolve for them (X.1.8): their policy, not a bad domain.
    (MAIL, 450, "4.1.8", "<alice@example.org>: Sender address rejected: Domain not found",
     POLICY),
    (MAIL, 553, "5.1.8", "<alice@example.org>: Sender address rejected: Domain not found",
     POLICY),
    # Their lookup of the recipient domain failed temporarily (X.1.2 under a 4xx).
    (RCPT, 450, "4.1.2", "<bob@example.net>: Recipient address rejected: Domain not found",
     DNS_FAILURE),
    (RCPT, 421, "4.3.2", "Too many concurrent SMTP connections; please try again later",
     RATE_LIMITED),
    (RCPT, 452, "4.5.3", "Too many recipients", RATE_LIMITED),       # RFC 5321 4.5.3.1.10
    (DOT, 550, "", "Message rejected as spam by Content Filtering.", SPAM_BLOCK),
    (DOT, 550, "5.7.1", "Message rejected due to content restrictions", POLICY),   # X.7.1 alone
    (RCPT, 550, "", "Unrouteable address", BAD_DOMAIN),              # Exim: no route to domain
    (DOT, 554, "5.0.0", "Service unavailable", OTHER),
    (DOT, 452, "4.3.1", "Insufficient system resources", OTHER),
    (DOT, 451, "4.3.0", "Temporary local problem", OTHER),

    # -- our own replies: routing and TLS -----------------------------------------------------
    (ROUTE, 550, "5.1.2", "Host or domain name not found. Name service error for "
     "name=example.invalid type=MX: Host not found", BAD_DOMAIN),
    (ROUTE, 451, "4.4.3", "Host or domain name not found. Name service error for "
     "name=example.com type=MX: Host not found, try again", DNS_FAILURE),
    (ROUTE, 556, "5.1.10", "Recipient domain example.com has a null MX (RFC 7505)", BAD_DOMAIN),
    (ROUTE, 451, "4.4.3", "SERVFAIL looking up MX for example.com", DNS_FAILURE),
    (ROUTE, 550, "5.4.4", "Unable to route to example.com", BAD_DOMAIN),
    (ROUTE, 451, "4.0.0", "routing failed", DNS_FAILURE),            # the stage decides
    (STARTTLS, 454, "4.7.0", "TLS not available due to local problem", TLS_FAILURE),
    (STARTTLS, 421, "4.4.2", "Timeout exceeded", TLS_FAILURE),       # the stage decides
    ("", 451, "4.7.5", "Certificate verification failed for mx.example.com", TLS_FAILURE),
    ("", 550, "5.7.10", "Encryption needed", TLS_FAILURE),           # RFC 5248 X.7.10
]


@pytest.mark.parametrize("stage, code, enhanced, text, expected", TABLE)
def test_realistic_reply_gets_its_category(stage, code, enhanced, text, expected):
    """Each realistic reply in the table falls into the category its comment names."""
    assert category(Reply(code, enhanced, text), stage) == expected


@pytest.mark.parametrize("reply, expected", [
    # RFC 3463 codes alone, with a text that says nothing.
    (Reply(550, "5.1.1", "nope"), INVALID_RECIPIENT),
    (Reply(550, "5.1.0", "nope"), INVALID_RECIPIENT),
    (Reply(552, "5.2.2", "nope"), MAILBOX_FULL),
    (Reply(452, "4.2.2", "nope"), MAILBOX_FULL),
    (Reply(550, "5.1.2", "nope"), BAD_DOMAIN),
    (Reply(556, "5.1.10", "nope"), BAD_DOMAIN),
    (Reply(451, "4.4.3", "nope"), DNS_FAILURE),
    (Reply(451, "4.4.5", "nope"), RATE_LIMITED),
    (Reply(550, "5.7.1", "nope"), POLICY),
    (Reply(450, "4.7.0", "nope"), POLICY),
    (Reply(550, "5.7.5", "nope"), TLS_FAILURE),
    (Reply(550, "5.7.4", "nope"), TLS_FAILURE),
    (Reply(550, "5.7.23", "nope"), POLICY),                  # RFC 7372 SPF validation failed
    (Reply(550, "5.5.1", "nope"), OTHER),
    # The enhanced code at the start of the text, when a client left it there.
    (Reply(552, "", "5.2.2 Requested action aborted"), MAILBOX_FULL),
])
def test_enhanced_code_alone_decides_when_the_text_says_nothing(reply, expected):
    """Without telling words, the enhanced status code (RFC 3463, RFC 5248) decides."""
    assert category(reply) == expected


@pytest.mark.parametrize("code, reply, matches", [
    ("*", Reply(250, "", "x"), True),
    ("5.1.1", Reply(550, "5.1.1", "x"), True),
    ("5.1.1", Reply(550, "5.1.10", "x"), False),
    ("5.1.1", Reply(550, "5.01.001", "x"), True),            # numbers, not strings
    ("x.1.1", Reply(450, "4.1.1", "x"), True),
    ("5.7.*", Reply(550, "5.7.606", "x"), True),
    ("5.7.*", Reply(550, "5.1.1", "x"), False),
    ("4.*", Reply(451, "4.4.3", "x"), True),
    ("5.1.1", Reply(550, "", "x"), False),                    # no enhanced code: no match
    ("421", Reply(421, "4.7.0", "x"), True),
    ("45x", Reply(451, "4.7.1", "x"), True),
    ("45x", Reply(421, "4.7.1", "x"), False),
    ("5xx", Reply(554, "", "x"), True),
    ("451 4.7.1", Reply(451, "4.7.1", "x"), True),
    ("451 4.7.1", Reply(450, "4.7.1", "x"), False),
    ("450 4.2.0|451 4.7.1", Reply(450, "4.2.0", "x"), True),
    ("5.1.1|5.1.0", Reply(550, "5.1.0", "x"), True),
])
def test_rule_code_patterns(code, reply, matches):
    """A rule's code matches reply codes and enhanced codes, with x/* wildcards and "|"."""
    assert Rule(code, None, OTHER).matches(reply) is matches


def test_rule_pattern_is_case_insensitive_and_searched():
    """The text pattern is a case-insensitive regex searched anywhere in the text."""
    rule = Rule("*", r"over quota", MAILBOX_FULL)
    assert rule.matches(Reply(552, "5.2.2", "Recipient is OVER QUOTA today"))
    assert not rule.matches(Reply(552, "5.2.2", "Recipient is quota over"))


def test_rule_stage_restricts_where_it_applies():
    """A rule with a stage applies only to replies seen at that stage."""
    rule = Rule("*", None, TLS_FAILURE, stage=STARTTLS)
    assert rule.matches(Reply(454, "4.7.0", "x"), STARTTLS)
    assert not rule.matches(Reply(454, "4.7.0", "x"), RCPT)


def test_extra_rules_are_tried_before_the_defaults():
    """Rules from the config come first: an operator can override a default."""
    reply = Reply(550, "5.1.1", "User unknown")
    assert category(reply) == INVALID_RECIPIENT
    classifier = Classifier(extra=[Rule("5.1.1", r"unknown", POLICY)])
    assert classifier.category(reply) == POLICY
    assert classifier.rule_for(reply) == Rule("5.1.1", r"unknown", POLICY)


def test_first_matching_rule_wins():
    """Rules are tried in order; the first that matches gives the category."""
    classifier = Classifier(rules=[Rule("5xx", None, POLICY), Rule("5.1.1", None, OTHER)])
    assert classifier.category(Reply(550, "5.1.1", "x")) == POLICY
    assert Classifier(rules=[]).category(Reply(550, "5.1.1", "x")) == OTHER


def test_enhanced_of_normalizes():
    """enhanced_of reads the reply's code, or a leading one in the text."""
    assert enhanced_of(Reply(550, "5.01.1", "x")) == ("5", "1", "1")
    assert enhanced_of(Reply(550, "", " 5.7.1 blocked")) == ("5", "7", "1")
    assert enhanced_of(Reply(550, "", "blocked")) is None
    assert enhanced_of(Reply(550, "bogus", "x")) is None


def test_parse_rules_builds_rules():
    """Config tables become rules, in order; pattern and stage are optional."""
    rules = parse_rules([
        {"code": "5.7.1", "pattern": "example-rbl", "category": "spam-block"},
        {"code": "4xx", "category": "greylisted", "stage": "rcpt"},
        {"code": "*", "pattern": "", "category": "other"},
    ])
    assert rules == [Rule("5.7.1", "example-rbl", SPAM_BLOCK), Rule("4xx", None, GREYLISTED, RCPT),
                     Rule("*", None, OTHER)]


@pytest.mark.parametrize("items, field", [
    ([{"pattern": "x", "category": "policy"}], "code"),                   # missing code
    ([{"code": "5.1.1"}], "category"),                                    # missing category
    ([{"code": "5.1.1", "category": "bogus"}], "category"),
    ([{"code": "5.1.1", "pattern": "(", "category": "policy"}], "pattern"),
    ([{"code": "5.1", "category": "policy"}], "code"),
    ([{"code": "6.1.1", "category": "policy"}], "code"),
    ([{"code": "55", "category": "policy"}], "code"),
    ([{"code": "5.a.1", "category": "policy"}], "code"),
    ([{"code": "", "category": "policy"}], "code"),
    ([{"code": 550, "category": "policy"}], "code"),
    ([{"code": "5.1.1", "category": "policy", "stage": "lunch"}], "stage"),
    ([{"code": "5.1.1", "category": "policy", "colour": "red"}], "colour"),
    (["5.1.1"], "table"),
])
def test_parse_rules_errors_name_the_field(items, field):
    """A bad [[bounce.rule]] entry is a ValueError naming the rule and the bad field."""
    with pytest.raises(ValueError) as info:
        parse_rules(items)
    assert "bounce rule 1" in str(info.value)
    assert field in str(info.value)


def test_default_rules_cover_every_category_but_other():
    """Every category except the fallback has at least one default rule."""
    assert {r.category for r in DEFAULT_RULES} == set(CATEGORIES) - {OTHER}


REPLIES = st.builds(
    Reply,
    code=st.integers(200, 599),
    enhanced=st.one_of(st.just(""), st.from_regex(r"\A[245]\.[0-9]{1,3}\.[0-9]{1,3}\Z"),
                       st.text(max_size=12)),
    text=st.text(max_size=300))


@given(REPLIES, st.sampled_from(("",) + STAGES))
def test_classifier_is_total_and_stable(reply, stage):
    """Any reply at any stage gets exactly one of the categories, the same every time."""
    first = category(reply, stage)
    assert first in CATEGORIES
    assert category(reply, stage) == first
    assert Classifier().category(reply, stage) == first
