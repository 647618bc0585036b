"""The deliverer walks the hops of a route and turns replies into one outcome per recipient."""

from twisted.internet.defer import succeed

from txmta import outcome as O
from txmta.message import Address, Envelope, Recipient
from txmta.outbound.client import SessionFailure, TransactionResult
from txmta.outbound.deliverer import Deliverer
from txmta.outbound.route import Hop, Route, Unroutable
from txmta.reply import Reply

OK = Reply(250, "2.0.0", "OK")
QUEUED_REMOTE = Reply(250, "2.0.0", "queued as X")
REFUSED = Reply(451, "4.4.1", "connection refused")


def envelope(n=2):
    return Envelope(Address("app", "example.com"),
                    tuple(Recipient(Address(f"u{i}", "example.net")) for i in range(n)))


class FakeRouter:
    def __init__(self, result):
        self.result = result

    def destination(self, domain):
        return domain

    def route(self, domain):
        return succeed(self.result)


class FakePool:
    """Answers transactions from a script keyed by the hop's address."""

    def __init__(self, script):
        self.script = script
        self.calls = []

    def transaction(self, key, env, rcpts, body):
        self.calls.append((key.address, [str(r.address) for r in rcpts]))
        answer = self.script[key.address]
        result = answer(rcpts) if callable(answer) else answer
        return succeed(result)


def ok_for(rcpts):
    return TransactionResult(None, tuple(OK for _ in rcpts), QUEUED_REMOTE, "mx", "addr", "")


def connect_failed(rcpts):
    return TransactionResult(SessionFailure(O.CONNECT, REFUSED), (), None, "mx", "addr", "")


ROUTE = Route("example.net", (Hop("mx1.example.net", "127.0.0.21", 25, 10),
                              Hop("mx2.example.net", "127.0.0.22", 25, 20)))


def run(deliverer, env, indices):
    results = []
    deliverer.deliver(env, indices, b"body\r\n").addBoth(results.append)
    assert len(results) == 1
    return results[0]


def test_first_mx_down_second_takes_the_mail():
    """A connect failure at the first MX sends the recipients on to the next (RFC 5321 5.1)."""
    pool = FakePool({"127.0.0.21": connect_failed, "127.0.0.22": ok_for})
    result = run(Deliverer(FakeRouter(ROUTE), pool, helo="me"), envelope(), [0, 1])
    assert [c[0] for c in pool.calls] == ["127.0.0.21", "127.0.0.22"]
    assert all(isinstance(o, O.Delivered) for o in result.outcomes.values())
    assert set(result.outcomes) == {0, 1} and result.site_failure is None


def test_every_host_down_defers_and_marks_a_site_failure():
    """When no hop can be reached, every recipient is deferred and the destination failed."""
    pool = FakePool({"127.0.0.21": connect_failed, "127.0.0.22": connect_failed})
    result = run(Deliverer(FakeRouter(ROUTE), pool, helo="me"), envelope(), [0, 1])
    assert all(isinstance(o, O.TempFailed) for o in result.outcomes.values())
    assert result.site_failure == REFUSED


def test_per_recipient_replies_decide_each_recipient():
    """550 at RCPT fails that recipient; the other is delivered by the same transaction."""
    def mixed(rcpts):
        return TransactionResult(None, (Reply(550, "5.1.1", "no such user"), OK), QUEUED_REMOTE,
                                 "mx1.example.net", "127.0.0.21", "TLSv1.3 X")
    pool = FakePool({"127.0.0.21": mixed})
    result = run(Deliverer(FakeRouter(ROUTE), pool, helo="me"), envelope(), [0, 1])
    assert isinstance(result.outcomes[0], O.PermFailed)
    assert result.outcomes[0].reply.enhanced == "5.1.1" and result.outcomes[0].stage == O.RCPT
    assert isinstance(result.outcomes[1], O.Delivered)
    assert result.outcomes[1].tls == "TLSv1.3 X"
    assert len(pool.calls) == 1


