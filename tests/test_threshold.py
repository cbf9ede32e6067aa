"""Tests for protocol.threshold: the size check on real encrypted counts.

The counts come from the cross-tab's own accumulator: one position row holds
30 server records, ten in each of three cells, and the client selects 3, 4
and 6 records with a value in them (plus records with no value and a slot
with no record, which must not count). With k = 4 the cells are below, at and
above the threshold, which is inclusive. Every check is built from a fresh
accumulator, as in a session: its sign factors are drawn with the totals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import tenseal.sealapi as sa

from protocol import crosstab, executor, threshold
from protocol.framing import ProtocolError
from protocol.handshake import MAX_SIZE_CLASS
from protocol.he import Ckks, PublicKeyHolder, SecretKeyHolder
from protocol.layout import SIZE_QUANTUM, SLOTS

K = 4
COUNTS = (3, 4, 6)
CELLS = len(COUNTS)
ASKED = threshold.values_asked(CELLS)
LOW, HIGH = threshold.CHECK_FACTOR_EXPONENTS
BUILDS = 20
# Slot sums carry about 1e-6 of CKKS noise; the smallest value is 2^-17.
TOLERANCE = 2e-5

Encrypt = Callable[[np.ndarray], sa.Ciphertext]
Decrypt = Callable[[sa.Ciphertext], np.ndarray]


def position_row() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cell per slot, value per slot, client selection) of the one position row."""
    row = np.full(SLOTS, -1)
    row[:30] = np.arange(30)
    cell = np.repeat(np.arange(CELLS), 10)
    values = np.full(30, 0.5)
    values[[0, 1, 25]] = np.nan  # selected below, but with no value
    chosen = np.zeros(SLOTS)
    chosen[[0, 1, 2, 3, 4, 10, 11, 12, 13, 20, 21, 22, 23, 24, 25, 26, 100]] = 1.0
    here = np.maximum(row, 0)
    return (np.where(row >= 0, cell[here], -1),
            np.where(row >= 0, values[here], np.nan), chosen)


@dataclass(frozen=True)
class Check:
    """One built check: slot 0 of every decrypted value, and what the server keeps."""

    values: np.ndarray  # complex, in the order the client receives them
    spread: float  # largest difference between a slot and slot 0, over all values
    key: threshold.CheckKey
    factors: np.ndarray  # the accumulator's sigma * r per cell


@pytest.fixture(scope="module")
def selection(encrypt: Encrypt) -> sa.Ciphertext:
    return encrypt(position_row()[2])


@pytest.fixture(scope="module")
def totals(
    ckks: Ckks, public: PublicKeyHolder, selection: sa.Ciphertext
) -> Callable[[np.ndarray], crosstab.CellAccumulator]:
    """A finished accumulator of the position row, for given check factors."""
    cell_row, value_row, _ = position_row()

    def run(factors: np.ndarray) -> crosstab.CellAccumulator:
        acc = crosstab.CellAccumulator(crosstab.table_factors(CELLS), factors, True)
        crosstab.add_selection(ckks, acc, selection, cell_row, value_row)
        crosstab.finish_totals(ckks, acc, public.galois_keys)
        return acc

    return run


@pytest.fixture(scope="module")
def build(
    ckks: Ckks, public: PublicKeyHolder, decrypt_reply: Decrypt,
    totals: Callable[[np.ndarray], crosstab.CellAccumulator],
) -> Callable[[int], Check]:
    """A fresh session's check for k, as the client decrypts it."""

    def run(k: int = K) -> Check:
        acc = totals(threshold.check_factors(CELLS))
        ciphertexts, key = threshold.build_check(ckks, public, acc.checks, acc.check,
                                                 k, SIZE_QUANTUM)
        decrypted = [decrypt_reply(c) for c in ciphertexts]  # LAST, final scale
        spread = max(float(np.max(np.abs(d - d[0]))) for d in decrypted)
        return Check(np.array([d[0] for d in decrypted]), spread, key, acc.check)

    return run


@pytest.fixture(scope="module")
def at_k(build: Callable[[int], Check]) -> list[Check]:
    return [build(K) for _ in range(BUILDS)]


def honest(values: np.ndarray) -> np.ndarray:
    return threshold.parse_answers(threshold.answer_check(list(values), ASKED, CELLS),
                                   ASKED)


def test_check_totals_hold_the_factor_times_linked_records_with_a_value(
    secret: SecretKeyHolder, totals: Callable[[np.ndarray], crosstab.CellAccumulator],
) -> None:
    factors = np.array([0.25, -0.125, 2.0**-10])
    acc = totals(factors)

    for c, count in enumerate(COUNTS):
        check = secret.decrypt(acc.checks[c])
        assert np.max(np.abs(check - factors[c] * count)) < TOLERANCE, c
        assert np.max(np.abs(secret.decrypt(acc.counts[c]) - count)) < 1e-4, c


