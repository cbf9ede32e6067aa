"""Tests for protocol.linkage and protocol.blinding: blinded scores, read as signs.

The data are synthetic: random unit vectors in 16 dimensions, blocked into
150 of the 1024 buckets of a one-group layout with four slots each, plus
server records that are near copies of client records so that matches exist.
The client packs two dimensions per complex slot (eight query ciphertexts).
Scores are computed directly in the process (no worker pool), except for the
tests of the worker functions themselves, which run them in this process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
import tenseal.sealapi as sa

from protocol import linkage
from protocol import executor
from protocol.executor import Worker, WorkerSetup, submit_group
from protocol.blinding import log_uniform_factors, random_signs, small_noise
from protocol.framing import ProtocolError
from protocol.he import (
    Ckks,
    PublicKeyHolder,
    SecretKeyHolder,
    rotation_steps,
)
from protocol.layout import (
    SLOTS,
    PassShape,
    client_group_matrix,
    client_slots,
    pair_rows,
    query_count,
    server_plain_matrix,
    server_positions,
)

DIMS = 16
THRESHOLD = 0.3
SHAPE = PassShape(buckets=SLOTS // 4, slots_per_bucket=4)  # exactly one group
TIE = 1e-4  # scores this close to the threshold are left out of sign checks
LOW, HIGH = linkage.SCORE_FACTOR_EXPONENTS
# Conjugation and re-randomisation leave about 1e-6 in the imaginary part.
IMAG_TOLERANCE = 1e-4
SCORE_TOLERANCE = 1e-4

Decrypt = Callable[[sa.Ciphertext], np.ndarray]


def query_bytes_of(secret: SecretKeyHolder, row: np.ndarray) -> bytes:
    """A client's query ciphertext, as it crosses the wire."""
    return secret.encrypt_to_bytes(row, linkage.QUERY_LEVEL, linkage.QUERY_SCALE)


def unit_rows(rng: np.random.Generator, count: int) -> np.ndarray:
    rows = rng.normal(size=(count, DIMS))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@dataclass(frozen=True)
class Scenario:
    client: np.ndarray
    server: np.ndarray
    slot: np.ndarray
    positions: np.ndarray  # (Q, SLOTS) server rows, -1 = none
    owner: np.ndarray
    matrix: np.ndarray  # (DIMS, SLOTS) client values before pairing
    query_bytes: list[bytes]
    queries: list[sa.Ciphertext]

    def scores(self, q: int) -> np.ndarray:
        """Plain score of every slot against position q (0 where either is empty)."""
        row, owner = self.positions[q], self.owner
        pairs = self.client[np.maximum(owner, 0)], self.server[np.maximum(row, 0)]
        dots = np.einsum("ij,ij->i", *pairs)
        return np.where((owner >= 0) & (row >= 0), dots, 0.0)


@pytest.fixture(scope="module")
def scenario(ckks: Ckks, secret: SecretKeyHolder) -> Scenario:
    rng = np.random.default_rng(5)
    client = unit_rows(rng, 600)
    client_bucket = rng.integers(0, 150, len(client))
    copies = rng.choice(len(client), 60, replace=False)
    near = client[copies] + 0.15 * unit_rows(rng, len(copies))
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    server = np.vstack([unit_rows(rng, 240), near])
    server_bucket = np.concatenate([rng.integers(0, 150, 240), client_bucket[copies]])
    slot = client_slots(client_bucket, SHAPE)
    (positions,) = server_positions(server_bucket, SHAPE)
    matrix = client_group_matrix(client, slot, 0)
    query_bytes = [query_bytes_of(secret, row) for row in pair_rows(matrix)]
    queries = [linkage.load_query(ckks, b) for b in query_bytes]
    owner = linkage.slot_owners(slot, 0)
    return Scenario(client, server, slot, positions, owner, matrix, query_bytes,
                    queries)


