"""Blends of earlier queries, pure: is a query (up to 8-bit rounding) a point on the line
through two of its client's recent queries?

A decision-based attack (HopSkipJump, Boundary's start, and most others) begins with a binary
search between the attacked image and an image the oracle already answers adversarially: its
queries are ``(1 - t) * x + t * s``, each rounded to 8 bits by the upload. The third query of a
HopSkipJump run is the midpoint of the two it sent first, long before the window hashes' count
of near-duplicates reaches its threshold (issue 13: the 12th query, median). Honest traffic
has no reason to send three images on one line in pixel space, with one exception the rule
leaves out: brightness and contrast changes of one photo lie on a line through it
(``c * x + d``).

The test, for a query ``q`` and two earlier queries ``a`` and ``b`` (as ``sketch``es):

- ``q``, ``a`` and ``b`` are pairwise at least ``min_separation`` grey levels apart (root mean
  square): each is its own image, not a re-encoding of another;
- ``b - a`` is not a brightness or contrast change of ``a``: at least ``min_novelty`` of its
  norm lies outside ``span{a, 1}``;
- ``q``'s distance to the line through ``a`` and ``b`` is at most ``max_residual`` grey levels
  (root mean square). A rounded blend is within 0.5 of its exact point in every pixel, so it is
  within 0.5 of the line: the default is that bound, not a fitted number.

The sketch is the 8-bit image area-averaged to ``SKETCH_SIDE`` x ``SKETCH_SIDE`` per channel: a
linear map, so blends stay blends and the rounding bound holds (an average of errors within
0.5 is within 0.5); its values are multiples of 1/4 on CIFAR-10 and exact in float16 there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

SKETCH_SIDE = 16


@dataclass(frozen=True)
class BlendRule:
    """The blend test's thresholds, in grey levels (root mean square over the sketch), and how
    many of a client's recent distinct queries it looks at."""

    max_residual: float = 0.5
    min_separation: float = 8.0
    min_novelty: float = 0.3
    window: int = 8

    def __post_init__(self) -> None:
        if self.max_residual < 0 or self.min_separation <= 0 or self.window < 2:
            raise ValueError(f"invalid blend rule {self}")
        if not 0.0 <= self.min_novelty <= 1.0:
            raise ValueError(f"min_novelty must lie in [0, 1], got {self.min_novelty}")


@dataclass(frozen=True)
class BlendMatch:
    """The earlier queries (indices into the recent ones) that the query is a blend of, and
    its distance to their line."""

    first: int
    second: int
    residual: float


def sketch(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.float16]:
    """(C, H, W) 8-bit pixels -> the flat float16 sketch the test reads: each channel
    area-averaged to ``SKETCH_SIDE`` squared cells (bands of rows and columns as equal as the
    size allows; an image smaller than the side keeps its own size)."""
    height, width = pixels.shape[1:]
    rows = _bands(height)
    columns = _bands(width)
    values = pixels.astype(np.float64)
    summed = np.add.reduceat(np.add.reduceat(values, rows[:-1], axis=1), columns[:-1], axis=2)
    counts = np.outer(np.diff(rows), np.diff(columns))
    flat: npt.NDArray[np.float16] = (summed / counts).reshape(-1).astype(np.float16)
    return flat


def _bands(size: int) -> npt.NDArray[np.intp]:
    """Edges of ``min(size, SKETCH_SIDE)`` bands splitting ``size`` as evenly as possible."""
    count = min(size, SKETCH_SIDE)
    return np.round(np.linspace(0, size, count + 1)).astype(np.intp)


def find_blend(
    recent: npt.NDArray[np.floating], query: npt.NDArray[np.floating], rule: BlendRule
) -> BlendMatch | None:
    """The pair of ``recent`` sketches (m, D) whose line passes closest to ``query``'s (D,),
    among the pairs the rule admits, when within ``rule.max_residual``; else None. Every
    quantity comes from one Gram matrix, so the m^2 pairs cost one (m+1) x D product."""
    if len(recent) < 2:
        return None
    points = np.vstack([recent, query[None]]).astype(np.float64)
    dims = points.shape[1]
    gram = points @ points.T
    sums = points.sum(axis=1)
    q = len(recent)
    a, b = np.meshgrid(np.arange(q), np.arange(q), indexing="ij")
    squared = np.diag(gram)
    # squared distances: query to each, and between the pair's ends
    to_query = squared[q] - 2 * gram[q, :q] + squared[:q]
    span = squared[b] - 2 * gram[a, b] + squared[a]
    floor = rule.min_separation**2 * dims
    admitted = (a != b) & (to_query[a] >= floor) & (to_query[b] >= floor) & (span >= floor)
    admitted &= _novelty_squared(gram, sums, dims, a, b, span) >= rule.min_novelty**2
    if not admitted.any():
        return None
    along = gram[q, b] - gram[q, a] - gram[a, b] + squared[a]  # (q - a) . (b - a)
    residual_sq = to_query[a] - along**2 / np.where(span > 0, span, 1.0)
    residual_sq = np.where(admitted, np.maximum(residual_sq, 0.0), np.inf)
    best = np.unravel_index(int(np.argmin(residual_sq)), residual_sq.shape)
    residual = float(np.sqrt(residual_sq[best] / dims))
    if residual > rule.max_residual:
        return None
    return BlendMatch(int(best[0]), int(best[1]), residual)


def _novelty_squared(
    gram: npt.NDArray[np.float64],
    sums: npt.NDArray[np.float64],
    dims: int,
    a: npt.NDArray[np.intp],
    b: npt.NDArray[np.intp],
    span: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """Per pair, the share of ``|b - a|^2`` outside ``span{a, 1}`` (1 where ``a`` is constant
    or the pair coincides): what a brightness or contrast change of ``a`` lacks."""
    aa = gram[a, a]
    a_one = sums[a]
    a_diff = gram[a, b] - aa  # a . (b - a)
    one_diff = sums[b] - sums[a]  # 1 . (b - a)
    det = aa * dims - a_one**2
    safe = np.where(det > 1e-9 * np.maximum(aa * dims, 1.0), det, np.inf)
    # the projection's squared norm, from the 2 x 2 normal equations of [a, 1]
    inside = (a_diff**2 * dims - 2 * a_diff * one_diff * a_one + one_diff**2 * aa) / safe
    inside = np.where(np.isfinite(safe), inside, one_diff**2 / dims)
    return np.where(span > 0, 1.0 - inside / np.where(span > 0, span, 1.0), 1.0)


class RecentSketches:
    """One client's recent distinct queries, as the blend test reads them: the last
    ``rule.window`` distinct ones (an exact copy of an earlier query is tested but not kept
    twice, so that resends do not push the originals out)."""

    def __init__(self, rule: BlendRule) -> None:
        self.rule = rule
        self._sketches: list[npt.NDArray[np.float16]] = []
        self._digests: list[bytes] = []

    def check_and_add(self, query: npt.NDArray[np.float16], digest: bytes) -> BlendMatch | None:
        """Whether ``query`` is a blend of two kept queries; then keep it (unless a copy)."""
        match = None
        if len(self._sketches) >= 2:
            match = find_blend(np.stack(self._sketches), query, self.rule)
        if digest not in self._digests:
            self._sketches = [*self._sketches, query][-self.rule.window :]
            self._digests = [*self._digests, digest][-self.rule.window :]
        return match
