"""What an attempt did to each recipient, and the one place that decides what a reply means.

Pure: no I/O.  An attempt yields, per recipient, `Delivered`, `TempFailed` or `PermFailed`
(DESIGN invariant 4: remote behaviour never raises).  `classify()` turns an SMTP reply seen
at some stage of a session into a `Verdict` that says everything delivery needs: the outcome
kind; whether to try the next MX host, or another transaction on the same host; whether the
failure is the destination's (so its queued mail waits for the destination's retry, not each
message separately); whether the reply is greylisting and how long it asked us to wait; whether it asks us to
slow down (per-provider shaping backs off: outbound/shaping.py); and its bounce category.  `Verdict.outcome()` makes the outcome value from it.  Nothing else
interprets a reply: the queue, the retry arithmetic and the dispatcher read these values.

The rules follow RFC 5321 4.2.1 and 4.5.4.1 and Postfix's smtp_trouble.c: a failure to
connect or a 4xx/5xx greeting, EHLO, STARTTLS or AUTH is a site failure (try the next MX;
throttle the destination if it was the last) and never bounces, except a 521/556 greeting
(RFC 7504: the host accepts no mail); a 5xx at MAIL, RCPT or end of DATA is permanent for
the recipients concerned; a 4xx there is temporary for them and tells nothing about the
site, except a 421 (RFC 5321 3.8: the server is closing the session), which is a site
failure at any stage.  A 452 at RCPT (RFC 5321 4.5.3.1.10, too many recipients) asks for the
rest in another transaction.  Callers classify positive replies only at the end of the data
(DOT).

Greylisting (RFC 6647): a greylister defers the first attempt from an unknown (client,
sender, recipient) triplet and accepts a retry from the same client after some minutes.  Only
a reply that says it is greylisting gets the greylisting retry: a 4xx other than 421 whose
text has the word ("Greylisted", "greylisting", "gray-listed") or a greylister's own text
(greylistd's "is not yet authorized to deliver mail from"), or a 450/451 with 4.2.0 or 4.7.1
that names the delay to wait ("please retry in 300 seconds", "come back in 00:05:00").  Its
`retry_after` is the delay the text names, or `GREYLISTING_DEFAULT`.  A generic temporary
failure is not greylisting, however much it asks to "try again later" ("451 4.3.0 try again
later", Microsoft's "451 4.7.500 Server busy", a greylister that says nothing but that, as
OpenBSD spamd's "451 Temporary failure, please try again later."): it follows the retry
schedule, which retries such a greylister soon enough.  Any temporary failure that is not
greylisting and asks for a wait ("try again in 5 minutes", "retry after 60 seconds", as rate
limiters say) has that wait as `retry_after`.  What the retry does with them is retry.py's
arithmetic.

Blocked (`Verdict.blocked`): a failure whose text says that the sending address itself is
refused, whatever the stage or code: a DNS block list ("Client host [192.0.2.1] blocked using
zen.spamhaus.org", Spamcop, Barracuda, SORBS, "blocklisted", "RBL"), Microsoft's "banned
sending IP" (S3150, S3140, 5.7.606-608), Gmail's texts about the reputation of, or unsolicited
mail from, "your IP address", Yahoo's TSS0x deferrals.  Delivery takes that source address out
of rotation for the provider (outbound/ippool.py).  A domain or content list (Spamhaus DBL,
URIBL, SURBL) says nothing about the address and is not `blocked`.

The category comes from the bounce rules (categories.py: the defaults, or the operator's
`[[bounce.rules]]` passed as `rules`); it describes a failure and never changes the verdict.
"""
# test: tests/test_outcome.py

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from txmta.reply import Reply

if TYPE_CHECKING:
    from txmta.categories import Classifier

# Stages of a client session, in order.
CONNECT = "connect"
GREETING = "greeting"
EHLO = "ehlo"
STARTTLS = "starttls"
AUTH = "auth"
MAIL = "mail"
RCPT = "rcpt"
DATA = "data"       # the reply to the DATA command (354 expected)
DOT = "dot"         # the reply after the message content
ROUTE = "route"     # before any session: DNS and routing
STAGES = (ROUTE, CONNECT, GREETING, EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA, DOT)
SESSION_STAGES = frozenset({CONNECT, GREETING, EHLO, STARTTLS, AUTH})

