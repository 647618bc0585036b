"""Lanes: classes of mail with their own share of delivery capacity, deadline and retries.

Pure: no I/O.  A `Lane` is one `[[lane]]` table of the configuration; `Lanes` is all of
them, ordered by priority (highest first), with the choice of a message's lane.  Two lanes
exist unless the operator configures others: `transactional` (the default lane: priority
10) and `bulk` (priority 0).  A message's lane is chosen once, at intake, and stored with it
(`StoredMessage.lane`); what it selects by, first match wins:

1. the API token's `lane=` (tokens.py): the one lane its mail may use;
2. the `X-Txmta-Lane` header field, only from a trusted client (authenticated, or in
   `relay.networks`) and only naming a configured lane (the field is removed either way);
3. the API's `MessageStream`, when a lane lists it in `streams` (or is named like it);
4. the authenticated SMTP user, when a lane lists it in `users`;
5. the listener's `lane` (`[[listen]] lane`);
6. the default lane.

Each lane's `share` of a destination's connections is reserved for it (pool.py) and its
`priority` orders the due index (the dispatcher starts fresh mail of higher lanes first).  A
lane's `deadline` (seconds; None: only `[retry] max_lifetime`) caps how long its mail is
tried, its `retry` schedule (None: `[retry] schedule`) paces the retries, and its `dsn`
policy says which delivery status notifications its senders get: `all` (failures and delay
warnings), `failures` (no delay warnings) or `none` (events only: for applications that
read webhooks instead of bounces).
"""
# test: tests/test_lanes.py

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

DSN_POLICIES = ("all", "failures", "none")
MAX_PRIORITY = 99


def level(priority: int) -> int:
    """A priority's place in the due index: 0 for the highest priority (99)."""
    return MAX_PRIORITY - min(max(priority, 0), MAX_PRIORITY)


def due_class(priority: int, attempts: int) -> int:
    """The due index's class byte of a recipient (spool/view.py due_key): by its message's
    priority (highest first), then fresh mail before retries within one priority."""
    return level(priority) * 2 + (1 if attempts > 0 else 0)


def level_classes(lvl: int) -> tuple[int, int]:
    """The due classes of one priority level: its fresh mail, then its retries."""
    return (lvl * 2, lvl * 2 + 1)


def due_groups(lanes: "Lanes") -> tuple[frozenset[int], ...]:
    """The due classes the dispatcher reads together, each with its own in-flight budget:
    one group per priority level of the configured lanes, highest first, then every other
    class (mail whose priority no lane has any more) as the last group."""
    levels = sorted({level(lane.priority) for lane in lanes})
    groups = [frozenset(level_classes(lvl)) for lvl in levels]
    taken = frozenset().union(*groups)
    return tuple(groups) + (frozenset(range(256)) - taken,)
LANE_HEADER = "X-Txmta-Lane"


@dataclass(frozen=True)
class Lane:
    name: str
    priority: int = 0
    share: float = 0.0                          # of each destination's connections, reserved
    deadline: float | None = None               # seconds after arrival; None: max_lifetime only
    dsn: str = "all"                            # all | failures | none
    retry: tuple[float, ...] | None = None      # None: [retry] schedule
    streams: tuple[str, ...] = ()               # API MessageStream values that select it
    users: tuple[str, ...] = ()                 # authenticated SMTP users that select it


# Postmark's default streams are "outbound" (transactional) and "broadcast"
DEFAULT_LANES = (Lane("transactional", priority=10, share=0.5, streams=("outbound",)),
                 Lane("bulk", priority=0, share=0.2, streams=("broadcast", "broadcasts")))


class Lanes:
    """The configured lanes, highest priority first; the first of the configuration is the
    default lane (mail that selects none goes there)."""

    def __init__(self, lanes: Iterable[Lane] = DEFAULT_LANES, default: str | None = None) -> None:
        configured = tuple(lanes)
        if not configured:
            raise ValueError("at least one lane is needed")
        self.default = default if default is not None else configured[0].name
        # stable: lanes of equal priority keep the order of the configuration
        self.ordered = tuple(sorted(configured, key=lambda lane: -lane.priority))
        self._by_name = {lane.name: lane for lane in configured}
        if self.default not in self._by_name:
            raise ValueError(f"default lane {self.default!r} is not configured")
        self._rank = {lane.name: n for n, lane in enumerate(self.ordered)}
        self._by_stream: dict[str, str] = {}
        self._by_user: dict[str, str] = {}
        for lane in configured:
            for stream in lane.streams:
                self._by_stream.setdefault(stream.lower(), lane.name)
            for user in lane.users:
                self._by_user.setdefault(user, lane.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Lanes) and (self.ordered, self.default) == (other.ordered,
                                                                              other.default)

    def __hash__(self) -> int:
        return hash((self.ordered, self.default))

    def __repr__(self) -> str:
        return f"Lanes({list(self.ordered)!r}, default={self.default!r})"

    def __iter__(self) -> Iterator[Lane]:
        return iter(self.ordered)

    def __len__(self) -> int:
        return len(self.ordered)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def get(self, name: str) -> Lane:
        """The lane called `name`; the default lane for "" or a lane no longer configured."""
        return self._by_name.get(name) or self._by_name[self.default]

    def name_of(self, name: str) -> str:
        """`name` if it is configured, else the default lane's name (mail stored under a lane
        that a later configuration dropped goes on in the default lane)."""
        return name if name in self._by_name else self.default

    def rank(self, name: str) -> int:
        """0 for the highest priority; a lane no longer configured ranks as the default."""
        return self._rank.get(name, self._rank[self.default])

    def select(self, *, header: str = "", trusted: bool = False, token_lane: str = "",
               stream: str = "", user: str = "", listener_lane: str = "") -> str:
        """The lane of a new message (the order in the module docstring)."""
        if token_lane and token_lane in self._by_name:
            return token_lane
        if header and trusted and header.strip() in self._by_name:
            return header.strip()
        if stream:
            chosen = self._by_stream.get(stream.lower())
            if chosen is None and stream in self._by_name:
                chosen = stream
            if chosen is not None:
                return chosen
        if user and user in self._by_user:
            return self._by_user[user]
        if listener_lane and listener_lane in self._by_name:
            return listener_lane
        return self.default
