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

The sketch is the image average-pooled to ``SKETCH_SIDE`` x ``SKETCH_SIDE`` per channel: a linear
map, so blends stay blends and the rounding bound holds (an average of errors within 0.5 is
within 0.5); its values are multiples of 1/4 on CIFAR-10 and exact in float16 there.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch

from app.core.stateful.match_rule import Answer

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


def sketches(values: torch.Tensor, scale: float = 1.0) -> npt.NDArray[np.float16]:
    """(n, C, H, W) images -> (n, D) float16 sketches in grey levels: each channel average-pooled
    to ``SKETCH_SIDE`` squared cells (torch's adaptive average pooling: ``pooled_cells``; a side
    shorter than ``SKETCH_SIDE`` keeps its own size), times ``scale`` (255 for the service's
    [0, 1] pixels, 1 for 8-bit values). Pooled where the tensor lies: on an accelerator by torch,
    so that only the sketches come back; on the host by numpy. Not by torch on the host: the
    screening thread is not the model's, and a torch op that splits its work (adaptive pooling
    does at any size) starts that thread's own OpenMP team, whose threads then take the cores
    from the model's (``bench.sketch_contention`` measures the model beside either)."""
    height, width = values.shape[2:]
    cells = (min(height, SKETCH_SIDE), min(width, SKETCH_SIDE))
    if values.device.type == "cpu":
        pooled = pooled_cells(values.detach().numpy(), cells) * scale
    else:
        with torch.no_grad():
            on_device = torch.nn.functional.adaptive_avg_pool2d(values.float(), cells) * scale
        pooled = on_device.cpu().numpy()
    flat: npt.NDArray[np.float16] = pooled.reshape(len(values), -1).astype(np.float16)
    return flat


def pooled_cells(values: npt.NDArray[Any], cells: tuple[int, int]) -> npt.NDArray[np.float64]:
    """(..., H, W) -> (..., cells[0], cells[1]) means over torch's adaptive pooling bins: cell
    ``i`` of ``n`` along a side of length ``L`` covers ``[floor(i L / n), ceil((i + 1) L / n))``.
    When the cells divide both sides (the service's 32 and 224 pixel crops) the bins are
    blocks, summed in float32 as torch does; otherwise bins may overlap, and each
    side is pooled in turn (a rectangle's mean is the mean of its rows' means) by differences
    of running sums in float64."""
    height, width = values.shape[-2:]
    if height % cells[0] == 0 and width % cells[1] == 0:
        rows, columns = height // cells[0], width // cells[1]
        blocks = values.astype(np.float32, copy=False).reshape(
            *values.shape[:-2], cells[0], rows, cells[1], columns
        )
        # one add per pixel of a block, each over every cell at once: numpy's reductions
        # (einsum, sum over two small axes) took 7-14 times as long on 32 x 32 images
        sums = np.zeros((*values.shape[:-2], *cells), dtype=np.float32)
        for row in range(rows):
            for column in range(columns):
                sums += blocks[..., :, row, :, column]
        block_means: npt.NDArray[np.float64] = sums.astype(np.float64) / (rows * columns)
        return block_means
    return _pooled_axis(_pooled_axis(values, values.ndim - 1, cells[1]), values.ndim - 2, cells[0])


def _pooled_axis(values: npt.NDArray[Any], axis: int, cells: int) -> npt.NDArray[np.float64]:
    """``pooled_cells`` along one axis, by differences of running sums."""
    length = values.shape[axis]
    index = np.arange(cells)
    starts = index * length // cells
    ends = ((index + 1) * length + cells - 1) // cells
    running = np.cumsum(values, axis=axis, dtype=np.float64)
    zero = np.zeros_like(np.take(running, [0], axis=axis))
    running = np.concatenate([zero, running], axis=axis)
    widths = (ends - starts).reshape([-1 if i == axis else 1 for i in range(values.ndim)])
    spans = np.take(running, ends, axis=axis) - np.take(running, starts, axis=axis)
    means: npt.NDArray[np.float64] = spans / widths
    return means


def sketch(image: npt.NDArray[np.uint8]) -> npt.NDArray[np.float16]:
    """One (C, H, W) 8-bit image's sketch (``sketches``)."""
    one: npt.NDArray[np.float16] = sketches(torch.from_numpy(image[None]))[0]
    return one


