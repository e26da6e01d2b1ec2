"""Response models of the HTTP API (they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from app.core.explain import Explanation


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class Prediction(_Model):
    class_index: int
    class_name: str
    probability: float


class StatisticEvidenceModel(_Model):
    name: str  # kind@layer
    # higher = more authentic; None: a doubt_margin or suspect_margin that did not read the query
    value: float | None
    p_value: float | None  # against held-out authentic images; None for a single statistic


class NeighbourModel(_Model):
    id: int  # the bundle's index row: GET /v1/neighbours/{id} serves its image (trusted)
    label: int
    class_name: str
    squared_distance: float


class ExplanationModel(_Model):
    """The evidence behind a decision (``?explain=true``, trusted callers only)."""

    predicted_class: int  # every statistic is of this class (shown even when rejected)
    predicted_class_name: str
    score: float  # combined score; accepted when >= threshold
    threshold: float
    combination: str  # single (the score is the statistic), fisher, hmp or min_p
    statistics: list[StatisticEvidenceModel]
    vote_statistic: str | None  # whose neighbours follow
    vote_histogram: list[int]  # per class index: neighbours of that class among the vote's k
    nearest: list[NeighbourModel]  # nearest training images, nearest first
    neighbour_images: bool  # whether GET /v1/neighbours/{id} can serve their images

    @classmethod
    def of(
        cls, explanation: Explanation, class_names: list[str], combination: str, images: bool
    ) -> ExplanationModel:
        return cls(
            predicted_class=explanation.predicted_class,
            predicted_class_name=class_names[explanation.predicted_class],
            score=explanation.score,
            threshold=explanation.threshold,
            combination=combination,
            statistics=[
                StatisticEvidenceModel(name=s.name, value=s.value, p_value=s.p_value)
                for s in explanation.statistics
            ],
            vote_statistic=explanation.vote_statistic,
            vote_histogram=explanation.vote_histogram,
            nearest=[
                NeighbourModel(
                    id=n.id,
                    label=n.label,
                    class_name=class_names[n.label],
                    squared_distance=n.squared_distance,
                )
                for n in explanation.nearest
            ],
            neighbour_images=images,
        )


class ClassifyResponse(_Model):
    request_id: str
    # unguarded: the guard is off (ADVGUARD_GUARD_ENABLED=false), the prediction is unchecked
    decision: Literal["accepted", "rejected", "unguarded"]
    prediction: Prediction | None = None  # withheld when rejected
    score: float | None = None  # only with ADVGUARD_EXPOSE_SCORES
    threshold: float | None = None  # only with ADVGUARD_EXPOSE_SCORES
    # only with ?explain=true from a trusted caller (app.service.trust); else silently omitted
    explanation: ExplanationModel | None = None


class ErrorResponse(_Model):
    error: str  # machine-readable code
    message: str
    request_id: str | None = None


class Health(_Model):
    status: Literal["ok"]


class Readiness(_Model):
    status: Literal["ok", "degraded", "unavailable"]
    bundle_loaded: bool
    batcher_running: bool
    tracker: Literal["ok", "degraded", "none"]
    tracker_backend: Literal["memory", "redis"]
    tracker_buffered_updates: int


class LayerSummary(_Model):
    name: str
    processing: str
    output_dim: int
    index_type: str


class BundleSummary(_Model):
    name: str
    model_arch: str
    num_classes: int
    layers: list[LayerSummary]
    k: int
    score_function: str
    combination: str
    statistics: list[str]  # kind@layer, in the detector's order
    threshold: float | None = None  # only with ADVGUARD_EXPOSE_SCORES, like the scores
    operating_retention: float
    threshold_policy: str
    # mean, ewma, ewma_anchored, rejection_rate, cusum or ewma_shift (docs/service.md)
    flag_policy: str
    flag_threshold: float | None = None  # on the policy's statistic; only with EXPOSE_SCORES
    # ewma_shift's second threshold, on the client's shift; only with EXPOSE_SCORES
    flag_shift_threshold: float | None = None
    flag_min_requests: int
    # the policy averages per-class p-values of the scores (true) or the raw scores (false)
    flag_per_class: bool
    class_names: list[str]


class ClientStatsModel(_Model):
    client_id: str
    requests: int
    accepted: int
    rejected: int
    scored: int
    mean_score: float
    ewma_score: float
    window_rejected: int
    cusum: float
    shift: float  # the drop below the client's own mean (the ewma_shift policy's CUSUM)
    first_seen: float
    last_seen: float
    flagged: bool
    flagged_at: float | None
    flag_reasons: list[str] = []  # "score", "query_attack"


class ClientList(_Model):
    clients: list[ClientStatsModel]


class FlagCleared(_Model):
    client_id: str
    cleared: bool


class DemoSession(_Model):
    """Who the service takes the caller for (GET /v1/demo/session; the demo page's header)."""

    client_id: str
    trusted: bool  # may see the evidence (?explain=true), its own flag state, neighbour images
    neighbour_images: bool  # the service can serve neighbour thumbnails


class ClientState(_Model):
    """The caller's own tracking state (GET /v1/client, trusted callers)."""

    client_id: str
    known: bool  # false before its first classification
    stats: ClientStatsModel | None
