"""One attempt: deliver some recipients of one message to their destination.

`Deliverer.deliver()` routes the destination (relayhost or MX hosts), then walks the hops in
order through the connection pool: recipients that a hop leaves undecided (it could not be
reached, or closed on us) go on to the next hop; recipients a server answered are decided by
`outcome.classify()`.  A 452 at RCPT ("too many recipients", RFC 5321 4.5.3.1.10) leaves
those recipients for another transaction on the same hop.  Returns one Outcome per
recipient and whether the whole destination failed (for throttling).  Remote behaviour
never raises (DESIGN invariant 4).  With a `tls_policy` (tlspolicy.TLSPolicy), the TLS of each
hop is decided before connecting; a hop the policy rules out for now (a failed TLSA lookup, an
MX host an MTA-STS policy does not list) is skipped like a host that cannot be reached.

Not here: the queue, the spool, retry timing; this module never sees them.
"""
# test: tests/test_deliverer.py

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from txmta import outcome as O
from txmta.message import Envelope
from txmta.outbound.pool import PoolKey
from txmta.outbound.route import Route, Unroutable
from txmta.outbound.tlspolicy import opportunistic
from txmta.reply import Reply

log = Logger()
MAX_RCPTS_PER_TRANSACTION = 100   # RFC 5321 4.5.3.1.8: servers take at least 100


@dataclass(frozen=True)
class AttemptResult:
    outcomes: Mapping[int, O.Outcome]
    destination: str
    site_failure: Reply | None = None     # the destination as a whole failed with this reply


