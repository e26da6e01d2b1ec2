"""Query attacks through what a client of ``POST /classify`` sees (issue 13, part 1).

An online attacker holds no weights, only the API: it uploads 8-bit images and reads the answer,
``accepted`` (with the class and its probability), ``rejected`` (nothing) or, with the guard off,
``unguarded`` (the class and its probability). The attacks are the adversarial-robustness-toolbox
(ART) implementations, run against that answer through ``BlackBoxClassifier``:

- SquareAttack (score-based, Linf 8/255). It sees a probability only when the answer carries one.
  Its vector is the returned class's probability p and (1 - p) / (K - 1) on every other class; a
  rejection is a *uniform* vector (no confidence in anything: margin 0, which is what "no
  answer" tells a margin loss), flagged in an extra (K+1)-th column so that its adversarial
  criterion, "accepted with a label other than the true one", can tell it from an answer.
- HopSkipJump and BoundaryAttack (decision-based, L2). They see a label only; the attacker maps
  a rejection to the true label ("not adversarial"), so ART's own criterion, label != true, is
  exactly "accepted with another label". They start from a natural image of another class that
  the oracle answers with another label (the attacker's own photos; ART's uniform-noise start is
  always rejected by the guard), and count as successful at the first such answer within
  L2 <= 0.5 (the standard CIFAR-10 L2 budget), where the attacker stops.

Every query goes through ``QueryRecorder``: the float image ART asks about is rounded to the
8-bit image a client would upload (PNG), exact repeats are answered from the attacker's own
memory (ART re-asks the current point; no attacker pays twice), every *sent* query and its answer
is recorded in order, and the run stops at the query cap or at the first success.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import numpy as np
import torch
from PIL import Image

from app.cli import at_least
from app.core.guard import Guard
from app.core.manifest import MANIFEST_NAME
from app.core.stateful.match_rule import Answer as ServedAnswer
from evaluation.data import ImageSplit, add_data_cache_argument, eight_bit, load_split, save_npz
from evaluation.simulate_cli import is_loopback

Decision = Literal["accepted", "rejected", "unguarded", "refused"]
DECISIONS: tuple[Decision, ...] = get_args(Decision)
AttackName = Literal["square", "hopskipjump", "boundary"]
ATTACKS: tuple[AttackName, ...] = get_args(AttackName)
Setting = Literal["guard_off", "guard_on"]
SETTINGS: tuple[Setting, ...] = get_args(Setting)
Log = Callable[[str], None]  # a progress line's sink

SQUARE_EPS = 8 / 255  # Linf budget of the score-based attack
L2_EPS = 0.5  # L2 budget of the decision-based attacks (pixels in [0, 1], 3x32x32)
# Queries per image. Square on an undefended CIFAR-10 model needs ~70 on average (Andriushchenko
# et al. 2020); 1,000 leaves room for the guard. The decision-based attacks need hundreds to a
# few thousand (BlackboxBench 2023); 2,500 keeps a 100-image run of each under ~20 minutes on one
# CPU thread while covering HopSkipJump's typical CIFAR-10 budget.
DEFAULT_CAPS: dict[AttackName, int] = {"square": 1000, "hopskipjump": 2500, "boundary": 2500}
STOP_REASONS = ("success", "cap", "finished")
DEFAULT_CACHE = Path(".cache/query-attacks")
DEFAULT_RESULTS = Path("evaluation/results/query-attacks")
DEFAULT_SOURCE = Path("../shared/data/cifar10-jpeg.tar.gz")
DEFAULT_BUNDLE = Path("bundles/cifar10-resnet20")


# --------------------------------------------------------------------------- oracles


@dataclass(frozen=True)
class Answer:
    """What one ``POST /classify`` tells the client: the class and probability only when the
    answer carries a prediction (accepted or unguarded)."""

    decision: Decision
    class_index: int | None = None
    probability: float | None = None

    @property
    def has_prediction(self) -> bool:
        return self.class_index is not None


class Oracle(Protocol):
    """The service as a client sees it: 8-bit images in, answers out, in order."""

    @property
    def num_classes(self) -> int: ...

    def ask(self, images: np.ndarray) -> list[Answer]:
        """``images``: (n, 3, H, W) uint8, the images a client uploads."""
        ...


def to_pil(image: np.ndarray) -> Image.Image:
    """(3, H, W) uint8 -> the RGB image a client would encode."""
    return Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), mode="RGB")


def service_pixels(guard: Guard, images: np.ndarray) -> torch.Tensor:
    """The (n, 3, H, W) uint8 uploads as the service's model sees them: each decoded image
    through the guard's preprocessing (what its stateful detector fingerprints too)."""
    return torch.stack([guard.pixels(to_pil(image)) for image in images])


def service_answers(guard: Guard, images: np.ndarray, guarded: bool = True) -> list[ServedAnswer]:
    """What the service keeps with each (n, 3, H, W) uint8 upload (``routes.classify``): the
    decision and the model's class, also for a rejected one, whose class the client is not shown
    (``client_view``) but the stateful detector reads. The service's preprocessing of the
    decoded image; the guard's verdict, or the model alone when ``guarded`` is false."""
    if len(images) == 0:
        return []
    return answers_of_pixels(guard, service_pixels(guard, images), guarded)


