"""The queue: owner of message state, and the spool's only user.

`put()` stores a new message with every recipient QUEUED and due now, in one durable
commit; only after the commit does anything else hear of it (the mail log now; the
dispatcher in the delivery issue).  DESIGN invariant 3: persist first, then tell memory.
"""
# test: tests/test_queue.py

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from txmta.envelope import Envelope, new_message_id
from txmta.maillog import MailLog
from txmta.spool.interface import BodyWriter, RecipientState, Spool, StoredMessage


class Queue:
    def __init__(self, spool: Spool, clock: IReactorTime, maillog: MailLog | None = None) -> None:
        self.spool = spool
        self.clock = clock
        self.maillog = maillog or MailLog()
        self.listeners: list[Any] = []   # called with each committed new message

    def new_message_id(self, now: float | None = None) -> str:
        return new_message_id(self.clock.seconds() if now is None else now)

    def body_writer(self, message_id: str) -> BodyWriter:
        return self.spool.body_writer(message_id)

    def put(self, message_id: str, envelope: Envelope, body: BodyWriter, client: dict[str, str],
            arrival: float) -> Deferred[StoredMessage]:
        states = tuple(RecipientState(next_attempt=arrival) for _ in envelope.recipients)
        message = StoredMessage(message_id, envelope, arrival, body.size, states, client)
        d = self.spool.put(message, body)

        def committed(_: Any) -> StoredMessage:
            self.maillog.received(message)
            for listener in self.listeners:
                listener(message)
            return message

        return d.addCallback(committed)
