"""What a client of ``POST /classify`` sees, as the query attacks' oracle (issue 13, part 1).

An online attacker holds no weights, only the API: it uploads 8-bit images and reads the answer,
``accepted`` (with the class and its probability), ``rejected`` (nothing) or, with the guard off,
``unguarded`` (the class and its probability); a refused client reads a 403. ``GuardOracle``
gives those answers in process over a loaded ``Guard`` (the bulk runs), ``HttpOracle`` from a
running ``advguard serve`` (loopback only, bounded), which checks that the first stands in for
the service.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import numpy as np
import torch
from PIL import Image

from app.core.guard import Guard
from app.core.stateful.match_rule import Answer as ServedAnswer
from evaluation.simulate_cli import is_loopback

Decision = Literal["accepted", "rejected", "unguarded", "refused"]
DECISIONS: tuple[Decision, ...] = get_args(Decision)


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
        # per query sent, the error code of a 403 answer (``query_refused``: the screening
        # detected it under ``refuse``; ``client_flagged``: a refused client), else None
        self.refusals: list[str | None] = []
        bundle = self._http.get("/v1/bundle")
        bundle.raise_for_status()
        self.served_bundle: dict[str, Any] = bundle.json()  # GET /v1/bundle: what answers
        self._num_classes = len(self.served_bundle["class_names"])

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def close(self) -> None:
        self._http.close()

    def _post(self, data: bytes) -> Answer:
        for attempt in range(self.retries + 1):
            response = self._http.post("/classify", files={"file": ("query.png", data)})
            if response.status_code != 503 or attempt == self.retries:
                body = response.json()
                answer = parse_answer(response.status_code, body)
                refused = response.status_code == 403
                self.refusals.append(str(body.get("error")) if refused else None)
                return answer
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
