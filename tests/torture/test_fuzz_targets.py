"""Fuzz targets: the parsers and codecs that read what others send us.

Each target is a hypothesis property over random and mutated input:

* `grammar`: MAIL/RCPT arguments (inbound/grammar.py) parse to a value or raise
  GrammarError carrying a well-formed 5xx reply; what parses, parses again the same from
  its own rendering; xtext round-trips;
* `protocol`: any bytes, cut anywhere, into the ESMTP server (inbound/protocol.py over
  StringTransport): it never raises, logs no failure, and writes only well-formed replies;
* `data stream`: DATA and BDAT (inbound/data.py), cut anywhere, give what a
  whole-stream reading of RFC 5321 4.1.1.4 / 4.5.2 gives: the end, the dot-unstuffed
  content, the bare CR/LF verdict, the fixed content, the octet count, the bytes after;
* `client` (outbound/client.py): any reply lines from a next hop give well-formed Reply
  values or MalformedReply, nothing else; a body dot-stuffed in random chunks reads back
  through our own DATA reader as the body with CRLF line ends;
* `spool codec` (spool/codec.py): records round-trip; random or mutated bytes decode to a
  well-typed value or raise CorruptRecord, nothing else;
* `dsn` (dsn.py): reports on random envelopes, replies and originals keep the wire form
  (CRLF, 998 octets, 7bit unless a global report) and parse back as multipart/report;
* `api`: random Postmark and native JSON requests (api/postmark.py, api/native.py) are
  accepted or refused with InvalidRequest; an accepted one builds (api/mime.py) a message
  in the wire form that the standard library parses; through the HTTP resource
  (api/server.py), with a real or the test token, the answer is never a 500.

`make test` runs each briefly; `make torture` (TXMTA_TORTURE=long) gives them ten
minutes together, each a share of the time, and prints how many examples each ran.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
import re
import time
from dataclasses import fields, replace
from typing import Any, Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher

from torturelib import LONG
from txmta.api.mime import build_message, is_8bit
from txmta.api.native import parse_native
from txmta.api.postmark import parse_email
from txmta.api.submission import InvalidRequest
from txmta.dsn import ACTIONS, RecipientReport, build_report
from txmta.inbound.data import BdatStream, DataStream, fix_bare, has_bare
from txmta.inbound.grammar import GrammarError, MailCommand, RcptCommand, parse_mail, parse_rcpt, xtext_decode
from txmta.outbound.client import DotStuffer, MalformedReply, ReplyParser
from txmta.message import (NULL_ADDRESS, Address, Envelope, Event, Labels, MessageFacts, OutboxRecord,
                           Recipient, RecipientState, StoredMessage, Suppression)
from txmta.reply import Reply
from txmta.spool import codec
from txmta.xtext import xtext_encode

TARGETS = 15                        # the calls of `fuzz` below
LONG_SECONDS = 600 / TARGETS        # make torture: ten minutes in all
ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")


def fuzz(name: str, target: Callable[..., None], short: int, **strategies: Any) -> int:
    """Run `target` on examples drawn from `strategies`: `short` examples, or under
    `make torture` as many as fit in its share of the ten minutes.  The example count."""
    count = [0]

    def counted(**kwargs: Any) -> None:
        count[0] += 1
        target(**kwargs)

    def run(examples: int) -> None:
        settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck),
                 print_blob=True)(given(**strategies)(counted))()

    started = time.monotonic()
    if not LONG:
        run(short)
    while LONG and time.monotonic() - started < LONG_SECONDS:
        run(500)        # a fresh run each time: new random examples
    print(f"\nfuzz target {name}: {count[0]} examples in {time.monotonic() - started:.1f} s")
    return count[0]


def check_reply(reply: Reply) -> None:
    """A reply txmta may send: a code, an enhanced code of its class, one line of text
    without controls, at most 512 octets on the wire (RFC 5321 4.2, 4.5.3.1.5; RFC 2034)."""
    assert ENHANCED.match(reply.enhanced) and reply.enhanced[0] == str(reply.code)[0], reply
    assert not re.search(r"[\x00-\x1f\x7f]", reply.text), reply
    wire = reply.to_bytes()
    assert wire.count(b"\r\n") == 1 and len(wire) <= 512, wire


# -- the command grammar ------------------------------------------------------------------

LOCALS = st.sampled_from(["a", "john.doe", "\"q d\"", "\"a\\\"b\"", "ü", "a..b", ".a", "a.",
                          "x+tag", "\"unterminated", "", "postmaster", "a" * 70, "用户"])
DOMAINS = st.sampled_from(["example.org", "EXAMPLE.org", "ü.example", "-a.example", "a-.example",
                           "[192.0.2.1]", "[IPv6:2001:db8::1]", "[IPv6:fe80::1%eth0]", "[1.2.3]",
                           "[tag:x]", "a" * 64 + ".example", "x." * 130 + "example", "example.",
                           "", "a_b.example", "xn--bcher-kva.example"])
PARAMS = st.sampled_from(["SIZE=100", "SIZE=", "SIZE=x", "SIZE=" + "9" * 25, "BODY=8BITMIME",
                          "BODY=BINARYMIME", "BODY=x", "SMTPUTF8", "SMTPUTF8=1", "RET=FULL", "RET=x",
                          "ENVID=a+2Bb", "ENVID=+zz", "ENVID=" + "e" * 101, "ENVID=a+00b",
                          "AUTH=<>", "AUTH=u+40x", "AUTH=", "REQUIRETLS", "NOTIFY=NEVER",
                          "NOTIFY=SUCCESS,FAILURE", "NOTIFY=NEVER,DELAY", "NOTIFY=success,success",
                          "ORCPT=rfc822;a+40b", "ORCPT=;x", "ORCPT=rfc822;", "ORCPT=rfc822;+C3+A9",
                          "X-UNKNOWN=1", "-bad", "a=b=c", "NOTIFY=\x01"])


@st.composite
def command_args(draw: st.DrawFn, prefix: str) -> str:
    """Near-valid MAIL/RCPT arguments, and now and then plain random text."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=80))
    local, domain = draw(LOCALS), draw(DOMAINS)
    path = draw(st.sampled_from([f"{local}@{domain}", "", local, f"@relay.example:{local}@{domain}",
                                 f"@bad_route:{local}@{domain}", f"{local}@{domain}>x"]))
    params = draw(st.lists(PARAMS, max_size=4))
    sep = draw(st.sampled_from([" ", "  ", ""]))
    text = f"{draw(st.sampled_from([' ', '', '  ']))}{draw(st.sampled_from([prefix, prefix.lower(), prefix[:-1]]))}" \
           f"{sep}<{path}>" + "".join(draw(st.sampled_from([" ", "  "])) + p for p in params)
    if draw(st.booleans()):
        i = draw(st.integers(0, len(text)))
        text = text[:i] + draw(st.text(max_size=3)) + text[i:]
    return text


