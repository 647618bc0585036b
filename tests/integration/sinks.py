"""A scripted SMTP sink for the integration tests: a test peer, run in-process on threads.

`SmtpSink(host, port, **script)` listens on host:port (loopback only: 127.0.0.0/8), one
thread per connection, and records everything it sees:

* `transactions`: one `Transaction` per message accepted at the end of DATA (client IP, HELO,
  MAIL FROM, accepted RCPT TO list, the unstuffed data, time, TLS, AUTH user);
* `rcpt_log`: every RCPT with its reply code, `(client_ip, sender, rcpt, code)`;
* `connections`: one `Conn` per TCP connection (client IP, time, the commands it sent).

The script (keyword arguments, all optional):

* `replies`: overrides per command, e.g. `{"RCPT:bad@x.test": "550 5.1.1 no such user",
  "MAIL": "451 4.3.0 try later", "DOT": "554 5.6.0 no", "GREETING": "554 5.3.2 go away",
  "EHLO": ..., "DATA": ...}`.  "RCPT:<address>" matches one recipient (case-insensitive),
  "RCPT" every recipient.  A value may be a callable `(sink, session, argument) -> reply|None`.
* `greylist=True`: "451 4.7.1 Greylisted, please retry in N seconds" (N = `greylist_delay`)
  for the first RCPT of each (client IP, sender, recipient) triplet; accepted afterwards.
* `drop_in_data=N`: the first N transactions that reach DATA lose their connection in the
  middle of the content (after the first line of it), with no reply.
* `max_rcpts=K`: "452 4.5.3 Too many recipients" after K accepted recipients per transaction.
* `tls=(certfile, keyfile)`: offer STARTTLS (the socket is wrapped with `ssl` server-side).
* `auth={"user": "password"}`: offer AUTH (`auth_mechanisms`, default PLAIN LOGIN), only
  after STARTTLS when `tls` is given (`auth_needs_tls`, default True); `require_auth=True`
  refuses MAIL without it (530 5.7.0).  A wrong password is "535 5.7.8".
* `extensions`: the EHLO keywords (default PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES,
  plus STARTTLS / AUTH when set up); `esmtp=False` refuses EHLO (502) so clients use HELO.
* `accept_delay`: seconds to wait before the reply at the end of DATA, or a function of
  (sender, recipients) that says how long (a destination slow for some mail only).

`with SmtpSink(...) as sink:` starts and stops it; `sink.wait(pred, timeout)` waits (bounded)
for a condition on the sink.  It is not a full SMTP server: no BDAT, no size checks.
"""

from __future__ import annotations

import base64
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

GREYLIST_TEXT = "451 4.7.1 Greylisted, please retry in {delay} seconds"
DEFAULT_EXTENSIONS = ("PIPELINING", "SIZE 104857600", "8BITMIME", "ENHANCEDSTATUSCODES")
LINE_LIMIT = 1 << 20


@dataclass
class Transaction:
    client_ip: str
    helo: str
    mail_from: str
    rcpt_to: list[str]
    data: bytes
    time: float
    tls: bool
    auth_user: str | None
    conn: int                       # index into SmtpSink.connections


@dataclass
class Conn:
    client_ip: str
    time: float
    commands: list[str] = field(default_factory=list)
    tls: bool = False
    auth_user: str | None = None
    tls_at: int | None = None       # index in `commands` of the STARTTLS
    auth_at: int | None = None      # index in `commands` of the successful AUTH


class _Dropped(Exception):
    """The script drops this connection."""


