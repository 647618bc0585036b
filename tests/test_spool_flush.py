"""Flush from the indexes (DESIGN invariant 6): the LMDB spool flushes (and counts a
domain's queued messages) without reading a message record, keeps its domains index equal
to the unfinished recipients under any sequence of changes, and builds that index when it
opens a format 2 spool.

The flush promises themselves (all, by domain, held, partitions, batches) are in
tests/test_spool_contract.py; times are whole milliseconds, as there.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import lmdb
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition, rule,
                                 run_state_machine_as_test)

from txmta.message import (BOUNCED, DELETED, DELIVERED, HELD, QUEUED, UNFINISHED, Address,
                           Envelope, Recipient, RecipientState, StoredMessage, new_message_id)
from txmta.reply import Reply
from txmta.spool import codec
from txmta.spool.lmdb import LmdbSpool, _Op
from txmta.spool.view import LmdbView, domain_key
from txmta.spool.memory import MemorySpool

DOMAINS = ("a.example", "B.example", "c.example")


def queued(ms: int, attempts: int = 0) -> RecipientState:
    return RecipientState(QUEUED, attempts, ms / 1000)


def message(*domains: str, states: tuple[RecipientState, ...] | None = None) -> StoredMessage:
    if states is None:
        states = tuple(queued(60_000) for _ in domains)
    return StoredMessage(new_message_id(), Envelope(Address("s", "example.com"), tuple(
        Recipient(Address(f"r{i}", d)) for i, d in enumerate(domains))), 1.0, 3, states, {})


def store(spool: Any, wait: Any, m: StoredMessage) -> None:
    w = spool.body_writer(m.id)
    w.write(b"abc")
    wait(spool.put(m, w))


def flush(spool: Any, wait: Any, now: float, domain: str | None = None, limit: int = 1000
          ) -> tuple[int, int]:
    """One whole flush, batch after batch: (messages, recipients) made due."""
    messages = recipients = 0
    after = None
    for _ in range(1000):
        n, r, after = wait(spool.flush(now, domain, after, limit))
        messages, recipients = messages + n, recipients + r
        if after is None:
            return messages, recipients
    raise AssertionError("flush does not come to an end")


def domains_index(spool: LmdbSpool, wait: Any) -> set[bytes]:
    def read(txn: Any) -> set[bytes]:
        with txn.cursor(db=spool._db[b"domains"]) as cur:
            return {bytes(k) for k in cur.iternext(keys=True, values=False)}
    return wait(spool._submit(_Op(read, read=True)))  # type: ignore[no-any-return]


def test_flush_reads_no_message_record(open_lmdb, wait, monkeypatch):
    """A flush, of all or of a domain, decodes recipient records only: the cost of a
    message's envelope (its recipient list can be long) is never paid."""
    spool = open_lmdb()
    messages = [message("a.example", "b.example", "a.example") for _ in range(20)]
    for m in messages:
        store(spool, wait, m)
    decoded = []
    real = codec.decode_message

    def counting(*args: Any, **kw: Any) -> StoredMessage:
        decoded.append(args)
        return real(*args, **kw)

    monkeypatch.setattr(codec, "decode_message", counting)
    assert flush(spool, wait, 5.0, "b.example", limit=7) == (20, 20)
    assert flush(spool, wait, 5.0, limit=7) == (20, 40)
    assert decoded == []
    assert wait(spool.get(messages[0].id)) is not None and decoded   # the counter counts


def test_queued_at_reads_no_record(open_lmdb, wait, monkeypatch):
    """An admin's flush of a domain answers with `queued_at`, read from the domains index's
    keys alone: no message or recipient record is decoded (a big queue's deferred records
    are cold pages), and a message counts once however many recipients it has there."""
    spool = open_lmdb()
    messages = [message("a.example", "B.example", "a.example") for _ in range(20)]
    for m in messages:
        store(spool, wait, m)
    decoded = []
    for name in ("decode_message", "decode_recipient"):
        real = getattr(codec, name)
        monkeypatch.setattr(codec, name, lambda *a, real=real, **kw: decoded.append(a) or real(*a, **kw))
    assert [wait(spool.queued_at(d)) for d in ("A.example", "b.example", "c.example")] == [20, 20, 0]
    assert decoded == []
    assert wait(spool.get(messages[0].id)) is not None and decoded   # the counters count


