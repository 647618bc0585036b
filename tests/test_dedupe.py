"""The SMTP intake's duplicate check ([intake] dedupe_window, txmta/inbound/dedupe.py).

The same Message-ID from the same client (authenticated user, else address) with the same
envelope sender and recipients, within the window, is answered
`250 2.0.0 Ok: queued as <first id> (duplicate)` and not stored again.  The key is pure
(tested as a table); the window is tested through the receiver with a Clock; the reply
through an SMTP dialogue.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from txmta.inbound.dedupe import PREFIX, client_identity, dedupe, dedupe_key
from txmta.inbound.receiver import Receiver
from txmta.inbound.session import Session
from txmta.message import Address, Envelope, Recipient
from txmta.queue import Queue
from txmta.reply import Reply
from txmta.spool.memory import MemorySpool

from smtpdialog import HOSTNAME, RELAY_IP, Harness

NOW = 1_700_000_000.0
DAY = 86400.0
BODY = b"Message-ID: <reset-42@app.example>\r\nSubject: reset\r\n\r\nyour link\r\n"


def env(sender: str = "app@example.com", *rcpts: str) -> Envelope:
    rcpts = rcpts or ("r@example.org",)
    return Envelope(Address(*sender.split("@")),
                    tuple(Recipient(Address(*r.split("@"))) for r in rcpts))


# -- the key --------------------------------------------------------------------------------

BASE = ("ip:192.0.2.10", "<m@x>", env("a@example.com", "r@example.org", "s@example.org"))


@pytest.mark.parametrize("other", [
    ("ip:192.0.2.11",) + BASE[1:],                                  # another client address
    ("user:alice",) + BASE[1:],                                     # an authenticated user
    (BASE[0], "<n@x>", BASE[2]),                                    # another Message-ID
    BASE[:2] + (env("b@example.com", "r@example.org", "s@example.org"),),   # another sender
    BASE[:2] + (env("a@example.com", "r@example.org"),),            # a part of the recipients
    BASE[:2] + (env("a@example.com", "r@example.org", "t@example.org"),),   # other recipients
], ids=["client", "user", "message-id", "sender", "fewer-rcpts", "other-rcpts"])
def test_any_other_part_makes_another_key(other: tuple[Any, ...]) -> None:
    """Client, Message-ID, sender and recipients each take part in the key: an MTA that
    splits one message's recipients over several transactions sends each part once."""
    assert dedupe_key(*other) != dedupe_key(*BASE)


def test_the_recipients_order_does_not_matter() -> None:
    assert dedupe_key(BASE[0], "<m@x>", env("a@example.com", "s@example.org", "r@example.org")) \
        == dedupe_key(*BASE)


def test_the_client_is_the_user_when_authenticated_else_the_address() -> None:
    assert client_identity("alice", "192.0.2.1") == client_identity("alice", "192.0.2.2")
    assert client_identity(None, "192.0.2.1") != client_identity(None, "192.0.2.2")
    assert client_identity("192.0.2.1", "192.0.2.9") != client_identity(None, "192.0.2.1")


def test_keys_are_namespaced_apart_from_the_api_keys() -> None:
    """The HTTP API's keys are SHA-256 digests (32 octets); ours are longer and prefixed."""
    key = dedupe_key(*BASE)
    assert key.startswith(PREFIX) and len(key) == len(PREFIX) + 32 != 32


def test_no_check_without_a_message_id_or_a_window() -> None:
    assert dedupe("ip:x", "", env(), "Q1", NOW, DAY) is None
    assert dedupe("ip:x", "<m@x>", env(), "Q1", NOW, 0) is None
    check = dedupe("ip:x", "<m@x>", env(), "Q1", NOW, DAY)
    assert check is not None and check.result == b"Q1" and check.not_before == NOW - DAY


# -- the window, through the receiver ---------------------------------------------------------

class Intakes:
    """A receiver over a MemorySpool with the duplicate check, driven by a Clock."""

    def __init__(self, window: float = DAY) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.spool = MemorySpool()
        self.noted: list[tuple[Any, ...]] = []
        self.receiver = Receiver(Queue(self.spool, self.clock), HOSTNAME, self.clock,
                                 dedupe_window=window,
                                 note_duplicate=lambda *a: self.noted.append(a))

    def send(self, body: bytes = BODY, envelope: Envelope | None = None, ip: str = "192.0.2.10",
             user: str | None = None, token: str | None = None) -> tuple[Reply, str]:
        session = Session(ip, 5555, "0.0.0.0:25", helo="app.example", esmtp=True,
                          auth_user=user, api_token=token)
        intake = self.receiver.begin(session, envelope or env())
        intake.write(body)
        replies: list[Reply] = []
        intake.finish().addCallback(replies.append)
        [reply] = replies
        return reply, intake.message_id


