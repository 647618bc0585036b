"""Crash tests of the master and its workers (issue 9): real twistd with `workers = 2`.

(a) `kill_one_worker`: while CLIENTS threads send and delivery to a relayhost sink runs, one
    worker at a time is SIGKILLed (KILLS times, at random moments while mail is arriving at
    the sink); the master restarts it, and every message acked at intake reaches the sink.
    Duplicates are bounded by what was in flight in the killed worker.
(b) `kill_the_master`: the master is SIGKILLed (ROUNDS times) while clients send and mail is
    delivered; no worker may survive it (they notice the channel close, or the kernel's
    parent-death signal); after a restart on the same spool nothing acked is lost.

Counts are printed (run with -s).  Environment: TXMTA_CRASH_WORKERS_N (messages, default
3000), TXMTA_CRASH_WORKERS_SEED (random; printed).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from typing import Any, Callable

import pytest

from itlib import Daemon, delivery_sections, free_port, wait_until
from sinks import SmtpSink
from test_crash_delivery import Arrivals, Intake, client

pytestmark = pytest.mark.integration

N = int(os.environ.get("TXMTA_CRASH_WORKERS_N", "3000"))
CLIENTS = 20
PACE = 0.05                 # seconds each client waits after a message while workers are killed
MAX_INFLIGHT = 200          # [delivery] max_inflight: divided between the two workers
SINK_IP = "127.0.0.31"


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (zombies excluded), from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(b")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != b"Z":
            out.append(int(entry))
    return sorted(out)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def workers_of(d: Daemon, n: int = 2, timeout: float = 20.0) -> list[int]:
    assert d.proc is not None
    master = d.proc.pid
    return wait_until(lambda: (lambda c: c if len(c) == n else None)(children(master)),
                      timeout, f"{n} worker processes under the master {master}",
                      diagnose=lambda: f"children now: {children(master)}\n{d.log()[-3000:]}")


def start_relaying(start_daemon: Callable[..., Daemon], sink_port: int) -> Daemon:
    sections = delivery_sections(
        free_port(), None, schedule=("1s", "2s"), relayhost=f"{SINK_IP}:{sink_port}",
        relayhost_tls="none", max_inflight=MAX_INFLIGHT, max_per_destination=20,
        initial_per_destination=20)
    sections["server"] = {"workers": 2}
    return start_daemon(**sections)


def finish(d: Daemon, intake: Intake, arrivals: Arrivals, threads: list[threading.Thread],
           deadline: float, all_sent: bool = True) -> dict[str, Any]:
    """Wait for the clients (all `intake.n` messages acked, unless `all_sent` is False: they
    were stopped), then for every acked message at the sink; the counts."""
    if not all_sent:
        intake.stop.set()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic()))
    intake.stop.set()
    if all_sent:
        assert intake.done(), f"only {len(intake.acked)} of {intake.n} messages acked before the deadline"

    def drained() -> bool:
        with arrivals.lock:
            arrived = set(arrivals.count)
        return intake.acked <= arrived and not d.spool_ids()

    wait_until(drained, max(5.0, deadline - time.monotonic()), "the spool to drain",
               interval=0.2, diagnose=lambda: (
                   f"spool {len(d.spool_ids())}, acked-not-arrived "
                   f"{len(intake.acked - set(arrivals.count))}"))
    time.sleep(0.5)    # anything still arriving would be a late duplicate
    with arrivals.lock:
        count = dict(arrivals.count)
    return {
        "acked": len(intake.acked), "attempted": len(intake.attempted),
        "arrived_unique": len(count), "arrivals": sum(count.values()),
        "duplicates": sum(c - 1 for c in count.values() if c > 1),
        "lost": len(intake.acked - set(count)), "unknown": len(set(count) - intake.attempted),
        "no_token": arrivals.bad, "client_errors": intake.errors,
    }


def wait_delivering(arrivals: Arrivals) -> bool:
    try:
        wait_until(lambda: time.monotonic() - arrivals.last < 0.1, 10, "delivery in progress",
                   interval=0.005)
        return True
    except AssertionError:
        return False


def test_kill_one_worker_while_sending_and_delivering(start_daemon: Callable[..., Daemon]) -> None:
    """SIGKILL one worker 10 times while the clients keep sending (each paced, so that the
    load lasts as long as the kills and their restart back-off): the master restarts it, and
    no acked message is lost."""
    seed = int(os.environ.get("TXMTA_CRASH_WORKERS_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    arrivals = Arrivals()
    sink = SmtpSink(SINK_IP, 0, on_message=arrivals).start()
    try:
        d = start_relaying(start_daemon, sink.port)
        workers = workers_of(d)
        intake = Intake(1 << 30)          # until the kills are done
        deadline = time.monotonic() + 180.0
        threads = [threading.Thread(target=client, args=(d, intake, i, deadline, PACE),
                                    daemon=True) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        kills: list[tuple[int, int, int]] = []   # (pid, acked so far, arrived so far)
        for _ in range(10):
            time.sleep(rng.uniform(0.2, 1.0))
            if not wait_delivering(arrivals):
                break
            victim = rng.choice(workers)
            os.kill(victim, signal.SIGKILL)
            kills.append((victim, len(intake.acked), arrivals.total()))
            wait_until(lambda: not alive(victim), 10, f"worker {victim} to die")
            # the master starts a replacement at once (the first restart has no backoff; later
            # ones back off, so the test allows for it)
            workers = workers_of(d, timeout=45.0)
            assert victim not in workers
        result = finish(d, intake, arrivals, threads, deadline, all_sent=False)
        assert d.running, "the master died"
    finally:
        sink.stop()
    result.update(seed=seed, kills=len(kills))
    print(f"\ncrash-workers (one worker killed): {result}")
    assert result["lost"] == 0, result
    assert result["unknown"] == 0 and result["no_token"] == 0, result
    assert result["kills"] == 10, f"too few kills while delivering: {result}"
    assert result["acked"] >= 1000, result
    # the only duplicate window: the next hop's 250 .. our commit of it, in the killed worker
    assert result["duplicates"] <= result["kills"] * MAX_INFLIGHT, result


def test_kill_the_master_takes_the_workers_down(start_daemon: Callable[..., Daemon]) -> None:
    """SIGKILL the master 3 times: no worker outlives it; after a restart nothing acked is lost."""
    seed = int(os.environ.get("TXMTA_CRASH_WORKERS_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    arrivals = Arrivals()
    sink = SmtpSink(SINK_IP, 0, on_message=arrivals).start()
    orphans: list[int] = []
    try:
        d = start_relaying(start_daemon, sink.port)
        intake = Intake(N)
        deadline = time.monotonic() + 180.0
        threads = [threading.Thread(target=client, args=(d, intake, i, deadline), daemon=True)
                   for i in range(CLIENTS)]
        for t in threads:
            t.start()
        rounds = 0
        for _ in range(3):
            workers = workers_of(d)
            time.sleep(rng.uniform(0.3, 1.5))
            if not wait_delivering(arrivals):
                break
            d.kill()
            rounds += 1
            try:
                wait_until(lambda: not any(alive(w) for w in workers), 10,
                           "every worker to exit after the master's death")
            except AssertionError:
                orphans += [w for w in workers if alive(w)]
                for w in orphans:
                    os.kill(w, signal.SIGKILL)
                raise
            d.start()
        result = finish(d, intake, arrivals, threads, deadline)
    finally:
        sink.stop()
    result.update(seed=seed, master_kills=rounds)
    print(f"\ncrash-workers (master killed): {result}")
    assert not orphans
    assert result["lost"] == 0, result
    assert result["unknown"] == 0 and result["no_token"] == 0, result
    assert rounds >= 2, result
    assert result["duplicates"] <= rounds * MAX_INFLIGHT, result
