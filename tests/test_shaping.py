"""Per-provider shaping (txmta/outbound/shaping.py): rules, the backoff state machine, the
rate, and the pool's provider limits (Clock, scripted connector)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from txmta import config
from txmta import outcome as O
from txmta.outbound.pool import ConnectionPool
from txmta.outbound.shaping import MIN_FACTOR, Backoff, Rule, Shaper, parse_rate
from txmta.reply import Reply

from test_pool import A, Connector, start

GOOGLE = Rule("google", (".google.com", ".googlemail.com"), connections=4, rate=2.0,
              messages_per_connection=3, recipients_per_message=10, cooldown=10.0,
              max_cooldown=80.0)
WORKSPACE = Rule("workspace", (".aspmx.l.google.com",), connections=1)
SLOW = Reply(421, "4.7.28", "Our system has detected an unusual rate of unsolicited mail; "
             "rate limited")


# -- rules ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mx, name", [
    ("gmail-smtp-in.l.google.com", "google"),
    ("GMAIL-SMTP-IN.L.GOOGLE.COM.", "google"),
    ("alt1.aspmx.l.google.com", "workspace"),          # the longest suffix wins
    ("google.com", "google"),
    ("notgoogle.com", ""),                              # a suffix is a whole label
    ("mx.example.net", ""),
])
def test_a_provider_is_named_by_its_mx_suffixes(mx, name):
    assert Shaper([GOOGLE, WORKSPACE], lambda: 0.0).provider(mx) == name


@pytest.mark.parametrize("text, per_second", [
    ("100/m", 100 / 60), ("3600/h", 1.0), ("10/s", 10.0), ("120/min", 2.0), ("", 0.0),
    ("86400/day", 1.0), (" 5/S ", 5.0)])
def test_rates(text, per_second):
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("bad", ["100", "x/m", "10/week", "-1/m"])
def test_bad_rates_say_so(bad):
    with pytest.raises(ValueError, match="not a rate"):
        parse_rate(bad)


def test_the_sample_file_loads_and_the_configuration_wins(tmp_path: Path):
    sample = Path(__file__).parent.parent / "etc" / "shaping.toml"
    c = config.load_text(f'[delivery]\nshaping = "{sample}"\n'
                         '[[shaping]]\nname = "google"\nmx = ["mx.example"]\n')
    names = [r.name for r in c.shaping]
    assert names[0] == "google" and {"yahoo", "outlook", "apple"} <= set(names)
    assert c.shaping[0].mx == (".mx.example",) and names.count("google") == 1
    bad = tmp_path / "bad.toml"
    bad.write_text('[[shaping]]\nname = "x"\nmx = [".x"]\nconnections = -1\n')
    with pytest.raises(config.ConfigError, match=f"{bad}: shaping\\[0\\].connections"):
        config.load_text(f'[delivery]\nshaping = "{bad}"\n')


# -- backoff --------------------------------------------------------------------------------

def test_backoff_halves_suspends_grows_while_repeated_and_recovers_step_by_step():
    b = Backoff(cooldown=10.0, max_cooldown=40.0)
    b.slow_down(100.0)
    assert (b.factor, b.suspended_until) == (0.5, 110.0) and b.suspended(109.9)
    b.slow_down(105.0)                       # the same burst, during the suspension: nothing
    assert (b.factor, b.slowdowns) == (0.5, 1)
    b.slow_down(112.0)                       # again soon after: twice the cool-down
    assert (b.factor, b.current, b.suspended_until) == (0.25, 20.0, 132.0)
    b.slow_down(140.0)
    b.slow_down(190.0)
    assert b.current == 40.0                 # capped at max_cooldown
    assert b.at(190.0) == 1 / 16
    # quiet from 190: the suspension ends at 230, then one step per quiet cool-down
    assert b.at(269.9) == 1 / 16
    assert b.at(270.0) == 1 / 8
    assert b.at(310.0) == 1 / 4
    assert b.at(390.0) == 1.0 and b.current == 0.0
    b.slow_down(1000.0)                      # a fresh episode starts from the base cool-down
    assert (b.factor, b.current) == (0.5, 10.0)


def test_backoff_never_goes_below_the_minimum():
    b = Backoff(cooldown=1.0, max_cooldown=1.0)
    for t in range(0, 40, 2):
        b.slow_down(float(t))
    assert b.factor == MIN_FACTOR


def test_rate_is_scaled_by_the_backoff_and_connections_too():
    clock = Clock()
    shaper = Shaper([GOOGLE], clock.seconds)
    waits = []
    for _ in range(3):
        shaper.rate_wait("mx.google.com").addCallback(waits.append)
    assert waits == [0.0, 0.5, 1.0]                      # 2/s
    assert shaper.connection_limit("google", 0) == 4
    assert shaper.slow_down("mx.google.com", SLOW, open_now=4)
    assert shaper.connection_limit("google", 4) == 2
    clock.advance(5)       # still in the cool-down (10 s): half the rate
    waits.clear()
    shaper.rate_wait("mx.google.com").addCallback(waits.append)
    shaper.rate_wait("mx.google.com").addCallback(waits.append)
    assert waits == [0.0, 1.0]                           # 1/s while halved
    assert shaper.rate_wait("mx.example.net").result == 0.0   # no rule: no rate
    assert not shaper.slow_down("mx.example.net", SLOW)


def test_a_provider_without_a_connection_limit_is_held_to_what_it_had():
    clock = Clock()
    shaper = Shaper([Rule("yahoo", (".yahoodns.net",))], clock.seconds)
    assert shaper.connection_limit("yahoo", 12) == 0
    shaper.slow_down("mta5.am0.yahoodns.net", SLOW, open_now=12)
    assert shaper.connection_limit("yahoo", 3) == 6


def test_slow_down_verdicts():
    """outcome.classify says which replies ask to slow down."""
    cases = [
        (Reply(421, "4.7.28", "rate limited"), True),
        (Reply(421, "4.7.0", "[TSS04] Messages from 192.0.2.1 temporarily deferred"), True),
        (Reply(451, "4.7.500", "Server busy. Please try again later"), True),
        (Reply(450, "4.2.1", "receiving mail at a rate that prevents additional messages"),
         True),
        (Reply(421, "4.3.2", "Too many connections from your host"), True),
        (Reply(451, "4.3.0", "try again later"), False),
        (Reply(450, "4.2.0", "Greylisted, see http://postgrey.schweikert.ch/"), False),
        (Reply(550, "5.7.28", "rate limited"), False),      # permanent: not a backoff
    ]
    for reply, slow in cases:
        assert O.classify(reply, O.RCPT).slow_down is slow, reply


# -- the pool -------------------------------------------------------------------------------

G1 = replace(A, destination="gmail.com", mx="gmail-smtp-in.l.google.com")
G2 = replace(A, destination="example-on-workspace.org", mx="alt1.gmail-smtp-in.l.google.com")


def pool_with(shaper: Shaper, clock: Clock) -> tuple[ConnectionPool, Connector]:
    connector = Connector()
    return ConnectionPool(clock, connector, per_destination=20, initial_per_destination=20,
                          shaper=shaper), connector


def test_domains_of_one_provider_share_its_connection_limit():
    clock = Clock()
    rule = replace(GOOGLE, rate=0.0)
    pool, connector = pool_with(Shaper([rule], clock.seconds), clock)
    for i in range(3):
        start(pool, G1, f"a{i}")
        start(pool, G2, f"b{i}")
    assert len(connector.pending) == 4 and pool.provider_connections("google") == 4
    start(pool, A, "other")                    # another provider: not counted
    assert len(connector.pending) == 5


def test_a_slow_down_suspends_new_connections_until_the_cool_down_ends():
    clock = Clock()
    shaper = Shaper([replace(GOOGLE, rate=0.0)], clock.seconds)
    pool, connector = pool_with(shaper, clock)
    start(pool, G1, "m0")
    c = connector.open()
    shaper.slow_down(G1.mx, SLOW, open_now=1)
    c.finish()                                  # reused: an open connection may go on
    waiting = start(pool, G2, "m1")             # another key: a new connection, suspended
    assert connector.pending == [] and waiting == []
    clock.advance(10.01)                        # the cool-down ends: the line moves
    assert [k.destination for k, _ in connector.pending] == ["example-on-workspace.org"]


def test_messages_per_connection_and_the_rate_wait_before_a_connection():
    clock = Clock()
    shaper = Shaper([GOOGLE], clock.seconds)
    pool, connector = pool_with(shaper, clock)
    outs = [start(pool, G1, f"m{i}") for i in range(3)]
    assert len(connector.pending) == 1          # 2/s: the others wait their turn
    c = connector.open()
    c.finish()
    clock.advance(0.5)
    c.finish()
    clock.advance(0.5)
    c.finish()
    assert all(o and o[0].final is not None for o in outs)
    assert c.sent == ["m0", "m1", "m2"] and c.quits == 1     # 3 messages, then closed


# -- [cluster]: a provider's connections as leases shared by every node ---------------------

class Leases:
    """`ConnectionLeases` shared by the pools of two "nodes" (LocalConnectionLeases' counting),
    recording what was asked; `hold` keeps the answers pending to test a slow Redis."""

    def __init__(self) -> None:
        from txmta.limits import LocalConnectionLeases
        self.shared = LocalConnectionLeases()
        self.asked: list[tuple[str, int]] = []
        self.released: list[str] = []

    def acquire(self, key: str, limit: int):
        self.asked.append((key, limit))
        return self.shared.acquire(key, limit)

    def release(self, key: str) -> None:
        self.released.append(key)
        self.shared.release(key)


def leased_pool(leases: Leases, clock: Clock, rule: Rule = replace(GOOGLE, rate=0.0)
                ) -> tuple[ConnectionPool, Connector]:
    connector = Connector()
    return ConnectionPool(clock, connector, per_destination=20, initial_per_destination=20,
                          shaper=Shaper([rule], clock.seconds), leases=leases,
                          lease_retry=1.0), connector


def test_two_nodes_together_open_at_most_the_rules_connections():
    clock, leases = Clock(), Leases()
    (a, ca), (b, cb) = leased_pool(leases, clock), leased_pool(leases, clock)
    outs = [start(a, G1, f"a{i}") for i in range(3)] + [start(b, G2, f"b{i}") for i in range(3)]
    # each node's own count allows 4, but the rule's 4 are for both nodes together
    assert len(ca.pending) + len(cb.pending) == 4
    assert leases.shared.held == {"google": 4}
    assert all(limit == 4 for _, limit in leases.asked)
    opened = [ca.open() for _ in range(len(ca.pending))] + [cb.open() for _ in range(len(cb.pending))]
    assert len(opened) == 4
    for c in opened:            # each sends one message and goes idle; then QUIT on timeout
        c.finish()
    for _ in range(3):          # the refused ones ask again each second: the idle
        clock.advance(1.0)      # connections are reused, and no fifth one is opened
        for c in opened:
            while c.pending:
                c.finish()
        assert ca.pending == [] and cb.pending == []
    assert all(o and o[0].final is not None for o in outs)
    assert len(ca.clients) + len(cb.clients) == 4
    clock.advance(60)           # idle timeout: every connection closed, every lease returned
    assert leases.shared.held == {} and sorted(leases.released) == ["google"] * 4


def test_a_refused_lease_frees_the_slot_and_is_asked_again():
    clock, leases = Clock(), Leases()
    leases.shared.held["google"] = 4                 # another node holds all four
    pool, connector = leased_pool(leases, clock)
    out = start(pool, G1, "m")
    assert connector.pending == [] and out == []
    assert pool.provider_connections("google") == 0 and pool.active("gmail.com") == 0
    clock.advance(1.0)
    assert connector.pending == [] and len(leases.asked) == 2
    leases.shared.release("google")                  # the other node closes one
    clock.advance(1.0)
    assert len(connector.pending) == 1
    c = connector.open()
    c.finish()
    assert out and out[0].final is not None and c.sent == ["m"]


def test_a_failed_connection_returns_its_lease():
    clock, leases = Clock(), Leases()
    pool, connector = leased_pool(leases, clock)
    out = start(pool, G1, "m")
    connector.fail(ConnectionRefusedError("refused"))
    assert out and out[0].failure is not None
    assert leases.shared.held == {} and leases.released == ["google"]


def test_no_lease_for_a_rule_without_a_connection_limit_or_another_provider():
    clock, leases = Clock(), Leases()
    pool, connector = leased_pool(leases, clock, rule=replace(GOOGLE, rate=0.0, connections=0))
    start(pool, G1, "m")
    start(pool, A, "other")
    assert len(connector.pending) == 2 and leases.asked == []


def test_closing_while_waiting_for_a_lease_ends_the_transaction():
    clock, leases = Clock(), Leases()
    leases.shared.held["google"] = 4
    pool, connector = leased_pool(leases, clock)
    out = start(pool, G1, "m")
    closed = []
    pool.close().addCallback(closed.append)
    clock.advance(1.0)
    assert out and out[0].failure is not None and out[0].failure.reply.code == 451
    assert closed == [None] and connector.pending == []
    assert leases.shared.held == {"google": 4}       # nothing taken, nothing given back
