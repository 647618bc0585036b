"""Keep the spool's memory map out of a worker's resident set.

LMDB maps the whole data file; every page a process reads through the map stays in its page
tables, so after a while a worker of a spool with a million messages shows gigabytes of RSS
(`ps`, `top`, VmRSS) that are only the kernel's page cache of the file, shared and
reclaimable.  `trim(path)` drops this process's page-table entries of the file with
madvise(MADV_DONTNEED): for a shared file mapping (ours is read-only, `writemap=False`) the
pages stay in the page cache and the next read faults them back in, with the same contents
(a minor fault).  Nothing of the data changes.

Linux only; elsewhere, or if anything fails, it does nothing and says why once.
"""
# test: tests/test_maptrim.py

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from twisted.logger import Logger

log = Logger()

MADV_DONTNEED = 4           # Linux, every architecture

_madvise = None
_warned = False


def mapped_ranges(path: str, maps: str = "/proc/self/maps") -> list[tuple[int, int]]:
    """(address, length) of each mapping of the file at `path` in this process."""
    real = os.path.realpath(path)
    found = []
    with open(maps) as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].rstrip("\n") == real:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                found.append((start, end - start))
    return found


def resident_kib(path: str, smaps: str = "/proc/self/smaps") -> int:
    """KiB of this process's mappings of `path` that are resident (what trim releases)."""
    real = os.path.realpath(path)
    total, inside = 0, False
    with open(smaps) as f:
        for line in f:
            head = line.split(None, 1)[0] if line.strip() else ""
            if "-" in head and not head.endswith(":"):      # a mapping's first line
                inside = line.rstrip("\n").endswith(" " + real)
            elif inside and head == "Rss:":
                total += int(line.split()[1])
    return total


def trim(path: str) -> bool:
    """Drop this process's resident pages of the file at `path` (see the module's text);
    False if that cannot be done here."""
    global _madvise, _warned
    try:
        if not sys.platform.startswith("linux"):
            raise OSError("madvise(MADV_DONTNEED) is used on Linux only")
        if _madvise is None:
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            libc.madvise.restype = ctypes.c_int
            _madvise = libc.madvise
        for start, length in mapped_ranges(path):
            if _madvise(start, length, MADV_DONTNEED) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        return True
    except Exception as e:      # never into the writer thread, whose caller this is
        if not _warned:
            _warned = True
            log.info("spool map pages are left in the resident set: {e}", e=e)
        return False
