"""Reading a party's CSV and mapping its columns to the specification's fields.

Errors name the file, the column or row, what was expected and what was found:
they are the user's own input, so they are shown in full.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .spec import LinkageSpec


class InputError(ValueError):
    """The user's CSV, flag or mapping is not usable."""


def parse_mapping(text: str | None, flag: str = "--columns") -> dict[str, str]:
    """Parse 'field=column,field=column' into a dict."""
    if not text:
        return {}
    mapping = {}
    for item in text.split(","):
        field, sep, column = item.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise InputError(f"{flag}: expected FIELD=COLUMN, found {item!r}")
        mapping[field.strip()] = column.strip()
    return mapping


def read_csv(path: str | Path) -> pd.DataFrame:
    """Read every column as text; empty cells are missing values."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such file") from exc
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise InputError(f"{path}: not a readable CSV file: {exc}") from exc
    if frame.empty:
        raise InputError(f"{path}: expected at least one record, found none")
    return frame


def linkage_columns(
    frame: pd.DataFrame, spec: LinkageSpec, mapping: dict[str, str], path: str | Path
) -> dict[str, list]:
    """{spec field: values}, taking each field from its mapped CSV column."""
    unknown = sorted(set(mapping) - set(spec.field_names))
    if unknown:
        raise InputError(
            f"--columns: {unknown[0]!r} is not a field of spec {spec.name!r}; "
            f"fields are {', '.join(spec.field_names)}"
        )
    out = {}
    for field in spec.field_names:
        column = mapping.get(field, field)
        require_column(frame, column, path, f"linkage field {field!r}")
        out[field] = frame[column].tolist()
    return out


def require_column(
    frame: pd.DataFrame, column: str, path: str | Path, role: str
) -> None:
    if column not in frame.columns:
        raise InputError(
            f"{path}: expected a column {column!r} for {role}, "
            f"found columns {', '.join(frame.columns)}"
        )


def numeric_column(frame: pd.DataFrame, column: str, path: str | Path) -> np.ndarray:
    """Floats of a value column; NaN where empty. A non-number names its row."""
    require_column(frame, column, path, "the averaged value")
    text = frame[column]
    values = pd.to_numeric(text, errors="coerce")
    bad = values.isna() & text.notna() | ~np.isfinite(values.fillna(0.0))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(
            f"{path}: row {row + 2}, column {column!r}: expected a number, "
            f"found {text.iloc[row]!r}"
        )
    return values.to_numpy(dtype=np.float64)
