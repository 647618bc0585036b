"""The status reads of the HTTP API on a real LMDB spool: the lookup index (keys, kept with
the message and its history, gone when the history expires or the message is removed),
searches by recipient, tag, state and time with their paging bound, one message by id."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings, strategies as st

from txmta.api.status import decode_cursor, encode_cursor, queue_id
from txmta.api.postmark import queue_id_to_uuid
from txmta.message import (DELIVERED, HELD, QUEUED, Address, Envelope, Labels, Recipient,
                           RecipientState, new_message_id)
from txmta.spool.view import (LOOKUP_RECIPIENT, LOOKUP_TAG, Search, find_message, lookup_key,
                              lookup_keys, lookup_prefix, search, SpoolReads)


def message(make_message, *rcpts, tag="", arrival=1000.0, states=None):
    m = make_message(len(rcpts), states=states)
    env = replace(m.envelope, recipients=tuple(Recipient(Address(*a.split("@"))) for a in rcpts))
    return replace(m, envelope=env, arrival=arrival, labels=Labels(tag))


def put(spool, wait, m):
    w = spool.body_writer(m.id)
    w.write(b"Subject: t\r\n\r\nx\r\n")
    wait(spool.put(m, w))
    return m


def ids(spool, wait, q, looked_max=5000):
    found, cursor = wait(spool.read(lambda txn, dbs: search(txn, dbs, q, looked_max)))
    return [m.id for m, _ in found], cursor


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([LOOKUP_RECIPIENT, LOOKUP_TAG]), st.text(min_size=0, max_size=600),
       st.text(min_size=0, max_size=600), st.floats(0, 4e9))
def test_lookup_keys_fit_lmdb_and_never_share_a_prefix(kind, a, b, when):
    """Any value (non-ASCII, NUL, very long) gives a key within LMDB's 511 octets, and two
    different values never give prefixes where one starts the other's keys."""
    mid = new_message_id()
    key = lookup_key(kind, a, when, mid)
    assert len(key) <= 511 and key.startswith(lookup_prefix(kind, a))
    assert key.endswith(mid.encode()) and len(key) == len(lookup_prefix(kind, a)) + 8 + len(mid)
    if a != b:
        assert not key.startswith(lookup_prefix(kind, b))


def test_lookup_keys_of_a_message_lower_case_the_recipient(make_message):
    m = message(make_message, "Bob@Example.org", "bob@example.org", tag="Welcome")
    sender = {lookup_key(b"s", str(m.envelope.sender).lower(), 1000.0, m.id)}
    assert lookup_keys(m) == {lookup_key(b"r", "bob@example.org", 1000.0, m.id),
                              lookup_key(b"t", "Welcome", 1000.0, m.id)} | sender
    # no tag: no entry
    assert len(lookup_keys(message(make_message, "a@example.org"))) == 1 + len(sender)


def test_lookup_keys_have_the_sender_lower_cased_but_not_the_null_sender(make_message):
    m = message(make_message, "a@example.org")
    m = replace(m, envelope=replace(m.envelope, sender=Address("App", "Example.ORG")))
    assert lookup_key(b"s", "app@example.org", 1000.0, m.id) in lookup_keys(m)
    null = replace(m, envelope=replace(m.envelope, sender=Address("", "")))
    assert lookup_keys(null) == {lookup_key(b"r", "a@example.org", 1000.0, m.id)}


