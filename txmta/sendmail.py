"""`txmta-sendmail`: the sendmail command line that applications call (installed as
/usr/sbin/sendmail), and `mailq`.

Applications (PHP's mail(), cron, git send-email, ...) run `sendmail [options] [recipient...]`
and write a message on its standard input.  This command stores it in the spool itself,
through the same intake code as SMTP (inbound/receiver.py: Received header, Message-ID and
Date when missing, DKIM signing, lanes, deadlines, suppression, the `received` event and
its webhook deliveries), so mail is accepted while the daemon is down; the daemon delivers
it when it runs (every queued recipient is due at start).  After the durable commit it
wakes the running daemon through the pickup socket (control/amp.py `Pickup`): the worker
that owns the message's partition delivers it at once.

The spool is one LMDB environment shared by processes: this process opens it with a writer
thread of its own (spool/lmdb.py) owning no partition (so it never reads due mail or removes
a body file another process is writing), takes an id in a random partition, and gives its
events ids in that partition from a random counter (events.EventIds), beside the worker's.

Modes (-b): m (default) read a message from standard input; s speak SMTP on standard input
and output (the daemon's own ESMTP server, inbound/protocol.py, over a stdio transport);
p list the queue (`txmta queue list`, as `mailq`).  Exit codes are sysexits.h's.

Option parsing (`parse`) is pure; `read_message` and `prepare` are pure functions of the
bytes read; the rest does I/O.  Not here: anything the daemon decides about delivery.
"""
# test: tests/test_sendmail.py, tests/integration/test_sendmail_delivery.py

from __future__ import annotations

import os
import pwd
import random
import re
import sys
from dataclasses import dataclass, field
from email.header import Header
from email.utils import formataddr, getaddresses
from typing import Any, Sequence

from txmta.inbound.protocol import SMTPFactory, SMTPServer
from txmta.message import Address, Envelope, Recipient

# sysexits.h
EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_CONFIG = 78

USAGE = ("usage: txmta-sendmail [-t] [-i] [-f sender] [-F name] [-bm|-bs|-bp] [-v] "
         "[-C config] [-o option]... [recipient...]")

# Options that take a value (attached, "-fuser", or as the next word, "-f user"), as
# Postfix's sendmail knows them.  Those not listed in `Invocation` are accepted and ignored.
_WITH_VALUE = frozenset("BCFLNORVXfhrp")
_FLAGS = frozenset("itv")                       # may be written together: -ti
_IGNORED = frozenset("AGUcdemns")               # accepted and ignored, with what is attached


class UsageError(Exception):
    """A command line txmta-sendmail cannot run: exit EX_USAGE with the message."""


class DataError(Exception):
    """The message read cannot be stored: exit EX_DATAERR."""


@dataclass
class Invocation:
    """What a sendmail command line asks for."""
    mode: str = "m"                  # m: read a message; s: SMTP on stdin; p: list the queue
    sender: str | None = None        # -f / -r; None: the user's login @ server.hostname
    full_name: str | None = None     # -F
    extract: bool = False            # -t: recipients from To, Cc, Bcc (or the Resent- fields)
    ignore_dots: bool = False        # -i / -oi: a line "." does not end the message
    verbose: bool = False            # -v
    config: str | None = None        # -C FILE: the txmta configuration
    body_type: str | None = None     # -B 7BIT | 8BITMIME
    notify: tuple[str, ...] = ()     # -N never | success,delay,failure
    ret: str | None = None           # -R full | hdrs
    envid: str | None = None         # -V
    flush: bool = False              # -q: ask the daemon to try the queue now
    recipients: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)   # options accepted and ignored


