"""Phase 3, the subquery-size check: is every cell's count at least k?

What crosses the wire:

- S -> C: SIZE_CHECK (JSON: how many values are asked, ``m``), then m
  SIZE_CHECK_CT. Every slot of each holds sigma * r * (n - k + 1/2) plus
  small slot noise. For a real cell, n is its encrypted count (the server
  folded sigma * r into the plaintexts it multiplied the selections with);
  for a decoy, n is a number the server drew itself. sigma is a random sign,
  r = 2^u with u uniform in [-16, -2), and real cells and decoys are shuffled
  together. Decoys go through the same rescale and rotations as real cells,
  and every ciphertext gets a fresh encryption of zero.
- C -> S: SIZE_CHECK_SIGNS, exactly m signs, one bit per value, and nothing
  else: no decrypted value ever goes back (handing CKKS decryptions to the
  holder of the evaluation would expose the secret key; Li and Micciancio,
  EUROCRYPT 2021).

Who learns what:

- The server learns one bit per cell, n >= k (the test is inclusive: a cell
  with exactly k linked people passes), after undoing sigma. The decoys, whose
  signs it knows, catch a client that answers anything but the true signs: a
  client that changes one answer hits a decoy with probability D / (C + D).
- The client learns nothing from a sign: sigma makes every answer a coin flip
  to it. It cannot tell decoys from cells, and it answers only the number of
  values the server announced, which it checks against the table's shape. The
  magnitude of a value is r |n - k + 1/2| with r spread over 14 octaves.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import tenseal.sealapi as sa

from .blinding import log_uniform_factors, random_signs, small_noise
from .framing import ProtocolError
from .he import LAST, TOP, Ckks, PublicKeyHolder
from .layout import SLOTS

if TYPE_CHECKING:
    from .executor import Worker

# 14 octaves; the largest value, 2^-2 * 2^20, stays under CKKS's 2^19 headroom,
# and the smallest, 2^-17, is far above the slot noise of 2^-24.
CHECK_FACTOR_EXPONENTS = (-16.0, -2.0)
CHECK_NOISE = 2.0**-24


def decoy_count(cells: int) -> int:
    """Decoys per query: at least 32, and three per cell."""
    return max(32, 3 * cells)


def values_asked(cells: int) -> int:
    return cells + decoy_count(cells)


def check_factors(cells: int) -> np.ndarray:
    """sigma * r per cell: drawn before the cross-tab sums, folded into them."""
    return random_signs(cells) * log_uniform_factors(cells, *CHECK_FACTOR_EXPONENTS)


@dataclass(frozen=True)
class CheckKey:
    """What the server keeps to read the answers: never sent."""

    slot_of_cell: np.ndarray
    decoy_slots: np.ndarray
    decoy_signs: np.ndarray
    cell_signs: np.ndarray

    def verdict(self, answers: np.ndarray) -> np.ndarray:
        """Per cell: passed. Raises ProtocolError if any decoy answer is wrong."""
        if not np.array_equal(answers[self.decoy_slots], self.decoy_signs > 0):
            raise ProtocolError("the size-check answers are inconsistent; closing")
        return answers[self.slot_of_cell] == (self.cell_signs > 0)


@dataclass(frozen=True)
class Decoys:
    """The decoys of one check: drawn first, so their totals can be made early."""

    factors: np.ndarray  # sigma * r, as for cells
    counts: np.ndarray  # the n each decoy pretends to be


def draw_decoys(cells: int, min_cell_size: int, size_class: int) -> Decoys:
    count = decoy_count(cells)
    return Decoys(check_factors(count), _decoy_counts(count, min_cell_size, size_class))


def build_check(
    ckks: Ckks,
    public: PublicKeyHolder,
    checks: list[sa.Ciphertext | None],
    factors: np.ndarray,
    min_cell_size: int,
    size_class: int,
    fresh: Callable[[list[float]], list[sa.Ciphertext]] | None = None,
    decoys: tuple[Decoys, list[sa.Ciphertext]] | None = None,
) -> tuple[list[sa.Ciphertext], CheckKey]:
    """The check ciphertexts for all cells plus decoys, shuffled, and the key.

    ``checks[c]`` holds factors[c] * n_c in every slot, or is None when no
    server record of cell c sits at any position (n_c = 0 for certain). The
    offsets are added to those ciphertexts in place: build one check per
    accumulator. ``fresh`` makes the totals of those empty cells. The decoys'
    check values are drawn and made here unless ``decoys`` brings them, made
    before (:func:`decoy_checks`, on the workers).
    """
    if fresh is None:

        def fresh(values: list[float]) -> list[sa.Ciphertext]:
            return [_fresh_total(ckks, public, v) for v in values]

    cells = len(checks)
    if decoys is None:
        drawn = draw_decoys(cells, min_cell_size, size_class)
        decoys = (
            drawn,
            [
                _decoy_check(ckks, public, f, n, min_cell_size)
                for f, n in zip(drawn.factors, drawn.counts)
            ],
        )
    chosen, decoy_values = decoys
    if len(decoy_values) != decoy_count(cells):
        raise ValueError(f"{len(decoy_values)} decoy values for {cells} cells")
    order = _permutation(cells + len(decoy_values))
    empty = [c for c in range(cells) if checks[c] is None]
    totals = list(checks)
    for c, total in zip(empty, fresh([0.0] * len(empty)) if empty else []):
        totals[c] = total
    values: list[sa.Ciphertext | None] = [None] * len(order)
    for c in range(cells):
        values[order[c]] = _offset(ckks, public, totals[c], factors[c], min_cell_size)
    for j, value in enumerate(decoy_values):
        values[order[cells + j]] = value
    true_decoy = np.sign(chosen.factors * (chosen.counts - min_cell_size + 0.5))
    return values, CheckKey(order[:cells], order[cells:], true_decoy, np.sign(factors))


def _offset(
    ckks: Ckks,
    public: PublicKeyHolder,
    total: sa.Ciphertext,
    factor: float,
    min_cell_size: int,
) -> sa.Ciphertext:
    """factor * (n - k + 1/2) plus slot noise, re-randomised."""
    shift = factor * (0.5 - min_cell_size) + small_noise(SLOTS, CHECK_NOISE)
    ckks.evaluator.add_plain_inplace(total, ckks.encode(shift, LAST, total.scale))
    public.rerandomise(total)
    return total


def fresh_totals(worker: Worker, values: list[float]) -> list[bytes]:
    """Worker task: :func:`_fresh_total` of each value, serialised."""
    return [
        worker.ckks.to_bytes(_fresh_total(worker.ckks, worker.public, v))
        for v in values
    ]


def decoy_checks(
    worker: Worker, factors: list[float], counts: list[float], min_cell_size: int
) -> list[bytes]:
    """Worker task: :func:`_decoy_check` of each (factor, count), serialised."""
    ckks, public = worker.ckks, worker.public
    return [
        ckks.to_bytes(_decoy_check(ckks, public, f, n, min_cell_size))
        for f, n in zip(factors, counts)
    ]


def _decoy_check(
    ckks: Ckks, public: PublicKeyHolder, factor: float, count: float, min_cell_size: int
) -> sa.Ciphertext:
    """One decoy's check value: the total of ``count`` made as a real cell's
    is, then offset and re-randomised as a real cell's check is."""
    total = _fresh_total(ckks, public, factor * count)
    return _offset(ckks, public, total, factor, min_cell_size)


