"""A dashboard snapshot with something in every part of the page, for the rendering tests
and the browser test: a day of history fed minute by minute, a hostile reply text."""

from __future__ import annotations

from txmta.dashboard import History, Snapshot, history_snapshot

NOW = 1_800_000_000.0          # 2027-01-15T08:00:00Z


def day_of_history(now: float = NOW) -> History:
    """A history sampled every minute of the last day, with a restart half way."""
    h = History()
    totals = {"delivered": 0.0, "deferred": 0.0, "bounced": 0.0, "expired": 0.0,
              "suppressed": 0.0, "received": 0.0}
    for i in range(1440, -1, -1):
        t = now - i * 60
        if i == 700:
            totals = {k: 0.0 for k in totals}          # the daemon restarted
        k = 1440 - i
        totals["received"] += 20 + k % 7
        totals["delivered"] += 15 + (k * 7) % 11
        totals["deferred"] += (k * 3) % 5
        totals["bounced"] += 1 if k % 4 == 0 else 0
        h.sample(t, {**totals, "queue_depth": 40 + (k * 13) % 30, "oldest_age": 600.0,
                     "webhook_backlog": float(k % 9)})
    return h


def sample_snapshot(now: float = NOW) -> Snapshot:
    snap = history_snapshot(day_of_history(now), now, "mx1.example.net", "0.1.0")
    snap.queue_depth, snap.oldest_age, snap.webhook_backlog = 57, 4200.0, 3
    snap.top_deferring = [
        ("example.com", 31, "451 4.7.1 <script>alert('x')</script> try later"),
        ("slow.example.org", 12, "421 4.4.2 connection timed out"),
    ]
    snap.held = [("0000AAAAAAAAbcdf", "alice@example.org", 3, now - 3600)]
    snap.held_total = 1
    snap.recent_bounces = [("invalid-recipient", 9), ("spam-block", 4), ("other", 1)]
    snap.latest_bounces = [(now - 120, "0000AAAAAAABbcdf", "bob@example.com",
                            "invalid-recipient", "550 5.1.1 no such user")]
    return snap
