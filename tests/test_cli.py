"""The `txmta` command: check-config, passwd, and the read-only queue list/show on a real
LMDB spool written through the daemon's own spool API; the queue-changing commands and
status against a fake daemon serving the control socket from a thread."""

import io
import json
import socket
import threading
from calendar import timegm

import pytest
from twisted.protocols import amp

from txmta import cli
from txmta.control.amp import control_socket_path
from txmta.envelope import Address, Envelope, Recipient
from txmta.passwords import verify_password
from txmta.reply import Reply
from txmta.spool.interface import DELIVERED, HELD, QUEUED, RecipientState, StoredMessage
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


# -- check-config -------------------------------------------------------------------------

def test_check_config_ok_prints_file_ok(capsys):
    """A valid file prints `FILE: OK` and exits 0."""
    assert cli.main(["check-config", "etc/txmta.toml"]) == 0
    assert capsys.readouterr().out == "etc/txmta.toml: OK\n"


def test_check_config_error_names_key_and_exits_1(tmp_path, capsys):
    """An invalid file prints the ConfigError (file, key, value) on stderr and exits 1."""
    f = tmp_path / "bad.toml"
    f.write_text('[[listen]]\naddress = "127.0.0.1:25"\ntls = "tls13"\n')
    assert cli.main(["check-config", str(f)]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == f'{f}: listen[0].tls = "tls13": must be one of "none", "starttls", "implicit"\n'


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
    assert words == ["check-config", "passwd", "queue list", "queue show", "queue flush",
                     "queue hold", "queue release", "queue requeue", "queue delete", "status"]
    assert len(set(words)) == len(words)


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


def test_status_prints_fields_or_json(daemon, capsys):
    """`status` prints one `key: value` line per field; `--json` the daemon's JSON."""
    assert cli.main(["status", "--config", daemon.config]) == 0
    assert capsys.readouterr().out == "messages: 1\npid: 4242\nversion: 0.1.0\n"
    assert cli.main(["status", "--json", "--config", daemon.config]) == 0
    assert json.loads(capsys.readouterr().out) == {"messages": 1, "pid": 4242, "version": "0.1.0"}


@pytest.mark.parametrize("argv", [["status"], ["queue", "flush"], ["queue", "hold", KNOWN_ID]])
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