class Deliverer:
    def __init__(self, router: Any, pool: Any, *, helo: str, source: str = "",
                 tls_level: str = "may", relay_tls: str = "may", tls_policy: Any = None) -> None:
        self.router = router
        self.pool = pool
        self.tls_policy = tls_policy   # None: the fixed levels below
        self.helo = helo
        self.source = source
        self.tls_level = tls_level     # towards MX hosts
        self.relay_tls = relay_tls     # towards the relayhost

    def destination(self, domain: str) -> str:
        return self.router.destination(domain)

    @inlineCallbacks
    def deliver(self, envelope: Envelope, indices: Sequence[int], body: bytes) -> Any:
        """Fires with an AttemptResult for the recipients `indices` of `envelope` (all of one
        destination); never errbacks for anything the network or a remote server does."""
        domain = envelope.recipients[indices[0]].address.domain
        try:
            route = yield self.router.route(domain)
        except Exception as e:  # our bug, not the remote's; keep the mail
            log.failure("routing {domain} failed", domain=domain)
            route = Unroutable(self.router.destination(domain),
                               Reply(451, "4.3.0", f"internal error routing {domain}: {e!r}"))
        if isinstance(route, Unroutable):
            verdict = O.classify(route.reply, O.ROUTE)
            kind = O.PermFailed if verdict.kind is O.PermFailed else O.TempFailed
            outs = {i: kind(route.reply, stage=O.ROUTE) for i in indices}
            return AttemptResult(outs, route.destination,
                                 None if kind is O.PermFailed else route.reply)
        result = yield self._walk(route, envelope, list(indices), body)
        return result

    @inlineCallbacks
    def _walk(self, route: Route, envelope: Envelope, pending: list[int], body: bytes) -> Any:
        outcomes: dict[int, O.Outcome] = {}
        hops = route.hops
        last_failure: Reply | None = None   # the last session-level failure seen
        last_result: Any = None             # the attempt that gave it (host, TLS for the log)
        reached = False                     # some hop got as far as a mail transaction
        plan = (yield self.tls_policy.plan(route)) if self.tls_policy is not None else None
        # "TLS-Required: No" relaxes the recipient domain's policy, never the relayhost's
        # (whose TLS protects our AUTH password), and never a REQUIRETLS message's
        relaxed = (envelope.tls_optional and not envelope.requiretls
                   and not route.destination.startswith("relay:"))
        for n, hop in enumerate(hops):
            last = n == len(hops) - 1
            if plan is not None:
                tls = plan.for_host(hop.mx)
                if relaxed:
                    tls = opportunistic(tls, hop.mx)
                if isinstance(tls, Reply):      # ruled out by the TLS policy, for now
                    last_failure, last_result = tls, None
                    log.info("{mx}[{address}] skipped: {reply}", mx=hop.mx, address=hop.address,
                             reply=tls)
                    continue
            else:
                tls = self.relay_tls if route.destination.startswith("relay:") else self.tls_level
            key = PoolKey(route.destination, hop.mx, hop.address, hop.port, tls,
                          self.source, self.helo)
            undecided: list[int] = []
            todo = pending
            while todo:
                batch, todo = todo[:MAX_RCPTS_PER_TRANSACTION], todo[MAX_RCPTS_PER_TRANSACTION:]
                rcpts = [envelope.recipients[i] for i in batch]
                result = yield self.pool.transaction(key, envelope, rcpts, body)
                failure = result.failure
                if failure is None or failure.stage not in O.SESSION_STAGES:
                    reached = True
                else:
                    last_failure, last_result = failure.reply, result
                retry_here, next_hop, decided = self._decide(result, batch, last)
                outcomes.update(decided)
                undecided.extend(next_hop)
                if retry_here and len(retry_here) < len(batch):
                    todo = retry_here + todo          # 452: some went through, send the rest
                else:
                    for i in retry_here:              # 452 and no progress: try later
                        reply = result.rcpt_replies[batch.index(i)]
                        outcomes[i] = O.TempFailed(reply, result.host, result.address,
                                                   result.tls, O.RCPT)
            pending = undecided
            if not pending:
                break
        for i in pending:  # the hops ran out with recipients undecided
            reply = last_failure or Reply(451, "4.4.0", f"no usable host for {route.destination}")
            if last_result is not None:
                outcomes[i] = O.TempFailed(reply, last_result.host, last_result.address,
                                           last_result.tls, last_result.failure.stage)
            else:
                outcomes[i] = O.TempFailed(reply, stage=O.CONNECT)
        site = None
        if not reached and last_failure is not None and not last_failure.permanent:
            site = last_failure
        return AttemptResult(outcomes, route.destination, site)

    def _decide(self, result: Any, batch: Sequence[int], last: bool
                ) -> tuple[list[int], list[int], dict[int, O.Outcome]]:
        """Split `batch` into (retry on this hop after a 452, try at the next hop, decided)."""
        retry_here: list[int] = []
        next_hop: list[int] = []
        decided: dict[int, O.Outcome] = {}
        failure = result.failure
        for pos, i in enumerate(batch):
            rcpt_reply = result.rcpt_replies[pos] if pos < len(result.rcpt_replies) else None
            if rcpt_reply is not None and rcpt_reply.code >= 400:
                if rcpt_reply.code == 452 and (failure is None or failure.stage != O.MAIL):
                    retry_here.append(i)
                    continue
                reply, stage = rcpt_reply, O.RCPT
            elif failure is not None:
                reply, stage = failure.reply, failure.stage
            elif result.final is not None:
                reply, stage = result.final, O.DOT
            else:
                reply, stage = Reply(451, "4.4.2", "no reply after the message"), O.DOT
            verdict = O.classify(reply, stage, last)
            if verdict.next_mx:
                next_hop.append(i)
                continue
            decided[i] = self._outcome(verdict.kind, reply, stage, result)
        return retry_here, next_hop, decided

    @staticmethod
    def _outcome(kind: type, reply: Reply, stage: str, result: Any) -> O.Outcome:
        if kind is O.Delivered:
            return O.Delivered(reply, result.host, result.address, result.tls,
                               getattr(result, "dsn", False))
        if kind is O.PermFailed:
            return O.PermFailed(reply, result.host, result.address, result.tls, stage)
        return O.TempFailed(reply, result.host, result.address, result.tls, stage)

