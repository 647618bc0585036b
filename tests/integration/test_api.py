"""The HTTP sending API with a real twistd: a Postmark client library, the native API, DKIM.

The daemon has an [[http]] listener, a tokens file written by `txmta api-token` (a real
process), DKIM keys for example.com (served by the test DNS server on 127.0.0.53) and a
relayhost that is a recording SMTP sink on 127.0.0.42.  `postmarker` (the Postmark client
from PyPI) talks to it with only its base URL changed; the native API is called with
urllib.  Every wait is bounded; loopback only.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from postmarker.core import PostmarkClient
from postmarker.exceptions import ClientError

from itlib import (HOSTNAME, REPO, Daemon, free_port, make_daemon, txmta_cli, wait_until)
from sinks import SmtpSink, Transaction
from test_dkim_delivery import dns_server, keys, verified  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration

SINK_IP = "127.0.0.42"


def api_token(tokens: Path, name: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "txmta.cli", "api-token", name, "--file",
                          str(tokens), *args], capture_output=True, text=True, check=True,
                         timeout=60, cwd=str(REPO))
    return out.stdout.strip()


class Api:
    """The daemon's HTTP listener, its tokens and the sink behind it."""

    def __init__(self, daemon: Daemon, url: str, sink: SmtpSink, tokens: dict[str, str]) -> None:
        self.daemon, self.url, self.sink, self.tokens = daemon, url, sink, tokens

    def call(self, path: str, body: Any, token: str | None = None,
             headers: dict[str, str] | None = None, raw: bytes | None = None
             ) -> tuple[int, Any, dict[str, str]]:
        data = raw if raw is not None else json.dumps(body).encode()
        h = {"Content-Type": "application/json", "Accept": "application/json"}
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        h.update(headers or {})
        req = urllib.request.Request(self.url + path, data=data, headers=h, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read()), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null"), dict(e.headers)

    def postmark(self, token: str) -> PostmarkClient:
        return PostmarkClient(server_token=token, root_api_url=self.url + "/")

    def arrived(self, n: int, what: str) -> list[Transaction]:
        self.sink.wait(lambda s: len(s.transactions) >= n, 30, what)
        return self.sink.snapshot()


@pytest.fixture(scope="module")
def api(module_daemons: Any, tmp_path_factory: pytest.TempPathFactory, keys: Any,
        dns_server: tuple[str, int]) -> Iterator[Api]:
    directory = tmp_path_factory.mktemp("api")
    tokens_file = directory / "api-tokens"
    tokens = {"app": api_token(tokens_file, "app"),
              "limited": api_token(tokens_file, "limited", "--domain", "example.com"),
              "dry": api_token(tokens_file, "dry", "--test"),
              "viewer": api_token(tokens_file, "viewer", "--scope", "dashboard"),
              "ops": api_token(tokens_file, "ops", "--scope", "admin")}
    port = free_port(SINK_IP)
    http_port = free_port()
    with SmtpSink(SINK_IP, port) as sink:
        d = module_daemons(
            http=[{"address": f"127.0.0.1:{http_port}", "name": "api"}],
            api={"tokens": str(tokens_file), "rate_limit": 0},
            delivery={"relayhost": f"{SINK_IP}:{port}", "relayhost_tls": "none",
                      "connect_timeout": "5s"},
            dns={"nameservers": [f"{dns_server[0]}:{dns_server[1]}"]},
            spool={"max_message_size": "200KiB"},
            dkim=[{"domain": dom, "selector": sel, "key": str(key), "algorithm": alg}
                  for dom, sel, alg, _, _, key in keys])
        yield Api(d, f"http://127.0.0.1:{http_port}", sink, tokens)


def by_subject(api: Api, subject: str) -> Transaction:
    for t in api.sink.snapshot():
        m = email.message_from_bytes(t.data, policy=email.policy.default)
        if m["Subject"] == subject:
            return t
    raise AssertionError(f"no message {subject!r} at the sink")


