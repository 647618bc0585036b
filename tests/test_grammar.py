"""MAIL/RCPT argument parsing follows RFC 5321 4.1.2, RFC 6531, RFC 3461, RFC 1870."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txmta.message import NULL_ADDRESS, Address
from txmta.inbound.grammar import (
    GrammarError,
    MailCommand,
    RcptCommand,
    is_valid_domain,
    parse_mail,
    parse_rcpt,
    xtext_decode,
    xtext_encode,
)

# --- valid MAIL -----------------------------------------------------------------------------

VALID_MAIL: list[tuple[str, MailCommand]] = [
    # RFC 5321 4.1.1.2: the plain form
    (" FROM:<a@b.example>", MailCommand(Address("a", "b.example"))),
    # RFC 5321 4.1.1.2 + Postfix leniency: space after the colon, keyword in any case
    (" from: <a@b.example>", MailCommand(Address("a", "b.example"))),
    # RFC 5321 4.1.1.2: no space before FROM is tolerated too
    ("FROM:<a@b.example>", MailCommand(Address("a", "b.example"))),
    # RFC 5321 4.5.5: the null reverse-path
    (" FROM:<>", MailCommand(NULL_ADDRESS)),
    # RFC 5321 2.4: local part keeps its case, domain is lower-cased
    (" FROM:<John.Doe@Example.COM>", MailCommand(Address("John.Doe", "example.com"))),
    # RFC 5321 4.1.2: Quoted-string local part, kept with its quotes
    (' FROM:<"john doe"@example.com>', MailCommand(Address('"john doe"', "example.com"))),
    # RFC 5321 4.1.2: quoted-pairSMTP inside a Quoted-string, and a '>' in quotes
    (r' FROM:<"a\"b>c"@example.com>', MailCommand(Address(r'"a\"b>c"', "example.com"))),
    # RFC 5321 4.1.2: empty Quoted-string is grammatical
    (' FROM:<""@example.com>', MailCommand(Address('""', "example.com"))),
    # RFC 5322 3.2.3: every atext special in a Dot-string
    (" FROM:<!#$%&'*+-/=?^_`{|}~@example.com>",
     MailCommand(Address("!#$%&'*+-/=?^_`{|}~", "example.com"))),
    # RFC 5321 4.1.2/4.5.3.1.1: local parts longer than 64 octets are not refused
    (f" FROM:<{'x' * 100}@example.com>", MailCommand(Address("x" * 100, "example.com"))),
    # RFC 5321 4.1.3: IPv4 address literal
    (" FROM:<a@[192.0.2.1]>", MailCommand(Address("a", "[192.0.2.1]"))),
    # RFC 5321 4.1.3: IPv6 address literal (lower-cased like any domain)
    (" FROM:<a@[IPv6:2001:DB8::1]>", MailCommand(Address("a", "[ipv6:2001:db8::1]"))),
    # RFC 5321 4.1.1.3 / Appendix C: source route accepted and ignored
    (" FROM:<@a.example,@b.example:user@c.example>", MailCommand(Address("user", "c.example"))),
    # RFC 1870 6: SIZE
    (" FROM:<a@b.example> SIZE=12345", MailCommand(Address("a", "b.example"), size=12345)),
    # RFC 5321 4.1.2: several spaces between parameters, trailing space (Postfix-lenient framing)
    (" FROM:<a@b.example>  size=0   ", MailCommand(Address("a", "b.example"), size=0)),
    # RFC 6152 2: BODY=8BITMIME, case-insensitive
    (" FROM:<a@b.example> BODY=8bitmime", MailCommand(Address("a", "b.example"), body="8BITMIME")),
    # RFC 6152 2: BODY=7BIT
    (" FROM:<a@b.example> BODY=7BIT", MailCommand(Address("a", "b.example"), body="7BIT")),
    # RFC 6531 3.4: SMTPUTF8 licenses UTF-8 in the same command's path
    (" FROM:<jösé@bücher.example> SMTPUTF8",
     MailCommand(Address("jösé", "bücher.example"), smtputf8=True)),
    # RFC 6531 3.3: SMTPUTF8 with an ASCII path is fine
    (" FROM:<a@b.example> smtputf8", MailCommand(Address("a", "b.example"), smtputf8=True)),
    # RFC 3461 4.3: RET
    (" FROM:<a@b.example> RET=hdrs", MailCommand(Address("a", "b.example"), ret="HDRS")),
    # RFC 3461 4.4: ENVID stored xtext-decoded
    (" FROM:<a@b.example> ENVID=QQ+2B123+3Dx",
     MailCommand(Address("a", "b.example"), envid="QQ+123=x")),
    # RFC 3461 4.4: ENVID of exactly 100 characters
    (f" FROM:<a@b.example> ENVID={'e' * 100}", MailCommand(Address("a", "b.example"), envid="e" * 100)),
    # RFC 4954 5: AUTH=<> (identity unknown)
    (" FROM:<a@b.example> AUTH=<>", MailCommand(Address("a", "b.example"), auth="<>")),
    # RFC 4954 5: AUTH=xtext, decoded
    (" FROM:<a@b.example> AUTH=e+2Bf@x.example",
     MailCommand(Address("a", "b.example"), auth="e+f@x.example")),
    # RFC 8689 4.1: REQUIRETLS
    (" FROM:<a@b.example> REQUIRETLS", MailCommand(Address("a", "b.example"), requiretls=True)),
    # RFC 5321 4.1.2: all at once, any order
    (" FROM:<> RET=FULL ENVID=x SIZE=1 BODY=8BITMIME SMTPUTF8 REQUIRETLS",
     MailCommand(NULL_ADDRESS, size=1, body="8BITMIME", smtputf8=True, ret="FULL", envid="x",
                 requiretls=True)),
]


@pytest.mark.parametrize(("arg", "expected"), VALID_MAIL)
def test_valid_mail_arguments_parse(arg: str, expected: MailCommand) -> None:
    """A well-formed MAIL argument yields the expected MailCommand."""
    assert parse_mail(arg) == expected


# --- invalid MAIL ---------------------------------------------------------------------------

INVALID_MAIL: list[tuple[str, int, str]] = [
    # RFC 5321 4.1.1.2: "FROM:" is required
    (" <a@b.example>", 501, "5.5.2"),
    # RFC 5321 4.1.1.2: the colon is part of the keyword
    (" FROM <a@b.example>", 501, "5.5.2"),
    # RFC 5321 4.1.2: empty argument
    ("", 501, "5.5.2"),
    # RFC 5321 4.1.2: the path must be in angle brackets
    (" FROM:a@b.example", 501, "5.5.2"),
    # RFC 5321 4.1.2: unterminated path
    (" FROM:<a@b.example", 501, "5.5.2"),
    # RFC 5321 4.1.2: parameters are separated from the path by SP
    (" FROM:<a@b.example>SIZE=1", 501, "5.5.2"),
    # RFC 5321 4.1.2: a Mailbox needs @domain; <postmaster> is for RCPT only
    (" FROM:<postmaster>", 501, "5.1.7"),
    # RFC 5321 4.1.2: empty local part
    (" FROM:<@b.example>", 501, "5.1.7"),
    # RFC 5321 4.1.2: Dot-string may not start with a dot
    (" FROM:<.a@b.example>", 501, "5.1.7"),
    # RFC 5321 4.1.2: Dot-string may not end with a dot
    (" FROM:<a.@b.example>", 501, "5.1.7"),
    # RFC 5321 4.1.2: Dot-string may not double a dot
    (" FROM:<a..b@b.example>", 501, "5.1.7"),
    # RFC 5322 3.2.3: '(' is not atext
    (" FROM:<a(b@b.example>", 501, "5.1.7"),
    # RFC 5321 4.1.2: space outside quotes
    (" FROM:<a b@b.example>", 501, "5.1.7"),
    # RFC 5321 4.1.2: two @
    (" FROM:<a@b@c.example>", 501, "5.1.7"),
    # RFC 5321 4.1.2: unterminated Quoted-string
    (' FROM:<"ab@b.example>', 501, "5.5.2"),
    # RFC 5321 4.1.2: text after the Quoted-string must be @
    (' FROM:<"a"b@b.example>', 501, "5.1.7"),
    # RFC 5321 4.1.2: empty domain
    (" FROM:<a@>", 501, "5.1.7"),
    # RFC 5321 4.1.2: trailing dot in the domain
    (" FROM:<a@b.example.>", 501, "5.1.7"),
    # RFC 5321 4.1.2: empty label
    (" FROM:<a@b..example>", 501, "5.1.7"),
    # RFC 5321 4.1.2: label may not start with a hyphen
    (" FROM:<a@-b.example>", 501, "5.1.7"),
    # RFC 5321 4.1.2: label may not end with a hyphen
    (" FROM:<a@b-.example>", 501, "5.1.7"),
    # RFC 5321 4.1.2: underscore is not LDH
    (" FROM:<a@b_c.example>", 501, "5.1.7"),
    # RFC 1035 2.3.4 via RFC 5321 4.1.2: label of 64 characters
    (f" FROM:<a@{'l' * 64}.example>", 501, "5.1.7"),
    # RFC 5321 4.5.3.1.2: domain longer than 255 characters
    (" FROM:<a@" + ".".join(["l" * 60] * 5) + ">", 501, "5.1.7"),
    # RFC 5321 4.1.3: bad IPv4 literal
    (" FROM:<a@[192.0.2.256]>", 501, "5.1.7"),
    # RFC 5321 4.1.3: bad IPv6 literal
    (" FROM:<a@[IPv6:2001:db8::g]>", 501, "5.1.7"),
    # RFC 5321 4.1.3: IPv6 literal without its tag
    (" FROM:<a@[2001:db8::1]>", 501, "5.1.7"),
    # RFC 5321 4.1.3: unterminated literal
    (" FROM:<a@[192.0.2.1>", 501, "5.1.7"),
    # RFC 5321 4.1.1.3: source route needs ':'
    (" FROM:<@a.example,b@c.example>", 501, "5.1.7"),
    # RFC 5321 4.1.2: control character in the path
    (" FROM:<a\x01b@b.example>", 501, "5.1.7"),
    # RFC 5321 4.1.2: DEL in a quoted local part
    (' FROM:<"a\x7fb"@b.example>', 501, "5.1.7"),
    # RFC 6531 3.7.4.1: UTF-8 local part without SMTPUTF8
    (" FROM:<jösé@b.example>", 553, "5.6.7"),
    # RFC 6531 3.7.4.1: U-label domain without SMTPUTF8
    (" FROM:<a@bücher.example>", 553, "5.6.7"),
    # RFC 6531 3.3: even with SMTPUTF8, no spaces in a U-label
    (" FROM:<a@b\u3000c.example> SMTPUTF8", 501, "5.1.7"),
    # RFC 5321 4.1.2: unknown parameter
    (" FROM:<a@b.example> FOO=bar", 555, "5.5.4"),
    # RFC 3030 3: BINARYMIME needs CHUNKING, which is not offered
    (" FROM:<a@b.example> BODY=BINARYMIME", 555, "5.5.4"),
    # RFC 5321 4.1.2: malformed keyword
    (" FROM:<a@b.example> -X=1", 501, "5.5.4"),
    # RFC 5321 4.1.2: esmtp-value is at least one character
    (" FROM:<a@b.example> SIZE=", 501, "5.5.4"),
    # RFC 1870 6: SIZE is digits
    (" FROM:<a@b.example> SIZE=12k", 501, "5.5.4"),
    # RFC 1870 6: SIZE is ASCII digits, not any Unicode digit
    (" FROM:<a@b.example> SIZE=\u0661", 501, "5.5.4"),
    # RFC 1870 6: SIZE has at most 20 digits
    (" FROM:<a@b.example> SIZE=" + "9" * 21, 501, "5.5.4"),
    # RFC 1870 6: SIZE needs a value
    (" FROM:<a@b.example> SIZE", 501, "5.5.4"),
    # RFC 5321 4.1.2 (by analogy RFC 1870 6): a parameter given twice
    (" FROM:<a@b.example> SIZE=1 size=2", 501, "5.5.4"),
    # RFC 6152 2: unknown BODY
    (" FROM:<a@b.example> BODY=9BIT", 501, "5.5.4"),
    # RFC 6531 3.4: SMTPUTF8 takes no value
    (" FROM:<a@b.example> SMTPUTF8=yes", 501, "5.5.4"),
    # RFC 8689 4.1: REQUIRETLS takes no value
    (" FROM:<a@b.example> REQUIRETLS=1", 501, "5.5.4"),
    # RFC 8689 4.1: REQUIRETLS at most once
    (" FROM:<a@b.example> REQUIRETLS requiretls", 501, "5.5.4"),
    # RFC 8689 4.1: no value, not even an empty one
    (" FROM:<a@b.example> REQUIRETLS=", 501, "5.5.4"),
    # RFC 3461 4.3: RET is FULL or HDRS
    (" FROM:<a@b.example> RET=BODY", 501, "5.5.4"),
    # RFC 3461 4.4: ENVID at most 100 characters
    (f" FROM:<a@b.example> ENVID={'e' * 101}", 501, "5.5.4"),
    # RFC 3461 4: '+' must be followed by two hex digits
    (" FROM:<a@b.example> ENVID=a+2", 501, "5.5.4"),
    # RFC 3461 4.4: the decoded ENVID must be printable
    (" FROM:<a@b.example> ENVID=a+0Ab", 501, "5.5.4"),
    # RFC 4954 5: AUTH value is xtext
    (" FROM:<a@b.example> AUTH=a+zz", 501, "5.5.4"),
]


@pytest.mark.parametrize(("arg", "code", "enhanced"), INVALID_MAIL)
def test_invalid_mail_arguments_are_refused(arg: str, code: int, enhanced: str) -> None:
    """A malformed MAIL argument raises GrammarError carrying the exact reply code."""
    with pytest.raises(GrammarError) as info:
        parse_mail(arg)
    assert (info.value.reply.code, info.value.reply.enhanced) == (code, enhanced)
    assert info.value.reply.text and "\n" not in info.value.reply.text


# --- valid RCPT -----------------------------------------------------------------------------

VALID_RCPT: list[tuple[str, bool, RcptCommand]] = [
    # RFC 5321 4.1.1.3: the plain form
    (" TO:<x@y.example>", False, RcptCommand(Address("x", "y.example"))),
    # RFC 5321 4.1.1.3 + Postfix leniency: space after the colon
    (" to: <x@Y.Example>", False, RcptCommand(Address("x", "y.example"))),
    # RFC 5321 4.5.1: <postmaster> without a domain, any case
    (" TO:<PostMaster>", False, RcptCommand(Address("postmaster", ""))),
    # RFC 5321 4.1.1.3: source route accepted and ignored
    (" TO:<@hop.example:x@y.example>", False, RcptCommand(Address("x", "y.example"))),
    # RFC 6531 3.7.4.1: UTF-8 recipient when the MAIL had SMTPUTF8
    (" TO:<用户@例子.广告>", True, RcptCommand(Address("用户", "例子.广告"))),
    # RFC 6531 3.3: a U-label mixed with ASCII labels
    (" TO:<x@bücher.Example>", True, RcptCommand(Address("x", "bücher.example"))),
    # RFC 3461 4.1: NOTIFY=NEVER
    (" TO:<x@y.example> NOTIFY=never", False, RcptCommand(Address("x", "y.example"), notify=("NEVER",))),
    # RFC 3461 4.1: a subset, order kept
    (" TO:<x@y.example> NOTIFY=DELAY,success", False,
     RcptCommand(Address("x", "y.example"), notify=("DELAY", "SUCCESS"))),
    # RFC 3461 4.1: all three
    (" TO:<x@y.example> NOTIFY=SUCCESS,FAILURE,DELAY", False,
     RcptCommand(Address("x", "y.example"), notify=("SUCCESS", "FAILURE", "DELAY"))),
    # RFC 3461 4.2: ORCPT, address xtext-decoded
    (" TO:<x@y.example> ORCPT=rfc822;a+2Bb@y.example", False,
     RcptCommand(Address("x", "y.example"), orcpt="rfc822;a+b@y.example")),
    # RFC 3461 4.2: both parameters, several spaces
    (" TO:<x@y.example>  ORCPT=rfc822;x@y.example  NOTIFY=FAILURE ", False,
     RcptCommand(Address("x", "y.example"), notify=("FAILURE",), orcpt="rfc822;x@y.example")),
]


@pytest.mark.parametrize(("arg", "smtputf8", "expected"), VALID_RCPT)
def test_valid_rcpt_arguments_parse(arg: str, smtputf8: bool, expected: RcptCommand) -> None:
    """A well-formed RCPT argument yields the expected RcptCommand."""
    assert parse_rcpt(arg, smtputf8) == expected


# --- invalid RCPT ---------------------------------------------------------------------------

INVALID_RCPT: list[tuple[str, bool, int, str]] = [
    # RFC 8689 4.1: REQUIRETLS is a MAIL parameter, unknown on RCPT (RFC 5321 4.1.1.11)
    (" TO:<x@y.example> REQUIRETLS", False, 555, "5.5.4"),
    # RFC 5321 4.1.1.3: "TO:" is required
    (" <x@y.example>", False, 501, "5.5.2"),
    # RFC 5321 4.1.1.3: the path must be in angle brackets
    (" TO:x@y.example", False, 501, "5.5.2"),
    # RFC 5321 4.1.1.3: FROM: is not TO:
    (" FROM:<x@y.example>", False, 501, "5.5.2"),
    # RFC 5321 4.1.1.3: the null path is for MAIL only
    (" TO:<>", False, 501, "5.1.3"),
    # RFC 5321 4.1.2: a Mailbox needs @domain (only postmaster is exempt)
    (" TO:<abuse>", False, 501, "5.1.3"),
    # RFC 5321 4.1.2: doubled dot
    (" TO:<x..y@y.example>", False, 501, "5.1.3"),
    # RFC 5321 4.1.2: trailing dot in the domain
    (" TO:<x@y.example.>", False, 501, "5.1.3"),
    # RFC 5321 4.1.2: control character
    (" TO:<x\ty@y.example>", False, 501, "5.1.3"),
    # RFC 6531 3.7.4.1: UTF-8 without SMTPUTF8 on the MAIL
    (" TO:<用户@例子.广告>", False, 553, "5.6.7"),
    # RFC 6531 3.3: ASCII label rules still apply next to a U-label
    (" TO:<x@bücher.-bad.example>", True, 501, "5.1.3"),
    # RFC 5321 4.1.2: a MAIL parameter is unknown on RCPT
    (" TO:<x@y.example> SIZE=1", False, 555, "5.5.4"),
    # RFC 3461 4.1: NOTIFY given twice
    (" TO:<x@y.example> NOTIFY=NEVER NOTIFY=NEVER", False, 501, "5.5.4"),
    # RFC 3461 4.1: NEVER cannot be combined
    (" TO:<x@y.example> NOTIFY=NEVER,DELAY", False, 501, "5.5.4"),
    # RFC 3461 4.1: unknown word
    (" TO:<x@y.example> NOTIFY=ALWAYS", False, 501, "5.5.4"),
    # RFC 3461 4.1: empty item in the list
    (" TO:<x@y.example> NOTIFY=SUCCESS,", False, 501, "5.5.4"),
    # RFC 3461 4.1: a word repeated is not a subset
    (" TO:<x@y.example> NOTIFY=DELAY,DELAY", False, 501, "5.5.4"),
    # RFC 3461 4.2: ORCPT needs addr-type;
    (" TO:<x@y.example> ORCPT=x@y.example", False, 501, "5.5.4"),
    # RFC 3461 4.2: addr-type is an atom
    (" TO:<x@y.example> ORCPT=rfc(822;x@y.example", False, 501, "5.5.4"),
    # RFC 3461 4: bad xtext in ORCPT
    (" TO:<x@y.example> ORCPT=rfc822;x+@y.example", False, 501, "5.5.4"),
    # RFC 3461 4.2: ORCPT needs a value
    (" TO:<x@y.example> ORCPT", False, 501, "5.5.4"),
]


@pytest.mark.parametrize(("arg", "smtputf8", "code", "enhanced"), INVALID_RCPT)
def test_invalid_rcpt_arguments_are_refused(arg: str, smtputf8: bool, code: int, enhanced: str) -> None:
    """A malformed RCPT argument raises GrammarError carrying the exact reply code."""
    with pytest.raises(GrammarError) as info:
        parse_rcpt(arg, smtputf8)
    assert (info.value.reply.code, info.value.reply.enhanced) == (code, enhanced)
    assert info.value.reply.text and "\n" not in info.value.reply.text


def test_bare_address_reply_names_the_path_syntax() -> None:
    """Without angle brackets the client is told how the path must look (RFC 5321 4.1.2)."""
    with pytest.raises(GrammarError) as info:
        parse_mail(" FROM:a@b.example")
    assert "<address>" in info.value.reply.text


def test_unknown_parameter_reply_names_it() -> None:
    """An unsupported parameter is named in the 555 reply (RFC 5321 4.1.1.11)."""
    with pytest.raises(GrammarError) as info:
        parse_mail(" FROM:<a@b.example> XFOO=1")
    assert info.value.reply.text == "XFOO parameter not supported"


def test_lone_surrogates_are_refused() -> None:
    """Bytes a server decoded with surrogateescape are not valid UTF-8 (RFC 6531 3.3)."""
    with pytest.raises(GrammarError) as info:
        parse_mail(" FROM:<a\udcff@b.example> SMTPUTF8")
    assert (info.value.reply.code, info.value.reply.enhanced) == (501, "5.1.7")


def test_grammar_error_is_a_value_error() -> None:
    """Callers that catch ValueError also catch GrammarError."""
    with pytest.raises(ValueError):
        parse_rcpt(" TO:<>", False)


# --- xtext and domains ----------------------------------------------------------------------

@pytest.mark.parametrize(("decoded", "encoded"), [
    ("a+b=c", "a+2Bb+3Dc"),       # RFC 3461 4: '+' and '=' are always encoded
    ("a b", "a+20b"),             # RFC 3461 4: space is outside xchar
    ("é", "+C3+A9"),              # UTF-8 octets, upper-case hex
    ("", ""),
])
def test_xtext_examples(decoded: str, encoded: str) -> None:
    """xtext encodes exactly the characters RFC 3461 4 excludes from xchar."""
    assert xtext_encode(decoded) == encoded
    assert xtext_decode(encoded) == decoded


@pytest.mark.parametrize("bad", ["a+", "a+4", "a+G0", "a=b", "a b", "é", "+FF"])
def test_xtext_decode_rejects_malformed(bad: str) -> None:
    """Truncated escapes, raw '=' / space / non-ASCII and non-UTF-8 octets are refused."""
    with pytest.raises(GrammarError) as info:
        xtext_decode(bad)
    assert info.value.reply.code == 501


@pytest.mark.parametrize(("domain", "utf8", "valid"), [
    ("example.com", False, True),          # RFC 5321 4.1.2
    ("EXAMPLE.com", False, True),          # case is ignored
    ("a-b.c", False, True),                # inner hyphen
    ("1.2.3.4", False, True),              # digits-only labels are LDH
    ("[192.0.2.1]", False, True),          # RFC 5321 4.1.3
    ("[IPv6:::1]", False, True),           # RFC 5321 4.1.3
    ("[IPv6:fe80::1%eth0]", False, False),  # zone ids are not in the ABNF
    ("example.com.", False, False),        # trailing dot
    ("", False, False),
    ("bücher.de", False, False),           # RFC 6531: U-label needs SMTPUTF8
    ("bücher.de", True, True),
    ("b\u200eücher.de", True, False),      # format character in a U-label
])
def test_is_valid_domain(domain: str, utf8: bool, valid: bool) -> None:
    """is_valid_domain accepts what may follow '@' in a path."""
    assert is_valid_domain(domain, utf8) is valid


# --- properties -----------------------------------------------------------------------------

_ATEXT = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~"
_atoms = st.text(alphabet=_ATEXT, min_size=1, max_size=10)
_dot_atoms = st.lists(_atoms, min_size=1, max_size=4).map(".".join)
_labels = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?", fullmatch=True)
_domains = st.lists(_labels, min_size=1, max_size=4).map(".".join)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_xtext_round_trips(s: str) -> None:
    """Any text survives xtext encoding (RFC 3461 4)."""
    assert xtext_decode(xtext_encode(s)) == s


@settings(max_examples=200, deadline=None)
@given(_dot_atoms, _domains)
def test_valid_addresses_round_trip(local: str, domain: str) -> None:
    """A Dot-string@Domain recipient keeps its local part and gets a lower-cased domain."""
    rcpt = parse_rcpt(f" TO:<{local}@{domain}>", False)
    assert rcpt.address == Address(local, domain.lower())


_mail_params = st.lists(st.sampled_from(["SIZE=12", "BODY=8BITMIME", "SMTPUTF8", "RET=HDRS",
                                          "ENVID=e1", "REQUIRETLS", "requiretls", "RequireTls"]),
                        max_size=6)


@settings(max_examples=200, deadline=None)
@given(_mail_params, st.text(alphabet=" ", min_size=1, max_size=3))
def test_requiretls_flag_follows_the_parameter(params: list[str], gap: str) -> None:
    """REQUIRETLS (any case, any position) sets the flag; given twice it is refused; absent,
    the flag is off (RFC 8689 4.1)."""
    arg = " FROM:<a@b.example>" + "".join(gap + p for p in params)
    names = [p.partition("=")[0].upper() for p in params]
    if len(names) != len(set(names)):
        with pytest.raises(GrammarError):
            parse_mail(arg)
        return
    assert parse_mail(arg).requiretls == ("REQUIRETLS" in names)


_noise = st.text() | st.text(alphabet=' <>@"\\:.,;=+[]FROMTOfromto-SIZENOTIFY\x00é', max_size=40)


@settings(max_examples=300, deadline=None)
@given(_noise, st.booleans())
def test_parsers_are_total(text: str, smtputf8: bool) -> None:
    """Arbitrary input yields a command or a GrammarError, never another exception."""
    for arg in (text, " FROM:<" + text, " TO:<" + text, " FROM:<a@b.example> " + text,
                " TO:<x@y.example> " + text):
        try:
            parse_mail(arg)
        except GrammarError:
            pass
        try:
            parse_rcpt(arg, smtputf8)
        except GrammarError:
            pass


@given(st.text())
def test_control_characters_are_c0_del_and_c1(text: str) -> None:
    """The address and parameter checks refuse exactly C0, DEL and C1 (U+0000-U+001F,
    U+007F-U+009F), wherever one stands."""
    from txmta.inbound.grammar import _has_control
    assert _has_control(text) == any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text)
