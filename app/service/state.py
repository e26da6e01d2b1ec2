"""What the routes share: the loaded service and the errors they answer with on purpose."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.core.flagging import FlagPolicy
from app.core.guard import Guard
from app.service.batcher import Batcher
from app.service.identity import IdentityResolver
from app.service.metrics import Metrics
from app.service.neighbours import NeighbourImages
from app.service.settings import Settings
from app.service.tracking import ClientTracker

if TYPE_CHECKING:
    from app.service.stateful import ScreeningWorker, StatefulDetector


class ApiError(Exception):
    """An error the API answers on purpose: status, machine-readable code, message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


@dataclass
class Service:
    settings: Settings
    metrics: Metrics
    guard: Guard
    batcher: Batcher
    tracker: ClientTracker
    identity: IdentityResolver
    flag_policy: FlagPolicy
    neighbour_images: NeighbourImages | None = None  # ADVGUARD_NEIGHBOUR_SOURCE
    accepting: bool = True
    last_flagged_count: list[int] = field(default_factory=lambda: [0])
    stateful: StatefulDetector | None = None  # stateful detection of query attacks; None: off
    screening: ScreeningWorker | None = None  # the one thread that runs ``stateful``
