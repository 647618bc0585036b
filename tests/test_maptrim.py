"""The spool's map leaves a worker's resident set (txmta/spool/maptrim.py): a real LMDB spool,
this process's own /proc/self/smaps, no mock."""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

from txmta.spool import maptrim

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def fill(open_lmdb: Any, wait: Any, make_message: Any, n: int = 300) -> tuple[Any, list[Any]]:
    spool = open_lmdb(inline_limit=64 * 1024)
    stored = []
    for _ in range(n):
        m = make_message()
        w = spool.body_writer(m.id)
        w.write(os.urandom(16 * 1024))  # 16 KiB inline: 5 MiB of pages in all
        wait(spool.put(m, w))
        stored.append(m)
    return spool, stored


def test_trim_drops_the_pages_read_and_they_read_back_the_same(open_lmdb, wait, make_message):
    spool, stored = fill(open_lmdb, wait, make_message)
    data = os.path.join(spool.path, "data.mdb")
    assert maptrim.mapped_ranges(data), "the data file is mapped"
    bodies = [wait(spool.read_body(m.id)) for m in stored]
    before = maptrim.resident_kib(data)
    assert before > 4096                 # the bodies' pages, read through the map
    assert spool.trim_map() is True
    assert maptrim.resident_kib(data) < before / 8
    assert [wait(spool.read_body(m.id)) for m in stored] == bodies
    assert [wait(spool.get(m.id)).envelope for m in stored] == [m.envelope for m in stored]
    assert maptrim.resident_kib(data) > 4096          # read again: back in, from the cache


def test_a_spool_keeps_working_across_trims_while_it_writes(open_lmdb, wait, make_message):
    """Trims between commits (as the writer thread does them) change nothing of the data."""
    spool, stored = fill(open_lmdb, wait, make_message, n=50)
    for m in stored[:25]:
        assert spool.trim_map()
        wait(spool.remove(m.id))
    assert wait(spool.count()) == 25
    assert all(wait(spool.get(m.id)) is None for m in stored[:25])
    assert all(wait(spool.get(m.id)) is not None for m in stored[25:])


def test_ranges_and_resident_of_an_unmapped_file_are_empty(tmp_path):
    path = tmp_path / "not-mapped"
    path.write_bytes(b"x")
    assert maptrim.mapped_ranges(str(path)) == []
    assert maptrim.resident_kib(str(path)) == 0
    assert maptrim.trim(str(path)) is True           # nothing to do is not a failure
