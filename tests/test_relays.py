"""outbound/relays.py: relayhosts tried in order behind their circuits, with the real
Deliverer and Router and a scripted pool (keyed by the relay's address), time on task.Clock.

The promises: a relay that fails as a relay sends the mail on to the next one in the same
attempt; enough faults open its circuit and later attempts skip it; after the cool-down one
trial goes back to it and a success closes the circuit; an answer about the recipient is
the recipient's (no failover, no fault); with every circuit open the mail waits (451 4.4.1,
the wait until the first trial) or goes by MX with fallback = "mx"."""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from txmta import outcome as O
from txmta.message import Address, Envelope, Recipient
from txmta.outbound.circuit import CLOSED, HALF_OPEN, OPEN, Circuit
from txmta.outbound.client import SessionFailure, TransactionResult
from txmta.outbound.deliverer import AttemptResult, Deliverer
from txmta.outbound.relays import Relay, RelayDeliverer, RelayTLS, relay_destination
from txmta.outbound.route import Router
from txmta.outbound.tlspolicy import HostTLS
from txmta.reply import Reply

OK = Reply(250, "2.0.0", "OK")
R1, R2 = "127.0.0.51", "127.0.0.52"
SPECS = {R1: f"{R1}:2525", R2: f"{R2}:2526"}


def envelope(n: int = 2) -> Envelope:
    return Envelope(Address("app", "example.com"),
                    tuple(Recipient(Address(f"u{i}", f"d{i}.example.net")) for i in range(n)))


class NoDNS:
    """The relays are IP literals: routing them asks no DNS."""

    def mx(self, domain: str) -> Any:
        raise AssertionError("no MX lookup expected")

    def addresses(self, host: str) -> Any:
        raise AssertionError("no address lookup expected")


def accept(rcpts: Any) -> TransactionResult:
    return TransactionResult(None, tuple(OK for _ in rcpts), Reply(250, "2.0.0", "queued"))


def refuse(rcpts: Any) -> TransactionResult:
    return TransactionResult(SessionFailure(O.CONNECT, Reply(451, "4.4.1", "connection refused")),
                             (), None)


def closing(rcpts: Any) -> TransactionResult:
    return TransactionResult(SessionFailure(O.MAIL, Reply(421, "4.3.2", "maintenance")), (), None)


def at_rcpt(reply: Reply) -> Callable[[Any], TransactionResult]:
    return lambda rcpts: TransactionResult(None, tuple(reply for _ in rcpts), None)


class ScriptedPool:
    """Answers each transaction by the script of the key's address; records the keys."""

    def __init__(self, **script: Callable[[Any], TransactionResult]) -> None:
        self.script = {R1: script.get("r1", accept), R2: script.get("r2", accept)}
        self.keys: list[Any] = []

    def transaction(self, key: Any, env: Envelope, rcpts: Any, body: Any) -> Any:
        self.keys.append(key)
        return succeed(self.script[key.address](rcpts))

    def addresses(self) -> list[str]:
        out, self.keys = [k.address for k in self.keys], []
        return out


class Recorder:
    """The metrics' relay calls."""

    def __init__(self) -> None:
        self.states: list[tuple[str, str]] = []
        self.failures: list[str] = []

    def relay_state(self, name: str, state: str) -> None:
        self.states.append((name, state))

    def relay_failure(self, name: str) -> None:
        self.failures.append(name)


class FallbackByMX:
    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def deliver(self, env: Envelope, indices: Any, body: Any, lane: str = "", token: str = "",
                pinned: Any = None) -> Any:
        self.calls.append(list(indices))
        return succeed(AttemptResult({i: O.Delivered(OK, "mx.d.example.net") for i in indices},
                                     "d.example.net", Reply(451, "4.4.1", "an MX down")))


def relays(pool: ScriptedPool, clock: Clock, *, failures: int = 2, cooldown: float = 10.0,
           fallback: Any = None, metrics: Any = None) -> RelayDeliverer:
    out = []
    for n, (ip, tls) in enumerate(((R1, "encrypt"), (R2, "may"))):
        router = Router(NoDNS(), relayhost=SPECS[ip])
        deliverer = Deliverer(router, pool, helo="me", relay_tls=tls, tls_policy=RelayTLS(tls))
        out.append(Relay(f"relay{n}", SPECS[ip], deliverer,
                         Circuit(clock, failures=failures, window=60.0, cooldown=cooldown,
                                 max_cooldown=100.0)))
    return RelayDeliverer(out, clock, fallback=fallback, metrics=metrics)


