"""Bounce categories: what kind of trouble a failure reply describes, for logs, metrics and events.

Pure: no I/O.  `Classifier.category(reply, stage)` names one of `CATEGORIES`
("invalid-recipient", "mailbox-full", "spam-block", ...), so that operators can count, graph and
suppress by cause.  This module is the rule table (data and matching) only: delivery consults
it through `outcome.classify`, which puts the category in its verdict and so in the outcome the
queue records.  A category never decides what happens to the mail: `outcome.classify` alone
decides whether a reply defers, bounces, moves to the next MX or is greylisting (STYLE habit
2); a category only describes.

The classification is a table of `Rule`s tried in order, first match wins: text rules first
(the words a provider uses are more precise than the code it picked), then rules on the
enhanced status code alone (RFC 3463, with the registry of RFC 5248: X.1.1 bad mailbox,
X.2.2 mailbox full, X.4.5 congestion, X.7.x security or policy, RFC 7372 X.7.20-27
authentication), then the session stage, then "other".  Operators add rules in front of the
defaults (`[[bounce.rules]]` in the configuration; `parse_rules` validates them).

A rule's `code` is `"*"` or alternatives separated by "|"; each alternative is an enhanced
code pattern ("5.1.1", "x.1.1", "5.7.*", "4.*"), a reply code pattern ("421", "45x", "5xx"),
or both separated by a space ("451 4.7.1"), all of which must match.  "x" and "*" match any
one number; a trailing "*" in an enhanced pattern matches the rest.
"""
# test: tests/test_categories.py

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from txmta.outcome import ASKED_WAIT, GREYLISTING_TEXT, ROUTE, STAGES, STARTTLS
from txmta.reply import Reply

INVALID_RECIPIENT = "invalid-recipient"
BAD_DOMAIN = "bad-domain"
MAILBOX_FULL = "mailbox-full"
POLICY = "policy"
SPAM_BLOCK = "spam-block"
RATE_LIMITED = "rate-limited"
GREYLISTED = "greylisted"
TLS_FAILURE = "tls-failure"
DNS_FAILURE = "dns-failure"
OTHER = "other"
CATEGORIES = (INVALID_RECIPIENT, BAD_DOMAIN, MAILBOX_FULL, POLICY, SPAM_BLOCK, RATE_LIMITED,
              GREYLISTED, TLS_FAILURE, DNS_FAILURE, OTHER)

_WILD = frozenset({"x", "X", "*"})
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")

# One alternative of a code pattern: (reply code pattern or None, enhanced pattern or None).
# A reply code pattern is 3 characters; an enhanced pattern is up to 3 parts; None is a wildcard.
_CodeAlt = tuple[str | None, tuple[str | None, ...] | None]


def _parse_enhanced_pattern(text: str, whole: str) -> tuple[str | None, ...]:
    parts = text.split(".")
    if len(parts) > 3 or (len(parts) < 3 and parts[-1] != "*"):
        raise ValueError(f"code {whole!r}: enhanced status pattern {text!r} needs three parts "
                         "(like 5.1.1, x.1.1) or a trailing '*' (like 5.7.*)")
    out: list[str | None] = []
    for i, part in enumerate(parts):
        if part in _WILD:
            out.append(None)
        elif part.isascii() and part.isdigit() and len(part) <= 3:
            if i == 0 and part not in ("2", "4", "5"):
                raise ValueError(f"code {whole!r}: an enhanced status class is 2, 4 or 5, "
                                 f"not {part!r} (RFC 3463 3.1)")
            out.append(str(int(part)))
        else:
            raise ValueError(f"code {whole!r}: {part!r} is neither a number nor 'x' or '*'")
    if parts[-1] == "*":               # "5.7.*", "4.*": the rest is anything
        out.extend([None] * (3 - len(out)))
    return tuple(out)


def _parse_basic_pattern(text: str, whole: str) -> str:
    if len(text) != 3 or text[0] not in "245x*X" or not all(
            c in _WILD or (c.isascii() and c.isdigit()) for c in text):
        raise ValueError(f"code {whole!r}: reply code pattern {text!r} must be three digits "
                         "or 'x' (like 550, 45x, 5xx)")
    return "".join("x" if c in _WILD else c for c in text)


