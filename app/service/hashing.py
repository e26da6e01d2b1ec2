"""Worker processes that fingerprint a screening batch's large uploads.

At ImageNet's input size (224x224: 150,528 values a query) a fingerprint is ~1.5-1.9 ms of
numpy per image (the 8-bit conversion, then the window hashes), in ~20 calls over the image
that each give the interpreter lock back and take it again. Beside a thread that runs Python
without pause (what a saturated event loop does) each retake waits for the switch interval.
Threads cannot avoid that (they share the lock); processes can, if handing the work over does
not bring it back. Until 2026-11-30 it did: the screening thread converted the batch to 8 bits
itself (four numpy calls over 4.8 MB) and pickled the result through the pool's pipe, a 64 KB
pipe written in many pieces; ad hoc, beside a busy thread on two cores, the conversion took 1.9
ms per query of a batch of 32, the handover with the workers' hashing 4.7 (2.5 alone). Now the
screening thread copies the batch's float pixels once into a shared-memory block
(``SharedPixels``: one torch call) and sends each worker only where its part lies; the worker
converts its part to 8 bits and hashes it (``fingerprint_held``), and only the prints come back
through the pipe. ``bench.stateful_cost`` on two cores, batches of 32 at 224x224
(bench/results/stateful_cost.md): beside a busy thread 8.4 ms per query before, 3.1-5.3 after in
eleven runs (the busy thread and both workers share the two cores); alone 3.5 before and 1.3-3.1
after, against 1.9-2.3 on the screening thread. On an H200 the GPU service screened ~130 queries a
second before the change (7.5 ms a query, docs/deploy.md); after it, on 2026-12-04, 3.2-4.4 ms a
query, the thread still 80-95% busy: beside a GPU model the window hashes and block means now
run on the GPU, from the batch the model read there (``FingerprintHasher.device``,
``ADVGUARD_STATEFUL_FINGERPRINT_DEVICE``; 1.3-1.5 ms a query of pixels and hash, the thread
45-54% busy), and these workers are not started. The parts' rows concatenated are
bit-identical to the calling thread's prints.

Small uploads (CIFAR's 3,072 values) stay on the calling thread: their whole batch is a few
numpy calls, cheaper than sending it to a process. So do the uploads of a service whose pool
is off (``processes=0``) or broken (a worker died: the batch is hashed here from the shared
block, logged, and a new pool is started for the next one), and of a host whose workers or
shared memory cannot be had (logged once), so that screening never fails for want of either.

Workers start from a clean ``forkserver`` process, not by forking the service (which may hold
CUDA state and threads), and are started with the service, not on its first large upload. As
with any non-fork start, each worker imports the program's main module (``advguard``'s imports
only ``app.cli``, which loads the rest lazily: ~30 MB a worker). The shared block lives in
/dev/shm (a container's default 64 MB holds a full screening batch of 64 at 224 px: 38.5 MB);
should the service be killed, multiprocessing's resource tracker removes it.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import nullcontext
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import numpy.typing as npt
import torch

from app.core.stateful import device_hashes
from app.core.stateful.hashes import HASHED_VALUES_PER_PASS
from app.core.stateful.schemes import (
    ImagePrints,
    WindowHashScheme,
    fingerprint_images,
    fingerprint_pixels,
)

log = logging.getLogger(__name__)

# images of at least this many values go to the processes: one fills a hashing pass alone
LARGE_IMAGE_VALUES = HASHED_VALUES_PER_PASS
SHARED_MEMORY_DIR = "/dev/shm"  # where POSIX shared memory lives on Linux (its free space)


def is_large(image_values: int) -> bool:
    return image_values >= LARGE_IMAGE_VALUES


Spent = Callable[[str, float], None]  # (part, seconds): where the screening's time went


def _unrecorded(part: str, seconds: float) -> None:
    return None


def cpu_float(pixels: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """``pixels`` as float32 on the CPU, converted only when they are not: every torch call gives
    the interpreter lock back and takes it again, and beside a busy event loop each retake waits
    (ad hoc, two cores, beside a busy thread: converting a batch of 32 tensor by tensor, a no-op
    for the service's CPU float32 pixels, cost 2.5-6.8 ms per query of the batch, the one stack
    alone 0.1-0.6 ms). Reading a tensor's dtype and device is no torch call."""
    cpu = torch.device("cpu")
    if all(p.dtype == torch.float32 and p.device == cpu for p in pixels):
        return pixels
    if len({p.device for p in pixels}) == 1:  # rows of a GPU batch: one stack, one copy
        return list(torch.stack([p.detach() for p in pixels]).to(cpu, torch.float32))
    return [p.detach().to(cpu, torch.float32) for p in pixels]