class _Session:
    """One connection's state; runs in its own thread."""

    def __init__(self, sink: "SmtpSink", sock: socket.socket, client_ip: str) -> None:
        self.sink = sink
        self.sock: Any = sock
        self.rfile = sock.makefile("rb")
        self.client_ip = client_ip
        with sink.lock:
            self.conn_index = len(sink.connections)
            self.conn = Conn(client_ip, time.time())
            sink.connections.append(self.conn)
        self.helo = ""
        self.esmtp = False
        self.tls = False
        self.auth_user: str | None = None
        self.reset()

    def reset(self) -> None:
        self.mail_from: str | None = None
        self.rcpts: list[str] = []

    # -- I/O -------------------------------------------------------------------------------

    def send(self, reply: str | bytes) -> None:
        data = reply if isinstance(reply, bytes) else reply.encode("utf-8")
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
        self.sock.sendall(data)

    def readline(self) -> bytes:
        line = self.rfile.readline(LINE_LIMIT)
        if not line:
            raise EOFError
        return line

    def log(self, line: str) -> None:
        with self.sink.lock:
            self.conn.commands.append(line)

    # -- the dialogue ------------------------------------------------------------------------

    def run(self) -> None:
        greeting = self.sink.reply_for("GREETING", self, "") or f"220 {self.sink.name} ESMTP sink"
        self.send(greeting)
        if not greeting.startswith("2"):
            return
        while True:
            raw = self.readline().rstrip(b"\r\n")
            line = raw.decode("utf-8", "replace")
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            self.log(line if verb != "AUTH" else "AUTH " + arg.split(" ")[0])
            handler = getattr(self, "do_" + verb, None)
            if handler is None:
                self.send("502 5.5.2 command not recognized")
                continue
            if handler(arg) == "quit":
                return

    def do_EHLO(self, arg: str) -> None:
        override = self.sink.reply_for("EHLO", self, arg)
        if override:
            self.send(override)
            return
        if not self.sink.esmtp:
            self.send("502 5.5.2 no ESMTP here")
            return
        self.helo, self.esmtp = arg, True
        self.reset()
        lines = [self.sink.name] + self.sink.ehlo_keywords(self)
        self.send("".join(f"250{'-' if i < len(lines) - 1 else ' '}{t}\r\n"
                          for i, t in enumerate(lines)))

    def do_HELO(self, arg: str) -> None:
        self.helo = arg
        self.reset()
        self.send(self.sink.reply_for("HELO", self, arg) or f"250 {self.sink.name}")

    def do_STARTTLS(self, arg: str) -> None:
        if self.sink.tls is None or self.tls:
            self.send("502 5.5.1 STARTTLS not available")
            return
        self.send("220 2.0.0 Ready to start TLS")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*self.sink.tls)
        plain = self.sock
        try:
            self.sock = ctx.wrap_socket(plain, server_side=True)
        except (ssl.SSLError, OSError) as e:
            self.log(f"(TLS handshake failed: {e})")
            raise _Dropped from e
        with self.sink.lock:
            self.sink.active.discard(plain)
            self.sink.active.add(self.sock)
        self.rfile = self.sock.makefile("rb")
        self.tls = True
        self.helo, self.esmtp = "", False
        self.reset()
        with self.sink.lock:
            self.conn.tls = True
            self.conn.tls_at = len(self.conn.commands) - 1

    def do_AUTH(self, arg: str) -> None:
        if not self.sink.auth_offered(self) or self.auth_user is not None:
            self.send("503 5.5.1 AUTH not available")
            return
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        if mech not in self.sink.auth_mechanisms:
            self.send("504 5.5.4 mechanism not supported")
            return
        try:
            if mech == "PLAIN":
                if not initial:
                    self.send("334 ")
                    initial = self.readline().strip().decode()
                if initial == "*":
                    self.send("501 5.0.0 AUTH aborted")
                    return
                _, user, password = base64.b64decode(initial, validate=True).split(b"\0", 2)
            else:
                self.send("334 " + base64.b64encode(b"Username:").decode())
                u = self.readline().strip().decode()
                if u == "*":
                    self.send("501 5.0.0 AUTH aborted")
                    return
                self.send("334 " + base64.b64encode(b"Password:").decode())
                p = self.readline().strip().decode()
                if p == "*":
                    self.send("501 5.0.0 AUTH aborted")
                    return
                user, password = base64.b64decode(u), base64.b64decode(p)
        except (ValueError, UnicodeDecodeError):
            self.send("501 5.5.2 cannot decode the response")
            return
        name, pw = user.decode("utf-8", "replace"), password.decode("utf-8", "replace")
        with self.sink.lock:
            self.sink.auth_attempts.append((name, mech, self.tls))
        if self.sink.auth.get(name) == pw:
            self.auth_user = name
            with self.sink.lock:
                self.conn.auth_user = name
                self.conn.auth_at = len(self.conn.commands) - 1
            self.send("235 2.7.0 Authentication successful")
        else:
            self.send("535 5.7.8 Authentication credentials invalid")

    def do_MAIL(self, arg: str) -> None:
        if not self.helo:
            self.send("503 5.5.1 EHLO or HELO first")
            return
        if self.mail_from is not None:
            self.send("503 5.5.1 nested MAIL command")
            return
        if self.sink.require_auth and self.auth_user is None:
            self.send("530 5.7.0 Authentication required")
            return
        if not arg.upper().startswith("FROM:"):
            self.send("501 5.5.4 syntax: MAIL FROM:<address>")
            return
        sender = _path(arg[5:])
        override = self.sink.reply_for("MAIL", self, sender)
        if override and not override.startswith("2"):
            self.send(override)
            return
        self.mail_from = sender
        self.rcpts = []
        self.send(override or "250 2.1.0 Ok")

    def do_RCPT(self, arg: str) -> None:
        if self.mail_from is None:
            self.send("503 5.5.1 MAIL first")
            return
        if not arg.upper().startswith("TO:"):
            self.send("501 5.5.4 syntax: RCPT TO:<address>")
            return
        rcpt = _path(arg[3:])
        sink = self.sink
        reply = sink.reply_for("RCPT:" + rcpt.lower(), self, rcpt) or sink.reply_for("RCPT", self, rcpt)
        if reply is None and sink.max_rcpts is not None and len(self.rcpts) >= sink.max_rcpts:
            reply = "452 4.5.3 Too many recipients"
        if reply is None and sink.greylist:
            triplet = (self.client_ip, self.mail_from.lower(), rcpt.lower())
            with sink.lock:
                first = triplet not in sink.greylist_seen
                sink.greylist_seen.add(triplet)
            if first:
                reply = GREYLIST_TEXT.format(delay=sink.greylist_delay)
        reply = reply or "250 2.1.5 Ok"
        with sink.lock:
            sink.rcpt_log.append((self.client_ip, self.mail_from, rcpt, int(reply[:3])))
        if reply.startswith("2"):
            self.rcpts.append(rcpt)
        self.send(reply)

    def do_DATA(self, arg: str) -> None:
        if self.mail_from is None:
            self.send("503 5.5.1 MAIL first")
            return
        if not self.rcpts:
            self.send("554 5.5.1 no valid recipients")
            return
        override = self.sink.reply_for("DATA", self, "")
        if override and not override.startswith("3"):
            self.send(override)
            return
        with self.sink.lock:
            drop = self.sink.drops_left > 0
            if drop:
                self.sink.drops_left -= 1
                self.sink.dropped += 1
        self.send(override or "354 End data with <CR><LF>.<CR><LF>")
        lines: list[bytes] = []
        while True:
            line = self.readline()
            if line in (b".\r\n", b".\n"):
                break
            if drop:
                # the middle of the content: one line read, the rest left unread
                self.log("(dropped in DATA)")
                raise _Dropped
            lines.append(line[1:] if line.startswith(b".") else line)
        data = b"".join(lines)
        delay = self.sink.accept_delay
        if callable(delay):
            delay = delay(self.mail_from, list(self.rcpts))
        if delay:
            time.sleep(delay)
        override = self.sink.reply_for("DOT", self, "")
        if override and not override.startswith("2"):
            self.reset()
            self.send(override)
            return
        t = Transaction(self.client_ip, self.helo, self.mail_from, list(self.rcpts), data,
                        time.time(), self.tls, self.auth_user, self.conn_index)
        with self.sink.lock:
            self.sink.transactions.append(t)
            n = len(self.sink.transactions)
        if self.sink.on_message is not None:
            self.sink.on_message(t)
        self.reset()
        self.send(override or f"250 2.0.0 Ok: queued as S{n}")

    def do_RSET(self, arg: str) -> None:
        self.reset()
        self.send("250 2.0.0 Ok")

    def do_NOOP(self, arg: str) -> None:
        self.send("250 2.0.0 Ok")

    def do_QUIT(self, arg: str) -> str:
        self.send("221 2.0.0 Bye")
        return "quit"