def answers_of_pixels(
    guard: Guard, pixels: torch.Tensor, guarded: bool = True
) -> list[ServedAnswer]:
    """``service_answers`` on uploads already preprocessed (``service_pixels``)."""
    if not guarded:
        return [
            ServedAnswer("unguarded", c.predicted_class, c.probability, math.nan)
            for c in guard.classify(pixels)
        ]
    return [
        ServedAnswer(
            "accepted" if v.accepted else "rejected", v.predicted_class, v.probability, v.score
        )
        for v in guard.classify_pixels(pixels)
    ]


def client_view(answer: ServedAnswer) -> Answer:
    """What ``POST /classify`` shows of a served answer: no class when it was rejected."""
    if answer.decision == "rejected":
        return Answer("rejected")
    return Answer(answer.decision, answer.class_index, answer.probability)


class GuardOracle:
    """In process, over a loaded ``Guard``: the answers ``POST /classify`` gives for the same
    uploads (``service_answers`` as the client sees them), without HTTP. Bulk runs use it;
    ``HttpOracle`` checks that it stands in for the service."""

    def __init__(self, guard: Guard, guarded: bool = True) -> None:
        self.guard = guard
        self.guarded = guarded

    @property
    def num_classes(self) -> int:
        return len(self.guard.class_names)

    def ask(self, images: np.ndarray) -> list[Answer]:
        return [client_view(a) for a in service_answers(self.guard, images, self.guarded)]


class OracleError(RuntimeError):
    """The service answered something no client can read as a verdict."""


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


def parse_answer(status: int, body: dict[str, Any]) -> Answer:
    """One ``/classify`` response -> ``Answer``; a 403 (a refused client) is an answer too."""
    if status == 403:
        return Answer("refused")
    if status != 200:
        raise OracleError(f"HTTP {status}: {body}")
    decision = body.get("decision")
    if decision not in ("accepted", "rejected", "unguarded"):
        raise OracleError(f"unexpected decision {decision!r}")
    prediction = body.get("prediction")
    if prediction is None:
        return Answer(decision)
    return Answer(decision, int(prediction["class_index"]), float(prediction["probability"]))


class HttpOracle:
    """A running ``advguard serve`` over HTTP, loopback only and bounded: at most
    ``max_queries`` uploads in all, each with a timeout, a 503 retried after its
    ``Retry-After`` at most ``retries`` times. Sends ``X-Client-ID`` when given."""

    def __init__(
        self,
        url: str,
        client_id: str | None = None,
        max_queries: int = 100_000,
        timeout_s: float = 30.0,
        retries: int = 5,
    ) -> None:
        import httpx

        if not is_loopback(url):
            raise ValueError(f"refusing to attack {url}: only loopback services")
        self.max_queries = max_queries
        self.sent = 0
        self.retries = retries
        headers = {"X-Client-ID": client_id} if client_id else {}
        self._http = httpx.Client(base_url=url, timeout=timeout_s, headers=headers)
        bundle = self._http.get("/v1/bundle")
        bundle.raise_for_status()
        self._num_classes = len(bundle.json()["class_names"])

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def close(self) -> None:
        self._http.close()

    def _post(self, data: bytes) -> Answer:
        for attempt in range(self.retries + 1):
            response = self._http.post("/classify", files={"file": ("query.png", data)})
            if response.status_code != 503 or attempt == self.retries:
                return parse_answer(response.status_code, response.json())
            time.sleep(min(float(response.headers.get("Retry-After", "1")), 5.0))
        raise AssertionError("unreachable")

    def ask(self, images: np.ndarray) -> list[Answer]:
        if self.sent + len(images) > self.max_queries:
            raise OracleError(f"query bound of {self.max_queries} reached")
        answers = []
        for image in images:
            answers.append(self._post(png_bytes(image)))
            self.sent += 1
        return answers


# --------------------------------------------------------------------------- the attacker's side


