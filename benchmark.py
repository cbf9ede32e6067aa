"""Measure the system end to end: seconds, bytes, memory, linkage quality, table error.

Starts the real ``server_socket.py`` and ``client_socket.py`` on 127.0.0.1 (a
free port), samples the resident memory of each process tree, and compares:

- the plaintext rule (:mod:`protocol.reference`) with the true links, by
  precision, recall and F1;
- the encrypted run's match decisions with the plaintext rule's, record by
  record (the client's report holds its own decisions, never a server record);
- the encrypted table with the plaintext table over the rule's links, and with
  the table over the true links.

The true links come from an identifier column both files carry (FEBRL's
``rec-N-org`` and ``rec-N-dup-0`` share N); no linkage field uses it.

    python benchmark.py                   # the demo, 5000 x 5000
    python benchmark.py --runs 3          # median of three end-to-end runs
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from protocol.records import linkage_columns, numeric_column, read_csv
from protocol.layout import client_slots, padded_count
from protocol.reference import (
    first_pass_decisions,
    first_pass_links,
    link_quality,
    pass_shapes,
    prepare,
    reference_candidates,
)
from protocol.spec import load_spec
from protocol.table import cell_of_records, plain_table, table_shape

HERE = Path(__file__).resolve().parent


class TreeMemory(threading.Thread):
    """Samples the summed resident set of a process and its descendants."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak, self._done = (
            pid,
            interval,
            0,
            threading.Event(),
        )

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, sum(_rss(p) for p in _tree(self.pid)))
            time.sleep(self.interval)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                text = Path(f"/proc/{current}/task/{task}/children").read_text()
                todo += [int(c) for c in text.split()]
        except OSError:
            pass
    return found


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def true_links(
    client: pd.DataFrame, server: pd.DataFrame, column: str, pattern: str
) -> set[tuple[int, int]]:
    def entity(frame):
        return frame[column].str.extract(pattern)[0]

    where = {e: j for j, e in enumerate(entity(server)) if isinstance(e, str)}
    return {(i, where[e]) for i, e in enumerate(entity(client)) if e in where}


