"""The dashboard: History's per-minute buckets (hypothesis, with restarts and a clock that
steps back), rates, the page's escaping (hypothesis) and its plots, collect() over a real
LMDB spool written through the daemon's own spool API, and the twisted.web resource."""

from __future__ import annotations

import re
import struct
import threading
from dataclasses import dataclass
from html.parser import HTMLParser

import pytest
from hypothesis import given, settings, strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.web.test.requesthelper import DummyRequest

from dashboard_sample import NOW, sample_snapshot
from txmta.dashboard import (DAY, DashboardResource, History, Snapshot, bar_plot,
                             collect, line_plot, rates, render)
from txmta.message import (BOUNCED, DELIVERED, HELD, QUEUED, Address, Envelope, OutboxRecord,
                           Recipient, RecipientState, StoredMessage)
from txmta.reply import Reply
from txmta.spool.lmdb import LmdbSpool
from txmta.spool.view import LmdbView


# -- History ----------------------------------------------------------------------------------

def test_first_sample_only_sets_the_base():
    """What the counters counted before the history started is not shown as one minute."""
    h = History()
    h.sample(600.0, {"delivered": 1000.0})
    h.sample(630.0, {"delivered": 1004.0})
    h.sample(700.0, {"delivered": 1010.0})
    assert h.series("delivered", 60, 700.0) == [(600.0, 4.0), (660.0, 6.0)]


def test_a_lower_total_is_a_restart_and_counts_as_the_increment():
    h = History()
    h.sample(0.0, {"bounced": 50.0})
    h.sample(60.0, {"bounced": 52.0})
    h.sample(120.0, {"bounced": 3.0})       # restarted: 3 since the restart
    assert h.series("bounced", 60, 120.0) == [(0.0, 0.0), (60.0, 2.0), (120.0, 3.0)]


def test_gauge_keeps_the_last_value_of_the_minute_and_only_sampled_minutes():
    h = History()
    h.sample(60.0, {"queue_depth": 5.0})
    h.sample(100.0, {"queue_depth": 7.0})
    h.sample(300.0, {"queue_depth": 2.0})
    assert h.series("queue_depth", 60, 300.0) == [(60.0, 7.0), (300.0, 2.0)]


def test_clock_stepping_back_counts_in_the_newest_minute():
    h = History()
    h.sample(600.0, {"delivered": 0.0})
    h.sample(300.0, {"delivered": 5.0})
    assert h.series("delivered", 60, 600.0) == [(600.0, 5.0)]


def test_series_is_the_window_asked_for():
    h = History()
    for m in range(100):
        h.sample(m * 60.0, {"delivered": float(m)})
    assert [t for t, _ in h.series("delivered", 3, 99 * 60.0)] == [97 * 60.0, 98 * 60.0, 99 * 60.0]
    assert h.series("delivered", 60, 10 * 60.0)[-1] == (600.0, 1.0)    # nothing after `now`
    assert h.series("nonesuch", 60, 99 * 60.0) == []


def test_memory_is_bounded_to_a_day():
    h = History()
    for m in range(3 * DAY):
        h.sample(m * 60.0, {"delivered": float(m), "queue_depth": 1.0})
    assert len(h) == DAY
    points = h.series("delivered", 10 * DAY, (3 * DAY - 1) * 60.0)
    assert len(points) == DAY and points[0][0] == 2 * DAY * 60.0


