"""Lanes with a real twistd: transactional mail is not held up by a bulk backlog.

10,000 bulk messages (a listener with lane = "bulk") are queued to a destination that takes
2 s to accept each of them; 100 transactional messages sent meanwhile to the same destination
are delivered first, each long before the backlog could drain.  The latencies themselves
(p50/p99) are the benchmark's (bench/lanes.py); this test asserts the order, with bounds far
from what the backlog would cost (10,000 x 2 s over at most 20 connections: over 15 minutes).
Loopback only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import lanes_scenario

pytestmark = pytest.mark.integration


def test_transactional_mail_overtakes_a_bulk_backlog_at_a_slow_destination(tmp_path: Path):
    r = lanes_scenario.run(tmp_path, n_bulk=10_000, n_trans=100, bulk_delay=2.0)
    print("lane scenario:", r.summary())
    assert len(r.trans_latency) == 100
    # The backlog drains at most 20 messages per 2 s; every transactional message arrived
    # within 10 s of its 250, while the bulk mail delivered meanwhile is a small part.
    assert max(r.trans_latency) < 10.0, r.summary()
    assert r.bulk_delivered_before_last_trans < 2_000, r.summary()
