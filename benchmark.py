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
    python benchmark.py --sweep           # generated data, 1k to 10k x 1M
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

from protocol.cli import defaults_beside_script
from protocol.layout import client_slots, padded_count
from protocol.records import InputError, linkage_columns, numeric_column, read_csv
from protocol.reference import (
    first_pass_decisions,
    first_pass_links,
    link_quality,
    pass_shapes,
    prepare,
    reference_candidates,
)
from protocol.spec import SpecError, load_spec
from protocol.table import cell_of_records, plain_table, table_shape

HERE = Path(__file__).resolve().parent
DEMO_SPEC = "data/spec_default.json"
# The generator corrupts its duplicates less than FEBRL4 does, and at a
# million records a threshold fit for FEBRL4 links random pairs: see
# data/README.md.
SWEEP_SPEC = "data/spec_generated.json"


class TreeMemory(threading.Thread):
    """Samples the summed memory of a process and its descendants.

    Each process counts its proportional set size (PSS): pages it shares with
    others (a forked worker's copy-on-write view of the server's data) count
    once in total, split between the sharers, instead of once per process as
    resident sizes would. Where the kernel has no PSS, the resident size.
    Reading PSS walks the process's page tables (milliseconds for a large
    process), so it is sampled twice a second, not more, to keep the
    measurement from slowing what it measures.
    """

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak, self._done = (
            pid,
            interval,
            0,
            threading.Event(),
        )

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, sum(_memory(p) for p in _tree(self.pid)))
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


def _memory(pid: int) -> int:
    """PSS of one process in bytes, or its resident size, or 0 if it is gone."""
    for path, field in (
        (f"/proc/{pid}/smaps_rollup", "Pss:"),
        (f"/proc/{pid}/status", "VmRSS:"),
    ):
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        except OSError:
            continue
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
    text = log.read_text()
    phases = re.findall(r"phase (.+?): ([\d.]+) s", text)
    products = re.search(r"phase linkage: .*products=(\d+)", text)
    return {
        "seconds": seconds,
        "client_peak": client_peak,
        "server_peak": server_peak,
        "report": json.loads(report.read_text()),
        "table": pd.read_csv(table),
        "server_phases": {name: float(s) for name, s in phases},
        "products": int(products.group(1)) if products else 0,
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
        shapes, ours.buckets(shapes), theirs.buckets(shapes)
    ):
        slot = client_slots(c_bucket, shape)
        a, b = c_bucket[pairs[:, 0]], s_bucket[pairs[:, 1]]
        met |= (a >= 0) & (a == b) & (slot[pairs[:, 0]] >= 0)
    return float(met.mean())


# The server phase from the first query to the last score sent; the
# selections of all passes but the last are received and summed within it
# (see protocol/messages.py).
LINKAGE_PHASE = "linkage"
ALL_PAIRS_SAMPLE = 2000


def all_pairs_recall(spec, ours, theirs, links, truth) -> tuple[float, float, int]:
    """Share of the links the rule finds comparing all pairs that the blocked
    rule finds too, on a seeded sample of at most 2000 client records; then the
    same for those all-pairs links that are true; and the sample's size."""
    rng = np.random.default_rng(0)
    count = min(ALL_PAIRS_SAMPLE, len(ours))
    sample = np.sort(rng.choice(len(ours), count, replace=False))
    found = set(links)
    every, true = [], []
    server = theirs.vectors.T.astype(np.float64)
    for start in range(0, count, 100):
        rows = sample[start : start + 100]
        scores = ours.vectors[rows].astype(np.float64) @ server
        for row, line in zip(rows, scores):
            passing = (
                line >= spec.threshold if spec.inclusive else line > spec.threshold
            )
            for col in np.flatnonzero(passing):
                pair = (int(row), int(col))
                every.append(pair in found)
                if pair in truth:
                    true.append(pair in found)
    share = float(np.mean(every)) if every else 1.0
    share_true = float(np.mean(true)) if true else 1.0
    return share, share_true, count