class AttackStopped(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised inside ART's loop to end a run: the first success, or the query cap."""


@dataclass(frozen=True)
class Budget:
    norm: Literal["inf", "2"]
    eps: float

    def distance(self, queries: np.ndarray, original: np.ndarray) -> np.ndarray:
        """Distances of 8-bit queries from the 8-bit original, in [0, 1] pixel units."""
        diff = (queries.astype(np.float32) - original.astype(np.float32)) / 255.0
        flat = diff.reshape(len(queries), -1)
        if self.norm == "inf":
            result: np.ndarray = np.abs(flat).max(axis=1)
        else:
            result = np.sqrt((flat.astype(np.float64) ** 2).sum(axis=1))
        return result

    def within(self, queries: np.ndarray, original: np.ndarray) -> np.ndarray:
        # half a grey level of slack: a float budget rounded to the 8-bit grid
        slack = 0.5 / 255 if self.norm == "inf" else 1e-6
        within: np.ndarray = self.distance(queries, original) <= self.eps + slack
        return within


def is_success(answer: Answer, label: int) -> bool:
    """The attacker's goal: an answer that carries a prediction, of another class."""
    return answer.has_prediction and answer.class_index != label


@dataclass
class QueryRecorder:
    """The attacker's client for one image: rounds ART's float queries to the 8-bit uploads,
    answers repeats from memory, sends the rest (in order) up to ``cap``, records every sent query
    and its answer, and stops the run at the first in-budget success. With ``stall_asks``, it
    also stops a run whose last ``stall_asks`` asks were all answered from memory (``stalled``):
    refused everything, ART's Boundary shrinks its steps below one grey level and spins for
    minutes per fresh query, and HopSkipJump's step-size search (``while not success``) has no
    bound when its answers repeat; only a closed-loop check needs to cut them short."""

    oracle: Oracle
    original: np.ndarray  # (3, H, W) uint8
    label: int
    cap: int
    budget: Budget
    stop_at_success: bool = True
    stall_asks: int | None = None
    queries: list[np.ndarray] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    first_success: int | None = None  # index into queries
    stopped: str = "finished"
    _memory: dict[bytes, Answer] = field(default_factory=dict)
    _stale_asks: int = 0  # consecutive asks answered from memory alone

    def ask(self, floats: np.ndarray) -> list[Answer]:
        images = eight_bit(np.asarray(floats, dtype=np.float32))
        keys = [image.tobytes() for image in images]
        fresh: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key not in self._memory and key not in fresh:
                fresh[key] = i
        room = self.cap - len(self.queries)
        to_send = list(fresh.items())[: max(room, 0)]
        if to_send:
            sent = images[[i for _, i in to_send]]
            answers = self.oracle.ask(sent)
            for (key, _), image, answer in zip(to_send, sent, answers, strict=True):
                self._memory[key] = answer
                self.queries.append(image)
                self.answers.append(answer)
            self._check_success(sent, answers)
        if len(to_send) < len(fresh):
            self.stopped = "cap"
            raise AttackStopped("query cap")
        self._stale_asks = 0 if fresh else self._stale_asks + 1
        if self.stall_asks is not None and self._stale_asks >= self.stall_asks:
            self.stopped = "stalled"
            raise AttackStopped("stalled")
        return [self._memory[key] for key in keys]

    def _check_success(self, sent: np.ndarray, answers: Sequence[Answer]) -> None:
        if self.first_success is not None:
            return
        within = self.budget.within(sent, self.original)
        start = len(self.queries) - len(sent)
        for i, answer in enumerate(answers):
            if within[i] and is_success(answer, self.label):
                self.first_success = start + i
                if self.stop_at_success:
                    self.stopped = "success"
                    raise AttackStopped("success")
                return


def score_vectors(answers: Sequence[Answer], num_classes: int) -> np.ndarray:
    """(n, K+1) what a score-based attack can read: p on the returned class, (1 - p) / (K - 1)
    elsewhere; a rejection (no answer) uniform 1/K with 1 in the last column."""
    out = np.full((len(answers), num_classes + 1), 1.0 / num_classes, dtype=np.float32)
    out[:, num_classes] = 0.0
    for i, answer in enumerate(answers):
        if answer.has_prediction:
            assert answer.class_index is not None and answer.probability is not None
            out[i, :num_classes] = (1.0 - answer.probability) / (num_classes - 1)
            out[i, answer.class_index] = answer.probability
        else:
            out[i, num_classes] = 1.0
    return out


def decision_vectors(answers: Sequence[Answer], num_classes: int, label: int) -> np.ndarray:
    """(n, K) one-hot labels for a decision-based attack: an answer without a prediction
    (rejected, refused) reads as the true label, i.e. "not adversarial"."""
    out = np.zeros((len(answers), num_classes), dtype=np.float32)
    for i, answer in enumerate(answers):
        out[i, answer.class_index if answer.class_index is not None else label] = 1.0
    return out


def square_margin(vectors: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Square's loss on the visible scores: true-class score minus the best other class (> 0 while
    the true class is answered, 0 for a rejection, < 0 once another class is answered)."""
    scores = vectors[:, :-1].copy()
    rows = np.arange(len(scores))
    true = scores[rows, labels].copy()
    scores[rows, labels] = -np.inf
    margin: np.ndarray = true - scores.max(axis=1)
    return margin


def square_adversarial(vectors: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Square's criterion: answered (not rejected) with a label other than the true one."""
    answered = vectors[:, -1] == 0.0
    adversarial: np.ndarray = answered & (vectors[:, :-1].argmax(axis=1) != labels)
    return adversarial


# --------------------------------------------------------------------------- ART runs


def _blackbox(
    predict: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...], classes: int
) -> Any:
    """ART's black-box classifier over ``predict`` (the neural-network flavour: SquareAttack
    requires it; it only adds the channels-first layout, which ours is)."""
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    return BlackBoxClassifierNeuralNetwork(
        predict, shape, classes, channels_first=True, clip_values=(0.0, 1.0)
    )


