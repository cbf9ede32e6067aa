"""The server's side of one session: the four phases in order, on one socket.

``run_session`` is called in a child process per client (see
``server_socket.py``), so that nothing a client sends, even bytes that crash
the native library, can take the listening server down.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from . import crosstab, threshold
from .executor import (
    Pool,
    WorkerSetup,
    open_pool,
    submit_decoy_checks,
    submit_fresh_totals,
    submit_group,
    submit_selections,
)
from .handshake import Query, ServerPolicy, check_client_hello, server_hello
from .he import Ckks, PublicKeyHolder
from .layout import PassShape, query_count, server_positions
from .messages import Channel, Msg
from .records import linkage_columns, numeric_column, read_csv, require_column
from .reference import PreparedRecords, pass_shapes, prepare, server_depths
from .spec import LinkageSpec
from .table import TableShape, cell_of_records, table_shape, value_scale

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerData:
    """Everything the server loads once, before any client connects."""

    path: str
    frame: pd.DataFrame
    records: PreparedRecords
    spec: LinkageSpec
    policy: ServerPolicy


def load_server_data(
    path: str | Path, spec: LinkageSpec, mapping: dict[str, str], policy: ServerPolicy
) -> ServerData:
    """Read and encode the server CSV; check the policy's columns are there."""
    frame = read_csv(path)
    for column in policy.group_columns:
        require_column(frame, column, path, "a group-by column (--group-columns)")
    for column in policy.value_columns:
        numeric_column(frame, column, path)
    records = prepare(linkage_columns(frame, spec, mapping, path), spec)
    # Sessions need only the policy's columns: the rest would be copied into
    # every forked session and worker's memory accounting for nothing.
    kept = list(dict.fromkeys(policy.group_columns + policy.value_columns))
    return ServerData(str(path), frame[kept].copy(), records, spec, policy)


@dataclass
class Layout:
    """One session's server layout: shuffled positions for every pass and group."""

    shapes: list[PassShape]
    positions: list[list[np.ndarray]]

    def counts(self) -> list[list[int]]:
        return [[len(g) for g in groups] for groups in self.positions]


def session_layout(data: ServerData, size_class: int) -> Layout:
    shapes = pass_shapes(data.spec, size_class)
    buckets = data.records.buckets(shapes)
    depths = server_depths(data.spec, buckets, shapes)
    return Layout(
        shapes,
        [server_positions(b, s, d) for b, s, d in zip(buckets, shapes, depths)],
    )


@dataclass(frozen=True)
class SessionOptions:
    """How the server runs a session's heavy work."""

    workers: int = 2
    progress: bool = True
    ray_address: str | None = None


def run_session(
    channel: Channel, data: ServerData, options: SessionOptions = SessionOptions()
) -> str:
    """Serve one client to the end; returns 'table' or 'refused'."""
    started = time.perf_counter()
    query = check_client_hello(
        channel.recv_json(Msg.CLIENT_HELLO), data.spec, data.policy
    )
    ckks = Ckks(query.parameters)
    try:
        layout = session_layout(data, query.size_class)
        shape = table_shape(data.frame, query.group_by)
        channel.send_json(
            Msg.SERVER_HELLO, server_hello(shape, layout.counts(), data.policy)
        )
        keys = (channel.recv(Msg.PUBLIC_KEY), channel.recv(Msg.GALOIS_KEYS))
        public = PublicKeyHolder(
            ckks,
            ckks.load_public_key_untrusted(keys[0]),
            ckks.load_galois_keys_untrusted(keys[1]),
        )
        _log_phase(
            "handshake",
            started,
            channel,
            cells=shape.cells,
            size_class=query.size_class,
        )
        work, scales = _table_work(data, shape, query)
        setup = WorkerSetup(
            ckks.name, *keys, data.records.vectors, data.spec.threshold, work
        )
        pool = open_pool(setup, options.workers, options.ray_address)
        try:
            # The size check's decoys need nothing of the client's records:
            # the workers make them while the client encrypts its first group.
            decoys = threshold.draw_decoys(
                shape.cells, data.policy.min_cell_size, query.size_class
            )
            decoy_checks = submit_decoy_checks(pool, decoys, data.policy.min_cell_size)
            acc = _linkage_and_selection(
                channel, ckks, public, data, layout, work, pool, options
            )
            session = _Session(channel, ckks, public, data, query, pool)
            return _size_check_and_table(session, acc, scales, decoys, decoy_checks)
        finally:
            pool.close()
    finally:
        ckks.close()


