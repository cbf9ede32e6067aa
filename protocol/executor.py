"""Where the server's heavy work runs: a local process pool, or a Ray cluster.

Both run the same task, :func:`protocol.linkage.score_rows`, on workers that
each build the CKKS context and load the client's public keys once per
session. TenSEAL holds Python's interpreter lock, so threads would not help;
processes (local) or Ray actors (one per worker, anywhere in the cluster) do.

What scales with the number of workers: the linkage, which is almost all of
the server's time (one encoded product per server position and pair of
dimensions). The session's own process still receives the client's
ciphertexts, checks them and sums the cross-tab.

Nothing here unpickles what a peer sent: the workers receive bytes that the
session process has already checked, plus the server's own arrays.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import linkage


@dataclass(frozen=True)
class WorkerSetup:
    """What every worker needs for one session."""

    parameters: str
    public_key: bytes
    galois_keys: bytes
    vectors: np.ndarray
    threshold: float

    def args(self, vectors=None) -> tuple:
        chosen = self.vectors if vectors is None else vectors
        return (
            self.parameters,
            self.public_key,
            self.galois_keys,
            chosen,
            self.threshold,
        )


class LocalPool:
    """A pool of forked worker processes on this machine."""

    def __init__(self, workers: int, setup: WorkerSetup) -> None:
        self.workers = workers
        self._pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=linkage.init_worker,
            initargs=setup.args(),
        )

    def submit(self, query_bytes: list[bytes], rows: np.ndarray) -> Future:
        return self._pool.submit(linkage.score_rows, query_bytes, rows)

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
        actor = ray.remote(num_cpus=1)(_ScoreActor)
        vectors = ray.put(setup.vectors)
        self.workers = workers
        self._actors = [actor.remote(*setup.args(vectors)) for _ in range(workers)]
        self._next = 0

    def submit(self, query_bytes: list[bytes], rows: np.ndarray) -> Future:
        actor = self._actors[self._next % len(self._actors)]
        self._next += 1
        return actor.score.remote(query_bytes, rows).future()

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)


class _ScoreActor:
    """A Ray actor holding one worker's context and keys for the session."""

    def __init__(self, *args) -> None:
        linkage.init_worker(*args)

    def score(self, query_bytes: list[bytes], rows: np.ndarray) -> list[bytes]:
        return linkage.score_rows(query_bytes, rows)


def open_pool(setup: WorkerSetup, workers: int, ray_address: str | None):
    """The local pool, or the Ray pool when a cluster address is given."""
    if ray_address:
        return RayPool(ray_address, workers, setup)
    return LocalPool(workers, setup)


def submit_group(pool, query_bytes: list[bytes], positions: np.ndarray) -> list[Future]:
    """Split a group's positions over the workers; futures in position order."""
    chunks = [c for c in np.array_split(positions, pool.workers) if len(c)]
    return [pool.submit(query_bytes, chunk) for chunk in chunks]
