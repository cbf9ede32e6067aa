"""Tests for protocol.table: cells, value scale and the plaintext cross-tab."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from protocol.table import (
    cell_of_records,
    plain_table,
    table_shape,
    value_scale,
)

SERVER_CSV = Path(__file__).resolve().parent.parent / "data" / "server.csv"


@pytest.fixture(scope="module")
def server() -> pd.DataFrame:
    return pd.read_csv(SERVER_CSV, dtype=str, keep_default_na=False, na_values=[""])


@pytest.fixture
def small() -> pd.DataFrame:
    return pd.DataFrame({
        "state": ["vic", "nsw", None, "vic", "qld", "nsw"],
        "sex": ["f", "m", "f", None, "m", "f"],
        "age": ["40", "", "33", "50", "61", "27"],
    }).replace("", np.nan)


def expected_cells(frame: pd.DataFrame, group_by: list[str]) -> np.ndarray:
    """Cells by pandas: position of each row's tuple in the sorted product."""
    levels = [sorted(frame[c].dropna().unique()) for c in group_by]
    index = pd.MultiIndex.from_product(levels)
    keys = list(frame[group_by].itertuples(index=False, name=None))
    cells = np.array([index.get_loc(k) if not pd.isna(list(k)).any() else -1
                      for k in keys])
    return cells


def test_categories_are_sorted_and_skip_missing(small: pd.DataFrame) -> None:
    shape = table_shape(small, ("state", "sex"))

    assert shape.categories == (("nsw", "qld", "vic"), ("f", "m"))
    assert shape.cells == 6


def test_labels_run_over_the_last_column_fastest(small: pd.DataFrame) -> None:
    shape = table_shape(small, ("state", "sex"))

    assert shape.labels()[:3] == [("nsw", "f"), ("nsw", "m"), ("qld", "f")]
    assert len(shape.labels()) == shape.cells


def test_one_way_cells_of_a_small_frame(small: pd.DataFrame) -> None:
    shape = table_shape(small, ("state",))

    assert cell_of_records(small, shape).tolist() == [2, 0, -1, 2, 1, 0]


def test_two_way_cells_of_a_small_frame(small: pd.DataFrame) -> None:
    # state nsw/qld/vic -> 0/1/2, sex f/m -> 0/1, cell = 2 * state + sex.
    shape = table_shape(small, ("state", "sex"))

    assert cell_of_records(small, shape).tolist() == [4, 1, -1, -1, 3, 0]


def test_one_way_cells_of_demo_server_agree_with_pandas(server: pd.DataFrame) -> None:
    shape = table_shape(server, ("state",))

    got = cell_of_records(server, shape)

    assert np.array_equal(got, expected_cells(server, ["state"]))
    assert (got[server["state"].isna().to_numpy()] == -1).all()


def test_two_way_cells_of_demo_server_agree_with_pandas(server: pd.DataFrame) -> None:
    group_by = ["state", "suburb"]
    part = server.iloc[:600]
    shape = table_shape(part, tuple(group_by))

    got = cell_of_records(part, shape)

    assert np.array_equal(got, expected_cells(part, group_by))
    missing = part[group_by].isna().any(axis=1).to_numpy()
    assert missing.any() and (got[missing] == -1).all()
    assert (got[~missing] >= 0).all() and got.max() < shape.cells


def test_numbers_as_group_values_use_their_text_form() -> None:
    frame = pd.DataFrame({"size": [10, 9, 10, np.nan]})

    shape = table_shape(frame, ("size",))

    assert shape.categories == (("10.0", "9.0"),)
    assert cell_of_records(frame, shape).tolist() == [0, 1, 0, -1]


@pytest.mark.parametrize(
    "values, scale",
    [
        ([0.3, -0.2], 1.0),
        ([5.0, -1.0], 8.0),
        ([8.0], 8.0),
        ([-8.5, 3.0], 16.0),
        ([np.nan, np.inf, 100.0], 128.0),
        ([], 1.0),
        ([np.nan], 1.0),
    ],
)
def test_value_scale_is_the_power_of_two_at_or_above_the_largest(
    values: list[float], scale: float
) -> None:
    assert value_scale(np.array(values, dtype=np.float64)) == scale


def test_value_scale_of_demo_ages_covers_every_age(server: pd.DataFrame) -> None:
    ages = pd.to_numeric(server["age"]).to_numpy(dtype=np.float64)

    scale = value_scale(ages)

    assert math.log2(scale).is_integer()
    assert scale >= np.nanmax(np.abs(ages)) > scale / 2


def test_plain_table_agrees_with_pandas_groupby(server: pd.DataFrame) -> None:
    group_by = ["state"]
    shape = table_shape(server, tuple(group_by))
    cell = cell_of_records(server, shape)
    values = pd.to_numeric(server["age"]).to_numpy(dtype=np.float64)
    rows = np.random.default_rng(3).choice(len(server), size=1500, replace=False)
    links = [(i, int(r)) for i, r in enumerate(rows)]

    sums, counts = plain_table(links, cell, values, shape.cells)

    linked = server.iloc[rows].assign(age=pd.to_numeric(server["age"].iloc[rows]))
    by = linked.dropna(subset=group_by + ["age"]).groupby("state")["age"]
    want = by.agg(["sum", "count"]).reindex(list(shape.categories[0]), fill_value=0)
    assert np.allclose(sums, want["sum"].to_numpy())
    assert counts.tolist() == want["count"].tolist()


def test_plain_table_two_way_agrees_with_pandas_groupby(small: pd.DataFrame) -> None:
    group_by = ["state", "sex"]
    shape = table_shape(small, tuple(group_by))
    values = pd.to_numeric(small["age"]).to_numpy(dtype=np.float64)
    links = [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]

    sums, counts = plain_table(links, cell_of_records(small, shape), values, 6)

    by = small.assign(age=values).dropna().groupby(group_by)["age"]
    index = pd.MultiIndex.from_product(list(shape.categories))
    want = by.agg(["sum", "count"]).reindex(index, fill_value=0)
    assert sums.tolist() == want["sum"].tolist()
    assert counts.tolist() == want["count"].tolist()


def test_plain_table_of_no_links_is_all_zero() -> None:
    sums, counts = plain_table([], np.array([0, 1]), np.array([1.0, 2.0]), 2)

    assert sums.tolist() == [0.0, 0.0] and counts.tolist() == [0, 0]