def test_postmark_client_sends_one_message(api: Api, dns_server: tuple[str, int]) -> None:
    """postmarker's emails.send() with only root_api_url changed: 200 with Postmark's answer,
    the message arrives signed (RSA and Ed25519 both verify) with its text and HTML parts,
    its attachment and the custom header; Bcc is in the envelope, not in the header."""
    pm = api.postmark(api.tokens["app"])
    before = len(api.sink.snapshot())
    answer = pm.emails.send(
        From="Alice Ärger <alice@example.com>", To="bob@dest.test, \"Doe, Jane\" <jane@dest.test>",
        Bcc="hidden@dest.test", Subject="Grüße — receipt 1", TextBody="Hello Bob\n",
        HtmlBody="<p>Hello <b>Bob</b></p>", Tag="receipts", Metadata={"order": "42"},
        Headers={"X-Order": "42"},
        Attachments=[{"Name": "résumé.txt", "Content": base64.b64encode(b"cv\n").decode(),
                      "ContentType": "text/plain"}])
    assert answer["ErrorCode"] == 0 and answer["Message"] == "OK"
    assert set(answer) >= {"To", "SubmittedAt", "MessageID", "ErrorCode", "Message"}
    [t] = api.arrived(before + 1, "the Postmark message")[before:]
    assert sorted(t.rcpt_to) == ["bob@dest.test", "hidden@dest.test", "jane@dest.test"]
    assert t.mail_from == "alice@example.com"
    m = email.message_from_bytes(t.data, policy=email.policy.default)
    assert m["Subject"] == "Grüße — receipt 1" and m["X-Order"] == "42"
    assert m["Bcc"] is None and "hidden@dest.test" not in t.data.decode("utf-8", "replace")
    assert m.get_body(("plain",)).get_content().replace("\r\n", "\n") == "Hello Bob\n"
    assert "<b>Bob</b>" in m.get_body(("html",)).get_content()
    [att] = list(m.iter_attachments())
    assert att.get_filename() == "résumé.txt" and att.get_content() in ("cv\n", b"cv\n")
    assert b"with HTTP id" in t.data and b"(token app)" in t.data
    assert verified(t.data, dns_server) == [("example.com", "rsa-sha256", True),
                                            ("example.com", "ed25519-sha256", True)]


def test_postmark_batch_mixes_good_and_bad_messages(api: Api) -> None:
    """emails.send_batch(): one answer per message in order; a bad one (no recipient) gets
    its ErrorCode and stores nothing, the others arrive."""
    pm = api.postmark(api.tokens["app"])
    before = len(api.sink.snapshot())
    answers = pm.emails.send_batch(
        {"From": "alice@example.com", "To": "bob@dest.test", "Subject": "batch 1", "TextBody": "1"},
        {"From": "alice@example.com", "To": "", "Subject": "batch 2", "TextBody": "2"},
        {"From": "alice@example.com", "To": "carol@dest.test", "Subject": "batch 3",
         "HtmlBody": "<i>3</i>"})
    assert [a["ErrorCode"] for a in answers] == [0, 300, 0]
    assert all(set(a) >= {"To", "SubmittedAt", "MessageID", "ErrorCode", "Message"} for a in answers)
    got = api.arrived(before + 2, "two batch messages")[before:]
    wait_until(lambda: len(api.sink.snapshot()) == before + 2, 2, "no third message")
    assert sorted(t.rcpt_to[0] for t in got) == ["bob@dest.test", "carol@dest.test"]


def test_bad_token_and_test_tokens(api: Api) -> None:
    """A wrong token: 401 ErrorCode 10 (postmarker raises its ClientError).  POSTMARK_API_TEST
    and a --test token: 200, nothing stored or sent.  A dashboard-only token may not send."""
    with pytest.raises(ClientError) as e:
        api.postmark("00000000-0000-0000-0000-000000000000").emails.send(
            From="alice@example.com", To="bob@dest.test", Subject="x", TextBody="x")
    assert e.value.error_code == 10
    stored = set(api.daemon.spool_ids())
    sent = len(api.sink.snapshot())
    for token in ("POSTMARK_API_TEST", api.tokens["dry"]):
        answer = api.postmark(token).emails.send(From="alice@example.com", To="bob@dest.test",
                                                 Subject="dry run", TextBody="x")
        assert answer["ErrorCode"] == 0
    status, body, _ = api.call("/email", {"From": "alice@example.com", "To": "bob@dest.test",
                                          "Subject": "x", "TextBody": "x"},
                               headers={"X-Postmark-Server-Token": api.tokens["viewer"]})
    assert status == 403 and body["ErrorCode"] == 10
    assert set(api.daemon.spool_ids()) <= stored       # nothing new (delivered mail leaves)
    assert len(api.sink.snapshot()) == sent
    wait_until(lambda: "token=app" in api.daemon.maillog(), 5, "the mail log written")
    assert "token=dry" not in api.daemon.maillog()