def test_452_too_many_recipients_leaves_the_rest_for_another_transaction():
    """Recipients refused with 452 go in a further transaction on the same host (RFC 5321 4.5.3.1.10)."""
    def two_at_a_time(rcpts):
        replies = tuple(OK if i < 2 else Reply(452, "4.5.3", "too many recipients")
                        for i in range(len(rcpts)))
        return TransactionResult(None, replies, QUEUED_REMOTE, "mx", "127.0.0.21", "")
    pool = FakePool({"127.0.0.21": two_at_a_time})
    result = run(Deliverer(FakeRouter(ROUTE), pool, helo="me"), envelope(5), [0, 1, 2, 3, 4])
    assert [len(c[1]) for c in pool.calls] == [5, 3, 1]
    assert all(isinstance(o, O.Delivered) for o in result.outcomes.values())
    assert len(result.outcomes) == 5


def test_data_rejected_permanently_bounces_every_accepted_recipient():
    """A 554 after the message content fails every recipient of the transaction."""
    def rejected(rcpts):
        return TransactionResult(None, tuple(OK for _ in rcpts), Reply(554, "5.7.1", "spam"),
                                 "mx", "127.0.0.21", "")
    pool = FakePool({"127.0.0.21": rejected})
    result = run(Deliverer(FakeRouter(ROUTE), pool, helo="me"), envelope(), [0, 1])
    assert all(isinstance(o, O.PermFailed) and o.stage == O.DOT for o in result.outcomes.values())


def test_lost_connection_during_data_defers_without_trying_the_next_mx():
    """A connection lost after the content was sent is a temporary failure for these recipients."""
    def lost(rcpts):
        return TransactionResult(SessionFailure(O.DOT, Reply(451, "4.4.2", "connection lost")),
                                 tuple(OK for _ in rcpts), None, "mx", "127.0.0.21", "")
    pool = FakePool({"127.0.0.21": lost, "127.0.0.22": ok_for})
    result = run(Deliverer(FakeRouter(ROUTE), pool, helo="me"), envelope(), [0, 1])
    assert all(isinstance(o, O.TempFailed) for o in result.outcomes.values())
    assert result.site_failure is None


def test_null_mx_fails_at_once_and_dns_trouble_defers():
    """An unroutable permanent reply bounces; a temporary one defers and throttles the site."""
    null = Unroutable("example.net", Reply(556, "5.1.10", "null MX"))
    result = run(Deliverer(FakeRouter(null), FakePool({}), helo="me"), envelope(), [0, 1])
    assert all(isinstance(o, O.PermFailed) for o in result.outcomes.values())
    assert result.site_failure is None
    servfail = Unroutable("example.net", Reply(451, "4.4.3", "SERVFAIL"))
    result = run(Deliverer(FakeRouter(servfail), FakePool({}), helo="me"), envelope(), [0, 1])
    assert all(isinstance(o, O.TempFailed) for o in result.outcomes.values())
    assert result.site_failure == servfail.reply


# -- "TLS-Required: No" (RFC 8689 5) -------------------------------------------------------

class RuledOut:
    """A TLS policy that rules out mx1 (as a DANE mismatch would) and wants mx2 verified."""

    def plan(self, route):
        from txmta.outbound.tlspolicy import HostTLS, TLSPlan
        return succeed(TLSPlan({"mx1.example.net": Reply(451, "4.7.5", "DANE: no match"),
                                "mx2.example.net": HostTLS("verify", "mx2.example.net")}, "test"))


class KeyedPool(FakePool):
    def transaction(self, key, env, rcpts, body):
        self.calls.append((key.address, str(key.tls)))
        return succeed(ok_for(rcpts))


