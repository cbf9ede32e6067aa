"""Where the server's heavy work runs: a local process pool, or a Ray cluster.

Workers each build the CKKS context and load the client's public keys once per
session (:func:`init_worker`), then run tasks: module-level functions that
take the worker's state first, :func:`protocol.linkage.score_rows`,
:func:`protocol.crosstab.sum_rows`, :func:`protocol.threshold.decoy_checks`
and :func:`protocol.threshold.fresh_totals`.
TenSEAL holds Python's interpreter lock, so threads would not help; processes
(local) or Ray actors (one per worker, anywhere in the cluster) do.

What scales with the number of workers: the linkage, which is almost all of
the server's time (one encoded product per server position and pair of
dimensions), the cross-tab's products, and the size check's decoys. The
session's own process still receives the client's ciphertexts, checks them,
adds the workers' partial sums and sums slots with rotations.

Nothing here unpickles what a peer sent: the workers receive the client's
ciphertexts as bytes (whose SEAL header the session process has checked) and
check each whole, as :meth:`.he.Ckks.load_ciphertext_untrusted` does, before
using it; everything else they receive is the server's own. A ciphertext that
crashed the native library would end a worker and so the session, never the
listening server.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import crosstab, linkage, threshold
from .crosstab import TableWork
from .he import Ckks, PublicKeyHolder


@dataclass(frozen=True)
class WorkerSetup:
    """What every worker needs for one session."""

    parameters: str
    public_key: bytes
    galois_keys: bytes
    vectors: np.ndarray
    threshold: float
    table: TableWork | None = None


@dataclass
class Worker:
    """One worker's state for the session: its context, the client's keys, the data."""

    ckks: Ckks
    public: PublicKeyHolder
    setup: WorkerSetup


_WORKER: list[Worker] = []


def init_worker(setup: WorkerSetup) -> Worker:
    """Runs once in each worker: build the context, load the client's public keys."""
    ckks = Ckks(setup.parameters)
    public = PublicKeyHolder(
        ckks,
        ckks.load_public_key_untrusted(setup.public_key),
        ckks.load_galois_keys_untrusted(setup.galois_keys),
    )
    _WORKER[:] = [Worker(ckks, public, setup)]
    return _WORKER[0]


def _run(task: Callable, *args):
    return task(_WORKER[0], *args)


class LocalPool:
    """A pool of forked worker processes on this machine."""

    def __init__(self, workers: int, setup: WorkerSetup) -> None:
        self.workers = workers
        self._pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=init_worker,
            initargs=(setup,),
        )

    def submit(self, task: Callable, *args) -> Future:
        return self._pool.submit(_run, task, *args)

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


class RayPool:
    """One Ray actor per worker on an existing cluster (``ray start --head``).

    The package is shipped to the cluster with the job (``py_modules``), so the
    cluster's machines need only the runtime requirements installed.
    """

    def __init__(self, address: str, workers: int, setup: WorkerSetup) -> None:
        import ray

        import protocol

        if not ray.is_initialized():
            ray.init(
                address=address,
                logging_level="ERROR",
                log_to_driver=False,
                runtime_env={"py_modules": [protocol]},
            )
        self._ray = ray
        actor = ray.remote(num_cpus=1)(_WorkerActor)
        shared = ray.put(setup)
        self.workers = workers
        self._actors = [actor.remote(shared) for _ in range(workers)]
        self._next = 0

    def submit(self, task: Callable, *args) -> Future:
        actor = self._actors[self._next % len(self._actors)]
        self._next += 1
        return actor.run.remote(task, *args).future()

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)


class _WorkerActor:
    """A Ray actor holding one worker's state for the session."""

    def __init__(self, setup: WorkerSetup) -> None:
        self.worker = init_worker(setup)

    def run(self, task: Callable, *args):
        return task(self.worker, *args)


Pool = LocalPool | RayPool


def open_pool(setup: WorkerSetup, workers: int, ray_address: str | None) -> Pool:
    """The local pool, or the Ray pool when a cluster address is given."""
    if ray_address:
        return RayPool(ray_address, workers, setup)
    return LocalPool(workers, setup)


def _parts(count: int, workers: int) -> list[np.ndarray]:
    """Indices 0..count-1 in at most ``workers`` consecutive, non-empty runs."""
    return [p for p in np.array_split(np.arange(count), workers) if len(p)]


def submit_group(
    pool, query_bytes: list[bytes], positions: np.ndarray, split: bool = True
) -> list[Future]:
    """A group's positions as one task, or split over the workers (each then
    loads all the group's queries); futures in position order."""
    parts = _parts(len(positions), pool.workers if split else 1)
    return [
        pool.submit(linkage.score_rows, query_bytes, positions[part]) for part in parts
    ]


def submit_selections(
    pool, selections: list[bytes], positions: list[np.ndarray]
) -> list[Future]:
    """Split selections (one per position row) over the workers for the cross-tab."""
    return [
        pool.submit(
            crosstab.sum_rows,
            [selections[i] for i in part],
            np.stack([positions[i] for i in part]),
        )
        for part in _parts(len(positions), pool.workers)
    ]


def submit_decoy_checks(
    pool, decoys: threshold.Decoys, min_cell_size: int
) -> list[Future]:
    """Split threshold.decoy_checks of ``decoys`` over the workers, in order."""
    factors, counts = decoys.factors.tolist(), decoys.counts.tolist()
    return [
        pool.submit(
            threshold.decoy_checks,
            [factors[i] for i in part],
            [counts[i] for i in part],
            min_cell_size,
        )
        for part in _parts(len(factors), pool.workers)
    ]


def submit_fresh_totals(pool, values: list[float]) -> list[Future]:
    """Split threshold.fresh_totals of ``values`` over the workers, in order."""
    return [
        pool.submit(threshold.fresh_totals, [values[i] for i in part])
        for part in _parts(len(values), pool.workers)
    ]
