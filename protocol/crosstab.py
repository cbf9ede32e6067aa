"""Phase 4, the cross-tab: encrypted sums and counts per cell, returned blinded.

What crosses the wire:

- C -> S (during the linkage, see :mod:`.messages`): for each pass, after the
  next pass's queries, one SELECTION_CT per server position of each of its
  groups, in the order the scores came. Slot s is 1 when the client record in
  slot s links to that position (the rule of :mod:`.reference`: all
  candidates of the first pass that has any), else 0.
- S -> C (only if the size check passed): TABLE, a JSON header with the public
  scales, and then one TABLE_CT per cell, every slot of which holds
  rho_c / S * (sum_c / V + i * count_c) for a fresh factor rho_c in [1, 2);
  then, only when the server's policy reveals counts, one more TABLE_CT per
  cell holding count_c / S.

The server multiplies each selection by a plaintext of rho_c * (value / V + i)
at the positions of records of cell c, adds everything up, and sums the slots
with rotations. It never decrypts, so it learns neither which positions were
selected nor any sum or count. The client divides the real part by the
imaginary part and learns the average alone (and the count where allowed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import tenseal.sealapi as sa

from .blinding import log_uniform_factors
from .he import TOP, Ckks, PublicKeyHolder
from .layout import server_value_row

if TYPE_CHECKING:
    from .executor import Worker


@dataclass
class CellAccumulator:
    """Running encrypted totals per cell: table, size check and (if revealed) count.

    ``rho`` blinds a cell's table entry and ``check`` is the factor of its size
    check (see :mod:`.threshold`); both are drawn once per session.
    """

    rho: np.ndarray
    check: np.ndarray
    reveal_counts: bool
    table: list[sa.Ciphertext | None] = field(default_factory=list)
    checks: list[sa.Ciphertext | None] = field(default_factory=list)
    counts: list[sa.Ciphertext | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.table = [None] * self.cells
        self.checks = [None] * self.cells
        self.counts = [None] * self.cells

    @property
    def cells(self) -> int:
        return len(self.rho)


@dataclass(frozen=True)
class TableWork:
    """What a worker needs to add selections into the cells of one session.

    ``cells`` and ``values`` are per server record (cell -1: in none; value
    already divided by the value scale, NaN: missing); ``rho`` and ``check``
    are the session's secret factors per cell.
    """

    cells: np.ndarray
    values: np.ndarray
    count_scale: float
    rho: np.ndarray
    check: np.ndarray
    reveal_counts: bool

    def accumulator(self) -> CellAccumulator:
        return CellAccumulator(self.rho, self.check, self.reveal_counts)


def table_factors(cells: int) -> np.ndarray:
    """rho_c in [1, 2): one fresh factor per cell and session."""
    return log_uniform_factors(cells, 0.0, 1.0)


def add_selection(
    ckks: Ckks,
    acc: CellAccumulator,
    selection: sa.Ciphertext,
    cell_row: np.ndarray,
    value_row: np.ndarray,
    count_scale: float = 1.0,
) -> int:
    """Add selection * plaintexts of one position row; returns products done.

    ``value_row`` is already divided by V; NaN marks a record without a value,
    which is in no cell. Every plaintext is non-zero wherever its cell has a
    record (SEAL refuses a product with an all-zero plaintext).
    """
    usable = (cell_row >= 0) & np.isfinite(value_row)
    products = 0
    for c in np.unique(cell_row[usable]):
        mask = (usable & (cell_row == c)).astype(np.float64)
        entry = (
            acc.rho[c] / count_scale * (np.where(mask > 0, value_row, 0.0) + 1j * mask)
        )
        _accumulate(ckks, acc.table, c, selection, entry)
        _accumulate(ckks, acc.checks, c, selection, acc.check[c] * mask)
        products += 2
        if acc.reveal_counts:
            _accumulate(ckks, acc.counts, c, selection, mask / count_scale)
            products += 1
    return products


def add_rows(
    ckks: Ckks,
    acc: CellAccumulator,
    work: TableWork,
    selections: list[sa.Ciphertext],
    rows: np.ndarray,
) -> None:
    """Add each selection times the plaintexts of its position row."""
    for selection, row in zip(selections, rows):
        add_selection(
            ckks,
            acc,
            selection,
            server_value_row(work.cells, row, fill=-1),
            server_value_row(work.values, row, fill=np.nan),
            work.count_scale,
        )


def load_selection(ckks: Ckks, data: bytes) -> sa.Ciphertext:
    """A client's selection ciphertext, checked: fresh, top level, scale 2^40."""
    return ckks.load_ciphertext_untrusted(data, TOP, ckks.scale)


def sum_rows(
    worker: Worker, selection_bytes: list[bytes], rows: np.ndarray
) -> list[list[bytes | None]]:
    """Worker task: partial sums of some positions, as (table, checks, counts)
    lists of unrescaled ciphertexts per cell (None where a cell has none)."""
    ckks, work = worker.ckks, worker.setup.table
    acc = work.accumulator()
    selections = [load_selection(ckks, b) for b in selection_bytes]
    add_rows(ckks, acc, work, selections, rows)
    return [
        [None if c is None else ckks.to_bytes(c) for c in totals]
        for totals in (acc.table, acc.checks, acc.counts)
    ]


def merge_partial(
    ckks: Ckks, acc: CellAccumulator, partial: list[list[bytes | None]]
) -> None:
    """Add a worker's partial sums into ``acc`` (the server's own bytes, still
    checked: top level, the scale of one product)."""
    for into, part in zip((acc.table, acc.checks, acc.counts), partial):
        for cell, data in enumerate(part):
            if data is not None:
                total = ckks.load_ciphertext_untrusted(data, TOP, ckks.scale**2)
                if into[cell] is None:
                    into[cell] = total
                else:
                    ckks.evaluator.add_inplace(into[cell], total)


def _accumulate(
    ckks: Ckks, into: list, cell: int, selection: sa.Ciphertext, values: np.ndarray
) -> None:
    into[cell] = ckks.multiply_add(into[cell], selection, ckks.encode(values))


def finish_totals(ckks: Ckks, acc: CellAccumulator, galois: sa.GaloisKeys) -> None:
    """Rescale each accumulator and sum its slots: every slot then holds the total."""
    for totals in (acc.table, acc.checks, acc.counts):
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


def table_ciphertexts(
    ckks: Ckks, public: PublicKeyHolder, acc: CellAccumulator
) -> list[sa.Ciphertext]:
    """The cells' table entries, then their counts if revealed, re-randomised
    in place (call once per session).

    A cell no server record of which sits at any position has no accumulator:
    its entry is a fresh encryption of zero sum and zero count (the size check
    has refused any such query before this is called).
    """
    entries = acc.table + (acc.counts if acc.reveal_counts else [])
    present = next((c for c in entries if c is not None), None)
    if present is None:
        raise ValueError(
            "table_ciphertexts needs at least one cell with an accumulator"
        )
    out = []
    for ciphertext in entries:
        ciphertext = (
            ciphertext if ciphertext is not None else public.encrypt_zero(present)
        )
        public.rerandomise(ciphertext)
        out.append(ciphertext)
    return out


def read_table(
    entries: list[np.ndarray], cells: int, scales: TableScales, counts_revealed: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """The client's side: averages (and counts) from the decrypted table entries."""
    first = np.array([e[0] for e in entries[:cells]])
    averages = scales.value_scale * first.real / first.imag
    counts = None
    if counts_revealed:
        raw = np.array([e[0].real for e in entries[cells : 2 * cells]])
        counts = np.rint(raw * scales.count_scale).astype(np.int64)
    return averages, counts