@pytest.fixture(scope="module")
def decrypted(
    ckks: Ckks, public: PublicKeyHolder, scenario: Scenario, decrypt_score: Decrypt,
) -> list[np.ndarray]:
    """The client's (complex) decryption of every position's score ciphertext."""
    out = []
    for row in scenario.positions:
        plains = server_plain_matrix(scenario.server, row)
        reply = linkage.score_position(
            ckks, public, scenario.queries, plains, THRESHOLD
        )
        out.append(decrypt_score(reply))
    return out


def occupied_and_clear(scenario: Scenario, q: int) -> np.ndarray:
    """Slots holding a client record whose score is not within TIE of the threshold."""
    return (scenario.owner >= 0) & (np.abs(scenario.scores(q) - THRESHOLD) > TIE)


@pytest.fixture
def fixed_factor(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], list]:
    """Make score_position draw a constant factor; returns the ranges it asked for."""
    asked: list = []

    def fix(value: float) -> list:
        def constant(count: int, low: float, high: float) -> np.ndarray:
            asked.append((count, low, high))
            return np.full(count, value)

        monkeypatch.setattr(linkage, "log_uniform_factors", constant)
        return asked

    return fix


# -- blinding ---------------------------------------------------------------------


@pytest.mark.parametrize("low, high", [(-4.0, 4.0), (0.0, 1.0), (-16.0, -2.0)])
def test_log_uniform_factors_lie_in_their_half_open_range(
    low: float, high: float
) -> None:
    factors = log_uniform_factors(20_000, low, high)

    assert np.all(factors >= 2.0**low)
    assert np.all(factors < 2.0**high)
    assert np.all(factors != 0.0)


def test_log_uniform_factors_spread_over_the_whole_range() -> None:
    exponents = np.log2(log_uniform_factors(20_000, -4.0, 4.0))

    assert exponents.min() < -3.9 and exponents.max() > 3.9
    counts, _ = np.histogram(exponents, bins=8, range=(-4.0, 4.0))
    assert counts.min() > 2000  # 2500 expected in each octave


def test_log_uniform_factors_differ_between_calls() -> None:
    first, second = log_uniform_factors(64, 0, 1), log_uniform_factors(64, 0, 1)

    assert not np.array_equal(first, second)


def test_random_signs_are_plus_or_minus_one_and_both_occur() -> None:
    signs = random_signs(4096)

    assert set(np.unique(signs)) == {-1.0, 1.0}
    assert 1700 < np.count_nonzero(signs > 0) < 2400


@pytest.mark.parametrize("magnitude", [2.0**-30, 1.0, 5.0])
def test_small_noise_is_bounded_by_its_magnitude(magnitude: float) -> None:
    noise = small_noise(20_000, magnitude)

    assert np.all(np.abs(noise) <= magnitude)
    assert noise.min() < -0.9 * magnitude and noise.max() > 0.9 * magnitude


# -- two dimensions per complex slot ----------------------------------------------


def test_pair_rows_packs_rows_2j_and_2j_plus_1_as_real_and_imaginary_parts() -> None:
    matrix = np.random.default_rng(1).uniform(-1, 1, (6, SLOTS))

    paired = pair_rows(matrix)

    assert paired.shape == (3, SLOTS)
    for j in range(3):
        assert np.array_equal(paired[j].real, matrix[2 * j])
        assert np.array_equal(paired[j].imag, matrix[2 * j + 1])


def test_pair_rows_of_an_odd_row_count_pads_the_last_imaginary_part_with_zero() -> None:
    matrix = np.random.default_rng(2).uniform(-1, 1, (5, 8))

    paired = pair_rows(matrix)

    assert paired.shape == (3, 8)
    assert np.array_equal(paired[2].real, matrix[4])
    assert np.array_equal(paired[2].imag, np.zeros(8))
    assert np.array_equal(paired[1].imag, matrix[3])


@pytest.mark.parametrize("dims, count", [(1, 1), (2, 1), (3, 2), (15, 8), (16, 8)])
def test_query_count_is_the_number_of_paired_rows(dims: int, count: int) -> None:
    assert query_count(dims) == count == len(pair_rows(np.ones((dims, 4))))