GREYLISTING_DEFAULT = 300.0   # seconds; postgrey's --delay default, and what most greylisters use


@dataclass(frozen=True, slots=True)
class Delivered:
    reply: Reply
    host: str = ""            # remote MX name
    address: str = ""         # remote IP
    tls: str = ""             # e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"
    remote_dsn: bool = False  # the next hop took DSN parameters (else a "relayed" DSN is owed)
    stage: str = "dot"


@dataclass(frozen=True, slots=True)
class TempFailed:
    reply: Reply
    host: str = ""
    address: str = ""
    tls: str = ""
    stage: str = ""
    greylisted: bool = False           # the reply is greylisting (RFC 6647)
    retry_after: float | None = None   # seconds the reply asked us to wait, if it said
    category: str = ""                 # bounce category (categories.CATEGORIES)
    source: str = ""                   # our source address of the attempt ("" = the system's)


@dataclass(frozen=True, slots=True)
class PermFailed:
    reply: Reply
    host: str = ""
    address: str = ""
    tls: str = ""
    stage: str = ""
    category: str = ""


Outcome = Delivered | TempFailed | PermFailed


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: type                     # Delivered, TempFailed or PermFailed
    next_mx: bool = False          # try the recipients at the next MX host / address
    site_failure: bool = False     # the destination itself is failing: at the last MX, a
                                   # deferral throttles the destination as a whole
    next_transaction: bool = False # try the recipient again in another transaction on this host
    greylisted: bool = False       # greylisting: retry once after retry_after
    retry_after: float | None = None   # seconds the reply asked us to wait, if it said
    category: str = ""             # bounce category of a failure; "" when delivered
    slow_down: bool = False        # the server asks us to send more slowly (shaping.py)
    blocked: bool = False          # the reply refuses our sending address (a block list)

    def outcome(self, reply: Reply, stage: str, host: str = "", address: str = "",
                tls: str = "", remote_dsn: bool = False, source: str = "") -> Outcome:
        """The outcome this verdict gives a recipient for `reply` at `stage` from `host`,
        sent from our `source` address."""
        if self.kind is Delivered:
            return Delivered(reply, host, address, tls, remote_dsn, stage)
        if self.kind is PermFailed:
            return PermFailed(reply, host, address, tls, stage, self.category)
        return TempFailed(reply, host, address, tls, stage, self.greylisted, self.retry_after,
                          self.category, source)


def classify(reply: Reply, stage: str, last_mx: bool = True,
             rules: Classifier | None = None) -> Verdict:
    """Decide what `reply`, received at `stage`, means for the recipients it concerns.

    `last_mx`: no other host is left to try.  `rules`: the bounce categories (the operator's
    `Classifier`); the default rules when None."""
    kind, next_mx, site_failure = _kind(reply, stage, last_mx)
    if kind is Delivered:
        return Verdict(Delivered)
    if rules is None:
        rules = _default_rules()
    retry_after = _greylisting(reply) if kind is TempFailed else None
    greylisted = retry_after is not None
    if kind is TempFailed and not greylisted:
        retry_after = _named_delay(reply.text, _ASKED_WAIT)
    category = rules.category(reply, stage)
    return Verdict(kind, next_mx, site_failure,
                   next_transaction=stage == RCPT and reply.code == 452,
                   greylisted=greylisted, retry_after=retry_after,
                   category=category,
                   slow_down=kind is TempFailed and not greylisted and _slow_down(reply, category),
                   blocked=_blocked(reply))


