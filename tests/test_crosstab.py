"""Tests for protocol.crosstab: encrypted sums and counts per cell, read by the client.

A random server table of 200 records (a few with no state, some with no age)
sits in a layout of eight slots per bucket; the client selects random slots of
every position row. The expected table is pandas' groupby over the server
records that the selections pick, one entry per (slot, position) link.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import tenseal.sealapi as sa

from protocol import crosstab
from protocol.he import Ckks, PublicKeyHolder, SecretKeyHolder
from protocol.layout import SLOTS, PassShape, server_positions
from protocol.table import TableShape, cell_of_records, table_shape, value_scale

TOLERANCE = 1e-6
# The totals carry the noise of twelve key switchings, about 1e-6 in count
# units; dividing V * sum by the count turns that into about 2e-6 on an
# average near 50, so averages are compared relatively.
AVERAGE_RTOL = 1e-6
SIZE_CLASS = 1024


@dataclass(frozen=True)
class Selected:
    """The server's finished accumulator and what the selections really picked."""

    shape: TableShape
    scales: crosstab.TableScales
    acc: crosstab.CellAccumulator
    expected: pd.DataFrame  # per cell label: sum, mean, count of linked values


def server_frame(rng: np.random.Generator, count: int) -> pd.DataFrame:
    states = rng.choice(["nsw", "vic", "qld", None], count, p=[0.4, 0.3, 0.25, 0.05])
    ages = rng.integers(1, 100, count).astype(float)
    ages[rng.random(count) < 0.1] = np.nan
    return pd.DataFrame({"state": states, "age": ages})


def expected_table(frame: pd.DataFrame, links: list[int], shape: TableShape):
    linked = frame.iloc[links].dropna(subset=["state", "age"])
    table = linked.groupby("state")["age"].agg(["sum", "mean", "count"])
    return table.reindex([label[0] for label in shape.labels()])


