"""Tests for protocol.crosstab: encrypted sums and counts per cell, read by the client.

A random server table of 200 records (a few with no state, some with no age)
sits in a layout of eight slots per bucket; the client selects random slots of
every position row. The expected table is pandas' groupby over the server
records that the selections pick, one entry per (slot, position) link. The
size class is 2^17, so counts are divided by a count scale of 2 on the way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import tenseal.sealapi as sa

from protocol import crosstab, executor, threshold
from protocol.framing import ProtocolError
from protocol.he import LAST, Ckks, PublicKeyHolder, SecretKeyHolder
from protocol.layout import SLOTS, PassShape, server_positions
from protocol.table import TableShape, cell_of_records, table_shape, value_scale

TOLERANCE = 1e-6
# The totals carry the noise of twelve key switchings, about 1e-6 in count
# units; dividing V * sum by the count turns that into about 2e-6 on an
# average near 50, so averages are compared relatively.
AVERAGE_RTOL = 1e-6
ROTATION_TOLERANCE = 1e-4
SIZE_CLASS = 1 << 17

Encrypt = Callable[[np.ndarray], sa.Ciphertext]
Decrypt = Callable[[sa.Ciphertext], np.ndarray]


@dataclass(frozen=True)
class Selected:
    """The server's finished accumulators and what the selections really picked.

    Both accumulators saw the same selections; one reveals counts, one does not.
    """

    shape: TableShape
    scales: crosstab.TableScales
    revealing: crosstab.CellAccumulator
    hiding: crosstab.CellAccumulator
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


def accumulator(cells: int, reveal: bool) -> crosstab.CellAccumulator:
    factors = crosstab.table_factors(cells), threshold.check_factors(cells)
    return crosstab.CellAccumulator(*factors, reveal)


def raised(call, *args) -> BaseException | None:
    try:
        call(*args)
    except Exception as exc:  # the tests below name the class they expect
        return exc
    return None


@pytest.fixture(scope="module")
def selected(ckks: Ckks, public: PublicKeyHolder, encrypt: Encrypt) -> Selected:
    rng = np.random.default_rng(21)
    frame = server_frame(rng, 200)
    shape = table_shape(frame, ("state",))
    cell = cell_of_records(frame, shape)
    ages = frame["age"].to_numpy(dtype=float)
    scales = crosstab.TableScales(value_scale(ages), crosstab.count_scale(SIZE_CLASS))
    (positions,) = server_positions(rng.integers(0, 100, len(frame)),
                                    PassShape(SLOTS // 8, 8))
    revealing, hiding = accumulator(shape.cells, True), accumulator(shape.cells, False)
    links = []
    for row in positions:
        chosen = rng.random(SLOTS) < 0.3
        here = np.maximum(row, 0)
        selection = encrypt(chosen.astype(float))
        cells_here = np.where(row >= 0, cell[here], -1)
        values_here = np.where(row >= 0, ages[here] / scales.value_scale, np.nan)
        for acc in (revealing, hiding):
            crosstab.add_selection(ckks, acc, selection, cells_here, values_here,
                                   scales.count_scale)
        links += row[chosen & (row >= 0)].tolist()
    for acc in (revealing, hiding):
        crosstab.finish_totals(ckks, acc, public.galois_keys)
    expected = expected_table(frame, links, shape)
    return Selected(shape, scales, revealing, hiding, expected)


@pytest.fixture(scope="module")
def revealed(
    ckks: Ckks, public: PublicKeyHolder, selected: Selected, decrypt_reply: Decrypt,
) -> list[np.ndarray]:
    """The client's decryption of a table whose counts the policy reveals."""
    entries = crosstab.table_ciphertexts(ckks, public, selected.revealing)
    return [decrypt_reply(e) for e in entries]  # each refused unless LAST, final scale


@pytest.fixture(scope="module")
def hidden(
    ckks: Ckks, public: PublicKeyHolder, selected: Selected, decrypt_reply: Decrypt,
) -> list[np.ndarray]:
    """The client's decryption of a table whose counts the policy keeps."""
    entries = crosstab.table_ciphertexts(ckks, public, selected.hiding)
    return [decrypt_reply(e) for e in entries]


def test_selection_links_records_in_every_cell(selected: Selected) -> None:
    assert selected.shape.cells == 3
    assert np.all(selected.expected["count"] > 20)
    assert selected.scales.value_scale == 128.0
    assert selected.scales.count_scale == 2.0


def test_table_has_one_ciphertext_per_cell_then_one_per_revealed_count(
    revealed: list[np.ndarray], hidden: list[np.ndarray]
) -> None:
    assert len(revealed) == 6
    assert len(hidden) == 3