def test_a_format_2_spool_gets_its_domains_index_when_opened(open_lmdb, tmp_path, wait):
    """A spool written before the domains index (format 2) is migrated at open: its
    unfinished recipients are indexed, finished ones are not, and flush by domain works."""
    path = tmp_path / "spool"
    spool = open_lmdb(path)
    mixed = message("a.example", "b.example", "a.example",
                    states=(queued(60_000), RecipientState(HELD, 1, 60.0),
                            RecipientState(DELIVERED, 1, 0.0)))
    other = message("b.example")
    for m in (mixed, other):
        store(spool, wait, m)
    wanted = domains_index(spool, wait)
    assert len(wanted) == 3
    wait(spool.close())
    env = lmdb.open(str(path), max_dbs=20)          # as format 2 left it
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"domains", txn=txn), delete=True)
        old_layout(txn, env)
        txn.put(b"format", b"2", db=env.open_db(b"meta", txn=txn))
    env.close()
    view = LmdbView(str(path))              # `txmta queue list` before a daemon migrated it
    assert sorted(m.id for m in view.messages()) == sorted([mixed.id, other.id])
    view.close()
    spool = open_lmdb(path)
    assert domains_index(spool, wait) == wanted
    assert flush(spool, wait, 5.0, "A.example") == (1, 1)
    assert [r.next_attempt for r in wait(spool.get(mixed.id)).recipients] == [5.0, 60.0, 0.0]
    assert flush(spool, wait, 5.0, "b.example") == (1, 1)      # the held one stays
    wait(spool.close())
    env = lmdb.open(str(path), max_dbs=20, readonly=True)
    with env.begin() as txn:
        assert txn.get(b"format", db=env.open_db(b"meta", txn=txn)) == b"6"      # 2 -> ... -> 6
    env.close()
    view = LmdbView(str(path))
    assert view.get(mixed.id).recipients[0].next_attempt == 5.0
    view.close()


def old_layout(txn, env) -> None:
    """Due keys as formats 1 to 3 wrote them: no class byte after the partition."""
    due = env.open_db(b"due", txn=txn)
    keys = [bytes(k) for k in txn.cursor(db=due).iternext(keys=True, values=False)]
    for key in keys:
        txn.delete(key, db=due)
        txn.put(key[:1] + key[2:], b"", db=due)


def test_a_format_3_spool_gets_due_classes_when_opened(open_lmdb, tmp_path, wait):
    """Format 3 due keys get the class byte at open (fresh mail before retries, priority 0):
    due order and flush work on the migrated index."""
    path = tmp_path / "spool"
    spool = open_lmdb(path)
    fresh = message("a.example", states=(queued(20_000),))
    retry = message("a.example", states=(RecipientState(QUEUED, 2, 10.0),))
    for m in (retry, fresh):
        store(spool, wait, m)
    wait(spool.close())
    env = lmdb.open(str(path), max_dbs=20)
    with env.begin(write=True) as txn:
        old_layout(txn, env)
        txn.put(b"format", b"3", db=env.open_db(b"meta", txn=txn))
    env.close()
    spool = open_lmdb(path)
    assert [mid for _, mid in wait(spool.due(30.0, 10))] == [fresh.id, retry.id]
    assert wait(spool.next_due()) == 10.0
    assert flush(spool, wait, 5.0) == (2, 2)
    assert wait(spool.due(5.0, 10)) == [(5.0, fresh.id), (5.0, retry.id)]


# -- the state machine ----------------------------------------------------------------------

TIMES_MS = st.integers(min_value=0, max_value=20_000)
STATES = st.one_of(TIMES_MS.map(queued), st.just(RecipientState(HELD, 0, 1.0)))


