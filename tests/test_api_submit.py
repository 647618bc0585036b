"""The API's way into the queue: envelopes checked like MAIL/RCPT, line endings, the commit
through the receiver (a 250 only after the queue's put), suppressed recipients."""

import pytest
from hypothesis import given, strategies as st
from twisted.internet.task import Clock

from fakes import FakeQueue
from txmta.api.submit import BadAddress, Client, Submitter, crlf, envelope_for
from txmta.inbound.receiver import Receiver
from txmta.message import CommitFailed, Labels, SpoolFull, Suppression


def test_envelope_checks_addresses_like_mail_and_rcpt():
    env = envelope_for("a@example.com", ["b@dest.test", "c@dest.test"], b"")
    assert str(env.sender) == "a@example.com" and not env.smtputf8 and env.body == "7BIT"
    assert [str(r.address) for r in env.recipients] == ["b@dest.test", "c@dest.test"]
    assert str(envelope_for("", ["b@dest.test"], b"").sender) == ""      # the null sender
    assert envelope_for("jörg@example.com", ["b@dest.test"], b"").smtputf8
    assert envelope_for("a@example.com", ["b@dest.test"], "é".encode()).body == "8BITMIME"
    with pytest.raises(BadAddress) as e:
        envelope_for("a@example.com", ["b@dest.test", "two@@at"], b"", "From", "to")
    assert e.value.field == "to" and e.value.address == "two@@at"
    with pytest.raises(BadAddress) as e:
        envelope_for("a b@example.com", ["b@dest.test"], b"")
    assert e.value.field == "From"


@given(st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b".", b" "]), max_size=40))
def test_crlf_leaves_only_crlf_line_endings(parts):
    data = b"".join(parts)
    out = crlf(data)
    assert out.replace(b"\r\n", b"").count(b"\r") == 0
    assert out.replace(b"\r\n", b"").count(b"\n") == 0
    assert out.replace(b"\r\n", b"\n").replace(b"\r", b"") == \
        data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\r", b"")
    if b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b""):
        assert out == data


def submitter(queue, suppressed=None, reject=True):
    clock = Clock()
    clock.advance(1_800_000_000)
    return Submitter(Receiver(queue, "mx.test.invalid", clock), suppressed=suppressed,
                     reject_suppressed=reject, max_message_size=10_000)


CLIENT = Client("127.0.0.1", 40000, "http0", "billing")


def test_finish_answers_250_after_the_put_with_labels_and_token():
    queue = FakeQueue(Clock())
    sub = submitter(queue)
    env = envelope_for("a@example.com", ["b@dest.test"], b"")
    intake = sub.begin(CLIENT, env)
    replies = []
    sub.finish(intake, b"Subject: hi\r\n\r\nbody\r\n",
               Labels("receipts", (("order", "42"),), "outbound")).addCallback(replies.append)
    [reply] = replies
    assert reply.code == 250 and intake.message_id in reply.text
    stored = queue.messages[intake.message_id]
    assert stored.labels == Labels("receipts", (("order", "42"),), "outbound")
    assert stored.client["token"] == "billing" and "helo" in stored.client
    body = queue.bodies[intake.message_id]
    assert body.startswith(b"Received: from [127.0.0.1] (token billing)\r\n"
                           b"\tby mx.test.invalid (txmta) with HTTP id " + intake.message_id.encode())
    assert b"\r\nMessage-ID: <" + intake.message_id.encode() + b"@mx.test.invalid>\r\n" in body
    assert body.endswith(b"\r\n\r\nbody\r\n") and b"Subject: hi\r\n" in body


@pytest.mark.parametrize("error,code", [(SpoolFull("no room"), 452),
                                        (CommitFailed("disk on fire"), 451)])
def test_failed_commit_is_not_a_250(error, code):
    queue = FakeQueue(Clock())
    queue.fail_next = error
    sub = submitter(queue)
    intake = sub.begin(CLIENT, envelope_for("a@example.com", ["b@dest.test"], b""))
    replies = []
    sub.finish(intake, b"\r\nx\r\n").addCallback(replies.append)
    assert replies[0].code == code and intake.message_id not in queue.messages


def test_inactive_lists_suppressed_recipients_in_reject_mode_only():
    entry = Suppression("gone@dest.test", "invalid-recipient", 0.0, 0.0)
    lookup = lambda address, now: entry if address == "gone@dest.test" else None   # noqa: E731
    env = envelope_for("a@example.com", ["ok@dest.test", "gone@dest.test"], b"")
    assert submitter(FakeQueue(Clock()), lookup).inactive(env) == ["gone@dest.test"]
    assert submitter(FakeQueue(Clock()), lookup, reject=False).inactive(env) == []
    assert submitter(FakeQueue(Clock()), None).inactive(env) == []