def test_averages_equal_the_groupby_mean_of_the_selected_records(
    selected: Selected, revealed: list[np.ndarray]
) -> None:
    averages, _ = crosstab.read_table(revealed, 3, selected.scales, True)

    expected = selected.expected["mean"].to_numpy()
    assert averages == pytest.approx(expected, rel=AVERAGE_RTOL, abs=0)


def test_revealed_counts_equal_the_groupby_count_exactly(
    selected: Selected, revealed: list[np.ndarray]
) -> None:
    _, counts = crosstab.read_table(revealed, 3, selected.scales, True)

    assert counts is not None
    assert counts.dtype == np.int64
    assert counts.tolist() == selected.expected["count"].tolist()


def test_revealed_count_ciphertexts_hold_the_count_over_the_count_scale(
    selected: Selected, revealed: list[np.ndarray]
) -> None:
    counts = selected.expected["count"].to_numpy()

    for entry, count in zip(revealed[3:], counts):
        assert np.max(np.abs(entry - count / 2.0)) < ROTATION_TOLERANCE


def test_unrevealed_counts_are_none_and_never_accumulated(
    selected: Selected, hidden: list[np.ndarray]
) -> None:
    averages, counts = crosstab.read_table(hidden, 3, selected.scales, False)

    assert counts is None
    assert selected.hiding.counts == [None, None, None]
    expected = selected.expected["mean"].to_numpy()
    assert averages == pytest.approx(expected, rel=AVERAGE_RTOL, abs=0)


@pytest.mark.parametrize("which", ["revealing", "hiding"])
def test_entry_is_the_plain_sum_plus_i_count_blinded_by_rho_in_one_to_two(
    selected: Selected, revealed: list[np.ndarray], hidden: list[np.ndarray],
    which: str,
) -> None:
    acc = getattr(selected, which)
    entries = np.array([e[0] for e in (revealed if which == "revealing" else hidden)])
    plain = selected.expected["sum"].to_numpy() / selected.scales.value_scale
    counts = selected.expected["count"].to_numpy()
    unscaled = entries[:3] * selected.scales.count_scale

    rho = unscaled.real / plain

    assert np.all(acc.rho >= 1.0) and np.all(acc.rho < 2.0)
    assert np.max(np.abs(rho - acc.rho)) < TOLERANCE
    assert np.all(np.abs(unscaled.real - plain) > TOLERANCE)
    # The same factor blinds the count, so only their ratio can be read.
    assert np.max(np.abs(unscaled.imag / counts - acc.rho)) < TOLERANCE
    assert np.all(np.abs(unscaled.imag - counts) > TOLERANCE)


def test_every_slot_of_a_table_entry_holds_the_same_value(
    revealed: list[np.ndarray],
) -> None:
    for entry in revealed:
        assert np.max(np.abs(entry - entry[0])) < ROTATION_TOLERANCE


def test_blinding_factors_are_fresh_for_each_table(
    selected: Selected, revealed: list[np.ndarray], hidden: list[np.ndarray],
) -> None:
    # Same selections, two sessions: different numerators, the same averages.
    first, second = crosstab.table_factors(64), crosstab.table_factors(64)

    assert not np.array_equal(first, second)
    assert np.all(first >= 1.0) and np.all(first < 2.0)
    assert not np.array_equal(selected.revealing.rho, selected.hiding.rho)
    for one, other in zip(revealed[:3], hidden[:3]):
        assert abs(one[0] - other[0]) > 1e-6


def test_table_ciphertexts_are_re_randomised(
    ckks: Ckks, public: PublicKeyHolder, encrypt: Encrypt, decrypt_reply: Decrypt,
) -> None:
    cell_row = np.full(SLOTS, -1)
    cell_row[:4] = [0, 0, 1, 1]
    acc = accumulator(2, True)
    crosstab.add_selection(ckks, acc, encrypt(np.ones(SLOTS)), cell_row,
                           np.full(SLOTS, 0.25))
    crosstab.finish_totals(ckks, acc, public.galois_keys)
    before = [ckks.to_bytes(c) for c in acc.table + acc.counts]
    values = [decrypt_reply(c) for c in acc.table + acc.counts]

    entries = crosstab.table_ciphertexts(ckks, public, acc)

    assert len(entries) == 4
    for out, old, value in zip(entries, before, values):
        assert ckks.to_bytes(out) != old
        assert np.max(np.abs(decrypt_reply(out) - value)) < TOLERANCE


