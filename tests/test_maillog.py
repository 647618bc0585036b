"""The mail log writes one line per event, text or JSON, in batches flushed within a second."""

import io
import json

from twisted.internet.task import Clock

from txmta import outcome as O
from txmta.message import Address, Envelope, Recipient
from txmta.maillog import FileSink, MailLog
from txmta.reply import Reply
from txmta.message import QUEUED, RecipientState, StoredMessage


def message(state=RecipientState()):
    env = Envelope(Address("app", "example.com"), (Recipient(Address("u", "example.net")),))
    return StoredMessage("0151abc", env, 1_700_000_000.0, 1234, (state,),
                         {"address": "192.0.2.7", "helo": "client.example", "tls": "TLSv1.3 X"})


def test_text_lines_name_the_id_first_and_the_words_operators_grep_for():
    """A received and a sent line, each starting with the queue id, flushed together."""
    out, clock = io.StringIO(), Clock()
    log = MailLog(FileSink(out, clock, "text"))
    log.received(message())
    log.outcome(message(RecipientState("delivered", 1)), 0,
                O.Delivered(Reply(250, "2.0.0", "Ok"), "mx.example.net", "192.0.2.25", "TLSv1.3 X"),
                1_700_000_002.5)
    assert out.getvalue() == ""          # batched ...
    clock.advance(1)
    lines = out.getvalue().splitlines()  # ... and flushed within a second
    assert len(lines) == 2
    assert lines[0].endswith("0151abc: received client=192.0.2.7 helo=client.example "
                             "from=<app@example.com> nrcpt=1 size=1234 tls=TLSv1.3 X")
    assert ("0151abc: to=<u@example.net> relay=mx.example.net[192.0.2.25] delay=2.5 "
            "tls=TLSv1.3 X attempts=1 status=sent (250 2.0.0 Ok)") in lines[1]


def test_json_lines_are_one_object_each_with_the_fields():
    """With format json every line parses on its own and carries event, id and values."""
    out, clock = io.StringIO(), Clock()
    log = MailLog(FileSink(out, clock, "json"))
    deferred = RecipientState(QUEUED, 1, 1_700_000_060.0, Reply(451, "4.7.1", "greylisted"))
    log.outcome(message(deferred), 0, O.TempFailed(Reply(451, "4.7.1", "greylisted")),
                1_700_000_000.0)
    log.sink.close()
    record = json.loads(out.getvalue())
    assert record["event"] == "deferred" and record["id"] == "0151abc"
    assert record["next_attempt"] == 1_700_000_060.0 and "next_attempt_in=60s" in record["text"]


def test_a_requiretls_message_says_so_in_its_received_line():
    """REQUIRETLS (RFC 8689) shows in the received line, text and JSON; others stay as they were."""
    from dataclasses import replace
    m = message()
    m = replace(m, envelope=replace(m.envelope, requiretls=True))
    out, clock = io.StringIO(), Clock()
    MailLog(FileSink(out, clock, "text")).received(m)
    clock.advance(1)
    assert out.getvalue().rstrip("\n").endswith("tls=TLSv1.3 X requiretls=yes")
    out, clock = io.StringIO(), Clock()
    log = MailLog(FileSink(out, clock, "json"))
    log.received(m)
    log.received(message())
    log.sink.close()
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["requiretls"] is True and "requiretls" not in second


def test_a_duplicate_is_one_line_naming_the_first_id():
    """A message the intake answered as a duplicate: one line, the first message's id first
    ([intake] dedupe_window); the JSON form carries the Message-ID and the user."""
    out, clock = io.StringIO(), Clock()
    MailLog(FileSink(out, clock, "text")).duplicate(
        "0151abc", {"address": "192.0.2.7", "helo": "client.example"}, "app@example.com", 1,
        "<reset-42@app.example>")
    clock.advance(1)
    [line] = out.getvalue().splitlines()
    assert line.endswith("0151abc: duplicate client=192.0.2.7 helo=client.example "
                         "from=<app@example.com> nrcpt=1 message-id=<reset-42@app.example> "
                         "(not stored again)")
    out = io.StringIO()
    log = MailLog(FileSink(out, clock, "json"))
    log.duplicate("0151abc", {"address": "192.0.2.7", "auth": "app"}, "app@example.com", 2,
                  "<m@x>")
    log.sink.close()
    record = json.loads(out.getvalue())
    assert (record["event"], record["id"], record["message_id"], record["auth"]) == \
        ("duplicate", "0151abc", "<m@x>", "app")