class FlushMachine(RuleBasedStateMachine):
    """Random puts, outcomes, holds, deletions and flushes (all or a domain, any batch
    size), against a model of every message's recipient states.  On LMDB the domains
    index must always list exactly the unfinished recipients."""

    def __init__(self, factory: Any, wait: Any) -> None:
        super().__init__()
        self.spool = factory()
        self.wait = wait
        self.now_ms = 0
        self.model: dict[str, StoredMessage] = {}

    def teardown(self) -> None:
        self.wait(self.spool.close())

    def _update(self, m: StoredMessage) -> None:
        self.wait(self.spool.update(m))
        if m.unfinished:
            self.model[m.id] = m
        else:
            del self.model[m.id]

    @rule(rcpts=st.lists(st.tuples(st.sampled_from(DOMAINS), STATES), min_size=1, max_size=4))
    def put(self, rcpts: list[tuple[str, RecipientState]]) -> None:
        m = message(*(d for d, _ in rcpts), states=tuple(s for _, s in rcpts))
        store(self.spool, self.wait, m)
        self.model[m.id] = m

    @precondition(lambda self: self.model)
    @rule(data=st.data(), new=st.one_of(
        TIMES_MS.map(lambda ms: queued(ms, attempts=1)),
        st.sampled_from([RecipientState(DELIVERED, 1, 0.0),
                         RecipientState(BOUNCED, 1, 0.0, Reply(550, "5.1.1", "unknown user"))])))
    def record(self, data: st.DataObject, new: RecipientState) -> None:
        """An attempt's outcome for one QUEUED recipient."""
        m = self.model[data.draw(st.sampled_from(sorted(self.model)))]
        queued_ones = [i for i, r in enumerate(m.recipients) if r.state == QUEUED]
        if queued_ones:
            self._update(m.with_recipient_state(data.draw(st.sampled_from(queued_ones)), new))

    @precondition(lambda self: self.model)
    @rule(data=st.data(), held=st.booleans())
    def hold_or_release(self, data: st.DataObject, held: bool) -> None:
        m = self.model[data.draw(st.sampled_from(sorted(self.model)))]
        self._update(replace(m, recipients=tuple(
            replace(r, state=HELD) if held and r.state == QUEUED else
            replace(r, state=QUEUED, next_attempt=self.now_ms / 1000)
            if not held and r.state == HELD else r for r in m.recipients)))

    @precondition(lambda self: self.model)
    @rule(data=st.data(), remove=st.booleans())
    def delete(self, data: st.DataObject, remove: bool) -> None:
        mid = data.draw(st.sampled_from(sorted(self.model)))
        if remove:
            self.wait(self.spool.remove(mid))
            del self.model[mid]
        else:
            self._update(replace(self.model[mid], recipients=tuple(
                replace(r, state=DELETED) if r.state in UNFINISHED else r
                for r in self.model[mid].recipients)))

    @rule(domain=st.one_of(st.none(), st.sampled_from(DOMAINS + ("B.EXAMPLE", "z.example"))),
          limit=st.integers(min_value=1, max_value=4))
    def flush(self, domain: str | None, limit: int) -> None:
        now = self.now_ms / 1000
        expected_messages = expected_recipients = 0
        for mid, m in list(self.model.items()):
            states = list(m.recipients)
            moved = [i for i, (rcpt, r) in enumerate(zip(m.envelope.recipients, states))
                     if r.state == QUEUED and r.next_attempt > now
                     and (domain is None or rcpt.address.domain.lower() == domain.lower())]
            for i in moved:
                states[i] = replace(states[i], next_attempt=now)
            self.model[mid] = replace(m, recipients=tuple(states))
            expected_messages += bool(moved)
            expected_recipients += len(moved)
        assert flush(self.spool, self.wait, now, domain, limit) == (expected_messages,
                                                                    expected_recipients)

    @rule(ms=st.integers(min_value=0, max_value=5_000))
    def advance(self, ms: int) -> None:
        self.now_ms += ms

    @invariant()
    def states_match_the_model(self) -> None:
        for mid, m in self.model.items():
            assert self.wait(self.spool.get(mid)).recipients == m.recipients
        assert self.wait(self.spool.count()) == len(self.model)
        queued_times = [r.next_attempt for m in self.model.values() for r in m.recipients
                        if r.state == QUEUED]
        assert self.wait(self.spool.next_due()) == (min(queued_times) if queued_times else None)

    @invariant()
    def queued_at_counts_the_messages_with_unfinished_recipients_there(self) -> None:
        for domain in DOMAINS + ("B.EXAMPLE", "z.example"):
            assert self.wait(self.spool.queued_at(domain)) == sum(
                any(r.state in UNFINISHED and rcpt.address.domain.lower() == domain.lower()
                    for rcpt, r in zip(m.envelope.recipients, m.recipients))
                for m in self.model.values())

    @invariant()
    def domains_index_is_the_unfinished_recipients(self) -> None:
        if not isinstance(self.spool, LmdbSpool):
            return
        assert domains_index(self.spool, self.wait) == {
            domain_key(rcpt.address.domain, mid, i) for mid, m in self.model.items()
            for i, (rcpt, r) in enumerate(zip(m.envelope.recipients, m.recipients))
            if r.state in UNFINISHED}


@pytest.mark.parametrize("implementation", ["memory", "lmdb"])
def test_flush_and_the_domains_index_match_the_model(implementation, open_lmdb, wait):
    """Under any sequence of puts, outcomes, holds, deletions and flushes, the spool's
    recipient states and flush counts match a model, and the domains index lists exactly
    the unfinished recipients."""
    factory = MemorySpool if implementation == "memory" else open_lmdb
    run_state_machine_as_test(
        lambda: FlushMachine(factory, wait),
        settings=settings(max_examples=60, stateful_step_count=30, deadline=None,
                          suppress_health_check=list(HealthCheck)))
