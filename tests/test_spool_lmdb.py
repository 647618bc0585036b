"""LMDB spool behaviour beyond the shared contract: failed commits, map growth, restart,
orphan body files, the read-only view, the format check and group commit (DESIGN "Spool",
invariants 1 and 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest

from txmta.message import HELD, QUEUED, RecipientState, StoredMessage

from txmta.spool.interface import CommitFailed, SpoolFormatError, SpoolFull
from txmta.spool.view import LmdbView

REPO = Path(__file__).resolve().parents[1]


def put(spool, wait, message, body=b"Subject: t\r\n\r\nbody\r\n"):
    writer = spool.body_writer(message.id)
    writer.write(body)
    return wait(spool.put(message, writer))


def outcomes(wait, deferreds) -> list[str]:
    """How each of a batch's operations ended: "ok", "full" (SpoolFull) or "failed"
    (CommitFailed)."""
    out = []
    for d in deferreds:
        try:
            wait(d)
            out.append("ok")
        except SpoolFull:
            out.append("full")
        except CommitFailed:
            out.append("failed")
    return out


# -- (a) a failed commit leaves nothing behind ---------------------------------------------------

@pytest.mark.parametrize("big_body", [False, True], ids=["inline-body", "file-body"])
def test_put_too_big_for_a_full_map_fails_with_spool_full_and_leaves_nothing(
        open_lmdb, wait, make_message, inline_limit, big_body):
    """With the map at max_map_size, a put that does not fit fails with SpoolFull, stores
    nothing, removes its body file, and a later small put still commits (invariant 1)."""
    limit = inline_limit if big_body else 1 << 20
    spool = open_lmdb(map_size=256 * 1024, max_map_size=256 * 1024, inline_limit=limit)
    kept = make_message()
    put(spool, wait, kept)
    if big_body:  # the body goes to a file, so make the envelope record too big for the map
        big, body = make_message(extra={"X-PAD": "p" * 600_000}), b"b" * (2 * limit)
    else:
        big, body = make_message(), b"b" * 600_000
    with pytest.raises(SpoolFull):
        put(spool, wait, big, body)
    assert wait(spool.count()) == 1
    assert wait(spool.get(big.id)) is None
    assert os.listdir(spool.bodies) == []
    assert wait(spool.due(1e9, 100)) == [(0.0, kept.id)]
    small = make_message()
    put(spool, wait, small, b"small")
    assert wait(spool.count()) == 2
    assert wait(spool.read_body(small.id)) == b"small"


# -- (b) live map growth -------------------------------------------------------------------------

def test_map_grows_live_up_to_max_map_size(open_lmdb, wait, make_message):
    """Puts past a small map_size succeed: the writer thread grows the map between transactions."""
    spool = open_lmdb(map_size=128 * 1024, max_map_size=64 * 1024 * 1024)
    before = spool._env.info()["map_size"]
    ms = [make_message() for _ in range(150)]
    for m in ms:
        put(spool, wait, m, os.urandom(3000))
    assert wait(spool.count()) == 150
    assert spool._env.info()["map_size"] > before
    assert wait(spool.get(ms[-1].id)) == ms[-1]


# -- (c) restart ----------------------------------------------------------------------------------

def test_reopened_spool_has_every_message_body_and_due_entry(open_lmdb, wait, make_message,
                                                             inline_limit, tmp_path):
    """Close and reopen on the same path: messages, states, bodies and due index all survive."""
    path = tmp_path / "restart"
    spool = open_lmdb(path)
    small = make_message(states=(RecipientState(QUEUED, 2, 5.0), RecipientState(HELD, 0, 1.0)))
    large = make_message(states=(RecipientState(QUEUED, 0, 3.0),))
    big_body = os.urandom(3 * inline_limit)
    put(spool, wait, small, b"small body")
    put(spool, wait, large, big_body)
    wait(spool.close())

    again = open_lmdb(path)
    assert wait(again.count()) == 2
    assert wait(again.get(small.id)) == small
    assert wait(again.get(large.id)).body_in_file
    assert wait(again.read_body(small.id)) == b"small body"
    assert wait(again.read_body(large.id)) == big_body
    assert wait(again.due(10.0, 100)) == [(3.0, large.id), (5.0, small.id)]
    assert wait(again.next_due()) == 3.0


# -- (d) orphan body files ----------------------------------------------------------------------

def test_unreferenced_body_file_is_removed_at_open(open_lmdb, wait, make_message, inline_limit,
                                                   tmp_path):
    """A file in bodies/ that no message references is removed when the spool opens; the body
    file of a stored message stays."""
    path = tmp_path / "orphans"
    spool = open_lmdb(path)
    m = make_message()
    put(spool, wait, m, b"z" * (2 * inline_limit))
    wait(spool.close())
    orphan = path / "bodies" / "0151orphan0000"
    orphan.write_bytes(b"left over by a crash before commit")

    again = open_lmdb(path)
    assert sorted(os.listdir(again.bodies)) == [m.id]
    assert wait(again.read_body(m.id)) == b"z" * (2 * inline_limit)


# -- (e) the read-only view ------------------------------------------------------------------------

VIEW_SCRIPT = """
import json, sys
from txmta.spool.view import LmdbView
view = LmdbView(sys.argv[1])
out = {m.id: [m.body_in_file, [r.state for r in m.recipients],
              view.read_body(m.id).decode("latin-1")] for m in view.messages()}
