"""Scale (issue 14): what a big backlog of deferred mail costs, counted, not timed.

The backlog of bench/queue_scale.py (deferred mail over a few hundred domains, one domain
with a fixed share) is loaded at two sizes; the spool records read by each admin path must
be the same at both (DESIGN invariant 6: cost grows with the work, not with the queue):
opening the spool and asking what is due (the daemon's start), the metrics' queue sample,
`queue list --limit` (the first page), `queue show`, a flush of one domain, and the
dashboard's snapshot.  Reads are counted at the decoders every spool read goes through
(`codec.decode_message`, `codec.decode_recipient`).  `bench/queue_scale.py` measures the
same paths in seconds on a million messages with a real daemon.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest
from twisted.internet.task import Clock

import torturelib
from txmta import cli, dashboard
from txmta.queue import Queue
from txmta.spool import codec
from txmta.spool.lmdb import LmdbSpool
from txmta.spool.view import LmdbView

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import queue_scale  # noqa: E402  (bench/queue_scale.py)

SIZES = (6_000, torturelib.size(20_000, 200_000))   # both above the dashboard's page
BIG = 300           # messages at big.example, at both sizes


def wait(d: Any) -> Any:
    done, box = threading.Event(), []
    d.addBoth(lambda r: (box.append(r), done.set()))
    assert done.wait(60), "the spool did not answer"
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Counts of message and recipient records decoded, in any spool code."""
    counts: Counter[str] = Counter()
    for name in ("decode_message", "decode_recipient"):
        real = getattr(codec, name)

        def counting(raw: Any, _real: Any = real, _name: str = name) -> Any:
            counts[_name] += 1
            return _real(raw)
        monkeypatch.setattr(codec, name, counting)
    yield counts


def costs(path: Path, n: int, reads: Counter[str]) -> dict[str, dict[str, int]]:
    """Load `n` messages at `path`; the records each admin path reads."""
    queue_scale.load(path, n, domains=50, big=BIG, group=5000)
    out: dict[str, dict[str, int]] = {}

    def measure(what: str) -> Any:
        reads.clear()
        return lambda: out.__setitem__(what, dict(reads))

    conf = path.parent / f"txmta-{n}.toml"
    conf.write_text(f'[spool]\npath = "{path}"\n')
    done = measure("queue list --limit 100")
    assert cli.main(["queue", "list", "--limit", "100", "--config", str(conf)]) == 0
    done()
    view = LmdbView(str(path))      # one environment open at a time in a process (py-lmdb)
    try:
        some = next(view.messages()).id
        done = measure("dashboard")
        snap = dashboard.collect(view, dashboard.History(), time.time(), None)
        assert snap.top_deferring
        done()
    finally:
        view.close()
    done = measure("queue show")
    assert cli.main(["queue", "show", some, "--config", str(conf)]) == 0
    done()

    done = measure("start: open, next due, load due")
    spool = LmdbSpool(str(path), queue_scale.Now())
    try:
        assert wait(spool.next_due()) > time.time()        # everything is deferred
        assert wait(spool.load_due(time.time(), 100)) == []
        done()
        done = measure("metrics sample")
        assert wait(spool.stats())[""][0] == n
        done()
        clock = Clock()
        clock.advance(time.time())
        done = measure("flush --domain big.example")
        assert wait(Queue(spool, clock).flush(domain=queue_scale.BIG)) == BIG
        done()
    finally:
        wait(spool.close())
    return out


def test_admin_paths_read_as_much_with_ten_times_the_queue(
        tmp_path: Path, reads: Counter[str], capsys: pytest.CaptureFixture[str]) -> None:
    small, big = (costs(tmp_path / f"spool-{n}", n, reads) for n in SIZES)
    capsys.readouterr()
    assert small == big, (small, big)
    # and what they read is the work itself: a page, one message, the domain's recipients
    assert big["start: open, next due, load due"] == {}
    assert big["metrics sample"] == {}
    assert big["queue list --limit 100"].get("decode_message", 0) <= 101
    assert big["queue show"].get("decode_message", 0) <= 2
    assert big["flush --domain big.example"] == {"decode_recipient": BIG}
    assert big["dashboard"].get("decode_message", 0) <= dashboard.WALK_LIMIT


def test_the_bench_backlog_is_deferred_and_spread(tmp_path: Path) -> None:
    """The loader's mail: every recipient queued and due later, big.example holding its
    share, the rest over many domains, ids in arrival order."""
    now = time.time()
    messages = [m for m, _ in queue_scale.backlog(3000, now, domains=50, big=BIG)]
    domains = Counter(r.address.domain for m in messages for r in m.envelope.recipients)
    assert domains[queue_scale.BIG] == BIG
    assert len(domains) > 30
    assert all(st.state == "queued" and st.next_attempt > now and st.attempts >= 1
               for m in messages for st in m.recipients)
    assert [m.id for m in messages] == sorted(m.id for m in messages)
    assert os.path.basename(queue_scale.__file__) == "queue_scale.py"
