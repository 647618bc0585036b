"""The suppression list in memory: addresses whose mail is refused (or dropped) at intake.

The spool holds the list (LMDB, committed with the bounce that added an address); this is
its mirror in the daemon, loaded at start and updated after each commit, so the check at
RCPT costs a dict lookup and never touches the disk (DESIGN invariant 5).  Entries past
their expiry are ignored.  Pure apart from holding state; the caller passes the time.
"""
# test: tests/test_suppression.py

from __future__ import annotations

import time
from typing import Iterable

from txmta.reply import Reply
from txmta.message import Suppression


def key(address: str) -> str:
    return address.strip().lower()


class SuppressionList:
    def __init__(self, entries: Iterable[Suppression] = ()) -> None:
        self._entries: dict[str, Suppression] = {}
        self.load(entries)

    def load(self, entries: Iterable[Suppression]) -> None:
        for e in entries:
            self._entries[key(e.address)] = e

    def add(self, entry: Suppression) -> None:
        self._entries[key(entry.address)] = entry

    def remove(self, address: str) -> bool:
        return self._entries.pop(key(address), None) is not None

    def check(self, address: str, now: float) -> Suppression | None:
        entry = self._entries.get(key(address))
        if entry is None or entry.expires <= now:
            return None
        return entry

    def entries(self) -> list[Suppression]:
        """Every entry, expired or not."""
        return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


def rejection(address: str, entry: Suppression) -> Reply:
    """550 5.1.1 saying the address is suppressed, since when and why."""
    since = time.strftime("%Y-%m-%d", time.gmtime(entry.since))
    why = entry.reason + (f": {entry.reply}" if entry.reply else "")
    return Reply(550, "5.1.1", f"<{address}>: recipient address suppressed since {since} "
                               f"after a hard bounce ({why[:200]})")
