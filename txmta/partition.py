"""Partitions: the shares of the spool that workers own (DESIGN "Processes").

A message id names its partition (one character of the id, see `message.format_message_id`);
a fixed number of partitions is mapped onto the N workers, so a restart with another number
of workers reassigns partitions without rewriting a message.  Worker k of N owns every
partition p with p % N == k: it takes new ids from its partitions and delivers their mail.

Pure: no I/O.
"""
# test: tests/test_partition.py

from __future__ import annotations

PARTITIONS = 32         # fixed: every id ever written maps onto one of these
PARTITION_CHAR = 11     # the id's character that names its partition (after 11 time digits)
ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXZbcdfghjkmnpqrstvwxz"  # the ids' alphabet: no vowels
ALL = frozenset(range(PARTITIONS))


def partition_of(message_id: str) -> int:
    """The partition of a message id; any id (an older format's too) maps onto one."""
    if len(message_id) > PARTITION_CHAR:
        index = ALPHABET.find(message_id[PARTITION_CHAR])
        if index >= 0:
            return index % PARTITIONS
    return sum(message_id.encode("utf-8", "replace")) % PARTITIONS


def owner(partition: int, workers: int) -> int:
    """The worker (0 .. workers-1) that owns `partition`."""
    return partition % workers


def owned(worker: int, workers: int) -> frozenset[int]:
    """The partitions worker `worker` of `workers` owns."""
    if not 0 <= worker < workers:
        raise ValueError(f"worker {worker} is not one of 0..{workers - 1}")
    return frozenset(p for p in range(PARTITIONS) if p % workers == worker)


def owner_of(message_id: str, workers: int) -> int:
    """The worker that delivers the message `message_id` when `workers` workers run."""
    return owner(partition_of(message_id), workers)