def test_tls_required_no_relaxes_the_recipient_domains_policy():
    """With "TLS-Required: No" a host the policy rules out is tried with opportunistic TLS, and
    a checked level becomes "may"; without it the policy stands; REQUIRETLS wins over it."""
    from dataclasses import replace
    strict = KeyedPool({})
    run(Deliverer(FakeRouter(ROUTE), strict, helo="me", tls_policy=RuledOut()), envelope(), [0])
    assert strict.calls == [("127.0.0.22", "verify")]
    relaxed = KeyedPool({})
    result = run(Deliverer(FakeRouter(ROUTE), relaxed, helo="me", tls_policy=RuledOut()),
                 replace(envelope(), tls_optional=True), [0])
    assert relaxed.calls == [("127.0.0.21", "may")]
    assert isinstance(result.outcomes[0], O.Delivered)
    both = KeyedPool({})
    run(Deliverer(FakeRouter(ROUTE), both, helo="me", tls_policy=RuledOut()),
        replace(envelope(), tls_optional=True, requiretls=True), [0])
    assert both.calls == [("127.0.0.22", "verify")]


def test_tls_required_no_leaves_the_relayhost_alone():
    """The relayhost's TLS level is the operator's (it protects the AUTH password)."""
    from dataclasses import replace

    from txmta.outbound.tlspolicy import HostTLS, TLSPlan
    relay = Route("relay:[smarthost]:587", (Hop("smarthost", "127.0.0.30", 587, 0),))

    class Verify:
        def plan(self, route):
            return succeed(TLSPlan({"smarthost": HostTLS("verify", "smarthost")}, "relayhost"))
    pool = KeyedPool({})
    run(Deliverer(FakeRouter(relay), pool, helo="me", tls_policy=Verify()),
        replace(envelope(), tls_optional=True), [0])
    assert pool.calls == [("127.0.0.30", "verify")]


# -- the verdict decides: outcomes carry it, the site failure comes from it ------------------

GREY = Reply(451, "4.7.1", "Greylisted, please retry in 120 seconds")


def test_outcomes_carry_the_verdict_greylisting_wait_and_category():
    """A greylisting RCPT reply defers with greylisted, the wait it named and its category;
    a refused recipient bounces with its category (outcome.classify decides, not the queue)."""
    def answer(rcpts):
        return TransactionResult(None, (GREY, Reply(550, "5.1.1", "no such user")), None,
                                 "mx1.example.net", "127.0.0.21", "")
    pool = FakePool({"127.0.0.21": answer})
    result = run(Deliverer(FakeRouter(ROUTE), pool, helo="me"), envelope(), [0, 1])
    assert result.outcomes[0] == O.TempFailed(GREY, "mx1.example.net", "127.0.0.21", "", O.RCPT,
                                              greylisted=True, retry_after=120.0,
                                              category="greylisted")
    assert result.outcomes[1].category == "invalid-recipient"
    assert result.site_failure is None


def test_the_operators_bounce_rules_name_the_category():
    """The deliverer classifies with the [[bounce.rules]] it was given."""
    from txmta.categories import Classifier, Rule

    def answer(rcpts):
        return TransactionResult(None, (Reply(550, "5.1.1", "unknown here"),), None, "mx", "a", "")
    pool = FakePool({"127.0.0.21": answer})
    rules = Classifier(extra=[Rule("5.1.1", r"unknown here", "policy")])
    result = run(Deliverer(FakeRouter(ROUTE), pool, helo="me", rules=rules), envelope(1), [0])
    assert isinstance(result.outcomes[0], O.PermFailed) and result.outcomes[0].category == "policy"


def test_a_421_at_the_last_mx_is_a_site_failure_and_at_another_moves_on():
    """RFC 5321 3.8: a 421 closes the session: the recipients go to the next MX; at the last
    one they are deferred and the destination is reported failing (the dispatcher throttles)."""
    closing = Reply(421, "4.7.0", "Too many connections, try again in 10 minutes")

    def closed(rcpts):
        return TransactionResult(SessionFailure(O.MAIL, closing), (), None, "mx", "addr", "")
    pool = FakePool({"127.0.0.21": closed, "127.0.0.22": closed})
    result = run(Deliverer(FakeRouter(ROUTE), pool, helo="me"), envelope(), [0, 1])
    assert [c[0] for c in pool.calls] == ["127.0.0.21", "127.0.0.22"]
    assert all(isinstance(o, O.TempFailed) and o.retry_after == 600.0 and not o.greylisted
               for o in result.outcomes.values())
    assert result.site_failure == closing
    pool = FakePool({"127.0.0.21": closed, "127.0.0.22": ok_for})
    result = run(Deliverer(FakeRouter(ROUTE), pool, helo="me"), envelope(), [0, 1])
    assert all(isinstance(o, O.Delivered) for o in result.outcomes.values())
    assert result.site_failure is None


