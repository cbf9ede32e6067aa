"""End to end: the real server and client scripts on 127.0.0.1, ephemeral ports.

The data is a deterministic FEBRL4 sample written per module: client records,
their true partners and unrelated server records. Every encrypted result is
compared with the plaintext rule (:mod:`protocol.reference`) on the same CSVs;
CKKS is approximate, so averages are compared within ``TOLERANCE``.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from e2e_support import (
    HOST,
    ROOT,
    SPEC,
    Reference,
    Server,
    client_command,
    printed_average,
    read_table,
    reference,
    run_client,
    run_script,
    write_sample,
)
from protocol.records import read_csv

TOLERANCE = 1e-3
CLIENTS, STRANGERS, SEED = 300, 200, 7
EXIT_OK, EXIT_USAGE, EXIT_REFUSED, EXIT_PROTOCOL, EXIT_INTERRUPTED = 0, 2, 3, 4, 130
HEADER = struct.Struct("!4sBBHQ")
CLIENT_HELLO, ERROR = 1, 14


@dataclass(frozen=True)
class Sample:
    client_csv: Path
    server_csv: Path


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    folder = tmp_path_factory.mktemp("sample")
    return Sample(*write_sample(folder, CLIENTS, STRANGERS, SEED))


@pytest.fixture(scope="module")
def by_state(sample: Sample) -> Reference:
    return reference(sample.client_csv, sample.server_csv, ("state",))


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start servers that are listening; all are killed at teardown."""
    started: list[Server] = []

    def start(*args: str) -> Server:
        server = Server(tmp_path / f"server-{len(started)}.log", *args)
        started.append(server)
        server.wait_listening()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


def explain(run: subprocess.CompletedProcess[str], server: Server | None = None) -> str:
    log = f"\nserver log:\n{server.text()}" if server else ""
    return f"exit {run.returncode}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}{log}"


def assert_printed_table_matches(stdout: str, expected: Reference) -> None:
    for label, average in zip(expected.labels, expected.averages):
        printed = printed_average(stdout, label)
        assert printed is not None, f"no row {label} in stdout:\n{stdout}"
        assert abs(printed - average) < TOLERANCE, (label, printed, average)


def assert_table_file_matches(path: Path, expected: Reference,
                              group_by: tuple[str, ...]) -> None:
    table = read_table(path, group_by)
    labels = list(table[list(group_by)].itertuples(index=False, name=None))
    assert labels == expected.labels
    error = np.abs(table["average"].to_numpy() - expected.averages)
    assert np.all(error < TOLERANCE), f"max error {error.max()}:\n{table}"


def good_run(server: Server, sample: Sample, expected: Reference) -> None:
    run = run_client(server.port, "--data", str(sample.client_csv))
    assert run.returncode == EXIT_OK, explain(run, server)
    assert_printed_table_matches(run.stdout, expected)


def test_table_and_decisions_match_the_plaintext_rule(
    start_server, sample: Sample, by_state: Reference, tmp_path: Path
) -> None:
    server = start_server("--once", "--data", str(sample.server_csv))
    table, report = tmp_path / "table.csv", tmp_path / "report.json"

    run = run_client(server.port, "--data", str(sample.client_csv),
                     "--output", str(table), "--report", str(report))

    assert run.returncode == EXIT_OK, explain(run, server)
    assert_table_file_matches(table, by_state, ("state",))
    assert_printed_table_matches(run.stdout, by_state)
    found = json.loads(report.read_text())["decisions"]
    assert len(found) == CLIENTS
    wrong = [i for i, (a, b) in enumerate(zip(found, by_state.decisions)) if a != b]
    assert not wrong, f"{len(wrong)} decisions differ, first row {wrong[0]}: " \
        f"encrypted {found[wrong[0]]}, plaintext {by_state.decisions[wrong[0]]}"
    assert server.process.wait(timeout=30) == EXIT_OK, server.text()


def test_cell_under_the_minimum_size_refuses_the_query_and_writes_no_table(
    start_server, sample: Sample, by_state: Reference, tmp_path: Path
) -> None:
    assert by_state.counts.max() < 1000, "sample precondition: every cell under k"
    server = start_server("--once", "--min-cell-size", "1000",
                          "--data", str(sample.server_csv))
    table, report = tmp_path / "table.csv", tmp_path / "report.json"

    run = run_client(server.port, "--data", str(sample.client_csv),
                     "--output", str(table), "--report", str(report))

    assert run.returncode == EXIT_REFUSED, explain(run, server)
    assert "refused" in run.stderr and "1000" in run.stderr, run.stderr
    assert run.stdout.strip() == "", "a refused query printed a table"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".log")
    assert leftovers == [], f"files written for a refused query: {leftovers}"
    assert server.process.wait(timeout=30) == EXIT_OK, server.text()


