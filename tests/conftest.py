"""Spool fixtures shared by the spool tests.

`LmdbSpool` fires its Deferreds through `reactor.callFromThread`; in plain pytest it gets
`ImmediateReactor`, which runs the call at once in the writer thread, and the test blocks
on the result with the `wait` fixture.  No global reactor anywhere (STYLE habit 1).
"""

from __future__ import annotations

import itertools
import threading
from typing import Any, Callable, Iterator

import pytest
from twisted.python.failure import Failure

from txmta.message import Address, Envelope, Recipient, new_message_id
from txmta.message import RecipientState, StoredMessage
from txmta.spool.lmdb import LmdbSpool
from txmta.spool.memory import MemorySpool

INLINE_LIMIT = 4096


class ImmediateReactor:
    """Stands in for `IReactorFromThreads`: runs the call in the calling thread."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


def _wait(d: Any, timeout: float = 10.0) -> Any:
    done = threading.Event()
    box: list[Any] = []

    def fired(result: Any) -> None:
        box.append(result)
        done.set()

    d.addBoth(fired)
    if not done.wait(timeout):
        raise TimeoutError("spool Deferred did not fire")
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def _make_message(n_rcpts: int = 1, states: tuple[RecipientState, ...] | None = None,
                  **envelope: Any) -> StoredMessage:
    if states is None:
        states = tuple(RecipientState() for _ in range(n_rcpts))
    rcpts = tuple(Recipient(Address(f"r{i}", "example.org")) for i in range(len(states)))
    return StoredMessage(
        id=new_message_id(), envelope=Envelope(Address("sender", "example.com"), rcpts, **envelope),
        arrival=1000.0, size=0, recipients=states,
        client={"address": "192.0.2.1", "helo": "client.example"})


@pytest.fixture
def inline_limit() -> int:
    """The `inline_limit` of spools from `open_lmdb`: bodies above it live in bodies/<id>."""
    return INLINE_LIMIT


@pytest.fixture
def wait() -> Callable[..., Any]:
    """`wait(d)` blocks until the Deferred fires and returns its result or raises its error."""
    return _wait


@pytest.fixture
def make_message() -> Callable[..., StoredMessage]:
    """`make_message(n_rcpts=1, states=None, **envelope)`: a fresh message with a new id."""
    return _make_message


@pytest.fixture
def open_lmdb(tmp_path: Any) -> Iterator[Callable[..., LmdbSpool]]:
    """`open_lmdb(path=None, **kw)` opens an `LmdbSpool` (a fresh directory unless `path`);
    every spool still open at the end of the test is closed."""
    opened: list[LmdbSpool] = []
    fresh = itertools.count()

    def open_(path: Any = None, **kw: Any) -> LmdbSpool:
        kw.setdefault("inline_limit", INLINE_LIMIT)
        s = LmdbSpool(str(path or tmp_path / f"spool{next(fresh)}"), ImmediateReactor(), **kw)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        if s._thread.is_alive():
            _wait(s.close())


@pytest.fixture(params=["memory", "lmdb"])
def spool_factory(request: pytest.FixtureRequest, open_lmdb: Any) -> Callable[[], Any]:
    """A factory of empty spools, once per implementation (STYLE habit 9)."""
    return MemorySpool if request.param == "memory" else open_lmdb


@pytest.fixture
def spool(spool_factory: Callable[[], Any]) -> Any:
    """An empty spool, once per implementation."""
    return spool_factory()
