"""What the two command-line scripts share."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_input_flags(
    parser: argparse.ArgumentParser, data: str, whose: str, peer: str
) -> None:
    """--data, --spec and --columns: a party's records and how they link."""
    parser.add_argument(
        "--data", default=data, metavar="CSV", help=f"the {whose} records"
    )
    parser.add_argument(
        "--spec",
        default="data/spec_default.json",
        metavar="JSON",
        help=f"linkage specification (must equal the {peer}'s)",
    )
    parser.add_argument(
        "--columns",
        default="",
        metavar="FIELD=COL[,...]",
        help="CSV column of each specification field, where the names differ",
    )


def defaults_beside_script(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    script: str,
    names: tuple[str, ...] = ("data", "spec"),
) -> None:
    """Default files are found beside the script when it is run from elsewhere."""
    here = Path(script).resolve().parent
    for name in names:
        value = getattr(args, name)
        if value == parser.get_default(name) and not Path(value).exists():
            setattr(args, name, str(here / value))