def load_total(ckks: Ckks, data: bytes) -> sa.Ciphertext:
    """A summed total or a decoy's check value from a worker, checked: last
    level, the final scale."""
    return ckks.load_ciphertext_untrusted(data, LAST, ckks.final_scale())


def _fresh_total(ckks: Ckks, public: PublicKeyHolder, value: float) -> sa.Ciphertext:
    """An encryption of ``value`` in every slot, made the way real totals are:
    a top-level ciphertext at scale 2^80, rescaled, then summed over its slots.
    """
    plain = ckks.encode(np.full(SLOTS, value / SLOTS), TOP, ckks.scale * ckks.scale)
    total = public.encrypt(plain)
    ckks.evaluator.rescale_to_next_inplace(total)
    ckks.rotate_sum(total, public.galois_keys)
    return total


def _permutation(count: int) -> np.ndarray:
    order = list(range(count))
    for i in range(count - 1, 0, -1):
        j = secrets.randbelow(i + 1)
        order[i], order[j] = order[j], order[i]
    return np.array(order, dtype=np.int64)


def _decoy_counts(count: int, min_cell_size: int, size_class: int) -> np.ndarray:
    """Half near the threshold, half spread log-uniformly up to the padded size."""
    near = [secrets.randbelow(2 * min_cell_size + 2) for _ in range(count // 2)]
    far = np.floor(log_uniform_factors(count - len(near), 0.0, np.log2(size_class))) - 1
    return np.concatenate([np.array(near, dtype=np.float64), np.maximum(far, 0.0)])


def check_asked(asked: int, cells: int) -> None:
    """The client answers only as many values as the table's shape allows."""
    if asked != values_asked(cells):
        raise ProtocolError(
            f"size check asks {asked} values; this table allows {values_asked(cells)}"
        )


def answer_check(values: list[complex], asked: int, cells: int) -> str:
    """The client's answer: '1' (positive) or '0' per asked value, nothing more."""
    check_asked(asked, cells)
    if len(values) != asked:
        raise ProtocolError(f"expected {asked} decrypted values, found {len(values)}")
    return "".join("1" if np.real(v) > 0 else "0" for v in values)


def parse_answers(text: object, asked: int) -> np.ndarray:
    """The server's side: exactly ``asked`` characters of '0'/'1'."""
    if not isinstance(text, str) or len(text) != asked or set(text) - {"0", "1"}:
        raise ProtocolError(
            "size-check answers must be a string of 0s and 1s of the asked length"
        )
    return np.frombuffer(text.encode(), dtype=np.uint8) == ord("1")
