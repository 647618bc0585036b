"""Serves the dashboard of the sample snapshot (tests/dashboard_sample.py) with twisted.web
on 127.0.0.1, at / through `DashboardResource`, and at /broken a page whose script fails,
so the browser test can show that it does see console errors.  Prints the port, then runs
until killed.  Started by tests/integration/test_dashboard_browser.py."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import reactor  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import Site  # noqa: E402
from twisted.web.static import Data  # noqa: E402

from dashboard_sample import sample_snapshot  # noqa: E402
from txmta.dashboard import DashboardResource  # noqa: E402

BROKEN = (b"<!DOCTYPE html><html><body><p>broken</p>"
          b"<script>no_such_function();</script></body></html>")


def main() -> None:
    root = Resource()
    root.putChild(b"", DashboardResource(sample_snapshot))
    root.putChild(b"broken", Data(BROKEN, "text/html; charset=utf-8"))
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")  # type: ignore[attr-defined]
    print(port.getHost().port, flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
