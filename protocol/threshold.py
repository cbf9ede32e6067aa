"""Phase 3, the subquery-size check: is every cell's count at least k?

What crosses the wire:

- S -> C: SIZE_CHECK (JSON: how many values are asked, ``m``) and
  SIZE_CHECK_CT, one ciphertext whose first m slots each hold
  sigma * r * (n - k + 1/2) / 2^a. For a real cell, n is its encrypted count;
  for a decoy, n is a number the server drew itself. sigma is a random sign,
  r = 2^u with u uniform in [-12, 0), and real cells and decoys are shuffled
  together. The server adds a fresh encryption of zero.
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
  values the server announced, which it checks against the table's shape.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
import tenseal.sealapi as sa

from .blinding import log_uniform_factors, random_signs
from .crosstab import masked_sum
from .framing import ProtocolError
from .he import Ckks, PublicKeyHolder
from .layout import SLOTS

CHECK_FACTOR_EXPONENTS = (-12.0, 0.0)


def decoy_count(cells: int) -> int:
    """Decoys per query: at least 32, and three per cell."""
    return max(32, 3 * cells)


def values_asked(cells: int) -> int:
    return cells + decoy_count(cells)


def check_shift(size_class: int) -> float:
    """2^a: keeps |n - k + 1/2| / 2^a under 2^7 for any count up to the padded size."""
    return float(max(1, size_class >> 7))


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


def build_check(
    ckks: Ckks, public: PublicKeyHolder, counts: list[sa.Ciphertext | None],
    min_cell_size: int, size_class: int,
) -> tuple[sa.Ciphertext, CheckKey]:
    """The check ciphertext for all cells plus decoys, and the key to read it.

    At least one cell must have an accumulator: when none has, no server record
    of any cell sits at any position, every count is zero, and the server
    refuses without asking.
    """
    cells, decoys = len(counts), decoy_count(len(counts))
    slots = _permutation(cells + decoys)
    sigma = random_signs(cells + decoys)
    factor = log_uniform_factors(cells + decoys, *CHECK_FACTOR_EXPONENTS) * sigma
    factor /= check_shift(size_class)
    offset = np.zeros(SLOTS)
    offset[slots] = factor * (0.5 - min_cell_size)
    drawn = _decoy_counts(decoys, min_cell_size, size_class)
    offset[slots[cells:]] += factor[cells:] * drawn
    terms = [(counts[c], int(slots[c]), float(factor[c])) for c in range(cells)]
    ciphertext = masked_sum(ckks, public, terms, offset)
    true_decoy = sigma[cells:] * (drawn - min_cell_size + 0.5)
    key = CheckKey(slots[:cells], slots[cells:], np.sign(true_decoy), sigma[:cells])
    return ciphertext, key


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


def answer_check(values: np.ndarray, asked: int, cells: int) -> str:
    """The client's answer: one '1' (positive) or '0' per asked value, nothing more."""
    if asked != values_asked(cells):
        raise ProtocolError(f"size check asks {asked} values; this table allows "
                            f"{values_asked(cells)}")
    return "".join("1" if v > 0 else "0" for v in values[:asked])


def parse_answers(text: object, asked: int) -> np.ndarray:
    """The server's side: exactly ``asked`` characters of '0'/'1'."""
    if not isinstance(text, str) or len(text) != asked or set(text) - {"0", "1"}:
        raise ProtocolError("size-check answers must be a string of 0s and 1s of the asked length")
    return np.frombuffer(text.encode(), dtype=np.uint8) == ord("1")
