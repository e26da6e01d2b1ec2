"""The fingerprint worker processes: the same prints as the calling thread, read from one shared
block, and screening that never fails for want of a worker or of shared memory."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import pytest
import torch

from app.core.stateful.defaults import DEFAULT_RULE, default_scheme
from app.core.stateful.match_rule import Answer
from app.core.stateful.schemes import fingerprint_images
from app.core.stateful.store import InProcessFingerprintStore
from app.service import hashing
from app.service.hashing import FingerprintHasher, is_large
from app.service.metrics import Metrics
from app.service.settings import Settings
from app.service.stateful import Pending, StatefulDetector, build_stateful, hashing_device

SCHEME = default_scheme(b"hashing-test-secret")


@pytest.fixture(scope="module")
def large() -> np.ndarray:
    """Five 224x224 uploads (ImageNet's input size): smooth blocks plus noise, one inverted."""
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (5, 3, 28, 28), dtype=np.uint8)
    images = np.repeat(np.repeat(blocks, 8, axis=2), 8, axis=3).astype(np.int16)
    images += rng.integers(-12, 13, images.shape, dtype=np.int16)
    out = np.clip(images, 0, 255).astype(np.uint8)
    out[2] = 255 - out[2]
    return out


def floats(images: np.ndarray) -> list[torch.Tensor]:
    """8-bit images as the preprocessed pixels the service screens (k / 255: exact in 8 bits)."""
    return list(torch.from_numpy(images.astype(np.float32) / 255.0))


@pytest.fixture
def hasher() -> Iterator[FingerprintHasher]:
    made = FingerprintHasher(SCHEME, processes=2)
    yield made
    made.close()


def _equal(a: object, b: object) -> bool:
    return (
        np.array_equal(a.sketches, b.sketches)  # type: ignore[attr-defined]
        and np.array_equal(a.keys, b.keys)  # type: ignore[attr-defined]
        and a.digests == b.digests  # type: ignore[attr-defined]
    )


def _workers(hasher: FingerprintHasher) -> list[int]:
    pool = hasher._pool
    assert pool is not None
    processes = pool._processes or {}
    return [process.pid for process in processes.values() if process.pid is not None]


def test_large_uploads_are_hashed_on_worker_processes_bit_for_bit(
    hasher: FingerprintHasher, large: np.ndarray
) -> None:
    assert is_large(int(large[0].size))
    prints = hasher.prints(floats(large))
    workers = _workers(hasher)
    assert len(workers) == 2 and os.getpid() not in workers
    assert _equal(prints, fingerprint_images(SCHEME, large))
    for n in (1, 2, 3):  # fewer images than processes, and uneven parts
        assert _equal(hasher.prints(floats(large[:n])), fingerprint_images(SCHEME, large[:n]))


def test_the_shared_block_grows_with_the_batch_and_is_freed_on_close(
    hasher: FingerprintHasher, large: np.ndarray
) -> None:
    """A batch larger than the block gets a new one (the workers attach it), a smaller one
    reuses it, and closing the hasher removes it from the system."""
    assert _equal(hasher.prints(floats(large[:2])), fingerprint_images(SCHEME, large[:2]))
    first = hasher._shared.held
    assert first is not None and first.shape[0] == 8  # the smallest block
    more = np.concatenate([large, 255 - large[:, :, ::-1]])  # 10 distinct images
    assert _equal(hasher.prints(floats(more)), fingerprint_images(SCHEME, more))
    grown = hasher._shared.held
    assert grown is not None and grown.shape[0] == 16 and grown.name != first.name
    with pytest.raises(FileNotFoundError):
        SharedMemory(first.name)  # the outgrown block is gone
    assert _equal(hasher.prints(floats(large[:3])), fingerprint_images(SCHEME, large[:3]))
    assert hasher._shared.held == grown
    hasher.close()
    with pytest.raises(FileNotFoundError):
        SharedMemory(grown.name)


def test_the_time_is_told_by_part(hasher: FingerprintHasher, large: np.ndarray) -> None:
    for images in (large[:3], np.ascontiguousarray(large[:3, :, :32, :32])):
        heard: list[tuple[str, float]] = []
        hasher.prints(floats(images), lambda part, seconds, to=heard: to.append((part, seconds)))
        assert [part for part, _ in heard] == ["pixels", "hash"]
        assert all(seconds >= 0 for _, seconds in heard)


def test_small_uploads_stay_on_the_calling_thread(
    hasher: FingerprintHasher, large: np.ndarray
) -> None:
    small = np.ascontiguousarray(large[:, :, :32, :32])
    assert not is_large(int(small[0].size))
    assert _equal(hasher.prints(floats(small)), fingerprint_images(SCHEME, small))
    assert hasher._pool is None and hasher._shared.held is None  # no process, no block