def test_search_by_recipient_tag_and_state(open_lmdb, wait, make_message):
    spool = open_lmdb()
    a = put(spool, wait, message(make_message, "bob@x.org", tag="t1", arrival=100.0))
    b = put(spool, wait, message(make_message, "Bob@X.org", "eve@x.org", tag="t2", arrival=200.0,
                                 states=(RecipientState(HELD), RecipientState())))
    put(spool, wait, message(make_message, "eve@x.org", tag="t1", arrival=300.0))
    assert ids(spool, wait, Search(recipient="BOB@x.org")) == ([a.id, b.id], None)
    assert ids(spool, wait, Search(tag="t1", recipient="bob@x.org")) == ([a.id], None)
    assert ids(spool, wait, Search(recipient="bob@x.org", state=HELD)) == ([b.id], None)
    assert ids(spool, wait, Search(recipient="eve@x.org", state=HELD)) == ([], None)
    assert ids(spool, wait, Search(recipient="bob@x.org", since=150.0)) == ([b.id], None)
    assert ids(spool, wait, Search(tag="t3")) == ([], None)
    assert ids(spool, wait, Search(token="app")) == ([], None)


def test_search_pages_with_a_cursor_and_a_bound_on_entries_looked_at(open_lmdb, wait,
                                                                    make_message):
    spool = open_lmdb()
    ms = [put(spool, wait, message(make_message, "bob@x.org", arrival=100.0 + i,
                                   states=(RecipientState(HELD if i % 2 else QUEUED),)))
          for i in range(7)]
    seen, after = [], None
    while True:
        page, after = ids(spool, wait, Search(recipient="bob@x.org", limit=3, after=after))
        seen += page
        if after is None:
            break
    assert seen == [m.id for m in ms]
    # the bound: 2 entries looked at, one of them held, then a cursor to go on
    page, after = ids(spool, wait, Search(recipient="bob@x.org", state=HELD), looked_max=2)
    assert page == [ms[1].id] and after is not None
    page_cursor = after
    page, after = ids(spool, wait, Search(recipient="bob@x.org", state=HELD, after=after))
    assert page == [ms[3].id, ms[5].id] and after is None
    assert decode_cursor(encode_cursor(b"\x00\xffr")) == b"\x00\xffr"
    with pytest.raises(ValueError):     # a cursor of another recipient's walk
        SpoolReads(spool.read).search(Search(recipient="eve@x.org", after=after or page_cursor))


def test_search_without_recipient_or_tag_walks_queue_and_history_by_id(open_lmdb, wait,
                                                                      make_message):
    spool = open_lmdb()
    a = put(spool, wait, message(make_message, "a@x.org"))
    b = put(spool, wait, message(make_message, "b@x.org"))
    wait(spool.modify(a.id, lambda old: replace(old, recipients=(RecipientState(DELIVERED),))))
    assert ids(spool, wait, Search()) == ([a.id, b.id], None)
    assert ids(spool, wait, Search(state=DELIVERED)) == ([a.id], None)
    assert ids(spool, wait, Search(since=4e9)) == ([], None)
    page, after = ids(spool, wait, Search(limit=1))
    assert page == [a.id] and ids(spool, wait, Search(after=after)) == ([b.id], None)


def test_find_message_queued_then_in_history_then_gone(open_lmdb, wait, make_message):
    """The index and the history go together: expire_history removes the lookup entries."""
    spool = open_lmdb()
    m = put(spool, wait, message(make_message, "bob@x.org", tag="t"))
    found = wait(spool.read(lambda txn, dbs: find_message(txn, dbs, m.id)))
    assert found.finished is None and found.message.recipients[0].state == QUEUED
    assert [e.kind for e in found.events][:1] == ["received"]
    wait(spool.modify(m.id, lambda old: replace(old, recipients=(RecipientState(DELIVERED),))))
    found = wait(spool.read(lambda txn, dbs: find_message(txn, dbs, m.id)))
    assert found.finished is not None and found.message.recipients[0].state == DELIVERED
    assert ids(spool, wait, Search(tag="t")) == ([m.id], None)
    wait(spool.expire_history(found.finished + 1))
    assert wait(spool.read(lambda txn, dbs: find_message(txn, dbs, m.id))) is None
    assert wait(spool.read(lambda txn, dbs: txn.stat(dbs[b"lookup"])["entries"])) == 0


