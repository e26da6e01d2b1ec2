"""One query attack on one image through an oracle (``evaluation.query_oracles``), recorded;
the records' cache and their summaries (issue 13, part 1).

The attacks are the adversarial-robustness-toolbox (ART) implementations, run against what a
client sees through ``BlackBoxClassifier``:

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

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from evaluation.data import eight_bit, save_npz
from evaluation.query_oracles import (
    DECISIONS,
    Answer,
    Oracle,
)

AttackName = Literal["square", "hopskipjump", "boundary"]
ATTACKS: tuple[AttackName, ...] = get_args(AttackName)
Setting = Literal["guard_off", "guard_on"]
SETTINGS: tuple[Setting, ...] = get_args(Setting)

SQUARE_EPS = 8 / 255  # Linf budget of the score-based attack
L2_EPS = 0.5  # L2 budget of the decision-based attacks (pixels in [0, 1], 3x32x32)
STOP_REASONS = ("success", "cap", "finished")


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