@dataclass(frozen=True)
class _Session:
    """What the last phase needs of the session."""

    channel: Channel
    ckks: Ckks
    public: PublicKeyHolder
    data: ServerData
    query: Query
    pool: Pool


def _table_work(
    data: ServerData, shape: TableShape, query: Query
) -> tuple[crosstab.TableWork, crosstab.TableScales]:
    """The per-record cells and scaled values, and this session's secret factors."""
    raw = numeric_column(data.frame, query.value, data.path)
    scales = crosstab.TableScales(
        value_scale(raw), crosstab.count_scale(query.size_class)
    )
    work = crosstab.TableWork(
        cells=cell_of_records(data.frame, shape),
        values=raw / scales.value_scale,
        count_scale=scales.count_scale,
        rho=crosstab.table_factors(shape.cells),
        check=threshold.check_factors(shape.cells),
        reveal_counts=data.policy.reveal_counts,
    )
    return work, scales


def _linkage_and_selection(
    channel, ckks, public, data, layout, work, pool, options: SessionOptions
) -> crosstab.CellAccumulator:
    """Score every group and sum every pass's selections, in the order of
    :mod:`.messages`.

    Each group is one worker's task, and as many groups are in flight as
    there are workers, so a group's queries are loaded once; the last groups
    are split over the workers so that none waits at the end. A pass's
    selections are received after the next pass's queries, once every score
    of that pass has gone out, and summed on the workers while the next pass
    is scored.
    """
    started = time.perf_counter()
    sums = _SelectionSums(ckks, work, pool)
    groups = [(p, g) for p, passes in enumerate(layout.positions) for g in passes]
    split_from = len(groups) - max(1, pool.workers - 1)
    with tqdm(
        total=len(groups),
        desc="server: linkage",
        unit="group",
        disable=not options.progress,
    ) as bar:
        pending: deque = deque()  # (pass, futures), in group order
        summed = 0  # passes whose selections have been received

        def send_scores(until_pass: int | None = None, keep: int = 0) -> None:
            while len(pending) > keep and (
                until_pass is None or pending[0][0] <= until_pass
            ):
                _send_scores(channel, pending.popleft()[1], bar)

        def receive_selections(through_pass: int) -> None:
            nonlocal summed
            while summed <= through_pass:
                send_scores(until_pass=summed)  # the client waits for them
                sums.receive(channel, layout.positions[summed])
                summed += 1

        for index, (p, positions) in enumerate(groups):
            # Pass p-1's queries are all in, so pass p-2's selections are next.
            receive_selections(p - 2)
            queries = _receive_queries(channel, ckks, query_count(data.spec.dims))
            pending.append(
                (p, submit_group(pool, queries, positions, split=index >= split_from))
            )
            send_scores(keep=pool.workers - 1)
        send_scores()
        positions = sum(sum(c) for c in layout.counts())
        _log_phase(
            "linkage",
            started,
            channel,
            groups=len(groups),
            positions=positions,
            products=positions * query_count(data.spec.dims),
        )
        receive_selections(len(layout.positions) - 1)
    acc = sums.finish(public)
    _log_phase("linkage and selection", started, channel, cells=acc.cells)
    return acc


def _receive_queries(channel: Channel, ckks: Ckks, dims: int) -> list[bytes]:
    """One group's query ciphertexts; each worker checks them whole before use."""
    queries = [channel.recv(Msg.QUERY_CT) for _ in range(dims)]
    for blob in queries:
        ckks.check_ciphertext_header(blob)
    return queries


def _send_scores(channel: Channel, futures, bar) -> None:
    for future in futures:
        for blob in future.result():
            channel.send(Msg.SCORE_CT, blob)
    bar.update()


# Positions per cross-tab batch within a pass, at least: each task returns
# partial sums for every cell, so batches much smaller than this cost more to
# merge than to sum. A pass's remainder goes at the end of the pass.
SELECTION_BATCH = 32