out["get-unknown"] = view.get("0151nosuchid00") is None
view.close()
print(json.dumps(out))
"""


def test_view_in_another_process_sees_committed_messages_and_bodies(open_lmdb, wait, make_message,
                                                                    inline_limit, tmp_path):
    """LmdbView, opened by another process while the writer spool is open, sees every committed
    message and body (inline and in a file); py-lmdb refuses a second handle in one process."""
    path = tmp_path / "viewed"
    spool = open_lmdb(path)
    small = make_message(states=(RecipientState(HELD, 0, 1.0),))
    large = make_message()
    put(spool, wait, small, b"inline")
    put(spool, wait, large, b"f" * (2 * inline_limit))
    done = subprocess.run([sys.executable, "-c", VIEW_SCRIPT, str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        small.id: [False, [HELD], "inline"],
        large.id: [True, [QUEUED], "f" * (2 * inline_limit)],
        "get-unknown": True,
    }
    put(spool, wait, make_message())  # the writer is unaffected by the reader
    assert wait(spool.count()) == 3


# -- (f) format check -----------------------------------------------------------------------------

def test_unknown_format_refuses_to_open_naming_the_path(open_lmdb, wait, tmp_path):
    """A spool whose meta format is unknown raises SpoolFormatError naming the path, and the
    environment is closed again, so the same process can open it once the format is fixed."""
    path = tmp_path / "future"
    wait(open_lmdb(path).close())
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True, db=env.open_db(b"meta")) as txn:
        txn.put(b"format", b"99")
    env.close()
    with pytest.raises(SpoolFormatError, match=str(path)) as refused:
        open_lmdb(path)
    assert refused.traceback  # keeps the refused spool object alive: its env must be closed
    with pytest.raises(SpoolFormatError, match=str(path)):
        LmdbView(str(path))
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True, db=env.open_db(b"meta")) as txn:
        txn.put(b"format", b"1")
    env.close()
    assert wait(open_lmdb(path).count()) == 0


# -- (g) group commit -------------------------------------------------------------------------------

def test_puts_submitted_together_share_one_commit(open_lmdb, wait, make_message, monkeypatch):
    """200 puts queued while the writer is busy are committed as one batch (group commit)."""
    spool = open_lmdb()
    assert wait(spool.count()) == 0  # the writer is idle, waiting for work
    batches: list[int] = []
    run_batch = spool._run_batch

    def recording(batch):
        batches.append(len(batch))
        run_batch(batch)

    monkeypatch.setattr(spool, "_run_batch", recording)
    ms = [make_message() for _ in range(200)]
    with spool._cond:  # the writer cannot take work until every put is pending
        deferreds = []
        for m in ms:
            writer = spool.body_writer(m.id)
            writer.write(b"x")
            deferreds.append(spool.put(m, writer))
    for d in deferreds:
        wait(d)
    assert batches == [200]
    assert wait(spool.count()) == 200


def test_one_failing_put_does_not_fail_the_others_in_its_batch(open_lmdb, wait, make_message):
    """In a shared commit, a duplicate id fails alone; the other puts of the batch are stored."""
    spool = open_lmdb()
    first = make_message()
    put(spool, wait, first)
    ms = [make_message() for _ in range(5)]
    ms[2] = first
    with spool._cond:
        deferreds = []
        for m in ms:
            writer = spool.body_writer(m.id)
            writer.write(b"x")
            deferreds.append(spool.put(m, writer))
    assert outcomes(wait, deferreds) == ["ok", "ok", "failed", "ok", "ok"]
    assert wait(spool.count()) == 5


def test_a_batch_runs_each_change_once_and_again_only_after_a_failure(open_lmdb, wait,
                                                                      make_message):
    """Changes run straight in the commit's transaction: once each while none fails.  When
    one fails, the batch runs again with each change in a child transaction: the failing
    one fails alone, the others are committed (their changes are pure, so running them
    twice is harmless)."""
    from dataclasses import replace as _replace

    spool = open_lmdb()
    ms = [make_message() for _ in range(3)]
    for m in ms:
        put(spool, wait, m)
    runs: dict[str, int] = {}

    def change(fail: bool):
        def fn(old: StoredMessage) -> StoredMessage:
            runs[old.id] = runs.get(old.id, 0) + 1
            if fail:
                raise ValueError("refused")
            return _replace(old, recipients=tuple(_replace(r, state=HELD)
                                                  for r in old.recipients))
        return fn

    def batch(failing: int | None) -> list[str]:
        runs.clear()
        with spool._cond:
            ds = [spool.apply(m.id, change(i == failing)) for i, m in enumerate(ms)]
        return outcomes(wait, ds)

    assert batch(None) == ["ok", "ok", "ok"]
    assert sorted(runs.values()) == [1, 1, 1]
    assert batch(1) == ["ok", "failed", "ok"]
    # the first try stopped at the failure; the second ran all three
    assert [runs.get(m.id) for m in ms] == [2, 2, 1]
    states = {m.id: wait(spool.get(m.id)).recipients[0].state for m in ms}
    assert states == {m.id: HELD for m in ms}          # the failed change wrote nothing


def test_duplicate_id_with_a_large_body_never_touches_the_first_body_file(
        open_lmdb, wait, make_message, inline_limit):
    """A second body for a stored id cannot overwrite or delete the first message's body file."""
    spool = open_lmdb()
    first = make_message()
    body = b"1" * (2 * inline_limit)
    put(spool, wait, first, body)
    writer = spool.body_writer(first.id)
    try:
        writer.write(b"2" * (2 * inline_limit))
    except FileExistsError:
        writer.abort()
    else:
        with pytest.raises(CommitFailed):
            wait(spool.put(first, writer))
    assert wait(spool.read_body(first.id)) == body
    assert wait(spool.get(first.id)).body_in_file


