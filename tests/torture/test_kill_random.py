"""Kill -9 at random moments under mixed load (issue 14; docs/durability.md).

`bench/killtest.py` runs a real daemon (two workers, now and then one) under SMTP and HTTP API
intake, delivery with bounces and deferrals, admin commands and webhooks, SIGKILLs the
master, everything, or one worker at random moments, and checks that nothing acked is lost,
that duplicates stay within the in-flight window of a kill, that no recipient has two
terminal events and that the spool ends empty.  `make test` runs 5 kills, `make torture`
100.  The seed is random (printed); TXMTA_KILLTEST_SEED repeats one.

The checker's own tests come first: each broken promise, made up, must be reported.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import torturelib

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import killtest  # noqa: E402  (bench/killtest.py)
from killtest import Observed, Plan  # noqa: E402

KILLS = torturelib.size(5, 100)
DELIVERED = "message.delivered"
BOUNCED = "message.bounced"


def acked(token: str, *kinds: str) -> Plan:
    return Plan(token, "smtp", f"snd-{token}@src.test",
                [f"{k}-{token}@dest.test" for k in kinds], acked=True)


def clean() -> Observed:
    """One acked message to ok- and bad-: delivered once, bounced once, its DSN delivered."""
    return Observed(
        plans=[acked("t1", "ok", "bad")],
        arrivals={"ok-t1@dest.test": [10.0], "snd-t1@src.test": [11.0]},
        dsn_for={"snd-t1@src.test": {"t1"}},
        terminal={("m1", "ok-t1@dest.test"): {"w1": DELIVERED},
                  ("m1", "bad-t1@dest.test"): {"w2": BOUNCED},
                  ("m2", "snd-t1@src.test"): {"w3": DELIVERED}},
        kill_times=[5.0])


def test_checker_passes_a_clean_run() -> None:
    r = killtest.check(clean())
    assert r["violations"] == []
    assert (r["acked"], r["delivered"], r["bounced"], r["dsns_delivered"], r["lost"]) == (1, 1, 1, 1, 0)


def test_checker_counts_a_lost_recipient_and_a_lost_dsn() -> None:
    o = clean()
    o.arrivals = {}
    o.dsn_for = {}
    r = killtest.check(o)
    assert r["lost"] == 2
    assert any("lost" in v for v in r["violations"])


def test_checker_allows_a_duplicate_across_a_kill_only() -> None:
    o = clean()
    o.arrivals["ok-t1@dest.test"] = [4.9, 7.0]        # before the kill at 5.0, and after
    r = killtest.check(o)
    assert r["violations"] == [] and r["duplicate_deliveries"] == 1
    assert r["duplicated_messages_max_per_kill"] == 1
    o.arrivals["ok-t1@dest.test"] = [20.0, 21.0]      # no kill near: delivered twice
    r = killtest.check(o)
    assert r["duplicates_without_kill"] == 1
    assert any("outside the window" in v for v in r["violations"])


def test_checker_bounds_the_duplicates_of_one_kill() -> None:
    o = clean()
    n = killtest.MAX_INFLIGHT * killtest.PRIORITY_LEVELS + 1
    for i in range(n):
        o.plans.append(acked(f"d{i}", "ok"))
        o.arrivals[f"ok-d{i}@dest.test"] = [4.5, 6.0]
        o.terminal[(f"n{i}", f"ok-d{i}@dest.test")] = {f"x{i}": DELIVERED}
    r = killtest.check(o)
    assert r["duplicated_messages_max_per_kill"] == n
    assert any("duplicated across one kill" in v for v in r["violations"])


def test_checker_flags_two_terminal_events_and_wrong_or_missing_ones() -> None:
    o = clean()
    o.terminal[("m1", "ok-t1@dest.test")]["w9"] = BOUNCED
    r = killtest.check(o)
    assert r["double_terminal"] == 1
    assert any("two terminal events" in v for v in r["violations"])
    o = clean()
    o.terminal[("m1", "bad-t1@dest.test")] = {"w2": DELIVERED}
    assert any("wrong terminal event" in v for v in killtest.check(o)["violations"])
    o = clean()
    del o.terminal[("m2", "snd-t1@src.test")]
    assert any("DSNs without a delivered event" in v for v in killtest.check(o)["violations"])
    o = clean()
    o.maillog = [{"id": "m1", "to": "ok-t1@dest.test", "status": "sent"}] * 2
    assert killtest.check(o)["double_terminal"] == 1


def test_random_kills_lose_nothing(tmp_path: Path) -> None:
    """KILLS SIGKILLs at random moments under the mixed load: no violation, every kind of
    kill and of intake happened, and there were bounces and deferrals to get right."""
    seed = int(os.environ.get("TXMTA_KILLTEST_SEED", str(random.randrange(1 << 30))))
    r = killtest.run(KILLS, seed, tmp_path / "killtest", log=print,
                     drain_timeout=torturelib.size(60.0, 300.0))
    print(killtest.summary(r))
    assert r["violations"] == [], killtest.summary(r)
    assert r["kills"] == KILLS and r["lost"] == 0 and r["double_terminal"] == 0
    assert set(r["kills_by_kind"]) == set(killtest.KINDS)
    assert set(r["acked_by_channel"]) == {"smtp", "api", "postmark"}
    assert r["acked"] >= 20 * KILLS, r["acked"]
    assert r["bounced"] > 0 and r["deferred_first"] > 0
    assert r["admin_commands"].get("queue list", 0) > 0
    assert r["spool_left"] == 0 and not any(r["spool_leftovers"].values())
