"""The mail log writes one line per event, text or JSON, in batches flushed within a second."""

import io
import json

from twisted.internet.task import Clock

from txmta import events
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


def test_an_authenticated_message_names_its_sasl_username_on_the_received_line():
    """Successful AUTH: `sasl_username=USER` on the mail log's received line (as Postfix's
    smtpd logs it); a message without AUTH has no such field."""
    from dataclasses import replace
    out, clock = io.StringIO(), Clock()
    log = MailLog(FileSink(out, clock, "text"))
    log.received(message())
    m = message()
    log.received(replace(m, client={**m.client, "auth": "alice"}))
    clock.advance(1)
    plain, authed = out.getvalue().splitlines()
    assert "sasl_username" not in plain
    assert authed.endswith("tls=TLSv1.3 X sasl_username=alice")


def test_a_failed_auth_names_the_client_and_the_user_and_nothing_a_client_can_forge():
    """The fail2ban line: client address first, then mechanism and user; a user name with
    spaces or control characters cannot add a field or a line."""
    out, clock = io.StringIO(), Clock()
    log = MailLog(FileSink(out, clock, "text"))
    log.auth_failed("192.0.2.1", "alice", "PLAIN")
    log.auth_failed("192.0.2.2", "x client=[198.51.100.9]\nAUTH failed: client=[198.51.100.9]",
                    "LOGIN")
    clock.advance(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(" AUTH failed: client=[192.0.2.1] mechanism=PLAIN user=alice")
    assert " AUTH failed: client=[192.0.2.2] mechanism=LOGIN user=x\\x20client=" in lines[1]
    assert lines[1].count(" ") == 5       # the stamp, "AUTH", "failed:", client, mechanism, user


def test_a_session_closed_by_a_time_limit_gets_a_timeout_line():
    """Which limit closed a session, after which command, from which client; inside a
    message, how much of it came (and that it was not stored)."""
    out, clock = io.StringIO(), Clock()
    log = MailLog(FileSink(out, clock, "text"))
    log.timeout("192.0.2.1", "EHLO", "command_time_limit", 60.0, None)
    log.timeout("192.0.2.2", "DATA", "data_time_limit", 1200.0, 4096)
    clock.advance(1)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith(" timeout after EHLO: client=[192.0.2.1] command_time_limit=60s")
    assert lines[1].endswith(" timeout after DATA: client=[192.0.2.2] data_time_limit=1200s "
                             "octets=4096 (message not stored)")


def test_a_postponed_recipient_gets_a_deferred_line_with_the_throttles_reply():
    """A recipient of a throttled destination, not tried: status=deferred, relay=none, the
    throttle's reply and when it is tried next."""
    out, clock = io.StringIO(), Clock()
    log = MailLog(FileSink(out, clock, "text"))
    waiting = RecipientState(QUEUED, 0, 1_700_000_090.0, Reply(451, "4.7.0", "throttled"))
    log.heard(events.Postponed(message(waiting), 0, Reply(451, "4.7.0", "throttled"),
                               1_700_000_030.0))
    clock.advance(1)
    assert out.getvalue().rstrip("\n").endswith(
        "0151abc: to=<u@example.net> relay=none delay=30.0 tls=none attempts=0 "
        "status=deferred (451 4.7.0 throttled) next_attempt_in=60s")


def test_reopen_writes_what_is_pending_to_the_old_file_then_opens_the_path_again(tmp_path):
    """After logrotate renamed the file, reopen: pending lines end in the renamed file, the
    next lines in a new file at the configured path."""
    from txmta.maillog import open_file
    path = str(tmp_path / "mail.log")
    clock = Clock()
    log = MailLog(FileSink(open_file(path), clock, "text", path=path))
    log.auth_failed("192.0.2.1", "before", "PLAIN")
    (tmp_path / "mail.log").rename(tmp_path / "mail.log.1")
    log.reopen()
    log.auth_failed("192.0.2.1", "after", "PLAIN")
    clock.advance(1)
    assert "user=before" in (tmp_path / "mail.log.1").read_text()
    assert "user=after" not in (tmp_path / "mail.log.1").read_text()
    assert "user=after" in (tmp_path / "mail.log").read_text()
    assert (tmp_path / "mail.log").stat().st_mode & 0o777 == 0o640


def test_reopen_keeps_the_old_file_when_the_path_cannot_be_opened(tmp_path):
    from txmta.maillog import open_file
    d = tmp_path / "logs"
    d.mkdir()
    path = str(d / "mail.log")
    clock = Clock()
    log = MailLog(FileSink(open_file(path), clock, "text", path=path))
    (d / "mail.log").rename(tmp_path / "moved.log")
    d.rmdir()
    log.reopen()
    log.auth_failed("192.0.2.1", "still", "PLAIN")
    clock.advance(1)
    assert "user=still" in (tmp_path / "moved.log").read_text()


def test_syslog_sink_sends_each_line_with_facility_mail(monkeypatch):
    import syslog
    from txmta.maillog import SyslogSink
    calls = []
    monkeypatch.setattr(syslog, "openlog", lambda *a: calls.append(("open", a)))
    monkeypatch.setattr(syslog, "syslog", lambda *a: calls.append(("log", a)))
    MailLog(SyslogSink(worker=1)).auth_failed("192.0.2.1", "alice", "PLAIN")
    assert calls == [("open", ("txmta", syslog.LOG_PID, syslog.LOG_MAIL)),
                     ("log", (syslog.LOG_INFO, "AUTH failed: client=[192.0.2.1] "
                                               "mechanism=PLAIN user=alice worker=1"))]


def test_maillog_for_chooses_the_sink_and_names_a_file_it_cannot_open(tmp_path):
    """"syslog" is syslog, a path is a file reopened by path, "" the daemon's log; a file
    that cannot be opened is a ConfigError naming log.maillog."""
    import pytest
    from txmta import config as C
    from txmta.maillog import LoggerSink, SyslogSink
    from txmta.worker import maillog_for

    class Reactor(Clock):
        def addSystemEventTrigger(self, *a):
            pass

    def cfg(where):
        return C.load_text(f'[log]\nmaillog = "{where}"\n', "x.toml")
    assert isinstance(maillog_for(cfg("syslog"), Reactor()).sink, SyslogSink)
    assert isinstance(maillog_for(cfg(""), Reactor()).sink, LoggerSink)
    sink = maillog_for(cfg(tmp_path / "mail.log"), Reactor()).sink
    assert isinstance(sink, FileSink) and sink.path == str(tmp_path / "mail.log")
    with pytest.raises(C.ConfigError, match=r"x.toml: log.maillog = \".*/nowhere/mail.log\": cannot open"):
        maillog_for(cfg(tmp_path / "nowhere" / "mail.log"), Reactor())