def run(deliverer: RelayDeliverer, n: int = 2) -> AttemptResult:
    results: list[Any] = []
    deliverer.deliver(envelope(n), list(range(n)), b"body\r\n").addBoth(results.append)
    assert len(results) == 1 and isinstance(results[0], AttemptResult), results
    return results[0]


def kinds(result: AttemptResult) -> list[type]:
    return [type(result.outcomes[i]) for i in sorted(result.outcomes)]


def test_healthy_first_relay_takes_everything_with_its_own_key() -> None:
    """Mail of every domain goes to the first relay; the pool key names that relay (its AUTH
    and limits) and carries its TLS level; one destination for the dispatcher."""
    pool = ScriptedPool()
    d = relays(pool, Clock())
    result = run(d)
    assert kinds(result) == [O.Delivered, O.Delivered] and result.site_failure is None
    [key] = pool.keys
    assert (key.destination, key.address, key.port) == (f"relay:{SPECS[R1]}", R1, 2525)
    assert key.tls == HostTLS("encrypt", R1)
    assert d.destination("d0.example.net") == d.destination("other.test") == \
        relay_destination([SPECS[R1], SPECS[R2]]) == f"relay:{SPECS[R1]},{SPECS[R2]}"


def test_a_refusing_relay_hands_the_mail_to_the_next_in_the_same_attempt() -> None:
    pool = ScriptedPool(r1=refuse)
    d = relays(pool, Clock())
    result = run(d)
    assert pool.addresses() == [R1, R2]
    assert kinds(result) == [O.Delivered, O.Delivered] and result.site_failure is None
    assert pool.keys == [] and d.relays[0].circuit.failures == 1


def test_faults_open_the_circuit_then_the_relay_is_skipped() -> None:
    """relay_failures faults open relay0's circuit: the next attempts go straight to relay1."""
    pool = ScriptedPool(r1=closing)
    metrics = Recorder()
    d = relays(pool, Clock(), metrics=metrics)
    run(d)
    run(d)
    assert pool.addresses() == [R1, R2, R1, R2]
    assert d.relays[0].circuit.state == OPEN
    for _ in range(3):
        assert kinds(run(d)) == [O.Delivered, O.Delivered]
    assert pool.addresses() == [R2, R2, R2]
    assert metrics.failures == ["relay0", "relay0"]
    assert ("relay0", OPEN) in metrics.states and ("relay1", CLOSED) in metrics.states


def test_after_the_cooldown_a_trial_goes_back_and_a_success_closes() -> None:
    clock = Clock()
    pool = ScriptedPool(r1=refuse)
    d = relays(pool, clock)
    run(d), run(d)
    pool.script[R1] = accept          # relay0 is back
    clock.advance(9)
    run(d)
    assert pool.addresses() == [R1, R2, R1, R2, R2]
    clock.advance(1)
    assert d.relays[0].circuit.state == HALF_OPEN
    run(d)
    assert pool.addresses() == [R1]
    assert d.relays[0].circuit.state == CLOSED
    run(d)
    assert pool.addresses() == [R1]


def test_a_failed_trial_reopens_for_longer() -> None:
    clock = Clock()
    pool = ScriptedPool(r1=refuse)
    d = relays(pool, clock)
    run(d), run(d)
    clock.advance(10)
    run(d)
    assert pool.addresses() == [R1, R2, R1, R2, R1, R2]
    assert d.relays[0].circuit.state == OPEN and d.relays[0].circuit.retry_in() == 20.0


def test_a_permanent_failure_about_the_recipient_is_not_the_relays() -> None:
    """550 5.1.1 at RCPT bounces as it would without failover: no next relay, no fault."""
    pool = ScriptedPool(r1=at_rcpt(Reply(550, "5.1.1", "no such user")))
    d = relays(pool, Clock(), failures=1)
    result = run(d)
    assert kinds(result) == [O.PermFailed, O.PermFailed]
    assert pool.addresses() == [R1] and d.relays[0].circuit.state == CLOSED


def test_a_burst_of_mail_system_4xx_at_rcpt_moves_on_and_counts() -> None:
    """451 4.3.0 for every recipient: the relay's trouble, not theirs."""
    pool = ScriptedPool(r1=at_rcpt(Reply(451, "4.3.0", "queue file write error")))
    d = relays(pool, Clock(), failures=1)
    result = run(d)
    assert pool.addresses() == [R1, R2] and kinds(result) == [O.Delivered, O.Delivered]
    assert d.relays[0].circuit.state == OPEN


