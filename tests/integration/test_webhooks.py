"""Webhooks with a real twistd: signed (checked with the `standardwebhooks` package), at least
once across a SIGKILL, exactly one terminal event per recipient, retried after a 500.

The receiver is an HTTP server on 127.0.0.1 that verifies every request with
`standardwebhooks.Webhook(secret).verify` and keeps what it got; it can be told to answer
500 to its first requests.  Mail goes in over SMTP and out to a recording sink that refuses
one recipient (a bounce).  Every wait is bounded; loopback only.
"""

from __future__ import annotations

import json
import threading
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from standardwebhooks import Webhook

from itlib import Daemon, free_port, submit, txmta_cli, wait_until
from sinks import SmtpSink

pytestmark = pytest.mark.integration

SECRET = "whsec_" + "C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
SINK_IP = "127.0.0.43"
NO_SUCH_USER = "550 5.1.1 <nobody@dest.test>: Recipient address rejected: no such user"
TERMINAL = {"message.delivered", "message.bounced", "message.expired", "message.suppressed"}


class Receiver:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.got: list[tuple[str, dict[str, Any]]] = []     # (webhook-id, body) verified
        self.refused = 0                                    # bad signatures
        self.fail_first = 0                                 # answer 500 to this many
        self.answers: Counter[int] = Counter()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    data = Webhook(SECRET).verify(body, dict(self.headers.items()))
                except Exception:
                    with receiver.lock:
                        receiver.refused += 1
                    status = 400
                else:
                    with receiver.lock:
                        if receiver.fail_first > 0:
                            receiver.fail_first -= 1
                            status = 500
                        else:
                            receiver.got.append((self.headers["webhook-id"], data))
                            status = 200
                with receiver.lock:
                    receiver.answers[status] += 1
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def terminal(self) -> dict[tuple[str, str], set[str]]:
        """(queue id, recipient) -> the distinct webhook-ids of its terminal events."""
        out: dict[tuple[str, str], set[str]] = defaultdict(set)
        with self.lock:
            for wid, body in self.got:
                if body["type"] in TERMINAL:
                    out[(body["data"]["message_id"], body["data"]["recipient"])].add(wid)
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    p = tmp_path / "webhook.secret"
    p.write_text(SECRET + "\n")
    return p


def start(start_daemon: Callable[..., Daemon], receiver: Receiver, secret_file: Path,
          sink_port: int, **more: Any) -> Daemon:
    return start_daemon(
        delivery={"relayhost": f"{SINK_IP}:{sink_port}", "relayhost_tls": "none",
                  "connect_timeout": "5s"},
        retry={"schedule": ["1s", "2s"], "max_lifetime": "1h"},
        suppression={"categories": []},         # every message may bounce at nobody@
        webhook=[{"url": receiver.url, "secret": str(secret_file),
                  "events": ["received", "delivered", "bounced", "expired", "suppressed"]}],
        **more)


def test_signed_events_one_terminal_per_recipient(start_daemon: Callable[..., Daemon],
                                                  receiver: Receiver, secret_file: Path) -> None:
    """20 messages to a deliverable and an unknown recipient: every request verifies, each
    message has its received event and each recipient exactly one terminal event."""
    port = free_port(SINK_IP)
    with SmtpSink(SINK_IP, port, replies={"RCPT:nobody@dest.test": NO_SUCH_USER}):
        d = start(start_daemon, receiver, secret_file, port)
        ids = [submit(d, "app@example.com", ["bob@dest.test", "nobody@dest.test"],
                      f"Subject: {i}\r\n\r\nbody {i}\r\n") for i in range(20)]
        wanted = {(i, r) for i in ids for r in ("bob@dest.test", "nobody@dest.test")}
        wait_until(lambda: wanted <= set(receiver.terminal()), 60, "40 terminal events")
        wait_until(lambda: sum(1 for _, b in receiver.got if b["type"] == "message.received")
                   >= 20, 10, "20 received events",
                   diagnose=lambda: str(Counter(b["type"] for _, b in receiver.got)))
    # the bounces' DSNs to app@example.com are messages too, with their own events
    terminal = {k: v for k, v in receiver.terminal().items() if k[1] != "app@example.com"}
    assert set(terminal) == {(i, r) for i in ids for r in ("bob@dest.test", "nobody@dest.test")}
    assert all(len(w) == 1 for w in receiver.terminal().values())
    kinds = Counter(b["type"] for _, b in receiver.got)
    assert kinds["message.bounced"] == 20
    assert kinds["message.delivered"] == 20 + len(receiver.terminal()) - 40   # and the DSNs
    assert receiver.refused == 0
    bounced = [b for _, b in receiver.got if b["type"] == "message.bounced"][0]
    assert bounced["data"]["reply"]["code"] == 550 and bounced["data"]["sender"] == "app@example.com"


