"""The running daemon's admin interface: AMP commands over a UNIX socket.

The daemon listens on `control_socket_path(spool.path)` (mode 0600: only the daemon's user,
and root, may change the queue) and answers each command by calling an `IQueueControl`
(the queue); the `txmta` command is the client, through `call()`, a small blocking AMP
client on a plain socket so that the CLI needs no reactor.  One command per admin verb
(STYLE habit 15, as OpenSMTPD's smtpctl speaks imsg to smtpd):

    Flush(message_id?, domain?) -> count     make deferred recipients due now
    Hold(message_id) / Release / Delete / Requeue -> found
    Status() -> json                         {"messages": n, "pid": ..., "version": ...}
    Pickup(message_id) -> found              a message another process committed: deliver it
    SuppressionAdd(address, reason?) -> ok   suppress mail to an address
    SuppressionRemove(address) -> found      take it off the suppression list
    SuppressionImport(lines) -> count        many at once: newline-joined "address,reason"

This module does not decide anything about the queue; it carries requests and answers.
It does not read the configuration; `tap.py` passes the path and the queue control.
Wire format: AMP as twisted.protocols.amp speaks it: each box is a sequence of (2-byte
big-endian key length, key, 2-byte value length, value) ended by an empty key; a request
carries _command and _ask, an answer _answer, an error _error, _error_code and
_error_description.  A failure in the queue control is answered as the declared error
INTERNAL (`InternalError`), so the connection stays up and the CLI can show what broke.
"""
# test: tests/test_control.py

from __future__ import annotations

import json
import os
import socket
import stat
import struct
from typing import Any, Protocol

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IReactorUNIX
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

import txmta

CONTROL_SOCKET_NAME = "control.sock"
PICKUP_SOCKET_NAME = "pickup.sock"   # mode 0666: txmta-sendmail wakes the daemon (Pickup only)
CALL_TIMEOUT = 60.0        # seconds the CLI waits for the daemon's answer
# a flush of all answers when it is done: about 100 s for a million deferred recipients
FLUSH_TIMEOUT = 3600.0
INTERNAL_ERROR = b"INTERNAL"

_log = Logger()


# -- the commands --------------------------------------------------------------------------

class InternalError(Exception):
    """The daemon failed to carry out a command (a bug of ours); sent as INTERNAL."""


_ERRORS: dict[type[Exception], bytes] = {InternalError: INTERNAL_ERROR}


class Flush(amp.Command):
    """Make deferred recipients due now: of one message, of one domain, or all."""
    arguments = [(b"message_id", amp.Unicode(optional=True)),
                 (b"domain", amp.Unicode(optional=True))]
    response = [(b"count", amp.Integer())]
    errors = _ERRORS


class Hold(amp.Command):
    """Stop delivery attempts for a message's unfinished recipients until released."""
    arguments = [(b"message_id", amp.Unicode())]
    response = [(b"found", amp.Boolean())]
    errors = _ERRORS


class Release(amp.Command):
    """Undo Hold: the held recipients are queued again and due now."""
    arguments = [(b"message_id", amp.Unicode())]
    response = [(b"found", amp.Boolean())]
    errors = _ERRORS


class Delete(amp.Command):
    """Remove a message from the queue without a delivery status notification."""
    arguments = [(b"message_id", amp.Unicode())]
    response = [(b"found", amp.Boolean())]
    errors = _ERRORS


class Requeue(amp.Command):
    """Reset a message's unfinished recipients (attempts, greylisting) and make them due now."""
    arguments = [(b"message_id", amp.Unicode())]
    response = [(b"found", amp.Boolean())]
    errors = _ERRORS


class Status(amp.Command):
    """The daemon's status as JSON text."""
    arguments: list[tuple[bytes, amp.Argument]] = []
    response = [(b"json", amp.Unicode())]
    errors = _ERRORS


class SuppressionAdd(amp.Command):
    """Add an address to the suppression list (reason default "manual"); ok: it was stored."""
    arguments = [(b"address", amp.Unicode()),
                 (b"reason", amp.Unicode(optional=True))]
    response = [(b"ok", amp.Boolean())]
    errors = _ERRORS


