"""The worker's end of the master channel (txmta/control/channel.py): its admin commands
run on the queue's admin face, and the suppressions its queue commits reach the master."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from fakes import FakeQueue
from txmta import events
from txmta import outcome as O
from txmta.control.channel import WorkerChannel, WorkerControl
from txmta.message import Address, Envelope, Recipient, Suppression
from txmta.queue import Queue
from txmta.reply import Reply
from txmta.spool.memory import MemorySpool

T0 = 1_700_000_000.0


def clock() -> Clock:
    c = Clock()
    c.advance(T0)
    return c


def fired(d: Any) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    return out[0]


def test_a_suppression_change_is_told_to_the_master_before_the_answer() -> None:
    """add / import / remove: committed by this worker's queue, then passed to the master."""
    told: list[tuple[list[str], list[str]]] = []

    def tell(added: Any, removed: Any) -> Any:
        told.append(([e.address for e in added], list(removed)))
        return succeed(None)

    control = WorkerControl(FakeQueue(clock()), tell)
    assert fired(control.suppress_add("X@example.com", "manual")) is True
    assert fired(control.suppress_import([("a@example.com", ""), ("b@example.com", "x")])) == 2
    assert fired(control.suppress_remove("X@example.com")) is True
    assert told == [(["x@example.com"], []), (["a@example.com", "b@example.com"], []),
                    ([], ["x@example.com"])]


def test_queue_commands_go_to_the_admin_face() -> None:
    """hold, release, flush, delete, requeue, status answer from the worker's queue."""
    c = clock()
    q = FakeQueue(c)
    mid = q.new_message_id()
    body = q.body_writer(mid)
    fired(q.put(mid, Envelope(Address("", ""), (Recipient(Address("a", "example.net")),)),
                body, {}, c.seconds()))
    control = WorkerControl(q, lambda a, r: succeed(None))
    assert [fired(control.hold(mid)), fired(control.release(mid)), fired(control.flush(mid, None)),
            fired(control.requeue(mid)), fired(control.delete(mid)),
            fired(control.hold(mid))] == [True, True, 1, True, True, False]
    assert fired(control.status()) == {"messages": 0}


def test_a_bounce_suppression_of_the_queue_reaches_the_master() -> None:
    """The channel, subscribed to SuppressionAdded, passes a hard bounce's entry on."""
    c = clock()
    queue = Queue(MemorySpool(), c)
    channel = WorkerChannel()
    told: list[Suppression] = []
    channel.tell_master = lambda added, removed: (told.extend(added), succeed(None))[1]
    queue.events.subscribe(channel.suppressed, events.SuppressionAdded)
    mid = queue.new_message_id()
    env = Envelope(Address("app", "example.com"), (Recipient(Address("gone", "example.net")),))
    m = fired(queue.put(mid, env, queue.body_writer(mid), {}, c.seconds()))
    fired(queue.record(m, {0: O.PermFailed(Reply(550, "5.1.1", "no such user"),
                                             category="invalid-recipient")}))
    assert [e.address for e in told] == ["gone@example.net"]
    assert queue.suppression_entry("GONE@example.net") == told[0]   # the mirror heard it too


def test_mirrored_changes_are_mirrored_then_heard() -> None:
    """The other workers' changes the master passes on go into the mirror, then to `heard`
    (where the cluster's suppression sharing runs: worker 0 publishes them)."""
    from txmta.control.channel import encode_entry, mirror_batches
    from txmta.suppression import SuppressionList
    channel = WorkerChannel()
    channel.mirror = SuppressionList([Suppression("old@example.net", "manual", T0, T0 + 9, "")])
    heard: list[tuple[list[str], list[str]]] = []
    channel.heard = lambda added, removed: heard.append(([e.address for e in added], removed))
    entry = Suppression("gone@example.net", "invalid-recipient", T0, T0 + 9, "550 5.1.1 no")
    [args] = mirror_batches([entry], ["old@example.net"])
    channel.mirror_suppressions(**args)
    assert channel.mirror.check("gone@example.net", T0) == entry
    assert channel.mirror.check("old@example.net", T0) is None
    assert heard == [(["gone@example.net"], ["old@example.net"])]
    assert encode_entry(entry)[0] == "gone@example.net"


def test_admin_changes_are_told_as_suppression_changed_merges_are_not() -> None:
    """The queue tells an admin add or remove (SuppressionChanged, after the commit); entries
    merged from other nodes are stored with their own times and told to no one."""
    c = clock()
    queue = Queue(MemorySpool(), c)
    told: list[Any] = []
    queue.events.subscribe(told.append, events.SuppressionChanged)
    fired(queue.suppress_add("A@example.net"))
    fired(queue.suppress_remove("a@example.net"))
    assert [([e.address for e in t.added], list(t.removed)) for t in told] == \
        [(["a@example.net"], []), ([], ["a@example.net"])]
    other = Suppression("b@example.net", "invalid-recipient", T0 - 50, T0 + 99, "550 5.1.1")
    fired(queue.suppress_merge([other], []))
    assert queue.suppression_entry("b@example.net") == other
    assert queue.spool.suppressions["b@example.net"] == other
    fired(queue.suppress_merge([], ["b@example.net"]))
    assert queue.suppression_entry("b@example.net") is None
    assert len(told) == 2
