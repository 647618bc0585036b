"""The ESMTP client: one protocol instance per outbound connection, many transactions on it.

Follows RFC 5321 (EHLO with HELO fallback, MAIL, RCPT, DATA, RSET, QUIT; multi-line replies
per 4.2.1; the timeouts of 4.5.3.2), PIPELINING (RFC 2920), SIZE (1870), 8BITMIME (6152),
SMTPUTF8 (6531), DSN (3461), STARTTLS (3207), REQUIRETLS (8689) and AUTH PLAIN/LOGIN (4954)
towards a relayhost.

Remote behaviour is never an exception (DESIGN invariant 4): `ready` errbacks with a
`SessionFailureError` carrying a `SessionFailure` value, and `send()` always fires with a
`TransactionResult` holding the replies per recipient.  Failures of our side (timeout, lost
connection, TLS handshake, a garbled reply) become made-up 4xx replies.  Deciding what a
reply means is `outcome.classify()`'s job, not this module's (STYLE habit 2).  Each timeout
(`session_timeouts()`, from the [delivery] settings) counts for a whole reply, however it
trickles in; a reply line over MAX_REPLY_LINE, or a reply over MAX_REPLY in all, ends the
connection with 451 4.5.0, so what a peer sends costs bounded memory.

The message body goes out in 64 KiB chunks, dot-stuffed and CRLF-normalised chunk by chunk
(line starts are tracked across chunks, so a "." line on a chunk boundary is stuffed), as a
streaming producer: the next chunk is written only when the transport has room.

TLS: at "none" no STARTTLS; at "may" STARTTLS when offered; at "encrypt" and "verify" STARTTLS
is required.  Once the handshake is done, `tls_options.verify_peer(ssl_connection)` (when the
options have it) judges the peer and gives the label the mail log shows ("verified",
"dane-ee", ...); a peer it refuses ends the session before anything but EHLO went out, with
451 4.7.5.  A message with REQUIRETLS goes only over a connection whose peer was
authenticated, to a server offering REQUIRETLS; otherwise MAIL is not sent and the
transaction fails with 550 5.7.10 (RFC 8689 4.2.1).

Not here: which host to connect to (route.py), connection reuse and limits (pool.py), the TLS
policy per destination and the certificate checks (tlspolicy.py), classifying replies
(outcome.py).
"""
# test: tests/test_client.py

from __future__ import annotations

import base64
import ipaddress
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall, IHandshakeListener, IOpenSSLClientConnectionCreator, IPushProducer,
    IReactorTime)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txmta import outcome as O
from txmta.message import Address, Envelope, Recipient
from txmta.reply import Reply
from txmta.xtext import xtext_encode

log = Logger()

# RFC 5321 4.5.3.2 (seconds).  "data" is the DATA initiation (354), "block" bounds each
# write of the content, "dot" the reply after it.  STARTTLS and AUTH replies are not in the
# RFC; they get the EHLO allowance.  The connect timeout belongs to the caller's endpoint.
DEFAULT_TIMEOUTS: dict[str, float] = {
    "greeting": 300, "ehlo": 300, "starttls": 300, "auth": 300, "mail": 300, "rcpt": 300,
    "data": 120, "block": 180, "dot": 600, "rset": 60, "quit": 10,
}


def session_timeouts(command: float = DEFAULT_TIMEOUTS["mail"],
                     data_init: float = DEFAULT_TIMEOUTS["data"],
                     data_xfer: float = DEFAULT_TIMEOUTS["block"],
                     data_done: float = DEFAULT_TIMEOUTS["dot"]) -> dict[str, float]:
    """The timeouts of a session from `[delivery] command_timeout` (the greeting, EHLO,
    STARTTLS, AUTH, MAIL and RCPT; RSET and QUIT keep their shorter ones when it is longer),
    `data_init_timeout` (the reply to DATA), `data_xfer_timeout` (the transport taking no
    more of the content) and `data_done_timeout` (the reply after the content)."""
    out = {key: command for key in ("greeting", "ehlo", "starttls", "auth", "mail", "rcpt")}
    out.update(data=data_init, block=data_xfer, dot=data_done,
               rset=min(command, DEFAULT_TIMEOUTS["rset"]),
               quit=min(command, DEFAULT_TIMEOUTS["quit"]))
    return out


CHUNK = 64 * 1024            # body bytes per write
CLEAN_REUSE = 2.0            # seconds a cleanly finished connection is reused without RSET
# RFC 5321 4.5.3.1.5 allows a reply line 512 octets; real servers go past that (a long
# text, a URL), never by much.  Past these bounds the peer is broken or hostile: the
# connection is dropped (451 4.5.0), so what a peer sends costs bounded memory.
MAX_REPLY_LINE = 64 * 1024   # one reply line
MAX_REPLY = 64 * 1024        # one reply, all its lines together