def test_operations_after_close_fail_with_commit_failed(open_lmdb, wait, make_message):
    """Once closed, the spool refuses new work with CommitFailed instead of hanging."""
    spool = open_lmdb()
    wait(spool.close())
    with pytest.raises(CommitFailed):
        wait(spool.count())


def test_a_put_too_big_for_the_map_fails_alone_in_its_batch(open_lmdb, wait, make_message):
    """With the map at max_map_size, an oversized put in a shared commit fails with SpoolFull
    while the small puts of the same batch are stored (one session's message never costs
    another session's)."""
    spool = open_lmdb(map_size=256 * 1024, max_map_size=256 * 1024, inline_limit=1 << 20)
    ms = [make_message() for _ in range(4)]
    bodies = [b"small", b"b" * 600_000, b"small", b"small"]
    with spool._cond:
        deferreds = []
        for m, body in zip(ms, bodies):
            writer = spool.body_writer(m.id)
            writer.write(body)
            deferreds.append(spool.put(m, writer))
    assert outcomes(wait, deferreds) == ["ok", "full", "ok", "ok"]
    assert wait(spool.count()) == 3
    assert wait(spool.get(ms[1].id)) is None


def test_a_finished_message_moves_to_history_with_its_timeline_dsn_and_suppression(
        open_lmdb, wait, make_message, tmp_path):
    """One modify() commits final states, events, a DSN and a suppression together; the
    finished message stays readable (history, timeline, Message-ID index) until it expires."""
    from dataclasses import replace as dc_replace

    from txmta.message import Address, Envelope, Recipient
    from txmta.reply import Reply
    from txmta.message import Change, Event, Suppression
    path = tmp_path / "history-spool"
    spool = open_lmdb(path)
    m = dc_replace(make_message(), header_id="<abc@example.com>")
    put(spool, wait, m)
    dsn_msg = StoredMessage("0151dsnmessage1", Envelope(Address("", ""),
                            (Recipient(Address("sender", "example.com")),)), 2000.0, 0,
                            (RecipientState(QUEUED, 0, 2000.0),), {"listener": "dsn"})
    bounce = Reply(550, "5.1.1", "no such user")

    def change(old):
        states = tuple(dc_replace(r, state="bounced", last_reply=bounce, category="invalid-recipient")
                       for r in old.recipients)
        return Change(dc_replace(old, recipients=states),
                      (Event(2000.0, "bounced", "r0@example.org", str(bounce)),),
                      ((dsn_msg, b"Subject: report\r\n\r\nfailed\r\n"),),
                      (Suppression("r0@example.org", "invalid-recipient", 2000.0, 9000.0, str(bounce)),),
                      finished_at=2000.0)
    assert wait(spool.modify(m.id, change)).recipients[0].state == "bounced"
    assert wait(spool.get(m.id)) is None
    assert wait(spool.read_body(dsn_msg.id)) == b"Subject: report\r\n\r\nfailed\r\n"
    assert [t for t, _ in wait(spool.due(3000.0, 10))] == [2000.0]
    wait(spool.close())
    view = LmdbView(str(path))
    finished, when = view.history(m.id)
    assert when == 2000.0 and finished.recipients[0].category == "invalid-recipient"
    assert [e.kind for e in view.events(m.id)] == ["received", "bounced"]
    assert view.find_by_header_id("<abc@example.com>") == m.id
    assert [s.address for s in view.suppressions()] == ["r0@example.org"]
    view.close()
    spool = open_lmdb(path)
    assert wait(spool.expire_history(1000.0)) == 0       # finished at 2000: kept
    assert wait(spool.expire_history(2001.0)) == 1
    wait(spool.close())
    view = LmdbView(str(path))
    assert view.history(m.id) is None and view.events(m.id) == []
    assert view.find_by_header_id("<abc@example.com>") is None
    view.close()