def _run_square(recorder: QueryRecorder, num_classes: int) -> None:
    from art.attacks.evasion import SquareAttack

    def predict(x: np.ndarray) -> np.ndarray:
        return score_vectors(recorder.ask(x), num_classes)

    classifier = _blackbox(predict, recorder.original.shape, num_classes + 1)

    def loss(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return square_margin(classifier.predict(x), y.argmax(axis=1))

    def criterion(y_pred: np.ndarray, y: np.ndarray) -> np.ndarray:
        return square_adversarial(y_pred, y.argmax(axis=1))

    # p_init 0.05 and a 10,000-iteration schedule are the paper's Linf settings; the recorder's
    # cap ends the run long before max_iter.
    attack = SquareAttack(
        classifier,
        norm=np.inf,
        eps=recorder.budget.eps,
        max_iter=10_000,
        p_init=0.05,
        nb_restarts=1,
        batch_size=1,
        loss=loss,
        adv_criterion=criterion,
        verbose=False,
    )
    x = recorder.original[None].astype(np.float32) / 255.0
    y = np.zeros((1, num_classes + 1), dtype=np.float32)
    y[0, recorder.label] = 1.0
    attack.generate(x, y)


def _starting_point(
    recorder: QueryRecorder, candidates: np.ndarray, num_classes: int
) -> np.ndarray | None:
    """The decision-based attacks' start: the attacker's own natural images of other classes,
    nearest (L2) first, the first one the oracle answers adversarially (each try is a query)."""
    order = np.argsort(recorder.budget.distance(candidates, recorder.original))
    for i in order:
        answer = recorder.ask(candidates[i : i + 1].astype(np.float32) / 255.0)[0]
        if is_success(answer, recorder.label):
            start: np.ndarray = candidates[i : i + 1].astype(np.float32) / 255.0
            return start
    return None


def _run_decision(
    recorder: QueryRecorder, num_classes: int, name: AttackName, candidates: np.ndarray
) -> None:
    from art.attacks.evasion import BoundaryAttack, HopSkipJump

    def predict(x: np.ndarray) -> np.ndarray:
        return decision_vectors(recorder.ask(x), num_classes, recorder.label)

    classifier = _blackbox(predict, recorder.original.shape, num_classes)
    x = recorder.original[None].astype(np.float32) / 255.0
    y = np.array([recorder.label])
    recorder.ask(x)  # ART's first query: the original (answered from memory afterwards)
    start = _starting_point(recorder, candidates, num_classes)
    attack: Any
    if name == "hopskipjump":
        attack = HopSkipJump(
            classifier, batch_size=128, targeted=False, norm=2, max_iter=10_000, verbose=False
        )
    else:
        attack = BoundaryAttack(
            classifier, batch_size=128, targeted=False, max_iter=100_000, verbose=False
        )
    attack.generate(x, y, x_adv_init=start)


@dataclass(frozen=True)
class AttackRecord:
    """One image's run: every sent query (8-bit) and its answer, in order."""

    attack: AttackName
    row: int  # index of the image in the test split
    label: int
    original: np.ndarray  # (3, H, W) uint8
    queries: np.ndarray  # (q, 3, H, W) uint8
    decisions: np.ndarray  # (q,) int8: index into DECISIONS
    classes: np.ndarray  # (q,) int16, -1 when the answer carries no prediction
    probabilities: np.ndarray  # (q,) float32, nan when none
    first_success: int  # index of the first in-budget success, -1 when none
    stopped: str  # "success", "cap", "finished" (ART gave up) or "stalled" (QueryRecorder)
    seconds: float

    @property
    def succeeded(self) -> bool:
        return self.first_success >= 0

    @property
    def queries_to_success(self) -> int | None:
        return self.first_success + 1 if self.first_success >= 0 else None


def budget_of(attack: AttackName) -> Budget:
    return Budget("inf", SQUARE_EPS) if attack == "square" else Budget("2", L2_EPS)


def run_attack(
    oracle: Oracle,
    attack: AttackName,
    image: np.ndarray,
    label: int,
    cap: int,
    seed: int,
    row: int = -1,
    candidates: np.ndarray | None = None,
    stall_asks: int | None = None,
) -> AttackRecord:
    """One ART attack on one image through ``oracle``, recorded. ``candidates``: the attacker's
    natural images of other classes (decision-based starts). ART's initial search draws from an
    unseeded RandomState; ``seed`` fixes everything else. ``stall_asks``: see ``QueryRecorder``."""
    np.random.seed(seed % 2**32)
    recorder = QueryRecorder(oracle, image, label, cap, budget_of(attack), stall_asks=stall_asks)
    started = time.perf_counter()
    try:
        if attack == "square":
            _run_square(recorder, oracle.num_classes)
        else:
            pool = candidates if candidates is not None else np.zeros((0, *image.shape), np.uint8)
            _run_decision(recorder, oracle.num_classes, attack, pool)
    except AttackStopped:
        pass
    seconds = time.perf_counter() - started
    answers = recorder.answers
    shape = (0, *image.shape)
    return AttackRecord(
        attack=attack,
        row=row,
        label=label,
        original=image,
        queries=np.stack(recorder.queries) if recorder.queries else np.zeros(shape, np.uint8),
        decisions=np.array([DECISIONS.index(a.decision) for a in answers], dtype=np.int8),
        classes=np.array(
            [-1 if a.class_index is None else a.class_index for a in answers], dtype=np.int16
        ),
        probabilities=np.array(
            [math.nan if a.probability is None else a.probability for a in answers],
            dtype=np.float32,
        ),
        first_success=-1 if recorder.first_success is None else recorder.first_success,
        stopped=recorder.stopped,
        seconds=seconds,
    )


# --------------------------------------------------------------------------- the query cache


def save_records(records: Sequence[AttackRecord], path: Path) -> None:
    """All runs of one attack and setting in one compressed file. Queries are stored as their
    difference from the original modulo 256: mostly zeros and small values, which compress
    several times better than the images themselves, and exactly invertible."""
    if not records:
        raise ValueError("no records")
    lengths = [len(r.queries) for r in records]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    diffs = [(r.queries - r.original[None]).astype(np.uint8) for r in records]  # wraps mod 256
    save_npz(
        path,
        compressed=True,
        attack=np.array(records[0].attack),
        rows=np.array([r.row for r in records], dtype=np.int64),
        labels=np.array([r.label for r in records], dtype=np.int64),
        originals=np.stack([r.original for r in records]),
        offsets=offsets,
        diffs=np.concatenate(diffs),
        decisions=np.concatenate([r.decisions for r in records]),
        classes=np.concatenate([r.classes for r in records]),
        probabilities=np.concatenate([r.probabilities for r in records]),
        first_success=np.array([r.first_success for r in records], dtype=np.int64),
        stopped=np.array([r.stopped for r in records]),
        seconds=np.array([r.seconds for r in records], dtype=np.float64),
    )


def load_records(path: Path) -> list[AttackRecord]:
    with np.load(path, allow_pickle=False) as npz:
        data = {name: npz[name] for name in npz.files}  # each read decompresses: read once
    attack = str(data["attack"])
    offsets = data["offsets"]
    records = []
    for i, row in enumerate(data["rows"].tolist()):
        part = slice(int(offsets[i]), int(offsets[i + 1]))
        original = data["originals"][i]
        records.append(
            AttackRecord(
                attack=attack,  # type: ignore[arg-type]
                row=row,
                label=int(data["labels"][i]),
                original=original,
                queries=(data["diffs"][part] + original[None]).astype(np.uint8),
                decisions=data["decisions"][part],
                classes=data["classes"][part],
                probabilities=data["probabilities"][part],
                first_success=int(data["first_success"][i]),
                stopped=str(data["stopped"][i]),
                seconds=float(data["seconds"][i]),
            )
        )
    return records


def records_path(cache: Path, attack: AttackName, setting: Setting) -> Path:
    return cache / f"{attack}-{setting}.npz"


# --------------------------------------------------------------------------- summaries


def _median(values: Sequence[float]) -> float | None:
    return float(np.median(values)) if values else None


def closest_adversarial(record: AttackRecord) -> float | None:
    """The attack's budget norm of its closest query answered with another class (in or out of
    budget): how far a decision-based attack got within its cap."""
    adversarial = (record.classes >= 0) & (record.classes != record.label)
    if not adversarial.any():
        return None
    distances = budget_of(record.attack).distance(record.queries[adversarial], record.original)
    return float(distances.min())


def summarise(records: Sequence[AttackRecord]) -> dict[str, Any]:
    """Success rate, queries to success (median, mean, p90 of the successful runs), queries sent,
    and the share of answers that were rejections."""
    to_success = [r.queries_to_success for r in records if r.queries_to_success is not None]
    sent = [len(r.queries) for r in records]
    closest = [d for d in map(closest_adversarial, records) if d is not None]
    decisions = np.concatenate([r.decisions for r in records]) if records else np.zeros(0)
    rejected = DECISIONS.index("rejected")
    return {
        "images": len(records),
        "succeeded": len(to_success),
        "success_rate": len(to_success) / len(records) if records else None,
        "median_queries_to_success": _median(to_success),
        "mean_queries_to_success": float(np.mean(to_success)) if to_success else None,
        "p90_queries_to_success": float(np.percentile(to_success, 90)) if to_success else None,
        "median_queries_sent": _median(sent),
        "total_queries": int(sum(sent)),
        "rejected_share": float(np.mean(decisions == rejected)) if len(decisions) else None,
        "median_closest_adversarial": _median(closest),
        "found_adversarial": len(closest),
        "stopped": {s: sum(r.stopped == s for r in records) for s in STOP_REASONS},
        "seconds": float(sum(r.seconds for r in records)),
    }


def _closest(attack: str, summary: dict[str, Any]) -> str:
    median = summary.get("median_closest_adversarial")
    if median is None:
        return "-"
    norm = "Linf" if attack == "square" else "L2"
    value = f"{median * 255:.0f}/255" if attack == "square" else f"{median:.2f}"
    return f"{norm} {value} ({summary['found_adversarial']} images)"


def table(results: dict[str, Any]) -> str:
    """The committed markdown table of ``results.json``."""
    lines = [
        "# Query attacks through the API (issue 13)",
        "",
        f"Bundle `{results['bundle']}`, {results['images']} correctly classified and accepted "
        "CIFAR-10 test images per attack, in process (`GuardOracle`: the answers of "
        "`POST /classify`). Success: an answer that carries a prediction of another class, "
        f"within Linf {SQUARE_EPS * 255:.0f}/255 (Square) or L2 {L2_EPS} (HopSkipJump, "
        "Boundary). Queries: uploads sent (exact repeats answered from the attacker's memory).",
        "",
        "| attack | setting | query cap | success rate | median queries to success | "
        "p90 | median queries sent | answers rejected | closest adversarial answer (median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, summary in results["runs"].items():
        attack, setting = key.split("/")
        rate = summary["success_rate"]
        median = summary["median_queries_to_success"]
        p90 = summary["p90_queries_to_success"]
        lines.append(
            f"| {attack} | {setting.replace('_', ' ')} | {results['caps'][attack]} | "
            f"{rate:.0%} ({summary['succeeded']}/{summary['images']}) | "
            f"{'-' if median is None else f'{median:.0f}'} | "
            f"{'-' if p90 is None else f'{p90:.0f}'} | {summary['median_queries_sent']:.0f} | "
            f"{summary['rejected_share']:.1%} | {_closest(attack, summary)} |"
        )
    legacy = f"{results.get('command')} (the latest invocation before runs recorded their own)"
    commands = sorted({summary.get("command", legacy) for summary in results["runs"].values()})
    lines += ["", "Commands:", "", "```", *commands, "```", ""]
    if results.get("http_check"):
        lines += [
            "Over HTTP (`HttpOracle` against `advguard serve` with its in-process tracker, one "
            "client id per image), the same attacks on the first images give:",
            "",
        ]
        for key, check in results["http_check"].items():
            lines.append(
                f"- {key}: the same outcome (queries to success, or none) for "
                f"{check['same_outcome']}/{check['images']} images, the same query sequence "
                f"for {check['same_queries']}/{check['images']}; the recorded in-process queries "
                f"replayed: the same answer for {check['same_answers']}/"
                f"{check['replayed_queries']} (`{check['command']}`)"
            )
        lines.append("")
    for note in results.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the run


def pick_images(
    guard: Guard, split: ImageSplit, count: int, seed: int, batch: int = 500
) -> np.ndarray:
    """``count`` test rows, at random, that the model classifies correctly *and* the guard accepts:
    the same images for both settings, each one with something to break."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(split.labels))
    chosen: list[int] = []
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        verdicts = guard.classify_pixels(split.tensor(rows))
        for row, verdict in zip(rows.tolist(), verdicts, strict=True):
            if verdict.accepted and verdict.predicted_class == int(split.labels[row]):
                chosen.append(row)
        if len(chosen) >= count:
            break
    return np.array(chosen[:count], dtype=np.int64)


def candidate_pool(split: ImageSplit, exclude: np.ndarray, label: int, size: int, seed: int) -> Any:
    """The attacker's own natural images of other classes (never the attacked ones)."""
    rng = np.random.default_rng(seed)
    allowed = np.setdiff1d(np.flatnonzero(split.labels != label), exclude)
    return split.pixels[rng.choice(allowed, size=min(size, len(allowed)), replace=False)]


def attack_images(
    oracle: Oracle,
    attack: AttackName,
    split: ImageSplit,
    rows: np.ndarray,
    cap: int,
    seed: int,
    log: Callable[[str], None] = lambda _: None,
) -> Iterator[AttackRecord]:
    for i, row in enumerate(rows.tolist()):
        label = int(split.labels[row])
        pool = candidate_pool(split, rows, label, 20, seed + row) if attack != "square" else None
        record = run_attack(oracle, attack, split.pixels[row], label, cap, seed + row, row, pool)
        log(
            f"{attack} image {i + 1}/{len(rows)} row {row}: {record.stopped} after "
            f"{len(record.queries)} queries ({record.seconds:.1f}s)"
        )
        yield record


def _replayed_answers(url: str, attack: AttackName, want: AttackRecord) -> tuple[int, int]:
    """(replayed, answered alike): the reference's first ``REPLAYED`` queries sent over HTTP
    by a client of their own, compared with the decisions and classes recorded in process."""
    oracle = HttpOracle(url, client_id=f"query-attack-replay-{attack}-{want.row}")
    try:
        answers = oracle.ask(want.queries[:REPLAYED])
    finally:
        oracle.close()
    alike = sum(
        (DECISIONS.index(a.decision), -1 if a.class_index is None else a.class_index)
        == (int(want.decisions[i]), int(want.classes[i]))
        for i, a in enumerate(answers)
    )
    return len(answers), alike


def _attack_over_http(
    url: str,
    attack: AttackName,
    split: ImageSplit,
    row: int,
    cap: int,
    seed: int,
    attacked: np.ndarray,
) -> AttackRecord:
    """The attack on one image, run against the service over HTTP, one client id per image."""
    label = int(split.labels[row])
    # the attacker's own images exclude every attacked one, as in the in-process run
    pool = candidate_pool(split, attacked, label, 20, seed + row) if attack != "square" else None
    oracle = HttpOracle(url, client_id=f"query-attack-{attack}-{row}", max_queries=cap + 10)
    try:
        return run_attack(oracle, attack, split.pixels[row], label, cap, seed + row, row, pool)
    finally:
        oracle.close()


def http_check(
    url: str,
    attack: AttackName,
    split: ImageSplit,
    rows: np.ndarray,
    reference: Sequence[AttackRecord],
    cap: int,
    seed: int,
    attacked: np.ndarray,
) -> dict[str, Any]:
    """The same attacks over HTTP, one client id per image, against in-process ``reference``
    records of the same rows: does the service give every image the same outcome? And the
    reference's own queries (up to ``REPLAYED``) replayed over HTTP: the same answers? (A
    decision-based attack walks the decision boundary, where the float noise of batching one
    image or a hundred may flip an answer and send the run elsewhere; the replay tells that
    from a difference in what the oracles answer.)"""
    by_row = {r.row: r for r in reference}
    same_outcome = same_queries = replayed = same_answers = 0
    images = []
    for row in rows.tolist():
        want = by_row[row]
        sent, alike = _replayed_answers(url, attack, want)
        replayed += sent
        same_answers += alike
        record = _attack_over_http(url, attack, split, row, cap, seed, attacked)
        same_outcome += record.queries_to_success == want.queries_to_success
        same_queries += len(record.queries) == len(want.queries) and np.array_equal(
            record.queries, want.queries
        )
        images.append(
            {"row": row, "http": record.queries_to_success, "in_process": want.queries_to_success}
        )
    return {
        "images": len(rows),
        "same_outcome": same_outcome,
        "same_queries": same_queries,
        "replayed_queries": replayed,
        "same_answers": same_answers,
        "per_image": images,
    }


REPLAYED = 500  # recorded queries per image replayed over HTTP


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.query_attacks",
        description="ART query attacks through the answers of POST /classify, recorded",
    )
    parser.add_argument(
        "--bundle",
        type=Path,
        default=DEFAULT_BUNDLE,
        help="bundle that picks the images and answers the in-process runs (default: %(default)s)",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=DEFAULT_SOURCE,
        help="CIFAR-10 ImageFolder directory or tar with a test/ split (default: %(default)s)",
    )
    add_data_cache_argument(parser)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="recorded queries")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_RESULTS,
        help="results directory: results.json and table.md (default: %(default)s)",
    )
    parser.add_argument(
        "--images",
        type=at_least(1),
        default=100,
        help="test images attacked, each classified correctly and accepted (default: %(default)s)",
    )
    parser.add_argument(
        "--attacks",
        nargs="+",
        choices=ATTACKS,
        default=list(ATTACKS),
        help="attacks run (default: all)",
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=SETTINGS,
        default=list(SETTINGS),
        help="the guard off, on, or both (default: both)",
    )
    for attack in ATTACKS:
        parser.add_argument(
            f"--cap-{attack}",
            type=at_least(1),
            default=DEFAULT_CAPS[attack],
            help=f"{attack}'s queries per image, at most (default: %(default)s)",
        )
    parser.add_argument(
        "--seed", type=int, default=0, help="the images' and attacks' draws (default: %(default)s)"
    )
    parser.add_argument("--threads", type=at_least(1), default=1, help="torch CPU threads")
    parser.add_argument(
        "--url",
        help="also attack a running service (loopback only) on the first --http-images images "
        "and compare each outcome with the in-process records (--settings: the service's)",
    )
    parser.add_argument(
        "--http-images",
        type=at_least(1),
        default=5,
        help="with --url: first images attacked over HTTP (default: %(default)s)",
    )
    parser.add_argument(
        "--summarise-only", action="store_true", help="reuse the recorded runs (no attacks)"
    )
    return parser