def test_removed_message_leaves_the_index(open_lmdb, wait, make_message):
    spool = open_lmdb()
    m = put(spool, wait, message(make_message, "bob@x.org", tag="t"))
    wait(spool.remove(m.id))
    assert wait(spool.read(lambda txn, dbs: txn.stat(dbs[b"lookup"])["entries"])) == 0


def test_queue_id_in_either_form():
    mid = new_message_id()
    assert queue_id(mid) == mid and queue_id(queue_id_to_uuid(mid)) == mid


# -- the HTTP layer: scopes, parameters, answers (fake reads and control) -------------------

import json  # noqa: E402

from twisted.internet.defer import fail, succeed  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.web.server import NOT_DONE_YET  # noqa: E402
from twisted.web.test.requesthelper import DummyRequest  # noqa: E402

from txmta.api.server import ApiResource  # noqa: E402
from txmta.api.status import StatusApi  # noqa: E402
from txmta.api.tokens import Token  # noqa: E402
from txmta.control.amp import ControlError  # noqa: E402
from txmta.spool.view import Found  # noqa: E402

TOKENS = {"s": Token("app", frozenset({"send"})), "a": Token("ops", frozenset({"admin"})),
          "d": Token("viewer", frozenset({"dashboard"}))}


class Tokens:
    def check(self, presented):
        return TOKENS.get(presented)


class Reads:
    def __init__(self, messages):
        self.messages = messages
        self.searches = []

    def find(self, mid):
        m = self.messages.get(mid)
        return succeed(None if m is None else Found(m, None, []))

    def search(self, q):
        self.searches.append(q)
        return succeed(([(m, None) for m in self.messages.values()], b"cursor"))

    def suppressions(self, after, limit):
        return succeed(([], None))


class Control:
    def __init__(self, answer=None, error=None):
        self.calls, self.answer, self.error = [], answer, error

    def __call__(self, command, **kwargs):
        self.calls.append((command, kwargs))
        return fail(self.error) if self.error is not None else succeed(self.answer)


def http(resource, method, path, token=None, body=None, args=None):
    req = DummyRequest([])
    req.method, req.path, req.uri = method, path, path
    req.args = args or {}
    req._disconnected = False
    if token is not None:
        req.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + token.encode()])
    import io
    req.content = io.BytesIO(json.dumps(body).encode() if body is not None else b"")
    out = resource.render(req)
    data = b"".join(req.written) if out is NOT_DONE_YET else out
    return req.responseCode or 200, json.loads(data)


def resource(messages=(), control=None):
    status = StatusApi(Tokens(), Reads({m.id: m for m in messages}),
                       control or Control({"found": True}), Clock())
    return ApiResource(None, None, None, listener="api", hostname="h", clock=Clock(),
                       status=status)


def test_a_send_token_sees_only_its_own_mail(make_message):
    mine = replace(make_message(), client={"token": "app"})
    theirs = replace(make_message(), client={"token": "other"})
    r = resource([mine, theirs])
    assert http(r, b"GET", b"/v1/messages/" + mine.id.encode(), "s")[0] == 200
    assert http(r, b"GET", b"/v1/messages/" + theirs.id.encode(), "s")[0] == 404
    assert http(r, b"GET", b"/v1/messages/" + theirs.id.encode(), "d")[0] == 200
    assert http(r, b"GET", b"/v1/messages/" + theirs.id.encode())[0] == 401
    uuid = queue_id_to_uuid(mine.id).encode()
    status, body = http(r, b"GET", b"/v1/messages/" + uuid, "s")
    assert status == 200 and body["id"] == mine.id and "headers" not in body


