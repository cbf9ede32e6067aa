"""Cells of a one- or two-way table over the server's columns. Plain numpy.

The cells are the product of the categories of the group-by columns, taken from
the whole server column (not from the linked records, which the server must
not learn), sorted, with empty values in no cell. A cell's average counts only
records with a value; those are also the records the size check counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

import numpy as np
import pandas as pd

MAX_CELLS = 1024


@dataclass(frozen=True)
class TableShape:
    group_by: tuple[str, ...]
    categories: tuple[tuple[str, ...], ...]

    @property
    def cells(self) -> int:
        return math.prod(len(c) for c in self.categories)

    def labels(self) -> list[tuple[str, ...]]:
        return list(product(*self.categories))


def table_shape(frame: pd.DataFrame, group_by: tuple[str, ...]) -> TableShape:
    categories = tuple(
        tuple(sorted(frame[column].dropna().astype(str).unique()))
        for column in group_by
    )
    return TableShape(group_by=group_by, categories=categories)


def cell_of_records(frame: pd.DataFrame, shape: TableShape) -> np.ndarray:
    """Cell index of every server record, or -1 if a group value is empty."""
    cell = np.zeros(len(frame), dtype=np.int64)
    for column, categories in zip(shape.group_by, shape.categories):
        codes = pd.Categorical(
            frame[column].astype("string"), categories=categories
        ).codes
        cell = np.where(
            codes < 0, -1, np.where(cell < 0, -1, cell * len(categories) + codes)
        )
    return cell


def value_scale(values: np.ndarray) -> float:
    """The power of two at or above the largest |value| (1 for none).

    Values are divided by it before encoding so that sums of many of them stay
    well inside CKKS's precision; the client multiplies it back.
    """
    finite = np.abs(values[np.isfinite(values)])
    top = float(finite.max()) if finite.size else 1.0
    return float(2.0 ** math.ceil(math.log2(max(top, 1.0))))


def plain_table(
    links: list[tuple[int, int]], cell: np.ndarray, values: np.ndarray, cells: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sum and count of the values of linked server records, per cell."""
    sums, counts = np.zeros(cells), np.zeros(cells, dtype=np.int64)
    for _, server_row in links:
        c, v = cell[server_row], values[server_row]
        if c >= 0 and np.isfinite(v):
            sums[c] += v
            counts[c] += 1
    return sums, counts


def format_table(
    shape: TableShape, averages: np.ndarray, counts: np.ndarray | None
) -> str:
    """The table as aligned text, one row per cell."""
    frame = pd.DataFrame(shape.labels(), columns=list(shape.group_by))
    frame["average"] = averages
    if counts is not None:
        frame["count"] = counts
    return frame.to_string(index=False)
