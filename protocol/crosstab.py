"""Phase 4, the cross-tab: encrypted sums and counts per cell, returned blinded.

What crosses the wire:

- C -> S (after linkage, before the size check): one SELECTION_CT per server
  position of every group of every pass, in the order the scores came. Slot s
  is 1 when the client record in slot s links to that position (the rule of
  :mod:`.reference`: all candidates of the first pass that has any), else 0.
- S -> C (only if the size check passed): TABLE, a JSON header with the cell
  labels and the public scales, and TABLE_CT, one ciphertext whose slot c holds
  rho_c * sum_c / V and slot C + c holds rho_c * count_c, for a fresh factor
  rho_c in [1, 2) per cell; slot 2C + c holds count_c only when the server's
  policy reveals counts.

The server multiplies each selection by plaintexts of (value / V) * [record in
cell c] and of [record in cell c], adds everything up, and sums the slots with
rotations. It never decrypts, so it learns neither which positions were
selected nor any sum or count. The client divides the two blinded numbers of a
cell and learns the average alone (and the count where allowed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tenseal.sealapi as sa

from .blinding import log_uniform_factors
from .he import Ckks, PublicKeyHolder
from .layout import SLOTS


@dataclass
class CellAccumulator:
    """Running encrypted sums and counts per cell (level 0, scale 2^80), then totals."""

    cells: int
    sums: list[sa.Ciphertext | None] = field(default_factory=list)
    counts: list[sa.Ciphertext | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sums = [None] * self.cells
        self.counts = [None] * self.cells


def add_selection(
    ckks: Ckks, acc: CellAccumulator, selection: sa.Ciphertext,
    cell_row: np.ndarray, value_row: np.ndarray,
) -> int:
    """Add selection * plaintexts of one position row; returns plaintext products done."""
    usable = (cell_row >= 0) & np.isfinite(value_row)
    products = 0
    for c in np.unique(cell_row[usable]):
        mask = usable & (cell_row == c)
        sums = np.where(mask, value_row, 0.0)
        if np.any(sums != 0.0):
            # SEAL refuses a product with an all-zero plaintext ("transparent").
            _accumulate(ckks, acc.sums, c, selection, sums)
            products += 1
        _accumulate(ckks, acc.counts, c, selection, mask.astype(np.float64))
        products += 1
    return products


def _accumulate(ckks: Ckks, into: list, cell: int, selection: sa.Ciphertext,
                values: np.ndarray) -> None:
    product = sa.Ciphertext()
    ckks.evaluator.multiply_plain(selection, ckks.encode(values), product)
    if into[cell] is None:
        into[cell] = product
    else:
        ckks.evaluator.add_inplace(into[cell], product)


def finish_totals(ckks: Ckks, acc: CellAccumulator, galois: sa.GaloisKeys) -> None:
    """Rescale each accumulator and sum its slots: every slot then holds the total."""
    for totals in (acc.sums, acc.counts):
        for ciphertext in totals:
            if ciphertext is not None:
                ckks.evaluator.rescale_to_next_inplace(ciphertext)
                ckks.rotate_sum(ciphertext, galois)


@dataclass(frozen=True)
class TableScales:
    value_scale: float
    count_scale: float


def count_scale(size_class: int) -> float:
    """Divide counts by this so blinded numbers stay under 2^18 (CKKS headroom 2^19)."""
    return float(max(1, size_class >> 16))


def build_table(
    ckks: Ckks, public: PublicKeyHolder, acc: CellAccumulator,
    scales: TableScales, reveal_counts: bool,
) -> sa.Ciphertext:
    """One ciphertext: blinded sums, blinded counts, and (if allowed) plain counts."""
    cells = acc.cells
    rho = log_uniform_factors(cells, 0.0, 1.0)
    terms = []
    for c in range(cells):
        terms.append((acc.sums[c], c, rho[c] / scales.count_scale))
        terms.append((acc.counts[c], cells + c, rho[c] / scales.count_scale))
        if reveal_counts:
            terms.append((acc.counts[c], 2 * cells + c, 1.0 / scales.count_scale))
    return masked_sum(ckks, public, terms)


def masked_sum(ckks: Ckks, public: PublicKeyHolder,
               terms: list[tuple[sa.Ciphertext | None, int, float]],
               offset: np.ndarray | None = None) -> sa.Ciphertext:
    """Sum of factor * (slot 0 of ciphertext) placed at a chosen slot, level 2.

    Each term's ciphertext holds its total in every slot; multiplying it by a
    one-hot plaintext keeps one copy. Terms whose ciphertext is None are zero.
    """
    evaluator, out, product = ckks.evaluator, None, sa.Ciphertext()
    for ciphertext, slot, factor in terms:
        if ciphertext is None:
            continue
        mask = np.zeros(SLOTS)
        mask[slot] = factor
        evaluator.multiply_plain(ciphertext, ckks.encode(mask, 1), product)
        if out is None:
            out, product = product, sa.Ciphertext()
        else:
            evaluator.add_inplace(out, product)
    if out is None:
        raise ValueError("masked_sum needs at least one non-empty term")
    evaluator.rescale_to_next_inplace(out)
    if offset is not None:
        evaluator.add_plain_inplace(out, ckks.encode(offset, 2, out.scale))
    evaluator.add_inplace(out, public.encrypt_zero(out))
    return out


def read_table(values: np.ndarray, cells: int, scales: TableScales,
               counts_revealed: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The client's side: averages (and counts) from the decrypted table slots."""
    numerators, denominators = values[:cells], values[cells : 2 * cells]
    averages = scales.value_scale * numerators / denominators
    counts = None
    if counts_revealed:
        counts = np.rint(values[2 * cells : 3 * cells] * scales.count_scale).astype(np.int64)
    return averages, counts
