"""Relayhost failover: the relayhosts tried in order, each behind its own circuit breaker.

`RelayDeliverer` delivers the mail that goes through relayhosts when there is somewhere else
to go (`[delivery] relayhost` a list of two or more, or `fallback = "mx"`; a single relayhost
alone is a plain `Deliverer`, as it always was).  All of it is one destination for the dispatcher
("relay:" and the relays, comma-separated), whatever the recipient domain.  An attempt takes
the relays in order, skipping a relay whose circuit (circuit.py) is open, or half-open with
its one trial under way, and hands the recipients to that relay's own `Deliverer`: a router
with that relay as its relayhost, and the relay's TLS level; the pool key's destination
"relay:<relay>" is what the worker's `settings_for` gives the relay's AUTH to, and what the
pool's limits count per relay.  After each relay, a recipient whose outcome tells of the
relay's own trouble (`outcome.relay_fault`: not reached, failed before the mail transaction,
421, a mail system error) goes on to the next relay; the others keep their outcome (a 550
5.1.1 about the recipient bounces, as it would without failover).  The relay's circuit hears
a fault when every recipient's outcome was one, a success otherwise.  A recipient no further
relay takes keeps the outcome its last relay gave, and that relay's site failure (if any)
throttles the destination as before.

When no relay may be tried (every circuit open): with `fallback` (a `Deliverer` by MX) the
recipients go to their domains' MX hosts, without throttling the relay destination (each
domain's trouble is its own); without it they are deferred with 451 4.4.1 "... try again in
N seconds", N being the time until the first circuit lets a trial through (classify reads
the wait), and the attempt is a site failure: the dispatcher holds the relayed mail until
then.  A recipient deferred at one relay and then taken by another is fine: delivery is at
least once.

An admin's "try now" (`heard`: events.RetryNow, from a flush, release or requeue) ends
every cool-down: the next attempt is each open relay's trial.  The circuits live in this
object, so each worker process has its own (`txmta status` shows each worker's).  Not here: what a reply means (outcome.py), the SMTP session (client.py),
the connections (pool.py).
"""
# test: tests/test_relays.py

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txmta import outcome as O
from txmta.categories import Classifier
from txmta.message import Envelope
from txmta.outbound.circuit import OPEN, Circuit
from txmta.outbound.deliverer import AttemptResult
from txmta.outbound.pool import SHUTTING_DOWN
from txmta.outbound.tlspolicy import HostTLS, TLSPlan
from txmta.reply import Reply

log = Logger()


class RelayTLS:
    """The TLS plan of one relay's routes: the relay's own level for each of its hosts (the
    `tls_policy` of its `Deliverer`)."""

    def __init__(self, level: str) -> None:
        self.level = level

    def plan(self, route: Any) -> Deferred[TLSPlan]:
        return succeed(TLSPlan({h.mx: HostTLS(self.level, h.mx) for h in route.hops},
                               "relayhost"))


@dataclass(eq=False)
class Relay:
    name: str            # in status and metrics
    spec: str            # Postfix syntax, as configured
    deliverer: Any       # a Deliverer whose router sends everything to this relay
    circuit: Circuit


def relay_destination(specs: Sequence[str]) -> str:
    """The dispatcher's destination for relayed mail: "relay:" and the relays."""
    return "relay:" + ",".join(specs)