def _path(text: str) -> str:
    """The address of "<a@b> PARAM=..." (or of a bare "a@b")."""
    text = text.strip()
    if text.startswith("<"):
        return text[1:text.find(">")] if ">" in text else text[1:]
    return text.split(" ")[0]


class _Handler(socketserver.BaseRequestHandler):
    server: "_Server"

    def handle(self) -> None:
        sink = self.server.sink
        sock: socket.socket = self.request
        sock.settimeout(sink.timeout)
        with sink.lock:
            sink.active.add(sock)
        session = _Session(sink, sock, self.client_address[0])
        try:
            session.run()
        except (_Dropped, EOFError, OSError, ssl.SSLError):
            pass
        finally:
            with sink.lock:
                sink.active.discard(sock)
                sink.active.discard(session.sock)
            try:
                session.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            session.sock.close()


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256

    def __init__(self, sink: "SmtpSink", address: tuple[str, int]) -> None:
        self.sink = sink
        super().__init__(address, _Handler)


class SmtpSink:
    def __init__(self, host: str = "127.0.0.21", port: int = 0, *, name: str = "sink.test.invalid",
                 replies: dict[str, Any] | None = None, greylist: bool = False,
                 greylist_delay: int = 2, drop_in_data: int = 0, max_rcpts: int | None = None,
                 tls: tuple[str, str] | None = None, auth: dict[str, str] | None = None,
                 auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN"), auth_needs_tls: bool = True,
                 require_auth: bool = False, extensions: list[str] | None = None,
                 esmtp: bool = True, accept_delay: Any = 0.0, timeout: float = 60.0,
                 on_message: Callable[[Transaction], Any] | None = None) -> None:
        assert host.startswith("127."), "test peers stay on loopback"
        self.host, self.port, self.name = host, port, name
        self.replies = {k if not k.upper().startswith("RCPT:") else "RCPT:" + k[5:].lower(): v
                        for k, v in (replies or {}).items()}
        self.greylist, self.greylist_delay = greylist, greylist_delay
        self.drops_left, self.dropped = drop_in_data, 0
        self.max_rcpts = max_rcpts
        self.tls = (str(tls[0]), str(tls[1])) if tls else None
        self.auth = dict(auth or {})
        self.auth_mechanisms = tuple(m.upper() for m in auth_mechanisms)
        self.auth_needs_tls = auth_needs_tls
        self.require_auth = require_auth
        self.extensions = extensions
        self.esmtp = esmtp
        self.accept_delay = accept_delay
        self.timeout = timeout
        self.on_message = on_message
        self.lock = threading.Lock()
        self.transactions: list[Transaction] = []
        self.rcpt_log: list[tuple[str, str, str, int]] = []
        self.connections: list[Conn] = []
        self.auth_attempts: list[tuple[str, str, bool]] = []   # (user, mechanism, over TLS)
        self.greylist_seen: set[tuple[str, str, str]] = set()
        self.active: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- script helpers (called by sessions) --------------------------------------------------

    def reply_for(self, key: str, session: _Session, arg: str) -> str | None:
        r = self.replies.get(key)
        if callable(r):
            r = r(self, session, arg)
        return r

    def auth_offered(self, session: _Session) -> bool:
        return bool(self.auth) and (session.tls or not (self.tls and self.auth_needs_tls))

    def ehlo_keywords(self, session: _Session) -> list[str]:
        if self.extensions is not None:
            kw = list(self.extensions)
        else:
            kw = list(DEFAULT_EXTENSIONS)
            if self.tls and not session.tls:
                kw.append("STARTTLS")
            if self.auth_offered(session):
                kw.append("AUTH " + " ".join(self.auth_mechanisms))
        return kw

    # -- running -----------------------------------------------------------------------------

    def start(self) -> "SmtpSink":
        self._server = _Server(self, (self.host, self.port))
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"sink-{self.host}:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self.lock:
            socks = list(self.active)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
        self._server = None

    def __enter__(self) -> "SmtpSink":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- reading what happened -----------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def snapshot(self) -> list[Transaction]:
        with self.lock:
            return list(self.transactions)

    def delivered_to(self) -> list[str]:
        """Every accepted recipient of every accepted transaction, in order."""
        return [r for t in self.snapshot() for r in t.rcpt_to]

    def wait(self, pred: Callable[["SmtpSink"], bool], timeout: float = 15.0,
             what: str = "the sink condition") -> None:
        deadline = time.monotonic() + timeout
        while not pred(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                     f"{len(self.transactions)} transactions, "
                                     f"{len(self.connections)} connections, rcpts {self.rcpt_log[-10:]}")
            time.sleep(0.02)

    def __iter__(self) -> Iterator[Transaction]:
        return iter(self.snapshot())