def test_refusals_store_nothing(api: Api) -> None:
    """Invalid JSON (402), a bad address (300), templates (422), a sender domain the token
    may not use, a body over max_message_size (413), an inactive recipient (406 naming it):
    each is answered with Postmark's fields and stores nothing."""
    before = set(api.daemon.spool_ids())
    good = {"From": "alice@example.com", "To": "bob@dest.test", "Subject": "s", "TextBody": "t"}
    app = api.tokens["app"]
    status, body, _ = api.call("/email", None, app, raw=b"{not json")
    assert status == 422 and body["ErrorCode"] == 402
    status, body, _ = api.call("/email", dict(good, To="not an address"), app)
    assert status == 422 and body["ErrorCode"] == 300 and "To" in body["Message"]
    status, body, _ = api.call("/email/withTemplate", dict(good, TemplateId=1), app)
    assert status == 422 and body["ErrorCode"] != 0
    status, body, _ = api.call("/email", dict(good, From="eve@other.test"), api.tokens["limited"])
    assert status == 422 and body["ErrorCode"] == 400
    big = base64.b64encode(b"x" * 300 * 1024).decode()
    status, body, _ = api.call("/email", dict(good, Attachments=[
        {"Name": "big.dat", "Content": big, "ContentType": "application/octet-stream"}]), app)
    assert status == 413, body
    txmta_cli(api.daemon, "suppression", "add", "gone@dest.test")
    wait_until(lambda: api.call("/email", dict(good, To="gone@dest.test"), app)[0] == 422, 10,
               "the suppression reaching the worker")
    status, body, _ = api.call("/email", dict(good, To="bob@dest.test, gone@dest.test"), app)
    assert status == 422 and body["ErrorCode"] == 406 and "gone@dest.test" in body["Message"]
    for key in ("To", "SubmittedAt", "MessageID", "ErrorCode", "Message"):
        assert key in body
    assert set(api.daemon.spool_ids()) <= before
    status, body, _ = api.call("/nothing-here", good, app)
    assert status == 404


def test_native_raw_and_structured_arrive_signed(api: Api, dns_server: tuple[str, int]) -> None:
    """POST /v1/messages with a raw message and an envelope: the message arrives octet for
    octet after our Received and DKIM-Signature fields, signed; with structured fields: the
    same message that was committed arrives, signed.  The answer names the queue id and an
    id per recipient."""
    raw = (b"From: Alice <alice@example.com>\r\nTo: bob@dest.test\r\nSubject: raw native\r\n"
           b"Message-ID: <raw-1@example.com>\r\nDate: Sun, 06 Dec 2026 04:00:00 +0000\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
           b"Content-Transfer-Encoding: 8bit\r\n\r\n"
           + "Grüße\r\n.leading dot\r\n".encode() + b"L" * 990 + b"\r\n")
    before = len(api.sink.snapshot())
    status, body, _ = api.call("/v1/messages", {
        "raw": base64.b64encode(raw).decode(),
        "envelope": {"from": "bounces@example.com", "to": ["bob@dest.test", "ann@dest.test"]},
        "tag": "raw"}, api.tokens["app"])
    assert status == 200, body
    assert body["id"] and [r["address"] for r in body["recipients"]] == ["bob@dest.test",
                                                                         "ann@dest.test"]
    status, body2, _ = api.call("/v1/messages", {
        "from": "alice@example.com", "to": ["bob@dest.test"], "subject": "structured native",
        "text": "plain ü\n", "html": "<p>ü</p>"}, api.tokens["app"])
    assert status == 200, body2
    api.arrived(before + 2, "two native messages")
    t = by_subject(api, "raw native")
    assert t.mail_from == "bounces@example.com" and sorted(t.rcpt_to) == ["ann@dest.test",
                                                                         "bob@dest.test"]
    assert t.data.endswith(raw) and t.data.index(raw) > 0
    assert verified(t.data, dns_server) == [("example.com", "rsa-sha256", True),
                                            ("example.com", "ed25519-sha256", True)]
    s = by_subject(api, "structured native")
    assert verified(s.data, dns_server)[0][2] is True
    m = email.message_from_bytes(s.data, policy=email.policy.default)
    assert m.get_body(("plain",)).get_content().replace("\r\n", "\n") == "plain ü\n"
    assert m["Message-ID"] == f"<{body2['id']}@{HOSTNAME}>"