def duplicate_of(mid: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {mid} (duplicate)")


@pytest.mark.parametrize("later, duplicate", [
    (0.0, True), (60.0, True), (DAY, True),        # within the window, its end included
    (DAY + 0.001, False), (2 * DAY, False),        # past it: stored again
])
def test_a_repeat_within_the_window_is_answered_with_the_first_id(later: float,
                                                                  duplicate: bool) -> None:
    it = Intakes()
    first, first_id = it.send()
    assert first == Reply(250, "2.0.0", f"Ok: queued as {first_id}")
    it.clock.advance(later)
    again, again_id = it.send()
    if duplicate:
        assert again == duplicate_of(first_id)
        assert list(it.spool.messages) == [first_id]
        assert it.noted == [(first_id, {"address": "192.0.2.10", "helo": "app.example",
                                        "listener": "0.0.0.0:25"},
                             "app@example.com", 1, "<reset-42@app.example>")]
    else:
        assert again == Reply(250, "2.0.0", f"Ok: queued as {again_id}")
        assert sorted(it.spool.messages) == sorted([first_id, again_id])
        assert it.noted == []


def test_a_repeat_of_the_repeat_still_names_the_first() -> None:
    it = Intakes()
    _, first_id = it.send()
    it.clock.advance(10)
    it.send()
    it.clock.advance(10)
    assert it.send()[0] == duplicate_of(first_id)
    assert len(it.spool.messages) == 1


@pytest.mark.parametrize("change", [
    {"ip": "192.0.2.11"},
    {"envelope": env("other@example.com")},
    {"envelope": env("app@example.com", "r@example.org", "s@example.org")},
    {"body": BODY.replace(b"reset-42", b"reset-43")},
], ids=["client", "sender", "recipients", "message-id"])
def test_a_different_message_is_stored(change: dict[str, Any]) -> None:
    it = Intakes()
    it.send()
    reply, mid = it.send(**change)
    assert reply == Reply(250, "2.0.0", f"Ok: queued as {mid}")
    assert len(it.spool.messages) == 2


def test_the_same_user_from_another_address_is_a_duplicate() -> None:
    """An authenticated application that reconnects from another address is still itself."""
    it = Intakes()
    _, first_id = it.send(user="app", ip="192.0.2.10")
    assert it.send(user="app", ip="192.0.2.99")[0] == duplicate_of(first_id)
    assert it.send(user="other", ip="192.0.2.10")[0].text.endswith("(duplicate)") is False


def test_without_a_message_id_nothing_is_deduplicated() -> None:
    """The Message-ID txmta adds is new each time: such messages are never duplicates."""
    it = Intakes()
    body = b"Subject: no id\r\n\r\nhi\r\n"
    replies = [it.send(body)[0] for _ in range(2)]
    assert all("(duplicate)" not in r.text for r in replies)
    assert len(it.spool.messages) == 2


def test_window_zero_turns_it_off() -> None:
    it = Intakes(window=0)
    it.send()
    assert it.send()[0].text.endswith("(duplicate)") is False
    assert len(it.spool.messages) == 2
    assert it.spool.idempotent == {}


def test_the_api_path_is_not_checked_by_message_id() -> None:
    """Mail from the HTTP API (a session with a token) keeps its own Idempotency-Key."""
    it = Intakes()
    it.send(token="t1")
    assert it.send(token="t1")[0].text.endswith("(duplicate)") is False
    assert len(it.spool.messages) == 2


def test_the_key_expires_by_time_in_the_spool() -> None:
    """Trimming keys older than the window lets the message be stored again."""
    it = Intakes()
    it.send()
    it.clock.advance(DAY + 1)
    assert it.spool.idempotent_trim(it.clock.seconds() - DAY).result == 1
    assert it.spool.idempotent == {}


# -- the reply in an SMTP dialogue --------------------------------------------------------------

def transaction(c: Any) -> bytes:
    """MAIL, RCPT, DATA pipelined, then the message; the raw reply to its end."""
    assert c.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<r@example.org>\r\nDATA\r\n") \
        == ["250 2.1.0", "250 2.1.5", "354"]
    c.proto.dataReceived(BODY + b".\r\n")
    return c.raw()


def test_smtp_dialogue_answers_a_repeat_with_the_first_queue_id() -> None:
    """Second session, same message: `250 2.0.0 Ok: queued as <first> (duplicate)`, and the
    spool holds one message; a third message in the same session is a duplicate too."""
    h = Harness()
    h.receiver.dedupe_window = DAY
    c = h.connect(RELAY_IP)
    c.ehlo()
    first = transaction(c)
    assert first.startswith(b"250 2.0.0 Ok: queued as ") and b"duplicate" not in first
    first_id = first.split()[-1].decode()
    d = h.connect(RELAY_IP)
    d.ehlo()
    assert transaction(d) == f"250 2.0.0 Ok: queued as {first_id} (duplicate)\r\n".encode()
    assert transaction(d) == f"250 2.0.0 Ok: queued as {first_id} (duplicate)\r\n".encode()
    assert [m.id for m, _ in h.stored()] == [first_id]
    assert d.send(b"QUIT\r\n") == ["221 2.0.0"]
