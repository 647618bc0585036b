"""The `txmta` command: check-config, passwd, and the read-only queue list/show on a real
LMDB spool written through the daemon's own spool API; the queue-changing commands and
status against a fake daemon serving the control socket from a thread."""

import dataclasses
import io
import json
import socket
import threading
from pathlib import Path
from calendar import timegm

import pytest
from typing import Any
from twisted.protocols import amp

from txmta import cli
from txmta.control.amp import control_socket_path
from txmta.message import Address, Envelope, Recipient
from txmta.passwords import verify_password
from txmta.reply import Reply
from txmta.message import DELIVERED, HELD, QUEUED, Change, Event, RecipientState, StoredMessage, Suppression
from txmta.spool.lmdb import LmdbSpool

ARRIVAL = timegm((2026, 11, 28, 7, 14, 23, 0, 0, 0))    # 2026-11-28T07:14:23Z
BODY = (b"Received: from client.example.org\r\nFrom: Alice <alice@example.org>\r\n"
        b"Subject: hello\r\n\r\nThe body, which queue show does not print.\r\n")


class ImmediateReactor:
    """Runs the spool's callbacks in its writer thread: enough for a test without a reactor."""

    def callFromThread(self, f, *args, **kw):
        f(*args, **kw)


def wait(d):
    """The result of a Deferred fired from another thread."""
    done = threading.Event()
    box = []
    d.addBoth(lambda r: (box.append(r), done.set()))
    assert done.wait(10), "spool did not answer"
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


def put(spool, message, body):
    writer = spool.body_writer(message.id)
    writer.write(body)
    wait(spool.put(message, writer))


def make_spool(path):
    """Two messages: one with a deferred and a delivered recipient, one from <> held."""
    spool = LmdbSpool(str(path), ImmediateReactor())
    try:
        env1 = Envelope(
            Address("alice", "example.org"),
            (Recipient(Address("bob", "example.com"), ("FAILURE", "DELAY"), "rfc822;bob@example.com"),
             Recipient(Address("carol", "example.net"))),
            size=len(BODY), body="8BITMIME", smtputf8=False, ret="HDRS", envid="env-1")
        m1 = StoredMessage(
            "0000AAAAAAAAbcdf", env1, ARRIVAL, len(BODY),
            (RecipientState(QUEUED, 2, ARRIVAL + 900, Reply(451, "4.7.1", "Greylisted, try later")),
             RecipientState(DELIVERED, 1, 0.0, Reply(250, "2.0.0", "Ok: queued as X"))),
            {"address": "192.0.2.10", "helo": "client.example.org", "tls": "TLSv1.3"})
        put(spool, m1, BODY)
        env2 = Envelope(Address("", ""), (Recipient(Address("dave", "example.org")),))
        m2 = StoredMessage("0000AAAAAAABbcdf", env2, ARRIVAL + 60, 2000,
                           (RecipientState(HELD, 0, 0.0, None),), {"address": "127.0.0.1"})
        put(spool, m2, b"Subject: bounce\r\n\r\n" + b"x" * 1981)
    finally:
        wait(spool.close())


@pytest.fixture
def conf(tmp_path):
    """A configuration file whose spool holds the two messages of make_spool()."""
    make_spool(tmp_path / "spool")
    f = tmp_path / "txmta.toml"
    f.write_text(f'[spool]\npath = "{tmp_path / "spool"}"\n')
    return str(f)


@pytest.fixture
def empty_conf(tmp_path):
    spool = LmdbSpool(str(tmp_path / "spool"), ImmediateReactor())
    wait(spool.close())
    f = tmp_path / "txmta.toml"
    f.write_text(f'[spool]\npath = "{tmp_path / "spool"}"\n')
    return str(f)


FINISHED_ID = "0000AAAAAAACbcdf"
FINISHED_AT = ARRIVAL + 65
MX = "mx.example.com[192.0.2.25]"
NO_SUCH_USER = Reply(550, "5.1.1", "no such user")
FAR = timegm((2099, 1, 1, 0, 0, 0, 0, 0, 0))
LONG_AGO = timegm((2020, 1, 1, 0, 0, 0, 0, 0, 0))


def add_history(path):
    """To make_spool's spool: a finished message (one recipient bounced, one delivered, with
    its timeline and Message-ID), a second one finished by a plain modify(), and two
    suppressions, one of them expired."""
    spool = LmdbSpool(str(path), ImmediateReactor())
    try:
        env = Envelope(Address("alice", "example.org"),
                       (Recipient(Address("bob", "example.com")),
                        Recipient(Address("erin", "example.com"))))
        m = StoredMessage(FINISHED_ID, env, ARRIVAL + 60, len(BODY),
                          (RecipientState(next_attempt=ARRIVAL + 60),) * 2,
                          {"address": "192.0.2.10"}, header_id="<abc@example.com>")
        put(spool, m, BODY)

        def finish(old):
            new = dataclasses.replace(old, recipients=(
                RecipientState("bounced", 1, 0.0, NO_SUCH_USER, remote=MX,
                               category="invalid-recipient"),
                RecipientState(DELIVERED, 1, 0.0, Reply(250, "2.0.0", "Ok: queued as 4XyZ"),
                               remote=MX)))
            events = (Event(FINISHED_AT, "bounced", "bob@example.com", str(NO_SUCH_USER), MX,
                            "invalid-recipient"),
                      Event(FINISHED_AT + 0.001, "delivered", "erin@example.com",
                            "250 2.0.0 Ok: queued as 4XyZ", MX))
            sup = Suppression("bob@example.com", "invalid-recipient", FINISHED_AT, FAR,
                              str(NO_SUCH_USER))
            return Change(new, events, suppress=(sup,), finished_at=FINISHED_AT)
        assert wait(spool.modify(FINISHED_ID, finish)) is not None

        env2 = Envelope(Address("alice", "example.org"), (Recipient(Address("x", "example.net")),))
        m2 = StoredMessage("0000AAAAAAADbcdf", env2, ARRIVAL + 70, len(BODY),
                           (RecipientState(next_attempt=ARRIVAL + 70),), {},
                           header_id="<def@example.org>")
        put(spool, m2, BODY)
        wait(spool.modify(m2.id, lambda m: dataclasses.replace(m, recipients=tuple(
            dataclasses.replace(r, state="bounced", last_reply=NO_SUCH_USER,
                                category="invalid-recipient") for r in m.recipients))))
        wait(spool.suppression_put([
            Suppression("old@example.net", "bad-domain", LONG_AGO - 86400, LONG_AGO,
                        "550 5.1.2 no such domain"),
            Suppression("manual@example.org", "manual", ARRIVAL, FAR)]))
    finally:
        wait(spool.close())


