"""The stateful evaluation's report (evaluation.stateful_report): the viral photo's false flags are
bounded per photo, not per sender."""

from __future__ import annotations

from evaluation.stateful_report import viral_note


def test_viral_false_flags_are_bounded_per_photo_not_per_sender() -> None:
    """Senders of the same few photos are not independent samples: with none flagged, the
    bound is over the photos (0 of 4: Wilson 0-49%), never the senders' 0.38%."""
    none = viral_note(1000, 0, 4)
    assert "per photo 0 of 4, 95% interval 0%-49%" in none and "0.38" not in none
    some = viral_note(1000, 3, 4)
    assert "3 senders were flagged" in some and "interval" not in some.split("holds. ")[1]
