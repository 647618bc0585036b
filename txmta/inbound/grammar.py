"""Parses the arguments of the SMTP MAIL and RCPT commands into values.

Pure: no I/O, no clock, no policy.  Given the text after the verb, `parse_mail` and
`parse_rcpt` return a `MailCommand` / `RcptCommand` or raise `GrammarError`, which
carries the `Reply` the server should send.  Deciding whether a sender or recipient is
*acceptable* (relaying, quotas, SIZE against our limit) is someone else's job; this
module only decides whether the command is well formed.

Follows:
  RFC 5321 4.1.2 (path syntax), 4.1.1.2 / 4.1.1.3 (MAIL / RCPT), 4.5.1 (<postmaster>),
           Appendix C (source routes: accepted and ignored);
  RFC 6531 (SMTPUTF8: UTF-8 in addresses only when the MAIL command asked for it, 3.7.4.1);
  RFC 1870 (SIZE), RFC 6152 (BODY=8BITMIME), RFC 3461 (RET, ENVID, NOTIFY, ORCPT, xtext),
  RFC 4954 5 (AUTH=), RFC 8689 (REQUIRETLS); enhanced codes per RFC 3463.

Leniency is limited to framing, as in Postfix: spaces after "FROM:"/"TO:", several
spaces between parameters, trailing spaces, keywords in any case.  The path itself
must be in angle brackets.  The 64-octet local-part limit is deliberately not enforced.
"""
# test: tests/test_grammar.py

from __future__ import annotations

import ipaddress
import re
import string
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from txmta.message import NULL_ADDRESS, Address
from txmta.reply import Reply
from txmta.xtext import xtext_encode

__all__ = [
    "GrammarError",
    "MailCommand",
    "RcptCommand",
    "parse_mail",
    "parse_rcpt",
    "xtext_decode",
    "xtext_encode",
    "is_valid_domain",
]


