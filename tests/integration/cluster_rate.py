"""One "node" drawing from a shared rate limit, as a process of its own (for
test_cluster_nodes.py): `python cluster_rate.py URL NODES KEY RATE BURST SECONDS`.

Builds the shared parts the way a txmta worker does (`txmta.cluster.build` with a
[cluster] configuration), then uses the limiter like a sender: acquire one unit, wait what
it says, "send" (print the wall-clock time), acquire the next; for SECONDS seconds.  Prints
"ready" once connected, then one time per unit used, then "done".
"""

from __future__ import annotations

import sys
import time
from typing import Any

from twisted.internet import defer, task


def main(reactor: Any, url: str, nodes: str, key: str, rate: str, burst: str,
         seconds: str) -> Any:
    from txmta import cluster
    from txmta import config as C
    cfg = C.load_text(f'[cluster]\nredis = "{url}"\nnodes = {int(nodes)}\n')
    shared = cluster.build(cfg, reactor, worker=1, workers=1)
    shared.service.startService()

    @defer.inlineCallbacks
    def run() -> Any:
        while not shared.rate_limiter.connection.up:
            yield task.deferLater(reactor, 0.05, lambda: None)
        print("ready", flush=True)
        end = reactor.seconds() + float(seconds)
        while True:
            wait = yield shared.rate_limiter.acquire(key, float(rate), int(burst),
                                                     reactor.seconds())
            if reactor.seconds() + wait >= end:
                break
            if wait > 0:
                yield task.deferLater(reactor, wait, lambda: None)
            print(f"{time.time():.6f}", flush=True)
        print("done", flush=True)
        yield shared.service.stopService()
    return run()


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
