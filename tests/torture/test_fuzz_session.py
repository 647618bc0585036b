"""Fuzzing a live SMTP session: random command sequences and chunkings on a real socket.

A hypothesis `RuleBasedStateMachine` talks to a running `twistd txmta` over loopback
through three listeners (bare newlines refused; bare newlines fixed; STARTTLS with AUTH).
It sends valid and invalid commands (EHLO, HELO, MAIL, RCPT, DATA, BDAT, RSET, NOOP, VRFY,
HELP, QUIT, STARTTLS, AUTH, garbage, NULs, 8-bit, bare CR or LF, over-long lines),
several per write (pipelining, RFC 2920) and every write cut into random pieces.

What must hold, whatever was sent:
* every reply is well formed (RFC 5321 4.2): three digits, SP or "-", one code for all
  lines of a multi-line reply, CRLF, no line over 512 octets (4.5.3.1.5), and an enhanced
  status code of the reply's class on every 2xx/4xx/5xx line except the greeting and the
  replies to EHLO/HELO (RFC 2034 3; txmta advertises ENHANCEDSTATUSCODES);
* exactly one reply per command line, in order; nothing more;
* the server closes the connection only after QUIT, a 421, or too many errors;
* a message answered 250 after DATA or BDAT LAST is in the spool with exactly the bytes
  sent (dot-unstuffed, bare CR/LF made CRLF on the listener that fixes them), after our
  Received header; a refused one is not there at all;
* the daemon log never holds a traceback.
"""

from __future__ import annotations

import base64
import functools
import re
import select
import socket
import ssl
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from itlib import HOSTNAME, USERS, Daemon, split_received
from torturelib import size
from txmta.inbound.data import fix_bare, has_bare

MAX_ERRORS = 20                      # [server] max_errors (the default)
MAX_MESSAGE_SIZE = 96 * 1024         # [spool] max_message_size: big bodies are refused
INLINE_LIMIT = 16 * 1024             # [spool] inline_body_limit: bodies above it go to files
LISTENERS = ("reject", "fix", "starttls")
DEFAULT_LIMIT = 512                  # RFC 5321 4.5.3.1.4, with CRLF
LINE_LIMITS = {b"MAIL": 2048, b"RCPT": 2048, b"AUTH": 12288}
MAX_REPLY_LINE = 512                 # RFC 5321 4.5.3.1.5, with CRLF
ENHANCED = re.compile(rb"([245])\.\d{1,3}\.\d{1,3} ")


def new_token() -> str:
    """A Message-ID local part never used before, always as long (the draws that cut the
    message depend on its length, and hypothesis wants them the same on a replay)."""
    return uuid.uuid4().hex


COUNTS = {"connections": 0, "replies": 0, "stored": 0, "refused": 0, "closed by errors": 0,
          "starttls": 0}


@pytest.fixture(scope="module")
def daemon(module_daemons: Any, tls_cert: Any, users_file: Any) -> Daemon:
    return module_daemons(
        listeners=[{"tls": "none", "bare_newlines": "reject"},
                   {"tls": "none", "bare_newlines": "fix"},
                   {"tls": "starttls", "auth": "optional", "bare_newlines": "reject"}],
        tls={"cert": str(tls_cert.cert), "key": str(tls_cert.key)},
        auth={"users": str(users_file)},
        server={"max_errors": MAX_ERRORS},
        spool={"max_message_size": f"{MAX_MESSAGE_SIZE // 1024}KiB",
               "inline_body_limit": f"{INLINE_LIMIT // 1024}KiB"})


# -- the wire --------------------------------------------------------------------------

class Closed(Exception):
    """The server closed the connection."""


@dataclass
class Reply:
    code: int
    lines: list[bytes]               # whole lines, CRLF removed

    @property
    def text(self) -> bytes:
        return b"\n".join(line[4:] for line in self.lines)

    def __str__(self) -> str:
        return " | ".join(line.decode("utf-8", "replace") for line in self.lines)


