"""The ESMTP server: one protocol instance per inbound connection.

Implements RFC 5321 (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT, VRFY, HELP) with
PIPELINING (RFC 2920), SIZE (1870), 8BITMIME (6152), SMTPUTF8 (6531), ENHANCEDSTATUSCODES
(2034/3463), DSN (3461), CHUNKING/BDAT (3030), STARTTLS (3207), AUTH PLAIN/LOGIN (4954) and,
under TLS only, REQUIRETLS (8689).

Two kinds of time limit close a session with 421 4.4.2 (RFC 5321 4.5.3.2): the idle
timeouts (`command_timeout`, `data_timeout`: silence between reads, TimeoutMixin) and the
total ones, which a client dripping a byte at a time cannot stretch: a command line must be
complete within `command_time_limit` of its first byte (so must a TLS handshake, from
STARTTLS or the connection of an implicit TLS listener), and one message's data within
`data_time_limit` of DATA's 354 or of the transaction's first BDAT.  Time spent waiting on
our own replies (the commit) never counts.  A session closed inside a message stores
nothing of it; the mail log tells why (`note_timeout`).

Each command handler returns a `Reply` (or a Deferred of one); `_send()` is the one place
that writes replies.  While a reply waits on a Deferred (the spool commit after DATA, an
AUTH check), the protocol stops parsing and pauses the transport, so pipelined commands
are answered strictly in order.  It does the same while the client does not read its
replies (the transport's write buffer is full: `_OutputGate`), so a client that pipelines
commands without reading cannot make the server buffer replies without bound; a session
being closed that has not gone within `command_time_limit` (its last reply unread, a TLS
handshake never finished) is aborted.  It knows nothing of the spool: mail goes to an
`IReceiver` (inbound/receiver.py), which answers 250 only after the durable commit.

Not here: relay decisions (inbound/policy.py), path grammar (inbound/grammar.py), the DATA
byte stream (inbound/data.py).
"""
# test: tests/test_server.py, tests/test_smuggling.py, tests/test_server_auth.py

from __future__ import annotations

import base64
import binascii
from typing import Any, Callable, Protocol as TypingProtocol

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from txmta import reply as R
from txmta.message import Address, Envelope, Recipient
from txmta.inbound import policy as P
from txmta.inbound.data import BdatStream, DataStream
from txmta.inbound.grammar import GrammarError, parse_mail, parse_rcpt
from txmta.inbound.session import Session
from txmta.reply import Reply
from txmta.suppression import rejection

log = Logger()