def _command(argv: Sequence[str]) -> str:
    return " ".join(["python -m evaluation.query_attacks", *map(shlex.quote, argv)])


class StaleRecordsError(Exception):
    """Recorded queries that do not belong to the conditions asked for."""


def run_conditions(
    args: argparse.Namespace, rows: np.ndarray, attack: AttackName
) -> dict[str, Any]:
    """What one run's figures depend on: the bundle's contents (its manifest lists every file's
    sha256), the images, the attack's query cap, the seed and ART's version. A run kept in a
    results.json that another invocation updates must match that invocation's conditions."""
    return {
        "bundle_manifest_sha256": hashlib.sha256(
            (Path(args.bundle) / MANIFEST_NAME).read_bytes()
        ).hexdigest()[:16],
        "rows_sha256": hashlib.sha256(rows.tobytes()).hexdigest()[:16],
        "cap": caps_of(args)[attack],
        "seed": args.seed,
        "art_version": _art_version(),
    }


def stale_runs(results: dict[str, Any], args: argparse.Namespace, rows: np.ndarray) -> list[str]:
    """The runs already in ``results`` that this invocation keeps but does not redo, and that
    were recorded under other conditions (or before runs recorded theirs): a table mixing them
    would describe runs that were never made together."""
    redone = {f"{a}/{s}" for a in args.attacks for s in args.settings}
    stale = []
    for key, summary in results["runs"].items():
        if key in redone and not args.url:
            continue
        attack = key.split("/")[0]
        if summary.get("conditions") != run_conditions(args, rows, attack):
            stale.append(key)
    return stale