def parse(argv: Sequence[str]) -> Invocation:
    """The sendmail command line `argv` (without the program name).  Options come first
    (single letters, values attached or as the next word); the first word that is not an
    option, or "--", starts the recipients."""
    inv = Invocation()
    args = list(argv)
    i = 0
    while i < len(args):
        word = args[i]
        if word == "--":
            i += 1
            break
        if not word.startswith("-") or word == "-":
            break
        letter, rest = word[1:2], word[2:]
        i += 1
        if letter == "b":
            if rest not in ("m", "s", "p", "d", "i", "v", "h", "H", "a", "D", "P", "t"):
                raise UsageError(f"-b{rest}: unknown mode")
            if rest not in ("m", "s", "p"):
                raise UsageError(f"-b{rest}: not supported by txmta-sendmail "
                                 "(modes: -bm, -bs, -bp)")
            inv.mode = rest
            continue
        if letter == "o":      # -oi, -oem, -odb, -oQ/path, -o i ...: only -oi means anything
            option = rest if rest else (args[i] if i < len(args) else "")
            if not rest:
                i += 1
            if option == "i":
                inv.ignore_dots = True
            else:
                inv.ignored.append("-o" + option)
            continue
        if letter == "q":      # -q: run the queue now; -qINTERVAL etc. mean nothing here
            if rest:
                inv.ignored.append(word)
            else:
                inv.flush = True
            continue
        if letter in _WITH_VALUE:
            if rest:
                value = rest
            elif i < len(args):
                value = args[i]
                i += 1
            else:
                raise UsageError(f"-{letter} needs a value")
            _take_value(inv, letter, value, word)
            continue
        if letter in _FLAGS:
            for flag in word[1:]:        # -ti, -it: letters together
                if flag == "t":
                    inv.extract = True
                elif flag == "i":
                    inv.ignore_dots = True
                elif flag == "v":
                    inv.verbose = True
                else:
                    raise UsageError(f"{word}: unknown option -{flag}")
            continue
        if letter in _IGNORED:
            inv.ignored.append(word)
            continue
        if letter == "I":          # newaliases
            raise UsageError("-I: txmta has no aliases")
        raise UsageError(f"{word}: unknown option")
    inv.recipients = args[i:]
    return inv


def _take_value(inv: Invocation, letter: str, value: str, word: str) -> None:
    if letter in ("f", "r"):
        inv.sender = value
    elif letter == "F":
        inv.full_name = value
    elif letter == "C":
        inv.config = value
    elif letter == "B":
        kind = value.upper()
        if kind not in ("7BIT", "8BITMIME"):
            raise UsageError(f"-B {value}: 7BIT or 8BITMIME")
        inv.body_type = kind
    elif letter == "N":
        words = tuple(w.strip().upper() for w in value.split(",") if w.strip())
        if not words or any(w not in ("NEVER", "SUCCESS", "DELAY", "FAILURE") for w in words) \
                or ("NEVER" in words and len(words) > 1):
            raise UsageError(f"-N {value}: never, or some of success,delay,failure")
        inv.notify = words
    elif letter == "R":
        if value.lower() not in ("full", "hdrs"):
            raise UsageError(f"-R {value}: full or hdrs")
        inv.ret = value.upper()
    elif letter == "V":
        inv.envid = value
    else:                          # -h hops, -L label, -O option=value, -X logfile, -p proto
        inv.ignored.append(f"-{letter} {value}")


# -- the message ------------------------------------------------------------------------

_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_RESENT = ("resent-to", "resent-cc", "resent-bcc")
_ORDINARY = ("to", "cc", "bcc")