# -- messages by lane ----------------------------------------------------------------------------

def lane_counts(spool, wait):
    return {lane: n for lane, (n, _) in wait(spool.stats()).items()}


def test_stats_count_messages_by_lane_as_they_come_and_go(open_lmdb, wait, make_message):
    """Counted with each put (DSNs and mail suppressed at intake too) and each removal,
    so a sample never walks the queue."""
    from dataclasses import replace as dc_replace

    from txmta.message import Change
    spool = open_lmdb()
    ms = [dc_replace(make_message(), lane=lane) for lane in ("bulk", "transactional", "bulk", "")]
    for m in ms:
        put(spool, wait, m)
    assert lane_counts(spool, wait) == {"bulk": 2, "transactional": 1, "": 1}
    wait(spool.remove(ms[0].id))
    wait(spool.remove(ms[0].id))                     # gone already: counted once
    assert lane_counts(spool, wait) == {"bulk": 1, "transactional": 1, "": 1}

    def delivered(old):
        return Change(dc_replace(old, recipients=tuple(
            dc_replace(r, state="delivered") for r in old.recipients)), finished_at=2000.0)
    wait(spool.modify(ms[1].id, delivered))
    assert lane_counts(spool, wait) == {"bulk": 1, "": 1}
    done = dc_replace(make_message(), lane="bulk",
                      recipients=(RecipientState("suppressed", 0, 0.0),))
    put(spool, wait, done)                          # ended at intake: in and out at once
    assert lane_counts(spool, wait) == {"bulk": 1, "": 1}
    for m in (ms[2], ms[3]):
        wait(spool.remove(m.id))
    assert wait(spool.stats()) == {}


