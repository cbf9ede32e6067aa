"""Tests for protocol.layout: bucket counts, client slots, server positions."""

from __future__ import annotations

import numpy as np
import pytest

from protocol.layout import (
    SIZE_QUANTUM,
    SLOTS,
    PassShape,
    bucket_count,
    client_group_matrix,
    client_slots,
    padded_count,
    server_depth,
    server_plain_matrix,
    server_positions,
    server_value_row,
)

P = 8
SHAPE = PassShape(buckets=2 * SLOTS // P, slots_per_bucket=P)  # two groups
DIMS = 5


def crowded_buckets(rng: np.random.Generator, count: int) -> np.ndarray:
    """Buckets drawn from a few of SHAPE's, in both groups, some missing (-1)."""
    used = np.array([0, 3, 17, 511, 512, 600, 1023])
    out = rng.choice(used, size=count)
    out[rng.random(count) < 0.1] = -1
    return out


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(2024)


@pytest.mark.parametrize("records", [0, 1, 100, 1000, 5000, 12345])
@pytest.mark.parametrize("slots_per_bucket", [1, 8, 16, 4096])
@pytest.mark.parametrize("capacity_factor", [1.0, 1.5, 3.0])
def test_bucket_count_is_the_fewest_whole_groups_with_enough_slots(
    records: int, slots_per_bucket: int, capacity_factor: float
) -> None:
    k = bucket_count(records, slots_per_bucket, capacity_factor)
    per_group = SLOTS // slots_per_bucket

    assert k % per_group == 0
    assert k >= per_group
    assert k * slots_per_bucket >= capacity_factor * records
    assert k == per_group or (k - per_group) * slots_per_bucket < capacity_factor * records


def test_bucket_count_for_the_demo_client_is_1024() -> None:
    # 5120 padded records * 1.5 slots / 8 per bucket = 960: two groups of 512.
    assert bucket_count(5120, 8, 1.5) == 1024


def test_bucket_count_need_not_be_a_power_of_two() -> None:
    # 100352 * 1.5 / 8 = 18816 buckets: 37 groups of 512 (a power of two: 64).
    assert bucket_count(100352, 8, 1.5) == 37 * 512


@pytest.mark.parametrize(
    "records, padded", [(0, 1024), (1, 1024), (1024, 1024), (1025, 2048), (5000, 5120)]
)
def test_padded_count_rounds_up_to_a_whole_1024(records: int, padded: int) -> None:
    assert SIZE_QUANTUM == 1024
    assert padded_count(records) == padded


def test_padded_count_is_the_smallest_multiple_covering_the_records() -> None:
    for records in range(1, 10_000, 37):
        padded = padded_count(records)
        assert padded % SIZE_QUANTUM == 0
        assert padded - SIZE_QUANTUM < records <= padded


def test_pass_shape_counts_groups_of_slots() -> None:
    shape = PassShape(buckets=1024, slots_per_bucket=16)

    assert shape.groups == 1024 * 16 // SLOTS == 4
    assert shape.buckets_per_group == SLOTS // 16


def test_client_slots_fill_buckets_in_file_order_and_overflow_sits_out() -> None:
    shape = PassShape(buckets=SLOTS // 4, slots_per_bucket=4)
    buckets = np.array([3, 3, -1, 3, 3, 3, 7, 3])

    slots = client_slots(buckets, shape)

    assert slots.tolist() == [12, 13, -1, 14, 15, -1, 28, -1]


def test_client_slots_hold_at_most_p_records_inside_their_bucket(
    rng: np.random.Generator,
) -> None:
    buckets = crowded_buckets(rng, 300)

    slots = client_slots(buckets, SHAPE)

    placed = slots >= 0
    assert len(set(slots[placed].tolist())) == placed.sum()
    assert np.array_equal(slots[placed] // P, buckets[placed])
    assert np.bincount(buckets[placed], minlength=SHAPE.buckets).max() <= P
    assert not placed[buckets < 0].any()


def test_client_slots_go_to_the_first_p_records_of_each_bucket(
    rng: np.random.Generator,
) -> None:
    buckets = crowded_buckets(rng, 300)

    slots = client_slots(buckets, SHAPE)

    for bucket in set(buckets[buckets >= 0].tolist()):
        rows = np.flatnonzero(buckets == bucket)
        expected = bucket * P + np.arange(min(len(rows), P))
        assert slots[rows[:P]].tolist() == expected.tolist()
        assert (slots[rows[P:]] == -1).all()


def test_client_group_matrix_puts_each_vector_in_its_slot_column(
    rng: np.random.Generator,
) -> None:
    buckets = crowded_buckets(rng, 300)
    vectors = rng.normal(size=(300, DIMS))
    slots = client_slots(buckets, SHAPE)

    for group in range(SHAPE.groups):
        matrix = client_group_matrix(vectors, slots, group)
        expected = np.zeros((DIMS, SLOTS))
        for row, slot in enumerate(slots):
            if group * SLOTS <= slot < (group + 1) * SLOTS:
                expected[:, slot - group * SLOTS] = vectors[row]
        assert np.array_equal(matrix, expected)


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_server_record_appears_once_in_its_own_bucket(
    rng: np.random.Generator, shuffle: bool
) -> None:
    buckets = crowded_buckets(rng, 400)

    seen: list[int] = []
    for group, table in enumerate(server_positions(buckets, SHAPE, shuffle=shuffle)):
        assert table.shape[1] == SLOTS
        for first in range(0, SLOTS, P):
            block = table[:, first : first + P]
            assert (block == block[:, :1]).all()
            column = block[:, 0]
            bucket = (group * SLOTS + first) // P
            assert (buckets[column[column >= 0]] == bucket).all()
            seen += column[column >= 0].tolist()

    assert sorted(seen) == np.flatnonzero(buckets >= 0).tolist()


def test_group_depth_is_its_largest_bucket(rng: np.random.Generator) -> None:
    buckets = crowded_buckets(rng, 400)
    sizes = np.bincount(buckets[buckets >= 0], minlength=SHAPE.buckets)

    tables = server_positions(buckets, SHAPE)

    per_group = sizes.reshape(SHAPE.groups, SHAPE.buckets_per_group)
    assert [t.shape[0] for t in tables] == per_group.max(axis=1).tolist()


def test_group_without_server_records_has_no_positions() -> None:
    buckets = np.array([0, 0, 5])

    tables = server_positions(buckets, SHAPE)

    assert tables[0].shape == (2, SLOTS)
    assert tables[1].shape == (0, SLOTS)


def test_unshuffled_positions_keep_file_order() -> None:
    buckets = np.array([4, -1, 4, 9, 4])

    table = server_positions(buckets, SHAPE, shuffle=False)[0]

    assert table[:, 4 * P].tolist() == [0, 2, 4]
    assert table[:, 9 * P].tolist() == [3, -1, -1]


def test_with_a_depth_every_group_has_exactly_that_many_positions() -> None:
    # Bucket 4 (group 0) holds five records, bucket 600 (group 1) one.
    buckets = np.array([4, 600, 4, 4, -1, 4, 4])

    tables = server_positions(buckets, SHAPE, depth=3, shuffle=False)

    assert [t.shape for t in tables] == [(3, SLOTS), (3, SLOTS)]
    assert tables[0][:, 4 * P].tolist() == [0, 2, 3]  # the first three in file order
    assert tables[1][:, 600 * P - SLOTS].tolist() == [1, -1, -1]
    assert np.count_nonzero(tables[0] >= 0) == 3 * P


@pytest.mark.parametrize(
    ("keyed", "buckets", "factor", "expected"),
    [
        (5000, 1024, 1.5, 10),  # 5120 / 1024 = 5 per bucket, times 1.5, plus 2
        (5120, 1024, 1.5, 10),
        (1, 256, 1.0, 6),  # rounded up to 1024 records
        (1_000_000, 2048, 1.5, 735),  # 1000448 / 2048 = 488.5
    ],
)
def test_server_depth_is_the_factor_times_the_padded_mean_plus_two(
    keyed: int, buckets: int, factor: float, expected: int
) -> None:
    assert server_depth(keyed, buckets, factor) == expected


def test_server_depth_says_no_more_than_the_padded_count() -> None:
    depths = {server_depth(n, 1024, 1.5) for n in range(4097, 5121)}

    assert depths == {server_depth(5120, 1024, 1.5)}


def _bucket_sets(tables: list[np.ndarray]) -> list[set[int]]:
    return [
        set(t[:, first].tolist()) - {-1} for t in tables for first in range(0, SLOTS, P)
    ]


def test_shuffle_keeps_the_same_records_in_each_bucket(
    rng: np.random.Generator,
) -> None:
    buckets = crowded_buckets(rng, 400)

    plain = server_positions(buckets, SHAPE, shuffle=False)
    shuffled = server_positions(buckets, SHAPE, shuffle=True)

    assert _bucket_sets(plain) == _bucket_sets(shuffled)


def test_slotwise_products_are_scores_against_the_qth_record_of_the_bucket(
    rng: np.random.Generator,
) -> None:
    client_buckets = crowded_buckets(rng, 300)
    server_buckets = crowded_buckets(rng, 250)
    client, server = rng.normal(size=(300, DIMS)), rng.normal(size=(250, DIMS))
    slots = client_slots(client_buckets, SHAPE)
    tables = server_positions(server_buckets, SHAPE, shuffle=False)

    for group, table in enumerate(tables):
        ciphertexts = client_group_matrix(client, slots, group)
        for q in range(table.shape[0]):
            got = (ciphertexts * server_plain_matrix(server, table[q])).sum(axis=0)
            expected = np.zeros(SLOTS)
            for row in np.flatnonzero(slots // SLOTS == group):
                bucket = client_buckets[row]
                members = np.flatnonzero(server_buckets == bucket)
                if q < len(members):
                    expected[slots[row] % SLOTS] = client[row] @ server[members[q]]
            assert np.allclose(got, expected, rtol=0, atol=1e-12)


def test_two_shuffles_of_a_deep_bucket_differ_and_every_order_turns_up() -> None:
    buckets = np.zeros(3, dtype=np.int64)  # one bucket of three records

    orders = {tuple(server_positions(buckets, SHAPE)[0][:, 0]) for _ in range(200)}

    assert len(orders) == 6  # all 3! orders, each with chance 1/6 per draw


def test_shuffled_products_score_the_record_named_at_each_position(
    rng: np.random.Generator,
) -> None:
    client_buckets = crowded_buckets(rng, 200)
    server_buckets = crowded_buckets(rng, 200)
    client, server = rng.normal(size=(200, DIMS)), rng.normal(size=(200, DIMS))
    slots = client_slots(client_buckets, SHAPE)

    for group, table in enumerate(server_positions(server_buckets, SHAPE)):
        ciphertexts = client_group_matrix(client, slots, group)
        for q in range(table.shape[0]):
            got = (ciphertexts * server_plain_matrix(server, table[q])).sum(axis=0)
            for row in np.flatnonzero(slots // SLOTS == group):
                s = slots[row] % SLOTS
                named = table[q, s]
                want = client[row] @ server[named] if named >= 0 else 0.0
                assert got[s] == pytest.approx(want, abs=1e-12)
                assert named < 0 or server_buckets[named] == client_buckets[row]


def test_server_value_row_is_zero_where_no_record() -> None:
    values = np.array([10.0, 20.0, 30.0])
    positions = np.array([2, -1, 0, -1])

    assert server_value_row(values, positions).tolist() == [30.0, 0.0, 10.0, 0.0]
