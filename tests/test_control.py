"""control.amp: the daemon's admin interface.  The AMP responder is tested through
`twisted.test.iosim` against a fake queue control (no sockets); the blocking `call()` that the
`txmta` command uses is tested over real UNIX sockets: against the real ControlProtocol served
by a small thread, and once end to end against ControlService on a private reactor instance
running in a thread (never the global reactor)."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols import amp
from twisted.test import iosim

import txmta
from txmta.control import amp as control
from txmta.control.amp import (BoxReader, ControlError, ControlProtocol, ControlService, Delete,
                               Flush, Hold, Pickup, PickupProtocol, Release, Requeue, Status,
                               SuppressionAdd,
                               SuppressionImport, SuppressionRemove, call, control_factory,
                               control_socket_path, encode_box, import_entries)


class FakeQueueControl:
    """Implements IQueueControl over a set of message ids; records every call."""

    def __init__(self, ids: set[str] = frozenset({"0000AAAAAAAAbcdf"}), asynchronous: bool = False):
        self.ids = set(ids)
        self.calls: list[tuple[Any, ...]] = []
        self.asynchronous = asynchronous
        self.pending: list[tuple[defer.Deferred, Any]] = []
        self.suppressed: dict[str, str] = {}

    def _answer(self, value: Any) -> Any:
        if not self.asynchronous:
            return value
        d: defer.Deferred = defer.Deferred()
        self.pending.append((d, value))
        return d

    def fire_pending(self) -> None:
        pending, self.pending = self.pending, []
        for d, value in pending:
            d.callback(value)

    def flush(self, message_id, domain):
        self.calls.append(("flush", message_id, domain))
        if message_id is not None:
            return self._answer(1 if message_id in self.ids else 0)
        return self._answer(7)

    def _by_id(self, verb, message_id):
        self.calls.append((verb, message_id))
        if message_id == "boom":
            raise RuntimeError("the queue broke")
        return self._answer(message_id in self.ids)

    def hold(self, message_id):
        return self._by_id("hold", message_id)

    def release(self, message_id):
        return self._by_id("release", message_id)

    def delete(self, message_id):
        return self._by_id("delete", message_id)

    def requeue(self, message_id):
        return self._by_id("requeue", message_id)

    def pickup(self, message_id):
        return self._by_id("pickup", message_id)

    def status(self):
        self.calls.append(("status",))
        return self._answer({"messages": 2, "recipients": 3})

    def suppress_add(self, address, reason):
        self.calls.append(("suppress_add", address, reason))
        if address == "boom@example.com":
            raise RuntimeError("the spool broke")
        self.suppressed[address] = reason
        return self._answer(True)

    def suppress_remove(self, address):
        self.calls.append(("suppress_remove", address))
        return self._answer(self.suppressed.pop(address, None)
                            is not None)

    def suppress_import(self, entries):
        self.calls.append(("suppress_import", list(entries)))
        for address, reason in entries:
            self.suppressed[address] = reason
        return self._answer(len(entries))


def connect(queue_control):
    """An AMP client talking to ControlProtocol(queue_control) through iosim."""
    client, server, pump = iosim.connectedServerAndClient(
        lambda: ControlProtocol(queue_control), amp.AMP)
    return client, pump


def capture(d: defer.Deferred):
    """Attach to `d` at once (before pumping, so AMP's own unhandled-error handler never
    sees a failure); the returned function gives its result or raises its failure."""
    box: list[Any] = []
    d.addBoth(box.append)

    def result() -> Any:
        assert box, "no answer yet"
        if hasattr(box[0], "raiseException"):
            box[0].raiseException()
        return box[0]
    return result


MID = "0000AAAAAAAAbcdf"


# -- the responder, through iosim ----------------------------------------------------------------

@pytest.mark.parametrize("kwargs, called, count", [
    ({}, ("flush", None, None), 7),
    ({"message_id": MID}, ("flush", MID, None), 1),
    ({"domain": "example.com"}, ("flush", None, "example.com"), 7),
    ({"message_id": "nope"}, ("flush", "nope", None), 0),
])
def test_flush_passes_optional_id_and_domain_and_returns_count(kwargs, called, count):
    """Flush's message_id and domain are optional; the queue's count comes back."""
    qc = FakeQueueControl()
    client, pump = connect(qc)
    got = capture(client.callRemote(Flush, **kwargs))
    pump.flush()
    assert got() == {"count": count}
    assert qc.calls == [called]


@pytest.mark.parametrize("command, verb", [(Hold, "hold"), (Release, "release"),
                                           (Delete, "delete"), (Requeue, "requeue"),
                                           (Pickup, "pickup")])
@pytest.mark.parametrize("message_id, found", [(MID, True), ("0000ZZZZZZZZzzzz", False)])
def test_id_commands_call_the_queue_and_say_whether_the_message_was_found(
        command, verb, message_id, found):
    """Hold, Release, Delete and Requeue each call the queue method of the same name."""
    qc = FakeQueueControl()
    client, pump = connect(qc)
    got = capture(client.callRemote(command, message_id=message_id))
    pump.flush()
    assert got() == {"found": found}
    assert qc.calls == [(verb, message_id)]


def test_status_is_json_with_pid_and_version():
    """Status answers JSON: the queue's figures plus the daemon's pid and version."""
    qc = FakeQueueControl()
    client, pump = connect(qc)
    got = capture(client.callRemote(Status))
    pump.flush()
    status = json.loads(got()["json"])
    assert status == {"messages": 2, "recipients": 3, "pid": os.getpid(),
                      "version": txmta.__version__}


@pytest.mark.parametrize("kwargs, reason", [
    ({"address": "a@example.com"}, "manual"),
    ({"address": "a@example.com", "reason": "complaint"}, "complaint"),
])
def test_suppression_add_calls_suppress_add(kwargs, reason):
    """SuppressionAdd's reason is optional ("manual" without one); ok comes back."""
    qc = FakeQueueControl()
    client, pump = connect(qc)
    got = capture(client.callRemote(SuppressionAdd, **kwargs))
    pump.flush()
    assert got() == {"ok": True}
    assert qc.calls == [("suppress_add", "a@example.com", reason)]