def record_runs(
    args: argparse.Namespace,
    guard: Guard,
    split: ImageSplit,
    rows: np.ndarray,
    results: dict[str, Any],
    log: Log,
    command: str,
) -> None:
    """Each attack in each setting on the chosen rows, in process: run and recorded, with the
    conditions and command beside the records, then summarised into ``results["runs"]``.
    ``--summarise-only`` reuses the records and ``--url`` compares with them (leaving the runs as
    they are); both refuse records made under other conditions (another ``--out`` may have
    recorded over them: the cache is shared)."""
    for attack in args.attacks:
        conditions = run_conditions(args, rows, attack)
        for setting in args.settings:
            path = records_path(args.cache, attack, setting)
            made_by = path.with_suffix(".json")
            if not (args.summarise_only or args.url):
                oracle = GuardOracle(guard, guarded=setting == "guard_on")
                records = list(
                    attack_images(oracle, attack, split, rows, conditions["cap"], args.seed)
                )
                save_records(records, path)
                made_by.write_text(json.dumps({"conditions": conditions, "command": command}))
            recorded = json.loads(made_by.read_text()) if made_by.is_file() else {}
            if recorded.get("conditions") != conditions:
                raise StaleRecordsError(
                    f"{path} was recorded under other conditions than these (bundle, images, "
                    f"cap, seed or ART version), or before records kept theirs: run "
                    f"{attack} {setting} again in process (without --summarise-only or --url)"
                )
            if args.url:  # the HTTP check compares with these records; the runs stay as they are
                continue
            summary = summarise(load_records(path))
            results["runs"][f"{attack}/{setting}"] = summary | recorded
            log(f"{attack} {setting}: {json.dumps(summary)}")