def target_mail(arg: str) -> None:
    try:
        cmd = parse_mail(arg)
    except GrammarError as e:
        assert e.reply.code in (501, 553, 555), e.reply
        check_reply(e.reply)
        return
    assert isinstance(cmd, MailCommand)
    assert cmd.sender.domain == cmd.sender.domain.lower()
    assert cmd.smtputf8 or cmd.sender.is_ascii
    assert cmd.size is None or 0 <= cmd.size < 10 ** 20
    assert cmd.body in ("7BIT", "8BITMIME") and cmd.ret in (None, "FULL", "HDRS")
    assert cmd.envid is None or (cmd.envid.isascii() and cmd.envid.isprintable())
    again = parse_mail(f" FROM:<{cmd.sender}>" + (" SMTPUTF8" if cmd.smtputf8 else ""))
    assert again.sender == cmd.sender, (arg, cmd, again)


def target_rcpt(arg: str, utf8: bool) -> None:
    try:
        cmd = parse_rcpt(arg, utf8)
    except GrammarError as e:
        assert e.reply.code in (501, 553, 555), e.reply
        check_reply(e.reply)
        return
    assert isinstance(cmd, RcptCommand)
    assert not cmd.address.is_null
    assert utf8 or cmd.address.is_ascii
    assert set(cmd.notify) <= {"NEVER", "SUCCESS", "FAILURE", "DELAY"}
    assert cmd.orcpt is None or (";" in cmd.orcpt and cmd.orcpt.split(";", 1)[1])
    again = parse_rcpt(f" TO:<{cmd.address}>", utf8)
    assert again.address == cmd.address, (arg, cmd, again)


def test_fuzz_grammar() -> None:
    """MAIL and RCPT arguments: a value or a well-formed 5xx; what parses, re-parses the same."""
    fuzz("parse_mail", target_mail, 400, arg=command_args("FROM:"))
    fuzz("parse_rcpt", target_rcpt, 400, arg=command_args("TO:"), utf8=st.booleans())


def target_xtext(text: str) -> None:
    encoded = xtext_encode(text)
    assert encoded.isascii() and "=" not in encoded and " " not in encoded
    assert xtext_decode(encoded) == text