def test_a_deferral_of_the_recipients_at_the_last_mx_is_no_site_failure():
    """A 4xx at RCPT speaks of the recipient, not the destination, even after an earlier MX
    could not be reached."""
    def busy(rcpts):
        return TransactionResult(None, tuple(Reply(450, "4.2.1", "Mailbox busy") for _ in rcpts),
                                 None, "mx", "127.0.0.22", "")
    pool = FakePool({"127.0.0.21": connect_failed, "127.0.0.22": busy})
    result = run(Deliverer(FakeRouter(ROUTE), pool, helo="me"), envelope(), [0, 1])
    assert all(isinstance(o, O.TempFailed) and o.stage == O.RCPT
               for o in result.outcomes.values())
    assert result.site_failure is None


class AllRuledOut:
    """A TLS policy under which no MX host may be used for now (DANE without a usable TLSA record)."""

    REPLY = Reply(451, "4.7.5", "DANE: no usable TLSA record at _25._tcp.mx1.example.net")

    def plan(self, route):
        from txmta.outbound.tlspolicy import TLSPlan
        return succeed(TLSPlan({h.mx: self.REPLY for h in route.hops}, "test"))


def test_every_host_ruled_out_by_the_tls_policy_defers_as_a_site_failure():
    """Hosts the TLS policy rules out are judged like hosts that cannot be reached: nothing is
    sent, the recipients are deferred with the policy's reply, and the destination failed."""
    pool = FakePool({})
    result = run(Deliverer(FakeRouter(ROUTE), pool, helo="me", tls_policy=AllRuledOut()),
                 envelope(), [0, 1])
    assert pool.calls == []
    assert all(o == O.TempFailed(AllRuledOut.REPLY, stage=O.CONNECT, category="tls-failure")
               for o in result.outcomes.values())
    assert result.site_failure == AllRuledOut.REPLY


# -- source addresses: IP pools --------------------------------------------------------------

from twisted.internet.task import Clock  # noqa: E402

from txmta.outbound.ippool import IPPool, PoolAddress, Source, SourceSelector  # noqa: E402

POOL = IPPool("main", (PoolAddress("192.0.2.61", "mta61.example.com"),
                       PoolAddress("192.0.2.62", "mta62.example.com")), cooldown=600)
ONE_HOP = Route("example.net", (Hop("mx1.example.net", "127.0.0.21", 25, 10),))


class KeyPool(FakePool):
    """Records the whole pool key of every transaction."""

    def __init__(self, answer):
        super().__init__({"127.0.0.21": answer})
        self.keys = []

    def transaction(self, key, env, rcpts, body):
        self.keys.append(key)
        return super().transaction(key, env, rcpts, body)


def pooled(answer, clock=None, pools=(POOL,)):
    pool = KeyPool(answer)
    sources = SourceSelector(clock or Clock(), pools, fallback=Source("", "me"))
    return Deliverer(FakeRouter(ONE_HOP), pool, helo="me", sources=sources), pool, sources


def run_with(deliverer, env, indices, **kw):
    results = []
    deliverer.deliver(env, indices, b"body\r\n", **kw).addBoth(results.append)
    return results[0]


def test_without_pools_connections_come_from_the_delivery_source():
    pool = KeyPool(ok_for)
    run_with(Deliverer(FakeRouter(ONE_HOP), pool, helo="me", source="192.0.2.9"), envelope(), [0])
    assert (pool.keys[0].source, pool.keys[0].helo) == ("192.0.2.9", "me")


def test_attempts_take_the_pool_addresses_in_turn_with_their_helo_names():
    deliverer, pool, _ = pooled(ok_for)
    for _ in range(3):
        run_with(deliverer, envelope(), [0, 1])
    assert [(k.source, k.helo) for k in pool.keys] == [
        ("192.0.2.61", "mta61.example.com"), ("192.0.2.62", "mta62.example.com"),
        ("192.0.2.61", "mta61.example.com")]