def start_server(args, workdir: Path) -> tuple[subprocess.Popen, int, Path]:
    log = workdir / "server.log"
    command = [
        sys.executable,
        str(HERE / "server_socket.py"),
        "--port",
        "0",
        "--once",
        "--quiet",
        "--data",
        args.server_data,
        "--spec",
        args.spec,
        "--group-columns",
        ",".join(args.group_by),
        "--value-columns",
        args.value,
        "--workers",
        str(args.workers),
        "--min-cell-size",
        str(args.min_cell_size),
    ]
    handle = log.open("w")
    server = subprocess.Popen(
        command, stderr=handle, stdout=subprocess.DEVNULL, cwd=HERE
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        match = re.search(r"listening on [\d.]+:(\d+)", log.read_text())
        if match:
            return server, int(match.group(1)), log
        if server.poll() is not None:
            raise SystemExit(f"server exited early:\n{log.read_text()}")
        time.sleep(0.1)
    server.kill()
    raise SystemExit("server did not start listening in time")


def run_once(args, workdir: Path) -> dict:
    server, port, log = start_server(args, workdir)
    server_memory = TreeMemory(server.pid)
    server_memory.start()
    report, table = workdir / "report.json", workdir / "table.csv"
    command = [
        sys.executable,
        str(HERE / "client_socket.py"),
        "--port",
        str(port),
        "--quiet",
        "--data",
        args.client_data,
        "--spec",
        args.spec,
        "--group-by",
        ",".join(args.group_by),
        "--value",
        args.value,
        "--output",
        str(table),
        "--report",
        str(report),
    ]
    started = time.perf_counter()
    client = subprocess.Popen(command, stdout=subprocess.DEVNULL, cwd=HERE)
    client_memory = TreeMemory(client.pid)
    client_memory.start()
    code = client.wait()
    seconds = time.perf_counter() - started
    client_peak = client_memory.stop()
    server.wait(timeout=60)
    server_peak = server_memory.stop()
    if code != 0:
        raise SystemExit(f"client exited with {code}; server log:\n{log.read_text()}")
    phases = re.findall(r"phase (.+?): ([\d.]+) s", log.read_text())
    return {
        "seconds": seconds,
        "client_peak": client_peak,
        "server_peak": server_peak,
        "report": json.loads(report.read_text()),
        "table": pd.read_csv(table),
        "server_phases": {name: float(s) for name, s in phases},
    }


def plaintext_rule(args, spec, client, server):
    started = time.perf_counter()
    ours = prepare(linkage_columns(client, spec, {}, args.client_data), spec)
    theirs = prepare(linkage_columns(server, spec, {}, args.server_data), spec)
    candidates = reference_candidates(spec, ours, theirs)
    return (
        candidates,
        first_pass_links(candidates),
        time.perf_counter() - started,
        ours,
        theirs,
    )


def blocking_recall(spec, ours, theirs, truth) -> float:
    """Share of true pairs that meet in at least one pass (client slot included)."""
    shapes = pass_shapes(spec, padded_count(len(ours)))
    met = np.zeros(len(truth), dtype=bool)
    pairs = np.array(sorted(truth))
    for shape, c_bucket, s_bucket in zip(
        shapes, ours.buckets(spec, shapes), theirs.buckets(spec, shapes)
    ):
        slot = client_slots(c_bucket, shape)
        a, b = c_bucket[pairs[:, 0]], s_bucket[pairs[:, 1]]
        met |= (a >= 0) & (a == b) & (slot[pairs[:, 0]] >= 0)
    return float(met.mean())


def averages(links, server, args) -> np.ndarray:
    shape = table_shape(server, tuple(args.group_by))
    values = numeric_column(server, args.value, args.server_data)
    sums, counts = plain_table(
        links, cell_of_records(server, shape), values, shape.cells
    )
    return sums / np.where(counts == 0, np.nan, counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--client-data", default="data/client.csv", metavar="CSV")
    parser.add_argument("--server-data", default="data/server.csv", metavar="CSV")
    parser.add_argument("--spec", default="data/spec_default.json", metavar="JSON")
    parser.add_argument("--group-by", default="state", metavar="COL[,COL]")
    parser.add_argument("--value", default="age", metavar="COL")
    parser.add_argument("--min-cell-size", type=int, default=5, metavar="K")
    parser.add_argument("--workers", type=int, default=2, metavar="N")
    parser.add_argument(
        "--id-column",
        default="rec_id",
        metavar="COL",
        help="identifier column that gives the true links",
    )
    parser.add_argument(
        "--id-pattern",
        default=r"rec-(\d+)",
        metavar="REGEX",
        help="regex whose first group names the entity",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        metavar="N",
        help="end-to-end runs (the median is reported)",
    )
    args = parser.parse_args(argv)
    args.group_by = [c for c in args.group_by.split(",") if c]

    spec = load_spec(args.spec)
    client, server = read_csv(args.client_data), read_csv(args.server_data)
    truth = true_links(client, server, args.id_column, args.id_pattern)
    candidates, links, plain_seconds, ours, theirs = plaintext_rule(
        args, spec, client, server
    )
    met = blocking_recall(spec, ours, theirs, truth)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_once(args, Path(tmp)) for _ in range(args.runs)]
    run = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]

    quality = link_quality(links, truth)
    decisions = run["report"]["decisions"]
    expected = first_pass_decisions(candidates, len(client))
    matched_agree = np.mean(
        [(a[0] >= 0) == (b[0] >= 0) for a, b in zip(decisions, expected)]
    )
    full_agree = np.mean([a == b for a, b in zip(decisions, expected)])
    encrypted = run["table"]["average"].to_numpy()
    vs_rule = np.nanmax(np.abs(encrypted - averages(links, server, args)))
    vs_truth = np.nanmax(np.abs(encrypted - averages(sorted(truth), server, args)))

    print(
        f"data: {len(client)} client x {len(server)} server records, spec {spec.name}, "
        f"{args.runs} run(s), median shown"
    )
    every = ", ".join(f"{r['seconds']:.2f}" for r in runs)
    print(f"end to end (client start to table): {run['seconds']:.2f} s (runs: {every})")
    for name, seconds in run["report"]["seconds"].items():
        print(f"  client phase {name:<22} {seconds:8.2f} s")
    for name, seconds in run["server_phases"].items():
        print(f"  server phase {name:<22} {seconds:8.2f} s")
    print(f"bytes client -> server: {run['report']['bytes_sent']:,}")
    print(f"bytes server -> client: {run['report']['bytes_received']:,}")
    print(
        f"peak memory: server {run['server_peak'] / 2**20:,.0f} MiB, "
        f"client {run['client_peak'] / 2**20:,.0f} MiB "
        "(resident, summed over each process tree)"
    )
    print(f"blocking: {met:.4%} of true pairs meet in at least one pass")
    print(
        f"plaintext rule vs truth: precision {quality['precision']:.4f} "
        f"recall {quality['recall']:.4f} F1 {quality['f1']:.4f} "
        f"({quality['links']} links)"
    )
    print(
        f"plaintext rule, same linkage in numpy: {plain_seconds:.2f} s; "
        f"encrypted / plaintext time: {run['seconds'] / plain_seconds:.0f}x"
    )
    print(
        f"encrypted vs plaintext rule: match decisions agree on {matched_agree:.4%} of "
        f"client records; decision and candidate count agree on {full_agree:.4%}"
    )
    print(
        f"table: max |encrypted - plaintext rule| = {vs_rule:.6f}; "
        f"max |encrypted - truth| = {vs_truth:.4f}"
    )
    print(run["table"].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