def find_blend(
    recent: npt.NDArray[np.floating], query: npt.NDArray[np.floating], rule: BlendRule
) -> BlendMatch | None:
    """The pair of ``recent`` sketches (m, D) whose line passes closest to ``query``'s (D,),
    among the pairs the rule admits, when within ``rule.max_residual``; else None
    (``find_blends`` for one query)."""
    return find_blends(recent[None], np.array([len(recent)]), query[None], rule)[0]


def find_blends(
    recents: npt.NDArray[np.floating],
    counts: npt.NDArray[np.integer],
    queries: npt.NDArray[np.floating],
    rule: BlendRule,
) -> list[BlendMatch | None]:
    """Per query of ``queries`` (B, D), ``find_blend`` among the first ``counts[b]`` rows of its
    own ``recents[b]`` (B, m, D; the rows past the count are padding). Every quantity comes
    from one Gram matrix per query, so its m^2 pairs (rows: the line's first point ``a``,
    columns: its second ``b``) cost one (m+1) x D product and a few m x m array operations,
    each done once for the whole batch: per query, numpy's per-call overhead had cost more
    than the arithmetic (70-90 us a query against ~5 us a query for a batch of 32)."""
    batch, m = recents.shape[:2]
    if batch == 0 or m < 2:
        return [None] * batch
    points = np.concatenate([recents, queries[:, None, :]], axis=1).astype(np.float64)
    dims = points.shape[2]
    gram = points @ points.transpose(0, 2, 1)
    sums = points[:, :m].sum(axis=2)
    norms = np.diagonal(gram, axis1=1, axis2=2)[:, :m]  # |a|^2
    with_query = gram[:, m, :m]  # q . a
    pairs = gram[:, :m, :m]  # a . b
    to_query = gram[:, m, m, None] - 2 * with_query + norms  # |q - a|^2
    span = norms[:, None, :] - 2 * pairs + norms[:, :, None]  # |b - a|^2
    floor = rule.min_separation**2 * dims
    near = (to_query >= floor) & (np.arange(m)[None, :] < np.asarray(counts)[:, None])
    admitted = near[:, :, None] & near[:, None, :] & (span >= floor)
    if not admitted.any():
        return [None] * batch
    along = with_query[:, None, :] - with_query[:, :, None] - pairs + norms[:, :, None]
    safe_span = np.where(span > 0, span, 1.0)
    residual_sq = to_query[:, :, None] - along**2 / safe_span  # |q - a|^2 - ((q-a).(b-a))^2/|b-a|^2
    # the novelty test last, on the few pairs close enough: most batches stop before it
    candidates = admitted & (residual_sq <= rule.max_residual**2 * dims)
    if not candidates.any():
        return [None] * batch
    candidates &= _novelty_squared(pairs, norms, sums, dims, span, safe_span) >= (
        rule.min_novelty**2
    )
    residual_sq = np.where(candidates, residual_sq, np.inf).reshape(batch, -1)
    best = residual_sq.argmin(axis=1)
    found: list[BlendMatch | None] = []
    for b, at in enumerate(best.tolist()):
        least = float(residual_sq[b, at])
        found.append(
            None
            if least == np.inf
            else BlendMatch(at // m, at % m, float(np.sqrt(max(least, 0.0) / dims)))
        )
    return found


def _novelty_squared(
    pairs: npt.NDArray[np.float64],
    norms: npt.NDArray[np.float64],
    sums: npt.NDArray[np.float64],
    dims: int,
    span: npt.NDArray[np.float64],
    safe_span: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """Per query and pair (a row, b column), the share of ``|b - a|^2`` outside ``span{a, 1}``
    (1 where the pair coincides): what a brightness or contrast change of ``a`` lacks. The
    projection's squared norm comes from the 2 x 2 normal equations of ``[a, 1]``; a constant
    ``a`` spans the constants only. ``pairs``, ``span``: (B, m, m); ``norms``, ``sums``: (B, m)."""
    aa = norms[:, :, None]
    a_one = sums[:, :, None]
    a_diff = pairs - aa  # a . (b - a)
    one_diff = sums[:, None, :] - a_one  # 1 . (b - a)
    det = aa * dims - a_one**2
    constant = det <= 1e-9 * np.maximum(aa * dims, 1.0)
    inside = np.where(
        constant,
        one_diff**2 / dims,
        (a_diff**2 * dims - 2 * a_diff * one_diff * a_one + one_diff**2 * aa)
        / np.where(constant, 1.0, det),
    )
    novelty: npt.NDArray[np.float64] = np.where(span > 0, 1.0 - inside / safe_span, 1.0)
    return novelty


@dataclass(frozen=True)
class BlendEntry:
    """One kept query: its sketch, its pixel digest (copies are kept once) and the answer it
    was served (under ``silent`` a detected blend is served the answer of its line's older
    end, which the attacker already holds)."""

    sketch: npt.NDArray[np.float16]
    digest: bytes
    answer: Answer | None = None


@dataclass(frozen=True)
class BlendFound:
    """A query found to be a blend, and the answer kept with the older end of its line."""

    match: BlendMatch
    anchor: Answer | None


class RecentSketches:
    """One client's recent distinct queries, oldest first, as the blend test reads them: the
    last ``rule.window`` distinct ones (a copy of a kept query is tested but not kept twice, so
    that resends do not push the originals out). Held as one (m, D) array of sketches beside
    the digests and answers, so that a batch's clients are searched in one pass
    (``find_each``) and a memory can hand over rows it read at once."""

    def __init__(self, rule: BlendRule, entries: Sequence[BlendEntry] = ()) -> None:
        kept = list(entries)[-rule.window :]
        self.rule = rule
        self.sketches: npt.NDArray[np.float16] = (
            np.stack([entry.sketch for entry in kept]) if kept else np.zeros((0, 0), np.float16)
        )
        self.digests: list[bytes] = [entry.digest for entry in kept]
        self.answers: list[Answer | None] = [entry.answer for entry in kept]

    @classmethod
    def of_rows(
        cls,
        rule: BlendRule,
        sketches: npt.NDArray[np.float16],
        digests: list[bytes],
        answers: list[Answer | None],
    ) -> RecentSketches:
        """The recent queries from their sketches' rows (m, D), digests and answers, oldest
        first (the last ``rule.window`` kept)."""
        recent = cls(rule)
        if len(digests):
            recent.sketches = sketches[-rule.window :]
            recent.digests = digests[-rule.window :]
            recent.answers = answers[-rule.window :]
        return recent

    def __len__(self) -> int:
        return len(self.digests)

    @property
    def entries(self) -> list[BlendEntry]:
        """The kept queries, oldest first."""
        return [
            BlendEntry(sketch, digest, answer)
            for sketch, digest, answer in zip(
                self.sketches, self.digests, self.answers, strict=True
            )
        ]

    def find(self, query: npt.NDArray[np.float16]) -> BlendFound | None:
        """Whether ``query`` is a blend of two kept queries (``find_each`` for one)."""
        return find_each(self.rule, [self], query[None])[0]

    def add(self, entry: BlendEntry) -> bool:
        """Keep ``entry`` unless a copy of a kept one; whether it was kept."""
        if entry.digest in self.digests:
            return False
        row = entry.sketch[None]
        if len(self) and self.sketches.shape[1] != row.shape[1]:  # not comparable: dropped
            self.sketches, self.digests, self.answers = np.zeros((0, 0), np.float16), [], []
        added = np.concatenate([self.sketches, row]) if len(self) else row.copy()
        self.sketches = added[-self.rule.window :]
        self.digests = [*self.digests, entry.digest][-self.rule.window :]
        self.answers = [*self.answers, entry.answer][-self.rule.window :]
        return True

    def check_and_add(self, query: npt.NDArray[np.float16], digest: bytes) -> BlendMatch | None:
        """``find``, then ``add`` (without an answer): the evaluation's walk over a sequence."""
        found = self.find(query)
        self.add(BlendEntry(query, digest))
        return None if found is None else found.match


def find_each(
    rule: BlendRule, recents: Sequence[RecentSketches], queries: npt.NDArray[np.floating]
) -> list[BlendFound | None]:
    """Per query of ``queries`` (B, D), whether it is a blend of two of its own ``recents[b]``,
    with the answer kept with its line's older end: the clients' rows padded into one array
    and searched in one pass (``find_blends``). Recent sketches of another size than the
    query's (a Redis shared with a service of another input size) are not comparable: none."""
    width = queries.shape[1]
    comparable = [len(recent) if recent.sketches.shape[1] == width else 0 for recent in recents]
    counts = np.array(comparable, dtype=np.int64)
    longest = int(counts.max(initial=0))
    if longest < 2:
        return [None] * len(recents)
    stacked = np.zeros((len(recents), longest, queries.shape[1]), dtype=np.float16)
    for row, (recent, count) in enumerate(zip(recents, comparable, strict=True)):
        if count:
            stacked[row, :count] = recent.sketches
    matches = find_blends(stacked, counts, queries, rule)
    return [
        None if match is None else BlendFound(match, recent.answers[min(match.first, match.second)])
        for match, recent in zip(matches, recents, strict=True)
    ]


class BlendBatch:
    """A screened batch's queries against their clients' recent queries, walked in the batch's
    order: each client's first query is searched in one pass with the other clients' first
    ones (``find_each``), a later query of the same client alone, once the earlier ones were
    added (``add``). ``added``: per client, the entries kept, for the memory's ``keep``."""

    def __init__(
        self,
        rule: BlendRule,
        recents: Mapping[str, RecentSketches],
        positions: Sequence[int],
        clients: Sequence[str],
        queries: npt.NDArray[np.float16],
    ) -> None:
        self.recents = recents
        self.sketches = dict(zip(positions, queries, strict=True))
        first_of: dict[str, int] = {}
        for row, client in enumerate(clients):
            first_of.setdefault(client, row)
        firsts = list(first_of.values())
        found = find_each(rule, [recents[clients[row]] for row in firsts], queries[firsts])
        self._found_first = {positions[row]: its for row, its in zip(firsts, found, strict=True)}
        self.added: dict[str, list[BlendEntry]] = {}

    def find(self, position: int, client: str) -> BlendFound | None:
        """Whether the query at ``position`` (of ``client``) is a blend of its recent ones."""
        if position in self._found_first:
            return self._found_first[position]
        return self.recents[client].find(self.sketches[position])

    def add(self, client: str, entry: BlendEntry) -> None:
        """Add a judged query to its client's recent ones (``RecentSketches.add``)."""
        if self.recents[client].add(entry):
            self.added.setdefault(client, []).append(entry)


class BlendMemory(Protocol):
    """Clients' recent queries for the blend test, in process or in Redis
    (``app.service.blend_memory``): ``recall`` gives copies to read and add to, ``keep``
    makes the additions last. Bounded by the number of clients and a time to live."""

    blocks: bool  # a call may wait on the network
    rule: BlendRule

    def recall(self, client_ids: Iterable[str]) -> dict[str, RecentSketches]: ...

    def keep(self, added: Mapping[str, Sequence[BlendEntry]], at: float) -> None: ...


class InProcessBlendMemory:
    """The no-Redis memory: at most ``max_clients`` clients' recent queries, the least recently
    active dropped first, and a client silent for ``ttl_s`` forgotten (swept on each ``keep``)."""

    def __init__(self, rule: BlendRule, *, max_clients: int = 4096, ttl_s: float = 3600.0) -> None:
        if max_clients < 1 or ttl_s <= 0:
            raise ValueError("blend memory bounds must be positive")
        self.blocks = False
        self.rule = rule
        self.max_clients = max_clients
        self.ttl_s = ttl_s
        self._clients: OrderedDict[str, tuple[list[BlendEntry], float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def recall(self, client_ids: Iterable[str]) -> dict[str, RecentSketches]:
        return {
            client: RecentSketches(self.rule, self._clients.get(client, ([], 0.0))[0])
            for client in client_ids
        }

    def keep(self, added: Mapping[str, Sequence[BlendEntry]], at: float) -> None:
        for client, entries in added.items():
            kept = self._clients.pop(client, ([], 0.0))[0]
            self._clients[client] = ([*kept, *entries][-self.rule.window :], at)
        while self._clients:
            oldest, (_, last) = next(iter(self._clients.items()))
            if len(self._clients) <= self.max_clients and at - last < self.ttl_s:
                break
            del self._clients[oldest]