def test_native_bad_input_names_the_field(api: Api) -> None:
    before = set(api.daemon.spool_ids())
    status, body, _ = api.call("/v1/messages", {"from": "alice@example.com",
                                                "to": ["ok@dest.test", "b@d@x"],
                                                "subject": "s", "text": "t"}, api.tokens["app"])
    assert status in (400, 422) and "to" in json.dumps(body)
    status, body, _ = api.call("/v1/messages", {"raw": "!!!not base64",
                                                "envelope": {"from": "", "to": ["x@dest.test"]}},
                               api.tokens["app"])
    assert status in (400, 422) and "raw" in json.dumps(body)
    status, body, _ = api.call("/v1/messages", {"from": "alice@example.com"}, None)
    assert status == 401
    assert set(api.daemon.spool_ids()) <= before


def test_api_with_two_workers(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """The master binds the [[http]] socket and both workers serve it: 40 messages over new
    connections are all accepted, committed and in the spool."""
    tokens_file = tmp_path / "tokens"
    token = api_token(tokens_file, "app")
    http_port = free_port()
    d = start_daemon(server={"workers": 2}, http=[{"address": f"127.0.0.1:{http_port}"}],
                     api={"tokens": str(tokens_file)})
    pm = PostmarkClient(server_token=token, root_api_url=f"http://127.0.0.1:{http_port}/")
    ids = []
    for i in range(40):
        pm._session = __import__("requests").Session()     # a new connection each time
        ids.append(pm.emails.send(From="a@example.com", To="b@dest.test", Subject=f"w{i}",
                                  TextBody="x")["MessageID"])
    assert len(set(ids)) == 40
    wait_until(lambda: len(d.spool_ids()) >= 40, 10, "40 messages in the spool")


def test_idempotency_key_stores_one_message(api: Api) -> None:
    """The same Idempotency-Key twice (and twice at once): one message stored and sent, the
    same answer every time, the repeats marked Idempotent-Replayed; another key, or another
    token with the same key, is a new message."""
    import concurrent.futures
    body = {"from": "alice@example.com", "to": ["bob@dest.test"], "subject": "idempotent",
            "text": "once\n"}
    headers = {"Idempotency-Key": "order-4711-receipt"}
    before = len(api.sink.snapshot())
    status, first, h1 = api.call("/v1/messages", body, api.tokens["app"], headers)
    assert status == 200 and "Idempotent-Replayed" not in h1
    status, again, h2 = api.call("/v1/messages", body, api.tokens["app"], headers)
    assert status == 200 and again == first and h2.get("Idempotent-Replayed") == "true"
    other = {"Idempotency-Key": "order-4712-receipt"}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: api.call("/v1/messages", body, api.tokens["app"], other),
                                range(4)))
    assert len({a[1]["id"] for a in answers}) == 1 and all(a[0] == 200 for a in answers)
    assert answers[0][1]["id"] != first["id"]
    status, limited, _ = api.call("/v1/messages", body, api.tokens["limited"], headers)
    assert status == 200 and limited["id"] not in (first["id"], answers[0][1]["id"])
    api.arrived(before + 3, "three messages")
    wait_until(lambda: not api.daemon.spool_ids(), 20, "everything delivered")
    got = [t for t in api.sink.snapshot()[before:] if b"Subject: idempotent" in t.data]
    assert len(got) == 3
    status, bad, _ = api.call("/v1/messages", body, api.tokens["app"], {"Idempotency-Key": " "})
    assert status == 400 and bad["field"] == "Idempotency-Key"


