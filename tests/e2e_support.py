"""Helpers for the end-to-end tests: demo samples, real processes, the plain rule.

The processes are the shipped scripts, started with this interpreter from the
project directory. Each server gets a process group of its own, so that its
session and worker children go with it when a test tears it down.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from protocol.records import linkage_columns, numeric_column, read_csv
from protocol.reference import (
    first_pass_decisions,
    first_pass_links,
    prepare,
    reference_candidates,
)
from protocol.spec import load_spec
from protocol.table import cell_of_records, plain_table, table_shape

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
SPEC = DATA / "spec_default.json"
HOST = "127.0.0.1"
START_SECONDS = 60.0
RUN_SECONDS = 300.0
_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


def entity(rec_ids: pd.Series) -> pd.Series:
    """FEBRL's person number: 'rec-7-org' and 'rec-7-dup-0' are both '7'."""
    return rec_ids.str.extract(r"^rec-(\d+)-")[0]


def write_sample(
    folder: Path, clients: int, strangers: int, seed: int
) -> tuple[Path, Path]:
    """Client records, their true partners and unrelated server records, as CSVs.

    The server rows are shuffled so that their order says nothing about links.
    """
    client, server = read_csv(DATA / "client.csv"), read_csv(DATA / "server.csv")
    rng = np.random.default_rng(seed)
    mine = client.iloc[np.sort(rng.choice(len(client), clients, replace=False))]
    partnered = entity(server["rec_id"]).isin(set(entity(mine["rec_id"])))
    others = server[~partnered]
    others = others.iloc[rng.choice(len(others), strangers, replace=False)]
    theirs = pd.concat([server[partnered], others])
    theirs = theirs.iloc[rng.permutation(len(theirs))]

    client_csv, server_csv = folder / "client.csv", folder / "server.csv"
    mine.to_csv(client_csv, index=False)
    theirs.to_csv(server_csv, index=False)
    return client_csv, server_csv


@dataclass(frozen=True)
class Reference:
    """The plaintext rule's per-record decisions and table over the same CSVs."""

    decisions: list[list[int]]
    labels: list[tuple[str, ...]]
    averages: np.ndarray
    counts: np.ndarray


def reference(client_csv: Path, server_csv: Path, group_by: tuple[str, ...],
              value: str = "age") -> Reference:
    spec = load_spec(SPEC)
    client, server = read_csv(client_csv), read_csv(server_csv)
    ours = prepare(linkage_columns(client, spec, {}, client_csv), spec)
    theirs = prepare(linkage_columns(server, spec, {}, server_csv), spec)
    candidates = reference_candidates(spec, ours, theirs)

    shape = table_shape(server, group_by)
    values = numeric_column(server, value, server_csv)
    sums, counts = plain_table(first_pass_links(candidates),
                               cell_of_records(server, shape), values, shape.cells)
    averages = sums / np.where(counts == 0, np.nan, counts)
    return Reference(first_pass_decisions(candidates, len(ours)), shape.labels(), averages, counts)


def read_table(path: Path, group_by: tuple[str, ...]) -> pd.DataFrame:
    """The client's --output CSV, labels kept as text ('nsw', never NaN)."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame["average"] = frame["average"].astype(float)
    assert list(frame.columns[: len(group_by)]) == list(group_by), frame.columns
    return frame


class Server:
    """A real server_socket.py on an ephemeral port, its stderr in a log file."""

    def __init__(self, log: Path, *args: str) -> None:
        self.log = log
        command = [sys.executable, "server_socket.py", "--host", HOST, "--port", "0",
                   "--quiet", *args]
        with log.open("w") as handle:
            self.process = subprocess.Popen(
                command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=handle,
                start_new_session=True)
        self.port = 0

    def text(self) -> str:
        return self.log.read_text()

    def wait_listening(self) -> int:
        """Block until the log names the port; fail if the server dies first."""
        match = self.wait_for(_LISTENING)
        self.port = int(match.group(1))
        return self.port

    def wait_for(self, pattern: re.Pattern[str], seconds: float = START_SECONDS,
                 watch: subprocess.Popen | None = None) -> re.Match[str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            match = pattern.search(self.text())
            if match:
                return match
            assert self.process.poll() is None, f"server exited early:\n{self.text()}"
            assert watch is None or watch.poll() is None, (
                f"watched process exited with {watch.returncode} before "
                f"{pattern.pattern!r}; server log:\n{self.text()}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern.pattern!r} in {seconds} s:\n{self.text()}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Kill the server and every child in its process group; reap it."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=30)


def client_command(port: int, *args: str) -> list[str]:
    return [sys.executable, "client_socket.py", "--host", HOST, "--port", str(port),
            "--quiet", *args]


def run_client(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(client_command(port, *args), cwd=ROOT, capture_output=True,
                          text=True, timeout=RUN_SECONDS)


def run_script(script: str, *args: str,
               seconds: float = START_SECONDS) -> subprocess.CompletedProcess[str]:
    """A script that should finish on its own (help, bad input)."""
    return subprocess.run([sys.executable, script, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=seconds)


def printed_average(stdout: str, label: tuple[str, ...]) -> float | None:
    """The average on the printed table's row for ``label``, or None if absent."""
    cells = r"\s+".join(re.escape(part) for part in label)
    match = re.search(rf"^\s*{cells}\s+(\S+)\s*$", stdout, flags=re.MULTILINE)
    return float(match.group(1)) if match else None