class SuppressionRemove(amp.Command):
    """Take an address off the suppression list; found: it was on it."""
    arguments = [(b"address", amp.Unicode())]
    response = [(b"found", amp.Boolean())]
    errors = _ERRORS


class SuppressionImport(amp.Command):
    """Add many addresses: `lines` is newline-joined "address" or "address,reason" lines
    (an AMP value holds at most 65535 octets: the client sends a long list in several
    requests).  count: how many entries the queue stored."""
    arguments = [(b"lines", amp.Unicode())]
    response = [(b"count", amp.Integer())]
    errors = _ERRORS


class WebhookReplay(amp.Command):
    """Send a message's events (or one event, by its webhook-id) to the [[webhook]]
    endpoints that want them again; count: the deliveries queued."""
    arguments = [(b"message_id", amp.Unicode(optional=True)),
                 (b"event_id", amp.Unicode(optional=True))]
    response = [(b"count", amp.Integer())]
    errors = _ERRORS


class Pickup(amp.Command):
    """txmta-sendmail committed a message (due now) to the spool: wake the worker that owns
    it.  The one command of the pickup socket too (`PickupService`)."""
    arguments = [(b"message_id", amp.Unicode())]
    response = [(b"found", amp.Boolean())]
    errors = _ERRORS


COMMANDS: tuple[type[amp.Command], ...] = (Flush, Hold, Release, Delete, Requeue, Status,
                                           SuppressionAdd, SuppressionRemove, SuppressionImport,
                                           WebhookReplay, Pickup)


def import_entries(lines: str) -> list[tuple[str, str]]:
    """The (address, reason) pairs of a SuppressionImport's `lines`: each non-blank line is
    "address" or "address,reason" (split at the first comma; both stripped)."""
    entries = []
    for line in lines.splitlines():
        address, _, reason = line.partition(",")
        if address.strip():
            entries.append((address.strip(), reason.strip()))
    return entries


class IQueueControl(Protocol):
    """What the control socket asks of the queue.  Each method may return a value or a
    Deferred of it.  The queue's admin face (`txmta.faces.AdminQueue`) is one; the master's
    `FanOut` and a worker's `WorkerControl` (control/channel.py) are the others."""

    def flush(self, message_id: str | None, domain: str | None) -> "defer.Deferred[int]": ...
    def hold(self, message_id: str) -> "defer.Deferred[bool]": ...
    def release(self, message_id: str) -> "defer.Deferred[bool]": ...
    def delete(self, message_id: str) -> "defer.Deferred[bool]": ...
    def requeue(self, message_id: str) -> "defer.Deferred[bool]": ...
    def pickup(self, message_id: str) -> "defer.Deferred[bool]": ...
    def status(self) -> "defer.Deferred[dict[str, Any]]": ...
    def suppress_add(self, address: str, reason: str) -> "defer.Deferred[bool]": ...
    def suppress_remove(self, address: str) -> "defer.Deferred[bool]": ...
    def suppress_import(self, entries: list[tuple[str, str]]) -> "defer.Deferred[int]": ...
    def webhook_replay(self, message_id: str | None, event_id: str | None
                       ) -> "defer.Deferred[int]": ...


# -- the daemon side -------------------------------------------------------------------------