# RFC 5321 4.5.3.1.4: 512 octets with CRLF.  MAIL and RCPT grow by their extensions'
# allowances (RFC 1870 +26, RFC 3461 +100/+500, RFC 4954 AUTH= +500); AUTH lines may be
# 12288 octets (RFC 4954 4).
LINE_LIMITS = {b"MAIL": 2048, b"RCPT": 2048, b"AUTH": 12288}
DEFAULT_LINE_LIMIT = 512
MAX_LINE = 12288
# commands of other protocols: answered once and disconnected (Postfix's
# smtpd_forbidden_commands); an HTTP request would otherwise collect 500s until max_errors
HTTP_VERBS = frozenset({b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS"})
# the commands a client can repeat forever without ever sending mail (junk_command_limit)
JUNK_VERBS = frozenset({b"NOOP", b"VRFY", b"RSET", b"HELP"})


MAX_REPLY_TEXT = 512 - len("250-\r\n")    # RFC 5321 4.5.3.1.5: a reply line is 512 octets


def _fit(before: str, echo: str, after: str) -> str:
    """`before + echo + after`, the client's `echo` shortened (with "...") so that the
    reply line stays within 512 octets."""
    return before + R.cut(echo, MAX_REPLY_TEXT - len((before + after).encode("utf-8"))) + after


class IIntake(TypingProtocol):
    def write(self, data: bytes) -> None: ...
    def finish(self) -> Deferred[Reply]: ...
    def abort(self) -> None: ...


class IReceiver(TypingProtocol):
    def begin(self, session: Session, envelope: Envelope) -> IIntake: ...


class ListenerSettings(TypingProtocol):
    address: str
    tls: str
    auth: str
    bare_newlines: str


@implementer(IPushProducer)
class _OutputGate:
    """Registered with the transport as a streaming producer of the replies: the transport
    pauses it while its write buffer is full (the client does not read), and the server
    then reads and parses no more commands until it is resumed."""

    def __init__(self, server: "SMTPServer") -> None:
        self.server = server

    def pauseProducing(self) -> None:
        # TLS holds our writes during its handshake (and pauses us): reading must go on
        # then, or the handshake never ends
        if not self.server._handshaking:
            self.server._hold_input("output")

    def resumeProducing(self) -> None:
        self.server._release_input("output")

    def stopProducing(self) -> None:
        pass


@implementer(IHandshakeListener)
class SMTPServer(Protocol, TimeoutMixin):
    def __init__(self, factory: "SMTPFactory") -> None:
        self.factory = factory
        self.policy = factory.policy
        self.listener = factory.listener
        self.receiver = factory.receiver
        self.callLater = factory.clock.callLater  # TimeoutMixin uses this
        self.session: Session | None = None
        self.envelope: Envelope | None = None
        self._buffer = b""
        self._mode = "command"     # command | data | bdat | auth | closed
        self._discarding = False   # inside an over-long command line
        self._holds: set[str] = set()   # why input is paused: "reply" (a Deferred), "output"
        self._gate: _OutputGate | None = None
        self._linger: IDelayedCall | None = None   # aborts a closed session that stays
        self._errors = 0
        self._junk = 0             # NOOP, VRFY, RSET, HELP so far (junk_command_limit)
        self._data: DataStream | None = None
        self._bdat: BdatStream | None = None
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_error: Reply | None = None
        self._bdat_used = False
        self._intake: IIntake | None = None
        self._data_error: Reply | None = None
        self._auth_step: Callable[[bytes], Reply | Deferred[Reply] | None] | None = None
        self._counted = False
        self._loopback = False
        self._relay_client = False
        self._fix_bare = False
        self._handshaking = False  # a TLS handshake is under way (STARTTLS or implicit)
        self._line_clock: IDelayedCall | None = None   # command_time_limit of the line being read
        self._data_clock: IDelayedCall | None = None   # data_time_limit of the message's data
        self._last_verb = "CONNECT"  # the last command, for the mail log's timeout line

    # -- connection -----------------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        host = getattr(peer, "host", "") or ""
        if self.factory.local_user is not None:
            host = ""       # a local user on standard input (txmta-sendmail -bs): no address
        ip = P.parse_ip(host)
        if ip is not None:  # one form per client: ::ffff:192.0.2.1 counts as 192.0.2.1
            host = str(ip)
        port = getattr(peer, "port", 0) or 0
        self.session = Session(host, port, self.listener.address)
        # facts about the client address, worked out once per connection
        self._loopback = P.is_loopback(host)
        self._relay_client = P.may_relay(host, False, self.policy)
        self.session.relay_client = self._relay_client
        self._fix_bare = not P.reject_bare_newlines(self.listener.bare_newlines, host)
        if self.factory.local_user is not None:
            # `txmta-sendmail -bs`: a local user on standard input, who may relay (as with
            # Postfix's sendmail -bs) and whose bare newlines are made CRLF
            self.session.local_user = self.factory.local_user
            self._relay_client = True
            self._fix_bare = True
        # on an implicit TLS listener, what we write waits in TLS for the handshake, which
        # must end within command_time_limit (handshakeCompleted stops the clock)
        self._handshaking = self.listener.tls == "implicit"
        refusal = self.factory.admit(self)
        if refusal is not None:
            self._mode = "closed"
            self.transport.write(refusal.to_bytes())  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]
            if self._handshaking:       # the 421 goes out after a handshake, if one comes
                self._line_clock = self.factory.clock.callLater(
                    self.policy.command_time_limit,
                    self.transport.abortConnection)  # type: ignore[union-attr]
            return
        self._counted = True
        self._gate = _OutputGate(self)
        self.transport.registerProducer(self._gate, True)  # type: ignore[union-attr]
        self.setTimeout(self.policy.command_timeout)
        if self._handshaking:
            self._note_tls()
            self._start_line_clock()
        self._send(Reply(220, "", f"{self.policy.hostname} ESMTP txmta"))

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        self.setTimeout(None)
        self._stop_clocks()
        linger, self._linger = self._linger, None
        if linger is not None and linger.active():
            linger.cancel()
        if self._counted:
            self._counted = False
            self.factory.release(self)
        self._mode = "closed"
        self._abort_intake()

    def timeoutConnection(self) -> None:
        """TimeoutMixin: the client was silent for command_timeout or data_timeout."""
        if self._mode == "closed":
            return
        in_data = self._mode in ("data", "bdat")
        self._timed_out("data_timeout" if in_data else "command_timeout", self.timeOut or 0.0)
        self._send(R.TIMEOUT)
        self._close()

    def _start_line_clock(self) -> None:
        if self._line_clock is None:
            self._line_clock = self.factory.clock.callLater(self.policy.command_time_limit,
                                                            self._line_time_up)

    def _stop_line_clock(self) -> None:
        clock, self._line_clock = self._line_clock, None
        if clock is not None and clock.active():
            clock.cancel()

    def _start_data_clock(self) -> None:
        if self._data_clock is None:
            self._data_clock = self.factory.clock.callLater(self.policy.data_time_limit,
                                                            self._data_time_up)

    def _stop_data_clock(self) -> None:
        clock, self._data_clock = self._data_clock, None
        if clock is not None and clock.active():
            clock.cancel()

    def _stop_clocks(self) -> None:
        self._stop_line_clock()
        self._stop_data_clock()

    def _line_time_up(self) -> None:
        self._line_clock = None
        if self._mode == "closed":
            return
        self._timed_out("command_time_limit", self.policy.command_time_limit)
        self._send(R.COMMAND_TIME_LIMIT)

    def _data_time_up(self) -> None:
        self._data_clock = None
        if self._mode == "closed":
            return
        self._timed_out("data_time_limit", self.policy.data_time_limit)
        self._send(R.DATA_TIME_LIMIT)

    def _timed_out(self, key: str, seconds: float) -> None:
        """Tell the mail log which limit ended the session, after which command, and how
        much of a message had come (it is not stored)."""
        stream: DataStream | BdatStream | None = self._data or self._bdat
        octets = stream.size if stream is not None else None
        ip = self.session.client_ip if self.session else ""
        after = "TLS handshake" if self._handshaking else self._last_verb
        if self.factory.note_timeout is not None:
            self.factory.note_timeout(ip, after, key, seconds, octets)
        else:
            log.info("timeout after {after}: client=[{ip}] {key}={seconds:g}s", after=after,
                     ip=ip, key=key, seconds=seconds)

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: called by Twisted's TLS layer."""
        self._handshaking = False
        self._stop_line_clock()
        self._note_tls()

    def _note_tls(self) -> None:
        assert self.session is not None
        handle: Any = None
        try:
            handle = self.transport.getHandle()  # type: ignore[union-attr]
        except Exception:
            handle = None
        if handle is not None and hasattr(handle, "get_protocol_version_name"):
            try:
                self.session.tls_version = handle.get_protocol_version_name()
                self.session.tls_cipher = handle.get_cipher_name()
                self.session.tls_bits = handle.get_cipher_bits()
            except Exception:  # handshake not finished yet
                pass

    def _close(self) -> None:
        if self._mode == "closed":
            return
        self._mode = "closed"
        self.setTimeout(None)
        self._stop_clocks()
        self._abort_intake()
        if self._gate is not None:       # (TLS waits for a producer to go before closing)
            self._gate = None
            self.transport.unregisterProducer()  # type: ignore[union-attr]
        if self._handshaking:
            # TLS in its handshake holds what we wrote (the greeting, a 421) and with it the
            # connection until the client finishes the handshake, which it may never do
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.transport.loseConnection()  # type: ignore[union-attr]
        # the last replies go out first; a client that does not read them is not waited for
        self._linger = self.factory.clock.callLater(self.policy.command_time_limit, self._abort)

    def _abort(self) -> None:
        """Drop the connection now, unsent output and all (standard input and output, for
        txmta-sendmail -bs, can only be closed)."""
        abort = getattr(self.transport, "abortConnection", None)
        (abort or self.transport.loseConnection)()  # type: ignore[union-attr]

    def _hold_input(self, why: str) -> None:
        """Stop reading (and parsing) the client's commands until `_release_input(why)`."""
        if not self._holds and self._mode != "closed":
            self.transport.pauseProducing()  # type: ignore[union-attr]
        self._holds.add(why)

    def _release_input(self, why: str) -> None:
        if why not in self._holds:
            return
        self._holds.discard(why)
        if not self._holds and self._mode != "closed":
            self.transport.resumeProducing()  # type: ignore[union-attr]
            if why == "output":     # (a reply resumes in _answer, which parses on)
                self._process()

    def _send(self, reply: Reply) -> None:
        if reply.code >= 400 and reply.code != 421:
            self._errors += 1
        self.transport.write(reply.to_bytes())  # type: ignore[union-attr]
        if reply.code == 421:
            self._close()
        elif self._errors >= self.policy.max_errors:
            self.transport.write(Reply(421, "4.7.0", "Too many errors, closing connection").to_bytes())  # type: ignore[union-attr]
            self._close()

    # -- input ----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._mode == "closed":
            return
        self.resetTimeout()
        self._buffer = self._buffer + data if self._buffer else data
        self._process()

    def _process(self) -> None:
        while self._buffer and not self._holds and self._mode != "closed":
            if self._mode == "data":
                self._process_data()
            elif self._mode == "bdat":
                self._process_bdat()
            else:
                if not self._process_line():
                    return

    def _process_line(self) -> bool:
        """Handle one command line; False when no complete line is buffered."""
        buf = self._buffer
        if buf[:2] == b"\x16\x03" and not self._discarding and self._mode == "command":
            # a TLS record (a ClientHello) where a command belongs: a TLS client on a
            # plaintext port; it will not read a reply, but our bytes end its wait at once
            log.info("TLS handshake in plaintext: client=[{ip}]",
                     ip=self.session.client_ip if self.session else "")
            self._send(R.TLS_IN_PLAINTEXT)
            return False
        idx = buf.find(b"\n")
        if idx < 0:
            self._start_line_clock()    # a line has begun: it must end in command_time_limit
            if len(buf) > MAX_LINE:
                self._discarding = True
                self._buffer = b""
            return False
        self._stop_line_clock()
        line, self._buffer = buf[:idx], buf[idx + 1:]
        if self._discarding:
            self._discarding = False
            if self._mode == "auth":  # the refused line ends the AUTH exchange
                self._mode = "command"
                self._auth_step = None
            self._send(R.LINE_TOO_LONG)
            return True
        if line.endswith(b"\r"):
            line = line[:-1]
        if self._mode == "auth":
            self._auth_line(line)
            return True
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        if len(line) + 2 > LINE_LIMITS.get(verb, DEFAULT_LINE_LIMIT):
            self._send(R.LINE_TOO_LONG)
            return True
        if verb in HTTP_VERBS:
            # a web client (or a proxy probe) on the SMTP port: no point in answering on
            log.info("non-SMTP command from client=[{ip}]: {verb}",
                     ip=self.session.client_ip if self.session else "",
                     verb=verb.decode("ascii"))
            self.transport.write(R.NOT_SMTP.to_bytes())  # type: ignore[union-attr]
            self._close()
            return False
        handler = getattr(self, "do_" + verb.decode("ascii", "replace"), None) if verb.isalpha() else None
        if handler is None:
            self._last_verb = "UNKNOWN"
            self._send(R.UNKNOWN_COMMAND)
            return True
        self._last_verb = verb.decode("ascii")
        if verb in JUNK_VERBS and self.policy.junk_command_limit:
            self._junk += 1
            if self._junk > self.policy.junk_command_limit:
                self._errors += 1     # answered as usual; max_errors ends the session
        try:
            text = arg.decode("utf-8")
        except UnicodeDecodeError:
            self._send(Reply(500, "5.5.2", "Command contains invalid UTF-8"))
            return True
        try:
            result = handler(text)
        except Exception:
            log.failure("error handling {verb}", verb=verb)
            result = Reply(451, "4.3.0", "Internal error, try again later")
        self._answer(result)
        return True

    def _answer(self, result: Reply | Deferred[Reply] | None) -> None:
        if result is None:
            return
        if isinstance(result, Reply):
            self._send(result)
            return
        self._hold_input("reply")
        # our own wait (the commit) never counts against the client's timeout
        timeout = self.timeOut
        self.setTimeout(None)
        synchronous = [True]

        def done(reply: Reply) -> None:
            if self._mode != "closed":
                self.setTimeout(timeout)
            if self._mode == "closed":
                return
            self._send(reply)
            if self._mode != "closed":
                self._holds.discard("reply")
                if not self._holds:
                    self.transport.resumeProducing()  # type: ignore[union-attr]
                    if not synchronous[0]:  # else the caller's loop goes on parsing
                        self._process()

        def failed(f: Failure) -> None:
            log.failure("reply failed", f)
            done(Reply(451, "4.3.0", "Internal error, try again later"))

        result.addCallbacks(done, failed)
        synchronous[0] = False

    # -- commands -------------------------------------------------------------------------

    def _ehlo_lines(self) -> list[str]:
        assert self.session is not None
        lines = ["PIPELINING", f"SIZE {self.policy.max_message_size}", "8BITMIME", "SMTPUTF8",
                 "ENHANCEDSTATUSCODES", "DSN", "CHUNKING"]
        if self.session.tls:  # RFC 8689: REQUIRETLS is for TLS-protected sessions only
            lines.append("REQUIRETLS")
        if self._starttls_offered():
            lines.append("STARTTLS")
        if self._auth_offered():
            lines.append("AUTH PLAIN LOGIN")
        lines.append("HELP")
        return lines

    def _starttls_offered(self) -> bool:
        assert self.session is not None
        return (self.listener.tls == "starttls" and self.factory.tls_options is not None
                and not self.session.tls)

    def _auth_offered(self) -> bool:
        assert self.session is not None
        return (self.factory.checker is not None and self.session.auth_user is None
                and self.listener.auth != "none" and (self.session.tls or self._loopback))

    def do_EHLO(self, arg: str) -> Reply:
        return self._hello(arg, esmtp=True)

    def do_HELO(self, arg: str) -> Reply:
        return self._hello(arg, esmtp=False)

    def _hello(self, arg: str, esmtp: bool) -> Reply:
        assert self.session is not None
        name = arg.strip()
        if not name or not name.isprintable() or any(c.isspace() for c in name):
            return Reply(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
        self.session.helo = name
        self.session.esmtp = esmtp
        self.envelope = None       # RFC 5321 4.1.4: EHLO/HELO reset like RSET,
        self._bdat_used = False    # including a BDAT transaction between chunks
        self._bdat = None
        self._stop_data_clock()
        self._abort_intake()
        greeting = _fit(f"{self.policy.hostname} Hello ", name, f" [{self.session.client_ip}]")
        if not esmtp:
            return Reply(250, "", greeting)
        return Reply(250, "", "\n".join([greeting] + self._ehlo_lines()))

    def do_MAIL(self, arg: str) -> Reply:
        assert self.session is not None
        if self.session.helo is None:
            return Reply(503, "5.5.1", "Send EHLO or HELO first")
        if self.envelope is not None:
            return Reply(503, "5.5.1", "Nested MAIL command")
        if self.listener.auth == "required" and self.session.auth_user is None:
            return P.AUTH_REQUIRED
        try:
            cmd = parse_mail(arg)
        except GrammarError as e:
            return e.reply
        if cmd.size is not None and cmd.size > self.policy.max_message_size:
            return Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
        if cmd.requiretls and not self.session.tls:
            # not advertised in the clear: an unknown parameter (RFC 5321 4.1.1.11); permanent,
            # since the client must not send the message without TLS (RFC 8689)
            hint = "; use STARTTLS first" if self._starttls_offered() else ""
            return Reply(555, "5.5.4", f"REQUIRETLS parameter not supported without TLS{hint}")
        self.envelope = Envelope(cmd.sender, (), cmd.size, cmd.body, cmd.smtputf8, cmd.ret,
                                 cmd.envid, cmd.auth if self.session.auth_user else None,
                                 requiretls=cmd.requiretls)
        self._bdat_used = False
        return Reply(250, "2.1.0", "Sender OK")

    def do_RCPT(self, arg: str) -> Reply:
        assert self.session is not None
        if self.envelope is None:
            return Reply(503, "5.5.1", "Need MAIL before RCPT")
        try:
            cmd = parse_rcpt(arg, self.envelope.smtputf8)
        except GrammarError as e:
            return e.reply
        if not (self._relay_client or self.session.auth_user is not None):
            return P.RELAY_DENIED
        if len(self.envelope.recipients) >= self.policy.max_recipients:
            return Reply(452, "4.5.3", "Too many recipients")
        address = cmd.address
        if not address.domain:  # <postmaster> (RFC 5321 4.5.1)
            address = Address(address.local, self.policy.hostname.lower())
        suppressed = self.factory.suppression
        if suppressed is not None and self.factory.reject_suppressed:
            entry = suppressed.check(str(address), self.factory.clock.seconds())
            if entry is not None:
                return rejection(str(address), entry)
        self.envelope = self.envelope.with_recipient(Recipient(address, cmd.notify, cmd.orcpt))
        return Reply(250, "2.1.5", "Recipient OK")

    def do_DATA(self, arg: str) -> Reply:
        assert self.session is not None
        if arg.strip():
            return Reply(501, "5.5.4", "DATA takes no arguments")
        if self.envelope is None:
            return Reply(503, "5.5.1", "Need MAIL command")
        if self._bdat_used:
            return Reply(503, "5.5.1", "DATA cannot follow BDAT in one transaction")
        if not self.envelope.recipients:
            return Reply(554, "5.5.1", "No valid recipients")
        fix = self._fix_bare
        self._data = DataStream(fix=fix)
        self._data_error = None
        self._intake = self.receiver.begin(self.session, self.envelope)
        self._mode = "data"
        self.setTimeout(self.policy.data_timeout)
        self._start_data_clock()
        return Reply(354, "", "End data with <CR><LF>.<CR><LF>")

    def _process_data(self) -> None:
        assert self._data is not None
        content, rest = self._data.feed(self._buffer)
        self._buffer = rest
        if content and self._data_error is None:
            if self._data.size > self.policy.max_message_size:
                self._data_error = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
                self._abort_intake()
            elif self._intake is not None:
                self._intake.write(content)
        if not self._data.done:
            return
        self._mode = "command"
        self.setTimeout(self.policy.command_timeout)
        stream, self._data = self._data, None
        if stream.bare and not stream.fix and self._data_error is None:
            self._data_error = Reply(550, "5.5.2", "Message contains a bare CR or LF; lines must end with CRLF")
            self._abort_intake()
        self._end_message(self._data_error)

    def _end_message(self, error: Reply | None) -> None:
        self._stop_data_clock()     # the data is in; our own commit never counts
        intake, self._intake = self._intake, None
        self.envelope = None
        if error is not None or intake is None:
            if intake is not None:
                intake.abort()
            self._send(error or Reply(451, "4.3.0", "Message not stored"))
            return
        metrics = self.factory.metrics
        if metrics is None:
            self._answer(intake.finish())
            return
        started = self.factory.clock.seconds()
        result = intake.finish()

        def timed(reply: Reply) -> Reply:
            if reply.code == 250:
                metrics.observe_eod(self.factory.clock.seconds() - started,
                                    self.factory.listener.address)
            return reply

        self._answer(result.addCallback(timed) if isinstance(result, Deferred) else timed(result))

    def do_BDAT(self, arg: str) -> Reply | None:
        assert self.session is not None
        parts = arg.split()
        if not parts or len(parts) > 2 or not (parts[0].isascii() and parts[0].isdigit()) or (
                len(parts) == 2 and parts[1].upper() != "LAST"):
            return Reply(501, "5.5.4", "Syntax: BDAT size [LAST]")
        size = int(parts[0])
        self._bdat_left = size
        self._bdat_last = len(parts) == 2
        error: Reply | None = None
        if self.envelope is None:
            error = Reply(503, "5.5.1", "Need MAIL command")
        elif not self.envelope.recipients:
            error = Reply(554, "5.5.1", "No valid recipients")
        if error is not None:
            self._bdat_error = error
            self._abort_intake()
            self.envelope = None
        elif self._intake is None:
            fix = self._fix_bare
            self._bdat = BdatStream(fix=fix)
            self._bdat_error = None
            self._bdat_used = True
            assert self.envelope is not None
            self._intake = self.receiver.begin(self.session, self.envelope)
        self._mode = "bdat"
        self.setTimeout(self.policy.data_timeout)
        self._start_data_clock()    # from the transaction's first BDAT to the end of LAST
        if size == 0:
            self._bdat_chunk_done()
        return None

    def _process_bdat(self) -> None:
        take = min(self._bdat_left, len(self._buffer))
        chunk, self._buffer = self._buffer[:take], self._buffer[take:]
        self._bdat_left -= take
        if chunk and self._bdat_error is None and self._bdat is not None:
            body = self._bdat.feed(chunk)
            if self._bdat.size > self.policy.max_message_size:
                self._bdat_error = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
                self._abort_intake()
            elif self._intake is not None:
                self._intake.write(body)
        if self._bdat_left == 0:
            self._bdat_chunk_done()

    def _bdat_chunk_done(self) -> None:
        self._mode = "command"
        self.setTimeout(self.policy.command_timeout)
        if self._bdat_error is not None:
            self._stop_data_clock()
            error, self._bdat_error = self._bdat_error, None
            self._bdat = None
            self._bdat_used = False
            self._abort_intake()
            self.envelope = None
            self._send(error)
            return
        if not self._bdat_last:
            assert self._bdat is not None
            self._send(Reply(250, "2.0.0", f"{self._bdat.size} octets received"))
            return
        stream, self._bdat = self._bdat, None
        assert stream is not None
        tail = stream.finish()
        error = None
        if stream.size > self.policy.max_message_size:
            error = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
        elif stream.bare and not stream.fix:
            error = Reply(550, "5.5.2", "Message contains a bare CR or LF; lines must end with CRLF")
        elif tail and self._intake is not None:
            self._intake.write(tail)
        self._bdat_used = False
        self._end_message(error)

    def _abort_intake(self) -> None:
        intake, self._intake = self._intake, None
        if intake is not None:
            intake.abort()

    def do_RSET(self, arg: str) -> Reply:
        self.envelope = None
        self._bdat_used = False
        self._bdat = None
        self._stop_data_clock()
        self._abort_intake()
        return Reply(250, "2.0.0", "Reset OK")

    def do_NOOP(self, arg: str) -> Reply:
        return Reply(250, "2.0.0", "OK")

    def do_QUIT(self, arg: str) -> None:
        self.transport.write(R.CLOSING.to_bytes())  # type: ignore[union-attr]
        self._close()
        return None

    def do_VRFY(self, arg: str) -> Reply:
        if not arg.strip():
            return Reply(501, "5.5.4", "Syntax: VRFY address")
        return Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def do_EXPN(self, arg: str) -> Reply:
        return Reply(502, "5.5.1", "EXPN not supported")

    def do_HELP(self, arg: str) -> Reply:
        return Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP"
                     + (" STARTTLS" if self._starttls_offered() else "")
                     + (" AUTH" if self._auth_offered() else ""))

    def do_STARTTLS(self, arg: str) -> Reply | None:
        assert self.session is not None
        if arg.strip():
            return Reply(501, "5.5.4", "STARTTLS takes no arguments")
        if self.session.tls:
            return Reply(503, "5.5.1", "TLS already active")
        if not self._starttls_offered():
            return Reply(502, "5.5.1", "STARTTLS not available")
        self.transport.write(Reply(220, "2.0.0", "Ready to start TLS").to_bytes())  # type: ignore[union-attr]
        # RFC 3207 4.2: discard anything pipelined after STARTTLS and every fact learned so far
        self._buffer = b""
        self._stop_data_clock()
        self._abort_intake()
        self.envelope = None
        self._bdat = None
        self._bdat_used = False
        self.session = Session(self.session.client_ip, self.session.client_port, self.session.listener,
                               relay_client=self._relay_client)
        self.transport.startTLS(self.factory.tls_options)  # type: ignore[union-attr]
        self._handshaking = True        # until handshakeCompleted(), within command_time_limit
        self._start_line_clock()
        return None

    # -- AUTH (RFC 4954) ------------------------------------------------------------------

    def do_AUTH(self, arg: str) -> Reply | Deferred[Reply] | None:
        assert self.session is not None
        if self.session.helo is None or not self.session.esmtp:
            return Reply(503, "5.5.1", "Send EHLO first")
        if self.session.auth_user is not None:
            return Reply(503, "5.5.1", "Already authenticated")
        if self.envelope is not None:
            return Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
        if not self._auth_offered():
            if self.listener.auth != "none" and self.factory.checker is not None:
                return Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
            return Reply(502, "5.5.1", "AUTH not available")
        parts = arg.split()
        if not parts or len(parts) > 2:
            return Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        mech = parts[0].upper()
        initial = parts[1] if len(parts) == 2 else None
        if mech == "PLAIN":
            if initial is None:
                self._auth_step = self._auth_plain
                self._mode = "auth"
                return Reply(334, "", "")
            return self._auth_plain(initial.encode("ascii", "replace"))
        if mech == "LOGIN":
            if initial is not None:
                return self._auth_login_user(initial.encode("ascii", "replace"))
            self._auth_step = self._auth_login_user
            self._mode = "auth"
            return Reply(334, "", "VXNlcm5hbWU6")  # "Username:"
        return Reply(504, "5.5.4", "Unrecognized authentication mechanism")

    def _auth_line(self, line: bytes) -> None:
        self._mode = "command"
        step, self._auth_step = self._auth_step, None
        if line.strip() == b"*":
            self._send(Reply(501, "5.7.0", "Authentication cancelled"))
            return
        if len(line) + 2 > LINE_LIMITS[b"AUTH"]:
            self._send(Reply(500, "5.5.6", "Authentication exchange line is too long"))
            return
        assert step is not None
        self._answer(step(line.strip()))

    @staticmethod
    def _b64(data: bytes) -> bytes | None:
        if data == b"=":
            return b""
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return None

    def _auth_plain(self, data: bytes) -> Reply | Deferred[Reply]:
        raw = self._b64(data)
        if raw is None:
            return Reply(501, "5.5.2", "Invalid base64 data")
        parts = raw.split(b"\0")
        if len(parts) != 3:
            return Reply(501, "5.5.2", "Invalid PLAIN authentication data")
        authzid, user, password = parts
        if authzid and authzid != user:
            self._auth_failed(user, "PLAIN")
            return Reply(535, "5.7.8", "Authentication credentials invalid")
        return self._check(user, password, "PLAIN")

    def _auth_login_user(self, data: bytes) -> Reply:
        raw = self._b64(data)
        if raw is None:
            return Reply(501, "5.5.2", "Invalid base64 data")

        def password_step(pdata: bytes) -> Reply | Deferred[Reply]:
            pw = self._b64(pdata)
            if pw is None:
                return Reply(501, "5.5.2", "Invalid base64 data")
            return self._check(raw, pw, "LOGIN")

        self._auth_step = password_step
        self._mode = "auth"
        return Reply(334, "", "UGFzc3dvcmQ6")  # "Password:"

    def _auth_failed(self, user: bytes | str, mechanism: str) -> None:
        """Tell the mail log: the client and the user name tried, never the password."""
        if isinstance(user, bytes):
            user = user.decode("utf-8", "replace")
        ip = self.session.client_ip if self.session else ""
        if self.factory.note_auth_failure is not None:
            self.factory.note_auth_failure(ip, user, mechanism)
        else:
            log.info("AUTH failed: client=[{ip}] mechanism={mechanism} user={user!r}",
                     ip=ip, mechanism=mechanism, user=user)

    def _check(self, user: bytes, password: bytes, mechanism: str) -> Deferred[Reply]:
        assert self.factory.checker is not None
        try:
            username = user.decode("utf-8")
            pw = password.decode("utf-8")
        except UnicodeDecodeError:
            username, pw = "", ""
        d = self.factory.checker.requestAvatarId(UsernamePassword(username, pw))

        def ok(avatar: str) -> Reply:
            if self.session is not None:
                self.session.auth_user = avatar
            log.info("auth ok user={user} client={ip}", user=avatar,
                     ip=self.session.client_ip if self.session else "")
            return Reply(235, "2.7.0", "Authentication successful")

        def bad(f: Failure) -> Reply:
            if not f.check(UnauthorizedLogin):
                log.failure("auth check failed", f)
                return Reply(454, "4.7.0", "Temporary authentication failure")
            self._auth_failed(user, mechanism)
            return Reply(535, "5.7.8", "Authentication credentials invalid")

        return d.addCallbacks(ok, bad)


class SMTPFactory(Factory):
    """Builds `SMTPServer`s for one listener and enforces the connection limits."""

    noisy = False       # the startup summary names the listeners; no "Starting factory"

    def __init__(self, policy: P.ServerPolicy, listener: ListenerSettings, receiver: IReceiver,
                 clock: IReactorTime, *, checker: Any = None, tls_options: Any = None,
                 max_connections: int = 1000, max_per_ip: int = 50,
                 counts: dict[str, int] | None = None, suppression: Any = None,
                 reject_suppressed: bool = True, metrics: Any = None,
                 local_user: str | None = None,
                 note_auth_failure: Callable[[str, str, str], None] | None = None,
                 note_timeout: Callable[[str, str, str, float, int | None], None] | None = None
                 ) -> None:
        self.policy = policy
        # a session closed by a time limit (client address, after which command, the
        # limit's key, its seconds, octets of the unfinished message): the mail log's line
        self.note_timeout = note_timeout
        # a failed AUTH (client address, user name tried, mechanism): the mail log's line
        self.note_auth_failure = note_auth_failure
        self.local_user = local_user              # txmta-sendmail -bs: the user on stdin
        self.listener = listener
        self.receiver = receiver
        self.clock = clock
        self.checker = checker
        self.tls_options = tls_options
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        # shared between the listeners of one daemon so the limits are global
        self.counts: dict[str, int] = counts if counts is not None else {}
        self.counts.setdefault("", 0)
        self.accepting = True
        self.suppression = suppression            # SuppressionList, checked at RCPT
        self.reject_suppressed = reject_suppressed
        self.metrics = metrics                    # txmta.metrics.Metrics, or None

    def buildProtocol(self, addr: Any) -> SMTPServer:
        return SMTPServer(self)

    def admit(self, proto: SMTPServer) -> Reply | None:
        assert proto.session is not None
        ip = proto.session.client_ip
        if not self.accepting:
            return R.SERVICE_SHUTTING_DOWN
        if self.counts[""] >= self.max_connections:
            return Reply(421, "4.7.0", f"{self.policy.hostname} Too many connections, try again later")
        if self.counts.get(ip, 0) >= self.max_per_ip:
            return Reply(421, "4.7.0", f"{self.policy.hostname} Too many connections from {ip}")
        self.counts[""] += 1
        self.counts[ip] = self.counts.get(ip, 0) + 1
        if self.metrics is not None:
            self.metrics.inbound_opened(self.listener.address)
        return None

    def release(self, proto: SMTPServer) -> None:
        assert proto.session is not None
        ip = proto.session.client_ip
        self.counts[""] -= 1
        if self.metrics is not None:
            self.metrics.inbound_closed(self.listener.address)
        n = self.counts.get(ip, 0) - 1
        if n > 0:
            self.counts[ip] = n
        else:
            self.counts.pop(ip, None)
