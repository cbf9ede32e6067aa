"""Tests for protocol.threshold: the size check on real encrypted counts.

The counts come from the cross-tab's own accumulator: one position row holds
30 server records, ten in each of three cells, and the client selects 3, 4
and 6 records with a value in them (plus records with no value and a slot
with no record, which must not count). With k = 4 the cells are below, at and
above the threshold, which is inclusive.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import tenseal.sealapi as sa

from protocol import crosstab, threshold
from protocol.framing import ProtocolError
from protocol.he import Ckks, PublicKeyHolder, SecretKeyHolder
from protocol.layout import SIZE_QUANTUM, SLOTS
from protocol.table import MAX_CELLS

K = 4
COUNTS = (3, 4, 6)
CELLS = len(COUNTS)
ASKED = threshold.values_asked(CELLS)

Check = tuple[np.ndarray, threshold.CheckKey]


@pytest.fixture(scope="module")
def counts(
    ckks: Ckks, public: PublicKeyHolder,
    encrypt: Callable[[np.ndarray], sa.Ciphertext],
) -> list[sa.Ciphertext | None]:
    row = np.full(SLOTS, -1)
    row[:30] = np.arange(30)
    cell = np.repeat(np.arange(CELLS), 10)
    values = np.full(30, 0.5)
    values[[0, 1, 25]] = np.nan  # selected below, but with no value
    chosen = np.zeros(SLOTS)
    chosen[[0, 1, 2, 3, 4, 10, 11, 12, 13, 20, 21, 22, 23, 24, 25, 26, 100]] = 1.0
    here = np.maximum(row, 0)
    acc = crosstab.CellAccumulator(CELLS)
    crosstab.add_selection(
        ckks, acc, encrypt(chosen),
        np.where(row >= 0, cell[here], -1), np.where(row >= 0, values[here], np.nan),
    )
    crosstab.finish_totals(ckks, acc, public.galois_keys)
    return acc.counts


@pytest.fixture(scope="module")
def build(
    ckks: Ckks, public: PublicKeyHolder, counts: list[sa.Ciphertext | None],
    decrypt_reply: Callable[[sa.Ciphertext], np.ndarray],
) -> Callable[[int], Check]:
    """A fresh check for k: the client's decrypted values and the server's key."""

    def run(k: int = K) -> Check:
        ciphertext, key = threshold.build_check(ckks, public, counts, k, SIZE_QUANTUM)
        return decrypt_reply(ciphertext), key

    return run


def honest(values: np.ndarray) -> np.ndarray:
    return threshold.parse_answers(threshold.answer_check(values, ASKED, CELLS), ASKED)


def test_count_ciphertexts_hold_only_linked_records_with_a_value(
    secret: SecretKeyHolder, counts: list[sa.Ciphertext | None]
) -> None:
    found = [secret.decrypt(c)[:8] for c in counts]

    for total, expected in zip(found, COUNTS):
        assert np.max(np.abs(total - expected)) < 1e-4


def test_honest_answers_pass_cells_at_or_above_k_inclusive(
    build: Callable[[int], Check],
) -> None:
    for _ in range(5):
        values, key = build(K)

        assert key.verdict(honest(values)).tolist() == [False, True, True]


@pytest.mark.parametrize("k, passed", [
    (1, [True, True, True]), (3, [True, True, True]), (5, [False, False, True]),
    (6, [False, False, True]), (7, [False, False, False]), (100, [False] * 3),
])
def test_honest_verdict_is_count_at_least_k(
    build: Callable[[int], Check], k: int, passed: list[bool]
) -> None:
    values, key = build(k)

    assert key.verdict(honest(values)).tolist() == passed


def test_cell_without_any_accumulator_counts_as_zero(
    ckks: Ckks, public: PublicKeyHolder, counts: list[sa.Ciphertext | None],
    decrypt_reply: Callable[[sa.Ciphertext], np.ndarray],
) -> None:
    ciphertext, key = threshold.build_check(
        ckks, public, [counts[2], None], 1, SIZE_QUANTUM
    )
    values = decrypt_reply(ciphertext)
    asked = threshold.values_asked(2)
    answers = threshold.parse_answers(threshold.answer_check(values, asked, 2), asked)

    assert key.verdict(answers).tolist() == [True, False]


def test_answering_all_ones_is_always_caught_by_the_decoys(
    build: Callable[[int], Check],
) -> None:
    for _ in range(10):
        _, key = build(K)

        with pytest.raises(ProtocolError, match="inconsistent"):
            key.verdict(threshold.parse_answers("1" * ASKED, ASKED))


def test_answering_all_zeros_is_always_caught_by_the_decoys(
    build: Callable[[int], Check],
) -> None:
    for _ in range(10):
        _, key = build(K)

        with pytest.raises(ProtocolError):
            key.verdict(np.zeros(ASKED, dtype=bool))


def test_flipping_exactly_one_decoy_answer_is_caught(
    build: Callable[[int], Check],
) -> None:
    rng = np.random.default_rng(4)
    for _ in range(10):
        values, key = build(K)
        answers = honest(values)
        flipped = int(rng.choice(key.decoy_slots))
        answers[flipped] = not answers[flipped]

        with pytest.raises(ProtocolError):
            key.verdict(answers)


def test_flipping_a_real_cell_answer_changes_only_that_cell(
    build: Callable[[int], Check],
) -> None:
    # The decoys catch a changed answer only when it lands on a decoy.
    values, key = build(K)
    answers = honest(values)
    answers[key.slot_of_cell[0]] = not answers[key.slot_of_cell[0]]

    assert key.verdict(answers).tolist() == [True, True, True]


def test_real_cell_signs_look_random_to_the_client(
    build: Callable[[int], Check],
) -> None:
    checks = [build(K) for _ in range(20)]
    signs = np.array([np.sign(values[key.slot_of_cell]) for values, key in checks])

    for cell in range(CELLS):
        assert set(signs[:, cell]) == {-1.0, 1.0}, f"cell {cell}"


def test_cells_and_decoys_are_shuffled_over_the_asked_slots(
    build: Callable[[int], Check],
) -> None:
    first = [build(K)[1] for _ in range(5)]

    for key in first:
        used = np.concatenate([key.slot_of_cell, key.decoy_slots])
        assert sorted(used.tolist()) == list(range(ASKED))
    assert len({tuple(key.slot_of_cell) for key in first}) > 1


def test_check_values_past_the_asked_ones_are_zero(
    build: Callable[[int], Check],
) -> None:
    values, _ = build(K)

    assert np.max(np.abs(values[ASKED:])) < 1e-6
    assert np.min(np.abs(values[:ASKED])) > 1e-6


def test_answer_check_gives_one_character_per_asked_value() -> None:
    values = np.zeros(SLOTS)
    values[:ASKED:2] = 0.5
    values[1:ASKED:2] = -0.5
    values[ASKED:] = 1.0  # never read

    text = threshold.answer_check(values, ASKED, CELLS)

    assert text == ("10" * ASKED)[:ASKED]


@pytest.mark.parametrize("asked", [ASKED - 1, ASKED + 1, 1, SLOTS])
def test_answer_check_refuses_an_asked_count_the_table_does_not_allow(
    asked: int,
) -> None:
    with pytest.raises(ProtocolError, match="asks"):
        threshold.answer_check(np.ones(SLOTS), asked, CELLS)


@pytest.mark.parametrize("text", [
    "1" * (ASKED - 1), "1" * (ASKED + 1), "", "2" * ASKED, "0" * (ASKED - 1) + " ",
    "0" * (ASKED - 1) + "\u0661",
])
def test_parse_answers_refuses_wrong_length_or_characters(text: str) -> None:
    with pytest.raises(ProtocolError):
        threshold.parse_answers(text, ASKED)


@pytest.mark.parametrize("text", [None, 1, ["1"] * ASKED, b"1" * ASKED, True])
def test_parse_answers_refuses_anything_but_a_string(text: object) -> None:
    with pytest.raises(ProtocolError):
        threshold.parse_answers(text, ASKED)


def test_parse_answers_reads_ones_as_true() -> None:
    assert threshold.parse_answers("0110", 4).tolist() == [False, True, True, False]


def test_decoys_are_at_least_32_and_three_per_cell() -> None:
    assert threshold.decoy_count(1) == 32
    assert threshold.decoy_count(11) == 33
    assert threshold.values_asked(CELLS) == CELLS + 32


def test_largest_table_fits_its_check_in_one_ciphertext() -> None:
    assert threshold.values_asked(MAX_CELLS) <= SLOTS