class ControlProtocol(amp.AMP):
    """Answers the control commands of one admin connection by calling the queue control."""

    def __init__(self, queue_control: IQueueControl) -> None:
        super().__init__()
        self.queue_control = queue_control

    def _ask(self, method: Any, *args: Any) -> defer.Deferred:
        """Call the queue control.  A failure there (our bug) is logged and answered as an
        INTERNAL error naming it; AMP's default would answer "Unknown Error" and close the
        connection."""
        def internal(failure: Failure) -> None:
            _log.failure("control command {method} failed", failure, method=method.__name__)
            raise InternalError(f"{failure.type.__name__}: {failure.getErrorMessage()}")
        return defer.maybeDeferred(method, *args).addErrback(internal)

    @Flush.responder
    def flush(self, message_id: str | None = None, domain: str | None = None) -> defer.Deferred:
        d = self._ask(self.queue_control.flush, message_id, domain)
        return d.addCallback(lambda n: {"count": int(n)})

    def _found(self, method: Any, message_id: str) -> defer.Deferred:
        return self._ask(method, message_id).addCallback(lambda f: {"found": bool(f)})

    @Hold.responder
    def hold(self, message_id: str) -> defer.Deferred:
        return self._found(self.queue_control.hold, message_id)

    @Release.responder
    def release(self, message_id: str) -> defer.Deferred:
        return self._found(self.queue_control.release, message_id)

    @Delete.responder
    def delete(self, message_id: str) -> defer.Deferred:
        return self._found(self.queue_control.delete, message_id)

    @Requeue.responder
    def requeue(self, message_id: str) -> defer.Deferred:
        return self._found(self.queue_control.requeue, message_id)

    @Pickup.responder
    def pickup(self, message_id: str) -> defer.Deferred:
        return self._found(self.queue_control.pickup, message_id)

    @Status.responder
    def status(self) -> defer.Deferred:
        def render(queue_status: dict[str, Any]) -> dict[str, str]:
            out: dict[str, Any] = {"pid": os.getpid(), "version": txmta.__version__}
            out.update(queue_status)
            return {"json": json.dumps(out, sort_keys=True)}
        return self._ask(self.queue_control.status).addCallback(render)

    @SuppressionAdd.responder
    def suppression_add(self, address: str, reason: str | None = None) -> defer.Deferred:
        d = self._ask(self.queue_control.suppress_add, address,
                      reason if reason is not None else "manual")
        return d.addCallback(lambda ok: {"ok": bool(ok)})

    @SuppressionRemove.responder
    def suppression_remove(self, address: str) -> defer.Deferred:
        return self._found(self.queue_control.suppress_remove, address)

    @SuppressionImport.responder
    def suppression_import(self, lines: str) -> defer.Deferred:
        d = self._ask(self.queue_control.suppress_import, import_entries(lines))
        return d.addCallback(lambda n: {"count": int(n)})

    @WebhookReplay.responder
    def webhook_replay(self, message_id: str | None = None, event_id: str | None = None
                       ) -> defer.Deferred:
        d = self._ask(self.queue_control.webhook_replay, message_id, event_id)
        return d.addCallback(lambda n: {"count": int(n)})


class ControlFactory(Factory):
    """Builds one ControlProtocol per admin connection, all sharing the queue control."""

    noisy = False

    def __init__(self, queue_control: IQueueControl) -> None:
        self.queue_control = queue_control

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        p = ControlProtocol(self.queue_control)
        p.factory = self
        return p


def control_factory(queue_control: IQueueControl) -> Factory:
    return ControlFactory(queue_control)


def control_socket_path(spool_path: str) -> str:
    """The control socket lives in the spool directory, which the daemon owns."""
    return os.path.join(spool_path, CONTROL_SOCKET_NAME)


def pickup_socket_path(spool_path: str) -> str:
    """The pickup socket, beside the control socket."""
    return os.path.join(spool_path, PICKUP_SOCKET_NAME)


class PickupProtocol(amp.AMP):
    """The pickup socket's side: answers Pickup and nothing else (AMP answers any other
    command as unhandled).  Whoever can reach the socket can only make the daemon look at
    its due mail sooner, as Postfix's world-writable pickup FIFO does."""

    def __init__(self, queue_control: IQueueControl) -> None:
        super().__init__()
        self.queue_control = queue_control

    @Pickup.responder
    def pickup(self, message_id: str) -> defer.Deferred:
        def failed(f: Failure) -> dict[str, bool]:
            _log.failure("pickup of {id} failed", f, id=message_id)
            return {"found": False}
        d = defer.maybeDeferred(self.queue_control.pickup, message_id)
        return d.addCallbacks(lambda found: {"found": bool(found)}, failed)