def check_reply(lines: list[bytes], enhanced: bool) -> int:
    """RFC 5321 4.2 (and RFC 2034 when `enhanced`): the reply's code; AssertionError if malformed."""
    code = lines[0][:3]
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        assert len(line) + 2 <= MAX_REPLY_LINE, f"reply line over 512 octets: {line[:80]!r}..."
        assert re.fullmatch(rb"[2-5][0-5][0-9]", line[:3]), f"bad reply code: {line!r}"
        assert line[:3] == code, f"multi-line reply changes its code: {lines!r}"
        assert line[3:4] == (b" " if last else b"-") or (last and len(line) == 3), \
            f"reply line must go on with SP (last) or '-': {lines!r}"
        assert not re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", line), f"control octet in a reply: {line!r}"
        line.decode("utf-8")
        if enhanced and code[:1] in b"245":
            m = ENHANCED.match(line, 4)
            assert m is not None and m.group(1) == code[:1], \
                f"no enhanced status code of class {code[:1]!r} (RFC 2034): {line!r}"
    return int(code)


class Wire:
    """A plain (later TLS) socket; writes cut where the test says, reads whole replies."""

    def __init__(self, port: int) -> None:
        self.sock: Any = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data: bytes, cuts: list[int], pause: bool) -> None:
        last = 0
        for cut in sorted(set(c for c in cuts if 0 < c < len(data))) + [len(data)]:
            self.sock.sendall(data[last:cut])
            last = cut
            if pause:
                time.sleep(0.001)

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError) as e:
            raise Closed(str(e)) from e
        if not chunk:
            raise Closed("EOF")
        self.buf += chunk

    def reply(self, enhanced: bool = True) -> Reply:
        lines: list[bytes] = []
        while True:
            while b"\r\n" not in self.buf:
                assert b"\n" not in self.buf and b"\r" not in self.buf.rstrip(b"\r"), \
                    f"bare CR or LF in the reply stream: {self.buf!r}"
                self._fill()
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                break
        return Reply(check_reply(lines, enhanced), lines)

    def expect_close(self) -> None:
        """After QUIT or a 421: nothing more, then EOF."""
        try:
            while True:
                assert not self.buf, f"data after the closing reply: {self.buf!r}"
                self._fill()
        except Closed:
            pass
        self.sock.close()

    def nothing_pending(self) -> None:
        """No reply the client did not ask for is waiting."""
        pending = self.sock.pending() if isinstance(self.sock, ssl.SSLSocket) else 0
        if not pending and not self.buf:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable:
                return
        self._fill()
        raise AssertionError(f"unexpected data from the server: {self.buf!r}")

    def start_tls(self) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        assert not self.buf, f"plaintext after the 220 to STARTTLS: {self.buf!r}"
        self.sock = ctx.wrap_socket(self.sock, server_hostname=HOSTNAME)

    def close(self) -> None:
        self.sock.close()


# -- what the client sends -------------------------------------------------------------

@dataclass
class Line:
    """One command line, and what it is expected to get (None: anything well formed)."""

    data: bytes
    expect: Callable[["Model"], tuple[int, ...] | None] = lambda m: None

    @property
    def verb(self) -> bytes:
        """The verb as the server reads it (RFC 5321 2.4: case does not matter)."""
        line = self.data[:-1] if self.data.endswith(b"\n") else self.data
        if line.endswith(b"\r"):
            line = line[:-1]
        return line.partition(b" ")[0].upper()

    @property
    def too_long(self) -> bool:
        return len(self.data.rstrip(b"\r\n")) + 2 > LINE_LIMITS.get(self.verb, DEFAULT_LIMIT)


