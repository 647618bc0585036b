"""Run code that asks DNS against tests/dnsserver.py in this process, on loopback.

`with serving(zone) as ask: ask(lambda resolver: spf.check_host(resolver, ...))` starts the
server on 127.0.0.53 (a free port), makes a `txmta.outbound.dns.Resolver` for it on the
real reactor, spins the reactor until the Deferred fires and returns its result (a
Failure when it errbacks).  Like the `live` fixture of tests/test_dns.py: real UDP/TCP on
127.0.0.0/8, never the system resolver.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

from twisted.internet.defer import Deferred

from dnsserver import listen
from txmta.outbound.dns import Resolver

Ask = Callable[[Callable[[Resolver], "Deferred[Any]"]], Any]


@contextlib.contextmanager
def serving(zone: dict[str, Any], timeout: float = 0.5) -> Iterator[Ask]:
    from twisted.internet import reactor
    server = listen(reactor, zone)
    made: list[Resolver] = []

    def ask(call: Callable[[Resolver], Deferred[Any]]) -> Any:
        resolver = Resolver(reactor, [(server.host, server.port)], timeout=timeout, tries=1)
        made.append(resolver)
        box: list[Any] = []
        call(resolver).addBoth(box.append)
        deadline = time.monotonic() + 20.0
        while not box and time.monotonic() < deadline:
            reactor.iterate(0.01)  # type: ignore[attr-defined]
        assert box, "no result within 20 s"
        return box[0]
    try:
        yield ask
    finally:
        for r in made:
            r.close()
        stopped: list[Any] = []
        server.stop().addBoth(stopped.append)
        for _ in range(50):
            if stopped:
                break
            reactor.iterate(0.01)  # type: ignore[attr-defined]