def _kind(reply: Reply, stage: str, last_mx: bool) -> tuple[type, bool, bool]:
    """(outcome kind, try the next MX?, site failure?)."""
    if stage in SESSION_STAGES:
        # Nothing was said about any recipient: the host failed, another MX may work, and
        # at the last MX the mail waits, as with Postfix's smtp_skip_5xx_greeting and
        # smtp_sasl_auth_soft_bounce (a 535 is our credentials' fault, not the mail's).
        # Only a server that says it never accepts mail (RFC 7504: 521, 556) bounces.
        if reply.code < 400:
            return Delivered, False, False
        if reply.code in (521, 556) and last_mx and stage in (GREETING, CONNECT):
            return PermFailed, False, True
        return TempFailed, not last_mx, True
    if stage == ROUTE:
        return (PermFailed if reply.permanent else TempFailed), False, True
    if reply.code < 400:
        return Delivered, False, False
    if stage == MAIL and reply.permanent and reply.enhanced == "5.7.10" and not last_mx:
        # RFC 8689 4.2.1: REQUIRETLS could not be met by this host; another MX may meet it
        return PermFailed, True, False
    if reply.permanent:
        return PermFailed, False, False
    # 4xx at MAIL/RCPT/DATA/DOT: temporary for these recipients. A 421 means the server is
    # closing the session: a site problem, and another MX may take the mail.
    if reply.code == 421:
        return TempFailed, not last_mx, True
    return TempFailed, False, False


def _default_rules() -> Classifier:
    # imported here: categories.py names its rules' stages with this module's constants
    from txmta.categories import DEFAULT_CLASSIFIER
    return DEFAULT_CLASSIFIER


# -- the sending address blocked ----------------------------------------------------------

# Texts that refuse the sending address: DNS block lists (Postfix's reject_rbl_client text
# "Client host [192.0.2.1] blocked using zen.spamhaus.org"; Spamhaus but its domain list DBL,
# Spamcop, Barracuda, SORBS), Microsoft ("5.7.606 Access denied, banned sending IP [192.0.2.1]",
# "(S3150)", "(S3140)"), Gmail ("421 4.7.0 ... very low reputation of the sending IP address",
# "unusual rate of unsolicited mail originating from your IP address"), Yahoo ("421 4.7.0
# [TSS04] Messages from 192.0.2.1 temporarily deferred", "[TS03]").
BLOCKED_TEXT = (r"blocked using|(?<!dbl\.)spamhaus|spamcop|barracuda|\bsorbs\b|"
                r"\b(?:rbl|dnsbl)\b|\b(?:block|black|deny) ?list(?:ed)?\b|"
                r"banned sending ip|\bS31[45]0\b|\bTSS?0[1-9]\b|"
                r"reputation of (?:the |your )?(?:sending )?ip\b|"
                r"\bip(?: address)?\b[^.]{0,40}\breputation|from your ip address")
_BLOCKED_WORDS = re.compile(BLOCKED_TEXT, re.IGNORECASE)
_BLOCKED_ENHANCED = frozenset({"5.7.606", "5.7.607", "5.7.608"})
_CONTENT_LISTS = re.compile(r"\b(?:uribl|surbl)\b|dbl\.spamhaus", re.IGNORECASE)


def _blocked(reply: Reply) -> bool:
    """Whether a failure `reply` refuses our sending address."""
    if reply.code < 400:
        return False
    if reply.stated_enhanced in _BLOCKED_ENHANCED:
        return True
    return (_BLOCKED_WORDS.search(reply.text) is not None
            and _CONTENT_LISTS.search(reply.text) is None)


# -- greylisting and asked-for waits ----------------------------------------------------------

# Texts that say greylisting: the word, however spelled (postgrey's "Greylisted, see
# http://postgrey.schweikert.ch/help/...", sqlgrey's "Greylisted for 5 minutes",
# milter-greylist's "Greylisting in action, please come back in 00:05:00", MailEnable's
# "This server employs greylisting"), the greylisters' names, and the Exim ACL text that
# greylistd's documentation gives ("192.0.2.1 is not yet authorized to deliver mail from
# <...> to <...>. Please try later.").  categories.py's rule for the category reads the same.
GREYLISTING_TEXT = (r"gr[ae]y[\s-]?list|postgrey|sqlgrey|"
                    r"not yet authori[sz]ed to deliver mail from")
