"""The model's forward pass beside a thread that sketches batches: torch's pooling against numpy's.

With Redis, or a model on a GPU, the stateful screening runs on a thread of its own
(``app.service.stateful.ScreeningWorker``). Until ``ed200fa`` the blend test's sketches were
pooled there by torch (``adaptive_avg_pool2d``), which splits its work at any size: the thread
started an OpenMP team of its own beside the model's, and on few cores those threads take the
cores from the model's. Since, the host pools with numpy (``app.core.stateful.blends.sketches``).

Per setting, the CIFAR ResNet-20 (random weights: only time is measured) classifies batches of
``--batch`` 32x32 images on the main thread, with ``--torch-threads`` intra-op threads: alone;
beside a thread sketching a batch every ``--period-ms`` by torch's pooling (before
``ed200fa``); beside one sketching by ``sketches`` (today's). Settings alternate round by round
so that the machine's drift meets each. Median and mean ms per forward pass, and the threads
the process gained while the sketching thread ran (an OpenMP team shows here).
Usage: python -m bench.sketch_contention [--batch 16] [--passes 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch

from app.cli import at_least
from app.core.cifar_resnet import cifar_resnet
from app.core.stateful.blends import SKETCH_SIDE, sketches
from bench.common import write_results

Sketch = Callable[[torch.Tensor], object]
SETTINGS = ("alone", "beside torch's pooling (before ed200fa)", "beside sketches (today's)")


def torch_pooling(batch: torch.Tensor) -> object:
    """The sketches as ``sketches`` pooled them on the host until ``ed200fa``."""
    with torch.no_grad():
        pooled = torch.nn.functional.adaptive_avg_pool2d(batch, (SKETCH_SIDE, SKETCH_SIDE))
    return (pooled * 255.0).reshape(len(batch), -1).numpy().astype(np.float16)


def todays_sketches(batch: torch.Tensor) -> object:
    return sketches(batch, 255.0)


def thread_count() -> int:
    """The process's threads (Linux); 0 where /proc is not there."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


@contextmanager
def sketching_beside(sketch: Sketch, batch: torch.Tensor, period_s: float) -> Iterator[list[int]]:
    """A thread sketching ``batch`` every ``period_s`` while the block runs; yields a list that
    gets the threads the process gained once the thread had sketched (after the block)."""
    stop = threading.Event()
    gained: list[int] = []
    started = threading.Event()

    def run() -> None:
        try:
            before = thread_count()
            sketch(batch)
            gained.append(thread_count() - before)
        finally:  # a sketch that raises must not leave the caller waiting
            started.set()
        while not stop.wait(period_s):
            sketch(batch)

    worker = threading.Thread(target=run, name="sketching", daemon=True)
    worker.start()
    started.wait()
    try:
        yield gained
    finally:
        stop.set()
        worker.join()


def forward_times(model: torch.nn.Module, batch: torch.Tensor, passes: int) -> list[float]:
    spent = []
    with torch.no_grad():
        for _ in range(passes):
            started = time.perf_counter()
            model(batch)
            spent.append(1000 * (time.perf_counter() - started))
    return spent


def measure(args: argparse.Namespace) -> dict[str, Any]:
    model = cifar_resnet("resnet20").eval()
    batch = torch.rand(args.batch, 3, 32, 32)
    sketched = torch.rand(args.batch, 3, 32, 32)
    forward_times(model, batch, 10)  # warm: the main thread's team exists before any setting
    sketchers = (None, torch_pooling, todays_sketches)
    beside: dict[str, Sketch | None] = dict(zip(SETTINGS, sketchers, strict=True))
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    gained: dict[str, int] = {name: 0 for name in SETTINGS}
    period = args.period_ms / 1000
    for _ in range(args.rounds):
        for name, sketch in beside.items():
            context = (
                nullcontext([0]) if sketch is None else sketching_beside(sketch, sketched, period)
            )
            with context as threads:
                times[name] += forward_times(model, batch, args.passes)
            gained[name] = max(gained[name], threads[0] if threads else 0)
    return {
        name: {
            "median_ms": float(np.median(values)),
            "mean_ms": float(np.mean(values)),
            "threads_gained": gained[name],
        }
        for name, values in times.items()
    }


def table(results: dict[str, Any]) -> str:
    alone = results["forward"][SETTINGS[0]]["median_ms"]
    rows = "\n".join(
        f"| {name} | {ms['median_ms']:.2f} | {ms['mean_ms']:.2f} | {ms['median_ms'] / alone:.2f} "
        f"| {ms['threads_gained']} |"
        for name, ms in results["forward"].items()
    )
    return (
        f"CIFAR ResNet-20 (random weights), batches of {results['batch']} on the main thread, "
        f"{results['torch_threads']} torch thread(s); a second thread sketches a batch of "
        f"{results['batch']} every {results['period_ms']} ms; {results['rounds']} alternating "
        f"rounds of {results['passes']} forward passes per setting.\n\n"
        "| setting | median ms a pass | mean ms | median over alone's | threads gained |\n"
        f"|---|---|---|---|---|\n{rows}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=at_least(1), default=16, help="images per batch")
    parser.add_argument(
        "--passes", type=at_least(1), default=100, help="forward passes per setting and round"
    )
    parser.add_argument("--rounds", type=at_least(1), default=3, help="alternating rounds")
    parser.add_argument(
        "--period-ms", type=float, default=10.0, help="the sketching thread's period in ms"
    )
    parser.add_argument(
        "--torch-threads", type=at_least(0), default=2, help="torch's intra-op threads; 0: torch's"
    )
    parser.add_argument("--name", default="sketch_contention", help="results file name")
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    results: dict[str, Any] = {
        "batch": args.batch,
        "passes": args.passes,
        "rounds": args.rounds,
        "period_ms": args.period_ms,
        "torch_threads": torch.get_num_threads(),
        "forward": measure(args),
    }
    path = write_results(args.name, results, table(results))
    print(path.read_text())
    return 0


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m bench.sketch_contention"))