def test_cell_without_an_accumulator_gets_a_fresh_encryption_of_zero(
    ckks: Ckks, public: PublicKeyHolder, encrypt: Encrypt, decrypt_reply: Decrypt,
) -> None:
    cell_row = np.full(SLOTS, -1)
    cell_row[:2] = 1
    acc = accumulator(2, True)
    crosstab.add_selection(ckks, acc, encrypt(np.ones(SLOTS)), cell_row,
                           np.full(SLOTS, 0.5))
    crosstab.finish_totals(ckks, acc, public.galois_keys)
    assert acc.table[0] is None and acc.counts[0] is None

    entries = [decrypt_reply(c) for c in crosstab.table_ciphertexts(ckks, public, acc)]

    assert len(entries) == 4
    assert np.max(np.abs(entries[0])) < TOLERANCE
    assert np.max(np.abs(entries[2])) < TOLERANCE
    assert abs(entries[1][0] - acc.rho[1] * (1.0 + 2.0j)) < ROTATION_TOLERANCE
    assert abs(entries[3][0] - 2.0) < ROTATION_TOLERANCE


def test_table_ciphertexts_without_any_accumulator_is_a_value_error(
    ckks: Ckks, public: PublicKeyHolder
) -> None:
    # Only a caller's mistake reaches this (the server refuses such a query
    # earlier); it should say so, as the old masked_sum did.
    error = raised(crosstab.table_ciphertexts, ckks, public, accumulator(2, True))

    assert isinstance(error, ValueError), (
        "protocol bug: crosstab.table_ciphertexts raises "
        f"{type(error).__name__}({error}) for an accumulator with no ciphertext "
        "in any cell (`next(...)` over an empty generator); expected a ValueError "
        "stating that at least one cell needs an accumulator"
    )


def test_add_selection_skips_empty_cells_and_missing_values(
    ckks: Ckks, encrypt: Encrypt,
) -> None:
    cell_row = np.full(SLOTS, -1)
    value_row = np.full(SLOTS, np.nan)
    cell_row[:5] = [2, 2, 0, -1, 1]
    value_row[:5] = [0.5, 0.25, 0.75, 0.5, np.nan]  # cell 1 has no usable value
    revealing, hiding = accumulator(4, True), accumulator(4, False)
    selection = encrypt(np.ones(SLOTS))

    products = [crosstab.add_selection(ckks, acc, selection, cell_row, value_row)
                for acc in (revealing, hiding)]

    assert products == [6, 4]
    present = [True, False, True, False]
    for acc in (revealing, hiding):
        assert [t is not None for t in acc.table] == present
        assert [c is not None for c in acc.checks] == present
    assert [c is not None for c in revealing.counts] == present
    assert hiding.counts == [None] * 4


@pytest.mark.parametrize("rho, count_scale", [(1.0, 1.0), (1.5, 4.0)])
def test_finished_totals_hold_the_blinded_sum_check_and_count_in_every_slot(
    ckks: Ckks, public: PublicKeyHolder, secret: SecretKeyHolder, encrypt: Encrypt,
    rho: float, count_scale: float,
) -> None:
    cell_row = np.full(SLOTS, -1)
    cell_row[[3, 100, 4000]] = 0
    value_row = np.full(SLOTS, 0.5)
    selection = np.zeros(SLOTS)
    selection[[3, 4000, 7]] = 1.0  # slot 7 has no record, slot 100 is not chosen
    acc = crosstab.CellAccumulator(np.array([rho]), np.array([-0.25]), True)
    crosstab.add_selection(ckks, acc, encrypt(selection), cell_row, value_row,
                           count_scale)

    crosstab.finish_totals(ckks, acc, public.galois_keys)

    table = secret.decrypt(acc.table[0])
    assert np.max(np.abs(table - rho / count_scale * (1.0 + 2.0j))) < ROTATION_TOLERANCE
    assert np.max(np.abs(secret.decrypt(acc.checks[0]) + 0.5)) < ROTATION_TOLERANCE
    counts = secret.decrypt(acc.counts[0])
    assert np.max(np.abs(counts - 2.0 / count_scale)) < ROTATION_TOLERANCE
    assert all(c.parms_id() == ckks.levels[LAST] for c in acc.table + acc.counts)


