"""The master's pure parts: restart backoff, exit descriptions, the division of limits
among workers, the [server] workers/user/group keys, and the fan-out of admin commands to
the workers that own the messages (control/channel.py) with fake channels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ProcessDone, ProcessTerminated
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.logger import globalLogPublisher
from twisted.test.iosim import connectedServerAndClient

from txmta import partition as P
from txmta.config import ConfigError, load_text
from txmta.control.amp import (Delete, Flush, Hold, InternalError, Pickup, Release, Requeue,
                               Status, SuppressionAdd)
from txmta.control.channel import (MAX_BATCH, FanOut, MasterChannel, MirrorSuppressions,
                                   WorkerChannel, WorkerNotRunning, decode_entry, mirror_batches)
from txmta.message import MessageIds, Suppression
from txmta.tap import BACKOFF_MAX, Backoff, describe_exit
from txmta.worker import divide_limits, share

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- restart backoff ---------------------------------------------------------------------------

def test_a_worker_that_keeps_dying_waits_longer_each_time_up_to_the_maximum() -> None:
    b = Backoff()
    delays = []
    now = 0.0
    for _ in range(10):
        b.started(now)
        now += 0.5                      # dies half a second after each start
        delays.append(b.exited(now))
        now += delays[-1]
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, BACKOFF_MAX, BACKOFF_MAX, BACKOFF_MAX,
                      BACKOFF_MAX]


def test_a_worker_that_ran_long_enough_is_restarted_at_once_again() -> None:
    b = Backoff(reset_after=60.0)
    for t in range(5):
        b.started(float(t))
        b.exited(float(t) + 0.1)
    b.started(100.0)
    assert b.exited(161.0) == 0.0       # ran 61 s: healthy, restarted at once
    b.started(161.0)
    assert b.exited(162.0) == 1.0       # and the count starts afresh


def test_exits_are_described_for_the_log() -> None:
    assert describe_exit(Failure(ProcessDone(0))) == "exited with status 0"
    assert describe_exit(Failure(ProcessTerminated(exitCode=3))) == "exited with status 3"
    assert describe_exit(Failure(ProcessTerminated(signal=9))) == \
        "was killed by signal 9 (SIGKILL)"


# -- limits divided among workers ----------------------------------------------------------------

@given(st.integers(1, 100000), st.integers(1, P.PARTITIONS))
def test_the_shares_of_a_limit_cover_it_and_are_never_zero(value: int, workers: int) -> None:
    one = share(value, workers)
    assert one >= 1 and one * workers >= value
    assert (one - 1) * workers < value or one == 1


class FakeLimits:
    """resource.getrlimit/setrlimit for RLIMIT_NOFILE, with the kernel's refusals."""

    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.limits = (soft, hard)
        self.refuse = refuse

    def getrlimit(self, which: int) -> tuple[int, int]:
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        if self.refuse or limits[0] > limits[1]:
            raise ValueError("not allowed")
        self.limits = limits


@pytest.mark.parametrize("soft,hard,refuse,after,warns", [
    (1024, 65536, False, 65536, False),          # a shell's soft limit is lifted
    (1024, 1024, False, 1024, True),             # the hard limit is short: said at start
    (1024, 524288, True, 1024, True),            # the kernel refused: said at start
    (65536, 65536, False, 65536, False),
])
def test_the_master_lifts_the_open_file_limit_and_warns_when_it_is_short(
        monkeypatch: pytest.MonkeyPatch, soft: int, hard: int, refuse: bool, after: int,
        warns: bool) -> None:
    """The soft RLIMIT_NOFILE goes up to the hard one (the workers inherit it); a limit below
    2 x [server] max_connections + [delivery] max_connections + 100 (each worker's share)
    is a warning naming the keys."""
    import resource

    from txmta import tap
    fake = FakeLimits(soft, hard, refuse)
    monkeypatch.setattr(resource, "getrlimit", fake.getrlimit)
    monkeypatch.setattr(resource, "setrlimit", fake.setrlimit)
    cfg = load_text("[server]\nworkers = 1\nmax_connections = 1000\n")
    warning = tap.raise_file_limit(cfg)
    assert fake.limits == (after, hard)
    assert (warning is not None) is warns
    if warning:
        assert f"open file limit {after} is below the 2600 descriptors" in warning
        assert "[server] max_connections = 1000" in warning
    two = load_text("[server]\nworkers = 2\nmax_connections = 1000\n")
    fake.limits = (1350, 1350)
    assert tap.raise_file_limit(two) is None     # a worker's share: 2 x 500 + 250 + 100
    fake.limits = (1349, 1349)
    assert tap.raise_file_limit(two) is not None


