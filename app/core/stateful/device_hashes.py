"""The window hash (``hashes.window_hashes``) in torch, for a GPU beside the model.

On an H200 the service's screening thread hashed 224 px uploads at 3.3-4.8 ms a query on the
host (numpy on worker processes, ``app.service.hashing``), busy 80-95% of the time, and the
guarded service served 62-67% of what it served without the screening (bench/results/gpu,
2026-12-04). The hash is integer arithmetic over every window of the image: on the GPU that
already holds the model, a batch is a few kernels. These functions give the numpy functions'
values bit for bit, on any device (the tests compare them on the CPU; the GPU pack on cuda).

torch has no unsigned 64-bit arithmetic on every device, so the words are held as int64:
addition and multiplication wrap the same way (two's complement), right shifts are made
logical with a mask, and order is unsigned order once the sign bit is flipped.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

from app.core.stateful.close_copies import BLOCK_GRID, block_sizes
from app.core.stateful.hashes import CODE_BITS, MIX1, MIX2, U64, chunk_tables

_SIGN = -(1 << 63)  # the sign bit as an int64: x ^ _SIGN orders signed as x orders unsigned


def _signed(word: np.uint64 | int) -> int:
    """A 64-bit word as the int64 with the same bits."""
    value = int(word)
    return value - (1 << 64) if value >= 1 << 63 else value


_MIX1_SIGNED, _MIX2_SIGNED = _signed(MIX1), _signed(MIX2)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 words (torch's is arithmetic: the sign bit fills)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """``hashes.mix64`` on int64 words."""
    x = x ^ _shift_right(x, 30)
    x = x * _MIX1_SIGNED
    x = x ^ _shift_right(x, 27)
    x = x * _MIX2_SIGNED
    return x ^ _shift_right(x, 31)


def eight_bit(pixels: torch.Tensor) -> torch.Tensor:
    """``hashes.eight_bit`` in torch: [0, 1] float32 pixels as 8-bit values (round half to
    even, as numpy's ``rint``; the float32 product is the same IEEE operation)."""
    return (pixels * 255.0).round().clamp(0, 255).to(torch.uint8)


@cache
def _device_tables(
    secret: bytes, step: int, window: int, device: str
) -> tuple[int, int, tuple[torch.Tensor, ...]]:
    """``hashes.chunk_tables`` as int64 tensors on ``device`` (a few hundred KB each), once."""
    bits, offset, tables = chunk_tables(secret, step, window)
    on_device = tuple(torch.from_numpy(table.view(np.int64).copy()).to(device) for table in tables)
    return bits, _signed(offset), on_device


def _packed(values: torch.Tensor, bits: int, size: int) -> torch.Tensor:
    """(n, L) values -> (n, L - size + 1): the ``size`` values from each position, packed."""
    span = values.shape[1] - size + 1
    codes = values[:, :span].clone()
    for i in range(1, size):
        codes |= values[:, i : i + span] << (bits * i)
    return codes


def window_hash_rows(images: torch.Tensor, secret: bytes, step: int, window: int) -> torch.Tensor:
    """(n, 3, H, W) uint8 -> (n, positions) int64: every window's mixed hash in file order (row
    by row, RGB interleaved), the bits of ``hashes._window_hash_rows``'s words."""
    n = images.shape[0]
    values = (images // step).permute(0, 2, 3, 1).reshape(n, -1).to(torch.int64)
    size = values.shape[1]
    starts = size - window + 1
    if starts < 1:
        raise ValueError(f"images of {size} values are shorter than a window")
    bits, offset, tables = _device_tables(secret, step, window, str(images.device))
    per = max(1, CODE_BITS // bits)
    acc = torch.full((n, starts), offset, dtype=torch.int64, device=images.device)
    packed: dict[int, torch.Tensor] = {}
    for chunk, table in enumerate(tables):
        width = min(per, window - chunk * per)
        if width not in packed:
            packed[width] = _packed(values, bits, width)
        start = chunk * per
        acc += table[packed[width][:, start : start + starts]]
    return mix64(acc)


def top_distinct(rows: torch.Tensor, top: int) -> torch.Tensor:
    """(n, positions) int64 words -> (n, top): each row's ``top`` largest distinct words in
    unsigned order, descending, 0 padding a row with fewer (``hashes._top_distinct``'s)."""
    n = rows.shape[0]
    ordered = torch.sort(rows ^ _SIGN, dim=1, descending=True).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    rank = torch.cumsum(first, dim=1) - 1
    keep = first & (rank < top)
    out = torch.zeros((n, top), dtype=torch.int64, device=rows.device)
    row = torch.arange(n, device=rows.device).unsqueeze(1).expand_as(ordered)
    out[row[keep], rank[keep]] = ordered[keep] ^ _SIGN
    return out


def window_hashes(
    images: torch.Tensor, secret: bytes, step: int, window: int, top: int
) -> torch.Tensor:
    """``hashes.window_hashes`` on ``images``' device: (n, 3, H, W) uint8 -> (n, top) int64,
    the same words (``as_words`` gives them as numpy's uint64)."""
    return top_distinct(window_hash_rows(images, secret, step, window), top)


def as_words(hashes: torch.Tensor) -> U64:
    """int64 words (any device) as numpy's uint64, bits unchanged."""
    words: U64 = hashes.cpu().numpy().view(np.uint64)
    return words


@cache
def _block_layout(
    height: int, width: int, grid: int, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's and column's block (``close_copies.block_sizes``) and each block's pixel
    count, on ``device`` once per image size: not three uploads per screening batch."""
    rows, cols = block_sizes(height, grid), block_sizes(width, grid)
    row_block = torch.from_numpy(np.repeat(np.arange(grid), rows)).to(device)
    col_block = torch.from_numpy(np.repeat(np.arange(grid), cols)).to(device)
    counts = torch.from_numpy(rows[:, None] * cols[None, :]).to(device, torch.float64)
    return row_block, col_block, counts


def block_means(images: torch.Tensor, grid: int = BLOCK_GRID) -> torch.Tensor:
    """``close_copies.block_means`` on ``images``' device: (n, 3, H, W) uint8 -> (n, 3 * grid *
    grid) uint8, the same values. The block sums are integer sums (int32: exact, and free of
    the TF32 a GPU's float matrix product may use), divided and rounded in float64 as numpy
    does (one IEEE division; ``round`` is half to even, as ``rint``)."""
    n, channels, height, width = images.shape
    if height < grid or width < grid:
        raise ValueError(f"images of {height}x{width} are smaller than the {grid}x{grid} grid")
    device = images.device
    row_block, col_block, counts = _block_layout(height, width, grid, str(device))
    values = images.to(torch.int32)
    by_rows = torch.zeros((n, channels, grid, width), dtype=torch.int32, device=device)
    by_rows.index_add_(2, row_block, values)
    sums = torch.zeros((n, channels, grid, grid), dtype=torch.int32, device=device)
    sums.index_add_(3, col_block, by_rows)
    means = torch.round(sums.to(torch.float64) / counts)
    return means.to(torch.uint8).reshape(n, channels * grid * grid)