class ControlService(service.Service):
    """Listens on the control socket while running (`pickup=True`: on the pickup socket,
    mode 0666, where only Pickup is answered).

    A socket file left by a daemon that died is removed first; a socket another live daemon
    answers on is not (starting fails instead), nor is a file that is not a socket.
    `listenUNIX(mode=0o600)` chmods the socket before it listens, so nobody can connect
    through wider permissions in between.
    """

    def __init__(self, reactor: IReactorUNIX, path: str, queue_control: IQueueControl,
                 pickup: bool = False) -> None:
        self.reactor = reactor
        self.path = path
        self.queue_control = queue_control
        self.pickup = pickup
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        remove_stale_socket(self.path)
        if self.pickup:
            factory = Factory.forProtocol(lambda: PickupProtocol(self.queue_control))
            factory.noisy = False
            self.port = self.reactor.listenUNIX(self.path, factory, mode=0o666, wantPID=False)
        else:
            self.port = self.reactor.listenUNIX(self.path, control_factory(self.queue_control),
                                                mode=0o600, wantPID=False)
        super().startService()

    def stopService(self) -> defer.Deferred | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        return defer.maybeDeferred(port.stopListening)   # the Port removes the socket file


def remove_stale_socket(path: str) -> None:
    """Remove `path` if it is a socket nobody listens on; refuse if a daemon answers there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:        # ECONNREFUSED: nobody listens; the file is stale
        os.unlink(path)
        return
    finally:
        probe.close()
    raise ControlError(f"another daemon is listening on {path}")


# -- the blocking client (the txmta command) ---------------------------------------------------

class ControlError(Exception):
    """The control socket cannot be reached, or the daemon answered with an error."""


def encode_box(box: dict[bytes, bytes]) -> bytes:
    """One AMP box: (2-byte key length, key, 2-byte value length, value)..., then 0x0000."""
    out = []
    for k, v in box.items():
        if not 0 < len(k) <= amp.MAX_KEY_LENGTH:
            raise ValueError(f"AMP key length out of range: {k!r}")
        if len(v) > amp.MAX_VALUE_LENGTH:
            raise ValueError(f"AMP value too long for key {k!r}: {len(v)} bytes")
        out.append(struct.pack("!H", len(k)) + k + struct.pack("!H", len(v)) + v)
    out.append(b"\x00\x00")
    return b"".join(out)


class BoxReader:
    """Decodes AMP boxes from bytes received in arbitrary pieces."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def next_box(self) -> dict[bytes, bytes] | None:
        """The next complete box, or None if more bytes are needed."""
        box: dict[bytes, bytes] = {}
        pos, buf = 0, self.buffer
        while True:
            if len(buf) < pos + 2:
                return None
            (klen,) = struct.unpack_from("!H", buf, pos)
            pos += 2
            if klen == 0:
                self.buffer = buf[pos:]
                return box
            if klen > amp.MAX_KEY_LENGTH:
                raise ControlError(f"bad AMP answer: key length {klen}")
            if len(buf) < pos + klen + 2:
                return None
            key = buf[pos:pos + klen]
            pos += klen
            (vlen,) = struct.unpack_from("!H", buf, pos)
            pos += 2
            if len(buf) < pos + vlen:
                return None
            box[key] = buf[pos:pos + vlen]
            pos += vlen


def _command_name(command: type[amp.Command]) -> bytes:
    name = command.commandName
    return name if isinstance(name, bytes) else name.encode("ascii")


def request_box(command: type[amp.Command], ask: bytes, kwargs: dict[str, Any]) -> dict[bytes, bytes]:
    """The request box for `command` with `kwargs` (None for an optional argument: left out)."""
    known = {name.decode("ascii"): arg for name, arg in command.arguments}
    unknown = set(kwargs) - set(known)
    if unknown:
        raise TypeError(f"{command.__name__} takes no argument {', '.join(sorted(unknown))}")
    box = {b"_command": _command_name(command), b"_ask": ask}
    for name, arg in known.items():
        value = kwargs.get(name)
        if value is None:
            if not arg.optional:
                raise TypeError(f"{command.__name__} needs {name}")
            continue
        box[name.encode("ascii")] = arg.toString(value)
    return box