def read_message(data: bytes, ignore_dots: bool) -> bytes:
    """The message as `data` (standard input) gives it, lines ended with CRLF; without
    `ignore_dots` a line holding only "." ends it (what follows is not read), as in sendmail."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()                          # the newline ending the last line
    out = []
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not ignore_dots and line == b".":
            break
        out.append(line)
    return b"".join(line + b"\r\n" for line in out)


def read_input(stream: Any, ignore_dots: bool, limit: int) -> bytes:
    """Standard input as `read_message` takes it: without `ignore_dots`, line by line up to
    and including a line holding only "." (so a person typing the message ends it there, as
    with sendmail); otherwise up to the end.  At most about `limit` octets are read."""
    if ignore_dots:
        return bytes(stream.read(limit))
    lines = []
    size = 0
    while size < limit:
        line = stream.readline(65536)
        if not line:
            break
        lines.append(line)
        size += len(line)
        if line.rstrip(b"\r\n") == b"." and line.endswith(b"\n"):
            break
    return b"".join(lines)


def split_header(message: bytes) -> tuple[bytes, bytes]:
    """(header section, the rest): the header section ends before the first empty line or
    the first line that is neither a field nor a continuation; the rest keeps that line."""
    pos = 0
    while pos < len(message):
        nl = message.find(b"\n", pos)
        end = len(message) if nl < 0 else nl + 1
        line = message[pos:end]
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t"):
            if pos == 0:
                break
        elif not _FIELD.match(line):
            break
        pos = end
    return message[:pos], message[pos:]


def header_fields(header: bytes) -> list[tuple[str, str, bytes]]:
    """(lower-case name, unfolded value, raw field with its continuation lines) of each field."""
    fields: list[tuple[str, str, bytes]] = []
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            name, value, raw = fields[-1]
            fields[-1] = (name, value, raw + line)
            continue
        fields.append(("", "", line))
    out = []
    for _, _, raw in fields:
        name, _, value = raw.partition(b":")
        text = value.decode("utf-8", "replace")
        out.append((name.strip().decode("ascii", "replace").lower(), " ".join(text.split()), raw))
    return out


@dataclass(frozen=True)
class Prepared:
    """The message to store and the recipient addresses its header section gave (-t)."""
    message: bytes
    header_recipients: list[str]


def prepare(message: bytes, extract: bool, from_field: str) -> Prepared:
    """Take the recipients from the header section (with `extract`: Resent-To/Cc/Bcc when
    there is a Resent- field of them, else To/Cc/Bcc), remove every Bcc and Resent-Bcc field
    (as Postfix's cleanup does), and add `from_field` as From: when the message has none."""
    header, rest = split_header(message)
    fields = header_fields(header)
    names = {name for name, _, _ in fields}
    wanted = _RESENT if any(n in names for n in _RESENT) else _ORDINARY
    found: list[str] = []
    if extract:
        values = [value for name, value, _ in fields if name in wanted]
        found = [addr for _, addr in getaddresses(values) if addr]
    kept = b"".join(raw for name, _, raw in fields if name not in ("bcc", "resent-bcc"))
    if "from" not in names:
        kept += f"From: {from_field}\r\n".encode("utf-8")
    if kept and not kept.endswith(b"\n"):
        kept += b"\r\n"
    if not rest:
        rest = b"\r\n"
    elif not rest.startswith((b"\r\n", b"\n")):
        rest = b"\r\n" + rest
    return Prepared(kept + rest, found)


def from_field(address: str, name: str | None) -> str:
    """The From: field's value for `address` with the display `name` (RFC 2047 encoded when
    it is not ASCII)."""
    if not name:
        return address or "MAILER-DAEMON"
    if not name.isascii():
        return f"{Header(name, 'utf-8').encode()} <{address}>"
    return formataddr((name, address))


def parse_recipients(words: Sequence[str], hostname: str) -> list[Address]:
    """The addresses of `words` (each may hold several, separated by commas, with display
    names); a bare name gets "@hostname", as Postfix appends myorigin.  UsageError for an
    address that is not one."""
    from txmta.inbound.grammar import GrammarError, parse_rcpt
    out = []
    for _, addr in getaddresses(list(words)):
        if not addr:
            continue
        if "@" not in addr:
            addr = f"{addr}@{hostname}"
        try:
            out.append(parse_rcpt(f"TO:<{addr}>", True).address)
        except GrammarError as e:
            raise UsageError(f"{addr}: not a valid recipient address ({e.reply.text})") from None
    return out


def parse_sender(text: str | None, login: str, hostname: str) -> Address:
    """-f's address ("" or "<>": the null sender), else login@hostname."""
    from txmta.inbound.grammar import GrammarError, parse_mail
    if text is None:
        text = f"{login}@{hostname}"
    text = text.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if text and "@" not in text:
        text = f"{text}@{hostname}"
    try:
        return parse_mail(f"FROM:<{text}>").sender
    except GrammarError as e:
        raise UsageError(f"-f {text}: not a valid sender address ({e.reply.text})") from None


def envelope_for(inv: Invocation, sender: Address, recipients: Sequence[Address],
                 message: bytes) -> Envelope:
    """The envelope: BODY from -B (else 8BITMIME when the message has 8-bit octets), SMTPUTF8
    when an address is not ASCII, NOTIFY (-N), RET (-R) and ENVID (-V)."""
    body = inv.body_type or ("8BITMIME" if any(b > 127 for b in message) else "7BIT")
    utf8 = not sender.is_ascii or any(not r.is_ascii for r in recipients)
    return Envelope(sender, tuple(Recipient(r, inv.notify) for r in recipients), None, body,
                    utf8, inv.ret, inv.envid)


# -- storing ----------------------------------------------------------------------------

class Failed(Exception):
    """Nothing was stored: exit with `code`, `text` on stderr."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class Submission:
    """The spool, queue and receiver of one sendmail run, over the reactor `reactor`."""

    def __init__(self, cfg: Any, reactor: Any, user: str) -> None:
        from txmta.events import EventIds
        from txmta.inbound.receiver import Receiver
        from txmta.partition import PARTITIONS
        from txmta.queue import Queue
        from txmta.spool.interface import SpoolFormatError
        from txmta.spool.lmdb import LmdbSpool
        self.cfg = cfg
        self.reactor = reactor
        self.user = user
        signer = None
        if cfg.dkim:       # read before the spool opens: a key we cannot read is an error
            from txmta.dkim import Signer
            signer = Signer.from_config(cfg)
        try:    # no partition of its own: no due reads, no removal of others' body files
            self.spool = LmdbSpool(cfg.spool.path, reactor, map_size=cfg.spool.map_size,
                                   max_map_size=cfg.spool.max_map_size,
                                   inline_limit=cfg.spool.inline_body_limit, partitions=())
        except SpoolFormatError as e:
            raise Failed(EX_CONFIG, str(e)) from None
        except Exception as e:     # lmdb.Error, OSError: permissions, a missing directory
            raise Failed(EX_CANTCREAT, f"cannot open the spool {cfg.spool.path}: {e} (the "
                         f"spool must be writable by the user running txmta-sendmail)") from None
        if cfg.webhooks:
            from txmta.webhooks.service import endpoint_id
            self.spool.set_hooks([(endpoint_id(w.url), frozenset(w.events))
                                  for w in cfg.webhooks])
        part = random.SystemRandom().randrange(PARTITIONS)
        self.queue = Queue(self.spool, reactor, hostname=cfg.server.hostname,
                           partitions=(part,), lanes=cfg.lanes,
                           drop_suppressed=cfg.suppression.action == "drop")
        self.queue.event_ids = EventIds(part, first=random.SystemRandom().getrandbits(32))
        self.receiver = Receiver(self.queue, cfg.server.hostname, reactor, signer,
                                 lanes=cfg.lanes)
        self.stored: list[str] = []        # queue ids committed

    def session(self) -> Any:
        from txmta.inbound.session import Session
        return Session("", 0, "sendmail", local_user=self.user)

    def suppressed(self, recipients: Sequence[Address]) -> Any:
        """Fires with {address: Suppression} of the recipients on the suppression list, read
        from the spool for these addresses only."""
        from txmta import suppression
        from txmta.spool import codec

        def fn(txn: Any, dbs: dict[bytes, Any]) -> dict[str, Any]:
            out = {}
            for r in recipients:
                key = suppression.key(str(r))
                raw = txn.get(key.encode("utf-8"), db=dbs[b"suppression"])
                if raw is not None:
                    out[key] = codec.decode_suppression(key, bytes(raw))
            return out
        return self.spool.read(fn)

    def close(self) -> Any:
        return self.spool.close()


def _exit_code(reply: Any) -> int:
    if reply.code < 400:
        return EX_OK
    if reply.code < 500:
        return EX_TEMPFAIL
    return EX_DATAERR


def wake(cfg: Any, message_ids: Sequence[str], verbose: bool) -> None:
    """Tell the running daemon of the new mail (the pickup socket); without a daemon the mail
    waits for its start."""
    from txmta.control import amp as control
    path = control.pickup_socket_path(cfg.spool.path)
    for mid in message_ids:
        try:
            control.call(path, control.Pickup, timeout=10.0, message_id=mid)
        except control.ControlError as e:
            if verbose:
                print(f"txmta-sendmail: {mid}: the daemon was not told ({e}); it is delivered "
                      "when the daemon runs", file=sys.stderr)
            return
        if verbose:
            print(f"txmta-sendmail: {mid}: the daemon was told", file=sys.stderr)


def login_name() -> tuple[str, str]:
    """(login, full name) of the real user id, from the password database."""
    try:
        pw = pwd.getpwuid(os.getuid())
    except KeyError:
        return str(os.getuid()), ""
    return pw.pw_name, pw.pw_gecos.split(",", 1)[0].strip()


def submit(cfg: Any, reactor: Any, inv: Invocation, data: bytes) -> Any:
    """Store the message `data` (standard input) as `inv` says; fires with the exit code (and
    has printed why on stderr when it is not 0)."""
    from twisted.internet.defer import fail, inlineCallbacks

    from txmta import suppression as S
    login, gecos = login_name()
    try:
        hostname = cfg.server.hostname
        sender = parse_sender(inv.sender, login, hostname)
        message = read_message(data, inv.ignore_dots)
        if len(message) > cfg.spool.max_message_size:
            raise Failed(EX_DATAERR, f"the message is {len(message)} octets, over "
                         f"spool.max_message_size ({cfg.spool.max_message_size})")
        prepared = prepare(message, inv.extract,
                           from_field(str(sender), inv.full_name or gecos or None))
        recipients = parse_recipients(inv.recipients, hostname)
        recipients += parse_recipients(prepared.header_recipients, hostname)
        unique = list(dict.fromkeys(recipients))
        if not unique:
            raise Failed(EX_NOUSER, "no recipients: give them as arguments, or -t to take "
                         "them from the To, Cc and Bcc fields")
        submission = Submission(cfg, reactor, login)
    except UsageError as e:
        return fail(Failed(EX_USAGE, str(e)))
    except Failed as e:
        return fail(e)

    @inlineCallbacks
    def run() -> Any:
        try:
            targets = unique
            found = yield submission.suppressed(unique)
            # "drop": the queue ends them at intake, as the daemon's does, from its mirror
            submission.queue.suppression.load(found.values())
            if cfg.suppression.action == "reject":     # as RCPT refuses them with 550
                now = reactor.seconds()
                targets = []
                for r in unique:
                    entry = found.get(S.key(str(r)))
                    if entry is not None and entry.expires > now:
                        print(f"txmta-sendmail: {S.rejection(str(r), entry).text}",
                              file=sys.stderr)
                    else:
                        targets.append(r)
                if not targets:
                    raise Failed(EX_NOUSER, "no recipient left: every one is suppressed")
            envelope = envelope_for(inv, sender, targets, prepared.message)
            intake = submission.receiver.begin(submission.session(), envelope)
            intake.write(prepared.message)
            reply = yield intake.finish()
            if reply.code >= 400:
                raise Failed(_exit_code(reply),      # 4xx (spool full, commit failed): 75
                             f"not stored: {reply.code} {reply.enhanced} {reply.text}")
            submission.stored.append(intake.message_id)
            if inv.verbose:
                print(f"txmta-sendmail: queued as {intake.message_id} for "
                      + ", ".join(str(r) for r in targets), file=sys.stderr)
            return EX_OK
        finally:
            yield submission.close()
    d = run()
    d.addCallback(lambda code: (code, submission.stored))
    return d


# -- -bs: SMTP on standard input and output ----------------------------------------------

@dataclass(frozen=True)
class LocalListener:
    """The listener settings of a -bs session (inbound/protocol.py ListenerSettings)."""
    address: str = "sendmail"
    tls: str = "none"
    auth: str = "none"
    bare_newlines: str = "fix"
    lane: str = ""


class _Noted:
    """An intake of a -bs session that notes its queue id once it is stored."""

    def __init__(self, intake: Any, stored: list[str]) -> None:
        self.intake = intake
        self.stored = stored

    def write(self, data: bytes) -> None:
        self.intake.write(data)

    def abort(self) -> None:
        self.intake.abort()

    def finish(self) -> Any:
        def note(reply: Any) -> Any:
            if reply.code < 400:
                self.stored.append(self.intake.message_id)
            return reply
        return self.intake.finish().addCallback(note)


class _Recording:
    """The receiver of a -bs session: the submission's, noting what it stored."""

    def __init__(self, submission: Submission) -> None:
        self.submission = submission

    def begin(self, session: Any, envelope: Envelope) -> _Noted:
        return _Noted(self.submission.receiver.begin(session, envelope), self.submission.stored)


class _StdioSMTP(SMTPServer):
    """The daemon's ESMTP server on standard input and output; `on_lost()` when it ends."""

    on_lost: Any = None

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason) if reason is not None else super().connectionLost()
        if self.on_lost is not None:
            self.on_lost()


