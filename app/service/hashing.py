"""Worker processes that fingerprint a screening batch's large uploads.

At ImageNet's input size (224x224: 150,528 values a query) a window-hash fingerprint is
~1.5-1.9 ms of numpy per image, in ~15 calls over the image that each give the interpreter lock
back and take it again. Beside a thread that runs Python without pause (what a saturated event
loop does) each retake waits for the switch interval: measured by ``bench.stateful_cost`` on
two cores, a batch of 32 costs 182 ms per query on the screening thread, 8.4 ms on two worker
processes (bench/results/stateful_cost.md). Threads cannot avoid that (they share the lock);
processes can. A batch is cut into one contiguous part per process, each part hashed there by
``app.core.stateful.fingerprint_images``, and the parts' rows concatenated: bit-identical to
hashing the batch on the calling thread, which then takes the lock once per part. The price:
with nothing else running, on two cores, 3.5 ms per query against 1.9 on the thread (the
batch's pixels are pickled through a pipe to the workers; a shared-memory file instead measured
no faster). On an H200 the move did not raise the GPU service's screening rate (~130 queries/s
before and after, docs/deploy.md): something else limits it there, not yet found.

Small uploads (CIFAR's 3,072 values) stay on the calling thread: their whole batch is a few
numpy calls, cheaper than sending it to a process. So do the uploads of a service whose pool
is off (``processes=0``) or broken (a worker died: the batch is hashed here, logged, and a new
pool is started for the next one), so that screening never fails for want of a worker.

Workers start from a clean ``forkserver`` process, not by forking the service (which may hold
CUDA state and threads), and are started with the service, not on its first large upload. As
with any non-fork start, each worker imports the program's main module (``advguard``'s imports
only ``app.cli``, which loads the rest lazily: ~30 MB a worker).
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial

import numpy as np
import numpy.typing as npt

from app.core.stateful import (
    HASHED_VALUES_PER_PASS,
    ImagePrints,
    WindowHashScheme,
    fingerprint_images,
)

log = logging.getLogger(__name__)

# images of at least this many values go to the processes: one fills a hashing pass alone
LARGE_IMAGE_VALUES = HASHED_VALUES_PER_PASS


def is_large(image_values: int) -> bool:
    return image_values >= LARGE_IMAGE_VALUES


class FingerprintHasher:
    """``fingerprints`` of a batch of 8-bit images, on ``processes`` worker processes when they
    are large. One thread calls it (the one that screens)."""

    def __init__(self, scheme: WindowHashScheme, processes: int) -> None:
        if processes < 0:
            raise ValueError("processes must be >= 0")
        self.scheme = scheme
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self.restarts = 0  # pools replaced after a worker died
        self.unavailable = False  # the workers could not start: hash on the calling thread

    def start(self) -> None:
        """Start every worker now (each imports numpy and the hashing code once), so that the
        first large batch does not wait for them. Workers that cannot start (no process may be
        spawned here, or the main module fails to import in them) are logged once, and the
        hashing stays on the calling thread."""
        if self.processes == 0 or self._pool is not None or self.unavailable:
            return
        tiny = np.zeros((1, 3, 8, 8), dtype=np.uint8)
        try:
            self._pool = ProcessPoolExecutor(
                self.processes, mp_context=multiprocessing.get_context("forkserver")
            )
            waiting = [
                self._pool.submit(fingerprint_images, self.scheme, tiny)
                for _ in range(self.processes)
            ]
            for future in waiting:
                future.result()
        except (BrokenProcessPool, OSError, RuntimeError):
            log.exception("fingerprint workers could not start: hashing on the screening thread")
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            self.unavailable = True

    def fingerprints(self, images: npt.NDArray[np.uint8]) -> ImagePrints:
        n = len(images)
        if self.processes == 0 or n == 0 or not is_large(int(images[0].size)):
            return fingerprint_images(self.scheme, images)
        self.start()
        if self._pool is None:  # they could not start
            return fingerprint_images(self.scheme, images)
        parts = np.array_split(images, min(self.processes, n))
        try:
            done = list(self._pool.map(partial(fingerprint_images, self.scheme), parts))
        except BrokenProcessPool:
            log.exception("a fingerprint worker died: hashing this batch here, restarting them")
            self._replace_pool()
            return fingerprint_images(self.scheme, images)
        return ImagePrints(
            np.concatenate([part.sketches for part in done]),
            np.concatenate([part.keys for part in done]),
            [digest for part in done for digest in part.digests],
        )

    def _replace_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None
        self.restarts += 1

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
