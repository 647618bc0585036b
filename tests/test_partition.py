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