class _StdioFactory(SMTPFactory):
    def buildProtocol(self, addr: Any) -> _StdioSMTP:
        return _StdioSMTP(self)


def serve_stdio(cfg: Any, reactor: Any, inv: Invocation) -> Any:
    """Speak the daemon's ESMTP on standard input and output until QUIT or end of input;
    fires with (exit code, queue ids stored)."""
    from twisted.internet import stdio
    from twisted.internet.defer import Deferred

    from txmta.inbound.policy import ServerPolicy
    login, _ = login_name()
    submission = Submission(cfg, reactor, login)
    done: Deferred[Any] = Deferred()

    def start(_: Any) -> None:
        policy = ServerPolicy(hostname=cfg.server.hostname,
                              max_message_size=cfg.spool.max_message_size,
                              max_recipients=cfg.server.max_recipients,
                              max_errors=cfg.server.max_errors,
                              command_timeout=cfg.server.command_timeout,
                              data_timeout=cfg.server.data_timeout,
                              command_time_limit=cfg.server.command_time_limit,
                              data_time_limit=cfg.server.data_time_limit)
        factory = _StdioFactory(policy, LocalListener(), _Recording(submission), reactor,
                              suppression=submission.queue.suppression,
                              reject_suppressed=cfg.suppression.action == "reject",
                              local_user=login)
        protocol = factory.buildProtocol(None)
        protocol.on_lost = lambda: submission.close().addBoth(
            lambda _: done.callback((EX_OK, submission.stored)))
        stdio.StandardIO(protocol, reactor=reactor)

    # the suppression list first: RCPT refuses suppressed addresses as the daemon does
    submission.queue.load_suppressions().addCallbacks(start, done.errback)
    return done