@pytest.fixture(scope="module")
def selected(
    ckks: Ckks, public: PublicKeyHolder,
    encrypt: Callable[[np.ndarray], sa.Ciphertext],
) -> Selected:
    rng = np.random.default_rng(21)
    frame = server_frame(rng, 200)
    shape = table_shape(frame, ("state",))
    cell = cell_of_records(frame, shape)
    ages = frame["age"].to_numpy(dtype=float)
    scales = crosstab.TableScales(value_scale(ages), crosstab.count_scale(SIZE_CLASS))
    (positions,) = server_positions(rng.integers(0, 100, len(frame)),
                                    PassShape(SLOTS // 8, 8))
    acc, links = crosstab.CellAccumulator(shape.cells), []
    for row in positions:
        chosen = rng.random(SLOTS) < 0.3
        here = np.maximum(row, 0)
        crosstab.add_selection(
            ckks, acc, encrypt(chosen.astype(float)),
            np.where(row >= 0, cell[here], -1),
            np.where(row >= 0, ages[here] / scales.value_scale, np.nan),
        )
        links += row[chosen & (row >= 0)].tolist()
    crosstab.finish_totals(ckks, acc, public.galois_keys)
    return Selected(shape, scales, acc, expected_table(frame, links, shape))


@pytest.fixture(scope="module")
def revealed(
    ckks: Ckks, public: PublicKeyHolder, selected: Selected,
    decrypt_reply: Callable[[sa.Ciphertext], np.ndarray],
) -> np.ndarray:
    """The client's decryption of a table whose counts the policy reveals."""
    table = crosstab.build_table(ckks, public, selected.acc, selected.scales, True)
    return decrypt_reply(table)


def test_selection_links_records_in_every_cell(selected: Selected) -> None:
    assert selected.shape.cells == 3
    assert np.all(selected.expected["count"] > 20)
    assert selected.scales.value_scale == 128.0


def test_averages_equal_the_groupby_mean_of_the_selected_records(
    selected: Selected, revealed: np.ndarray
) -> None:
    averages, _ = crosstab.read_table(revealed, 3, selected.scales, True)

    expected = selected.expected["mean"].to_numpy()
    assert averages == pytest.approx(expected, rel=AVERAGE_RTOL, abs=0)


def test_revealed_counts_equal_the_groupby_count_exactly(
    selected: Selected, revealed: np.ndarray
) -> None:
    _, counts = crosstab.read_table(revealed, 3, selected.scales, True)

    assert counts is not None
    assert counts.dtype == np.int64
    assert counts.tolist() == selected.expected["count"].tolist()


def test_unrevealed_counts_are_none_and_their_slots_decrypt_to_zero(
    ckks: Ckks, public: PublicKeyHolder, selected: Selected,
    decrypt_reply: Callable[[sa.Ciphertext], np.ndarray],
) -> None:
    table = crosstab.build_table(ckks, public, selected.acc, selected.scales, False)
    values = decrypt_reply(table)

    averages, counts = crosstab.read_table(values, 3, selected.scales, False)

    assert counts is None
    assert np.max(np.abs(values[6:])) < TOLERANCE
    expected = selected.expected["mean"].to_numpy()
    assert averages == pytest.approx(expected, rel=AVERAGE_RTOL, abs=0)


def test_numerator_is_the_plain_sum_blinded_by_a_factor_in_one_to_two(
    selected: Selected, revealed: np.ndarray
) -> None:
    plain = selected.expected["sum"].to_numpy() / selected.scales.value_scale
    counts = selected.expected["count"].to_numpy()

    rho = revealed[:3] / plain

    assert np.all(rho >= 1.0 - TOLERANCE) and np.all(rho < 2.0)
    assert np.all(np.abs(revealed[:3] - plain) > TOLERANCE)
    # The same factor blinds the count, so only their ratio can be read.
    assert np.max(np.abs(revealed[3:6] / counts - rho)) < TOLERANCE


def test_blinding_factors_are_fresh_for_each_table(
    ckks: Ckks, public: PublicKeyHolder, selected: Selected, revealed: np.ndarray,
    decrypt_reply: Callable[[sa.Ciphertext], np.ndarray],
) -> None:
    again = decrypt_reply(
        crosstab.build_table(ckks, public, selected.acc, selected.scales, True)
    )

    assert np.all(np.abs(again[:3] - revealed[:3]) > 1e-6)
    assert np.max(np.abs(again[6:9] - revealed[6:9])) < TOLERANCE


def test_add_selection_skips_empty_cells_and_missing_values(
    ckks: Ckks, encrypt: Callable[[np.ndarray], sa.Ciphertext],
) -> None:
    cell_row = np.full(SLOTS, -1)
    value_row = np.full(SLOTS, np.nan)
    cell_row[:5] = [2, 2, 0, -1, 1]
    value_row[:5] = [0.5, 0.25, 0.75, 0.5, np.nan]  # cell 1 has no usable value
    acc = crosstab.CellAccumulator(4)

    products = crosstab.add_selection(ckks, acc, encrypt(np.ones(SLOTS)), cell_row,
                                      value_row)

    assert products == 4
    assert [s is not None for s in acc.sums] == [True, False, True, False]
    assert [c is not None for c in acc.counts] == [True, False, True, False]


def test_finished_totals_hold_the_sum_and_count_in_every_slot(
    ckks: Ckks, public: PublicKeyHolder, secret: SecretKeyHolder,
    encrypt: Callable[[np.ndarray], sa.Ciphertext],
) -> None:
    cell_row = np.full(SLOTS, -1)
    cell_row[[3, 100, 4000]] = 0
    value_row = np.full(SLOTS, 0.5)
    selection = np.zeros(SLOTS)
    selection[[3, 4000, 7]] = 1.0
    acc = crosstab.CellAccumulator(1)
    crosstab.add_selection(ckks, acc, encrypt(selection), cell_row, value_row)

    crosstab.finish_totals(ckks, acc, public.galois_keys)

    assert np.max(np.abs(secret.decrypt(acc.sums[0]) - 1.0)) < 1e-4
    assert np.max(np.abs(secret.decrypt(acc.counts[0]) - 2.0)) < 1e-4


def test_add_selection_accepts_a_cell_whose_values_are_all_zero(
    ckks: Ckks, encrypt: Callable[[np.ndarray], sa.Ciphertext],
) -> None:
    # An age (or any value) of 0 is ordinary data. Its plaintext is all zeros,
    # and SEAL refuses a product that is then exactly zero ("transparent").
    cell_row = np.full(SLOTS, -1)
    cell_row[:3] = [0, 0, 1]
    value_row = np.zeros(SLOTS)
    value_row[2] = 0.5
    acc = crosstab.CellAccumulator(2)

    try:
        crosstab.add_selection(ckks, acc, encrypt(np.ones(SLOTS)), cell_row, value_row)
        error = None
    except RuntimeError as exc:
        error = exc

    assert error is None, (
        "protocol bug: crosstab.add_selection raises "
        f"RuntimeError({error}) when every usable record of a cell in a position "
        "row has the value 0.0; the server's aggregation then fails with an "
        "internal error instead of counting those records"
    )
    assert acc.counts[0] is not None


def test_masked_sum_with_only_empty_terms_is_a_value_error(
    ckks: Ckks, public: PublicKeyHolder
) -> None:
    with pytest.raises(ValueError):
        crosstab.masked_sum(ckks, public, [(None, 0, 1.0), (None, 1, 2.0)])


def test_read_table_divides_numerators_by_denominators_and_rescales() -> None:
    values = np.zeros(SLOTS)
    # Two cells, rho = 1.5 and 1.25, count scale 2: sums 12 and 3 of values / 8.
    values[:6] = [1.5 * 12 / 8 / 2, 1.25 * 3 / 8 / 2, 1.5 * 4 / 2, 1.25 * 1 / 2,
                  4 / 2, 1 / 2]
    scales = crosstab.TableScales(value_scale=8.0, count_scale=2.0)

    averages, counts = crosstab.read_table(values, 2, scales, True)

    assert averages == pytest.approx([3.0, 3.0], abs=1e-12)
    assert counts.tolist() == [4, 1]


@pytest.mark.parametrize("size_class, scale", [(1024, 1.0), (1 << 16, 1.0),
                                               (1 << 17, 2.0), (1 << 20, 16.0)])
def test_count_scale_keeps_blinded_counts_under_two_to_the_18(
    size_class: int, scale: float
) -> None:
    assert crosstab.count_scale(size_class) == scale
    assert 2 * size_class / scale <= 2**18