def test_the_lane_and_token_choose_the_pool():
    api = IPPool("api", (PoolAddress("192.0.2.70", "api.example.com"),), tokens=("shop",))
    bulk = IPPool("bulk", (PoolAddress("192.0.2.80", "bulk.example.com"),), lanes=("bulk",))
    deliverer, pool, _ = pooled(ok_for, pools=(api, bulk))
    run_with(deliverer, envelope(), [0], lane="transactional", token="shop")
    run_with(deliverer, envelope(), [0], lane="bulk")
    run_with(deliverer, envelope(), [0], lane="transactional")
    assert [k.source for k in pool.keys] == ["192.0.2.70", "192.0.2.80", ""]


def test_a_greylisted_recipient_is_retried_from_its_first_address():
    """Recipients pinned to the address of their greylisted attempt go from it, the others
    from the pool's turn; the deferral of a greylisted attempt names its source."""
    grey = Reply(450, "4.2.0", "Greylisted for 300 seconds")
    deliverer, pool, _ = pooled(lambda rcpts: TransactionResult(
        None, tuple(grey for _ in rcpts), None, "mx1.example.net", "127.0.0.21", ""))
    first = run_with(deliverer, envelope(3), [0, 1, 2])
    assert {o.source for o in first.outcomes.values()} == {"192.0.2.61"}
    assert all(o.greylisted for o in first.outcomes.values())
    pool.keys.clear()
    pool.calls.clear()
    # the pool's turn is at .62 now; the pinned recipients still go from .61
    run_with(deliverer, envelope(3), [0, 1, 2], pinned={0: "192.0.2.61", 2: "192.0.2.61"})
    sent = sorted((k.source, tuple(c[1])) for k, c in zip(pool.keys, pool.calls))
    assert sent == [("192.0.2.61", ("u0@example.net", "u2@example.net")),
                    ("192.0.2.62", ("u1@example.net",))]


def test_a_blocked_address_leaves_rotation_and_its_mail_waits_for_another():
    """A 5xx naming a block list defers (not bounces) while the pool has another address, and
    the next attempts to that MX come from the other address; it comes back after the
    cool-down."""
    clock = Clock()

    def answer(rcpts):
        return TransactionResult(None, tuple(Reply(550, "5.7.1", "Client host blocked using "
                                                   "zen.spamhaus.org") for _ in rcpts),
                                 None, "mx1.example.net", "127.0.0.21", "")

    deliverer, pool, sources = pooled(answer, clock)
    result = run_with(deliverer, envelope(2), [0, 1])
    assert all(isinstance(o, O.TempFailed) for o in result.outcomes.values())
    assert result.site_failure is None
    assert sources.is_blocked("192.0.2.61", "mx1.example.net")
    pool.script["127.0.0.21"] = ok_for
    for _ in range(2):
        run_with(deliverer, envelope(), [0])
    assert [k.source for k in pool.keys] == ["192.0.2.61", "192.0.2.62", "192.0.2.62"]
    clock.advance(600)
    run_with(deliverer, envelope(), [0])
    run_with(deliverer, envelope(), [0])
    assert sorted(k.source for k in pool.keys[-2:]) == ["192.0.2.61", "192.0.2.62"]


def test_when_every_address_is_blocked_the_reply_means_what_it_says():
    """The last usable address blocked too: a 5xx bounces, as without pools."""
    blocked = Reply(554, "5.7.1", "Service unavailable; Client host blocked using bl.spamcop.net")

    def answer(rcpts):
        return TransactionResult(None, tuple(blocked for _ in rcpts), None, "mx", "127.0.0.21", "")

    deliverer, pool, _ = pooled(answer)
    first = run_with(deliverer, envelope(1), [0])
    second = run_with(deliverer, envelope(1), [0])
    assert isinstance(first.outcomes[0], O.TempFailed)
    assert isinstance(second.outcomes[0], O.PermFailed)
    assert [k.source for k in pool.keys] == ["192.0.2.61", "192.0.2.62"]