def parse_answer(command: type[amp.Command], box: dict[bytes, bytes]) -> dict[str, Any]:
    """The response of `command` from its answer box; ControlError for an error box."""
    if b"_error" in box:
        code = box.get(b"_error_code", b"").decode("utf-8", "replace")
        text = box.get(b"_error_description", b"").decode("utf-8", "replace")
        raise ControlError(f"the daemon answered {command.__name__} with an error: {code}: {text}")
    out: dict[str, Any] = {}
    for name, arg in command.response:
        key = name.decode("ascii")
        if name in box:
            try:
                out[key] = arg.fromString(box[name])
            except (ValueError, UnicodeDecodeError) as e:
                raise ControlError(f"bad AMP answer: {key}={box[name]!r}: {e}") from e
        elif arg.optional:
            out[key] = None
        else:
            raise ControlError(f"bad AMP answer to {command.__name__}: no {key}")
    return out


def timeout_for(command: type[amp.Command], kwargs: dict[str, Any]) -> float:
    """How long a caller waits for `command`'s answer: a flush of all, longer."""
    if command is Flush and kwargs.get("message_id") is None and kwargs.get("domain") is None:
        return FLUSH_TIMEOUT
    return CALL_TIMEOUT


def call(socket_path: str, command: type[amp.Command], timeout: float | None = None,
         **kwargs: Any) -> dict[str, Any]:
    """Send one command to the daemon at `socket_path` and return its response (blocking);
    `timeout` None: `timeout_for` the command."""
    if timeout is None:
        timeout = timeout_for(command, kwargs)
    ask = b"1"
    request = encode_box(request_box(command, ask, kwargs))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(socket_path)
        except (FileNotFoundError, NotADirectoryError):
            raise ControlError(
                f"is the daemon running? no control socket at {socket_path}") from None
        except ConnectionRefusedError:
            raise ControlError(f"is the daemon running? nothing answers on {socket_path} "
                               f"(a stale socket)") from None
        except PermissionError:
            raise ControlError(f"permission denied on {socket_path}: run this as the daemon's "
                               f"user or root") from None
        except OSError as e:
            raise ControlError(f"cannot connect to {socket_path}: {e.strerror or e}") from None
        try:
            sock.sendall(request)
            reader = BoxReader()
            while True:
                box = reader.next_box()
                if box is not None:
                    if box.get(b"_answer") == ask or box.get(b"_error") == ask:
                        return parse_answer(command, box)
                    continue                     # not ours (AMP allows it); keep reading
                data = sock.recv(65536)
                if not data:
                    raise ControlError(f"the daemon closed {socket_path} without answering")
                reader.feed(data)
        except socket.timeout:
            raise ControlError(f"no answer from the daemon on {socket_path} "
                               f"within {timeout:g} s") from None
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ControlError(f"the daemon closed {socket_path}: {e.strerror or e}") from None
    finally:
        sock.close()


# -- the asynchronous client (the HTTP API's admin endpoints, in a worker) -------------------

def call_async(reactor: Any, socket_path: str, command: type[amp.Command],
               timeout: float | None = None, **kwargs: Any) -> defer.Deferred:
    """`call()` on the reactor: one command over a new connection to the control socket,
    firing with its response, or failing with ControlError (no daemon, an error answer,
    no answer within `timeout`, by default `timeout_for` the command)."""
    if timeout is None:
        timeout = timeout_for(command, kwargs)
    from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
    args = {k: v for k, v in kwargs.items() if v is not None}
    endpoint = UNIXClientEndpoint(reactor, socket_path, timeout=int(timeout))
    d = connectProtocol(endpoint, amp.AMP())

    def connected(proto: amp.AMP) -> defer.Deferred:
        def close(result: Any) -> Any:
            proto.transport.loseConnection()
            return result
        return proto.callRemote(command, **args).addBoth(close)

    def failed(f: Failure) -> None:
        if f.check(ControlError):
            raise f.value
        if f.check(InternalError, amp.RemoteAmpError):
            raise ControlError(f"the daemon answered {command.__name__} with an error: "
                               f"{f.getErrorMessage()}")
        raise ControlError(f"cannot reach the daemon on {socket_path}: {f.getErrorMessage()}")

    d.addCallback(connected)
    d.addTimeout(timeout, reactor)
    return d.addErrback(failed)