def http_checks(
    args: argparse.Namespace,
    argv: Sequence[str],
    split: ImageSplit,
    rows: np.ndarray,
    results: dict[str, Any],
    log: Log,
) -> None:
    """``--url``: each attack and setting rerun over HTTP on the first ``--http-images`` rows
    against its in-process records (``http_check``), into ``results["http_check"]``."""
    checks = results.setdefault("http_check", {})
    for attack in args.attacks:
        for setting in args.settings:
            reference = load_records(records_path(args.cache, attack, setting))
            key = f"{attack}/{setting}"
            checks[key] = http_check(
                args.url,
                attack,
                split,
                rows[: args.http_images],
                reference,
                caps_of(args)[attack],
                args.seed,
                rows,
            ) | {"command": _command(argv)}
            log(f"http {attack} {setting}: {checks[key]['same_outcome']}")


def caps_of(args: argparse.Namespace) -> dict[AttackName, int]:
    """The query cap per image of each attack (``--cap-ATTACK``)."""
    return {a: getattr(args, f"cap_{a}") for a in ATTACKS}


def run_description(args: argparse.Namespace, rows: np.ndarray) -> dict[str, Any]:
    """What the runs were: bundle, images, caps, seed, ART version, budgets."""
    return {
        "bundle": str(args.bundle),
        "images": len(rows),
        "caps": caps_of(args),
        "seed": args.seed,
        "art_version": _art_version(),
        "budgets": {"square_linf": SQUARE_EPS, "decision_l2": L2_EPS},
        "rows_sha256": hashlib.sha256(rows.tobytes()).hexdigest()[:16],
        "notes": NOTES,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Bundle and images -> the in-process runs (recorded) -> their summaries -> with ``--url``,
    the HTTP check -> results.json and table.md (runs of other attacks or settings kept)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.url and not is_loopback(args.url):
        parser.error(f"--url {args.url} is not a loopback address")
    if args.out.exists() and not args.out.is_dir():  # found only after the attacks, before
        parser.error(f"--out {args.out} exists and is not a directory")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    guard = Guard.load(args.bundle, device="cpu")
    split = load_split(args.source, "test", guard.preset, args.data_cache)
    rows = pick_images(guard, split, args.images, args.seed)
    results_file = args.out / "results.json"
    results: dict[str, Any] = (
        json.loads(results_file.read_text()) if results_file.is_file() else {"runs": {}}
    )
    stale = stale_runs(results, args, rows)
    if stale:
        print(
            f"{parser.prog}: error: {results_file} holds runs recorded under other conditions "
            f"(bundle, images, cap, seed or ART version) or before runs recorded theirs: "
            f"{', '.join(stale)}; redo them in process too (--attacks/--settings, without "
            f"--url) or use another --out",
            file=sys.stderr,
        )
        return 2
    try:
        record_runs(args, guard, split, rows, results, log, _command(argv))
    except StaleRecordsError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    results.update(run_description(args, rows))
    results.pop("command", None)  # each run records its own (before 2026-11-30: the latest's)
    if args.url:
        http_checks(args, argv, split, rows, results, log)
    order = [f"{a}/{s}" for a in ATTACKS for s in SETTINGS]
    results["runs"] = {k: results["runs"][k] for k in order if k in results["runs"]}
    args.out.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "table.md").write_text(table(results))
    return 0