class RelayDeliverer:
    """The dispatcher's deliverer when relayhosts are configured; see the module docstring."""

    def __init__(self, relays: Sequence[Relay], clock: IReactorTime, *, fallback: Any = None,
                 rules: Classifier | None = None, metrics: Any = None) -> None:
        if not relays:
            raise ValueError("no relayhost")
        self.relays = list(relays)
        self.clock = clock
        self.fallback = fallback
        self.rules = rules
        self.metrics = metrics
        self.name = relay_destination([r.spec for r in self.relays])
        for relay in self.relays:
            relay.circuit.on_change = self._changed(relay)
            if metrics is not None:
                metrics.relay_state(relay.name, relay.circuit.state)

    def destination(self, domain: str) -> str:
        return self.name

    def heard(self, event: Any) -> None:
        """`events.RetryNow` (an admin's flush, release or requeue): every open circuit
        ends its cool-down, so the next attempt tries its relay."""
        for relay in self.relays:
            relay.circuit.retry_now()

    def snapshot(self) -> list[dict[str, Any]]:
        """Each relay's circuit, in order, for `txmta status`."""
        return [{"name": r.name, "relay": r.spec, **r.circuit.snapshot()} for r in self.relays]

    @inlineCallbacks
    def deliver(self, envelope: Envelope, indices: Sequence[int], body: Any,
                lane: str = "", token: str = "", pinned: Any = None) -> Any:
        """Fires with an AttemptResult for the recipients `indices`; never errbacks for
        anything a relay does."""
        pending = list(indices)
        outcomes: dict[int, O.Outcome] = {}
        site: Reply | None = None
        tried = False
        for relay in self.relays:
            if not pending:
                break
            if not relay.circuit.allow():
                continue
            tried = True
            try:
                result = yield relay.deliverer.deliver(envelope, pending, body, lane=lane,
                                                       token=token, pinned=pinned)
            except Exception:
                relay.circuit.released()
                raise
            moved = [i for i in pending if _moves_on(result.outcomes.get(i))]
            outcomes.update(result.outcomes)
            self._judge(relay, [result.outcomes.get(i) for i in pending], len(moved))
            site = result.site_failure
            if moved:
                log.info("relayhost {name} ({spec}) failed for {n} recipient(s): {reply}",
                         name=relay.name, spec=relay.spec, n=len(moved),
                         reply=str(result.outcomes[moved[0]].reply))
            pending = moved
        if tried:
            return AttemptResult(outcomes, self.name, site)
        if self.fallback is not None:
            result = yield self.fallback.deliver(envelope, pending, body, lane=lane,
                                                 token=token, pinned=pinned)
            return AttemptResult(result.outcomes, self.name, None)
        reply = self._unavailable()
        verdict = O.classify(reply, O.CONNECT, True, self.rules)
        return AttemptResult({i: verdict.outcome(reply, O.CONNECT) for i in pending}, self.name,
                             reply)

    # -- inside ---------------------------------------------------------------------------

    def _judge(self, relay: Relay, results: list[O.Outcome | None], moved: int) -> None:
        """Tell the relay's circuit what the attempt said of it."""
        said = [o for o in results if o is not None and o.reply != SHUTTING_DOWN]
        if not said:
            relay.circuit.released()
        elif moved == len(results):      # every recipient: the relay's own trouble
            if self.metrics is not None:
                self.metrics.relay_failure(relay.name)
            if relay.circuit.failed():
                log.warn("relayhost {name} ({spec}): circuit open for {s:g} s after: {reply}",
                         name=relay.name, spec=relay.spec, s=relay.circuit.cooldown,
                         reply=str(said[0].reply))
        else:
            relay.circuit.succeeded()

    def _unavailable(self) -> Reply:
        """The deferral when every circuit is open: wait until the first trial."""
        waits = [r.circuit.retry_in() for r in self.relays]
        wait = max(1, math.ceil(min(waits)))
        names = ", ".join(r.name for r in self.relays)
        return Reply(451, "4.4.1", f"every relayhost is unavailable (circuit open: {names}); "
                                   f"try again in {wait} seconds")

    def _changed(self, relay: Relay) -> Any:
        def changed(circuit: Circuit) -> None:
            if self.metrics is not None:
                self.metrics.relay_state(relay.name, circuit.state)
            if circuit.state != OPEN:
                log.info("relayhost {name} ({spec}): circuit {state}", name=relay.name,
                         spec=relay.spec, state=circuit.state)
        return changed


def _moves_on(outcome: O.Outcome | None) -> bool:
    """Does this outcome send its recipient on to the next relay?"""
    if outcome is None or isinstance(outcome, O.Delivered) or outcome.reply == SHUTTING_DOWN:
        return False
    return O.relay_fault(outcome.reply, outcome.stage)
