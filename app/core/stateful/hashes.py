"""The fingerprints' pure functions: keyed window hashes and their sketch, a perceptual hash,
an embedding of the guard's own features, and the pixel digest that tells an exact copy.

The window hash is Blacklight's (Li et al. 2022): keyed hashes of windows of quantised pixels,
the ``top`` largest kept, stored as a 1024-bit sketch whose bits in common count about the
hashes in common. The key comes from a secret, so an attacker cannot tell which windows count.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from functools import cache
from typing import Literal, TypeVar

import numpy as np
import numpy.typing as npt

FingerprintKind = Literal["window_hash", "phash", "embedding"]
U64 = npt.NDArray[np.uint64]
F32 = npt.NDArray[np.float32]

# splitmix64's finaliser: a bijection of 64-bit words that spreads every input bit over the word
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)


def mix64(x: U64, out: U64 | None = None, scratch: U64 | None = None) -> U64:
    """splitmix64's finaliser of each word. ``out`` (may be ``x`` itself) and ``scratch``:
    arrays of ``x``'s shape to compute in, so that a caller hashing batch after batch allocates
    nothing (``_window_hash_rows``); without them, fresh arrays."""
    out = np.empty_like(x) if out is None else out
    scratch = np.empty_like(x) if scratch is None else scratch
    np.right_shift(x, np.uint64(30), out=scratch)
    np.bitwise_xor(x, scratch, out=out)
    np.multiply(out, MIX1, out=out)
    np.right_shift(out, np.uint64(27), out=scratch)
    np.bitwise_xor(out, scratch, out=out)
    np.multiply(out, MIX2, out=out)
    np.right_shift(out, np.uint64(31), out=scratch)
    np.bitwise_xor(out, scratch, out=out)
    return out


def window_keys(secret: bytes, window: int) -> U64:
    """``window`` odd multipliers and one offset, derived from ``secret`` (SHAKE-256): the salt
    of the window hash. Odd multipliers keep every position's value in the hash."""
    words = np.frombuffer(
        hashlib.shake_256(b"advguard/window-hash/" + secret).digest(8 * (window + 1)),
        dtype="<u8",
    ).astype(np.uint64)
    keys: U64 = words | np.array([1] * window + [0], dtype=np.uint64)
    return keys


CODE_BITS = 16  # a chunk of consecutive quantised values packed into one table index