def test_paired_product_is_the_dot_product_plus_i_times_the_cross_terms() -> None:
    # Plain arithmetic the design relies on: (a + ib)(c - id) = ac + bd + i(bc - ad).
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(2, 6, 50))

    product = np.sum(pair_rows(x) * pair_rows(y).conj(), axis=0)

    assert np.allclose(product.real, np.sum(x * y, axis=0), atol=1e-12)
    cross = np.sum(x[1::2] * y[0::2] - x[0::2] * y[1::2], axis=0)
    assert np.allclose(product.imag, cross, atol=1e-12)
    assert np.max(np.abs(cross)) > 1.0


# -- score_position ---------------------------------------------------------------


def test_scenario_has_matches_non_matches_and_empty_positions(
    scenario: Scenario,
) -> None:
    depth = len(scenario.positions)
    scores = np.concatenate([scenario.scores(q) for q in range(depth)])

    assert np.count_nonzero(scores > THRESHOLD) > 50
    assert np.count_nonzero(scores < THRESHOLD) > 500
    assert np.any((scenario.positions < 0) & (scenario.owner >= 0))


def test_client_sends_one_query_per_two_dimensions(scenario: Scenario) -> None:
    assert len(scenario.queries) == query_count(DIMS) == DIMS // 2


def test_score_sign_equals_sign_of_score_minus_threshold_in_every_occupied_slot(
    scenario: Scenario, decrypted: list[np.ndarray]
) -> None:
    for q, values in enumerate(decrypted):
        keep = occupied_and_clear(scenario, q)
        expected = np.sign(scenario.scores(q)[keep] - THRESHOLD)

        assert np.array_equal(np.sign(values[keep].real), expected), f"position {q}"


def test_score_imaginary_part_is_nearly_zero_in_every_slot(
    decrypted: list[np.ndarray],
) -> None:
    # The cross terms of the packed dimensions would tell the client about the
    # server's vectors; the conjugate removes them before the reply is sent.
    for q, values in enumerate(decrypted):
        assert np.max(np.abs(values.imag)) < IMAG_TOLERANCE, f"position {q}"


def test_product_without_the_conjugate_carries_large_cross_terms(
    ckks: Ckks, public: PublicKeyHolder, secret: SecretKeyHolder, scenario: Scenario,
) -> None:
    # Without add_conjugate the imaginary part is sum_j (b c - a d), exactly
    # what score_position must not let through; with it, only 2 * score is left.
    plains = server_plain_matrix(scenario.server, scenario.positions[0])
    paired = pair_rows(plains).conj()
    acc = None
    for j in range(len(paired)):
        plain = ckks.encode(paired[j], linkage.QUERY_LEVEL, linkage.PLAIN_SCALE)
        acc = ckks.multiply_add(acc, scenario.queries[j], plain)
    m = scenario.matrix
    cross = np.sum(m[1::2] * plains[0::2] - m[0::2] * plains[1::2], axis=0)
    score = np.sum(m * plains, axis=0)

    raw = secret.decrypt(acc)
    ckks.add_conjugate(acc, public.galois_keys)
    conjugated = secret.decrypt(acc)

    assert np.max(np.abs(raw.imag)) > 0.1
    assert np.max(np.abs(raw.imag - cross)) < SCORE_TOLERANCE
    assert np.max(np.abs(raw.real - score)) < SCORE_TOLERANCE
    assert np.max(np.abs(conjugated.imag)) < IMAG_TOLERANCE
    assert np.max(np.abs(conjugated.real - 2 * score)) < SCORE_TOLERANCE


def test_blinding_factor_lies_within_two_to_the_minus_4_and_4(
    scenario: Scenario, decrypted: list[np.ndarray]
) -> None:
    factors = []
    for q, values in enumerate(decrypted):
        # Far from the threshold, so CKKS noise moves the ratio by under 1e-3.
        keep = (scenario.owner >= 0) & (np.abs(scenario.scores(q) - THRESHOLD) > 1e-2)
        factors.append(values[keep].real / (2 * (scenario.scores(q)[keep] - THRESHOLD)))
    factors = np.concatenate(factors)

    assert factors.min() >= 2.0**LOW * (1 - 1e-3)
    assert factors.max() <= 2.0**HIGH * (1 + 1e-3)
    assert factors.min() < 2.0 ** (LOW + 0.5) and factors.max() > 2.0 ** (HIGH - 0.5)