step = st.tuples(st.floats(min_value=0, max_value=400, allow_nan=False),   # seconds to advance
                 st.integers(min_value=0, max_value=1000),                  # increment
                 st.booleans(),                                             # restart first
                 st.integers(min_value=0, max_value=100))                   # queue depth


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=0, max_value=1e9, allow_nan=False), st.lists(step, max_size=80))
def test_history_matches_a_model(start, steps):
    """Each minute holds the increments counted in it (a restart's new total is its
    increment), the gauge its last value; only the last day is kept."""
    h = History()
    now, total = start, 0.0
    counted: dict[int, float] = {}
    depth: dict[int, float] = {}
    first = True
    minute = int(now // 60)
    for advance, inc, restart, q in steps:
        now += advance
        minute = max(minute, int(now // 60))
        if restart and total > 0:
            total = float(inc % total)      # a restart shows as a lower total
            delta = total
        else:
            total += inc
            delta = float(inc)
        counted[minute] = counted.get(minute, 0.0) + (0.0 if first else delta)
        first = False
        depth[minute] = float(q)
        h.sample(now, {"delivered": total, "queue_depth": float(q)})
    assert len(h) <= DAY
    window = [m for m in sorted(counted) if m > minute - DAY]
    assert h.series("delivered", DAY, now) == [(m * 60.0, counted[m]) for m in window]
    assert h.series("queue_depth", DAY, now) == [(m * 60.0, depth[m]) for m in window]
    assert sum(v for _, v in h.series("delivered", DAY, now)) == sum(counted[m] for m in window)


def test_rates_over_the_attempts():
    assert rates({}) == (None, None)
    assert rates({"delivered": 0.0, "received": 9.0}) == (None, None)
    assert rates({"delivered": 6.0, "deferred": 2.0, "bounced": 1.0, "expired": 1.0}) == (0.6, 0.1)


# -- the page ---------------------------------------------------------------------------------

ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "span",
                "main", "section", "div", "b", "small", "p", "table", "tr", "th", "td", "svg",
                "text", "line", "polyline", "circle", "rect"}


class PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):  # type: ignore[no-untyped-def]
        self.tags.append((tag, dict(attrs)))

    handle_startendtag = handle_starttag

    def handle_data(self, data):  # type: ignore[no-untyped-def]
        self.text.append(data)


def parse(page: bytes) -> PageParser:
    p = PageParser()
    p.feed(page.decode("utf-8"))
    p.close()
    return p


def plots(page: bytes) -> list[int]:
    return [int(a["data-points"] or 0) for t, a in parse(page).tags
            if t == "svg" and a.get("class") == "plot"]


hostile = st.text(alphabet=st.sampled_from(list("<>&\"'=/ ;:ascriptonerr\n\t")) | st.characters(),
                  min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(hostile, hostile, hostile, hostile, hostile)
def test_hostile_texts_never_become_markup(reply, address, domain, category, host):
    """Replies, addresses, domains and categories come from remote servers and clients:
    whatever they hold, the page's elements stay the page's own and the text reads back."""
    s = sample_snapshot()
    s.hostname = host
    s.top_deferring = [(domain, 1, reply)]
    s.held = [("0000AAAAAAAAbcdf", address, 1, NOW)]
    s.recent_bounces = [(category, 2)]
    s.latest_bounces = [(NOW, "0000AAAAAAABbcdf", address, category, reply)]
    s.notes = [reply]
    page = render(s)
    p = parse(page)
    assert {t for t, _ in p.tags} <= ALLOWED_TAGS
    assert not any(name.startswith("on") or name in ("href", "src")
                   for _, a in p.tags for name in a)
    assert sum(1 for t, _ in p.tags if t == "svg") == 6
    text = "".join(p.text)

    def shown(value: str) -> str:       # what UTF-8 can carry: a lone surrogate becomes "?"
        return value.encode("utf-8", "replace").decode("utf-8")
    for value in (reply, address, domain, host):
        assert shown(value) in text
    assert shown(category[:28]) in text


def test_script_in_a_reply_is_shown_as_text():
    page = render(sample_snapshot())
    assert b"<script" not in page
    assert b"&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page


def test_every_plot_has_data_in_the_sample():
    counts = plots(render(sample_snapshot()))
    assert len(counts) == 6 and all(n > 0 for n in counts)


def test_empty_snapshot_draws_empty_plots_saying_no_data():
    page = render(Snapshot(generated_at=NOW, hostname="mx.example.net", version="0"))
    assert plots(page) == [0] * 6
    assert page.count(b">no data<") == 6
    assert b"No message is held." in page and b"No bounce in the last hour." in page
    assert b'<meta http-equiv="refresh"' in page and b'name="viewport"' in page


def test_page_has_no_external_resource_nor_script():
    page = render(sample_snapshot())
    assert b"<script" not in page and b"<link" not in page and b"<img" not in page
    assert re.search(rb"https?://(?!www\.w3\.org/2000/svg)", page) is None


@pytest.mark.parametrize("points", [[], [(NOW, 0.0)], [(NOW, 0.0), (NOW, 0.0)],
                                    [(NOW - 60, 5.0), (NOW, 7.0)]])
def test_line_plot_never_divides_by_zero(points):
    svg = line_plot("t", [("delivered", points)], NOW, NOW)
    assert f'data-points="{len(points)}"' in svg and 'class="plot"' in svg
    assert ("no data" in svg) == (not points)


def test_line_plot_draws_inside_its_frame():
    svg = line_plot("t", [("delivered", [(NOW - 3600, 0.0), (NOW - 1800, 10.0), (NOW, 5.0)])],
                    NOW - 3600, NOW)
    coords = re.search(r'<polyline [^>]*points="([^"]+)"', svg).group(1).split()
    xs = [float(c.split(",")[0]) for c in coords]
    ys = [float(c.split(",")[1]) for c in coords]
    assert xs == sorted(xs) and min(ys) >= 0 and max(ys) <= 220
    assert ys[1] < ys[2] < ys[0]        # 10 highest, 0 lowest


def test_bar_plot_empty_and_full():
    assert 'data-points="0"' in bar_plot("b", []) and "no data" in bar_plot("b", [])
    assert bar_plot("b", [("x", 0.0), ("y", 3.0)]).count("<rect") == 2


# -- collect() over a real spool ---------------------------------------------------------------

class ImmediateReactor:
    def callFromThread(self, f, *args, **kw):  # type: ignore[no-untyped-def]
        f(*args, **kw)


def wait(d):  # type: ignore[no-untyped-def]
    done = threading.Event()
    box = []
    d.addBoth(lambda r: (box.append(r), done.set()))
    assert done.wait(10), "spool did not answer"
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


@dataclass(frozen=True)
class Entry:
    """An outbox entry as the queue's events make them: the id starts with the time."""
    seq: int
    rec: OutboxRecord

    @property
    def event_id(self) -> bytes:
        return struct.pack(">QBIH", int(self.rec.time * 1e6), 0, self.seq, 0)

    def record(self) -> OutboxRecord:
        return self.rec


GREY = Reply(451, "4.7.1", "Greylisted <b>, try later")
FULL = Reply(452, "4.2.2", "Mailbox full")


def message(mid, arrival, rcpts, states,  # type: ignore[no-untyped-def]
            sender=Address("alice", "example.org")):
    env = Envelope(sender, tuple(Recipient(Address(*r.split("@"))) for r in rcpts))
    return StoredMessage(mid, env, arrival, 10, tuple(states), {"address": "127.0.0.1"})


def bounced(seq, at, rcpt, category, mid="0000AAAAAAAAbcdf"):  # type: ignore[no-untyped-def]
    return Entry(seq, OutboxRecord("bounced", at, mid, 0, rcpt,
                                   {"code": 550, "enhanced": "5.1.1", "text": f"no {rcpt}"},
                                   category=category))


@pytest.fixture
def spool_dir(tmp_path):
    """Four messages (two deferred at example.com, one waiting for its first try, one held)
    and an outbox with three bounces of the last hour, one older, one delivery."""
    path = str(tmp_path / "spool")
    spool = LmdbSpool(path, ImmediateReactor())
    msgs = [
        message("0000AAAAAAAAbcdf", NOW - 900, ["bob@example.com", "carol@example.net"],
                [RecipientState(QUEUED, 2, NOW + 60, GREY),
                 RecipientState(DELIVERED, 1, 0.0, Reply(250, "2.0.0", "ok"))]),
        message("0000AAAAAAABbcdf", NOW - 600, ["dave@Example.COM", "erin@example.com"],
                [RecipientState(QUEUED, 1, NOW + 60, FULL),
                 RecipientState(BOUNCED, 1, 0.0, Reply(550, "5.1.1", "no"))]),
        message("0000AAAAAAACbcdf", NOW - 300, ["frank@example.net"], [RecipientState(QUEUED)]),
        message("0000AAAAAAADbcdf", NOW - 200, ["gina@example.org", "hal@example.org"],
                [RecipientState(HELD), RecipientState(QUEUED)], sender=Address("", "")),
    ]
    outbox = [bounced(1, NOW - 7200, "old@example.com", "invalid-recipient"),
              bounced(2, NOW - 1800, "bob@example.com", "invalid-recipient"),
              bounced(3, NOW - 900, "x@example.net", "spam-block"),
              Entry(4, OutboxRecord("delivered", NOW - 800, "0000AAAAAAAAbcdf", 1,
                                    "carol@example.net")),
              bounced(5, NOW - 60, "<i>@example.com", "invalid-recipient")]
    try:
        for i, m in enumerate(msgs):
            w = spool.body_writer(m.id)
            w.write(b"Subject: x\r\n\r\nbody\r\n")
            wait(spool.put(m, w, outbox=[outbox[i]] if i < 3 else outbox[3:]))
    finally:
        wait(spool.close())
    return path


TOTALS = {"delivered": 10.0, "deferred": 4.0, "bounced": 2.0, "expired": 0.0,
          "suppressed": 0.0, "received": 16.0, "queue_depth": 4.0, "oldest_age": 900.0,
          "webhook_backlog": 7.0}


def test_collect_reads_the_spool(spool_dir):
    view = LmdbView(spool_dir)
    try:
        history = History()
        collect(view, history, NOW - 60, {k: 0.0 for k in TOTALS})
        snap = collect(view, history, NOW, TOTALS, hostname="mx.example.net", version="9")
    finally:
        view.close()
    assert snap.top_deferring == [("example.com", 2, "452 4.2.2 Mailbox full")]
    assert snap.held == [("0000AAAAAAADbcdf", "<>", 2, NOW - 200)]
    assert snap.held_total == 1
    assert snap.recent_bounces == [("invalid-recipient", 2), ("spam-block", 1)]
    assert [(t, r, c) for t, _, r, c, _ in snap.latest_bounces] == [
        (NOW - 60, "<i>@example.com", "invalid-recipient"),
        (NOW - 900, "x@example.net", "spam-block"),
        (NOW - 1800, "bob@example.com", "invalid-recipient")]
    assert snap.latest_bounces[0][4] == "550 5.1.1 no <i>@example.com"
    assert snap.webhook_backlog == 7 and snap.queue_depth == 4 and snap.notes == []
    assert snap.hour_totals["delivered"] == 10.0
    assert snap.delivery_rate == 10 / 16 and snap.bounce_rate == 2 / 16
    assert snap.hour["queue_depth"] == [((NOW - 60) // 60 * 60, 0.0), (NOW // 60 * 60, 4.0)]
    page = render(snap)
    assert b"&lt;i&gt;@example.com" in page and b"<i>" not in page
    assert b"Greylisted" not in page        # example.com's newest reply is the one shown


def test_collect_without_totals_counts_the_queue_itself(spool_dir):
    view = LmdbView(spool_dir)
    try:
        snap = collect(view, History(), NOW, None, hostname="h", version="v")
    finally:
        view.close()
    assert snap.queue_depth == 4 and snap.oldest_age == 900.0
    assert snap.hour == {name: [] for name in snap.hour} and snap.delivery_rate is None


def test_collect_stops_at_its_limits_and_says_so(spool_dir):
    view = LmdbView(spool_dir)
    try:
        snap = collect(view, History(), NOW, None, hostname="h", version="v",
                       walk_limit=2, outbox_limit=3)
    finally:
        view.close()
    assert snap.top_deferring == [("example.com", 2, "452 4.2.2 Mailbox full")]
    assert snap.held == []          # the held message is past the first two
    assert [r for _, _, r, _, _ in snap.latest_bounces] == ["<i>@example.com", "x@example.net"]
    assert snap.notes == ["only the first 2 queued messages were read",
                          "only the latest 3 events of the hour were read"]
    assert b"only the first 2 queued messages were read" in render(snap)


def test_collect_on_an_empty_spool(tmp_path):
    path = str(tmp_path / "spool")
    wait(LmdbSpool(path, ImmediateReactor()).close())
    view = LmdbView(path)
    try:
        snap = collect(view, History(), NOW, None, hostname="h", version="v")
    finally:
        view.close()
    assert (snap.top_deferring, snap.held, snap.recent_bounces, snap.latest_bounces,
            snap.queue_depth) == ([], [], [], [], 0)
    assert plots(render(snap)) == [0] * 6


# -- the resource -----------------------------------------------------------------------------

def get(resource: DashboardResource) -> DummyRequest:
    request = DummyRequest([b""])
    request.method = b"GET"
    resource.render(request)
    return request


@pytest.mark.parametrize("source", [sample_snapshot, lambda: succeed(sample_snapshot())])
def test_resource_renders_the_snapshot(source):
    request = get(DashboardResource(source))
    assert request.finished
    body = b"".join(request.written)
    assert body == render(sample_snapshot())
    headers = request.responseHeaders
    assert headers.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    assert b"default-src 'none'" in headers.getRawHeaders(b"content-security-policy")[0]
    assert headers.getRawHeaders(b"cache-control") == [b"no-store"]


def test_resource_waits_for_a_deferred_snapshot():
    d: Deferred[Snapshot] = Deferred()
    request = get(DashboardResource(lambda: d))
    assert not request.finished and request.written == []
    d.callback(sample_snapshot())
    assert request.finished and b"txmta on mx1.example.net" in b"".join(request.written)


def test_resource_answers_500_when_the_snapshot_fails():
    request = get(DashboardResource(lambda: fail(OSError("spool gone"))))
    assert request.finished and request.responseCode == 500
    assert b"spool gone" not in b"".join(request.written)


def test_resource_writes_nothing_after_the_client_left():
    d: Deferred[Snapshot] = Deferred()
    request = get(DashboardResource(lambda: d))
    request.processingFailed(Exception("connection lost"))
    d.callback(sample_snapshot())
    assert request.written == []