def test_suppression_remove_says_whether_the_address_was_listed():
    qc = FakeQueueControl()
    qc.suppressed = {"a@example.com": "manual"}
    client, pump = connect(qc)
    first = capture(client.callRemote(SuppressionRemove, address="a@example.com"))
    second = capture(client.callRemote(SuppressionRemove, address="a@example.com"))
    pump.flush()
    assert first() == {"found": True} and second() == {"found": False}
    assert qc.calls == [("suppress_remove", "a@example.com")] * 2


def test_suppression_import_passes_address_reason_pairs_and_returns_the_count():
    """The newline-joined lines become (address, reason) pairs (split at the first comma,
    blank lines skipped, no reason: "")."""
    qc = FakeQueueControl(asynchronous=True)
    client, pump = connect(qc)
    got = capture(client.callRemote(
        SuppressionImport, lines="a@example.com,invalid-recipient\n\nb@exämple.com\n"
                                 " c@example.net , complaint, by phone "))
    pump.flush()
    qc.fire_pending()
    pump.flush()
    assert got() == {"count": 3}
    assert qc.calls == [("suppress_import", [("a@example.com", "invalid-recipient"),
                                             ("b@exämple.com", ""),
                                             ("c@example.net", "complaint, by phone")])]


def test_import_entries():
    assert import_entries("") == []
    assert import_entries("a@x\r\n,orphan reason\n  \nb@x,r") == [("a@x", ""), ("b@x", "r")]


def test_a_failing_suppress_add_is_an_internal_error():
    qc = FakeQueueControl()
    client, pump = connect(qc)
    got = capture(client.callRemote(SuppressionAdd, address="boom@example.com"))
    pump.flush()
    with pytest.raises(control.InternalError, match="^RuntimeError: the spool broke$"):
        got()


def test_answers_wait_for_the_queue_deferred():
    """The answer goes out only when the queue's Deferred fires."""
    qc = FakeQueueControl(asynchronous=True)
    client, pump = connect(qc)
    got = capture(client.callRemote(Hold, message_id=MID))
    pump.flush()
    with pytest.raises(AssertionError, match="no answer yet"):
        got()
    qc.fire_pending()
    pump.flush()
    assert got() == {"found": True}


def test_a_failing_queue_becomes_an_amp_error_not_a_dropped_connection():
    """A bug in the queue control answers an INTERNAL error naming it, and the connection
    keeps working (AMP's default would close it after "Unknown Error")."""
    qc = FakeQueueControl()
    client, pump = connect(qc)
    got = capture(client.callRemote(Delete, message_id="boom"))
    pump.flush()
    with pytest.raises(control.InternalError, match="^RuntimeError: the queue broke$"):
        got()
    got = capture(client.callRemote(Delete, message_id=MID))
    pump.flush()
    assert got() == {"found": True}


def test_factory_builds_control_protocols():
    qc = FakeQueueControl()
    p = control_factory(qc).buildProtocol(None)
    assert isinstance(p, ControlProtocol) and p.queue_control is qc