@dataclass
class Model:
    """What the client knows of the server's session state, from the replies it got."""

    listener: str
    helo: bool = False
    transaction: bool = False
    rcpts: int = 0
    bdat: bool = False               # a BDAT transaction is open (DATA is refused in it)
    auth_line: bool = False          # the next line is an AUTH response (after a 334)
    tls: bool = False
    errors: int = 0

    def reset_transaction(self) -> None:
        self.transaction, self.rcpts, self.bdat = False, 0, False

    def note(self, line: Line | None, reply: Reply) -> None:
        """Follow the session: `line` was answered with `reply` (None: a DATA/BDAT body)."""
        if reply.code >= 400 and reply.code != 421:
            self.errors += 1
        if line is None:
            return
        if self.auth_line:
            self.auth_line = reply.code == 334
            return
        verb, ok = line.verb, reply.code == 250
        if verb in (b"EHLO", b"HELO") and ok:
            self.helo = True
            self.reset_transaction()
        elif verb == b"MAIL" and ok:
            self.transaction, self.rcpts, self.bdat = True, 0, False
        elif verb == b"RCPT" and ok:
            self.rcpts += 1
        elif verb == b"RSET" and ok:
            self.reset_transaction()
        elif verb == b"AUTH" and reply.code == 334:
            self.auth_line = True


def rcpt_expect(m: Model) -> tuple[int, ...]:
    return (250,) if m.transaction else (503,)


def data_expect(m: Model) -> tuple[int, ...]:
    if not m.transaction or m.bdat:
        return (503,)
    return (354,) if m.rcpts else (554,)


EOL = st.sampled_from([b"\r\n"] * 6 + [b"\n"])
NAMES = st.sampled_from(["client.test.invalid", "[127.0.0.1]", "x", "ü.example", "a" * 300,
                         "b" * 500, "ü" * 250])
ADDRESSES = st.sampled_from(["a@example.org", "postmaster", "\"q d\"@example.org",
                             "ü@exämple.org", "@relay.example:b@example.org", "x@[192.0.2.1]",
                             "x@[IPv6:2001:db8::1]", "a.b+c@sub.example.org"])
# valid parameters, at most one of each keyword
MAIL_PARAMS = st.lists(st.sampled_from(["SIZE=1000", "BODY=8BITMIME", "BODY=7BIT", "SMTPUTF8",
                                        "RET=HDRS", "ENVID=abc+2Bdef", "AUTH=<>", "SIZE=99999999999"]),
                       max_size=3, unique_by=lambda p: p.partition("=")[0])
RCPT_PARAMS = st.lists(st.sampled_from(["NOTIFY=NEVER", "NOTIFY=SUCCESS,FAILURE", "NOTIFY=DELAY",
                                        "ORCPT=rfc822;a+40example.org"]), max_size=2,
                       unique_by=lambda p: p.partition("=")[0])
CLOSING = {b"DATA", b"BDAT", b"QUIT", b"STARTTLS"}   # their own rules send these


def _valid_mail(sender: str, params: list[str], eol: bytes) -> Line:
    utf8 = not sender.isascii()
    params = params + ["SMTPUTF8"] if utf8 and "SMTPUTF8" not in params else params
    text = " ".join([f"MAIL FROM:<{sender}>"] + params)
    # <postmaster> alone is a recipient only (RFC 5321 4.5.1): a bad sender
    outcome = 501 if "@" not in sender else 552 if "SIZE=99999999999" in params else 250

    def expect(m: Model) -> tuple[int, ...]:
        return (503,) if not m.helo or m.transaction else (outcome,)
    return Line(text.encode() + eol, expect)


def _valid_rcpt(rcpt: str, params: list[str], eol: bytes) -> Line:
    # a non-ASCII recipient is 553 5.6.7 unless MAIL had SMTPUTF8: not predicted
    expect = rcpt_expect if rcpt.isascii() else (lambda m: None)
    return Line((" ".join([f"RCPT TO:<{rcpt}>"] + params)).encode() + eol, expect)