def test_blinding_factor_is_not_constant_across_slots(
    scenario: Scenario, decrypted: list[np.ndarray]
) -> None:
    keep = (scenario.owner >= 0) & (np.abs(scenario.scores(0) - THRESHOLD) > 1e-2)
    ratio = decrypted[0][keep].real / (scenario.scores(0)[keep] - THRESHOLD)
    exponents = np.log2(ratio)

    assert exponents.max() - exponents.min() > 6.0
    assert np.std(exponents) > 1.0


def test_blinding_factors_are_fresh_for_each_ciphertext(
    ckks: Ckks, public: PublicKeyHolder, scenario: Scenario, decrypt_score: Decrypt,
) -> None:
    plains = server_plain_matrix(scenario.server, scenario.positions[0])
    first, second = (
        decrypt_score(linkage.score_position(ckks, public, scenario.queries, plains,
                                             THRESHOLD)).real
        for _ in range(2)
    )
    keep = occupied_and_clear(scenario, 0)

    assert np.array_equal(np.sign(first[keep]), np.sign(second[keep]))
    assert np.max(np.abs(first[keep] / second[keep] - 1.0)) > 0.5


@pytest.mark.parametrize("factor", [2.0**LOW, 1.0, 2.0**HIGH * (1 - 1e-9)])
def test_reply_is_twice_the_factor_times_score_minus_threshold(
    ckks: Ckks, public: PublicKeyHolder, scenario: Scenario, decrypt_score: Decrypt,
    fixed_factor: Callable[[float], list], factor: float,
) -> None:
    asked = fixed_factor(factor)
    plains = server_plain_matrix(scenario.server, scenario.positions[0])

    reply = linkage.score_position(ckks, public, scenario.queries, plains, THRESHOLD)
    values = decrypt_score(reply)

    expected = 2 * factor * (scenario.scores(0) - THRESHOLD)
    assert asked == [(SLOTS, LOW, HIGH)]
    assert np.max(np.abs(values.real - expected)) < SCORE_TOLERANCE * max(factor, 1)
    assert np.max(np.abs(values.imag)) < IMAG_TOLERANCE


def test_odd_dimension_count_pads_the_last_query_and_still_scores_exactly(
    ckks: Ckks, public: PublicKeyHolder, secret: SecretKeyHolder, scenario: Scenario,
    decrypt_score: Decrypt, fixed_factor: Callable[[float], list],
) -> None:
    fixed_factor(1.0)
    client = scenario.matrix[:15]
    server = server_plain_matrix(scenario.server[:, :15], scenario.positions[0])
    queries = [linkage.load_query(ckks, query_bytes_of(secret, r))
               for r in pair_rows(client)]

    values = decrypt_score(linkage.score_position(ckks, public, queries, server,
                                                  THRESHOLD))

    assert len(queries) == query_count(15) == 8
    expected = 2 * (np.sum(client * server, axis=0) - THRESHOLD)
    assert np.max(np.abs(values.real - expected)) < SCORE_TOLERANCE


def test_slots_without_a_client_record_decrypt_negative(
    scenario: Scenario, decrypted: list[np.ndarray]
) -> None:
    # An empty slot scores 0 against anything, which is below a positive threshold.
    empty = scenario.owner < 0
    assert np.count_nonzero(empty) > 1000

    assert all(np.all(values[empty].real < 0.0) for values in decrypted)