def test_fuzz_xtext() -> None:
    """RFC 3461 xtext: decode(encode(s)) == s for any text; decoding junk is a 501 5.5.4."""
    fuzz("xtext", target_xtext, 300, text=st.text(st.characters(exclude_categories=("Cs",))))

    def junk(text: str) -> None:
        try:
            xtext_decode(text)
        except GrammarError as e:
            assert (e.reply.code, e.reply.enhanced) == (501, "5.5.4")
            check_reply(e.reply)
    fuzz("xtext junk", junk, 200, text=st.text(max_size=40))


# -- the protocol, over StringTransport ---------------------------------------------------

CHATTER = st.sampled_from([
    b"EHLO a.example\r\n", b"HELO a.example\r\n", b"MAIL FROM:<a@example.com>\r\n",
    b"MAIL FROM:<> BODY=8BITMIME SMTPUTF8\r\n", b"RCPT TO:<b@example.org>\r\n",
    b"RCPT TO:<postmaster>\r\n", b"DATA\r\n", b"BDAT 5\r\n", b"BDAT 3 LAST\r\n", b"BDAT 0 LAST\r\n",
    b"BDAT x\r\n", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"VRFY x\r\n", b"HELP\r\n",
    b"STARTTLS\r\n", b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n", b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
    b"YWxpY2U=\r\n", b"c2VjcmV0\r\n", b"*\r\n", b"=\r\n", b".\r\n", b"..\r\n", b"\r\n", b"\n",
    b"\r", b"\x00", b"\xff", b"Subject: x\r\n", b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"a" * 600,
    b"a" * 13000 + b"\r\n", b"X-Txmta-Expires: 1s\r\n", b"MAIL FROM:<a@[IPv6:::1]>\r\n",
    "EHLO ü.example\r\n".encode(), b"EHLO " + b"b" * 510 + b"\r\n"])


@st.composite
def byte_stream(draw: st.DrawFn) -> list[bytes]:
    """A client's bytes, already cut into the pieces the server receives."""
    data = b"".join(draw(st.lists(st.one_of(CHATTER, st.binary(max_size=30)), max_size=30)))
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=10))))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


def _server_replies(out: bytes) -> None:
    """Every byte the server wrote is part of a well-formed reply (RFC 5321 4.2)."""
    assert not out or out.endswith(b"\r\n"), out[-200:]
    group: list[bytes] = []
    for line in out.split(b"\r\n")[:-1]:
        assert re.fullmatch(rb"[2-5]\d\d([ -].*)?", line, re.S), line
        assert len(line) + 2 <= 512, line[:100]
        assert not re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", line), line
        group.append(line)
        assert line[:3] == group[0][:3], group
        if line[3:4] != b"-":
            first = group[0]
            hello = b" Hello " in first or first.startswith(b"220 ")
            if first[:1] in b"245" and not (first[:3] in (b"250", b"220") and hello):
                for piece in group:
                    enhanced = piece[4:].split(b" ", 1)[0]
                    assert ENHANCED.match(enhanced.decode("ascii", "replace")) and \
                        enhanced[:1] == first[:1], group
            group = []


def target_protocol(pieces: list[bytes], listener: int) -> None:
    import smtpdialog

    failures: list[Any] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        modes = ("reject", "fix", "reject")
        harness = smtpdialog.Harness(
            listener=smtpdialog.Listener(bare_newlines=modes[listener],
                                         auth="optional" if listener == 2 else "none",
                                         tls="starttls" if listener == 2 else "none"),
            checker=smtpdialog.FakeChecker({"alice": "secret"}) if listener == 2 else None,
            tls_options=object() if listener == 2 else None)
        client = harness.connect(smtpdialog.LOOPBACK_IP if listener == 2 else smtpdialog.RELAY_IP)
        for piece in pieces:
            if client.closed or client.transport.tls_started:
                break
            client.proto.dataReceived(piece)
        _server_replies(client.transport.value())
        client.disconnect()
        for _, body in harness.stored():
            assert body.startswith(b"Received: from ")
            assert not has_bare(body), body[:200]
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not failures, failures[0]


def test_fuzz_protocol() -> None:
    """Any bytes, cut anywhere, on any listener: the server never raises, never logs a
    failure, writes only well-formed replies, and stores no bare CR or LF."""
    fuzz("protocol", target_protocol, 300, pieces=byte_stream(), listener=st.integers(0, 2))


# -- the DATA and BDAT streams -------------------------------------------------------------