@pytest.fixture
def history_conf(conf, tmp_path):
    """conf's spool plus add_history()'s finished messages and suppressions."""
    add_history(tmp_path / "spool")
    return conf


# -- check-config -------------------------------------------------------------------------

def test_check_config_ok_prints_file_ok(capsys):
    """A valid file prints `FILE: OK` and exits 0 (the sample's hostname is the host's own
    name, which may warn here)."""
    assert cli.main(["check-config", "etc/txmta.toml"]) == 0
    assert capsys.readouterr().out.startswith("etc/txmta.toml: OK")


def good_config(tmp_path, extra: str = "") -> Any:
    f = tmp_path / "good.toml"
    port = _free_port()
    f.write_text(f'[server]\nhostname = "mx.example.org"\n[spool]\npath = "{tmp_path / "spool"}"\n'
                 f'[[listen]]\naddress = "127.0.0.1:{port}"\n' + extra)
    return f


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_config_reports_every_error_not_only_the_first(tmp_path, capsys):
    f = tmp_path / "bad.toml"
    f.write_text('[server]\nmax_errors = -1\ncommand_timeout = "soon"\n'
                 '[[listen]]\naddress = "127.0.0.1:2525"\ntls = "tls13"\n'
                 '[[lane]]\nname = "x"\nshare = 3\n')
    assert cli.main(["check-config", str(f)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[1].split(" =")[0].strip() for line in lines[:4]] == [
        "server.max_errors", "server.command_timeout", "lane[0].share", "listen[0].tls"]


def test_check_config_warns_about_an_unqualified_hostname_with_the_fix(tmp_path, capsys):
    f = good_config(tmp_path)
    f.write_text(f.read_text().replace("mx.example.org", "localhost"))
    assert cli.main(["check-config", str(f)]) == 0
    out = capsys.readouterr()
    assert out.out == f"{f}: OK (1 warning)\n"
    assert out.err.startswith(f'warning: {f}: server.hostname = "localhost": not a fully '
                              'qualified name') and 'set server.hostname = "' in out.err


def test_check_config_names_a_listener_that_cannot_bind(tmp_path, capsys):
    import socket
    f = good_config(tmp_path)
    port = int(f.read_text().split("127.0.0.1:")[1].split('"')[0])
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", port))
        busy.listen(1)
        assert cli.main(["check-config", str(f)]) == 1
    assert capsys.readouterr().err == (f'{f}: listen[0].address = "127.0.0.1:{port}": '
                                       "cannot listen: Address already in use\n")
    assert cli.main(["check-config", str(f)]) == 0


def test_check_config_names_a_spool_that_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    f = good_config(tmp_path)
    f.write_text(f.read_text().replace(str(tmp_path / "spool"), str(blocker / "spool")))
    assert cli.main(["check-config", str(f)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f'{f}: spool.path = "{blocker / "spool"}": cannot write to ') and (
        "Not a directory" in err)


def test_check_config_error_names_key_and_exits_1(tmp_path, capsys):
    """An invalid file prints the ConfigError (file, key, value) on stderr and exits 1."""
    f = tmp_path / "bad.toml"
    f.write_text('[[listen]]\naddress = "127.0.0.1:25"\ntls = "tls13"\n')
    assert cli.main(["check-config", str(f)]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.splitlines()[0] == (
        f'{f}: listen[0].tls = "tls13": must be one of "none", "starttls", "implicit"')


def test_check_config_refuses_a_source_address_not_of_this_host(tmp_path, capsys):
    """Pool addresses must be this host's (connections are bound to them): a loopback
    address is, a documentation address is not, and the error names the pool."""
    f = tmp_path / "pools.toml"
    f.write_text('[[pool]]\nname = "main"\naddresses = [{address = "127.0.0.61"}]\n'
                 '[[pool]]\nname = "bulk"\nlanes = ["bulk"]\n'
                 'addresses = [{address = "192.0.2.61"}]\n')
    assert cli.main(["check-config", str(f)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"{f}: pool[1].addresses: 192.0.2.61 is not an address of this host")
    f.write_text('[[pool]]\nname = "main"\naddresses = [{address = "127.0.0.61"}]\n'
                 f'[[listen]]\naddress = "127.0.0.1:{_free_port()}"\n')
    assert cli.main(["check-config", str(f)]) == 0


def test_check_config_missing_file_exits_1(tmp_path, capsys):
    """A file that cannot be read is an error, not the defaults."""
    assert cli.main(["check-config", str(tmp_path / "nope.toml")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_unknown_subcommand_is_a_usage_error(capsys):
    """Bad usage exits 2, as argparse does."""
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["queue"]) == 2


# -- passwd -------------------------------------------------------------------------------

def test_passwd_reads_stdin_when_not_a_tty(monkeypatch, capsys):
    """Piped input: one line is the password; the output is `USER:HASH` that verifies."""
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert cli.main(["passwd", "alice"]) == 0
    user, _, encoded = capsys.readouterr().out.strip().partition(":")
    assert user == "alice"
    assert verify_password("s3cret", encoded)


def test_passwd_on_a_tty_asks_twice_and_refuses_a_mismatch(monkeypatch, capsys):
    """On a terminal the password is asked twice; different answers exit 1 with no output."""
    class Tty(io.StringIO):
        def isatty(self):
            return True
    answers = iter(["one", "two"])
    monkeypatch.setattr("sys.stdin", Tty())
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt="": next(answers))
    assert cli.main(["passwd", "alice"]) == 1
    out = capsys.readouterr()
    assert out.out == "" and "differ" in out.err


def test_passwd_user_defaults_to_login_name(monkeypatch, capsys):
    """Without USER, the current login name is used."""
    monkeypatch.setattr("sys.stdin", io.StringIO("pw\n"))
    monkeypatch.setattr(cli.getpass, "getuser", lambda: "operator")
    assert cli.main(["passwd"]) == 0
    assert capsys.readouterr().out.startswith("operator:scrypt$14$8$1$")


def test_passwd_refuses_empty_password(monkeypatch, capsys):
    """An empty password is refused."""
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert cli.main(["passwd", "alice"]) == 1
    assert "empty" in capsys.readouterr().err


# -- queue list -----------------------------------------------------------------------------

def test_queue_list_prints_mailq_table(conf, capsys):
    """The table has a header, each message with size and sender, each recipient with its
    state and last reply, held messages marked `!`, and the mailq summary line."""
    assert cli.main(["queue", "list", "--config", conf]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("-Queue ID-")
    first = next(l for l in lines if l.startswith("0000AAAAAAAAbcdf"))
    assert f" {len(BODY)} " in first and first.endswith("alice@example.org")
    assert "(451 4.7.1 Greylisted, try later)" in out
    assert "bob@example.com  [queued, 2 attempts]" in out
    assert "carol@example.net  [delivered, 1 attempt]" in out
    held = next(l for l in lines if l.startswith("0000AAAAAAABbcdf"))
    assert held.startswith("0000AAAAAAABbcdf!") and held.endswith("<>")
    assert "dave@example.org  [held]" in out
    total_kb = (len(BODY) + 2000 + 1023) // 1024
    assert lines[-1] == f"-- {total_kb} Kbytes in 2 Requests."


def test_queue_list_json(conf, capsys):
    """--json prints every message with ISO 8601 UTC times and per-recipient state."""
    assert cli.main(["queue", "list", "--json", "--config", conf]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["id"] for m in data] == ["0000AAAAAAAAbcdf", "0000AAAAAAABbcdf"]
    m = data[0]
    assert m["arrival"] == "2026-11-28T07:14:23Z"
    assert m["size"] == len(BODY)
    assert m["sender"] == "alice@example.org"
    assert m["recipients"][0] == {
        "address": "bob@example.com", "state": "queued", "attempts": 2,
        "next_attempt": "2026-11-28T07:29:23Z",
        "last_reply": {"code": 451, "enhanced": "4.7.1", "text": "Greylisted, try later"}}
    assert m["recipients"][1]["state"] == "delivered"
    assert m["recipients"][1]["next_attempt"] is None
    held = data[1]
    assert held["sender"] == "<>"
    assert held["recipients"][0] == {"address": "dave@example.org", "state": "held", "attempts": 0,
                                     "next_attempt": None, "last_reply": None}


def test_queue_list_empty_spool(empty_conf, capsys):
    """An empty spool prints mailq's `Mail queue is empty` (and `[]` with --json)."""
    assert cli.main(["queue", "list", "--config", empty_conf]) == 0
    assert capsys.readouterr().out == "Mail queue is empty\n"
    assert cli.main(["queue", "list", "--json", "--config", empty_conf]) == 0
    assert json.loads(capsys.readouterr().out) == []


@pytest.fixture
def thirty_conf(tmp_path):
    """A spool of 30 one-recipient messages, ids in arrival order."""
    spool = LmdbSpool(str(tmp_path / "spool"), ImmediateReactor())
    try:
        for i in range(30):
            env = Envelope(Address("app", "example.org"), (Recipient(Address(f"u{i}", "example.com")),))
            put(spool, StoredMessage(f"0000AAAAAA{i:02d}bcdf", env, ARRIVAL + i, 100,
                                     (RecipientState(QUEUED, 1, ARRIVAL + 900),),
                                     {"address": "127.0.0.1"}), b"Subject: x\r\n\r\nx\r\n")
    finally:
        wait(spool.close())
    f = tmp_path / "txmta.toml"
    f.write_text(f'[spool]\npath = "{tmp_path / "spool"}"\n')
    return str(f)


def test_queue_list_limit_reads_one_page_and_after_continues(thirty_conf, capsys, monkeypatch):
    """--limit N lists the first N messages and reads only those (and one more, to tell
    that more are queued); the last line names the queue's size and the next page's
    --after; --after ID starts after ID and the last page has no such line."""
    from txmta.spool import view
    loaded = []
    real = view.load_message
    monkeypatch.setattr(view, "load_message",
                        lambda txn, dbs, mid: (loaded.append(mid), real(txn, dbs, mid))[1])
    assert cli.main(["queue", "list", "--limit", "4", "--config", thirty_conf]) == 0
    out = capsys.readouterr().out
    shown = [line.split()[0] for line in out.splitlines() if line.startswith("0000")]
    assert shown == [f"0000AAAAAA{i:02d}bcdf" for i in range(4)]
    assert len(loaded) <= 5
    assert out.splitlines()[-1] == "-- 30 messages in the queue; the next page: --after 0000AAAAAA03bcdf"
    assert cli.main(["queue", "list", "--json", "--limit", "10", "--after", "0000AAAAAA25bcdf",
                     "--config", thirty_conf]) == 0
    assert [m["id"] for m in json.loads(capsys.readouterr().out)] == [
        f"0000AAAAAA{i:02d}bcdf" for i in range(26, 30)]
    assert cli.main(["queue", "list", "--limit", "4", "--after", "0000AAAAAA25bcdf",
                     "--config", thirty_conf]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "-- 1 Kbytes in 4 Requests."
    assert cli.main(["queue", "list", "--limit", "0", "--config", thirty_conf]) == 1
    assert "--limit" in capsys.readouterr().err


def test_queue_list_without_limit_still_lists_every_message(thirty_conf, capsys):
    """The whole queue, read a chunk at a time, as before."""
    assert cli.main(["queue", "list", "--json", "--config", thirty_conf]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 30


def test_queue_list_missing_spool_is_a_clear_error(tmp_path, capsys):
    """A spool directory that does not exist: a message naming it, exit 1, no traceback."""
    f = tmp_path / "txmta.toml"
    f.write_text(f'[spool]\npath = "{tmp_path / "nospool"}"\n')
    assert cli.main(["queue", "list", "--config", str(f)]) == 1
    err = capsys.readouterr().err
    assert "nospool" in err and "Traceback" not in err


def test_queue_list_bad_config_exits_1(tmp_path, capsys):
    """A bad --config is reported like check-config does."""
    f = tmp_path / "txmta.toml"
    f.write_text('[spool]\nmax_message_size = "0"\n')
    assert cli.main(["queue", "list", "--config", str(f)]) == 1
    assert "spool.max_message_size" in capsys.readouterr().err


# -- queue show -------------------------------------------------------------------------------

def test_queue_show_prints_envelope_and_header_section(conf, capsys):
    """Envelope, ESMTP parameters, per-recipient state, client info, then only the headers."""
    assert cli.main(["queue", "show", "0000AAAAAAAAbcdf", "--config", conf]) == 0
    out = capsys.readouterr().out
    for expected in ["id: 0000AAAAAAAAbcdf", "arrival: 2026-11-28T07:14:23Z",
                     f"size: {len(BODY)}", "sender: alice@example.org", "body: 8BITMIME",
                     "smtputf8: no", "ret: HDRS", "envid: env-1",
                     "client address: 192.0.2.10", "client helo: client.example.org",
                     "recipient 0: bob@example.com", "  notify: FAILURE,DELAY",
                     "  orcpt: rfc822;bob@example.com", "  attempts: 2",
                     "  next attempt: 2026-11-28T07:29:23Z",
                     "  last reply: 451 4.7.1 Greylisted, try later",
                     "recipient 1: carol@example.net", "  state: delivered",
                     "Subject: hello"]:
        assert expected in out, expected
    assert "The body" not in out
    assert out.rstrip().endswith("Subject: hello")


def test_queue_show_unknown_id_exits_1(conf, capsys):
    """An id not in the queue: message on stderr, exit 1."""
    assert cli.main(["queue", "show", "NOSUCHID", "--config", conf]) == 1
    out = capsys.readouterr()
    assert out.out == "" and "NOSUCHID" in out.err


def test_header_section_stops_at_first_empty_line():
    """Only the header section is shown, with LF line endings."""
    assert cli.header_section(b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore") == "A: 1\nB: 2"
    assert cli.header_section(b"A: 1\r\n") == "A: 1\n"


def test_command_table_lists_each_subcommand_once():
    """The grammar is one table; every entry is reachable through main()."""
    words = [c.words for c in cli.COMMANDS]
    assert words == ["check-config", "passwd", "doctor", "queue list", "queue show", "history",
                     "suppression list", "queue flush", "queue hold", "queue release",
                     "queue requeue", "queue delete", "status", "suppression add",
                     "suppression remove", "suppression import", "api-token", "webhook list",
                     "webhook replay", "webhook test", "dkim keygen"]
    assert len(set(words)) == len(words)


def test_queue_show_prints_the_timeline_between_envelope_and_headers(conf, capsys):
    """A queued message's timeline (here: its `received` event) follows the recipients;
    the header section still comes last; each recipient has remote and category lines."""
    assert cli.main(["queue", "show", "0000AAAAAAAAbcdf", "--config", conf]) == 0
    out = capsys.readouterr().out
    assert "finished at" not in out
    assert "  remote: -" in out and "  category: -" in out
    timeline = out[out.index("\ntimeline:\n"):out.index("Received: from client")]
    assert ("  2026-11-28T07:14:23Z received  from <alice@example.org> client=192.0.2.10 "
            f"size={len(BODY)} nrcpt=2\n") in timeline
    assert out.rstrip().endswith("Subject: hello")


def test_queue_show_finished_message_from_the_history(history_conf, capsys):
    """A finished message: "finished at", each recipient's final state with the reply that
    decided it, the remote host and the category, and the whole timeline in order."""
    assert cli.main(["queue", "show", FINISHED_ID, "--config", history_conf]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[:3] == [f"id: {FINISHED_ID}", "arrival: 2026-11-28T07:15:23Z",
                         "finished at: 2026-11-28T07:15:28Z (no longer queued; from the history)"]
    assert "message-id: <abc@example.com>" in lines
    i = lines.index("recipient 0: bob@example.com")
    assert lines[i + 1] == "  state: bounced"
    assert "  last reply: 550 5.1.1 no such user" in lines[i:i + 9]
    assert f"  remote: {MX}" in lines[i:i + 9]
    assert "  category: invalid-recipient" in lines[i:i + 9]
    j = lines.index("recipient 1: erin@example.com")
    assert lines[j + 1] == "  state: delivered"
    assert "  last reply: 250 2.0.0 Ok: queued as 4XyZ" in lines[j:j + 9]
    t = lines.index("timeline:")
    assert lines[t + 1].startswith("  2026-11-28T07:15:23Z received  from <alice@example.org>")
    assert lines[t + 2] == ("  2026-11-28T07:15:28Z bounced   bob@example.com 550 5.1.1 no such "
                            f"user remote={MX} category=invalid-recipient")
    assert lines[t + 3] == ("  2026-11-28T07:15:28Z delivered erin@example.com 250 2.0.0 Ok: "
                            f"queued as 4XyZ remote={MX}")
    assert lines[-1] == "(the body is not kept after the message finished)"


def test_queue_show_json_of_a_finished_message(history_conf, capsys):
    """--json: envelope fields, recipients with reply/remote/category, events, finished."""
    assert cli.main(["queue", "show", FINISHED_ID, "--json", "--config", history_conf]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["id"] == FINISHED_ID
    assert data["finished"] == "2026-11-28T07:15:28Z"
    assert data["sender"] == "alice@example.org"
    assert data["message_id"] == "<abc@example.com>"
    assert data["headers"] is None
    assert data["recipients"][0] == {
        "address": "bob@example.com", "state": "bounced", "attempts": 1, "next_attempt": None,
        "notify": [], "orcpt": None,
        "last_reply": {"code": 550, "enhanced": "5.1.1", "text": "no such user"},
        "remote": MX, "category": "invalid-recipient"}
    assert data["recipients"][1]["state"] == "delivered"
    assert [e["event"] for e in data["events"]] == ["received", "bounced", "delivered"]
    assert data["events"][1] == {"time": "2026-11-28T07:15:28Z", "event": "bounced",
                                 "rcpt": "bob@example.com", "text": "550 5.1.1 no such user",
                                 "remote": MX, "category": "invalid-recipient"}


def test_queue_show_json_of_a_queued_message(conf, capsys):
    """--json for a message still queued: finished is null, the header section is there."""
    assert cli.main(["queue", "show", "0000AAAAAAAAbcdf", "--json", "--config", conf]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["finished"] is None
    assert data["envid"] == "env-1" and data["ret"] == "HDRS" and data["body"] == "8BITMIME"
    assert data["declared_size"] == len(BODY)
    assert data["client"]["helo"] == "client.example.org"
    assert data["recipients"][0]["notify"] == ["FAILURE", "DELAY"]
    assert data["recipients"][0]["next_attempt"] == "2026-11-28T07:29:23Z"
    assert data["headers"].endswith("Subject: hello")
    assert [e["event"] for e in data["events"]] == ["received"]


def test_queue_show_message_finished_by_a_plain_modify(history_conf, capsys):
    """A message finished without events or a finish time of its own still shows, with
    the time it finished and its final state."""
    assert cli.main(["queue", "show", "0000AAAAAAADbcdf", "--json",
                     "--config", history_conf]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["finished"] is not None
    assert data["recipients"][0]["state"] == "bounced"
    assert data["recipients"][0]["category"] == "invalid-recipient"


@pytest.mark.parametrize("value", ["<abc@example.com>", "abc@example.com", " <abc@example.com> "])
def test_history_finds_a_message_by_message_id(history_conf, capsys, value):
    """history --message-id, with or without the angle brackets, prints what queue show does."""
    assert cli.main(["queue", "show", FINISHED_ID, "--config", history_conf]) == 0
    expected = capsys.readouterr().out
    assert cli.main(["history", "--message-id", value, "--config", history_conf]) == 0
    assert capsys.readouterr().out == expected


def test_history_json(history_conf, capsys):
    assert cli.main(["history", "--message-id", "abc@example.com", "--json",
                     "--config", history_conf]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["id"] == FINISHED_ID and data["finished"] == "2026-11-28T07:15:28Z"


def test_history_unknown_message_id_exits_1(history_conf, capsys):
    assert cli.main(["history", "--message-id", "nope@example.com", "--config", history_conf]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == ("<nope@example.com>: no message with this Message-ID in the queue or "
                       "its history\n")


def test_history_needs_a_message_id(history_conf, capsys):
    assert cli.main(["history", "--config", history_conf]) == 2
    assert cli.main(["history", "--message-id", "<>", "--config", history_conf]) == 1
    assert "empty" in capsys.readouterr().err


def test_history_by_sender_lists_the_newest_first(history_conf, capsys):
    """--sender (any case) finds queued and finished mail from the address, newest first."""
    assert cli.main(["history", "--sender", "<ALICE@example.org>", "--config", history_conf]) == 0
    out = capsys.readouterr().out
    ids = [line.split()[0] for line in out.splitlines() if not line.startswith(" ")]
    assert ids == ["0000AAAAAAADbcdf", FINISHED_ID, "0000AAAAAAAAbcdf"]
    assert (f"{FINISHED_ID}  2026-11-28T07:15:23Z  finished  bounced 1, delivered 1\n"
            "    from <alice@example.org> to bob@example.com, erin@example.com\n"
            "    message-id: <abc@example.com>\n") in out
    assert "0000AAAAAAAAbcdf  2026-11-28T07:14:23Z  queued  queued 1, delivered 1\n" in out


def test_history_by_recipient_with_a_limit_and_json(history_conf, capsys):
    assert cli.main(["history", "--recipient", "bob@example.com", "--limit", "1",
                     "--config", history_conf]) == 0
    assert capsys.readouterr().out.split()[0] == FINISHED_ID
    assert cli.main(["history", "--recipient", "Bob@Example.com", "--json",
                     "--config", history_conf]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["finished"]) for r in rows] == [
        (FINISHED_ID, "2026-11-28T07:15:28Z"), ("0000AAAAAAAAbcdf", None)]


def test_history_of_an_unknown_address_says_so(history_conf, capsys):
    assert cli.main(["history", "--recipient", "nobody@example.org", "--config", history_conf]) == 0
    assert capsys.readouterr().out == ("no message to nobody@example.org in the queue or its "
                                       "history\n")
    assert cli.main(["history", "--sender", "x@y", "--recipient", "a@b",
                     "--config", history_conf]) == 2       # one of the three, not two


def test_queue_show_body_prints_the_stored_message_like_postcat(conf, capsys):
    assert cli.main(["queue", "show", "0000AAAAAAAAbcdf", "--body", "--config", conf]) == 0
    out = capsys.readouterr().out
    envelope, _, rest = out.partition("*** MESSAGE CONTENTS 0000AAAAAAAAbcdf ***\n")
    assert "recipient 0: bob@example.com" in envelope and "Subject: hello" not in envelope
    assert rest == (BODY.replace(b"\r\n", b"\n").decode()
                    + "*** END OF MESSAGE 0000AAAAAAAAbcdf ***\n")


def test_queue_show_body_json_and_of_a_finished_message(history_conf, capsys):
    assert cli.main(["queue", "show", "0000AAAAAAAAbcdf", "--body", "--json",
                     "--config", history_conf]) == 0
    assert json.loads(capsys.readouterr().out)["message"] == BODY.decode()
    assert cli.main(["queue", "show", FINISHED_ID, "--body", "--config", history_conf]) == 1
    assert "body is not kept" in capsys.readouterr().err


def test_version(capsys):
    import txmta
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"txmta {txmta.__version__}\n"


def test_header_id_forms():
    assert cli.header_id_forms("a@b") == ["<a@b>", "a@b"]
    assert cli.header_id_forms("<a@b>") == ["<a@b>", "a@b"]


# -- suppression list -------------------------------------------------------------------------

def test_suppression_list_skips_expired_entries(history_conf, capsys):
    """Columns address, reason, since, expires, reply; sorted by address; expired left out."""
    assert cli.main(["suppression", "list", "--config", history_conf]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ADDRESS", "REASON", "SINCE", "EXPIRES", "REPLY"]
    assert [l.split()[0] for l in lines[1:]] == ["bob@example.com", "manual@example.org"]
    assert lines[1].split() == ["bob@example.com", "invalid-recipient", "2026-11-28T07:15:28Z",
                                "2099-01-01T00:00:00Z", "550", "5.1.1", "no", "such", "user"]
    assert lines[2].split() == ["manual@example.org", "manual", "2026-11-28T07:14:23Z",
                                "2099-01-01T00:00:00Z", "-"]
    # the columns line up
    assert len({l.index("20") for l in lines[1:]}) == 1


def test_suppression_list_all_shows_expired_entries(history_conf, capsys):
    assert cli.main(["suppression", "list", "--all", "--config", history_conf]) == 0
    out = capsys.readouterr().out
    assert "old@example.net" in out and "2020-01-01T00:00:00Z (expired)" in out


def test_suppression_list_json(history_conf, capsys):
    assert cli.main(["suppression", "list", "--json", "--config", history_conf]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0] == {"address": "bob@example.com", "reason": "invalid-recipient",
                       "since": "2026-11-28T07:15:28Z", "expires": "2099-01-01T00:00:00Z",
                       "reply": "550 5.1.1 no such user", "expired": False}
    assert [e["address"] for e in data] == ["bob@example.com", "manual@example.org"]
    assert cli.main(["suppression", "list", "--json", "--all", "--config", history_conf]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [e["expired"] for e in data] == [False, False, True]


def test_suppression_list_empty(empty_conf, capsys):
    assert cli.main(["suppression", "list", "--config", empty_conf]) == 0
    assert capsys.readouterr().out == "Suppression list is empty\n"
    assert cli.main(["suppression", "list", "--json", "--config", empty_conf]) == 0
    assert json.loads(capsys.readouterr().out) == []


# -- commands through the control socket ---------------------------------------------------------
# A fake daemon: a thread serving the control socket that parses requests with Twisted's own
# AMP parser (so the CLI's hand-written codec is checked against it) and answers scripted boxes.


class FakeDaemon:
    """Listens on `path`; each request box goes to `answer(box) -> dict of bytes` (or None to
    hang up); every request is kept in `requests`."""

    def __init__(self, path, answer):
        self.answer = answer
        self.requests = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.sock.settimeout(0.05)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                data = b""
                while not data.endswith(b"\x00\x00") or not amp.parseString(data):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                for box in amp.parseString(data):
                    self.requests.append(dict(box))
                    reply = self.answer(box)
                    if reply is None:
                        break
                    conn.sendall(amp.AmpBox(reply).serialize())

    def close(self):
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


KNOWN_ID = "0000AAAAAAAAbcdf"
SUPPRESSED = "bob@example.com"


def scripted_answer(box):
    """What a daemon with one message, KNOWN_ID, answers."""
    command, ask = box[b"_command"], box[b"_ask"]
    if command == b"Flush":
        count = b"0" if box.get(b"message_id", KNOWN_ID.encode()) != KNOWN_ID.encode() else b"3"
        return {b"_answer": ask, b"count": count}
    if command in (b"Hold", b"Release", b"Requeue", b"Delete"):
        found = box[b"message_id"] == KNOWN_ID.encode()
        return {b"_answer": ask, b"found": b"True" if found else b"False"}
    if command == b"Status":
        return {b"_answer": ask,
                b"json": b'{"messages": 1, "pid": 4242, "version": "0.1.0"}'}
    if command == b"SuppressionAdd":
        return {b"_answer": ask, b"ok": b"True"}
    if command == b"SuppressionRemove":
        found = box[b"address"] == SUPPRESSED.encode()
        return {b"_answer": ask, b"found": b"True" if found else b"False"}
    if command == b"SuppressionImport":
        return {b"_answer": ask, b"count": str(len(box[b"lines"].splitlines())).encode()}
    return {b"_error": ask, b"_error_code": b"UNHANDLED",
            b"_error_description": b"Unhandled Command: " + command}


@pytest.fixture
def daemon(tmp_path):
    """A configuration whose spool directory holds a fake daemon's control socket."""
    spool = tmp_path / "spool"
    spool.mkdir()
    f = tmp_path / "txmta.toml"
    f.write_text(f'[spool]\npath = "{spool}"\n')
    fake = FakeDaemon(control_socket_path(str(spool)), scripted_answer)
    fake.config = str(f)
    yield fake
    fake.close()


@pytest.mark.parametrize("argv, request_fields, out", [
    (["queue", "flush"], {}, "3\n"),
    (["queue", "flush", KNOWN_ID], {b"message_id": KNOWN_ID.encode()}, "3\n"),
    (["queue", "flush", "--domain", "example.com"], {b"domain": b"example.com"}, "3\n"),
    (["queue", "flush", "--json"], {}, '{"count": 3}\n'),
    (["queue", "flush", "0000ZZZZZZZZzzzz"], {b"message_id": b"0000ZZZZZZZZzzzz"}, "0\n"),
])
def test_queue_flush_sends_flush_and_prints_the_count(daemon, capsys, argv, request_fields, out):
    """`queue flush [ID] [--domain D]` sends one Flush with only the given fields."""
    assert cli.main(argv + ["--config", daemon.config]) == 0
    assert capsys.readouterr().out == out
    [request] = daemon.requests
    assert {k: v for k, v in request.items() if not k.startswith(b"_")} == request_fields
    assert request[b"_command"] == b"Flush"


@pytest.mark.parametrize("verb, command, done", [
    ("hold", b"Hold", "held"), ("release", b"Release", "released"),
    ("requeue", b"Requeue", "requeued"), ("delete", b"Delete", "deleted"),
])
def test_queue_id_commands_print_what_was_done(daemon, capsys, verb, command, done):
    """`queue hold|release|requeue|delete ID` sends its AMP command and prints `ID: held` etc."""
    assert cli.main(["queue", verb, KNOWN_ID, "--config", daemon.config]) == 0
    assert capsys.readouterr().out == f"{KNOWN_ID}: {done}\n"
    assert daemon.requests[0][b"_command"] == command
    assert daemon.requests[0][b"message_id"] == KNOWN_ID.encode()


@pytest.mark.parametrize("verb", ["hold", "release", "requeue", "delete"])
def test_queue_id_commands_unknown_id_exits_1(daemon, capsys, verb):
    """An id the daemon does not know: a message on stderr, exit 1."""
    assert cli.main(["queue", verb, "0000ZZZZZZZZzzzz", "--config", daemon.config]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == "0000ZZZZZZZZzzzz: no such message in the queue\n"


def test_status_prints_fields_and_listeners_or_json(daemon, capsys, tmp_path):
    """`status` prints one `key: value` line per field of the daemon, then each listener's
    state; `--json` the daemon's JSON with "listeners"; exit 1 when a listener does not
    answer (a silent outage otherwise)."""
    import socket
    with socket.socket() as up:
        up.bind(("127.0.0.1", 0))
        up.listen(1)
        port = up.getsockname()[1]
        conf = Path(daemon.config)
        conf.write_text(conf.read_text() + f'[[listen]]\naddress = "127.0.0.1:{port}"\n')
        assert cli.main(["status", "--config", daemon.config]) == 0
        assert capsys.readouterr().out == ("messages: 1\npid: 4242\nversion: 0.1.0\n"
                                           f"listen[0] 127.0.0.1:{port}: listening\n")
        assert cli.main(["status", "--json", "--config", daemon.config]) == 0
        assert json.loads(capsys.readouterr().out) == {
            "messages": 1, "pid": 4242, "version": "0.1.0",
            "listeners": [{"name": "listen[0]", "address": f"127.0.0.1:{port}", "up": True}]}
    assert cli.main(["status", "--config", daemon.config]) == 1     # closed now
    assert capsys.readouterr().out.endswith(f"listen[0] 127.0.0.1:{port}: NOT ANSWERING\n")


RELAYS = [{"name": "relay0", "relay": "[a.example]:587", "state": "open", "failures": 0,
           "open_until": 1060.0, "cooldown": 60.0, "opened": 2},
          {"name": "backup", "relay": "192.0.2.25", "state": "closed", "failures": 1,
           "open_until": None, "cooldown": 60.0, "opened": 0}]


def test_relay_lines_say_each_relays_state():
    """One line per relayhost: name, relay, state, how long an open circuit stays open."""
    assert cli.relay_lines(RELAYS, now=1000.0) == [
        "  relay0 [a.example]:587: open for 60s more, 0 recent failure(s), opened 2 time(s)",
        "  backup 192.0.2.25: closed, 1 recent failure(s), opened 0 time(s)"]


@pytest.mark.parametrize("answer, heading", [
    ({"messages": 1, "pid": 4242, "relays": RELAYS}, "relayhosts:"),
    ({"messages": 1, "workers": 2, "worker": [{"index": 0, "relays": RELAYS},
                                              {"index": 1, "running": False}]},
     "relayhosts of worker 0:"),
])
def test_status_shows_the_relayhost_circuits(tmp_path, capsys, answer, heading):
    """`status` prints the relayhosts' circuits as lines (each worker's, with several);
    `--json` keeps them as the daemon gave them."""
    spool = tmp_path / "spool"
    spool.mkdir()
    f = tmp_path / "txmta.toml"
    up = socket.socket()
    up.bind(("127.0.0.1", 0))
    up.listen(1)
    port = up.getsockname()[1]
    f.write_text(f'[spool]\npath = "{spool}"\n[[listen]]\naddress = "127.0.0.1:{port}"\n')

    def script(box):
        return {b"_answer": box[b"_ask"], b"json": json.dumps(answer).encode()}
    fake = FakeDaemon(control_socket_path(str(spool)), script)
    try:
        assert cli.main(["status", "--config", str(f)]) == 0
        out = capsys.readouterr().out
        assert "relays" not in out and heading in out
        assert "  relay0 [a.example]:587: open" in out and "  backup 192.0.2.25: closed" in out
        assert cli.main(["status", "--json", "--config", str(f)]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got.pop("listeners") == [{"name": "listen[0]", "address": f"127.0.0.1:{port}",
                                         "up": True}]
        assert got == answer
    finally:
        fake.close()
        up.close()


@pytest.mark.parametrize("argv", [["status"], ["queue", "flush"], ["queue", "hold", KNOWN_ID],
                                  ["suppression", "add", "a@example.com"],
                                  ["suppression", "remove", "a@example.com"]])
def test_control_commands_without_a_daemon_say_so_and_exit_1(tmp_path, capsys, argv):
    """No control socket: "is the daemon running?" naming the socket, exit 1, no traceback."""
    f = tmp_path / "txmta.toml"
    f.write_text(f'[spool]\npath = "{tmp_path / "spool"}"\n')
    assert cli.main(argv + ["--config", str(f)]) == 1
    err = capsys.readouterr().err
    assert err == (f"is the daemon running? no control socket at "
                   f"{tmp_path / 'spool' / 'control.sock'}\n")


def test_control_command_error_from_the_daemon_exits_1(tmp_path, capsys):
    """An AMP error answer (here: an older daemon without the command) is shown, exit 1."""
    spool = tmp_path / "spool"
    spool.mkdir()
    f = tmp_path / "txmta.toml"
    f.write_text(f'[spool]\npath = "{spool}"\n')
    fake = FakeDaemon(control_socket_path(str(spool)),
                      lambda box: {b"_error": box[b"_ask"], b"_error_code": b"UNHANDLED",
                                   b"_error_description": b"Unhandled Command: 'Requeue'"})
    try:
        assert cli.main(["queue", "requeue", KNOWN_ID, "--config", str(f)]) == 1
    finally:
        fake.close()
    err = capsys.readouterr().err
    assert "UNHANDLED" in err and "Requeue" in err and "Traceback" not in err


def test_control_command_daemon_hangs_up_exits_1(tmp_path, capsys):
    """A daemon that closes without answering is an error, not a hang."""
    spool = tmp_path / "spool"
    spool.mkdir()
    f = tmp_path / "txmta.toml"
    f.write_text(f'[spool]\npath = "{spool}"\n')
    fake = FakeDaemon(control_socket_path(str(spool)), lambda box: None)
    try:
        assert cli.main(["status", "--config", str(f)]) == 1
    finally:
        fake.close()
    assert "without answering" in capsys.readouterr().err


def test_queue_id_commands_need_an_id(capsys):
    """hold/release/requeue/delete without an id are usage errors (exit 2)."""
    for verb in ("hold", "release", "requeue", "delete"):
        assert cli.main(["queue", verb]) == 2


# -- suppression add / remove / import, through the control socket --------------------------------

def _fields(request):
    return {k: v for k, v in request.items() if not k.startswith(b"_")}


@pytest.mark.parametrize("argv, fields", [
    (["a@example.com"], {b"address": b"a@example.com"}),
    (["a@example.com", "--reason", "complaint #42"],
     {b"address": b"a@example.com", b"reason": b"complaint #42"}),
    (["Ünïcode@exämple.com"], {b"address": "Ünïcode@exämple.com".encode()}),
])
def test_suppression_add_sends_suppression_add(daemon, capsys, argv, fields):
    """`suppression add ADDRESS [--reason TEXT]` sends one SuppressionAdd (no reason: left
    out, the daemon says "manual") and prints `ADDRESS: suppressed`."""
    assert cli.main(["suppression", "add"] + argv + ["--config", daemon.config]) == 0
    assert capsys.readouterr().out == f"{argv[0]}: suppressed\n"
    [request] = daemon.requests
    assert request[b"_command"] == b"SuppressionAdd"
    assert _fields(request) == fields


def test_suppression_add_refused_by_the_daemon_exits_1(tmp_path, capsys):
    spool = tmp_path / "spool"
    spool.mkdir()
    f = tmp_path / "txmta.toml"
    f.write_text(f'[spool]\npath = "{spool}"\n')
    fake = FakeDaemon(control_socket_path(str(spool)),
                      lambda box: {b"_answer": box[b"_ask"], b"ok": b"False"})
    try:
        assert cli.main(["suppression", "add", "a@example.com", "--config", str(f)]) == 1
    finally:
        fake.close()
    assert capsys.readouterr().err == "a@example.com: the daemon did not add it\n"


@pytest.mark.parametrize("verb", ["add", "remove"])
@pytest.mark.parametrize("address, complaint", [
    ("no-at-sign.example.com", "no @"), ("a b@example.com", "no spaces"),
    ("a@example.com\t", None), ("", "empty address")])
def test_suppression_add_and_remove_check_the_address(daemon, capsys, verb, address, complaint):
    """An address without "@" or with white space inside is refused before anything is sent
    (surrounding white space is dropped)."""
    rc = cli.main(["suppression", verb, address, "--config", daemon.config])
    out = capsys.readouterr()
    if complaint is None:
        assert daemon.requests[0][b"address"] == b"a@example.com"
        return
    assert rc == 1 and out.out == "" and complaint in out.err
    assert daemon.requests == []


def test_suppression_add_refuses_an_empty_reason(daemon, capsys):
    assert cli.main(["suppression", "add", "a@example.com", "--reason", " ",
                     "--config", daemon.config]) == 1
    assert "--reason" in capsys.readouterr().err and daemon.requests == []


def test_suppression_remove(daemon, capsys):
    """`suppression remove ADDRESS`: `ADDRESS: removed`, or exit 1 if it was not listed."""
    assert cli.main(["suppression", "remove", SUPPRESSED, "--config", daemon.config]) == 0
    assert capsys.readouterr().out == f"{SUPPRESSED}: removed\n"
    assert daemon.requests[0][b"_command"] == b"SuppressionRemove"
    assert _fields(daemon.requests[0]) == {b"address": SUPPRESSED.encode()}
    assert cli.main(["suppression", "remove", "x@example.com", "--config", daemon.config]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err == "x@example.com: not on the suppression list\n"


IMPORT_FILE = """# bounced in the old system
bob@example.com,invalid-recipient

  carol@example.net  ,  complaint, via the feedback loop
dave@example.org
   # indented comment
"""


def test_suppression_import_sends_the_lines_and_prints_the_count(daemon, tmp_path, capsys):
    """Comments and blank lines are skipped; each entry goes as "address,reason" (reason
    may hold commas; an entry without one is the bare address); the count is printed."""
    f = tmp_path / "list.txt"
    f.write_text(IMPORT_FILE)
    assert cli.main(["suppression", "import", str(f), "--config", daemon.config]) == 0
    assert capsys.readouterr().out == "3\n"
    [request] = daemon.requests
    assert request[b"_command"] == b"SuppressionImport"
    assert request[b"lines"].decode() == ("bob@example.com,invalid-recipient\n"
                                          "carol@example.net,complaint, via the feedback loop\n"
                                          "dave@example.org")


def test_suppression_import_from_stdin(daemon, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("a@example.com\nb@example.com,manual\n"))
    assert cli.main(["suppression", "import", "-", "--config", daemon.config]) == 0
    assert capsys.readouterr().out == "2\n"


def test_suppression_import_a_bad_line_sends_nothing(daemon, tmp_path, capsys):
    """A bad address anywhere: an error naming file and line, and nothing is imported."""
    f = tmp_path / "list.txt"
    f.write_text("a@example.com\n# fine\nnot an address\n")
    assert cli.main(["suppression", "import", str(f), "--config", daemon.config]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith(f"{f}:3: bad address 'not an address'")
    assert daemon.requests == []


def test_suppression_import_missing_file_exits_1(daemon, tmp_path, capsys):
    assert cli.main(["suppression", "import", str(tmp_path / "nope"),
                     "--config", daemon.config]) == 1
    assert "cannot read" in capsys.readouterr().err and daemon.requests == []


def test_suppression_import_empty_file_prints_0_without_asking(daemon, tmp_path, capsys):
    f = tmp_path / "list.txt"
    f.write_text("# nothing yet\n\n")
    assert cli.main(["suppression", "import", str(f), "--config", daemon.config]) == 0
    assert capsys.readouterr().out == "0\n" and daemon.requests == []


def test_suppression_import_splits_a_long_list_into_requests(daemon, tmp_path, capsys):
    """An AMP value holds at most 65535 octets: a long file goes as several requests whose
    counts are added up."""
    f = tmp_path / "list.txt"
    f.write_text("".join(f"user{i:05d}@example.com,hard bounce\n" for i in range(5000)))
    assert cli.main(["suppression", "import", str(f), "--config", daemon.config]) == 0
    assert capsys.readouterr().out == "5000\n"
    assert len(daemon.requests) > 1
    assert all(len(r[b"lines"]) <= cli.IMPORT_BATCH_OCTETS for r in daemon.requests)
    sent = b"\n".join(r[b"lines"] for r in daemon.requests).decode().splitlines()
    assert sent == [f"user{i:05d}@example.com,hard bounce" for i in range(5000)]


def test_import_batches():
    entries = [("a@x", ""), ("b@x", "r"), ("c@x", "")]
    assert cli.import_batches(entries) == ["a@x\nb@x,r\nc@x"]
    assert cli.import_batches(entries, limit=9) == ["a@x\nb@x,r", "c@x"]
    assert cli.import_batches(entries, limit=8) == ["a@x", "b@x,r", "c@x"]
    with pytest.raises(cli.CommandFailed, match="too long"):
        cli.import_batches(entries, limit=4)
    assert cli.import_batches([]) == []