class _SelectionSums:
    """The cross-tab's running sums: selections go to the workers in batches,
    and their partial sums are merged here as they finish."""

    def __init__(self, ckks: Ckks, work: crosstab.TableWork, pool: Pool) -> None:
        self.ckks, self.pool = ckks, pool
        self.acc = work.accumulator()
        self._blobs: list[bytes] = []
        self._rows: list[np.ndarray] = []
        self._running: list = []

    def receive(self, channel: Channel, groups: list[np.ndarray]) -> None:
        """One pass's selections: one ciphertext per position, in order."""
        for positions in groups:
            for row in positions:
                blob = channel.recv(Msg.SELECTION_CT)
                self.ckks.check_ciphertext_header(blob)  # the worker checks the rest
                self._blobs.append(blob)
                self._rows.append(row)
            if len(self._rows) >= SELECTION_BATCH:
                self._submit()
        if self._rows:
            self._submit()  # summed while the next pass is scored
        self._merge(wait=False)

    def finish(self, public: PublicKeyHolder) -> crosstab.CellAccumulator:
        """Every partial sum merged, rescaled and summed over the slots."""
        self._merge(wait=True)
        crosstab.finish_totals(self.ckks, self.acc, public.galois_keys)
        return self.acc

    def _submit(self) -> None:
        self._running += submit_selections(self.pool, self._blobs, self._rows)
        self._blobs, self._rows = [], []

    def _merge(self, wait: bool) -> None:
        still = []
        for future in self._running:
            if wait or future.done():
                crosstab.merge_partial(self.ckks, self.acc, future.result())
            else:
                still.append(future)
        self._running = still


def _size_check_and_table(
    session: _Session, acc, scales, decoys: threshold.Decoys, decoy_checks: list
) -> str:
    started = time.perf_counter()
    channel, ckks, public = session.channel, session.ckks, session.public
    policy, query = session.data.policy, session.query
    if all(c is None for c in acc.checks):
        channel.send_json(Msg.REFUSED, {"reason": _refusal(policy)})
        return "refused"
    checks, key = threshold.build_check(
        ckks,
        public,
        acc.checks,
        acc.check,
        policy.min_cell_size,
        query.size_class,
        fresh=lambda values: _collect_fresh(
            ckks, submit_fresh_totals(session.pool, values)
        ),
        decoys=(decoys, _collect_fresh(ckks, decoy_checks)),
    )
    channel.send_json(Msg.SIZE_CHECK, {"values": len(checks)})
    for ciphertext in checks:
        channel.send(Msg.SIZE_CHECK_CT, ckks.to_bytes(ciphertext))
    answers = threshold.parse_answers(
        channel.recv_json(Msg.SIZE_CHECK_SIGNS).get("signs"), len(checks)
    )
    passed = key.verdict(answers)
    _log_phase(
        "size check", started, channel, cells=acc.cells, passed=bool(passed.all())
    )
    if not passed.all():
        channel.send_json(Msg.REFUSED, {"reason": _refusal(policy)})
        return "refused"
    channel.send_json(
        Msg.TABLE,
        {"value_scale": scales.value_scale, "count_scale": scales.count_scale},
    )
    for ciphertext in crosstab.table_ciphertexts(ckks, public, acc):
        channel.send(Msg.TABLE_CT, ckks.to_bytes(ciphertext))
    return "table"


def _collect_fresh(ckks: Ckks, futures: list) -> list:
    """The ciphertexts of :func:`.executor.submit_fresh_totals` or
    :func:`.executor.submit_decoy_checks`, in order, each checked."""
    return [
        threshold.load_total(ckks, data)
        for future in futures
        for data in future.result()
    ]


def _refusal(policy: ServerPolicy) -> str:
    return (
        f"query refused: at least one cell of the table has fewer than "
        f"{policy.min_cell_size} linked people with a value"
    )


def _log_phase(name: str, started: float, channel: Channel, **sizes) -> None:
    extra = " ".join(f"{k}={v}" for k, v in sizes.items())
    logger.info(
        "phase %s: %.2f s, received %d B, sent %d B total; %s",
        name,
        time.perf_counter() - started,
        channel.bytes.received,
        channel.bytes.sent,
        extra,
    )