def test_divide_limits_divides_the_daemon_wide_limits_only() -> None:
    """The per-client limit is each worker's: one client's connections do not spread evenly."""
    cfg = load_text("[server]\nmax_connections = 100\nmax_connections_per_ip = 9\n"
                    "[delivery]\nmax_per_destination = 10\nmax_connections = 7\n")
    two = divide_limits(cfg, 2)
    assert (two.server.max_connections, two.server.max_connections_per_ip) == (50, 9)
    assert (two.delivery.max_per_destination, two.delivery.max_connections) == (5, 4)
    assert two.server.max_recipients == cfg.server.max_recipients
    assert divide_limits(cfg, 1) is cfg


def test_a_shaping_rules_connections_are_divided_unless_the_cluster_shares_them() -> None:
    rule = "[[shaping]]\nname = \"p\"\nmx = [\".p.test\"]\nconnections = 5\nrate = \"60/m\"\n"
    [alone] = divide_limits(load_text(rule), 2).shaping
    assert (alone.connections, alone.rate) == (3, 0.5)
    shared = load_text("[cluster]\nredis = \"redis://127.0.0.1:6399/0\"\n" + rule)
    [together] = divide_limits(shared, 2).shaping
    assert (together.connections, together.rate) == (5, 1.0)     # leases and units in Redis


# -- [server] workers, user, group ---------------------------------------------------------------

def test_workers_auto_is_the_core_count_and_integers_are_kept() -> None:
    assert load_text("[server]\nworkers = \"auto\"\n").server.workers == \
        max(1, min(os.cpu_count() or 1, P.PARTITIONS))
    assert load_text("[server]\nworkers = 3\n").server.workers == 3


@pytest.mark.parametrize("value", ["0", "33", "\"many\"", "true", "1.5"])
def test_a_bad_workers_value_names_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match="server.workers"):
        load_text(f"[server]\nworkers = {value}\n", "/etc/txmta.toml")


def test_an_unknown_user_or_a_group_without_user_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="server.user"):
        load_text("[server]\nuser = \"no-such-user-here\"\n")
    with pytest.raises(ConfigError, match="server.group"):
        load_text("[server]\ngroup = \"root\"\n")
    assert load_text("[server]\nuser = \"root\"\n").server.user == "root"


# -- the fan-out --------------------------------------------------------------------------------

class FakeWorker:
    """A worker's channel: answers like a worker's queue would, and records the calls."""

    def __init__(self, index: int, known: set[str]) -> None:
        self.index = index
        self.known = known
        self.calls: list[tuple[type, dict[str, Any]]] = []

    def callRemote(self, command: type, **kw: Any) -> defer.Deferred[Any]:
        self.calls.append((command, kw))
        if command in (Hold, Release, Delete, Requeue, Pickup):
            return defer.succeed({"found": kw["message_id"] in self.known})
        if command is Flush:
            mid = kw.get("message_id")
            return defer.succeed({"count": (1 if mid in self.known else 0) if mid
                                  else len(self.known)})
        if command is Status:
            return defer.succeed({"json": json.dumps({"messages": 99, "deliveries": self.index + 1,
                                                      "pid": 100 + self.index, "paused": False})})
        if command is SuppressionAdd:
            return defer.succeed({"ok": True})
        if command is MirrorSuppressions:
            return defer.succeed({})
        raise AssertionError(command)