def _parse_code(code: str) -> tuple[_CodeAlt, ...] | None:
    """None for "*" (anything); otherwise the alternatives.  Raises ValueError naming the code."""
    if not isinstance(code, str) or not code.strip():
        raise ValueError(f"code {code!r}: empty; use '*' for any code")
    if code.strip() == "*":
        return None
    alts: list[_CodeAlt] = []
    for alt in code.split("|"):
        tokens = alt.split()
        if not 1 <= len(tokens) <= 2:
            raise ValueError(f"code {code!r}: alternative {alt.strip()!r} must be a reply code, "
                             "an enhanced status code, or both")
        basic: str | None = None
        enhanced: tuple[str | None, ...] | None = None
        for tok in tokens:
            if "." in tok or tok == "*":
                if enhanced is not None:
                    raise ValueError(f"code {code!r}: two enhanced status codes in {alt.strip()!r}")
                enhanced = _parse_enhanced_pattern(tok, code)
            else:
                if basic is not None:
                    raise ValueError(f"code {code!r}: two reply codes in {alt.strip()!r}")
                basic = _parse_basic_pattern(tok, code)
        alts.append((basic, enhanced))
    return tuple(alts)


def enhanced_of(reply: Reply) -> tuple[str, str, str] | None:
    """The reply's enhanced status code as three normalized numbers, also when a client left
    it at the start of the text; None when it has none (or a malformed one)."""
    m = _ENHANCED.match(reply.stated_enhanced)
    if m is None:
        return None
    return (m.group(1), str(int(m.group(2))), str(int(m.group(3))))


@dataclass(frozen=True)
class Rule:
    """`code` pattern (see the module docstring), optional case-insensitive regex `pattern`
    searched in the reply text, the `category` it gives, and an optional session `stage`
    (one of outcome.STAGES; "" for any)."""

    code: str
    pattern: str | None
    category: str
    stage: str = ""
    _codes: tuple[_CodeAlt, ...] | None = field(init=False, repr=False, compare=False)
    _regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_codes", _parse_code(self.code))
        if self.pattern is None:
            regex = None
        else:
            if not isinstance(self.pattern, str) or not self.pattern:
                raise ValueError(f"pattern {self.pattern!r}: must be a non-empty string")
            try:
                regex = re.compile(self.pattern, re.IGNORECASE)
            except re.error as exc:
                raise ValueError(f"pattern {self.pattern!r}: not a regular expression: {exc}") from None
        object.__setattr__(self, "_regex", regex)
        if self.category not in CATEGORIES:
            raise ValueError(f"category {self.category!r}: not one of {', '.join(CATEGORIES)}")
        if self.stage and self.stage not in STAGES:
            raise ValueError(f"stage {self.stage!r}: not one of {', '.join(STAGES)}")

    def matches(self, reply: Reply, stage: str = "",
                enhanced: tuple[str, str, str] | None = None) -> bool:
        """Whether this rule applies to `reply` seen at `stage`.  `enhanced` is
        `enhanced_of(reply)`, passed in by callers that try many rules."""
        if self.stage and self.stage != stage:
            return False
        if self._codes is not None:
            if enhanced is None:
                enhanced = enhanced_of(reply)
            if not any(_alt_matches(alt, reply.code, enhanced) for alt in self._codes):
                return False
        return self._regex is None or self._regex.search(reply.text) is not None


def _alt_matches(alt: _CodeAlt, code: int, enhanced: tuple[str, str, str] | None) -> bool:
    basic, pattern = alt
    if basic is not None:
        digits = str(code)
        if not all(p == "x" or p == d for p, d in zip(basic, digits)):
            return False
    if pattern is not None:
        if enhanced is None:
            return False
        if not all(p is None or p == e for p, e in zip(pattern, enhanced)):
            return False
    return True


# Words, kept apart so that rules and tests can share them.
_SPAM_WORDS = (r"spam|unsolicited|\bjunk\b|block ?list|black ?list|deny ?list|blocked using|"
               r"listed (at|on|in|by)|\b(rbl|dnsbl|uribl|surbl)\b|spamhaus|spamcop|barracuda|"
               r"sorbs|reputation|\bbanned\b|\bbulk mail")
_QUOTA_WORDS = (r"mailbox (is |was )?full|(mailbox|inbox|storage|disk) (is )?full|over ?quota|"
                r"quota (exceeded|reached|full)|exceed(s|ed)? (the |their |its |storage |mailbox )?"
                r"(quota|storage)|insufficient (system )?storage|mailbox size limit|"
                r"out of (storage|space)|not enough (storage|space)")