class GrammarError(ValueError):
    """A MAIL or RCPT argument is malformed; `reply` is what to answer the client."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True, slots=True)
class MailCommand:
    sender: Address                 # NULL_ADDRESS for <>
    size: int | None = None         # SIZE= (RFC 1870)
    body: str = "7BIT"              # BODY=7BIT | 8BITMIME (RFC 6152)
    smtputf8: bool = False          # SMTPUTF8 (RFC 6531)
    ret: str | None = None          # RET=FULL | HDRS (RFC 3461 4.3)
    envid: str | None = None        # ENVID (RFC 3461 4.4), xtext-decoded
    auth: str | None = None         # AUTH= (RFC 4954 5), xtext-decoded, or "<>"
    requiretls: bool = False        # REQUIRETLS (RFC 8689)


@dataclass(frozen=True, slots=True)
class RcptCommand:
    address: Address
    notify: tuple[str, ...] = ()    # RFC 3461 4.1; () when absent
    orcpt: str | None = None        # RFC 3461 4.2 as "addr-type;decoded address"


# --- character classes ------------------------------------------------------------------

_ATEXT = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~")  # RFC 5322 3.2.3
_LDH = frozenset(string.ascii_letters + string.digits + "-")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")           # RFC 5321 4.1.2 esmtp-keyword
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+\Z")       # RFC 3461 addr-type = atom
_SIZE = re.compile(r"[0-9]{1,20}\Z")                            # RFC 1870 size-value
_HEX = frozenset("0123456789ABCDEFabcdef")
_ZERO_WIDTH_JOINERS = frozenset("\u200c\u200d")                # allowed in IDN labels (RFC 5892)

_ENVID_MAX = 100       # RFC 3461 4.4, on the parameter value as sent
_ORCPT_MAX = 500       # RFC 3461 4.2, on the parameter value as sent
_ECHO_MAX = 32         # longest keyword we repeat back in a reply


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")   # C0, DEL and C1 control characters


def _has_control(text: str) -> bool:
    return _CONTROL.search(text) is not None


def _utf8_char_ok(ch: str) -> bool:
    """Whether a non-ASCII character may appear in an address: no controls, no spaces,
    no unassigned, private-use or surrogate code points, no format characters other than
    the two joiners that IDNA permits."""
    if ch in _ZERO_WIDTH_JOINERS:
        return True
    return unicodedata.category(ch)[0] not in "CZ"


# --- xtext (RFC 3461 4) -----------------------------------------------------------------

def _xtext_bytes(s: str, allow_utf8: bool) -> bytes:
    out = bytearray()
    i, n = 0, len(s)
    while i < n:
        ch = s[i]
        if ch == "+":
            pair = s[i + 1:i + 3]
            if len(pair) != 2 or not all(c in _HEX for c in pair):
                raise GrammarError(Reply(501, "5.5.4", "Malformed xtext: '+' needs two hex digits"))
            out.append(int(pair, 16))
            i += 3
            continue
        if "!" <= ch <= "~" and ch != "=":
            out.append(ord(ch))
        elif allow_utf8 and ord(ch) > 0x7F and _utf8_char_ok(ch):
            out += ch.encode("utf-8")
        else:
            raise GrammarError(Reply(501, "5.5.4", "Malformed xtext: character must be encoded"))
        i += 1
    return bytes(out)


def _xtext_decode(s: str, allow_utf8: bool) -> str:
    try:
        return _xtext_bytes(s, allow_utf8).decode("utf-8")
    except UnicodeDecodeError:
        raise GrammarError(Reply(501, "5.5.4", "Malformed xtext: not UTF-8")) from None


def xtext_decode(s: str) -> str:
    """Decode RFC 3461 xtext: "+XX" is the octet XX (hex digits, either case); other
    characters must be printable ASCII other than "+" and "=".  Octets are read as UTF-8.
    Raises GrammarError (501 5.5.4) on anything malformed."""
    return _xtext_decode(s, allow_utf8=False)


# --- domains (RFC 5321 4.1.2, RFC 6531 3.3) ---------------------------------------------

def _label_problem(label: str, utf8: bool) -> str | None:
    if not label:
        return "empty domain label"
    if label[0] == "-" or label[-1] == "-":
        return "domain label starts or ends with a hyphen"
    if label.isascii():
        if len(label) > 63:
            return "domain label longer than 63 characters"
        if not all(c in _LDH for c in label):
            return "invalid character in domain"
        return None
    if not utf8:
        return "invalid character in domain"
    for c in label:
        if c.isascii():
            if c not in _LDH:
                return "invalid character in domain"
        elif not _utf8_char_ok(c):
            return "invalid character in domain"
    if len(_a_label(label)) > 63:
        return "domain label longer than 63 characters"
    return None


def _a_label(label: str) -> str:
    """The ACE length stand-in for a U-label (IDNA mapping rules are not applied)."""
    if label.isascii():
        return label
    try:
        return "xn--" + label.encode("punycode").decode("ascii")
    except UnicodeError:  # pragma: no cover - punycode encodes any str
        return label


def _literal_problem(literal: str) -> str | None:
    """RFC 5321 4.1.3 address literal, brackets included."""
    inner = literal[1:-1]
    if inner[:5].lower() == "ipv6:":
        text = inner[5:]
        if "%" in text or not text:
            return "bad IPv6 address literal"
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            return "bad IPv6 address literal"
        return None
    if ":" in inner:
        return "unsupported address literal"
    try:
        ipaddress.IPv4Address(inner)
    except ValueError:
        return "bad IPv4 address literal"
    return None


def _domain_problem(domain: str, utf8: bool) -> str | None:
    if not domain:
        return "empty domain"
    if domain[0] == "[":
        if domain[-1] != "]" or len(domain) < 3:
            return "bad address literal"
        return _literal_problem(domain)
    if domain.endswith("."):
        return "domain ends with a dot"
    labels = domain.split(".")
    for label in labels:
        problem = _label_problem(label, utf8)
        if problem is not None:
            return problem
    if len(".".join(_a_label(label) for label in labels)) > 255:
        return "domain longer than 255 characters"
    return None


def is_valid_domain(domain: str, utf8: bool) -> bool:
    """Whether `domain` may follow "@" in a path: an RFC 5321 Domain (LDH labels of 1-63
    characters, at most 255 in all, no trailing dot) or an address literal
    ("[192.0.2.1]", "[IPv6:2001:db8::1]").  With `utf8` (SMTPUTF8 in effect), labels may
    also be U-labels (RFC 6531 3.3); ASCII labels keep the LDH rules.  Case is ignored."""
    return _domain_problem(domain, utf8) is None


# --- paths (RFC 5321 4.1.2) ---------------------------------------------------------------

class _BadPath(Exception):
    """Internal: the path is malformed; the caller picks the reply code."""


def _local_part(text: str, utf8: bool) -> tuple[str, str]:
    """Split `local@domain`, checking the local part; returns (local, domain text)."""
    if text.startswith('"'):
        i, n = 1, len(text)
        while i < n:
            ch = text[i]
            if ch == "\\":
                if i + 1 >= n or not (" " <= text[i + 1] <= "~"):  # quoted-pairSMTP
                    raise _BadPath("bad quoted pair in local part")
                i += 2
                continue
            if ch == '"':
                break
            if not (" " <= ch <= "~" or (utf8 and ord(ch) > 0x7F and _utf8_char_ok(ch))):
                raise _BadPath("invalid character in quoted local part")
            i += 1
        else:
            raise _BadPath("unterminated quoted local part")
        local, rest = text[:i + 1], text[i + 1:]
        if not rest.startswith("@"):
            raise _BadPath("missing @domain")
        return local, rest[1:]
    local, at, domain = text.partition("@")
    if not at:
        raise _BadPath("missing @domain")
    if not local:
        raise _BadPath("empty local part")
    for atom in local.split("."):
        if not atom:
            raise _BadPath("misplaced dot in local part")
        for c in atom:
            if c not in _ATEXT and not (utf8 and ord(c) > 0x7F and _utf8_char_ok(c)):
                raise _BadPath("invalid character in local part")
    return local, domain


def _mailbox(text: str, utf8: bool) -> Address:
    local, domain = _local_part(text, utf8)
    problem = _domain_problem(domain, utf8)
    if problem is not None:
        raise _BadPath(problem)
    return Address(local, domain.lower())


def _strip_route(text: str, utf8: bool) -> str:
    """Drop an RFC 5321 A-d-l source route ("@a,@b:"), checking its domains."""
    if not text.startswith("@"):
        return text
    route, colon, rest = text.partition(":")
    if not colon:
        raise _BadPath("source route without ':'")
    for hop in route.split(","):
        if not hop.startswith("@") or _domain_problem(hop[1:], utf8) is not None:
            raise _BadPath("bad source route")
    return rest


# --- framing ------------------------------------------------------------------------------

def _split_command(arg: str, prefix: str, verb: str) -> tuple[str, list[str]]:
    """From " FROM:<path> P1 P2" return ("path", ["P1", "P2"])."""
    usage = Reply(501, "5.5.2", f"Syntax: {verb} {prefix}<address> [parameters]")
    text = arg.lstrip(" ")
    if text[:len(prefix)].upper() != prefix:
        raise GrammarError(usage)
    text = text[len(prefix):].lstrip(" ")
    if not text.startswith("<"):
        raise GrammarError(Reply(501, "5.5.2", f"Path must be in angle brackets: {verb} {prefix}<address>"))
    i, n, quoted = 1, len(text), False
    while i < n:
        ch = text[i]
        if quoted and ch == "\\":
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            break
        i += 1
    else:
        raise GrammarError(Reply(501, "5.5.2", "Path has no closing '>'"))
    path, rest = text[1:i], text[i + 1:]
    if rest and not rest.startswith(" "):
        raise GrammarError(Reply(501, "5.5.2", "Expected a space after the path"))
    return path, [p for p in rest.split(" ") if p]


def _parse_path(path: str, utf8: bool, bad: Callable[[str], Reply], postmaster: bool) -> Address:
    """Parse the inside of <...>, except <> which callers handle."""
    if _has_control(path):
        raise GrammarError(bad("control character in address"))
    if postmaster and path.lower() == "postmaster":  # RFC 5321 4.5.1
        return Address("postmaster", "")
    try:
        address = _mailbox(_strip_route(path, True), True)
    except _BadPath as e:
        raise GrammarError(bad(str(e))) from None
    if not utf8 and not path.isascii():  # RFC 6531 3.7.4.1
        raise GrammarError(Reply(553, "5.6.7", "Non-ASCII address, SMTPUTF8 required"))
    return address


# --- parameters ---------------------------------------------------------------------------

def _params(raw: list[str], known: frozenset[str]) -> dict[str, str | None]:
    """Split keyword[=value] parameters, upper-casing keywords, rejecting unknown,
    malformed and repeated ones.  Values are returned as sent."""
    out: dict[str, str | None] = {}
    for item in raw:
        keyword, eq, value = item.partition("=")
        if not _KEYWORD.match(keyword):
            raise GrammarError(Reply(501, "5.5.4", "Malformed parameter keyword"))
        keyword = keyword.upper()
        name = keyword[:_ECHO_MAX]
        if keyword not in known:
            raise GrammarError(Reply(555, "5.5.4", f"{name} parameter not supported"))
        if keyword in out:
            raise GrammarError(Reply(501, "5.5.4", f"{name} parameter given more than once"))
        if eq and (not value or _has_control(value)):
            raise GrammarError(Reply(501, "5.5.4", f"Malformed {name} parameter value"))
        out[keyword] = value if eq else None
    return out


def _bad_value(keyword: str, why: str) -> GrammarError:
    return GrammarError(Reply(501, "5.5.4", f"Bad {keyword} parameter: {why}"))


def _flag(params: dict[str, str | None], keyword: str) -> bool:
    if keyword not in params:
        return False
    if params[keyword] is not None:
        raise _bad_value(keyword, "takes no value")
    return True


def _value(params: dict[str, str | None], keyword: str) -> str | None:
    if keyword not in params:
        return None
    value = params[keyword]
    if value is None:
        raise _bad_value(keyword, "value required")
    return value


def _decoded(keyword: str, value: str, allow_utf8: bool) -> str:
    try:
        text = _xtext_decode(value, allow_utf8)
    except GrammarError:
        raise _bad_value(keyword, "malformed xtext") from None
    if _has_control(text) or (not allow_utf8 and not text.isascii()):
        raise _bad_value(keyword, "must be printable text")  # RFC 3461 4.2, 4.4
    return text


_MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH", "REQUIRETLS"})
_RCPT_PARAMS = frozenset({"NOTIFY", "ORCPT"})


def parse_mail(arg: str) -> MailCommand:
    """Parse the text after "MAIL", e.g. " FROM:<a@b.example> SIZE=100 BODY=8BITMIME".

    Raises GrammarError: 501 5.5.2 for framing, 501 5.1.7 for a malformed sender,
    553 5.6.7 for UTF-8 without SMTPUTF8, 555 5.5.4 for an unknown parameter and
    501 5.5.4 for a repeated or malformed one.
    """
    path, raw = _split_command(arg, "FROM:", "MAIL")
    # SMTPUTF8 on this very command licenses UTF-8 in its path (RFC 6531 3.4).
    utf8 = any(p.partition("=")[0].upper() == "SMTPUTF8" for p in raw)
    if path == "":
        sender = NULL_ADDRESS
    else:
        sender = _parse_path(path, utf8, lambda why: Reply(501, "5.1.7", f"Bad sender address syntax: {why}"),
                             postmaster=False)
    params = _params(raw, _MAIL_PARAMS)

    size: int | None = None
    size_text = _value(params, "SIZE")
    if size_text is not None:
        if not _SIZE.match(size_text):
            raise _bad_value("SIZE", "must be a number")
        size = int(size_text)

    body = "7BIT"
    body_text = _value(params, "BODY")
    if body_text is not None:
        body = body_text.upper()
        if body == "BINARYMIME":  # RFC 3030 needs CHUNKING, which we do not offer
            raise GrammarError(Reply(555, "5.5.4", "BODY=BINARYMIME not supported"))
        if body not in ("7BIT", "8BITMIME"):
            raise _bad_value("BODY", "must be 7BIT or 8BITMIME")

    ret = _value(params, "RET")
    if ret is not None:
        ret = ret.upper()
        if ret not in ("FULL", "HDRS"):
            raise _bad_value("RET", "must be FULL or HDRS")

    envid = _value(params, "ENVID")
    if envid is not None:
        if len(envid) > _ENVID_MAX:
            raise _bad_value("ENVID", f"longer than {_ENVID_MAX} characters")
        envid = _decoded("ENVID", envid, allow_utf8=False)

    auth = _value(params, "AUTH")
    if auth is not None and auth != "<>":
        auth = _decoded("AUTH", auth, allow_utf8=utf8)

    return MailCommand(
        sender=sender,
        size=size,
        body=body,
        smtputf8=_flag(params, "SMTPUTF8"),
        ret=ret,
        envid=envid,
        auth=auth,
        requiretls=_flag(params, "REQUIRETLS"),
    )


def parse_rcpt(arg: str, smtputf8: bool) -> RcptCommand:
    """Parse the text after "RCPT", e.g. " TO:<x@y.example> NOTIFY=SUCCESS,FAILURE".

    `smtputf8` says whether the transaction's MAIL command carried SMTPUTF8.  Raises
    GrammarError: 501 5.5.2 for framing, 501 5.1.3 for a malformed or null recipient,
    553 5.6.7 for UTF-8 without SMTPUTF8, 555 5.5.4 for an unknown parameter and
    501 5.5.4 for a repeated or malformed one.
    """
    path, raw = _split_command(arg, "TO:", "RCPT")
    if path == "":
        raise GrammarError(Reply(501, "5.1.3", "Null recipient address not allowed"))
    address = _parse_path(path, smtputf8, lambda why: Reply(501, "5.1.3", f"Bad recipient address syntax: {why}"),
                          postmaster=True)
    params = _params(raw, _RCPT_PARAMS)

    notify: tuple[str, ...] = ()
    notify_text = _value(params, "NOTIFY")
    if notify_text is not None:
        notify = tuple(word.upper() for word in notify_text.split(","))
        if notify == ("NEVER",):
            pass
        elif "NEVER" in notify:
            raise _bad_value("NOTIFY", "NEVER cannot be combined")
        elif (not set(notify) <= {"SUCCESS", "FAILURE", "DELAY"}) or len(set(notify)) != len(notify):
            raise _bad_value("NOTIFY", "must be NEVER or SUCCESS, FAILURE, DELAY")

    orcpt: str | None = None
    orcpt_text = _value(params, "ORCPT")
    if orcpt_text is not None:
        if len(orcpt_text) > _ORCPT_MAX:
            raise _bad_value("ORCPT", f"longer than {_ORCPT_MAX} characters")
        addr_type, semi, encoded = orcpt_text.partition(";")
        if not semi or not _ATOM.match(addr_type):
            raise _bad_value("ORCPT", "must be addr-type;address")
        decoded = _decoded("ORCPT", encoded, allow_utf8=smtputf8)
        if not decoded:
            raise _bad_value("ORCPT", "empty address")
        orcpt = f"{addr_type};{decoded}"

    return RcptCommand(address=address, notify=notify, orcpt=orcpt)