def test_https_listener_and_rate_limit(start_daemon: Callable[..., Daemon], tls_cert: Any,
                                       tmp_path: Path) -> None:
    """[[http]] tls = "implicit" serves the API over HTTPS with the [tls] certificate (the
    Received header says HTTPS); past [api] rate_limit a token gets 429 with Retry-After and
    nothing is stored for it."""
    import http.client
    tokens = tmp_path / "tokens"
    token = api_token(tokens, "app")
    port = free_port()
    d = start_daemon(http=[{"address": f"127.0.0.1:{port}", "tls": "implicit"}],
                     tls={"cert": str(tls_cert.cert), "key": str(tls_cert.key)},
                     api={"tokens": str(tokens), "rate_limit": 2})
    ctx = tls_cert.client_context()
    ctx.check_hostname = False       # the certificate names mx.test.invalid, we dial 127.0.0.1
    body = json.dumps({"From": "a@example.com", "To": "b@dest.test", "Subject": "s",
                       "TextBody": "t"})
    statuses, waits = [], []
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    for _ in range(5):
        conn.request("POST", "/email", body=body, headers={
            "X-Postmark-Server-Token": token, "Content-Type": "application/json"})
        r = conn.getresponse()
        answer = json.loads(r.read())
        statuses.append(r.status)
        if r.status == 200:
            qid = answer["MessageID"]
        else:
            waits.append(r.getheader("Retry-After"))
    conn.close()
    assert statuses[:2] == [200, 200] and 429 in statuses
    assert all(w and int(w) >= 1 for w in waits)
    from txmta.api.postmark import uuid_to_queue_id
    stored_id = uuid_to_queue_id(qid)
    assert stored_id is not None
    wait_until(lambda: stored_id in d.spool_ids(), 10, "the message in the spool")
    _, data = d.stored(stored_id)
    assert b"with HTTPS id" in data and b"(token app)" in data
    assert len(d.spool_ids()) == statuses.count(200)
    plain = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError, http.client.BadStatusLine)):
        plain.request("GET", "/metrics")         # no plaintext HTTP on that port
        plain.getresponse()