def test_control_socket_is_in_the_spool_directory():
    assert control_socket_path("/var/spool/txmta") == "/var/spool/txmta/control.sock"


# -- the box codec -------------------------------------------------------------------------------

def test_box_encoding_is_amp_wire_format():
    """2-byte big-endian key length, key, 2-byte value length, value; an empty key ends the box."""
    assert encode_box({b"_ask": b"1", b"k": b""}) == (
        b"\x00\x04_ask\x00\x011" + b"\x00\x01k\x00\x00" + b"\x00\x00")


def test_box_encoding_matches_twisted_amp():
    """Our encoder produces what twisted.protocols.amp produces for the same box."""
    box = {b"_ask": b"1", b"_command": b"Flush", b"domain": "exämple.com".encode()}  # AmpBox sorts
    assert encode_box(box) == amp.AmpBox(box).serialize()


def test_box_reader_handles_boxes_split_anywhere():
    """Boxes arriving one byte at a time, two in one piece, are decoded in order."""
    wire = encode_box({b"_answer": b"1", b"count": b"3"}) + encode_box({b"_answer": b"2"})
    reader = BoxReader()
    boxes = []
    for i in range(len(wire)):
        reader.feed(wire[i:i + 1])
        while (box := reader.next_box()) is not None:
            boxes.append(box)
    assert boxes == [{b"_answer": b"1", b"count": b"3"}, {b"_answer": b"2"}]


def test_request_box_leaves_out_absent_optional_arguments():
    box = control.request_box(Flush, b"1", {"domain": "example.com"})
    assert box == {b"_command": b"Flush", b"_ask": b"1", b"domain": b"example.com"}


@pytest.mark.parametrize("command, kwargs", [(Hold, {}), (Flush, {"id": "x"})])
def test_request_box_refuses_missing_or_unknown_arguments(command, kwargs):
    with pytest.raises(TypeError):
        control.request_box(command, b"1", kwargs)


def test_an_error_box_is_a_control_error_naming_code_and_description():
    box = {b"_error": b"1", b"_error_code": b"UNHANDLED", b"_error_description": b"Unhandled Command: 'Requeue'"}
    with pytest.raises(ControlError, match="UNHANDLED: Unhandled Command"):
        control.parse_answer(Requeue, box)


# -- call(): real UNIX sockets -------------------------------------------------------------------

class ThreadServer:
    """Serves ControlProtocol on a real UNIX socket from a thread, without a reactor: the
    bytes read are fed to the protocol, whatever it writes to its StringTransport is sent
    back.  Works because the fake queue control answers synchronously."""

    def __init__(self, path: str, queue_control: Any) -> None:
        self.path = path
        self.queue_control = queue_control
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(1)
        self.sock.settimeout(0.05)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                proto = ControlProtocol(self.queue_control)
                transport = StringTransport()
                proto.makeConnection(transport)
                while data := conn.recv(4096):
                    proto.dataReceived(data)
                    if out := transport.value():
                        transport.clear()
                        conn.sendall(out)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def served(tmp_path):
    qc = FakeQueueControl()
    server = ThreadServer(str(tmp_path / "control.sock"), qc)
    yield server
    server.close()


def test_call_round_trip_over_a_unix_socket(served):
    """call() speaks AMP by hand over a plain socket and decodes each command's response."""
    path, qc = served.path, served.queue_control
    assert call(path, Flush) == {"count": 7}
    assert call(path, Flush, message_id=MID, domain=None) == {"count": 1}
    assert call(path, Flush, domain="exämple.com") == {"count": 7}
    assert call(path, Hold, message_id=MID) == {"found": True}
    assert call(path, Release, message_id="0000ZZZZZZZZzzzz") == {"found": False}
    assert call(path, Delete, message_id=MID) == {"found": True}
    assert call(path, Requeue, message_id=MID) == {"found": True}
    assert json.loads(call(path, Status)["json"])["messages"] == 2
    assert qc.calls[:3] == [("flush", None, None), ("flush", MID, None),
                            ("flush", None, "exämple.com")]