def test_list_parameters_reach_the_search_and_bad_ones_are_400(make_message):
    r = resource([make_message()])
    status, body = http(r, b"GET", b"/v1/messages", "s",
                        args={b"recipient": [b"Bob@x.org"], b"state": [b"held"],
                              b"since": [b"2026-12-01T00:00:00Z"], b"limit": [b"10"]})
    assert status == 200 and body["next"] == encode_cursor(b"cursor")
    q = r.status.reads.searches[-1]
    assert (q.recipient, q.state, q.limit, q.token) == ("Bob@x.org", "held", 10, "app")
    assert q.since == 1796083200.0
    assert http(r, b"GET", b"/v1/messages", "a")[0] == 200
    assert r.status.reads.searches[-1].token is None
    for bad in ({b"state": [b"lost"]}, {b"limit": [b"501"]}, {b"limit": [b"0"]},
                {b"since": [b"yesterday"]}, {b"since": [b"nan"]}, {b"after": [b"!!"]}):
        assert http(r, b"GET", b"/v1/messages", "s", args=bad)[0] == 400


def test_admin_endpoints_need_the_admin_scope_and_send_control_commands():
    control = Control({"found": True, "ok": True})
    r = resource(control=control)
    assert http(r, b"POST", b"/v1/messages/ABC/hold", "s")[0] == 403
    assert http(r, b"POST", b"/v1/messages/ABC/hold", "d")[0] == 403
    assert control.calls == []
    assert http(r, b"POST", b"/v1/messages/ABC/hold", "a") == (200, {"id": "ABC",
                                                                     "result": "held"})
    assert http(r, b"DELETE", b"/v1/messages/ABC", "a")[0] == 200
    assert http(r, b"POST", b"/v1/suppressions/x@y", "a")[0] == 405
    assert http(r, b"POST", b"/v1/suppressions", "a", {"address": "no-at"})[0] == 400
    assert http(r, b"POST", b"/v1/suppressions", "a",
                {"address": "x@y.org", "reason": "complaint"})[0] == 200
    assert [c[0] for c in control.calls] == ["Hold", "Delete", "SuppressionAdd"]
    assert control.calls[-1][1] == {"address": "x@y.org", "reason": "complaint"}
    missing = resource(control=Control({"found": False}))
    assert http(missing, b"POST", b"/v1/messages/ABC/release", "a")[0] == 404
    down = resource(control=Control(error=ControlError("no control socket")))
    status, body = http(down, b"POST", b"/v1/queue/flush", "a", {"domain": "x.org"})
    assert status == 503 and body["error"] == "control_unavailable"


def test_spool_reads_over_the_read_only_view(open_lmdb, wait, make_message):
    """The same reads work over `LmdbView` (another process's view: here after the spool
    is closed, LMDB allowing one environment per process), returning values."""
    from txmta.spool.view import LmdbView
    spool = open_lmdb()
    m = put(spool, wait, message(make_message, "bob@x.org", tag="t"))
    wait(spool.close())
    view = LmdbView(spool.path)
    try:
        reads = SpoolReads(view.read)
        assert reads.find(m.id).message.id == m.id
        found, cursor = reads.search(Search(tag="t"))
        assert [f[0].id for f in found] == [m.id] and cursor is None
        assert reads.suppressions(None, 10) == ([], None)
    finally:
        view.close()


def test_status_requests_count_against_the_token_rate_limit(make_message):
    """The sending endpoints' per-token limit holds for status and admin requests too: past
    it, 429 with Retry-After, for that token only."""
    from txmta.api.tokens import RateLimiter
    m = replace(make_message(), client={"token": "app"})
    clock = Clock()
    status = StatusApi(Tokens(), Reads({m.id: m}), Control({"found": True}), clock,
                       RateLimiter(2))
    r = ApiResource(None, None, None, listener="api", hostname="h", clock=clock, status=status)
    path = b"/v1/messages/" + m.id.encode()
    assert [http(r, b"GET", path, "s")[0] for _ in range(3)] == [200, 200, 429]
    assert http(r, b"GET", path, "d")[0] == 200         # another token has its own
    clock.advance(1)
    assert http(r, b"GET", path, "s")[0] == 200
