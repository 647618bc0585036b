"""Idempotency keys stored with a message in its commit: a second put with a fresh key
stores nothing and fails with the first result; an old one is replaced; trimming forgets
old keys.  The same on the LMDB spool and the in-memory one."""

from __future__ import annotations

import pytest

from txmta.message import (AlreadySubmitted, Address, Envelope, Idempotency, Recipient,
                           RecipientState, StoredMessage, new_message_id)
from txmta.spool.memory import MemorySpool

T0 = 1_800_000_000.0


def message(at: float) -> StoredMessage:
    env = Envelope(Address("a", "example.com"), (Recipient(Address("b", "dest.test")),))
    return StoredMessage(new_message_id(at), env, at, 3, (RecipientState(next_attempt=at),), {})


@pytest.fixture(params=["memory", "lmdb"])
def spool(request, open_lmdb):
    return MemorySpool() if request.param == "memory" else open_lmdb()


def put(spool, wait, m, idem):
    body = spool.body_writer(m.id)
    body.write(b"x\r\n")
    return wait(spool.put(m, body, (), idem))


def test_a_fresh_key_refuses_a_second_message(spool, wait):
    first, second = message(T0), message(T0 + 10)
    put(spool, wait, first, Idempotency(b"k1", b'{"id": "first"}', T0 - 86400))
    with pytest.raises(AlreadySubmitted) as e:
        put(spool, wait, second, Idempotency(b"k1", b'{"id": "second"}', T0 + 10 - 86400))
    assert e.value.result == b'{"id": "first"}'
    assert wait(spool.get(second.id)) is None and wait(spool.get(first.id)) is not None
    assert wait(spool.idempotent_get(b"k1", T0 - 1)) == b'{"id": "first"}'
    assert wait(spool.idempotent_get(b"k1", T0 + 1)) is None       # older than asked
    assert wait(spool.idempotent_get(b"k2", 0)) is None


def test_an_old_key_is_replaced_and_trim_forgets(spool, wait):
    put(spool, wait, message(T0), Idempotency(b"k", b"old", 0))
    later = message(T0 + 90000)
    put(spool, wait, later, Idempotency(b"k", b"new", T0 + 1))       # the first is past the window
    assert wait(spool.idempotent_get(b"k", T0 + 1)) == b"new"
    put(spool, wait, message(T0 + 5), Idempotency(b"j", b"j", 0))
    assert wait(spool.idempotent_trim(T0 + 100)) == 1                # "j" (stored at T0 + 5)
    assert wait(spool.idempotent_get(b"j", 0)) is None
    assert wait(spool.idempotent_get(b"k", 0)) == b"new"