def result(d: defer.Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def fleet(n: int) -> tuple[list[FakeWorker], dict[int, list[str]]]:
    """n fake workers, each knowing 3 messages in its own partitions."""
    ids = {k: [MessageIds(P.owned(k, n))(1000.0 + i) for i in range(3)] for k in range(n)}
    return [FakeWorker(k, set(ids[k])) for k in range(n)], ids


@given(st.integers(1, 8))
def test_a_command_naming_a_message_goes_to_its_owner_only(n: int) -> None:
    workers, ids = fleet(n)
    fan = FanOut(list(workers))
    for k in range(n):
        for mid in ids[k]:
            for op in (fan.hold, fan.release, fan.delete, fan.requeue, fan.pickup):
                assert result(op(mid)) is True
            assert result(fan.flush(mid, None)) == 1
    for w in workers:
        assert w.calls and all(kw["message_id"] in w.known for _, kw in w.calls)


def test_flush_of_all_and_status_ask_every_worker_and_add_up() -> None:
    workers, _ = fleet(3)
    fan = FanOut(list(workers))
    assert result(fan.flush(None, "example.org")) == 9
    assert all(w.calls == [(Flush, {"domain": "example.org"})] for w in workers)
    status = result(fan.status())
    assert status["messages"] == 99                  # one spool: not added up
    assert status["deliveries"] == 1 + 2 + 3
    assert status["workers"] == status["workers_running"] == 3
    assert [w["pid"] for w in status["worker"]] == [100, 101, 102]


def test_a_command_for_a_restarting_worker_says_so_and_status_shows_it() -> None:
    workers, ids = fleet(2)
    fan = FanOut([workers[0], None])
    with pytest.raises(WorkerNotRunning, match="worker 1"):
        result(fan.hold(ids[1][0]))
    assert result(fan.hold(ids[0][0])) is True
    status = result(fan.status())
    assert status["workers_running"] == 1
    assert status["worker"][1] == {"index": 1, "running": False}


def test_a_suppression_goes_to_one_worker_and_its_commit_is_relayed_to_the_others() -> None:
    workers, _ = fleet(3)
    fan = FanOut(list(workers))
    assert result(fan.suppress_add("a@example.org", "manual")) is True
    assert [len(w.calls) for w in workers] == [1, 0, 0]
    entry = Suppression("a@example.org", "manual", 1.0, 2.0, "")
    result(fan.relay(0, [entry], ["b@example.org"]))
    for w in workers[1:]:
        (command, kw), = w.calls
        assert command is MirrorSuppressions
        assert [decode_entry(v) for v in json.loads(kw["added"])] == [entry]
        assert json.loads(kw["removed"]) == ["b@example.org"]
    assert len(workers[0].calls) == 1               # the source is not told its own change


@given(st.lists(st.text(min_size=1, max_size=300), max_size=600))
def test_mirror_batches_keep_every_change_and_fit_an_amp_value(addresses: list[str]) -> None:
    check_batches(addresses)


def test_mirror_batches_of_long_non_ascii_addresses_fit_an_amp_value() -> None:
    check_batches(["\u00e9\u4e2d" * 150 + f"{i}@b\u00fccher.example" for i in range(600)])


def check_batches(addresses: list[str]) -> None:
    entries = [Suppression(a, "bounce", 1.0, 2.0, "550 5.1.1 no") for a in addresses]
    batches = list(mirror_batches(entries, addresses))
    added = [decode_entry(v) for b in batches for v in json.loads(b["added"])]
    removed = [a for b in batches for a in json.loads(b["removed"])]
    assert added == entries and removed == addresses
    for b in batches:
        assert len(b["added"].encode()) <= 65535 and len(b["removed"].encode()) <= 65535
    assert MAX_BATCH < 65535


# -- [server] cpu_affinity ---------------------------------------------------------------------

@pytest.mark.parametrize("worker, allowed, cpu", [
    (0, (0, 1), 0), (1, (0, 1), 1), (2, (0, 1), 0), (3, (1, 0), 1),
    (0, (4, 2, 6), 2), (1, (4, 2, 6), 4), (5, (4, 2, 6), 6), (7, (3,), 3)])
def test_cpu_for_takes_the_kth_allowed_cpu_in_order(worker: int, allowed: tuple[int, ...],
                                                     cpu: int) -> None:
    from txmta.worker import cpu_for
    assert cpu_for(worker, allowed) == cpu


def test_cpu_affinity_is_auto_by_default_and_checked() -> None:
    assert load_text("").server.cpu_affinity == "auto"
    assert load_text('[server]\ncpu_affinity = "none"\n').server.cpu_affinity == "none"
    with pytest.raises(ConfigError, match="cpu_affinity"):
        load_text('[server]\ncpu_affinity = "yes"\n')


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this system")
@pytest.mark.parametrize("setting", ["auto", "none"])
def test_bind_to_cpu_binds_the_process_and_its_later_threads(setting: str) -> None:
    """In a child process: "auto" binds the calling thread and the threads it starts next to
    the worker's CPU; "none" changes nothing."""
    import threading

    from txmta.worker import bind_to_cpu, cpu_for
    cfg = load_text(f'[server]\ncpu_affinity = "{setting}"\n')
    before = os.sched_getaffinity(0)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            got = bind_to_cpu(cfg, 1)
            seen: list[set[int]] = []
            t = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
            t.start()
            t.join()
            os.write(w, repr((got, sorted(os.sched_getaffinity(0)), sorted(seen[0]))).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        got, main, thread = eval(f.read())
    os.waitpid(pid, 0)
    if setting == "auto":
        cpu = cpu_for(1, tuple(before))
        assert (got, main, thread) == (cpu, [cpu], [cpu])
    else:
        assert (got, main, thread) == (None, sorted(before), sorted(before))
    assert os.sched_getaffinity(0) == before      # the test process itself is untouched


def test_sigusr1_is_passed_to_every_running_worker_by_number() -> None:
    """The master's SIGUSR1 (logrotate) reaches each running worker as SIGUSR1 (by number:
    Twisted names only KILL, TERM and INT); a worker gone meanwhile is skipped."""
    import signal as sig
    from twisted.internet import error as twisted_error
    from twisted.internet.task import Clock
    from txmta import config as C
    from txmta.tap import Master

    class Process:
        def __init__(self, gone: bool = False) -> None:
            self.got: list[Any] = []
            self.gone = gone

        def signalProcess(self, s: Any) -> None:
            if self.gone:
                raise twisted_error.ProcessExitedAlready()
            self.got.append(s)

    master = Master(C.defaults(), Clock(), [], workers=3, clock=Clock(), spawn=lambda *a, **k: None)
    running, gone = Process(), Process(gone=True)
    master.processes = [running, None, gone]
    master.reopen()
    assert running.got == [sig.SIGUSR1]


class DeadWorker(FakeWorker):
    """The channel of a worker that just died: every request fails as the channel closes."""

    def callRemote(self, command: type, **kw: Any) -> defer.Deferred[Any]:
        self.calls.append((command, kw))
        return defer.fail(ConnectionDone("the worker died"))


def test_a_relay_past_a_dead_worker_tells_the_others_and_does_not_fail() -> None:
    """Worker 1 died a moment ago (its channel not yet cleared): worker 0's change still
    reaches worker 2, and the relay answers worker 0 without an error (an error answer used
    to make AMP close worker 0's channel, and a worker whose channel closes stops)."""
    workers, _ = fleet(3)
    dead = DeadWorker(1, set())
    fan = FanOut([workers[0], dead, workers[2]])
    entry = Suppression("a@example.org", "invalid-recipient", 1.0, 2.0, "")
    assert result(fan.relay(0, [entry], [])) is None
    assert [c for c, _ in dead.calls] == [MirrorSuppressions]
    (command, kw), = workers[2].calls
    assert [decode_entry(v) for v in json.loads(kw["added"])] == [entry]


def ask(server: amp.AMP, command: type[amp.Command], **kw: Any) -> tuple[Any, list[Any]]:
    """`command` from an AMP peer connected to `server` in memory: the result (a Failure
    for an error answer) and what was logged meanwhile."""
    client, _, pump = connectedServerAndClient(lambda: server, amp.AMP)
    logged: list[Any] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        box: list[Any] = []
        client.callRemote(command, **kw).addBoth(box.append)
        pump.flush()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    return box[0], logged


def test_a_failing_relay_is_answered_as_internal_and_the_channel_stays_open() -> None:
    """Whatever goes wrong in the master's relay, the worker gets the declared INTERNAL error
    over a channel that stays open, not AMP's "Unknown Error" and a closed channel."""
    lost: list[Any] = []
    channel = MasterChannel(1, lambda *a: defer.fail(RuntimeError("a bug")),
                            on_lost=lost.append)
    answer, logged = ask(channel, MirrorSuppressions, added="[]", removed="[]")
    assert isinstance(answer, Failure) and answer.check(InternalError), answer
    assert "RuntimeError: a bug" in str(answer.value)
    assert not lost and not channel.transport.disconnecting
    assert any(e.get("log_failure") is not None for e in logged)


def test_a_failing_mirror_update_is_answered_as_internal_and_the_worker_keeps_its_channel() -> None:
    """The worker's end: a mirror that raises is an INTERNAL answer; the channel stays and
    the worker does not stop."""
    stopped: list[bool] = []
    worker = WorkerChannel(on_lost=lambda: stopped.append(True))

    class Broken:
        def add(self, entry: Any) -> None:
            raise RuntimeError("a bug")

    worker.mirror = Broken()
    entry = Suppression("a@example.org", "manual", 1.0, 2.0, "")
    answer, logged = ask(worker, MirrorSuppressions, **next(mirror_batches([entry], [])))
    assert isinstance(answer, Failure) and answer.check(InternalError), answer
    assert not stopped and not worker.transport.disconnecting
    assert any(e.get("log_failure") is not None for e in logged)


# -- a worker outlives no master -------------------------------------------------------------------

def test_a_worker_whose_master_died_before_it_started_does_not_start() -> None:
    """A worker spawned just before its master's death asks for the parent-death signal too
    late to get it: it sees that its parent is no longer the master it was given and exits
    at once, instead of accepting on the inherited sockets beside the next master's
    workers.  Under a live master it goes on."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = subprocess.run([sys.executable, "-m", "txmta.worker", "--index", "1", "--workers",
                             "2", "--master", str(dead.pid)], env=env, capture_output=True,
                            text=True, timeout=60)
    assert orphan.returncode == 1, orphan.stderr
    assert f"the master (pid {dead.pid}) is gone; not starting" in orphan.stderr
    supervised = subprocess.run(
        [sys.executable, "-c", "import sys; from txmta.worker import _die_with_parent; "
         "sys.exit(0 if _die_with_parent(int(sys.argv[1])) else 3)", str(os.getpid())],
        env=env, capture_output=True, text=True, timeout=60)
    assert supervised.returncode == 0, supervised.stderr