def reference_data(stream: bytes, fix: bool) -> tuple[bool, bytes, bool, bytes]:
    """(done, content, bare, rest) of a whole DATA stream read at once (RFC 5321 4.1.1.4:
    the data ends at CRLF "." CRLF, the CRLF before "." belonging to the data; 4.5.2: a
    "." opening a line is removed; only CRLF ends a line, RFC 5321 2.3.8)."""
    s = b"\r\n" + stream
    end = s.find(b"\r\n.\r\n")
    if end < 0:
        return False, b"", False, b""
    content = s[:end + 2].replace(b"\r\n.", b"\r\n")[2:]
    bare = has_bare(content)
    return True, fix_bare(content) if fix else content, bare, s[end + 5:]


PIECES = st.sampled_from([b".", b"..", b"\r\n", b"\r\n", b"\r\n", b"\r", b"\n", b"a", b"text ",
                          b"\r\n.\r\n", b"\r\n..\r\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\x00",
                          b"\xff", b"MAIL FROM:<x@y>\r\n"])
LONG_LINES = st.sampled_from([64 * 1024 - 2, 64 * 1024 - 1, 64 * 1024, 64 * 1024 + 1, 70000]).map(
    lambda n: b"b" * n)


@st.composite
def data_stream(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    parts = draw(st.lists(st.one_of(PIECES, PIECES, st.binary(max_size=20), LONG_LINES), max_size=25))
    if draw(st.booleans()):
        parts.append(b"\r\n.\r\n")
    data = b"".join(parts)
    return data, sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=12))))


def target_data(stream: tuple[bytes, list[int]], fix: bool) -> None:
    data, cuts = stream
    reader = DataStream(fix=fix)
    out, rest = [], b""
    for a, b in zip([0] + cuts, cuts + [len(data)]):
        content, leftover = reader.feed(data[a:b])
        out.append(content)
        if reader.done:
            rest += leftover
    done, content, bare, after = reference_data(data, fix)
    assert reader.done == done
    if done:
        assert b"".join(out) == content
        assert reader.bare == bare
        assert reader.size == len(content)
        assert rest == after
    else:   # what came out so far is the start of the content, however the data ends
        final = reference_data(data + b"\r\n.\r\n", fix)[1]
        assert final.startswith(b"".join(out)), (final[:100], b"".join(out)[:100])


def target_bdat(chunks: list[bytes], fix: bool) -> None:
    reader = BdatStream(fix=fix)
    out = b"".join(reader.feed(c) for c in chunks) + reader.finish()
    whole = b"".join(chunks)
    assert reader.bare == has_bare(whole)
    assert out == (fix_bare(whole) if fix else whole)
    assert reader.size == len(out)


def test_fuzz_data_stream() -> None:
    """DATA and BDAT cut anywhere read as the whole stream reads (the end, unstuffing,
    bare CR/LF, fixing, size, what follows)."""
    fuzz("DATA stream", target_data, 300, stream=data_stream(), fix=st.booleans())
    fuzz("BDAT stream", target_bdat, 200,
         chunks=st.lists(st.one_of(PIECES, st.binary(max_size=20)), max_size=20), fix=st.booleans())


# -- the SMTP client: replies from the next hop, dot-stuffing ---------------------------------

REPLY_LINES = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda code, sep, text: code + sep + text,
              st.sampled_from([b"250", b"220", b"421", b"550", b"199", b"600", b"25", b"2500", b"abc"]),
              st.sampled_from([b" ", b"-", b"", b"\t"]),
              st.one_of(st.binary(max_size=30),
                        st.sampled_from([b"2.0.0 ok", b"5.1.1 no", b"4.4.1", b"2.0.0", b"5.0.0x",
                                         "\u00fc".encode(), b"\xff\xfe", b"9.9.9 x"]))))


def target_replies(lines: list[bytes]) -> None:
    parser = ReplyParser()
    for raw in lines:
        try:
            reply = parser.line(raw)
        except MalformedReply:
            parser = ReplyParser()      # the client gives up on the session
            continue
        if reply is not None:
            assert 200 <= reply.code <= 599
            assert reply.enhanced == "" or (ENHANCED.match(reply.enhanced)
                                            and reply.enhanced[0] == str(reply.code)[0]), reply


def target_dot_stuffing(chunks: list[bytes]) -> None:
    stuffer = DotStuffer()
    wire = b"".join(stuffer.feed(c) for c in chunks) + stuffer.end()
    body = re.sub(rb"\r\n|\r|\n", b"\r\n", b"".join(chunks))
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    reader = DataStream()
    content, rest = reader.feed(wire)
    assert reader.done and not reader.bare and rest == b""
    assert content == body


