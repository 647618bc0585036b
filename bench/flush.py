"""How long `txmta queue flush` takes, all or `--domain`, against how much is queued.

Fills a scratch LMDB spool with N deferred messages (one recipient each, at
other.example) and times `Queue.flush()`: a domain with no mail on an empty spool and on
the full one (the cost must grow with the domain's mail, not with the queue: DESIGN
invariant 6), then a flush of all (every recipient made due, batch by batch).  Not a test:

    PYTHONPATH=. .venv/bin/python bench/flush.py [-n 100000] [--batch 1000] [--dir DIR] [--load-all] [--heap]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
import tracemalloc
from typing import Any, Callable

from twisted.internet.task import Clock

from txmta.message import Address, Envelope, MessageIds, Recipient, RecipientState, StoredMessage
from txmta.partition import ALL
from txmta.queue import Queue
from txmta.spool.lmdb import LmdbSpool


class Now:
    """The spool's reactor: its answers are handled at once, in the writer thread."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        f(*args, **kw)


def wait(d: Any) -> Any:
    done, box = threading.Event(), []
    d.addBoth(lambda r: (box.append(r), done.set()))
    done.wait()
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


def fill(spool: LmdbSpool, n: int, now: float, domain: str = "other.example") -> None:
    ids = MessageIds(ALL, clock=lambda: now)
    pending = []
    for i in range(n):
        mid = ids(now - 3600 + i / 1000)
        env = Envelope(Address("app", "example.com"), (Recipient(Address(f"u{i}", domain)),))
        m = StoredMessage(mid, env, now - 3600, 100, (RecipientState(attempts=1, next_attempt=now + 3600),),
                          {"address": "127.0.0.1"})
        body = spool.body_writer(mid)
        body.write(b"Subject: x\r\n\r\n" + b"x" * 80 + b"\r\n")
        pending.append(spool.put(m, body))   # submitted together: the writer groups the commits
        if len(pending) >= 5000:
            for d in pending:
                wait(d)
            pending = []
    for d in pending:
        wait(d)


def timed(what: str, queue: Queue, repeat: int = 1, **kw: Any) -> None:
    """The first run's time, and the best of `repeat` (the first one pays for cold pages)."""
    took = []
    for _ in range(repeat):
        start = time.perf_counter()
        count = wait(queue.flush(**kw))
        took.append(time.perf_counter() - start)
        if count:
            break       # a flush that did something is not repeated: the next has nothing to do
    best = f", best of {repeat} {min(took) * 1000:.2f} ms" if len(took) > 1 else ""
    print(f"{what:<52} {took[0] * 1000:10.1f} ms{best}  ({count} messages)")


def heap(what: str, on: bool) -> None:
    """With --heap: the peak of Python allocations since the last call (tracemalloc; the
    timings measured meanwhile include its cost)."""
    if not on:
        return
    if what:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"{'  peak Python heap during ' + what:<52} {peak / (1 << 20):10.1f} MiB")
    else:
        tracemalloc.start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100_000, help="messages queued (100000)")
    parser.add_argument("--batch", type=int, default=1000, help="recipients a transaction")
    parser.add_argument("--dir", default=None, help="where the scratch spools go")
    parser.add_argument("--heap", action="store_true",
                        help="also the peak Python heap of a full flush (and of --load-all)")
    parser.add_argument("--load-all", action="store_true",
                        help="also time decoding every queued message, as flush did before")
    args = parser.parse_args()
    now = time.time()
    clock = Clock()
    clock.advance(now)
    root = tempfile.mkdtemp(prefix="txmta-flush-", dir=args.dir)
    try:
        empty = LmdbSpool(os.path.join(root, "empty"), Now())
        timed("flush --domain x.example, empty queue", Queue(empty, clock), 5,
              domain="x.example", batch=args.batch)
        wait(empty.close())
        spool = LmdbSpool(os.path.join(root, "full"), Now(), map_size=1 << 31)
        start = time.perf_counter()
        fill(spool, args.n, now)
        print(f"{'filled with ' + str(args.n) + ' deferred messages':<52} "
              f"{(time.perf_counter() - start) * 1000:10.1f} ms")
        queue = Queue(spool, clock)
        timed(f"flush --domain x.example, {args.n} others queued", queue, 5,
              domain="x.example", batch=args.batch)
        fill(spool, 1000, now, "x.example")
        timed("flush --domain x.example, 1000 of its own too", queue,
              domain="x.example", batch=args.batch)
        heap("", args.heap)
        timed(f"flush (all), {args.n} deferred", queue, batch=args.batch)
        heap("flush (all)", args.heap)
        timed("flush (all) again, nothing deferred", queue, 5, batch=args.batch)
        if args.load_all:
            heap("", args.heap)
            start = time.perf_counter()
            loaded = wait(spool.load_due(now + 1e12, 1 << 30))
            print(f"{'load_due of every message (what flush did before)':<52} "
                  f"{(time.perf_counter() - start) * 1000:10.1f} ms  ({len(loaded)} messages)")
            del loaded
            heap("load_due of every message", args.heap)
        wait(spool.close())
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