# Codes and enhanced codes greylisters use when the word is missing from a custom text:
# Postfix policy servers (postgrey) answer "450 4.2.0", milter-greylist, sqlgrey and the
# Exim greylisting recipes "451 4.7.1" (RFC 3463 3.3 X.2.0 "other mailbox status", 3.8 X.7.1
# "delivery not authorized").  They make a reply greylisting only with a delay it names.
_GREYLISTING_CODES = frozenset({450, 451})
_GREYLISTING_ENHANCED = frozenset({"4.2.0", "4.7.1"})
# A duration: a number and a unit, or milter-greylist's hh:mm:ss (its %R).
_UNIT = r"(seconds?|secs?|s|minutes?|mins?|m|hours?|hrs?|h)(?![a-z])"
_HMS = r"(\d{1,3}):([0-5]\d):([0-5]\d)(?!\d)"
_NUMBER = r"(\d{1,7})(?!\d)(?!\.\d)"          # not part of an address or a decimal
# A wait a temporary failure asks for ("421 4.7.0 Too many connections, try again in 60
# seconds", "451 4.7.1 Greylisting in action, please come back in 00:05:00"): a verb of
# retrying, then "in" or "after", then a number with its unit or hh:mm:ss.
ASKED_WAIT = (r"\b(?:try(?:\s+again)?|retry|resend|come\s+back)\s+(?:in|after)\s+"
              rf"(?:{_HMS}|{_NUMBER}\s*{_UNIT})")
_ASKED_WAIT = re.compile(ASKED_WAIT, re.IGNORECASE)
# A greylister's delay, read only in a reply that says greylisting, so looser: "in", "after"
# or "for", and a number whose unit may be missing (seconds): "Greylisted for 300 seconds"
# (postgrey's --greylist-text "Greylisted for %s seconds"), "Greylisted for 5 minutes"
# (sqlgrey), "please retry in 90".
_GREYLISTING_DELAY = re.compile(
    rf"\b(?:in|after|for)\s+(?:{_HMS}|{_NUMBER}(?:\s*{_UNIT}|(?!\s*[a-z])))", re.IGNORECASE)
_GREYLISTING_WORDS = re.compile(GREYLISTING_TEXT, re.IGNORECASE)
_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _greylisting(reply: Reply) -> float | None:
    """The seconds a greylisting `reply` asks us to wait, or None if it is not greylisting.

    Greylisting is a 4xx but 421 that says so (the word or a greylister's text: the delay
    it names, else GREYLISTING_DEFAULT), or a 450/451 with 4.2.0 or 4.7.1 that names a
    delay.  "Try again later" alone is not greylisting."""
    if not reply.transient or reply.code == 421:   # 421: the server is closing; not a greylister
        return None
    if _GREYLISTING_WORDS.search(reply.text) is not None:
        delay = _named_delay(reply.text, _GREYLISTING_DELAY)
        return GREYLISTING_DEFAULT if delay is None else delay
    if reply.code in _GREYLISTING_CODES and reply.stated_enhanced in _GREYLISTING_ENHANCED:
        return _named_delay(reply.text, _ASKED_WAIT)
    return None


# "Slow down": a 421/451 with 4.7.0 (Yahoo's TSS04, Microsoft's throttling) or 4.7.28
# (Gmail's rate limit), or any temporary failure the bounce rules call rate-limited ("rate
# limited", "too many connections", "server busy", X.4.5 congestion).
_SLOW_DOWN_ENHANCED = frozenset({"4.7.0", "4.7.28"})


def _slow_down(reply: Reply, category: str) -> bool:
    from txmta.categories import RATE_LIMITED
    if category == RATE_LIMITED:
        return True
    return reply.code in (421, 451) and reply.stated_enhanced in _SLOW_DOWN_ENHANCED


def _named_delay(text: str, pattern: re.Pattern[str]) -> float | None:
    """The seconds `text` names by `pattern` (hh:mm:ss, or a number and an optional unit),
    or None."""
    m = pattern.search(text)
    if m is None:
        return None
    hours, minutes, seconds, number, unit = m.groups()
    if number is None:
        return float(int(hours) * 3600 + int(minutes) * 60 + int(seconds))
    return float(number) * _SECONDS[(unit or "s")[0].lower()]
