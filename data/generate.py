"""Write client and server CSVs of any size with a known ground truth. Seeded.

Values are drawn from the frequencies of the FEBRL4 originals in
``data/client.csv`` (given names, surnames, street names, suburb with its
postcode and state), so names and addresses are as realistic as FEBRL's.
Dates of birth are uniform over 1905-2004, social security numbers are seven
random digits. The server's copy of a shared person is corrupted the way FEBRL
corrupts its duplicates: typos (a letter substituted, dropped, doubled or
swapped with its neighbour), a missing value, a digit changed in a date.

Shared people carry ``rec-N-org`` in the client file and ``rec-N-dup-0`` in
the server file, as FEBRL4 does, so ``benchmark.py`` finds the true links.
The server file gains ``age`` and a merged ``state``, as the demo's does.

    python data/generate.py --client 10000 --server 1000000 --out /tmp/sweep
"""

from __future__ import annotations

import argparse
import string
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_demo_data import age_from_birth_date, merged_state  # noqa: E402

TEXT_FIELDS = ("given_name", "surname", "address_1", "suburb")
CORRUPTIBLE = (
    "given_name",
    "surname",
    "street_number",
    "address_1",
    "address_2",
    "suburb",
    "postcode",
    "date_of_birth",
    "soc_sec_id",
)


class Vocabulary:
    """Empirical value frequencies of the FEBRL4 originals."""

    def __init__(self, source: pd.DataFrame) -> None:
        self.columns = {
            c: source[c].dropna().to_numpy()
            for c in (
                "given_name",
                "surname",
                "street_number",
                "address_1",
                "address_2",
            )
        }
        self.places = source[["suburb", "postcode", "state"]].dropna().to_numpy()

    def people(self, count: int, rng: np.random.Generator) -> pd.DataFrame:
        frame = pd.DataFrame({c: rng.choice(v, count) for c, v in self.columns.items()})
        place = self.places[rng.integers(0, len(self.places), count)]
        frame["suburb"], frame["postcode"], frame["state"] = place.T
        days = rng.integers(0, 100 * 365, count)
        dates = pd.Timestamp("1905-01-01") + pd.to_timedelta(days, unit="D")
        frame["date_of_birth"] = dates.strftime("%Y%m%d")
        frame["soc_sec_id"] = [
            f"{n:07d}" for n in rng.integers(1_000_000, 9_999_999, count)
        ]
        return frame


def typo(text: str, rng: np.random.Generator) -> str:
    """One FEBRL-style typo: substitute, delete, insert or transpose a letter."""
    if len(text) < 2:
        return text
    i = int(rng.integers(0, len(text) - 1))
    kind = int(rng.integers(0, 4))
    letter = string.ascii_lowercase[int(rng.integers(0, 26))]
    if kind == 0:
        return text[:i] + letter + text[i + 1 :]
    if kind == 1:
        return text[:i] + text[i + 1 :]
    if kind == 2:
        return text[:i] + letter + text[i:]
    return text[:i] + text[i + 1] + text[i] + text[i + 2 :]


def corrupt(frame: pd.DataFrame, rng: np.random.Generator, rate: float) -> pd.DataFrame:
    """Up to three corruptions per record, each a typo (digits: a changed digit)
    or, one time in five, a missing value."""
    out = frame.copy()
    for row in range(len(out)):
        for _ in range(int(rng.binomial(3, rate))):
            column = CORRUPTIBLE[int(rng.integers(0, len(CORRUPTIBLE)))]
            value = out.iat[row, out.columns.get_loc(column)]
            if not isinstance(value, str):
                continue
            if rng.random() < 0.2:
                value = None
            elif value.isdigit():
                # In a date, keep the century: a changed digit of the year's
                # last two, the month or the day.
                first = 2 if column == "date_of_birth" else 0
                i = int(rng.integers(first, len(value)))
                value = value[:i] + str(int(rng.integers(0, 10))) + value[i + 1 :]
            else:
                value = typo(value, rng)
            out.iat[row, out.columns.get_loc(column)] = value
    return out


def generate(
    clients: int, servers: int, shared: float, seed: int, source: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(client, server) frames: ``shared`` of the client's people are on the server."""
    rng = np.random.default_rng(seed)
    vocabulary = Vocabulary(source)
    both = min(int(round(clients * shared)), servers)
    people = vocabulary.people(clients + servers - both, rng)
    client = people.iloc[:clients].copy()
    client.insert(0, "rec_id", [f"rec-{n}-org" for n in range(clients)])
    server_rows = np.r_[np.arange(both), np.arange(clients, clients + servers - both)]
    server = corrupt(people.iloc[server_rows].reset_index(drop=True), rng, rate=0.5)
    server.insert(0, "rec_id", [f"rec-{n}-dup-0" for n in server_rows])
    server["age"] = age_from_birth_date(server["date_of_birth"])
    server["state"] = merged_state(server["state"])
    return client, server.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--client", type=int, default=1000, metavar="N", help="client records"
    )
    parser.add_argument(
        "--server", type=int, default=1000, metavar="N", help="server records"
    )
    parser.add_argument(
        "--shared",
        type=float,
        default=1.0,
        metavar="FRACTION",
        help="share of the client's people who are also on the server",
    )
    parser.add_argument("--seed", type=int, default=1, metavar="SEED")
    parser.add_argument(
        "--out", default=".", metavar="DIR", help="folder for client.csv and server.csv"
    )
    args = parser.parse_args(argv)
    if args.client < 1 or args.server < 1:
        parser.error("--client and --server: expected at least 1 record each")
    if not 0.0 <= args.shared <= 1.0:
        parser.error(f"--shared: expected a fraction from 0 to 1, found {args.shared}")
    source = pd.read_csv(
        HERE / "client.csv", dtype=str, keep_default_na=False, na_values=[""]
    )
    client, server = generate(args.client, args.server, args.shared, args.seed, source)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    client.to_csv(out / "client.csv", index=False)
    server.to_csv(out / "server.csv", index=False)
    print(f"wrote {len(client)} client and {len(server)} server records to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
