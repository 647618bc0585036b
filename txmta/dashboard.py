"""The dashboard: one server-rendered HTML page of how the queue is doing.

Four parts, each usable alone:

- `History`: per-minute buckets of the last day, fed with the daemon's counters and gauges
  (`History.sample(now, totals)`); it keeps the counters' per-minute increments (a total
  lower than the one before is a restart: the new total is the increment) and each gauge's
  last value in the minute.  Pure, bounded (1440 minutes), the clock passed in.
- `Snapshot`: everything the page shows, as plain values.
- `collect(view, history, now, totals)`: a snapshot from a read-only spool view
  (`txmta.spool.view.LmdbView`): queued recipients with a last reply counted by domain, the
  messages with held recipients, the last hour's bounces from the outbox.  It reads at
  most `WALK_LIMIT` messages and `OUTBOX_LIMIT` outbox records, and says so when it stopped.
- `render(snapshot)`: the page as UTF-8 bytes: inline SVG plots drawn here, inline CSS, no
  script and no external resource (the Content-Security-Policy `DashboardResource` sends
  forbids them); every text that came from mail or the spool is escaped.
- `DashboardResource`: a twisted.web leaf rendering whatever snapshot its source gives;
  whoever mounts it decides who may see it.

Not here: where the totals come from, authorization, the listener.
"""
# test: tests/test_dashboard.py, tests/integration/test_dashboard_browser.py

from __future__ import annotations

import html
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Union

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from txmta.message import HELD, QUEUED, OutboxRecord, StoredMessage

log = Logger()

COUNTERS = ("delivered", "deferred", "bounced", "expired", "suppressed", "received")
GAUGES = ("queue_depth", "oldest_age", "webhook_backlog")
DAY = 1440                  # minutes of history kept
HOUR = 60
WALK_LIMIT = 5000           # queued messages read per page at most
OUTBOX_LIMIT = 5000         # outbox records read per page at most
TOP_DEFERRING = 10
HELD_SHOWN = 50
LATEST_BOUNCES = 10
REFRESH = 5                 # seconds between reloads of the page

Point = tuple[float, float]


# -- history --------------------------------------------------------------------------------