DEFAULT_RULES: tuple[Rule, ...] = (
    # -- strong words: whatever the code, they say what happened ------------------------------
    # Greylisting (RFC 6647) is only ever temporary; its own word, or a greylister's own
    # text, is unambiguous (outcome.GREYLISTING_TEXT, which classify reads too).
    Rule("4xx", GREYLISTING_TEXT, GREYLISTED),
    # A provider sending quota (Gmail's "5.4.5 Daily user sending limit exceeded"): our rate,
    # not the recipient's mailbox quota.
    Rule("*", r"sending (quota|limit)|daily .{0,30}(quota|limit)", RATE_LIMITED),
    # Slow down: before a greylister's delay, before the spam words some providers add
    # ("unusual rate of unsolicited mail ... rate limited"); a busy server is congested.
    Rule("4xx", r"\brate\b|rate.limit|too many|throttl|slow down|\bvolume\b|limit (exceeded|reached)|"
                r"exceeded .{0,30}limit|frequency|congest|server (is )?(too )?busy", RATE_LIMITED),
    # TLS: the STARTTLS stage itself, or words about it.
    Rule("*", None, TLS_FAILURE, stage=STARTTLS),
    Rule("*", r"\b(start)?tls\b|certificate|\bssl\b|encryption (is )?(needed|required)|"
              r"must (issue|use) (a )?starttls", TLS_FAILURE),
    # Sender authentication (SPF, DKIM, DMARC, reverse DNS; RFC 7372): policy, even when the
    # text adds "blocked" or "to protect our users from spam".
    Rule("*", r"\b(spf|dkim|dmarc)\b|unauthenticated|authentication (checks|information|failed)|"
              r"fails? to pass authentication|reverse dns|\bptr\b|\brdns\b", POLICY),
    # Content the recipient's system refuses by type, not as spam.
    Rule("5xx", r"attachment|file type|executable", POLICY),
    # Block lists and spam filters.
    Rule("*", _SPAM_WORDS, SPAM_BLOCK),
    # Microsoft's block list codes (5.7.606-608: banned sending IP, 5.7.511: banned) and
    # Gmail's 5.7.28 (unusual rate of unsolicited mail, blocked).
    Rule("5.7.606|5.7.607|5.7.608|5.7.511|5.7.28", None, SPAM_BLOCK),
    # "blocked" under a policy code (RFC 3463 X.7.1 "delivery not authorized, message refused").
    Rule("x.7.*", r"\bblock(ed|ing)?\b", SPAM_BLOCK),
    # The recipient's mailbox is full.
    Rule("*", _QUOTA_WORDS, MAILBOX_FULL),
    # Greylisting without the word: 450/451 with 4.2.0/4.7.1 (the codes of postgrey,
    # milter-greylist, sqlgrey) naming the delay to wait, as outcome.classify decides.  A
    # mere "try again later" under these codes is not greylisting: the code's rules below
    # name it (X.7.1: policy).
    Rule("450 4.2.0|451 4.2.0|450 4.7.1|451 4.7.1", ASKED_WAIT, GREYLISTED),
    # Our own sender address is refused (RFC 3463 X.1.7, X.1.8): a policy of theirs, not a
    # problem with the recipient's domain.
    Rule("x.1.7|x.1.8", None, POLICY),
    Rule("*", r"sender address rejected|sender (domain|address) .{0,20}(not found|unknown|invalid)",
         POLICY),
    # Exchange Online's directory based edge blocking: "550 5.4.1 Recipient address rejected:
    # Access denied": the recipient does not exist in the tenant.
    Rule("5.4.1", r"recipient address rejected|access denied", INVALID_RECIPIENT),
    # The recipient's domain does not exist or accepts no mail (RFC 7505 null MX).
    Rule("5xx", r"domain (name )?(not found|does ?n[o']t exist|unknown|is not valid)|unknown domain|"
                r"no such domain|host (or domain name )?not found|\bno (valid )?mx\b|null mx|"
                r"does not accept (e-?)?mail|nxdomain|name service error|unroute?able (address|domain)",
         BAD_DOMAIN),
    # A temporary DNS failure, ours or theirs.
    Rule("4xx", r"\bdns\b|servfail|nxdomain|name service error|host not found, try again|"
                r"(lookup|resolution|resolv\w*) (failed|failure|error|timed? ?out)|"
                r"temporary (lookup|name resolution) failure|unable to resolve", DNS_FAILURE),
    # The mailbox does not exist (or no longer does).
    Rule("5xx", r"user unknown|unknown user|no such (user|mailbox|recipient|address|account)|"
                r"does ?n[o']t exist|unknown (recipient|mailbox|address)|recipient (is )?unknown|"
                r"recipient (address )?rejected: (user|unknown|no such|invalid)|recipient rejected|"
                r"invalid (recipient|mailbox|address)|mailbox (not found|unavailable|"
                r"does ?n[o']t exist|is disabled|disabled|is inactive|inactive)|"
                r"not a valid (mailbox|recipient|user|address)|address (not found|unknown)|"
                r"does ?n[o']t have an? .{0,40}account|account (is |has been )?"
                r"(disabled|deactivated|closed|suspended|inactive)|no mailbox|"
                r"not our customer|user not found|recipient not found", INVALID_RECIPIENT),
    # Refusals by rule: relaying, authorization, "policy reasons".
    Rule("*", r"relay(ing)? (access )?(denied|not permitted|prohibited)|not permitted|\bpolicy\b|"
              r"prohibited|not authori[sz]ed|access denied|administrative", POLICY),

    # -- the enhanced status code alone (RFC 3463, RFC 5248) ----------------------------------
    Rule("x.7.10|x.7.11|x.7.4|x.7.5", None, TLS_FAILURE),      # encryption needed; crypto failure
    Rule("x.7.20|x.7.21|x.7.22|x.7.23|x.7.24|x.7.25|x.7.26|x.7.27", None, POLICY),  # RFC 7372
    Rule("x.2.2", None, MAILBOX_FULL),                         # mailbox full
    Rule("x.4.5|4.7.28", None, RATE_LIMITED),                  # congestion; Gmail's 4.7.28
    Rule("x.1.0|x.1.1|x.1.3|x.1.6|5.2.1", None, INVALID_RECIPIENT),  # bad, moved, disabled mailbox
    Rule("5.1.2|5.1.10|5.4.4", None, BAD_DOMAIN),              # bad system; null MX; unable to route
    Rule("4.1.2|4.4.3|4.4.4", None, DNS_FAILURE),              # routing server / DNS temporarily failing
    Rule("x.7.*", None, POLICY),                               # security or policy status

    # -- the stage: a failure before any session is about routing ---------------------------
    Rule("5xx", None, BAD_DOMAIN, stage=ROUTE),
    Rule("4xx", None, DNS_FAILURE, stage=ROUTE),
)


