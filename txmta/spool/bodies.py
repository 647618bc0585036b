"""Message bodies on their way into the spool: `MemoryBody`, the spool's `BodyWriter`.

A body is kept in memory up to the spool's inline limit and spilled to a file under
`bodies/` past it; the writer thread fsyncs the file (`sync`) and then the directory
(`fsync_dir`) before the commit that references it (DESIGN "Spool").

A write that fails (a full disk: ENOSPC, EDQUOT) is not raised to the session streaming the
body: the writer keeps the error, removes its file, ignores the rest of the data, and the
spool's put() then fails with it (SpoolFull: the client gets 452 4.3.1 after its final dot).
"""
# test: tests/test_spool_contract.py, tests/test_spool_lmdb.py

from __future__ import annotations

import os
from typing import Any, Iterator


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MemoryBody:
    """Body kept in memory until it passes `limit`, then spilled to `path` (not yet synced)."""

    def __init__(self, path: str, limit: int) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit
        self.path = path
        self.file: Any = None
        self.error: OSError | None = None  # the write that failed; put() refuses the body

    @property
    def size(self) -> int:
        return self._size

    @property
    def in_file(self) -> bool:
        return self.file is not None

    def write(self, data: bytes) -> None:
        if not data or self.error is not None:
            return
        self._size += len(data)
        try:
            if self.file is not None:
                self.file.write(data)
                return
            self._chunks.append(data)
            if self._size > self._limit:
                # "x": never truncate (and later abort-unlink) the body file of a stored message
                self.file = open(self.path, "xb")
                for chunk in self._chunks:
                    self.file.write(chunk)
                self._chunks = []
        except OSError as e:
            self.error = e
            self.abort()

    def value(self) -> bytes:
        return b"".join(self._chunks)

    def read_chunks(self, offset: int = 0, piece: int = 64 * 1024) -> Iterator[bytes]:
        """The body from `offset` on: the chunks in memory, or the file in `piece`-sized reads
        (so a big body is never whole in memory).  Off the reactor, after the last write."""
        if self.file is None:
            for chunk in self._chunks:
                if offset >= len(chunk):
                    offset -= len(chunk)
                    continue
                yield chunk[offset:] if offset else chunk
                offset = 0
            return
        self.file.flush()
        with open(self.path, "rb") as f:
            f.seek(offset)
            while data := f.read(piece):
                yield data

    def prepend(self, data: bytes) -> None:
        """Put `data` (a DKIM-Signature header field) in front of the body.  In memory: one
        more chunk.  In a file: a new file (data, then the old content copied in 1 MiB
        pieces) renamed over the old one; sync() at put() makes it and the directory
        durable, and a crash before that leaves files the start-up cleanup removes.  Off the
        reactor, after the last write; on error the body is unchanged."""
        if self.file is None:
            self._chunks.insert(0, data)
            self._size += len(data)
            return
        self.file.flush()
        tmp = self.path + ".signed"
        new = open(tmp, "xb")
        try:
            new.write(data)
            with open(self.path, "rb") as old:
                while piece := old.read(1 << 20):
                    new.write(piece)
            new.flush()
            os.replace(tmp, self.path)
        except BaseException:
            new.close()
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        self.file.close()
        self.file = new
        self._size += len(data)

    def sync(self) -> None:
        """Flush and fsync the body file (writer thread)."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def abort(self) -> None:
        self._chunks = []
        file, self.file = self.file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass    # the buffered rest could not be written (a full disk): it goes anyway
            finally:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
