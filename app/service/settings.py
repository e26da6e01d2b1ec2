"""Service settings, read from ``ADVGUARD_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.core.flagging import DEFAULT_FLAG_QUANTILE, DEFAULT_MIN_REQUESTS
from app.core.images import DEFAULT_MAX_PIXELS

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent.parent / "bundles" / "cifar10-resnet20"


class Settings(BaseSettings):
    """Every knob of the service. Lists and mappings are given as JSON in the environment."""

    model_config = SettingsConfigDict(env_prefix="ADVGUARD_", frozen=True, extra="forbid")

    # bundle and model
    bundle: Path = DEFAULT_BUNDLE
    device: str | None = None  # cuda / cpu; default: cuda when available
    retention: float | None = None  # another calibrated acceptance threshold ("0.95", ...)

    # responses
    expose_scores: bool = False  # return the kNN score and threshold (trusted deployments only)

    # micro-batching
    max_batch_size: int = Field(default=32, ge=1, le=2048)
    max_wait_ms: float = Field(default=5.0, ge=0.0)
    queue_size: int = Field(default=256, ge=1)
    retry_after_s: int = Field(default=1, ge=1)
    # classifications admitted at once (reading, decoding, queued, in a batch); beyond it, 503
    # before the body is read. Default: queue_size + max_batch_size
    max_in_flight: int | None = Field(default=None, ge=1)

    # input limits
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)

    # identity
    api_keys: dict[str, SecretStr] = Field(default_factory=dict)  # client id -> key
    api_key_header: str = "X-API-Key"
    client_id_header: str = "X-Client-ID"
    trusted_proxies: list[str] = Field(default_factory=list)  # addresses or CIDR networks
    admin_token: SecretStr | None = None
    admin_token_header: str = "X-Admin-Token"

    # tracking
    redis_url: str | None = None  # unset: in-process tracker
    redis_prefix: str = "advguard"
    redis_timeout_s: float = Field(default=0.2, gt=0.0)
    redis_retry_interval_s: float = Field(default=0.5, ge=0.0)
    tracker_buffer_size: int = Field(default=10_000, ge=0)
    client_ttl_s: int = Field(default=7 * 24 * 3600, ge=1)  # idle time before a client expires
    ewma_alpha: float = Field(default=0.05, gt=0.0, le=1.0)
    flag_threshold: float | None = None  # default: derived from the bundle's calibration
    flag_quantile: float = Field(default=DEFAULT_FLAG_QUANTILE, gt=0.0, lt=1.0)
    flag_min_requests: int = Field(default=DEFAULT_MIN_REQUESTS, ge=1)
    policy: Literal["flag", "refuse"] = "flag"  # refuse: flagged clients get 403