def _http(method: str, url: str, token: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_status_and_admin_with_two_workers(start_daemon: Callable[..., Daemon],
                                           tmp_path: Path) -> None:
    """With two workers: a message sent through the API (to a relayhost that is down, so it
    stays queued) is found by id, by its UUID and by recipient and tag; an admin token holds
    it (`txmta queue show --json` sees it held), releases and deletes it; a send token may
    not; an address suppressed through the API refuses a later send (Postmark's ErrorCode 406)."""
    tokens_file = tmp_path / "tokens"
    app = api_token(tokens_file, "app")
    admin = api_token(tokens_file, "ops", "--scope", "send", "--scope", "admin")
    http_port = free_port()
    url = f"http://127.0.0.1:{http_port}"
    d = start_daemon(server={"workers": 2}, http=[{"address": f"127.0.0.1:{http_port}"}],
                     api={"tokens": str(tokens_file)},
                     delivery={"relayhost": f"127.0.0.1:{free_port()}", "relayhost_tls": "none",
                               "connect_timeout": "2s"})
    status, sent = _http("POST", url + "/v1/messages", app,
                         {"from": "a@example.com", "to": ["Bob@Dest.test"], "subject": "s",
                          "text": "x\n", "tag": "welcome", "metadata": {"order": "7"}})
    assert status == 200, sent
    mid = sent["id"]
    status, shown = _http("GET", f"{url}/v1/messages/{mid}", app)
    assert status == 200 and shown["id"] == mid and shown["tag"] == "welcome"
    assert shown["metadata"] == {"order": "7"} and shown["token"] == "app"
    assert shown["recipients"][0]["state"] == "queued"
    assert [e["event"] for e in shown["events"]][:1] == ["received"]
    from txmta.api.postmark import queue_id_to_uuid
    status, by_uuid = _http("GET", f"{url}/v1/messages/{queue_id_to_uuid(mid)}", app)
    assert status == 200 and by_uuid["id"] == mid
    assert _http("GET", f"{url}/v1/messages/0000000000000000", app)[0] == 404
    status, found = _http("GET", f"{url}/v1/messages?recipient=bob@dest.test&state=queued", app)
    assert status == 200 and [m["id"] for m in found["messages"]] == [mid]
    status, found = _http("GET", f"{url}/v1/messages?tag=welcome", admin)
    assert status == 200 and [m["id"] for m in found["messages"]] == [mid]
    assert _http("GET", f"{url}/v1/messages?tag=other", admin)[1]["messages"] == []

    assert _http("POST", f"{url}/v1/messages/{mid}/hold", app)[0] == 403
    status, held = _http("POST", f"{url}/v1/messages/{mid}/hold", admin)
    assert status == 200 and held == {"id": mid, "result": "held"}
    show = json.loads(txmta_cli(d, "queue", "show", mid, "--json").stdout)
    assert [r["state"] for r in show["recipients"]] == ["held"]
    assert _http("POST", f"{url}/v1/messages/{mid}/release", admin)[0] == 200
    show = json.loads(txmta_cli(d, "queue", "show", mid, "--json").stdout)
    assert [r["state"] for r in show["recipients"]] == ["queued"]
    assert _http("POST", f"{url}/v1/queue/flush", admin, {"domain": "dest.test"})[0] == 200
    assert _http("DELETE", f"{url}/v1/messages/{mid}", admin)[0] == 200
    wait_until(lambda: mid not in d.spool_ids(), 10, "the message deleted")
    status, gone = _http("GET", f"{url}/v1/messages/{mid}?x=1", admin)
    assert status == 200 and [r["state"] for r in gone["recipients"]] == ["deleted"]
    assert _http("DELETE", f"{url}/v1/messages/{mid}", admin)[0] == 404

    status, added = _http("POST", url + "/v1/suppressions", admin,
                          {"address": "carol@dest.test", "reason": "complaint"})
    assert status == 200, added
    status, listed = _http("GET", url + "/v1/suppressions", admin)
    assert status == 200 and [s["address"] for s in listed["suppressions"]] == ["carol@dest.test"]
    # both workers' mirrors hear of it: several sends, whichever worker answers
    for _ in range(4):
        status, refused = _http("POST", url + "/email", app,
                                {"From": "a@example.com", "To": "carol@dest.test",
                                 "Subject": "s", "TextBody": "x"})
        assert status == 422 and refused["ErrorCode"] == 406, refused
    assert _http("DELETE", url + "/v1/suppressions/carol@dest.test", admin)[0] == 200
    assert _http("DELETE", url + "/v1/suppressions/carol@dest.test", admin)[0] == 404


def test_admin_in_a_single_process_daemon(api: Api) -> None:
    """With one worker the daemon serves its own control socket and the API is its client.
    A message the relayhost defers shows its attempt and last reply; an admin token holds,
    releases and deletes it; a dashboard token may read it but not change it; another send
    token does not see it."""
    api.sink.replies["RCPT:held@dest.test"] = "451 4.3.0 try later"
    try:
        status, sent, _ = api.call("/v1/messages", {"from": "a@example.com",
                                                    "to": ["held@dest.test"],
                                                    "subject": "hold me", "text": "x\n"},
                                   api.tokens["app"])
        assert status == 200
        mid, url = sent["id"], f"{api.url}/v1/messages/{sent['id']}"

        def deferred() -> bool:
            status, shown = _http("GET", url, api.tokens["app"])
            return status == 200 and shown["recipients"][0]["attempts"] >= 1
        wait_until(deferred, 20, "one attempt deferred")
        status, shown = _http("GET", url, api.tokens["viewer"])
        assert status == 200 and shown["recipients"][0]["last_reply"]["code"] == 451
        assert "deferred" in [e["event"] for e in shown["events"]]
        status, held = _http("POST", url + "/hold", api.tokens["ops"])
        assert status == 200 and held["result"] == "held"
        assert _http("GET", url, api.tokens["app"])[1]["recipients"][0]["state"] == "held"
        assert _http("POST", url + "/release", api.tokens["viewer"])[0] == 403
        assert _http("GET", url, api.tokens["limited"])[0] == 404
        assert _http("POST", url + "/release", api.tokens["ops"])[0] == 200
        assert _http("DELETE", url, api.tokens["ops"])[0] == 200
        status, done = _http("GET", url, api.tokens["app"])
        assert status == 200 and done["recipients"][0]["state"] == "deleted"
        assert done["finished"] is not None and mid not in api.daemon.spool_ids()
    finally:
        del api.sink.replies["RCPT:held@dest.test"]
