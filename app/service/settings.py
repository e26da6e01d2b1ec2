"""Service settings, read from ``ADVGUARD_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.connection import parse_url

from app.core.features import Precision
from app.core.flagging import (
    DEFAULT_EWMA_ALPHA,
    DEFAULT_FALSE_FLAG_RATE,
    DEFAULT_HORIZON,
    DEFAULT_MIN_REQUESTS,
    DEFAULT_POLICY,
    PolicyKind,
)
from app.core.images import DEFAULT_MAX_PIXELS
from app.core.search import SERVING_THREADS, SearchBackend
from app.core.stateful.close_copies import CLOSE_RADIUS
from app.core.stateful.defaults import DEFAULT_RULE

StatefulPolicy = Literal["flag", "refuse", "silent"]
EventLoop = Literal["auto", "asyncio", "uvloop"]
FingerprintDevice = Literal["auto", "cpu"]

DEFAULT_BUNDLE = Path(__file__).resolve().parent.parent.parent / "bundles" / "cifar10-resnet20"


class Settings(BaseSettings):
    """Every knob of the service. Lists and mappings are given as JSON in the environment."""

    model_config = SettingsConfigDict(env_prefix="ADVGUARD_", frozen=True, extra="forbid")

    # bundle and model
    bundle: Path = DEFAULT_BUNDLE
    device: str | None = None  # cuda / cpu; default: cuda when available
    retention: float | None = None  # another calibrated acceptance threshold ("0.95", ...)
    # exact kNN search: faiss (on the GPU only with faiss-gpu), or torch's matmul + top-k on the
    # model's device (flat indexes only; the way to search on a GPU without faiss-gpu)
    search_backend: SearchBackend = "faiss"
    # faiss's CPU search threads on the batch worker: one, since a second costs more CPU than it
    # saves time on cores shared with the model and the web server (search.SERVING_THREADS)
    search_threads: int = Field(default=SERVING_THREADS, ge=1)
    # the model's forward pass: fp32 (what the bundle was calibrated with), or bf16/fp16
    # autocast, and the channels_last memory format; faster on GPUs, but check that decisions
    # stay unchanged first (bench/gpu/run.sh does)
    model_precision: Precision = "fp32"
    channels_last: bool = False

    # the private listener: /metrics and the admin routes (app.service.admin); the public port
    # answers them 404. Host: --admin-host, default the public listener's --host
    admin_port: int = Field(default=9000, ge=1, le=65535)
    admin_host: str | None = None

    # the bundle's source images (the ImageFolder directory or .tar/.tar.gz it was built from),
    # so trusted callers see a decision's nearest training images; needs a bundle built with
    # sources.json (app.service.neighbours)
    neighbour_source: Path | None = None

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
    # time a classification may wait for the model: 503 + Retry-After before the body is read
    # when its expected wait (requests ahead x measured time per image) is over it, and a queued
    # image that waited longer is dropped, never run. Unset: two full batches at the measured
    # time per image; 0: off (max_in_flight and queue_size remain)
    latency_budget_ms: float | None = Field(default=None, ge=0.0)
    # a 503 overloaded is sent after about this long (jittered +-50%; the connection held,
    # idle), so that clients that retry at once cannot turn refusals into a storm
    shed_delay_ms: float = Field(default=1000.0, ge=0.0)
    # false: classify only (model, no kNN search, no client tracking): decision "unguarded"
    guard_enabled: bool = True
    # intra-op threads of the model on CPU (torch.set_num_threads); default: torch's (one per
    # core), the fastest on a quiet machine (bench/results/service_vs_bare.md); 1 helps only when
    # other processes compete for the cores
    torch_threads: int | None = Field(default=None, ge=1)
    # the interpreter's switch interval (sys.setswitchinterval), in ms; default: Python's (5)
    switch_interval_ms: float | None = Field(default=None, gt=0.0, le=100.0)

    # input limits
    max_upload_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    # lingering close after a 413 (app.service.linger): the rest of the refused body is read
    # and discarded, at most this many bytes / seconds in all / seconds of client silence, so
    # that clients that send the whole body before reading the reply get the 413, not a reset
    linger_max_bytes: int = Field(default=128 * 1024 * 1024, ge=0)
    linger_max_s: float = Field(default=30.0, ge=0.0)
    linger_idle_s: float = Field(default=5.0, gt=0.0)
    linger_max_connections: int = Field(default=64, ge=0)  # beyond: close at once, as before

    # identity
    api_keys: dict[str, SecretStr] = Field(default_factory=dict)  # client id -> key
    api_key_header: str = "X-API-Key"
    client_id_header: str = "X-Client-ID"
    trusted_proxies: list[str] = Field(default_factory=list)  # addresses or CIDR networks
    admin_token: SecretStr | None = None
    admin_token_header: str = "X-Admin-Token"

    # tracking
    redis_url: str | None = None  # unset: in-process tracker
    # true: redis_url names one node of a Redis Cluster (redis.cluster.RedisCluster finds the rest)
    redis_cluster: bool = False
    redis_prefix: str = Field(default="advguard", pattern=r"^[^{}]*$")  # braces: hash tags
    redis_timeout_s: float = Field(default=0.2, gt=0.0)
    redis_retry_interval_s: float = Field(default=0.5, ge=0.0)
    tracker_buffer_size: int = Field(default=10_000, ge=0)
    client_ttl_s: int = Field(default=7 * 24 * 3600, ge=1)  # idle time before a client expires
    # in-process tracker: clients kept at most (least recently seen unflagged evicted first),
    # so that rotating X-Client-ID values cannot grow memory without bound
    tracker_max_clients: int = Field(default=100_000, ge=1)
    # per-client flagging (app.core.flagging): the policy, and the design false-flag rate of
    # honest clients within flag_horizon requests from which its threshold is calibrated
    flag_policy: PolicyKind = DEFAULT_POLICY
    flag_threshold: float | None = None  # on the policy's statistic; default: calibrated
    flag_false_rate: float = Field(default=DEFAULT_FALSE_FLAG_RATE, gt=0.0, lt=1.0)
    flag_horizon: int = Field(default=DEFAULT_HORIZON, ge=1)
    flag_min_requests: int = Field(default=DEFAULT_MIN_REQUESTS, ge=1)
    # the policy averages each request's per-class p-value (its score among the held-out honest
    # scores of its predicted class) when the bundle has their classes; false: the raw score
    flag_per_class: bool = True
    ewma_alpha: float = Field(default=DEFAULT_EWMA_ALPHA, gt=0.0, le=1.0)
    policy: Literal["flag", "refuse"] = "flag"  # refuse: flagged clients get 403

    # stateful detection of query attacks (app/service/stateful.py, docs/service.md): each
    # query's fingerprint is matched against its client's and everyone's recent queries
    stateful_enabled: bool = True
    # what a detected query gets: "flag" answers as usual; "refuse" (the default) answers 403;
    # "silent" answers what its anchor, the earliest stored near-duplicate, was answered, so
    # that detection is no oracle, but that answer is often the true one (see docs/service.md
    # for the measured reason behind this default)
    stateful_policy: StatefulPolicy = "refuse"
    # the salt of the window hashes (an attacker who knows it can pick what the hashes miss);
    # required with Redis, where every replica must hash alike; unset in process: random per
    # process (its fingerprints live and die with it)
    stateful_secret: SecretStr | None = None
    stateful_ttl_s: float = Field(default=3600.0, gt=0.0)  # everyone's queries remembered
    stateful_client_ttl_s: float = Field(default=86_400.0, gt=0.0)  # a client's own queries
    stateful_max_fingerprints: int = Field(default=50_000, ge=1)  # everyone's queries kept
    stateful_per_client: int = Field(default=256, ge=1)  # a client's own queries kept
    stateful_max_clients: int = Field(default=100_000, ge=1)  # in process: clients kept
    # distinct near-duplicates that detect a query among its client's / everyone's queries
    stateful_client_matches: int = Field(default=DEFAULT_RULE.client_matches, ge=1)
    stateful_global_matches: int = Field(default=DEFAULT_RULE.global_matches, ge=1)
    # distinct near-duplicates from which a query whose answer would change its anchor's class
    # is detected (DetectionRule.changed_matches); 0: off
    stateful_changed_matches: int = Field(default=DEFAULT_RULE.changed_matches or 0, ge=0)
    # distinct near-duplicates from which a query that is not detected but whose answer would
    # show a class its anchor's did not is served the anchor's answer under refuse and silent
    # (DetectionRule.consistent_matches; nobody is flagged); 0: off
    stateful_consistent_matches: int = Field(default=DEFAULT_RULE.consistent_matches or 0, ge=0)
    # the changed answer also counts a query the guard rejects, by its model class
    # (DetectionRule.changed_includes_rejected): an experiment, off by default (measured: one
    # honest burst client over the calibration budget)
    stateful_changed_rejected: bool = DEFAULT_RULE.changed_includes_rejected
    # the blend test (app.core.stateful.blends): a query on the line through two of its
    # client's last distinct queries is detected (a decision-based attack's binary search);
    # on by default since 2026-12-07 (rules cd4d957 and 3df9330: evaluation/README.md)
    stateful_blends: bool = True
    stateful_blend_clients: int = Field(default=4096, ge=1)  # in process: clients it remembers
    # grey levels within which every block mean of a stored query must lie for it to count as a
    # close copy: a match for the consistent count only, never for a flag (Square's first probe
    # is one); 0: off
    stateful_close_radius: int = Field(default=CLOSE_RADIUS, ge=0, le=255)
    # worker processes that hash the large uploads (ImageNet size) of a screening batch, parts
    # at once (app/service/hashing.py); 0: on the thread that screens. CIFAR-size uploads are
    # hashed on that thread whatever this says
    stateful_fingerprint_processes: int = Field(default=2, ge=0, le=64)
    # where the large uploads' window hashes are computed: auto, on the model's device when it
    # is a GPU (bit-identical, app/core/stateful/device_hashes.py; the worker processes are then
    # not started), else as the line above says; cpu: always as the line above says
    stateful_fingerprint_device: FingerprintDevice = "auto"
    # with a screening thread (Redis, or a GPU), look a model batch's queries up while the
    # model runs it (fingerprint; with Redis store them, answers pending, and fetch their
    # candidates), then decide each once classified. Off: all of it after classification. On
    # two CPU cores it showed no throughput gain and raised the CPU per request (the look-up
    # slows the model's forward pass beside it: docs/service.md); meant for a model that does
    # not share the CPU (a GPU): no gain on an H200 either (2026-12-04, one run, docs/deploy.md)
    stateful_look_up_early: bool = False

    # the listeners' event loop: uvloop (auto: whenever it is importable) or asyncio's own. On
    # two CPU cores uvloop served 32-60% more requests a second, guarded or not, in the same runs
    # (docs/service.md, Micro-batching): asyncio's loop was what bounded the service
    event_loop: EventLoop = "auto"

    @field_validator("redis_url")
    @classmethod
    def _readable_redis_url(cls, url: str | None) -> str | None:
        """A URL redis-py cannot parse is refused at start: the clients connect on first use,
        so it would otherwise start a service whose every request fails (a 500), not one that
        fails open. The error never repeats the URL (it may hold a password)."""
        if url:
            try:
                parse_url(url)  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
            except ValueError as exc:
                raise ValueError(f"redis-py cannot use this URL: {exc}") from None
        return url

    @model_validator(mode="after")
    def _cluster_over_tcp(self) -> Settings:
        if self.redis_cluster and self.redis_url and self.redis_url.startswith("unix:"):
            raise ValueError(
                "ADVGUARD_REDIS_CLUSTER needs a node's redis:// or rediss:// URL (a cluster's "
                "nodes find each other over TCP, not a unix socket)"
            )
        return self

    @model_validator(mode="after")
    def _shared_secret_with_redis(self) -> Settings:
        """Replicas sharing Redis must hash with one secret: a random one per process would
        make every replica's fingerprints of the same image differ, and nothing would match."""
        secret = self.stateful_secret
        stateful = self.stateful_enabled and self.guard_enabled
        if stateful and self.redis_url and (secret is None or not secret.get_secret_value()):
            raise ValueError(
                "ADVGUARD_STATEFUL_SECRET is required with ADVGUARD_REDIS_URL (every replica "
                "must hash queries with the same secret); or set ADVGUARD_STATEFUL_ENABLED=false"
            )
        return self

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> Settings:
        """deploy/k8s/secret.yaml ships placeholders; applied as they are (``kubectl apply -f
        deploy/k8s/`` re-applies the file over a Secret made by hand), they would put a publicly
        known admin token, salt or API key in service without a word."""
        secrets = {
            "ADVGUARD_ADMIN_TOKEN": self.admin_token,
            "ADVGUARD_STATEFUL_SECRET": self.stateful_secret,
            **{f"ADVGUARD_API_KEYS[{name}]": key for name, key in self.api_keys.items()},
        }
        for variable, secret in secrets.items():
            if secret is not None and secret.get_secret_value().startswith(PLACEHOLDER_PREFIX):
                raise ValueError(
                    f"{variable} still holds a placeholder ({PLACEHOLDER_PREFIX}...): set a "
                    "random value, e.g. openssl rand -hex 32"
                )
        return self