class History:
    """Per-minute values of the last `minutes` minutes (a day by default).

    A minute is `int(now // 60)`; a sample whose clock went back is counted in the newest
    minute seen, so minutes only move forward.  The first sample of a counter only sets its
    base: what happened before it is not this history's to show.  A lock lets one thread
    sample while another (collect() in a thread) reads."""

    def __init__(self, minutes: int = DAY) -> None:
        self.minutes = minutes
        self._buckets: OrderedDict[int, dict[str, float]] = OrderedDict()
        self._last: dict[str, float] = {}
        self._newest: int | None = None
        self._lock = threading.Lock()

    def sample(self, now: float, totals: dict[str, float]) -> None:
        with self._lock:
            self._sample(now, totals)

    def _sample(self, now: float, totals: dict[str, float]) -> None:
        minute = int(now // 60)
        if self._newest is not None and minute < self._newest:
            minute = self._newest
        self._newest = minute
        bucket = self._buckets.get(minute)
        if bucket is None:
            bucket = self._buckets[minute] = {name: 0.0 for name in COUNTERS}
        for name in COUNTERS:
            if name not in totals:
                continue
            total = float(totals[name])
            before = self._last.get(name)
            if before is not None:
                bucket[name] += total - before if total >= before else total   # lower: a restart
            self._last[name] = total
        for name in GAUGES:
            if name in totals:
                bucket[name] = float(totals[name])
        oldest = minute - self.minutes + 1
        while self._buckets and next(iter(self._buckets)) < oldest:
            self._buckets.popitem(last=False)

    def series(self, name: str, minutes: int, now: float) -> list[Point]:
        """(minute start, value) of each sampled minute among the `minutes` minutes up to
        `now`, oldest first; a gauge appears only in the minutes that sampled it."""
        end = int(now // 60)
        start = end - max(0, min(minutes, self.minutes)) + 1
        with self._lock:
            return [(m * 60.0, b[name]) for m, b in self._buckets.items()
                    if start <= m <= end and name in b]

    def __len__(self) -> int:
        return len(self._buckets)


# -- the snapshot ---------------------------------------------------------------------------

@dataclass
class Snapshot:
    generated_at: float
    hostname: str
    version: str
    hour: dict[str, list[Point]] = field(default_factory=dict)     # name -> last hour's points
    day: dict[str, list[Point]] = field(default_factory=dict)      # name -> last day's points
    hour_totals: dict[str, float] = field(default_factory=dict)    # counter -> sum over the hour
    delivery_rate: float | None = None      # delivered / attempted over the hour; None: none tried
    bounce_rate: float | None = None        # bounced / attempted
    queue_depth: int = 0
    oldest_age: float = 0.0
    top_deferring: list[tuple[str, int, str]] = field(default_factory=list)
    held: list[tuple[str, str, int, float]] = field(default_factory=list)
    held_total: int = 0
    recent_bounces: list[tuple[str, int]] = field(default_factory=list)
    latest_bounces: list[tuple[float, str, str, str, str]] = field(default_factory=list)
    webhook_backlog: int = 0
    notes: list[str] = field(default_factory=list)     # where collect() stopped reading


def rates(hour_totals: dict[str, float]) -> tuple[float | None, float | None]:
    """(delivered, bounced) over attempted = delivered + deferred + bounced + expired."""
    attempted = sum(hour_totals.get(k, 0.0) for k in ("delivered", "deferred", "bounced",
                                                         "expired"))
    if attempted <= 0:
        return None, None
    return (hour_totals.get("delivered", 0.0) / attempted,
            hour_totals.get("bounced", 0.0) / attempted)


def reply_text(reply: Any) -> str:
    """A Reply, or an outbox record's reply dict, as "550 5.1.1 text"."""
    if reply is None:
        return ""
    if isinstance(reply, dict):
        parts = (reply.get("code", ""), reply.get("enhanced", ""), reply.get("text", ""))
    else:
        parts = (reply.code, reply.enhanced, reply.text)
    return " ".join(str(p) for p in parts if p not in ("", None))


def _queued_messages(view: Any, limit: int) -> tuple[list[StoredMessage], bool]:
    """Up to `limit` messages in id order, and whether more were left: the read stops at
    `limit` instead of listing every id as `LmdbView.ids()` does."""
    from txmta.spool.view import load_messages

    def fn(txn: Any) -> tuple[list[StoredMessage], bool]:
        ids: list[str] = []
        more = False
        with txn.cursor(db=view._db[b"messages"]) as cur:
            for key in cur.iternext(keys=True, values=False):
                if len(ids) >= limit:
                    more = True
                    break
                ids.append(bytes(key).decode("ascii", "replace"))
        return load_messages(txn, view._db, ids), more
    return view._read(fn)  # type: ignore[no-any-return]


def _recent_outbox(view: Any, since: float, limit: int) -> tuple[list[OutboxRecord], bool]:
    """The outbox records of events at or after `since`, newest first, at most `limit`, and
    whether older ones of that period were left unread.  Event ids start with their time
    (txmta.events), so this walks back from the newest."""
    from txmta.events import time_key
    from txmta.spool import codec

    if b"outbox" not in view._db:
        return [], False
    floor = time_key(since)

    def fn(txn: Any) -> tuple[list[OutboxRecord], bool]:
        out: list[OutboxRecord] = []
        with txn.cursor(db=view._db[b"outbox"]) as cur:
            if not cur.last():
                return out, False
            for key, value in cur.iterprev():
                if bytes(key) < floor:
                    return out, False
                if len(out) >= limit:
                    return out, True
                try:
                    out.append(codec.decode_outbox(bytes(value)))
                except codec.CorruptRecord:
                    continue
        return out, False
    return view._read(fn)  # type: ignore[no-any-return]


def history_snapshot(history: History, now: float, hostname: str, version: str) -> Snapshot:
    """A snapshot with the history's part filled in: the series, the hour's sums, the rates."""
    snap = Snapshot(generated_at=now, hostname=hostname, version=version)
    for name in COUNTERS + GAUGES:
        snap.hour[name] = history.series(name, HOUR, now)
        snap.day[name] = history.series(name, DAY, now)
    snap.hour_totals = {name: sum(v for _, v in snap.hour[name]) for name in COUNTERS}
    snap.delivery_rate, snap.bounce_rate = rates(snap.hour_totals)
    return snap


def collect(view: Any, history: History, now: float, totals: dict[str, float] | None,
            *, hostname: str = "", version: str = "",
            walk_limit: int = WALK_LIMIT, outbox_limit: int = OUTBOX_LIMIT) -> Snapshot:
    """A snapshot of the spool behind `view` (an `LmdbView`) and of `history`, after
    sampling `totals` into it (None: the history is fed elsewhere).  Reads the spool in
    short transactions; blocking, so a daemon calls it in a thread."""
    if not hostname or not version:
        import socket

        import txmta
        hostname = hostname or socket.gethostname()   # no DNS lookup
        version = version or txmta.__version__
    if totals is not None:
        history.sample(now, totals)
    snap = history_snapshot(history, now, hostname, version)

    messages, more = _queued_messages(view, walk_limit)
    if more:
        snap.notes.append(f"only the first {walk_limit} queued messages were read")
    deferring: Counter[str] = Counter()
    last_reply: dict[str, str] = {}
    depth = 0
    oldest = now
    for m in messages:
        states = [st.state for st in m.recipients]
        if QUEUED in states or HELD in states:
            depth += 1
            oldest = min(oldest, m.arrival)
        for rcpt, st in zip(m.envelope.recipients, m.recipients):
            if st.state == QUEUED and st.last_reply is not None:
                domain = rcpt.address.domain.lower()
                deferring[domain] += 1
                last_reply[domain] = reply_text(st.last_reply)   # ids sort by arrival: newest wins
        if HELD in states:
            snap.held_total += 1
            if len(snap.held) < HELD_SHOWN:
                snap.held.append((m.id, str(m.envelope.sender) or "<>",
                                  len(m.envelope.recipients), m.arrival))
    snap.top_deferring = [(d, n, last_reply[d]) for d, n in deferring.most_common(TOP_DEFERRING)]
    gauges = totals or {}
    snap.queue_depth = int(gauges.get("queue_depth", depth))
    snap.oldest_age = float(gauges.get("oldest_age", max(0.0, now - oldest)))
    snap.webhook_backlog = int(gauges.get("webhook_backlog", 0))

    records, more = _recent_outbox(view, now - 3600, outbox_limit)
    if more:
        snap.notes.append(f"only the latest {outbox_limit} events of the hour were read")
    bounces = [r for r in records if r.kind == "bounced"]
    snap.recent_bounces = Counter(r.category or "other" for r in bounces).most_common()
    snap.latest_bounces = [(r.time, r.message_id, r.rcpt, r.category or "other",
                            reply_text(r.reply)) for r in bounces[:LATEST_BOUNCES]]
    return snap


# -- plots ----------------------------------------------------------------------------------

_W, _H = 600, 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 48, 16, 46, 30
COLOURS = {"delivered": "#2e7d32", "deferred": "#ef8f00", "bounced": "#c62828",
           "expired": "#6a1b9a", "queue_depth": "#1565c0", "webhook_backlog": "#00838f"}


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _number(v: float) -> str:
    if v >= 10_000:
        return f"{v / 1000:.0f}k"
    if v == int(v):
        return str(int(v))
    return f"{v:.1f}"


def _clock(t: float) -> str:
    return time.strftime("%H:%M", time.gmtime(t))


def line_plot(title: str, lines: Iterable[tuple[str, list[Point]]],
              start: float, end: float) -> str:
    """An SVG plot of several series over [start, end] (seconds): polylines, the y axis
    from 0 to the largest value, the times of both ends under the x axis, a legend."""
    lines = [(name, pts) for name, pts in lines]
    count = sum(len(pts) for _, pts in lines)
    top = max((v for _, pts in lines for _, v in pts), default=0.0)
    top = top if top > 0 else 1.0
    span = end - start if end > start else 1.0
    pw, ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def xy(t: float, v: float) -> str:
        x = _LEFT + pw * min(1.0, max(0.0, (t - start) / span))
        y = _TOP + ph * (1.0 - min(1.0, max(0.0, v / top)))
        return f"{x:.1f},{y:.1f}"

    out = [f'<svg class="plot" data-points="{count}" viewBox="0 0 {_W} {_H}" role="img" '
           f'aria-label="{_e(title)}" xmlns="http://www.w3.org/2000/svg">',
           f"<title>{_e(title)}</title>",
           f'<text x="{_LEFT}" y="20" class="t">{_e(title)}</text>',
           f'<line x1="{_LEFT}" y1="{_TOP + ph}" x2="{_LEFT + pw}" y2="{_TOP + ph}" class="ax"/>',
           f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_TOP + ph}" class="ax"/>',
           f'<text x="{_LEFT - 4}" y="{_TOP + 4}" class="yl">{_e(_number(top))}</text>',
           f'<text x="{_LEFT - 4}" y="{_TOP + ph / 2 + 4}" class="yl">'
           f'{_e(_number(top / 2))}</text>',
           f'<text x="{_LEFT - 4}" y="{_TOP + ph + 4}" class="yl">0</text>']
    for i in range(5):      # ticks at the ends and the quarters, the last one saying UTC
        x = _LEFT + pw * i / 4
        anchor = " xs" if i == 0 else " xr" if i == 4 else ""
        label = _clock(start + span * i / 4) + (" UTC" if i == 4 else "")
        out.append(f'<line x1="{x:.1f}" y1="{_TOP + ph}" x2="{x:.1f}" y2="{_TOP + ph + 4}" '
                   f'class="ax"/><text x="{x:.1f}" y="{_H - 10}" class="xl{anchor}">'
                   f'{_e(label)}</text>')
    if count == 0:
        out.append(f'<text x="{_LEFT + pw / 2}" y="{_TOP + ph / 2}" class="nd">no data</text>')
    legend_x = _LEFT
    for name, pts in lines:
        colour = COLOURS.get(name, "#555")
        if len(pts) == 1:
            x, y = xy(*pts[0]).split(",")
            out.append(f'<circle cx="{x}" cy="{y}" r="2.5" fill="{colour}"/>')
        elif pts:
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.8" '
                       f'points="{" ".join(xy(t, v) for t, v in pts)}"/>')
        if len(lines) > 1:
            out.append(f'<rect x="{legend_x}" y="26" width="10" height="10" fill="{colour}"/>'
                       f'<text x="{legend_x + 14}" y="35" class="lg">{_e(name)}</text>')
            legend_x += 28 + 8 * len(name)
    out.append("</svg>")
    return "".join(out)