def test_fuzz_client() -> None:
    """Next-hop replies parse to well-formed values or MalformedReply; our dot-stuffing
    reads back through our own DATA reader exactly."""
    fuzz("client replies", target_replies, 300, lines=st.lists(REPLY_LINES, max_size=8))
    fuzz("dot-stuffing", target_dot_stuffing, 300,
         chunks=st.lists(st.one_of(PIECES, st.binary(max_size=20)), max_size=20))


# -- the spool codec -----------------------------------------------------------------------

TEXT = st.text(max_size=20)
FLOATS = st.floats(allow_nan=False, allow_infinity=False, min_value=0, max_value=4e9)  # times
ADDRESSES = st.builds(Address, st.text(max_size=10), st.text(max_size=10).map(lambda d: d.replace("@", ""))) \
    .filter(lambda a: not a.is_null and "@" not in a.domain and (a.domain or "@" not in a.local))
REPLIES = st.builds(Reply, st.integers(200, 599), st.sampled_from(["", "2.0.0", "4.4.1", "5.1.1"]), TEXT)
RECIPIENTS = st.builds(Recipient, ADDRESSES, st.lists(st.sampled_from(["SUCCESS", "FAILURE", "DELAY", "NEVER"]),
                                                       max_size=2).map(tuple), st.one_of(st.none(), TEXT))
STATES = st.builds(RecipientState, st.sampled_from(["queued", "deferred", "sent", "failed"]),
                   st.integers(0, 1000), FLOATS, st.one_of(st.none(), REPLIES), st.booleans(), TEXT,
                   st.booleans(), TEXT, TEXT)


@st.composite
def stored_messages(draw: st.DrawFn) -> StoredMessage:
    rcpts = draw(st.lists(RECIPIENTS, min_size=1, max_size=3))
    env = Envelope(draw(st.one_of(st.just(NULL_ADDRESS), ADDRESSES)), tuple(rcpts),
                   draw(st.one_of(st.none(), st.integers(0, 10 ** 9))),
                   draw(st.sampled_from(["7BIT", "8BITMIME"])), draw(st.booleans()),
                   draw(st.sampled_from([None, "FULL", "HDRS"])), draw(st.one_of(st.none(), TEXT)),
                   draw(st.one_of(st.none(), TEXT)), draw(st.dictionaries(TEXT, TEXT, max_size=2)),
                   draw(st.booleans()), draw(st.booleans()))
    labels = draw(st.one_of(st.just(Labels()), st.builds(
        Labels, TEXT, st.lists(st.tuples(TEXT, TEXT), max_size=2).map(tuple), TEXT)))
    return StoredMessage(draw(TEXT), env, draw(FLOATS), draw(st.integers(0, 10 ** 9)),
                         tuple(draw(STATES) for _ in rcpts),
                         draw(st.dictionaries(TEXT, TEXT, max_size=3)), draw(st.booleans()),
                         draw(TEXT), labels, draw(TEXT), draw(st.one_of(st.none(), FLOATS)),
                         draw(st.integers(0, 99)))


EVENTS = st.builds(Event, FLOATS, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT)
SUPPRESSIONS = st.builds(Suppression, TEXT, TEXT, FLOATS, FLOATS, TEXT)
FACTS = st.builds(MessageFacts, TEXT, TEXT, TEXT, st.lists(st.tuples(TEXT, TEXT), max_size=2).map(tuple),
                  TEXT, TEXT)
OUTBOX = st.builds(OutboxRecord, TEXT, FLOATS, TEXT, st.integers(-1, 1000), TEXT,
                   st.one_of(st.none(), REPLIES.map(Reply.as_dict)), TEXT, TEXT, TEXT,
                   st.integers(0, 1000), TEXT, st.one_of(st.none(), FACTS))

# each kind: (decode of bytes, encode, values)
CODECS: dict[str, tuple[Callable[[bytes], Any], Callable[[Any], bytes], Any]] = {
    # a message record holds no recipient states (they are records of their own)
    "message": (codec.decode_message, codec.encode_message,
                stored_messages().map(lambda m: replace(m, recipients=tuple(
                    RecipientState() for _ in m.recipients)))),
    "recipient": (codec.decode_recipient, codec.encode_recipient, STATES),
    "event": (codec.decode_event, codec.encode_event, EVENTS),
    "history": (lambda b: codec.decode_history(b)[0], lambda m: codec.encode_history(m, 1.0),
                stored_messages()),
    "suppression": (lambda b: codec.decode_suppression("a@example.org", b), codec.encode_suppression,
                    SUPPRESSIONS.map(lambda s: replace(s, address="a@example.org"))),
    "outbox": (codec.decode_outbox, codec.encode_outbox, OUTBOX),
}
KINDS = st.sampled_from(sorted(CODECS))