# -- main -------------------------------------------------------------------------------

def run_reactor(work: Any) -> tuple[int, list[str]]:
    """Run `work(reactor)` (a Deferred of (exit code, queue ids)) on the global reactor."""
    from txmta.tap import global_reactor
    reactor = global_reactor()
    result: list[Any] = []

    def go() -> None:
        from twisted.internet.defer import maybeDeferred
        d = maybeDeferred(work, reactor)

        def failed(f: Any) -> tuple[int, list[str]]:
            if f.check(Failed):
                print(f"txmta-sendmail: {f.value.text}", file=sys.stderr)
                return f.value.code, []
            print(f"txmta-sendmail: {f.getTraceback()}", file=sys.stderr)
            return EX_SOFTWARE, []
        d.addErrback(failed)
        d.addCallback(result.append)
        d.addBoth(lambda _: reactor.stop())
    reactor.callWhenRunning(go)
    reactor.run(installSignalHandlers=False)
    return result[0] if result else (EX_SOFTWARE, [])


def main(argv: Sequence[str] | None = None) -> int:
    from txmta import cli, config
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        inv = parse(args)
    except UsageError as e:
        print(f"txmta-sendmail: {e}\n{USAGE}", file=sys.stderr)
        return EX_USAGE
    # the daemon (another user, in the spool's group) must read and remove the body files
    # this process writes: group read/write, as Postfix's postdrop leaves maildrop files
    os.umask(0o007)
    conf = ["--config", inv.config] if inv.config else []
    if inv.mode == "p":
        return cli.main(["queue", "list", *conf])
    if inv.flush:
        return EX_OK if cli.main(["queue", "flush", *conf]) == 0 else EX_TEMPFAIL
    try:
        cfg = config.load(inv.config)
    except config.ConfigError as e:
        print(f"txmta-sendmail: {e}", file=sys.stderr)
        return EX_CONFIG
    if inv.mode == "s":
        def work(reactor: Any) -> Any:
            try:
                return serve_stdio(cfg, reactor, inv)
            except config.ConfigError as e:
                raise Failed(EX_CONFIG, str(e)) from None
    else:
        try:
            data = read_input(sys.stdin.buffer, inv.ignore_dots,
                              cfg.spool.max_message_size * 2 + 65536)
        except OSError as e:
            print(f"txmta-sendmail: cannot read the message: {e}", file=sys.stderr)
            return EX_DATAERR

        def work(reactor: Any) -> Any:
            try:
                return submit(cfg, reactor, inv, data)
            except config.ConfigError as e:
                raise Failed(EX_CONFIG, str(e)) from None
    code, stored = run_reactor(work)
    if stored:
        wake(cfg, stored, inv.verbose)
    return code


def mailq(argv: Sequence[str] | None = None) -> int:
    """`mailq [--json] [--lane L] [--limit N] [--after ID] [--config FILE]`: `txmta queue
    list`."""
    from txmta import cli
    return cli.main(["queue", "list", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