def test_call_round_trip_of_the_suppression_commands(served):
    """call() with each suppression command, optional reason left out or given."""
    path, qc = served.path, served.queue_control
    assert call(path, SuppressionAdd, address="a@example.com") == {"ok": True}
    assert call(path, SuppressionAdd, address="b@exämple.com", reason="complaint") == {"ok": True}
    assert call(path, SuppressionImport, lines="c@example.com,x\nd@example.com") == {"count": 2}
    assert call(path, SuppressionRemove, address="a@example.com") == {"found": True}
    assert call(path, SuppressionRemove, address="a@example.com") == {"found": False}
    assert qc.calls == [("suppress_add", "a@example.com", "manual"),
                        ("suppress_add", "b@exämple.com", "complaint"),
                        ("suppress_import", [("c@example.com", "x"), ("d@example.com", "")]),
                        ("suppress_remove", "a@example.com"),
                        ("suppress_remove", "a@example.com")]
    assert qc.suppressed == {"b@exämple.com": "complaint", "c@example.com": "x",
                             "d@example.com": ""}


def test_commands_table_has_the_suppression_commands():
    assert {SuppressionAdd, SuppressionRemove, SuppressionImport} <= set(control.COMMANDS)


def test_call_reports_the_daemons_error(served):
    with pytest.raises(ControlError, match="error: INTERNAL: RuntimeError: the queue broke"):
        call(served.path, Delete, message_id="boom")


def test_call_without_a_socket_asks_whether_the_daemon_runs(tmp_path):
    path = str(tmp_path / "control.sock")
    with pytest.raises(ControlError, match=f"is the daemon running\\? no control socket at {path}"):
        call(path, Status)