def well_typed(value: Any, like: Any, name: str = "") -> None:
    """`value` has the types a real record of its class has (`like`, every field set)."""
    assert type(value) is type(like), (name, value, like)
    if isinstance(value, float):
        assert value == value, (name, value)     # no NaN
    elif isinstance(value, tuple) and like:
        for v in value:
            well_typed(v, like[0], name)
    elif isinstance(value, dict) and name != "reply":   # an outbox reply is any JSON object
        for k, v in value.items():
            assert isinstance(k, str) and isinstance(v, str), (name, value)
    elif hasattr(value, "__dataclass_fields__"):
        for f in fields(value):
            v = getattr(value, f.name)
            if v is None:
                assert "None" in str(f.type), (f.name, value)
            else:
                well_typed(v, getattr(like, f.name), f.name)


SAMPLES: dict[str, Any] = {}


def _sample(kind: str) -> Any:
    """A full record of each kind, every optional field set: the types a decoded one must have."""
    if not SAMPLES:
        reply = Reply(250, "2.0.0", "ok")
        rcpt = Recipient(Address("a", "b"), ("SUCCESS",), "rfc822;a@b")
        state = RecipientState("queued", 1, 1.0, reply, True, "r", True, "c", "s")
        env = Envelope(Address("s", "d"), (rcpt,), 1, "7BIT", True, "FULL", "e", "a", {"k": "v"}, True, True)
        msg = StoredMessage("id", env, 1.0, 1, (state,), {"k": "v"}, True, "<h>",
                            Labels("t", (("k", "v"),), "s"), "lane", 1.0, 1)
        facts = MessageFacts("s", "h", "t", (("k", "v"),), "l", "k")
        SAMPLES.update(message=msg, recipient=state, event=Event(1.0, "k", "r", "t", "r", "c", "t"),
                       history=msg, suppression=Suppression("a@example.org", "r", 1.0, 1.0, "x"),
                       outbox=OutboxRecord("k", 1.0, "m", 1, "r", {"code": 250}, "r", "c", "t", 1, "x",
                                           facts))
    return SAMPLES[kind]


def target_codec_roundtrip(kind: str, data: st.DataObject) -> None:
    decode, encode, values = CODECS[kind]
    value = data.draw(values)
    assert decode(encode(value)) == value


@st.composite
def mutated_records(draw: st.DrawFn) -> tuple[str, bytes]:
    """A record of some kind, then damaged: bits flipped, cut, spliced, its JSON changed."""
    kind = draw(KINDS)
    decode, encode, values = CODECS[kind]
    raw = encode(draw(values))
    how = draw(st.sampled_from(["bytes", "flip", "cut", "splice", "json", "version"]))
    if how == "bytes":
        raw = draw(st.binary(max_size=200))
    elif how == "flip" and len(raw) > 1:
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(raw) - 1))
            raw = raw[:i] + bytes([raw[i] ^ (1 << draw(st.integers(0, 7)))]) + raw[i + 1:]
    elif how == "cut":
        raw = raw[:draw(st.integers(0, len(raw)))]
    elif how == "splice":
        i = draw(st.integers(0, len(raw)))
        raw = raw[:i] + draw(st.binary(max_size=8)) + raw[i:]
    elif how == "json":
        doc = json.loads(raw[1:])
        raw = raw[:1] + json.dumps(draw(_mutate_json(doc))).encode()
    else:
        raw = bytes([draw(st.integers(0, 255))]) + raw[1:]
    return kind, raw


JSON_ATOMS = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.text(max_size=5),
                       st.sampled_from([1e308, -1e308, 1.5, 0.0, 10 ** 400, "1e400", [], {}, [[]],
                                        {"": None}, float("nan"), float("inf"), ["a"], {"a": 1}]))


@st.composite
def _mutate_json(draw: st.DrawFn, doc: Any) -> Any:
    """`doc` with one value somewhere inside replaced by a random JSON value or removed."""
    if isinstance(doc, (dict, list)) and doc and draw(st.integers(0, 7)):
        keys = sorted(doc) if isinstance(doc, dict) else list(range(len(doc)))
        key = draw(st.sampled_from(keys))
        doc = dict(doc) if isinstance(doc, dict) else list(doc)
        if draw(st.integers(0, 4)) == 0:
            del doc[key]
        else:
            doc[key] = draw(_mutate_json(doc[key]))
        return doc
    return draw(JSON_ATOMS)


def target_codec_damage(record: tuple[str, bytes]) -> None:
    kind, raw = record
    decode = CODECS[kind][0]
    try:
        value = decode(raw)
    except codec.CorruptRecord:
        return
    well_typed(value, _sample(kind))
    encode = CODECS[kind][1]
    assert decode(encode(value)) == value     # a value read once reads the same again