def test_position_with_only_zero_server_vectors_gives_a_last_level_negative_reply(
    ckks: Ckks, public: PublicKeyHolder, scenario: Scenario, decrypt_score: Decrypt,
) -> None:
    plains = np.zeros((DIMS, SLOTS))

    reply = linkage.score_position(ckks, public, scenario.queries, plains, THRESHOLD)
    values = decrypt_score(reply)  # refused unless at the score level and scale

    assert np.all(values.real < 0.0)
    assert np.all(-values.real >= 2 * THRESHOLD * 2.0**LOW * (1 - 1e-3))
    assert np.all(-values.real <= 2 * THRESHOLD * 2.0**HIGH * (1 + 1e-3))
    assert np.max(np.abs(values.imag)) < IMAG_TOLERANCE


# -- decisions on the client's side -----------------------------------------------


def test_decisions_equal_the_plain_candidates(
    scenario: Scenario, decrypted: list[np.ndarray]
) -> None:
    found, expected = set(), set()
    for q, values in enumerate(decrypted):
        clear = occupied_and_clear(scenario, q)
        found |= {(int(r), q) for r in linkage.decide(values, scenario.owner)
                  if clear[scenario.slot[r]]}
        hits = clear & (scenario.scores(q) >= THRESHOLD) & (scenario.positions[q] >= 0)
        expected |= {(int(scenario.owner[s]), q) for s in np.flatnonzero(hits)}

    assert found == expected
    assert len(expected) > 50


def test_slot_owners_names_the_client_row_of_each_slot_of_one_group() -> None:
    slot = np.array([0, SLOTS + 1, -1, 5, SLOTS, 2 * SLOTS - 1])

    first, second = linkage.slot_owners(slot, 0), linkage.slot_owners(slot, 1)

    assert first.shape == second.shape == (SLOTS,)
    assert first[0] == 0 and first[5] == 3
    assert np.count_nonzero(first >= 0) == 2
    assert second[0] == 4 and second[1] == 1 and second[SLOTS - 1] == 5
    assert np.count_nonzero(second >= 0) == 3


def test_decide_returns_owners_of_non_negative_slots_only() -> None:
    owner = np.full(SLOTS, -1)
    owner[[0, 1, 2, 3]] = [7, 8, 9, 10]
    values = np.full(SLOTS, 0.5)  # padding slots are positive and must be ignored
    values[[0, 1, 2, 3]] = [0.25, -0.25, 0.0, -1e-9]

    assert sorted(linkage.decide(values, owner).tolist()) == [7, 9]


def test_decide_reads_the_real_part_of_complex_values_only() -> None:
    owner = np.full(SLOTS, -1)
    owner[[0, 1, 2, 3]] = [7, 8, 9, 10]
    values = np.zeros(SLOTS, dtype=complex)
    values[[0, 1, 2, 3]] = [0.25 - 1e-6j, -0.25 + 1e-6j, 1e-3 - 0.5j, -1e-3 + 0.5j]

    assert sorted(linkage.decide(values, owner).tolist()) == [7, 9]


def test_decide_with_no_positive_slot_returns_nothing() -> None:
    owner = np.arange(SLOTS)

    assert linkage.decide(np.full(SLOTS, -1.0 + 1.0j), owner).size == 0


# -- the worker functions, run in this process ---------------------------------------


@pytest.fixture
def worker(
    ckks: Ckks, secret: SecretKeyHolder, scenario: Scenario,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Worker]:
    """init_worker as a pool would call it, in a private copy of the worker state."""
    monkeypatch.setattr(executor, "_WORKER", [])
    key_bytes, galois_bytes = secret.public_bytes()
    state = executor.init_worker(
        WorkerSetup(ckks.name, key_bytes, galois_bytes, scenario.server, THRESHOLD)
    )
    yield state
    state.ckks.close()


def expect_signs(ckks: Ckks, secret: SecretKeyHolder, scenario: Scenario,
                 replies: list[bytes]) -> None:
    """Every reply is a LAST-level ciphertext with the signs of its position."""
    for q, data in enumerate(replies):
        values = secret.decrypt(linkage.load_score(ckks, data))
        keep = occupied_and_clear(scenario, q)
        expected = np.sign(scenario.scores(q)[keep] - THRESHOLD)
        assert np.array_equal(np.sign(values[keep].real), expected), q
        assert np.max(np.abs(values.imag)) < IMAG_TOLERANCE, q