def test_add_selection_accepts_a_cell_whose_values_are_all_zero(
    ckks: Ckks, public: PublicKeyHolder, secret: SecretKeyHolder, encrypt: Encrypt,
) -> None:
    # An age (or any value) of 0 is ordinary data. SEAL refuses a product with
    # an all-zero plaintext ("transparent"); the count part keeps it non-zero.
    cell_row = np.full(SLOTS, -1)
    cell_row[:3] = [0, 0, 1]
    value_row = np.zeros(SLOTS)
    value_row[2] = 0.5
    acc = accumulator(2, True)

    error = raised(crosstab.add_selection, ckks, acc, encrypt(np.ones(SLOTS)),
                   cell_row, value_row)

    assert error is None, (
        "protocol bug: crosstab.add_selection raises "
        f"{type(error).__name__}({error}) when every usable record of a cell in a "
        "position row has the value 0.0; the server's aggregation then fails with "
        "an internal error instead of counting those records"
    )
    assert all(x is not None for x in (acc.table[0], acc.checks[0], acc.counts[0]))
    crosstab.finish_totals(ckks, acc, public.galois_keys)
    entry = secret.decrypt(acc.table[0])[0]
    assert abs(entry - 2.0j * acc.rho[0]) < ROTATION_TOLERANCE


def test_read_table_divides_real_by_imaginary_parts_and_rescales() -> None:
    # Two cells, rho = 1.5 and 1.25, count scale 2: sums 12 and 3 of values / 8,
    # counts 4 and 1. Only slot 0 of each entry is read.
    def entry(value: complex) -> np.ndarray:
        out = np.full(SLOTS, 99.0 - 99.0j)
        out[0] = value
        return out

    entries = [entry(1.5 / 2 * (12 / 8 + 4j)), entry(1.25 / 2 * (3 / 8 + 1j)),
               entry(4 / 2), entry(1 / 2 + 1e-7j)]
    scales = crosstab.TableScales(value_scale=8.0, count_scale=2.0)

    averages, counts = crosstab.read_table(entries, 2, scales, True)
    hidden_averages, none = crosstab.read_table(entries[:2], 2, scales, False)

    assert averages == pytest.approx([3.0, 3.0], abs=1e-12)
    assert counts.tolist() == [4, 1]
    assert hidden_averages == pytest.approx([3.0, 3.0], abs=1e-12)
    assert none is None


@pytest.mark.parametrize("size_class, scale", [(1024, 1.0), (1 << 16, 1.0),
                                               (1 << 17, 2.0), (1 << 20, 16.0)])
def test_count_scale_keeps_blinded_counts_under_two_to_the_18(
    size_class: int, scale: float
) -> None:
    assert crosstab.count_scale(size_class) == scale
    assert 2 * size_class / scale <= 2**18


# -- the worker task: partial sums, merged by the session --------------------------


def test_partial_sums_of_two_workers_merge_to_the_sums_of_one(
    ckks: Ckks, secret: SecretKeyHolder, public: PublicKeyHolder, encrypt: Encrypt,
    decrypt_reply: Decrypt, monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(8)
    frame = server_frame(rng, 120)
    shape = table_shape(frame, ("state",))
    (positions,) = server_positions(rng.integers(0, 100, len(frame)),
                                    PassShape(SLOTS // 8, 8))
    work = crosstab.TableWork(
        cells=cell_of_records(frame, shape),
        values=frame["age"].to_numpy(dtype=float) / 128.0,
        count_scale=1.0,
        rho=crosstab.table_factors(shape.cells),
        check=threshold.check_factors(shape.cells),
        reveal_counts=True,
    )
    blobs = [secret.encrypt_to_bytes((rng.random(SLOTS) < 0.3).astype(float))
             for _ in positions]
    monkeypatch.setattr(executor, "_WORKER", [])
    worker = executor.init_worker(
        executor.WorkerSetup(ckks.name, *secret.public_bytes(), np.zeros((1, 2)), 0.5,
                             work)
    )

    whole = work.accumulator()
    crosstab.add_rows(ckks, whole, work,
                      [crosstab.load_selection(ckks, b) for b in blobs], positions)
    merged = work.accumulator()
    half = len(positions) // 2
    for part in (slice(0, half), slice(half, None)):
        partial = crosstab.sum_rows(worker, blobs[part], positions[part])
        assert [len(p) for p in partial] == [shape.cells] * 3
        crosstab.merge_partial(ckks, merged, partial)
    worker.ckks.close()
    for acc in (whole, merged):
        crosstab.finish_totals(ckks, acc, public.galois_keys)

    for one, two in zip(whole.table + whole.checks + whole.counts,
                        merged.table + merged.checks + merged.counts):
        assert np.max(np.abs(decrypt_reply(one) - decrypt_reply(two))) < TOLERANCE


def test_merge_partial_refuses_a_partial_at_another_scale(
    ckks: Ckks, encrypt: Encrypt
) -> None:
    acc = accumulator(2, False)
    fresh = ckks.to_bytes(encrypt(np.ones(SLOTS)))  # scale 2^40, not 2^80

    with pytest.raises(ProtocolError, match="scale"):
        crosstab.merge_partial(ckks, acc, [[fresh, None], [None, None], [None, None]])
