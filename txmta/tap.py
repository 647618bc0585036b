"""`twistd txmta`: load the configuration, build every part, wire them, start listening.

The only module that imports the global reactor and knows every part (DESIGN "Layout").
Parts get plain values and the reactor as their clock; nothing else reads the config.
"""
# test: tests/integration/test_daemon.py

from __future__ import annotations

import gc
import os
import sys
from typing import Any

from twisted.application import service
from twisted.python import usage

from txmta import config as C
from txmta.worker import build


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = ("Runs the txmta mail transfer agent.  Without --config it reads "
                f"{C.DEFAULT_PATH} if present, else built-in defaults.")
    optParameters = [["config", "c", None, "the configuration file (TOML)"]]


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor
    try:
        cfg = C.load(options["config"])
        os.makedirs(cfg.spool.path, exist_ok=True)
        top = build(cfg, reactor)      # reads the TLS material: bad files are ConfigErrors too
    except C.ConfigError as e:
        raise SystemExit(f"txmta: {e}")
    # The objects built at start live as long as the daemon: keep the cyclic collector from
    # walking them again and again, and let it run less often (a full collection under load
    # was a visible share of the end-of-data -> 250 tail latency).
    gc.collect()
    gc.freeze()
    gc.set_threshold(20000, 20, 20)
    # The spool's writer thread needs the GIL for a moment after each commit, to hand the
    # results (the 250s) to the reactor.  With the default 5 ms switch interval a busy reactor
    # thread keeps it that long before yielding; 1 ms keeps that wait off the reply latency.
    sys.setswitchinterval(0.001)
    return top


def global_reactor() -> Any:
    """The global reactor, for the `txmta` commands that run Twisted code once (doctor): this
    module stays its only importer."""
    from twisted.internet import reactor
    return reactor