def test_greylisting_at_a_relay_stays_with_that_relay() -> None:
    pool = ScriptedPool(r1=at_rcpt(Reply(451, "4.7.1", "Greylisted, please retry in 60 seconds")))
    d = relays(pool, Clock(), failures=1)
    result = run(d)
    assert pool.addresses() == [R1] and kinds(result) == [O.TempFailed, O.TempFailed]
    assert d.relays[0].circuit.state == CLOSED


def test_only_the_recipients_the_relay_failed_for_move_on() -> None:
    """One accepted, one refused with the relay's own trouble: the second goes to relay1,
    and the relay that took mail is not at fault."""
    pool = ScriptedPool(r1=lambda rcpts: TransactionResult(
        None, (OK, Reply(451, "4.3.0", "local error in processing")),
        Reply(250, "2.0.0", "queued")))
    d = relays(pool, Clock(), failures=1)
    result = run(d)
    assert [k.address for k in pool.keys] == [R1, R2]
    assert kinds(result) == [O.Delivered, O.Delivered]
    assert d.relays[0].circuit.state == CLOSED


def test_every_relay_failing_keeps_the_last_outcome_and_throttles() -> None:
    pool = ScriptedPool(r1=refuse, r2=closing)
    d = relays(pool, Clock())
    result = run(d)
    assert pool.addresses() == [R1, R2]
    assert kinds(result) == [O.TempFailed, O.TempFailed]
    assert result.outcomes[0].reply.code == 421 and result.site_failure is not None


def test_every_circuit_open_defers_until_the_first_trial() -> None:
    """No relay may be tried: 451 4.4.1 naming the wait (classify reads it as retry_after),
    a site failure, and no connection."""
    clock = Clock()
    pool = ScriptedPool(r1=refuse, r2=refuse)
    d = relays(pool, clock, failures=1, cooldown=30.0)
    run(d)
    pool.addresses()
    clock.advance(12.5)
    result = run(d)
    assert pool.keys == []
    assert kinds(result) == [O.TempFailed, O.TempFailed]
    out = result.outcomes[0]
    assert (out.reply.code, out.reply.enhanced) == (451, "4.4.1")
    assert "relay0, relay1" in out.reply.text and out.retry_after == 18.0
    assert result.site_failure == out.reply


def test_every_circuit_open_with_fallback_goes_by_mx() -> None:
    """fallback = "mx": the MX deliverer takes the mail, and an MX's trouble does not
    throttle the relay destination."""
    pool = ScriptedPool(r1=refuse, r2=refuse)
    fallback = FallbackByMX()
    d = relays(pool, Clock(), failures=1, fallback=fallback)
    run(d)
    assert fallback.calls == []
    result = run(d)
    assert fallback.calls == [[0, 1]] and kinds(result) == [O.Delivered, O.Delivered]
    assert result.site_failure is None and result.destination == d.name


def test_a_trial_under_way_is_not_doubled() -> None:
    """Half-open: while the trial runs, other attempts skip the relay."""
    clock = Clock()
    pool = ScriptedPool(r1=refuse)
    d = relays(pool, clock, failures=1)
    run(d)
    clock.advance(10)
    assert d.relays[0].circuit.allow()      # the trial, taken by an attempt still running
    run(d)
    assert pool.addresses() == [R1, R2, R2]


def test_status_snapshot_names_every_relay_in_order() -> None:
    clock = Clock()
    clock.advance(1000)
    d = relays(ScriptedPool(r1=refuse), clock, failures=1)
    run(d)
    assert d.snapshot() == [
        {"name": "relay0", "relay": SPECS[R1], "state": OPEN, "failures": 0,
         "open_until": 1010.0, "cooldown": 10.0, "opened": 1},
        {"name": "relay1", "relay": SPECS[R2], "state": CLOSED, "failures": 0,
         "open_until": None, "cooldown": 10.0, "opened": 0}]


def test_an_admins_retry_now_ends_every_cooldown() -> None:
    """A flush (events.RetryNow): the next attempt tries the open relays again, in order."""
    from txmta import events
    clock = Clock()
    pool = ScriptedPool(r1=refuse, r2=refuse)
    d = relays(pool, clock, failures=1, cooldown=300.0)
    run(d)
    pool.script[R1] = accept
    pool.addresses()
    run(d)
    assert pool.addresses() == []
    d.heard(events.RetryNow(None))
    assert kinds(run(d)) == [O.Delivered, O.Delivered]
    assert pool.addresses() == [R1]
    assert [r.circuit.state for r in d.relays] == [CLOSED, HALF_OPEN]