@cache
def chunk_tables(secret: bytes, step: int, window: int) -> tuple[int, np.uint64, tuple[U64, ...]]:
    """The keyed hash's multiply-add, precomputed: the window's positions in chunks of ``per``,
    and for each chunk a table from the chunk's packed values (``bits`` each) to its share of
    the sum. (bits, the hash's offset, tables); at most 2^16 entries (512 KB) a table."""
    bits = max(1, (255 // step).bit_length())
    per = max(1, CODE_BITS // bits)
    keys = window_keys(secret, window)
    mask = np.uint64((1 << bits) - 1)
    tables = []
    for start in range(0, window, per):
        size = min(per, window - start)
        codes = np.arange(1 << (bits * size), dtype=np.uint64)
        table = np.zeros(len(codes), dtype=np.uint64)
        for i in range(size):
            table += ((codes >> np.uint64(bits * i)) & mask) * keys[start + i]
        table.flags.writeable = False  # cached and shared
        tables.append(table)
    return bits, keys[window], tuple(tables)


def _packed(
    values: npt.NDArray[np.intp], bits: int, size: int, out: npt.NDArray[np.intp]
) -> npt.NDArray[np.intp]:
    """(L,) values -> (L - size + 1,): the ``size`` values from each position, packed, written
    to ``out`` (at least that long; its first part returned); ``out``'s tail is scratch."""
    span = len(values) - size + 1
    codes = out[:span]
    shifted = out[span : 2 * span]
    codes[:] = values[:span]
    for i in range(1, size):
        np.left_shift(values[i : i + span], bits * i, out=shifted)
        np.bitwise_or(codes, shifted, out=codes)
    return codes


Ints = TypeVar("Ints", U64, npt.NDArray[np.int64])


def distinct_ascending(values: Ints) -> Ints:
    """``np.unique`` for the few dozen values of one query: a sort and one comparison, a third
    of ``np.unique``'s time at this size (its fixed cost dominates), twice per query."""
    return distinct_of_sorted(np.sort(values))


Sorted = TypeVar("Sorted", bound=npt.NDArray[np.integer])


def distinct_of_sorted(ordered: Sorted) -> Sorted:
    """The distinct values of an ascending array, in order: each value's first copy kept."""
    if len(ordered) < 2:
        return ordered
    keep = np.empty(len(ordered), dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    distinct: Sorted = ordered[keep]  # type: ignore[assignment]  # a mask keeps the dtype
    return distinct


def _top_distinct(row: U64, top: int) -> U64:
    """The ``top`` largest distinct values of ``row``, descending (fewer if it has fewer). The
    hashes are near uniform, so those above the quantile that leaves ~2 ``top`` of them almost
    always hold ``top`` distinct ones; images with many repeated windows (flat areas, upscaled
    photos) need a lower cutoff, tried 8 times lower each time down to the whole row. Every value
    above a cutoff is a candidate, so the answer is the full sort's."""
    size = len(row)
    wanted = 2 * top
    while True:
        if wanted >= size:
            candidates = row
        else:
            cutoff = np.uint64((1 << 64) - (wanted << 64) // size)
            candidates = row[row >= cutoff]
        distinct = distinct_ascending(candidates)[::-1][:top]
        if len(distinct) == top or wanted >= size:
            return distinct
        wanted *= 8


def window_hashes(
    images: npt.NDArray[np.uint8],
    secret: bytes,
    step: int,
    window: int,
    top: int,
) -> U64:
    """(n, 3, H, W) uint8 -> (n, top) uint64, each row sorted descending, 0 padding a row with
    fewer distinct windows than ``top``.

    Pixels are quantised to ``value // step`` and read in file order (row by row, RGB
    interleaved); every run of ``window`` consecutive values is hashed with a keyed
    multiply-add hash (``offset + sum_j value_j * key_j``, mod 2^64) mixed by splitmix64's
    finaliser, and the ``top`` largest distinct hashes are kept (Blacklight's selection: which
    windows those are depends on the secret). The keyed hash is not SHA-256 as in Blacklight:
    vectorised, it costs ~0.05 ms per 32x32 image instead of ~3 ms, and its only job is to make
    the selection unpredictable without the secret. The sum is read from precomputed tables, a
    chunk of the window's positions at a time (``chunk_tables``): the same value as the
    position-by-position sum (the tests check it against that), in a fifth of the operations.

    Large images (ImageNet's 224x224: 150,528 values) are hashed one per pass, each pass a few
    numpy calls over the image that hand the interpreter lock back and forth: the service hashes
    them in worker processes (``app.service.hashing``), where no other thread waits for it.
    """
    n = images.shape[0]
    size = int(np.prod(images.shape[1:]))
    if size - window + 1 < 1:
        raise ValueError(f"images of {size} values are shorter than a window")
    # a few images at a time: the temporaries are 8 bytes a value per image, and past the
    # caches a batch of 64 ImageNet-size images hashed ~10x slower per image than one
    per_pass = max(1, HASHED_VALUES_PER_PASS // size)
    out = np.zeros((n, top), dtype=np.uint64)

    def hash_pass(first: int) -> None:
        part = images[first : first + per_pass]
        hashes = _window_hash_rows(part, secret, step, window)
        for i in range(len(part)):
            distinct = _top_distinct(hashes[i], top)
            out[first + i, : len(distinct)] = distinct

    for first in range(0, n, per_pass):
        hash_pass(first)
    return out


HASHED_VALUES_PER_PASS = 1 << 17  # ~1 MB of uint64 a temporary: well inside the L2 cache


Word = TypeVar("Word", bound=np.generic)


class _Workspace(threading.local):
    """One thread's arrays for ``_window_hash_rows``, reused batch after batch and grown as
    needed (~6 MB a thread: six arrays of one pass's values). Why: a pass over 32 CIFAR-10
    images made ~20 temporaries of ~0.8 MB each; in a process holding other large arrays
    above them on the heap (measured: 100 stacked batches of 32), the C allocator gave freed
    ones back to the system and every next one page-faulted in fresh: ~100 us a 32x32 image
    instead of 45 (2026-12-05). ``bench.stateful_cost``'s own process was in that state in some
    runs (0.07-0.12 ms a query in batches, 0.058-0.062 since); the service's hash was not
    (0.067-0.073 ms a query before, 0.071-0.073 after, in the same benchmark's service runs)."""

    def __init__(self) -> None:
        self.arrays: dict[str, npt.NDArray[np.generic]] = {}

    def get(self, name: str, length: int, dtype: type[Word]) -> npt.NDArray[Word]:
        """The first ``length`` words of the thread's array ``name`` (made, or grown, here)."""
        array = self.arrays.get(name)
        if array is None or len(array) < length or array.dtype != dtype:
            array = self.arrays[name] = np.empty(length, dtype=dtype)
        held: npt.NDArray[Word] = array[:length]  # type: ignore[assignment]
        return held


_WORKSPACE = _Workspace()


def _window_hash_rows(images: npt.NDArray[np.uint8], secret: bytes, step: int, window: int) -> U64:
    """(n, 3, H, W) -> (n, positions): every window's mixed hash, in file order. The images are
    hashed as one run of values, the windows that straddle two images dropped at the end: whole
    contiguous operands, ~10-15% faster than image by image (32 CIFAR-10 images a pass). The
    rows are a view of this thread's workspace, valid until its next call: read them first."""
    n, channels, height, width = images.shape
    length = images.size
    bits, offset, tables = chunk_tables(secret, step, window)
    per = max(1, CODE_BITS // bits)
    work = _WORKSPACE
    quantised = work.get("quantised", length, np.uint8).reshape(images.shape)
    np.floor_divide(images, np.uint8(step), out=quantised)
    values: npt.NDArray[np.intp] = work.get("values", length, np.intp)
    values.reshape(n, height, width, channels)[...] = quantised.transpose(0, 2, 3, 1)
    image_values = length // n
    starts = length - window + 1  # window starts in the run
    acc: U64 = work.get("acc", length, np.uint64)
    acc.fill(offset)  # the last window - 1 positions: dropped below
    gathered: U64 = work.get("gathered", starts, np.uint64)
    packed: dict[int, npt.NDArray[np.intp]] = {}
    for chunk, table in enumerate(tables):
        size = min(per, window - chunk * per)
        if size not in packed:
            out = work.get(f"packed{len(packed)}", 2 * length, np.intp)
            packed[size] = _packed(values, bits, size, out)
        start = chunk * per
        # every code is below the table's length (a value holds ``bits`` bits): clip never acts
        np.take(table, packed[size][start : start + starts], out=gathered, mode="clip")
        np.add(acc[:starts], gathered, out=acc[:starts])
    mixed = mix64(acc, out=acc, scratch=work.get("scratch", length, np.uint64))
    rows: U64 = mixed.reshape(n, image_values)[:, : image_values - window + 1]
    return rows


def shared_hashes(query: U64, stored: U64) -> npt.NDArray[np.int64]:
    """Hashes ``query`` (top,) has in common with each row of ``stored`` (m, top); 0 padding
    never counts."""
    present = query[query != 0]
    if stored.size == 0 or present.size == 0:
        return np.zeros(len(stored), dtype=np.int64)
    counts: npt.NDArray[np.int64] = np.isin(stored, present).sum(axis=1).astype(np.int64)
    return counts


SKETCH_BITS = 1024
SKETCH_WORDS = SKETCH_BITS // 64


def window_sketch(hashes: U64, bits: int = SKETCH_BITS) -> U64:
    """(n, top) window hashes -> (n, bits / 64) bit sets with bit ``hash % bits`` of each hash
    set (the low bits: the top hashes' high bits are all ones). Two images' sketches share about
    as many bits as their lists share hashes, plus chance collisions (~top^2 / bits: 2.4 for
    50 hashes in 1024 bits), at 128 bytes instead of 400, and compare by AND + popcount: a scan
    of many entries is a few vector operations (the stores' index only narrows which)."""
    if bits % 64:
        raise ValueError("the sketch is whole 64-bit words")
    n = hashes.shape[0]
    positions = (hashes % np.uint64(bits)).astype(np.int64)
    flat = np.zeros((n, bits), dtype=bool)
    rows = np.repeat(np.arange(n), hashes.shape[1])
    present = (hashes != 0).reshape(-1)
    flat[rows[present], positions.reshape(-1)[present]] = True
    words = np.packbits(flat, axis=1, bitorder="little").view("<u8").astype(np.uint64)
    sketch: U64 = words.reshape(n, bits // 64)
    return sketch


def shared_bits(query: U64, stored: U64) -> npt.NDArray[np.int64]:
    """Bits ``query`` (words,) has in common with each row of ``stored`` (m, words)."""
    common = np.bitwise_count(stored & query[None, :]).sum(axis=1, dtype=np.int64)
    counts: npt.NDArray[np.int64] = common
    return counts


@cache
def _dct_matrix(size: int) -> npt.NDArray[np.float64]:
    """Orthonormal DCT-II matrix: ``D @ x`` transforms a column."""
    k = np.arange(size)[:, None]
    i = np.arange(size)[None, :]
    matrix: npt.NDArray[np.float64] = np.cos(np.pi * (2 * i + 1) * k / (2 * size)) * np.sqrt(
        2.0 / size
    )
    matrix[0] /= np.sqrt(2.0)
    return matrix


def grey(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
    """(n, 3, H, W) uint8 -> (n, H, W) luma (ITU-R BT.601), in grey levels."""
    weights = np.array([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)
    luma: npt.NDArray[np.float64] = (images.astype(np.float64) * weights).sum(axis=1)
    return luma


def _area_resize(planes: npt.NDArray[np.float64], size: int) -> npt.NDArray[np.float64]:
    """(n, H, W) -> (n, size, size) by averaging (H and W multiples of ``size``), or by
    nearest sampling of the averaged grid otherwise; 32x32 CIFAR images pass unchanged."""
    n, height, width = planes.shape
    if (height, width) == (size, size):
        return planes
    if height % size == 0 and width % size == 0:
        blocks = planes.reshape(n, size, height // size, size, width // size)
        averaged: npt.NDArray[np.float64] = blocks.mean(axis=(2, 4))
        return averaged
    rows = (np.arange(size) * height) // size
    cols = (np.arange(size) * width) // size
    sampled: npt.NDArray[np.float64] = planes[:, rows][:, :, cols]
    return sampled


PHASH_SIZE = 32  # the grey image is brought to 32x32 before the DCT
PHASH_LOW = 8  # the 8x8 lowest frequencies make the hash


def perceptual_hashes(images: npt.NDArray[np.uint8]) -> U64:
    """(n, 3, H, W) uint8 -> (n,) 64-bit DCT pHash: the 8x8 lowest frequencies of the 32x32 grey
    image's DCT, each bit "above the median of the 63 AC coefficients" (the DC bit is 0)."""
    planes = _area_resize(grey(images), PHASH_SIZE)
    dct = _dct_matrix(PHASH_SIZE)
    low = (dct @ planes @ dct.T)[:, :PHASH_LOW, :PHASH_LOW].reshape(len(images), -1)
    ac = low[:, 1:]
    bits = ac > np.median(ac, axis=1, keepdims=True)
    weights = np.uint64(1) << np.arange(63, dtype=np.uint64)
    hashes: U64 = (bits.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
    return hashes


def hamming(query: np.uint64 | int, stored: U64) -> npt.NDArray[np.int64]:
    """Bits in which ``query`` differs from each of ``stored``."""
    distance: npt.NDArray[np.int64] = np.bitwise_count(stored ^ np.uint64(query)).astype(np.int64)
    return distance


def embeddings(features: Mapping[str, npt.NDArray[np.float32]], layer: str) -> F32:
    """The pooled feature of ``layer`` from the guard's forward pass (``BatchFeatures.features``),
    L2-normalised so that cosine similarity is a dot product."""
    vectors = features[layer].astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    normalised: F32 = vectors / np.maximum(norms, 1e-12)
    return normalised


def eight_bit(pixels: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    """[0, 1] float pixels as the 8-bit image a file holds (round half to even, clipped): the
    preprocessed pixels the model sees, as the fingerprints read them. Exact for pixels made by
    ``image_to_pixels`` (8-bit values divided by 255)."""
    result: npt.NDArray[np.uint8] = np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
    return result


def pixel_digests(images: npt.NDArray[np.uint8]) -> list[bytes]:
    """A 16-byte digest of each image's exact pixels: resends (exact copies) are told apart from
    near-duplicates by it, and never count as distinct matches."""
    return [hashlib.blake2b(image.tobytes(), digest_size=16).digest() for image in images]
