#!/usr/bin/env python3
"""The lane scenario (issue 11) with figures: p50/p99 per lane while a bulk backlog waits.

    .venv/bin/python bench/lanes.py                       # workers 1 and 2, 3 runs each
    .venv/bin/python bench/lanes.py --workers 1 --repeat 1 --bulk 2000

Each run (tests/integration/lanes_scenario.py): a fresh daemon; N bulk messages (a listener
with lane = "bulk", smtp-source, 20 sessions, 1 KB) queued to one destination, a scripted
SMTP sink on 127.0.0.41 that takes 2 s to accept each bulk message; then 100 transactional
messages sent one after the other to the same destination.  Reported per run: the
transactional latency from the 250 to the arrival at the sink (p50, p99, max), how many bulk
messages arrived meanwhile and at what rate (the bulk lane's p50/p99 would be the backlog's
drain time, about N x 2 s / its connections), and the bulk intake rate.

Target (issue 11): transactional p99 accept -> delivered under 500 ms.
Results: a Markdown table on stdout and bench/results/<date>-lanes.json.  Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(BENCH, "..", "tests", "integration"))
sys.path.insert(0, os.path.join(BENCH, "..", "tests"))

import lanes_scenario  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, action="append", default=None,
                   help="[server] workers of a variant (repeatable; default 1 and 2)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--bulk", type=int, default=10_000)
    p.add_argument("--transactional", type=int, default=100)
    p.add_argument("--delay", type=float, default=2.0, help="seconds per bulk message")
    args = p.parse_args()
    variants = args.workers or [1, 2]
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="txmta-lanes-") as tmp:
        for rep in range(args.repeat):
            for w in variants:
                r = lanes_scenario.run(Path(tmp) / f"r{rep}w{w}", n_bulk=args.bulk,
                                       n_trans=args.transactional, bulk_delay=args.delay,
                                       workers=w)
                s = dict(r.summary(), workers=w, run=rep)
                runs.append(s)
                print(json.dumps(s), flush=True)
    print()
    print("| workers | transactional p50 ms | p99 ms | max ms | bulk delivered meanwhile "
          "| bulk msg/s meanwhile | bulk intake msg/s |")
    print("|---|---|---|---|---|---|---|")
    for w in variants:
        mine = [s for s in runs if s["workers"] == w]

        def med(f):
            vals = [f(s) for s in mine if f(s) is not None]
            return round(statistics.median(vals), 1) if vals else None
        print(f"| {w} | {med(lambda s: s['transactional_ms']['p50'])} "
              f"| {med(lambda s: s['transactional_ms']['p99'])} "
              f"| {med(lambda s: s['transactional_ms']['max'])} "
              f"| {med(lambda s: s['bulk_delivered_meanwhile'])} "
              f"| {med(lambda s: s['bulk_msg_s_meanwhile'])} "
              f"| {med(lambda s: s['bulk_intake_msg_s'])} |")
    out = Path(BENCH) / "results" / f"{time.strftime('%Y-%m-%d-%H%M')}-lanes.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    print(f"\n(medians of {args.repeat} runs; raw figures in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
