"""What the two command-line scripts share."""

from __future__ import annotations

import argparse
from pathlib import Path


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