def test_check_factors_are_signed_and_lie_in_their_octaves() -> None:
    factors = threshold.check_factors(20_000)

    assert np.all(np.abs(factors) >= 2.0**LOW) and np.all(np.abs(factors) < 2.0**HIGH)
    assert 9000 < np.count_nonzero(factors > 0) < 11000
    exponents = np.log2(np.abs(factors))
    assert exponents.min() < LOW + 0.1 and exponents.max() > HIGH - 0.1


def test_check_is_one_last_level_ciphertext_per_asked_value(
    at_k: list[Check],
) -> None:
    for check in at_k:
        assert len(check.values) == ASKED


def test_every_slot_of_a_check_value_holds_the_same_number(at_k: list[Check]) -> None:
    assert max(check.spread for check in at_k) < TOLERANCE


def test_real_cell_values_are_their_factor_times_count_minus_k_plus_half(
    at_k: list[Check],
) -> None:
    shift = np.array(COUNTS) - K + 0.5
    for check in at_k:
        found = check.values[check.key.slot_of_cell]

        assert np.max(np.abs(found - check.factors * shift)) < TOLERANCE
        assert np.array_equal(np.sign(found.real), np.sign(check.factors * shift))


def test_no_check_value_is_near_zero_or_beyond_its_largest_magnitude(
    at_k: list[Check],
) -> None:
    magnitudes = np.abs(np.concatenate([check.values.real for check in at_k]))

    # The smallest possible value is 2^LOW / 2; CKKS noise is about 1e-6.
    assert magnitudes.min() > 2.0**LOW / 4
    assert magnitudes.max() < 2.0**HIGH * SIZE_QUANTUM


def test_honest_answers_pass_cells_at_or_above_k_inclusive(at_k: list[Check]) -> None:
    for check in at_k:
        assert check.key.verdict(honest(check.values)).tolist() == [False, True, True]


@pytest.mark.parametrize("k, passed", [
    (1, [True, True, True]), (3, [True, True, True]), (5, [False, False, True]),
    (6, [False, False, True]), (7, [False, False, False]), (100, [False] * 3),
])
def test_honest_verdict_is_count_at_least_k(
    build: Callable[[int], Check], k: int, passed: list[bool]
) -> None:
    check = build(k)

    assert check.key.verdict(honest(check.values)).tolist() == passed


def test_cell_without_any_accumulator_counts_as_zero(
    ckks: Ckks, public: PublicKeyHolder, decrypt_reply: Decrypt,
    totals: Callable[[np.ndarray], crosstab.CellAccumulator],
) -> None:
    acc = totals(threshold.check_factors(CELLS))
    factors = np.array([acc.check[2], -0.25])
    ciphertexts, key = threshold.build_check(
        ckks, public, [acc.checks[2], None], factors, 1, SIZE_QUANTUM
    )
    values = [decrypt_reply(c)[0] for c in ciphertexts]
    asked = threshold.values_asked(2)
    answers = threshold.parse_answers(threshold.answer_check(values, asked, 2), asked)

    assert key.verdict(answers).tolist() == [True, False]
    assert abs(values[key.slot_of_cell[1]] - (-0.25) * (0 - 1 + 0.5)) < TOLERANCE


def test_totals_made_on_a_worker_give_the_same_verdict(
    ckks: Ckks, secret: SecretKeyHolder, public: PublicKeyHolder,
    decrypt_reply: Decrypt, monkeypatch: pytest.MonkeyPatch,
    totals: Callable[[np.ndarray], crosstab.CellAccumulator],
) -> None:
    # The decoys are drawn first and their check values made on the worker
    # before the check is built, as the server does while the client encrypts;
    # the empty cell's zero total is asked of the worker when the check is built.
    monkeypatch.setattr(executor, "_WORKER", [])
    worker = executor.init_worker(
        executor.WorkerSetup(ckks.name, *secret.public_bytes(), np.zeros((1, 2)), 0.5)
    )
    asked_of_worker: list[list[float]] = []

    def fresh(values: list[float]) -> list[sa.Ciphertext]:
        asked_of_worker.append(values)
        made = threshold.fresh_totals(worker, values)
        return [threshold.load_total(ckks, data) for data in made]

    decoys = threshold.draw_decoys(CELLS, K, SIZE_QUANTUM)
    early = [threshold.load_total(ckks, data) for data in threshold.decoy_checks(
        worker, decoys.factors.tolist(), decoys.counts.tolist(), K)]
    acc = totals(threshold.check_factors(CELLS))
    checks = [acc.checks[0], None, acc.checks[2]]
    ciphertexts, key = threshold.build_check(ckks, public, checks, acc.check, K,
                                             SIZE_QUANTUM, fresh=fresh,
                                             decoys=(decoys, early))
    worker.ckks.close()
    values = [decrypt_reply(c)[0] for c in ciphertexts]

    assert asked_of_worker == [[0.0]]
    assert len(early) == threshold.decoy_count(CELLS)
    assert len(ciphertexts) == ASKED
    assert key.verdict(honest(np.array(values))).tolist() == [False, False, True]


