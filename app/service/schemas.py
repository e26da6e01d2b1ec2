"""Response models of the HTTP API (they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True)


class Prediction(_Model):
    class_index: int
    class_name: str
    probability: float


class ClassifyResponse(_Model):
    request_id: str
    # unguarded: the guard is off (ADVGUARD_GUARD_ENABLED=false), the prediction is unchecked
    decision: Literal["accepted", "rejected", "unguarded"]
    prediction: Prediction | None = None  # withheld when rejected
    score: float | None = None  # only with ADVGUARD_EXPOSE_SCORES
    threshold: float | None = None  # only with ADVGUARD_EXPOSE_SCORES


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
    flag_policy: str  # mean, ewma, rejection_rate or cusum (see docs/service.md)
    flag_threshold: float | None = None  # on the policy's statistic; only with EXPOSE_SCORES
    flag_min_requests: int
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