class Classifier:
    """Categories by a table of rules: `extra` (from the config) first, then `rules`."""

    def __init__(self, rules: Sequence[Rule] = DEFAULT_RULES, extra: Sequence[Rule] = ()) -> None:
        self.rules: tuple[Rule, ...] = tuple(extra) + tuple(rules)

    def rule_for(self, reply: Reply, stage: str = "") -> Rule | None:
        """The first rule that matches, or None (the category is then "other")."""
        enhanced = enhanced_of(reply)
        for rule in self.rules:
            if rule.matches(reply, stage, enhanced):
                return rule
        return None

    def category(self, reply: Reply, stage: str = "") -> str:
        """One of CATEGORIES for `reply` seen at `stage` (an outcome stage, or "")."""
        rule = self.rule_for(reply, stage)
        return OTHER if rule is None else rule.category


DEFAULT_CLASSIFIER = Classifier()   # outcome.classify's rules when the operator gave none


def category(reply: Reply, stage: str = "") -> str:
    """The category of `reply` by the default rules."""
    return DEFAULT_CLASSIFIER.category(reply, stage)


_RULE_KEYS = ("code", "pattern", "category", "stage")


def parse_rules(items: Sequence[Mapping[str, Any]]) -> list[Rule]:
    """Rules from config tables (`[[bounce.rules]]`: code, pattern, category, optional stage).

    Raises ValueError naming the rule (1-based) and the bad field.
    """
    rules: list[Rule] = []
    for n, item in enumerate(items, 1):
        where = f"bounce rule {n}"
        if not isinstance(item, Mapping):
            raise ValueError(f"{where}: must be a table, not {type(item).__name__}")
        for key in item:
            if key not in _RULE_KEYS:
                raise ValueError(f"{where}: unknown key {key!r} (known: {', '.join(_RULE_KEYS)})")
        for key in ("code", "category"):
            if key not in item:
                raise ValueError(f"{where}: {key}: missing")
        for key in _RULE_KEYS:
            if key in item and not isinstance(item[key], str):
                raise ValueError(f"{where}: {key}: must be a string, not {item[key]!r}")
        pattern = item.get("pattern")
        try:
            rules.append(Rule(item["code"], pattern if pattern else None, item["category"],
                              item.get("stage", "")))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return rules