@dataclass(frozen=True)
class ClientSettings:
    helo_name: str
    tls: str = "may"                 # none | may | encrypt | verify (STARTTLS required, and the
                                     # peer checked by tls_options.verify_peer)
    tls_options: Any = None          # IOpenSSLClientConnectionCreator; None: unverified, with SNI
    auth: tuple[str, str] | None = None   # (user, password) for a relayhost
    allow_plaintext_auth: bool = False
    timeouts: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TIMEOUTS))

    def timeout(self, key: str) -> float:
        return self.timeouts.get(key, DEFAULT_TIMEOUTS[key])


@dataclass(frozen=True)
class SessionFailure:
    """The session or the transaction as a whole failed at `stage` (an `outcome` stage)."""

    stage: str
    reply: Reply
    tls: str = ""            # the TLS negotiated before the failure, with its verification label
    tls_failure: str = ""    # "handshake", "not-offered", "refused" or "verification"


class SessionFailureError(Exception):
    """`ready` errbacks with this; `.failure` is the value."""

    def __init__(self, failure: SessionFailure) -> None:
        super().__init__(f"{failure.stage}: {failure.reply}")
        self.failure = failure


@dataclass(frozen=True)
class TransactionResult:
    failure: SessionFailure | None          # applies to every recipient not answered negatively
    rcpt_replies: tuple[Reply | None, ...]   # one per recipient (None: not reached)
    final: Reply | None                      # after the content, for recipients accepted at RCPT
    host: str = ""
    address: str = ""
    tls: str = ""                            # "" or e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384 verified"
    notes: tuple[str, ...] = ()              # things worth a line in the mail log
    dsn: bool = False                        # the next hop offered DSN (RFC 3461): NOTIFY went on


# -- replies ------------------------------------------------------------------------------

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*))?\Z", re.S)
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |\Z)")


class MalformedReply(Exception):
    pass


class ReplyTooLong(MalformedReply):
    pass