def bar_plot(title: str, bars: list[tuple[str, float]]) -> str:
    """Horizontal bars, one per (label, value), the value written at the bar's end."""
    row, head = 24, 32
    height = head + row * max(1, len(bars)) + 10
    label_w, pw = 170, _W - 170 - 60
    top = max((v for _, v in bars), default=0.0)
    top = top if top > 0 else 1.0
    out = [f'<svg class="plot" data-points="{len(bars)}" viewBox="0 0 {_W} {height}" role="img" '
           f'aria-label="{_e(title)}" xmlns="http://www.w3.org/2000/svg">',
           f"<title>{_e(title)}</title>",
           f'<text x="4" y="20" class="t">{_e(title)}</text>']
    if not bars:
        out.append(f'<text x="{_W / 2}" y="{head + 14}" class="nd">no data</text>')
    for i, (label, value) in enumerate(bars):
        y = head + i * row
        w = max(1.0, pw * value / top)
        out.append(f'<text x="{label_w - 6}" y="{y + 15}" class="yl">{_e(label[:28])}</text>'
                   f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row - 6}" '
                   f'fill="{COLOURS["bounced"]}"/>'
                   f'<text x="{label_w + w + 4:.1f}" y="{y + 15}" class="lg">'
                   f'{_e(_number(value))}</text>')
    out.append("</svg>")
    return "".join(out)