def test_build_check_refuses_decoy_totals_of_the_wrong_count(
    ckks: Ckks, public: PublicKeyHolder,
    totals: Callable[[np.ndarray], crosstab.CellAccumulator],
) -> None:
    acc = totals(threshold.check_factors(CELLS))
    decoys = threshold.draw_decoys(CELLS, K, SIZE_QUANTUM)

    with pytest.raises(ValueError, match="decoy values"):
        threshold.build_check(ckks, public, acc.checks, acc.check, K, SIZE_QUANTUM,
                              decoys=(decoys, []))


def test_answering_all_ones_is_always_caught_by_the_decoys(at_k: list[Check]) -> None:
    for check in at_k:
        with pytest.raises(ProtocolError, match="inconsistent"):
            check.key.verdict(threshold.parse_answers("1" * ASKED, ASKED))


def test_answering_all_zeros_is_always_caught_by_the_decoys(at_k: list[Check]) -> None:
    for check in at_k:
        with pytest.raises(ProtocolError, match="inconsistent"):
            check.key.verdict(np.zeros(ASKED, dtype=bool))


def test_flipping_exactly_one_decoy_answer_is_caught(at_k: list[Check]) -> None:
    rng = np.random.default_rng(4)
    for check in at_k:
        answers = honest(check.values)
        flipped = int(rng.choice(check.key.decoy_slots))
        answers[flipped] = not answers[flipped]

        with pytest.raises(ProtocolError):
            check.key.verdict(answers)


def test_flipping_a_real_cell_answer_changes_only_that_cell(
    at_k: list[Check],
) -> None:
    # The decoys catch a changed answer only when it lands on a decoy.
    check = at_k[0]
    answers = honest(check.values)
    answers[check.key.slot_of_cell[0]] = not answers[check.key.slot_of_cell[0]]

    assert check.key.verdict(answers).tolist() == [True, True, True]


def test_real_cell_signs_look_random_to_the_client(at_k: list[Check]) -> None:
    signs = np.array([np.sign(c.values[c.key.slot_of_cell].real) for c in at_k])

    for cell in range(CELLS):
        assert set(signs[:, cell]) == {-1.0, 1.0}, f"cell {cell}"


def test_decoy_signs_look_random_to_the_client(at_k: list[Check]) -> None:
    signs = np.concatenate([np.sign(c.values[c.key.decoy_slots].real) for c in at_k])

    assert 0.35 < np.mean(signs > 0) < 0.65


def test_cells_and_decoys_are_shuffled_over_the_asked_values(
    at_k: list[Check],
) -> None:
    for check in at_k:
        used = np.concatenate([check.key.slot_of_cell, check.key.decoy_slots])
        assert sorted(used.tolist()) == list(range(ASKED))
    assert len({tuple(check.key.slot_of_cell) for check in at_k}) > 1


def test_answer_check_gives_one_character_per_value_from_its_real_part() -> None:
    values = [(0.5 if i % 2 == 0 else -0.5) + (-1e-3j if i % 2 == 0 else 1e-3j)
              for i in range(ASKED)]

    text = threshold.answer_check(values, ASKED, CELLS)

    assert text == ("10" * ASKED)[:ASKED]


@pytest.mark.parametrize("found", [ASKED - 1, ASKED + 1, 0])
def test_answer_check_refuses_a_value_count_other_than_asked(found: int) -> None:
    with pytest.raises(ProtocolError, match="expected"):
        threshold.answer_check([1.0] * found, ASKED, CELLS)


@pytest.mark.parametrize("asked", [ASKED - 1, ASKED + 1, 1, SLOTS])
def test_answer_check_refuses_an_asked_count_the_table_does_not_allow(
    asked: int,
) -> None:
    with pytest.raises(ProtocolError, match="asks"):
        threshold.answer_check([1.0] * asked, asked, CELLS)


@pytest.mark.parametrize("asked", [ASKED - 1, ASKED + 1, 0, -ASKED])
def test_check_asked_refuses_a_count_the_table_does_not_allow(asked: int) -> None:
    with pytest.raises(ProtocolError, match="asks"):
        threshold.check_asked(asked, CELLS)


def test_check_asked_accepts_the_count_of_the_table() -> None:
    assert threshold.check_asked(ASKED, CELLS) is None


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


def test_largest_check_value_stays_under_the_ckks_headroom() -> None:
    # At the last level a 60-bit prime and a scale near 2^40 leave 2^19.
    assert 2.0**HIGH * MAX_SIZE_CLASS <= 2.0**18
    # The smallest value, r * 1/2, stays far above the server's slot noise.
    assert 2.0**LOW / 2 >= 100 * threshold.CHECK_NOISE