class ReplyParser:
    """Collects reply lines (RFC 5321 4.2.1: "code-text" continues, "code text" ends), at
    most `limit` bytes of them (line ends included) for one reply."""

    def __init__(self, limit: int = MAX_REPLY) -> None:
        self.limit = limit
        self._code: bytes | None = None
        self._lines: list[str] = []
        self._enhanced = ""
        self._size = 0

    def line(self, raw: bytes) -> Reply | None:
        """Feed one line without its CRLF; returns the Reply when it is complete."""
        if len(raw) > MAX_REPLY_LINE:
            raise ReplyTooLong(f"reply line too long (over {MAX_REPLY_LINE} bytes)")
        self._size += len(raw) + 2
        if self._size > self.limit:
            raise ReplyTooLong(f"reply too long (over {self.limit} bytes)")
        m = _REPLY_LINE.match(raw)
        if m is None or (self._code is not None and m.group(1) != self._code):
            raise MalformedReply(raw[:80].decode("ascii", "replace"))
        code, sep, text_b = m.group(1), m.group(2) or b" ", m.group(3) or b""
        text = text_b.decode("utf-8", "replace")
        e = _ENHANCED.match(text)
        if e is not None and e.group(1) == chr(code[0]):
            if self._code is None:
                self._enhanced = ".".join(e.group(1, 2, 3))
            text = text[e.end():]
        self._code = code
        self._lines.append(text)
        if sep == b"-":
            return None
        reply = Reply(int(code), self._enhanced, "\n".join(self._lines))
        self._code, self._lines, self._enhanced, self._size = None, [], "", 0
        return reply


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper case) -> parameters; the first line is the greeting."""
    out: dict[str, str] = {}
    for line in reply.text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword and "=" not in keyword:   # "AUTH=LOGIN" is a pre-RFC 4954 relic
            out[keyword.upper()] = params.strip()
    return out


# -- the body -----------------------------------------------------------------------------

_LINE_END = re.compile(rb"\r\n|\r|\n")


class DotStuffer:
    """Turns a body into DATA content chunk by chunk (RFC 5321 4.5.2).

    Line ends become CRLF (a lone CR or LF too; RFC 5321 2.3.8), a line starting with "."
    gets another, and the content ends with CRLF "." CRLF.  Line starts are tracked across
    chunks and a CR ending a chunk waits for the next one, so chunk boundaries never matter.
    """

    def __init__(self) -> None:
        self._line_start = True
        self._carry = b""

    def feed(self, data: bytes) -> bytes:
        data = self._carry + data
        if data.endswith(b"\r"):
            data, self._carry = data[:-1], b"\r"
        else:
            self._carry = b""
        if not data:
            return b""
        crlf = data.count(b"\r\n")
        if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
            data = _LINE_END.sub(b"\r\n", data)
        data = data.replace(b"\r\n.", b"\r\n..")
        if self._line_start and data.startswith(b"."):
            data = b"." + data
        self._line_start = data.endswith(b"\r\n")
        return data

    def end(self) -> bytes:
        tail = b"\r\n" if self._carry else b""
        if not tail and not self._line_start:
            tail = b"\r\n"
        self._carry = b""
        self._line_start = True
        return tail + b".\r\n"


def dot_stuff(body: bytes) -> bytes:
    """The whole DATA content for `body`, in one piece (tests and small bodies)."""
    s = DotStuffer()
    return b"".join([s.feed(body[i:i + CHUNK]) for i in range(0, len(body), CHUNK)] + [s.end()])


# -- TLS ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PeerCheck:
    """What `verify_peer()` found: may the session go on, the label for the logs, why not."""

    ok: bool
    label: str                  # "verified", "dane-ee", "dane-ta", "sts-enforce", "unverified"...
    reason: str = ""            # why the peer is refused (or, when ok, what was not checked)
    authenticated: bool = False # the peer's identity was checked: REQUIRETLS may go


UNVERIFIED = PeerCheck(True, "unverified")


@implementer(IOpenSSLClientConnectionCreator)
class UnverifiedTLS:
    """Opportunistic TLS: encrypt, send SNI, verify nothing (what "may" and "encrypt" mean;
    verified policies come from tlspolicy.py as `tls_options`)."""

    def __init__(self, hostname: str) -> None:
        self._options = ssl.CertificateOptions(verify=False)
        self._sni: bytes | None = None
        name = hostname.rstrip(".")
        try:
            ipaddress.ip_address(name)
        except ValueError:
            if name:
                try:
                    self._sni = name.encode("idna")
                except UnicodeError:
                    self._sni = None

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        connection.set_app_data(tlsProtocol)
        if self._sni:
            connection.set_tlsext_host_name(self._sni)
        return connection

    def verify_peer(self, connection: Any) -> PeerCheck:
        return UNVERIFIED


# -- the protocol -------------------------------------------------------------------------

@dataclass
class _Waiter:
    stage: str          # outcome stage a failure here is reported at
    what: str           # "reply to MAIL", for made-up replies
    timeout: str        # key into the timeouts
    deferred: Deferred[Reply]


@implementer(IPushProducer)
class _BodyProducer:
    """The transport's handle on a body being written: pause/resume flow control."""

    def __init__(self) -> None:
        self.paused = False
        self.resumed: Deferred[None] | None = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        d, self.resumed = self.resumed, None
        if d is not None:
            d.callback(None)

    def stopProducing(self) -> None:
        pass  # connectionLost ends the transaction