def averages(links, server, args) -> np.ndarray:
    shape = table_shape(server, tuple(args.group_by))
    values = numeric_column(server, args.value, args.server_data)
    sums, counts = plain_table(
        links, cell_of_records(server, shape), values, shape.cells
    )
    return sums / np.where(counts == 0, np.nan, counts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--client-data", default="data/client.csv", metavar="CSV")
    parser.add_argument("--server-data", default="data/server.csv", metavar="CSV")
    parser.add_argument(
        "--spec",
        metavar="JSON",
        default=argparse.SUPPRESS,  # the default depends on --sweep, as said
        help=f"linkage specification (default: {DEMO_SPEC}; with --sweep, {SWEEP_SPEC})",
    )
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
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="generate and measure every size of --sizes",
    )
    parser.add_argument(
        "--sizes",
        default=(
            "1000x1000,5000x5000,10000x10000,20000x20000,40000x40000,"
            "100000x100000,10000x1000000"
        ),
        metavar="CxS[,CxS]",
        help="client x server sizes for --sweep",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed for --sweep's data")
    parser.add_argument("--sweep-csv", metavar="PATH", help="write the sweep table")
    parser.add_argument(
        "--plot", metavar="PNG", help="plot the sweep (needs matplotlib)"
    )
    args = parser.parse_args(argv)
    args.group_by = [c for c in args.group_by.split(",") if c]
    args.sizes = _sizes(parser, args.sizes)
    if not hasattr(args, "spec"):
        # Told to the parser as the default, so that it, like the data files,
        # is found beside this script when it is run from elsewhere.
        parser.set_defaults(spec=SWEEP_SPEC if args.sweep else DEMO_SPEC)
        args.spec = parser.get_default("spec")
    defaults_beside_script(
        parser, args, __file__, ("client_data", "server_data", "spec")
    )
    return args


def _sizes(parser: argparse.ArgumentParser, text: str) -> list[tuple[int, int]]:
    """--sizes as (clients, servers) pairs, or a usage error naming the flag."""
    try:
        sizes = [tuple(int(n) for n in item.split("x")) for item in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(len(pair) != 2 or min(pair) < 1 for pair in sizes):
        parser.error(f"--sizes: expected CxS[,CxS] such as 1000x1000, found {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.sweep:
            return sweep(args)
        measured = measure(args)
    except (SpecError, InputError) as exc:
        print(f"benchmark: {exc}", file=sys.stderr)
        return 2
    args.product_seconds = product_seconds()
    report(measured, args)
    return 0


def measure(args) -> dict:
    """One full measurement of args.client_data against args.server_data."""
    spec = load_spec(args.spec)
    client, server = read_csv(args.client_data), read_csv(args.server_data)
    truth = true_links(client, server, args.id_column, args.id_pattern)
    candidates, links, plain_seconds, ours, theirs = plaintext_rule(
        args, spec, client, server
    )
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_once(args, Path(tmp)) for _ in range(args.runs)]
    run = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    decisions = run["report"]["decisions"]
    expected = first_pass_decisions(candidates, len(client))
    encrypted = run["table"]["average"].to_numpy()
    return {
        "spec": spec,
        "clients": len(client),
        "servers": len(server),
        "runs": runs,
        "run": run,
        "plain_seconds": plain_seconds,
        "quality": link_quality(links, truth),
        "met": blocking_recall(spec, ours, theirs, truth),
        "all_pairs": all_pairs_recall(spec, ours, theirs, links, truth),
        "matched_agree": float(
            np.mean([(a[0] >= 0) == (b[0] >= 0) for a, b in zip(decisions, expected)])
        ),
        "full_agree": float(np.mean([a == b for a, b in zip(decisions, expected)])),
        "vs_rule": float(np.nanmax(np.abs(encrypted - averages(links, server, args)))),
        "vs_truth": float(
            np.nanmax(np.abs(encrypted - averages(sorted(truth), server, args)))
        ),
        "products": run["products"],
    }


def report(m: dict, args) -> None:
    run, quality = m["run"], m["quality"]
    print(
        f"data: {m['clients']} client x {m['servers']} server records, "
        f"spec {m['spec'].name}, {args.runs} run(s), median shown"
    )
    every = ", ".join(f"{r['seconds']:.2f}" for r in m["runs"])
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
        "(proportional set size, summed over each process tree)"
    )
    floor = m["products"] * args.product_seconds
    linkage = run["server_phases"].get(LINKAGE_PHASE, 0.0)
    print(
        f"linkage multiplies: {m['products']:,}; at {args.product_seconds * 1e3:.3f} "
        f"ms each (multiply_plain, measured now) the floor is {floor:.2f} s of one "
        f"core; the server's linkage took {linkage:.2f} s on {args.workers} workers, "
        f"{_ratio(run, floor):.1f}x that floor"
    )
    print(f"blocking: {m['met']:.4%} of true pairs meet in at least one pass")
    share, share_true, sample = m["all_pairs"]
    print(
        f"blocking vs all pairs ({sample} client records): the blocked rule finds "
        f"{share:.4%} of the links the rule finds comparing all pairs, and "
        f"{share_true:.4%} of those that are true"
    )
    print(
        f"plaintext rule vs truth: precision {quality['precision']:.4f} "
        f"recall {quality['recall']:.4f} F1 {quality['f1']:.4f} "
        f"({quality['links']} links)"
    )
    print(
        f"plaintext rule, same linkage in numpy: {m['plain_seconds']:.2f} s; "
        f"encrypted / plaintext time: {run['seconds'] / m['plain_seconds']:.0f}x"
    )
    print(
        f"encrypted vs plaintext rule: match decisions agree on "
        f"{m['matched_agree']:.4%} of client records; decision and candidate count "
        f"agree on {m['full_agree']:.4%}"
    )
    print(
        f"table: max |encrypted - plaintext rule| = {m['vs_rule']:.6f}; "
        f"max |encrypted - truth| = {m['vs_truth']:.4f}"
    )
    print(run["table"].to_string(index=False))


def _ratio(run: dict, floor: float) -> float:
    return (
        run["server_phases"].get(LINKAGE_PHASE, 0.0) / floor if floor else float("nan")
    )


def product_seconds() -> float:
    """Median seconds of one linkage multiply_plain here (plaintext encoded before)."""
    from protocol.he import Ckks, SecretKeyHolder
    from protocol.linkage import PLAIN_SCALE, QUERY_LEVEL, QUERY_SCALE, load_query

    ckks = Ckks()
    keys = SecretKeyHolder(ckks, galois_elements=[])
    rng = np.random.default_rng(0)
    row = rng.normal(size=ckks.slots) + 1j * rng.normal(size=ckks.slots)
    query = load_query(ckks, keys.encrypt_to_bytes(row, QUERY_LEVEL, QUERY_SCALE))
    plain = ckks.encode(row.conj(), QUERY_LEVEL, PLAIN_SCALE)
    timings, product = [], sa_ciphertext()
    for _ in range(200):
        started = time.perf_counter()
        ckks.evaluator.multiply_plain(query, plain, product)
        timings.append(time.perf_counter() - started)
    ckks.close()
    return float(np.median(timings))


def sa_ciphertext():
    import tenseal.sealapi as sa

    return sa.Ciphertext()


def sweep(args) -> int:
    """Generate each size with data/generate.py, measure it, print one table."""
    load_spec(args.spec)  # a bad specification stops the sweep before it starts
    args.product_seconds = product_seconds()
    print(
        f"one linkage multiply_plain, measured now: {args.product_seconds * 1e3:.3f} ms"
        " (ratio_to_floor's unit)"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for clients, servers in args.sizes:
            folder = Path(tmp) / f"{clients}x{servers}"
            subprocess.run(
                [
                    sys.executable,
                    str(HERE / "data" / "generate.py"),
                    "--client",
                    str(clients),
                    "--server",
                    str(servers),
                    "--seed",
                    str(args.seed),
                    "--out",
                    str(folder),
                ],
                check=True,
                capture_output=True,
            )
            args.client_data = str(folder / "client.csv")
            args.server_data = str(folder / "server.csv")
            m = measure(args)
            rows.append(_sweep_row(m, args))
            print(_format_row(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    table["per_doubling"] = per_doubling(table)
    if args.sweep_csv:
        table.to_csv(args.sweep_csv, index=False)
    if args.plot:
        plot(table, args.plot)
    print(table.to_string(index=False))
    return 0


def per_doubling(table: pd.DataFrame) -> list[float]:
    """Growth of end-to-end time per doubling of both sides, from the previous
    balanced row: (t / t_prev) ** (1 / log2(n / n_prev)); NaN for the first
    balanced row and for unbalanced rows."""
    out, previous = [], None
    for row in table.itertuples():
        if row.clients != row.servers:
            out.append(float("nan"))
            continue
        if previous is None:
            out.append(float("nan"))
        else:
            doublings = np.log2(row.clients / previous.clients)
            out.append(round((row.seconds / previous.seconds) ** (1 / doublings), 2))
        previous = row
    return out


def _sweep_row(m: dict, args) -> dict:
    run = m["run"]
    floor = m["products"] * args.product_seconds
    return {
        "clients": m["clients"],
        "servers": m["servers"],
        "seconds": round(run["seconds"], 2),
        "server_linkage_s": round(run["server_phases"].get(LINKAGE_PHASE, 0.0), 2),
        "MB_up": round(run["report"]["bytes_sent"] / 1e6, 1),
        "MB_down": round(run["report"]["bytes_received"] / 1e6, 1),
        "server_MiB": round(run["server_peak"] / 2**20),
        "client_MiB": round(run["client_peak"] / 2**20),
        "products": m["products"],
        "ratio_to_floor": round(_ratio(run, floor), 2),
        "f1": round(m["quality"]["f1"], 4),
        "vs_all_pairs": round(m["all_pairs"][0], 4),
        "vs_all_pairs_true": round(m["all_pairs"][1], 4),
        "agree": round(m["matched_agree"], 4),
        "plain_s": round(m["plain_seconds"], 2),
        "encrypted_over_plain": round(run["seconds"] / m["plain_seconds"], 1),
    }


def _format_row(row: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in row.items())


def plot(table: pd.DataFrame, path: str) -> None:
    """Log-log seconds against total records, encrypted and plain numpy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = table["clients"] + table["servers"]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.loglog(total, table["seconds"], "o-", label="encrypted, end to end")
    axes.loglog(total, table["plain_s"], "s--", label="plaintext rule (numpy)")
    for x, y, c, s in zip(total, table["seconds"], table["clients"], table["servers"]):
        axes.annotate(
            f"{c:,} x {s:,}",
            (x, y),
            fontsize=7,
            xytext=(4, -10),
            textcoords="offset points",
        )
    axes.set_xlabel("client + server records")
    axes.set_ylabel("seconds")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
