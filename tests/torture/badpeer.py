"""A next hop that misbehaves on purpose: the peer of tests/torture/test_bad_peers.py.

`BadPeer(host, port)` listens on a loopback address (127.0.0.0/8 only), one thread per
connection.  Each connection follows the `mode` the peer had when it was accepted, so a
test sets `peer.mode`, lets the daemon try, then sets `GOOD` and flushes:

* `GOOD`: a plain ESMTP server (PIPELINING when `pipelining` is set) that takes every
  message with "250 2.0.0 Ok: queued".
* `RESET_AFTER_MAIL`, `RESET_AFTER_RCPT`: reads MAIL (or answers MAIL and reads RCPT), then
  resets the connection (RST: SO_LINGER 0) without a reply.
* `RESET_IN_DATA`: answers DATA with 354, reads the first `reset_after_lines` lines of the
  content, then resets.
* `RESET_AFTER_DOT`: reads the whole message, records it (`answered=False`), then resets
  before its reply: the message may count as delivered (RFC 5321 6.1).
* `BYTE_BY_BYTE`: `GOOD`, with every reply written one byte per send() (TCP_NODELAY, a
  short pause between bytes), the multi-line EHLO reply too.
* `LONG_GREETING`, `LONG_MAIL_REPLY`: instead of the greeting (or the reply to MAIL),
  "250 " and `flood_size` bytes (10 MB) without a line end, 64 KiB per send(), until the
  client closes.
* `ENDLESS_EHLO`: answers EHLO with "250-" continuation lines of 1000 bytes, `flood_size`
  bytes of them, never the last line.
* `SILENT_CONNECT`, `SILENT_EHLO`, `SILENT_DOT`: never answers after the connection opens,
  after EHLO, or after the final dot (the message is recorded, `answered=False`); waits for
  the client to close.
* `SILENT_IN_DATA`: answers DATA with 354, then reads nothing more (its receive buffer is
  small: `RCVBUF`), so a big message fills the TCP window; waits for the client to close.

What it saw: `conns` (one `Conn` per connection: mode, when it opened and when the peer saw
it closed, the commands, the bytes of a flood sent before the client closed) and `messages`
(one `Received` per complete message content: mode, sender, recipients, the unstuffed data,
whether it was answered).
"""

from __future__ import annotations

import select
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

GOOD = "good"
RESET_AFTER_MAIL = "reset-after-mail"
RESET_AFTER_RCPT = "reset-after-rcpt"
RESET_IN_DATA = "reset-in-data"
RESET_AFTER_DOT = "reset-after-dot"
BYTE_BY_BYTE = "byte-by-byte"
LONG_GREETING = "long-greeting"
LONG_MAIL_REPLY = "long-mail-reply"
ENDLESS_EHLO = "endless-ehlo"
SILENT_CONNECT = "silent-connect"
SILENT_EHLO = "silent-ehlo"
SILENT_DOT = "silent-dot"
SILENT_IN_DATA = "silent-in-data"

NAME = "badpeer.test.invalid"
RCVBUF = 64 * 1024      # the listening socket's receive buffer (a small TCP window)
LINE_LIMIT = 1 << 20


@dataclass
class Conn:
    mode: str
    opened: float                    # time.monotonic()
    closed: float | None = None      # when the peer saw the client's close (EOF or RST)
    how: str = ""                    # "eof", "reset", or "by-peer" (our own reset)
    commands: list[str] = field(default_factory=list)
    flood_sent: int = 0              # bytes of a long reply line sent before the client closed

    @property
    def lifetime(self) -> float | None:
        return None if self.closed is None else self.closed - self.opened


@dataclass
class Received:
    mode: str
    conn: int                        # index into BadPeer.conns
    mail_from: str
    rcpt_to: list[str]
    data: bytes                      # unstuffed, without the final ".", with its last CRLF
    answered: bool


class _Closed(Exception):
    """The client closed (or reset) the connection."""