def stacked_on(pixels: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``pixels`` (each C, H, W) as one float32 batch on ``device``: one stack where they lie
    (rows already there need no copy), each moved first only when they lie on several."""
    if len({p.device for p in pixels}) > 1:
        pixels = [p.to(device) for p in pixels]
    return torch.stack(list(pixels)).to(device, torch.float32)


@dataclass(frozen=True)
class HeldPixels:
    """Where a batch's float pixels lie in shared memory: the block's name and its shape
    (capacity, C, H, W); a worker's part is rows [start, stop)."""

    name: str
    shape: tuple[int, ...]


_attached: dict[HeldPixels, tuple[SharedMemory, npt.NDArray[np.float32]]] = {}


def fingerprint_held(
    scheme: WindowHashScheme, held: HeldPixels, start: int, stop: int
) -> ImagePrints:
    """A worker's part of a batch, read from the shared block: attached once per block (the
    last block only: a new one replaces it when the batch outgrows it)."""
    if held not in _attached:
        for block, _ in _attached.values():
            block.close()
        _attached.clear()
        block = SharedMemory(held.name)
        _attached[held] = (block, np.ndarray(held.shape, dtype=np.float32, buffer=block.buf))
    return fingerprint_pixels(scheme, _attached[held][1][start:stop])


class SharedPixels:
    """The screening thread's shared block, grown (replaced) when a batch outgrows it. Only that
    thread writes it, and only between batches: a batch's parts are read before the next is
    written."""

    def __init__(self) -> None:
        self._block: SharedMemory | None = None
        self._view: torch.Tensor | None = None
        self.held: HeldPixels | None = None

    def hold(self, pixels: Sequence[torch.Tensor]) -> tuple[HeldPixels, npt.NDArray[np.float32]]:
        """Copy ``pixels`` (each C, H, W) into the block: where they lie, and this process's view
        of them. Raises OSError when no block of that size can be had."""
        n, image = len(pixels), tuple(pixels[0].shape)
        if self.held is None or self.held.shape[1:] != image or self.held.shape[0] < n:
            self._grow(n, image)
        assert self.held is not None and self._view is not None
        with torch.no_grad():
            torch.stack(list(cpu_float(pixels)), out=self._view[:n])
        return self.held, self._view[:n].numpy()

    def _grow(self, n: int, image: tuple[int, ...]) -> None:
        capacity = 1 << max(3, (n - 1).bit_length())  # powers of two: few replacements
        shape = (capacity, *image)
        size = int(np.prod(shape)) * 4
        if os.path.isdir(SHARED_MEMORY_DIR):  # a full tmpfs would kill the writer (SIGBUS)
            stats = os.statvfs(SHARED_MEMORY_DIR)
            if stats.f_bavail * stats.f_frsize < size:
                raise OSError(f"{SHARED_MEMORY_DIR} has no room for {size:,} bytes")
        block = SharedMemory(create=True, size=size)
        self.close()
        self._block = block
        self._view = torch.from_numpy(np.ndarray(shape, dtype=np.float32, buffer=block.buf))
        self.held = HeldPixels(block.name, shape)

    def close(self) -> None:
        """Free the block: the workers' mappings stay valid until they attach the next one."""
        if self._block is not None:
            self._view = None
            self._block.close()
            self._block.unlink()
            self._block, self.held = None, None


class FingerprintHasher:
    """``prints`` of a batch of preprocessed pixels: when the images are large, their window
    hashes on ``device`` (a GPU: ``device_hashes``, on a CUDA stream of its own, so that the
    model's kernels do not queue behind them) or else on ``processes`` worker processes. One
    thread calls it (the one that screens)."""

    def __init__(
        self, scheme: WindowHashScheme, processes: int, device: torch.device | None = None
    ) -> None:
        if processes < 0:
            raise ValueError("processes must be >= 0")
        self.scheme = scheme
        self.processes = processes
        self.device = device
        self._stream: torch.cuda.Stream | None = None
        self._pool: ProcessPoolExecutor | None = None
        self._shared = SharedPixels()
        self.restarts = 0  # pools replaced after a worker died
        self.unavailable = False  # the workers or shared memory could not be had: hash here

    def start(self) -> None:
        """Start every worker now (each imports numpy and the hashing code once), so that the
        first large batch does not wait for them. Workers that cannot start (no process may be
        spawned here, or the main module fails to import in them) are logged once, and the
        hashing stays on the calling thread."""
        if self.device is not None or self.processes == 0 or self._pool or self.unavailable:
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
            self._unavailable()

    def prints(self, pixels: Sequence[torch.Tensor], spent: Spent = _unrecorded) -> ImagePrints:
        """The prints of preprocessed pixels (each C, H, W in [0, 1]), as ``fingerprint_pixels``
        gives them. ``spent(part, seconds)`` hears the time of the ``pixels`` (stacked, or
        copied into the shared block) and of the ``hash`` (with the conversion to 8 bits)."""
        n = len(pixels)
        started = time.perf_counter()
        if n == 0 or not is_large(int(pixels[0].numel())):
            return self._here(pixels, spent, started)
        if self.device is not None:
            try:
                return self._on_device(pixels, self.device, spent, started)
            except torch.OutOfMemoryError:  # a GPU the model fills: this batch on the host
                log.exception("no GPU memory for the window hashes: this batch on the host")
                return self._here(pixels, spent, time.perf_counter())
        if self.processes == 0:
            return self._here(pixels, spent, started)
        self.start()
        if self._pool is None:  # they could not start
            return self._here(pixels, spent, started)
        try:
            held, mine = self._shared.hold(pixels)
        except OSError:
            log.exception("no shared memory for the fingerprint workers: hashing here")
            self._unavailable()
            return self._here(pixels, spent, started)
        hashing = time.perf_counter()
        spent("pixels", hashing - started)
        try:
            return self._on_workers(held, mine)
        finally:
            spent("hash", time.perf_counter() - hashing)

    def _on_workers(self, held: HeldPixels, mine: npt.NDArray[np.float32]) -> ImagePrints:
        assert self._pool is not None
        n = len(mine)
        bounds = np.linspace(0, n, min(self.processes, n) + 1).round().astype(int).tolist()
        try:
            parts = [
                self._pool.submit(fingerprint_held, self.scheme, held, start, stop)
                for start, stop in itertools.pairwise(bounds)
            ]
            done = [part.result() for part in parts]
        except BrokenProcessPool:
            log.exception("a fingerprint worker died: hashing this batch here, restarting them")
            self._replace_pool()
            return fingerprint_pixels(self.scheme, mine)
        return ImagePrints(
            np.concatenate([part.sketches for part in done]),
            np.concatenate([part.keys for part in done]),
            [digest for part in done for digest in part.digests],
        )

    def _on_device(
        self, pixels: Sequence[torch.Tensor], device: torch.device, spent: Spent, started: float
    ) -> ImagePrints:
        """The batch on ``device`` as float pixels (rows of the model's own batch there need
        no upload: ``BatchResult.model_pixels``), made 8-bit, window-hashed and block-averaged
        there; the 8-bit images (a quarter of the floats' bytes), the hashes and the means come
        back for the rest of the prints (samples and digests: numpy, a fraction of the time).
        The model's rows are ready: its batch's results were copied to the host before they
        were served, which waits for every kernel before them, the upload included."""
        if device.type == "cuda" and self._stream is None:
            self._stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        s = self.scheme
        with torch.no_grad(), torch.cuda.stream(self._stream) if self._stream else nullcontext():
            stacked = stacked_on(pixels, device)
            hashing = time.perf_counter()
            spent("pixels", hashing - started)
            images = device_hashes.eight_bit(stacked)
            hashes = device_hashes.window_hashes(images, s.secret, s.step, s.window, s.top)
            means = device_hashes.block_means(images) if s.close_radius is not None else None
            on_host = images.cpu().numpy()
            words = device_hashes.as_words(hashes)
            means_on_host = None if means is None else means.cpu().numpy()
        try:
            return fingerprint_images(s, on_host, words, means_on_host)
        finally:
            spent("hash", time.perf_counter() - hashing)

    def _here(self, pixels: Sequence[torch.Tensor], spent: Spent, started: float) -> ImagePrints:
        with torch.no_grad():
            stacked = torch.stack(list(cpu_float(pixels)))
        hashing = time.perf_counter()
        spent("pixels", hashing - started)
        try:
            return fingerprint_pixels(self.scheme, stacked.numpy())
        finally:
            spent("hash", time.perf_counter() - hashing)

    def _drop_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def _unavailable(self) -> None:
        self._drop_pool()
        self.unavailable = True

    def _replace_pool(self) -> None:
        self._drop_pool()
        self.restarts += 1

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._shared.close()
