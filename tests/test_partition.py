"""Partitions: every id maps onto one, every partition has exactly one owner."""

from hypothesis import given
from hypothesis import strategies as st

from txmta import partition as P


@given(st.integers(min_value=1, max_value=P.PARTITIONS))
def test_every_partition_has_exactly_one_owner(workers: int) -> None:
    """The workers' shares are disjoint and cover all partitions."""
    shares = [P.owned(k, workers) for k in range(workers)]
    assert sum(len(s) for s in shares) == P.PARTITIONS
    assert frozenset().union(*shares) == P.ALL
    for k, share in enumerate(shares):
        assert share, f"worker {k} of {workers} owns no partition"
        assert all(P.owner(p, workers) == k for p in share)


@given(st.text(min_size=0, max_size=40))
def test_any_id_maps_onto_a_partition(message_id: str) -> None:
    """Ids of any shape (older formats, garbage) still name a partition."""
    assert P.partition_of(message_id) in P.ALL


def test_partition_character_names_the_partition() -> None:
    """The 12th character of an id is its partition."""
    for p in range(P.PARTITIONS):
        mid = "0" * P.PARTITION_CHAR + P.ALPHABET[p] + "bcd"
        assert P.partition_of(mid) == p
        assert P.owner_of(mid, 3) == p % 3


def test_worker_outside_range_is_an_error() -> None:
    import pytest
    with pytest.raises(ValueError):
        P.owned(2, 2)


# -- ids carry their partition -----------------------------------------------------------------

from txmta.message import MessageIds, format_message_id  # noqa: E402


@given(st.integers(min_value=0, max_value=49 ** 11 - 1), st.integers(0, P.PARTITIONS - 1),
       st.integers(0, 65535))
def test_a_formatted_id_names_its_partition(micros: int, part: int, tail: int) -> None:
    """format_message_id puts the partition where partition_of reads it; ids are 15 chars of
    the alphabet."""
    mid = format_message_id(micros, part, tail)
    assert len(mid) == 15 and set(mid) <= set(P.ALPHABET)
    assert P.partition_of(mid) == part


@given(st.lists(st.integers(min_value=0, max_value=49 ** 11 - 1), min_size=2, max_size=20))
def test_ids_sort_by_time(times: list[int]) -> None:
    """Ids of later microseconds sort after earlier ones whatever their partition and tail."""
    ids = [format_message_id(t, t % 32, (t * 7919) % 65536) for t in sorted(set(times))]
    assert ids == sorted(ids)


def test_an_id_generator_takes_its_partitions_in_turn_with_the_injected_clock() -> None:
    now = [1_700_000_000.0]
    ids = MessageIds({3, 7, 11}, clock=lambda: now[0], random=lambda n: b"\x00" * n)
    made = [ids() for _ in range(6)]
    assert [P.partition_of(m) for m in made] == [3, 7, 11, 3, 7, 11]
    assert made == sorted(made) and len(set(made)) == 6   # the clock stood still: a counter
    now[0] -= 10                                          # the clock stepped back
    later = ids()
    assert later > made[-1]
    assert made[0][:11] == format_message_id(1_700_000_000_000_000, 0, 0)[:11]


def test_a_worker_queue_makes_ids_only_in_its_partitions() -> None:
    from twisted.internet.task import Clock

    from txmta.queue import Queue
    from txmta.spool.memory import MemorySpool
    clock = Clock()
    clock.advance(1_700_000_000)
    mine = P.owned(1, 3)
    q = Queue(MemorySpool(mine), clock, partitions=mine)
    made = {q.new_message_id() for _ in range(100)}
    assert len(made) == 100
    assert {P.partition_of(m) for m in made} == set(mine)
    assert {P.owner_of(m, 3) for m in made} == {1}