@st.composite
def garbage(draw: st.DrawFn) -> Line:
    """A line that is probably not a valid command: random octets, NULs, 8-bit, bare CR,
    known verbs with random arguments, lines around the length limits."""
    kind = draw(st.sampled_from(["bytes", "verb", "long", "control"]))
    eol = draw(EOL)
    if kind == "bytes":
        body = draw(st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")))
    elif kind == "verb":
        verb = draw(st.sampled_from([b"EHLO", b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP", b"VRFY",
                                     b"HELP", b"EXPN", b"AUTH", b"mail", b"Rcpt", b"TURN", b""]))
        sep = draw(st.sampled_from([b" ", b"", b"  ", b"\t"]))
        arg = draw(st.one_of(
            st.binary(max_size=40),
            st.sampled_from([b"FROM:<>", b"FROM:<a@b>", b"TO:<>", b"TO:<a@b> NOTIFY=NEVER,SUCCESS",
                             b"FROM:<a@b> SIZE=x", b"FROM:a@b", b"TO:<a@b>x", b"FROM:<a@b> X=1",
                             b"PLAIN", b"LOGIN", b"PLAIN =", b"CRAM-MD5", b"FROM:<\"a\\",
                             b"FROM:<a@b> ENVID=+zz", b"FROM:<a\x00@b>", b"TO:<a@[1.2.3]>"])))
        body = (verb + sep + arg).replace(b"\n", b"")
    elif kind == "long":
        n = draw(st.sampled_from([509, 510, 511, 2045, 2046, 2047, 12285, 12286, 12287, 20000]))
        verb = draw(st.sampled_from([b"NOOP ", b"MAIL FROM:<", b"RCPT TO:<", b"AUTH ", b"X"]))
        body = (verb + b"a" * n)[:n]
    else:
        body = draw(st.sampled_from([b"\x00", b"NOOP\x00", b"\r", b"NOOP\r\r", b"\xff\xfe",
                                     b"NO\rOP", b"", b" ", "VRFY ü".encode(), b"NOOP \x80"]))
    line = Line(body + eol)
    if line.verb in CLOSING or line.verb.startswith(b"QUIT"):
        return Line(b"NOOP" + eol, lambda m: (250,))
    if line.too_long:
        return Line(line.data, lambda m: (500,))
    return line


@st.composite
def command(draw: st.DrawFn) -> Line:
    eol = draw(EOL)
    kind = draw(st.sampled_from(["ehlo", "helo", "mail", "mail", "rcpt", "rcpt", "rset", "noop",
                                 "vrfy", "help", "auth", "garbage", "garbage", "garbage"]))
    if kind == "ehlo":
        return Line(f"EHLO {draw(NAMES)}".encode() + eol,
                    lambda m: (250,))
    if kind == "helo":
        return Line(f"HELO {draw(NAMES)}".encode() + eol,
                    lambda m: (250,))
    if kind == "mail":
        return _valid_mail(draw(ADDRESSES), draw(MAIL_PARAMS), eol)
    if kind == "rcpt":
        return _valid_rcpt(draw(ADDRESSES), draw(RCPT_PARAMS), eol)
    if kind in ("rset", "noop", "vrfy", "help"):
        text, code = {"rset": ("RSET", 250), "noop": ("NOOP", 250), "vrfy": ("VRFY someone", 252),
                      "help": ("HELP", 214)}[kind]
        return Line(text.encode() + eol, lambda m, code=code: (code,))
    if kind == "auth":
        user, password = next(iter(USERS.items()))
        plain = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        text = draw(st.sampled_from([f"AUTH PLAIN {plain}", "AUTH PLAIN", "AUTH LOGIN",
                                     "AUTH PLAIN bm90LWJhc2U2NA", plain, "*", "AUTH XOAUTH2 x"]))
        return Line(text.encode() + eol)
    return draw(garbage())


# A DATA body: lines built of pieces chosen for the dot-stuffing and line-end edge cases.
PIECES = st.sampled_from([b"", b".", b"..", b". ", b"x.", b".\r", b"\r", b"\n", b"\r.\r",
                          b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\x00", b"\xff\xfe", "ü".encode(),
                          b" ", b"\t", b"Subject: x", b"text"])
LINE = st.one_of(
    st.lists(PIECES, max_size=5).map(b"".join),
    st.binary(max_size=80),
    st.sampled_from([997, 998, 999, 4000, 64 * 1024 - 1, 64 * 1024, 64 * 1024 + 1, 70000])
    .map(lambda n: b"a" * n))
FIRST_LINES = st.sampled_from([None, b"", b".", b"..", b". x", b" folded", b".a"])


@st.composite
def message_content(draw: st.DrawFn, token: str) -> tuple[bytes, bytes]:
    """(the header section we always put first or b"", the content after it)."""
    first = draw(FIRST_LINES)
    lines = draw(st.lists(LINE, max_size=size(8, 20)))
    if first is None:
        head = (f"Message-ID: <{token}@fuzz.test.invalid>\r\n"
                "Date: Mon, 07 Dec 2026 00:00:00 +0000\r\nSubject: fuzz\r\n\r\n").encode()
    else:
        head, lines = b"", [first] + lines
    content = b"\r\n".join(lines)
    if lines and draw(st.booleans()):
        content += b"\r\n"
    return head, content


def dot_stuff(data: bytes) -> bytes:
    """RFC 5321 4.5.2: a line starting with "." gets one more."""
    return (b"." if data.startswith(b".") else b"") + data.replace(b"\r\n.", b"\r\n..")


def cuts_for(draw: st.DrawFn, n: int) -> list[int]:
    if n <= 1:
        return []
    return draw(st.lists(st.integers(1, n - 1), max_size=6))


# -- the state machine ------------------------------------------------------------------

def step(f: Callable[..., None]) -> Callable[..., None]:
    """A rule that failed half-way leaves the session out of step: teardown must not talk."""
    @functools.wraps(f)
    def run(self: "SessionMachine", *args: Any, **kwargs: Any) -> None:
        self.broken = True
        f(self, *args, **kwargs)
        self.broken = False
    return run


class SessionMachine(RuleBasedStateMachine):
    daemon: Daemon

    def __init__(self) -> None:
        super().__init__()
        self.wire: Wire | None = None
        self.model = Model("reject")
        self.steps = 0
        self.broken = False

    # connection --------------------------------------------------------------------------

    @precondition(lambda self: self.wire is None)
    @rule(listener=st.sampled_from(LISTENERS))
    @step
    def connect(self, listener: str) -> None:
        self.wire = Wire(self.daemon.ports[LISTENERS.index(listener)])
        self.model = Model(listener)
        COUNTS["connections"] += 1
        greeting = self.wire.reply(enhanced=False)
        assert greeting.code == 220 and greeting.lines[0].startswith(f"220 {HOSTNAME} ".encode()), greeting

    def _closed(self) -> None:
        assert self.wire is not None
        self.wire.expect_close()
        self.wire = None

    def _exchange(self, lines: list[Line], draw: st.DrawFn) -> Reply | None:
        """Send `lines` in one pipelined write cut at random; check each reply.  The last
        reply, or None when the server closed the connection (too many errors)."""
        assert self.wire is not None
        data = b"".join(line.data for line in lines)
        self.wire.send(data, cuts_for(draw, len(data)), draw(st.booleans()))
        last: Reply | None = None
        for line in lines:
            last = self._answer(line)
            if last is None:
                return None
        self.wire.nothing_pending()
        return last

    def _answer(self, line: Line | None, predicted: tuple[int, ...] | None = None) -> Reply | None:
        """Read the reply to `line` (None: to a DATA or BDAT body), check it against
        `predicted` or the line's own expectation, and follow the session."""
        assert self.wire is not None
        m = self.model
        if m.auth_line:          # the line is an AUTH response, not a command
            expect = predicted
        else:
            expect = predicted if predicted is not None or line is None else line.expect(m)
        hello = line is not None and not m.auth_line and line.verb in (b"EHLO", b"HELO")
        try:
            reply = self.wire.reply(enhanced=False)
        except Closed as e:
            raise AssertionError(f"server closed the connection after {line!r}: {e}") from None
        COUNTS["replies"] += 1
        if not (hello and reply.code == 250):   # RFC 2034 3: only these go without
            check_reply(reply.lines, enhanced=True)
        if expect is not None:
            assert reply.code in expect, f"{line!r}: expected {expect}, got {reply}"
        assert reply.code != 421, f"{line!r}: 421 before too many errors: {reply}"
        m.note(line, reply)
        if m.errors >= MAX_ERRORS:
            closing = self.wire.reply()
            assert closing.code == 421 and closing.lines[0].startswith(b"421 4.7.0 "), closing
            COUNTS["closed by errors"] += 1
            self._closed()
            return None
        return reply

    def ready(self, spare: int) -> bool:
        """Connected, not inside an AUTH exchange, and `spare` errors from the limit."""
        return self.wire is not None and not self.model.auth_line and \
            self.model.errors < MAX_ERRORS - spare

    def _budget(self, n: int) -> int:
        """How many lines may go in one write: only the last may reach max_errors, so that
        nothing is pipelined behind the closing 421."""
        return max(1, min(n, MAX_ERRORS - self.model.errors))

    @precondition(lambda self: self.wire is not None)
    @rule(data=st.data())
    @step
    def commands(self, data: st.DataObject) -> None:
        lines = data.draw(st.lists(command(), min_size=1, max_size=6))
        self._exchange(lines[:self._budget(len(lines))], data.draw)

    @precondition(lambda self: self.ready(4))
    @rule(data=st.data())
    @step
    def message(self, data: st.DataObject) -> None:
        """EHLO? MAIL RCPT+ DATA pipelined; the body, dot-stuffed and cut at random."""
        draw = data.draw
        eol = draw(EOL)
        lines: list[Line] = []
        if draw(st.booleans()):
            lines.append(Line(b"EHLO client.test.invalid" + eol, lambda m: (250,)))
        if draw(st.integers(0, 4)):
            lines.append(_valid_mail("sender@example.com", [], eol))
        for _ in range(draw(st.integers(0, 2))):
            lines.append(_valid_rcpt(f"r{draw(st.integers(0, 9))}@example.org", [], eol))
        lines.append(Line(draw(st.sampled_from([b"DATA", b"data", b"DATA "])) + eol, data_expect))
        reply = self._exchange(lines, draw)
        if reply is None or reply.code != 354:
            return
        token = new_token()
        head, content = draw(message_content(token))
        stuffed = dot_stuff(head + content)
        wire_data = stuffed + (b".\r\n" if stuffed.endswith(b"\r\n") or not stuffed else b"\r\n.\r\n")
        sent = head + content if (head + content).endswith(b"\r\n") or not head + content \
            else head + content + b"\r\n"
        self._body(wire_data, sent, head, draw, token)

    def _body(self, wire_data: bytes, sent: bytes, head: bytes, draw: st.DrawFn, token: str) -> None:
        """Send a message's body (the whole DATA stream, or the BDAT commands and chunks) and
        check the final reply against what the spool must now hold."""
        assert self.wire is not None
        m = self.model
        fix = m.listener == "fix"
        bare = has_bare(sent)
        content = fix_bare(sent) if fix else sent
        if len(content) > MAX_MESSAGE_SIZE:
            predicted: tuple[int, ...] = (552,)
        elif bare and not fix:
            predicted = (550,)
        else:
            predicted = (250,)
        self.wire.send(wire_data, cuts_for(draw, len(wire_data)), draw(st.booleans()))
        reply = self._answer(None, predicted)
        m.reset_transaction()
        if reply is None:
            return
        self.wire.nothing_pending()
        if predicted == (250,):
            found = re.search(rb"queued as (\w+)", reply.text)
            assert found is not None, reply
            self._check_stored(found.group(1).decode(), head, content)
            COUNTS["stored"] += 1
        else:
            COUNTS["refused"] += 1
            if head:
                self._check_absent(token)

    def _check_stored(self, qid: str, head: bytes, content: bytes) -> None:
        _, body = self.daemon.stored(qid)
        _, rest = split_received(body)
        if head:
            assert rest == content, f"{qid}: stored {rest[:200]!r}... sent {content[:200]!r}..."
            return
        # no header section of ours: the receiver added Message-ID and Date
        added = re.match(rb"Message-ID: <[^>]+>\r\nDate: [^\r\n]+\r\n", rest)
        assert added is not None, rest[:300]
        tail = rest[added.end():]
        if content[:2] == b"\r\n" or not content:
            assert tail == content, f"{qid}: stored {tail[:200]!r}... sent {content[:200]!r}..."
        else:   # the receiver ends the (empty) header section before the first line
            assert tail == b"\r\n" + content, f"{qid}: stored {tail[:200]!r}... sent {content[:200]!r}..."

    def _check_absent(self, token: str) -> None:
        view = self.daemon.view()
        try:
            assert view.find_by_header_id(f"<{token}@fuzz.test.invalid>") is None, \
                f"a refused message was stored: {token}"
        finally:
            view.close()

    @precondition(lambda self: self.ready(4))
    @rule(data=st.data())
    @step
    def bdat_message(self, data: st.DataObject) -> None:
        """MAIL RCPT, then BDAT chunks (RFC 3030: no dot-stuffing), the last with LAST."""
        draw = data.draw
        lines = [Line(b"EHLO client.test.invalid\r\n", lambda m: (250,)),
                 _valid_mail("sender@example.com", [], b"\r\n"),
                 _valid_rcpt("bdat@example.org", [], b"\r\n")]
        if self._exchange(lines, draw) is None or not self.model.rcpts:
            return
        token = new_token()
        head, content = draw(message_content(token))
        if not head and content and not content.endswith(b"\r\n"):
            # a message that ends inside the header section gets its last line ended
            # (receiver.Intake.finish): keep the oracle simple
            content += b"\r\n"
        sent = head + content
        cuts = sorted(set(draw(st.lists(st.integers(0, len(sent)), max_size=4))))
        chunks = [sent[a:b] for a, b in zip([0] + cuts, cuts + [len(sent)])]
        fix = self.model.listener == "fix"
        self.model.bdat = True
        for chunk in chunks[:-1]:       # each answered 250 "<octets so far> octets received"
            wire_data = b"BDAT %d\r\n" % len(chunk) + chunk
            assert self.wire is not None
            self.wire.send(wire_data, cuts_for(draw, len(wire_data)), draw(st.booleans()))
            reply = self._answer(None, (250, 552))
            if reply is None:
                return
            self.wire.nothing_pending()
            if reply.code == 552:       # too big already: the transaction is over
                assert len(fix_bare(sent) if fix else sent) > MAX_MESSAGE_SIZE, reply
                self.model.reset_transaction()
                self._check_absent(token) if head else None
                return
        last = chunks[-1]
        self._body(b"BDAT %d LAST\r\n" % len(last) + last, sent, head, draw, token)

    @precondition(lambda self: self.ready(2))
    @rule(pipelined=st.sampled_from([b"", b"NOOP\r\n", b"MAIL FROM:<injected@example.com>\r\n"]))
    @step
    def starttls(self, pipelined: bytes) -> None:
        """STARTTLS: offered only on the STARTTLS listener in the clear; what is pipelined
        behind it is thrown away (RFC 3207 4.2), and everything known is forgotten."""
        assert self.wire is not None
        m = self.model
        self.wire.send(b"STARTTLS\r\n" + pipelined, [], False)
        offered = m.listener == "starttls" and not m.tls
        predicted = (220,) if offered else (503,) if m.tls else (502,)
        reply = self._answer(Line(b"STARTTLS\r\n"), predicted)
        if reply is None:
            return
        if reply.code != 220:
            if pipelined:
                self._answer(Line(pipelined))
            if self.wire is not None:
                self.wire.nothing_pending()
            return
        self.wire.start_tls()
        COUNTS["starttls"] += 1
        self.model = Model(m.listener, tls=True, errors=m.errors)

    @precondition(lambda self: self.ready(0))
    @rule()
    @step
    def quit(self) -> None:
        assert self.wire is not None
        self.wire.send(b"QUIT\r\n", [], False)
        reply = self.wire.reply()
        assert reply.lines == [b"221 2.0.0 Bye"], reply
        self._closed()

    @precondition(lambda self: self.wire is not None)
    @rule(data=st.data())
    @step
    def hang_up(self, data: st.DataObject) -> None:
        """The client goes away, perhaps in the middle of a message: nothing is stored."""
        assert self.wire is not None
        if self.ready(5) and data.draw(st.booleans()):
            token = new_token()
            lines = [Line(b"RSET\r\n", lambda m: (250,)),
                     Line(b"EHLO hangup.test.invalid\r\n", lambda m: (250,)),
                     _valid_mail("sender@example.com", [], b"\r\n"),
                     _valid_rcpt("r@example.org", [], b"\r\n"),
                     Line(b"DATA\r\n", data_expect)]
            reply = self._exchange(lines, data.draw)
            if reply is None:
                return
            assert self.wire is not None and reply.code == 354, reply
            self.wire.send(f"Message-ID: <{token}@fuzz.test.invalid>\r\n\r\nhalf a body\r\n.".encode(),
                           [], False)
            self.wire.close()
            self.wire = None
            time.sleep(0.05)
            self._check_absent(token)
            return
        self.wire.close()
        self.wire = None

    @invariant()
    def no_traceback(self) -> None:
        self.steps += 1
        if self.steps % 10 == 0:
            self._log_is_clean()

    def _log_is_clean(self) -> None:
        """No traceback in what the daemon logged since the previous look."""
        global _log_seen
        with open(self.daemon.log_path, "rb") as f:
            f.seek(_log_seen)
            raw = f.read()
        _log_seen += len(raw)
        new = raw.decode("utf-8", "replace")
        assert "Traceback" not in new and "Unhandled" not in new, new[-6000:]

    def teardown(self) -> None:
        """The replies are still paired with the commands (an echo), QUIT is answered."""
        try:
            if self.wire is not None and self.broken:
                return
            if self.wire is not None and self.model.auth_line:
                self.wire.send(b"*\r\n", [], False)
                self._answer(Line(b"*\r\n"))
            if self.wire is not None:
                self.wire.send(b"EHLO sync.test.invalid\r\n", [], False)
                hello = self._answer(Line(b"EHLO sync.test.invalid\r\n"), (250,))
                assert hello is not None and b" Hello sync.test.invalid " in hello.lines[0], hello
                self.wire.send(b"QUIT\r\n", [], False)
                assert self.wire.reply().lines == [b"221 2.0.0 Bye"]
                self._closed()
        finally:
            if self.wire is not None:
                self.wire.close()
                self.wire = None
        self._log_is_clean()


_log_seen = 0


def test_random_sessions(daemon: Daemon) -> None:
    """Random command sequences, pipelined and cut at random, on three listeners: every
    reply well formed and in order, mail accepted is stored exactly, no traceback."""
    SessionMachine.daemon = daemon
    config = settings(max_examples=size(20, 400), stateful_step_count=size(15, 40), deadline=None,
                      suppress_health_check=list(HealthCheck), print_blob=True)
    state_test = SessionMachine.TestCase
    state_test.settings = config
    started = time.monotonic()
    state_test().runTest()
    counts = ", ".join(f"{n} {what}" for what, n in COUNTS.items())
    print(f"\ntest_random_sessions: {config.max_examples} examples of up to "
          f"{config.stateful_step_count} steps in {time.monotonic() - started:.0f} s: {counts}")
    assert COUNTS["stored"] and COUNTS["replies"] > COUNTS["connections"]
