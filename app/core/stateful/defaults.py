"""The measured default fingerprint and detection rule (evaluation/stateful_eval.py)."""

from __future__ import annotations

from app.core.stateful.close_copies import CLOSE_RADIUS
from app.core.stateful.match_rule import DetectionRule
from app.core.stateful.schemes import WindowHashScheme

# Chosen and calibrated by evaluation/stateful_eval.py on CIFAR-10 (results in
# evaluation/results/query-attacks/stateful.md): window hashes of values quantised in steps of
# 25 grey levels, a match from 25 shared sketch bits (of ~50); flag at 5 distinct near-duplicates,
# one above the most any of 4,000 honest calibration clients reached (a burst of edits: 4), and
# a query whose answer changes its anchor's class at 2, the lowest count that flags at most half
# the false-flag targets of those clients (stateful_replay.CALIBRATION_BUDGET: 5 of 1,000
# burst clients at 2; 1 flagged more; 4 until 2026-11-29, when it was set to flag none).
DEFAULT_STEP = 25
DEFAULT_SHARED = 25
# A near-exact copy below that count that would show a class its anchor did not is served the
# anchor's answer from the first match (consistent_matches=1, fixed in advance as the lowest
# count: it flags no one; the honest answers it replaces: evaluation.consistency_cost).
DEFAULT_RULE = DetectionRule(
    client_matches=5, global_matches=5, changed_matches=2, consistent_matches=1
)


def default_scheme(secret: bytes, close_radius: int | None = CLOSE_RADIUS) -> WindowHashScheme:
    """The measured default fingerprint, salted with ``secret`` (a setting in the service), with
    close copies within ``close_radius`` grey levels for the consistent count (None: none)."""
    return WindowHashScheme(
        secret, step=DEFAULT_STEP, threshold=float(DEFAULT_SHARED), close_radius=close_radius
    )