def test_client_killed_mid_protocol_leaves_the_server_serving(
    start_server, sample: Sample, by_state: Reference, tmp_path: Path
) -> None:
    server = start_server("--data", str(sample.server_csv))
    command = client_command(server.port, "--data", str(sample.client_csv))
    victim = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        server.wait_for(re.compile(r"phase handshake"), watch=victim)
    finally:
        victim.kill()
        victim.wait(timeout=30)

    assert victim.returncode == -signal.SIGKILL, "the client ended before the kill"
    assert server.alive(), server.text()
    good_run(server, sample, by_state)
    assert server.text().count("session ended: table") == 1, server.text()
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=30) == EXIT_INTERRUPTED, server.text()


@pytest.fixture(scope="module")
def banded(sample: Sample, tmp_path_factory: pytest.TempPathFactory) -> Sample:
    """The sample with a second category on the server: an age band."""
    frame = read_csv(sample.server_csv)
    age = pd.to_numeric(frame["age"])
    frame["age_band"] = np.where(age < 70, "under 70", "70 and over")
    frame.loc[age.isna(), "age_band"] = None
    path = tmp_path_factory.mktemp("banded") / "server.csv"
    frame.to_csv(path, index=False)
    return Sample(sample.client_csv, path)


def test_two_way_table_has_one_row_per_combination_matching_the_rule(
    start_server, banded: Sample, tmp_path: Path
) -> None:
    group_by = ("state", "age_band")
    expected = reference(banded.client_csv, banded.server_csv, group_by)
    assert expected.counts.min() >= 1, "sample precondition: no empty cell"
    server = start_server("--once", "--group-columns", ",".join(group_by),
                          "--min-cell-size", "1", "--data", str(banded.server_csv))
    table = tmp_path / "table.csv"

    run = run_client(server.port, "--data", str(banded.client_csv),
                     "--group-by", ",".join(group_by), "--output", str(table))

    assert run.returncode == EXIT_OK, explain(run, server)
    states = sorted(read_csv(banded.server_csv)["state"].dropna().unique())
    combinations = list(product(states, ["70 and over", "under 70"]))
    assert expected.labels == combinations
    assert_table_file_matches(table, expected, group_by)
    assert_printed_table_matches(run.stdout, expected)


def test_spec_with_another_threshold_is_refused_naming_it_and_server_serves_on(
    start_server, sample: Sample, by_state: Reference, tmp_path: Path
) -> None:
    spec = json.loads(SPEC.read_text())
    spec["threshold"] = 0.6
    other = tmp_path / "spec_other.json"
    other.write_text(json.dumps(spec))
    server = start_server("--data", str(sample.server_csv))

    run = run_client(server.port, "--data", str(sample.client_csv),
                     "--spec", str(other))

    assert run.returncode == EXIT_PROTOCOL, explain(run, server)
    assert "threshold" in run.stderr and "0.6" in run.stderr, run.stderr
    assert server.alive(), server.text()
    good_run(server, sample, by_state)


def test_missing_client_data_file_exits_2_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_records.csv"

    run = run_script("client_socket.py", "--port", "1", "--data", str(missing))

    assert run.returncode == EXIT_USAGE, explain(run)
    assert str(missing) in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr


def test_client_mapping_to_an_absent_column_exits_2_naming_the_column(
    sample: Sample,
) -> None:
    run = run_script("client_socket.py", "--port", "1", "--data",
                     str(sample.client_csv), "--columns", "surname=family_name")

    assert run.returncode == EXIT_USAGE, explain(run)
    assert "'family_name'" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr


def test_non_numeric_server_age_exits_2_naming_row_and_column(
    sample: Sample, tmp_path: Path
) -> None:
    frame = read_csv(sample.server_csv)
    frame.loc[10, "age"] = "forty"
    bad = tmp_path / "server_bad_age.csv"
    frame.to_csv(bad, index=False)

    run = run_script("server_socket.py", "--port", "0", "--once", "--data", str(bad))

    assert run.returncode == EXIT_USAGE, explain(run)
    # Line 12 of the file: the header is line 1 and frame row 0 is line 2.
    for part in ("row 12", "'age'", "'forty'", str(bad)):
        assert part in run.stderr, f"{part!r} not in: {run.stderr}"
    assert "listening" not in run.stderr, run.stderr


def test_group_by_three_columns_is_a_usage_error() -> None:
    run = run_script("client_socket.py", "--port", "1",
                     "--group-by", "state,age_band,sex")

    assert run.returncode == EXIT_USAGE, explain(run)
    assert "usage:" in run.stderr and "--group-by" in run.stderr, run.stderr


