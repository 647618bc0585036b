"""The suppression list in memory: addresses whose mail is refused (or dropped) at intake.

The spool holds the list (LMDB, committed with the bounce that added an address); this is
its mirror in the daemon, loaded at start and updated after each commit, so the check at
RCPT costs a dict lookup and never touches the disk (DESIGN invariant 5).  Entries past
their expiry are ignored.  Pure apart from holding state; the caller passes the time.
"""
# test: tests/test_suppression.py

from __future__ import annotations

import re
import time
from typing import Iterable

from txmta.reply import Reply, cut
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


_CONTROLS = re.compile(r"[\x00-\x1f\x7f]+")
_REPLY_TEXT = 512 - len("550-5.1.1 \r\n")     # RFC 5321 4.5.3.1.5: 512 octets a line


def rejection(address: str, entry: Suppression) -> Reply:
    """550 5.1.1 saying the address is suppressed, since when and why: one reply line of
    at most 512 octets, whatever the address and the stored reply (a next hop's text, which
    may hold CR, LF or other controls) were."""
    since = time.strftime("%Y-%m-%d", time.gmtime(entry.since))
    why = _CONTROLS.sub(" ", entry.reason + (f": {entry.reply}" if entry.reply else ""))
    shown = cut(_CONTROLS.sub(" ", address), 200)
    text = f"<{shown}>: recipient address suppressed since {since} after a hard bounce ("
    room = _REPLY_TEXT - len(text.encode("utf-8")) - 1
    return Reply(550, "5.1.1", text + cut(why[:200], room) + ")")
