"""Link your records to a server's under encryption and print an encrypted cross-tab.

The client holds the only CKKS secret key. It sends its records encrypted,
learns which of them found a match, and receives a table of averages that only
it can decrypt, or a refusal when some cell holds too few linked people.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

import pandas as pd

from protocol.cli import add_input_flags, defaults_beside_script
from protocol.client import ClientResult, QueryRefused, make_query, run_client
from protocol.framing import ProtocolError
from protocol.he import DEFAULT_PARAMETERS
from protocol.messages import Channel, PeerError
from protocol.records import InputError, linkage_columns, parse_mapping, read_csv
from protocol.reference import first_pass_decisions, prepare
from protocol.spec import SpecError, load_spec
from protocol.table import format_table

EXIT_OK, EXIT_USAGE, EXIT_REFUSED, EXIT_PROTOCOL, EXIT_INTERRUPTED = 0, 2, 3, 4, 130
TIMEOUT = 600.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="exit codes: 0 table printed, 2 bad usage or input, 3 query refused by "
        "the size check, 4 protocol or connection failure, 130 interrupted",
    )
    parser.add_argument("--host", default="127.0.0.1", help="server address")
    parser.add_argument(
        "--port", type=int, default=5050, metavar="PORT", help="server port"
    )
    add_input_flags(parser, "data/client.csv", "client's", "server")
    parser.add_argument(
        "--group-by",
        default="state",
        metavar="COL[,COL]",
        help="server column(s) to group by: one, or two for a two-way table",
    )
    parser.add_argument(
        "--value", default="age", metavar="COL", help="server column to average"
    )
    parser.add_argument("--output", metavar="PATH", help="also write the table as CSV")
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep retrying a refused connection this long (a server "
        "that is still starting)",
    )
    parser.add_argument(
        "--report",
        metavar="PATH",
        help="write a JSON report: seconds per phase, bytes each way, and "
        "each own record's match decision (for benchmarks)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    defaults_beside_script(parser, args, __file__)
    group_by = tuple(c.strip() for c in args.group_by.split(",") if c.strip())
    if not 1 <= len(group_by) <= 2:
        parser.error(
            f"--group-by: expected one or two columns, found {args.group_by!r}"
        )
    args.group_by = group_by
    return args


def _write_atomically(path: str, write) -> None:
    """Write beside the final name, then rename: never half a file."""
    partial = f"{path}.partial"
    write(partial)
    os.replace(partial, path)


def write_output(path: str, result: ClientResult) -> None:
    frame = pd.DataFrame(result.shape.labels(), columns=list(result.shape.group_by))
    frame["average"] = result.averages
    if result.counts is not None:
        frame["count"] = result.counts
    _write_atomically(path, lambda p: frame.to_csv(p, index=False))


def write_report(path: str, result: ClientResult, channel: Channel) -> None:
    report = {
        "seconds": result.seconds,
        "bytes_sent": channel.bytes.sent,
        "bytes_received": channel.bytes.received,
        "records": len(result.matched),
        "decisions": first_pass_decisions(result.candidates, len(result.matched)),
    }
    _write_atomically(path, lambda p: Path(p).write_text(json.dumps(report)))


def connect(host: str, port: int, wait: float) -> socket.socket:
    """Connect, retrying a refused connection until ``wait`` seconds have passed."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return socket.create_connection((host, port), timeout=TIMEOUT)
        except ConnectionRefusedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.25)


def _run(channel: Channel, spec, query, records, progress: bool) -> ClientResult:
    """The session; a server that misbehaves is told why before we close."""
    try:
        return run_client(channel, spec, query, records, progress)
    except PeerError:
        raise
    except ProtocolError as exc:
        channel.send_error(str(exc))
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="client %(message)s")
    try:
        spec = load_spec(args.spec)
        frame = read_csv(args.data)
        columns = linkage_columns(frame, spec, parse_mapping(args.columns), args.data)
    except (SpecError, InputError) as exc:
        print(f"client: {exc}", file=sys.stderr)
        return EXIT_USAGE
    query = make_query(args.group_by, args.value, len(frame), DEFAULT_PARAMETERS)
    try:
        with connect(args.host, args.port, args.wait) as sock:
            channel = Channel(sock)
            # The records are encoded once the keys are sent, while the
            # server starts its workers.
            result = _run(
                channel, spec, query, lambda: prepare(columns, spec), not args.quiet
            )
    except KeyboardInterrupt:
        print("client: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except QueryRefused as exc:
        print(f"client: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except (ProtocolError, OSError) as exc:
        print(f"client: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_PROTOCOL
    print(
        f"linked {int(result.matched.sum())} of {len(frame)} records", file=sys.stderr
    )
    print(format_table(result.shape, result.averages, result.counts))
    if args.output:
        write_output(args.output, result)
    if args.report:
        write_report(args.report, result, channel)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
