"""One attempt: deliver some recipients of one message to their destination.

`Deliverer.deliver()` routes the destination (relayhost or MX hosts), then walks the hops in
order through the connection pool.  Every reply is judged by `outcome.classify()` (with the
operator's bounce rules), and its verdict decides: recipients it sends to the next MX (the
hop could not be reached, or closed on us) go on to the next hop; a 452 at RCPT ("too many
recipients", RFC 5321 4.5.3.1.10) leaves those recipients for another transaction on the
same hop; the others get the outcome the verdict makes (`Verdict.outcome`).  Returns one
Outcome per recipient and, when the verdict of the last decision says the destination itself
failed and the mail waits, that reply (the dispatcher throttles the destination on it).
Remote behaviour never raises (DESIGN invariant 4).  With a `tls_policy`
(tlspolicy.TLSPolicy), the TLS of each hop is decided before connecting; a hop the policy
rules out for now (a failed TLSA lookup, an MX host an MTA-STS policy does not list) is
judged like a host that cannot be reached.

The source address and HELO name of each connection come from the `sources` selector
(outbound/ippool.py: the message's IP pool by lane, sender domain and API token, or
`[delivery] source_address` and `helo_name`), asked per hop with the MX host as the provider;
a recipient greylisted before (`pinned`) is retried from the address of that attempt.  A
reply that refuses our sending address (`Verdict.blocked`) takes the address out of rotation
for that MX host; while the pool has another address the recipients wait for a retry from
it (deferred, even after a 5xx, and without holding back the destination's other mail).

Not here: the queue, the spool, retry timing; this module never sees them.
"""
# test: tests/test_deliverer.py

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from txmta import outcome as O
from txmta.categories import Classifier
from txmta.message import Envelope
from txmta.outbound.ippool import Selectors, Source, SourceSelector
from txmta.outbound.pool import PoolKey
from txmta.outbound.route import Route, Unroutable
from txmta.outbound.shaping import Shaper
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
                 tls_level: str = "may", relay_tls: str = "may", tls_policy: Any = None,
                 rules: Classifier | None = None, sources: SourceSelector | None = None,
                 shaper: Shaper | None = None) -> None:
        self.router = router
        self.pool = pool
        self.shaper = shaper           # per-provider shaping (shaping.py), or None
        self.rules = rules             # the bounce categories ([[bounce.rules]]); None: defaults
        self.tls_policy = tls_policy   # None: the fixed levels below
        self.helo = helo
        self.source = source
        # where connections come from: the IP pools, or just `source` and `helo`
        self.sources = sources if sources is not None else SourceSelector(
            None, fallback=Source(source, helo))
        self.tls_level = tls_level     # towards MX hosts
        self.relay_tls = relay_tls     # towards the relayhost

    def destination(self, domain: str) -> str:
        return self.router.destination(domain)

    @inlineCallbacks
    def deliver(self, envelope: Envelope, indices: Sequence[int], body: bytes,
                lane: str = "", token: str = "", pinned: Mapping[int, str] | None = None) -> Any:
        """Fires with an AttemptResult for the recipients `indices` of `envelope` (all of one
        destination), sent over connections of `lane` (its share of the destination's
        connections: pool.py) from the source addresses of its IP pool (by `lane`, the
        sender's domain and the API `token` it came with; `pinned`: recipient -> the source
        address it was greylisted from); never errbacks for anything the network or a remote
        server does."""
        domain = envelope.recipients[indices[0]].address.domain
        try:
            route = yield self.router.route(domain)
        except Exception as e:  # our bug, not the remote's; keep the mail
            log.failure("routing {domain} failed", domain=domain)
            route = Unroutable(self.router.destination(domain),
                               Reply(451, "4.3.0", f"internal error routing {domain}: {e!r}"))
        if isinstance(route, Unroutable):
            verdict = O.classify(route.reply, O.ROUTE, rules=self.rules)
            outs = {i: verdict.outcome(route.reply, O.ROUTE) for i in indices}
            return AttemptResult(outs, route.destination, _throttle(verdict, route.reply))
        sender = envelope.sender
        selectors = Selectors(lane, "" if sender is None or sender.is_null
                              else sender.domain.lower(), token)
        groups: dict[str, list[int]] = {}       # by the address they must come from
        for i in indices:
            groups.setdefault((pinned or {}).get(i, ""), []).append(i)
        outcomes: dict[int, O.Outcome] = {}
        site: Reply | None = None
        for pin, group in groups.items():
            result = yield self._walk(route, envelope, group, body, lane, selectors, pin)
            outcomes.update(result.outcomes)
            site = result.site_failure or site
        return AttemptResult(outcomes, route.destination, site)

    @inlineCallbacks
    def _walk(self, route: Route, envelope: Envelope, pending: list[int], body: bytes,
              lane: str = "", selectors: Selectors = Selectors(), pinned: str = "") -> Any:
        outcomes: dict[int, O.Outcome] = {}
        hops = route.hops
        site: Reply | None = None           # the last decision's site failure, if any
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
                    log.info("{mx}[{address}] skipped: {reply}", mx=hop.mx, address=hop.address,
                             reply=tls)
                    verdict = O.classify(tls, O.CONNECT, last, self.rules)
                    if not verdict.next_mx:     # the last hop: judged as one not reached
                        for i in pending:
                            outcomes[i] = verdict.outcome(tls, O.CONNECT)
                        pending, site = [], _throttle(verdict, tls)
                    continue
            else:
                tls = self.relay_tls if route.destination.startswith("relay:") else self.tls_level
            # blocks are per provider: its [[shaping]] rule's name, else the MX host
            provider = (self.shaper.provider(hop.mx) if self.shaper is not None else "") \
                or hop.mx.lower()
            source = self.sources.pick(selectors, provider, pinned)
            key = PoolKey(route.destination, hop.mx, hop.address, hop.port, tls,
                          source.address, source.helo, lane)
            undecided: list[int] = []
            todo = pending
            per = MAX_RCPTS_PER_TRANSACTION
            if self.shaper is not None:
                per = self.shaper.recipients_per_message(hop.mx, per)
            while todo:
                batch, todo = todo[:per], todo[per:]
                rcpts = [envelope.recipients[i] for i in batch]
                result = yield self.pool.transaction(key, envelope, rcpts, body)
                retry_here, next_hop, decided, batch_site = self._decide(result, batch, last,
                                                                         source, provider)
                undecided.extend(next_hop)
                if retry_here and len(retry_here) < len(batch):
                    todo = list(retry_here) + todo    # 452: some went through, send the rest
                else:
                    decided.update(retry_here)        # 452 and no progress: try later
                if decided:                           # the latest decision tells the site's state
                    site = batch_site
                    outcomes.update(decided)
            pending = undecided
            if not pending:
                break
        if pending:   # a route without hops (the router never makes one): nobody to try
            reply = Reply(451, "4.4.0", f"no usable host for {route.destination}")
            verdict = O.classify(reply, O.CONNECT, True, self.rules)
            outcomes.update({i: verdict.outcome(reply, O.CONNECT) for i in pending})
            site = _throttle(verdict, reply)
        return AttemptResult(outcomes, route.destination, site)

    def _decide(self, result: Any, batch: Sequence[int], last: bool,
                source: Source = Source("", ""), provider: str = ""
                ) -> tuple[dict[int, O.Outcome], list[int], dict[int, O.Outcome], Reply | None]:
        """Split `batch` (sent from `source` to `provider`) into (retry on this hop after a
        452, with the outcome they get if not; try at the next hop; decided), with the reply
        of a site failure among the decided (for throttling)."""
        retry_here: dict[int, O.Outcome] = {}
        next_hop: list[int] = []
        decided: dict[int, O.Outcome] = {}
        site: Reply | None = None
        failure = result.failure
        slowed = False
        for pos, i in enumerate(batch):
            rcpt_reply = result.rcpt_replies[pos] if pos < len(result.rcpt_replies) else None
            if rcpt_reply is not None and not rcpt_reply.positive:
                reply, stage = rcpt_reply, O.RCPT
            elif failure is not None:
                reply, stage = failure.reply, failure.stage
            elif result.final is not None:
                reply, stage = result.final, O.DOT
            else:
                reply, stage = Reply(451, "4.4.2", "no reply after the message"), O.DOT
            verdict = O.classify(reply, stage, last, self.rules)
            if verdict.slow_down and self.shaper is not None and not slowed:
                shaped = self.shaper.provider(result.host or "")
                slowed = self.shaper.slow_down(
                    result.host or "", reply,
                    self.pool.provider_connections(shaped) if shaped else 0)
            if verdict.blocked and self.sources.block(source, provider, reply):
                # another address of the pool may get through: wait for it rather than
                # bounce, and leave the destination's other mail alone
                verdict = replace(verdict, kind=O.TempFailed, site_failure=False)
            if verdict.next_mx:
                next_hop.append(i)
                continue
            outcome = verdict.outcome(reply, stage, result.host, result.address, result.tls,
                                      getattr(result, "dsn", False), source.address)
            if verdict.next_transaction and (failure is None or failure.stage != O.MAIL):
                retry_here[i] = outcome
                continue
            decided[i] = outcome
            site = _throttle(verdict, reply) or site
        return retry_here, next_hop, decided, site


def _throttle(verdict: O.Verdict, reply: Reply) -> Reply | None:
    """`reply` when its verdict says the destination failed and the mail waits, else None."""
    return reply if verdict.site_failure and verdict.kind is O.TempFailed else None