class _Session:
    def __init__(self, peer: "BadPeer", sock: socket.socket, index: int) -> None:
        self.peer = peer
        self.sock = sock
        self.index = index
        self.conn = peer.conns[index]
        self.mode = self.conn.mode
        self.buf = b""
        self.mail_from = ""
        self.rcpt_to: list[str] = []

    # -- I/O ------------------------------------------------------------------------------

    def send(self, text: str) -> None:
        data = text.replace("\n", "\r\n").encode() + b"\r\n"
        if self.mode == BYTE_BY_BYTE:
            for i in range(len(data)):
                self.sock.sendall(data[i:i + 1])
                time.sleep(self.peer.byte_pause)
        else:
            self.sock.sendall(data)

    def recv(self) -> bytes:
        """What the client sent next; _Closed (noting how) when it reset or closed."""
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            self.closed("reset")
            raise _Closed() from None
        if not chunk:
            self.closed("eof")
            raise _Closed()
        return chunk

    def readline(self) -> bytes:
        while b"\n" not in self.buf:
            if len(self.buf) > LINE_LIMIT:
                raise _Closed("line too long")
            self.buf += self.recv()
        line, self.buf = self.buf.split(b"\n", 1)
        return line.rstrip(b"\r")

    def closed(self, how: str) -> None:
        if self.conn.closed is None:
            self.conn.closed = time.monotonic()
            self.conn.how = how

    def reset(self) -> None:
        """RST, not FIN: SO_LINGER with a zero timeout."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.closed("by-peer")
        self.sock.close()
        raise _Closed()

    def wait_for_close(self) -> None:
        """Say nothing; read (and drop) whatever comes until the client closes."""
        while True:
            self.recv()

    def wait_for_close_unread(self) -> None:
        """Say nothing and read nothing (the data stays in the TCP window) until the client
        closes."""
        poller = select.poll()
        poller.register(self.sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        while not poller.poll(1000):
            pass
        error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.closed("reset" if error else "eof")
        raise _Closed()

    def flood(self, chunk: bytes = b"x" * 65536, first: bytes = b"250 ") -> None:
        """One reply line that never ends (or the `chunk` given), until the client closes."""
        try:
            self.sock.sendall(first)
            while self.conn.flood_sent < self.peer.flood_size:
                n = min(len(chunk), self.peer.flood_size - self.conn.flood_sent)
                self.sock.sendall(chunk[:n])
                self.conn.flood_sent += n
        except (ConnectionResetError, BrokenPipeError):
            self.closed("reset")
            raise _Closed() from None
        self.wait_for_close()

    # -- the dialogue ---------------------------------------------------------------------

    def run(self) -> None:
        if self.mode == SILENT_CONNECT:
            self.wait_for_close()
        if self.mode == LONG_GREETING:
            self.flood()
        self.send(f"220 {NAME} ESMTP")
        while True:
            line = self.readline()
            text = line.decode("utf-8", "replace")
            self.conn.commands.append(text)
            verb, _, arg = text.partition(" ")
            verb = verb.upper()
            if verb in ("EHLO", "HELO"):
                if self.mode == SILENT_EHLO:
                    self.wait_for_close()
                if self.mode == ENDLESS_EHLO:
                    self.flood((b"250-" + b"y" * 994 + b"\r\n") * 64, b"250-hello\r\n")
                keywords = ["PIPELINING"] if self.peer.pipelining else []
                keywords += ["SIZE 104857600", "8BITMIME", "ENHANCEDSTATUSCODES"]
                if verb == "HELO":
                    keywords = []
                self.send("\n".join([f"250-{NAME} hello"] + [f"250-{k}" for k in keywords[:-1]]
                                    + [f"250 {k}" for k in keywords[-1:]])
                          if keywords else f"250 {NAME} hello")
            elif verb == "MAIL":
                if self.mode == RESET_AFTER_MAIL:
                    self.reset()
                if self.mode == LONG_MAIL_REPLY:
                    self.flood()
                self.mail_from, self.rcpt_to = _path(arg), []
                self.send("250 2.1.0 Ok")
            elif verb == "RCPT":
                if self.mode == RESET_AFTER_RCPT:
                    self.reset()
                self.rcpt_to.append(_path(arg))
                self.send("250 2.1.5 Ok")
            elif verb == "DATA":
                self.data()
            elif verb == "RSET":
                self.mail_from, self.rcpt_to = "", []
                self.send("250 2.0.0 Ok")
            elif verb == "NOOP":
                self.send("250 2.0.0 Ok")
            elif verb == "QUIT":
                self.send("221 2.0.0 Bye")
                self.closed("eof")
                return
            else:
                self.send("502 5.5.2 Command not recognized")

    def data(self) -> None:
        if not self.rcpt_to:
            self.send("554 5.5.1 No valid recipients")
            return
        self.send("354 End data with <CR><LF>.<CR><LF>")
        if self.mode == SILENT_IN_DATA:
            self.wait_for_close_unread()
        lines: list[bytes] = []
        while True:
            line = self.readline()
            if line == b".":
                break
            lines.append(line[1:] if line.startswith(b".") else line)
            if self.mode == RESET_IN_DATA and len(lines) >= self.peer.reset_after_lines:
                self.reset()
        data = b"".join(line + b"\r\n" for line in lines)
        answered = self.mode not in (RESET_AFTER_DOT, SILENT_DOT)
        with self.peer.lock:
            self.peer.messages.append(Received(self.mode, self.index, self.mail_from,
                                               list(self.rcpt_to), data, answered))
        if self.mode == RESET_AFTER_DOT:
            self.reset()
        if self.mode == SILENT_DOT:
            self.wait_for_close()
        self.mail_from, self.rcpt_to = "", []
        self.send("250 2.0.0 Ok: queued")


def _path(arg: str) -> str:
    """The address of "FROM:<a@b> PARAMS" / "TO:<a@b>"."""
    _, _, rest = arg.partition(":")
    rest = rest.strip()
    if rest.startswith("<"):
        return rest[1:rest.find(">")] if ">" in rest else rest[1:]
    return rest.split(" ", 1)[0]


class _Handler(socketserver.BaseRequestHandler):
    server: "_Server"

    def handle(self) -> None:
        peer = self.server.peer
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with peer.lock:
            peer.conns.append(Conn(peer.mode, time.monotonic()))
            index = len(peer.conns) - 1
            peer.live.add(sock)
        try:
            _Session(peer, sock, index).run()
        except (_Closed, OSError):
            pass
        finally:
            with peer.lock:
                peer.live.discard(sock)
            if peer.conns[index].closed is None:
                peer.conns[index].closed = time.monotonic()
                peer.conns[index].how = "error"


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, peer: "BadPeer", address: tuple[str, int]) -> None:
        self.peer = peer
        super().__init__(address, _Handler, bind_and_activate=False)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        try:
            self.server_bind()
            self.server_activate()
        except BaseException:
            self.server_close()
            raise


class BadPeer:
    def __init__(self, host: str, port: int = 0, *, mode: str = GOOD, pipelining: bool = False,
                 flood_size: int = 10 * 1024 * 1024, reset_after_lines: int = 1,
                 byte_pause: float = 0.001) -> None:
        assert host.startswith("127."), "loopback only"
        self.mode = mode
        self.pipelining = pipelining
        self.flood_size = flood_size
        self.reset_after_lines = reset_after_lines
        self.byte_pause = byte_pause
        self.conns: list[Conn] = []
        self.messages: list[Received] = []
        self.live: set[socket.socket] = set()
        self.lock = threading.Lock()
        self._server = _Server(self, (host, port))
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> "BadPeer":
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self.lock:
            for sock in list(self.live):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "BadPeer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def snapshot(self) -> tuple[list[Conn], list[Received]]:
        with self.lock:
            return list(self.conns), list(self.messages)

    def wait(self, pred: Callable[["BadPeer"], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = pred(self)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                     f"connections: {self.conns!r}")
            time.sleep(0.02)