def test_a_500_is_retried_and_the_event_arrives(start_daemon: Callable[..., Daemon],
                                                receiver: Receiver, secret_file: Path) -> None:
    """The endpoint answers 500 three times, then 200: every event still arrives, once."""
    receiver.fail_first = 3
    port = free_port(SINK_IP)
    with SmtpSink(SINK_IP, port):
        d = start(start_daemon, receiver, secret_file, port)
        ids = [submit(d, "app@example.com", ["bob@dest.test"], "Subject: x\r\n\r\nx\r\n")
               for _ in range(2)]
        wait_until(lambda: len(receiver.terminal()) >= 2, 60, "2 terminal events after 500s")
        wait_until(lambda: sum(1 for _, b in receiver.got if b["type"] == "message.received")
                   >= 2, 60, "2 received events")
    assert receiver.answers[500] == 3
    assert {k[0] for k in receiver.terminal()} == set(ids)
    got_ids = [w for w, _ in receiver.got]
    assert len(got_ids) == len(set(got_ids))           # each event accepted once


def test_sigkill_loses_no_event_and_duplicates_share_their_id(
        start_daemon: Callable[..., Daemon], receiver: Receiver, secret_file: Path) -> None:
    """The daemon is killed with SIGKILL while it delivers and sends webhooks, then started
    again: every recipient of every accepted message gets its terminal event, and any event
    sent twice carries the same webhook-id (one distinct id per recipient)."""
    port = free_port(SINK_IP)
    with SmtpSink(SINK_IP, port, accept_delay=0.02):
        d = start(start_daemon, receiver, secret_file, port)
        ids = [submit(d, "app@example.com", ["bob@dest.test", "ann@dest.test"],
                      f"Subject: {i}\r\n\r\nx\r\n") for i in range(30)]
        wait_until(lambda: len(receiver.terminal()) >= 5, 30, "some terminal events")
        d.kill()
        d.start()
        wait_until(lambda: len(receiver.terminal()) >= 60, 90, "60 terminal events")
    terminal = receiver.terminal()
    assert set(terminal) == {(i, r) for i in ids for r in ("bob@dest.test", "ann@dest.test")}
    assert all(len(w) == 1 for w in terminal.values()), \
        {k: v for k, v in terminal.items() if len(v) != 1}
    assert receiver.refused == 0
    # nothing left to send: the spool's delivery entries are empty
    wait_until(lambda: not _pending(d), 20, "no webhook deliveries left")


def _pending(d: Daemon) -> int:
    v = d.view()
    try:
        return sum(n for n, _, _ in v.hook_stats().values())
    finally:
        v.close()


def test_webhook_json_is_what_the_docs_say(start_daemon: Callable[..., Daemon],
                                           receiver: Receiver, secret_file: Path) -> None:
    port = free_port(SINK_IP)
    with SmtpSink(SINK_IP, port):
        d = start(start_daemon, receiver, secret_file, port)
        mid = submit(d, "app@example.com", ["bob@dest.test"], "Subject: x\r\n\r\nx\r\n")
        wait_until(lambda: len(receiver.terminal()) >= 1, 30, "the delivered event")
    [(wid, delivered)] = [(w, b) for w, b in receiver.got if b["type"] == "message.delivered"]
    assert wid.startswith("msg_") and delivered["id"] == wid
    assert delivered["data"]["message_id"] == mid and delivered["data"]["recipient"] == "bob@dest.test"
    assert delivered["data"]["reply"]["code"] == 250 and delivered["timestamp"].endswith("Z")
    json.dumps(delivered)


def test_webhook_commands(start_daemon: Callable[..., Daemon], receiver: Receiver,
                          secret_file: Path) -> None:
    """`txmta webhook list` shows the endpoint and nothing waiting; `replay QUEUEID` sends the
    message's events again with their webhook-ids, `replay msg_...` one event; `test URL`
    sends a verified event and exits 0, 1 when the endpoint answers 500."""
    port = free_port(SINK_IP)
    with SmtpSink(SINK_IP, port):
        d = start(start_daemon, receiver, secret_file, port)
        mid = submit(d, "app@example.com", ["bob@dest.test"], "Subject: x\r\n\r\nx\r\n")
        wait_until(lambda: len(receiver.got) >= 2, 30, "received and delivered")
        listed = json.loads(txmta_cli(d, "webhook", "list", "--json").stdout)
        assert listed[0]["url"] == receiver.url and listed[0]["pending"] == 0
        first = {w for w, _ in receiver.got}
        out = txmta_cli(d, "webhook", "replay", mid)
        assert out.stdout.strip() == "2"
        wait_until(lambda: len(receiver.got) >= 4, 30, "the events again")
        assert {w for w, _ in receiver.got[2:]} == first
        one = sorted(first)[0]
        assert txmta_cli(d, "webhook", "replay", one).stdout.strip() == "1"
        wait_until(lambda: len(receiver.got) >= 5, 30, "one event again")
        assert receiver.got[4][0] == one
        assert txmta_cli(d, "webhook", "replay", "0152zzzzzzzzzzz", check=False).returncode == 1
        out = txmta_cli(d, "webhook", "test", receiver.url)
        assert "HTTP 200" in out.stdout and receiver.got[-1][1]["data"]["tag"] == "webhook-test"
        receiver.fail_first = 1
        assert txmta_cli(d, "webhook", "test", receiver.url, check=False).returncode == 1