def test_fuzz_spool_codec() -> None:
    """Records round-trip; damaged ones decode well typed or raise CorruptRecord only."""
    fuzz("codec round trip", target_codec_roundtrip, 200, kind=KINDS, data=st.data())
    fuzz("codec damage", target_codec_damage, 600, record=mutated_records())


# -- delivery status notifications ----------------------------------------------------------

WILD = st.text(max_size=60) | st.sampled_from(["", " ", "a" * 1200, "x " * 700, "\r\n", "ü" * 600,
                                               "=?utf-8?q?x?=", "\x00\x1b", "--boundary"])


@st.composite
def dsn_cases(draw: st.DrawFn) -> dict[str, Any]:
    rcpts = draw(st.lists(st.builds(Recipient, st.builds(Address, WILD, WILD),
                                    st.lists(st.sampled_from(["SUCCESS", "FAILURE", "DELAY"]),
                                             max_size=2, unique=True).map(tuple),
                                    st.one_of(st.none(), WILD.map(lambda t: "rfc822;" + t),
                                              WILD)), min_size=1, max_size=3))
    env = Envelope(draw(st.builds(Address, WILD, WILD)), tuple(rcpts), None,
        draw(st.sampled_from(["7BIT", "8BITMIME"])), draw(st.booleans()),
        draw(st.sampled_from([None, "FULL", "HDRS"])), draw(st.one_of(st.none(), WILD)))
    reports = [RecipientReport(r, draw(st.sampled_from(ACTIONS)),
                               draw(st.sampled_from(["", "5.1.1", "4.4.7", "x", "9.9.9", "5.1.1 "])),
                               draw(st.one_of(st.none(), st.builds(Reply, st.integers(200, 599), WILD, WILD))),
                               draw(WILD), draw(st.one_of(st.none(), FLOATS)),
                               draw(st.one_of(st.none(), FLOATS)), draw(st.one_of(st.none(), FLOATS)))
               for r in rcpts]
    original = draw(st.one_of(
        st.binary(max_size=300),
        st.lists(st.sampled_from([b"Subject: hi", b"From: a@b", b"", b"body", b"\xff\xfe",
                                  b"x" * 1500, b"\r", b"\n", b" folded", b"--b"]), max_size=10)
        .map(b"\r\n".join)))
    return dict(envelope=env, message_id=draw(WILD), arrival=draw(FLOATS), reports=reports,
                original=original, reporting_mta=draw(WILD), now=draw(FLOATS),
                dsn_message_id=draw(WILD), headers_only_above=draw(st.sampled_from([10, 256 * 1024])))


def target_dsn(case: dict[str, Any]) -> None:
    report = build_report(**case)
    assert report.endswith(b"\r\n")
    assert b"\r" not in report.replace(b"\r\n", b"") and b"\n" not in report.replace(b"\r\n", b"")
    assert max(len(line) for line in report.split(b"\r\n")) <= 998
    head, _, _ = report.partition(b"\r\n\r\n")
    env = case["envelope"]
    utf8 = env.smtputf8 or not env.sender.is_ascii or any(
        not r.recipient.address.is_ascii or not (r.recipient.orcpt or "").isascii() for r in case["reports"])
    assert utf8 or head.isascii()       # RFC 6532 UTF-8 header fields only in a global report
    msg = email.message_from_bytes(report, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report", head
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert isinstance(parts, list) and len(parts) in (2, 3), [type(p) for p in parts]
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    assert parts[0].get_content_type() == "text/plain"
    assert parts[1].get_content_type() == status_type, parts[1].get_content_type()
    if not utf8:
        assert report[:report.find(b"\r\n--", report.find(status_type.encode()))].isascii() or \
            len(parts) == 3


def test_fuzz_dsn() -> None:
    """Reports on anything keep the wire form and the multipart/report structure."""
    fuzz("dsn", target_dsn, 200, case=dsn_cases())


# -- the HTTP API's requests and the messages built from them -------------------------------

JVAL = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | WILD,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(WILD, inner, max_size=3),
                    max_leaves=6)
MAILBOXES = st.sampled_from(["a@example.com", "Ann <a@example.com>", "\"B, C\" <b@example.org>",
                             "ü@example.com", "<>", "a@", "@b", "x <y@z", "a@example.com, b@example.org",
                             "=?utf-8?q?x?= <c@example.net>", "a@[192.0.2.1]", "a b@c", "a\r\n@b.c"])
B64 = st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode())