def test_call_on_a_stale_socket_says_nothing_answers(tmp_path):
    path = str(tmp_path / "control.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)                     # bound, never listening: what a dead daemon leaves
    try:
        with pytest.raises(ControlError, match="is the daemon running\\? nothing answers"):
            call(path, Status)
    finally:
        s.close()


def test_call_when_the_daemon_hangs_up(tmp_path):
    path = str(tmp_path / "control.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)

    def hang_up():
        conn, _ = s.accept()
        conn.recv(4096)
        conn.close()

    t = threading.Thread(target=hang_up, daemon=True)
    t.start()
    try:
        with pytest.raises(ControlError, match="closed .* without answering"):
            call(path, Status, timeout=5)
    finally:
        t.join(5)
        s.close()


def test_call_times_out(tmp_path):
    path = str(tmp_path / "control.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)                      # accepted by the kernel, never answered
    try:
        with pytest.raises(ControlError, match="no answer"):
            call(path, Status, timeout=0.2)
    finally:
        s.close()


def test_a_flush_of_all_is_waited_for_longer_than_other_commands():
    """A flush of all answers when it is done (minutes on a queue of a million): the CLI and
    the API wait an hour for it, 60 s for anything else, a flush of one message or of a
    domain (which answers before its batches) included."""
    from txmta.control.amp import CALL_TIMEOUT, FLUSH_TIMEOUT, timeout_for
    assert timeout_for(Flush, {}) == timeout_for(Flush, {"domain": None}) == FLUSH_TIMEOUT
    assert timeout_for(Flush, {"domain": "example.com"}) == CALL_TIMEOUT
    assert timeout_for(Flush, {"message_id": MID, "domain": None}) == CALL_TIMEOUT
    assert timeout_for(Hold, {"message_id": MID}) == timeout_for(Status, {}) == CALL_TIMEOUT
    assert FLUSH_TIMEOUT > CALL_TIMEOUT


# -- the pickup socket --------------------------------------------------------------------------

def test_the_pickup_protocol_answers_pickup_and_nothing_else():
    """Anyone may reach the pickup socket: Pickup wakes the queue; Hold, Delete, Flush and
    the rest are refused there (AMP's unhandled command) and never reach the queue."""
    qc = FakeQueueControl()
    client, server, pump = iosim.connectedServerAndClient(lambda: PickupProtocol(qc), amp.AMP)
    got = capture(client.callRemote(Pickup, message_id=MID))
    pump.flush()
    assert got() == {"found": True}
    for command, kwargs in [(Delete, {"message_id": MID}), (Flush, {}), (Status, {})]:
        refused = capture(client.callRemote(command, **kwargs))
        pump.flush()
        with pytest.raises(amp.UnhandledCommand):
            refused()
    assert qc.calls == [("pickup", MID)]


def test_a_failing_pickup_answers_not_found():
    qc = FakeQueueControl()
    client, server, pump = iosim.connectedServerAndClient(lambda: PickupProtocol(qc), amp.AMP)
    got = capture(client.callRemote(Pickup, message_id="boom"))
    pump.flush()
    assert got() == {"found": False}


def test_pickup_service_listens_0666(tmp_path):
    reactor = MemoryReactor()
    path = str(tmp_path / "pickup.sock")
    ControlService(reactor, path, FakeQueueControl(), pickup=True).startService()
    [(address, factory, _backlog, mode, _)] = reactor.unixServers
    assert (address, mode) == (path, 0o666)
    assert isinstance(factory.buildProtocol(None), PickupProtocol)


def test_queue_pickup_tells_the_workers_subscribers_once_and_wakes_the_dispatcher():
    """Queue.pickup of a message another process stored: Received once (mail log, metrics,
    webhooks, dispatcher), Due(now) every time; an unknown id: only Due, and False."""
    from twisted.internet.task import Clock

    from txmta import events
    from txmta.message import Address, Envelope, Recipient
    from txmta.queue import Queue
    from txmta.spool.memory import MemorySpool
    clock = Clock()
    clock.advance(1000)
    spool = MemorySpool()
    other = Queue(spool, clock)          # the sendmail process's queue, on the same spool
    mid = other.new_message_id()
    body = other.body_writer(mid)
    body.write(b"Subject: x\r\n\r\nx\r\n")
    capture(other.put(mid, Envelope(Address("a", "example.org"),
                                    (Recipient(Address("b", "example.net")),)),
                      body, {"listener": "sendmail"}, 1000.0))()
    queue = Queue(spool, clock)
    heard = []
    queue.events.subscribe(heard.append, events.Due, events.Received)
    assert capture(queue.pickup(mid))() is True
    assert capture(queue.pickup(mid))() is True
    assert [type(e) for e in heard] == [events.Received, events.Due, events.Due]
    assert heard[0].message.id == mid and heard[1].at == 1000.0
    heard.clear()
    assert capture(queue.pickup("0152sgpCT4xP9MZ"))() is False
    assert [type(e) for e in heard] == [events.Due]


# -- ControlService ------------------------------------------------------------------------------

def test_service_listens_0600_without_a_pid_lock_and_stops(tmp_path):
    """The socket is created mode 0600, and stopService stops listening."""
    reactor = MemoryReactor()
    path = str(tmp_path / "control.sock")
    svc = ControlService(reactor, path, FakeQueueControl())
    svc.startService()
    [(address, factory, _backlog, mode, want_pid)] = reactor.unixServers
    assert (address, mode, bool(want_pid)) == (path, 0o600, False)
    assert isinstance(factory.buildProtocol(None), ControlProtocol)
    stopped = []
    svc.port.stopListening = lambda: stopped.append(True)
    svc.stopService()
    assert svc.port is None and stopped == [True]
    assert not svc.running


def test_service_removes_a_stale_socket_first(tmp_path):
    path = str(tmp_path / "control.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()                        # the file stays; nobody listens
    ControlService(MemoryReactor(), path, FakeQueueControl()).startService()
    assert not os.path.exists(path)  # MemoryReactor binds nothing: the old file is gone


def test_service_refuses_to_steal_a_live_daemons_socket(tmp_path):
    path = str(tmp_path / "control.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)
    try:
        with pytest.raises(ControlError, match="another daemon"):
            ControlService(MemoryReactor(), path, FakeQueueControl()).startService()
        assert os.path.exists(path)
    finally:
        s.close()


def test_service_never_removes_a_file_that_is_not_a_socket(tmp_path):
    path = tmp_path / "control.sock"
    path.write_text("precious")
    with pytest.raises(ControlError, match="not a socket"):
        ControlService(MemoryReactor(), str(path), FakeQueueControl()).startService()
    assert path.read_text() == "precious"


def test_call_against_a_running_control_service(tmp_path):
    """End to end: ControlService on a private reactor in a thread, call() from this one;
    the socket file is mode 0600 and is gone after stopService."""
    from twisted.internet.selectreactor import SelectReactor
    reactor = SelectReactor()
    path = str(tmp_path / "control.sock")
    qc = FakeQueueControl()
    svc = ControlService(reactor, path, qc)
    started = threading.Event()

    def start():
        svc.startService()
        started.set()

    reactor.callWhenRunning(start)
    t = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True)
    t.start()
    try:
        assert started.wait(10)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert call(path, Hold, message_id=MID, timeout=10) == {"found": True}
        assert call(path, Flush, domain="example.com", timeout=10) == {"count": 7}
        assert json.loads(call(path, Status, timeout=10)["json"])["pid"] == os.getpid()
        assert ("hold", MID) in qc.calls
    finally:
        stopped = threading.Event()

        def stop():
            d = defer.maybeDeferred(svc.stopService)
            d.addBoth(lambda _: (stopped.set(), reactor.stop()))

        reactor.callFromThread(stop)
        t.join(10)
    assert stopped.is_set() and not t.is_alive()
    assert not os.path.exists(path)