def _art_version() -> str:
    import art

    return str(art.__version__)


NOTES = [
    "Square (ART SquareAttack, p_init 0.05, the paper's Linf schedule) reads the returned "
    "class's probability p as p on that class and (1 - p)/(K - 1) elsewhere; a rejection reads "
    "as a uniform vector (margin 0), never as adversarial.",
    "HopSkipJump and Boundary (ART, L2, untargeted) read a rejection as the true label; they "
    "start from the attacker's nearest natural image of another class that the oracle answers "
    "with another label (each try is a counted query). ART's initial search uses an unseeded "
    "RandomState, so reruns differ slightly.",
    "Every run stops at its first success (the attacker has what it wants) or at the cap.",
    "Caps: Square 1,000 queries (it needs ~70 on average on undefended CIFAR-10 models); "
    "HopSkipJump and Boundary 2,500 (hundreds to a few thousand on CIFAR-10), which keeps each "
    "attack x setting under ~25 minutes on one shared CPU thread; their success rates are "
    "within that cap, and the closest adversarial answer shows how far the others got.",
    "The recorded queries (8-bit, in order, with the answers) are in .cache/query-attacks/ "
    "(git-ignored; `load_records`); the stateful detector replays them (stateful.md).",
]


if __name__ == "__main__":
    from app.cli import said_in_one_line

    raise SystemExit(said_in_one_line(main, "python -m evaluation.query_attacks"))