# -- the page -------------------------------------------------------------------------------

_CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,sans-serif;color:#222;background:#f4f5f7}
header{background:#263238;color:#fff;padding:10px 16px;display:flex;flex-wrap:wrap;
 gap:4px 16px;align-items:baseline}
header h1{font-size:18px;margin:0}
header span{color:#cfd8dc;font-size:13px}
main{padding:12px;display:grid;gap:12px;
 grid-template-columns:repeat(auto-fit,minmax(min(100%,460px),1fr))}
section{background:#fff;border-radius:6px;padding:10px 12px;box-shadow:0 1px 2px rgba(0,0,0,.12);
 min-width:0}
h2{font-size:15px;margin:0 0 8px}
.plot{width:100%;height:auto;display:block}
.plot .t{font-size:17px;font-weight:600;fill:#222}
.plot .ax{stroke:#888;stroke-width:1}
.plot .yl{font-size:13px;fill:#555;text-anchor:end}
.plot .xl{font-size:13px;fill:#555;text-anchor:middle}
.plot .xs{text-anchor:start}
.plot .xr{text-anchor:end}
.plot .lg{font-size:13px;fill:#333}
.plot .nd{font-size:16px;fill:#999;text-anchor:middle}
.stats{display:grid;grid-template-columns:repeat(auto-fit,minmax(120px,1fr));gap:8px}
.stat{background:#eceff1;border-radius:4px;padding:6px 8px}
.stat b{display:block;font-size:20px}
.stat small{color:#555}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:3px 6px;border-bottom:1px solid #e0e0e0;vertical-align:top}
td.r{overflow-wrap:anywhere;min-width:12em}
.note{color:#8a4b00;background:#fff3e0;padding:6px 10px;border-radius:4px;margin:0}
.empty{color:#777;margin:0}
"""


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _percent(rate: float | None) -> str:
    return "–" if rate is None else f"{rate * 100:.1f}%"


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}min"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _table(headers: Iterable[str], rows: list[Iterable[object]], empty: str,
           wrap: int | None = None) -> str:
    if not rows:
        return f'<p class="empty">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = ' class="r"' if i == wrap else ""
            cells.append(f"<td{cls}>{_e(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(body)}</table></div>'


def _stat(label: str, value: str) -> str:
    return f'<div class="stat"><b>{_e(value)}</b><small>{_e(label)}</small></div>'


def render(snapshot: Snapshot) -> bytes:
    """The page: UTF-8 HTML that reloads itself every REFRESH seconds."""
    s = snapshot
    now = s.generated_at
    hour_start, day_start = now - HOUR * 60, now - DAY * 60
    flows = ("delivered", "deferred", "bounced")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta http-equiv="refresh" content="{REFRESH}">',
        f"<title>txmta on {_e(s.hostname)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<header><h1>txmta on {_e(s.hostname)}</h1>"
        f"<span>version {_e(s.version)}</span><span>{_e(_when(now))} UTC</span></header>",
        "<main>",
    ]
    for note in s.notes:
        parts.append(f'<p class="note">{_e(note)}</p>')
    ht = s.hour_totals
    parts.append(
        "<section><h2>Last hour</h2><div class=\"stats\">"
        + _stat("delivery rate", _percent(s.delivery_rate))
        + _stat("bounce rate", _percent(s.bounce_rate))
        + _stat("queued messages", str(s.queue_depth))
        + _stat("oldest queued", _age(s.oldest_age) if s.queue_depth else "–")
        + "".join(_stat(k, _number(ht.get(k, 0.0))) for k in
                  ("received", "delivered", "deferred", "bounced", "expired", "suppressed"))
        + _stat("held messages", str(s.held_total))
        + _stat("webhook backlog", str(s.webhook_backlog))
        + "</div></section>")
    parts.append("<section>" + line_plot("Delivered, deferred, bounced per minute (hour)",
                                         [(k, s.hour.get(k, [])) for k in flows],
                                         hour_start, now) + "</section>")
    parts.append("<section>" + line_plot("Queue depth (hour)",
                                         [("queue_depth", s.hour.get("queue_depth", []))],
                                         hour_start, now) + "</section>")
    parts.append("<section>" + line_plot("Delivered, deferred, bounced per minute (day)",
                                         [(k, s.day.get(k, [])) for k in flows],
                                         day_start, now) + "</section>")
    parts.append("<section>" + line_plot("Queue depth (day)",
                                         [("queue_depth", s.day.get("queue_depth", []))],
                                         day_start, now) + "</section>")
    parts.append("<section>" + line_plot("Webhook backlog (hour)",
                                         [("webhook_backlog", s.hour.get("webhook_backlog", []))],
                                         hour_start, now) + "</section>")
    parts.append("<section>" + bar_plot("Bounces by category (hour)",
                                        [(c, float(n)) for c, n in s.recent_bounces])
                 + "</section>")
    parts.append("<section><h2>Top deferring destinations</h2>"
                 + _table(("destination", "recipients", "last reply"), s.top_deferring,
                          "No recipient is waiting after a failure.", wrap=2)
                 + "</section>")
    held_title = f"Messages on hold ({s.held_total})"
    if s.held_total > len(s.held):
        held_title += f", the first {len(s.held)} shown"
    parts.append(f"<section><h2>{_e(held_title)}</h2>"
                 + _table(("queue id", "sender", "recipients", "arrived"),
                          [(i, snd, n, _when(t)) for i, snd, n, t in s.held],
                          "No message is held.")
                 + "</section>")
    parts.append("<section><h2>Latest bounces</h2>"
                 + _table(("time", "queue id", "recipient", "category", "reply"),
                          [(_when(t), i, r, c, rep) for t, i, r, c, rep in s.latest_bounces],
                          "No bounce in the last hour.", wrap=4)
                 + "</section>")
    parts.append("</main></body></html>\n")
    return "".join(parts).encode("utf-8", "replace")


# -- the resource ---------------------------------------------------------------------------

SnapshotSource = Callable[[], Union[Snapshot, "Deferred[Snapshot]"]]

CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class DashboardResource(Resource):
    """GET renders the snapshot `source()` gives (a Snapshot or a Deferred of one); any
    path below it is the same page.  Authorization is the mounting resource's job."""

    isLeaf = True

    def __init__(self, source: SnapshotSource) -> None:
        super().__init__()
        self._source = source

    def render_GET(self, request: Request) -> int:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def done(snapshot: Snapshot) -> None:
            if gone:
                return
            body = render(snapshot)
            request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
            request.setHeader(b"Cache-Control", b"no-store")
            request.setHeader(b"Content-Security-Policy", CSP.encode("ascii"))
            request.setHeader(b"X-Content-Type-Options", b"nosniff")
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
            request.finish()

        def failed(f: Failure) -> None:
            log.failure("dashboard snapshot failed", f)
            if gone:
                return
            request.setResponseCode(500)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            request.write(b"the dashboard could not read the spool\n")
            request.finish()

        d = maybeDeferred(self._source)
        d.addCallback(done).addErrback(failed)
        return NOT_DONE_YET
