"""Lanes (txmta/lanes.py): selection at intake, the due order, and the dispatcher's budgets.

The pool's reserved shares are tested in test_pool.py; the configuration in test_config.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from txmta import config
from txmta import outcome as O
from txmta.dispatch import SCAN_COALESCE, Dispatcher
from txmta.inbound.receiver import Receiver
from txmta.inbound.session import Session
from txmta.lanes import (DEFAULT_LANES, Lane, Lanes, due_class, due_groups, level,
                         level_classes)
from txmta.message import Address, Envelope, Recipient
from txmta.outbound.deliverer import AttemptResult
from txmta.queue import Queue
from txmta.reply import Reply
from txmta.spool.memory import MemorySpool

OK = Reply(250, "2.0.0", "OK")
LATER = Reply(451, "4.3.0", "try later")
NOW = 1_700_000_000.0
LANES = Lanes([Lane("transactional", 10, 0.5, streams=("outbound",), users=("app",)),
               Lane("bulk", 0, 0.2, streams=("broadcast",), users=("newsletter",)),
               Lane("alerts", 50)])


# -- selection ------------------------------------------------------------------------------

def test_defaults_are_transactional_first_then_bulk():
    lanes = Lanes()
    assert lanes.default == "transactional"
    assert [lane.name for lane in lanes] == ["transactional", "bulk"]
    assert config.defaults().lanes == Lanes(DEFAULT_LANES)


@pytest.mark.parametrize("kw, lane", [
    ({}, "transactional"),                                        # the first table: default
    ({"listener_lane": "bulk"}, "bulk"),
    ({"listener_lane": "nope"}, "transactional"),                 # unknown names are ignored
    ({"user": "newsletter", "listener_lane": "alerts"}, "bulk"),  # the user before the listener
    ({"stream": "Broadcast", "user": "app"}, "bulk"),             # the stream, without case
    ({"stream": "alerts"}, "alerts"),                              # a stream named like a lane
    ({"stream": "unknown-stream"}, "transactional"),
    ({"header": "alerts", "trusted": False}, "transactional"),    # untrusted: the header is ignored
    ({"header": " alerts ", "trusted": True, "stream": "broadcast"}, "alerts"),
    ({"header": "alerts", "trusted": True, "token_lane": "bulk"}, "bulk"),   # the token decides
    ({"header": "nope", "trusted": True, "user": "newsletter"}, "bulk"),
])
def test_selection_order(kw: dict[str, Any], lane: str):
    """Token lane, then the header (trusted clients only), stream, user, listener, default."""
    assert LANES.select(**kw) == lane


def test_a_lane_no_longer_configured_goes_on_in_the_default_lane():
    assert LANES.get("gone").name == "transactional" and LANES.name_of("gone") == "transactional"
    assert LANES.rank("gone") == LANES.rank("transactional") == 1   # alerts (50) ranks first


# -- the due order --------------------------------------------------------------------------

@given(st.integers(0, 99), st.integers(0, 99), st.integers(0, 50), st.integers(0, 50))
def test_due_classes_order_priority_first_then_fresh_before_retries(p1, p2, a1, a2):
    c1, c2 = due_class(p1, a1), due_class(p2, a2)
    if p1 > p2:
        assert c1 < c2
    elif p1 == p2:
        assert (c1 < c2) == (a1 == 0 and a2 > 0) and (c1 == c2) == ((a1 == 0) == (a2 == 0))
    assert c1 in level_classes(level(p1))


def test_due_groups_are_one_per_priority_level_and_the_rest():
    groups = due_groups(LANES)
    assert groups[:3] == tuple(frozenset(level_classes(level(p))) for p in (50, 10, 0))
    assert set().union(*groups) == set(range(256)) and sum(map(len, groups)) == 256


# -- the dispatcher -------------------------------------------------------------------------

class Deliverer:
    """Holds every attempt until the test answers it; records the order and the lane."""

    def __init__(self) -> None:
        self.started: list[tuple[str, str]] = []       # (first recipient, lane)
        self.pending: list[tuple[Deferred[Any], list[int]]] = []

    def destination(self, domain: str) -> str:
        return domain

    def deliver(self, env: Envelope, indices: list[int], body: Any, lane: str = "",
                **sources: Any) -> Any:
        self.started.append((str(env.recipients[indices[0]].address.local), lane))
        d: Deferred[Any] = Deferred()
        self.pending.append((d, indices))
        return d

    def answer(self, outcome: Any = O.Delivered(OK)) -> None:
        d, indices = self.pending.pop(0)
        d.callback(AttemptResult({i: outcome for i in indices}, "d"))


def setup(max_inflight: int = 1000) -> tuple[Clock, Queue, Deliverer, Dispatcher]:
    clock = Clock()
    clock.advance(NOW)
    queue = Queue(MemorySpool(), clock, schedule=(60.0,), max_lifetime=3600.0,
                  jitter=lambda: 0.0)
    deliverer = Deliverer()
    dispatcher = Dispatcher(queue, deliverer, clock, max_inflight=max_inflight, lanes=LANES)
    queue.events.subscribe(dispatcher.heard, *Dispatcher.HEARS)
    return clock, queue, deliverer, dispatcher


def put(queue: Queue, clock: Clock, name: str, lane: str) -> str:
    env = Envelope(Address("app", "example.com"), (Recipient(Address(name, "example.net")),))
    mid = queue.new_message_id()
    body = queue.body_writer(mid)
    body.write(b"Subject: x\r\n\r\nhi\r\n")
    queue.put(mid, env, body, {}, clock.seconds(), lane=lane,
              priority=LANES.get(lane).priority)
    return mid


def test_fresh_mail_of_higher_lanes_starts_first_and_retries_after_fresh_mail():
    """Due at once: alerts, then fresh transactional, then its retries, then bulk; each
    attempt goes out in its lane (the pool key)."""
    clock, queue, deliverer, dispatcher = setup()
    put(queue, clock, "retry", "transactional")
    dispatcher.start()
    clock.advance(SCAN_COALESCE)
    deliverer.answer(O.TempFailed(LATER))        # a retry 60 s later
    deliverer.started.clear()
    dispatcher.stop()
    clock.advance(60)
    for name, lane in (("b1", "bulk"), ("t1", "transactional"), ("a1", "alerts"),
                       ("b2", "bulk"), ("t2", "transactional")):
        put(queue, clock, name, lane)
    dispatcher.start()
    clock.advance(SCAN_COALESCE)
    assert deliverer.started == [("a1", "alerts"), ("t1", "transactional"),
                                 ("t2", "transactional"), ("retry", "transactional"),
                                 ("b1", "bulk"), ("b2", "bulk")]


def test_a_lane_that_used_its_in_flight_budget_does_not_hold_up_another():
    """Bulk mail stuck at a slow destination fills bulk's budget; transactional mail
    arriving meanwhile starts at once, and bulk goes on when its attempts finish."""
    clock, queue, deliverer, dispatcher = setup(max_inflight=3)
    dispatcher.start()
    for i in range(10):
        put(queue, clock, f"b{i}", "bulk")
    clock.advance(SCAN_COALESCE)
    assert [n for n, _ in deliverer.started] == ["b0", "b1", "b2"]
    put(queue, clock, "t1", "transactional")
    clock.advance(SCAN_COALESCE)
    assert deliverer.started[-1] == ("t1", "transactional")
    deliverer.answer()                            # b0 done: one more bulk message starts
    clock.advance(SCAN_COALESCE)
    assert [n for n, _ in deliverer.started] == ["b0", "b1", "b2", "t1", "b3"]


def test_mail_of_a_priority_no_lane_has_is_still_delivered():
    """A message stored with a priority of a lane since removed is read as the last group."""
    clock, queue, deliverer, dispatcher = setup()
    env = Envelope(Address("app", "example.com"), (Recipient(Address("old", "example.net")),))
    mid = queue.new_message_id()
    body = queue.body_writer(mid)
    body.write(b"x\r\n")
    queue.put(mid, env, body, {}, clock.seconds(), lane="gone", priority=77)
    dispatcher.start()
    clock.advance(SCAN_COALESCE)
    assert deliverer.started == [("old", "transactional")]


# -- intake ---------------------------------------------------------------------------------

def intake_lane(data: bytes, sess: Session, **receiver_kw: Any) -> tuple[str, int]:
    clock = Clock()
    clock.advance(NOW)
    spool = MemorySpool()
    receiver = Receiver(Queue(spool, clock), "mx.example.com", clock, lanes=LANES, **receiver_kw)
    intake = receiver.begin(sess, Envelope(Address("a", "example.com"),
                                           (Recipient(Address("r", "example.org")),)))
    intake.write(data)
    intake.finish()
    [m] = spool.messages.values()
    return m.lane, m.priority


def test_intake_stores_the_lane_and_its_priority():
    s = Session("192.0.2.10", 5555, "0.0.0.0:587", helo="c", esmtp=True, auth_user="newsletter")
    assert intake_lane(b"Subject: x\r\n\r\nhi\r\n", s) == ("bulk", 0)
    s = Session("192.0.2.10", 5555, "0.0.0.0:2526", helo="c", esmtp=True)
    assert intake_lane(b"Subject: x\r\n\r\nhi\r\n", s,
                       listener_lanes={"0.0.0.0:2526": "alerts"}) == ("alerts", 50)
    assert intake_lane(b"Subject: x\r\n\r\nhi\r\n", s) == ("transactional", 10)


@pytest.mark.parametrize("relay_client, lane", [(True, "bulk"), (False, "transactional")])
def test_the_lane_header_counts_only_from_trusted_clients_and_is_removed(relay_client, lane):
    clock = Clock()
    clock.advance(NOW)
    spool = MemorySpool()
    receiver = Receiver(Queue(spool, clock), "mx.example.com", clock, lanes=LANES)
    s = Session("192.0.2.10", 5555, "0.0.0.0:25", helo="c", esmtp=True, relay_client=relay_client)
    intake = receiver.begin(s, Envelope(Address("a", "example.com"),
                                        (Recipient(Address("r", "example.org")),)))
    intake.write(b"Subject: x\r\nX-Txmta-Lane: bulk\r\n\r\nhi\r\n")
    intake.finish()
    [m] = spool.messages.values()
    assert m.lane == lane
    assert b"X-Txmta-Lane" not in spool.bodies[m.id]
