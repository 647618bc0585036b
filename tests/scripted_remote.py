"""`ScriptedRemote`: an SMTP server played from a table, for client tests (STYLE habit 8).

The table maps a command prefix (upper case, the longest match wins) to what the remote does:
a reply string (one line, or several separated by "\\n" written as given), raw `bytes`
(for garbage), `Delay(seconds, reply)` (answered after `clock.advance`), `Drop()` (close the
connection instead of answering) or `Silent()` (never answer: the remote hangs).  A list is
used one element per occurrence, its last element for every later one.  Special keys:
"GREETING", "EHLO" (default: built from `extensions`), "DOT" (the reply after the message
content), "AUTH-CONTINUE" (the reply to a line sent after a 334).

It records what it received: `lines` (every command line), `batches` (the command lines of
each `dataReceived` call, to see pipelining), `messages` (each message's content after
un-stuffing, with its CRLFs) and `raw` (all bytes).  No sockets: connect it to the client
with `twisted.test.iosim` (see `pair()`), whose fake TLS it can negotiate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test import iosim


@dataclass(frozen=True)
class Delay:
    seconds: float
    reply: "Action"


@dataclass(frozen=True)
class Drop:
    pass


@dataclass(frozen=True)
class Silent:
    pass


Action = Union[str, bytes, Delay, Drop, Silent]

HOSTNAME = "mx.example.net"
DEFAULT_EXTENSIONS = ("PIPELINING", "SIZE 10240000", "8BITMIME", "SMTPUTF8",
                      "ENHANCEDSTATUSCODES", "DSN")
DEFAULT_TABLE: dict[str, Any] = {
    "GREETING": f"220 {HOSTNAME} ESMTP scripted",
    "HELO": f"250 {HOSTNAME}",
    "MAIL": "250 2.1.0 Sender OK",
    "RCPT": "250 2.1.5 Recipient OK",
    "DATA": "354 Go ahead",
    "DOT": "250 2.0.0 Queued as 4711",
    "RSET": "250 2.0.0 OK",
    "NOOP": "250 2.0.0 OK",
    "QUIT": "221 2.0.0 Bye",
    "STARTTLS": "220 2.0.0 Ready to start TLS",
    "AUTH": "235 2.7.0 Authentication successful",
    "AUTH-CONTINUE": "235 2.7.0 Authentication successful",
}


class FakeTLSOptions:
    """What iosim's pretend TLS needs from each side's TLS options."""

    def __init__(self, ok: bool = True) -> None:
        self.ok = ok

    def iosimVerify(self, other: Any) -> bool:
        return self.ok and getattr(other, "ok", True)


class ScriptedRemote(Protocol):
    def __init__(self, table: dict[str, Any] | None = None, *, clock: Clock | None = None,
                 extensions: tuple[str, ...] = DEFAULT_EXTENSIONS,
                 tls_extensions: tuple[str, ...] | None = None,
                 tls_options: Any = None, drop_after_data_bytes: int | None = None) -> None:
        self.table = dict(DEFAULT_TABLE)
        self.table.update(table or {})
        self.clock = clock or Clock()
        self.extensions = extensions
        self.tls_extensions = tls_extensions if tls_extensions is not None else tuple(
            e for e in extensions if e.upper() != "STARTTLS")
        self.tls_options = tls_options or FakeTLSOptions()
        self.drop_after_data_bytes = drop_after_data_bytes
        self.lines: list[str] = []
        self.batches: list[list[str]] = []
        self.messages: list[bytes] = []
        self.raw = b""
        self.tls = False
        self.closed = False
        self._used: dict[str, int] = {}
        self._buffer = b""
        self._mode = "command"     # command | data | auth | hung
        self._data: list[bytes] = []
        self._data_bytes = 0
        self._busy = False         # a delayed reply is pending

    # -- connection -----------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._act("GREETING", "GREETING")

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        self._buffer += data
        self._batch: list[str] = []
        self.batches.append(self._batch)
        self._process()

    def _process(self) -> None:
        while not self._busy and not self.closed and self._mode != "hung":
            idx = self._buffer.find(b"\n")
            if idx < 0:
                return
            line, self._buffer = self._buffer[:idx + 1], self._buffer[idx + 1:]
            if self._mode == "data":
                self._data_line(line)
                continue
            text = line.rstrip(b"\r\n").decode("utf-8", "replace")
            self.lines.append(text)
            self._batch.append(text)
            if self._mode == "auth":
                self._mode = "command"
                self._act("AUTH-CONTINUE", text)
            else:
                self._act(self._key(text), text)

    def _data_line(self, line: bytes) -> None:
        self._data_bytes += len(line)
        if self.drop_after_data_bytes is not None and self._data_bytes >= self.drop_after_data_bytes:
            self.transport.loseConnection()  # type: ignore[union-attr]
            self.closed = True
            return
        if line == b".\r\n":
            self.messages.append(b"".join(self._data))
            self._data = []
            self._mode = "command"
            self._act("DOT", ".")
            return
        if line.startswith(b"."):
            line = line[1:]
        self._data.append(line)

    # -- the table ------------------------------------------------------------------------

    def _key(self, text: str) -> str:
        upper = text.upper()
        keys = [k for k in [*self.table, "EHLO"]
                if upper.startswith(k) and k not in ("DOT", "GREETING", "AUTH-CONTINUE")]
        return max(keys, key=len) if keys else ""

    def _next(self, key: str) -> Action | None:
        if key == "EHLO" and key not in self.table:
            exts = self.tls_extensions if self.tls else self.extensions
            return "\n".join(f"250{'-' if i < len(exts) else ' '}{line}"
                             for i, line in enumerate([f"{HOSTNAME} greets you", *exts]))
        value = self.table.get(key, "500 5.5.1 Command unrecognized")
        if isinstance(value, list):
            n = self._used.get(key, 0)
            self._used[key] = n + 1
            return value[min(n, len(value) - 1)]
        return value

    def _act(self, key: str, text: str) -> None:
        self._do(self._next(key), key)

    def _do(self, action: Action | None, key: str) -> None:
        if self.closed:
            return
        if isinstance(action, Drop):
            self.transport.loseConnection()  # type: ignore[union-attr]
            self.closed = True
            return
        if isinstance(action, Silent) or action is None:
            self._mode = "hung"
            return
        if isinstance(action, Delay):
            self._act_delay(action, key)
            return
        data = action if isinstance(action, bytes) else _render(action)
        self.transport.write(data)  # type: ignore[union-attr]
        code = data[:3]
        if key == "DATA" and code == b"354":
            self._mode = "data"
        elif key.startswith("AUTH") and code == b"334":
            self._mode = "auth"
        elif key == "STARTTLS" and code == b"220":
            self.transport.startTLS(self.tls_options)  # type: ignore[union-attr]
            self.tls = True
        elif key == "QUIT" and code == b"221":
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _act_delay(self, action: Delay, key: str) -> None:
        self._busy = True

        def later() -> None:
            self._busy = False
            self._do(action.reply, key)
            self._process()

        self.clock.callLater(action.seconds, later)


def _render(reply: str) -> bytes:
    """"250 2.0.0 OK" -> one line; "250-a\\n250 b" -> as written, CRLF line ends."""
    return "".join(line + "\r\n" for line in reply.split("\n")).encode("utf-8")


@dataclass
class Pair:
    client: Any
    remote: ScriptedRemote
    pump: iosim.IOPump
    clock: Clock
    results: list[Any] = field(default_factory=list)

    def flush(self) -> None:
        self.pump.flush()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.pump.flush()


def pair(client: Any, remote: ScriptedRemote, clock: Clock) -> Pair:
    """Connect `client` and `remote` through iosim fake transports and run the dialogue
    until neither side has anything to say."""
    remote.clock = clock
    server_io = iosim.FakeTransport(remote, isServer=True)
    client_io = iosim.FakeTransport(client, isServer=False)
    pump = iosim.connect(remote, server_io, client, client_io, greet=True, clock=clock)
    return Pair(client, remote, pump, clock)