@st.composite
def postmark_requests(draw: st.DrawFn) -> Any:
    obj: dict[str, Any] = {}
    for key, values in (("From", MAILBOXES), ("To", MAILBOXES), ("Cc", MAILBOXES), ("Bcc", MAILBOXES),
                        ("ReplyTo", MAILBOXES), ("Subject", WILD), ("TextBody", WILD), ("HtmlBody", WILD),
                        ("Tag", WILD), ("MessageStream", WILD), ("TTL", st.integers(-5, 10 ** 9)),
                        ("Headers", st.lists(st.fixed_dictionaries({"Name": WILD, "Value": WILD}), max_size=2)),
                        ("Attachments", st.lists(st.fixed_dictionaries(
                            {"Name": WILD, "Content": B64, "ContentType": WILD}), max_size=2)),
                        ("Metadata", st.dictionaries(WILD, WILD, max_size=2))):
        if draw(st.integers(0, 3)):
            obj[key] = draw(values if draw(st.integers(0, 9)) else JVAL)
    if draw(st.integers(0, 9)) == 0:
        obj[draw(WILD)] = draw(JVAL)
    return obj if draw(st.integers(0, 19)) else draw(JVAL)


@st.composite
def native_requests(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        raw = draw(st.one_of(st.binary(max_size=200), st.just(b"Subject: x\r\n\r\nbody\r\n")))
        obj: dict[str, Any] = {"raw": base64.b64encode(raw).decode(),
                               "envelope": {"from": draw(MAILBOXES), "to": draw(st.lists(MAILBOXES, max_size=3))}}
    else:
        obj = {"from": draw(MAILBOXES), "to": draw(st.lists(MAILBOXES, max_size=3)),
               "subject": draw(WILD), "text": draw(WILD), "html": draw(st.one_of(st.none(), WILD))}
    for _ in range(draw(st.integers(0, 2))):
        obj[draw(st.sampled_from(["tag", "metadata", "stream", "headers", "attachments", "cc",
                                  "expires_at", "ttl", "raw", "x"]))] = draw(JVAL)
    return obj


def _built(sub: Any) -> None:
    try:
        data = build_message(sub, message_id="0152rwhVZ0t09xR", date=1700000000.0,
                             hostname="mta.example.com")
    except InvalidRequest as e:     # a header word too long for a line: a 422 (api/server.py)
        assert "too long" in e.message, e
        return
    assert data.endswith(b"\r\n") and b"\0" not in data
    assert b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    if is_8bit(data):
        email.message_from_string(data.decode("utf-8"), policy=email.policy.default)
    else:
        email.message_from_bytes(data, policy=email.policy.default)


def _parsed(parse: Any, obj: Any) -> Any:
    """`parse(obj)`, or None when it refuses the request with a well-formed InvalidRequest."""
    try:
        return parse(obj)
    except InvalidRequest as e:
        assert isinstance(e.error_code, int) and e.message, e
        return None


def target_postmark(obj: Any) -> None:
    sub = _parsed(parse_email, obj)
    if sub is not None:
        _built(sub)


def target_native(obj: Any) -> None:
    req = _parsed(parse_native, obj)
    if req is None:
        return
    assert req.recipients and (req.raw is None) != (req.submission is None)
    if req.submission is not None:
        _built(req.submission)


def target_api(request: tuple[bytes, Any], test_token: bool) -> None:
    """A request through the HTTP resource: an answer the API documents, never a 500; with
    a real token, a 200 stores exactly one message and anything else stores nothing."""
    from test_api_deadlines import api, post
    from txmta.api.tokens import TEST, Token

    path, body = request
    resource, spool, _ = api()
    token = TEST if test_token else Token("app")
    resource.tokens.check = lambda presented: token    # type: ignore[method-assign]
    status, answer = post(resource, path, body)
    assert status in (200, 400, 403, 413, 422), (status, answer)
    if path == b"/email" and status != 200:
        assert answer["ErrorCode"] != 500, answer
    stored = len(spool.messages)
    assert stored == (1 if status == 200 and not test_token else 0), (status, answer, stored)


def test_fuzz_api_requests() -> None:
    """API requests: accepted, or refused with InvalidRequest; accepted ones build a message
    in the wire form that parses; through the HTTP resource, with a real or the test token,
    never a 500 and nothing stored but for a 200."""
    fuzz("postmark", target_postmark, 300, obj=postmark_requests())
    fuzz("native", target_native, 300, obj=native_requests())
    fuzz("api over HTTP", target_api, 200, test_token=st.booleans(),
         request=st.one_of(st.tuples(st.just(b"/email"), postmark_requests()),
                           st.tuples(st.just(b"/v1/messages"), native_requests())))