def test_each_lanes_oldest_is_found_from_the_oldest_message_on(open_lmdb, wait, make_message):
    from dataclasses import replace as dc_replace

    from txmta.message import message_id_time
    from txmta.spool.view import lane_stats
    spool = open_lmdb()
    ms = [dc_replace(make_message(), lane=lane) for lane in ("bulk", "bulk", "transactional")]
    for m in ms:
        put(spool, wait, m)
    now = message_id_time(ms[-1].id) + 100.0
    with spool._env.begin() as txn:
        full = lane_stats(txn, spool._db, now)
        short = lane_stats(txn, spool._db, now, walk=1)
    assert full == {"bulk": (2, now - message_id_time(ms[0].id)),
                    "transactional": (1, now - message_id_time(ms[2].id))}
    # read one message only: the other lane's oldest is younger than it, said as its age
    assert short == {"bulk": (2, now - message_id_time(ms[0].id)),
                     "transactional": (1, now - message_id_time(ms[0].id))}


def test_a_format_5_spool_gets_its_lanes_counted(open_lmdb, wait, make_message, tmp_path):
    from dataclasses import replace as dc_replace
    path = tmp_path / "format5"
    spool = open_lmdb(path)
    for lane in ("bulk", "bulk", "", "transactional"):
        put(spool, wait, dc_replace(make_message(), lane=lane))
    wait(spool.close())
    env = lmdb.open(str(path), max_dbs=30)          # as format 5 left it: no counts
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        for key in [bytes(k) for k, _ in txn.cursor(db=meta) if bytes(k).startswith(b"lane:")]:
            txn.delete(key, db=meta)
        txn.put(b"format", b"5", db=meta)
    env.close()
    spool = open_lmdb(path)
    assert lane_counts(spool, wait) == {"bulk": 2, "": 1, "transactional": 1}
    with spool._env.begin() as txn:
        assert txn.get(b"format", db=spool._db[b"meta"]) == b"6"


LOCK_HOLDER = r"""
import lmdb, sys
env = lmdb.open(sys.argv[1], max_dbs=64, subdir=True)
txn = env.begin(write=True)         # holds the environment's write lock, as another worker's commit
print("locked", flush=True)
sys.stdin.readline()
txn.abort()
"""


def test_writes_that_arrive_while_another_process_holds_the_lock_join_the_commit(
        open_lmdb, wait, make_message, tmp_path):
    """Two workers share one write lock.  Writes submitted while this spool's writer waits
    for it go into the commit it is waiting to make, not into one more commit (one fsync
    for all of them)."""
    spool = open_lmdb(tmp_path / "shared")
    sizes = []
    spool.on_commit = lambda seconds, n: sizes.append(n)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path / "shared")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        messages = [make_message() for _ in range(5)]
        ds = []

        def submit(m):
            w = spool.body_writer(m.id)
            w.write(b"Subject: t\r\n\r\nbody\r\n")
            ds.append(spool.put(m, w))

        submit(messages[0])
        for _ in range(5000):           # until the writer took it (it then waits for the lock)
            if not spool._pending:
                break
            time.sleep(0.001)
        assert not spool._pending
        for m in messages[1:]:
            submit(m)
        assert sizes == []              # nothing committed while the lock is held
        holder.stdin.write("\n")
        holder.stdin.flush()
        for d in ds:
            wait(d)
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert sizes == [5]
    assert all(wait(spool.get(m.id)) is not None for m in messages)