def exchange(port: int, data: bytes, seconds: float = 60.0) -> bytes:
    """Send raw bytes, close our half, and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def error_text(reply: bytes) -> str:
    """The text of the one ERROR frame that ``reply`` must consist of."""
    assert len(reply) >= HEADER.size, f"no frame in the reply: {reply!r}"
    magic, version, msg_type, flags, length = HEADER.unpack_from(reply)
    assert (magic, version, msg_type, flags) == (b"PPRL", 1, ERROR, 0), reply[:16]
    assert len(reply) == HEADER.size + length, "reply is not exactly one frame"
    return json.loads(reply[HEADER.size:])["error"]


def test_garbage_bytes_and_huge_frame_header_do_not_take_the_server_down(
    start_server, sample: Sample, by_state: Reference
) -> None:
    server = start_server("--data", str(sample.server_csv))
    noise = np.random.default_rng(SEED).bytes(64)
    huge = HEADER.pack(b"PPRL", 1, CLIENT_HELLO, 0, 2**63)
    truncated = HEADER.pack(b"PPRL", 1, CLIENT_HELLO, 0, 100) + b'{"protocol"'

    assert "magic" in error_text(exchange(server.port, noise))
    assert "length" in error_text(exchange(server.port, huge))
    assert exchange(server.port, truncated) == b""
    assert server.alive(), server.text()
    good_run(server, sample, by_state)
    assert "internal error" not in server.text(), server.text()


def test_client_tells_a_misbehaving_server_why_and_exits_4(sample: Sample) -> None:
    with socket.create_server((HOST, 0)) as fake:
        fake.settimeout(60)
        client = subprocess.Popen(
            client_command(fake.getsockname()[1], "--data", str(sample.client_csv)),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            conn, _ = fake.accept()
            with conn:
                conn.settimeout(60)
                header = HEADER.unpack(conn.recv(HEADER.size, socket.MSG_WAITALL))
                assert header[2] == CLIENT_HELLO
                conn.recv(header[4], socket.MSG_WAITALL)
                conn.sendall(b"NOPE" + bytes(HEADER.size - 4))
                reply = b""
                while chunk := conn.recv(65536):
                    reply += chunk
            _, stderr = client.communicate(timeout=60)
        finally:
            client.kill()

    assert client.returncode == 4, stderr
    assert "magic" in stderr
    assert "magic" in error_text(reply)


def test_idle_client_neither_blocks_another_nor_stays_past_the_idle_timeout(
    start_server, sample: Sample, by_state: Reference
) -> None:
    server = start_server("--data", str(sample.server_csv), "--idle-timeout", "20")

    with socket.create_connection((HOST, server.port), timeout=120) as idle:
        good_run(server, sample, by_state)
        reply = idle.recv(65536)

    assert "no message for 20 s" in error_text(reply)
    assert "client idle for 20 s" in server.text()


@pytest.mark.parametrize("script, defaults", [
    ("server_socket.py", ("5050", "data/server.csv", "data/spec_default.json")),
    ("client_socket.py", ("5050", "data/client.csv", "data/spec_default.json")),
])
def test_help_exits_0_and_shows_the_defaults(
    script: str, defaults: tuple[str, ...]
) -> None:
    run = run_script(script, "--help")

    assert run.returncode == EXIT_OK, explain(run)
    for default in defaults:
        assert default in run.stdout, f"{default!r} not in {script} --help"


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local Ray cluster (head node only), stopped at teardown."""
    ray = Path(sys.executable).with_name("ray")
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    start = [str(ray), "start", "--head", "--node-ip-address", HOST, "--port", str(port),
             "--num-cpus", "2", "--object-store-memory", str(200 * 2**20),
             "--include-dashboard", "false", "--disable-usage-stats"]
    subprocess.run(start, check=True, capture_output=True, timeout=120)
    try:
        yield f"{HOST}:{port}"
    finally:
        subprocess.run([str(ray), "stop", "--force"], capture_output=True, timeout=120)


def test_linkage_on_a_ray_cluster_gives_the_plaintext_rule_table(
    start_server, sample: Sample, by_state: Reference, ray_cluster: str, tmp_path: Path
) -> None:
    server = start_server("--once", "--data", str(sample.server_csv),
                          "--ray-address", ray_cluster)
    table, report = tmp_path / "table.csv", tmp_path / "report.json"

    run = run_client(server.port, "--data", str(sample.client_csv),
                     "--output", str(table), "--report", str(report))

    assert run.returncode == EXIT_OK, explain(run, server)
    assert_table_file_matches(table, by_state, ("state",))
    assert json.loads(report.read_text())["decisions"] == by_state.decisions