@implementer(IHandshakeListener)
class SMTPClient(Protocol):
    """One outbound SMTP connection.  States: connecting, setup, ready, busy, closed."""

    def __init__(self, settings: ClientSettings, clock: IReactorTime, host: str = "",
                 address: str = "") -> None:
        self.settings = settings
        self.clock = clock
        self.host = host
        self.address = address
        self.ready: Deferred[None] = Deferred()
        self.extensions: dict[str, str] = {}
        self.tls = ""                          # negotiated TLS, "" in plaintext
        self.transactions = 0                  # transactions begun on this connection
        self._state = "connecting"
        self._buffer = b""
        self._parser = ReplyParser()
        self._waiters: deque[_Waiter] = deque()
        self._timer: IDelayedCall | None = None
        self._producer: _BodyProducer | None = None
        self._block_timer: IDelayedCall | None = None
        self._tls_started = False
        self._handshake_done = False
        self._peer_check: PeerCheck | None = None   # set once the TLS peer was judged
        self._clean_at: float | None = None    # when the last transaction completed cleanly

    # -- public ---------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Can carry another transaction now."""
        return self._state == "ready"

    def send(self, envelope: Envelope, recipients: Sequence[Recipient],
             body: bytes) -> Deferred[TransactionResult]:
        """One mail transaction; fires with a `TransactionResult`, never with remote errors."""
        if self._state != "ready":
            if self._state == "busy":
                raise RuntimeError("SMTPClient.send() during a transaction")
            return succeed(self._result(SessionFailure(O.MAIL, self._lost_reply("before MAIL")),
                                        (None,) * len(recipients), None))
        self._state = "busy"
        self.transactions += 1
        return Deferred.fromCoroutine(self._transaction(envelope, tuple(recipients), body))

    def reset(self) -> Deferred[bool]:
        """RSET before another transaction; False when the connection cannot be used.

        Right after a completed transaction (within CLEAN_REUSE seconds) the server is
        already reset, so no RSET is sent: one round trip less per message."""
        if self._state != "ready":
            return succeed(False)
        clean, self._clean_at = self._clean_at, None
        if clean is not None and self.clock.seconds() - clean < CLEAN_REUSE:
            return succeed(True)
        return Deferred.fromCoroutine(self._reset())

    def quit(self) -> None:
        """Say QUIT (when idle) and close; no result."""
        if self._state in ("closed", "quitting"):
            return
        if self._state != "ready":
            self._close()
            return
        self._state = "quitting"
        d = self._command(b"QUIT", O.MAIL, "reply to QUIT", "quit")
        d.addErrback(lambda _: None)
        d.addBoth(lambda _: self._close())

    # -- connection -----------------------------------------------------------------------

    def connectionMade(self) -> None:
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            try:
                no_delay(True)
            except Exception:  # not a TCP socket (tests, UNIX sockets)
                pass
        self._state = "setup"
        greeting = self._expect(O.GREETING, "greeting", "greeting")
        d = Deferred.fromCoroutine(self._setup(greeting))
        d.addCallbacks(self._setup_done, self._setup_failed)

    on_lost: Callable[[], Any] | None = None     # told once when the connection is gone

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:
        if self.on_lost is not None:
            told, self.on_lost = self.on_lost, None
            told()
        if self._state == "closed":
            return
        if self._tls_started and not self._handshake_done and self._waiters:
            failure = SessionFailure(O.STARTTLS, Reply(
                451, "4.7.0", f"TLS handshake failed with {self._peer()}: "
                              f"{reason.getErrorMessage()}"), tls_failure="handshake")
        else:
            stage = self._waiters[0].stage if self._waiters else O.DOT
            what = self._waiters[0].what if self._waiters else "message content"
            failure = SessionFailure(stage, self._lost_reply(f"during {what}"))
        self._break(failure)

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS layer finished the handshake."""
        self._handshake_done = True
        self.tls = _describe_tls(self.transport)
        failure = self._check_peer()
        if failure is not None:   # nothing but EHLO was written, and it is still in the TLS buffer
            self._break(failure)

    @property
    def authenticated(self) -> bool:
        """The TLS peer's identity was verified (what REQUIRETLS needs)."""
        return self._peer_check is not None and self._peer_check.authenticated

    def _check_peer(self) -> SessionFailure | None:
        """Judge the TLS peer once, after the handshake; a SessionFailure if it is refused."""
        if self._peer_check is not None:
            return None
        verify = getattr(self.settings.tls_options, "verify_peer", None)
        if verify is None:
            self._peer_check = UNVERIFIED if self.settings.tls_options is None else \
                PeerCheck(True, "")
        else:
            try:
                handle = self.transport.getHandle()  # type: ignore[union-attr]
            except Exception:
                handle = None
            self._peer_check = verify(handle)
        check = self._peer_check
        if check.label:
            self.tls = f"{self.tls or 'TLS'} {check.label}"
        if check.ok:
            if check.reason:
                log.info("TLS with {peer}: {reason}", peer=self._peer(), reason=check.reason)
            return None
        return SessionFailure(O.STARTTLS, Reply(
            451, "4.7.5", f"TLS policy: {check.reason or 'peer not accepted'} ({self._peer()})"),
            tls=self.tls, tls_failure="verification")

    def dataReceived(self, data: bytes) -> None:
        if self._state == "closed":
            return
        buffer = self._buffer + data if self._buffer else data
        start = 0     # lines are sliced off the buffer, which is copied once per reply only
        while self._state != "closed":
            idx = buffer.find(b"\n", start)
            if idx < 0:
                break
            end = idx - 1 if idx > start and buffer[idx - 1] == 0x0D else idx   # CRLF or LF
            line, start = buffer[start:end], idx + 1
            try:
                reply = self._parser.line(line)
            except ReplyTooLong as e:
                self._buffer = b""
                self._malformed(str(e))
                return
            except MalformedReply:
                self._buffer = b""
                self._malformed()
                return
            if reply is not None:
                # what follows the reply is in _buffer while it is handled (STARTTLS looks)
                self._buffer = buffer = buffer[start:]
                start = 0
                self._reply(reply)
        if self._state == "closed":
            self._buffer = b""
            return
        self._buffer = buffer[start:] if start else buffer
        if len(self._buffer) > MAX_REPLY_LINE:
            self._buffer = b""
            self._malformed(f"reply line too long (over {MAX_REPLY_LINE} bytes)")

    # -- replies and timeouts -------------------------------------------------------------

    def _reply(self, reply: Reply) -> None:
        if not self._waiters:
            # Unsolicited: a 421 before closing an idle connection, or nonsense.
            log.info("unsolicited reply from {peer}: {reply}", peer=self._peer(), reply=reply)
            self._close()
            return
        waiter = self._waiters.popleft()
        self._disarm()
        self._arm()
        if reply.code == 421:      # the server is closing the session (RFC 5321 3.8)
            self._state = "closing"
        waiter.deferred.callback(reply)

    def _expect(self, stage: str, what: str, timeout: str) -> Deferred[Reply]:
        if self._state == "closed":
            raise SessionFailureError(SessionFailure(stage, self._lost_reply(f"before {what}")))
        d: Deferred[Reply] = Deferred()
        self._waiters.append(_Waiter(stage, what, timeout, d))
        self._arm()
        return d

    def _command(self, line: bytes, stage: str, what: str, timeout: str) -> Deferred[Reply]:
        d = self._expect(stage, what, timeout)
        self._write(line + b"\r\n")
        return d

    def _arm(self) -> None:
        if self._timer is None and self._waiters:
            head = self._waiters[0]
            self._timer = self.clock.callLater(self.settings.timeout(head.timeout), self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        head = self._waiters[0]
        if self._tls_started and not self._handshake_done and head.stage == O.STARTTLS:
            reply = Reply(451, "4.7.0", f"TLS handshake failed with {self._peer()}: timeout")
            self._break(SessionFailure(head.stage, reply, tls_failure="handshake"))
            return
        reply = Reply(451, "4.4.2", f"timeout waiting for {head.what} from {self._peer()}")
        self._break(SessionFailure(head.stage, reply))

    def _malformed(self, what: str = "malformed reply") -> None:
        stage = self._waiters[0].stage if self._waiters else O.MAIL
        self._break(SessionFailure(stage, Reply(451, "4.5.0", f"{what} from {self._peer()}")))

    def _break(self, failure: SessionFailure) -> None:
        """The connection is unusable: fail whatever waits, close without QUIT."""
        self._state = "closed"
        self._disarm()
        self._stop_block_timer()
        waiters, self._waiters = self._waiters, deque()
        producer, self._producer = self._producer, None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        if producer is not None and producer.resumed is not None:
            d, producer.resumed = producer.resumed, None
            d.errback(SessionFailureError(failure))
        # The coroutine waits on the head only; later (pipelined) waiters are dropped unfired.
        if waiters:
            waiters[0].deferred.errback(SessionFailureError(failure))

    def _close(self) -> None:
        if self._state == "closed":
            return
        self._state = "closed"
        self._disarm()
        self._waiters.clear()
        if self.transport is not None:
            self.transport.loseConnection()

    def _write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def _peer(self) -> str:
        if self.host and self.address and self.host != self.address:
            return f"{self.host} [{self.address}]"
        return self.host or self.address or "remote host"

    def _lost_reply(self, when: str) -> Reply:
        return Reply(451, "4.4.2", f"connection lost {when} with {self._peer()}")

    def _result(self, failure: SessionFailure | None, rcpts: tuple[Reply | None, ...],
                final: Reply | None, notes: tuple[str, ...] = ()) -> TransactionResult:
        return TransactionResult(failure, rcpts, final, self.host, self.address, self.tls, notes,
                                 "DSN" in self.extensions)

    # -- session setup --------------------------------------------------------------------

    def _setup_done(self, _: None) -> None:
        if self._state == "setup":
            self._state = "ready"
        self.ready.callback(None)

    def _setup_failed(self, f: Failure) -> None:
        if not f.check(SessionFailureError):
            log.failure("bug in SMTP client setup with {peer}", f, peer=self._peer())
            f = Failure(SessionFailureError(SessionFailure(
                O.GREETING, Reply(451, "4.3.0", "internal error in the SMTP client"))))
            self._break(f.value.failure)
        self.ready.errback(f)

    def _give_up(self, stage: str, reply: Reply, tls_failure: str = "") -> None:
        """A failure the server told us (or that we decide): QUIT politely, then fail."""
        if self._state not in ("closed", "closing"):
            self._state = "ready"
            self.quit()
        else:
            self._close()
        raise SessionFailureError(SessionFailure(stage, reply, self.tls, tls_failure))

    async def _setup(self, greeting: Deferred[Reply]) -> None:
        reply = await greeting
        if not reply.positive:
            self._give_up(O.GREETING, reply)
        await self._hello()
        if self.settings.tls != "none":
            if "STARTTLS" in self.extensions:
                await self._starttls()
            elif self.settings.tls != "may":
                self._give_up(O.STARTTLS, Reply(451, "4.7.0",
                                                f"TLS required but not offered by {self._peer()}"),
                              "not-offered")
        if self.settings.auth is not None:
            await self._auth(*self.settings.auth)

    def _helo_name(self) -> bytes:
        name = self.settings.helo_name
        return name.encode("ascii") if name.isascii() else name.encode("idna")

    async def _hello(self) -> None:
        name = self._helo_name()
        reply = await self._command(b"EHLO " + name, O.EHLO, "reply to EHLO", "ehlo")
        if reply.positive:
            self.extensions = parse_ehlo(reply)
            return
        if reply.permanent and reply.code != 421:   # an SMTP-only server (RFC 5321 3.2)
            reply = await self._command(b"HELO " + name, O.EHLO, "reply to HELO", "ehlo")
            if reply.positive:
                self.extensions = {}
                return
        self._give_up(O.EHLO, reply)

    async def _starttls(self) -> None:
        reply = await self._command(b"STARTTLS", O.STARTTLS, "reply to STARTTLS", "starttls")
        if reply.code != 220:
            if self.settings.tls != "may" or reply.code == 421:
                if reply.permanent:   # our policy refuses plaintext: worth a retry later
                    reply = Reply(451, "4.7.0", f"STARTTLS refused by {self._peer()}: {reply}")
                self._give_up(O.STARTTLS, reply, "refused")
            log.info("STARTTLS refused by {peer} ({reply}); going on in plaintext",
                     peer=self._peer(), reply=reply)
            return
        if self._buffer:
            # Plaintext after the 220 would be read as if it came through TLS (CVE-2011-0411).
            failure = SessionFailure(O.STARTTLS, Reply(
                451, "4.7.0", f"{self._peer()} sent data after its STARTTLS reply"))
            self._break(failure)
            raise SessionFailureError(failure)
        options = self.settings.tls_options or UnverifiedTLS(self.host)
        self._tls_started = True
        try:
            self.transport.startTLS(options)  # type: ignore[union-attr]
        except Exception as e:
            failure = SessionFailure(O.STARTTLS, Reply(451, "4.7.0", f"TLS handshake failed: {e}"),
                                     tls_failure="handshake")
            self._break(failure)
            raise SessionFailureError(failure) from e
        self.extensions = {}   # RFC 3207 4.2: forget everything learned in plaintext
        name = self._helo_name()
        # The handshake runs before the EHLO goes out; a failure shows up as a lost connection.
        reply = await self._command(b"EHLO " + name, O.STARTTLS, "reply to EHLO after STARTTLS",
                                    "starttls")
        self._handshake_done = True
        if not self.tls:
            self.tls = _describe_tls(self.transport)
        failure = self._check_peer()   # when the transport told no handshakeCompleted
        if failure is not None:
            self._give_up(failure.stage, failure.reply, failure.tls_failure)
        if not reply.positive:
            self._give_up(O.EHLO, reply)
        self.extensions = parse_ehlo(reply)

    async def _auth(self, user: str, password: str) -> None:
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if "AUTH" not in self.extensions:
            log.info("{peer} offers no AUTH; sending without authentication", peer=self._peer())
            return
        if not self.tls and not self.settings.allow_plaintext_auth:
            self._give_up(O.AUTH, Reply(451, "4.7.0",
                                        f"not sending credentials to {self._peer()} without TLS"))
        u, p = user.encode("utf-8"), password.encode("utf-8")
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + u + b"\0" + p)
            reply = await self._command(b"AUTH PLAIN " + token, O.AUTH, "reply to AUTH", "auth")
            if reply.code == 334:   # a server that ignores the initial response (RFC 4954 4)
                reply = await self._command(token, O.AUTH, "reply to AUTH", "auth")
        elif "LOGIN" in mechanisms:
            reply = await self._command(b"AUTH LOGIN", O.AUTH, "reply to AUTH", "auth")
            for secret in (u, p):
                if reply.code != 334:
                    break
                reply = await self._command(base64.b64encode(secret), O.AUTH, "reply to AUTH", "auth")
        else:
            self._give_up(O.AUTH, Reply(451, "4.7.0",
                                        f"no AUTH mechanism in common with {self._peer()} "
                                        f"(offered: {' '.join(mechanisms) or 'none'})"))
            return
        if reply.code == 334:       # a challenge we cannot answer: cancel (RFC 4954 4)
            reply = await self._command(b"*", O.AUTH, "reply to AUTH", "auth")
        if reply.code != 235:
            if reply.positive:
                reply = Reply(451, "4.7.0", f"unexpected AUTH reply from {self._peer()}: {reply}")
            self._give_up(O.AUTH, reply)

    # -- transactions ---------------------------------------------------------------------

    async def _reset(self) -> bool:
        self._state = "busy"
        try:
            reply = await self._command(b"RSET", O.MAIL, "reply to RSET", "rset")
        except SessionFailureError:
            return False
        if self._state == "busy" and reply.positive:
            self._state = "ready"
            return True
        self._close()
        return False

    def _mail_line(self, envelope: Envelope, size: int, notes: list[str]) -> bytes:
        ext = self.extensions
        params = []
        if "SIZE" in ext:
            params.append(f"SIZE={size}")
        if envelope.body.upper() == "8BITMIME":
            if "8BITMIME" in ext:
                params.append("BODY=8BITMIME")
            else:   # RFC 6152 3: a relay may send it on; most servers take 8-bit anyway
                notes.append(f"8-bit message sent to {self._peer()}, which does not offer 8BITMIME")
        if envelope.smtputf8 and "SMTPUTF8" in ext:
            params.append("SMTPUTF8")
        if envelope.requiretls:   # checked by _requiretls_refusal() before
            params.append("REQUIRETLS")
        if "DSN" in ext:
            if envelope.ret:
                params.append(f"RET={envelope.ret.upper()}")
            if envelope.envid:
                params.append(f"ENVID={xtext_encode(envelope.envid)}")
        line = f"MAIL FROM:<{envelope.sender}>" + "".join(" " + p for p in params)
        return line.encode("utf-8")

    def _rcpt_line(self, rcpt: Recipient) -> bytes:
        params = []
        if "DSN" in self.extensions:
            if rcpt.notify:
                params.append("NOTIFY=" + ",".join(n.upper() for n in rcpt.notify))
            if rcpt.orcpt:
                addr_type, sep, addr = rcpt.orcpt.partition(";")
                if sep:
                    params.append(f"ORCPT={addr_type};{xtext_encode(addr)}")
        line = f"RCPT TO:<{rcpt.address}>" + "".join(" " + p for p in params)
        return line.encode("utf-8")

    def _requiretls_refusal(self, envelope: Envelope) -> Reply | None:
        """RFC 8689 4.2.1: a REQUIRETLS message goes only over TLS whose peer was verified,
        to a server that offers REQUIRETLS; else 550 5.7.10, and MAIL is not sent."""
        if not envelope.requiretls:
            return None
        if not self.tls or not self.authenticated:
            how = f"TLS not verified ({self.tls})" if self.tls else "no TLS"
            return Reply(550, "5.7.10", f"REQUIRETLS: {self._peer()} was not reached over "
                                        f"verified TLS ({how})")
        if "REQUIRETLS" not in self.extensions:
            return Reply(550, "5.7.10", f"REQUIRETLS: {self._peer()} does not offer REQUIRETLS")
        return None

    def _needs_smtputf8(self, envelope: Envelope, recipients: tuple[Recipient, ...]) -> bool:
        addresses: list[Address] = [envelope.sender] + [r.address for r in recipients]
        return not all(a.is_ascii for a in addresses)

    async def _transaction(self, envelope: Envelope, recipients: tuple[Recipient, ...],
                           body: bytes) -> TransactionResult:
        n = len(recipients)
        rcpt_replies: list[Reply | None] = [None] * n
        notes: list[str] = []

        def result(failure: SessionFailure | None, final: Reply | None = None) -> TransactionResult:
            if self._state == "busy":
                self._state = "ready"
            elif self._state == "closing":   # after a 421
                self._close()
            # a transaction that got its reply after the content left the server in its
            # initial state (RFC 5321 4.1.1.4): the next one needs no RSET
            self._clean_at = self.clock.seconds() if final is not None and failure is None \
                and self._state == "ready" else None
            return self._result(failure, tuple(rcpt_replies), final, tuple(notes))

        refusal = self._requiretls_refusal(envelope)
        if refusal is not None:
            return result(SessionFailure(O.MAIL, refusal, self.tls))
        if self._needs_smtputf8(envelope, recipients) and "SMTPUTF8" not in self.extensions:
            return result(SessionFailure(O.MAIL, Reply(
                553, "5.6.7", f"{self._peer()} does not support SMTPUTF8, "
                              "needed for a non-ASCII address")))
        mail = self._mail_line(envelope, len(body), notes)
        rcpts = [self._rcpt_line(r) for r in recipients]
        try:
            if "PIPELINING" in self.extensions:
                return await self._pipelined(mail, rcpts, body, rcpt_replies, result)
            return await self._lockstep(mail, rcpts, body, rcpt_replies, result)
        except SessionFailureError as e:
            return result(e.failure)

    async def _pipelined(self, mail: bytes, rcpts: list[bytes], body: bytes,
                         rcpt_replies: list[Reply | None], result: Any) -> TransactionResult:
        """RFC 2920: MAIL, every RCPT and DATA in one write; then the replies in order."""
        mail_d = self._expect(O.MAIL, "reply to MAIL", "mail")
        rcpt_ds = [self._expect(O.RCPT, "reply to RCPT", "rcpt") for _ in rcpts]
        data_d = self._expect(O.DATA, "reply to DATA", "data")
        self._write(b"".join(line + b"\r\n" for line in [mail, *rcpts, b"DATA"]))
        mail_reply = await mail_d
        failure = None
        if not mail_reply.positive:
            failure = SessionFailure(O.MAIL, mail_reply)
        if mail_reply.code == 421:
            return result(failure)
        for i, d in enumerate(rcpt_ds):
            reply = await d
            if reply.code == 421 and failure is None:
                return result(SessionFailure(O.RCPT, reply))
            if failure is None:
                rcpt_replies[i] = reply
        data_reply = await data_d
        accepted = any(r is not None and r.positive for r in rcpt_replies)
        if data_reply.code == 354 and (failure is not None or not accepted):
            # RFC 2920 3.1: nobody to send to, yet DATA was accepted: send an empty message
            # and let the reply go.  (Most servers refuse DATA here with 503/554.)
            await self._command(b".", O.DOT, "reply to end of DATA", "dot")
            return result(failure)
        if failure is not None or not accepted:
            return result(failure)
        if data_reply.code != 354:
            return result(SessionFailure(O.DATA, data_reply))
        return result(None, await self._content(body))

    async def _lockstep(self, mail: bytes, rcpts: list[bytes], body: bytes,
                        rcpt_replies: list[Reply | None], result: Any) -> TransactionResult:
        reply = await self._command(mail, O.MAIL, "reply to MAIL", "mail")
        if not reply.positive:
            return result(SessionFailure(O.MAIL, reply))
        for i, line in enumerate(rcpts):
            reply = await self._command(line, O.RCPT, "reply to RCPT", "rcpt")
            if reply.code == 421:
                return result(SessionFailure(O.RCPT, reply))
            rcpt_replies[i] = reply
        if not any(r is not None and r.positive for r in rcpt_replies):
            return result(None)     # the next transaction's RSET clears MAIL
        reply = await self._command(b"DATA", O.DATA, "reply to DATA", "data")
        if reply.code != 354:
            return result(SessionFailure(O.DATA, reply))
        return result(None, await self._content(body))

    async def _content(self, body: bytes) -> Reply:
        """Write the dot-stuffed body with flow control; return the reply after it."""
        stuffer = DotStuffer()
        producer = self._producer = _BodyProducer()
        self.transport.registerProducer(producer, True)  # type: ignore[union-attr]
        try:
            for offset in range(0, len(body), CHUNK):
                if producer.paused:
                    await self._wait_for_room(producer)
                chunk = stuffer.feed(body[offset:offset + CHUNK])
                if chunk:
                    self._write(chunk)
        finally:
            self._producer = None
            if self._state != "closed":
                self.transport.unregisterProducer()  # type: ignore[union-attr]
        final = self._expect(O.DOT, "reply to end of DATA", "dot")
        self._write(stuffer.end())
        return await final

    async def _wait_for_room(self, producer: _BodyProducer) -> None:
        producer.resumed = Deferred()
        self._block_timer = self.clock.callLater(
            self.settings.timeout("block"), self._break, SessionFailure(
                O.DOT, Reply(451, "4.4.2", f"timeout sending message content to {self._peer()}")))
        try:
            await producer.resumed
        finally:
            self._stop_block_timer()

    def _stop_block_timer(self) -> None:
        if self._block_timer is not None:
            if self._block_timer.active():
                self._block_timer.cancel()
            self._block_timer = None


def _describe_tls(transport: Any) -> str:
    """"TLSv1.3 TLS_AES_256_GCM_SHA384" from the OpenSSL connection, or "TLS"."""
    try:
        handle = transport.getHandle()
        version = handle.get_protocol_version_name()
        cipher = handle.get_cipher_name()
    except Exception:
        return "TLS"
    if not version or not cipher:
        return "TLS"
    return f"{version} {cipher}"