# The start of every placeholder value in deploy/k8s/secret.yaml: refused as a secret.
PLACEHOLDER_PREFIX = "replace-me"
ENV_PREFIX = "ADVGUARD_"
# How alike (difflib's ratio, after the prefix) an unknown variable must be to a setting's name to
# be taken for a misspelling of it: a letter dropped, doubled or swapped in a name of 8 or more
# letters; the project's own other variables (ADVGUARD_PORT, ADVGUARD_BUILD_*, ...) stay below it.
MISSPELLING_CUTOFF = 0.85


def misspelt_settings(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """(variable, the setting it most likely means) for each ``ADVGUARD_*`` variable of
    ``environ`` that is no setting but nearly one's name. pydantic-settings ignores unknown
    variables, so ``ADVGUARD_STATEFUL_POLCY=silent`` would otherwise change nothing, silently."""
    names = [name.upper() for name in Settings.model_fields]
    found: list[tuple[str, str]] = []
    for variable in sorted(environ):
        upper = variable.upper()  # pydantic-settings reads the names case-insensitively
        if not upper.startswith(ENV_PREFIX) or upper[len(ENV_PREFIX) :] in names:
            continue
        close = difflib.get_close_matches(upper[len(ENV_PREFIX) :], names, 1, MISSPELLING_CUTOFF)
        if close:
            found.append((variable, ENV_PREFIX + close[0]))
    return found
