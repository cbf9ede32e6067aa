"""Tests for protocol.records: the user's CSV, column mapping and value column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from protocol.records import (
    InputError,
    linkage_columns,
    numeric_column,
    parse_mapping,
    read_csv,
)
from protocol.spec import LinkageSpec, load_spec

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="module")
def names_spec() -> LinkageSpec:
    return load_spec(DATA / "spec_names.json")


def write(tmp_path: Path, text: str, name: str = "party.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("text", [None, ""])
def test_no_mapping_text_is_an_empty_mapping(text: str | None) -> None:
    assert parse_mapping(text) == {}


def test_mapping_pairs_are_parsed_and_trimmed() -> None:
    mapping = parse_mapping("given_name=first, surname = last name")

    assert mapping == {"given_name": "first", "surname": "last name"}


@pytest.mark.parametrize(
    "text, item",
    [("given_name", "given_name"), ("=first", "=first"), ("given_name=", "given_name="),
     ("a=b,,c=d", ""), ("a=b, =c", " =c")],
)
def test_malformed_mapping_names_the_flag_and_item(text: str, item: str) -> None:
    with pytest.raises(InputError) as info:
        parse_mapping(text, flag="--server-columns")

    message = str(info.value)
    assert message.startswith("--server-columns:")
    assert repr(item) in message


def test_missing_file_error_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.csv"

    with pytest.raises(InputError) as info:
        read_csv(path)

    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["", "given_name,surname\n"])
def test_empty_file_error_names_the_path(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)

    with pytest.raises(InputError) as info:
        read_csv(path)

    assert str(path) in str(info.value)


def test_csv_is_read_as_text_with_empty_cells_missing(tmp_path: Path) -> None:
    path = write(tmp_path, "postcode,name\n0800,NA\n,ann\n")

    frame = read_csv(path)

    assert frame["postcode"].iloc[0] == "0800"
    assert frame["name"].iloc[0] == "NA"
    assert pd.isna(frame["postcode"].iloc[1])


def test_demo_client_maps_to_the_default_spec_fields() -> None:
    spec = load_spec(DATA / "spec_default.json")
    path = DATA / "client.csv"

    columns = linkage_columns(read_csv(path), spec, {}, path)

    assert list(columns) == list(spec.field_names)
    assert all(len(values) == 5000 for values in columns.values())


def test_renamed_column_is_taken_through_the_mapping(
    tmp_path: Path, names_spec: LinkageSpec
) -> None:
    path = write(tmp_path, "first,surname\nann,lee\nbob,\n")
    frame = read_csv(path)

    columns = linkage_columns(frame, names_spec, {"given_name": "first"}, path)

    assert columns["given_name"] == ["ann", "bob"]
    assert columns["surname"][0] == "lee" and pd.isna(columns["surname"][1])


def test_missing_column_error_names_file_and_column(
    tmp_path: Path, names_spec: LinkageSpec
) -> None:
    path = write(tmp_path, "first,surname\nann,lee\n")

    with pytest.raises(InputError) as info:
        linkage_columns(read_csv(path), names_spec, {"given_name": "forename"}, path)

    assert str(path) in str(info.value)
    assert "'forename'" in str(info.value)


def test_unmapped_field_must_exist_under_its_own_name(
    tmp_path: Path, names_spec: LinkageSpec
) -> None:
    path = write(tmp_path, "first,last\nann,lee\n")

    with pytest.raises(InputError) as info:
        linkage_columns(read_csv(path), names_spec, {"given_name": "first"}, path)

    assert str(path) in str(info.value) and "'surname'" in str(info.value)


def test_mapping_of_an_unknown_field_is_refused(
    tmp_path: Path, names_spec: LinkageSpec
) -> None:
    path = write(tmp_path, "given_name,surname\nann,lee\n")

    with pytest.raises(InputError, match="'gender'"):
        linkage_columns(read_csv(path), names_spec, {"gender": "given_name"}, path)


def test_numeric_column_reads_numbers_and_leaves_empty_cells_nan(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, "id,age\na,40\nb,\nc,-2.5\nd,1e3\n")

    values = numeric_column(read_csv(path), "age", path)

    assert values.dtype == np.float64
    assert values[[0, 2, 3]].tolist() == [40.0, -2.5, 1000.0]
    assert np.isnan(values[1])


@pytest.mark.parametrize("bad", ["forty", "nan", "inf", "1e999", "12 years"])
def test_non_number_error_names_its_line_and_column(tmp_path: Path, bad: str) -> None:
    # Data rows 0, 1, 2 are lines 2, 3, 4 of the file (the header is line 1).
    path = write(tmp_path, f"id,age\na,40\nb,\nc,{bad}\nd,x\n")

    with pytest.raises(InputError) as info:
        numeric_column(read_csv(path), "age", path)

    message = str(info.value)
    assert str(path) in message
    assert "row 4," in message
    assert "'age'" in message
    assert repr(bad) in message


def test_missing_value_column_error_names_file_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "id,age\na,40\n")

    with pytest.raises(InputError) as info:
        numeric_column(read_csv(path), "income", path)

    assert str(path) in str(info.value) and "'income'" in str(info.value)
