"""Training batches built ahead of the model.

On a GPU by worker processes (threads would fight the training loop for the GIL and starve
the GPU of kernel launches); on a CPU by one thread that overlaps the next batch with this
step (numpy releases the GIL). ``TESSERA_TRAIN_WORKERS=N`` asks for N worker processes on any
device (0: the thread). The worker processes serve the whole run, so no epoch waits for them
to start.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

BatchFn = Callable[[int, int], tuple[np.ndarray, np.ndarray]]


def worker_count(cuda: bool) -> int:
    """Batch-building worker processes: ``$TESSERA_TRAIN_WORKERS``, else on CUDA all cores
    but two (at most 12), else none (a thread builds them)."""
    return int(os.environ.get("TESSERA_TRAIN_WORKERS") or
               (min(12, max(1, (os.cpu_count() or 2) - 2)) if cuda else 0))


class _RunBatches:
    """A run's batches, epoch after epoch, as a map-style dataset (item = a whole batch built
    by ``fn(epoch, step)``), so one set of worker processes serves every epoch."""

    def __init__(self, fn: BatchFn, first_epoch: int, end_epoch: int, steps: int) -> None:
        self.fn, self.first, self.steps = fn, first_epoch, steps
        self.n = max(0, end_epoch - first_epoch) * steps

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.fn(self.first + k // self.steps, k % self.steps)


class BatchFeed:
    """The batches ``make(epoch, step)`` of epochs ``first_epoch`` to ``end_epoch``, built
    ahead; :meth:`epoch` yields one epoch's in order. ``active=False``: nothing is left to
    train, so no worker process is started. :meth:`close` ends the workers or the thread."""

    def __init__(self, make: BatchFn, steps_per_epoch: int, first_epoch: int, end_epoch: int,
                 cuda: bool, active: bool = True) -> None:
        self.make, self.steps = make, steps_per_epoch
        workers = worker_count(cuda)
        self.pool = (ThreadPoolExecutor(1, thread_name_prefix="tessera-batches")
                     if workers == 0 else None)
        self.run_batches: Iterator[Any] | None = None
        if self.pool is None and active:
            import torch

            self.run_batches = iter(torch.utils.data.DataLoader(
                # a map-style dataset by protocol (__len__, __getitem__)
                _RunBatches(make, first_epoch, end_epoch, steps_per_epoch),  # type: ignore[arg-type]
                batch_size=None, num_workers=workers, pin_memory=cuda, prefetch_factor=4,
                multiprocessing_context="fork"))

    def epoch(self, epoch: int) -> Iterator[tuple[Any, Any]]:
        """Epoch ``epoch``'s batches, in order (two built ahead by the thread)."""
        if self.run_batches is not None:  # the run's batches come in order: this epoch's are next
            for _ in range(self.steps):
                yield next(self.run_batches)
            return
        ahead: deque = deque()
        assert self.pool is not None  # no worker processes: batches come from the thread
        for nxt in range(self.steps):
            ahead.append(self.pool.submit(self.make, epoch, nxt))
            if len(ahead) > 2:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()

    def close(self) -> None:
        """Stop building: the thread's queue is dropped, the worker processes end."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.run_batches = None