def test_score_rows_gives_the_signs_of_score_position(
    ckks: Ckks, secret: SecretKeyHolder, scenario: Scenario, worker: Worker,
) -> None:
    rows = scenario.positions[:3]

    replies = linkage.score_rows(worker, scenario.query_bytes, rows)

    assert len(replies) == len(rows)
    expect_signs(ckks, secret, scenario, replies)


def test_init_worker_refuses_galois_keys_without_the_conjugation(
    ckks: Ckks, secret: SecretKeyHolder, scenario: Scenario,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(executor, "_WORKER", [])
    steps = rotation_steps(ckks.slots)
    holder = SecretKeyHolder(ckks, [ckks.galois_element(s) for s in steps])
    key_bytes, galois_bytes = holder.public_bytes()

    with pytest.raises(ProtocolError, match="missing"):
        executor.init_worker(WorkerSetup(ckks.name, key_bytes, galois_bytes,
                                         scenario.server, THRESHOLD))
    assert executor._WORKER == []


def test_score_rows_refuses_a_truncated_query(
    scenario: Scenario, worker: Worker
) -> None:
    wrong = [scenario.query_bytes[0][:-1]] + scenario.query_bytes[1:]

    with pytest.raises(ProtocolError):
        linkage.score_rows(worker, wrong, scenario.positions[:1])


def test_score_rows_refuses_a_reply_sent_back_as_a_query(
    ckks: Ckks, scenario: Scenario, worker: Worker
) -> None:
    (reply,) = linkage.score_rows(worker, scenario.query_bytes, scenario.positions[:1])
    wrong = [reply] + scenario.query_bytes[1:]

    with pytest.raises(ProtocolError, match="scale"):
        linkage.score_rows(worker, wrong, scenario.positions[:1])


class ThreadScoring:
    """The executor interface over threads, in this process's worker state."""

    def __init__(self, pool: ThreadPoolExecutor, workers: int) -> None:
        self.pool, self.workers = pool, workers

    def submit(self, task, *args):
        return self.pool.submit(executor._run, task, *args)


def test_submit_group_futures_are_in_position_order(
    ckks: Ckks, secret: SecretKeyHolder, scenario: Scenario, worker: Worker,
) -> None:
    positions = scenario.positions
    with ThreadPoolExecutor(max_workers=2) as threads:
        pool = ThreadScoring(threads, workers=3)
        futures = submit_group(pool, scenario.query_bytes, positions)
        replies = [data for future in futures for data in future.result()]

    assert len(futures) == 3
    assert len(replies) == len(positions)
    expect_signs(ckks, secret, scenario, replies)


def test_submit_group_submits_nothing_for_a_group_without_positions(
    scenario: Scenario, worker: Worker
) -> None:
    with ThreadPoolExecutor(max_workers=1) as threads:
        futures = submit_group(ThreadScoring(threads, workers=2), scenario.query_bytes,
                               np.zeros((0, SLOTS), dtype=np.int64))

    assert futures == []


def test_one_ciphertext_sent_for_every_dimension_is_refused_not_crashed(
    ckks: Ckks, secret: SecretKeyHolder, public: PublicKeyHolder
) -> None:
    # Signed hashing puts +c and -c in two dimensions of one record, so the
    # server's first two plaintexts cancel. Fresh queries have independent
    # random halves and never sum to a transparent ciphertext; the same query
    # twice does, which SEAL refuses: the session must end with a protocol
    # error, not an internal one.
    plains = np.zeros((4, SLOTS))
    plains[0, 0], plains[2, 0] = 0.5, -0.5
    query = linkage.load_query(ckks, query_bytes_of(secret, np.zeros(SLOTS)))
    other = linkage.load_query(ckks, query_bytes_of(secret, np.zeros(SLOTS)))

    linkage.score_position(ckks, public, [query, other], plains, THRESHOLD)
    with pytest.raises(ProtocolError, match="queries refused"):
        linkage.score_position(ckks, public, [query, query], plains, THRESHOLD)