def test_no_processes_hashes_on_the_calling_thread(large: np.ndarray) -> None:
    hasher = FingerprintHasher(SCHEME, processes=0)
    assert _equal(hasher.prints(floats(large[:2])), fingerprint_images(SCHEME, large[:2]))
    assert hasher._pool is None
    with pytest.raises(ValueError, match="processes"):
        FingerprintHasher(SCHEME, processes=-1)


def test_a_dead_worker_costs_no_batch_and_the_pool_is_replaced(
    hasher: FingerprintHasher, large: np.ndarray
) -> None:
    hasher.start()
    first = _workers(hasher)
    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not hasher._pool._broken and time.monotonic() < deadline:  # type: ignore[union-attr]
        time.sleep(0.01)  # the pool's manager thread sees the death
    expected = fingerprint_images(SCHEME, large)
    assert _equal(hasher.prints(floats(large)), expected)  # answered, here if need be
    assert _equal(hasher.prints(floats(large)), expected)
    assert hasher.restarts == 1
    assert not set(_workers(hasher)) & set(first)  # a new pool, new processes


def test_workers_that_cannot_start_leave_the_hashing_on_the_calling_thread(
    large: np.ndarray, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A host where the workers cannot start still screens: the failure is logged once and
    every batch is hashed here, without trying to start them again for each one."""
    started: list[int] = []

    class Unstartable(ProcessPoolExecutor):
        def submit(self, *args: Any, **kwargs: Any) -> Any:
            started.append(1)
            raise BrokenProcessPool("a child process terminated abruptly")

    monkeypatch.setattr(hashing, "ProcessPoolExecutor", Unstartable)
    hasher = FingerprintHasher(SCHEME, processes=2)
    with caplog.at_level(logging.ERROR, logger="app.service.hashing"):
        hasher.start()
    assert hasher.unavailable and hasher._pool is None
    assert "could not start" in caplog.text
    for n in (2, 3):
        assert _equal(hasher.prints(floats(large[:n])), fingerprint_images(SCHEME, large[:n]))
    assert started == [1]  # tried once
    hasher.close()


def test_without_shared_memory_the_hashing_stays_on_the_calling_thread(
    large: np.ndarray, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A host with no room in /dev/shm (a full or tiny tmpfs) screens on the calling thread,
    logged once: it neither fails the batch nor writes past the end of the tmpfs."""
    monkeypatch.setattr(hashing, "SHARED_MEMORY_DIR", "/proc")  # reports no free space
    hasher = FingerprintHasher(SCHEME, processes=2)
    try:
        with caplog.at_level(logging.ERROR, logger="app.service.hashing"):
            for n in (2, 3):
                got = hasher.prints(floats(large[:n]))
                assert _equal(got, fingerprint_images(SCHEME, large[:n]))
        assert hasher.unavailable and hasher._pool is None and hasher._shared.held is None
        assert caplog.text.count("no shared memory") == 1
    finally:
        hasher.close()


def test_the_service_starts_the_workers_only_for_large_uploads() -> None:
    """``build_stateful`` starts them with the service (not on the first upload) when its
    bundle's uploads are large, and never for CIFAR-size ones."""
    settings = Settings(device="cpu", stateful_fingerprint_processes=2)
    for values, started in ((3 * 32 * 32, False), (3 * 224 * 224, True)):
        detector = build_stateful(settings, Metrics(), lambda *_: False, values)
        assert detector is not None
        try:
            assert (detector.hasher._pool is not None) is started
        finally:
            detector.close()
        assert detector.hasher._pool is None


def test_a_device_hashes_large_uploads_into_the_hosts_prints(large: np.ndarray) -> None:
    """With a device (the model's GPU in production; the CPU here runs the same torch code),
    large uploads are window-hashed there and their prints are the host's, bit for bit; no
    worker process is started, and CIFAR-size uploads stay on the calling thread."""
    hasher = FingerprintHasher(SCHEME, processes=2, device=torch.device("cpu"))
    parts: list[str] = []
    try:
        hasher.start()
        assert hasher._pool is None
        prints = hasher.prints(floats(large), lambda part, _: parts.append(part))
        assert _equal(prints, fingerprint_images(SCHEME, large))
        assert parts == ["pixels", "hash"]
        small = large[:, :, :32, :32].copy()
        assert _equal(hasher.prints(floats(small)), fingerprint_images(SCHEME, small))
    finally:
        hasher.close()


def test_rows_of_one_batch_are_hashed_as_separate_uploads(large: np.ndarray) -> None:
    """The service screens large uploads from the model's own batch on its GPU (rows of one
    tensor, ``BatchResult.model_pixels``), mixed with separate uploads where a query was
    looked up before it was classified: the prints are those of the uploads, on the device
    path and on the host's (``cpu_float``)."""
    batch = torch.from_numpy(large.astype(np.float32) / 255.0)
    rows = [batch[i] for i in range(len(large))]
    mixed = [*rows[:3], *floats(large[3:])]
    expected = fingerprint_images(SCHEME, large)
    on_device = FingerprintHasher(SCHEME, processes=0, device=torch.device("cpu"))
    on_host = FingerprintHasher(SCHEME, processes=0)
    for hasher, pixels in [(on_device, rows), (on_device, mixed), (on_host, rows)]:
        assert _equal(hasher.prints(pixels), expected)
    doubles = [row.double() for row in rows]  # not float32: one stack, one conversion
    assert all(torch.equal(a, b) for a, b in zip(hashing.cpu_float(doubles), rows, strict=True))


def test_a_device_out_of_memory_hashes_the_batch_on_the_host(
    large: np.ndarray, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A GPU that the model fills costs no batch: it is hashed on the host, logged."""

    def out_of_memory(*_: object) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    monkeypatch.setattr(hashing.device_hashes, "window_hashes", out_of_memory)
    hasher = FingerprintHasher(SCHEME, processes=0, device=torch.device("cpu"))
    with caplog.at_level(logging.ERROR, logger=hashing.__name__):
        prints = hasher.prints(floats(large[:2]))
    assert _equal(prints, fingerprint_images(SCHEME, large[:2]))
    assert "no GPU memory for the window hashes" in caplog.text


def test_the_hashing_device_follows_a_gpu_model_under_auto() -> None:
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert hashing_device("auto", gpu) == gpu
    assert hashing_device("auto", cpu) is None and hashing_device("auto", None) is None
    assert hashing_device("cpu", gpu) is None
    settings = Settings(device="cpu", stateful_fingerprint_processes=2)
    detector = build_stateful(settings, Metrics(), lambda *_: False, 3 * 224 * 224, gpu)
    assert detector is not None
    try:  # the GPU hashes: no worker is started (nothing touches CUDA until a large batch)
        assert detector.hasher.device == gpu and detector.hasher._pool is None
    finally:
        detector.close()
    with pytest.raises(ValueError, match="stateful_fingerprint_device"):
        Settings(device="cpu", stateful_fingerprint_device="gpu")  # type: ignore[arg-type]


def test_a_large_batch_is_screened_as_the_pure_replay_screens_it(large: np.ndarray) -> None:
    """The service's path for 224 px uploads (shared block, worker processes) detects the same
    probes and serves the same anchors under ``silent`` as the pure store replaying the 8-bit
    images: the photo, then probes that each move 300 random values."""
    rng = np.random.default_rng(11)
    images = np.repeat(large[:1], 8, axis=0).astype(np.int16)
    for probe in images[1:]:
        flat = probe.reshape(-1)
        where = rng.choice(flat.size, 300, replace=False)
        flat[where] += rng.choice([-40, 40], 300)
    images = np.clip(images, 0, 255).astype(np.uint8)
    answers = [Answer("accepted", 3, float(i), 0.0) for i in range(len(images))]  # one class

    store = InProcessFingerprintStore(SCHEME)
    prints = fingerprint_images(SCHEME, images)
    replayed: list[Answer] = []
    for i, answer in enumerate(answers):
        evidence, stored = store.check_and_store(
            "mallory", prints.sketches[i], prints.digests[i], float(i), answer, prints.keys[i]
        )
        detected = DEFAULT_RULE.detects(evidence, answer) and evidence.anchor is not None
        served = evidence.anchor if detected else answer
        assert served is not None
        if detected:
            store.relabel(stored, served)
        replayed.append(served)
    assert replayed[-1] != answers[-1]  # the sequence is detected, so the check can fail

    detector = StatefulDetector(
        SCHEME, DEFAULT_RULE, InProcessFingerprintStore(SCHEME), "silent", fingerprint_processes=2
    )
    try:
        pixels = floats(images)
        served_batches = detector.screen_batch(
            [Pending("mallory", p, a) for p, a in zip(pixels[:3], answers[:3], strict=True)]
        ) + detector.screen_batch(
            [Pending("mallory", p, a) for p, a in zip(pixels[3:], answers[3:], strict=True)]
        )
        assert detector.hasher._pool is not None and detector.hasher._shared.held is not None
    finally:
        detector.close()
    assert served_batches == replayed
